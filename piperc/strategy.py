"""The strategy vocabulary users write: a mesh, directives and an optimizer.

    mesh=piperc.Mesh(pp=2, dp=2)
    strategy=[piperc.pipeline(axis="pp", stages=2, microbatches=4, schedule="1f1b"),
              piperc.data_parallel(axis="dp")]
    optimizer=piperc.optim.AdamW(lr=1e-3, weight_decay=0.1)

Each directive (a `Directive`) contributes its passes as `Fragment`s
(`Directive.fragments`): passes that run together, with the facts they need
(`requires`) and the facts they establish (`provides`). `piperc.compile`
orders the fragments of all directives and its own by those facts, so a new
strategy is a new directive class and its passes. A directive's `str()` is
how errors quote it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence

from xdsl.passes import ModulePass

from piperc import asynchronous, schedules
from piperc.errors import StrategyError
from piperc.nn import MOE_REGION
from piperc.passes.data_parallel import DataParallelPass
from piperc.passes.expand_async import ExpandAsyncPass
from piperc.passes.expand_schedule import ExpandSchedulePass
from piperc.passes.expert_parallel import ExpertParallelPass
from piperc.passes.localise_shapes import LocaliseShapesPass
from piperc.passes.optimizer import OptimizerPass
from piperc.passes.outline_stages import OutlineStagesPass
from piperc.passes.pipeline_split import PipelineSplitPass
from piperc.passes.propagate_sharding import PropagateShardingPass
from piperc.passes.schedule import SchedulePass, parse_table, table_text
from piperc.passes.sequence_parallel import BALANCES, METHODS, CheckZigzagPass, SequenceParallelPass
from piperc.passes.tensor_parallel import Placement, TensorParallelPass, plan_text
from piperc.passes.unflatten_matmul import UnflattenMatmulPass
from piperc.passes.zero import ZeroPass


class Mesh:
    """A device mesh with named axes: `Mesh(pp=2, dp=2)` is 4 ranks, pp slowest."""

    def __init__(self, **axes: int):
        if not axes:
            raise StrategyError("Mesh() needs at least one axis, e.g. Mesh(dp=2)")
        for name, size in axes.items():
            if not _is_count(size):
                raise StrategyError(f"Mesh: axis '{name}' must have an int size >= 1, got {size!r}")
        self.axes: dict[str, int] = dict(axes)

    @property
    def size(self) -> int:
        """The number of ranks."""
        n = 1
        for s in self.axes.values():
            n *= s
        return n

    def __repr__(self) -> str:
        return "Mesh(" + ", ".join(f"{a}={s}" for a, s in self.axes.items()) + ")"


@dataclasses.dataclass(frozen=True)
class Fragment:
    """Passes that run together, in this order, as one step of the compile pipeline.

    `requires` names the facts the passes need established first: the fragment
    runs after every fragment that `provides` one of them. The facts piperc's
    own fragments and directives use:

      mesh          `par.mesh @mesh` declares the mesh (piperc's `mesh`)
      layouts       every value of the captured `@main` has its final layout and
                    per-device type (piperc's `mesh` leaves all of them
                    replicated; tensor and expert parallelism's passes shard them); the
                    stage fragments require it, so strategies that lay out the
                    whole graph run before it is split into stages
      tensor-layouts  tensor parallelism's layouts are written (expert parallelism,
                    which keeps the MoE layers whole around them, runs after)
      stages        `@s<i>_F` / `@s<i>_B` stage functions (a pipeline's
                    pipeline-split, outline-stages)
      update        `@s<i>_update` per stage (the optimizer)
      microbatches  scaled loss and accumulate functions (piperc's `microbatch`)
      schedule      `par.schedule @schedule` and a `par.program` per device
                    (a pipeline's schedule, expand-schedule)
      exec          one verified `exec.program` per rank (piperc's lowering)

    A new fact is any new name a fragment provides.
    """

    passes: tuple[ModulePass, ...]
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class StrategyContext:
    """What a directive sees when it checks itself and contributes its passes."""

    mesh: Mesh
    directives: tuple[Directive, ...]
    """The whole strategy, the optimizer last."""
    device: str

    @property
    def replicas(self) -> int:
        """How many model replicas share one global batch (product over the directives)."""
        n = 1
        for d in self.directives:
            n *= d.batch_split(self)[0]
        return n

    @property
    def microbatches(self) -> int:
        """How many microbatches each replica's share of the batch is cut into."""
        n = 1
        for d in self.directives:
            n *= d.batch_split(self)[1]
        return n

    @property
    def microbatches_per_update(self) -> int:
        """How many microbatches' gradients one update applies: all of a step's (synchronous
        schedules), or fewer under an asynchronous pipeline (`Directive.microbatches_per_update`)."""
        asked = [n for d in self.directives if (n := d.microbatches_per_update(self)) is not None]
        return asked[0] if asked else self.microbatches

    @property
    def batch_directive(self) -> Directive | None:
        """The directive errors about the batch split quote: the first that cuts
        microbatches, else the first that replicates."""
        splits = [(d, d.batch_split(self)) for d in self.directives]
        cutting = [d for d, (_, microbatches) in splits if microbatches > 1]
        replicating = [d for d, (replicas, _) in splits if replicas > 1]
        return next(iter(cutting + replicating), None)


class Directive(abc.ABC):
    """One entry of a strategy: it checks itself against the mesh and contributes fragments.

    Subclass it (a frozen dataclass reads best) to add a strategy: `fragments`
    returns its passes and their ordering facts, `check` rejects what cannot
    apply with a StrategyError quoting `str(self)`.
    """

    @abc.abstractmethod
    def fragments(self, ctx: StrategyContext) -> list[Fragment]:
        """The passes this directive adds to the pipeline, with their ordering facts."""

    def check(self, ctx: StrategyContext) -> None:  # noqa: B027 - an optional hook; most directives need none
        """Raises StrategyError if the directive cannot apply to `ctx.mesh` or next to the others.

        Its mesh axes are checked before (they exist and no other directive uses them).
        """

    def mesh_axes(self) -> tuple[str, ...]:
        """The mesh axes this directive uses: each must exist, and no other directive may use it."""
        return ()

    def axes_in(self, ctx: StrategyContext) -> tuple[str, ...]:
        """The mesh axes this directive uses within the whole strategy `ctx`: `mesh_axes()`,
        and axes it shares with another directive or takes only in some strategies (checked
        by `check`)."""
        return self.mesh_axes()

    def batch_split(self, ctx: StrategyContext) -> tuple[int, int]:
        """(replicas, microbatches): how this directive cuts each global batch (`ctx` is the
        whole strategy on its mesh)."""
        return 1, 1

    def microbatches_per_update(self, ctx: StrategyContext) -> int | None:
        """How many microbatches one update applies, if this directive decides it (an
        asynchronous pipeline: 1 for PipeDream); None leaves it to the step (all of them)."""
        return None


def schedule_fragment(options: dict[str, str], axis: str, directive: str) -> Fragment:
    """The passes that build a pipeline schedule along `axis` (SchedulePass `options`)
    and expand it into one program of tasks and transfers per device."""
    return Fragment(
        (SchedulePass(**options, axis=axis, directive=directive), ExpandSchedulePass(directive=directive)),
        requires=("mesh", "stages", "microbatches"),
        provides=("schedule",),
    )


@dataclasses.dataclass(frozen=True)
class Pipeline(Directive):
    """Pipeline parallelism: `stages` stages along `axis`, `microbatches` per step. `stages` is a
    multiple of the axis size: one stage per device, or several (`schedule="interleaved"`)."""

    axis: str
    stages: int
    microbatches: int
    schedule: str | Sequence[Sequence[str]] | Callable[[int, int, int], object] = "1f1b"
    split_at: tuple[str, ...] = ()
    region: str = ""

    def __str__(self) -> str:
        extra = f", split_at={list(self.split_at)}" if self.split_at else ""
        extra += f", region={self.region!r}" if self.region else ""
        if callable(self.schedule):
            schedule = getattr(self.schedule, "__name__", "<function>")
        else:
            schedule = self.schedule if isinstance(self.schedule, str) else "<table>"
        return (f"pipeline(axis={self.axis!r}, stages={self.stages}, "
                f"microbatches={self.microbatches}, schedule={schedule!r}{extra})")

    def schedule_options(self, devices: int | None = None) -> dict[str, str | int]:
        """The schedule pass's options for this directive. A schedule function is called with
        (stages, microbatches, `devices`: the pipeline axis size) for its rows (and, from a
        `Schedule` with replicas of the stages, their count: `replicas`)."""
        if callable(self.schedule):
            return {"kind": "user", **self._function_table(devices)}
        if isinstance(self.schedule, str):
            if "\n" not in self.schedule and " " not in self.schedule.strip():
                return {"kind": self.schedule}
            rows = [r.split(":", 1)[-1] for r in self.schedule.strip().splitlines() if r.strip()]
            return {"kind": "user", "table": ";".join(" ".join(r.replace(",", " ").split()) for r in rows)}
        return {"kind": "user", "table": ";".join(" ".join(str(a) for a in row) for row in self.schedule)}

    def _function_table(self, devices: int | None) -> dict[str, str | int]:
        """The schedule a function returns (a `piperc.schedules.Schedule`, its overlap groups
        and replicas included, or one list of actions per device) as the schedule pass's
        `table` (and `replicas`) options; StrategyError naming the function when it fails or
        returns something else."""
        name = getattr(self.schedule, "__name__", "the schedule function")
        try:
            made = self.schedule(self.stages, self.microbatches, devices if devices is not None else self.stages)
        except Exception as e:  # the user's code: any failure is theirs to see, named
            raise StrategyError(f"{self}: {name}({self.stages}, {self.microbatches}, {devices}) raised "
                                f"{type(e).__name__}: {e}") from e
        if isinstance(made, schedules.Schedule):
            try:
                table = table_text(made)
            except schedules.ScheduleError as e:
                raise StrategyError(f"{self}: {e}") from None
            return {"table": table, **({"replicas": made.replicas} if made.replicas > 1 else {})}
        if not isinstance(made, list | tuple) or not all(isinstance(r, list | tuple) for r in made):
            raise StrategyError(f"{self}: {name} must return a piperc.schedules.Schedule or one list of "
                                f"actions per device, got {type(made).__name__}")
        return {"table": ";".join(" ".join(str(a) for a in row) for row in made)}

    def mesh_axes(self) -> tuple[str, ...]:
        """The pipeline axis: one stage per device along it."""
        return (self.axis,)

    def check(self, ctx: StrategyContext) -> None:
        """One pipeline per strategy, the same number of stages on every device of its axis (a
        built-in schedule must accept the sizes), at least one microbatch, a built-in
        schedule's name or a table, split points and region as strs."""
        if next(d for d in ctx.directives if isinstance(d, Pipeline)) is not self:
            raise StrategyError(f"{self}: only one pipeline directive is allowed")
        for name in ("stages", "microbatches"):
            if not _is_count(getattr(self, name)):
                raise StrategyError(f"{self}: {name} must be an int >= 1, got {getattr(self, name)!r}")
        if not all(isinstance(s, str) for s in self.split_at) or not isinstance(self.region, str):
            raise StrategyError(f"{self}: split_at must be module paths (strs, e.g. ['blocks.2']) and "
                                f"region a str, got split_at={list(self.split_at)!r}, region={self.region!r}")
        table = isinstance(self.schedule, list | tuple) and all(isinstance(r, list | tuple) for r in self.schedule)
        if not isinstance(self.schedule, str) and not table and not callable(self.schedule):
            raise StrategyError(f"{self}: schedule must be a name ({', '.join(map(repr, schedules.BUILTIN_SCHEDULES))}) or a table, one row of actions "
                                f"per device ([['0F0', '0B0'], ['1F0', '1B0']]), got {self.schedule!r}")
        size = ctx.mesh.axes[self.axis]
        options = self.schedule_options(size)
        kind = options["kind"]
        if callable(self.schedule):  # checked here, naming the first offending action
            try:
                schedules.validate(parse_table(options["table"], self.stages, self.microbatches,
                                               name=getattr(self.schedule, "__name__", "user"),
                                               replicas=options.get("replicas", 1)))
            except schedules.ScheduleError as e:
                raise StrategyError(f"{self}: {e}") from None
        if kind in asynchronous.PLANS:
            if self.stages != size:
                raise StrategyError(f"{self}: schedule {kind!r} runs one stage per device: stages must equal "
                                    f"the size of axis '{self.axis}' ({size})")
            if self.microbatches < self.stages - 1:
                raise StrategyError(f"{self}: schedule {kind!r} needs microbatches >= stages - 1 "
                                    f"({self.stages - 1}): the first stage's warm-up forwards must fit in the "
                                    "first step")
            return
        if kind != "user" and kind not in schedules.BUILTIN_SCHEDULES:
            known = ", ".join(sorted(schedules.BUILTIN_SCHEDULES))
            raise StrategyError(f"{self}: unknown schedule {kind!r}; use a built-in ({known}) or a table, "
                                "one row of actions per device")
        if self.stages % size:
            raise StrategyError(
                f"{self}: {self.stages} stages on axis '{self.axis}' of size {size}; each device holds the "
                f"same number of stages, so stages must be a multiple of {size} ({size} for one stage per "
                f"device, {2 * size} for two with schedule='interleaved')"
            )
        if kind != "user":
            try:
                schedules.builtin(kind, self.stages, self.microbatches, num_devices=size)
            except schedules.ScheduleError as e:
                raise StrategyError(f"{self}: {e}") from None

    def batch_split(self, ctx: StrategyContext) -> tuple[int, int]:
        """Each replica's batch is cut into `microbatches`."""
        return 1, self.microbatches

    def microbatches_per_update(self, ctx: StrategyContext) -> int | None:
        """PipeDream updates after every microbatch, 2BW after every `microbatches`."""
        kind = self.schedule if isinstance(self.schedule, str) else None
        return {"pipedream": 1, "pipedream-2bw": self.microbatches}.get(kind)

    def fragments(self, ctx: StrategyContext) -> list[Fragment]:
        """pipeline-split and outline-stages (the stages; the weight gradients apart when the
        schedule runs W actions), then the schedule."""
        options = self.schedule_options(ctx.mesh.axes[self.axis])
        stages = Fragment(
            (PipelineSplitPass(stages=self.stages, split_at=self.split_at, region=self.region,
                               directive=str(self)),
             OutlineStagesPass(split_weights=_splits_weights(options), directive=str(self))),
            requires=("layouts",),
            provides=("stages",),
        )
        if options["kind"] in asynchronous.PLANS:  # 1F1B's rows, expanded without a flush
            return [stages, Fragment(
                (SchedulePass(kind="1f1b", axis=self.axis, directive=str(self)),
                 ExpandAsyncPass(plan=options["kind"], directive=str(self))),
                requires=("mesh", "stages", "microbatches"), provides=("schedule",))]
        return [stages, schedule_fragment(options, self.axis, str(self))]


def _splits_weights(options: dict[str, str]) -> bool:
    """Whether the schedule pass `options` run weight gradients as actions of their own (W)."""
    if options["kind"] == "user":
        return any("W" in action for action in options["table"].split())
    return options["kind"] in schedules.SPLIT_BACKWARD


@dataclasses.dataclass(frozen=True)
class DataParallel(Directive):
    """Data parallelism: replicate along `axis`, all-reduce gradients in buckets; with
    `zero` 1, 2 or 3, shard optimizer state, then gradients, then parameters over `axis`."""

    axis: str = "dp"
    bucket_mb: float = 25.0
    zero: int = 0
    reshard_after_forward: bool = True

    def __str__(self) -> str:
        zero = f", zero={self.zero}" if self.zero else ""
        keep = "" if self.reshard_after_forward else ", reshard_after_forward=False"
        return f"data_parallel(axis={self.axis!r}{zero}{keep})"

    def check(self, ctx: StrategyContext) -> None:
        """`zero` is 0, 1, 2 or 3, `bucket_mb` a positive number, `reshard_after_forward` a bool."""
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, int | float) or not self.bucket_mb > 0:
            raise StrategyError(f"{self}: bucket_mb must be a number of MiB > 0, got {self.bucket_mb!r}")
        if not isinstance(self.reshard_after_forward, bool):
            raise StrategyError(f"{self}: reshard_after_forward must be True or False, got "
                                f"{self.reshard_after_forward!r}")
        if isinstance(self.zero, bool) or self.zero not in (0, 1, 2, 3):
            raise StrategyError(f"{self}: zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if not self.reshard_after_forward and self.zero != 3:
            raise StrategyError(f"{self}: reshard_after_forward applies to zero=3 (sharded parameters) only")

    def mesh_axes(self) -> tuple[str, ...]:
        """The data-parallel axis: one replica per device along it."""
        return (self.axis,)

    def batch_split(self, ctx: StrategyContext) -> tuple[int, int]:
        """One replica per device along `axis`."""
        return ctx.mesh.axes[self.axis], 1

    def fragments(self, ctx: StrategyContext) -> list[Fragment]:
        """data-parallel: bucketed gradient all-reduces in every stage's update; then zero."""
        passes: tuple[ModulePass, ...] = (
            DataParallelPass(axis=self.axis, bucket_mb=self.bucket_mb, directive=str(self)),)
        if self.zero:
            passes += (ZeroPass(stage=self.zero, axis=self.axis, reshard_after_forward=self.reshard_after_forward,
                                directive=str(self)),)
        return [Fragment(passes, requires=("mesh", "update"))]


@dataclasses.dataclass(frozen=True)
class TensorParallel(Directive):
    """Tensor parallelism along `axis`: parameters laid out as `plan` says, every other value's
    layout propagated from them, shapes made per-device (see `tensor_parallel`)."""

    axis: str = "tp"
    plan: tuple[tuple[str, Placement], ...] = ()
    sequence_parallel: bool = False
    strict: bool = False

    def __str__(self) -> str:
        plan = ", ".join(f"{glob!r}: {placement}" for glob, placement in self.plan)
        extra = ", sequence_parallel=True" if self.sequence_parallel else ""
        extra += ", strict=True" if self.strict else ""
        return f"tensor_parallel(axis={self.axis!r}, plan={{{plan}}}{extra})"

    def mesh_axes(self) -> tuple[str, ...]:
        """The tensor-parallel axis: the devices along it share each sharded parameter."""
        return (self.axis,)

    def check(self, ctx: StrategyContext) -> None:
        """A non-empty plan of placements; `sequence_parallel` and `strict` are bools."""
        for name in ("sequence_parallel", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise StrategyError(f"{self}: {name} must be True or False, got {getattr(self, name)!r}")
        if not self.plan:
            raise StrategyError(f"{self}: the plan is empty; map parameter globs to piperc.Shard(dim) or "
                                "piperc.Replicate(), e.g. {'blocks.*.mlp.fc.weight': piperc.Shard(0)}")
        try:
            plan_text(dict(self.plan))
        except StrategyError as e:
            raise StrategyError(f"{self}: {e}") from None

    def fragments(self, ctx: StrategyContext) -> list[Fragment]:
        """tensor-parallel (seed the plan), propagate-sharding over the axis, localise-shapes:
        on the captured step, before anything splits it into stages. Next to sequence
        parallelism, after its seeds, and over both axes (heads split by tp, the sequence by
        sp)."""
        sequence = next((d for d in ctx.directives if isinstance(d, SequenceParallel)), None)
        axes = (self.axis,) if sequence is None else (self.axis, sequence.axis)
        return [Fragment(
            (TensorParallelPass(axis=self.axis, plan=plan_text(dict(self.plan)),
                                sequence_parallel=self.sequence_parallel, directive=str(self)),
             PropagateShardingPass(mesh_axes=axes, strict=self.strict),
             LocaliseShapesPass(mesh_axes=axes),
             *(() if sequence is None else (sequence.check_zigzag(),))),
            requires=("mesh",) if sequence is None else ("mesh", SEQUENCE_SEEDS),
            provides=("layouts", "tensor-layouts"))]


@dataclasses.dataclass(frozen=True)
class ExpertParallel(Directive):
    """Expert parallelism over `axis`: each MoE layer's experts sharded along it, its
    dispatched tokens sent to their experts' rank and back (see `expert_parallel`). The axis
    is a data-parallel one, or an expert axis of its own that also splits the batch."""

    axis: str = "dp"

    def __str__(self) -> str:
        return f"expert_parallel(axis={self.axis!r})"

    def data(self, ctx: StrategyContext) -> DataParallel | None:
        """The data_parallel directive on the same axis; None for an expert axis of its own."""
        return next((d for d in ctx.directives if isinstance(d, DataParallel) and d.axis == self.axis), None)

    def check(self, ctx: StrategyContext) -> None:
        """One per strategy; on the axis of a data_parallel directive without ZeRO (which would
        shard the experts over that axis a second time), or on an axis no other directive uses
        (ZeRO on another data-parallel axis then shards the experts' replicas over it too)."""
        if next(d for d in ctx.directives if isinstance(d, ExpertParallel)) is not self:
            raise StrategyError(f"{self}: only one expert_parallel directive is allowed")
        if not isinstance(self.axis, str) or self.axis not in ctx.mesh.axes:
            raise StrategyError(f"{self}: axis {self.axis!r} is not in {ctx.mesh!r}")
        data = self.data(ctx)
        if data is not None and data.zero:
            raise StrategyError(f"{self}: next to {data}: ZeRO would shard the experts' parameters a second "
                                "time over the same axis; use data_parallel without zero")
        if data is None:
            other = next((d for d in ctx.directives if self.axis in d.mesh_axes()), None)
            if other is not None:
                raise StrategyError(f"{self}: axis '{self.axis}' is already used by {other}; the experts go over "
                                    "a data-parallel axis or an axis of their own")

    def axes_in(self, ctx: StrategyContext) -> tuple[str, ...]:
        """Its axis, shared with a data_parallel directive or its own."""
        return (self.axis,)

    def batch_split(self, ctx: StrategyContext) -> tuple[int, int]:
        """An expert axis of its own splits the batch like a data-parallel one: one replica
        of the dense part per device along it."""
        return (1, 1) if self.data(ctx) is not None else (ctx.mesh.axes[self.axis], 1)

    def fragments(self, ctx: StrategyContext) -> list[Fragment]:
        """expert-parallel on the captured step, before anything splits it into stages; on an
        axis of its own, also data-parallel over it (the batch split, the dense gradients
        summed; with another data-parallel axis, once over both). After tensor parallelism,
        which lays out the dense part around the layers."""
        tensor = any(isinstance(d, TensorParallel) for d in ctx.directives)
        fragments = [Fragment((ExpertParallelPass(axis=self.axis, region=MOE_REGION, directive=str(self)),),
                              requires=("mesh", "tensor-layouts") if tensor else ("mesh",), provides=("layouts",))]
        if self.data(ctx) is None:
            fragments.append(Fragment((DataParallelPass(axis=self.axis, directive=str(self)),),
                                      requires=("mesh", "update")))
        return fragments


def expert_parallel(axis: str = "dp") -> ExpertParallel:
    """Expert-parallel directive: each mixture-of-experts layer's experts are sharded over the
    ranks of `axis`.

    `axis` is either a data-parallel axis (`piperc.data_parallel(axis=...)` in the same
    strategy), as DeepSpeed-MoE and torchtitan shard experts over data-parallel ranks, or an
    expert axis of its own (`Mesh(dp=2, ep=2)` with `expert_parallel(axis="ep")`): that axis
    then splits the batch too (the dense part is data-parallel over dp x ep), each expert is
    replicated along the other data-parallel axes, and its gradient is summed over them only.

    A layer is `piperc.nn.MoE` or any module that follows its routing contract. Each of the n
    ranks of `axis` holds E/n of a layer's E experts and their optimizer state. The layer's
    dispatched buffer `[E, C, d]` of each rank's tokens goes to the experts' ranks by an
    all-to-all, the experts run on every rank's tokens routed to them, and an all-to-all
    brings their outputs back; the backward mirrors both. Expert gradients are not summed
    over `axis` (each is whole on the ranks holding the expert); dense gradients are summed
    over every data-parallel axis. Capacity and the load-balancing loss stay per (microbatch,
    data rank), so training equals one device running each batch in the same slices.
    """
    return ExpertParallel(axis)


SEQUENCE_SEEDS = "sequence-seeds"
"""Fact: sequence parallelism's seeds are written (next to tensor parallelism, whose propagation
then lays out both axes at once)."""


@dataclasses.dataclass(frozen=True)
class SequenceParallel(Directive):
    """Sequence parallelism along `axis`: the model's sequences split over it, attention by
    `method` (see `sequence_parallel`)."""

    axis: str = "sp"
    method: str = "ulysses"
    seq_dim: int = 1
    balance: str = "auto"

    def __str__(self) -> str:
        dim = "" if self.seq_dim == 1 else f", seq_dim={self.seq_dim}"
        balance = "" if self.balance == "auto" else f", balance={self.balance!r}"
        return f"sequence_parallel(axis={self.axis!r}, method={self.method!r}{dim}{balance})"

    def mesh_axes(self) -> tuple[str, ...]:
        """The sequence axis: each device holds a piece of every sequence."""
        return (self.axis,)

    def check(self, ctx: StrategyContext) -> None:
        """A method that is built and an int seq_dim >= 1."""
        if self.method not in METHODS:
            raise StrategyError(f"{self}: unknown method {self.method!r}; use one of "
                                f"{', '.join(map(repr, METHODS))}")
        if isinstance(self.seq_dim, bool) or not isinstance(self.seq_dim, int) or self.seq_dim < 1:
            raise StrategyError(f"{self}: seq_dim must be an int >= 1 (the inputs' sequence dimension), got "
                                f"{self.seq_dim!r}")
        if self.balance not in BALANCES:
            raise StrategyError(f"{self}: unknown balance {self.balance!r}; use one of "
                                f"{', '.join(map(repr, BALANCES))}")

    def fragments(self, ctx: StrategyContext) -> list[Fragment]:
        """unflatten-matmul, sequence-parallel (the seeds and Ulysses' casts), propagate-sharding,
        localise-shapes and check-zigzag over the axis: on the captured step, before it is split
        into stages. Next to tensor parallelism, only the seeds: its propagation then lays out
        both axes (and runs check-zigzag after)."""
        seeds = (UnflattenMatmulPass(),
                 SequenceParallelPass(axis=self.axis, seq_dim=self.seq_dim, method=self.method,
                                      balance=self.balance, directive=str(self)))
        if any(isinstance(d, TensorParallel) for d in ctx.directives):  # one propagation over both axes
            return [Fragment(seeds, requires=("mesh",), provides=(SEQUENCE_SEEDS,))]
        return [Fragment(
            (*seeds, PropagateShardingPass(mesh_axes=(self.axis,)), LocaliseShapesPass(mesh_axes=(self.axis,)),
             self.check_zigzag()),
            requires=("mesh",), provides=("layouts",))]

    def check_zigzag(self) -> CheckZigzagPass:
        """check-zigzag, to run after the propagation that lays out the axis."""
        return CheckZigzagPass(axis=self.axis, balance=self.balance, directive=str(self))


def sequence_parallel(axis: str = "sp", method: str = "ulysses", seq_dim: int = 1,
                      balance: str = "auto") -> SequenceParallel:
    """Sequence-parallel directive: every model input's dimension `seq_dim` (tokens, targets,
    positions, document ids) is split over the devices of `axis`, and propagation carries the
    split through the position-wise ops; the loss and the parameters' gradients are summed
    over the axis.

    `method="ulysses"` (DeepSpeed-Ulysses): each `F.scaled_dot_product_attention`, forward and
    backward, moves its q, k, v from sequence split to heads split by an all-to-all, runs the
    whole sequence's attention for its heads, and moves back. The heads must divide over the
    axis. `method="ring"`: queries, keys and values stay sequence split, and each attention's
    keys and values travel around the axis (forward, and with their gradients in the backward),
    partial results merged by log-sum-exp; blocks a mask hides are skipped, and a block goes
    on only while a later device needs it. `method="auto"`: each attention chooses per batch
    between ring and Ulysses (all_to_alls inside the op), whichever sends fewer bytes from the
    busiest device given the batch's documents.

    `balance` says how the sequence is cut. `"contiguous"`: device r holds the r-th of W equal
    pieces. `"zigzag"` (head-tail): the sequence is cut into 2W chunks and device r holds chunks
    r and 2W-1-r, so that under a causal mask every device does the same attention work (the
    length must divide into 2W chunks). `"auto"` (the default): zigzag for ring attention when
    every attention is causal without a mask, contiguous otherwise (a document mask's short
    documents then stay within one device, and need no traffic).
    """
    return SequenceParallel(axis, method, seq_dim, balance)


def tensor_parallel(axis: str = "tp", plan: Mapping[str, Placement] | None = None,
                    sequence_parallel: bool = False, strict: bool = False) -> TensorParallel:
    """Tensor-parallel directive: `plan` maps globs over parameter names (as in
    `model.state_dict()`) to `piperc.Shard(dim)` or `piperc.Replicate()` along `axis`.

    Every other value's layout follows by sharding propagation (`strict=True` makes an op
    without a sharding rule an error instead of computing it replicated), with reshards
    where layouts conflict; each device then holds and computes its pieces. The Megatron
    plan shards a layer's weight `[out, in]` as Shard(0) and the next one's as Shard(1).

    `sequence_parallel=True` adds Megatron's sequence parallelism to the same plan: the
    activations between a row-parallel matmul and the next column-parallel one (residual
    stream, layer norms, residual adds) are split along the sequence over `axis`, so the
    row-parallel pending sum is reduce-scattered onto the sequence and the column-parallel
    input all-gathered along it (the backward mirrors both), and layer-norm weight
    gradients are summed over `axis`. The sequence is dimension 1 of the model's
    `[batch, sequence, ...]` inputs and what propagation traces back to it; its length must
    be a multiple of the axis size (a StrategyError naming the input otherwise).
    """
    if plan is not None and not isinstance(plan, Mapping):
        raise StrategyError(f"tensor_parallel(axis={axis!r}): plan must map parameter globs to placements, "
                            f"e.g. {{'blocks.*.mlp.fc.weight': piperc.Shard(0)}}, got {plan!r}")
    return TensorParallel(axis, tuple((plan or {}).items()), sequence_parallel, strict)


def pipeline(axis: str = "pp", stages: int = 2, microbatches: int = 1,
             schedule: str | Sequence[Sequence[str]] | Callable[[int, int, int], object] = "1f1b",
             split_at: Sequence[str] = (), region: str = "") -> Pipeline:
    """Pipeline directive.

    `schedule="pipedream"` and `"pipedream-2bw"` are asynchronous (never flushed): each stage
    updates after every backward (2BW: after every `microbatches`, with their mean) and a
    microbatch's backward reads the weights its forward read (weight stashing); they train as
    `piperc.reference.stale_training` with `piperc.asynchronous.plan`, not as one device.
    They need one stage per device and `microbatches` >= stages - 1; the run ends with
    `drain()` (`piperc.launch` and the worker call it).

    Stages come from `split_at` (module paths where stages 1..N-1 begin), from
    `piperc.annotate(region, i)` regions, or, with `stages` alone, from
    balancing the blocks by cost. `schedule` is "gpipe", "1f1b", "interleaved"
    (several stages per device: `stages` = v x the axis size, stage s on device
    s mod the axis size, torch's Interleaved1F1B order), "zb-h1" (zero bubble:
    each backward split into B and W), "chimera" (`stages` = the axis size, even: two
    pipelines in opposite directions over two replicas of the stages, half the
    microbatches each, the replicas' gradients summed), or a user schedule: one row of actions per
    device (`[["0F0", "0B0"], ["1F0", "1B0"]]` or the same as text, one row per
    line), whose rows say which device runs each stage; a row that lists W actions
    (`0W1`) splits that stage's backward into input (B) and weight (W) gradients, and
    actions joined by `+` (`0F3+3B1`) are an overlap group, run side by side on two
    compute streams. A schedule may also be a function `(stages, microbatches, devices)`
    returning such rows or a `piperc.schedules.Schedule` (its overlap groups included);
    its rows are checked before anything runs.
    """
    return Pipeline(axis, stages, microbatches, schedule, tuple(split_at), region)


def data_parallel(axis: str = "dp", bucket_mb: float = 25.0, zero: int = 0,
                  reshard_after_forward: bool = True) -> DataParallel:
    """Data-parallel directive: each replica along `axis` takes an equal slice of the batch.

    `zero` shards over `axis`: 1 the optimizer state, 2 also the gradients, 3 also the
    parameters, as FSDP2's `fully_shard`. With zero=3, `reshard_after_forward` (as FSDP2
    names it) regathers the parameters for each microbatch's forward and backward (True,
    least memory) or gathers them once per step and keeps them whole (False).
    """
    return DataParallel(axis, bucket_mb, zero, reshard_after_forward)


class Optimizer(Directive):
    """An optimizer: the directive that writes each stage's parameter update."""

    @abc.abstractmethod
    def pass_options(self) -> dict:
        """The optimizer pass's options."""

    def check(self, ctx: StrategyContext) -> None:
        """One optimizer per strategy, with hyperparameters torch.optim accepts."""
        if next(d for d in ctx.directives if isinstance(d, Optimizer)) is not self:
            raise StrategyError(f"{self!r}: only one optimizer is allowed; pass it as optimizer=")
        for name, value, ok, rule in self.hyperparameters():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise StrategyError(f"{self!r}: {name} must be a number, got {value!r}")
            if not ok(value):
                raise StrategyError(f"{self!r}: invalid {name} {value!r}; torch.optim requires {rule}")

    @abc.abstractmethod
    def hyperparameters(self) -> list[tuple[str, object, Callable[[float], bool], str]]:
        """(name, value, the check torch.optim applies, that check in words) for each
        hyperparameter."""

    def fragments(self, ctx: StrategyContext) -> list[Fragment]:
        """optimizer: `@s<i>_update` for every stage."""
        return [Fragment((OptimizerPass(**self.pass_options(), directive=repr(self)),),
                         requires=("stages",), provides=("update",))]


@dataclasses.dataclass(frozen=True)
class SGD(Optimizer):
    """torch.optim.SGD's update (momentum, weight decay), written as IR."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def pass_options(self) -> dict:
        """The optimizer pass's options."""
        return {"kind": "sgd", "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}

    def hyperparameters(self) -> list[tuple[str, object, Callable[[float], bool], str]]:
        """lr, momentum and weight_decay, each >= 0 (torch.optim.SGD's checks)."""
        return [(name, getattr(self, name), _non_negative, ">= 0") for name in ("lr", "momentum", "weight_decay")]


@dataclasses.dataclass(frozen=True)
class AdamW(Optimizer):
    """torch.optim.AdamW's update, written as IR."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def pass_options(self) -> dict:
        """The optimizer pass's options."""
        return {"kind": "adamw", "lr": self.lr, "beta1": self.betas[0], "beta2": self.betas[1],
                "eps": self.eps, "weight_decay": self.weight_decay}

    def hyperparameters(self) -> list[tuple[str, object, Callable[[float], bool], str]]:
        """lr, eps and weight_decay >= 0, each beta in [0, 1) (torch.optim.AdamW's checks)."""
        if not isinstance(self.betas, tuple | list) or len(self.betas) != 2:
            raise StrategyError(f"{self!r}: betas must be a pair (beta1, beta2), got {self.betas!r}")
        in_unit = (lambda b: 0.0 <= b < 1.0, "0 <= beta < 1")
        return [("lr", self.lr, _non_negative, ">= 0"), ("eps", self.eps, _non_negative, ">= 0"),
                ("betas[0]", self.betas[0], *in_unit), ("betas[1]", self.betas[1], *in_unit),
                ("weight_decay", self.weight_decay, _non_negative, ">= 0")]


def _non_negative(value: float) -> bool:
    return value >= 0.0


def _is_count(value: object) -> bool:
    """An int >= 1 (not a bool, not a float that happens to be whole)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class optim:  # noqa: N801 - a namespace, spelled like torch.optim
    """Optimizers: `piperc.optim.SGD(lr, momentum)` and `piperc.optim.AdamW(lr, weight_decay)`."""

    SGD = SGD
    AdamW = AdamW
