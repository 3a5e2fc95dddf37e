"""localise-shapes: gives every tensor of `@main` the per-device shape its layout says.

propagate-sharding leaves `@main` on GLOBAL types, every value's layout written in the IR
(`par.layouts` on ops, `par.layout` on arguments and results) and `par.layout_cast`s where
layouts change. This pass makes the program each device runs:

  * every tensor type becomes its local shape: each dimension divided by the product of
    the mesh axes splitting it (a pending sum keeps the shape);
  * each `par.layout_cast` becomes a `par.reshard` on the local types, which lower-reshard
    turns into collectives;
  * shapes baked into ops become local: the sizes of view/reshape/_unsafe_view/expand,
    unflatten, ones/zeros/full/empty and new_zeros/new_ones/new_empty/new_full, and
    embedding_dense_backward's row count;
  * values that depend on the position in the global tensor are made whole and cut:
    a sharded `arange` is computed whole and sliced (`par.reshard` Replicate -> Shard, no
    communication);
  * reductions whose result is a pending sum keep the GLOBAL divisor, so that each device's
    term is its local sum over the global count: `mean` over a sharded dimension becomes
    `sum` then a division by the global count, and `nll_loss_forward` (mean) over a sharded
    batch sums locally and divides by the global number of targets (its `total_weight`,
    summed over the axes);
  * a vocab-parallel embedding (the table's rows sharded) looks up the rows this device
    holds and gives zeros for the others (the result is a pending sum), and its backward
    (`embedding_dense_backward`) builds this device's rows from the gradients of the
    tokens that fall in them.

    %e = "torch.aten.embedding"(%w, %idx, ...) {par.layouts = [#par.sharding<[[], [], []], partial = ["tp"]>]}
        : (!torch.vtensor<[64,32],f32>, !torch.vtensor<[2,8],si64>, ...) -> !torch.vtensor<[2,8,32],f32>
    becomes, with %w : !torch.vtensor<[32,32],f32> (rows 32r..32r+31 on tp rank r),
    %rows = par.reshard %all_rows @mesh from #par.sharding<[[]]> to #par.sharding<[["tp"]]> : ... [64] -> [32]
    %local = idx - rows[0], clamped to [0, 32); %miss = the tokens outside it
    %e = embedding(%w, %clamped) with %miss rows filled with 0

The runtime reports the sum over all devices of the loss each returns. The loss is whole
on every device of the axes laid out here, so each returns its equal term of it: the loss
divided by their device count, laid out as a pending sum over them (the gradients are not
affected: the loss tangent is an argument of its own).

New ops take the `piperc.origin` of the op they stand for, and their layouts.
An op whose shapes the pass cannot make local is a StrategyError naming the op, its
module and why; so is a dimension that does not split over its axes.

A random op (`piperc.random`) whose result is sharded would draw a different piece on each
device than the piece of what one device draws; dropout is made whole and cut as arange is:
`bernoulli` over the whole shape, its piece kept (other random ops there are refused).

Options: `mesh-axes` (the axes propagate-sharding laid values out over; default all of
`@mesh`'s). Requires: propagate-sharding has run on `@main` (and the mesh pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp, i1
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.rewriter import Rewriter

from piperc.dialects.par import (
    LAYOUT,
    LayoutCastOp,
    MeshAttr,
    ReshardOp,
    ShardingAttr,
    layout_of,
    value_name,
)
from piperc.dialects.roles import ORIGIN, RES_LOSS, main_function, parameter_names
from piperc.dialects.torch import RANDOM_INDEX, ConstantBoolOp, ListConstructOp, ValueTensorType
from piperc.dialects.torch_builder import TorchBuilder
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL, find_mesh
from piperc.passes.propagate_sharding import LAYOUTS, value_layout, where
from piperc.passes.sharding_rules import const_float, const_int, const_ints

_SIZES_OPERAND = {
    **{f"torch.aten.{n}": 1 for n in ("view", "reshape", "_unsafe_view", "expand", "new_zeros", "new_ones",
                                      "new_empty", "new_full")},
    **{f"torch.aten.{n}": 0 for n in ("ones", "zeros", "full", "empty.memory_format")},
}
"""Ops whose result shape is an int-list operand (at this position)."""

_POSITIONAL = ("torch.aten.arange", "torch.aten.arange.start", "torch.aten.arange.start_step")
"""Creation ops whose values depend on the position in the global tensor."""

_NOT_LOCALISABLE = ("torch.aten._reshape_alias", "torch.aten.as_strided", "torch.aten.empty_strided",
                    "torch.aten.new_empty_strided")
"""Ops with strides baked in: a sharded result of one is an error."""


def local_shape(shape: tuple[int, ...], layout: ShardingAttr, mesh: MeshAttr) -> list[int] | None:
    """The per-device shape of a global `shape` under `layout`; None when a dimension does not split."""
    out = []
    for d, size in enumerate(shape):
        parts = math.prod(mesh.axis_size(a) for a in layout.dim_axes(d))
        if size % parts:
            return None
        out.append(size // parts)
    return out


def _is_sharded(layout: ShardingAttr) -> bool:
    return any(layout.dim_axes(d) for d in range(layout.rank()))


@dataclass
class _Localise:
    """One application of the pass to `@main`."""

    fn: func.FuncOp
    mesh: MeshAttr
    axes: tuple[str, ...]
    position: dict[Operation, int] = field(default_factory=dict)
    """Where each op of `@main` was before the pass (casts go with their first user)."""

    def run(self) -> None:
        block = self.fn.body.block
        attrs = self.fn.arg_attrs.data if self.fn.arg_attrs else [None] * len(block.args)
        for arg, arg_attrs in zip(list(block.args), attrs, strict=True):
            if isinstance(arg.type, ValueTensorType):
                names = parameter_names(arg_attrs)
                what = f"argument {arg.index}" + (f" ('{names[0]}')" if names else "")
                self.retype(arg, what)
        handlers: dict[str, Callable[[Operation], None]] = {
            **dict.fromkeys(_SIZES_OPERAND, self.sizes),
            **dict.fromkeys(_POSITIONAL, self.positional),
            **dict.fromkeys(_NOT_LOCALISABLE, self.not_localisable),
            "torch.aten.unflatten.int": self.unflatten,
            "torch.aten.mean": self.mean,
            "torch.aten.mean.dim": self.mean,
            "torch.aten.nll_loss_forward": self.nll_loss,
            "torch.aten.embedding": self.embedding,
            "torch.aten.embedding_dense_backward": self.embedding_backward,
        }
        self.position = {op: i for i, op in enumerate(block.ops)}
        for op in list(self.position):
            if isinstance(op, LayoutCastOp):
                self.reshard(op)
                continue
            if LAYOUTS not in op.attributes:
                continue
            if RANDOM_INDEX in op.attributes:
                self.random(op)
            handler = handlers.get(op.name)
            if handler is not None:
                handler(op)
            if op.parent is None:
                continue
            for r in list(op.results):
                if isinstance(r.type, ValueTensorType):
                    self.retype(r, f"result {r.index} of {where(op)}")
        self.share_loss()
        self.fn.update_function_type()

    def share_loss(self) -> None:
        """The loss result becomes this device's equal term of it over the axes (see the module docstring)."""
        ret = self.fn.body.block.last_op
        assert isinstance(ret, func.ReturnOp) and self.fn.res_attrs is not None
        attrs = list(self.fn.res_attrs.data)
        for i, (value, a) in enumerate(zip(ret.operands, attrs, strict=True)):
            layout = layout_of(a)
            if RES_LOSS not in a.data or layout is None or not isinstance(value.type, ValueTensorType):
                continue
            used = {*layout.partial_axes(), *(x for d in range(layout.rank()) for x in layout.dim_axes(d))}
            whole = [x for x in self.mesh.axis_names() if x in self.axes and x not in used]
            if not whole:
                continue
            share = ShardingAttr([layout.dim_axes(d) for d in range(layout.rank())],
                                 [x for x in self.mesh.axis_names() if x in whole or x in layout.partial_axes()])
            b = TorchBuilder(ret.parent_block(), ret)
            term = b.aten("torch.aten.div.Scalar", [value, b.int(math.prod(self.mesh.axis_size(x) for x in whole))])
            producer = value.owner
            origin = producer.attributes.get(ORIGIN) if isinstance(producer, Operation) else None
            if origin is not None:
                term.owner.attributes[ORIGIN] = origin
            term.owner.attributes[LAYOUTS] = ArrayAttr([share])
            ret.operands[i] = term
            attrs[i] = DictionaryAttr({**a.data, LAYOUT: share})
        self.fn.res_attrs = ArrayAttr(attrs)

    # ------------------------------------------------------------ types

    def local_type(self, value: SSAValue, what: str) -> ValueTensorType:
        """The local type of `value` (still global) under its layout; an error naming `what`
        when a dimension does not split."""
        type_ = value.type
        assert isinstance(type_, ValueTensorType)
        layout = value_layout(value)
        shape = local_shape(type_.get_shape(), layout, self.mesh)
        if shape is None:
            raise StrategyError(f"localise-shapes: {what} {value_name(value)} of type {type_} is laid out as "
                                f"{layout}, but a dimension does not split evenly over its mesh axes; change the "
                                "plan entry that shards it, or the model's sizes")
        return ValueTensorType(shape, type_.dtype)

    def retype(self, value: SSAValue, what: str) -> SSAValue:
        """Gives `value` its local type."""
        local = self.local_type(value, what)
        if local == value.type:
            return value
        return Rewriter.replace_value_with_new_type(value, local)

    def builder(self, op: Operation) -> TorchBuilder:
        """Builds ops before `op`; `stamp` then gives them `op`'s origin."""
        assert op.parent_block() is not None
        return TorchBuilder(op.parent_block(), op)

    def stamp(self, ops: list[Operation], op: Operation, layouts: dict[SSAValue, ShardingAttr]) -> None:
        """Gives the ops made for `op` its origin and their results the layouts given (replicated else)."""
        origin = op.attributes.get(ORIGIN)
        for new in ops:
            if new.name.startswith("torch.constant."):
                continue
            if origin is not None:
                new.attributes[ORIGIN] = origin
            tensors = [r for r in new.results if isinstance(r.type, ValueTensorType)]
            if tensors and not isinstance(new, ReshardOp):
                new.attributes[LAYOUTS] = ArrayAttr(
                    layouts.get(r, ShardingAttr.replicated(len(r.type.get_shape()))) for r in tensors)

    def made_before(self, op: Operation, first: Operation | None) -> list[Operation]:
        """The ops between `first` (the op that was before `op` when building began) and `op`."""
        ops = []
        cursor = op.prev_op
        while cursor is not None and cursor is not first:
            ops.append(cursor)
            cursor = cursor.prev_op
        return ops

    def fail(self, op: Operation, why: str) -> StrategyError:
        return StrategyError(f"localise-shapes: cannot give {where(op)} per-device shapes: {why}")

    # ------------------------------------------------------------ handlers

    def reshard(self, cast: LayoutCastOp) -> None:
        """A layout cast becomes a `par.reshard` on local types, in the pass of its first user
        (of its producer when the step returns it)."""
        target = self.local_type(cast.result, f"the cast of {value_name(cast.input)} to")
        reshard = ReshardOp(cast.input, MESH_SYMBOL, cast.source, cast.target, target)
        users = [u.operation for u in cast.result.uses]
        first = min(users, key=lambda o: self.position.get(o, len(self.position)), default=None)
        anchors = [o for o in (first, cast.input.owner) if isinstance(o, Operation) and not isinstance(o, func.ReturnOp)]
        origin = next((o.attributes[ORIGIN] for o in anchors if ORIGIN in o.attributes), None)
        if origin is not None:
            reshard.attributes[ORIGIN] = origin
        _replace(cast, reshard)

    def sizes(self, op: Operation) -> None:
        """The size-list operand becomes the local result shape."""
        index = _SIZES_OPERAND[op.name]
        local = self.local_type(op.results[0], f"result 0 of {where(op)}").get_shape()
        if const_ints(op.operands[index]) is None:
            raise self.fail(op, "its sizes are not constants")
        if tuple(local) == op.results[0].type.get_shape():
            return
        first = op.prev_op
        old = op.operands[index]
        op.operands[index] = self.builder(op).int_list(local)
        self.stamp(self.made_before(op, first), op, {})
        _erase_if_unused(old)

    def unflatten(self, op: Operation) -> None:
        """unflatten(x, dim, sizes): the sizes become the local sizes of the dimensions made."""
        dim, sizes = const_int(op.operands[1]), const_ints(op.operands[2])
        if dim is None or sizes is None:
            raise self.fail(op, "its dimension or sizes are not constants")
        shape = op.results[0].type.get_shape()
        dim = dim + len(op.operands[0].type.get_shape()) if dim < 0 else dim
        local = self.local_type(op.results[0], f"result 0 of {where(op)}").get_shape()
        if local[dim:dim + len(sizes)] == list(shape[dim:dim + len(sizes)]):
            return
        first = op.prev_op
        old = op.operands[2]
        op.operands[2] = self.builder(op).int_list(local[dim:dim + len(sizes)])
        self.stamp(self.made_before(op, first), op, {})
        _erase_if_unused(old)

    def positional(self, op: Operation) -> None:
        """A sharded arange is made whole, then each device keeps its piece (no communication)."""
        result = op.results[0]
        layout = value_layout(result)
        if not _is_sharded(layout):
            return
        whole = ShardingAttr.replicated(layout.rank())
        op.attributes[LAYOUTS] = ArrayAttr([whole])
        cut = ReshardOp(result, MESH_SYMBOL, whole, layout, self.local_type_as(result, layout, op))
        if ORIGIN in op.attributes:
            cut.attributes[ORIGIN] = op.attributes[ORIGIN]
        op.parent_block().insert_op_after(cut, op)
        result.replace_all_uses_with(cut.result)
        cut.operands[0] = result

    def local_type_as(self, value: SSAValue, layout: ShardingAttr, op: Operation) -> ValueTensorType:
        """The local type of `value` under `layout`."""
        shape = local_shape(value.type.get_shape(), layout, self.mesh)
        if shape is None:
            raise self.fail(op, f"its result {value.type} does not split evenly as {layout}")
        return ValueTensorType(shape, value.type.dtype)

    def random(self, op: Operation) -> None:
        """A random op on a sharded tensor draws the whole tensor, as one device does, and each
        device keeps its piece (no communication). Dropout is rewritten so: `bernoulli` on the
        whole shape (the draw, which keeps the op's `piperc.random`), cut to the piece, then the
        piece of the input times it times 1/(1-p); the mask is its piece, as bools. Other random
        ops on a sharded tensor are refused."""
        result = op.results[0]
        if not isinstance(result.type, ValueTensorType) or not _is_sharded(value_layout(result)):
            return
        if op.name != "torch.aten.native_dropout":
            raise self.fail(op, f"it draws random numbers for a tensor laid out as {value_layout(result)}, and only "
                                "dropout is drawn whole and cut; keep the tensor it reads whole")
        x, p, train = op.operands
        keep = None if const_float(p) is None else 1.0 - const_float(p)
        if not isinstance(train.owner, ConstantBoolOp) or keep is None:
            raise self.fail(op, "its probability and training flag are not constants")
        if not train.owner.value.value.data:
            return  # evaluation: nothing is drawn, the mask is all true
        layout = value_layout(result)
        whole = ShardingAttr.replicated(layout.rank())
        first = op.prev_op
        b = self.builder(op)
        empty = b.aten("torch.aten.empty.memory_format",
                       [b.int_list(result.type.get_shape()), b.none(), b.none(), b.device(), b.none(), b.none()],
                       [result.type])
        drawn = b.aten("torch.aten.bernoulli.p", [empty, b.float(keep), b.none()], [result.type])
        drawn.owner.attributes[RANDOM_INDEX] = op.attributes[RANDOM_INDEX]
        local = self.local_type_as(result, layout, op)
        cut = ReshardOp(drawn, MESH_SYMBOL, whole, layout, local)
        op.parent_block().insert_op_before(cut, op)
        kept = b.aten("torch.aten.mul.Tensor", [x, cut.result], [local])
        out = b.aten("torch.aten.mul.Scalar", [kept, b.float(0.0 if keep == 0 else 1.0 / keep)], [local])
        mask = b.aten("torch.aten.ne.Scalar", [cut.result, b.int(0)], [ValueTensorType(local.get_shape(), i1)])
        self.stamp(self.made_before(op, first), op,
                   {empty: whole, drawn: whole, kept: layout, out: layout, mask: layout})
        _replace_results(op, [out, mask])

    def not_localisable(self, op: Operation) -> None:
        """Strided views of a sharded tensor cannot be made local from the sizes alone."""
        if any(_is_sharded(value_layout(r)) for r in op.results if isinstance(r.type, ValueTensorType)):
            raise self.fail(op, "it bakes in strides of the global tensor, and its result is sharded; replicate "
                                "the tensors it reads")

    def mean(self, op: Operation) -> None:
        """mean over a sharded dimension: a local sum over the GLOBAL count (each device's term
        of the pending sum)."""
        x = op.operands[0]
        layout = value_layout(x)
        rank = layout.rank()
        dims = const_ints(op.operands[1]) if op.name.endswith(".dim") else []
        if dims is None:
            raise self.fail(op, "its dimensions are not constants")
        reduced = list(range(rank)) if not dims else [d + rank if d < 0 else d for d in dims]
        split = [d for d in reduced if layout.dim_axes(d)]
        if not split:
            return
        local = x.type.get_shape()
        count = math.prod(local[d] * math.prod(self.mesh.axis_size(a) for a in layout.dim_axes(d))
                          for d in reduced)
        first = op.prev_op
        b = self.builder(op)
        name = "torch.aten.sum.dim_IntList" if op.name.endswith(".dim") else "torch.aten.sum"
        total = b.aten(name, list(op.operands), [self.local_type(op.results[0], f"result 0 of {where(op)}")])
        mean = b.aten("torch.aten.div.Scalar", [total, b.int(count)])
        layouts = {total: value_layout(op.results[0]), mean: value_layout(op.results[0])}
        self.stamp(self.made_before(op, first), op, layouts)
        _replace_results(op, [mean])

    def nll_loss(self, op: Operation) -> None:
        """nll_loss_forward with reduction mean over a sharded batch: a local sum divided by the
        global number of targets (the total weight summed over the axes)."""
        logp, target = op.operands[0], op.operands[1]
        reduction = const_int(op.operands[3])
        layout = value_layout(target) if target.type.get_shape() else ShardingAttr.replicated(0)
        axes = [a for d in range(layout.rank()) for a in layout.dim_axes(d)]
        if not axes and len(logp.type.get_shape()) > 1:
            log_layout = value_layout(logp)
            axes = [a for d in range(log_layout.rank() - 1) for a in log_layout.dim_axes(d)]
        if not axes or reduction != 1:
            return
        first = op.prev_op
        b = self.builder(op)
        loss_type, weight_type = op.results[0].type, op.results[1].type
        summed = b.aten("torch.aten.nll_loss_forward",
                        [logp, target, op.operands[2], b.int(2), op.operands[4]], [loss_type, weight_type])
        local_weight = summed.owner.results[1]
        pending = ShardingAttr([], partial=axes)
        weight = ReshardOp(local_weight, MESH_SYMBOL, pending, ShardingAttr.replicated(0), weight_type)
        op.parent_block().insert_op_before(weight, op)
        loss = b.aten("torch.aten.div.Tensor", [summed, weight.result])
        self.stamp(self.made_before(op, first), op,
                   {summed: pending, local_weight: pending, loss: value_layout(op.results[0])})
        _replace_results(op, [loss, local_weight])

    def rows_held(self, op: Operation, b: TorchBuilder, indices: SSAValue, rows: int,
                  layout: ShardingAttr) -> SSAValue:
        """The index of the first table row this device holds (a 0-dim tensor): all row indices,
        cut as the table's rows are."""
        index = indices.type.dtype
        ids = b.aten("torch.aten.arange", [b.int(rows), b.none(), b.none(), b.device(), b.none()],
                     [ValueTensorType([rows], index)])
        held = ShardingAttr([layout.dim_axes(0)])
        cut = ReshardOp(ids, MESH_SYMBOL, ShardingAttr.replicated(1), held,
                        self.local_type_as(ids, held, op))
        op.parent_block().insert_op_before(cut, op)
        return b.aten("torch.aten.select.int", [cut.result, b.int(0), b.int(0)], [ValueTensorType([], index)])

    def local_indices(self, op: Operation, b: TorchBuilder, indices: SSAValue, rows: int,
                      layout: ShardingAttr) -> tuple[SSAValue, SSAValue]:
        """(this device's row of each index, clamped into its rows; the indices outside its rows)."""
        local_rows = rows // math.prod(self.mesh.axis_size(a) for a in layout.dim_axes(0))
        first_row = self.rows_held(op, b, indices, rows, layout)
        shifted = b.aten("torch.aten.sub.Tensor", [indices, first_row, b.int(1)])
        clamped = b.aten("torch.aten.clamp", [shifted, b.int(0), b.int(local_rows - 1)])
        outside = b.aten("torch.aten.ne.Tensor", [clamped, shifted],
                         [ValueTensorType(indices.type.get_shape(), i1)])
        missing = b.aten("torch.aten.unsqueeze", [outside, b.int(-1)],
                         [ValueTensorType([*indices.type.get_shape(), 1], i1)])
        return clamped, missing

    def embedding(self, op: Operation) -> None:
        """A vocab-parallel lookup: this device's rows, zeros for indices it does not hold."""
        weight, indices = op.operands[0], op.operands[1]
        layout = value_layout(weight)
        if not layout.dim_axes(0):
            return
        rows = self.global_rows(weight, layout)
        first = op.prev_op
        b = self.builder(op)
        clamped, missing = self.local_indices(op, b, indices, rows, layout)
        self.stamp(self.made_before(op, first), op, {})
        op.operands[1] = clamped
        result = op.results[0]
        after = op.next_op
        assert after is not None
        b = TorchBuilder(op.parent_block(), after)
        masked = b.aten("torch.aten.masked_fill.Scalar", [result, missing, b.float(0.0)])
        self.stamp([masked.owner], op, {masked: value_layout(result)})
        result.replace_all_uses_with(masked)
        masked.owner.operands[0] = result
        # made after the op, so not among the ops the pass walks
        self.retype(masked, f"result 0 of {where(op)}")

    def embedding_backward(self, op: Operation) -> None:
        """The gradient of a vocab-parallel table: this device builds its rows from the gradients
        of the indices it holds."""
        grad, indices = op.operands[0], op.operands[1]
        layout = value_layout(op.results[0])
        padding, scale = const_int(op.operands[3]), op.operands[4].owner
        if not layout.dim_axes(0):
            return
        if padding != -1 or not isinstance(scale, ConstantBoolOp) or scale.value.value.data:
            raise self.fail(op, "a vocab-parallel embedding with padding_idx or scale_grad_by_freq is not "
                                "supported; replicate the table (plan entry Replicate()) or shard its columns")
        rows = op.results[0].type.get_shape()[0]
        local_rows = self.local_type(op.results[0], f"result 0 of {where(op)}").get_shape()[0]
        first = op.prev_op
        b = self.builder(op)
        clamped, missing = self.local_indices(op, b, indices, rows, layout)
        kept = b.aten("torch.aten.masked_fill.Scalar", [grad, missing, b.float(0.0)])
        op.operands[0] = kept
        op.operands[1] = clamped
        op.operands[2] = b.int(local_rows)
        self.stamp(self.made_before(op, first), op, {kept: value_layout(grad)})

    def global_rows(self, weight: SSAValue, layout: ShardingAttr) -> int:
        """The global row count of a table whose local type `weight` has."""
        return weight.type.get_shape()[0] * math.prod(self.mesh.axis_size(a) for a in layout.dim_axes(0))


