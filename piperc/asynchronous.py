"""Asynchronous pipelines as data: when each stage updates its weights, which weight version
each microbatch reads, and how stale the gradients it applies are.

A pipeline schedule (`piperc.schedules.Schedule`) orders each stage's forwards and
backwards. An `UpdatePlan` adds the weight updates: per stage, its events in order,
`F m` (forward of microbatch m), `B m` (backward; also `W m` when the schedule splits the
weight gradient) and `U (m, ...)` (an update applying the mean of those microbatches'
gradients). The semantics are PipeDream's with weight stashing, and they hold for every
plan:

- the forward of microbatch m on stage s reads the stage's latest weights, version
  v(s, m) = the number of updates the stage made before that forward;
- its backward reads the same version (stashed), so m's gradient is the gradient of the
  whole model at the mixed point (x_0^{v(0, m)}, ..., x_{S-1}^{v(S-1, m)});
- an update applies the mean of its microbatches' gradients for that stage's weights.

A synchronous schedule (1F1B, GPipe, ... flushed every step) updates each stage once per
step with the step's microbatches: every version is the step's, the delay 0. PipeDream
(`pipedream`) runs 1F1B over the whole run without a flush and updates a stage after each
of its backwards; PipeDream-2BW (`pipedream_2bw`) accumulates `microbatches` gradients per
update. `piperc.reference.stale_training` trains a model exactly as a plan says, on one
process, from the plan alone.

`staleness(plan)` measures the delays: per stage, for each update, how many updates of the
stage came between the version a gradient was computed at and the update applying it; and
in the units of Randomized PipeDream (Ilin & Richtarik, arXiv 2606.03498, whose code counts
them so): k - j, where k numbers every update of every stage in one global order (by unit
time slot, then stage) and j is the number of those done before the microbatch's forward
on the block's stage. Its steady-state maximum is S^2 - S/2 for S stages.

Standard library only, like `piperc.schedules`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from piperc.schedules import Action, Schedule, ScheduleError, builtin, one_f_one_b

PASSES = ("F", "B", "W")


@dataclass(frozen=True)
class Event:
    """One event of a stage: `F`, `B` or `W` of one microbatch, or `U`, an update applying
    the mean of `microbatches`' gradients."""

    kind: str
    microbatches: tuple[int, ...]

    def __str__(self) -> str:
        if self.kind == "U":
            return "U(" + ",".join(map(str, self.microbatches)) + ")"
        return f"{self.kind}{self.microbatches[0]}"


