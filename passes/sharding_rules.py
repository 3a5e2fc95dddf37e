"""Per-op sharding rules, in the style of Shardy's OpShardingRule.

A rule describes one op by FACTORS: the independent index spaces of its computation.
Every tensor operand and result dimension carries an ordered list of factors (major
first): one for most dimensions, several where a reshape merges or splits dimensions,
none for a dimension of size 1 (or one that broadcasts). `torch.aten.mm` on
[16,32] x [32,128] -> [16,128] is `([m, k], [k, n]) -> ([m, n])` with factors m=16,
k=32 (reduction) and n=128.

A factor is one of:
  * pass-through: sharding it shards every tensor that carries it the same way;
  * reduction: a result that does not carry it sums over it, so sharding it makes
    that result a pending sum (Partial) over the factor's mesh axes;
  * need-replication: the op mixes the whole factor (softmax's dimension, a split
    dimension), so it is never sharded; operands sharded along it are gathered first.

`linear_in` says which tensor operands may carry a pending sum through the op: each
entry is a set of operand positions that together may hold the same pending sum (add:
both operands; mm: either one, not both). An op whose pending sums are not listed must
have them reduced first.

Tensor operands are the op's `!torch.vtensor` operands in order, with a
`!torch.list<vtensor>` operand built by `torch.prim.ListConstruct` standing for its
elements (`aten.cat`); tensor results likewise, with a list result standing for the
results of the `torch.prim.ListUnpack` that reads it (`aten.split`). See
`tensor_operands` / `tensor_results`.

`sharding_rule(op)` returns the rule of an op, or None when the registry has none
(`RULES` maps torch op names to rule builders). A rule is built from the op's types
and constant arguments, so a split whose pieces are not known at compile time has none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from xdsl.dialects.builtin import FloatAttr, IntegerAttr
from xdsl.ir import Operation, SSAValue
from xdsl.utils.str_enum import StrEnum

from piperc.dialects.torch import (
    ConstantFloatOp,
    ConstantIntOp,
    ListConstructOp,
    ListType,
    ListUnpackOp,
    ValueTensorType,
)


class FactorKind(StrEnum):
    """How an op treats a factor that is sharded."""

    PASS = "pass-through"
    REDUCTION = "reduction"
    REPLICATED = "need-replication"


@dataclass(frozen=True)
class Factor:
    """One index space of an op's computation."""

    size: int
    kind: FactorKind


Mapping = tuple[tuple[int, ...], ...]
"""For each dimension of a tensor, the factors it carries, major first."""


@dataclass(frozen=True)
class OpShardingRule:
    """The factors of one op and the factors each tensor operand and result dimension carries."""

    family: str
    """The rule family, as reports name it: `matmul`, `reshape`, `elementwise`, ..."""
    factors: tuple[Factor, ...]
    operands: tuple[Mapping, ...]
    results: tuple[Mapping, ...]
    linear_in: tuple[frozenset[int], ...] = ()
    added: tuple[int, ...] = ()
    """Operands added to a contraction's result (addmm's bias): when a reduction factor is
    sharded, so that each device holds a term of the result, they must be such terms too."""


# ---------------------------------------------------------------- reading ops


def tensor_operand_uses(op: Operation) -> list[tuple[Operation, int]]:
    """Where each tensor operand of `op` is read: (op, operand index), or (the ListConstruct,
    element index) for the elements of a list operand."""
    found: list[tuple[Operation, int]] = []
    for i, v in enumerate(op.operands):
        if isinstance(v.type, ValueTensorType):
            found.append((op, i))
        elif isinstance(v.type, ListType) and isinstance(v.owner, ListConstructOp):
            found.extend((v.owner, j) for j, e in enumerate(v.owner.operands) if isinstance(e.type, ValueTensorType))
    return found


def tensor_operands(op: Operation) -> list[SSAValue]:
    """The tensor operands a rule describes: vtensor operands, and the elements of list operands."""
    return [user.operands[i] for user, i in tensor_operand_uses(op)]


def tensor_results(op: Operation) -> list[SSAValue]:
    """The tensor results a rule describes: vtensor results, and what `ListUnpack` makes of list results."""
    found = []
    for r in op.results:
        if isinstance(r.type, ValueTensorType):
            found.append(r)
        elif isinstance(r.type, ListType):
            unpack = next((u.operation for u in r.uses if isinstance(u.operation, ListUnpackOp)), None)
            if unpack is not None:
                found.extend(unpack.results)
    return found


