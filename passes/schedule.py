"""schedule: writes the pipeline schedule as data (`par.schedule @schedule`).

    par.schedule @schedule mesh @mesh axis "pp" {
      par.device 0 [0F0, 0F1, 0B0, 0F2, 0B1, 0F3, 0B2, 0B3]
      par.device 1 [1F0, 1B0, 1F1, 1B1, 1F2, 1B2, 1F3, 1B3]
    }

Options: kind (a built-in's name, `piperc.schedules.BUILTIN_SCHEDULES`: gpipe, 1f1b,
interleaved, chimera, ...; or user), table (a user schedule: one
row per device, rows separated by `;`, actions by spaces, e.g. `0F0 0B0;1F0 1B0`;
actions joined by `+` are an overlap group, run together on two compute streams,
e.g. `0F0 0F1 0F3+3B1 0B0;...`), replicas (how many replicas of the stages the table
runs, see below; 1 by default), axis (the pipeline mesh axis), directive. A device
may hold several stages (`interleaved` places stage s on device s mod the axis
size); every device holds the same number. The schedule is validated before it is written (every action
once, dependencies, matched messages, no deadlock); a bad one is a StrategyError
naming the first offending action.

A schedule may run replicas of the stages (`chimera`: two pipelines in opposite
directions). Its rows then name stages beyond the module's `par.num_stages` S: action
stage t is replica t // S of stage t mod S, a stage of its own on its own device, and
each microbatch runs in one replica's pipeline:

    par.schedule @schedule mesh @mesh axis "pp" {
      par.device 0 [0F0, 3F1, 3B1, 0B0]
      par.device 1 [2F1, 1F0, 1B0, 2B1]
    }

No device may hold two replicas of one stage, nor (replicas included) two stages that
share a tied parameter.
Requires: mesh, outline-stages and microbatch have run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass

from piperc import schedules
from piperc.dialects.par import ActionAttr, AllReduceBucketOp, DeviceOp, PassKind, ScheduleOp
from piperc.dialects.roles import main_function
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL, find_axis
from piperc.passes.microbatch import MICROBATCHES
from piperc.passes.pipeline_split import NUM_STAGES, module_count

SCHEDULE_SYMBOL = "schedule"


def find_schedule(module: ModuleOp) -> ScheduleOp:
    """The module's `par.schedule @schedule`."""
    for op in module.ops:
        if isinstance(op, ScheduleOp) and op.sym_name.data == SCHEDULE_SYMBOL:
            return op
    raise StrategyError("no pipeline schedule; run the schedule pass first")


def parse_table(table: str, num_stages: int, num_microbatches: int, name: str = "user",
                replicas: int = 1) -> schedules.Schedule:
    """The user schedule the `table` option writes: rows separated by `;`, actions by
    spaces, the actions of an overlap group joined by `+` (`0F3+3B1`); with `replicas` > 1,
    stages from `num_stages` on are the replicas' (`piperc.schedules.Schedule.replicas`).
    Raises ScheduleError naming a bad action."""
    return schedules.from_lists([row.split() for row in table.split(";")], num_stages, num_microbatches, name=name,
                                replicas=replicas)


def table_text(schedule: schedules.Schedule) -> str:
    """`schedule` as the `table` option that `parse_table` reads back, overlap groups
    included; raises ScheduleError for a group whose actions are apart in their row."""
    return ";".join(" ".join(row) for row in schedule.grouped_rows())


def schedule_data(op: ScheduleOp, name: str = "user", num_stages: int | None = None,
                  num_microbatches: int | None = None) -> schedules.Schedule:
    """`op`'s rows as schedule data (`piperc.schedules.Schedule`), each overlap group's
    actions in row order. `num_stages` defaults to the module's `par.num_stages` where it
    has one: action stages from there on are replicas (`replica_count`)."""
    devices = sorted(op.devices(), key=lambda d: d.index.value.data)
    rows = [[a.compact() for a in d.actions.data] for d in devices]
    module = op.parent_op()
    if num_stages is None and isinstance(module, ModuleOp) and NUM_STAGES in module.attributes:
        num_stages = module_count(module, NUM_STAGES, "schedule", "pipeline-split")
    replicas = 1 if num_stages is None else replica_count(op, num_stages)
    schedule = schedules.from_lists(rows, num_stages, num_microbatches, name=name, replicas=replicas)
    groups = []
    for device, row in zip(devices, schedule.devices, strict=True):
        position = {a.compact(): i for i, a in enumerate(device.actions.data)}
        groups.append([tuple(row[i] for i in sorted(position[a.compact()] for a in g))
                       for g in device.overlap_groups()])
    schedule.overlap = groups if any(groups) else []
    return schedule


