"""Pipeline schedules as data: build, load, check and evaluate them without running.

A schedule says, per pipeline device, which actions it runs and in what order,
in torch.distributed.pipelining's vocabulary: `0F1` is stage 0's forward of
microbatch 1, `1B0` stage 1's backward of microbatch 0 (input and weight
gradients together, or input gradient alone when the stage also lists W),
`0W3` stage 0's weight gradient of microbatch 3.

    device 0: 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3
    device 1: 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3

Built-in schedules (`gpipe`, `one_f_one_b`, `interleaved`, `zero_bubble_h1`) are functions that
return this data; users write their own as lists (`from_lists`) or as a table
(`from_table`). `validate` checks a schedule before anything runs, and
`simulate` predicts its timeline, which `render_text` and `render_svg` draw.
`Schedule.view` gathers the tabular view (`piperc schedule show`): the action
table, the closed-form bubble ratio, the time-slot table and the peak number
of activations each device holds.

Standard library only: the compiler, the CLI and the runtime can all use it.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from xml.sax.saxutils import escape

from piperc.errors import PipercError


class ScheduleError(PipercError):
    """A schedule is malformed, incomplete, out of order or deadlocks."""


KINDS = ("F", "B", "W")
UNIT_COSTS = {"F": 1.0, "B": 1.0, "W": 1.0}
_ACTION_RE = re.compile(r"(\d+)([FBW])(\d+)")
_ACTION_HELP = "write <stage><F|B|W><microbatch>, e.g. 0F1"


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Action:
    """One schedule action: `stage` runs pass `kind` ("F", "B" or "W") on `microbatch`."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(
                f"action {self.stage}{self.kind}{self.microbatch}: kind must be F, B or W"
            )
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(f"action {self}: stage and microbatch must be >= 0")

    @classmethod
    def parse(cls, text: str) -> Action:
        """The action written `text`, e.g. `0F1`; raises ScheduleError naming bad text."""
        match = _ACTION_RE.fullmatch(text)
        if match is None:
            raise ScheduleError(f"'{text}' is not a schedule action; {_ACTION_HELP}")
        stage, kind, microbatch = match.groups()
        return cls(int(stage), kind, int(microbatch))

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"


@dataclass
class Schedule:
    """Per pipeline device, the actions it runs in order.

    `stage_device[s]` is the device that runs stage `s`. `overlap[d]`, when
    given (one list per device), holds groups of device `d`'s actions that may
    run concurrently on different streams; each group is contiguous in the row.

    `replicas` > 1 runs that many pipelines, each over a replica of the model's
    `num_stages` stages (Chimera): action stage `k * num_stages + s` is pipeline
    k's replica of stage s (`model_stage`), a stage of its own with its own device,
    sending to and receiving from its pipeline's neighbours only. Each microbatch
    runs in one pipeline, which runs all of it.
    """

    name: str
    num_stages: int
    num_microbatches: int
    devices: list[list[Action]]
    stage_device: dict[int, int]
    overlap: list[list[tuple[Action, ...]]] = field(default_factory=list)
    replicas: int = 1

    def model_stage(self, stage: int) -> int:
        """The model stage that action stage `stage` runs (itself unless it is a replica's)."""
        return stage % self.num_stages

    def device_of(self, stage: int) -> int:
        """The device that runs `stage`."""
        if stage not in self.stage_device:
            raise ScheduleError(f"schedule '{self.name}': no device runs stage {stage}")
        return self.stage_device[stage]

    def to_rows(self) -> list[list[str]]:
        """Per device, its actions as text: `[["0F0", "0B0"], ["1F0", "1B0"]]`."""
        return [[str(a) for a in row] for row in self.devices]

    def grouped_rows(self) -> list[list[str]]:
        """Per device, its actions as text with each overlap group's joined by `+`
        (`["0F0", "0F3+3B1", "3W1"]`), as `from_lists` reads them; raises ScheduleError
        for a group whose actions are apart in their row."""
        rows = []
        for d, row in enumerate(self.devices):
            group_of = {a: g for g in (self.overlap[d] if self.overlap else []) for a in g}
            tokens: list[str] = []
            for i, action in enumerate(row):
                group = group_of.get(action)
                if group is None:
                    tokens.append(str(action))
                elif i == 0 or group_of.get(row[i - 1]) is not group:
                    members = row[i : i + len(group)]
                    if set(members) != set(group):
                        raise ScheduleError(
                            f"schedule '{self.name}': overlap group [{' '.join(map(str, group))}] on "
                            f"device {d} is not contiguous in its row; place its actions next to each other")
                    tokens.append("+".join(map(str, members)))
            rows.append(tokens)
        return rows

    def table(self) -> str:
        """One line per device, `device 0: 0F0 0F1 0B0 0B1`, overlap groups joined by `+`;
        `from_table` reads it back."""
        return "\n".join(
            f"device {d}: {' '.join(row)}".rstrip() for d, row in enumerate(self.grouped_rows())
        )

    def view(self, costs: Mapping[str, float] | None = None) -> ScheduleView:
        """The tabular view: `table()`, the closed-form bubble ratio, the time-slot table
        under `costs` (time per F, B and W; unit costs by default, missing kinds cost 1)
        and the peak in-flight activations per device. Validates the schedule first.
        `print(schedule.view())` shows it as `piperc schedule show` does."""
        unknown = sorted(set(costs or {}) - set(KINDS))
        if unknown:
            raise ScheduleError(
                f"costs: unknown action kind {', '.join(unknown)}; give times for F, B and W"
            )
        times = {**UNIT_COSTS, **(costs or {})}
        negative = [k for k in KINDS if times[k] < 0]
        if negative:
            raise ScheduleError(f"costs: {negative[0]}={times[negative[0]]:g} is negative")
        timeline = simulate(self, f_time=times["F"], b_time=times["B"], w_time=times["W"])
        return ScheduleView(self, times, closed_form_bubble(self), timeline, peak_in_flight(self))


@dataclass(frozen=True)
class Message:
    """One point-to-point transfer between two devices.

    `kind` "act" carries stage `stage`'s output activation forward to stage
    `stage + 1`; "grad" carries stage `stage`'s input gradient back to stage
    `stage - 1`. `tag` is unique per message within a schedule.
    """

    src_device: int
    dst_device: int
    kind: str
    stage: int
    microbatch: int
    tag: int

    @property
    def producer(self) -> Action:
        """The action that sends this message, when it completes."""
        return Action(self.stage, "F" if self.kind == "act" else "B", self.microbatch)

    @property
    def consumer(self) -> Action:
        """The action that receives this message before it starts."""
        step = 1 if self.kind == "act" else -1
        return Action(self.stage + step, self.producer.kind, self.microbatch)


