"""Step time and peak memory of piperc's sharding next to torch's own, on 4 and 2 CPU ranks.

    python benchmarks/sharding_vs_torch.py [--steps 20] [--warmup 3] [--d-model 128]
        [--layers 8] [--batch 32] [--seq 64] [--only zero3|tp]

The contenders of a pair train the same GPT (examples/gpt.py, 4 heads, vocab 1024) from the
same initial weights on the same global batches, each a full step with an AdamW update
(torch.optim.AdamW with foreach=False, the per-tensor math piperc's update is written after):

    zero3  piperc dp=4 zero=3   vs  FSDP2 `fully_shard` on every block, then on the root,
                                    reshard_after_forward=True (4 ranks)
    tp     piperc tp=2          vs  DTensor `parallelize_module` with Colwise/RowwiseParallel
                                    (2 ranks, each on the whole batch)

The tp pair places every parameter the same way on both sides (`TP_PLAN`, `torch_tp_plan`):
Megatron's column/row split of the MLP, row-split attention output projection, a
vocab-parallel embedding, and the fused qkv projection's rows split in two (`Shard(0)`,
issue 7's plan). The qkv weight is [q; k; v], so each half cuts across q/k/v, not between
heads: the split into q, k and v needs the whole qkv output. DTensor's ColwiseParallel as it
comes hands the model a [b, s, 3d/2] local tensor, which the model splits as if it were the
whole [q; k; v]: not the same model, and it fails (with use_local_output=False the attention
mixes DTensors with plain tensors and fails too). So torch's side gathers the qkv output
(`output_layouts=Replicate()`) and the attention output projection takes a whole input
(`input_layouts=Replicate()`, a local slice), which is what piperc's propagation does with
that plan too (an all-gather of the qkv output before the split; `compiled.sharding` lists
it). Attention's forward then runs whole on both ranks, on both sides; how the rest is laid
out is each side's own propagation (DTensor's per-module styles, piperc's per-op rules).

Step time: as benchmarks/pipeline_vs_torch.py measures it. Each contender runs in fresh
worker processes, one per rank (gloo, one thread each); every step sits between two barriers;
a step's time is the slowest rank's; the table shows the median and the extremes over the
timed steps. The step-0 losses of a pair must agree to 1e-5, or the script fails.

Peak memory: after the timed steps each rank runs one more step under torch's own live-tensor
tracker, `torch.distributed._tools.mem_tracker.MemTracker` (FSDP2: its subclass
`FSDPMemTracker`; DTensor: MemTracker itself, which counts a DTensor's local shard). The
tracker is a TorchDispatchMode: it counts the storage of every tensor an op makes during the
step, plus the state it is given on entry (parameters, optimizer state), and drops a storage
when a weak reference says it was freed. So it counts, on both sides, what piperc's runtime
counts (parameters, optimizer state, gradients, activations, communication buffers) and, also
on both sides, what the runtime does not: temporaries inside a launch and the parameters a
launch gathers for itself. "peak live MiB" is the tracker's peak over that
step, the largest rank's; the memory ratio compares those. The by-item table shows, for torch,
the tracker's categories at its peak (sharded parameters + buffers, optimizer state,
sharded + unsharded gradients, activations + backward temporaries, all-gather and
reduce-scatter buffers with the unsharded parameters that view them; DTensor's collectives
make their outputs as ordinary ops, so MemTracker counts them as activations or temporaries)
and, for piperc, its runtime's own count (`result.peak_memory`'s items: state held, plus what
launches, receives and collectives made at the peak of its live count). Peak RSS (VmHWM) of
every worker is shown too; it includes the torch library and the allocator's caches.
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

import piperc  # noqa: E402
from piperc.examples import gpt  # noqa: E402
from piperc.reference import torch_optimizer  # noqa: E402
from piperc.strategy import AdamW  # noqa: E402

OPTIMIZER = AdamW(lr=1e-3, weight_decay=0.1)
MIB = 2**20

TP = 2

PAIRS = {"zero3": ("piperc-zero3", "torch-fsdp2"), "tp": ("piperc-tp", "torch-tp")}
RANKS = {"zero3": WORLD, "tp": TP}
"""How many processes each pair's contenders run in."""
LABELS = {
    "piperc-zero3": "piperc dp=4 zero=3",
    "torch-fsdp2": "torch FSDP2 fully_shard",
    "piperc-tp": f"piperc tp={TP}",
    "torch-tp": f"torch DTensor tp={TP}",
}
TP_PLAN = {
    "blocks.*.attn.qkv.weight": piperc.Shard(0),
    "blocks.*.attn.proj.weight": piperc.Shard(1),
    "blocks.*.mlp.fc.weight": piperc.Shard(0),
    "blocks.*.mlp.fc.bias": piperc.Shard(0),
    "blocks.*.mlp.proj.weight": piperc.Shard(1),
    "embed.weight": piperc.Shard(0),
}
"""piperc's tensor-parallel plan: issue 7's, with the MLP's first bias split as
ColwiseParallel splits it, so both sides hold the same parameters."""
ITEMS = ("parameters", "optimizer_state", "gradients", "activations", "comm_buffers")
"""The items of a peak, as piperc's `PeakMemory` names them."""
TRACKER_ITEM = {
    "Parameter": "parameters",
    "Sharded Param": "parameters",
    "Buffer": "parameters",
    "Optstate": "optimizer_state",
    "OptState": "optimizer_state",
    "Gradient": "gradients",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "Activation": "activations",
    "Temp": "activations",
    "Unsharded Param": "comm_buffers",
    "All Gather": "comm_buffers",
    "Reduce Scatter": "comm_buffers",
}
"""Which of `ITEMS` each MemTracker / FSDPMemTracker category counts as (the rest, the inputs
and MemTracker's "Other", as other). An unsharded parameter is a view of its all-gather's
output, so it counts as a buffer."""