def shape(value: SSAValue) -> tuple[int, ...]:
    """The global shape of a tensor value."""
    assert isinstance(value.type, ValueTensorType)
    return value.type.get_shape()


def const_int(value: SSAValue) -> int | None:
    """The value of a `torch.constant.int` operand, else None."""
    owner = value.owner
    if isinstance(owner, ConstantIntOp) and isinstance(owner.value, IntegerAttr):
        return owner.value.value.data
    return None


def const_float(value: SSAValue) -> float | None:
    """The value of a `torch.constant.float` or `.int` operand, else None."""
    owner = value.owner
    if isinstance(owner, ConstantFloatOp) and isinstance(owner.value, FloatAttr):
        return owner.value.value.data
    found = const_int(value)
    return None if found is None else float(found)


def const_ints(value: SSAValue) -> list[int] | None:
    """The values of a `torch.prim.ListConstruct` of int constants (or of one int), else None."""
    single = const_int(value)
    if single is not None:
        return [single]
    owner = value.owner
    if not isinstance(owner, ListConstructOp):
        return None
    items = [const_int(e) for e in owner.operands]
    return None if any(i is None for i in items) else items  # type: ignore[return-value]


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ---------------------------------------------------------------- building rules


class _Rule:
    """Collects factors and tensor mappings while a rule is being built."""

    def __init__(self, family: str):
        self.family = family
        self.factors: list[Factor] = []
        self.operands: list[Mapping] = []
        self.results: list[Mapping] = []
        self.linear: list[frozenset[int]] = []
        self.added: tuple[int, ...] = ()

    def factor(self, size: int, kind: FactorKind = FactorKind.PASS) -> int | None:
        """A new factor; None for size 1 (or unknown size), which needs no factor."""
        if size == 1:
            return None
        if size < 0:
            kind = FactorKind.REPLICATED
        self.factors.append(Factor(size, kind))
        return len(self.factors) - 1

    def dims(self, sizes: Sequence[int], kind: FactorKind = FactorKind.PASS) -> list[int | None]:
        """One new factor per dimension."""
        return [self.factor(s, kind) for s in sizes]

    def operand(self, factors: Sequence[int | None | Sequence[int]]) -> None:
        self.operands.append(_mapping(factors))

    def result(self, factors: Sequence[int | None | Sequence[int]]) -> None:
        self.results.append(_mapping(factors))

    def linear_in(self, *groups: Sequence[int]) -> None:
        self.linear.extend(frozenset(g) for g in groups)

    def build(self) -> OpShardingRule:
        return OpShardingRule(self.family, tuple(self.factors), tuple(self.operands), tuple(self.results),
                              tuple(self.linear), self.added)


def _mapping(factors: Sequence[int | None | Sequence[int]]) -> Mapping:
    out = []
    for f in factors:
        if f is None:
            out.append(())
        elif isinstance(f, int):
            out.append((f,))
        else:
            out.append(tuple(f))
    return tuple(out)


def _replicated(family: str, op: Operation) -> OpShardingRule:
    """Every dimension of every tensor is its own need-replication factor."""
    r = _Rule(family)
    for v in tensor_operands(op):
        r.operand(r.dims(shape(v), FactorKind.REPLICATED))
    for v in tensor_results(op):
        r.result(r.dims(shape(v), FactorKind.REPLICATED))
    return r.build()


def _broadcast(r: _Rule, out: Sequence[int | None], out_shape: Sequence[int], operand_shape: Sequence[int]):
    """The factors of an operand that broadcasts (numpy rules) to a result carrying `out`."""
    lead = len(out_shape) - len(operand_shape)
    return [out[lead + i] if size == out_shape[lead + i] else None for i, size in enumerate(operand_shape)]


# ---------------------------------------------------------------- families


def elementwise(op: Operation, linear: Sequence[Sequence[int]] = ()) -> OpShardingRule:
    """Every result dimension is a pass-through factor; operands broadcast to the result
    (scalars and 0-dim tensors carry none). `linear` lists the operand groups that may carry
    a pending sum through the op."""
    r = _Rule("elementwise")
    results = tensor_results(op)
    out_shape = shape(results[0])
    out = r.dims(out_shape)
    for v in tensor_operands(op):
        r.operand(_broadcast(r, out, out_shape, shape(v)))
    for v in results:
        r.result(_broadcast(r, out, out_shape, shape(v)))
    r.linear_in(*linear)
    return r.build()


def _unary_linear(op: Operation) -> OpShardingRule:
    return elementwise(op, [[0]])


