"""expand-schedule: writes each pipeline device's program of tasks and transfers.

Reads the step `@main` (a graph of `par.task`s for one microbatch, with
`par.accumulate`, `par.all_reduce_bucket` and update tasks that run once per
step) and `par.schedule`, and writes one `par.program @device<d> device d`
per device along the schedule's axis, in the order the device issues its work:

    par.program @device1 device 1 {
      %x = par.recv from 0 "h0 mb0" batch 0 : T
      %w = par.state "blocks.1.w" layout #par.sharding<[[], []]> : T
      %l:2 = par.task @s1_F stage 1 pass F microbatch 0 (%x, %w) : (T, T) -> (T, T)
      ...
      %g = par.task @s1_B stage 1 pass B microbatch 1 (%x1, %w) : (T, T) -> (T, T)
      par.send %g#0 to 0 "g0 mb1" batch 5 : T
      %sum = par.task @s1_B_accumulate stage 1 pass B microbatch 1 (%acc, %g#1) : (T, T) -> T
      %r = par.all_reduce_bucket 0 stage 1 (%sum) over @mesh ["dp"] stages [1] : T
      %u = par.task @s1_update stage 1 pass update (%w, %r) : (T, T) -> T
      par.set_state "blocks.1.w", %u : T
    }

For each action of its schedule row, a device runs the action's tasks (a
backward action runs the stage's backward chunks in order, and its weight
gradients too when the backward is split but the schedule lists no W action
for the stage) on that
microbatch, sends each result another device reads right after the task
that makes it, and receives what it reads from other devices before the
first task that needs it. Transfers between two devices pair up in the order
each issues them: a device receives from a peer in exactly the order the peer
sends, so a receive may bring in a value needed only later. The sends after a
task and the receives before the next one are one `batch`, issued together,
so a forward send and a backward receive that cross cannot block each other.
Where two devices would still each wait at a send to the other (torch's
interleaved order from 2 x devices microbatches on), the schedule's
`receive_plan` names receives to post earlier, in the batch where the device
would wait, and this pass posts them there.
A microbatch's per-step results are summed as they arrive (the combiner of
`par.accumulate` runs from the second microbatch on). Every once-per-step op
(bucket reductions, updates, stores, the loss, a `par.reshard` of the step such
as ZeRO-3's gather of a parameter that stays whole across microbatches) is
issued as soon as what it reads is available, so a gradient bucket starts while
earlier chunks still compute and a gather of state starts before the first task.

An overlap group of the schedule (`par.device ... overlap [[0F3, 3B1]]`) runs as one
step, as the schedule's checker models it: the batch before the group receives what
any of its actions reads, its tasks follow back to back, each action's tasks (its
gradient sums included) marked with the action's lane, its place in the group in row
order (`par.task @s0_F stage 0 pass F microbatch 3 lane 0 ...`, `... lane 1 ...`), and
the group's sends, then the once-per-step ops it makes ready, come after its last task.
lower-to-exec runs each lane on a compute stream of its own. Two lanes never write the
same value: a gradient sum is a new value per microbatch, computed from the previous
one, so a lane that adds to a sum another lane made reads it (and lower-to-exec orders
its stream after the other's).
Options: directive (quoted in errors). Requires: schedule has run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block, BlockArgument, Operation, Region, SSAValue
from xdsl.passes import ModulePass

from piperc import schedules
from piperc.dialects import par
from piperc.dialects.par import PassKind, ShardingAttr, layout_of
from piperc.dialects.roles import argument_roles, main_function, result_roles
from piperc.errors import StrategyError
from piperc.passes.microbatch import MICROBATCHES
from piperc.passes.pipeline_split import module_count
from piperc.passes.schedule import find_schedule, schedule_data


def _label(value: SSAValue, mb: int) -> str:
    return f"{value.name_hint or 'v'} mb{mb}"


def _steps(device: par.DeviceOp, directive: str) -> list[list[par.ActionAttr]]:
    """`device`'s row cut into steps: one action, or one overlap group (its actions in row
    order), which must be contiguous in the row."""
    row = list(device.actions.data)
    position = {a: i for i, a in enumerate(row)}
    group_of = {}
    for group in device.overlap_groups():
        ordered = sorted(group, key=position.__getitem__)
        if position[ordered[-1]] - position[ordered[0]] != len(ordered) - 1:
            text = "[" + ", ".join(a.compact() for a in group) + "]"
            raise StrategyError(f"{directive}: overlap group {text} on device {device.index.value.data} is "
                                "not contiguous in its row; place its actions next to each other")
        group_of |= {a: ordered for a in ordered}
    steps: list[list[par.ActionAttr]] = []
    for action in row:
        step = group_of.get(action, [action])
        if not steps or steps[-1] is not step:
            steps.append(step)
    return steps


def _action(action: par.ActionAttr) -> schedules.Action:
    """The schedule action `action` stands for."""
    return schedules.Action(action.stage, action.pass_kind.value, action.microbatch)


@dataclass
class _Step:
    """What the schedule expands: `@main`'s tasks, its once-per-step ops and its roles."""

    main: func.FuncOp
    microbatches: int
    device_of: dict[int, int]
    w_stages: set[int]
    """The stages whose W actions the schedule lists."""

    def __post_init__(self):
        block = self.main.body.block
        self.arg_roles = argument_roles(self.main)
        self.arg_layouts = [layout_of(a) for a in self.main.arg_attrs.data]
        self.tasks: dict[tuple[int, PassKind], list[par.TaskOp]] = defaultdict(list)
        self.per_step: list[Operation] = []
        self.accumulates: dict[par.TaskOp, list[par.AccumulateOp]] = defaultdict(list)
        for op in block.ops:
            if isinstance(op, par.TaskOp) and op.pass_kind.data != PassKind.UPDATE:
                self.tasks[(op.stage.value.data, op.pass_kind.data)].append(op)
            elif isinstance(op, par.AccumulateOp):
                self.accumulates[op.values[0].owner].append(op)
            elif not isinstance(op, func.ReturnOp):
                self.per_step.append(op)
        self.split_weights = any(kind == PassKind.W for _, kind in self.tasks)
        ret = block.last_op
        self.stores: dict[SSAValue, list[tuple[str, str]]] = defaultdict(list)
        for (role, name), v in zip(result_roles(self.main), ret.operands, strict=True):
            self.stores[v].append((role, str(name)))

    def frozen(self, stage: int, kind: PassKind) -> bool:
        """Whether `kind` is a backward pass with nothing to compute: a stage without any
        backward (every parameter it reads is frozen and no earlier stage needs its input
        gradients) runs nothing for its B and W actions; a stage whose backward is split runs
        nothing for W when it has no weight gradient of its own, and nothing for B when no
        other stage needs an input gradient from it (a single stage: all of it is W)."""
        if self.split_weights and kind in (PassKind.B, PassKind.W) and (
                self.tasks.get((stage, PassKind.B)) or self.tasks.get((stage, PassKind.W))):
            return not self.tasks.get((stage, kind))
        return (kind in (PassKind.B, PassKind.W) and bool(self.tasks.get((stage, PassKind.F)))
                and not self.tasks.get((stage, PassKind.B)) and not self.tasks.get((stage, PassKind.W)))

    def stage_of(self, op: Operation) -> int:
        """The stage `op` belongs to; a reshard of the step belongs to the tasks that read it."""
        if isinstance(op, par.ReshardOp):
            return min(u.operation.stage.value.data for u in op.result.uses if isinstance(u.operation, par.TaskOp))
        return op.stage.value.data

    def device_of_value(self, v: SSAValue) -> int | None:
        """The device that makes a per-microbatch value (None for arguments)."""
        owner = v.owner
        if isinstance(owner, par.TaskOp) and owner.pass_kind.data != PassKind.UPDATE:
            return self.device_of[self.stage_of(owner)]
        return None