# ---------------------------------------------------------------- built-in schedules


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe (torch's ScheduleGPipe): every device runs all forwards, then all backwards.

    Stage s runs on device s; microbatches go in order 0..M-1 in both phases.
    """
    _check_sizes(num_stages, num_microbatches)
    mbs = range(num_microbatches)
    devices = [
        [Action(s, "F", m) for m in mbs] + [Action(s, "B", m) for m in mbs]
        for s in range(num_stages)
    ]
    return Schedule(
        "gpipe", num_stages, num_microbatches, devices, _one_stage_per_device(num_stages)
    )


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B (torch's Schedule1F1B): warm up with forwards, alternate F and B, cool down.

    Device d runs min(num_stages - 1 - d, M) warm-up forwards, then one
    forward and one backward at a time, then the remaining backwards, so at
    most num_stages - d microbatches' activations are alive on it at once.
    Stage s runs on device s.
    """
    _check_sizes(num_stages, num_microbatches)
    devices = []
    for s in range(num_stages):
        warmup = min(num_stages - 1 - s, num_microbatches)
        row = [Action(s, "F", m) for m in range(warmup)]
        for m in range(warmup, num_microbatches):
            row += [Action(s, "F", m), Action(s, "B", m - warmup)]
        row += [Action(s, "B", m) for m in range(num_microbatches - warmup, num_microbatches)]
        devices.append(row)
    return Schedule(
        "1f1b", num_stages, num_microbatches, devices, _one_stage_per_device(num_stages)
    )


def interleaved(num_stages: int, num_microbatches: int, num_devices: int) -> Schedule:
    """Interleaved 1F1B (torch's ScheduleInterleaved1F1B): v = stages / devices stages per device.

    Loop placement: stage s runs on device s % num_devices, so device d holds
    stages d, d + p, d + 2p, ... (p devices). Microbatches go in rounds of
    m / max(1, m // p): a device runs one round's forwards on its first stage,
    then on its next, and so on, and its backwards the same way from its last
    stage. Device d first runs min((v - 1) * round + 2 * (p - 1 - d), v * m)
    warm-up forwards, then alternates one forward and one backward, then runs the
    remaining backwards. With v = 1 this is still torch's interleaved order, not
    1F1B: its warm-up is 2 * (p - 1 - d) forwards, twice 1F1B's, for the same bubble.

    Refuses what torch refuses: stages that are not a multiple of the devices,
    and microbatch counts that are not a multiple of their number of rounds.
    """
    _check_sizes(num_stages, num_microbatches)
    if num_devices < 1:
        raise ScheduleError(f"schedule 'interleaved' needs at least one device, got {num_devices}")
    if num_stages % num_devices:
        raise ScheduleError(
            f"schedule 'interleaved': {num_stages} stages do not divide evenly over "
            f"{num_devices} devices; stage s runs on device s % {num_devices}, so give a "
            f"multiple of {num_devices} stages, e.g. {2 * num_devices}"
        )
    p, v, m = num_devices, num_stages // num_devices, num_microbatches
    rounds = max(1, m // p)
    if m % rounds:
        fewer = next(k for k in range(m - 1, 0, -1) if k % max(1, k // p) == 0)
        more = next(k for k in range(m + 1, 2 * m + 1) if k % max(1, k // p) == 0)
        raise ScheduleError(
            f"schedule 'interleaved': {m} microbatches on {p} devices run in "
            f"max(1, {m} // {p}) = {rounds} rounds and do not split evenly into them "
            f"(torch's ScheduleInterleaved1F1B refuses this too); use {fewer} or {more} microbatches"
        )
    per_round = m // rounds
    devices = [_interleaved_row(d, p, v, m, per_round) for d in range(p)]
    stage_device = {s: s % p for s in range(num_stages)}
    return Schedule("interleaved", num_stages, num_microbatches, devices, stage_device)


def _interleaved_row(d: int, p: int, v: int, m: int, per_round: int, zero_bubble: bool = False) -> list[Action]:
    """Device d's row of `interleaved` (or, with `zero_bubble`, of `interleaved-zb`), as
    torch's `_get_1f1b_rank_ops` orders it."""
    total = v * m
    warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (p - 1 - d), total)
    taken: Counter[tuple[int, str]] = Counter()

    def take(kind: str, local: int) -> Action:
        # A stage's microbatches run in order, so its k-th action of a kind is microbatch k.
        stage = local * p + d
        taken[stage, kind] += 1
        return Action(stage, kind, taken[stage, kind] - 1)

    def forward(i: int) -> Action:
        return take("F", (i // per_round) % v)

    def backward(j: int) -> Action:
        return take("B", v - 1 - (j // per_round) % v)

    backwards: list[Action] = []

    def backward_then_weights(j: int) -> list[Action]:
        # Zero bubble: from device d's (d+1)-th backward on, each B is followed by the W of
        # the oldest backward whose W has not run; the rest come at the end.
        backwards.append(backward(j))
        if not zero_bubble or j < d:
            return [backwards[-1]]
        return [backwards[-1], _weight(backwards[j - d])]

    row = [forward(i) for i in range(warmup)]
    for j in range(total - warmup):
        row += [forward(warmup + j), *backward_then_weights(j)]
    for j in range(total - warmup, total):
        row += backward_then_weights(j)
    if zero_bubble:
        row += [_weight(b) for b in backwards[len(backwards) - min(d, total):]]
    return row


def _weight(backward: Action) -> Action:
    """The W action of `backward`'s stage and microbatch."""
    return Action(backward.stage, "W", backward.microbatch)


def interleaved_zero_bubble(num_stages: int, num_microbatches: int, num_devices: int) -> Schedule:
    """Interleaved zero bubble (torch's ScheduleInterleavedZeroBubble, the paper's ZB1P with
    several stages per device): interleaved 1F1B's order in loop placement, with backwards split
    into B and W, a warm-up of (v - 1) * round + (p - 1 - d) forwards (half interleaved's extra),
    and device d running, after each of its backwards from its (d+1)-th on, the W of its oldest
    backward still waiting for one. Same sizes as `interleaved`."""
    base = interleaved(num_stages, num_microbatches, num_devices)
    p, v, m = num_devices, num_stages // num_devices, num_microbatches
    per_round = m // max(1, m // p)
    devices = [_interleaved_row(d, p, v, m, per_round, zero_bubble=True) for d in range(p)]
    return Schedule("interleaved-zb", num_stages, m, devices, base.stage_device)


BuiltinSchedule = Callable[[int, int, int], Schedule]
"""A built-in: (num_stages, num_microbatches, num_devices) -> Schedule."""

def _single_stage(name: str, make: Callable[[int, int], Schedule]) -> BuiltinSchedule:
    """`make` as a built-in taking the device count, which must equal the stage count."""

    def build(num_stages: int, num_microbatches: int, num_devices: int) -> Schedule:
        schedule = make(num_stages, num_microbatches)
        if num_devices != num_stages:
            raise ScheduleError(
                f"schedule '{name}' runs one stage per device, but got {num_stages} stages "
                f"for {num_devices} devices; use schedule 'interleaved' to run several "
                f"stages per device, or give {num_devices} stages"
            )
        return schedule

    return build


def zero_bubble_h1(num_stages: int, num_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): 1F1B with each backward
    split into B (the input gradient, which the earlier stage waits for) and W (the weight
    gradient, which nothing waits for), the Ws placed in the bubbles 1F1B leaves, within
    1F1B's peak memory: device d holds at most p - d microbatches between F and B, and p
    (1F1B's peak, on device 0) between F and W. Later devices thus defer their Ws into the
    bubbles at no cost in peak memory. Built by `_zero_bubble`. Stage s runs on device s.
    """
    p = num_stages
    return _zero_bubble("zb-h1", num_stages, num_microbatches, lambda d: (p - d, p))


def zero_bubble_h2(num_stages: int, num_microbatches: int) -> Schedule:
    """ZB-H2 (Qi et al., 2023): zero bubble after the fill, at about twice 1F1B's memory.
    Device d holds at most 2(p - d) - 1 microbatches between F and B and 2p - 1 between
    F and W, so the warm-up's extra forwards fill the bubbles before the first backward and
    the deferred Ws those after: under unit costs (F = B = W = 1) the step takes the
    ideal 3m + p - 1. Built by `_zero_bubble`. Stage s runs on device s.
    """
    p = num_stages
    return _zero_bubble("zb-h2", num_stages, num_microbatches, lambda d: (2 * (p - d) - 1, 2 * p - 1))


def _zero_bubble(name: str, num_stages: int, num_microbatches: int,
                 limits: Callable[[int], tuple[int, int]]) -> Schedule:
    """A zero-bubble schedule, one stage per device, built by running the pipeline under unit
    costs (F = B = W = 1, communication free): each device, whenever it is free, starts its
    next B if it can, else its next F if that keeps its microbatches between F and B, and
    between F and W, within `limits(d)`, else its oldest pending W. Microbatches go in order
    in each pass."""
    _check_sizes(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    next_f, next_b, next_w = [0] * p, [0] * p, [0] * p

    def pick(d: int, can_start: Callable[[Action], bool], _: Mapping[Action, float]) -> Action | None:
        f, b = Action(d, "F", next_f[d]), Action(d, "B", next_b[d])
        to_b, to_w = limits(d)
        if next_b[d] < m and can_start(b):
            next_b[d] += 1
            return b
        if next_f[d] < m and next_f[d] - next_b[d] < to_b and next_f[d] - next_w[d] < to_w and can_start(f):
            next_f[d] += 1
            return f
        if next_w[d] < next_b[d]:
            next_w[d] += 1
            return Action(d, "W", next_w[d] - 1)
        return None

    rows = _list_schedule(p, p, 3 * p * m, {"F": 1, "B": 1, "W": 1}, pick)
    return Schedule(name, p, m, rows, _one_stage_per_device(p))


def _list_schedule(num_devices: int, num_stages: int, total: int, cost: Mapping[str, float],
                   pick: Callable[[int, Callable[[Action], bool], Mapping[Action, float]], Action | None],
                   ) -> list[list[Action]]:
    """Each device's row, by running the pipeline under `cost` per action kind, communication
    free, until `total` actions have started: whenever device d is free, it starts
    `pick(d, can_start, finish)` (None: it waits for the next action to finish), where
    `can_start(a)` says whether every action `a` needs has finished by now and `finish` maps
    each started action to its end. Devices decide in order at each moment, so no device
    sees another's choice made at the same moment. The built-ins zb-h1, zb-h2, hanayo and
    chimera are such runs."""
    finish: dict[Action, float] = {}
    rows: list[list[Action]] = [[] for _ in range(num_devices)]
    free = [0.0] * num_devices
    t = 0.0

    def can_start(action: Action) -> bool:
        return all(finish.get(x, math.inf) <= t for x in _dependencies(action, num_stages))

    while True:
        for d in range(num_devices):
            choice = pick(d, can_start, finish) if free[d] <= t else None
            if choice is not None:
                rows[d].append(choice)
                finish[choice] = free[d] = t + cost[choice.kind]
        if len(finish) == total:
            return rows
        t = min(v for v in [*finish.values(), *free] if v > t)  # the next action to finish


def hanayo(num_stages: int, num_microbatches: int, num_devices: int) -> Schedule:
    """Hanayo (Liu et al., SC'23): a wave-like pipeline without Chimera's model replicas.
    The stages go down the devices and back up, W = stages / (2p) times: stage s of chunk
    c = s // p runs on device s % p when c is even and p - 1 - (s % p) when odd, so each
    turn of the wave stays on one device (no transfer) and every device holds 2W stages.

    The order is piperc's own construction on that placement (the paper gives its schedule
    as figures, not as a rule): the pipeline run under unit costs (F = 1, B = 2,
    communication free), each device, whenever it is free, starting the backward of its
    oldest microbatch that can start (the deepest stage first), else the forward of its
    deepest stage that can start (microbatches in order per stage), so microbatches travel
    the wave depth first. Activations are not capped: `peak_in_flight` reports them.
    """
    _check_sizes(num_stages, num_microbatches)
    p, m = num_devices, num_microbatches
    if p < 1 or num_stages % (2 * p):
        raise ScheduleError(
            f"schedule 'hanayo' runs waves of 2 x {p} stages (down the {p} devices and back up), "
            f"so stages must be a multiple of {2 * p}, got {num_stages}"
        )
    stage_device = {s: s % p if (s // p) % 2 == 0 else p - 1 - s % p for s in range(num_stages)}
    held = [[s for s in range(num_stages) if stage_device[s] == d] for d in range(p)]
    taken: Counter[tuple[int, str]] = Counter()

    def pick(d: int, can_start: Callable[[Action], bool], _: Mapping[Action, float]) -> Action | None:
        ready = [a for a in (Action(s, k, taken[s, k]) for s in held[d] for k in ("B", "F"))
                 if a.microbatch < m and can_start(a)]
        if not ready:
            return None
        choice = min(ready, key=lambda a: (a.kind == "F", a.microbatch if a.kind == "B" else 0, -a.stage))
        taken[choice.stage, choice.kind] += 1
        return choice

    rows = _list_schedule(p, num_stages, 2 * num_stages * m, {"F": 1, "B": 2}, pick)
    return Schedule("hanayo", num_stages, m, rows, stage_device)


def _v_placement(name: str, num_stages: int, num_devices: int) -> dict[int, int]:
    """V placement of 2 * num_devices stages: device d holds stages d and 2p - 1 - d, so the
    first and last stages share device 0 and the middle hand-off stays on device p - 1."""
    if num_stages != 2 * num_devices:
        raise ScheduleError(
            f"schedule '{name}' runs two stages per device in V placement (device d holds "
            f"stages d and {2 * num_devices - 1} - d), so it needs {2 * num_devices} stages "
            f"for {num_devices} devices, got {num_stages}"
        )
    return {s: min(s, num_stages - 1 - s) for s in range(num_stages)}


class _Row:
    """A device's row under construction: each stage's next microbatch per kind, in order,
    and the Ws of its split backwards not yet placed, oldest first."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.taken: Counter[tuple[int, str]] = Counter()
        self.pending_w: list[Action] = []
        self.groups: list[tuple[Action, ...]] = []

    def add(self, stage: int, kind: str) -> Action:
        """Appends `stage`'s next F or B (a B's W is then pending)."""
        action = Action(stage, kind, self.taken[stage, kind])
        self.taken[stage, kind] += 1
        self.actions.append(action)
        if kind == "B":
            self.pending_w.append(_weight(action))
        return action

    def weight_of(self, backward: Action) -> None:
        """Appends `backward`'s W right after it: a backward not split in time."""
        self.pending_w.remove(_weight(backward))
        self.actions.append(_weight(backward))

    def overlapped(self, forward: int, backward: int) -> None:
        """An overlap group: `forward`'s next F with `backward`'s next B, then that B's W."""
        f, b = self.add(forward, "F"), self.add(backward, "B")
        self.groups.append((f, b))
        self.weight_of(b)

    def oldest_w(self, stage: int | None = None) -> None:
        """Appends the W of the oldest split backward (of `stage`, if given) whose W has not
        run, if any."""
        waiting = [w for w in self.pending_w if stage is None or w.stage == stage]
        if waiting:
            self.pending_w.remove(waiting[0])
            self.actions.append(waiting[0])


def zbv(num_stages: int, num_microbatches: int, num_devices: int) -> Schedule:
    """ZB-V (Qi et al., 2024; torch's ScheduleZBVZeroBubble): zero bubble in V placement, two
    stages per device (device d holds stages d and 2p - 1 - d).

    Device d warms up with 2(p - d) - 1 forwards of its first stage, then d pairs of forwards
    (second stage, first stage), then p - d rounds of F, B, W on its second stage; in steady
    state it alternates F, B, W of its first stage and of its second; it cools down with d
    pairs of Bs, then p - d Bs of its first stage each with a W, then the remaining Ws, second
    stage first. Microbatches past the last are skipped, so small counts follow the same order.
    """
    _check_sizes(num_stages, num_microbatches)
    stage_device = _v_placement("zbv", num_stages, num_devices)
    p, m = num_devices, num_microbatches
    n = max(2 * p - 1, m)  # torch's count: enough microbatches to fill the V; the rest are dropped
    rows = []
    for d in range(p):
        first, second = d, num_stages - 1 - d
        row = _Row()
        for _ in range(2 * (p - d) - 1):
            row.add(first, "F")
        for _ in range(d):
            row.add(second, "F")
            row.add(first, "F")
        for _ in range(p - d):
            row.add(second, "F")
            row.weight_of(row.add(second, "B"))
        while row.taken[second, "F"] < row.taken[first, "F"] or row.taken[first, "F"] < n:
            if row.taken[first, "F"] < n:
                row.add(first, "F")
            row.weight_of(row.add(first, "B"))
            row.add(second, "F")
            row.weight_of(row.add(second, "B"))
        for _ in range(d):
            row.add(first, "B")
            row.add(second, "B")
        for _ in range(p - d):
            row.add(first, "B")
            row.oldest_w(first)
        while row.pending_w:
            row.oldest_w(second if any(w.stage == second for w in row.pending_w) else first)
        rows.append([a for a in row.actions if a.microbatch < m])
    return Schedule("zbv", num_stages, m, rows, stage_device)


def dualpipev(num_stages: int, num_microbatches: int, num_devices: int) -> Schedule:
    """DualPipeV (DeepSeek's DualPipe folded into a V, torch's ScheduleDualPipeV): V placement,
    two stages per device, where in steady state the forward of one stage overlaps the backward
    of the other, on two compute streams (an overlap group `[F, B]`, its W right after).

    Device d (stages d and 2p - 1 - d, first and second) runs 2(p - d - 1) forwards of its
    first stage; d + 1 pairs of forwards (first, second); p - d - 1 rounds of a B of its second
    stage, the oldest pending W, a forward of its second; m - 2p + d + 1 rounds of two overlap
    groups, (F first, B second) and (F second, B first) (on the last device the round's first
    pair runs in turn, not overlapped); p - d - 1 rounds of a full backward of its second stage
    and the group (F second, B first); d + 1 pairs of backwards (second, first), whose later
    half leave their W for later; p - d - 1 rounds of the oldest W and a backward of its first;
    then its remaining Ws. A full backward is B then its W; torch writes it as one action.
    Needs at least 2p microbatches, as torch does.
    """
    _check_sizes(num_stages, num_microbatches)
    stage_device = _v_placement("dualpipev", num_stages, num_devices)
    p, m = num_devices, num_microbatches
    if m < 2 * p:
        raise ScheduleError(
            f"schedule 'dualpipev' on {p} devices needs at least {2 * p} microbatches "
            f"(torch's ScheduleDualPipeV does too), got {m}"
        )
    rows, overlap = [], []
    for d in range(p):
        first, second = d, num_stages - 1 - d
        row = _Row()
        for _ in range(2 * (p - d - 1)):
            row.add(first, "F")
        for _ in range(d + 1):
            row.add(first, "F")
            row.add(second, "F")
        for _ in range(p - d - 1):
            row.add(second, "B")
            row.oldest_w()
            row.add(second, "F")
        for i in range(m - 2 * p + d + 1):
            if i == 0 and d == p - 1:  # torch runs this pair in turn, for a smaller bubble
                row.add(first, "F")
                row.weight_of(row.add(second, "B"))
            else:
                row.overlapped(first, second)
            row.overlapped(second, first)
        for _ in range(p - d - 1):
            row.weight_of(row.add(second, "B"))
            row.overlapped(second, first)
        split = False
        for i in range(d + 1):
            for stage, turn in ((second, 1), (first, 0)):
                if i == (d + 1) // 2 and d % 2 == turn:
                    split = True
                backward = row.add(stage, "B")
                if not split:
                    row.weight_of(backward)
        for _ in range(p - d - 1):
            row.oldest_w()
            backward = row.add(first, "B")
            if not split:
                row.weight_of(backward)
        for _ in range(d + 1):
            row.oldest_w()
        rows.append(row.actions)
        overlap.append(row.groups)
    return Schedule("dualpipev", num_stages, m, rows, stage_device, overlap)


def chimera(num_stages: int, num_microbatches: int, num_devices: int) -> Schedule:
    """Chimera (Li & Hoefler, SC'21): two pipelines in opposite directions, each over a replica
    of the stages. The down pipeline runs stage s on device s, the up pipeline its replica of
    stage s (action stage p + s, `Schedule.replicas` = 2) on device p - 1 - s, so every device
    holds one stage of each. Down runs microbatches 0..m/2-1, up m/2..m-1; after the step the
    two replicas of each stage sum their gradients and apply the same update (expand-schedule).

    Each device's row merges its two 1F1B rows (the down pipeline's for stage d, the up
    pipeline's for stage p - 1 - d): both pipelines run under unit costs (F = 1, B = 2,
    communication free), and a device, whenever it is free, starts the next action of either
    row that can start: the one whose inputs arrived first, then a backward before a forward,
    then the down pipeline's. `num_stages`
    counts the model's stages, one per device; the number of devices is even (an odd one
    would put both replicas of the middle stage on one device) and so is the number of
    microbatches (half per pipeline).
    """
    _check_sizes(num_stages, num_microbatches)
    p, m = num_devices, num_microbatches
    if num_stages != p or p % 2 or m % 2:
        raise ScheduleError(
            f"schedule 'chimera' runs two pipelines in opposite directions over replicas of one "
            f"stage per device: it needs as many stages as devices, an even number of devices and "
            f"an even number of microbatches (half per pipeline), got {num_stages} stages, {p} "
            f"devices and {m} microbatches"
        )
    half = m // 2
    base = one_f_one_b(p, half).devices
    queues = [
        [list(base[d]), [Action(2 * p - 1 - d, a.kind, half + a.microbatch) for a in base[p - 1 - d]]]
        for d in range(p)
    ]

    def pick(d: int, can_start: Callable[[Action], bool], finish: Mapping[Action, float]) -> Action | None:
        ready = [q for q in queues[d] if q and can_start(q[0])]
        if not ready:
            return None
        return min(ready, key=lambda q: (max((finish[x] for x in _dependencies(q[0], p)), default=0),
                                         q[0].kind != "B")).pop(0)

    rows = _list_schedule(p, p, 2 * p * m, {"F": 1, "B": 2}, pick)
    stage_device = {s: s for s in range(p)} | {p + s: p - 1 - s for s in range(p)}
    return Schedule("chimera", p, m, rows, stage_device, replicas=2)


V_PLACEMENT = ("zbv", "dualpipev")
"""The built-in schedules that run two stages per device in V placement."""

SPLIT_BACKWARD = ("zb-h1", "zb-h2", "interleaved-zb", "zbv", "dualpipev")
"""The built-in schedules that run weight gradients as actions of their own (W)."""


BUILTIN_SCHEDULES: dict[str, BuiltinSchedule] = {
    "gpipe": _single_stage("gpipe", gpipe),
    "1f1b": _single_stage("1f1b", one_f_one_b),
    "interleaved": interleaved,
    "zb-h1": _single_stage("zb-h1", zero_bubble_h1),
    "zb-h2": _single_stage("zb-h2", zero_bubble_h2),
    "interleaved-zb": interleaved_zero_bubble,
    "zbv": zbv,
    "dualpipev": dualpipev,
    "hanayo": hanayo,
    "chimera": chimera,
}


def builtin(
    name: str, num_stages: int, num_microbatches: int, num_devices: int | None = None
) -> Schedule:
    """The built-in schedule `name` (a key of BUILTIN_SCHEDULES) for these sizes.

    `num_devices` is the number of pipeline devices; None means one stage per device.
    """
    if name not in BUILTIN_SCHEDULES:
        known = ", ".join(sorted(BUILTIN_SCHEDULES))
        raise ScheduleError(f"unknown schedule '{name}' (known: {known})")
    devices = num_stages if num_devices is None else num_devices
    return BUILTIN_SCHEDULES[name](num_stages, num_microbatches, devices)


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1 or num_microbatches < 1:
        raise ScheduleError(
            f"a schedule needs at least one stage and one microbatch, "
            f"got {num_stages} stages and {num_microbatches} microbatches"
        )


def _one_stage_per_device(num_stages: int) -> dict[int, int]:
    return {s: s for s in range(num_stages)}


# ---------------------------------------------------------------- user schedules


def from_lists(
    rows: Sequence[Sequence[str | Action]],
    num_stages: int | None = None,
    num_microbatches: int | None = None,
    name: str = "user",
    replicas: int = 1,
) -> Schedule:
    """A schedule from per-device action lists: `[["0F0", "0B0"], ["1F0", "1B0"]]`.

    Actions joined by `+` in one entry (`"0F3+3B1"`) are an overlap group: they may run
    together, on two compute streams. Sizes default to what the actions use (highest
    stage and microbatch + 1). Each stage runs on the device whose row holds its
    actions; a stage whose actions sit on two devices is an error naming the action
    away from the device that holds most of them. With `replicas` > 1 (give
    `num_stages`), stages from `num_stages` on are the pipelines' replicas
    (`Schedule.replicas`). Call `validate` to check the rest.
    """
    devices: list[list[Action]] = []
    overlap: list[list[tuple[Action, ...]]] = []
    for d, row in enumerate(rows):
        devices.append([])
        overlap.append([])
        try:
            for entry in row:
                group = _parse_entry(entry)
                devices[-1].extend(group)
                if len(group) > 1:
                    overlap[-1].append(tuple(group))
        except ScheduleError as e:
            raise ScheduleError(f"schedule '{name}', device {d}: {e}") from None
    actions = [a for row in devices for a in row]
    if not actions:
        raise ScheduleError(f"schedule '{name}' has no actions")
    # A stage belongs to the device holding most of its actions, so the error
    # names the stray action rather than the stage's first one.
    counts = Counter((a.stage, d) for d, row in enumerate(devices) for a in row)
    stage_device: dict[int, int] = {}
    for (stage, d), count in sorted(counts.items()):
        if stage not in stage_device or count > counts[stage, stage_device[stage]]:
            stage_device[stage] = d
    for d, row in enumerate(devices):
        for action in row:
            if stage_device[action.stage] != d:
                raise ScheduleError(_misplaced(name, action, d, stage_device[action.stage]))
    if num_stages is None:
        num_stages = max(a.stage for a in actions) + 1
    if num_microbatches is None:
        num_microbatches = max(a.microbatch for a in actions) + 1
    return Schedule(name, num_stages, num_microbatches, devices, stage_device,
                    overlap if any(overlap) else [], replicas)


def _parse_entry(entry: str | Action) -> list[Action]:
    """A row entry's actions: one action, or an overlap group written `0F3+3B1`."""
    return [entry] if isinstance(entry, Action) else [Action.parse(t) for t in entry.split("+")]


_DEVICE_LABEL_RE = re.compile(r"device\s+(\d+)\s*:")


def from_table(
    text: str,
    num_stages: int | None = None,
    num_microbatches: int | None = None,
    name: str = "user",
) -> Schedule:
    """A schedule from a table, one line per device, as `Schedule.table` prints it.

    Actions are separated by spaces or commas; `#` starts a comment; blank
    lines are skipped; a line may start with `device N:`, where N must be its
    row number (devices are listed in order from 0).
    """
    rows: list[list[Action]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"schedule '{name}', line {lineno}"
        label = _DEVICE_LABEL_RE.match(line)
        if label is not None:
            if int(label.group(1)) != len(rows):
                raise ScheduleError(
                    f"{where}: labelled device {label.group(1)} but it is row {len(rows)}; "
                    f"list devices in order from 0"
                )
            line = line[label.end() :]
        try:
            rows.append([t for t in re.split(r"[\s,]+", line) if t])
            for entry in rows[-1]:
                _parse_entry(entry)
        except ScheduleError as e:
            raise ScheduleError(f"{where}: {e}") from None
    if not rows:
        raise ScheduleError(f"schedule '{name}': the table has no device rows")
    return from_lists(rows, num_stages, num_microbatches, name)


def _misplaced(name: str, action: Action, device: int, owner: int) -> str:
    return (
        f"schedule '{name}': action {action} on device {device} but stage {action.stage} "
        f"runs on device {owner}; a stage's actions must all be on one device"
    )


# ---------------------------------------------------------------- dependencies


def _dependencies(action: Action, num_stages: int) -> list[Action]:
    """The actions whose results `action` needs before it can start."""
    s, m = action.stage, action.microbatch
    same_stage = {"F": [], "B": [Action(s, "F", m)], "W": [Action(s, "B", m)]}[action.kind]
    return same_stage + [producer for _, producer in _receives(action, num_stages)]


def _sends(action: Action, num_stages: int) -> list[tuple[str, Action]]:
    """The (message kind, consumer) pairs `action` sends to other stages when it completes
    (within its pipeline: a replica's stages are `Schedule.model_stage`'s `num_stages` apart)."""
    s, m = action.stage, action.microbatch
    if action.kind == "F" and s % num_stages < num_stages - 1:
        return [("act", Action(s + 1, "F", m))]
    if action.kind == "B" and s % num_stages > 0:
        return [("grad", Action(s - 1, "B", m))]
    return []


def _receives(action: Action, num_stages: int) -> list[tuple[str, Action]]:
    """The (message kind, producer) pairs `action` receives from other stages of its pipeline
    before it starts."""
    s, m = action.stage, action.microbatch
    if action.kind == "F" and s % num_stages > 0:
        return [("act", Action(s - 1, "F", m))]
    if action.kind == "B" and s % num_stages < num_stages - 1:
        return [("grad", Action(s + 1, "B", m))]
    return []


def messages(schedule: Schedule) -> dict[tuple[int, int], list[Message]]:
    """Point-to-point messages, as each side issues them.

    Key `(device, peer)`: the messages `device` exchanges with `peer` (sends
    and receives) in the order `device` issues them: receives at the action
    that consumes them, before it starts; sends at the action that produces
    them, when it completes. Messages between stages on the same device are
    not messages. Each message appears under both `(src, dst)` and `(dst, src)`.
    """
    n, mbs = schedule.num_stages, schedule.num_microbatches
    out: dict[tuple[int, int], list[Message]] = {}
    for d, row in enumerate(schedule.devices):
        for action in row:
            for kind, producer in _receives(action, n):
                src = schedule.device_of(producer.stage)
                if src != d:
                    message = _message(src, d, kind, producer, mbs)
                    out.setdefault((d, src), []).append(message)
            for kind, consumer in _sends(action, n):
                dst = schedule.device_of(consumer.stage)
                if dst != d:
                    message = _message(d, dst, kind, action, mbs)
                    out.setdefault((d, dst), []).append(message)
    return out


def _message(src: int, dst: int, kind: str, producer: Action, num_microbatches: int) -> Message:
    index = producer.stage * num_microbatches + producer.microbatch
    tag = 2 * index + (kind == "grad")
    return Message(src, dst, kind, producer.stage, producer.microbatch, tag)


# ---------------------------------------------------------------- validation


def validate(schedule: Schedule) -> None:
    """Checks a schedule before it runs; raises ScheduleError naming the first offending action.

    In order: sizes and the stage-to-device map; then each action in device
    order and position: in range, on its stage's device, not repeated, not
    before an action on the same device that it needs; then that every stage
    runs F and B once per microbatch (and W, when the stage uses W at all);
    then overlap groups; then, by executing the rows in order, that no set of
    devices waits on each other; then that the rows still run to the end when a
    transfer completes only once both sides have started it and transfers between
    two devices match in issue order, as the compiled programs issue them
    (`_check_rendezvous`, with the receives `receive_plan` posts early).
    """
    _check_shape(schedule)
    _check_actions(schedule)
    _check_complete(schedule)
    _check_overlap(schedule)
    _execute(schedule, lambda _: 0.0, 0.0)
    _check_rendezvous(schedule)


def _check_shape(schedule: Schedule) -> None:
    where = f"schedule '{schedule.name}'"
    if schedule.num_stages < 1 or schedule.num_microbatches < 1:
        raise ScheduleError(
            f"{where}: needs at least one stage and one microbatch, got "
            f"{schedule.num_stages} stages and {schedule.num_microbatches} microbatches"
        )
    num_devices = len(schedule.devices)
    for d, row in enumerate(schedule.devices):
        if not row:
            raise ScheduleError(
                f"{where}: device {d} runs no action; every device runs a stage, "
                f"so remove its row or give it a stage's actions"
            )
    for stage, device in sorted(schedule.stage_device.items()):
        if not 0 <= device < num_devices:
            raise ScheduleError(
                f"{where}: stage {stage} runs on device {device}, "
                f"but the schedule has devices 0..{num_devices - 1}"
            )
    if schedule.overlap and len(schedule.overlap) != num_devices:
        raise ScheduleError(
            f"{where}: overlap lists {len(schedule.overlap)} devices, "
            f"the schedule has {num_devices}; give one list per device (or none)"
        )


def _check_actions(schedule: Schedule) -> None:
    where = f"schedule '{schedule.name}'"
    first: dict[Action, tuple[int, int]] = {}
    for d, row in enumerate(schedule.devices):
        for i, action in enumerate(row):
            first.setdefault(action, (d, i))
    seen: set[Action] = set()
    for d, row in enumerate(schedule.devices):
        for i, action in enumerate(row):
            if action.stage >= schedule.num_stages * schedule.replicas:
                raise ScheduleError(
                    f"{where}: action {action} on device {d}: stage {action.stage} is out of "
                    f"range, the schedule has {schedule.num_stages * schedule.replicas} stages"
                )
            if action.microbatch >= schedule.num_microbatches:
                raise ScheduleError(
                    f"{where}: action {action} on device {d}: microbatch {action.microbatch} is "
                    f"out of range, the schedule has {schedule.num_microbatches} microbatches"
                )
            owner = schedule.device_of(action.stage)
            if owner != d:
                raise ScheduleError(_misplaced(schedule.name, action, d, owner))
            if action in seen:
                fd, fi = first[action]
                raise ScheduleError(
                    f"{where}: action {action} on device {d} appears twice "
                    f"(first at position {fi} on device {fd})"
                )
            seen.add(action)
            for dep in _dependencies(action, schedule.num_stages):
                dep_device, dep_position = first.get(dep, (None, -1))
                if dep_device == d and dep_position > i:
                    raise ScheduleError(
                        f"{where}: {action} runs before {dep} on device {d}, "
                        f"but needs its result; move {action} after {dep}"
                    )


def _check_complete(schedule: Schedule) -> None:
    present = {a for row in schedule.devices for a in row}
    uses_w = {a.stage for a in present if a.kind == "W"}
    num_devices = len(schedule.devices)
    pipeline = _pipelines(schedule)
    stages = sorted(
        range(schedule.num_stages * schedule.replicas),
        key=lambda s: (schedule.stage_device.get(s, num_devices), s),
    )
    for s in stages:
        kinds = KINDS if s in uses_w else ("F", "B")
        for m in range(schedule.num_microbatches):
            if pipeline[m] != s // schedule.num_stages:
                continue
            for kind in kinds:
                action = Action(s, kind, m)
                if action in present:
                    continue
                if s not in schedule.stage_device:
                    raise ScheduleError(
                        f"schedule '{schedule.name}': action {action} is missing "
                        f"(no device runs stage {s})"
                    )
                raise ScheduleError(
                    f"schedule '{schedule.name}': action {action} is missing "
                    f"(stage {s} runs on device {schedule.stage_device[s]})"
                )


def _pipelines(schedule: Schedule) -> list[int]:
    """Per microbatch, the pipeline (replica, `Schedule.replicas`) whose stages run it: the
    one its first action in device order belongs to, 0 when it has none; raises
    ScheduleError naming two actions of one microbatch in two pipelines."""
    first: dict[int, Action] = {}
    for row in schedule.devices:
        for action in row:
            seen = first.setdefault(action.microbatch, action)
            if seen.stage // schedule.num_stages != action.stage // schedule.num_stages:
                raise ScheduleError(
                    f"schedule '{schedule.name}': microbatch {action.microbatch} runs in two "
                    f"pipelines ({seen} and {action}); each microbatch runs in one replica of the stages"
                )
    return [first[m].stage // schedule.num_stages if m in first else 0
            for m in range(schedule.num_microbatches)]


def _check_overlap(schedule: Schedule) -> None:
    where = f"schedule '{schedule.name}'"
    for d, groups in enumerate(schedule.overlap):
        row = schedule.devices[d]
        grouped: set[Action] = set()
        for group in groups:
            text = "[" + " ".join(str(a) for a in group) + "]"
            for action in group:
                if action not in row:
                    raise ScheduleError(
                        f"{where}: action {action} in overlap group {text} "
                        f"is not in device {d}'s row"
                    )
                if action in grouped:
                    raise ScheduleError(
                        f"{where}: action {action} on device {d} is in two overlap groups"
                    )
                grouped.add(action)
            positions = sorted(row.index(a) for a in group)
            if positions[-1] - positions[0] != len(group) - 1:
                raise ScheduleError(
                    f"{where}: overlap group {text} on device {d} is not contiguous in its row; "
                    f"place its actions next to each other"
                )


def _check_rendezvous(schedule: Schedule) -> None:
    """The rows run to the end when a transfer completes only once both sides have started it
    (NCCL's rule), with the receives that `receive_plan` posts early; raises ScheduleError
    naming what each stuck device waits at when no early receive resolves a deadlock."""
    receive_plan(schedule)


def receive_plan(schedule: Schedule) -> list[dict[Action, list[Message]]]:
    """Per device, the receives it posts early: the first action of a step -> the messages
    received in the batch before that step although a later step consumes them.

    NCCL's point-to-point rule (stricter than buffered sends): a send waits for its
    receive. Each device issues its transfers as the compiled program does: before each
    step, the sends of the step before and the receives the step needs, as one batch
    (after its last step, its last sends); batches start in order, each once the one
    before has completed, and a transfer completes once the batch holding its other
    side has started. A device waits before a step until the batch with the step's
    receives completes. Two devices can then each wait at a send to the other whose
    receive the other posts only after its own send (interleaved 1F1B crosses
    gradients this way from 2 x devices microbatches on). The plan resolves each such
    crossing by posting the blocked device's receive of the other's send (and of the
    messages before it from that device) in the batch it is stuck at; expand-schedule
    posts the same receives there. Receiving early costs only the buffer held longer.
    Transfers between two devices match in issue order (NCCL has no tags), so a device
    receives from each peer in the order the peer sends: a step that consumes a message
    first receives, early, those the peer sent before it (`_in_send_order`), as
    expand-schedule does. Raises ScheduleError naming what each stuck device waits at
    when a deadlock remains.
    """
    plan = _in_send_order(schedule)
    while True:
        batches, waits = _batches(schedule, plan)
        stuck = _rendezvous(batches, waits)
        if stuck is None:
            return plan
        if not _receive_early(schedule, plan, stuck, batches, waits):
            waits = []
            for d, m in stuck.items():
                side = f"send to device {m.dst_device}" if m.src_device == d else (
                    f"receive from device {m.src_device}")
                waits.append(f"device {d} waits at its {side} of {m.kind} {m.producer} -> {m.consumer}")
            raise ScheduleError(
                f"schedule '{schedule.name}': deadlock once a send waits for its receive (NCCL's "
                f"rule): {'; '.join(waits)}; receive a message before sending what the sender "
                f"waits for, or send it later"
            )


def _sent(schedule: Schedule) -> dict[tuple[int, int], list[Message]]:
    """Per (source, destination) device pair, the messages the source sends, in its order."""
    sent: dict[tuple[int, int], list[Message]] = {}
    for d in range(len(schedule.devices)):
        for step in _steps(schedule, d):
            for message in _step_sends(schedule, d, step):
                sent.setdefault((d, message.dst_device), []).append(message)
    return sent


def _in_send_order(schedule: Schedule) -> list[dict[Action, list[Message]]]:
    """The early receives that keep each device's receives from a peer in the peer's send order:
    a step receiving message X from device s first receives, in the same batch, s's messages
    sent before X that no earlier step received (a row may consume them out of order, as
    ZB-V's and DualPipeV's rows do)."""
    sent = _sent(schedule)
    plan: list[dict[Action, list[Message]]] = [{} for _ in schedule.devices]
    for d in range(len(schedule.devices)):
        posted: set[Message] = set()
        for step in _steps(schedule, d):
            for message in _step_receives(schedule, d, step):
                if message in posted:
                    continue
                order = sent[message.src_device, d]
                before = [m for m in order[: order.index(message)] if m not in posted]
                plan[d].setdefault(step[0], []).extend(before)
                posted |= {*before, message}
    return [{a: ms for a, ms in device.items() if ms} for device in plan]


def _step_receives(schedule: Schedule, d: int, step: tuple[Action, ...]) -> list[Message]:
    """The messages device `d` receives for `step`, in order."""
    n, mbs = schedule.num_stages, schedule.num_microbatches
    return [
        _message(schedule.device_of(producer.stage), d, kind, producer, mbs)
        for action in step
        for kind, producer in _receives(action, n)
        if schedule.device_of(producer.stage) != d
    ]


def _step_sends(schedule: Schedule, d: int, step: tuple[Action, ...]) -> list[Message]:
    """The messages device `d` sends when `step` completes, in order."""
    n, mbs = schedule.num_stages, schedule.num_microbatches
    return [
        _message(d, schedule.device_of(consumer.stage), kind, action, mbs)
        for action in step
        for kind, consumer in _sends(action, n)
        if schedule.device_of(consumer.stage) != d
    ]


def _batches(schedule: Schedule, plan: list[dict[Action, list[Message]]]):
    """Per device, its batches of transfers in issue order and, per step, (batches issued
    before it, the batch it waits for or -1), with the plan's early receives."""
    batches: list[list[list[Message]]] = []
    waits: list[list[tuple[int, int]]] = []
    for d in range(len(schedule.devices)):
        early = {m for ms in plan[d].values() for m in ms}
        mine: list[list[Message]] = []
        steps = []
        pending: list[Message] = []
        for step in _steps(schedule, d):
            own = [m for m in _step_receives(schedule, d, step) if m not in early]
            receives = plan[d].get(step[0], []) + own
            if pending or receives:
                mine.append(pending + receives)
            steps.append((len(mine), len(mine) - 1 if receives else -1))
            pending = _step_sends(schedule, d, step)
        if pending:
            mine.append(pending)
        batches.append(mine)
        waits.append(steps)
    return batches, waits


def _rendezvous(batches: list[list[list[Message]]], plans: list[list[tuple[int, int]]]) -> dict[int, Message] | None:
    """Runs the batches and waits of `_batches` under NCCL's rule; None when every device
    reaches its end, else per stuck device the first transfer of the batch it is stuck at
    that has not started."""
    place = {
        (m, d): (d, i)
        for d, mine in enumerate(batches)
        for i, batch in enumerate(mine)
        for m in batch
    }
    step = [0] * len(batches)
    issued = [0] * len(batches)
    head = [0] * len(batches)  # each device's first batch not yet complete

    def started(message: Message, d: int) -> bool:
        peer = message.dst_device if message.src_device == d else message.src_device
        _, i = place[message, peer]
        return i < issued[peer] and i <= head[peer]

    progressed = True
    while progressed:
        progressed = False
        for d, waits in enumerate(plans):
            while step[d] < len(waits):
                issued[d], wait_for = waits[step[d]]
                if head[d] <= wait_for:
                    break
                step[d] += 1
                progressed = True
            if step[d] == len(waits):
                issued[d] = len(batches[d])
            while head[d] < issued[d] and all(started(m, d) for m in batches[d][head[d]]):
                head[d] += 1
                progressed = True
    stuck = [d for d in range(len(batches)) if head[d] < len(batches[d])]
    if not stuck:
        return None
    return {d: next(m for m in batches[d][head[d]] if not started(m, d)) for d in stuck}


def _receive_early(schedule: Schedule, plan: list[dict[Action, list[Message]]], stuck: dict[int, Message],
                   batches: list[list[list[Message]]], waits: list[list[tuple[int, int]]]) -> bool:
    """Resolves one wait among the `stuck` devices: device d stuck at a send to p while p is
    stuck too (a cycle of such sends deadlocks them all). p then receives d's message (and
    those before it from d) in the batch p is stuck at. False when no stuck device waits so
    on another stuck device that still has a later step to receive for. `batches` and
    `waits` are `plan`'s (`_batches`)."""
    for d, m in stuck.items():
        p = m.dst_device
        if m.src_device != d or p not in stuck:
            continue
        head = next(i for i, batch in enumerate(batches[p]) if stuck[p] in batch)
        steps = _steps(schedule, p)
        index = next((i for i, (issued, _) in enumerate(waits[p]) if issued > head), None)
        if index is None:  # p is stuck at its last sends: nothing after them to receive
            continue
        received = {x for step in steps[: index + 1] for x in _step_receives(schedule, p, step)}
        received |= {x for step in steps[: index + 1] for x in plan[p].get(step[0], [])}
        from_d = _sent(schedule)[d, p]
        move = [x for x in from_d[: from_d.index(m) + 1] if x not in received]
        if move:
            for action, early in list(plan[p].items()):  # posted later until now
                plan[p][action] = [x for x in early if x not in move]
            plan[p].setdefault(steps[index][0], []).extend(move)
            plan[p] = {a: ms for a, ms in plan[p].items() if ms}
            return True
    return False


# ---------------------------------------------------------------- execution


class Slot(NamedTuple):
    """One action's place in a timeline."""

    action: Action
    start: float
    end: float


@dataclass
class Timeline:
    """A predicted execution: per device its actions with start and end times.

    `bubble_fraction` is idle device time over `len(devices) * makespan`.
    """

    name: str
    devices: list[list[Slot]]
    makespan: float
    bubble_fraction: float


def _steps(schedule: Schedule, d: int) -> list[tuple[Action, ...]]:
    """Device d's row cut into steps: one action, or one overlap group run together."""
    groups = schedule.overlap[d] if schedule.overlap else []
    group_of = {a: tuple(g) for g in groups for a in g}
    steps: list[tuple[Action, ...]] = []
    for action in schedule.devices[d]:
        step = group_of.get(action, (action,))
        if not steps or steps[-1] != step:
            steps.append(step)
    return steps


def _execute(
    schedule: Schedule, duration: Callable[[Action], float], comm_time: float
) -> list[list[Slot]]:
    """Runs every device's steps in order as soon as their inputs exist; raises on deadlock.

    An action starts when its device is free and every action it needs has
    completed (plus `comm_time` when that action ran on another device: sends
    are asynchronous, the receiver waits at its own action). Members of an
    overlap group start together and the device moves on when all finish.
    """
    n = schedule.num_stages
    steps = [_steps(schedule, d) for d in range(len(schedule.devices))]
    nxt = [0] * len(steps)
    free = [0.0] * len(steps)
    end: dict[Action, float] = {}
    slots: list[list[Slot]] = [[] for _ in steps]

    def arrival(dep: Action, d: int) -> float:
        return end[dep] + (comm_time if schedule.device_of(dep.stage) != d else 0.0)

    def ready(step: tuple[Action, ...]) -> bool:
        return all(dep in end or dep in step for a in step for dep in _dependencies(a, n))

    progressed = True
    while progressed:
        progressed = False
        for d, device_steps in enumerate(steps):
            while nxt[d] < len(device_steps) and ready(device_steps[nxt[d]]):
                pending = list(device_steps[nxt[d]])
                while pending:
                    action = next(
                        a for a in pending if all(dep in end for dep in _dependencies(a, n))
                    )
                    pending.remove(action)
                    deps = _dependencies(action, n)
                    start = max([free[d], *(arrival(dep, d) for dep in deps)])
                    end[action] = start + duration(action)
                    slots[d].append(Slot(action, start, end[action]))
                free[d] = max(end[a] for a in device_steps[nxt[d]])
                nxt[d] += 1
                progressed = True
    blocked = [d for d in range(len(steps)) if nxt[d] < len(steps[d])]
    if blocked:
        raise ScheduleError(
            _deadlock_message(schedule, [(d, steps[d][nxt[d]]) for d in blocked], end)
        )
    return slots


def _deadlock_message(
    schedule: Schedule, blocked: list[tuple[int, tuple[Action, ...]]], done: dict[Action, float]
) -> str:
    waits = []
    for d, step in blocked:
        for action in step:
            missing = [
                dep
                for dep in _dependencies(action, schedule.num_stages)
                if dep not in done and dep not in step
            ]
            if missing:
                dep = missing[0]
                waits.append(
                    f"device {d} waits at {action} for {dep} on device "
                    f"{schedule.device_of(dep.stage)}"
                )
                break
    return f"schedule '{schedule.name}': deadlock: " + "; ".join(waits)


# ---------------------------------------------------------------- evaluation


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """GPipe's and 1F1B's idle fraction, (p - 1) / (m + p - 1), with equal-cost stages."""
    _check_sizes(num_stages, num_microbatches)
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def simulate(
    schedule: Schedule,
    f_time: float = 1.0,
    b_time: float = 2.0,
    w_time: float = 0.0,
    comm_time: float = 0.0,
) -> Timeline:
    """Predicts when each action runs, with a fixed time per F, B and W and per message.

    Validates the schedule first. Every stage costs the same; `b_time` is a
    full backward for stages that do not use W, the input-gradient part for
    those that do. Idle time counts where a device runs nothing.
    """
    validate(schedule)
    times = {"F": f_time, "B": b_time, "W": w_time}
    slots = _execute(schedule, lambda a: times[a.kind], comm_time)
    makespan = max((s.end for row in slots for s in row), default=0.0)
    busy = sum(union_length((slot.start, slot.end) for slot in row) for row in slots)
    total = makespan * len(slots)
    bubble = (total - busy) / total if total > 0 else 0.0
    return Timeline(schedule.name, slots, makespan, bubble)


def union_length(spans: Iterable[tuple[float, float]]) -> float:
    """The length of the union of the (start, end) intervals `spans` (overlaps count once):
    a device's busy time when its actions or tasks may overlap."""
    busy, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        start = max(start, reach)
        if end > start:
            busy += end - start
            reach = end
    return busy


# ---------------------------------------------------------------- tabular view


@dataclass(frozen=True)
class ClosedForm:
    """A bubble ratio as a formula of the schedule's sizes, the sizes and its value."""

    formula: str
    sizes: str
    value: float


def _fill_drain_bubble(schedule: Schedule) -> ClosedForm:
    p, m = len(schedule.devices), schedule.num_microbatches
    return ClosedForm("(p-1)/(m+p-1)", f"p={p}, m={m}", bubble_fraction(p, m))


def _interleaved_bubble(schedule: Schedule) -> ClosedForm:
    # Megatron's (p-1)/(v*m+p-1) once a round holds p microbatches. With fewer
    # (m < p), a device waits for each round to come back round the ring: the
    # step then lasts v*p + m - 1 (F+B) units of which v*m are busy.
    p, m = len(schedule.devices), schedule.num_microbatches
    v = schedule.num_stages // p
    sizes = f"p={p}, v={v}, m={m}"
    if m >= p:
        return ClosedForm("(p-1)/(v*m+p-1)", sizes, (p - 1) / (v * m + p - 1))
    return ClosedForm("(v*(p-m)+m-1)/(v*p+m-1)", sizes, (v * (p - m) + m - 1) / (v * p + m - 1))


def _zero_bubble_h2_bubble(schedule: Schedule) -> ClosedForm:
    # Only the fill is idle: p - 1 units of the 3m + p - 1 a device spans, at F = B = W.
    p, m = len(schedule.devices), schedule.num_microbatches
    return ClosedForm("(p-1)/(3m+p-1) at F=B=W", f"p={p}, m={m}", (p - 1) / (3 * m + p - 1))


CLOSED_FORMS: dict[str, Callable[[Schedule], ClosedForm]] = {
    "gpipe": _fill_drain_bubble,
    "1f1b": _fill_drain_bubble,
    "interleaved": _interleaved_bubble,
    "zb-h2": _zero_bubble_h2_bubble,
}
"""Per built-in schedule, its bubble ratio in closed form (equal-cost stages)."""


def closed_form_bubble(schedule: Schedule) -> ClosedForm | None:
    """The closed-form bubble ratio of a built-in schedule; None for any other.

    A schedule counts as built-in when its rows are the built-in's of that
    name, sizes and device count, so a user table named "1f1b" gets the
    formula only if it is 1F1B.
    """
    form = CLOSED_FORMS.get(schedule.name)
    if form is None:
        return None
    try:
        reference = builtin(
            schedule.name, schedule.num_stages, schedule.num_microbatches, len(schedule.devices)
        )
    except ScheduleError:  # sizes the built-in refuses: the rows cannot be its
        return None
    return form(schedule) if reference.devices == schedule.devices else None


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per device, the most forwards whose results it holds at once, from its row's order.

    A forward's results are held from its F until the stage's last backward
    action for that microbatch (W when the stage lists W, else B); each stage
    and microbatch counts one. An overlap group's forwards count before its
    backwards release anything, since its actions run together.
    """
    uses_w = {a.stage for row in schedule.devices for a in row if a.kind == "W"}
    peaks = []
    for d in range(len(schedule.devices)):
        held = peak = 0
        for step in _steps(schedule, d):
            held += sum(a.kind == "F" for a in step)
            peak = max(peak, held)
            held -= sum(a.kind == ("W" if a.stage in uses_w else "B") for a in step)
        peaks.append(peak)
    return peaks


@dataclass(frozen=True)
class ScheduleView:
    """A schedule evaluated without running it (`Schedule.view`); `str()` is the text.

    `costs` are the times per F, B and W the `timeline` assumed; `closed_form`
    is None where the schedule has no formula; `peak_in_flight[d]` is device
    d's most held forwards (`peak_in_flight`).
    """

    schedule: Schedule
    costs: dict[str, float]
    closed_form: ClosedForm | None
    timeline: Timeline
    peak_in_flight: list[int]

    def __str__(self) -> str:
        s = self.schedule
        used = [k for k in KINDS if any(a.kind == k for row in s.devices for a in row)]
        costs = ", ".join(f"{k}={self.costs[k]:g}" for k in used)
        form = self.closed_form
        bubble = "none" if form is None else (
            f"{form.formula} = {100 * form.value:.1f}% ({form.sizes})"
        )
        peaks = "\n".join(f"device {d}: {n}" for d, n in enumerate(self.peak_in_flight))
        return (
            f"schedule {s.name}: {len(s.devices)} devices, {s.num_stages} stages, "
            f"{s.num_microbatches} microbatches\n\n"
            f"actions per device:\n{s.table()}\n\n"
            f"closed-form bubble: {bubble}\n\n"
            f"idealised time slots ({costs}; communication free):\n{render_text(self.timeline)}\n"
            f"peak in-flight activations (microbatches held for their backward):\n{peaks}\n"
        )

    def svg(self) -> str:
        """The time-slot table as a picture (`render_svg`), as `Compiled.dump` draws it."""
        return render_svg(self.timeline)


# ---------------------------------------------------------------- rendering


def _labeller(timeline: Timeline) -> Callable[[Action], str]:
    """`F0`-style labels when every device runs one stage, else full `0F0` actions."""
    single = all(len({s.action.stage for s in row}) <= 1 for row in timeline.devices)
    if single:
        return lambda a: f"{a.kind}{a.microbatch}"
    return str


def render_text(timeline: Timeline, unit: float = 1.0) -> str:
    """An ASCII chart: one row per device, one column per `unit` of time.

    A cell shows the action running at the middle of its column (`F0`, `B1`;
    `0F1` when a device runs several stages), `.` when the device is idle.
    Zero-length actions take no column.
    """
    label = _labeller(timeline)
    columns = math.ceil(timeline.makespan / unit - 1e-9)
    rows = []
    for row in timeline.devices:
        cells = []
        for c in range(columns):
            t = (c + 0.5) * unit
            running = [label(s.action) for s in row if s.start <= t < s.end]
            cells.append("/".join(running) or ".")
        rows.append(cells)
    width = max([1, *(len(cell) for cells in rows for cell in cells)])
    names = [f"device {d}" for d in range(len(rows))]
    margin = max([len("time"), *(len(n) for n in names)])
    axis = ""
    for c in range(columns):
        position = c * (width + 1)
        mark = f"{c * unit:g}"
        if not axis or len(axis) < position:
            axis += " " * (position - len(axis)) + mark
    lines = [f"{'time':<{margin}} | {axis}".rstrip()]
    for name, cells in zip(names, rows, strict=True):
        lines.append(f"{name:<{margin}} | " + " ".join(f"{cell:<{width}}" for cell in cells))
    lines.append(
        f"{timeline.name}: makespan {timeline.makespan:g}, "
        f"bubble {100 * timeline.bubble_fraction:.1f}%"
    )
    return "\n".join(line.rstrip() for line in lines) + "\n"


_COLOURS = {"F": "#6baed6", "B": "#74c476", "W": "#fd8d3c"}
_ROW_HEIGHT = 30
_LEFT = 80
_TOP = 40
_RIGHT = 20
_AXIS = 40
_MIN_WIDTH = 420  # room for the title and the legend


def render_svg(timeline: Timeline) -> str:
    """A standalone SVG picture of the timeline: a row per device, a box per action.

    F boxes are blue, B green, W orange, each labelled with its microbatch
    (with its stage too when a device runs several); overlapping actions on
    one device share its row in lanes. A time axis runs along the bottom.
    """
    label = _labeller(timeline)
    makespan = timeline.makespan or 1.0
    scale = max(8.0, min(40.0, 960.0 / makespan))
    width = max(_MIN_WIDTH, _LEFT + makespan * scale + _RIGHT)
    height = _TOP + len(timeline.devices) * _ROW_HEIGHT + _AXIS
    title = escape(
        f"{timeline.name}: makespan {timeline.makespan:g}, "
        f"bubble {100 * timeline.bubble_fraction:.1f}%"
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'viewBox="0 0 {width:.0f} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{title}</title>",
        f'<text x="{_LEFT}" y="{_TOP - 18}" font-size="13">{title}</text>',
        *_legend_svg(width),
    ]
    for d, row in enumerate(timeline.devices):
        top = _TOP + d * _ROW_HEIGHT
        parts.append(
            f'<text x="{_LEFT - 8}" y="{top + _ROW_HEIGHT / 2 + 4:g}" '
            f'text-anchor="end">device {d}</text>'
        )
        parts.append(
            f'<rect x="{_LEFT}" y="{top + 2}" width="{makespan * scale:g}" '
            f'height="{_ROW_HEIGHT - 4}" fill="#f4f4f4"/>'
        )
        lanes = _lanes(row)
        lane_height = (_ROW_HEIGHT - 4) / (max(lanes, default=0) + 1)
        for slot, lane in zip(row, lanes, strict=True):
            if slot.end <= slot.start:
                continue
            x = _LEFT + slot.start * scale
            y = top + 2 + lane * lane_height
            w = (slot.end - slot.start) * scale
            text = escape(label(slot.action))
            parts.append(
                f"<g><title>{slot.action}: {slot.start:g} to {slot.end:g}</title>"
                f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{lane_height:g}" '
                f'fill="{_COLOURS[slot.action.kind]}" stroke="white"/>'
                f'<text x="{x + w / 2:g}" y="{y + lane_height / 2 + 4:g}" '
                f'text-anchor="middle">{text}</text></g>'
            )
    parts.extend(_axis_svg(makespan, scale, _TOP + len(timeline.devices) * _ROW_HEIGHT))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _legend_svg(width: float) -> list[str]:
    parts = []
    for i, (kind, colour) in enumerate(_COLOURS.items()):
        x = width - _RIGHT - 30 * (len(_COLOURS) - i)
        parts.append(f'<rect x="{x:g}" y="{_TOP - 30}" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{x + 15:g}" y="{_TOP - 20}">{kind}</text>')
    return parts


def _lanes(row: list[Slot]) -> list[int]:
    """Per slot, the lowest lane free at its start, so concurrent actions stack."""
    lane_free: list[float] = []
    lanes = []
    for slot in row:
        lane = next((i for i, t in enumerate(lane_free) if t <= slot.start), len(lane_free))
        if lane == len(lane_free):
            lane_free.append(slot.end)
        else:
            lane_free[lane] = slot.end
        lanes.append(lane)
    return lanes


def _axis_svg(makespan: float, scale: float, y: float) -> list[str]:
    step = max(1, math.ceil(makespan / 20))
    parts = [
        f'<line x1="{_LEFT}" y1="{y + 4}" x2="{_LEFT + makespan * scale:g}" y2="{y + 4}" '
        f'stroke="black"/>'
    ]
    for t in range(0, math.floor(makespan) + 1, step):
        x = _LEFT + t * scale
        parts.append(f'<line x1="{x:g}" y1="{y + 4}" x2="{x:g}" y2="{y + 9}" stroke="black"/>')
        parts.append(f'<text x="{x:g}" y="{y + 21}" text-anchor="middle">{t}</text>')
    parts.append(
        f'<text x="{_LEFT + makespan * scale:g}" y="{y + 35}" text-anchor="end">time</text>'
    )
    return parts


def save_svg(timeline: Timeline, path: str | os.PathLike[str]) -> None:
    """Writes `render_svg(timeline)` to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_svg(timeline))