def _sum_linear(op: Operation) -> OpShardingRule:
    """add/sub of tensors: a pending sum passes when every tensor operand holds it."""
    n = len(tensor_operands(op))
    return elementwise(op, [range(n)] if n > 1 else [[0]])


def _product_linear(op: Operation) -> OpShardingRule:
    """mul of tensors: a pending sum passes when exactly one operand holds it."""
    n = len(tensor_operands(op))
    return elementwise(op, [[i] for i in range(n)])


def _first_linear(op: Operation) -> OpShardingRule:
    """Linear in the first operand only (backward ops: gelu_backward(grad, x), div(x, y))."""
    return elementwise(op, [[0]])


def _masked_fill(op: Operation) -> OpShardingRule:
    """masked_fill(x, mask, value): elementwise; linear in x when the fill value is 0."""
    value = const_float(op.operands[2]) if len(op.operands) > 2 else None
    return elementwise(op, [[0]] if value == 0.0 else [])


def _triangular(op: Operation) -> OpShardingRule:
    """triu/tril: the last two dimensions need replication (the diagonal is global)."""
    r = _Rule("triangular")
    s = shape(op.operands[0])
    dims = r.dims(s[:-2]) + r.dims(s[-2:], FactorKind.REPLICATED)
    r.operand(dims)
    r.result(dims)
    return r.build()


def creation(op: Operation) -> OpShardingRule:
    """ops with no tensor operand (arange, ones, zeros, full): each device can make any piece."""
    r = _Rule("creation")
    for v in tensor_results(op):
        r.result(r.dims(shape(v)))
    return r.build()


def matmul(op: Operation) -> OpShardingRule:
    """mm/bmm/matmul/addmm/linear: batch dims broadcast, m and n pass through, k is a reduction."""
    name = op.name.removeprefix("torch.aten.").split(".")[0]
    r = _Rule("matmul")
    out_shape = shape(tensor_results(op)[0])
    if name == "linear":
        x, w = op.operands[0], op.operands[1]
        xs = shape(x)
        lead = r.dims(xs[:-1])
        k = r.factor(xs[-1], FactorKind.REDUCTION)
        n = r.factor(shape(w)[0])
        r.operand([*lead, k])
        r.operand([n, k])
        out = [*lead, n]
        tensors = tensor_operands(op)
        if len(tensors) == 3:
            r.operand(_broadcast(r, out, out_shape, shape(tensors[2])))
            r.linear_in([0, 2], [1, 2])
            r.added = (2,)
        else:
            r.linear_in([0], [1])
        r.result(out)
        return r.build()
    a, b = (op.operands[1], op.operands[2]) if name == "addmm" else (op.operands[0], op.operands[1])
    sa, sb = shape(a), shape(b)
    if len(sa) == 1 or len(sb) == 1:
        return _replicated("matmul", op)
    batch = r.dims(out_shape[:-2])
    m = r.factor(sa[-2])
    k = r.factor(sa[-1], FactorKind.REDUCTION)
    n = r.factor(sb[-1])
    out = [*batch, m, n]
    if name == "addmm":
        r.operand(_broadcast(r, out, out_shape, shape(op.operands[0])))
    r.operand([*_broadcast(r, batch, out_shape[:-2], sa[:-2]), m, k])
    r.operand([*_broadcast(r, batch, out_shape[:-2], sb[:-2]), k, n])
    r.result(out)
    if name == "addmm":
        r.linear_in([0, 1], [0, 2])
        r.added = (0,)
    else:
        r.linear_in([0], [1])
    return r.build()


def reshape_factors(source: Sequence[int], target: Sequence[int]) -> tuple[list[int], Mapping, Mapping] | None:
    """The common refinement of two shapes of the same tensor: factor sizes and, per
    dimension of each shape, its factors (major first). [2,8,96] -> [16,3,32] gives factors
    [2, 8, 3, 32]: source ((0,), (1,), (2, 3)), target ((0, 1), (2,), (3,)). None when
    the shapes share no factorisation (a group such as [2,3] -> [3,2], or a dynamic size)."""
    if any(s < 0 for s in (*source, *target)) or math.prod(source) != math.prod(target):
        return None
    sizes: list[int] = []
    src: list[list[int]] = [[] for _ in source]
    dst: list[list[int]] = [[] for _ in target]
    i = j = 0
    ri = source[0] if source else 1
    rj = target[0] if target else 1
    while True:
        while ri == 1 and i < len(source):
            i += 1
            ri = source[i] if i < len(source) else 1
        while rj == 1 and j < len(target):
            j += 1
            rj = target[j] if j < len(target) else 1
        if i >= len(source) or j >= len(target):
            break
        f = min(ri, rj) if ri % rj == 0 or rj % ri == 0 else math.gcd(ri, rj)
        if f == 1:
            return None
        sizes.append(f)
        src[i].append(len(sizes) - 1)
        dst[j].append(len(sizes) - 1)
        ri //= f
        rj //= f
    return sizes, tuple(map(tuple, src)), tuple(map(tuple, dst))


