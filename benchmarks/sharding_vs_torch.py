"""Step time and peak memory of piperc's sharding next to torch's own, on 4 CPU ranks.

    python benchmarks/sharding_vs_torch.py [--steps 20] [--warmup 3] [--d-model 128]
        [--layers 8] [--batch 32] [--seq 64] [--only zero3|tp]

The contenders of a pair train the same GPT (examples/gpt.py, 4 heads, vocab 1024) from the
same initial weights on the same global batches, each a full step with an AdamW update
(torch.optim.AdamW with foreach=False, the per-tensor math piperc's update is written after):

    zero3  piperc dp=4 zero=3   vs  FSDP2 `fully_shard` on every block, then on the root,
                                    reshard_after_forward=True
    tp     piperc tp=2          vs  DTensor `parallelize_module`, Colwise/RowwiseParallel
           (not run yet: piperc has no tensor parallelism; see `tp_pair`)

Step time: as benchmarks/pipeline_vs_torch.py measures it. Each contender runs in 4 fresh
worker processes (gloo, one thread each); every step sits between two barriers; a step's time
is the slowest rank's; the table shows the median and the extremes over the timed steps. The
step-0 losses of a pair must agree to 1e-5, or the script fails.

Peak memory: after the timed steps each rank runs one more step under torch's own live-tensor
tracker, `torch.distributed._tools.mem_tracker.MemTracker` (FSDP2: its subclass
`FSDPMemTracker`). The tracker is a TorchDispatchMode: it counts the storage of every tensor an
op makes during the step, plus the state it is given on entry (parameters, optimizer state),
and drops a storage when a weak reference says it was freed. So it counts, on both sides, what
piperc's runtime counts (parameters, optimizer state, gradients, activations, communication
buffers) and, also on both sides, what the runtime does not: temporaries inside a launch and
the parameters a launch gathers for itself. "peak live MiB" is the tracker's peak over that
step, the largest rank's; the memory ratio compares those. The by-item table shows, for torch,
FSDPMemTracker's categories at its peak (sharded parameters + buffers, optimizer state,
sharded + unsharded gradients, activations + backward temporaries, all-gather and
reduce-scatter buffers with the unsharded parameters that view them) and, for piperc, its
runtime's own count (`result.peak_memory`'s items: state held, plus what launches,
receives and collectives made at the peak of its live count). Peak RSS (VmHWM) of every worker
is shown too; it includes the torch library and the allocator's caches.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pipeline_vs_torch import (  # noqa: E402
    N_HEADS,
    VOCAB,
    WORLD,
    Step,
    initial_model,
    join,
    load_average,
    machine,
    new_model,
    peak_rss_mib,
    print_footer,
    print_steps,
    run_pairs,
    step_ratio,
    summarize,
    timed_steps,
)

from piperc.examples import gpt  # noqa: E402
from piperc.reference import torch_optimizer  # noqa: E402
from piperc.strategy import AdamW  # noqa: E402

OPTIMIZER = AdamW(lr=1e-3, weight_decay=0.1)
MIB = 2**20

PAIRS = {"zero3": ("piperc-zero3", "torch-fsdp2")}
LABELS = {
    "piperc-zero3": "piperc dp=4 zero=3",
    "torch-fsdp2": "torch FSDP2 fully_shard",
}
ITEMS = ("parameters", "optimizer_state", "gradients", "activations", "comm_buffers")
"""The items of a peak, as piperc's `PeakMemory` names them."""
FSDP_ITEM = {
    "Sharded Param": "parameters",
    "Buffer": "parameters",
    "OptState": "optimizer_state",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "Activation": "activations",
    "Temp": "activations",
    "Unsharded Param": "comm_buffers",
    "All Gather": "comm_buffers",
    "Reduce Scatter": "comm_buffers",
}
"""Which of `ITEMS` each FSDPMemTracker category counts as (the rest, the inputs, as other).
An unsharded parameter is a view of its all-gather's output, so it counts as a buffer."""


def tp_pair() -> str:
    """Why the tp pair (piperc tp=2 vs DTensor `parallelize_module` with Colwise/RowwiseParallel
    on the attention and MLP projections) is not run: its contenders are not written yet.

    This is where it goes: a `piperc-tp` contender compiled with Mesh(tp=2) and
    `piperc.tensor_parallel` (which exists and trains exactly), a `torch-tp` contender
    parallelising the same blocks, an entry in PAIRS.
    """
    return ("not run: the contenders are not written yet (piperc tp=2 with piperc.tensor_parallel vs "
            "DTensor parallelize_module with Colwise/RowwiseParallel)")