def torch_tp_plan() -> dict:
    """DTensor's plan with `TP_PLAN`'s placements, by module: the fused qkv gathers its output
    for the split into q, k and v, so the attention projection takes a whole input."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "embed": RowwiseParallel(input_layouts=Replicate()),
        "blocks.*.attn.qkv": ColwiseParallel(output_layouts=Replicate()),
        "blocks.*.attn.proj": RowwiseParallel(input_layouts=Replicate()),
        "blocks.*.mlp.fc": ColwiseParallel(),
        "blocks.*.mlp.proj": RowwiseParallel(),
    }


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


def piperc_program(scratch: Path, pair: str) -> Contender:
    """piperc's compiled program for `pair` and this rank, loaded by the runtime alone."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from piperc import runtime
    from piperc.runtime.comm import LIVE_ITEMS

    executor = runtime.load(scratch / f"piperc-{pair}")

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


def torch_tp(config: dict, scratch: Path, rank: int) -> Contender:
    """The whole model under DTensor's `parallelize_module` with `torch_tp_plan`, every rank on
    the whole batch."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    model = initial_model(config, scratch)
    parallelize_module(model, init_device_mesh("cpu", (TP,)), torch_tp_plan())
    optimizer = torch_optimizer(OPTIMIZER, model.parameters())

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        loss = model(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def peak_memory(batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step(batch)
        return {"tracked": tracked_peak(tracker), "own": None}

    return Contender(step, peak_memory)


CONTENDERS: dict[str, Callable[[dict, Path, int], Contender]] = {
    "piperc-zero3": lambda config, scratch, rank: piperc_program(scratch, "zero3"),
    "torch-fsdp2": torch_fsdp2,
    "piperc-tp": lambda config, scratch, rank: piperc_program(scratch, "tp"),
    "torch-tp": torch_tp,
}


# ----------------------------------------------------------------------------- worker


def worker(name: str, scratch: Path, rank: int, port: int) -> None:
    """Runs contender `name` as `rank`: the timed steps, then one step under the memory
    tracker on the last batch; writes its measurements to the scratch folder."""
    pair = next(pair for pair, names in PAIRS.items() if name in names)
    config = join(name, scratch, rank, port, world=RANKS[pair])
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


def compile_piperc(pair: str, model: gpt.GPT, batch, scratch: Path) -> float:
    """Compiles piperc's contender of `pair` (dp=4 zero=3, or tp=2 with `TP_PLAN`) into
    scratch/piperc-<pair>; returns seconds."""
    if pair == "zero3":
        mesh, strategy = piperc.Mesh(dp=WORLD), [piperc.data_parallel(axis="dp", zero=3)]
    else:
        mesh, strategy = piperc.Mesh(tp=TP), [piperc.tensor_parallel(axis="tp", plan=TP_PLAN)]
    start = time.perf_counter()
    compiled = piperc.compile(model, batch, mesh=mesh, strategy=strategy, optimizer=OPTIMIZER, keep_ir=False)
    compiled.save(str(scratch / f"piperc-{pair}"))
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
                items[TRACKER_ITEM.get(kind, "other")] += size
    return {"peaks": totals, "peak": max(totals), "items": items}


def check_config(args: argparse.Namespace) -> None:
    if args.d_model % N_HEADS:
        raise SystemExit(f"--d-model {args.d_model} must be a multiple of {N_HEADS} heads")
    if args.d_model % WORLD or VOCAB % WORLD:  # WORLD shards also split into TP
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
    ap.add_argument("--only", choices=sorted(PAIRS), help="run one pair only")
    args = ap.parse_args(argv)
    check_config(args)
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
    print(", ".join(f"{pair} on {RANKS[pair]} ranks" for pair in pairs) + f" (gloo, 1 thread each) on {machine()}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per contender, then 1 step under the "
          f"memory tracker; load average before: {load_average()}", flush=True)

    chosen = {pair: PAIRS[pair] for pair in pairs}
    ranks = run_pairs(chosen, config, model, batches,
                      lambda pair, scratch: compile_piperc(pair, model, batches[0], scratch), target=worker,
                      worlds=RANKS)
    results = {name: summarize(r) for name, r in ranks.items()}
    memory = {name: memory_summary(r) for name, r in ranks.items()}
    print_steps(chosen, results, LABELS, width=5)
    print()
    print(f"{'pair':<5}  {'contender':<26} {'peak live MiB':>13}  by rank (MemTracker, one step)")
    for pair in pairs:
        for name in PAIRS[pair]:
            m = memory[name]
            peaks = "/".join(f"{p / MIB:.2f}" for p in m["peaks"])
            print(f"{pair:<5}  {LABELS[name]:<26} {m['peak'] / MIB:>13.2f}  {peaks}")
    print()
    print("rank 0's peak by item, MiB (piperc: its runtime's own count; torch: its MemTracker's categories)")
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
    print_footer(command, ranks=max(RANKS[pair] for pair in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
