"""expand-async: writes an asynchronous pipeline's device programs from its update plan.

PipeDream (`plan="pipedream"`) and PipeDream-2BW (`"pipedream-2bw"`) never flush: stage s
runs 1F1B over the whole run, updates its weights after every backward (2BW: after every
`microbatches`-th, with their mean), and a microbatch's backward reads the weights its
forward read (weight stashing). The plan (`piperc.asynchronous.plan`) says, per stage,
its forwards, backwards and updates in order; this pass writes them as programs. Cut at
step boundaries (stage s's step t holds the forwards of the step's microbatches, and the
backwards and updates 1F1B interleaves with them), a device's work has three phases:

    par.program @device0_first device 0 phase "first" { ... }   the first step (warm-up)
    par.program @device0 device 0 { ... }                       every later step
    par.program @device0_drain device 0 phase "drain" { ... }   once after the last step

What a step leaves to a later one is handed on by name: the activations of microbatches in
flight, the weight versions their forwards read when an update has since replaced them
(the stash), a 2BW gradient sum not yet applied, and a gradient whose reader runs in the
next step (it is sent there, so that every transfer of a step lies within the step):

    par.carry "s0_F#0 mb-1", %h : T              (end of a step)
    %h = par.carried "s0_F#0 mb-1" : T           (start of the next)
    %w = par.carried "blocks.0.w @mb-1" stash : T

Names count microbatches from the step's first (`mb-1` is the previous step's last), so
every steady step hands on and takes the same names; the pass checks that the step after
the steady one is the same program (the plan is periodic), else it is an error. Versions
are SSA values: a forward reads the stage's latest weights (`par.state` at the step's start,
then each update's result), the backward of the same microbatch the same value. An update
is `@main`'s per-step ops of the stage (data-parallel bucket, `@s<i>_update`) on the
gradient of its microbatches; the new weights and optimizer state are stored at the end of
the step (`par.set_state`). The last stage reports the step's loss, the mean over the
step's forwards (each at the versions it read).

Supported: one stage per device, data parallelism (buckets), SGD and AdamW. The step's other
per-step ops (ZeRO's reshards, running buffers) and split backward weights are errors, and so
is `microbatches` < stages - 1 (the warm-up must fit in the first step).
Options: plan, directive. Requires: microbatch (with `per_update`), schedule.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block, BlockArgument, Operation, Region, SSAValue
from xdsl.passes import ModulePass

from piperc import asynchronous
from piperc.dialects import par
from piperc.dialects.par import PassKind, ShardingAttr
from piperc.dialects.roles import main_function
from piperc.errors import StrategyError
from piperc.passes.expand_schedule import StepGraph
from piperc.passes.microbatch import MICROBATCHES
from piperc.passes.pipeline_split import NUM_STAGES, module_count
from piperc.passes.schedule import find_schedule
from piperc.schedules import ScheduleError

_SEGMENTS = 4
"""The plan is written for 3 steps: the first, a steady one, one more (to check periodicity),
and the drain after it."""

_STATE = object()
"""A version that is the stage's state at the start of the step (read with `par.state`)."""

Key = tuple[SSAValue, int]
"""A value of `@main` for one (global) microbatch."""


def segments(plan: asynchronous.UpdatePlan, stage: int) -> list[list[asynchronous.Event]]:
    """`stage`'s events cut into its steps (a step starts at the forward of its first
    microbatch), the last step's drain apart: [step 0, step 1, step 2, drain]."""
    M = plan.microbatches
    cut: list[list[asynchronous.Event]] = [[]]
    for e in plan.stages[stage]:
        if e.kind == "F" and e.microbatches[0] % M == 0 and e.microbatches[0] > 0:
            cut.append([])
        cut[-1].append(e)
    steady = len(cut[1])
    return [cut[0], cut[1], cut[2][:steady], cut[2][steady:]]


def _shifted(events: list[asynchronous.Event], by: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(e.kind, tuple(m + by for m in e.microbatches)) for e in events]


