"""Step time of piperc's sequence parallelism (ring, Ulysses) next to torch's ring attention and
to plain data parallelism, on 4 CPU ranks, on a long-sequence GPT.

    python benchmarks/sequence_vs_torch.py [--steps 5] [--warmup 2] [--d-model 128] [--layers 2]
        [--batch 4] [--seq 1024]

Every contender trains the same GPT (examples/gpt.py with attention as one
F.scaled_dot_product_attention, 4 heads, vocab 1024) from the same initial weights on the same
global batches (`--batch` sequences of `--seq` tokens), a full step with an SGD update:

    piperc-ring        sequence_parallel(method="ring") over sp=4, causal: zigzag chunks (each
                       rank holds chunks r and 2W-1-r, the default balance for causal attention)
    piperc-ring-contig the same with balance="contiguous" (rank r holds chunk r of W)
    piperc-ulysses     sequence_parallel(method="ulysses") over sp=4, causal
    torch-ring         torch's ring attention (torch.distributed.tensor.experimental's
                       `_templated_ring_attention` and its backward, the functions
                       `context_parallel` dispatches to, called from an autograd.Function:
                       on CPU `context_parallel` needs the flash kernel's handlers registered
                       first, ../shared/stack-notes.md), contiguous chunks
    torch-ring-lb      the same with torch's head-tail load balancing (each rank holds chunks r
                       and 2W-1-r of the sequence, tokens and positions permuted so)
    piperc-dp          data_parallel over dp=4: each rank one whole sequence, the same global
                       tokens
    piperc-ring-packed / piperc-ulysses-packed
                       the same batches packed with documents (gpt.packed_documents: two short
                       ones, one across the middle, the rest), attention within each document;
                       torch's ring attention takes no mask, so it has no packed contender

The torch contenders sum their parameters' gradients over the 4 ranks (each holds a quarter of
every sequence) and average; every contender's step-0 loss must agree with piperc-ring's (or,
packed, piperc-ring-packed's) to 1e-5 or the script fails.

Measured as benchmarks/pipeline_vs_torch.py measures (and with its code): 4 fresh worker
processes per contender (gloo, one thread each), every step between two barriers, a step's
time the slowest rank's, the median and the extremes over the timed steps, peak RSS per rank;
and each rank's CPU seconds per step, which show how evenly the work is spread.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pipeline_vs_torch import (  # noqa: E402
    LR,
    N_HEADS,
    VOCAB,
    WORLD,
    fork_server,
    load_average,
    machine,
    piperc_step,
    print_footer,
    print_steps,
    run_contender,
    run_worker,
    summarize,
)

import piperc  # noqa: E402
from piperc.examples import gpt  # noqa: E402
from piperc.runtime import zigzag  # noqa: E402

LOSS_TOLERANCE = 1e-5
CONTENDER_NAMES = ("piperc-ring", "piperc-ring-contig", "piperc-ulysses", "torch-ring", "torch-ring-lb", "piperc-dp",
                   "piperc-ring-packed", "piperc-ulysses-packed")
CAUSAL = 6
"""The first CAUSAL contenders train on causal batches, the rest on packed ones."""
LABELS = {
    "piperc-ring": "piperc ring, zigzag (sp=4)", "piperc-ring-contig": "piperc ring, contiguous (sp=4)",
    "piperc-ulysses": "piperc Ulysses (sp=4)",
    "torch-ring": "torch ring attention", "torch-ring-lb": "torch ring, head-tail balanced",
    "piperc-dp": "piperc data parallel (dp=4)", "piperc-ring-packed": "piperc ring (sp=4)",
    "piperc-ulysses-packed": "piperc Ulysses (sp=4)",
}


def new_model(config: dict, packed: bool = False):
    """The benchmark's GPT and an example batch (the same weights for every contender)."""
    return gpt.make(vocab=VOCAB, d_model=config["d_model"], n_heads=N_HEADS, n_layers=config["layers"],
                    seq=config["seq"], batch=config["batch"], seed=0, sdpa=True, packed=packed)


