"""lower-to-exec: writes one `exec.program` per rank from the schedule and the stage functions.

For rank r at pipeline position s (and any data-parallel index), the program
walks row s of `par.schedule` and for each action:

  * reads parameters and optimizer state (`exec.state`), its slice of the
    inputs (`exec.load_input`), and receives values produced on other stages
    (`exec.recv` + `exec.wait`, on the `comm` stream);
  * launches the stage's F or B function on the `compute` stream;
  * sends each result another stage reads (`exec.send` on `comm`, after an
    event orders it behind the compute that produced it);
  * sums gradients (and the loss share) over microbatches with
    `@s<i>_accumulate`.

A backward action launches the stage's backward chunks in order. In the
stage's last backward, each gradient bucket (of the data-parallel pass) is
reduced over every rank that holds its parameters (data-parallel replicas, and
the stages sharing a tied weight) by one `exec.all_reduce` on `comm` as soon as
the chunk that completes it has run, so it overlaps the remaining chunks. Then
the program waits for the buckets, launches `@s<i>_update` and stores the new
parameters and optimizer state (`exec.set_state`). Every tensor is freed after its last use
(`exec.free`). The `par.all_reduce` markers are removed from the update
functions, which then hold torch ops only.

Process groups (`exec.process_group`) are declared once at module level:
`pp_<i>` for each pipeline group and `grad_<i>` for each distinct set of
ranks that reduce a gradient together. Option: device (cpu | cuda).
Requires: mesh, pipeline-split, outline-stages, optimizer, microbatch and
schedule have run (data-parallel when the mesh has a data-parallel axis).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.ir import Block, Operation, Region, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects import exec as ex
from piperc.dialects import par
from piperc.dialects.par import MeshAttr, PassKind
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.data_parallel import BUCKET, DP_AXIS
from piperc.passes.mesh import find_mesh
from piperc.passes.microbatch import LOSS_SHARE, MICROBATCHES, accumulate_loss_name, accumulate_name
from piperc.passes.outline_stages import arg_keys, function_name, result_keys, stage_functions
from piperc.passes.pipeline_split import NUM_STAGES, module_count
from piperc.passes.schedule import find_schedule

DEVICE = "exec.device"
"""Module attribute: the device kind the programs run on (cpu or cuda)."""


def state_name(key: str) -> str:
    """The runtime's name for a keyed state value: `param:w` -> `w`, `state:w.exp_avg` -> `w.exp_avg`."""
    return key.split(":", 1)[1]


@dataclass
class _Plan:
    """What every program needs to agree on: stages, messages, groups."""

    mesh: MeshAttr
    pp_axis: str
    stages: int
    microbatches: int
    table: dict[int, list[par.ActionAttr]]
    functions: dict[str, func.FuncOp]
    producer: dict[str, int] = field(default_factory=dict)  # key -> producing stage
    consumers: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    tags: dict[tuple[str, int], int] = field(default_factory=dict)
    groups: dict[tuple[int, ...], str] = field(default_factory=dict)
    owners: dict[str, tuple[int, ...]] = field(default_factory=dict)
    backward: dict[int, list[func.FuncOp]] = field(default_factory=dict)
    bucket_of: dict[int, dict[str, int]] = field(default_factory=dict)  # stage -> grad key -> bucket

    def fn(self, stage: int, kind: PassKind) -> func.FuncOp:
        """The F or update function of a stage."""
        return self.functions[function_name(stage, kind)]

    def action_functions(self, stage: int, kind: PassKind) -> list[func.FuncOp]:
        """The functions one action runs: F, or the stage's backward chunks in order."""
        return self.backward[stage] if kind == PassKind.B else [self.fn(stage, kind)]

    def tag(self, key: str, consumer: int, microbatch: int) -> int:
        """The tag of the message carrying `key` of `microbatch` to stage `consumer` (same on both ends)."""
        return self.tags[(key, consumer)] * self.microbatches + microbatch

    def peer(self, rank: int, stage: int) -> int:
        """The rank holding `stage` among `rank`'s pipeline group."""
        return self.mesh.rank_of({**self.mesh.coords(rank), self.pp_axis: stage})

    def pp_group(self, rank: int) -> str:
        """The name of `rank`'s pipeline process group."""
        return self.groups[tuple(self.mesh.group_ranks(self.pp_axis, rank))]


