"""Training step time of piperc's pipeline schedules next to torch's, on 4 CPU ranks.

    python benchmarks/schedules_vs_torch.py [--steps 20] [--warmup 3] [--d-model 128]
        [--layers 8] [--batch 32] [--seq 64] [--microbatches 8]
        [--only interleaved|interleaved-zb|zbv|dualpipev|1f1b]

Pairs of contenders train the same GPT (examples/gpt.py, 4 heads, vocab 1024) from the
same initial weights on the same global batches, each a full step with an SGD update:

    interleaved  piperc pipeline(stages=8, schedule="interleaved")
                 vs  torch.distributed.pipelining ScheduleInterleaved1F1B, two PipelineStages
                     per rank (stage r and r+4 on rank r)
    interleaved-zb, zbv, dualpipev
                 the same, vs ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble and
                     ScheduleDualPipeV
    1f1b         piperc pipeline(stages=4, schedule="1f1b")
                 vs  torch.distributed.pipelining Schedule1F1B (the reference row:
                     benchmarks/pipeline_vs_torch.py's pp pair)

Both sides of a pair cut the model at the same places: the blocks split evenly over the
stages (one block per stage at the default size for interleaved, two for 1F1B), the
embeddings go with the first block, the final norm, the head and the loss with the last.
Interleaved places stages in a loop, stage s on rank s % 4, and runs torch's
Interleaved1F1B order on both sides.

The zero-bubble pairs (interleaved-zb, zbv, dualpipev) split each backward into input-
gradient (B) and weight-gradient (W) work on both sides, in the same order (piperc's rows are
torch's pipeline_order: tests/test_schedules.py); zbv and dualpipev place stages r and 7 - r
on rank r. DualPipeV's overlapped forward and backward run in turn on CPU on both sides.

Measured as benchmarks/pipeline_vs_torch.py measures (and with its code): each contender runs
in 4 fresh worker processes (gloo, one thread each), every step sits between two barriers, a
step's time is the slowest rank's, the table shows the median and the extremes over the timed
steps, and peak RSS per rank. The step-0 losses of each pair must agree to 1e-5, or the
script fails.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from pipeline_vs_torch import (  # noqa: E402
    LR,
    N_HEADS,
    WORLD,
    GPTStage,
    Step,
    gpt_options,
    initial_model,
    next_token_loss,
    pipelining_step,
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
from piperc import schedules  # noqa: E402
from piperc.examples import gpt  # noqa: E402

TORCH_SCHEDULES = {
    "interleaved": "ScheduleInterleaved1F1B",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
"""piperc's multi-stage built-ins and the torch schedule each is compared with."""
PAIRS = {**{kind: (f"piperc-{kind}", f"torch-{kind}") for kind in TORCH_SCHEDULES},
         "1f1b": ("piperc-1f1b", "torch-1f1b")}
"""Each pair is named after piperc's schedule."""
STAGES_PER_RANK = {**{kind: 2 for kind in TORCH_SCHEDULES}, "1f1b": 1}
LABELS = {
    **{f"piperc-{kind}": f"piperc {kind} ({2 * WORLD} stages)" for kind in TORCH_SCHEDULES},
    **{f"torch-{kind}": f"torch {name}" for kind, name in TORCH_SCHEDULES.items()},
    "piperc-1f1b": f"piperc 1F1B ({WORLD} stages)",
    "torch-1f1b": "torch Schedule1F1B",
}


# ----------------------------------------------------------------------------- contenders


def rank_stages(kind: str, rank: int) -> list[int]:
    """The stages `rank` holds under piperc's `kind`: loop placement (r, r + WORLD) or, for
    zbv and dualpipev, V placement (r, 2 * WORLD - 1 - r)."""
    stages = STAGES_PER_RANK[kind] * WORLD
    if kind in schedules.V_PLACEMENT:
        return [rank, stages - 1 - rank]
    return list(range(rank, stages, WORLD))