PLANNED = {"tp": tp_pair}


@dataclass(frozen=True)
class Contender:
    """This rank's part of a contender: `step` trains on a global batch, `peak_memory` runs one
    more step under a live-tensor tracker and returns {"tracked": {category: bytes}, "own":
    {item: bytes} or None}, the tracker's peak and the contender's own count of it."""

    step: Step
    peak_memory: Callable[[tuple[torch.Tensor, torch.Tensor]], dict]


def tracked_peak(tracker) -> dict[str, int]:
    """A MemTracker's peak snapshot on the CPU, by category name, with the total."""
    snapshot = tracker.get_tracker_snapshot("peak")
    cpu = snapshot.get(torch.device("cpu"), {})
    return {getattr(kind, "value", kind): int(size) for kind, size in cpu.items()}


# ----------------------------------------------------------------------------- contenders


def piperc_zero3(config: dict, scratch: Path, rank: int) -> Contender:
    """piperc's compiled dp=4 zero=3 program for this rank, loaded by the runtime alone."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from piperc import runtime
    from piperc.runtime.comm import LIVE_ITEMS

    executor = runtime.load(scratch / "piperc-zero3")

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        return executor.step(batch)

    def peak_memory(batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        state = [(entry.kind, executor.runtime.state(entry.name)) for entry in executor.plan.state]
        tracker = MemTracker()
        tracker.track_external(*(tensor for _, tensor in state))
        with tracker:
            executor.step(batch)
        held = {kind: sum(t.nbytes for k, t in state if k == kind) for kind in ("param", "zeros", "scalar")}
        own = {
            "parameters": held["param"],
            "optimizer_state": held["zeros"] + held["scalar"],
            **dict(zip(LIVE_ITEMS, executor.runtime.peak_live_items, strict=True)),
        }
        return {"tracked": tracked_peak(tracker), "own": own}

    return Contender(step, peak_memory)


def torch_fsdp2(config: dict, scratch: Path, rank: int) -> Contender:
    """The whole model under FSDP2 (every block, then the root, resharded after forward) on
    this rank's quarter of the batch."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = initial_model(config, scratch)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    optimizer = torch_optimizer(OPTIMIZER, model.parameters())
    rows = config["batch"] // WORLD

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        tokens, targets = (x[rank * rows : (rank + 1) * rows] for x in batch)
        loss = model(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def peak_memory(batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            step(batch)
        return {"tracked": tracked_peak(tracker), "own": None}

    return Contender(step, peak_memory)


CONTENDERS: dict[str, Callable[[dict, Path, int], Contender]] = {
    "piperc-zero3": piperc_zero3,
    "torch-fsdp2": torch_fsdp2,
}


# ----------------------------------------------------------------------------- worker


def worker(name: str, scratch: Path, rank: int, port: int) -> None:
    """Runs contender `name` as `rank`: the timed steps, then one step under the memory
    tracker on the last batch; writes its measurements to the scratch folder."""
    config = join(name, scratch, rank, port)
    batches = torch.load(scratch / "batches.pt", weights_only=True)
    contender = CONTENDERS[name](config, scratch, rank)
    losses, times = timed_steps(contender.step, batches[:-1], config["warmup"])
    dist.barrier()
    memory = contender.peak_memory(tuple(batches[-1]))
    result = {"losses": losses, "times": times, "peak_rss_mib": peak_rss_mib(), "memory": memory}
    (scratch / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver


def compile_piperc(config: dict, model: gpt.GPT, batch, scratch: Path) -> float:
    """Compiles piperc dp=4 zero=3 into scratch/piperc-zero3; returns seconds."""
    import piperc

    start = time.perf_counter()
    compiled = piperc.compile(
        model, batch, mesh=piperc.Mesh(dp=WORLD), strategy=[piperc.data_parallel(axis="dp", zero=3)],
        optimizer=OPTIMIZER, keep_ir=False,
    )  # fmt: skip
    compiled.save(str(scratch / "piperc-zero3"))
    return time.perf_counter() - start


def memory_summary(ranks: list[dict]) -> dict:
    """The tracked peak per rank and its largest; the by-item split of rank 0's peak: torch's
    tracker categories folded into ITEMS, or piperc's own count where the contender has one."""
    totals = [r["memory"]["tracked"].get("Total", 0) for r in ranks]
    first = ranks[0]["memory"]
    if first["own"] is not None:
        items = {item: first["own"][item] for item in ITEMS}
        items["other"] = 0
    else:
        items = dict.fromkeys((*ITEMS, "other"), 0)
        for kind, size in first["tracked"].items():
            if kind != "Total":
                items[FSDP_ITEM.get(kind, "other")] += size
    return {"peaks": totals, "peak": max(totals), "items": items}


def check_config(args: argparse.Namespace) -> None:
    if args.d_model % N_HEADS:
        raise SystemExit(f"--d-model {args.d_model} must be a multiple of {N_HEADS} heads")
    if args.d_model % WORLD or VOCAB % WORLD:
        raise SystemExit(f"--d-model {args.d_model} must split into {WORLD} parameter shards")
    if args.batch % WORLD:
        raise SystemExit(f"--batch {args.batch} must split into {WORLD} replicas")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")


def main(argv: list[str] | None = None) -> int:
    """Runs the chosen pairs and prints the tables; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8, help="transformer blocks")
    ap.add_argument("--batch", type=int, default=32, help="global batch (rows)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--only", choices=sorted([*PAIRS, *PLANNED]), help="run one pair only")
    args = ap.parse_args(argv)
    check_config(args)
    if args.only in PLANNED:
        raise SystemExit(f"{args.only}: {PLANNED[args.only]()}")
    config = {
        "steps": args.steps,
        "warmup": args.warmup,
        "d_model": args.d_model,
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
    }
    pairs = [args.only] if args.only else list(PAIRS)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])

    model = new_model(config)
    params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(1)
    # The last batch is the memory step's.
    batches = [gpt.sample_batch(VOCAB, args.seq, args.batch) for _ in range(args.warmup + args.steps + 1)]
    print(
        f"GPT: {args.layers} blocks, d_model={args.d_model}, {N_HEADS} heads, seq={args.seq}, "
        f"vocab={VOCAB}, {params / 1e6:.2f}M parameters; global batch {args.batch}; "
        f"AdamW lr={OPTIMIZER.lr} weight_decay={OPTIMIZER.weight_decay} (foreach=False)"
    )
    print(f"{WORLD} ranks (gloo, 1 thread each) on {machine()}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per contender, then 1 step under the "
          f"memory tracker; load average before: {load_average()}", flush=True)

    chosen = {pair: PAIRS[pair] for pair in pairs}
    ranks = run_pairs(chosen, config, model, batches,
                      lambda pair, scratch: compile_piperc(config, model, batches[0], scratch), target=worker)
    results = {name: summarize(r) for name, r in ranks.items()}
    memory = {name: memory_summary(r) for name, r in ranks.items()}
    print_steps(chosen, results, LABELS, width=5)
    print()
    print(f"{'pair':<5}  {'contender':<26} {'peak live MiB':>13}  ranks 0/1/2/3 (MemTracker, one step)")
    for pair in pairs:
        for name in PAIRS[pair]:
            m = memory[name]
            peaks = "/".join(f"{p / MIB:.2f}" for p in m["peaks"])
            print(f"{pair:<5}  {LABELS[name]:<26} {m['peak'] / MIB:>13.2f}  {peaks}")
    print()
    print("rank 0's peak by item, MiB (piperc: its runtime's own count; torch: FSDPMemTracker)")
    print(f"{'pair':<5}  {'contender':<26}" + "".join(f" {item:>15}" for item in (*ITEMS, "other", "total")))
    for pair in pairs:
        for name in PAIRS[pair]:
            items = memory[name]["items"]
            sizes = [*(items[item] for item in (*ITEMS, "other")), sum(items.values())]
            print(f"{pair:<5}  {LABELS[name]:<26}" + "".join(f" {s / MIB:>15.2f}" for s in sizes))
    print()
    for pair in pairs:
        mine, theirs = (results[name] for name in PAIRS[pair])
        step_ratio(pair, mine, theirs)
        my_mem, their_mem = (memory[name] for name in PAIRS[pair])
        print(f"{pair} memory ratio piperc/torch: {my_mem['peak'] / their_mem['peak']:.3f} by peak live "
              f"tensor bytes, {max(mine['rss']) / max(theirs['rss']):.3f} by peak RSS "
              "(largest rank each; below 1 = piperc smaller)")
    for pair, why in PLANNED.items():
        if args.only is None:
            print(f"{pair}: {why()}")
    print_footer(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