def reshape(op: Operation) -> OpShardingRule:
    """view/reshape/_unsafe_view/flatten/unflatten: factors of the common refinement of the
    two shapes. A dimension of size 3*D split into [3, D] carries factors (3, D): a shard of
    it stays a shard of the outer dimension only when the shard count divides 3."""
    source, target = shape(tensor_operands(op)[0]), shape(tensor_results(op)[0])
    found = reshape_factors(source, target)
    if found is None:
        return _replicated("reshape", op)
    sizes, src, dst = found
    return OpShardingRule("reshape", tuple(Factor(s, FactorKind.PASS) for s in sizes), (src,), (dst,),
                          (frozenset([0]),))


def _permutation(op: Operation) -> list[int] | None:
    name = op.name.removeprefix("torch.aten.")
    rank = len(shape(op.operands[0]))
    if name in ("t", "numpy_T"):
        return list(range(rank))[::-1]
    if name.startswith("transpose"):
        d0, d1 = const_int(op.operands[1]), const_int(op.operands[2])
        if d0 is None or d1 is None:
            return None
        perm = list(range(rank))
        d0, d1 = _dim(d0, rank), _dim(d1, rank)
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    dims = const_ints(op.operands[1])
    return None if dims is None else [_dim(d, rank) for d in dims]


def permute(op: Operation) -> OpShardingRule:
    """t/transpose/permute: result dimension i carries the factor of operand dimension perm[i]."""
    perm = _permutation(op)
    if perm is None:
        return _replicated("permute", op)
    r = _Rule("permute")
    dims = r.dims(shape(op.operands[0]))
    r.operand(dims)
    r.result([dims[p] for p in perm])
    r.linear_in([0])
    return r.build()


def _along(op: Operation, family: str, dim_operand: int, removes: bool = False, linear: bool = True) -> OpShardingRule:
    """Ops that cut or join tensors along one dimension (split, unbind, cat, stack, select,
    topk): that dimension needs replication, the others pass through."""
    tensors, results = tensor_operands(op), tensor_results(op)
    d = const_int(op.operands[dim_operand])
    if d is None or not tensors or not results:
        return _replicated(family, op)
    ref = shape(tensors[0]) if family != "stack" else shape(results[0])
    d = _dim(d, len(ref))
    r = _Rule(family)
    common = r.dims(ref)
    common[d] = None
    cut = r.factor(ref[d], FactorKind.REPLICATED)

    def along(s: Sequence[int], has_dim: bool) -> list:
        if not has_dim:
            return common[:d] + common[d + 1:]
        dims = list(common)
        dims[d] = r.factor(s[d], FactorKind.REPLICATED) if s[d] != ref[d] else cut
        return dims

    for v in tensors:
        r.operand(along(shape(v), family != "stack"))
    for v in results:
        r.result(along(shape(v), not removes))
    if linear:
        r.linear_in(range(len(tensors)) if family in ("cat", "stack") else [0])
    return r.build()


def split(op: Operation) -> OpShardingRule:
    """split/split_with_sizes/chunk: the split dimension needs replication (a piece of a
    sharded dimension is never a shard of the piece)."""
    return _along(op, "split", 2)


def unbind(op: Operation) -> OpShardingRule:
    """unbind: the unbound dimension needs replication and disappears from the results."""
    return _along(op, "unbind", 1, removes=True)


def cat(op: Operation) -> OpShardingRule:
    """cat: the joined dimension needs replication."""
    return _along(op, "cat", 1)


def stack(op: Operation) -> OpShardingRule:
    """stack: the new dimension needs replication; the others pass through."""
    return _along(op, "stack", 1)


def select(op: Operation) -> OpShardingRule:
    """select.int: the selected dimension needs replication and disappears from the result."""
    return _along(op, "select", 1, removes=True)


def topk(op: Operation) -> OpShardingRule:
    """topk(x, k, dim) -> (values, indices): the dimension searched needs replication."""
    return _along(op, "topk", 2, linear=False)