# ----------------------------------------------------------------------------- torch's ring


class _TorchRing(torch.autograd.Function):
    """torch's ring flash attention (its context-parallel kernels) on this rank's chunk."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention,
        )

        out, lse, *_ = _templated_ring_attention(group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                                                 q, k, v, is_causal=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention_backward,
        )

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, *_ = _templated_ring_attention_backward(
            ctx.group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, grad, "grad_out",
            q, k, v, out, lse, is_causal=True, dropout_p=0.0, scale=None)
        return dq, dk, dv, None


def _chunks(config: dict, rank: int, balanced: bool) -> torch.Tensor:
    """The sequence positions `rank` holds: chunk r, or chunks r and 2W-1-r (head-tail)."""
    positions = torch.arange(config["seq"])
    return zigzag.piece(positions, 0, WORLD, rank) if balanced else positions.chunk(WORLD)[rank]


def torch_ring_step(config: dict, scratch: Path, rank: int, balanced: bool):
    """This rank's share of every sequence through the GPT with torch's ring attention, the
    gradients averaged over the ranks, then SGD."""
    from torch.distributed.tensor.experimental._context_parallel import _attention

    _attention._cp_options.enable_load_balance = balanced
    model, _ = new_model(config)
    model.load_state_dict(torch.load(scratch / "initial.pt", weights_only=True))
    group = dist.group.WORLD
    gpt.causal_attention = lambda q, k, v, sdpa=False, mask=None: _TorchRing.apply(q, k, v, group)
    positions = _chunks(config, rank, balanced)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    params = list(model.parameters())

    def step(batch):
        tokens, targets = batch[0][:, positions], batch[1][:, positions]
        optimizer.zero_grad()
        x = model.embed(tokens) + model.pos(positions)
        for block in model.blocks:
            x = block(x)
        logits = model.head(model.norm(x))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p) / WORLD)
            offset += p.numel()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total.item() / WORLD

    return step


CONTENDERS = {
    **{name: functools.partial(piperc_step, pair=name.removeprefix("piperc-")) for name in CONTENDER_NAMES
       if name.startswith("piperc-")},
    "torch-ring": functools.partial(torch_ring_step, balanced=False),
    "torch-ring-lb": functools.partial(torch_ring_step, balanced=True),
}
worker = functools.partial(run_worker, "sequence_vs_torch")
"""Runs one contender's rank (pipeline_vs_torch's worker, over this script's contenders)."""


# ----------------------------------------------------------------------------- driver


