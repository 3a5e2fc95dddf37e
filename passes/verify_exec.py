"""verify-exec: checks that the rank programs of a module fit together.

Each `exec.program` verifies its own ordering rules (frees after waits,
cross-stream reads recorded and ordered). This pass checks what only the
programs together show, under NCCL's semantics, which are stricter than gloo's:

- point-to-point transfers match in issue order, per pair of ranks and process
  group (tags are not relied on): the k-th send from a to b is the k-th receive
  from a on b, with the same shape and dtype (and tag, where both have one);
- the members of a process group issue their collectives in the same order;
- the programs run to the end under rendezvous semantics (`simulate`).

Programs with phases (`first`, `step`, `drain`: an asynchronous pipeline, whose values
carried between steps stay on their rank) are checked phase by phase: all ranks run the
same phase in a step, and every transfer of a step is within it.

No options. Requires: the module holds the `exec.program`s (lower-to-exec has
run). Raises PassError naming the rank, the op (its index in the program, as
`op #12`) and what to change.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Attribute, Operation, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects import exec as ex
from piperc.errors import PassError

_P2P = (ex.SendOp, ex.RecvOp, ex.BatchP2POp)


@dataclass(frozen=True)
class VerifyExecPass(ModulePass):
    """Checks p2p pairing, collective order and freedom from deadlock across programs."""

    name = "verify-exec"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for phase in dict.fromkeys(p.phase_name() for p in op.ops if isinstance(p, ex.ProgramOp)) or ["step"]:
            check_pairing(op, phase)
            check_collective_order(op, phase)
            simulate(op, phase)


# ---------------------------------------------------------------- pairing and order


@dataclass(frozen=True)
class _Transfer:
    """One send or receive of a program: op #index, its part within a batch, its tensor type."""

    program: ex.ProgramOp
    index: int
    op: Operation
    part: int
    type: Attribute

    def describe(self) -> str:
        where = f"the {self.op.name} at op #{self.index} of @{self.program.sym_name.data}"
        if isinstance(self.op, ex.BatchP2POp):
            where += f" (its transfer #{self.part})"
        return where


def _programs(module: ModuleOp, phase: str = "step") -> dict[int, ex.ProgramOp]:
    """Each rank's program of `phase`."""
    return {p.rank.value.data: p for p in module.ops if isinstance(p, ex.ProgramOp) and p.phase_name() == phase}


def _transfers(program: ex.ProgramOp) -> tuple[dict, dict]:
    """Sends keyed (group, peer) and receives keyed (group, peer), each in issue order."""
    sends: dict[tuple[str, int], list[_Transfer]] = {}
    recvs: dict[tuple[str, int], list[_Transfer]] = {}
    for i, op in enumerate(program.body.block.ops):
        if not isinstance(op, _P2P):
            continue
        group = op.group.root_reference.data
        parts_out, parts_in = op.send_list(), op.recv_list()
        for part, (value, peer) in enumerate(parts_out):
            sends.setdefault((group, peer), []).append(_Transfer(program, i, op, part, value.type))
        for part, (value, peer) in enumerate(parts_in, start=len(parts_out)):
            recvs.setdefault((group, peer), []).append(_Transfer(program, i, op, part, value.type))
    return sends, recvs


def check_pairing(module: ModuleOp, phase: str = "step") -> None:
    """The k-th send from rank a to rank b on a group is b's k-th receive from a
    on that group, with equal type (and tag, when both are exec.send/exec.recv)."""
    programs = _programs(module, phase)
    sides = {rank: _transfers(p) for rank, p in programs.items()}
    for rank, (sends, _) in sorted(sides.items()):
        for (group, peer), sent in sorted(sends.items()):
            if peer not in sides:
                raise PassError(f"verify-exec: {sent[0].describe()} sends to rank {peer}, which has no program")
            received = sides[peer][1].get((group, rank), [])
            for k, (s, r) in enumerate(zip(sent, received, strict=False)):
                if s.type != r.type:
                    raise PassError(
                        f"verify-exec: {s.describe()} is send #{k} to rank {peer} on @{group} "
                        f"({s.type}), so it is matched by {r.describe()}, which receives {r.type}; "
                        f"point-to-point transfers match in issue order: issue them in the same "
                        f"order on both ranks"
                    )
                if isinstance(s.op, ex.SendOp) and isinstance(r.op, ex.RecvOp) and s.op.tag != r.op.tag:
                    raise PassError(
                        f"verify-exec: {s.describe()} is send #{k} to rank {peer} on @{group} "
                        f"(tag {s.op.tag.value.data}), so it is matched by {r.describe()}, which "
                        f"expects tag {r.op.tag.value.data}; point-to-point transfers match in "
                        f"issue order: issue them in the same order on both ranks"
                    )
            _check_counts(sent, received, rank, peer, group)
    for rank, (_, recvs) in sorted(sides.items()):
        for (group, peer), received in sorted(recvs.items()):
            sent = sides[peer][0].get((group, rank), []) if peer in sides else []
            _check_counts(sent, received, peer, rank, group)


