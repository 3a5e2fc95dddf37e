"""piperc's rewrite passes, one per file, and the registry that names them.

A pipeline written as text (`fold-detach,cse`) looks passes up here. Each
entry imports its module only when the pass is used.
"""

from __future__ import annotations

if __name__ != "piperc.passes":  # one folder, one import name (docs/architecture.md, "Folders")
    raise ImportError(f"the passes/ folder is the package piperc.passes; import it under that name, not {__name__}")

import importlib
from collections.abc import Callable

from xdsl.passes import ModulePass


def _lazy(module: str, cls: str) -> Callable[[], type[ModulePass]]:
    """A registry entry that imports `module` only when the pass is used."""

    def load() -> type[ModulePass]:
        return getattr(importlib.import_module(module), cls)

    return load


PASSES: dict[str, Callable[[], type[ModulePass]]] = {
    "fold-detach": _lazy("piperc.passes.fold_detach", "FoldDetachPass"),
    "mesh": _lazy("piperc.passes.mesh", "MeshPass"),
    "pipeline-split": _lazy("piperc.passes.pipeline_split", "PipelineSplitPass"),
    "outline-stages": _lazy("piperc.passes.outline_stages", "OutlineStagesPass"),
    "optimizer": _lazy("piperc.passes.optimizer", "OptimizerPass"),
    "data-parallel": _lazy("piperc.passes.data_parallel", "DataParallelPass"),
    "zero": _lazy("piperc.passes.zero", "ZeroPass"),
    "microbatch": _lazy("piperc.passes.microbatch", "MicrobatchPass"),
    "running-buffers": _lazy("piperc.passes.running_buffers", "RunningBuffersPass"),
    "schedule": _lazy("piperc.passes.schedule", "SchedulePass"),
    "expand-schedule": _lazy("piperc.passes.expand_schedule", "ExpandSchedulePass"),
    "expand-async": _lazy("piperc.passes.expand_async", "ExpandAsyncPass"),
    "lower-to-exec": _lazy("piperc.passes.lower_to_exec", "LowerToExecPass"),
    "verify-exec": _lazy("piperc.passes.verify_exec", "VerifyExecPass"),
    "lower-reshard": _lazy("piperc.passes.lower_reshard", "LowerReshardPass"),
    "bucket-collectives": _lazy("piperc.passes.bucket_collectives", "BucketCollectivesPass"),
    "lower-collectives": _lazy("piperc.passes.lower_collectives", "LowerCollectivesPass"),
    "propagate-sharding": _lazy("piperc.passes.propagate_sharding", "PropagateShardingPass"),
    "tensor-parallel": _lazy("piperc.passes.tensor_parallel", "TensorParallelPass"),
    "localise-shapes": _lazy("piperc.passes.localise_shapes", "LocaliseShapesPass"),
    "expert-parallel": _lazy("piperc.passes.expert_parallel", "ExpertParallelPass"),
    "sequence-parallel": _lazy("piperc.passes.sequence_parallel", "SequenceParallelPass"),
    "check-zigzag": _lazy("piperc.passes.sequence_parallel", "CheckZigzagPass"),
    "unflatten-matmul": _lazy("piperc.passes.unflatten_matmul", "UnflattenMatmulPass"),
    "cse": _lazy("xdsl.transforms.common_subexpression_elimination", "CommonSubexpressionElimination"),
    "dce": _lazy("xdsl.transforms.dead_code_elimination", "DeadCodeElimination"),
}
"""Every pass a textual pipeline may name, by its registered name."""


def register_pass(pass_class: type[ModulePass]) -> type[ModulePass]:
    """Adds a user's pass to the registry (usable as a decorator).

    Its `name` must not clash with an existing pass.
    """
    if pass_class.name in PASSES and PASSES[pass_class.name]() is not pass_class:
        raise ValueError(f"a pass named '{pass_class.name}' is already registered")
    PASSES[pass_class.name] = lambda: pass_class
    return pass_class
