"""`piperc.compile`: a model and a strategy in, one program per rank out.

    compiled = piperc.compile(model, example_inputs, mesh=piperc.Mesh(pp=2, dp=2),
                              strategy=[...], optimizer=piperc.optim.AdamW(lr=1e-3))
    compiled.dump("out/")                      # IR after every pass, programs, schedule
    result = piperc.launch(compiled, batches)  # local processes, one global batch per step
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import torch
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass

from piperc import codegen, schedules
from piperc.dialects.torch import RANDOM_INDEX
from piperc.errors import CaptureError, PassError, StrategyError, describe
from piperc.experts import dispatch_layers, dispatch_table
from piperc.frontend import ARG_ALIASES, Captured, Captures, capture, main_function
from piperc.ir import cycle_collection_paused, print_ir
from piperc.memory import PeakMemory, memory_table, predict_memory
from piperc.nn import MOE_REGION
from piperc.passes.bucket_collectives import BucketCollectivesPass
from piperc.passes.expand_async import ExpandAsyncPass
from piperc.passes.expert_parallel import router_paths
from piperc.passes.fold_detach import FoldDetachPass
from piperc.passes.lower_collectives import LowerCollectivesPass
from piperc.passes.lower_reshard import LowerReshardPass
from piperc.passes.lower_to_exec import LowerToExecPass
from piperc.passes.mesh import MeshPass
from piperc.passes.microbatch import MicrobatchPass
from piperc.passes.optimizer import optimizer_state
from piperc.passes.outline_stages import OutlineStagesPass
from piperc.passes.pipeline_split import PipelineSplitPass
from piperc.passes.propagate_sharding import PropagateShardingPass, sharding_report
from piperc.passes.running_buffers import RunningBuffersPass
from piperc.passes.schedule import SchedulePass, find_schedule, schedule_data
from piperc.passes.verify_exec import VerifyExecPass
from piperc.passmanager import PipelineOptions, pipeline_text, run_pipeline
from piperc.runtime.launch import LaunchResult
from piperc.strategy import Directive, Fragment, Mesh, Optimizer, StrategyContext, schedule_fragment

_PP = "pp"


@dataclasses.dataclass
class Compiled:
    """A compiled training step: per-rank programs, the IR after every pass, initial state,
    and `module`, the lowered module (one verified `exec.program @rank<r>` per rank)."""

    files: dict[str, str]
    ir_after: list[tuple[str, str]]
    initial_state: dict[str, torch.Tensor]
    aliases: dict[str, str]
    schedule: schedules.Schedule
    pipeline: str
    module: ModuleOp
    sharding: list[str] = dataclasses.field(default_factory=list)
    """The compile report of sharding propagation: each change of layout it inserted (value,
    from -> to, bytes per device, the op and rule that needed it) and each op computed
    replicated for want of a rule; empty without tensor parallelism."""
    optimizer: Optimizer | None = None
    """The optimizer directive the update was compiled from."""
    microbatches: int = 1
    """How many microbatches each replica's rows are cut into."""
    replicas: int = 1
    """How many data-parallel replicas share each global batch (it is cut into
    replicas x microbatches row slices)."""
    seed: int = 0
    """The seed its random ops draw from (`compile(seed=)`)."""
    random_ops: int = 0
    """How many random ops (dropout) the model's forward runs; with any, it trains as one
    device does only when that device cuts each batch into the same slices (`seed`)."""
    batch_statistics: int = 0
    """How many ops normalise over the batch in training mode (BatchNorm): each slice of
    the batch is normalised with its own statistics (and updates the running statistics
    in turn), so with any, it trains as one device does when that device runs the same
    slices in order (`piperc.reference.train_eager(slices=)`)."""
    moe_layers: int = 0
    """How many mixture-of-experts layers (`piperc.nn.MoE`'s contract) the model runs: their
    capacity and load-balancing loss are per call, i.e. per slice of the batch, so with any
    it trains as one device does when that device runs the same slices."""

    asynchronous: str | None = None
    """The update plan of an asynchronous pipeline (`pipedream`, `pipedream-2bw`), None for a
    synchronous schedule: it trains as `piperc.reference.stale_training` with `update_plan`."""

    def update_plan(self, steps: int):
        """The update plan these programs run for `steps` steps
        (`piperc.asynchronous.plan`): when each stage updates, which versions each
        microbatch reads. A synchronous schedule's is flushed every step."""
        from piperc import asynchronous

        stages = len(self.stage_parameters())
        return asynchronous.plan(self.asynchronous or self.schedule.name, stages, self.microbatches, steps)

    def stage_parameters(self) -> list[list[str]]:
        """Per pipeline stage (its device's coordinate along the schedule's axis), the names of
        the parameters it holds, sorted."""
        manifest = json.loads(self.files["manifest.json"])
        axis = find_schedule(self.module).axis.data
        stages: dict[int, set[str]] = {}
        for name, info in manifest["params"].items():
            for rank in info["owners"]:
                stages.setdefault(manifest["ranks"][rank]["coords"].get(axis, 0), set()).add(name)
        return [sorted(stages[s]) for s in sorted(stages)]

    @property
    def world_size(self) -> int:
        """How many ranks the programs run on."""
        return sum(1 for f in self.files if f.startswith("rank"))

    def memory(self) -> list[PeakMemory]:
        """Each rank's predicted peak memory, by item, from its exec program
        (`piperc.memory.predict_memory`); print one, or `memory_table(...)` for all."""
        return predict_memory(self.module)

    def experts(self, result: LaunchResult | None = None) -> str:
        """Expert parallelism's dispatch statistics: per MoE layer its all_to_alls, the experts
        each rank holds and the bytes each rank dispatches per step, predicted and, given the
        `result` of `launch`, measured (`piperc.experts.dispatch_table`)."""
        return dispatch_table(self.module, None if result is None else result.sent_per_step())

    def simulate(self, costs):
        """One training step of these programs, predicted under `costs` (a
        `piperc.simulator.Costs`, e.g. from `piperc.profile`): step time, bubble,
        busy time and peak memory per rank, the table and a trace
        (`piperc.simulator.simulate`)."""
        from piperc.simulator import simulate

        return simulate(self, costs)

    def save(self, path: str) -> str:
        """Writes what the runtime loads (`manifest.json`, `rank<r>.py`, `state.pt`) to `path`."""
        os.makedirs(path, exist_ok=True)
        for name, text in self.files.items():
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
        torch.save(self.initial_state, os.path.join(path, "state.pt"))
        return path

    def dump(self, path: str, result: LaunchResult | None = None) -> str:
        """Writes everything a person reads to `path`: `ir/NN-<pass>.mlir` after every
        pass (unless compiled with `keep_ir=False`), the per-rank programs, the
        schedule as a table and a picture, `memory.txt`: each rank's predicted
        peak memory by item, next to the measured one when given the `result` of
        `launch`, and, with tensor parallelism, `sharding.txt` (`self.sharding`)."""
        self.save(path)
        with open(os.path.join(path, "memory.txt"), "w") as f:
            f.write(memory_table(self.memory(), None if result is None else result.peak_memory))
        if self.sharding:
            with open(os.path.join(path, "sharding.txt"), "w") as f:
                f.write("\n".join(self.sharding) + "\n")
        if dispatch_layers(self.module):
            with open(os.path.join(path, "experts.txt"), "w") as f:
                f.write(self.experts(result))
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