def compile_piperc(name: str, config: dict, scratch: Path) -> float:
    """Compiles piperc contender `name` into scratch/<name>; returns seconds."""
    packed = name.endswith("-packed")
    model, example = new_model(config, packed)
    if name == "piperc-dp":
        mesh, strategy = piperc.Mesh(dp=WORLD), [piperc.data_parallel(axis="dp")]
    else:
        method = "ring" if "ring" in name else "ulysses"
        balance = "contiguous" if name == "piperc-ring-contig" else "auto"
        mesh, strategy = piperc.Mesh(sp=WORLD), [piperc.sequence_parallel(axis="sp", method=method, balance=balance)]
    start = time.perf_counter()
    compiled = piperc.compile(model, example, mesh=mesh, strategy=strategy, optimizer=piperc.optim.SGD(lr=LR),
                              keep_ir=False)
    compiled.save(str(scratch / name))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Runs every contender and prints the table and the ratios; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences), a multiple of 4")
    ap.add_argument("--seq", type=int, default=1024, help="sequence length, a multiple of 8")
    args = ap.parse_args(argv)
    if args.batch % WORLD or args.seq % (2 * WORLD) or args.d_model % N_HEADS or args.steps < 1:
        raise SystemExit(f"--batch must be a multiple of {WORLD}, --seq of {2 * WORLD}, --d-model of {N_HEADS}; "
                         "--steps >= 1")
    config = {"steps": args.steps, "warmup": args.warmup, "d_model": args.d_model, "layers": args.layers,
              "batch": args.batch, "seq": args.seq}
    command = " ".join([Path(sys.executable).name, "benchmarks/sequence_vs_torch.py", *(argv or sys.argv[1:])])
    model, _ = new_model(config)
    torch.manual_seed(1)
    steps = args.warmup + args.steps
    batches = [gpt.sample_batch(VOCAB, args.seq, args.batch) for _ in range(steps)]
    documents = gpt.packed_documents(args.batch, args.seq)
    params = sum(p.numel() for p in model.parameters())
    print(f"GPT: {args.layers} blocks, d_model={args.d_model}, {N_HEADS} heads, seq={args.seq}, vocab={VOCAB}, "
          f"{params / 1e6:.2f}M parameters; global batch {args.batch} sequences; SGD lr={LR}")
    print(f"{WORLD} ranks (gloo, 1 thread each) on {machine()}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per contender; load average before: {load_average()}",
          flush=True)
    results: dict[str, dict] = {}
    context = fork_server()
    with tempfile.TemporaryDirectory(prefix="piperc-bench-") as tmp:
        scratch = Path(tmp)
        (scratch / "config.json").write_text(json.dumps(config))
        torch.save(model.state_dict(), scratch / "initial.pt")
        for name in CONTENDER_NAMES:
            packed = name.endswith("-packed")
            torch.save([(*b, documents) if packed else b for b in batches], scratch / "batches.pt")
            if name.startswith("piperc-"):
                print(f"compiled {name} in {compile_piperc(name, config, scratch):.1f} s", flush=True)
            start = time.perf_counter()
            results[name] = summarize(run_contender(context, name, scratch, target=worker))
            print(f"ran {name} in {time.perf_counter() - start:.1f} s", flush=True)
    groups = {"causal": CONTENDER_NAMES[:CAUSAL], "packed": CONTENDER_NAMES[CAUSAL:]}
    print_steps(groups, results, LABELS, width=6)
    print()
    for reference, others in (("piperc-ring", CONTENDER_NAMES[1:CAUSAL]),
                              ("piperc-ring-packed", CONTENDER_NAMES[CAUSAL + 1:])):
        for name in others:
            gap = abs(results[name]["loss0"] - results[reference]["loss0"])
            if gap > LOSS_TOLERANCE * abs(results[reference]["loss0"]):
                raise SystemExit(f"{name}: step-0 loss {results[name]['loss0']!r} differs from {reference}'s "
                                 f"{results[reference]['loss0']!r} by {gap:.2e}: not the same model and data")

    def ratio(a: str, b: str, label: str) -> None:
        print(f"{label}: {results[a]['median'] / results[b]['median']:.3f} by median step "
              f"({a} / {b}; below 1 = the first is faster)")

    ratio("piperc-ring", "torch-ring-lb", "ring zigzag piperc/torch balanced")
    ratio("piperc-ring-contig", "torch-ring", "ring contiguous piperc/torch")
    ratio("piperc-ring", "piperc-ring-contig", "ring zigzag/contiguous")
    ratio("piperc-ring", "piperc-ulysses", "causal ring/ulysses")
    ratio("piperc-ring-packed", "piperc-ulysses-packed", "packed ring/ulysses")
    ratio("piperc-ring", "piperc-dp", "causal ring/dp")
    ratio("piperc-ulysses", "piperc-dp", "causal ulysses/dp")
    ratio("piperc-ring-packed", "piperc-ring", "ring packed/causal")
    print()
    print("CPU seconds per step by rank (median), and the busiest rank's over the least busy's: the work")
    print("each rank does, which a causal contiguous cut leaves uneven (4 ranks share 2 cores here, so a")
    print("rank's idle time runs another rank and the step time hardly shows it)")
    for name in CONTENDER_NAMES:
        cpu = results[name]["cpu"]
        print(f"  {LABELS[name]:<38} {'/'.join(f'{c:.3f}' for c in cpu)}  max/min {max(cpu) / min(cpu):.2f}")
    print_footer(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
