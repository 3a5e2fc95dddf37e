"""Step time of the asynchronous pipelines (PipeDream, 2BW) next to flushed 1F1B, on 4 CPU ranks.

    python benchmarks/pipedream.py [--steps 20] [--warmup 3] [--d-model 128] [--layers 8]
        [--batch 32] [--seq 64] [--microbatches 8] [--only 1f1b|pipedream|pipedream-2bw]

Contenders train the same GPT (examples/gpt.py, 4 heads, vocab 1024) from the same initial
weights on the same global batches, pp=4, one stage per rank (the blocks split evenly, the
embeddings with the first, the norm, head and loss with the last), SGD:

    1f1b           piperc pipeline(schedule="1f1b"), flushed every step, and torch's
                   Schedule1F1B (torch.distributed.pipelining) on the same cuts: the
                   PyTorch-native peer, whose step-0 loss must agree with piperc's to 1e-5
    pipedream      piperc pipeline(schedule="pipedream"): no flush, an update per microbatch
    pipedream-2bw  piperc pipeline(schedule="pipedream-2bw"): no flush, an update per step

(torch has no asynchronous schedule.) The asynchronous contenders' losses differ from 1F1B's
by design (stale weights; `piperc.reference.stale_training` is their oracle, checked in
tests/test_pipedream.py). Each step of an asynchronous run is its steady program: the forwards
of the step's microbatches and the backwards and updates 1F1B interleaves with them; the first
(warm-up) step is among the untimed ones.

Next to the measured ratios, the unit-time simulation of the same plans
(`piperc.asynchronous.timeline`: F and B one slot each, updates free): the steady-state slots
per step and the bubble, the share of rank-slots idle over a run of warm-up + timed steps.

Measured as benchmarks/pipeline_vs_torch.py measures (and with its code): each contender runs
in 4 fresh worker processes (gloo, one thread each), every step sits between two barriers, a
step's time is the slowest rank's, the table shows the median and the extremes over the timed
steps, and peak RSS per rank.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_vs_torch import (  # noqa: E402
    LR,
    N_HEADS,
    WORLD,
    gpt_options,
    piperc_step,
    print_footer,
    print_steps,
    run_pairs,
    run_worker,
    set_up,
    step_ratio,
    summarize,
    torch_pipelining_step,
)

import piperc  # noqa: E402
from piperc import asynchronous  # noqa: E402
from piperc.examples import gpt  # noqa: E402

PAIRS = {"1f1b": ("piperc-1f1b", "torch-1f1b"), "pipedream": ("piperc-pipedream",),
         "pipedream-2bw": ("piperc-pipedream-2bw",)}
LABELS = {"piperc-1f1b": "piperc 1F1B (flushed)", "torch-1f1b": "torch Schedule1F1B",
          "piperc-pipedream": "piperc PipeDream", "piperc-pipedream-2bw": "piperc PipeDream-2BW"}
CONTENDERS = {**{f"piperc-{kind}": functools.partial(piperc_step, pair=kind) for kind in PAIRS},
              "torch-1f1b": torch_pipelining_step}


worker = functools.partial(run_worker, "pipedream")
"""Runs one contender's rank (pipeline_vs_torch's worker, over this script's contenders)."""


def compile_piperc(kind: str, config: dict, model: gpt.GPT, batch, scratch: Path) -> float:
    """Compiles piperc's `kind` at pp=WORLD into scratch/piperc-<kind>; returns seconds."""
    per_stage = config["layers"] // WORLD
    strategy = [piperc.pipeline(axis="pp", stages=WORLD, microbatches=config["microbatches"], schedule=kind,
                                split_at=[f"blocks.{s * per_stage}" for s in range(1, WORLD)])]
    start = time.perf_counter()
    compiled = piperc.compile(model, batch, mesh=piperc.Mesh(pp=WORLD), strategy=strategy,
                              optimizer=piperc.optim.SGD(lr=LR), keep_ir=False)
    compiled.save(str(scratch / f"piperc-{kind}"))
    return time.perf_counter() - start


def simulated(kind: str, microbatches: int, steps: int) -> tuple[int, float]:
    """Unit-time simulation of `kind`'s plan at pp=WORLD: (steady slots per step, bubble over
    `steps` steps: idle rank-slots / all rank-slots, the drain of an asynchronous run included)."""
    def makespan(n: int) -> tuple[int, asynchronous.UpdatePlan]:
        plan = asynchronous.plan(kind, WORLD, microbatches, n)
        return max(end for stage in asynchronous.timeline(plan) for _, end in stage.values()), plan

    span, plan = makespan(steps)
    per_step = makespan(steps + 1)[0] - span
    busy = sum(1 for stage in plan.stages for e in stage if e.kind != "U")
    return per_step, 1 - busy / (WORLD * span)


def check_config(args) -> None:
    if args.layers % WORLD:
        raise SystemExit(f"--layers {args.layers} must be a multiple of {WORLD} (blocks per stage)")
    if args.d_model % N_HEADS:
        raise SystemExit(f"--d-model {args.d_model} must be a multiple of {N_HEADS} heads")
    if args.batch % args.microbatches:
        raise SystemExit(f"--batch {args.batch} must split into {args.microbatches} microbatches")
    if args.microbatches < WORLD:
        raise SystemExit(f"--microbatches {args.microbatches}: torch's Schedule1F1B needs at least {WORLD}")
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps must be >= 1 and --warmup >= 1 (an asynchronous run's first step is its warm-up)")


def main(argv: list[str] | None = None) -> int:
    """Runs the contenders and prints the table and the ratios; returns the exit code."""
    args = gpt_options(__doc__.splitlines()[0], PAIRS, "transformer blocks (multiple of 4)").parse_args(argv)
    check_config(args)
    kinds = [args.only] if args.only else list(PAIRS)
    config, command, model, batches = set_up(args, argv, __file__, " (pp)")
    chosen = {kind: PAIRS[kind] for kind in kinds}
    ranks = run_pairs(chosen, config, model, batches,
                      lambda kind, scratch: compile_piperc(kind, config, model, batches[0], scratch), target=worker)
    results = {name: summarize(r) for name, r in ranks.items()}
    print_steps(chosen, results, LABELS, width=13)
    print()
    if "1f1b" in kinds:
        step_ratio("1f1b", *(results[name] for name in PAIRS["1f1b"]))
    steps = args.warmup + args.steps
    base = simulated("1f1b", args.microbatches, steps)
    print(f"simulated (unit F and B, pp={WORLD}, {args.microbatches} microbatches): 1f1b {base[0]} slots per step, "
          f"bubble {base[1]:.1%} over {steps} steps")
    for kind in (k for k in kinds if k != "1f1b"):
        sim = simulated(kind, args.microbatches, steps)
        line = (f"{kind}: simulated {sim[0]} slots per step ({sim[0] / base[0]:.3f} of 1f1b's), "
                f"bubble {sim[1]:.1%} over {steps} steps")
        if "1f1b" in kinds:
            ratio = results[f"piperc-{kind}"]["median"] / results["piperc-1f1b"]["median"]
            line += f"; measured {kind}/1f1b by median step: {ratio:.3f} (below 1 = faster than flushed 1F1B)"
        print(line)
    print_footer(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
