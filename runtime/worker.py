"""The process entry point of one rank.

    python -m piperc.runtime.worker DIR --batches FILE [--result FILE] [--trace TRACE_DIR]
        [--checkpoint-dir CKPT [--checkpoint-every N] [--resume]]
    torchrun --nproc-per-node N -m piperc.runtime.worker DIR --batches FILE --result FILE

`FILE` given to --batches holds `torch.save(list_of_global_batches)`, each a
tuple of tensors. Every rank runs every step; rank 0 prints `PIPERC_STEP i loss`
after each and writes `{"losses", "state_dict", "peak_memory", "first_step"}`
(the last one per rank) to the --result file. With --checkpoint-every N, the
ranks write a checkpoint to CKPT/step_<n> after every N steps (`piperc.runtime.checkpoint`);
with --resume they continue from the latest one there, at the batch after its last step
(`first_step`; `losses` holds the steps run by this invocation). A
failing rank prints its traceback to stderr, each line prefixed `[rank R]`, and
exits with status 1 at once, so a collective stuck in another thread cannot
keep it alive. With --trace (or PIPERC_TRACE), every rank writes its timeline
to TRACE_DIR/rank<r>.json (`piperc.runtime.trace`).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from .comm import LIVE_ITEMS
from .executor import Executor, first_line, load
from .launch import STEP_PREFIX


def main(argv: list[str] | None = None) -> None:
    """Runs every batch of --batches on this rank, then exits the process."""
    parser = argparse.ArgumentParser(prog="python -m piperc.runtime.worker", description=__doc__)
    parser.add_argument(
        "directory", help="the compiled model directory (manifest.json, rank programs)"
    )
    parser.add_argument(
        "--batches", required=True,
        help="torch.save'd list of global batches; a path with {rank} names one file per rank "
             "holding only that rank's shards (see piperc.runtime.shard)",
    )
    parser.add_argument("--result", help="where rank 0 writes the losses and final parameters")
    parser.add_argument(
        "--trace", help="directory where every rank writes its timeline, rank<r>.json (default: PIPERC_TRACE)"
    )
    parser.add_argument(
        "--checkpoint-dir", help="where checkpoints are written (DCP format, one step_<n> directory each)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, metavar="N",
        help="write a checkpoint after every N steps (needs --checkpoint-dir)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir (from step 0 when there is none), "
             "skipping the batches it already trained on",
    )
    args = parser.parse_args(argv)
    if (args.checkpoint_every or args.resume) and not args.checkpoint_dir:
        parser.error("--checkpoint-every and --resume need --checkpoint-dir")
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    rank = os.environ.get("RANK", "?")
    try:
        torch.set_num_threads(int(os.environ.get("PIPERC_THREADS") or 1))
        sharded = "{rank}" in args.batches
        try:  # what the user gave: one line each, not a traceback
            batches = torch.load(args.batches.format(rank=rank), weights_only=True)
            executor = load(args.directory, trace=args.trace)
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise _Refused(first_line(e)) from e
        _start_watchdog(executor, rank)
        if args.resume:
            _resume(executor, args.checkpoint_dir)
        first = executor.steps_done
        losses = []
        step = executor.step_shard if sharded else executor.step
        for i in range(first, len(batches)):
            losses.append(step(tuple(batches[i])))
            if executor.rank == 0:
                print(f"{STEP_PREFIX} {i} {losses[-1]!r}", flush=True)
            if args.checkpoint_every and executor.steps_done % args.checkpoint_every == 0:
                executor.save_checkpoint(args.checkpoint_dir)
        executor.drain()  # an asynchronous pipeline's microbatches still in flight
        state = executor.state_dict()
        memory = _peak_memory(executor)
        sent: list[dict[str, int] | None] = [None] * executor.manifest.world_size
        dist.all_gather_object(sent, executor.runtime.sent_bytes)
        if executor.rank == 0 and args.result:
            _write_result(args.result, losses, state, memory, first, sent)
        executor.close()
    except _Refused as e:
        _exit(1, f"[rank {rank}] piperc worker: error: {e}\n")
    except BaseException:
        _exit(1, "".join(f"[rank {rank}] {line}\n" for line in traceback.format_exc().splitlines()))
    _exit(0, "")


def _resume(executor: Executor, root: str) -> None:
    """Loads the latest checkpoint under `root` into `executor`, if there is one."""
    from . import checkpoint  # torch.distributed.checkpoint takes 2 s to import; only when used

    path = checkpoint.latest(root)
    if path is not None:
        try:
            executor.load_checkpoint(path)
        except checkpoint.CheckpointError as e:
            raise _Refused(str(e)) from e
    if executor.rank == 0:
        done = f"{path} ({executor.steps_done} steps done)" if path else f"no checkpoint in {root}; from step 0"
        print(f"piperc: resuming from {done}", file=sys.stderr, flush=True)


class _Refused(Exception):
    """A job, batch file or checkpoint the worker cannot use: one error line, no traceback."""


def _write_result(
    path: str, losses: list[float], state: dict[str, torch.Tensor], memory: list[dict[str, int | None]],
    first_step: int, sent_bytes: list[dict[str, int] | None],
) -> None:
    partial = f"{path}.partial"
    result = {"losses": losses, "state_dict": state, "peak_memory": memory, "first_step": first_step,
              "sent_bytes": sent_bytes}
    torch.save(result, partial)
    os.replace(partial, path)


def _peak_memory(executor: Executor) -> list[dict[str, int | None]]:
    """Per rank, its peak memory by item (the fields of `launch.PeakMemory`): the state
    it holds by kind, the live count's items at its peak, and on CUDA the allocator's
    peak. Collective: every rank must call it; every rank gets the whole list."""
    runtime = executor.runtime
    held = {"param": 0, "zeros": 0, "scalar": 0}
    for entry in executor.plan.state:
        held[entry.kind] += runtime.state(entry.name).nbytes
    cuda = runtime.device.type == "cuda"
    mine = {
        "parameters": held["param"],
        "optimizer_state": held["zeros"] + held["scalar"],
        **dict(zip(LIVE_ITEMS, runtime.peak_live_items, strict=True)),
        "cuda_max_allocated": torch.cuda.max_memory_allocated(runtime.device) if cuda else None,
    }
    gathered: list[dict[str, int | None] | None] = [None] * executor.manifest.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _start_watchdog(executor: Executor, rank: str) -> None:
    """Last resort against a hang the communication timeouts do not catch (a peer
    stuck in its own code): exits when nothing progressed for twice the timeout, or the
    timeout and 25 s where that is shorter (within PIPERC_TIMEOUT + 30 s of a stall).

    Progress is a communication seen complete (polled, so asynchronous CUDA waits
    count only once their work is done) or a finished step."""
    limit = min(2 * executor.timeout, executor.timeout + 25)

    def watch() -> None:
        while True:
            time.sleep(min(1.0, limit / 10))
            idle = time.monotonic() - executor.last_progress
            if idle > limit:
                _exit(
                    1,
                    f"[rank {rank}] piperc watchdog: no communication completed and no step "
                    f"finished for {idle:.0f} s (limit: {limit:g} s for the {executor.timeout:g} s "
                    f"timeout, PIPERC_TIMEOUT); this rank or a peer is stuck, exiting\n",
                )

    threading.Thread(target=watch, name="piperc-watchdog", daemon=True).start()


def _exit(status: int, message: str) -> None:
    if message:
        sys.stderr.write(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
