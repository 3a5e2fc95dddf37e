"""The seed's comparison (arXiv 2605.24006): pipeline schedules ranked by three abstractions.

    python benchmarks/schedule_abstractions.py [--pp 4] [--microbatches 4 8 16 32]
        [--schedules gpipe 1f1b chimera hanayo] [--rate 200e12]

For GPipe, 1F1B, Chimera and Hanayo at pp=4 and each microbatch count, three views of the
same schedule, none of which runs anything:

1. closed form: the bubble ratio by formula (`piperc.schedules.closed_form_bubble`, where
   the schedule has one: (p-1)/(m+p-1) for GPipe and 1F1B, Chimera's (p-2)/(2m+p-2) from its
   paper; Hanayo's order here is piperc's own, so it has none);
2. time slots: the schedule's action table run under unit costs, F = 1 and B = 2,
   communication free (`piperc.schedules.simulate`): makespan in units and bubble;
3. communication-aware: the compiled per-rank programs of the 8-block GPT (d_model 512,
   8 heads, seq 256, global batch 64, fp32) simulated event by event (`piperc.simulator`):
   tasks cost their matmul FLOPs at --rate FLOP/s on CUDA, transfers latency + bytes /
   bandwidth, on two cluster profiles:
     fast  all 4 GPUs in one node, 400 GB/s, 5 us (NVLink);
     slow  one GPU per node, 12.5 GB/s, 10 us (100 Gb/s Ethernet).

Each table ranks the schedules per microbatch count (1 = best: lowest bubble, or shortest
predicted step), and the script ends by listing every (m, profile) where the rankings of
the abstractions differ. Stages: one per device for GPipe and 1F1B; Chimera's two pipelines
each hold the p stages (their replicas' gradients summed); Hanayo runs one wave, 2p stages.
Compiling is the slow part (one capture per microbatch count and schedule, ~10 s each here).
"""

from __future__ import annotations

import argparse
import sys
import time

import piperc
from piperc import schedules
from piperc.examples import gpt
from piperc.simulator import Costs, cluster, simulate

PROFILES = {
    "fast": cluster(gpus_per_node=8, intra_gbps=400, inter_gbps=50, latency_us=5),
    "slow": cluster(gpus_per_node=1, intra_gbps=400, inter_gbps=12.5, latency_us=10),
}
"""Two clusters: every pipeline transfer within one NVLink node, or every one between nodes."""
MODEL = {"vocab": 1024, "d_model": 512, "n_heads": 8, "n_layers": 8, "seq": 256, "batch": 64}
STAGES_PER_DEVICE = {"hanayo": 2}
"""Stages per pipeline device; 1 for the others."""
PAPER_FORMULAS = {"chimera": ("(p-2)/(2m+p-2)", lambda p, m: (p - 2) / (2 * m + p - 2))}
"""Closed forms from the schedules' papers where piperc has none of its own."""


def closed_form(schedule: schedules.Schedule, p: int, m: int) -> tuple[str, float] | None:
    """The bubble ratio by formula: piperc's for its built-in, else the paper's, else None."""
    form = schedules.closed_form_bubble(schedule)
    if form is not None:
        return form.formula, form.value
    if schedule.name in PAPER_FORMULAS:
        formula, value = PAPER_FORMULAS[schedule.name]
        return formula, value(p, m)
    return None


def compile_job(kind: str, p: int, m: int):
    """The 8-block GPT compiled for schedule `kind` on a pp=`p` mesh with `m` microbatches."""
    model, batch = gpt.make(**MODEL)
    stages = STAGES_PER_DEVICE.get(kind, 1) * p
    strategy = [piperc.pipeline(axis="pp", stages=stages, microbatches=m, schedule=kind)]
    return piperc.compile(model, batch, mesh=piperc.Mesh(pp=p), strategy=strategy,
                          optimizer=piperc.optim.SGD(lr=0.01), keep_ir=False)


