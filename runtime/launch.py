"""Runs a compiled model on this machine: one worker process per rank.

`launch_dir` starts the workers, watches them, and either returns rank 0's
losses and final parameters or raises `LaunchError` naming the ranks that
failed with the end of their stderr. It never waits on a dead or stuck job:
when one rank fails the others get a short grace period to fail on their own
(they normally do, their communication with the dead rank breaking), then are
terminated.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .comm import REPORT_WAIT
from .executor import default_timeout
from .manifest import check_batch, read_manifest, shard
from .trace import merge

STEP_PREFIX = "PIPERC_STEP"
"""Rank 0 prints `PIPERC_STEP <step> <loss>` on stdout after each step."""
STDERR_TAIL_LINES = 30
POLL_SECONDS = 0.05
KILL_AFTER_SECONDS = 3.0

OnStep = Callable[[int, float], None]


class LaunchError(RuntimeError):
    """A launched job failed: `ranks` lists the ranks that exited with an error."""

    def __init__(self, message: str, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.ranks = list(ranks)


@dataclass(frozen=True)
class PeakMemory:
    """One rank's memory at its peak, in bytes, by item.

    `parameters` (with model buffers) and `optimizer_state` are the state the rank
    holds; `gradients`, `activations` and `comm_buffers` are the tensors live at
    the peak of the runtime's live count (`Runtime.produced`): parameter
    gradients, the rest of what launches, receives and collectives made, and the
    buffers collectives allocate (a bucket's flat buffer, which holds the reduced
    gradients until they are freed, and staging copies held until the wait);
    `weight_stash` the weight versions an asynchronous pipeline keeps for the backwards of
    microbatches in flight (PipeDream's stash; 0 for a synchronous schedule).
    A measurement on CUDA adds `cuda_max_allocated`
    (`torch.cuda.max_memory_allocated`); a prediction says in `at` where the peak is.
    """

    parameters: int
    optimizer_state: int
    gradients: int
    activations: int
    comm_buffers: int
    weight_stash: int = 0
    cuda_max_allocated: int | None = None
    at: str = ""

    ITEMS: ClassVar[tuple[str, ...]] = (
        "parameters", "optimizer_state", "gradients", "activations", "comm_buffers", "weight_stash"
    )

    @property
    def total(self) -> int:
        """The peak: every item added up."""
        return sum(getattr(self, item) for item in self.ITEMS)

    def table(self) -> str:
        """The items and the total, one per line, in MiB and bytes."""
        rows = [(item.replace("_", " "), getattr(self, item)) for item in (*self.ITEMS, "total")
                if item != "weight_stash" or self.weight_stash]  # a stash only under an asynchronous pipeline
        if self.cuda_max_allocated is not None:
            rows.append(("cuda max allocated", self.cuda_max_allocated))
        lines = [f"{name:<20}{mib(size):>12} MiB {size:>14,} B" for name, size in rows]
        return "\n".join(([f"peak at {self.at}"] if self.at else []) + lines)

    __str__ = table


def mib(size: int) -> str:
    """`size` bytes in MiB, as a table prints it."""
    return f"{size / 2**20:.3f}"


@dataclass
class LaunchResult:
    """What a finished job reports: the loss of every step, the final parameters,
    and per rank the peak of live bytes (see `Runtime.produced`) and that peak's
    memory by item (`PeakMemory`, with the state the rank holds)."""

    losses: list[float]
    state_dict: dict[str, torch.Tensor]
    peak_memory: list[PeakMemory]
    first_step: int = 0
    """The step `losses[0]` belongs to: 0, or the steps a resumed job found done."""
    sent_bytes: list[dict[str, int]] = field(default_factory=list)
    """Per rank, the bytes it sent to other ranks over the steps this run made, by what sent
    them (`Runtime.sent_bytes`: `p2p`, `all_to_all <model location>`)."""

    def sent_per_step(self) -> list[dict[str, float]]:
        """`sent_bytes` per step: each rank's counts divided by the steps this run made."""
        steps = max(1, len(self.losses))
        return [{k: v / steps for k, v in rank.items()} for rank in self.sent_bytes]

    @property
    def peak_live_bytes(self) -> list[int]:
        """Per rank, the peak of the runtime's live count: gradients, activations and
        communication buffers at the peak (the rank's state not included)."""
        return [m.total - m.parameters - m.optimizer_state for m in self.peak_memory]


def launch_dir(
    path: str | Path,
    batches: Sequence[Sequence[torch.Tensor]],
    nprocs: int | None = None,
    timeout: float | None = None,
    progress: bool | OnStep = False,
    *,
    grace: float | None = None,
    trace: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> LaunchResult:
    """Trains the compiled model in `path` on `batches` (each a tuple of global
    input tensors, one step each) with `nprocs` local processes over the
    manifest's backend.

    Every batch is first checked against the inputs the program was compiled for
    (`check_batch`: count, dtype, shape); one that differs raises ValueError naming the
    batch, the input and the difference, before any process starts.
    `nprocs` defaults to the manifest's world size. `timeout` bounds the whole
    job in seconds (None: unbounded; each rank still ends on its own when a
    communication times out, see PIPERC_TIMEOUT). `progress=True` draws a
    progress bar with the loss on stderr; a callable is called as
    `progress(step, loss)` after each step. `grace` is how long the other ranks
    get to end on their own once one failed, before they are terminated (default: long
    enough for a survivor to learn from its peers' reports which rank is stuck, 2 s more
    than `min(PIPERC_TIMEOUT, comm.REPORT_WAIT)`).
    With a `trace` directory, every rank writes its timeline there as
    `rank<r>.json`, and `trace.json` holds all ranks' (`piperc.runtime.trace`).

    With `checkpoint_every=N`, the ranks write a checkpoint to `checkpoint_dir/step_<n>` after
    every N steps (`piperc.runtime.checkpoint`: DCP format, published atomically). With
    `resume=True`, they first load the latest checkpoint in `checkpoint_dir` (written under
    this strategy or another) and train on the batches after its last step: `batches` is
    the whole run's, and the result's `losses` start at `first_step`.
    """
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be a whole number >= 0, got {checkpoint_every!r}")
    if (checkpoint_every or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_every and resume need a checkpoint_dir")
    if not batches:
        raise ValueError("launch_dir: no batches; pass a list of global batches, one per step")
    directory = Path(path).resolve()
    manifest = read_manifest(directory)
    grace = min(default_timeout(), REPORT_WAIT) + 2.0 if grace is None else grace
    nprocs = manifest.world_size if nprocs is None else nprocs
    for step, batch in enumerate(batches):  # before any process starts
        check_batch(manifest, batch, f"batch {step}")
    batches = [tuple(batch) for batch in batches]
    on_step = progress_bar(len(batches)) if progress is True else progress or None
    with tempfile.TemporaryDirectory(prefix="piperc-launch-") as scratch:
        scratch = Path(scratch)
        # Each rank receives only its own data: its replica's rows of the inputs it reads.
        for rank in range(nprocs):
            shards = [shard(manifest, rank, batch) for batch in batches] if rank < manifest.world_size else []
            torch.save(shards, scratch / f"batches.rank{rank}.pt")
        result = scratch / "result.pt"
        command = [str(directory), "--batches", str(scratch / "batches.rank{rank}.pt"), "--result", str(result)]
        if trace is not None:
            command += ["--trace", str(Path(trace).resolve())]
        if checkpoint_dir is not None:
            command += ["--checkpoint-dir", str(Path(checkpoint_dir).resolve()),
                        "--checkpoint-every", str(int(checkpoint_every))]
        if resume:
            command.append("--resume")
        job = _Job(directory, scratch)
        try:
            job.start(command, nprocs)
            job.run(timeout, grace, on_step)
        finally:
            job.stop()
        if not result.is_file():
            raise LaunchError(f"{directory}: every rank exited cleanly but rank 0 wrote no result")
        saved = torch.load(result, weights_only=True)
    if trace is not None:
        merge(trace, nprocs)
    return LaunchResult(
        losses=list(saved["losses"]),
        state_dict=dict(saved["state_dict"]),
        peak_memory=[PeakMemory(**items) for items in saved["peak_memory"]],
        first_step=int(saved["first_step"]),
        sent_bytes=[dict(r) for r in saved.get("sent_bytes", [])],
    )


def progress_bar(total: int, width: int = 30) -> OnStep:
    """An `on_step` callback drawing `step i/total [####    ] loss x` in place on stderr."""

    def on_step(step: int, loss: float) -> None:
        done = step + 1
        filled = width * done // max(total, 1)
        bar = "#" * filled + " " * (width - filled)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\rstep {done}/{total} [{bar}] loss {loss:.6g}{end}")
        sys.stderr.flush()

    return on_step


class _Job:
    """The worker processes of one launch and their output files."""

    def __init__(self, directory: Path, scratch: Path):
        self.directory = directory
        self.scratch = scratch
        self.procs: list[_Rank] = []
        self.stdout_tails: list[_LineTail] = []

    def start(self, argv: list[str], nprocs: int) -> None:
        """Starts ranks 0..nprocs-1, each running the worker with `argv` in the torchrun
        environment, in a session of its own (so that terminating a rank also ends anything
        it started), its output going to files.

        The ranks are forked from a server process that has imported the runtime once
        (multiprocessing's forkserver, kept for later launches from this process): a rank
        starts in milliseconds instead of paying for `import torch` again."""
        port = _free_port()
        for rank in range(nprocs):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nprocs),
                LOCAL_WORLD_SIZE=str(nprocs),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
            proc = _Rank(argv, env, self._stdout(rank), self._stderr(rank))
            self.procs.append(proc)
            self.stdout_tails.append(_LineTail(self._stdout(rank)))

    def _stdout(self, rank: int) -> Path:
        return self.scratch / f"rank{rank}.stdout"

    def _stderr(self, rank: int) -> Path:
        return self.scratch / f"rank{rank}.stderr"

    def run(self, timeout: float | None, grace: float, on_step: OnStep | None) -> None:
        """Waits for every rank to exit; raises LaunchError on a failure or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failed: list[int] = []
        failed_at = None
        while True:
            self._forward_output(on_step)
            newly = [
                r for r, p in enumerate(self.procs) if p.poll() not in (None, 0) and r not in failed
            ]
            # A rank killed by a signal most likely caused the others' errors: name it first.
            failed += sorted(newly, key=lambda r: (self.procs[r].returncode > 0, r))
            if newly and failed_at is None:
                failed_at = time.monotonic()
            running = [r for r, p in enumerate(self.procs) if p.poll() is None]
            if not running:
                break
            now = time.monotonic()
            if failed_at is not None and now - failed_at > grace:
                break
            if deadline is not None and now > deadline:
                self.stop()
                raise LaunchError(
                    f"{self.directory}: the job did not finish within {timeout:g} s; ranks "
                    f"{running} were still running and were terminated\n"
                    + self._stderr_tails(range(len(self.procs))),
                    failed,
                )
            time.sleep(POLL_SECONDS)
        self._forward_output(on_step)
        if not failed:
            return
        terminated = [r for r, p in enumerate(self.procs) if p.poll() is None]
        self.stop()
        reasons = "; ".join(f"rank {r} {_describe_exit(self.procs[r].returncode)}" for r in failed)
        if terminated:
            reasons += f"; ranks {terminated} did not end within {grace:g} s and were terminated"
        raise LaunchError(
            f"{self.directory}: the job failed: {reasons}\n" + self._stderr_tails(failed), failed
        )

    def _forward_output(self, on_step: OnStep | None) -> None:
        """Reports rank 0's step lines to `on_step` and echoes other output lines."""
        for rank, tail in enumerate(self.stdout_tails):
            for line in tail.new_lines():
                fields = line.split()
                if rank == 0 and len(fields) == 3 and fields[0] == STEP_PREFIX:
                    if on_step is not None:
                        on_step(int(fields[1]), float(fields[2]))
                else:
                    print(f"[rank {rank}] {line}")

    def _stderr_tails(self, ranks) -> str:
        parts = []
        for rank in ranks:
            lines = self._stderr(rank).read_text(errors="replace").splitlines()
            shown = "\n".join(lines[-STDERR_TAIL_LINES:]) or "(no output)"
            parts.append(f"--- rank {rank} stderr (last {STDERR_TAIL_LINES} lines) ---\n{shown}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Terminates every rank still running (SIGTERM, then SIGKILL) and reaps them all."""
        alive = [p for p in self.procs if p.poll() is None]
        for proc in alive:
            _signal_session(proc, signal.SIGTERM)
        give_up = time.monotonic() + KILL_AFTER_SECONDS
        while any(p.poll() is None for p in alive) and time.monotonic() < give_up:
            time.sleep(POLL_SECONDS)
        for proc in alive:
            if proc.poll() is None:
                _signal_session(proc, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()


def start_without_main(process: multiprocessing.process.BaseProcess) -> None:
    """Starts `process` (from a forkserver or spawn context) without importing the
    starting program's `__main__` in it: multiprocessing would run that again in the child,
    and a user script without a main guard would launch (or calibrate) again; the child
    needs only its target."""
    launcher_main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        process.start()
    finally:
        sys.modules["__main__"] = launcher_main


class _Rank:
    """One worker process forked from the runtime's forkserver, with `subprocess.Popen`'s
    `pid`, `poll`, `returncode` and `wait`."""

    _context = None

    def __init__(self, argv: list[str], env: dict[str, str], stdout: Path, stderr: Path):
        if _Rank._context is None:
            _Rank._context = multiprocessing.get_context("forkserver")
            _Rank._context.set_forkserver_preload(["piperc.runtime.worker"])
        stdout.touch()
        stderr.touch()
        self.process = _Rank._context.Process(
            target=_rank_main, args=(argv, env, os.getcwd(), str(stdout), str(stderr)), daemon=False
        )
        start_without_main(self.process)
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode


def _rank_main(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """A forked rank: its own session, the launcher's environment and directory, output to
    files, then the worker (which ends the process)."""
    os.setsid()
    for fd, path in ((1, stdout), (2, stderr)):
        out = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(out, fd)
        os.close(out)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    from .worker import main

    main(argv)


class _LineTail:
    """Reads the complete lines appended to a file since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in lines]


def _signal_session(proc: _Rank, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # no session yet (the rank has not reached setsid) or gone
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