def _check_model(model: object, example_inputs: object) -> None:
    """CaptureError unless `model` is a torch.nn.Module and `example_inputs` a non-empty
    tuple or list of tensors that do not require grad."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple | list) or not example_inputs:
        raise CaptureError(f"example_inputs must be a non-empty tuple of tensors (one global batch, the "
                           f"arguments of {type(model).__name__}.forward), got {example_inputs!r:.80}")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"example input {i} is a {type(x).__name__}, not a tensor; piperc captures "
                               "forward(*tensors) with the batch along dimension 0 of each")
        if x.requires_grad:
            raise CaptureError(f"example input {i} requires grad; piperc trains the model's parameters and takes "
                               "its inputs as data: pass it detached (x.detach())")


def _run_eagerly(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Runs `model` once on `inputs` without gradients; CaptureError with torch's own message
    if that fails. Capture traces with fake tensors, which let some mistakes through (an int64
    or bf16 input to fp32 weights) that would otherwise fail only on the ranks. The run leaves
    the random state and the buffers (running statistics) as they were."""
    buffers = {name: (b, b.clone()) for name, b in model.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*inputs)
    except Exception as e:
        shown = ", ".join(f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}" for x in inputs)
        raise CaptureError(f"{type(model).__name__}.forward fails on the example inputs, run eagerly on one "
                           f"microbatch ({shown}): {describe(e)}") from e
    finally:
        for name, (buffer, saved) in buffers.items():
            module, _, leaf = name.rpartition(".")
            buffer.copy_(saved)
            setattr(model.get_submodule(module), leaf, buffer)


