"""lower-reshard: turns every `par.reshard` into the collectives that move the data.

A layout (`#par.sharding`) says, per tensor dimension, which mesh axes split
it (outermost first) and over which axes the value is a pending partial sum.
The pass changes the source layout into the target one a mesh axis at a time:

  * a dimension keeps the axes it shares with the target as a prefix; its
    other axes leave from the innermost: to another dimension that takes that
    axis next, by `par.all_to_all` (split there, concatenate here), otherwise
    by `par.all_gather` along the dimension;
  * a pending sum over an axis is reduced: by `par.reduce_scatter` along the
    dimension that takes that axis next, otherwise by `par.all_reduce`;
  * a dimension then takes its missing axes, outermost first, by
    `par.all_slice`: each device keeps its own piece, nothing is sent.

So Partial(a) -> Replicate is an all_reduce over a, Partial(a) -> Shard(d
over a) a reduce_scatter on d, Shard(d over a) -> Replicate an all_gather on
d, Shard(d1 over a) -> Shard(d2 over a) an all_to_all (split d2, concat d1),
Replicate -> Shard(d over a) an all_slice, and identical layouts nothing: the
result is the operand. A target that holds a partial sum the source does not
is rejected: resharding cannot create pending sums.

Each collective carries its reshard's `piperc.origin`, if any: the model location the data
moves for (code generation names it to the runtime, which counts an all_to_all's bytes by it).

Options: none. Requires: the reshards' meshes are declared (`par.mesh`).
Works on reshards anywhere: function bodies, tasks, any region.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import (
    GreedyRewritePatternApplier,
    PatternRewriter,
    PatternRewriteWalker,
    RewritePattern,
    op_type_rewrite_pattern,
)

from piperc.dialects import par
from piperc.dialects.roles import ORIGIN
from piperc.dialects.torch import ValueTensorType
from piperc.errors import PassError


class _Lowering:
    """The collectives of one reshard, built in order while tracking the current layout."""

    def __init__(self, op: par.ReshardOp):
        self.op = op
        self.mesh_name = op.mesh.root_reference.data
        self.mesh = par.lookup_mesh(op, op.mesh)
        self.dims = [list(op.source.dim_axes(d)) for d in range(op.source.rank())]
        self.partial = list(op.source.partial_axes())
        self.target = [list(op.target.dim_axes(d)) for d in range(op.target.rank())]
        self.value: SSAValue = op.input
        self.ops: list[Operation] = []

    def build(self) -> None:
        """Emits the collectives; raises PassError for a target no collective reaches."""
        created = [a for a in self.op.target.partial_axes() if a not in self.partial]
        if created:
            raise PassError(
                f"lower-reshard: {self.op.describe()}: the target holds a partial sum over axis "
                f"'{created[0]}' that the source does not; a reshard cannot turn a value into "
                "pending partial sums (every device but one would have to drop its data). "
                "Partial sums come from compute, such as a matmul whose contracted dimension "
                "is sharded; keep the axis out of the target's `partial`"
            )
        for dim in range(len(self.dims)):
            while not self._is_prefix(dim):
                self._remove_innermost(dim)
        for axis in [a for a in self.partial if a not in self.op.target.partial_axes()]:
            self._reduce(axis)
        for dim, axes in enumerate(self.target):
            for axis in axes[len(self.dims[dim]) :]:
                self._emit(par.AllSliceOp(self.value, self.mesh_name, axis, dim, self._type({dim: -1}, axis)))
                self.dims[dim].append(axis)

    def _is_prefix(self, dim: int) -> bool:
        return self.dims[dim] == self.target[dim][: len(self.dims[dim])]

    def _next_home(self, axis: str) -> int | None:
        """The dimension that takes `axis` as its next axis in the target, if any."""
        for dim, axes in enumerate(self.target):
            if self._is_prefix(dim) and axes[len(self.dims[dim]) : len(self.dims[dim]) + 1] == [axis]:
                return dim
        return None

    def _remove_innermost(self, dim: int) -> None:
        axis = self.dims[dim].pop()
        home = self._next_home(axis)
        if home is None:
            self._emit(par.AllGatherOp(self.value, self.mesh_name, axis, dim, self._type({dim: 1}, axis)))
            return
        self._emit(par.AllToAllOp(self.value, self.mesh_name, axis, home, dim,
                                  self._type({home: -1, dim: 1}, axis)))
        self.dims[home].append(axis)

    def _reduce(self, axis: str) -> None:
        self.partial.remove(axis)
        home = self._next_home(axis)
        if home is None:
            self._emit(par.AllReduceOp(self.value, self.mesh_name, axis))
            return
        self._emit(par.ReduceScatterOp(self.value, self.mesh_name, axis, home, self._type({home: -1}, axis)))
        self.dims[home].append(axis)

    def _type(self, change: dict[int, int], axis: str) -> ValueTensorType:
        """The current type with each dimension in `change` multiplied (1) or divided (-1)
        by the size of `axis`."""
        assert isinstance(self.value.type, ValueTensorType)
        n = self.mesh.axis_size(axis)
        shape = [
            size if size < 0 or dim not in change else size * n if change[dim] > 0 else size // n
            for dim, size in enumerate(self.value.type.get_shape())
        ]
        return ValueTensorType(shape, self.value.type.dtype)

    def _emit(self, op: Operation) -> None:
        if ORIGIN in self.op.attributes:  # the model location the data moves for
            op.attributes[ORIGIN] = self.op.attributes[ORIGIN]
        self.ops.append(op)
        self.value = op.results[0]


class LowerReshard(RewritePattern):
    """`par.reshard` -> the collectives between its layouts (none for identical layouts)."""

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: par.ReshardOp, rewriter: PatternRewriter) -> None:
        lowering = _Lowering(op)
        lowering.build()
        rewriter.replace(op, lowering.ops, [lowering.value])


@dataclass(frozen=True)
class LowerReshardPass(ModulePass):
    """Replaces every `par.reshard` by collectives over one mesh axis each.

    Options: none. Requires: the meshes the reshards name are declared.
    """

    name = "lower-reshard"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        PatternRewriteWalker(GreedyRewritePatternApplier([LowerReshard()])).rewrite_module(op)