def _check_counts(sent: list[_Transfer], received: list[_Transfer], src: int, dst: int, group: str) -> None:
    if len(sent) > len(received):
        raise PassError(
            f"verify-exec: {sent[len(received)].describe()} is send #{len(received)} to rank {dst} "
            f"on @{group}, but rank {dst} receives only {len(received)} tensor(s) from rank {src} there"
        )
    if len(received) > len(sent):
        raise PassError(
            f"verify-exec: {received[len(sent)].describe()} is receive #{len(sent)} from rank {src} "
            f"on @{group}, but rank {src} sends only {len(sent)} tensor(s) to rank {dst} there"
        )


_COLLECTIVES = (ex.AllReduceOp, ex.AllGatherOp, ex.ReduceScatterOp, ex.AllToAllOp, ex.BroadcastOp)


def _signature(op: Operation) -> str:
    """What members must agree on: the collective, its properties and its operand types."""
    props = ", ".join(f"{k} = {v}" for k, v in sorted(op.properties.items()))
    types = ", ".join(str(v.type) for v in op.operands if not isinstance(v.type, ex.StreamType))
    return f"{op.name} {{{props}}} ({types})"


def _collectives(program: ex.ProgramOp) -> dict[str, list[tuple[int, Operation]]]:
    out: dict[str, list[tuple[int, Operation]]] = {}
    for i, op in enumerate(program.body.block.ops):
        if isinstance(op, _COLLECTIVES):
            out.setdefault(op.group.root_reference.data, []).append((i, op))
    return out


def check_collective_order(module: ModuleOp, phase: str = "step") -> None:
    """Every member of a process group issues the same collectives on it, in one order."""
    programs = _programs(module, phase)
    issued = {rank: _collectives(p) for rank, p in programs.items()}
    for group in (g for g in module.ops if isinstance(g, ex.ProcessGroupOp)):
        name = group.sym_name.data
        members = [r for r in group.rank_list() if r in issued]
        if not members:
            continue
        first = members[0]
        reference = issued[first].get(name, [])
        for rank in members[1:]:
            mine = issued[rank].get(name, [])
            for k in range(max(len(mine), len(reference))):
                if k >= len(mine) or k >= len(reference):
                    longer, (i, op) = (rank, mine[k]) if k < len(mine) else (first, reference[k])
                    shorter = first if longer == rank else rank
                    raise PassError(
                        f"verify-exec: @rank{longer} issues collective #{k} on @{name} "
                        f"({op.name} at op #{i}), but @rank{shorter} issues only {k}; every member "
                        f"of a group issues the same collectives"
                    )
                (i, op), (j, ref) = mine[k], reference[k]
                if _signature(op) != _signature(ref):
                    raise PassError(
                        f"verify-exec: collective #{k} on @{name} is {_signature(op)} at op #{i} "
                        f"of @rank{rank} but {_signature(ref)} at op #{j} of @rank{first}; every "
                        f"member of a group issues its collectives in the same order"
                    )


# ---------------------------------------------------------------- rendezvous simulation