def cumsum(op: Operation) -> OpShardingRule:
    """cumsum(x, dim, dtype): the summed dimension needs replication, the others pass through;
    linear in x (a pending sum stays pending)."""
    return _along(op, "cumsum", 1)


def new_tensor(op: Operation) -> OpShardingRule:
    """new_zeros/new_ones/new_empty/new_full(self, size, ...): self only gives the dtype, so its
    layout is free; each device can make any piece of the result."""
    r = _Rule("creation")
    r.operand(r.dims(shape(op.operands[0])))
    r.result(r.dims(shape(op.results[0])))
    return r.build()


def slice_(op: Operation) -> OpShardingRule:
    """slice.Tensor(x, dim, start, end, step): the sliced dimension passes through only when the
    slice keeps all of it (so it provably aligns with every shard boundary); else it needs
    replication."""
    x = op.operands[0]
    s = shape(x)
    d, start, step = (const_int(op.operands[i]) for i in (1, 2, 4))
    if d is None:
        return _replicated("slice", op)
    d = _dim(d, len(s))
    whole = start in (0, None) and step in (1, None) and shape(op.results[0])[d] == s[d]
    r = _Rule("slice")
    dims = r.dims(s)
    if not whole:
        dims[d] = r.factor(s[d], FactorKind.REPLICATED)
    r.operand(dims)
    out = list(dims)
    if not whole:
        out[d] = r.factor(shape(op.results[0])[d], FactorKind.REPLICATED)
    r.result(out)
    r.linear_in([0])
    return r.build()


def expand(op: Operation) -> OpShardingRule:
    """expand: broadcast dimensions are result-only factors (each device expands its piece)."""
    r = _Rule("expand")
    out_shape = shape(op.results[0])
    out = r.dims(out_shape)
    r.operand(_broadcast(r, out, out_shape, shape(op.operands[0])))
    r.result(out)
    r.linear_in([0])
    return r.build()


def _reduction(op: Operation, family: str, kind: FactorKind, dims_operand: int | None) -> OpShardingRule:
    x = op.operands[0]
    s = shape(x)
    out_shape = shape(op.results[0])
    dims = const_ints(op.operands[dims_operand]) if dims_operand is not None else None
    reduced = set(range(len(s))) if dims is None or dims == [] else {_dim(d, len(s)) for d in dims}
    r = _Rule(family)
    factors = [r.factor(size, kind if d in reduced else FactorKind.PASS) for d, size in enumerate(s)]
    r.operand(factors)
    keep = len(out_shape) == len(s)
    r.result([None if d in reduced else f for d, f in enumerate(factors)] if keep
             else [f for d, f in enumerate(factors) if d not in reduced])
    r.linear_in([0])
    return r.build()


def sum_(op: Operation) -> OpShardingRule:
    """sum/sum.dim_IntList/mean/mean.dim: a sharded reduced dimension makes the result
    Partial. For mean, each device's term is its local sum over the GLOBAL count (shape
    localisation must keep the global divisor)."""
    return _reduction(op, "reduction", FactorKind.REDUCTION, 1 if len(op.operands) > 2 else None)


def var(op: Operation) -> OpShardingRule:
    """var: the reduced dimensions need replication (not a sum)."""
    return _reduction(op, "variance", FactorKind.REPLICATED, 1 if len(op.operands) > 1 else None)


def softmax(op: Operation) -> OpShardingRule:
    """softmax/_softmax/log_softmax/_log_softmax and their backward (grad, output, dim, dtype):
    the softmax dimension needs replication; backward ops are linear in the gradient."""
    backward = op.name.endswith("_backward_data")
    tensors = tensor_operands(op)
    s = shape(tensors[0])
    d = const_int(op.operands[2 if backward else 1])
    if d is None:
        return _replicated("softmax", op)
    d = _dim(d, len(s))
    r = _Rule("softmax")
    dims = [r.factor(size, FactorKind.REPLICATED if i == d else FactorKind.PASS) for i, size in enumerate(s)]
    for _ in tensors:
        r.operand(dims)
    r.result(dims)
    if backward:
        r.linear_in([0])
    return r.build()


