"""Timelines of a training run in the Chrome trace event format (Perfetto, chrome://tracing).

One JSON file per rank, `rank<r>.json`:

    {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {"piperc_trace": 1, "rank": r}}

Every timed event is a complete event, `{"ph": "X", "name", "cat", "ts", "dur", "pid", "tid",
"args"}`, with `ts` and `dur` in microseconds. `pid` is the rank; `tid` is a lane, named by
a `thread_name` metadata event:

- a stream of the program (`compute`, `comm`, ...): its tasks and the communications issued on
  it; a collective that a stage function issues itself sits inside its task, on the task's lane;
- `host waits`: the time the host spent in `rt.wait`, one event per communication waited for;
- `step`: one event per training step.

Events on one lane either nest or are disjoint, as Perfetto draws them. Communications in flight
at once that would cross go to a lane of their own, named after the stream (`comm 2`, ...).

Event names and categories (`cat`); every event's args hold `step`:

| cat | name | args |
|---|---|---|
| `task` | `s0_F mb1`, `s0_update` (callee, then microbatch) | stage, pass, microbatch |
| `p2p` | `send s0_F mb0 -> 1`, `recv <- 0` | peers, bytes, group |
| `collective` | `all_reduce sum s0_B_accumulate mb1 over dp_0` | bytes, group |
| `wait` | `wait ` + the communication's name | |
| `step` | `step 3` | |

A send or collective is named after the tasks that made its tensors (`s0_F mb0`: launch `s0_F`,
microbatch 0); a tensor that no task of this step made is named by its shape (`[4, 16, 32]`),
several such by their number (`9 tensors`). A batch of transfers issued together joins its
parts with `, `. The step's loss is summed over all ranks by `all_reduce loss over world`.

What the durations mean. A task runs from the host entering its launch to the host leaving it.
A communication runs from its issue (the host entering `rt.send`, `rt.all_reduce`, ..., before
the backend posts it) to the return of the first `rt.wait` for it, which is when the program
learns it completed. On CPU (gloo) that is the real timeline: kernels run on the
host, transfers in gloo's threads, and the host blocks in waits. On CUDA, launches and waits do
not block the host, so when tracing the runtime synchronises the device at the start and end of
every task and at every wait: a task's duration is its kernels' time, a communication ends when
it completed, and streams no longer overlap. Tracing costs speed and never changes results; with
tracing off (the default) the runtime does none of this.

`Trace` is the writer; anything that predicts a timeline (a simulator) writes the same format
with it, at times it computed, so that a predicted and a measured run open side by side.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
"""`otherData.piperc_trace` of the files written here."""
HOST_WAITS = "host waits"
STEP = "step"


def task_name(callee: str, microbatch: int | None) -> str:
    """A task event's name: the launched function, then its microbatch (`s0_F mb1`)."""
    return callee if microbatch is None else f"{callee} mb{microbatch}"


def file_name(rank: int) -> str:
    """The trace file of `rank` in a trace directory."""
    return f"rank{rank}.json"


class Trace:
    """The events of one rank, written as `rank<r>.json`.

    Times are microseconds on any clock that all ranks of a run share (the runtime uses the
    wall clock, so ranks line up; a simulator uses its own time from 0).
    """

    def __init__(self, rank: int, process_name: str | None = None):
        self.rank = rank
        self.process_name = process_name or f"rank {rank}"
        self.events: list[dict[str, Any]] = []
        self._lanes: dict[str, int] = {}
        # Per lane, its events as (end, start), in order (the runtime adds them in order of end).
        self._spans: dict[str, list[tuple[float, float]]] = {}

    def complete(
        self, name: str, cat: str, lane: str, start: float, end: float, args: dict[str, Any]
    ) -> None:
        """Adds a complete event from `start` to `end` (microseconds) on `lane`, or on
        `lane 2`, `lane 3`, ... when it would cross an event already there."""
        end = max(end, start)
        lane = self._free_lane(lane, start, end)
        self.events.append({
            "ph": "X", "name": name, "cat": cat, "ts": start, "dur": end - start,
            "pid": self.rank, "tid": self._tid(lane), "args": args,
        })  # fmt: skip

    def _free_lane(self, stream: str, start: float, end: float) -> str:
        """The first of `stream`'s lanes where [start, end] nests with or misses every event."""
        for n in range(1, 1_000):
            lane = stream if n == 1 else f"{stream} {n}"
            spans = self._spans.setdefault(lane, [])
            later = spans[bisect.bisect_right(spans, (start, math.inf)):]  # those ending after `start`
            if all(end <= s or (start <= s and e <= end) or (s <= start and end <= e) for e, s in later):
                bisect.insort(spans, (end, start))
                return lane
        raise RuntimeError(f"rank {self.rank}: more than 1000 overlapping events on stream {stream}")

    def _tid(self, lane: str) -> int:
        if lane not in self._lanes:
            self._lanes[lane] = len(self._lanes)
        return self._lanes[lane]

    def to_json(self) -> dict[str, Any]:
        """The trace as the Chrome trace event format's JSON object."""
        meta = [{"ph": "M", "name": "process_name", "pid": self.rank, "tid": 0,
                 "args": {"name": self.process_name}},
                {"ph": "M", "name": "process_sort_index", "pid": self.rank, "tid": 0,
                 "args": {"sort_index": self.rank}}]  # fmt: skip
        for lane, tid in self._lanes.items():
            meta.append({"ph": "M", "name": "thread_name", "pid": self.rank, "tid": tid, "args": {"name": lane}})
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": self.rank, "tid": tid,
                         "args": {"sort_index": tid}})  # fmt: skip
        return {
            "traceEvents": meta + self.events,
            "displayTimeUnit": "ms",
            "otherData": {"piperc_trace": FORMAT, "rank": self.rank},
        }

    def write(self, directory: str | Path) -> Path:
        """Writes `directory/rank<r>.json` (creating the directory) and returns its path."""
        path = Path(directory) / file_name(self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()))
        return path