@dataclass
class _Rank:
    """One program during the simulation: its host position and its stream queues."""

    program: ex.ProgramOp
    ops: list[Operation]
    pc: int = 0
    queues: dict[SSAValue, deque[int]] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)
    completed: set[int] = field(default_factory=set)
    reached: set[SSAValue] = field(default_factory=set)  # events recorded and reached
    index: dict[Operation, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {op: i for i, op in enumerate(self.ops)}

    def finished(self) -> bool:
        return self.pc == len(self.ops) and not any(self.queues.values())


def _stream_of(op: Operation) -> SSAValue | None:
    if isinstance(op, ex.LaunchOp | ex.CommunicationOp | ex.EventRecordOp | ex.EventWaitOp):
        return op.stream
    return None


def simulate(module: ModuleOp, phase: str = "step") -> None:
    """Runs every program under rendezvous semantics; raises PassError on a deadlock.

    Each rank's host issues its ops in order. Ops on one stream run in FIFO
    order, and a communication occupies its stream until it completes: a send or
    receive once both sides started it (a batch starts all its transfers at
    once and completes when all have), a collective once every member started
    it. `exec.wait` blocks the host until its work completed; `exec.event_wait`
    holds a stream until the event's `exec.event_record` was reached. Transfers
    pair as `check_pairing` says (run it first). The error names, per blocked
    rank, the op its host waits at and the op at the head of each stuck stream.
    """
    programs = _programs(module, phase)
    ranks = {r: _Rank(p, list(p.body.block.ops)) for r, p in programs.items()}
    partners = _partners(programs)
    members = _collective_members(programs)
    progressed = True
    while progressed:
        progressed = False
        for rank, state in ranks.items():
            progressed |= _advance(rank, state, ranks, partners, members)
    blocked = [(r, s) for r, s in sorted(ranks.items()) if not s.finished()]
    if blocked:
        reasons = "; ".join(_blocked_reason(r, s, ranks, partners, members) for r, s in blocked)
        raise PassError(f"verify-exec: deadlock: {reasons}")


def _partners(programs: dict[int, ex.ProgramOp]) -> dict[tuple[int, int], set[tuple[int, int]]]:
    """(rank, op #) of every transfer op -> the (rank, op #) of the ops it pairs with."""
    out: dict[tuple[int, int], set[tuple[int, int]]] = {}
    sides = {rank: _transfers(p) for rank, p in programs.items()}
    for rank, (sends, _) in sides.items():
        for (group, peer), sent in sends.items():
            received = sides[peer][1].get((group, rank), []) if peer in sides else []
            for s, r in zip(sent, received, strict=False):
                out.setdefault((rank, s.index), set()).add((peer, r.index))
                out.setdefault((peer, r.index), set()).add((rank, s.index))
    return out


def _collective_members(programs: dict[int, ex.ProgramOp]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(rank, op #) of every collective -> the (rank, op #) of each member's same collective."""
    by_turn: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for rank, program in programs.items():
        for group, issued in _collectives(program).items():
            for k, (i, _) in enumerate(issued):
                by_turn.setdefault((group, k), []).append((rank, i))
    return {member: turn for turn in by_turn.values() for member in turn}


def _advance(rank: int, state: _Rank, ranks: dict[int, _Rank], partners, members) -> bool:
    """Moves one rank's host and streams as far as they can go now; True if anything moved."""
    moved = False
    while state.pc < len(state.ops):
        op = state.ops[state.pc]
        if isinstance(op, ex.WaitOp):
            if not all(state.index[w.owner] in state.completed for w in op.works):
                break
        stream = _stream_of(op)
        if stream is not None:
            state.queues.setdefault(stream, deque()).append(state.pc)
        state.pc += 1
        moved = True
    for queue in state.queues.values():
        while queue:
            head = queue[0]
            if head not in state.started:
                state.started.add(head)
                moved = True
            if not _can_complete(rank, head, state, ranks, partners, members):
                break
            op = state.ops[head]
            if isinstance(op, ex.EventRecordOp):
                state.reached.add(op.event)
            state.completed.add(head)
            queue.popleft()
            moved = True
    return moved


def _can_complete(rank: int, index: int, state: _Rank, ranks: dict[int, _Rank], partners, members) -> bool:
    op = state.ops[index]
    if isinstance(op, ex.EventWaitOp):
        return op.event in state.reached
    if isinstance(op, _P2P):
        return all(i in ranks[r].started for r, i in partners.get((rank, index), ()))
    if isinstance(op, _COLLECTIVES):
        turn = members[(rank, index)]
        everyone = all(r in ranks for r in _group_ranks(op))
        return everyone and len(turn) == len(_group_ranks(op)) and all(i in ranks[r].started for r, i in turn)
    return True


def _group_ranks(op: ex.CommunicationOp) -> tuple[int, ...]:
    return op.process_group().rank_list()


def _blocked_reason(rank: int, state: _Rank, ranks: dict[int, _Rank], partners, members) -> str:
    parts = []
    if state.pc < len(state.ops):
        op = state.ops[state.pc]
        what = f"{op.name} at op #{state.pc}"
        if isinstance(op, ex.WaitOp):
            pending = [state.index[w.owner] for w in op.works]
            pending = [i for i in pending if i not in state.completed]
            what += " (for " + ", ".join(f"the {state.ops[i].name} at op #{i}" for i in pending) + ")"
        parts.append(f"its host waits at {what}")
    for stream, queue in state.queues.items():
        if not queue:
            continue
        head = queue[0]
        op = state.ops[head]
        label = stream.owner.stream_name.data if isinstance(stream.owner, ex.StreamOp) else "?"
        parts.append(f'stream "{label}" is stuck at {op.name} at op #{head}{_waiting_for(rank, head, op, state, ranks, partners, members)}')
    return f"rank {rank}: " + ", ".join(parts)


def _waiting_for(rank: int, index: int, op: Operation, state: _Rank, ranks, partners, members) -> str:
    if isinstance(op, ex.EventWaitOp):
        recorded = state.index[op.event.owner]
        return f", waiting for the exec.event_record at op #{recorded}"
    if isinstance(op, _P2P):
        missing = sorted((r, i) for r, i in partners.get((rank, index), ()) if i not in ranks[r].started)
        return ", waiting for " + ", ".join(f"rank {r} to start its {ranks[r].ops[i].name} at op #{i}" for r, i in missing)
    if isinstance(op, _COLLECTIVES):
        missing = sorted(r for r, i in members[(rank, index)] if i not in ranks[r].started)
        return f", waiting for ranks {missing} to start it"
    return ""
