"""How many microbatches fit a per-rank memory budget: pipeline x ZeRO-3 next to pipeline x plain DP.

    python benchmarks/pp_zero_memory.py [--budget-mib X] [--microbatches 1,2,4,8,16]
        [--schedule gpipe|1f1b] [--rows 1] [--d-model 128] [--layers 4] [--no-measure]

The GPT of examples/gpt.py on 8 ranks, pp=2 x dp=4, AdamW. The microbatch size is fixed
(`--rows` rows per replica and microbatch), so more microbatches is a larger global batch
(dp x microbatches x rows). Three policies:

    dp          plain data parallelism: whole parameters, gradients and optimizer state
    zero3       ZeRO-3, parameters regathered for every microbatch's forward and backward
                (reshard_after_forward=True, the least memory)
    zero3-keep  ZeRO-3, each parameter gathered once per step and kept whole across the
                microbatches (reshard_after_forward=False, one gather per step)

For each policy and microbatch count, `compiled.memory()` predicts every rank's peak
(parameters, optimizer state, gradients, activations, buffers) from the exec programs; the
table shows the worst rank. The largest count whose prediction fits the budget is then run
for one step on 8 local processes and the runtime's measured peak printed next to it
(`--no-measure` skips the runs). Both sides count the same things (see docs/architecture.md,
"Memory"); neither counts temporaries inside a launch, such as a ZeRO-3 parameter gathered
inside a forward or backward function. The default budget is plain DP's peak at 2
microbatches.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import piperc  # noqa: E402
from piperc.examples import gpt  # noqa: E402

MESH = {"pp": 2, "dp": 4}
POLICIES = {
    "dp": {"zero": 0},
    "zero3": {"zero": 3},
    "zero3-keep": {"zero": 3, "reshard_after_forward": False},
}


def compile_case(args, policy: str, microbatches: int):
    """The model compiled for one policy and microbatch count, and its global batch."""
    batch = MESH["dp"] * microbatches * args.rows
    config = {"vocab": args.vocab, "d_model": args.d_model, "n_heads": 4, "n_layers": args.layers,
              "seq": args.seq, "batch": batch}
    model, inputs = gpt.make(**config)
    compiled = piperc.compile(
        model, inputs, mesh=piperc.Mesh(**MESH),
        strategy=[piperc.pipeline(stages=MESH["pp"], microbatches=microbatches, schedule=args.schedule),
                  piperc.data_parallel(**POLICIES[policy])],
        optimizer=piperc.optim.AdamW(lr=1e-3), keep_ir=False)
    return compiled, inputs


def main(argv: list[str] | None = None) -> int:
    """Prints the predicted peaks, the largest count per policy that fits, and its measurement."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mib", type=float, default=None)
    ap.add_argument("--microbatches", default="1,2,4,8,16")
    ap.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    ap.add_argument("--rows", type=int, default=1, help="rows per replica and microbatch")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--no-measure", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    counts = [int(c) for c in args.microbatches.split(",")]

    peaks: dict[tuple[str, int], float] = {}
    for policy in POLICIES:
        for m in counts:
            compiled, _ = compile_case(args, policy, m)
            peaks[(policy, m)] = max(p.total for p in compiled.memory()) / 2**20
    budget = args.budget_mib if args.budget_mib is not None else peaks[("dp", 2)]

    print(f"GPT d_model={args.d_model} layers={args.layers} vocab={args.vocab} seq={args.seq}; "
          f"mesh pp={MESH['pp']} x dp={MESH['dp']} (8 ranks), {args.schedule}, {args.rows} row(s) per "
          f"replica and microbatch; AdamW")
    print(f"predicted peak MiB of the fullest rank; budget {budget:.3f} MiB per rank")
    print(f"{'microbatches':<14}" + "".join(f"{p:>12}" for p in POLICIES))
    for m in counts:
        cells = "".join(f"{peaks[(p, m)]:>11.3f}{'*' if peaks[(p, m)] <= budget else ' '}" for p in POLICIES)
        print(f"{m:<14}{cells}")
    print("(* fits the budget)")

    for policy in POLICIES:
        fits = [m for m in counts if peaks[(policy, m)] <= budget]
        if not fits:
            print(f"{policy}: no microbatch count fits")
            continue
        best = max(fits)
        line = f"{policy}: largest count that fits {best} (global batch {MESH['dp'] * best * args.rows}), " \
               f"predicted {peaks[(policy, best)]:.3f} MiB"
        if not args.no_measure:
            compiled, inputs = compile_case(args, policy, best)
            result = piperc.launch(compiled, [inputs], timeout=600)
            measured = max(p.total for p in result.peak_memory) / 2**20
            line += f", measured {measured:.3f} MiB"
        print(line)
    print("command: " + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
