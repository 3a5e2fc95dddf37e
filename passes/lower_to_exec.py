"""lower-to-exec: one `exec.program` per rank, op for op from the device's `par.program`.

Each rank of the mesh runs the `par.program` of its coordinate along the
pipeline axis (every data-parallel replica, i.e. every other coordinate, runs
the same one). The pass reads only `par.mesh @mesh`, the `par.program` ops, the
pipeline axis and the signatures of the functions the tasks call; it writes the
process groups and `exec.program @rank<r>` for every rank, then erases the
`par.program` ops. Each par op becomes one exec op:

  * `par.state`, `par.set_state`, `par.output` -> `exec.state`, `exec.set_state`, `exec.output`;
  * `par.carried`, `par.carry` -> `exec.carried`, `exec.carry` (a value handed on to the next
    step is not freed);
  * `par.input i` -> `exec.load_input "i"` with the input's layout (the runtime cuts
    the global input by the mesh axes the layout names, then takes the microbatch);
  * `par.task` -> `exec.launch` on the `compute` stream (callee, stage, pass, microbatch);
    a task in lane k > 0 of an overlap group (`par.task ... lane 1`) on the stream
    `compute<k>`, which the program creates (after the channels' streams) when one of its tasks uses it;
  * `par.send`/`par.recv` -> `exec.send`/`exec.recv` with the rank whose pipeline
    coordinate is the peer device and whose other coordinates are this rank's, over the
    channel of that direction: a group of the two ranks of its own (`@p2p_<src>_<dst>`),
    used by one stream on each side (the sender's `to<dst>`, the receiver's `from<src>`).
    The tag is the message's sequence number for its (sender, receiver) pair, so both
    ends agree. A send that blocks until its receive is posted (NCCL) holds up only later
    sends in its direction, never a receive, so transfers that cross between two ranks
    need no batch (the `batch` of `par.send`/`par.recv` is not needed here), and waiting
    for a received tensor never waits for a send: a device runs its next task as soon as
    its input has arrived, as torch.distributed.pipelining's runtime does;
  * `par.all_reduce_bucket` -> one bucketed `exec.all_reduce` on `comm` over the ranks
    that differ from this rank only along the bucket's `axes` and whose pipeline
    coordinate is one of its `stages` (`@grad_<i>`); a group of one rank reduces
    nothing, so the sums are the operands and no collective is issued;
  * a collective of the step (`par.all_gather`, `reduce_scatter`, `all_reduce`,
    `all_to_all`, as lower-reshard writes them from a reshard in `@main`, e.g. ZeRO-3's
    gather of a parameter kept whole across microbatches) -> the same `exec` collective on
    `comm` over the ranks that differ from this rank only along its axis (`@grad_<i>` too).

Then the ordering and lifetime rules that make the program correct under NCCL
(checked by `exec.program`'s verifier):

  * a tensor made on one stream and read on another is ordered after its producer
    there (`exec.event_record` + `exec.event_wait`, once before a run of comm ops
    that needs it) and given to `exec.record_stream` for that stream; so the lanes of an
    overlap group run side by side, and what reads a later lane's result after the
    group (a task on `compute`, a send on its channel's stream) waits for that lane's event; a later
    lane also records the state and inputs it reads (the runtime makes them on `compute`);
  * the host reads (`exec.set_state`, `exec.output`) what `compute` has: a tensor made
    on another compute stream is ordered after it on `compute` first (the runtime reads
    outputs and keeps state on `compute`, the device's default stream);
  * the results of an async op (recv, batch_p2p, all_reduce) are waited
    (`exec.wait` on the stream of their first use; host reads wait on `compute`)
    before that use;
  * every tensor is freed (`exec.free`) right after its last use, except that a
    tensor an async op still reads or writes stays alive until that op's wait: an op
    with results (all_reduce, recv, batch with receives) is waited where its results
    are first used, and the tensors it holds are freed right after that wait; an op
    without results (a send) whose tensor is dead is waited on its own stream once this
    rank has received a message the peer sent after posting the send's receive
    (`_send_releases`; waiting at once would hold the host until the peer posts it), and
    the tensor is freed right after;
  * whatever is still in flight is waited at the end of the program.

Streams: `compute`, then `comm` when the program has a collective, then the channels'
streams by peer (`to<p>` before `from<p>`), then the overlap lanes' `compute<k>`.
Process groups are declared in an order every rank agrees on: the channels
`@p2p_<src>_<dst>` in the order ranks 0, 1, ... meet them in their programs, then
`@grad_<i>` for each distinct bucket group of more than one rank, in the same order.

Options: device (cpu | cuda, recorded as the module attribute `exec.device`);
axis, the pipeline axis when the module has no `par.schedule` (default "pp"; with
a schedule the schedule's axis is used, and an `axis` that differs is an error).
Programs that carry values between steps come in three phases (`par.program ... phase
"first"`, the steady `step`, `phase "drain"`); each phase's programs are lowered as a set of
their own (`exec.program @rank<r>_first`, `@rank<r>`, `@rank<r>_drain`): every transfer of a
step is sent and received within that step, so each phase is a complete program for every
rank, and the process groups are the union of the phases', declared once.
Requires: `expand-schedule` (or `expand-async`) has written one `par.program @device<d>
device d` per device 0..n-1 along the pipeline axis (per phase).
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.ir import Block, Operation, Region, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects import exec as ex
from piperc.dialects import par
from piperc.dialects.par import MeshAttr
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.mesh import find_mesh

DEVICE = "exec.device"
"""Module attribute: the device kind the programs run on (cpu or cuda)."""

_ASYNC = (ex.SendOp, ex.RecvOp, ex.BatchP2POp, ex.AllReduceOp, ex.AllGatherOp, ex.ReduceScatterOp, ex.AllToAllOp)
_STEP_COLLECTIVES = (par.AllReduceOp, par.AllGatherOp, par.ReduceScatterOp, par.AllToAllOp)
"""The `par` collectives a program may hold (lower-reshard writes them from a step's reshards)."""


@dataclass(frozen=True)
class LowerToExecPass(ModulePass):
    """Maps each device's `par.program` to one `exec.program` per rank of the mesh."""

    name = "lower-to-exec"

    device: str = "cpu"
    axis: str | None = None

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.device not in ("cpu", "cuda"):
            raise StrategyError(f"lower-to-exec: device must be cpu or cuda, got '{self.device}'")
        mesh = find_mesh(op)
        axis = self._pipeline_axis(op, mesh)
        phases = _phase_programs(op, mesh, axis)
        channels: dict[tuple[int, int], str] = {}
        grad_groups: dict[tuple[int, ...], str] = {}
        device_of: dict[int, int] = {}
        for programs in phases.values():  # the groups of every phase, declared once, in phase order
            for pair, name in _channels(mesh, axis, programs).items():
                channels.setdefault(pair, name)
            for ranks in _grad_groups(mesh, axis, programs):
                grad_groups.setdefault(ranks, f"grad_{len(grad_groups)}")
            device_of |= stage_devices(programs)
        for (src, dst), name in channels.items():
            op.body.block.add_op(ex.ProcessGroupOp(name, sorted((src, dst))))
        for ranks, name in grad_groups.items():
            op.body.block.add_op(ex.ProcessGroupOp(name, ranks))
        for phase, programs in phases.items():
            releases = _send_releases(programs)
            for rank in range(mesh.size()):
                builder = _RankProgram(mesh, axis, rank, channels, grad_groups, device_of, releases)
                op.body.block.add_op(builder.build(programs[mesh.coords(rank)[axis]], phase))
        for programs in phases.values():
            for program in programs:
                program.detach()
                program.erase()
        op.attributes[DEVICE] = StringAttr(self.device)

    def _pipeline_axis(self, module: ModuleOp, mesh: MeshAttr) -> str:
        """The schedule's axis; without a schedule, the `axis` option or "pp"."""
        schedule = next((o for o in module.ops if isinstance(o, par.ScheduleOp)), None)
        axis = schedule.axis.data if schedule is not None else (self.axis or "pp")
        if self.axis is not None and self.axis != axis:
            raise StrategyError(f"lower-to-exec: axis '{self.axis}' differs from the pipeline axis "
                                f"'{axis}' of par.schedule @{schedule.sym_name.data}; drop the option")
        if axis not in mesh.axis_names():
            raise StrategyError(f"lower-to-exec: the pipeline axis '{axis}' is not in the mesh "
                                f"{list(mesh.axis_names())}; name it with lower-to-exec{{axis=...}}")
        return axis


def _phase_programs(module: ModuleOp, mesh: MeshAttr, axis: str) -> dict[str, list[par.ProgramOp]]:
    """Per phase the module's programs have (`step` alone, or `first`, `step` and `drain` for
    programs that carry values between steps), the `par.program` of each device in order."""
    found = {p.phase_name() for p in module.ops if isinstance(p, par.ProgramOp)} or {par.PHASE_STEP}
    if found != {par.PHASE_STEP} and found != set(par.PHASES):
        raise StrategyError(f"lower-to-exec: the programs have phases {sorted(found)}; a module has every "
                            f"device's step program alone, or its {', '.join(par.PHASES)} programs")
    return {phase: _device_programs(module, mesh, axis, phase) for phase in par.PHASES if phase in found}


def _device_programs(module: ModuleOp, mesh: MeshAttr, axis: str,
                     phase: str = par.PHASE_STEP) -> list[par.ProgramOp]:
    """The `par.program` of each device 0..n-1 along `axis` for `phase`, in device order."""
    devices = mesh.axis_size(axis)
    found: dict[int, par.ProgramOp] = {}
    for program in module.ops:
        if not isinstance(program, par.ProgramOp) or program.phase_name() != phase:
            continue
        device = program.device.value.data
        if not 0 <= device < devices:
            raise StrategyError(f"lower-to-exec: par.program @{program.sym_name.data} is for device {device}, "
                                f"but the pipeline axis '{axis}' has devices 0..{devices - 1}")
        if device in found:
            raise StrategyError(f"lower-to-exec: par.program @{found[device].sym_name.data} and "
                                f"@{program.sym_name.data} are both for device {device}")
        found[device] = program
    if not found:
        raise StrategyError("lower-to-exec: the module has no par.program; run expand-schedule first")
    missing = [d for d in range(devices) if d not in found]
    if missing:
        raise StrategyError(f"lower-to-exec: no par.program for device(s) {missing} of the pipeline axis "
                            f"'{axis}' ({devices} devices); expand-schedule writes one per device")
    return [found[d] for d in range(devices)]


def peer_rank(mesh: MeshAttr, axis: str, rank: int, op: par.SendOp | par.RecvOp, where: str) -> int:
    """The rank of a transfer's peer: the one whose pipeline coordinate is the peer device
    and whose other coordinates are `rank`'s."""
    device = op.peer.value.data
    devices = mesh.axis_size(axis)
    coords = mesh.coords(rank)
    if devices == 1:
        raise StrategyError(f"lower-to-exec: {op.name} \"{op.label.data}\" in {where}: the pipeline axis "
                            f"'{axis}' has one device, so there is no peer")
    if not 0 <= device < devices or device == coords[axis]:
        raise StrategyError(f"lower-to-exec: {op.name} \"{op.label.data}\" in {where}: peer device "
                            f"{device} must be another device of 0..{devices - 1} along '{axis}'")
    return mesh.rank_of(coords | {axis: device})


def _channels(mesh: MeshAttr, axis: str, programs: list[par.ProgramOp]) -> dict[tuple[int, int], str]:
    """`p2p_<src>_<dst>`, a group of the two ranks, for every (sender, receiver) pair that
    some program sends over, in the order ranks 0, 1, ... meet them (the same on every rank).

    Each direction between two ranks has a group (a communicator) of its own, used on each
    side by one stream: the sender's `to<dst>` and the receiver's `from<src>`. A send that
    blocks until its receive is posted then holds up only later sends in its own direction,
    never a receive: no send needs pairing with a receive in a batch to avoid a deadlock,
    and waiting for a received tensor never waits for a send."""
    channels: dict[tuple[int, int], str] = {}
    for rank in range(mesh.size()):
        program = programs[mesh.coords(rank)[axis]]
        for op in program.body.block.ops:
            if isinstance(op, par.SendOp | par.RecvOp):
                peer = peer_rank(mesh, axis, rank, op, f"par.program @{program.sym_name.data}")
                pair = (rank, peer) if isinstance(op, par.SendOp) else (peer, rank)
                channels.setdefault(pair, f"p2p_{pair[0]}_{pair[1]}")
    return channels


def _send_releases(programs: list[par.ProgramOp]) -> dict[tuple[int, int, int], int]:
    """For the k-th message from device a to device b, (a, b, k) -> j: the first message from
    b back to a that b sends after it has posted the receive of message k (none: b sends
    none after). Once a has received message j, b has posted that receive, so a's wait for
    its send k returns without waiting for b (under gloo, and under NCCL, a send completes
    only once its receive is posted)."""
    sends: dict[tuple[int, int], list[int]] = defaultdict(list)  # (a, b) -> positions of a's sends to b
    recvs: dict[tuple[int, int], list[int]] = defaultdict(list)  # (a, b) -> positions of b's receives from a
    for program in programs:
        device = program.device.value.data
        for position, op in enumerate(program.body.block.ops):
            if isinstance(op, par.SendOp):
                sends[(device, op.peer.value.data)].append(position)
            elif isinstance(op, par.RecvOp):
                recvs[(op.peer.value.data, device)].append(position)
    releases = {}
    for (a, b), posted in recvs.items():
        back = sends.get((b, a), [])  # positions, increasing
        for k, position in enumerate(posted):
            j = bisect.bisect_right(back, position)
            if j < len(back):
                releases[(a, b, k)] = j
    return releases


def stage_devices(programs: list[par.ProgramOp]) -> dict[int, int]:
    """The device along the pipeline axis that runs each stage, from the tasks of the device
    programs (a device may run several stages)."""
    return {op.stage.value.data: program.device.value.data
            for program in programs for op in program.body.block.ops if isinstance(op, par.TaskOp)}


def bucket_ranks(mesh: MeshAttr, axis: str, rank: int, bucket: par.AllReduceBucketOp,
                 device_of: dict[int, int]) -> tuple[int, ...]:
    """The ranks `rank` sums `bucket` with: those that differ from it only along the bucket's
    axes and the pipeline axis `axis`, and whose pipeline coordinate is the device of one of
    its stages (`device_of`, see `stage_devices`)."""
    coords = mesh.coords(rank)
    fixed = [a for a in mesh.axis_names() if a != axis and a not in bucket.axis_names()]
    devices = {device_of[s] for s in bucket.stage_list()}
    return tuple(
        r for r in range(mesh.size())
        if mesh.coords(r)[axis] in devices and all(mesh.coords(r)[a] == coords[a] for a in fixed)
    )


def _grad_groups(mesh: MeshAttr, axis: str, programs: list[par.ProgramOp]) -> dict[tuple[int, ...], str]:
    """`grad_<i>` for every distinct group of more than one rank that a bucket or a
    collective of the step (a ZeRO gather of parameters) spans, numbered in the order ranks
    0, 1, ... meet them in their programs (the same on every rank)."""
    groups: dict[tuple[int, ...], str] = {}
    device_of = stage_devices(programs)
    for rank in range(mesh.size()):
        for op in programs[mesh.coords(rank)[axis]].body.block.ops:
            if isinstance(op, par.AllReduceBucketOp):
                ranks = bucket_ranks(mesh, axis, rank, op, device_of)
            elif isinstance(op, _STEP_COLLECTIVES):
                ranks = mesh.group_ranks(op.axis.data, rank)
            else:
                continue
            if len(ranks) > 1 and ranks not in groups:
                groups[ranks] = f"grad_{len(groups)}"
    return groups


class _RankProgram:
    """Builds the `exec.program` of one rank from its device's `par.program`."""

    def __init__(self, mesh: MeshAttr, axis: str, rank: int,
                 channels: dict[tuple[int, int], str], grad_groups: dict[tuple[int, ...], str],
                 device_of: dict[int, int], releases: dict[tuple[int, int, int], int]):
        self.mesh = mesh
        self.releases = releases
        self.released_by: dict[Operation, tuple[int, int]] = {}  # send -> (peer, tag of the receive after which it completes)
        self.device_of = device_of
        self.axis = axis
        self.rank = rank
        self.coords = mesh.coords(rank)
        self.channels = channels
        self.grad_groups = grad_groups
        self.ops: list[Operation] = []
        self.values: dict[SSAValue, SSAValue] = {}  # par value -> exec value
        self.home: dict[SSAValue, SSAValue] = {}  # tensor -> the stream that made it
        self.ready: dict[SSAValue, set[SSAValue]] = {}  # tensor -> streams ordered after its producer
        self.unwaited: dict[SSAValue, Operation] = {}  # async result -> its op, until waited
        self.recorded: set[tuple[SSAValue, SSAValue]] = set()
        self.sent: Counter[int] = Counter()  # peer device -> messages sent to it so far
        self.received: Counter[int] = Counter()

    def add(self, op: Operation) -> Operation:
        """Appends `op` to the program."""
        self.ops.append(op)
        return op

    def build(self, program: par.ProgramOp, phase: str = par.PHASE_STEP) -> ex.ProgramOp:
        """The rank's program for `phase`: streams, the lowered ops in order, then waits and
        frees (`exec.program @rank<r>`, or `@rank<r>_first` / `@rank<r>_drain`)."""
        self.where = f"par.program @{program.sym_name.data}"
        self.compute = self.add(ex.StreamOp("compute")).results[0]
        self._comm: SSAValue | None = None
        ops = list(program.body.block.ops)
        directions = sorted({(isinstance(o, par.SendOp), self.peer(o)) for o in ops
                             if isinstance(o, par.SendOp | par.RecvOp)}, key=lambda d: (d[1], not d[0]))
        self.p2p = {(sends, peer): self.add(ex.StreamOp(f"{'to' if sends else 'from'}{peer}")).results[0]
                    for sends, peer in directions}
        lanes = sorted({op.lane_index() for op in ops if isinstance(op, par.TaskOp)} - {0})
        self.lanes = {0: self.compute} | {k: self.add(ex.StreamOp(f"compute{k}")).results[0] for k in lanes}
        self.later_lanes = set(self.lanes.values()) - {self.compute}  # the streams of lanes k > 0
        i = group_end = 0
        while i < len(ops):
            if i >= group_end and isinstance(ops[i], par.TaskOp) and ops[i].lane is not None:
                group_end = i + self.start_group(ops[i:])
            if isinstance(ops[i], par.SendOp | par.RecvOp):
                self.transfer(ops[i])
            else:
                self.lower(ops[i])
            i += 1
        block = Block(_with_lifetimes(self.ops, self.released_by))
        if phase == par.PHASE_STEP:
            return ex.ProgramOp(f"rank{self.rank}", self.rank, self.mesh.size(), Region(block))
        return ex.ProgramOp(f"rank{self.rank}_{phase}", self.rank, self.mesh.size(), Region(block), phase)

    @property
    def comm(self) -> SSAValue:
        """The stream of the collectives, declared second (after `compute`) once one needs it."""
        if self._comm is None:
            op = ex.StreamOp("comm")
            self.ops.insert(1, op)
            self._comm = op.results[0]
        return self._comm

    def start_group(self, ops: list[Operation]) -> int:
        """Orders each later lane's stream of the overlap group that `ops` starts with after
        what its tasks read from before the group, so the lanes start together (an event
        recorded after the group's lane-0 task would hold the other lanes behind it).
        Returns the number of ops the group spans: its tasks, lanes in increasing order,
        and the host ops between them (inputs, state, stores)."""
        lane, length = 0, 0
        reads: dict[int, list[SSAValue]] = defaultdict(list)
        for op in ops:
            if isinstance(op, par.TaskOp) and op.lane is not None and op.lane_index() >= lane:
                lane = op.lane_index()
                reads[lane] += [v for v in op.args if v in self.values]
            elif not isinstance(op, par.InputOp | par.StateOp | par.SetStateOp | par.OutputOp | par.CarryOp
                                | par.CarriedOp):
                break
            length += 1
        for k, values in sorted(reads.items()):
            if k > 0:
                self.read(values, self.lanes[k])
        return length

    # ------------------------------------------------------------ one op

    def lower(self, op: Operation) -> None:
        """Lowers one par op other than a transfer."""
        if isinstance(op, par.StateOp):
            layout = None if op.layout.is_replicated() else op.layout
            self.define(op.result, self.add(ex.StateOp(op.state_name.data, op.result.type, layout)).results[0])
        elif isinstance(op, par.InputOp):
            load = ex.LoadInputOp(str(op.index.value.data), op.microbatch.value.data, op.result.type, op.layout)
            self.define(op.result, self.add(load).results[0])
        elif isinstance(op, par.TaskOp):
            stream = self.lanes[op.lane_index()]
            args = self.read(op.args, stream)
            launch = self.add(ex.LaunchOp(
                op.callee.root_reference.data, args, stream, list(op.outs.types),
                stage=op.stage.value.data, pass_kind=op.pass_kind.data.value,
                microbatch=None if op.microbatch is None else op.microbatch.value.data))
            for old, new in zip(op.outs, launch.results, strict=True):
                self.define(old, new, stream)
        elif isinstance(op, par.SetStateOp):
            self.add(ex.SetStateOp(op.state_name.data, self.host_read(op.value)))
        elif isinstance(op, par.OutputOp):
            self.add(ex.OutputOp(op.output_name.data, self.host_read(op.value)))
        elif isinstance(op, par.CarriedOp):
            carried = ex.CarriedOp(op.carry_name.data, op.result.type, op.stash is not None)
            self.define(op.result, self.add(carried).results[0])
        elif isinstance(op, par.CarryOp):
            self.add(ex.CarryOp(op.carry_name.data, self.host_read(op.value)))
        elif isinstance(op, par.AllReduceBucketOp):
            self.all_reduce(op)
        elif isinstance(op, _STEP_COLLECTIVES):
            self.collective(op)
        else:
            raise StrategyError(f"lower-to-exec: {op.name} in {self.where} has no lowering; a par.program "
                                "holds state, input, task, set_state, output, send, recv, "
                                "all_reduce_bucket and collective (all_reduce, all_gather, reduce_scatter, "
                                "all_to_all) ops")

    def collective(self, op: par.CollectiveOp) -> None:
        """A collective of the step over the ranks that differ from this one along its axis,
        issued on `comm` (async, waited where its result is first used); nothing over a
        group of one rank (an axis of size 1), where the result is the operand."""
        if any(par.zigzag_cuts(op)):
            raise StrategyError(f"lower-to-exec: {op.name} over axis '{op.axis.data}' in {self.where} moves a "
                                "dimension the mesh cuts zigzag; step-level collectives move contiguous pieces "
                                "only (the stage functions' collectives keep to zigzag)")
        ranks = self.mesh.group_ranks(op.axis.data, self.rank)
        if len(ranks) == 1:
            self.values[op.results[0]] = self.values[op.operands[0]]
            return
        group = self.grad_groups[ranks]
        (source,) = self.read([op.operands[0]], self.comm)
        result = op.results[0]
        if isinstance(op, par.AllGatherOp):
            new = ex.AllGatherOp(source, group, op.dim.value.data, self.comm, result.type)
        elif isinstance(op, par.ReduceScatterOp):
            new = ex.ReduceScatterOp(source, group, op.dim.value.data, self.comm, result.type,
                                     ex.ReductionKind(op.reduce.data.value))
        elif isinstance(op, par.AllToAllOp):
            new = ex.AllToAllOp(source, group, op.split_dim.value.data, op.concat_dim.value.data, self.comm,
                                result.type)
        else:
            new = ex.AllReduceOp([source], group, self.comm, ex.ReductionKind(op.reduce.data.value))
        self.add(new)
        self.define(result, new.results[1], self.comm, new)

    def all_reduce(self, op: par.AllReduceBucketOp) -> None:
        """One bucketed all-reduce over the bucket's group; nothing for a group of one rank."""
        ranks = bucket_ranks(self.mesh, self.axis, self.rank, op, self.device_of)
        if len(ranks) == 1:
            for total, value in zip(op.sums, op.values, strict=True):
                self.values[total] = self.values[value]
            return
        reduce = self.add(ex.AllReduceOp(self.read(op.values, self.comm), self.grad_groups[ranks], self.comm))
        for old, new in zip(op.sums, reduce.outputs, strict=True):
            self.define(old, new, self.comm, reduce)

    def transfer(self, op: par.SendOp | par.RecvOp) -> None:
        """A send or a receive, on the stream and the group of its direction (`_channels`)."""
        peer = self.peer(op)
        if isinstance(op, par.SendOp):
            stream = self.p2p[(True, peer)]
            (value,) = self.read([op.input], stream)
            tag = self.tag(self.sent, op)
            send = self.add(ex.SendOp(value, peer, self.channels[(self.rank, peer)], tag, stream))
            release = self.releases.get((self.coords[self.axis], op.peer.value.data, tag))
            if release is not None:
                self.released_by[send] = (peer, release)
        else:
            stream = self.p2p[(False, peer)]
            recv = self.add(ex.RecvOp(peer, self.channels[(peer, self.rank)], self.tag(self.received, op), stream,
                                      op.result.type))
            self.define(op.result, recv.output, stream, recv)

    def peer(self, op: par.SendOp | par.RecvOp) -> int:
        """The rank of the transfer's peer device (`peer_rank`)."""
        return peer_rank(self.mesh, self.axis, self.rank, op, self.where)

    def tag(self, count: Counter[int], op: par.SendOp | par.RecvOp) -> int:
        """The message's sequence number between this device and its peer, in one direction."""
        device = op.peer.value.data
        count[device] += 1
        return count[device] - 1

    # ------------------------------------------------------------ values, streams, waits

    def define(self, old: SSAValue, new: SSAValue, stream: SSAValue | None = None,
               async_op: Operation | None = None) -> None:
        """Maps par value `old` to `new`, made on `stream` (by `async_op`, not yet waited)."""
        self.values[old] = new
        if stream is None:
            return
        self.home[new] = stream
        if async_op is None:
            self.ready[new] = {stream}
        else:
            self.ready[new] = set()
            self.unwaited[new] = async_op

    def read(self, values, stream: SSAValue | None) -> list[SSAValue]:
        """The exec values of par `values`, made readable on `stream` (None: by the host):
        waits for async results, orders the stream after other streams' producers and
        records the tensors on it."""
        exec_values = [self.values[v] for v in values]
        pending = list(dict.fromkeys(self.unwaited[v] for v in exec_values if v in self.unwaited))
        if pending:
            self.wait(pending, stream or self.compute)
        if stream is None:
            return exec_values
        # An event on a stream the tensor is ready on: its producer's, or, for an async
        # result, the compute stream that waited for it (a received tensor read on a later lane).
        producers = list(dict.fromkeys(
            self.home[v] if self.home[v] in self.ready[v] else next(s for s in self.lanes.values() if s in self.ready[v])
            for v in exec_values if v in self.home and stream not in self.ready[v]))
        for producer in producers:
            event = self.add(ex.EventRecordOp(producer)).results[0]
            self.add(ex.EventWaitOp(stream, event))
            for streams in self.ready.values():
                if producer in streams:
                    streams.add(stream)
        # State and inputs (no home) come from `compute`, the default stream, too: a later
        # lane records them, so their memory outlives its reads whatever `compute` does next.
        later_lane = stream in self.later_lanes
        for v in dict.fromkeys(exec_values):
            home = self.home.get(v, self.compute if later_lane and isinstance(v.type, ValueTensorType) else None)
            if home is not None and home != stream and (v, stream) not in self.recorded:
                self.add(ex.RecordStreamOp(v, stream))
                self.recorded.add((v, stream))
        return exec_values

    def host_read(self, value: SSAValue) -> SSAValue:
        """The exec value of par `value` as the host reads it: a tensor made on a later lane's
        compute stream is first ordered after it on `compute`."""
        if self.home.get(self.values[value]) in self.later_lanes:
            return self.read([value], self.compute)[0]
        return self.read([value], None)[0]

    def wait(self, ops: list[Operation], stream: SSAValue) -> None:
        """Waits on `stream` for async `ops`; their results become readable there."""
        self.add(ex.WaitOp([o.results[0] for o in ops], stream))
        for o in ops:
            for result in o.results[1:]:
                self.unwaited.pop(result, None)
                self.ready[result].add(stream)


def _waits(ops: list[Operation]) -> list[Operation]:
    """`exec.wait`s for async `ops`, one per stream they were issued on, each on that stream."""
    by_stream: dict[SSAValue, list[Operation]] = defaultdict(list)
    for o in ops:
        by_stream[o.stream].append(o)
    return [ex.WaitOp([o.results[0] for o in issued], stream) for stream, issued in by_stream.items()]


def _with_lifetimes(ops: list[Operation], released_by: dict[Operation, tuple[int, int]]) -> list[Operation]:
    """`ops` with `exec.free` after each tensor's last use, and the waits that lifetime needs.

    A tensor an async op still reads or writes is not freed before that op's wait: an op
    with results is waited where the results are first used (already in `ops`), so its
    tensors are freed right after that wait; a send whose input is dead is waited on its
    stream once the receive `released_by` names for it (peer, tag) has been waited, by
    when the peer has posted the send's receive (`_send_releases`), and its input freed right
    after. What is still in flight at the end is waited there, and the tensors it held are
    freed after.
    """
    order: dict[SSAValue, int] = {}
    last_use: dict[SSAValue, int] = {}
    holders: dict[SSAValue, list[Operation]] = defaultdict(list)  # tensor -> async ops holding it
    for i, op in enumerate(ops):
        for v in op.results:
            if isinstance(v.type, ValueTensorType):
                order[v] = len(order)
                last_use[v] = i
                if isinstance(op, _ASYNC):
                    holders[v].append(op)
        for v in op.operands:
            if isinstance(v.type, ValueTensorType):
                last_use[v] = i
                if isinstance(op, _ASYNC):
                    holders[v].append(op)
    handed_on = {op.value for op in ops if isinstance(op, ex.CarryOp)}  # the next step frees them
    dying: dict[int, list[SSAValue]] = defaultdict(list)
    for v, i in last_use.items():
        if v not in handed_on:
            dying[i].append(v)

    out: list[Operation] = []
    received: dict[int, int] = {}  # peer -> the highest tag of a receive from it waited so far
    in_flight: list[Operation] = []
    held: dict[SSAValue, set[Operation]] = {}  # dead tensor -> async ops it waits for

    def done(finished: set[Operation]) -> list[SSAValue]:
        in_flight[:] = [o for o in in_flight if o not in finished]
        released = []
        for v, waiting in list(held.items()):
            waiting -= finished
            if not waiting:
                released.append(v)
                del held[v]
        return released

    def free(values: list[SSAValue]) -> None:
        if values:
            out.append(ex.FreeOp(sorted(values, key=order.__getitem__)))

    for i, op in enumerate(ops):
        out.append(op)
        if isinstance(op, _ASYNC):
            in_flight.append(op)
        finished = {w.owner for w in op.works} if isinstance(op, ex.WaitOp) else set()
        for v in dying[i]:
            held[v] = {o for o in holders[v] if o in in_flight}
        for f in finished:
            if isinstance(f, ex.RecvOp):
                peer = f.peer.value.data
                received[peer] = max(received.get(peer, -1), f.tag.value.data)
        # A send no longer needed by compute is waited once the peer has provably posted its
        # receive, not where its input dies: waiting there would hold the host until the
        # peer posts it, and the pipeline would stop overlapping.
        sends = [o for o in in_flight if o in released_by and o not in finished
                 and any(o in waiting for waiting in held.values())
                 and received.get(released_by[o][0], -1) >= released_by[o][1]] if finished else []
        out.extend(_waits(sends))
        free(done(finished | set(sends)))
    if in_flight:
        out.extend(_waits(in_flight))
        free(done(set(in_flight)))
    return out
