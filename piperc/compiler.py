"""`piperc.compile`: a model and a strategy in, one program per rank out.

    compiled = piperc.compile(model, example_inputs, mesh=piperc.Mesh(pp=2, dp=2),
                              strategy=[...], optimizer=piperc.optim.AdamW(lr=1e-3))
    compiled.dump("out/")                      # IR after every pass, programs, schedule
    result = piperc.launch(compiled, batches)  # local processes, one global batch per step
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence

import torch
from xdsl.passes import ModulePass

from piperc import codegen, schedules
from piperc.errors import PipercError, StrategyError
from piperc.frontend import ARG_ALIASES, Captured, capture, main_function
from piperc.ir import print_ir
from piperc.passes.data_parallel import DataParallelPass
from piperc.passes.fold_detach import FoldDetachPass
from piperc.passes.lower_to_exec import LowerToExecPass
from piperc.passes.mesh import MeshPass
from piperc.passes.microbatch import MicrobatchPass
from piperc.passes.optimizer import OptimizerPass, optimizer_state
from piperc.passes.outline_stages import OutlineStagesPass
from piperc.passes.pipeline_split import PipelineSplitPass
from piperc.passes.schedule import SchedulePass, find_schedule
from piperc.passmanager import PipelineOptions, pipeline_text, run_pipeline
from piperc.strategy import SGD, AdamW, DataParallel, Mesh, Pipeline

_PP = "pp"


@dataclasses.dataclass
class Compiled:
    """A compiled training step: per-rank programs, the IR after every pass, initial state."""

    files: dict[str, str]
    ir_after: list[tuple[str, str]]
    initial_state: dict[str, torch.Tensor]
    aliases: dict[str, str]
    schedule: schedules.Schedule
    pipeline: str

    @property
    def world_size(self) -> int:
        """How many ranks the programs run on."""
        return sum(1 for f in self.files if f.startswith("rank"))

    def save(self, path: str) -> str:
        """Writes what the runtime loads (`manifest.json`, `rank<r>.py`, `state.pt`) to `path`."""
        os.makedirs(path, exist_ok=True)
        for name, text in self.files.items():
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
        torch.save(self.initial_state, os.path.join(path, "state.pt"))
        return path

    def dump(self, path: str) -> str:
        """Writes everything a person reads to `path`: `ir/NN-<pass>.mlir` after every
        pass (unless compiled with `keep_ir=False`), the per-rank programs, the
        schedule as a table and a picture."""
        self.save(path)
        ir_dir = os.path.join(path, "ir")
        shutil.rmtree(ir_dir, ignore_errors=True)
        if self.ir_after:
            os.makedirs(ir_dir)
        for i, (name, text) in enumerate(self.ir_after):
            with open(os.path.join(ir_dir, f"{i:02d}-{name}.mlir"), "w") as f:
                f.write(text)
        timeline = schedules.simulate(self.schedule)
        with open(os.path.join(path, "schedule.txt"), "w") as f:
            f.write(self.schedule.table() + "\n\n" + schedules.render_text(timeline) + "\n")
        schedules.save_svg(timeline, os.path.join(path, "schedule.svg"))
        with open(os.path.join(path, "pipeline.txt"), "w") as f:
            f.write(self.pipeline + "\n")
        return path


def _check_strategy(mesh: Mesh, strategy: Sequence[object], optimizer) -> tuple[Pipeline | None, DataParallel | None]:
    if not isinstance(mesh, Mesh):
        raise StrategyError(f"mesh must be a piperc.Mesh, got {type(mesh).__name__}")
    if not isinstance(optimizer, SGD | AdamW):
        raise StrategyError(f"optimizer must be piperc.optim.SGD or piperc.optim.AdamW, got {optimizer!r}")
    pp, dp = None, None
    used: dict[str, object] = {}
    for d in strategy:
        if not isinstance(d, Pipeline | DataParallel):
            raise StrategyError(f"unknown directive {d!r}; use piperc.pipeline(...) or piperc.data_parallel(...)")
        if d.axis not in mesh.axes:
            raise StrategyError(f"{d}: axis '{d.axis}' is not in {mesh!r}")
        if d.axis in used:
            raise StrategyError(f"{d}: axis '{d.axis}' is already used by {used[d.axis]}")
        used[d.axis] = d
        if isinstance(d, Pipeline):
            if pp is not None:
                raise StrategyError(f"{d}: only one pipeline directive is allowed")
            if d.stages != mesh.axes[d.axis]:
                raise StrategyError(
                    f"{d}: {d.stages} stages on axis '{d.axis}' of size {mesh.axes[d.axis]}; "
                    "piperc runs one stage per device"
                )
            if d.microbatches < 1:
                raise StrategyError(f"{d}: microbatches must be >= 1")
            pp = d
        else:
            dp = d
    for axis, size in mesh.axes.items():
        if axis not in used and size > 1:
            raise StrategyError(f"{mesh!r}: axis '{axis}' (size {size}) is used by no directive")
    return pp, dp


def compile(  # noqa: A001 - the public name users expect
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    mesh: Mesh,
    strategy: Sequence[object],
    optimizer: SGD | AdamW,
    device: str = "cpu",
    world_size: int | None = None,
    options: PipelineOptions | None = None,
    keep_ir: bool = True,
) -> Compiled:
    """Compiles one training step of `model` for `mesh` under `strategy`.

    `example_inputs` is one global batch (dim 0 is the batch). Raises
    StrategyError naming the directive for a strategy that cannot apply,
    CaptureError for a model that cannot be captured. `world_size`, when
    given, must equal the mesh size. `options` observe the pass pipeline
    (`print_ir_after_all`, `dump_dir`, `time_passes`, ...). `keep_ir=False`
    skips keeping the IR after every pass (faster; `dump` then writes no `ir/`).
    """
    pp, dp = _check_strategy(mesh, strategy, optimizer)
    if world_size is not None and world_size != mesh.size:
        raise StrategyError(f"{mesh!r} has {mesh.size} ranks but the world size is {world_size}")
    replicas = mesh.axes[dp.axis] if dp else 1
    microbatches = pp.microbatches if pp else 1
    batch = example_inputs[0].shape[0]
    for i, x in enumerate(example_inputs):
        if x.dim() == 0 or x.shape[0] != batch:
            raise StrategyError(f"example input {i} does not share the batch dimension 0 of size {batch}")
    if batch % (replicas * microbatches):
        who = pp if pp else dp
        raise StrategyError(
            f"{who}: the global batch of {batch} rows does not split into {replicas} replica(s) x "
            f"{microbatches} microbatch(es); the per-rank batch is {batch / replicas:g} rows"
        )
    rows = batch // (replicas * microbatches)
    captured = capture(model, tuple(x[:rows] for x in example_inputs))

    axes = dict(mesh.axes)
    pp_axis = pp.axis if pp else _PP
    if pp_axis not in axes:
        axes = {pp_axis: 1, **axes}
    shape = ",".join(f"{a}={s}" for a, s in axes.items())
    passes: list[ModulePass] = [
        FoldDetachPass(),
        MeshPass(shape=shape),
        PipelineSplitPass(stages=pp.stages if pp else 1, split_at=pp.split_at if pp else (),
                          region=pp.region if pp else "", directive=str(pp) if pp else "pipeline-split"),
        OutlineStagesPass(directive=str(pp) if pp else "outline-stages"),
        OptimizerPass(**optimizer.pass_options(), directive=repr(optimizer)),
    ]
    if dp:
        passes.append(DataParallelPass(axis=dp.axis, bucket_mb=dp.bucket_mb, directive=str(dp)))
    passes.append(MicrobatchPass(count=microbatches, replicas=replicas, directive=str(pp or dp or "microbatch")))
    passes.append(SchedulePass(**(pp.schedule_options() if pp else {"kind": "gpipe"}), axis=pp_axis,
                               directive=str(pp) if pp else "schedule"))
    passes.append(LowerToExecPass(device=device))
    return _lower(captured, passes, options, keep_ir)


def _lower(captured: Captured, passes: list[ModulePass], options: PipelineOptions | None,
           keep_ir: bool) -> Compiled:
    aliases = {}
    for attrs in main_function(captured.module).arg_attrs.data:
        if ARG_ALIASES in attrs.data:
            canonical = attrs.data["piperc.param"].data
            for alias in attrs.data[ARG_ALIASES].data:
                aliases[alias.data] = canonical
    ir_after = [("captured", str(captured))] if keep_ir else []
    options = dataclasses.replace(options or PipelineOptions())
    if keep_ir:
        options.after_pass = lambda p, m: ir_after.append((p.name, print_ir(m)))
    try:
        run_pipeline(captured.module, captured.ctx, passes, options)
    except PipercError as e:
        cause = e.__cause__
        raise (cause if isinstance(cause, StrategyError) else e) from None
    module = captured.module
    files = codegen.generate(module, optimizer_state(module))
    table = find_schedule(module).table()
    kind = next((p.kind for p in passes if isinstance(p, SchedulePass)), "user")
    sched = schedules.from_lists([[a.compact() for a in table[d]] for d in sorted(table)], name=kind)
    initial = {k: v.detach().clone() for k, v in {**captured.params, **captured.buffers}.items()}
    return Compiled(files, ir_after, initial, aliases, sched, pipeline_text(passes))


def launch(compiled: Compiled, batches: Sequence[Sequence[torch.Tensor]], *, progress: bool = False,
           timeout: float | None = None):
    """Trains with `compiled` on local processes, one global batch per step.

    Returns a result with `.losses` (one float per step) and `.state_dict`
    (the final full parameters, named as in the model's state_dict).
    """
    from piperc.runtime.launch import launch_dir

    with tempfile.TemporaryDirectory(prefix="piperc-") as path:
        compiled.save(path)
        result = launch_dir(path, [tuple(b) for b in batches], timeout=timeout, progress=progress)
    for alias, canonical in compiled.aliases.items():
        if canonical in result.state_dict:
            result.state_dict[alias] = result.state_dict[canonical]
    return result