@dataclass(frozen=True)
class LowerToExecPass(ModulePass):
    """Lowers the scheduled stage functions to one `exec.program` per rank."""

    name = "lower-to-exec"

    device: str = "cpu"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.device not in ("cpu", "cuda"):
            raise StrategyError(f"lower-to-exec: device must be cpu or cuda, got '{self.device}'")
        plan = self._plan(op)
        self._strip_reduce_markers(plan)
        for ranks, name in plan.groups.items():
            op.body.block.add_op(ex.ProcessGroupOp(name, ranks))
        for rank in range(plan.mesh.size()):
            op.body.block.add_op(_ProgramBuilder(plan, rank).build())
        op.attributes[DEVICE] = StringAttr(self.device)

    def _plan(self, module: ModuleOp) -> _Plan:
        mesh = find_mesh(module)
        schedule = find_schedule(module)
        stages = module_count(module, NUM_STAGES, "lower-to-exec", "pipeline-split")
        functions = {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}
        plan = _Plan(mesh, schedule.axis.data, stages,
                     module_count(module, MICROBATCHES, "lower-to-exec", "microbatch"),
                     schedule.table(), functions)
        plan.backward = {s: stage_functions(module, s, PassKind.B) for s in range(stages)}
        plan.bucket_of = {s: _buckets_of(plan.fn(s, PassKind.UPDATE)) for s in range(stages)}
        dp_axis = module.attributes.get(DP_AXIS)
        unused = [a for a in mesh.axis_names()
                  if mesh.axis_size(a) > 1 and a not in (plan.pp_axis, dp_axis.data if dp_axis else None)]
        if unused:
            raise StrategyError(f"mesh axis '{unused[0]}' is used by no directive")

        for s in range(stages):
            for fn in plan.action_functions(s, PassKind.F) + plan.action_functions(s, PassKind.B):
                for key in result_keys(fn):
                    if key.startswith("v"):
                        plan.producer[key] = s
                for key in arg_keys(fn):
                    if key.startswith("v"):
                        plan.consumers[key].add(s)
        for key in sorted(plan.producer, key=lambda k: int(k[1:])):
            for consumer in sorted(plan.consumers[key] - {plan.producer[key]}):
                plan.tags[(key, consumer)] = len(plan.tags)

        if stages > 1:  # a one-stage pipeline sends nothing
            for group in mesh.all_groups(plan.pp_axis):
                plan.groups.setdefault(tuple(group), f"pp_{len(plan.groups)}")
        stages_of: dict[str, list[int]] = defaultdict(list)
        for s in range(stages):
            for key in arg_keys(plan.fn(s, PassKind.UPDATE)):
                if key.startswith("param:"):
                    stages_of[key.removeprefix("param:")].append(s)
        n_grad = 0
        for rank in range(mesh.size()):
            coords = mesh.coords(rank)
            for name, holders in stages_of.items():
                if coords[plan.pp_axis] not in holders:
                    continue
                owners = tuple(sorted(
                    r for r in range(mesh.size())
                    if mesh.coords(r)[plan.pp_axis] in holders
                    and all(mesh.coords(r)[a] == coords[a] for a in mesh.axis_names()
                            if a not in (plan.pp_axis, dp_axis.data if dp_axis else None))
                ))
                plan.owners.setdefault(name, owners)
                if len(owners) > 1 and owners not in plan.groups:
                    plan.groups[owners] = f"grad_{n_grad}"
                    n_grad += 1
        return plan

    def _strip_reduce_markers(self, plan: _Plan) -> None:
        for s in range(plan.stages):
            block = plan.fn(s, PassKind.UPDATE).body.block
            for o in list(block.ops):
                if isinstance(o, par.AllReduceOp):
                    o.results[0].replace_all_uses_with(o.operands[0])
                    o.detach()
                    o.erase()


def _buckets_of(update: func.FuncOp) -> dict[str, int]:
    """grad key -> bucket number, from the data-parallel pass's markers (all 0 without it)."""
    buckets = {}
    for o in update.body.block.ops:
        if isinstance(o, par.AllReduceOp):
            arg_index = update.body.block.args.index(o.operands[0])
            buckets[arg_keys(update)[arg_index]] = o.attributes[BUCKET].value.data
    return buckets


