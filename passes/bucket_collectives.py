"""bucket-collectives: merges the collectives a function issues one value at a time into buckets.

After `lower-reshard`, a function that gathers many values (ZeRO-3's forward gathers each
parameter it reads; its update reduce-scatters each gradient and gathers each new
parameter) holds one `par.all_gather` or `par.reduce_scatter` per value, and each is one
message exchange. This pass merges those along dimension 0 over the same axis and of the
same element type into `par.all_gather_bucket` / `par.reduce_scatter_bucket` ops of at
most `bucket-mb` MiB, one flat buffer each:

    %a = par.all_gather %x over @mesh "dp" dim 0 : !torch.vtensor<[2,8],f32> -> !torch.vtensor<[4,8],f32>
    %b = par.all_gather %y over @mesh "dp" dim 0 : !torch.vtensor<[4],f32> -> !torch.vtensor<[8],f32>
  ->
    %a, %b = par.all_gather_bucket %x, %y over @mesh "dp" : ... -> !torch.vtensor<[4,8],f32>, !torch.vtensor<[8],f32>

Two collectives join a bucket when nothing between them needs the first one's result:
collectives that read only the function's arguments join the first such one (they are
all ready at entry), and a run of collectives with nothing else between them joins its
first. The results are the same values; only the number of exchanges changes. A collective
of a dimension the mesh cuts zigzag (`par.ZIGZAG`) is never merged.

Options: bucket-mb (default 25). Works on every `func.func`; `par.program`s are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block, BlockArgument, Operation
from xdsl.passes import ModulePass

from piperc.dialects import par
from piperc.dialects.torch import ValueTensorType

_MERGED = (par.AllGatherOp, par.ReduceScatterOp)


def _kind(op: Operation) -> tuple | None:
    """What ops must share to join one bucket; None for ops that never join one (a collective
    of a dimension the mesh cuts zigzag, `par.ZIGZAG`, keeps its own: a bucket is one flat
    buffer of contiguous pieces)."""
    if not isinstance(op, _MERGED) or op.dim.value.data != 0:
        return None
    if any(par.zigzag_cuts(op)):
        return None
    operand = op.operands[0].type
    assert isinstance(operand, ValueTensorType)
    reduce = op.reduce.data if isinstance(op, par.ReduceScatterOp) else None
    return (type(op), op.mesh.root_reference.data, op.axis.data, str(operand.dtype), reduce)


@dataclass(frozen=True)
class BucketCollectivesPass(ModulePass):
    """Merges per-value all_gather / reduce_scatter along dimension 0 into buckets."""

    name = "bucket-collectives"

    bucket_mb: int | float = 25.0

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        limit = self.bucket_mb * 2**20
        for fn in op.ops:
            if isinstance(fn, func.FuncOp) and fn.body.blocks:
                for bucket in _buckets(fn.body.block, limit):
                    if len(bucket) > 1:
                        _merge(bucket)


def _buckets(block: Block, limit: float) -> list[list[Operation]]:
    """The groups of collectives of `block` that may be issued together, in block order."""
    at_entry: dict[tuple, list[list[Operation]]] = {}
    runs: list[list[Operation]] = []
    previous: Operation | None = None
    for op in block.ops:
        kind = _kind(op)
        if kind is None:
            previous = None
            continue
        if all(isinstance(v, BlockArgument) for v in op.operands):
            groups = at_entry.setdefault(kind, [[]])
        elif previous is not None and _kind(previous) == kind and runs and runs[-1][-1] is previous:
            groups = runs
        else:
            runs.append([])
            groups = runs
        if groups[-1] and sum(o.operands[0].type.nbytes() for o in groups[-1]) + op.operands[0].type.nbytes() > limit:
            groups.append([])
        groups[-1].append(op)
        previous = op
    return [b for groups in at_entry.values() for b in groups] + runs


def _merge(bucket: list[Operation]) -> None:
    """Replaces the collectives of `bucket` by one bucket op where the first one is."""
    first = bucket[0]
    mesh, axis = first.mesh.root_reference.data, first.axis.data
    inputs = [o.operands[0] for o in bucket]
    types = [o.results[0].type for o in bucket]
    if isinstance(first, par.AllGatherOp):
        merged = par.AllGatherBucketOp(inputs, mesh, axis, types)
    else:
        merged = par.ReduceScatterBucketOp(inputs, mesh, axis, types, first.reduce.data)
    block = first.parent_block()
    assert block is not None
    block.insert_op_before(merged, first)
    for old, new in zip(bucket, merged.outputs, strict=True):
        new.name_hint = old.results[0].name_hint
        old.results[0].replace_all_uses_with(new)
        old.detach()
        old.erase()