def torch_multi_stage_step(kind: str, config: dict, scratch: Path, rank: int) -> Step:
    """This rank's two stages (`rank_stages`) under torch's counterpart of `kind`, then SGD."""
    import torch.distributed.pipelining as pipelining

    stages = STAGES_PER_RANK[kind] * WORLD
    model = initial_model(config, scratch)
    held = rank_stages(kind, rank)
    modules = [GPTStage(model, index, stages) for index in held]
    pipeline_stages = [
        pipelining.PipelineStage(module, index, stages, torch.device("cpu"))
        for module, index in zip(modules, held, strict=True)
    ]
    # scale_grads (the default) divides by the microbatch count: the mean loss's gradient.
    schedule = getattr(pipelining, TORCH_SCHEDULES[kind])(
        pipeline_stages, n_microbatches=config["microbatches"], loss_fn=next_token_loss
    )
    optimizer = torch.optim.SGD([p for module in modules for p in module.parameters()], lr=LR)
    return pipelining_step(schedule, optimizer, rank, last=0 if kind in schedules.V_PLACEMENT else WORLD - 1)


CONTENDERS: dict[str, Callable[[dict, Path, int], Step]] = {
    **{f"piperc-{kind}": functools.partial(piperc_step, pair=kind) for kind in PAIRS},
    **{f"torch-{kind}": functools.partial(torch_multi_stage_step, kind) for kind in TORCH_SCHEDULES},
    "torch-1f1b": torch_pipelining_step,
}


# ----------------------------------------------------------------------------- worker


worker = functools.partial(run_worker, "schedules_vs_torch")
"""Runs one contender's rank (pipeline_vs_torch's worker, over this script's contenders)."""


# ----------------------------------------------------------------------------- driver


def compile_piperc(pair: str, config: dict, model: gpt.GPT, batch, scratch: Path) -> float:
    """Compiles piperc's contender of `pair` (its schedule, STAGES_PER_RANK[pair] x WORLD
    stages of equal block counts) into scratch/piperc-<pair>; returns seconds."""
    stages = STAGES_PER_RANK[pair] * WORLD
    per_stage = config["layers"] // stages
    strategy = [
        piperc.pipeline(
            axis="pp",
            stages=stages,
            microbatches=config["microbatches"],
            schedule=pair,
            split_at=[f"blocks.{s * per_stage}" for s in range(1, stages)],
        )
    ]
    start = time.perf_counter()
    compiled = piperc.compile(
        model, batch, mesh=piperc.Mesh(pp=WORLD), strategy=strategy,
        optimizer=piperc.optim.SGD(lr=LR), keep_ir=False,
    )  # fmt: skip
    compiled.save(str(scratch / f"piperc-{pair}"))
    return time.perf_counter() - start


def check_config(args: argparse.Namespace, pairs: list[str]) -> None:
    stages = max(STAGES_PER_RANK[pair] for pair in pairs) * WORLD
    if args.layers % stages:
        raise SystemExit(f"--layers {args.layers} must be a multiple of {stages} (blocks per stage)")
    if args.d_model % N_HEADS:
        raise SystemExit(f"--d-model {args.d_model} must be a multiple of {N_HEADS} heads")
    if args.batch % args.microbatches:
        raise SystemExit(f"--batch {args.batch} must split into {args.microbatches} microbatches")
    if "1f1b" in pairs and args.microbatches < WORLD:
        raise SystemExit(f"--microbatches {args.microbatches}: torch's Schedule1F1B needs at least "
                         f"{WORLD} (one per stage)")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")


def main(argv: list[str] | None = None) -> int:
    """Runs the chosen pairs and prints the table; returns the exit code."""
    args = gpt_options(__doc__.splitlines()[0], PAIRS, "transformer blocks (multiple of 8)").parse_args(argv)
    pairs = [args.only] if args.only else list(PAIRS)
    check_config(args, pairs)
    config, command, model, batches = set_up(args, argv, __file__, "")

    chosen = {pair: PAIRS[pair] for pair in pairs}
    ranks = run_pairs(chosen, config, model, batches,
                      lambda pair, scratch: compile_piperc(pair, config, model, batches[0], scratch),
                      target=worker)
    results = {name: summarize(r) for name, r in ranks.items()}
    print_steps(chosen, results, LABELS, width=11)
    print()
    for pair in pairs:
        step_ratio(pair, *(results[name] for name in PAIRS[pair]))
    if len(pairs) == len(PAIRS):
        mine, theirs = ((results[f"{side}-interleaved"]["median"] / results[f"{side}-1f1b"]["median"])
                        for side in ("piperc", "torch"))
        print(f"interleaved/1f1b by median step: piperc {mine:.3f}, torch {theirs:.3f} "
              "(below 1 = interleaving is faster)")
    print_footer(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
