"""The main job (`make demo`): train the example GPT on local ranks and check it.

    python -m piperc.demo [--strategy pp-dp|zero|tp] [--steps 20] [--out out]

Compiles the GPT for one of the strategies below, trains it for the given
steps on local processes (gloo; 4, or 8 for tp) and the same model on one device with
torch.optim (`piperc.verify`), and prints the difference and each rank's peak memory,
predicted and measured. `out/` keeps the IR after every pass, the per-rank programs, the
schedule as a table and a picture, and `memory.txt`.

    pp-dp   pp=2 x dp=2, 1F1B over 4 microbatches (the default)
    zero    the same with ZeRO-3 over dp: parameters, gradients and optimizer
            state held in halves, each parameter gathered for every forward
            and backward
    tp      pp=2 x dp=2 x tp=2 on 8 ranks: each stage's attention and MLP weights
            split in two over tp (the plan of TP_PLAN), with the reshards
            propagation finds, and each tp piece held in halves over dp by
            ZeRO-3
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

import torch

STRATEGIES = ("pp-dp", "zero", "tp")
TP_PLAN = {"blocks.*.attn.qkv.weight": 0, "blocks.*.attn.proj.weight": 1,
           "blocks.*.mlp.fc.weight": 0, "blocks.*.mlp.proj.weight": 1}
"""The `tp` strategy's plan: parameter glob -> the dimension split over tp (Megatron's
column- then row-parallel pairs)."""


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the exit code (1 if the run does not match one device)."""
    ap = argparse.ArgumentParser(prog="python -m piperc.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", choices=STRATEGIES, default="pp-dp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import piperc
    from piperc.examples import gpt

    model, inputs = gpt.make(n_layers=4, d_model=64, n_heads=4, seq=32, batch=16)
    batches = [gpt.make(n_layers=4, d_model=64, n_heads=4, seq=32, batch=16, seed=1000 + s)[1]
               for s in range(args.steps)]
    optimizer = piperc.optim.AdamW(lr=1e-3, weight_decay=0.1)
    pipeline = piperc.pipeline(axis="pp", stages=2, microbatches=4, schedule="1f1b")
    if args.strategy == "tp":
        mesh = piperc.Mesh(pp=2, dp=2, tp=2)
        plan = {glob: piperc.Shard(dim) for glob, dim in TP_PLAN.items()}
        strategy = [pipeline, piperc.data_parallel(axis="dp", zero=3), piperc.tensor_parallel(axis="tp", plan=plan)]
    else:
        mesh = piperc.Mesh(pp=2, dp=2)
        strategy = [pipeline, piperc.data_parallel(axis="dp", zero=3 if args.strategy == "zero" else 0)]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"piperc demo: GPT, 4 blocks, {n_params / 1e3:.0f}k parameters, batch {len(inputs[0])} x {inputs[0].shape[1]} tokens")
    print(f"  mesh {mesh!r}; strategy {', '.join(map(str, strategy))}; {optimizer}")

    start = time.perf_counter()
    compiled = piperc.compile(model, inputs, mesh=mesh, strategy=strategy, optimizer=optimizer)
    print(f"  compiled in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    torch.set_num_threads(1)
    verification = piperc.verify(model, inputs, compiled, batches, progress=True)
    result = verification.run
    elapsed = time.perf_counter() - start
    print(f"  trained {args.steps} steps on {compiled.world_size} processes and on one device in {elapsed:.1f} s")
    compiled.dump(args.out, result=result)
    print(f"  IR, programs, schedule and memory.txt in {args.out}/")
    predicted = compiled.memory()
    print("  peak MiB per rank, predicted / measured by the runtime "
          "(parameters + optimizer state + gradients + activations + buffers):")
    for rank, (guess, actual) in enumerate(zip(predicted, result.peak_memory, strict=True)):
        print(f"    rank {rank}: {guess.total / 2**20:.2f} / {actual.total / 2**20:.2f}")

    ref_losses = verification.reference_losses
    print(f"  loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f} "
          f"(one device: {ref_losses[0]:.4f}, {ref_losses[-1]:.4f})")
    print("  against single-device training with torch.optim (piperc.verify):")
    print(textwrap.indent(str(verification), "    "))
    print("  MATCH" if verification.ok else "  MISMATCH: the distributed run differs from one device")
    return 0 if verification.ok else 1


if __name__ == "__main__":
    sys.exit(main())