def layer_norm(op: Operation) -> OpShardingRule:
    """native_layer_norm(x, shape, w, b, eps) -> (y, mean, rstd): normalised dims need
    replication, leading dims pass through. native_layer_norm_backward(dy, x, shape, mean,
    rstd, w, b, mask) -> (dx, dw, db): leading dims are reductions for dw and db."""
    backward = op.name.endswith("_backward")
    x = op.operands[1] if backward else op.operands[0]
    s = shape(x)
    normalized = len(const_ints(op.operands[2] if backward else op.operands[1]) or [])
    if normalized == 0:
        return _replicated("layer_norm", op)
    r = _Rule("layer_norm")
    lead = r.dims(s[:-normalized], FactorKind.REDUCTION if backward else FactorKind.PASS)
    norm = r.dims(s[-normalized:], FactorKind.REPLICATED)
    stats = [*lead, *([None] * normalized)]
    tensors = tensor_operands(op)
    full = [*lead, *norm]
    if backward:
        # dy, x, mean, rstd, then w and b when given
        for i, v in enumerate(tensors):
            r.operand(full if i < 2 else stats if i < 4 else norm[-len(shape(v)):] if shape(v) else [])
        for i, v in enumerate(tensor_results(op)):
            r.result(full if i == 0 else norm[-len(shape(v)):])
        r.linear_in([0])
        return r.build()
    for i, v in enumerate(tensors):
        r.operand(full if i == 0 else norm[-len(shape(v)):])
    for i, v in enumerate(tensor_results(op)):
        r.result(full if i == 0 else stats[: len(shape(v))])
    return r.build()


def embedding(op: Operation) -> OpShardingRule:
    """embedding(weight [V, D], indices [...]) -> [..., D]: V is a reduction (a vocab-parallel
    table gives each device the rows it holds and zeros elsewhere: a pending sum; shape
    localisation must mask the lookup); index dims and D pass through."""
    w, idx = op.operands[0], op.operands[1]
    r = _Rule("embedding")
    vocab = r.factor(shape(w)[0], FactorKind.REDUCTION)
    d = r.factor(shape(w)[1])
    lead = r.dims(shape(idx))
    r.operand([vocab, d])
    r.operand(lead)
    r.result([*lead, d])
    r.linear_in([0])
    return r.build()


def embedding_backward(op: Operation) -> OpShardingRule:
    """embedding_dense_backward(grad [..., D], indices [...], V, ...) -> [V, D]: index dims
    are reductions (rows are summed), D passes through, V is result-only (each device can
    build the rows it holds)."""
    grad, idx = op.operands[0], op.operands[1]
    r = _Rule("embedding")
    lead = r.dims(shape(idx), FactorKind.REDUCTION)
    d = r.factor(shape(grad)[-1])
    vocab = r.factor(shape(op.results[0])[0])
    r.operand([*lead, d])
    r.operand(lead)
    r.result([vocab, d])
    r.linear_in([0])
    return r.build()


def nll_loss(op: Operation) -> OpShardingRule:
    """nll_loss_forward(logp [N, C], target [N], weight [C]?, reduction, ignore) -> (loss, total):
    the class dim needs replication; N is a reduction (each device's term is its share of the
    mean, as for mean). nll_loss_backward(dloss, logp, target, weight?, reduction, ignore,
    total) -> [N, C]: N passes through."""
    backward = op.name.endswith("_backward")
    first = 1 if backward else 0
    s = shape(op.operands[first])
    r = _Rule("loss")
    batch = [r.factor(size, FactorKind.PASS if backward else FactorKind.REDUCTION) for size in s[:-1]]
    classes = r.factor(s[-1], FactorKind.REPLICATED)
    for user, i in tensor_operand_uses(op):
        vs = shape(user.operands[i])
        r.operand([] if not vs else [*batch, classes] if i == first else [classes] if i == first + 2 else batch)
    for v in tensor_results(op):
        vs = shape(v)
        r.result([] if not vs else [*batch, classes] if len(vs) == len(s) else batch)
    if backward:
        r.linear_in([0])
    return r.build()


def attention(op: Operation) -> OpShardingRule:
    """scaled-dot-product attention and its backward, as captured on CPU: batch and head dims
    pass through; sequence and head-size dims need replication. Ring attention (`RING` on the
    op) passes the sequence through instead (`_ring_attention`)."""
    if RING in op.attributes:
        return _ring_attention(op)
    r = _Rule("attention")
    q = shape(op.operands[1] if op.name.endswith("_backward") else op.operands[0])
    if len(q) < 3:
        return _replicated("attention", op)
    lead = r.dims(q[:-2])

    def dims(vs: Sequence[int]) -> list[int | None]:
        """Batch and head dims of q's sizes carry q's factors (not grouped-query k/v heads)."""
        if len(vs) < len(lead):
            return r.dims(vs, FactorKind.REPLICATED)
        return [f if vs[i] == q[i] else r.factor(vs[i], FactorKind.REPLICATED) for i, f in enumerate(lead)] + \
            r.dims(vs[len(lead):], FactorKind.REPLICATED)

    for v in tensor_operands(op):
        r.operand(dims(shape(v)))
    for v in tensor_results(op):
        r.result(dims(shape(v)))
    return r.build()