@dataclass
class _Message:
    """A value one device sends another: microbatch `mb`'s `value`, made by the event at `made`
    (segment, index in it); it is sent in the segment that first reads it."""

    value: SSAValue
    mb: int
    made: tuple[int, int]


class _Writer:
    """Writes one stage's (= device's) programs, step after step, carrying what is live."""

    def __init__(self, step: StepGraph, stage: int, plan: asynchronous.UpdatePlan, cut, outgoing,
                 ids: dict[SSAValue, str], directive: str, forced: frozenset[str] = frozenset()):
        self.step, self.stage, self.cut = step, stage, cut
        self.M = plan.microbatches
        self.outgoing = outgoing  # (segment, src, dst) -> [_Message] in send order
        self.ids = ids  # value of @main -> its stable name in carried values (`s0_F#2`)
        self.directive = directive
        self.env: dict[Key, SSAValue] = {}
        self.version: dict[int, dict[str, object]] = {}
        self.partial: dict[par.AccumulateOp, list[SSAValue]] = {}
        self.carried: list[tuple[str, object, SSAValue]] = []  # (name, what, type-carrying value)
        self.forced = forced  # stash names handed on even where the version is the latest
        self.stashed: list[set[str]] = []  # per step written, the stash names it handed on
        self.b_params = sorted({self.name_of(v) for t in step.tasks.get((stage, PassKind.B), [])
                                for v in t.args if self.is_weight(v)})

    # ------------------------------------------------------------ helpers

    def is_weight(self, v: SSAValue) -> bool:
        return isinstance(v, BlockArgument) and self.step.arg_roles[v.index][0] in ("param", "state", "buffer")

    def name_of(self, v: BlockArgument) -> str:
        return str(self.step.arg_roles[v.index][1])

    def add(self, op: Operation) -> Operation:
        self.block.add_op(op)
        return op

    def state(self, name: str) -> SSAValue:
        """The stage's `name` at the start of this step."""
        if name not in self.at_start:
            arg = next(a for a in self.step.main.args if self.is_weight(a) and self.name_of(a) == name)
            layout = self.step.arg_layouts[arg.index] or ShardingAttr.replicated(len(arg.type.get_shape()))
            op = self.add(par.StateOp(name, layout, arg.type))
            op.result.name_hint = arg.name_hint
            self.at_start[name] = op.result
        return self.at_start[name]

    def latest(self, name: str) -> SSAValue:
        return self.current.get(name) or self.state(name)

    # ------------------------------------------------------------ one step

    def write(self, k: int) -> Block:
        """The program of segment `k` (0: first step, 1 and 2: steady steps, 3: drain)."""
        self.block, self.k, self.base = Block(), k, k * self.M
        self.at_start: dict[str, SSAValue] = {}
        self.current: dict[str, SSAValue] = {}
        self.pending: list[tuple[SSAValue, int, str]] = []
        self.batch = 0
        self.received: dict[int, int] = defaultdict(int)
        self.loss: dict[par.AccumulateOp, list[SSAValue]] = {}
        self.take_carried()
        for dst in self.destinations():
            for msg in self.outgoing.get((k, self.stage, dst), []):
                if msg.made[0] < k:  # made in an earlier step, read in this one: sent first
                    self.pending.append((self.env[(msg.value, msg.mb)], dst, self.label(msg.value, msg.mb)))
        self.flush([])
        for index, event in enumerate(self.cut[k]):
            if event.kind == "U":
                self.update(event)
            else:
                self.run(event, index)
        self.flush([])
        for acc, values in self.loss.items():
            for old, new in zip(acc.sums, values, strict=True):
                for role, _name in self.step.stores.get(old, []):
                    if role == "loss":
                        self.add(par.OutputOp("loss", new))
        for name, value in self.current.items():
            self.add(par.SetStateOp(name, value))
        self.hand_on()
        return self.block

    def destinations(self) -> list[int]:
        return sorted({dst for (k, src, dst) in self.outgoing if k == self.k and src == self.stage})

    def label(self, value: SSAValue, mb: int) -> str:
        return f"{value.name_hint or 'v'} mb{mb - self.base}"

    def take_carried(self) -> None:
        """Takes what the previous step handed on and binds it to what it stands for."""
        env, version, partial = {}, defaultdict(dict), {}
        for name, what, like in self.carried:
            stash = what[0] == "version"
            op = self.add(par.CarriedOp(name, like.type, stash))
            op.result.name_hint = like.name_hint
            if what[0] == "value":
                env[what[1]] = op.result
            elif stash:
                version[what[1]][what[2]] = op.result
            else:
                partial.setdefault(what[1], []).append(op.result)
        for m, names in self.version.items():  # versions not handed on are the state at this step's start
            for name in names:
                version[m].setdefault(name, _STATE)
        self.env, self.version, self.partial = env, dict(version), partial
        self.carried = []

    def hand_on(self) -> None:
        """Hands the next step what this step's values later steps read: activations and
        received values of microbatches in flight, stashed versions, a gradient sum, and
        values to send in a later step."""
        later = [(j, e) for j in range(self.k + 1, _SEGMENTS) for e in self.cut[j]]
        need: dict[Key, None] = {}
        for _, e in later:
            if e.kind == "U":
                continue
            m = e.microbatches[0]
            for task in self.tasks(e.kind):
                for v in task.args:
                    if (v, m) in self.env:  # a value, or an input of a microbatch of this step
                        need[(v, m)] = None
        for (j, src, _), msgs in self.outgoing.items():
            if j > self.k and src == self.stage:
                for msg in msgs:
                    if (msg.value, msg.mb) in self.env:
                        need[(msg.value, msg.mb)] = None
        rel = (self.k + 1) * self.M
        for (v, m) in need:
            name = f"{self.ids[v]} mb{m - rel}"
            self.add(par.CarryOp(name, self.env[(v, m)]))
            self.carried.append((name, ("value", (v, m)), self.env[(v, m)]))
        pending_b = {e.microbatches[0] for _, e in later if e.kind == "B"}
        versions = {}
        for m in sorted(pending_b):
            if m not in self.version:
                continue
            versions[m] = {}
            for name, value in sorted(self.version[m].items()):
                value = self.state(name) if value is _STATE else value
                carried = f"{name} @mb{m - rel}"
                if value is self.latest(name) and carried not in self.forced:
                    versions[m][name] = _STATE  # the next step reads it as its state
                    continue
                self.add(par.CarryOp(carried, value))
                self.carried.append((carried, ("version", m, name), value))
                versions[m][name] = _STATE
        self.stashed.append({name for name, what, _ in self.carried if what[0] == "version"})
        for acc, values in self.partial.items():
            for i, value in enumerate(values):
                name = f"{acc.callee.root_reference.data}#{i} sum"
                self.add(par.CarryOp(name, value))
                self.carried.append((name, ("sum", acc), value))
        self.version = versions

    def tasks(self, kind: str) -> list[par.TaskOp]:
        return self.step.tasks.get((self.stage, PassKind(kind)), [])

    # ------------------------------------------------------------ events

    def run(self, event: asynchronous.Event, index: int) -> None:
        """A forward or backward of one microbatch: its tasks, their transfers, and (for a
        backward) its gradients added to the sum the next update applies."""
        m = event.microbatches[0]
        for task in self.tasks(event.kind):
            self.flush(self.receives(task, m))
            args = [self.operand(v, m, task) for v in task.args]
            new = self.add(par.TaskOp(task.callee.root_reference.data, self.stage, task.pass_kind.data, args,
                                      list(task.outs.types), m % self.M))
            for old, r in zip(task.outs, new.outs, strict=True):
                r.name_hint = old.name_hint
                self.env[(old, m)] = r
            for dst in self.destinations():
                for msg in self.outgoing.get((self.k, self.stage, dst), []):
                    if msg.made == (self.k, index) and msg.mb == m and msg.value in task.outs:
                        self.pending.append((self.env[(msg.value, m)], dst, self.label(msg.value, m)))
            for acc in self.step.accumulates.get(task, []):
                self.accumulate(acc, m, task)
        if event.kind == "F":
            self.version[m] = {name: self.latest(name) for name in self.b_params}

    def operand(self, v: SSAValue, m: int, user: par.TaskOp) -> SSAValue:
        if isinstance(v, BlockArgument):
            role, name = self.step.arg_roles[v.index]
            if role == "input":
                if (v, m) not in self.env:
                    if not 0 <= m - self.base < self.M:
                        raise StrategyError(f"{self.directive}: device {self.stage} reads input {name} of "
                                            f"microbatch {m} outside its step")
                    layout = self.step.arg_layouts[v.index] or ShardingAttr.replicated(len(v.type.get_shape()))
                    self.env[(v, m)] = self.add(par.InputOp(int(name), m - self.base, layout, v.type)).result
                return self.env[(v, m)]
            name = str(name)
            if user.pass_kind.data == PassKind.F:
                return self.latest(name)
            version = self.version.get(m, {}).get(name, _STATE)
            return self.state(name) if version is _STATE else version
        if (v, m) in self.env:
            return self.env[(v, m)]
        raise StrategyError(f"{self.directive}: on device {self.stage}, {user.callee} of microbatch {m} reads "
                            f"{v.name_hint or 'a value'} before the plan has computed it")

    def receives(self, task: par.TaskOp, m: int) -> list[tuple[int, SSAValue, int]]:
        found = []
        for v in task.args:
            src = self.step.device_of_value(v, m)
            if src is not None and src != self.stage and (v, m) not in self.env:
                found.append((src, v, m))
        return found

    def flush(self, receives) -> None:
        """The pending sends and the receives that bring in `receives`, as one batch."""
        ops: list[Operation] = [par.SendOp(v, dst, label, self.batch) for v, dst, label in self.pending]
        self.pending = []
        for src, value, m in receives:
            msgs = self.outgoing.get((self.k, src, self.stage), [])
            while (value, m) not in self.env:
                if self.received[src] >= len(msgs):
                    raise StrategyError(f"{self.directive}: device {self.stage} reads {value.name_hint} of "
                                        f"microbatch {m}, which device {src} never sends in this step")
                msg = msgs[self.received[src]]
                self.received[src] += 1
                recv = par.RecvOp(msg.value.type, src, self.label(msg.value, msg.mb), self.batch)
                recv.result.name_hint = msg.value.name_hint
                ops.append(recv)
                self.env[(msg.value, msg.mb)] = recv.result
        for op in ops:
            self.add(op)
        if ops:
            self.batch += 1

    def accumulate(self, acc: par.AccumulateOp, m: int, task: par.TaskOp) -> None:
        """Adds microbatch `m`'s results to the running sum: the loss share over this step's
        forwards, gradients over the microbatches since the last update."""
        new = [self.env[(v, m)] for v in acc.values]
        sums = self.loss if task.pass_kind.data == PassKind.F else self.partial
        if acc in sums:
            total = self.add(par.TaskOp(acc.callee.root_reference.data, self.stage, task.pass_kind.data,
                                        [*sums[acc], *new], list(acc.sums.types), m % self.M))
            for old, r in zip(acc.sums, total.outs, strict=True):
                r.name_hint = old.name_hint
            new = list(total.outs)
        sums[acc] = new

    def grad_accumulates(self) -> list[par.AccumulateOp]:
        return [acc for kind in (PassKind.B, PassKind.W) for t in self.step.tasks.get((self.stage, kind), [])
                for acc in self.step.accumulates.get(t, [])]

    def update(self, event: asynchronous.Event) -> None:
        """`@main`'s per-step ops of the stage (bucket, update) on the gradient sum of the
        event's microbatches; the new weights and state become the latest versions."""
        local: dict[SSAValue, SSAValue] = {}
        for acc in self.grad_accumulates():
            if acc not in self.partial:
                raise StrategyError(f"{self.directive}: stage {self.stage}'s update {event} has no gradient")
            local |= dict(zip(acc.sums, self.partial.pop(acc), strict=True))
        for op in self.step.per_step:
            if self.step.stage_of(op) != self.stage:
                continue
            args = []
            for v in op.operands:
                if isinstance(v, BlockArgument):
                    args.append(self.latest(self.name_of(v)))
                else:
                    args.append(local[v])
            if isinstance(op, par.AllReduceBucketOp):
                self.flush([])  # a collective goes behind the pending sends
                new = self.add(par.AllReduceBucketOp(op.bucket.value.data, self.stage, args,
                                                     op.mesh.root_reference.data, op.axis_names(),
                                                     op.stage_list()))
                results = list(new.sums)
            else:
                new = self.add(par.TaskOp(op.callee.root_reference.data, self.stage, op.pass_kind.data, args,
                                          list(op.outs.types)))
                results = list(new.outs)
            for old, r in zip(op.results, results, strict=True):
                r.name_hint = old.name_hint
                local[old] = r
                for role, name in self.step.stores.get(old, []):
                    if role in ("param", "state"):
                        self.current[name] = r


