"""A communication-aware simulator of the generated per-rank programs.

    costs = piperc.profile(compiled, batches)           # measured task times on this machine
    sim = compiled.simulate(costs)                      # or simulate(compiled, costs)
    print(sim.table()); sim.trace("predicted/")         # rank<r>.json, as real runs write them

`simulate(compiled, costs)` is a discrete-event simulation of every rank's `exec.program`,
not of the schedule's action table (`piperc.schedules.simulate` is that idealised view):

  * a rank's host issues its program's ops in order. On CUDA (`Costs.device == "cuda"`) a
    launch, a communication, an event record or wait and an `exec.wait` go to their
    stream's queue and the host moves on; each stream runs its queue in order, a launch
    occupying it for the task's cost and a communication until it completes (an NCCL
    kernel holds its stream), so work on different streams of one rank overlaps, ordered
    only by `exec.event_record` / `exec.event_wait` and by waits. On CPU (gloo, the
    runtime's CPU path) the host runs each launch itself, posts communication as it issues
    it, and blocks in `exec.wait` until the work completed: tasks do not overlap, transfers
    overlap the host's work;
  * a point-to-point transfer starts once both sides posted it (NCCL's rendezvous: a send
    waits for its receive; gloo's sender also waits for its receiver's "ready") and takes
    the link's latency + bytes / bandwidth, plus on CPU `Costs.p2p_delay`. Sends and
    receives between two ranks pair up in issue order, as the runtime's do; a batch of
    transfers completes when all its parts have;
  * a collective starts once every member of its group posted it (the n-th collective
    over a group on every member) and takes the ring algorithm's time on the group's
    link (`collective_time`);
  * after its program, every rank waits for its communication still in flight, then sums
    the step's loss over the world (the executor's `all_reduce loss over world`). The step
    ends when the last rank has.

A program that cannot finish under these rules is a `SimulationError` naming, per rank,
the op it is stuck at and the transfers or collectives it waits for that a peer never posts.

Costs (`Costs`): the seconds each task (launch callee) takes, from a profile of a real run
(`profile`, or `profile_trace` on the traces of a run made elsewhere, e.g. under torchrun)
or from its matmul FLOPs at a rate (`Costs.from_flops`); and the network (`Network`: a
`Link` of latency and bandwidth within a node and between nodes, or per process group),
written for a target cluster (`cluster`) or measured here (`calibrate`). With `host_cores`,
the ranks' tasks share that many CPU cores (processor sharing: k tasks running on c cores
each run at min(1, c / k) of their speed), which is how several CPU ranks on one small
machine behave; `profile` then reports each task's work at full speed,
taken out of the contention it was measured under. Two more costs are the CPU host's and
are measured by `profile` too: `issue`, the host's time to issue one communication, and
`p2p_delay`, the time a point-to-point transfer takes beyond its link's once both sides
posted it, while the ranks' tasks hold the cores (gloo moves data in its own threads, which
wait for a core like any other; `calibrate` times the link on idle cores).

The result (`Simulation`) holds the predicted step time, bubble fraction (idle compute
time over ranks x step), each rank's busy time, its work (the seconds its tasks and issues
take at full speed: with `host_cores`, the step lasts at least their sum over the cores)
and predicted peak memory
(`piperc.memory.predict_memory`), `.table()` and `.trace(dir)`, which writes the predicted
timeline in `piperc.runtime.trace`'s format, with the same lanes and event names as a
measured run, so the two open side by side in Perfetto.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import multiprocessing
import os
import re
import socket
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue

from piperc.dialects import exec as ex
from piperc.errors import PipercError
from piperc.memory import PeakMemory, predict_memory
from piperc.runtime.launch import mib, start_without_main
from piperc.runtime.trace import HOST_WAITS, STEP, Trace, file_name, task_name
from piperc.schedules import union_length

__all__ = [
    "Costs",
    "Link",
    "Measured",
    "Network",
    "Simulation",
    "SimulationError",
    "calibrate",
    "cluster",
    "collective_time",
    "matmul_flops",
    "p2p_delay",
    "profile",
    "profile_trace",
    "read_trace",
    "simulate",
]

LOSS = "all_reduce loss over world"
"""The executor's sum of the step's loss over every rank, after the program (its trace name)."""
_LOSS_BYTES = 8  # one float64
_EPS = 1e-12


class SimulationError(PipercError):
    """The programs cannot run to their end under the simulator's rules (a deadlock), or
    the costs lack something the programs need."""


# ---------------------------------------------------------------- the cost model


@dataclass(frozen=True)
class Link:
    """A connection's cost: `latency` seconds per message plus bytes / `bandwidth`
    (bytes per second). `Link()` is free."""

    latency: float = 0.0
    bandwidth: float = math.inf

    def time(self, nbytes: int) -> float:
        """Seconds one message of `nbytes` takes."""
        return self.latency + nbytes / self.bandwidth

    def __str__(self) -> str:
        if self.latency == 0 and math.isinf(self.bandwidth):
            return "free"
        return f"{self.latency * 1e6:.3g} us + bytes / {self.bandwidth / 1e9:.3g} GB/s"


@dataclass(frozen=True)
class Network:
    """Communication costs per process group.

    Ranks sit `ranks_per_node` to a node (rank r on node r // ranks_per_node; None: one
    node). A transfer or collective whose ranks share a node takes `intra`, any other
    `inter` (default: `intra`). `groups` gives a process group (by name, as
    `exec.process_group` declares it) a link of its own. `Network()` is free.
    """

    intra: Link = Link()
    inter: Link | None = None
    ranks_per_node: int | None = None
    groups: Mapping[str, Link] = field(default_factory=dict)

    def link(self, group: str, ranks: Sequence[int]) -> Link:
        """The link a communication over `ranks` of process group `group` takes."""
        if group in self.groups:
            return self.groups[group]
        if self.ranks_per_node is None or self.inter is None:
            return self.intra
        nodes = {r // self.ranks_per_node for r in ranks}
        return self.intra if len(nodes) == 1 else self.inter

    def __str__(self) -> str:
        if self.ranks_per_node is None or self.inter is None:
            text = f"link {self.intra}"
        else:
            text = f"{self.ranks_per_node} ranks per node, {self.intra} within, {self.inter} between nodes"
        for name, link in self.groups.items():
            text += f"; @{name}: {link}"
        return text


def cluster(gpus_per_node: int = 8, intra_gbps: float = 400.0, inter_gbps: float = 50.0,
            latency_us: float = 5.0, inter_latency_us: float | None = None) -> Network:
    """A target cluster: `gpus_per_node` ranks per node, `intra_gbps` GB/s (10^9 bytes per
    second) between GPUs of a node (NVLink), `inter_gbps` GB/s between nodes, `latency_us`
    microseconds per message (`inter_latency_us` between nodes, default the same)."""
    for name, value in (("gpus_per_node", gpus_per_node), ("intra_gbps", intra_gbps),
                        ("inter_gbps", inter_gbps)):
        if not value > 0:
            raise ValueError(f"cluster: {name} must be positive, got {value!r}")
    if latency_us < 0 or (inter_latency_us is not None and inter_latency_us < 0):
        raise ValueError("cluster: latencies must be >= 0")
    inter_latency = latency_us if inter_latency_us is None else inter_latency_us
    return Network(intra=Link(latency_us * 1e-6, intra_gbps * 1e9),
                   inter=Link(inter_latency * 1e-6, inter_gbps * 1e9), ranks_per_node=gpus_per_node)


def collective_time(kind: str, nbytes: int, size: int, link: Link) -> float:
    """Seconds a collective of `kind` over `size` ranks takes with the ring algorithm (the
    alpha-beta model): all_reduce 2(n-1) steps of nbytes/n, all_gather (nbytes: the
    result), reduce_scatter and all_to_all (nbytes: the input) n-1 steps of nbytes/n,
    broadcast a tree of ceil(log2 n) latencies and one pass of nbytes."""
    if size <= 1:
        return 0.0
    n = size
    if kind == "all_reduce":
        return 2 * (n - 1) * (link.latency + nbytes / n / link.bandwidth)
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) * (link.latency + nbytes / n / link.bandwidth)
    if kind == "broadcast":
        return math.ceil(math.log2(n)) * link.latency + nbytes / link.bandwidth
    raise ValueError(f"collective_time: unknown collective {kind!r}")


@dataclass(frozen=True)
class Measured:
    """What a traced real run measured (`read_trace`), medians over its steps: the step time
    (the slowest rank's step), the bubble fraction (idle task time over ranks x step) and
    each rank's busy time (its tasks)."""

    steps: int
    step_time: float
    bubble_fraction: float
    busy: tuple[float, ...]


@dataclass(frozen=True)
class Costs:
    """What the simulator charges: `compute[callee]` seconds per launch of a task function
    (at full speed), and the `network`.

    `device` is how the programs run: "cuda" (launches queue on streams, waits order
    streams) or "cpu" (the host runs each launch and blocks in waits; gloo). With
    `host_cores` (cpu only), the ranks share that many cores. `issue` is the host's time
    to issue one communication on cpu (gloo's posting and the program's statements around
    it; the host does nothing else meanwhile). `p2p_delay` (cpu only) is the seconds a
    point-to-point transfer takes beyond its link's time once both sides posted it (gloo's
    threads waiting for a core the ranks' tasks hold). `source` says where the numbers came
    from; `measured` is what the profiled run itself measured, if any.
    """

    compute: Mapping[str, float]
    network: Network = Network()
    device: str = "cuda"
    host_cores: int | None = None
    issue: float = 0.0
    p2p_delay: float = 0.0
    source: str = "given"
    measured: Measured | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"Costs: device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.host_cores is not None and (self.device != "cpu" or self.host_cores < 1):
            raise ValueError(f"Costs: host_cores={self.host_cores!r} needs device 'cpu' and at least 1 core")
        for name in ("issue", "p2p_delay"):
            value = getattr(self, name)
            if not value >= 0 or (value and self.device != "cpu"):
                raise ValueError(f"Costs: {name}={value!r} must be seconds >= 0, and only on device 'cpu'")
        bad = {name: t for name, t in self.compute.items() if not t >= 0}
        if bad:
            raise ValueError(f"Costs: task times must be seconds >= 0, got {bad}")

    @classmethod
    def from_flops(cls, job: Any, flops_per_second: float, network: Network = Network(),
                   device: str = "cuda") -> Costs:
        """Each task's time as its matmul FLOPs (`matmul_flops`) at `flops_per_second`, for a
        compiled job or its lowered module. Work other than matmuls (norms, softmax, the
        optimizer's update) and collectives inside a task function cost nothing."""
        if not flops_per_second > 0:
            raise ValueError(f"Costs.from_flops: the rate must be positive FLOP/s, got {flops_per_second!r}")
        module = _module_of(job)
        functions = _functions(module)
        compute = {name: matmul_flops(functions[name]) / flops_per_second for name in _callees(module)}
        return cls(compute, network, device, source=f"matmul FLOPs at {flops_per_second / 1e12:.3g} TFLOP/s")


_MATMULS = ("torch.aten.mm", "torch.aten.addmm", "torch.aten.bmm", "torch.aten.baddbmm",
            "torch.aten.matmul", "torch.aten.linear")


def matmul_flops(function: func.FuncOp) -> int:
    """The FLOPs of the matrix products in a task function: 2 x (result elements) x (the
    contracted size, the last dimension of the left operand) for each mm, addmm, bmm,
    baddbmm, matmul and linear, from the ops' tensor types."""
    total = 0
    for op in function.body.walk():
        if op.name not in _MATMULS:
            continue
        left = op.operands[1] if op.name in ("torch.aten.addmm", "torch.aten.baddbmm") else op.operands[0]
        shape = left.type.get_shape()
        total += 2 * math.prod(op.results[0].type.get_shape()) * shape[-1]
    return total


# ---------------------------------------------------------------- the simulation


@dataclass
class Simulation:
    """The predicted step of a job (`simulate`): `step_time` in seconds, `bubble_fraction`
    (idle task time over ranks x step), per rank its `busy` time (the union of its tasks),
    its `work` (the seconds its tasks, and on cpu its issues, take at full speed: the
    costs charged, however the ranks share `host_cores`), the time it `finished` the step
    and its predicted peak `memory`."""

    step_time: float
    bubble_fraction: float
    busy: list[float]
    work: list[float]
    finished: list[float]
    memory: list[PeakMemory]
    costs: Costs
    traces: list[Trace] = field(repr=False)

    def table(self) -> str:
        """The prediction as text: step time and bubble, then one row per rank."""
        lines = [
            f"predicted step: {self.step_time * 1e3:.4g} ms, bubble {self.bubble_fraction:.1%}",
            f"costs: {self.costs.source}; {self.costs.device}"
            + (f", {self.costs.host_cores} host cores shared" if self.costs.host_cores else "")
            + (f", {self.costs.issue * 1e3:.3g} ms to issue a communication" if self.costs.issue else "")
            + (f", transfers +{self.costs.p2p_delay * 1e3:.3g} ms" if self.costs.p2p_delay else "")
            + f"; network: {self.costs.network}",
            f"{'rank':>4}  {'busy ms':>10}  {'idle':>6}  {'finished ms':>11}  {'peak MiB':>9}  peak at",
        ]
        for rank, (busy, done, peak) in enumerate(zip(self.busy, self.finished, self.memory, strict=True)):
            idle = 1 - busy / self.step_time if self.step_time > 0 else 0.0
            lines.append(f"{rank:>4}  {busy * 1e3:>10.4g}  {idle:>6.1%}  {done * 1e3:>11.4g}  "
                         f"{mib(peak.total):>9}  {peak.at}")
        return "\n".join(lines) + "\n"

    def trace(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Writes the predicted timeline as `directory/rank<r>.json` (`piperc.runtime.trace`'s
        format, times from 0) and all ranks in `directory/trace.json`; returns the rank files."""
        from piperc.runtime.trace import merge

        paths = [t.write(directory) for t in self.traces]
        merge(directory, len(self.traces))
        return paths


def simulate(job: Any, costs: Costs) -> Simulation:
    """Simulates one training step of a compiled job (or its lowered module: one
    `exec.program` per rank) under `costs`; see the module's docstring for the rules.

    Raises SimulationError when a task has no cost, or when the programs deadlock.
    """
    module = _module_of(job)
    missing = sorted(_callees(module) - set(costs.compute))
    if missing:
        raise SimulationError(
            f"no cost for task(s) {', '.join('@' + m for m in missing)}: give Costs.compute a time for "
            "every launched function (piperc.profile measures them, Costs.from_flops counts them)")
    return _Simulator(module, costs).run()


def _module_of(job: Any) -> ModuleOp:
    module = job if isinstance(job, ModuleOp) else getattr(job, "module", None)
    if not isinstance(module, ModuleOp):
        raise TypeError(f"expected a compiled job (piperc.compile) or its module, got {type(job).__name__}")
    return module


def _functions(module: ModuleOp) -> dict[str, func.FuncOp]:
    return {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}


def _programs(module: ModuleOp) -> list[ex.ProgramOp]:
    return sorted((p for p in module.ops if isinstance(p, ex.ProgramOp)), key=lambda p: p.rank.value.data)


def _callees(module: ModuleOp) -> set[str]:
    return {op.callee.root_reference.data for p in _programs(module) for op in p.body.block.ops
            if isinstance(op, ex.LaunchOp)}


class _Transfer:
    """A transfer or collective: done once every member posted it and its time passed."""

    __slots__ = ("members", "posted", "duration", "end", "works", "what")

    def __init__(self, members: Sequence[int], duration: float, what: str):
        self.members = tuple(members)
        self.posted: dict[int, float] = {}
        self.duration = duration
        self.end: float | None = None
        self.works: list[_Work] = []
        self.what = what


class _Work:
    """The handle of one communication op on one rank: its transfers, its trace event."""

    __slots__ = ("op", "index", "rank", "parts", "pending", "done_at", "issued", "posted", "name", "cat",
                 "lane", "args", "waited")

    def __init__(self, op: Operation, index: int, rank: int, name: str, cat: str, lane: str, args: dict):
        self.op, self.index, self.rank = op, index, rank
        self.parts: list[_Transfer] = []
        self.pending = 0
        self.done_at: float | None = None
        self.issued = 0.0
        self.posted = False
        self.name, self.cat, self.lane, self.args = name, cat, lane, args
        self.waited = False


class _Task:
    """A launch running, or a host issuing a communication (op None): its work left
    (seconds at full speed)."""

    __slots__ = ("rank", "op", "stream", "start", "remaining")

    def __init__(self, rank: _Rank, op: ex.LaunchOp | None, stream: _Stream | None, start: float, work: float):
        self.rank, self.op, self.stream, self.start, self.remaining = rank, op, stream, start, work


class _Stream:
    """A stream's queue (CUDA): items run in order; the head may block it."""

    __slots__ = ("name", "queue", "task", "since")

    def __init__(self, name: str):
        self.name = name
        self.queue: deque[tuple[str, Any, int]] = deque()  # (kind, payload, op index)
        self.task: _Task | None = None
        self.since: float | None = None  # when the head started waiting


class _Rank:
    """One program: its host's place in it, its streams, events and works."""

    def __init__(self, program: ex.ProgramOp):
        self.program = program
        self.rank = program.rank.value.data
        self.ops = list(program.body.block.ops)
        self.pc = 0
        self.streams: dict[SSAValue, _Stream] = {}
        self.events: dict[SSAValue, float | None] = {}
        self.works: dict[SSAValue, _Work] = {}
        self.unwaited: list[_Work] = []
        self.host_task: _Task | None = None
        self.host_wait: tuple[list[_Work], float] | None = None  # waited works, since
        self.phase = "program"  # then "drain", "loss", "done"
        self.loss: _Work | None = None
        self.finished: float | None = None
        self.busy: list[tuple[float, float]] = []
        self.work = 0.0  # seconds at full speed of the tasks and issues started


class _Simulator:
    """The event loop: a global clock, running tasks, transfers in flight."""

    def __init__(self, module: ModuleOp, costs: Costs):
        self.module = module
        self.costs = costs
        self.cuda = costs.device == "cuda"
        self.groups = {g.sym_name.data: g.rank_list() for g in module.ops if isinstance(g, ex.ProcessGroupOp)}
        programs = _programs(module)
        self.ranks = [_Rank(p) for p in programs]
        self.world = tuple(r.rank for r in self.ranks)
        self.traces = [Trace(r.rank, f"rank {r.rank} (predicted)") for r in self.ranks]
        self.trace_of = {r.rank: t for r, t in zip(self.ranks, self.traces, strict=True)}
        self.now = 0.0
        self.running: list[_Task] = []
        self.in_flight: list[tuple[float, int, _Transfer]] = []
        self.order = itertools.count()
        self.p2p: dict[tuple[int, int, int], _Transfer] = {}
        self.p2p_seq: dict[tuple[str, int, int], int] = {}
        self.collectives: dict[tuple[str, int], _Transfer] = {}
        self.collective_seq: dict[tuple[int, str], int] = {}

    # ------------------------------------------------------------ the loop

    def run(self) -> Simulation:
        while True:
            self.settle()
            if not self.running and not self.in_flight:
                break
            self.advance_clock()
        stuck = [r for r in self.ranks if r.phase != "done"]
        if stuck:
            raise SimulationError(self.deadlock(stuck))
        step = max((r.finished for r in self.ranks), default=0.0)
        busy = [union_length(r.busy) for r in self.ranks]
        total = step * len(self.ranks)
        for rank in self.ranks:
            self.trace_of[rank.rank].complete("step 0", "step", STEP, 0.0, step * 1e6, {"step": 0})
        return Simulation(
            step_time=step,
            bubble_fraction=(total - sum(busy)) / total if total > 0 else 0.0,
            busy=busy,
            work=[r.work for r in self.ranks],
            finished=[r.finished for r in self.ranks],
            memory=predict_memory(self.module),
            costs=self.costs,
            traces=self.traces,
        )

    def settle(self) -> None:
        """Lets every rank and stream do what it can at the current time."""
        progressed = True
        while progressed:
            progressed = False
            for rank in self.ranks:
                progressed |= self.step_rank(rank)

    def rate(self) -> float:
        cores = self.costs.host_cores
        if cores is None or len(self.running) <= cores:
            return 1.0
        return cores / len(self.running)

    def advance_clock(self) -> None:
        """Moves the clock to the next task end or transfer end and completes what ends there."""
        rate = self.rate()
        next_time = min((self.now + t.remaining / rate for t in self.running), default=math.inf)
        if self.in_flight:
            next_time = min(next_time, self.in_flight[0][0])
        elapsed = next_time - self.now
        self.now = next_time
        finished = []
        for task in self.running:
            task.remaining -= elapsed * rate
            if task.remaining <= _EPS * max(1.0, self.now):
                finished.append(task)
        for task in finished:
            self.running.remove(task)
            self.finish_task(task)
        while self.in_flight and self.in_flight[0][0] <= self.now + _EPS:
            _, _, transfer = heapq.heappop(self.in_flight)
            for work in transfer.works:
                work.pending -= 1
                if work.pending == 0:
                    work.done_at = self.now

    # ------------------------------------------------------------ tasks and transfers

    def start_task(self, rank: _Rank, op: ex.LaunchOp | None, stream: _Stream | None, work: float) -> _Task:
        """Starts a launch, or (op None) the host's issue of a communication, as running work."""
        task = _Task(rank, op, stream, self.now, work)
        self.running.append(task)
        rank.work += work
        return task

    def finish_task(self, task: _Task) -> None:
        op, rank = task.op, task.rank
        if op is None:
            rank.host_task = None
            return
        microbatch = None if op.microbatch is None else op.microbatch.value.data
        lane = _stream_name(op.stream)
        self.trace_of[rank.rank].complete(
            task_name(op.callee.root_reference.data, microbatch), "task", lane, task.start * 1e6, self.now * 1e6,
            {"stage": op.stage.value.data, "pass": op.pass_kind.data, "microbatch": microbatch, "step": 0})
        rank.busy.append((task.start, self.now))
        if task.stream is not None:
            task.stream.task = None
            task.stream.queue.popleft()
        else:
            rank.host_task = None

    def post(self, work: _Work) -> None:
        """Work's transfers are posted by its rank now (on CUDA, when its stream reaches it:
        its trace event starts there); those that all members posted start."""
        work.posted = True
        work.issued = self.now
        for transfer in work.parts:
            transfer.posted[work.rank] = self.now
            if len(transfer.posted) == len(transfer.members):
                transfer.end = max(transfer.posted.values()) + transfer.duration
                heapq.heappush(self.in_flight, (transfer.end, next(self.order), transfer))
        if not work.parts:
            work.done_at = self.now

    def issue(self, rank: _Rank, op: Operation, index: int) -> _Work:
        """The work of communication op `op`, with its transfers matched to its peers'."""
        group = op.group.root_reference.data
        name, cat, args = self.describe(op, group)
        lane = _stream_name(op.stream)
        work = _Work(op, index, rank.rank, name, cat, lane, args)
        if isinstance(op, ex.SendOp | ex.RecvOp | ex.BatchP2POp):
            sends, recvs = op.send_list(), op.recv_list()
            for value, peer in sends:
                work.parts.append(self.transfer(group, rank.rank, peer, "send", value))
            for value, peer in recvs:
                work.parts.append(self.transfer(group, peer, rank.rank, "recv", value))
        else:
            work.parts.append(self.collective(rank.rank, group, op))
        for part in work.parts:
            part.works.append(work)
        work.pending = len(work.parts)
        rank.works[op.results[0]] = work
        rank.unwaited.append(work)
        return work

    def transfer(self, group: str, src: int, dst: int, side: str, value: SSAValue) -> _Transfer:
        key = (side, src, dst)
        seq = self.p2p_seq.get(key, 0)
        self.p2p_seq[key] = seq + 1
        transfer = self.p2p.get((src, dst, seq))
        if transfer is None:
            nbytes = value.type.nbytes()
            duration = self.costs.network.link(group, (src, dst)).time(nbytes) + self.costs.p2p_delay
            transfer = _Transfer((src, dst), duration, f"transfer #{seq} from rank {src} to rank {dst}")
            self.p2p[(src, dst, seq)] = transfer
        return transfer

    def collective(self, rank: int, group: str, op: Operation) -> _Transfer:
        seq = self.collective_seq.get((rank, group), 0)
        self.collective_seq[(rank, group)] = seq + 1
        transfer = self.collectives.get((group, seq))
        if transfer is None:
            members = self.groups[group]
            kind, nbytes = _collective_size(op)
            duration = collective_time(kind, nbytes, len(members), self.costs.network.link(group, members))
            transfer = _Transfer(members, duration, f"{kind} #{seq} over @{group}")
            self.collectives[(group, seq)] = transfer
        return transfer

    def loss(self, rank: _Rank) -> _Work:
        """The executor's sum of the loss over the world, after the program."""
        seq = self.collective_seq.get((rank.rank, "world"), 0)
        self.collective_seq[(rank.rank, "world")] = seq + 1
        transfer = self.collectives.get(("world", seq))
        if transfer is None:
            link = self.costs.network.link("world", self.world)
            transfer = _Transfer(self.world, collective_time("all_reduce", _LOSS_BYTES, len(self.world), link),
                                 "the loss all_reduce over the world")
            self.collectives[("world", seq)] = transfer
        work = _Work(rank.program, len(rank.ops), rank.rank, LOSS, "collective", "comm",
                     {"bytes": _LOSS_BYTES, "group": "world", "step": 0})
        work.parts.append(transfer)
        work.pending = 1
        transfer.works.append(work)
        return work

    def waited(self, rank: _Rank, works: Sequence[_Work], since: float) -> None:
        """Trace events of a wait that began at `since` and passed now."""
        trace = self.trace_of[rank.rank]
        for work in works:
            if work.waited:
                continue
            work.waited = True
            trace.complete(f"wait {work.name}", "wait", HOST_WAITS, since * 1e6, self.now * 1e6, {"step": 0})
            trace.complete(work.name, work.cat, work.lane, work.issued * 1e6, self.now * 1e6, work.args)
            if work in rank.unwaited:
                rank.unwaited.remove(work)

    # ------------------------------------------------------------ one rank

    def step_rank(self, rank: _Rank) -> bool:
        """Advances a rank's host (and, on CUDA, its streams) as far as it can now."""
        progressed = False
        while True:
            moved = self.step_host(rank)
            if self.cuda:
                for stream in rank.streams.values():
                    moved |= self.step_stream(rank, stream)
            if not moved:
                return progressed
            progressed = True

    def step_host(self, rank: _Rank) -> bool:
        if rank.phase == "done" or rank.host_task is not None:
            return False
        if rank.host_wait is not None:
            works, since = rank.host_wait
            if any(w.done_at is None for w in works):
                return False
            rank.host_wait = None
            self.waited(rank, works, since)
            return True
        if rank.phase == "program":
            if rank.pc == len(rank.ops):
                rank.phase = "drain"
                return True
            op = rank.ops[rank.pc]
            self.host_op(rank, op, rank.pc)
            rank.pc += 1
            return True
        if rank.phase == "drain":
            if self.cuda and any(s.queue for s in rank.streams.values()):
                return False
            rank.phase = "loss"
            pending = [w for w in rank.unwaited if not w.waited]
            if pending:
                rank.host_wait = (pending, self.now)
            return True
        if rank.phase == "loss":
            if rank.loss is None:
                rank.loss = self.loss(rank)
                self.post(rank.loss)
                rank.host_wait = ([rank.loss], self.now)
                return True
            rank.phase = "done"
            rank.finished = self.now
            return True
        return False

    def host_op(self, rank: _Rank, op: Operation, index: int) -> None:
        """The host issues `op` now."""
        if isinstance(op, ex.StreamOp):
            rank.streams[op.stream] = _Stream(op.stream_name.data)
            return
        if isinstance(op, ex.LaunchOp):
            if self.cuda:
                rank.streams[op.stream].queue.append(("task", op, index))
            else:
                rank.host_task = self.start_task(rank, op, None, self.costs.compute[op.callee.root_reference.data])
            return
        if isinstance(op, ex.CommunicationOp):
            work = self.issue(rank, op, index)
            if self.cuda:
                rank.streams[op.stream].queue.append(("comm", work, index))
                return
            self.post(work)
            if self.costs.issue:
                rank.host_task = self.start_task(rank, None, None, self.costs.issue)
            return
        if isinstance(op, ex.WaitOp):
            works = [rank.works[w] for w in op.works]
            if self.cuda:
                rank.streams[op.stream].queue.append(("wait", works, index))
            else:
                rank.host_wait = (works, self.now)
            return
        if not self.cuda:
            return  # CPU streams do not reorder work: events order nothing
        if isinstance(op, ex.EventRecordOp):
            rank.events[op.event] = None
            rank.streams[op.stream].queue.append(("record", op.event, index))
        elif isinstance(op, ex.EventWaitOp):
            rank.streams[op.stream].queue.append(("event_wait", op.event, index))

    def step_stream(self, rank: _Rank, stream: _Stream) -> bool:
        """Runs a CUDA stream's queue from its head as far as it can now."""
        progressed = False
        while stream.queue and stream.task is None:
            kind, payload, _ = stream.queue[0]
            if kind == "task":
                stream.task = self.start_task(rank, payload, stream,
                                              self.costs.compute[payload.callee.root_reference.data])
                return True
            if kind == "record":
                rank.events[payload] = self.now
            elif kind == "event_wait":
                if rank.events.get(payload) is None:
                    return progressed
            elif kind == "comm":
                if not payload.posted:
                    self.post(payload)
                    progressed = True
                if payload.done_at is None:
                    return progressed
            elif kind == "wait":
                if stream.since is None:
                    stream.since = self.now
                if any(w.done_at is None for w in payload):
                    return progressed
                self.waited(rank, payload, stream.since)
            stream.since = None
            stream.queue.popleft()
            progressed = True
        return progressed

    # ------------------------------------------------------------ names

    def describe(self, op: Operation, group: str) -> tuple[str, str, dict]:
        """The trace name, category and args of a communication, as the runtime writes them."""
        if isinstance(op, ex.SendOp | ex.RecvOp | ex.BatchP2POp):
            sends, recvs = op.send_list(), op.recv_list()
            parts = [f"send {_made_by([v])} -> {peer}" for v, peer in sends]
            parts += [f"recv <- {peer}" for _, peer in recvs]
            values = [v for v, _ in (*sends, *recvs)]
            peers = sorted({peer for _, peer in (*sends, *recvs)})
            return ", ".join(parts), "p2p", {"peers": peers, "bytes": sum(v.type.nbytes() for v in values),
                                              "group": group, "step": 0}
        data = [v for v in op.operands if not isinstance(v.type, ex.StreamType)]
        kind, _ = _collective_size(op)
        if isinstance(op, ex.AllReduceOp | ex.ReduceScatterOp):
            kind = f"{kind} {op.reduction.data.value}"
        elif isinstance(op, ex.BroadcastOp):
            kind = f"broadcast from {op.src.value.data}"
        args = {"bytes": sum(v.type.nbytes() for v in data), "group": group, "step": 0}
        return f"{kind} {_made_by(data)} over {group}", "collective", args

    def deadlock(self, stuck: list[_Rank]) -> str:
        lines = [f"the programs deadlock at {self.now * 1e3:.3f} ms (simulated):"]
        for rank in stuck:
            lines.append(f"  rank {rank.rank}: " + self.where(rank))
        return "\n".join(lines)

    def where(self, rank: _Rank) -> str:
        """Where a stuck rank is and what it waits for."""
        if rank.host_wait is not None:
            works, _ = rank.host_wait
            at = f"op #{rank.pc - 1} exec.wait" if rank.phase == "program" else "the end of its program"
            return f"the host is stuck at {at}, waiting for " + "; ".join(self.waiting(w) for w in works
                                                                           if w.done_at is None)
        heads = []
        for stream in rank.streams.values():
            if not stream.queue:
                continue
            kind, payload, index = stream.queue[0]
            op = rank.ops[index]
            if kind in ("comm", "wait"):
                works = [payload] if kind == "comm" else payload
                heads.append(f'stream "{stream.name}" is stuck at op #{index} {op.name}, waiting for '
                             + "; ".join(self.waiting(w) for w in works if w.done_at is None))
            elif kind == "event_wait":
                heads.append(f'stream "{stream.name}" is stuck at op #{index} exec.event_wait, for an event '
                             "recorded behind stuck work")
        return "; ".join(heads) or "stuck"

    def waiting(self, work: _Work) -> str:
        """What a work waits for: the members that never posted its transfers."""
        missing = []
        for transfer in work.parts:
            if transfer.end is not None:
                continue
            absent = [r for r in transfer.members if r not in transfer.posted]
            missing.append(f"{transfer.what}, not posted by rank(s) {absent}")
        where = "the loss all_reduce" if work.name == LOSS else f"op #{work.index} {work.op.name} ({work.name})"
        return f"{where}: " + ", ".join(missing)


def _stream_name(stream: SSAValue) -> str:
    owner = stream.owner
    return owner.stream_name.data if isinstance(owner, ex.StreamOp) else "stream"


def _made_by(values: Sequence[SSAValue]) -> str:
    """What a communication carries, as the runtime's recorder names it: the tasks that made
    its tensors; a tensor no task made by its shape, several such by their number."""
    names: list[str] = []
    others = []
    for value in values:
        owner = value.owner
        if isinstance(owner, ex.LaunchOp):
            microbatch = None if owner.microbatch is None else owner.microbatch.value.data
            name = task_name(owner.callee.root_reference.data, microbatch)
            if name not in names:
                names.append(name)
        else:
            others.append(value)
    if len(others) == 1:
        names.append(str(list(others[0].type.get_shape())))
    elif others:
        names.append(f"{len(others)} tensors")
    return ", ".join(names)


def _collective_size(op: Operation) -> tuple[str, int]:
    """A collective's kind and the bytes its cost model takes (`collective_time`)."""
    if isinstance(op, ex.AllReduceOp):
        return "all_reduce", sum(v.type.nbytes() for v in op.inputs)
    if isinstance(op, ex.AllGatherOp):
        return "all_gather", op.output.type.nbytes()
    if isinstance(op, ex.ReduceScatterOp):
        return "reduce_scatter", op.input.type.nbytes()
    if isinstance(op, ex.AllToAllOp):
        return "all_to_all", op.input.type.nbytes()
    if isinstance(op, ex.BroadcastOp):
        return "broadcast", op.input.type.nbytes()
    raise SimulationError(f"{op.name}: the simulator has no cost model for this communication op")


# ---------------------------------------------------------------- profiling a real run


def profile(compiled: Any, batches: Sequence[Sequence[Any]], steps: int = 3, *, warmup: int = 1,
            network: Network | None = None, host_cores: int | None = None) -> Costs:
    """Costs measured by a short real run of `compiled` on local processes
    (`piperc.launch(..., trace=)`): `warmup` + `steps` steps on `batches` (cycled), whose
    traces `profile_trace` reads (its options are this function's)."""
    from piperc.compiler import launch

    if steps < 1 or warmup < 0:
        raise ValueError(f"profile: steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if not batches:
        raise ValueError("profile: batches must hold at least one global batch")
    _profiled_device(compiled, host_cores)
    run = [batches[i % len(batches)] for i in range(warmup + steps)]
    with tempfile.TemporaryDirectory(prefix="piperc-profile-") as tmp:
        launch(compiled, run, trace=tmp)
        return profile_trace(compiled, tmp, warmup=warmup, network=network, host_cores=host_cores)


def profile_trace(compiled: Any, directory: str | os.PathLike[str], *, warmup: int = 1,
                  network: Network | None = None, host_cores: int | None = None) -> Costs:
    """Costs from the traces of a real run of `compiled` in `directory` (`rank<r>.json`, as
    `piperc.launch(..., trace=)`, `piperc.runtime.load(..., trace=)` and PIPERC_TRACE write
    them), over its steps from `warmup` on: per task function the mean duration over those
    steps, every microbatch and every rank that runs it (the mean, not the median: a step
    sums its tasks, and contention skews their times upwards). On CPU, also the host's time
    per communication issued (`Costs.issue`): the ranks' step time outside tasks and waits,
    per communication; and the transfers' delay (`Costs.p2p_delay`, `p2p_delay`).

    With `host_cores` (CPU jobs), these times are taken out of the contention they were
    measured under: while k ranks' hosts were busy (in a task or issuing) on `host_cores`
    cores, each progressed at min(1, host_cores / k) of its speed, so a task's work is the
    integral of that rate over its run; the simulation then shares the cores the same way.
    `network` is the communication cost (default: `calibrate` on this machine, for the
    job's world size). The run's own step time and bubble are kept as `costs.measured`
    (`read_trace`).
    """
    device = _profiled_device(compiled, host_cores)
    events = [json.loads((Path(directory) / file_name(r)).read_text())["traceEvents"]
              for r in range(compiled.world_size)]
    measured = _measure(events, warmup)
    issued = [sum(isinstance(op, ex.CommunicationOp) for op in p.body.block.ops) + 1
              for p in _programs(compiled.module)]
    times, issue = _host_work(events, warmup, host_cores, issued)
    if network is None:
        network = calibrate(world=max(2, compiled.world_size))
    cpu = device == "cpu"
    source = f"profile of {measured.steps} step(s) after {warmup} warm-up"
    return Costs({name: statistics.fmean(t) for name, t in times.items()}, network, device, host_cores,
                 issue if cpu else 0.0, p2p_delay(events, warmup, network) if cpu else 0.0, source, measured)


def _profiled_device(compiled: Any, host_cores: int | None) -> str:
    """The device `compiled` runs on, after checking that `host_cores` is given for CPU jobs only."""
    device = json.loads(compiled.files["manifest.json"])["device"]
    if host_cores is not None and device != "cpu":
        raise ValueError("profile: host_cores applies to CPU jobs only")
    return device


_TRANSFER = re.compile(r"(send|recv)(?: .*? ->| <-) (\d+)")
"""A part of a p2p event's name (`send s0_F mb0 -> 1`, `recv <- 0`): its kind and peer."""


def p2p_delay(events: Sequence[Sequence[dict]], warmup: int, network: Network) -> float:
    """How much longer than `network` says a point-to-point transfer took in a traced CPU run
    (`events`: each rank's trace events, steps from `warmup` on): the median, over the
    transfers whose receiver was already blocked in its wait when the sender began to issue
    them, of the time from that issue to the wait's return, less the link's time for the
    bytes (at least 0). The receiver's host sleeps throughout, so that time is the transfer's
    and its wake-up's alone; the median, as a few transfers stall behind other processes.
    0 when no transfer was seen that way."""
    sends: dict[tuple[int, int, int, int], dict] = {}  # (step, src, dst, n) -> its issue's event
    receives: dict[tuple[int, int, int, int], tuple[dict, dict]] = {}  # -> the receive's and its wait's
    for rank, trace in enumerate(events):
        # A communication's event ends when the wait for it returns, as that wait's event does
        # (to float rounding; names repeat, as in `recv <- 0`).
        waits: dict[str, list[dict]] = {}
        for e in trace:
            if e.get("cat") == "wait":
                waits.setdefault(e["name"].removeprefix("wait "), []).append(e)
        issued = sorted((e for e in trace if e.get("cat") == "p2p" and e["args"]["step"] >= warmup),
                        key=lambda e: e["ts"])
        count: dict[tuple[int, str, int, int], int] = {}  # (step, kind, src, dst) -> transfers so far
        for event in issued:
            step = event["args"]["step"]
            for kind, peer in _TRANSFER.findall(event["name"]):
                src, dst = (rank, int(peer)) if kind == "send" else (int(peer), rank)
                n = count[(step, kind, src, dst)] = count.get((step, kind, src, dst), -1) + 1
                if kind == "send":
                    sends[(step, src, dst, n)] = event
                    continue
                end = event["ts"] + event["dur"]
                wait = next((w for w in waits.get(event["name"], ()) if abs(w["ts"] + w["dur"] - end) < 1), None)
                if wait is not None:
                    receives[(step, src, dst, n)] = (event, wait)
    delays = []
    for key, (receive, wait) in receives.items():
        send = sends.get(key)
        if send is None or wait["ts"] > send["ts"] or receive["ts"] > send["ts"]:
            continue
        link = network.link(receive["args"]["group"], key[1:3])
        took = (wait["ts"] + wait["dur"] - send["ts"]) / 1e6
        delays.append(max(0.0, took - link.time(receive["args"]["bytes"])))
    return statistics.median(delays) if delays else 0.0


def _host_work(events: list[list[dict]], warmup: int, cores: int | None,
               issued: Sequence[int]) -> tuple[dict[str, list[float]], float]:
    """From the ranks' traces: per task function, the work of each of its timed runs; and the
    host's work per communication issued (`issued[r]` per step on rank r): per rank and timed
    step, its time outside tasks and waits over that count, the median over them.

    Work is time at full speed: with `cores`, each moment of a run counts min(1, cores / k),
    k the ranks whose hosts were busy then (in a task, or outside tasks and waits)."""
    busy: list[tuple[float, float, str, int, int]] = []  # start, end, task function or "" (issuing), step, rank
    for rank, trace in enumerate(events):
        for step in (e for e in trace if e.get("cat") == "step"):
            index = step["args"]["step"]
            inside = sorted((e["ts"], e["ts"] + e["dur"], e["cat"], e["name"]) for e in trace
                            if e.get("cat") in ("task", "wait") and e["args"]["step"] == index)
            reach = step["ts"]
            for start, end, cat, name in inside:
                if start > reach:
                    busy.append((reach, start, "", index, rank))
                reach = max(reach, end)
                if cat == "task":
                    busy.append((start, end, name.split(" mb")[0], index, rank))
            if step["ts"] + step["dur"] > reach:
                busy.append((reach, step["ts"] + step["dur"], "", index, rank))
    work = _at_full_speed([(start, end) for start, end, *_ in busy], cores)
    times: dict[str, list[float]] = {}
    issuing: dict[tuple[int, int], float] = {}
    for (_, _, name, step, rank), seconds in zip(busy, work, strict=True):
        if step < warmup:
            continue
        if name:
            times.setdefault(name, []).append(seconds)
        else:
            issuing[(rank, step)] = issuing.get((rank, step), 0.0) + seconds
    issue = statistics.median(total / issued[rank] for (rank, _), total in issuing.items()) if issuing else 0.0
    return times, issue


def _at_full_speed(spans: Sequence[tuple[float, float]], cores: int | None) -> list[float]:
    """Seconds of work in each span (microseconds): its length, or with `cores`, each moment
    weighted by min(1, cores / the number of spans covering it)."""
    if cores is None:
        return [(end - start) / 1e6 for start, end in spans]
    edges = sorted({t for span in spans for t in span})
    index = {t: i for i, t in enumerate(edges)}
    covering = [0] * len(edges)
    for start, end in spans:
        for i in range(index[start], index[end]):
            covering[i] += 1
    rate = [min(1.0, cores / k) if k else 1.0 for k in covering]
    return [sum((edges[i + 1] - edges[i]) * rate[i] for i in range(index[start], index[end])) / 1e6
            for start, end in spans]


def read_trace(directory: str | os.PathLike[str], ranks: int, warmup: int = 0) -> Measured:
    """What a traced run (`rank<r>.json` in `directory`) measured over its steps from
    `warmup` on, as medians: the step time (the slowest rank's step event), the bubble
    fraction (1 - the ranks' task time in their step / (ranks x step)) and each rank's task
    time per step."""
    events = [json.loads((Path(directory) / file_name(r)).read_text())["traceEvents"] for r in range(ranks)]
    return _measure(events, warmup)


def _measure(events: list[list[dict]], warmup: int) -> Measured:
    steps = sorted({e["args"]["step"] for rank in events for e in rank
                    if e.get("cat") == "step" and e["args"]["step"] >= warmup})
    if not steps:
        raise ValueError(f"the trace holds no step from step {warmup} on")
    step_times, bubbles, busy = [], [], [[] for _ in events]
    for step in steps:
        spans = []
        for r, rank in enumerate(events):
            [event] = [e for e in rank if e.get("cat") == "step" and e["args"]["step"] == step]
            spans.append(event["dur"] / 1e6)
            tasks = [(e["ts"], e["ts"] + e["dur"]) for e in rank if e.get("cat") == "task" and e["args"]["step"] == step]
            busy[r].append(union_length(tasks) / 1e6)
        longest = max(spans)
        step_times.append(longest)
        bubbles.append(1 - sum(b[-1] for b in busy) / (len(events) * longest))
    return Measured(len(steps), statistics.median(step_times), statistics.median(bubbles),
                    tuple(statistics.median(b) for b in busy))


# ---------------------------------------------------------------- calibrating the network


CALIBRATION_SIZES = (1 << 10, 64 << 10, 1 << 20, 4 << 20)
"""Message sizes in bytes that `calibrate` times."""


def calibrate(world: int = 2, sizes: Sequence[int] = CALIBRATION_SIZES, repeats: int = 5) -> Network:
    """The network of this machine, measured: `world` local gloo processes time a
    point-to-point ping-pong between ranks 0 and 1 and an all_reduce over all of them, for
    each message size in `sizes` (bytes), `repeats` times each (the median counts); one
    `Link` is fitted by least squares to both (p2p: latency + bytes / bandwidth; all_reduce:
    `collective_time`). Takes a few seconds."""
    if world < 2:
        raise ValueError(f"calibrate: needs at least 2 processes, got {world}")
    context = multiprocessing.get_context("forkserver")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = context.Queue()
    procs = [context.Process(target=_calibration_worker, args=(r, world, port, tuple(sizes), repeats, queue))
             for r in range(world)]
    for proc in procs:
        start_without_main(proc)  # a user's script without a main guard must not run again
    try:
        samples = queue.get(timeout=120)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
    return Network(intra=_fit(samples, world))


def _calibration_worker(rank: int, world: int, port: int, sizes: tuple[int, ...], repeats: int, queue) -> None:
    """One process of `calibrate`: rank 0 puts [(kind, bytes, seconds), ...] on `queue`."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    samples = []
    for size in sizes:
        buffer = torch.zeros(max(1, size // 4))
        pingpong, reduce = [], []
        for _ in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            elif rank == 1:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
            pingpong.append((time.perf_counter() - start) / 2)
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            reduce.append(time.perf_counter() - start)
        samples.append(("p2p", buffer.nbytes, statistics.median(pingpong[1:])))
        samples.append(("all_reduce", buffer.nbytes, statistics.median(reduce[1:])))
    if rank == 0:
        queue.put(samples)
    dist.barrier()
    dist.destroy_process_group()


def _fit(samples: Sequence[tuple[str, int, float]], world: int) -> Link:
    """The Link (latency a, seconds per byte b) that fits the samples best: each sample's
    time is ca * a + cb * b, with (ca, cb) = (1, bytes) for p2p and the ring's coefficients
    for all_reduce; least squares on the relative error, clipped to a, b >= 0."""
    rows = []
    for kind, nbytes, seconds in samples:
        ca, cb = (1.0, nbytes) if kind == "p2p" else (2.0 * (world - 1), 2.0 * (world - 1) / world * nbytes)
        rows.append((ca / seconds, cb / seconds))
    saa = sum(a * a for a, _ in rows)
    sab = sum(a * b for a, b in rows)
    sbb = sum(b * b for _, b in rows)
    sa = sum(a for a, _ in rows)
    sb = sum(b for _, b in rows)
    det = saa * sbb - sab * sab
    latency = (sa * sbb - sb * sab) / det if det else 0.0
    per_byte = (saa * sb - sab * sa) / det if det else 0.0
    if latency < 0:
        latency, per_byte = 0.0, sb / sbb
    if per_byte <= 0:
        latency, per_byte = sa / saa, 0.0
    return Link(latency, 1 / per_byte if per_byte > 0 else math.inf)