def ranks(values: dict[str, float]) -> dict[str, int]:
    """1 for the smallest value, 2 for the next, ...; ties share a rank."""
    ordered = sorted(set(round(v, 12) for v in values.values()))
    return {k: ordered.index(round(v, 12)) + 1 for k, v in values.items()}


def main(argv: list[str] | None = None) -> int:
    """Prints the three tables and where their rankings differ."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "chimera", "hanayo"])
    ap.add_argument("--rate", type=float, default=200e12, help="FLOP/s per GPU for the tasks' matmuls")
    args = ap.parse_args(argv)
    missing = [k for k in args.schedules if k not in schedules.BUILTIN_SCHEDULES]
    if missing:
        raise SystemExit(f"not built-in schedules: {', '.join(missing)}")
    p = args.pp
    views: dict[str, dict[int, dict[str, float]]] = {"closed form": {}, "time slots": {}}
    views |= {f"simulated ({name})": {} for name in PROFILES}
    rows = []
    for m in args.microbatches:
        for view in views.values():
            view[m] = {}
        for kind in args.schedules:
            schedule = schedules.builtin(kind, STAGES_PER_DEVICE.get(kind, 1) * p, m, num_devices=p)
            formula = closed_form(schedule, p, m)
            slots = schedules.simulate(schedule, f_time=1, b_time=2)
            start = time.perf_counter()
            job = compile_job(kind, p, m)
            compiled_in = time.perf_counter() - start
            predicted = {name: simulate(job, Costs.from_flops(job, args.rate, network=net, device="cuda"))
                         for name, net in PROFILES.items()}
            if formula is not None:
                views["closed form"][m][kind] = formula[1]
            views["time slots"][m][kind] = slots.bubble_fraction
            for name, sim in predicted.items():
                views[f"simulated ({name})"][m][kind] = sim.step_time
            rows.append((m, kind, formula, slots, predicted, compiled_in))
            print(f"  m={m} {kind}: compiled in {compiled_in:.1f} s", file=sys.stderr)

    print(f"pp={p}; model {MODEL}; tasks at {args.rate:.3g} FLOP/s (matmuls), fp32 transfers")
    print(f"{'m':>3} {'schedule':<9} {'formula':<16} {'closed':>7} {'slots':>6} {'slot bubble':>11} "
          + " ".join(f"{name + ' ms':>9} {name + ' bub':>9}" for name in PROFILES))
    for m, kind, formula, slots, predicted, _ in rows:
        closed = f"{formula[1]:.3f}" if formula else "-"
        print(f"{m:>3} {kind:<9} {(formula[0] if formula else 'none'):<16} {closed:>7} {slots.makespan:>6g} "
              f"{slots.bubble_fraction:>11.3f} "
              + " ".join(f"{sim.step_time * 1e3:>9.2f} {sim.bubble_fraction:>9.3f}" for sim in predicted.values()))
    print()
    print("rankings (1 = best: lowest bubble for the first two, shortest predicted step after)")
    names = list(views)
    print(f"{'m':>3} {'schedule':<9} " + " ".join(f"{n:>17}" for n in names))
    for m in args.microbatches:
        ranked = {n: ranks(views[n][m]) for n in names}
        for kind in args.schedules:
            print(f"{m:>3} {kind:<9} " + " ".join(f"{ranked[n].get(kind, '-'):>17}" for n in names))
    print()
    print("where the abstractions disagree (orders best first; closed form only over the schedules that have one):")
    for m in args.microbatches:
        orders = {n: sorted(views[n][m], key=views[n][m].get) for n in names}
        base = orders["time slots"]
        for n in names:
            if n == "time slots":
                continue
            compared = [k for k in base if k in orders[n]]
            if orders[n] != compared:
                print(f"  m={m}: {n} ranks {' < '.join(orders[n])}; time slots rank {' < '.join(compared)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