def _replace(old: Operation, new: Operation) -> None:
    """Puts `new` where `old` is and lets it stand for it."""
    old.parent_block().insert_op_before(new, old)
    for a, b in zip(old.results, new.results, strict=True):
        a.replace_all_uses_with(b)
    old.detach()
    old.erase()


def _erase_if_unused(value: SSAValue) -> None:
    """Erases the list of sizes an op no longer reads."""
    owner = value.owner
    if isinstance(owner, ListConstructOp) and not value.uses:
        owner.detach()
        owner.erase()


def _replace_results(op: Operation, values: list[SSAValue]) -> None:
    """Lets `values` stand for the results of `op`, then erases it."""
    for r, v in zip(op.results, values, strict=True):
        r.replace_all_uses_with(v)
    op.detach()
    op.erase()


@dataclass(frozen=True)
class LocaliseShapesPass(ModulePass):
    """Makes every tensor of `@main` the per-device piece its layout says (see the module docstring).

    Options: mesh_axes (the axes propagation used; default all). Requires: propagate-sharding
    has run (`par.layouts` on every op, no other pass in between), the mesh.
    """

    name = "localise-shapes"

    mesh_axes: tuple[str, ...] = ()

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = find_mesh(op)
        _Localise(main_function(op), mesh, self.mesh_axes or mesh.axis_names()).run()