class _ProgramBuilder:
    """Builds the `exec.program` of one rank."""

    def __init__(self, plan: _Plan, rank: int):
        self.plan = plan
        self.rank = rank
        self.stage = plan.mesh.coords(rank)[plan.pp_axis]
        self.block = Block()
        self.values: dict[tuple[str, int], SSAValue] = {}
        self.state: dict[str, SSAValue] = {}
        self.acc: dict[str, SSAValue] = {}
        self.sends: list[SSAValue] = []
        self.reduced: dict[str, SSAValue] = {}
        self.reductions: list[SSAValue] = []
        self.final: set[str] = set()
        self.pending = self._buckets()

    def _buckets(self) -> list[tuple[str, list[str]]]:
        """(group, gradient keys) per bucket to reduce, in bucket order."""
        update = self.plan.fn(self.stage, PassKind.UPDATE)
        bucket_of = self.plan.bucket_of[self.stage]
        by_bucket: dict[tuple[int, str], list[str]] = defaultdict(list)
        for key in arg_keys(update):
            if not key.startswith("grad:"):
                continue
            owners = self.plan.owners[key.removeprefix("grad:")]
            if len(owners) > 1:
                by_bucket[(bucket_of.get(key, 0), self.plan.groups[owners])].append(key)
        return [(group, keys) for (_, group), keys in sorted(by_bucket.items())]

    def add(self, op: Operation) -> Operation:
        """Appends `op` to the program."""
        self.block.add_op(op)
        return op

    def build(self) -> ex.ProgramOp:
        """The whole program: the schedule row's actions, the update, the loss, frees."""
        self.compute = self.add(ex.StreamOp("compute")).results[0]
        self.comm = self.add(ex.StreamOp("comm")).results[0]
        actions = self.plan.table[self.stage]
        last_backward = max(i for i, a in enumerate(actions) if a.pass_kind == PassKind.B)
        for i, action in enumerate(actions):
            self.run(action, final=i == last_backward)
            if i == last_backward:
                self.update()
        if LOSS_SHARE in self.acc:
            self.add(ex.OutputOp("loss", self.acc[LOSS_SHARE]))
        if self.sends:
            self.add(ex.WaitOp(self.sends))
        _insert_frees(self.block)
        return ex.ProgramOp(f"rank{self.rank}", self.rank, self.plan.mesh.size(), Region(self.block))

    def read_state(self, key: str, type_) -> SSAValue:
        """This rank's state named by `key`, read once per program."""
        name = state_name(key)
        if name not in self.state:
            self.state[name] = self.add(ex.StateOp(name, type_)).results[0]
        return self.state[name]

    def run(self, action: par.ActionAttr, final: bool) -> None:
        """One schedule action: its function (or backward chunks, in order) with their messages.

        In the stage's last backward (`final`), each gradient bucket is issued
        as soon as the chunk that completes it has run.
        """
        for fn in self.plan.action_functions(self.stage, action.pass_kind):
            produced = self.launch(fn, action)
            grads = [k for k in produced if k.startswith("grad:")]
            if grads:
                self.accumulate(accumulate_name(fn.sym_name.data), grads, produced, action)
            if LOSS_SHARE in produced:
                self.accumulate(accumulate_loss_name(self.stage), [LOSS_SHARE], produced, action)
            if final:
                self.issue_ready_buckets(grads)

    def launch(self, fn: func.FuncOp, action: par.ActionAttr) -> dict[str, SSAValue]:
        """Gathers `fn`'s arguments (state, inputs, local or received values), launches it,
        sends the results other stages read; returns its gradients and loss share by key."""
        mb = action.microbatch
        args = []
        for key, arg in zip(arg_keys(fn), fn.args, strict=True):
            if key.startswith(("param:", "buffer:")):
                args.append(self.read_state(key, arg.type))
            elif key.startswith("input:"):
                args.append(self.add(ex.LoadInputOp(key.removeprefix("input:"), mb, arg.type)).results[0])
            elif (key, mb) in self.values:
                args.append(self.values[(key, mb)])
            else:
                args.append(self.receive(key, mb, arg.type))
        launch = self.add(ex.LaunchOp(fn.sym_name.data, args, self.compute, list(fn.function_type.outputs.data),
                                      stage=self.stage, pass_kind=action.pass_kind.value, microbatch=mb))
        produced: dict[str, SSAValue] = {}
        event = None
        for key, value in zip(result_keys(fn), launch.results, strict=True):
            if key.startswith("grad:") or key == LOSS_SHARE:
                produced[key] = value
                continue
            if not key.startswith("v"):
                continue
            self.values[(key, mb)] = value
            for consumer in sorted(self.plan.consumers[key] - {self.stage}):
                if event is None:
                    event = self.add(ex.EventRecordOp(self.compute)).results[0]
                    self.add(ex.EventWaitOp(self.comm, event))
                tag = self.plan.tag(key, consumer, mb)
                send = ex.SendOp(value, self.plan.peer(self.rank, consumer), self.plan.pp_group(self.rank),
                                 tag, self.comm)
                self.sends.append(self.add(send).results[0])
        return produced

    def receive(self, key: str, mb: int, type_) -> SSAValue:
        """Receives `key` of microbatch `mb` from the stage that produces it."""
        producer = self.plan.producer.get(key)
        if producer is None:
            raise StrategyError(f"lower-to-exec: value {key} is read by stage {self.stage} but produced nowhere")
        recv = self.add(ex.RecvOp(self.plan.peer(self.rank, producer), self.plan.pp_group(self.rank),
                                  self.plan.tag(key, self.stage, mb), self.comm, type_))
        self.add(ex.WaitOp([recv.results[0]]))
        self.values[(key, mb)] = recv.results[1]
        return recv.results[1]

    def accumulate(self, name: str, keys: list[str], produced, action) -> None:
        """Adds this microbatch's `keys` to their sums (the first microbatch starts them)."""
        if not all(k in self.acc for k in keys):
            self.acc.update({k: produced[k] for k in keys})
            return
        fn = self.plan.functions[name]
        args = [self.acc[k] for k in keys] + [produced[k] for k in keys]
        launch = self.add(ex.LaunchOp(name, args, self.compute, list(fn.function_type.outputs.data),
                                      stage=self.stage, pass_kind=action.pass_kind.value,
                                      microbatch=action.microbatch))
        self.acc.update(zip(keys, launch.results, strict=True))

    def issue_ready_buckets(self, finished: list[str]) -> None:
        """All-reduces, on `comm`, every bucket whose gradients are all final."""
        self.final |= set(finished)
        ready = [(g, keys) for g, keys in self.pending if set(keys) <= self.final]
        if not ready:
            return
        event = self.add(ex.EventRecordOp(self.compute)).results[0]
        self.add(ex.EventWaitOp(self.comm, event))
        for group, keys in ready:
            reduce = self.add(ex.AllReduceOp([self.acc[k] for k in keys], group, self.comm))
            self.reductions.append(reduce.results[0])
            self.reduced.update(zip(keys, reduce.results[1:], strict=True))
            self.pending.remove((group, keys))

    def update(self) -> None:
        """Waits for the gradient buckets, launches the update and stores the new state."""
        if self.pending:
            raise StrategyError(f"lower-to-exec: gradients {self.pending[0][1]} are never final on stage {self.stage}")
        if self.reductions:
            self.add(ex.WaitOp(self.reductions))
        update = self.plan.fn(self.stage, PassKind.UPDATE)
        args = []
        for key, arg in zip(arg_keys(update), update.args, strict=True):
            if key.startswith("grad:"):
                args.append(self.reduced.get(key, self.acc.get(key)))
            else:
                args.append(self.read_state(key, arg.type))
        launch = self.add(ex.LaunchOp(update.sym_name.data, args, self.compute,
                                      list(update.function_type.outputs.data),
                                      stage=self.stage, pass_kind="update"))
        for key, value in zip(result_keys(update), launch.results, strict=True):
            self.add(ex.SetStateOp(state_name(key), value))


def _insert_frees(block: Block) -> None:
    """Inserts `exec.free` after the last use of every tensor defined in `block`."""
    last_use: dict[SSAValue, Operation] = {}
    for o in block.ops:
        for v in o.operands:
            if isinstance(v.type, ValueTensorType):
                last_use[v] = o
        for r in o.results:
            if isinstance(r.type, ValueTensorType):
                last_use.setdefault(r, o)
    dying: dict[Operation, list[SSAValue]] = defaultdict(list)
    for v, o in last_use.items():
        dying[o].append(v)
    for o, values in dying.items():
        block.insert_op_after(ex.FreeOp(values), o)
