"""Training step time of piperc's pipeline schedules next to torch's, on 4 CPU ranks.

    python benchmarks/schedules_vs_torch.py [--steps 20] [--warmup 3] [--d-model 128]
        [--layers 8] [--batch 32] [--seq 64] [--microbatches 8] [--only interleaved|1f1b]

Two pairs of contenders train the same GPT (examples/gpt.py, 4 heads, vocab 1024) from the
same initial weights on the same global batches, each a full step with an SGD update:

    interleaved  piperc pipeline(stages=8, schedule="interleaved")
                 vs  torch.distributed.pipelining ScheduleInterleaved1F1B, two PipelineStages
                     per rank (stage r and r+4 on rank r)
    1f1b         piperc pipeline(stages=4, schedule="1f1b")
                 vs  torch.distributed.pipelining Schedule1F1B (the reference row:
                     benchmarks/pipeline_vs_torch.py's pp pair)

Both sides of a pair cut the model at the same places: the blocks split evenly over the
stages (one block per stage at the default size for interleaved, two for 1F1B), the
embeddings go with the first block, the final norm, the head and the loss with the last.
Interleaved places stages in a loop, stage s on rank s % 4, and runs torch's
Interleaved1F1B order on both sides.

Not compared yet: torch's ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble and
ScheduleDualPipeV split each backward into input-gradient (B) and weight-gradient (W) work,
which piperc's pipeline does not do yet.

Measured as benchmarks/pipeline_vs_torch.py measures (and with its code): each contender runs
in 4 fresh worker processes (gloo, one thread each), every step sits between two barriers, a
step's time is the slowest rank's, the table shows the median and the extremes over the timed
steps, and peak RSS per rank. The step-0 losses of each pair must agree to 1e-5, or the
script fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pipeline_vs_torch import (  # noqa: E402
    LR,
    N_HEADS,
    WORLD,
    GPTStage,
    Step,
    gpt_options,
    initial_model,
    join,
    next_token_loss,
    peak_rss_mib,
    pipelining_step,
    piperc_step,
    print_footer,
    print_steps,
    run_pairs,
    set_up,
    step_ratio,
    summarize,
    timed_steps,
    torch_pipelining_step,
)

import piperc  # noqa: E402
from piperc.examples import gpt  # noqa: E402

PAIRS = {
    "interleaved": ("piperc-interleaved", "torch-interleaved"),
    "1f1b": ("piperc-1f1b", "torch-1f1b"),
}
"""Each pair is named after piperc's schedule."""
STAGES_PER_RANK = {"interleaved": 2, "1f1b": 1}
LABELS = {
    "piperc-interleaved": f"piperc interleaved v=2 ({2 * WORLD} stages)",
    "torch-interleaved": "torch ScheduleInterleaved1F1B",
    "piperc-1f1b": f"piperc 1F1B ({WORLD} stages)",
    "torch-1f1b": "torch Schedule1F1B",
}


# ----------------------------------------------------------------------------- contenders


def torch_interleaved_step(config: dict, scratch: Path, rank: int) -> Step:
    """This rank's two stages (r and r + WORLD) under torch's ScheduleInterleaved1F1B, then SGD."""
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B

    stages = STAGES_PER_RANK["interleaved"] * WORLD
    model = initial_model(config, scratch)
    modules = [GPTStage(model, index, stages) for index in range(rank, stages, WORLD)]
    pipeline_stages = [
        PipelineStage(module, index, stages, torch.device("cpu"))
        for module, index in zip(modules, range(rank, stages, WORLD), strict=True)
    ]
    # scale_grads (the default) divides by the microbatch count: the mean loss's gradient.
    schedule = ScheduleInterleaved1F1B(
        pipeline_stages, n_microbatches=config["microbatches"], loss_fn=next_token_loss
    )
    optimizer = torch.optim.SGD([p for module in modules for p in module.parameters()], lr=LR)
    return pipelining_step(schedule, optimizer, rank)


CONTENDERS: dict[str, Callable[[dict, Path, int], Step]] = {
    "piperc-interleaved": lambda config, scratch, rank: piperc_step(config, scratch, rank, "interleaved"),
    "torch-interleaved": torch_interleaved_step,
    "piperc-1f1b": lambda config, scratch, rank: piperc_step(config, scratch, rank, "1f1b"),
    "torch-1f1b": torch_pipelining_step,
}


# ----------------------------------------------------------------------------- worker


def worker(name: str, scratch: Path, rank: int, port: int) -> None:
    """Runs contender `name` as `rank` and writes its measurements to the scratch folder
    (pipeline_vs_torch's worker, over this script's contenders)."""
    config = join(name, scratch, rank, port)
    batches = torch.load(scratch / "batches.pt", weights_only=True)
    step = CONTENDERS[name](config, scratch, rank)
    losses, times = timed_steps(step, batches, config["warmup"])
    result = {"losses": losses, "times": times, "peak_rss_mib": peak_rss_mib()}
    (scratch / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


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