@dataclass
class UpdatePlan:
    """Per stage, its forwards, backwards and updates in order (see the module docstring).

    `microbatches` is how many microbatches make one step (the slices of one global batch);
    `steps` how many global batches the plan runs.
    """

    name: str
    num_stages: int
    microbatches: int
    steps: int
    stages: list[list[Event]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The microbatches of the whole run."""
        return self.microbatches * self.steps

    def table(self) -> str:
        """One line per stage: `stage 0: F0 F1 B0 U(0) F2 ...`."""
        return "\n".join(f"stage {s}: " + " ".join(map(str, row)) for s, row in enumerate(self.stages)) + "\n"

    def versions(self) -> list[dict[int, int]]:
        """Per stage, microbatch -> the weight version its forward reads (updates before it)."""
        out = []
        for row in self.stages:
            made, seen = 0, {}
            for e in row:
                if e.kind == "U":
                    made += 1
                elif e.kind == "F":
                    seen[e.microbatches[0]] = made
            out.append(seen)
        return out

    def check(self) -> None:
        """Raises ScheduleError unless every stage runs F then B of every microbatch once and
        applies each microbatch's gradient in exactly one update after its backward."""
        for s, row in enumerate(self.stages):
            done: dict[str, set[int]] = {k: set() for k in PASSES}
            applied: set[int] = set()
            for e in row:
                if e.kind == "U":
                    late = [m for m in e.microbatches if m not in done["B"] or m in applied]
                    if late or not e.microbatches:
                        raise ScheduleError(f"plan '{self.name}': stage {s}: {e} applies microbatches {late} "
                                            "before their backward, or twice")
                    applied.update(e.microbatches)
                    continue
                m = e.microbatches[0]
                need = {"F": None, "B": "F", "W": "B"}[e.kind]
                if m in done[e.kind] or (need and m not in done[need]):
                    raise ScheduleError(f"plan '{self.name}': stage {s}: {e} out of order")
                done[e.kind].add(m)
            every = set(range(self.total))
            if done["F"] != every or done["B"] != every or applied != every:
                raise ScheduleError(f"plan '{self.name}': stage {s} does not run and apply every one of the "
                                    f"{self.total} microbatches once")


def _rows(schedule: Schedule) -> list[list[Action]]:
    """Per stage, its actions in its device's order (one stage per device or several)."""
    rows: list[list[Action]] = [[] for _ in range(schedule.num_stages * schedule.replicas)]
    for row in schedule.devices:
        for a in row:
            rows[a.stage].append(a)
    if schedule.replicas != 1:
        raise ScheduleError(f"schedule '{schedule.name}': an update plan needs one pipeline (no replicas)")
    return rows


def _last_pass(row: list[Action]) -> dict[int, int]:
    """microbatch -> the index in `row` of its last action (its W, else its B)."""
    last = {}
    for i, a in enumerate(row):
        if a.kind in ("B", "W"):
            last[a.microbatch] = i
    return last


def synchronous(name: str, num_stages: int, microbatches: int, steps: int) -> UpdatePlan:
    """The built-in synchronous schedule `name`, flushed every step: each stage updates once
    per step, after its last action, with the step's microbatches (delay 0)."""
    one = builtin(name, num_stages, microbatches)
    plan = UpdatePlan(name, num_stages, microbatches, steps, [[] for _ in range(num_stages)])
    for step in range(steps):
        base = step * microbatches
        for s, row in enumerate(_rows(one)):
            plan.stages[s] += [Event(a.kind, (base + a.microbatch,)) for a in row]
            plan.stages[s].append(Event("U", tuple(range(base, base + microbatches))))
    plan.check()
    return plan


def _continuous(name: str, num_stages: int, microbatches: int, steps: int, group: int) -> UpdatePlan:
    """1F1B over all microbatches of the run, no flush; each stage updates after the
    backward of every `group`-th microbatch with the last `group` microbatches' gradients."""
    total = microbatches * steps
    plan = UpdatePlan(name, num_stages, microbatches, steps, [])
    for row in _rows(one_f_one_b(num_stages, total)):
        events, last = [], _last_pass(row)
        for i, a in enumerate(row):
            events.append(Event(a.kind, (a.microbatch,)))
            if a.kind in ("B", "W") and last[a.microbatch] == i and (a.microbatch + 1) % group == 0:
                events.append(Event("U", tuple(range(a.microbatch + 1 - group, a.microbatch + 1))))
        plan.stages.append(events)
    plan.check()
    return plan


def pipedream(num_stages: int, microbatches: int, steps: int) -> UpdatePlan:
    """PipeDream (Harlap et al., 2018): 1F1B without a flush, each stage updating after each
    of its backwards with that microbatch's gradient, weights stashed from forward to
    backward. `microbatches` only groups the losses into steps."""
    return _continuous("pipedream", num_stages, microbatches, steps, 1)


def pipedream_2bw(num_stages: int, microbatches: int, steps: int) -> UpdatePlan:
    """PipeDream-2BW (Narayanan et al., 2021): 1F1B without a flush, each stage updating once
    per `microbatches` microbatches with their accumulated (mean) gradient; a microbatch
    reads the stage's latest version at its forward and keeps it to its backward, so at most
    two versions are live when `microbatches` >= the number of stages."""
    return _continuous("pipedream-2bw", num_stages, microbatches, steps, microbatches)


PLANS = {"pipedream": pipedream, "pipedream-2bw": pipedream_2bw}
"""The asynchronous plans by schedule name; any built-in synchronous schedule is `synchronous`."""


def plan(name: str, num_stages: int, microbatches: int, steps: int) -> UpdatePlan:
    """The update plan of schedule `name`: an asynchronous one (`PLANS`) or a built-in
    synchronous schedule flushed every step."""
    if name in PLANS:
        return PLANS[name](num_stages, microbatches, steps)
    return synchronous(name, num_stages, microbatches, steps)


# ---------------------------------------------------------------- timing and staleness


def timeline(plan: UpdatePlan) -> list[dict[Event, tuple[int, int]]]:
    """Per stage, each F/B/W event's (start, end) under unit costs (an update takes no time):
    a stage runs its events in order, a forward after the previous stage's forward of the
    microbatch, a backward after the next stage's backward. Raises ScheduleError on a
    deadlock."""
    S = plan.num_stages
    done: dict[tuple[int, str, int], int] = {}
    times: list[dict[Event, tuple[int, int]]] = [{} for _ in range(S)]
    cursor, clock = [0] * S, [0] * S
    while any(cursor[s] < len(plan.stages[s]) for s in range(S)):
        progressed = False
        for s in range(S):
            while cursor[s] < len(plan.stages[s]):
                e = plan.stages[s][cursor[s]]
                if e.kind == "U":
                    times[s][e] = (clock[s], clock[s])
                    cursor[s] += 1
                    continue
                m = e.microbatches[0]
                dep = {"F": (s - 1, "F", m) if s > 0 else None,
                       "B": (s + 1, "B", m) if s < S - 1 else None, "W": None}[e.kind]
                if dep is not None and dep not in done:
                    break
                start = max(clock[s], done.get(dep, 0) if dep else 0)
                clock[s] = start + 1
                done[(s, e.kind, m)] = clock[s]
                times[s][e] = (start, clock[s])
                cursor[s] += 1
                progressed = True
        if not progressed and any(cursor[s] < len(plan.stages[s]) for s in range(S)):
            stuck = {s: str(plan.stages[s][cursor[s]]) for s in range(S) if cursor[s] < len(plan.stages[s])}
            raise ScheduleError(f"plan '{plan.name}': deadlock: stages wait at {stuck}")
    return times


@dataclass
class Staleness:
    """The delays of an update plan (see `staleness`)."""

    per_stage: list[list[int]]
    """Per stage, per update applied to it (in order), the largest number of the stage's
    own updates between a gradient's version and that update."""
    global_delays: list[list[int]]
    """Per update in the global order (unit time slots, then stage), its delay k - j on each
    block j (Randomized PipeDream's units)."""

    def stage_max(self, steady: bool = True) -> list[int]:
        """Per stage, the largest delay of its own updates (over the second half if `steady`)."""
        return [max(d[len(d) // 2:] if steady else d, default=0) for d in self.per_stage]

    def global_max(self, steady: bool = True) -> int:
        """The largest global delay on any block (over the second half of updates if `steady`)."""
        rows = self.global_delays[len(self.global_delays) // 2:] if steady else self.global_delays
        return max((max(r) for r in rows), default=0)


def staleness(plan: UpdatePlan) -> Staleness:
    """The delays of `plan`: per stage in its own updates, and globally in Randomized
    PipeDream's units (see the module docstring). A synchronous plan's are all 0."""
    versions = plan.versions()
    per_stage = []
    for s, row in enumerate(plan.stages):
        delays, made = [], 0
        for e in row:
            if e.kind == "U":
                delays.append(max(made - versions[s][m] for m in e.microbatches))
                made += 1
        per_stage.append(delays)
    times = timeline(plan)
    updates = []  # (time, stage, microbatches)
    for s, row in enumerate(plan.stages):
        for e in row:
            if e.kind == "U":
                updates.append((times[s][e][0], s, e.microbatches))
    updates.sort(key=lambda u: (u[0], u[1]))
    forward_at = [{e.microbatches[0]: t[0] for e, t in times[s].items() if e.kind == "F"}
                  for s in range(plan.num_stages)]
    done_times = [t for t, _, _ in updates]
    global_delays = []
    for k, (_, _, mbs) in enumerate(updates):
        row = []
        for j in range(plan.num_stages):
            start = min(forward_at[j][m] for m in mbs)
            before = bisect.bisect_right(done_times, start)  # the updates done by then
            row.append(k - before)
        global_delays.append(row)
    return Staleness(per_stage, global_delays)
