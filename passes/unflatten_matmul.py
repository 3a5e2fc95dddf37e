"""unflatten-matmul: computes the matmuls a captured `nn.Linear` flattens on the unflattened
tensors, so that a split of a leading dimension other than the first survives them.

Capture writes `nn.Linear` on a `[b, s, k]` input as a view to `[b*s, k]`, an `mm` (or
`addmm` with the bias) and a view back to `[b, s, n]`; its backward as the same views around
`mm(dy, w)`, `mm(t(dy), x)` and a sum over the `b*s` rows. A layout cannot split `s` inside
the merged `b*s` dimension (a strided shard), so a sequence split must leave the tensor at
every linear. This pass rewrites each such use of a merging view of a rank-3 `x` to work on
`x` itself, with ops whose sharding rules keep every dimension apart:

    mm(view(x), w)                -> matmul(x, w)                      [b, s, n]
    addmm(c, view(x), w)          -> add(matmul(x, w), c)
    mm(t(view(dy)), view(x))      -> sum(matmul(transpose(dy, 1, 2), x), [0])   [n, k]
    sum(view(dy), [0], keepdim)   -> sum(dy, [0, 1], keepdim) viewed as the old result

A view of a rewritten result back to the unflattened shape is the new result itself; any
other reader gets a view of it. Merging views with no reader left are erased. Numerics:
matmul of `[b, s, k]` by `[k, n]` computes what `mm` of the flattened rows does, row by
row; the weight gradient sums over s in each matmul and then over b, a different order of
the same additions than `mm` over b*s (float reassociation only).

Options: none. Runs on the captured `@main`, before propagation (the sequence-parallel
directive puts it first).
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects.roles import ORIGIN, main_function
from piperc.dialects.torch import ConstantBoolOp, ValueTensorType
from piperc.dialects.torch_builder import TorchBuilder
from piperc.passes.sharding_rules import VIEW_OPS, const_int, const_ints, shape

_DEAD_IF_UNREAD = (*VIEW_OPS, "torch.aten.t", "torch.prim.ListConstruct", "torch.constant.int", "torch.constant.bool",
                   "torch.constant.none", "torch.constant.float")
"""The ops a rewrite leaves unread (the merging views, their transposes and constants), erased."""


def _merged(value: SSAValue) -> SSAValue | None:
    """The rank-3 `[b, s, k]` tensor `value` is a `[b*s, k]` view of, else None."""
    op = value.owner
    if not isinstance(op, Operation) or op.name not in VIEW_OPS:
        return None
    source = op.operands[0]
    src, dst = shape(source), shape(value)
    if len(src) == 3 and len(dst) == 2 and dst == (src[0] * src[1], src[2]) and min(src) > 0:
        return source
    return None


def _transposed(value: SSAValue) -> SSAValue | None:
    """x for `value` = t(x)."""
    op = value.owner
    return op.operands[0] if isinstance(op, Operation) and op.name == "torch.aten.t" else None


@dataclass
class _Rewriter:
    main: object

    def builder(self, before: Operation) -> TorchBuilder:
        return TorchBuilder(before.parent_block(), before)

    def typed(self, like: ValueTensorType, sizes) -> ValueTensorType:
        return ValueTensorType(list(sizes), like.dtype)

    def stamp(self, first: Operation | None, old: Operation) -> None:
        """Gives every op made before `old` since `first` (constants included) `old`'s origin,
        so outline-stages places them with it."""
        origin = old.attributes.get(ORIGIN)
        op = old.parent_block().first_op if first is None else first.next_op
        while origin is not None and op is not None and op is not old:
            op.attributes[ORIGIN] = origin
            op = op.next_op

    def replace(self, old: Operation, new: SSAValue, b: TorchBuilder, first: Operation | None) -> None:
        """Readers of `old`'s result that view it back to `new`'s shape read `new`; the others
        read a view of `new` with the old shape. The ops made since `first` get `old`'s origin."""
        result = old.results[0]
        if shape(new) == shape(result):
            result.replace_all_uses_with(new)
            self.stamp(first, old)
            old.detach()
            old.erase()
            return
        flat = None
        for use in list(result.uses):
            reader = use.operation
            if reader.name in VIEW_OPS and shape(reader.results[0]) == shape(new):
                reader.results[0].replace_all_uses_with(new)
                reader.detach()
                reader.erase()
                continue
            if flat is None:
                flat = b.aten("torch.aten.view", [new, b.int_list(shape(result))], [result.type])
            use.operation.operands[use.index] = flat
        self.stamp(first, old)
        old.detach()
        old.erase()

    def run(self) -> None:
        block = self.main.body.block
        changed = True
        while changed:
            changed = False
            for op in list(block.ops):
                if op.parent is None:
                    continue
                if self.rewrite(op):
                    changed = True
            for op in reversed(list(block.ops)):  # what the rewrites left unread
                if op.name in _DEAD_IF_UNREAD and not any(r.uses for r in op.results):
                    op.detach()
                    op.erase()

    def rewrite(self, op: Operation) -> bool:
        """Rewrites `op` if it is one of the module docstring's patterns; whether it did."""
        name = op.name
        first = op.prev_op
        if name == "torch.aten.mm":
            a, w = op.operands
            x = _merged(a)
            if x is not None and len(shape(w)) == 2:
                b = self.builder(op)
                out = b.aten("torch.aten.matmul", [x, w], [self.typed(op.results[0].type, (*shape(x)[:2], shape(w)[1]))])
                self.replace(op, out, b, first)
                return True
            dy_t, xf = op.operands
            dy_flat = _transposed(dy_t)
            dy = _merged(dy_flat) if dy_flat is not None else None
            x = _merged(xf)
            if dy is not None and x is not None and shape(dy)[:2] == shape(x)[:2]:
                b = self.builder(op)
                bb, s, n = shape(dy)
                k = shape(x)[2]
                tr = b.aten("torch.aten.transpose.int", [dy, b.int(1), b.int(2)], [self.typed(dy.type, (bb, n, s))])
                per = b.aten("torch.aten.matmul", [tr, x], [self.typed(dy.type, (bb, n, k))])
                out = b.aten("torch.aten.sum.dim_IntList", [per, b.int_list([0]), b.bool(False), b.none()],
                             [op.results[0].type])
                self.replace(op, out, b, first)
                return True
        if name == "torch.aten.addmm":
            c, a, w, beta, alpha = op.operands
            x = _merged(a)
            if x is not None and const_int(beta) == 1 and const_int(alpha) == 1 and len(shape(w)) == 2:
                b = self.builder(op)
                sizes = (*shape(x)[:2], shape(w)[1])
                prod = b.aten("torch.aten.matmul", [x, w], [self.typed(op.results[0].type, sizes)])
                out = b.aten("torch.aten.add.Tensor", [prod, c, b.int(1)], [self.typed(op.results[0].type, sizes)])
                self.replace(op, out, b, first)
                return True
        if name == "torch.aten.sum.dim_IntList":
            x = _merged(op.operands[0])
            dims, keep = const_ints(op.operands[1]), op.operands[2]
            if x is not None and dims in ([0], [-2]):
                b = self.builder(op)
                whole = b.aten("torch.aten.sum.dim_IntList", [x, b.int_list([0, 1]), keep, op.operands[3]],
                               [self.typed(op.results[0].type, (1, 1, shape(x)[2]) if is_true(keep)
                                           else (shape(x)[2],))])
                out = b.aten("torch.aten.view", [whole, b.int_list(shape(op.results[0]))], [op.results[0].type])
                self.stamp(first, op)
                op.results[0].replace_all_uses_with(out)
                op.detach()
                op.erase()
                return True
        return False


def is_true(value: SSAValue) -> bool:
    """Whether `value` is the constant True."""
    owner = value.owner
    return isinstance(owner, ConstantBoolOp) and bool(owner.value.value.data)


@dataclass(frozen=True)
class UnflattenMatmulPass(ModulePass):
    """Rewrites the matmuls of captured linears to work on unflattened `[b, s, k]` tensors
    (see the module docstring)."""

    name = "unflatten-matmul"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        _Rewriter(main_function(op)).run()