class _ProgramWriter:
    """Writes one device's `par.program`."""

    def __init__(self, step: _Step, device: int, steps, outgoing, directive: str, early=None):
        self.step = step
        self.early = early or {}  # action -> messages received in the batch before it (receive_plan)
        self.device = device
        self.steps = steps  # the row as `_steps` cuts it
        self.outgoing = outgoing  # (src, dst) -> [(value, mb)] in the order src sends them
        self.received = defaultdict(int)  # src -> how many of src's sends to us are received
        self.directive = directive
        self.block = Block()
        self.env: dict[tuple[SSAValue, int | None], SSAValue] = {}
        self.states: dict[str, SSAValue] = {}
        self.pending_sends: list[tuple[SSAValue, int, str]] = []
        self.batch = 0
        self.acc_count: dict[par.AccumulateOp, int] = defaultdict(int)
        self.acc_value: dict[par.AccumulateOp, list[SSAValue]] = {}
        self.done: set[Operation] = set()

    def add(self, op: Operation) -> Operation:
        self.block.add_op(op)
        return op

    def write(self) -> par.ProgramOp:
        self.issue_ready()  # what needs no task (a gather of sharded parameters) starts first
        for step in self.steps:
            early = [m for a in step for m in self.early.get(_action(a), [])]
            if len(step) == 1:
                action = step[0]
                for i, task in enumerate(self.tasks_of(action)):
                    self.run(task, action.microbatch, early if i == 0 else [], first=i == 0)
                    self.issue_ready()
                continue
            lanes = [(lane, action, self.tasks_of(action)) for lane, action in enumerate(step)]
            receives = [r for m in early if (r := self.early_receive(m)) is not None]
            for _, action, tasks in lanes:
                receives += [r for task in tasks for r in self.receives(task, action.microbatch)]
            self.flush(receives)
            for lane, action, tasks in lanes:
                for task in tasks:
                    self.run(task, action.microbatch, first=False, lane=lane)
            self.issue_ready()
        self.flush([])
        self.issue_ready(final=True)
        missing = [o for o in self.step.per_step if self.mine(o) and o not in self.done]
        if missing:
            raise StrategyError(f"{self.directive}: device {self.device} never has the inputs of "
                                f"{missing[0].name} (stage {self.step.stage_of(missing[0])}); does the "
                                "schedule run every action of its stages?")
        return par.ProgramOp(f"device{self.device}", self.device, Region(self.block))

    def tasks_of(self, action: par.ActionAttr) -> list[par.TaskOp]:
        """The step's tasks that `action` runs (none for a backward with nothing to compute)."""
        tasks = self.step.tasks.get((action.stage, action.pass_kind), [])
        if action.pass_kind == PassKind.B and action.stage not in self.step.w_stages:
            tasks = tasks + self.step.tasks.get((action.stage, PassKind.W), [])  # B runs the whole backward
        if not tasks and not self.step.frozen(action.stage, action.pass_kind):
            what = ("the backward is not split into B and W" if action.pass_kind == PassKind.W
                    else "the step has no such task")
            raise StrategyError(f"{self.directive}: schedule action {action.compact()} on device "
                                f"{self.device} runs nothing: stage {action.stage} has no "
                                f"{action.pass_kind.value} task ({what})")
        return tasks

    def mine(self, op: Operation) -> bool:
        return self.step.device_of[self.step.stage_of(op)] == self.device

    def run(self, task: par.TaskOp, mb: int, early=(), first: bool = True, lane: int | None = None) -> None:
        """Emits `task` on microbatch `mb` (in overlap-group `lane`, if any) with the transfers
        before it; the batch before it also receives the `early` messages
        (`schedules.receive_plan`). The sends of an action's tasks wait for the next action's
        batch (as the schedule's checker models them), unless a later task of the action
        (`first` False) receives something."""
        receives = [r for m in early if (r := self.early_receive(m)) is not None]
        receives += self.receives(task, mb)
        if first or receives:
            self.flush(receives)
        args = [self.operand(v, mb, task) for v in task.args]
        new = self.add(par.TaskOp(task.callee.root_reference.data, self.step.stage_of(task),
                                  task.pass_kind.data, args, list(task.outs.types), mb, lane))
        for old, r in zip(task.outs, new.outs, strict=True):
            r.name_hint = old.name_hint
            self.env[(old, mb)] = r
            for dst in self.destinations(old):
                self.pending_sends.append((r, dst, _label(old, mb)))
        for acc in self.step.accumulates.get(task, []):
            self.accumulate(acc, mb, task, lane)

    def receives(self, task: par.TaskOp, mb: int) -> list[tuple[int, SSAValue, int]]:
        """(source, value, microbatch) of what `task` on microbatch `mb` reads from other
        devices and this device has not received yet."""
        found = []
        for v in task.args:
            src = self.step.device_of_value(v)
            if src is not None and src != self.device and (v, mb) not in self.env:
                found.append((src, v, mb))
        return found

    def early_receive(self, message) -> tuple[int, SSAValue, int] | None:
        """(source, value, microbatch) of the last value `message` brings to this device: the
        results its producer action sends here."""
        kind = PassKind.F if message.kind == "act" else PassKind.B
        found = [(message.src_device, v, m) for v, m in self.outgoing[(message.src_device, self.device)]
                 if m == message.microbatch and isinstance(v.owner, par.TaskOp)
                 and self.step.stage_of(v.owner) == message.stage and v.owner.pass_kind.data == kind]
        return found[-1] if found else None

    def destinations(self, value: SSAValue) -> list[int]:
        """The other devices whose tasks read `value`."""
        found = {self.step.device_of[self.step.stage_of(u.operation)] for u in value.uses
                 if isinstance(u.operation, par.TaskOp) and u.operation.pass_kind.data != PassKind.UPDATE}
        return sorted(found - {self.device})

    def flush(self, receives) -> None:
        """Issues the pending sends and the receives that bring in `receives`, as one batch."""
        ops: list[Operation] = [par.SendOp(v, dst, label, self.batch) for v, dst, label in self.pending_sends]
        self.pending_sends = []
        for src, value, mb in receives:
            sends = self.outgoing[(src, self.device)]
            while (value, mb) not in self.env:
                if self.received[src] >= len(sends):
                    raise StrategyError(f"{self.directive}: device {self.device} reads {_label(value, mb)}, "
                                        f"which device {src} never sends")
                v, m = sends[self.received[src]]
                self.received[src] += 1
                recv = par.RecvOp(v.type, src, _label(v, m), self.batch)
                recv.result.name_hint = v.name_hint
                ops.append(recv)
                self.env[(v, m)] = recv.result
        for op in ops:
            self.add(op)
        if ops:
            self.batch += 1

    def operand(self, v: SSAValue, mb: int | None, user: Operation) -> SSAValue:
        """`v` as this device has it for microbatch `mb`."""
        if isinstance(v, BlockArgument):
            role, name = self.step.arg_roles[v.index]
            layout = self.step.arg_layouts[v.index] or ShardingAttr.replicated(len(v.type.get_shape()))
            if role == "input":
                key = (v, mb)
                if key not in self.env:
                    self.env[key] = self.add(par.InputOp(int(name), mb, layout, v.type)).result
                return self.env[key]
            if str(name) not in self.states:
                state = self.add(par.StateOp(str(name), layout, v.type))
                state.result.name_hint = v.name_hint
                self.states[str(name)] = state.result
            return self.states[str(name)]
        for key in ((v, mb), (v, None)):
            if key in self.env:
                return self.env[key]
        raise StrategyError(f"{self.directive}: on device {self.device}, {user.name} "
                            f"{getattr(user, 'callee', '')} of microbatch {mb} reads "
                            f"{v.name_hint or 'a value'} before the schedule has computed it")

    def accumulate(self, acc: par.AccumulateOp, mb: int, task: par.TaskOp, lane: int | None) -> None:
        new = [self.env[(v, mb)] for v in acc.values]
        if acc in self.acc_value:
            total = self.add(par.TaskOp(acc.callee.root_reference.data, self.step.stage_of(acc),
                                        task.pass_kind.data, [*self.acc_value[acc], *new],
                                        list(acc.sums.types), mb, lane))
            for old, r in zip(acc.sums, total.outs, strict=True):
                r.name_hint = old.name_hint
            new = list(total.outs)
        self.acc_value[acc] = new
        self.acc_count[acc] += 1
        if self.acc_count[acc] == self.step.microbatches:
            for old, r in zip(acc.sums, new, strict=True):
                self.env[(old, None)] = r
            self.done.add(acc)
            self.store(acc.sums, new)

    def ready(self, op: Operation) -> bool:
        return all(isinstance(v, BlockArgument) or (v, None) in self.env for v in op.operands)

    def spans_devices(self, op: Operation) -> bool:
        """Whether `op` is a reduction with other pipeline devices (a weight tied across stages)."""
        return isinstance(op, par.AllReduceBucketOp) and len(
            {self.step.device_of[s] for s in op.stage_list()}) > 1

    def issue_ready(self, final: bool = False) -> None:
        """Issues every once-per-step op of this device whose inputs are all available.

        A reduction shared with other pipeline devices waits for the end of the
        row (`final`): issued earlier, it could stand on the communication stream
        ahead of a send those devices still wait for."""
        progress = True
        while progress:
            progress = False
            for op in self.step.per_step:
                if op in self.done or not self.mine(op) or not self.ready(op):
                    continue
                if self.spans_devices(op) and not final:
                    continue
                self.done.add(op)
                progress = True
                self.flush([])
                args = [self.operand(v, None, op) for v in op.operands]
                if isinstance(op, par.AllReduceBucketOp):
                    new = self.add(par.AllReduceBucketOp(
                        op.bucket.value.data, self.step.stage_of(op), args, op.mesh.root_reference.data,
                        op.axis_names(), op.stage_list()))
                    results = list(new.sums)
                elif isinstance(op, par.TaskOp):
                    new = self.add(par.TaskOp(op.callee.root_reference.data, self.step.stage_of(op),
                                              op.pass_kind.data, args, list(op.outs.types)))
                    results = list(new.outs)
                elif isinstance(op, par.ReshardOp):
                    new = self.add(par.ReshardOp(args[0], op.mesh.root_reference.data, op.source, op.target,
                                                 op.result.type))
                    results = [new.result]
                else:
                    raise StrategyError(f"{self.directive}: cannot place {op.name} in a device program")
                for old, r in zip(op.results, results, strict=True):
                    r.name_hint = old.name_hint
                    self.env[(old, None)] = r
                self.store(op.results, results)

    def store(self, olds, news) -> None:
        """Writes the step's results among `olds`: new state, and the loss."""
        for old, new in zip(olds, news, strict=True):
            for role, name in self.step.stores.get(old, []):
                if role == "loss":
                    self.add(par.OutputOp("loss", new))
                elif role in ("param", "state", "buffer"):
                    self.add(par.SetStateOp(name, new))