@dataclass(frozen=True)
class ExpandAsyncPass(ModulePass):
    """Writes the first, steady and drain programs of each device of an asynchronous
    pipeline (`plan`: pipedream or pipedream-2bw) from `@main` and the update plan."""

    name = "expand-async"

    plan: str = "pipedream"
    directive: str = "expand-async"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.plan not in asynchronous.PLANS:
            raise StrategyError(f"{self.directive}: unknown asynchronous plan {self.plan!r}; "
                                f"known: {', '.join(asynchronous.PLANS)}")
        schedule = find_schedule(op)
        M = module_count(op, MICROBATCHES, self.directive, "microbatch")
        S = module_count(op, NUM_STAGES, self.directive, "pipeline-split")
        if len(schedule.devices()) != S:
            raise StrategyError(f"{self.directive}: an asynchronous pipeline runs one stage per device; "
                                f"{S} stages on {len(schedule.devices())} devices")
        if M < S - 1:
            raise StrategyError(f"{self.directive}: schedule {self.plan!r} needs microbatches >= stages - 1 "
                                f"(the first stage's warm-up of {S - 1} forwards must fit in the first step); "
                                f"got {M} microbatches for {S} stages")
        main = main_function(op)
        step = StepGraph(main, M, S, {s: s for s in range(S)},
                     {(s, m): s for s in range(S) for m in range(_SEGMENTS * M)}, set())
        self._check(step)
        try:
            plan = asynchronous.plan(self.plan, S, M, _SEGMENTS - 1)  # first, two steady steps; the drain follows
        except ScheduleError as e:
            raise StrategyError(f"{self.directive}: {e}") from e
        cuts = [segments(plan, s) for s in range(S)]
        for s, cut in enumerate(cuts):
            if _shifted(cut[1], M) != _shifted(cut[2], 0):
                raise StrategyError(f"{self.directive}: the plan of stage {s} is not periodic from its second "
                                    "step on; an asynchronous pipeline repeats one step program")
        segment_of = {(s, e.kind, e.microbatches[0]): k for s, cut in enumerate(cuts)
                      for k, events in enumerate(cut) for e in events if e.kind != "U"}
        outgoing = self._messages(step, cuts, segment_of)
        ids: dict[SSAValue, str] = {a: f"input{name}" for a, (role, name) in zip(main.args, step.arg_roles,
                                                                                 strict=True) if role == "input"}
        for task in (o for o in main.body.block.ops if isinstance(o, par.TaskOp)):
            for i, r in enumerate(task.outs):
                ids[r] = f"{task.callee.root_reference.data}#{i}"
        blocks = []
        for s in range(S):
            # A version that is the stage's latest at a step's end is read back as state, unless
            # the steady step hands it on (2BW's first step has no update yet): write once to
            # learn which versions the steady steps hand on, then hand those on from the first.
            writer = _Writer(step, s, plan, cuts[s], outgoing, ids, self.directive)
            for k in range(_SEGMENTS - 1):
                writer.write(k)
            steady = frozenset(writer.stashed[1] | writer.stashed[2])
            writer = _Writer(step, s, plan, cuts[s], outgoing, ids, self.directive, steady)
            blocks.append([writer.write(k) for k in range(_SEGMENTS)])
        for s, (first, steady, again, drain) in enumerate(blocks):
            if _text(steady, s) != _text(again, s):
                raise StrategyError(f"{self.directive}: device {s}'s second and third steps differ; the plan "
                                    "does not repeat one step program")
            op.body.block.add_op(par.ProgramOp(f"device{s}_first", s, Region(first), par.PHASE_FIRST))
            op.body.block.add_op(par.ProgramOp(f"device{s}", s, Region(steady)))
            op.body.block.add_op(par.ProgramOp(f"device{s}_drain", s, Region(drain), par.PHASE_DRAIN))

    def _check(self, step: StepGraph) -> None:
        """Refuses what the asynchronous programs do not write."""
        if step.split_weights:
            raise StrategyError(f"{self.directive}: schedule {self.plan!r} runs whole backwards; the step's "
                                "backward is split into B and W")
        for o in step.per_step:
            if not isinstance(o, par.AllReduceBucketOp) and not (
                    isinstance(o, par.TaskOp) and o.pass_kind.data == PassKind.UPDATE):
                raise StrategyError(f"{self.directive}: schedule {self.plan!r} composes with data parallelism "
                                    f"(buckets) and per-stage updates; the step also has {o.name} (stage "
                                    f"{step.stage_of(o)}), from ZeRO, a buffer update or a reshard of the step")
            if isinstance(o, par.AllReduceBucketOp) and len(o.stage_list()) > 1:
                raise StrategyError(f"{self.directive}: schedule {self.plan!r} updates each stage on its own; "
                                    f"a weight tied across stages {o.stage_list()} needs a synchronous schedule")
        if any(role == "tangent" for role, _ in step.arg_roles):
            raise StrategyError(f"{self.directive}: run microbatch first (the step still has tangent arguments)")

    def _messages(self, step: StepGraph, cuts, segment_of) -> dict[tuple[int, int, int], list[_Message]]:
        """(segment, src, dst) -> the messages src sends dst in that segment, in send order:
        those made in earlier segments first (sent at its start), then as they are made."""
        found: dict[tuple[int, int, int], list[_Message]] = defaultdict(list)
        for s, cut in enumerate(cuts):
            for k, events in enumerate(cut):
                for index, e in enumerate(events):
                    if e.kind == "U":
                        continue
                    m = e.microbatches[0]
                    for task in step.tasks.get((s, PassKind(e.kind)), []):
                        for r in task.outs:
                            reads: dict[int, int] = {}  # reading device -> the first segment it reads in
                            for u in r.uses:
                                if isinstance(u.operation, par.TaskOp) and u.operation.pass_kind.data != PassKind.UPDATE:
                                    dst = u.operation.stage.value.data
                                    at = segment_of[(dst, u.operation.pass_kind.data.value, m)]
                                    reads[dst] = min(reads.get(dst, at), at)
                            for dst, read in sorted(reads.items()):
                                if dst == s:
                                    continue
                                if read < k:
                                    raise StrategyError(f"{self.directive}: stage {dst} reads {r.name_hint} of "
                                                        f"microbatch {m} before stage {s} makes it")
                                found[(read, s, dst)].append(_Message(r, m, (k, index)))
        for msgs in found.values():
            msgs.sort(key=lambda msg: msg.made)
        return found


def _text(block: Block, device: int) -> str:
    """`block` printed as a device program (to compare two steps)."""
    clone = Block()
    mapping: dict[SSAValue, SSAValue] = {}
    for op in block.ops:
        copy = op.clone(value_mapper=mapping)
        for r in copy.results:
            r.name_hint = None  # names follow the values' history; the structure is what repeats
        clone.add_op(copy)
    return str(par.ProgramOp(f"device{device}", device, Region(clone)))


__all__ = ["ExpandAsyncPass", "segments"]
