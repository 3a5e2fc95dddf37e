"""data-parallel: replicates every stage along a mesh axis and reduces gradients over it.

Each replica takes an equal slice of the global batch (the loss is scaled by
the microbatch pass so the sum over replicas is the global mean). The pass
writes a `par.all_reduce` (sum) over `axis` for every gradient argument of
each `@s<i>_update`, and numbers them into buckets of at most `bucket-mb`
MiB, in the order the backward produces them (last stage's last parameters
first), as `par.bucket` on each all-reduce. Lowering issues each bucket as
one collective on the communication stream.

Options: axis (the mesh axis, default dp), bucket-mb, directive.
Requires: mesh, outline-stages and optimizer have run.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerAttr, ModuleOp, StringAttr
from xdsl.passes import ModulePass

from piperc.dialects.par import AllReduceOp, PassKind, ReduceKind
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL, find_mesh
from piperc.passes.outline_stages import arg_keys, find_function, function_name
from piperc.passes.pipeline_split import NUM_STAGES, module_count

DP_AXIS = "par.dp_axis"
BUCKET = "par.bucket"

_BYTES = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2, "si64": 8, "si32": 4}


def tensor_bytes(t: ValueTensorType) -> int:
    """Bytes of a statically shaped tensor type."""
    return t.numel() * _BYTES.get(str(t.dtype), 4)


@dataclass(frozen=True)
class DataParallelPass(ModulePass):
    """Adds bucketed gradient all-reduces over `axis` to every stage's update."""

    name = "data-parallel"

    axis: str = "dp"
    bucket_mb: int | float = 25.0
    directive: str = "data-parallel"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = find_mesh(op)
        if self.axis not in mesh.axis_names():
            raise StrategyError(
                f"{self.directive}: axis '{self.axis}' is not in the mesh {list(mesh.axis_names())}"
            )
        if self.bucket_mb <= 0:
            raise StrategyError(f"{self.directive}: bucket_mb must be > 0, got {self.bucket_mb}")
        op.attributes[DP_AXIS] = StringAttr(self.axis)
        limit = self.bucket_mb * 2**20
        for stage in range(module_count(op, NUM_STAGES, self.directive, "pipeline-split")):
            update = find_function(op, function_name(stage, PassKind.UPDATE))
            block = update.body.block
            grads = [(k, a) for k, a in zip(arg_keys(update), block.args, strict=True) if k.startswith("grad:")]
            bucket, size = 0, 0
            for _, grad in reversed(grads):
                nbytes = tensor_bytes(grad.type)
                if size and size + nbytes > limit:
                    bucket, size = bucket + 1, 0
                size += nbytes
                reduce = AllReduceOp(grad, MESH_SYMBOL, self.axis, ReduceKind.SUM)
                reduce.attributes[BUCKET] = IntegerAttr(bucket, 64)
                block.insert_op_before(reduce, block.first_op)
                grad.replace_uses_with_if(reduce.results[0], lambda use, r=reduce: use.operation is not r)