def merge(directory: str | Path, ranks: int) -> Path:
    """Writes `directory/trace.json`: the events of `rank0.json` .. `rank<ranks-1>.json` in one
    file (Perfetto opens one file at a time; `pid` keeps the ranks apart)."""
    directory = Path(directory)
    events: list[dict[str, Any]] = []
    for rank in range(ranks):
        events += json.loads((directory / file_name(rank)).read_text())["traceEvents"]
    path = directory / "trace.json"
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                "otherData": {"piperc_trace": FORMAT, "ranks": ranks}}))  # fmt: skip
    return path


class Recorder:
    """What the runtime records while tracing: the clock, the running step and task, which
    task made each tensor (to name sends), and the communications in flight."""

    def __init__(self, rank: int, device: torch.device, process_name: str | None = None):
        self.trace = Trace(rank, process_name)
        self.device = device
        self.step = 0
        self.task: tuple[str, str] | None = None  # the running task's name and lane
        self.last_task: str | None = None
        self._made_by: dict[int, str] = {}  # storage address -> name of the task that made it
        self._issued: dict[int, tuple[str, str, str, float, dict[str, Any]]] = {}  # id(work) -> event
        # The wall clock lines ranks up; the performance counter keeps one rank's times monotonic.
        self._origin_us = time.time_ns() / 1000
        self._counter_ns = time.perf_counter_ns()

    def now(self) -> float:
        """Microseconds since the epoch, on this rank's monotonic clock."""
        return self._origin_us + (time.perf_counter_ns() - self._counter_ns) / 1000

    def synchronize(self) -> None:
        """On CUDA, waits for the device, so that host times are completion times."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin_step(self, step: int) -> float:
        """Starts step `step`; returns its start time."""
        self.step = step
        self._made_by = {}
        return self.now()

    def end_step(self, start: float) -> None:
        """Adds the step's event, from `start` to now."""
        self.trace.complete(f"step {self.step}", "step", STEP, start, self.now(), {"step": self.step})

    def begin_task(self, name: str, lane: str) -> float:
        """Enters a launch; returns its start time."""
        self.synchronize()
        self.task = (name, lane)
        return self.now()

    def end_task(self, start: float, args: dict[str, Any]) -> None:
        """Leaves the running launch and adds its event."""
        self.synchronize()
        name, lane = self.task
        self.task = None
        self.last_task = name
        self.trace.complete(name, "task", lane, start, self.now(), {**args, "step": self.step})

    def made(self, tensors: Sequence[torch.Tensor]) -> None:
        """Notes that the last task made `tensors` (the program reports them right after it)."""
        for tensor in tensors:
            self._made_by[tensor.untyped_storage().data_ptr()] = self.last_task

    def describe(self, tensors: Sequence[torch.Tensor]) -> str:
        """What a communication carries: the tasks that made its tensors; a tensor no task of
        this step made is named by its shape, several by their number."""
        made = [self._made_by.get(t.untyped_storage().data_ptr()) for t in tensors]
        names = list(dict.fromkeys(m for m in made if m is not None))
        others = [t for t, m in zip(tensors, made, strict=True) if m is None]
        if len(others) == 1:
            names.append(str(list(others[0].shape)))
        elif others:
            names.append(f"{len(others)} tensors")
        return ", ".join(names)

    def issued(self, work: Any, lane: str | None, name: str, cat: str, args: dict[str, Any],
               start: float | None = None) -> None:
        """Notes that `work` was issued on `lane` (None: inside the running task), from `start`
        (when the host began to issue it; default now)."""
        if lane is None:
            lane = self.task[1] if self.task is not None else HOST_WAITS
        start = self.now() if start is None else start
        self._issued[id(work)] = (name, cat, lane, start, {**args, "step": self.step})

    def waited(self, work: Any, start: float) -> None:
        """Adds the events of a wait for `work` that began at `start` and just returned: the
        wait itself, and the communication, from its issue to now."""
        self.synchronize()
        end = self.now()
        issued = self._issued.pop(id(work), None)
        name = issued[0] if issued is not None else work.what
        self.trace.complete(f"wait {name}", "wait", HOST_WAITS, start, end, {"step": self.step})
        if issued is not None:
            name, cat, lane, issue, args = issued
            self.trace.complete(name, cat, lane, issue, end, args)