def _ring_attention(op: Operation) -> OpShardingRule:
    """`attention`'s rule for ring attention: [batch, heads, seq, head] tensors (q, k, v, the
    output, its gradient, log-sum-exp, dq, dk, dv) pass the sequence through, all by one factor;
    a mask [batch, 1|heads, q seq, k seq] passes the query sequence and needs its key sequence
    whole."""
    r = _Rule("ring-attention")
    operands, results = tensor_operands(op), tensor_results(op)
    backward = op.name.endswith("_backward")
    q = shape(operands[1] if backward else operands[0])
    batch, heads, seq, head = q
    fb, fh, fq, fd = r.factor(batch), r.factor(heads), r.factor(seq), r.factor(head, FactorKind.REPLICATED)
    # One sequence factor for queries and keys: as a factor sharding, splitting both over one axis
    # would compute only the diagonal blocks; ring attention's op moves the keys between devices
    # itself, so its contract is "everything split along the sequence, alike".

    def mapped(t: Sequence[int], seq_factor: int | None) -> list[int | None]:
        if len(t) == 3:  # log-sum-exp [batch, heads, seq]
            return [fb, fh, seq_factor]
        if seq_factor is not None:
            return [fb if t[0] == batch else r.factor(t[0], FactorKind.REPLICATED),
                    fh if t[1] == heads else r.factor(t[1], FactorKind.REPLICATED), seq_factor, fd]
        return [fb if t[0] == batch else None, None if t[1] == 1 else r.factor(t[1], FactorKind.REPLICATED),
                fq, r.factor(t[3], FactorKind.REPLICATED)]  # a mask

    mask = 6 if backward else 3  # the tensor after q, k, v (grad, q, k, v, out, lse)
    for i, v in enumerate(operands):
        r.operand(mapped(shape(v), None if i == mask else fq))
    for v in results:
        r.result(mapped(shape(v), fq))
    return r.build()


def index(op: Operation) -> OpShardingRule:
    """index.Tensor / index_select / gather / scatter: every dimension needs replication."""
    return _replicated("index", op)


# ---------------------------------------------------------------- the registry

RuleBuilder = Callable[[Operation], OpShardingRule]

ATTENTION_OPS = ("torch.aten._scaled_dot_product_flash_attention_for_cpu",
                 "torch.aten._scaled_dot_product_flash_attention_for_cpu_backward",
                 "torch.aten._scaled_dot_product_efficient_attention",
                 "torch.aten._scaled_dot_product_efficient_attention_backward",
                 "torch.aten._scaled_dot_product_flash_attention",
                 "torch.aten._scaled_dot_product_flash_attention_backward")
"""Scaled-dot-product attention and its backward, as capture writes them on CPU and CUDA."""

RING = "piperc.ring"
"""Attribute of an attention op that runs as ring attention over the mesh axis it names."""

RING_METHOD = "piperc.ring_method"
"""Attribute of a ring attention op that chooses per batch between ring and Ulysses ("auto")."""

RING_OPS = ("torch.aten._scaled_dot_product_flash_attention_for_cpu",
            "torch.aten._scaled_dot_product_flash_attention_for_cpu_backward")
"""The attention ops ring attention rewrites (the CPU flash kernel and its backward)."""

VIEW_OPS = ("torch.aten.view", "torch.aten._unsafe_view", "torch.aten.reshape")
"""The ops capture writes a reshape of a tensor as."""

_ELEMENTWISE_LINEAR = ("neg", "clone", "detach", "alias", "contiguous", "_to_copy", "to.dtype", "to.other",
                       "to.dtype_layout", "to.device", "lift_fresh_copy", "mul.Scalar", "div.Scalar",
                       "positive", "real")
