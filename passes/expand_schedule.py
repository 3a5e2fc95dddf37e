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
A schedule that runs replicas of the stages (Chimera's two pipelines; see the schedule
pass) names stages beyond the model's S = `par.num_stages`: action stage t runs the
tasks of stage t mod S, on t's device, as stage t (`par.task @s0_F stage 2 ...` is the
second pipeline's replica of stage 0 at pp=2). A value of microbatch m goes from the
replica that makes it to the replica of its reader in the same pipeline, the one that
runs m. Each device sums a stage's per-microbatch results over the microbatches it runs
(the loss share of its last stage too, reported as its `loss`; the runtime sums the
devices' losses), and the once-per-step ops of a stage are issued on every device that
holds a replica of it: a bucket's `stages` name the replicas of its stages too (so a
data-parallel bucket sums over both axes), and a gradient that an update reads without a
bucket first gets one over no mesh axis, summing the replicas' sums (`par.all_reduce_bucket
0 stage 2 (%dw0) over @mesh [] stages [0, 2]`); both replicas then apply the same update.
Reductions spanning devices are issued at the end of the row, in `@main`'s order, so the
devices that share them issue them in one order.

Options: directive (quoted in errors). Requires: schedule has run.
"""

from __future__ import annotations

from collections import Counter, defaultdict
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
from piperc.passes.mesh import MESH_SYMBOL
from piperc.passes.microbatch import MICROBATCHES
from piperc.passes.pipeline_split import NUM_STAGES, module_count
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
class StepGraph:
    """What a schedule expands: `@main`'s tasks, its once-per-step ops and its roles (read by
    expand-schedule and expand-async)."""

    main: func.FuncOp
    microbatches: int
    num_stages: int
    device_of: dict[int, int]
    """Schedule stage -> its device (a replica's stage t runs the model's stage t mod num_stages)."""
    placed: dict[tuple[int, int], int]
    """(model stage, microbatch) -> the schedule stage that runs it."""
    w_stages: set[int]
    """The (model) stages whose W actions the schedule lists."""

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
        self.next_bucket: dict[int, int] = defaultdict(int)
        for op in self.per_step:
            if isinstance(op, par.AllReduceBucketOp):
                stage = op.stage.value.data
                self.next_bucket[stage] = max(self.next_bucket[stage], op.bucket.value.data + 1)

    def replicas_of(self, stage: int) -> list[int]:
        """The schedule stages that run (model) stage `stage`: itself, and its replicas."""
        return sorted(t for t in self.device_of if t % self.num_stages == stage)

    def device_at(self, stage: int, mb: int) -> int:
        """The device that runs (model) stage `stage` on microbatch `mb`: the device of the
        replica whose pipeline runs `mb`."""
        return self.device_of[self.placed[(stage, mb)]]

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

    def device_of_value(self, v: SSAValue, mb: int) -> int | None:
        """The device that makes a per-microbatch value on microbatch `mb` (None for arguments)."""
        owner = v.owner
        if isinstance(owner, par.TaskOp) and owner.pass_kind.data != PassKind.UPDATE:
            return self.device_at(self.stage_of(owner), mb)
        return None


class _ProgramWriter:
    """Writes one device's `par.program`."""

    def __init__(self, step: StepGraph, device: int, steps, outgoing, directive: str, early=None):
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
        # model stage -> the schedule stage (itself or a replica) this device runs it as
        self.local = {t % step.num_stages: t for t, d in step.device_of.items() if d == device}
        self.runs = Counter(s for (s, _), t in step.placed.items() if self.local.get(s) == t)

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
        stage = action.stage % self.step.num_stages
        tasks = self.step.tasks.get((stage, action.pass_kind), [])
        if action.pass_kind == PassKind.B and stage not in self.step.w_stages:
            tasks = tasks + self.step.tasks.get((stage, PassKind.W), [])  # B runs the whole backward
        if not tasks and not self.step.frozen(stage, action.pass_kind):
            what = ("the backward is not split into B and W" if action.pass_kind == PassKind.W
                    else "the step has no such task")
            raise StrategyError(f"{self.directive}: schedule action {action.compact()} on device "
                                f"{self.device} runs nothing: stage {action.stage} has no "
                                f"{action.pass_kind.value} task ({what})")
        return tasks

    def mine(self, op: Operation) -> bool:
        return self.step.stage_of(op) in self.local

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
        new = self.add(par.TaskOp(task.callee.root_reference.data, self.local[self.step.stage_of(task)],
                                  task.pass_kind.data, args, list(task.outs.types), mb, lane))
        for old, r in zip(task.outs, new.outs, strict=True):
            r.name_hint = old.name_hint
            self.env[(old, mb)] = r
            for dst in self.destinations(old, mb):
                self.pending_sends.append((r, dst, _label(old, mb)))
        for acc in self.step.accumulates.get(task, []):
            self.accumulate(acc, mb, task, lane)

    def receives(self, task: par.TaskOp, mb: int) -> list[tuple[int, SSAValue, int]]:
        """(source, value, microbatch) of what `task` on microbatch `mb` reads from other
        devices and this device has not received yet."""
        found = []
        for v in task.args:
            src = self.step.device_of_value(v, mb)
            if src is not None and src != self.device and (v, mb) not in self.env:
                found.append((src, v, mb))
        return found

    def early_receive(self, message) -> tuple[int, SSAValue, int] | None:
        """(source, value, microbatch) of the last value `message` brings to this device: the
        results its producer action sends here."""
        kind = PassKind.F if message.kind == "act" else PassKind.B
        found = [(message.src_device, v, m) for v, m in self.outgoing[(message.src_device, self.device)]
                 if m == message.microbatch and isinstance(v.owner, par.TaskOp)
                 and self.step.stage_of(v.owner) == message.stage % self.step.num_stages
                 and v.owner.pass_kind.data == kind]
        return found[-1] if found else None

    def destinations(self, value: SSAValue, mb: int) -> list[int]:
        """The other devices whose tasks read `value` of microbatch `mb`."""
        found = {self.step.device_at(self.step.stage_of(u.operation), mb) for u in value.uses
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
            total = self.add(par.TaskOp(acc.callee.root_reference.data, self.local[self.step.stage_of(acc)],
                                        task.pass_kind.data, [*self.acc_value[acc], *new],
                                        list(acc.sums.types), mb, lane))
            for old, r in zip(acc.sums, total.outs, strict=True):
                r.name_hint = old.name_hint
            new = list(total.outs)
        self.acc_value[acc] = new
        self.acc_count[acc] += 1
        if self.acc_count[acc] == self.runs[self.step.stage_of(acc)]:
            for old, r in zip(acc.sums, new, strict=True):
                self.env[(old, None)] = r
            self.done.add(acc)
            self.store(acc.sums, new)

    def ready(self, op: Operation) -> bool:
        return all(isinstance(v, BlockArgument) or (v, None) in self.env for v in op.operands)

    def replicated(self, stages) -> list[int]:
        """The schedule stages that run `stages` (model stages), replicas included."""
        return sorted(t for s in stages for t in self.step.replicas_of(s))

    def spans_devices(self, op: Operation) -> bool:
        """Whether `op` is a reduction with other pipeline devices (a weight tied across stages,
        a stage's replicas), or an update that waits for one (`replica_sums`)."""
        if isinstance(op, par.AllReduceBucketOp):
            return len({self.step.device_of[t] for t in self.replicated(op.stage_list())}) > 1
        return isinstance(op, par.TaskOp) and bool(self.unsummed(op))

    def unsummed(self, update: par.TaskOp) -> list[int]:
        """The operands of `update` that are gradients no bucket sums over the replicas of its
        stage: sums of the microbatches this device ran (or a task's result), where the stage
        has replicas."""
        if update.pass_kind.data != PassKind.UPDATE or len(self.step.replicas_of(self.step.stage_of(update))) < 2:
            return []
        return [i for i, v in enumerate(update.operands)
                if isinstance(v.owner, par.AccumulateOp | par.TaskOp)]

    def replica_sums(self, update: par.TaskOp, args: list[SSAValue]) -> list[SSAValue]:
        """`args` of `update` with the gradients `unsummed` names summed over the replicas of
        its stage first, by one `par.all_reduce_bucket` over no mesh axis: each pipeline summed
        only the microbatches it ran (Chimera)."""
        picks = self.unsummed(update)
        if not picks:
            return args
        stage = self.step.stage_of(update)
        self.flush([])  # a collective goes behind the pending sends
        bucket = self.add(par.AllReduceBucketOp(self.step.next_bucket[stage], self.local[stage],
                                                [args[i] for i in picks], MESH_SYMBOL, (),
                                                self.step.replicas_of(stage)))
        sums = dict(zip(picks, bucket.sums, strict=True))
        return [sums.get(i, v) for i, v in enumerate(args)]

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
                if not isinstance(op, par.TaskOp):  # a collective goes behind the pending sends;
                    self.flush([])  # a task (an update) leaves them for the next action's batch
                args = [self.operand(v, None, op) for v in op.operands]
                if isinstance(op, par.AllReduceBucketOp):
                    new = self.add(par.AllReduceBucketOp(
                        op.bucket.value.data, self.local[self.step.stage_of(op)], args,
                        op.mesh.root_reference.data, op.axis_names(), self.replicated(op.stage_list())))
                    results = list(new.sums)
                elif isinstance(op, par.TaskOp):
                    new = self.add(par.TaskOp(op.callee.root_reference.data, self.local[self.step.stage_of(op)],
                                              op.pass_kind.data, self.replica_sums(op, args), list(op.outs.types)))
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
        num_stages = module_count(op, NUM_STAGES, self.directive, "pipeline-split")
        table = schedule.table()
        device_of = {a.stage: d for d, row in table.items() for a in row}
        placed = {(a.stage % num_stages, a.microbatch): a.stage for row in table.values() for a in row}
        step = StepGraph(main_function(op), microbatches, num_stages, device_of, placed,
                     {a.stage % num_stages for row in table.values() for a in row if a.pass_kind == PassKind.W})
        unapplied = [name for role, name in result_roles(step.main) if role == "increment"]
        if unapplied:
            raise StrategyError(f"{self.directive}: the step returns increments of buffers {unapplied} but "
                                "no update of them; run running-buffers after microbatch")
        for stage in {t.stage.value.data for t in step.main.body.block.ops if isinstance(t, par.TaskOp)}:
            if not step.replicas_of(stage):
                raise StrategyError(f"{self.directive}: the schedule runs no action of stage {stage}")
        outgoing: dict[tuple[int, int], list[tuple[SSAValue, int]]] = defaultdict(list)
        for device, row in table.items():
            for action in row:
                for task in step.tasks.get((action.stage % num_stages, action.pass_kind), []):
                    for r in task.outs:
                        users = {step.device_at(u.operation.stage.value.data, action.microbatch) for u in r.uses
                                 if isinstance(u.operation, par.TaskOp)
                                 and u.operation.pass_kind.data != PassKind.UPDATE}
                        for dst in sorted(users - {device}):
                            outgoing[(device, dst)].append((r, action.microbatch))
        steps = {d.index.value.data: _steps(d, self.directive) for d in schedule.devices()}
        try:
            early = schedules.receive_plan(schedule_data(schedule, "user", num_stages, microbatches))
        except schedules.ScheduleError as e:
            raise StrategyError(f"{self.directive}: {e}") from e
        programs = [_ProgramWriter(step, d, steps[d], outgoing, self.directive, early[d]).write()
                    for d in sorted(table)]
        for program in programs:
            op.body.block.add_op(program)