@dataclass(frozen=True)
class ExpandSchedulePass(ModulePass):
    """Writes one `par.program` per pipeline device from `@main` and `par.schedule`."""

    name = "expand-schedule"

    directive: str = "expand-schedule"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        schedule = find_schedule(op)
        microbatches = module_count(op, MICROBATCHES, self.directive, "microbatch")
        table = schedule.table()
        device_of = {a.stage: d for d, row in table.items() for a in row}
        step = _Step(main_function(op), microbatches, device_of,
                     {a.stage for row in table.values() for a in row if a.pass_kind == PassKind.W})
        unapplied = [name for role, name in result_roles(step.main) if role == "increment"]
        if unapplied:
            raise StrategyError(f"{self.directive}: the step returns increments of buffers {unapplied} but "
                                "no update of them; run running-buffers after microbatch")
        for stage in {t.stage.value.data for t in step.main.body.block.ops if isinstance(t, par.TaskOp)}:
            if stage not in device_of:
                raise StrategyError(f"{self.directive}: the schedule runs no action of stage {stage}")
        outgoing: dict[tuple[int, int], list[tuple[SSAValue, int]]] = defaultdict(list)
        for device, row in table.items():
            for action in row:
                for task in step.tasks.get((action.stage, action.pass_kind), []):
                    for r in task.outs:
                        users = {device_of[u.operation.stage.value.data] for u in r.uses
                                 if isinstance(u.operation, par.TaskOp)
                                 and u.operation.pass_kind.data != PassKind.UPDATE}
                        for dst in sorted(users - {device}):
                            outgoing[(device, dst)].append((r, action.microbatch))
        steps = {d.index.value.data: _steps(d, self.directive) for d in schedule.devices()}
        try:
            early = schedules.receive_plan(schedule_data(schedule, "user", max(device_of) + 1, microbatches))
        except schedules.ScheduleError as e:
            raise StrategyError(f"{self.directive}: {e}") from e
        programs = [_ProgramWriter(step, d, steps[d], outgoing, self.directive, early[d]).write()
                    for d in sorted(table)]
        for program in programs:
            op.body.block.add_op(program)