def _check_strategy(mesh: Mesh, strategy: Sequence[object], optimizer: object, device: str) -> StrategyContext:
    if not isinstance(strategy, list | tuple):
        raise StrategyError(f"strategy must be a list of directives, e.g. [piperc.data_parallel()], got "
                            f"{strategy!r:.80}")
    if device not in ("cpu", "cuda"):
        raise StrategyError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not isinstance(mesh, Mesh):
        raise StrategyError(f"mesh must be a piperc.Mesh, got {type(mesh).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise StrategyError(f"optimizer must be piperc.optim.SGD or piperc.optim.AdamW, got {optimizer!r}")
    used: dict[str, Directive] = {}
    for d in strategy:
        if not isinstance(d, Directive):
            raise StrategyError(f"unknown directive {d!r}; use piperc.pipeline(...) or piperc.data_parallel(...), "
                                "or subclass piperc.Directive")
        for axis in d.mesh_axes():
            if axis not in mesh.axes:
                raise StrategyError(f"{d}: axis '{axis}' is not in {mesh!r}")
            if axis in used:
                raise StrategyError(f"{d}: axis '{axis}' is already used by {used[axis]}")
            used[axis] = d
    ctx = StrategyContext(mesh, (*strategy, optimizer), device)
    for d in ctx.directives:
        d.check(ctx)
    for d in ctx.directives:
        used.update((a, d) for a in d.axes_in(ctx) if a not in used)
    for axis, size in mesh.axes.items():
        if axis not in used and size > 1:
            raise StrategyError(f"{mesh!r}: axis '{axis}' (size {size}) is used by no directive")
    return ctx


def compile(  # noqa: A001 - the public name users expect
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    mesh: Mesh,
    strategy: Sequence[Directive],
    optimizer: Optimizer,
    device: str = "cpu",
    world_size: int | None = None,
    options: PipelineOptions | None = None,
    keep_ir: bool = True,
    seed: int = 0,
    captures: Captures | None = None,
) -> Compiled:
    """Compiles one training step of `model` for `mesh` under `strategy`.

    `example_inputs` is one global batch (dim 0 is the batch). The arguments are
    checked first, then the model runs once eagerly on one microbatch (no
    gradients, random state and buffers restored), so a model that cannot run
    on these inputs is a CaptureError here, not a failure on the ranks. Each directive
    (and the optimizer) contributes its passes as fragments; they run with
    piperc's own (fold-detach, mesh, microbatch, lower-to-exec) in the order
    their `requires`/`provides` facts give (see `assemble_pipeline`).
    Raises StrategyError naming the directive for a strategy that cannot
    apply, CaptureError for a model that cannot be captured, PassError naming
    the pass (its cause chained) for any other failure inside a pass.
    `world_size`, when given, must equal the mesh size. `options` observe the
    pass pipeline (`print_ir_after_all`, `dump_dir`, `time_passes`, ...).
    `keep_ir=False` skips keeping the IR after every pass (faster; `dump`
    then writes no `ir/`). Random ops (dropout) draw from `seed`: each one is seeded from
    (seed, step, microbatch slice, its index among the forward's random ops), so every launch
    draws the same, whatever the strategy (`piperc.runtime.comm.Runtime.seed_random`).
    With `captures=piperc.Captures(model)`, strategies whose microbatches have the same shape
    share one capture of the model (`Captures` says when it captures again).
    """
    _check_model(model, example_inputs)
    if captures is not None and not isinstance(captures, Captures):
        raise StrategyError(f"compile: captures must be a piperc.Captures(model), got {type(captures).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise StrategyError(f"compile: seed must be a whole number >= 0, got {seed!r}")
    ctx = _check_strategy(mesh, strategy, optimizer, device)
    if world_size is not None and world_size != mesh.size:
        raise StrategyError(f"{mesh!r} has {mesh.size} ranks but the world size is {world_size!r}")
    batch = example_inputs[0].shape[0]
    for i, x in enumerate(example_inputs):
        if x.dim() == 0 or x.shape[0] != batch:
            raise StrategyError(f"example input {i} does not share the batch dimension 0 of size {batch}")
    if batch % (ctx.replicas * ctx.microbatches):
        raise StrategyError(
            f"{ctx.batch_directive}: the global batch of {batch} rows does not split into {ctx.replicas} "
            f"replica(s) x {ctx.microbatches} microbatch(es); the per-rank batch is {batch / ctx.replicas:g} rows"
        )
    passes = assemble_pipeline(ctx)
    rows = batch // (ctx.replicas * ctx.microbatches)
    microbatch = tuple(x[:rows] for x in example_inputs)
    _run_eagerly(model, microbatch)
    # Capture, the passes and code generation allocate millions of objects that live
    # until the compile ends; cyclic collections in between would walk them over and over.
    with cycle_collection_paused():
        captured = capture(model, microbatch) if captures is None else captures.get(model, microbatch)
        random_ops = sum(RANDOM_INDEX in op.attributes for op in captured.module.walk())
        batch_statistics = sum(op.name in _BATCH_STATISTICS for op in captured.module.walk())
        moe_layers = len(router_paths(main_function(captured.module), MOE_REGION))
        signature = [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in example_inputs]
        compiled = _lower(captured, passes, options, keep_ir, signature, seed)
    compiled.optimizer, compiled.microbatches, compiled.replicas = optimizer, ctx.microbatches, ctx.replicas
    compiled.seed, compiled.random_ops, compiled.batch_statistics = seed, random_ops, batch_statistics
    compiled.moe_layers = moe_layers
    return compiled


_BATCH_STATISTICS = ("torch.aten._native_batch_norm_legit_functional", "torch.aten._native_batch_norm_legit",
                     "torch.aten._native_batch_norm_legit.no_stats")
"""BatchNorm in training mode, with and without running statistics, as capture writes it."""


def assemble_pipeline(ctx: StrategyContext) -> list[ModulePass]:
    """The compile pipeline for `ctx`: every directive's fragments and piperc's own, ordered.

    A fragment runs after every fragment that provides a fact it requires.
    Among fragments free to run, the one listed first runs first: piperc's
    front fragments (fold-detach, mesh), the directives' in strategy order
    (the optimizer last), then piperc's back fragments (microbatch, lowering).
    Raises StrategyError naming the directive whose fragment requires a fact
    no fragment provides, or the directives whose requirements form a cycle.
    """
    contributed = [(str(d), f) for d in ctx.directives for f in d.fragments(ctx)]
    provided = {fact for _, f in contributed for fact in f.provides}
    fragments = [*_own(_front_fragments(ctx, provided)), *contributed, *_own(_back_fragments(ctx))]
    return [p for f in _order(fragments) for p in f.passes]


def _front_fragments(ctx: StrategyContext, provided: set[str]) -> list[Fragment]:
    """fold-detach and the mesh (which leaves every value replicated: the default layouts);
    without a pipeline directive, one stage on a size-1 pp axis, once the layouts are final."""
    axes = dict(ctx.mesh.axes)
    single_stage = "stages" not in provided
    if single_stage and _PP not in axes:
        axes = {_PP: 1, **axes}
    front = [
        Fragment((FoldDetachPass(),)),
        Fragment((MeshPass(shape=",".join(f"{a}={s}" for a, s in axes.items())),), provides=("mesh", "layouts")),
    ]
    if single_stage:
        front += [
            Fragment((PipelineSplitPass(stages=1), OutlineStagesPass()), requires=("layouts",), provides=("stages",)),
            schedule_fragment({"kind": "gpipe"}, _PP, "schedule"),
        ]
    return front


def _back_fragments(ctx: StrategyContext) -> list[Fragment]:
    """Microbatching for the strategy's batch split (and the buffers the forward updates), then
    lowering to one program per rank."""
    return [
        Fragment((MicrobatchPass(count=ctx.microbatches, replicas=ctx.replicas,
                                 per_update=0 if ctx.microbatches_per_update == ctx.microbatches
                                 else ctx.microbatches_per_update,
                                 directive=str(ctx.batch_directive or "microbatch")), RunningBuffersPass()),
                 requires=("stages",), provides=("microbatches",)),
        Fragment((LowerReshardPass(), BucketCollectivesPass(), LowerToExecPass(device=ctx.device),
                  LowerCollectivesPass(), VerifyExecPass()),
                 requires=("mesh", "update", "microbatches", "schedule"), provides=("exec",)),
    ]


def _own(fragments: list[Fragment]) -> list[tuple[str, Fragment]]:
    """piperc's own fragments, named in errors by their passes."""
    return [("piperc's " + ", ".join(p.name for p in f.passes), f) for f in fragments]


def _order(fragments: list[tuple[str, Fragment]]) -> list[Fragment]:
    """A stable topological order of `fragments` (owner, fragment) by their facts."""
    providers: dict[str, list[int]] = {}
    for i, (_, f) in enumerate(fragments):
        for fact in f.provides:
            providers.setdefault(fact, []).append(i)
    after: list[set[int]] = []
    for i, (owner, f) in enumerate(fragments):
        for fact in f.requires:
            if fact not in providers:
                known = ", ".join(sorted(providers))
                raise StrategyError(f"{owner}: its passes require '{fact}', which no directive provides "
                                    f"(provided: {known})")
        after.append({j for fact in f.requires for j in providers[fact] if j != i})
    done: list[int] = []
    while len(done) < len(fragments):
        ready = next((i for i in range(len(fragments)) if i not in done and after[i] <= set(done)), None)
        if ready is None:
            raise StrategyError(_cycle(fragments, after, done))
        done.append(ready)
    return [fragments[i][1] for i in done]


def _cycle(fragments: list[tuple[str, Fragment]], after: list[set[int]], done: list[int]) -> str:
    """Names the fragments of one requirement cycle among those not yet ordered."""
    path = [next(i for i in range(len(fragments)) if i not in done)]
    while True:
        nxt = min(after[path[-1]] - set(done))
        if nxt in path:
            path = path[path.index(nxt):] + [nxt]
            break
        path.append(nxt)
    steps = []
    for i, j in itertools.pairwise(path):
        facts = sorted(set(fragments[i][1].requires) & set(fragments[j][1].provides))
        steps.append(f"{fragments[i][0]} requires '{facts[0]}' from {fragments[j][0]}")
    return "the strategy's passes cannot be ordered, their requirements form a cycle: " + "; ".join(steps)


def _lower(captured: Captured, passes: list[ModulePass], options: PipelineOptions | None,
           keep_ir: bool, signature: Sequence[tuple[tuple[int, ...], str]] = (), seed: int = 0) -> Compiled:
    aliases = {}
    for attrs in main_function(captured.module).arg_attrs.data:
        if ARG_ALIASES in attrs.data:
            canonical = attrs.data["piperc.param"].data
            for alias in attrs.data[ARG_ALIASES].data:
                aliases[alias.data] = canonical
    ir_after = [("captured", str(captured))] if keep_ir else []
    options = dataclasses.replace(options or PipelineOptions())
    sharding: list[str] = []
    user_after = options.after_pass

    def after_pass(p: ModulePass, m: ModuleOp) -> None:
        if keep_ir:
            ir_after.append((p.name, print_ir(m)))
        if isinstance(p, PropagateShardingPass):
            sharding.extend(sharding_report(m))
        if user_after is not None:
            user_after(p, m)

    options.after_pass = after_pass
    try:
        run_pipeline(captured.module, captured.ctx, passes, options)
    except PassError as e:
        if isinstance(e.__cause__, StrategyError):
            raise e.__cause__ from e.__cause__.__cause__
        raise
    module = captured.module
    files = codegen.generate(module, optimizer_state(module), signature, aliases, seed)
    kind = next((p.kind for p in passes if isinstance(p, SchedulePass)), "user")
    sched = schedule_data(find_schedule(module), name=kind)
    initial = {k: v.detach().clone() for k, v in {**captured.params, **captured.buffers}.items()}
    compiled = Compiled(files, ir_after, initial, aliases, sched, pipeline_text(passes), module, sharding)
    compiled.asynchronous = next((p.plan for p in passes if isinstance(p, ExpandAsyncPass)), None)
    return compiled


def launch(compiled: Compiled, batches: Sequence[Sequence[torch.Tensor]], *, progress: bool = False,
           timeout: float | None = None, trace: str | None = None, checkpoint_dir: str | None = None,
           checkpoint_every: int = 0, resume: bool = False):
    """Trains with `compiled` on local processes, one global batch per step.

    Returns a result with `.losses` (one float per step), `.state_dict`
    (the final full parameters, named as in the model's state_dict) and
    `.peak_memory` (per rank, the measured peak memory by item, as
    `compiled.memory()` predicts it). With `trace="dir"`, each rank writes its
    timeline to `dir/rank<r>.json` and all ranks' to `dir/trace.json`
    (Chrome trace format: open in ui.perfetto.dev; `piperc.runtime.trace`).

    With `checkpoint_dir=` and `checkpoint_every=N`, the ranks write a checkpoint (DCP format)
    after every N steps; `resume=True` continues from the latest one there, written under
    this strategy or another, skipping the batches it trained on (`launch_dir`;
    `piperc.checkpoint.to_state_dict(dir)` reads one back as a plain state_dict).
    """
    from piperc.runtime.launch import launch_dir

    if not isinstance(compiled, Compiled):
        raise TypeError(f"launch: compiled must be what piperc.compile returns, got {type(compiled).__name__}")
    if not isinstance(batches, list | tuple) or not batches:
        raise ValueError(f"launch: batches must be a non-empty list of global batches, one per step, got "
                         f"{batches!r:.80}")
    if all(isinstance(b, torch.Tensor) for b in batches):
        raise ValueError("launch: batches holds tensors, not batches: each batch is a tuple of tensors, one per "
                         "model input; to train one step on (x, y), pass [(x, y)]")
    with tempfile.TemporaryDirectory(prefix="piperc-") as path:
        compiled.save(path)
        result = launch_dir(path, list(batches), timeout=timeout, progress=progress, trace=trace,
                            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume)
    return result