_ELEMENTWISE = ("gelu", "silu", "relu", "sigmoid", "tanh", "exp", "log", "rsqrt", "sqrt", "reciprocal",
                "pow.Tensor_Scalar", "pow.Scalar", "pow.Tensor_Tensor", "add.Scalar", "sub.Scalar",
                "rsub.Scalar", "rsub.Tensor", "abs", "sin", "cos", "erf", "maximum", "minimum",
                "where.self", "where.ScalarOther", "where.ScalarSelf", "eq.Scalar", "eq.Tensor", "ne.Scalar",
                "lt.Scalar", "gt.Scalar", "le.Scalar", "ge.Scalar", "logical_not", "bitwise_not",
                "native_dropout", "dropout", "clamp", "clamp_min", "clamp_max", "lerp.Scalar", "lerp.Tensor",
                "addcmul", "addcdiv", "fill.Scalar", "zeros_like", "ones_like", "full_like", "empty_like",
                "sign", "square")
_BACKWARD_LINEAR_IN_GRAD = ("gelu_backward", "silu_backward", "threshold_backward", "sigmoid_backward",
                            "tanh_backward", "native_dropout_backward", "div.Tensor")

RULES: dict[str, RuleBuilder] = {
    **{f"torch.aten.{n}": _unary_linear for n in _ELEMENTWISE_LINEAR},
    **{f"torch.aten.{n}": elementwise for n in _ELEMENTWISE},
    **{f"torch.aten.{n}": _first_linear for n in _BACKWARD_LINEAR_IN_GRAD},
    "torch.aten.add.Tensor": _sum_linear,
    "torch.aten.sub.Tensor": _sum_linear,
    "torch.aten.mul.Tensor": _product_linear,
    "torch.aten.masked_fill.Scalar": _masked_fill,
    "torch.aten.masked_fill.Tensor": _masked_fill,
    "torch.aten.triu": _triangular,
    "torch.aten.tril": _triangular,
    **{f"torch.aten.{n}": creation for n in ("arange", "arange.start", "arange.start_step", "ones", "zeros",
                                             "full", "empty.memory_format", "scalar_tensor")},
    **{f"torch.aten.{n}": matmul for n in ("mm", "bmm", "matmul", "addmm", "linear")},
    **{f"torch.aten.{n}": reshape for n in ("view", "reshape", "_unsafe_view", "flatten.using_ints",
                                            "unflatten.int", "squeeze.dim", "squeeze.dims", "unsqueeze",
                                            "_reshape_alias")},
    **{f"torch.aten.{n}": permute for n in ("t", "numpy_T", "transpose.int", "permute")},
    **{f"torch.aten.{n}": split for n in ("split.Tensor", "split_with_sizes", "chunk")},
    "torch.aten.unbind.int": unbind,
    "torch.aten.cat": cat,
    "torch.aten.stack": stack,
    "torch.aten.select.int": select,
    "torch.aten.slice.Tensor": slice_,
    "torch.aten.index.Tensor": index,
    "torch.aten.scatter.src": index,
    "torch.aten.scatter.value": index,
    "torch.aten.scatter_add": index,
    "torch.aten.topk": topk,
    "torch.aten.cumsum": cumsum,
    **{f"torch.aten.{n}": new_tensor for n in ("new_zeros", "new_ones", "new_empty", "new_full")},
    "torch.aten.index_select": index,
    "torch.aten.gather": index,
    "torch.aten.expand": expand,
    **{f"torch.aten.{n}": sum_ for n in ("sum", "sum.dim_IntList", "mean", "mean.dim")},
    **{f"torch.aten.{n}": var for n in ("var.correction", "var.dim")},
    **{f"torch.aten.{n}": softmax for n in ("_softmax", "softmax.int", "_log_softmax", "log_softmax.int",
                                            "_softmax_backward_data", "_log_softmax_backward_data")},
    "torch.aten.native_layer_norm": layer_norm,
    "torch.aten.native_layer_norm_backward": layer_norm,
    "torch.aten.embedding": embedding,
    "torch.aten.embedding_dense_backward": embedding_backward,
    "torch.aten.nll_loss_forward": nll_loss,
    "torch.aten.nll_loss_backward": nll_loss,
    **{name: attention for name in (*ATTENTION_OPS, "torch.aten.scaled_dot_product_attention")},
}
"""The sharding rule builder of each torch op name."""


def sharding_rule(op: Operation) -> OpShardingRule | None:
    """The rule of `op`, or None when the registry has none for its name (or the op's
    tensors have unknown shapes)."""
    builder = RULES.get(op.name)
    if builder is None:
        return None
    values = [*tensor_operands(op), *tensor_results(op)]
    if not values or any(not v.type.has_shape for v in values):
        return None
    if not tensor_results(op):
        return None
    return builder(op)
