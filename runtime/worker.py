"""The process entry point of one rank.

    python -m piperc.runtime.worker DIR --batches FILE [--result FILE] [--trace TRACE_DIR]
    torchrun --nproc-per-node N -m piperc.runtime.worker DIR --batches FILE --result FILE

`FILE` given to --batches holds `torch.save(list_of_global_batches)`, each a
tuple of tensors. Every rank runs every step; rank 0 prints `PIPERC_STEP i loss`
after each and writes `{"losses", "state_dict", "peak_memory"}`
(the last one per rank) to the --result file. A
failing rank prints its traceback to stderr, each line prefixed `[rank R]`, and
exits with status 1 at once, so a collective stuck in another thread cannot
keep it alive. With --trace (or PIPERC_TRACE), every rank writes its timeline
to TRACE_DIR/rank<r>.json (`piperc.runtime.trace`).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from .comm import LIVE_ITEMS
from .executor import Executor, load
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
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "?")
    try:
        torch.set_num_threads(int(os.environ.get("PIPERC_THREADS") or 1))
        sharded = "{rank}" in args.batches
        batches = torch.load(args.batches.format(rank=rank), weights_only=True)
        executor = load(args.directory, trace=args.trace)
        _start_watchdog(executor, rank)
        losses = []
        step = executor.step_shard if sharded else executor.step
        for i, batch in enumerate(batches):
            losses.append(step(tuple(batch)))
            if executor.rank == 0:
                print(f"{STEP_PREFIX} {i} {losses[-1]!r}", flush=True)
        state = executor.state_dict()
        memory = _peak_memory(executor)
        if executor.rank == 0 and args.result:
            _write_result(args.result, losses, state, memory)
        executor.close()
    except BaseException:
        _exit(1, "".join(f"[rank {rank}] {line}\n" for line in traceback.format_exc().splitlines()))
    _exit(0, "")


def _write_result(
    path: str, losses: list[float], state: dict[str, torch.Tensor], memory: list[dict[str, int | None]]
) -> None:
    partial = f"{path}.partial"
    result = {"losses": losses, "state_dict": state, "peak_memory": memory}
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
    stuck in its own code): exits when nothing progressed for twice the timeout.

    Progress is a communication seen complete (polled, so asynchronous CUDA waits
    count only once their work is done) or a finished step."""
    limit = 2 * executor.timeout

    def watch() -> None:
        while True:
            time.sleep(min(1.0, limit / 10))
            idle = time.monotonic() - executor.last_progress
            if idle > limit:
                _exit(
                    1,
                    f"[rank {rank}] piperc watchdog: no communication completed and no step "
                    f"finished for {idle:.0f} s (limit: twice the {executor.timeout:g} s "
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