def replica_count(op: ScheduleOp, num_stages: int) -> int:
    """How many replicas of the model's `num_stages` stages `op` runs: action stage t is
    replica t // num_stages of stage t mod num_stages (`piperc.schedules.Schedule.replicas`;
    Chimera's two pipelines: 2)."""
    return 1 + max(a.stage for d in op.devices() for a in d.actions.data) // num_stages


@dataclass(frozen=True)
class SchedulePass(ModulePass):
    """Builds, validates and inserts the pipeline schedule."""

    name = "schedule"

    kind: str = "1f1b"
    table: str = ""
    replicas: int = 1
    axis: str = "pp"
    directive: str = "schedule"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = find_axis(op, self.axis, self.directive)
        stages = module_count(op, NUM_STAGES, self.directive, "pipeline-split")
        microbatches = module_count(op, MICROBATCHES, self.directive, "microbatch")
        size = mesh.axis_size(self.axis)
        if stages % size:
            raise StrategyError(
                f"{self.directive}: {stages} stages on a '{self.axis}' axis of size {size}; each device "
                f"holds the same number of stages, so stages must be a multiple of {size}"
            )
        try:
            if self.kind == "user" or self.table:
                sched = parse_table(self.table, stages, microbatches, replicas=self.replicas)
            else:
                sched = schedules.builtin(self.kind, stages, microbatches, num_devices=size)
            schedules.validate(sched)
        except schedules.ScheduleError as e:
            raise StrategyError(f"{self.directive}: {e}") from e
        if len(sched.devices) != size:
            raise StrategyError(f"{self.directive}: the schedule has {len(sched.devices)} device rows but axis "
                                f"'{self.axis}' has {size} devices")
        placed = stages * sched.replicas
        held = Counter(sched.device_of(s) for s in range(placed))
        if set(held.values()) != {placed // size}:
            counts = ", ".join(f"device {d}: {held.get(d, 0)}" for d in range(size))
            raise StrategyError(f"{self.directive}: every device must hold {placed // size} stage(s) of the "
                                f"{placed}; the schedule places {counts}")
        for s in range(stages):
            owners = [sched.device_of(s + k * stages) for k in range(sched.replicas)]
            if len(set(owners)) < len(owners):
                raise StrategyError(f"{self.directive}: two replicas of stage {s} on one device ({owners}); "
                                    "place each replica of a stage on a device of its own")
        for bucket in main_function(op).body.block.ops:
            if isinstance(bucket, AllReduceBucketOp):
                owners = [sched.device_of(s + k * stages) for k in range(sched.replicas) for s in bucket.stage_list()]
                if len(set(owners)) < len(owners):
                    fix = ("untie it or choose a schedule without replicas" if sched.replicas > 1
                           else "place the stages that share it on different devices")
                    raise StrategyError(
                        f"{self.directive}: a parameter tied across stages {list(bucket.stage_list())} would have "
                        f"two of them on one device ({owners}, replicas included); its partial gradients are "
                        f"summed across devices, so {fix}")

        def action(a: schedules.Action) -> ActionAttr:
            return ActionAttr(a.stage, PassKind(a.kind), a.microbatch)

        devices = [
            DeviceOp(d, [action(a) for a in row], [[action(a) for a in g] for g in sched.overlap[d]]
                     if sched.overlap else ())
            for d, row in enumerate(sched.devices)
        ]
        op.body.block.add_op(ScheduleOp(SCHEDULE_SYMBOL, MESH_SYMBOL, self.axis, devices))
