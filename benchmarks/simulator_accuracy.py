"""How close the simulator's predicted step time is to a real run's, for every built-in schedule.

    python benchmarks/simulator_accuracy.py [--steps 10] [--warmup 3] [--repeats 2]
        [--settle SECONDS] [--host-cores N] [--only SCHEDULE] [--d-model 128] [--layers 8]
        [--batch 32] [--seq 64] [--microbatches 8]

The benchmark GPT of benchmarks/pipeline_vs_torch.py (8 blocks, d_model 128, 4 heads, vocab
1024, global batch 32) on pp=4 with 8 microbatches, once per schedule of
`piperc.schedules.BUILTIN_SCHEDULES` that runs at pp=4: four stages (two blocks each) for the
schedules that run one stage per device, eight (one block each) for those that run several.
Per schedule, 4 fresh processes load the compiled job twice with the runtime alone, once
untraced and once traced, and run --warmup + --steps steps of each in turn, every step
between two barriers:

  1. measure: the untraced steps, as benchmarks/pipeline_vs_torch.py runs piperc (a step's
     time is the slowest rank's; the median over the --steps timed steps);
  2. profile: the traced steps' traces, read by `piperc.simulator.profile_trace` (what
     `piperc.profile` computes from its own traced run): each task's mean time, the host's
     time to issue a communication and the transfers' delay beyond the link
     (`Costs.p2p_delay`); the network is `calibrate`d once, on 4 processes, for all schedules;
  3. predict: `compiled.simulate(costs)`.

Why in the same processes, one step of each in turn: this machine's speed drifts. The same
untraced job, in fresh processes with no other process running, took 0.38 to 0.48 s a step
minutes apart, its ranks' CPU seconds per step moving with it (0.69 to 0.87 s; the cores
91-95% busy every time), and a fixed matmul loop's CPU time per round rose by half for
seconds at a time with nothing else running. So a profile and a measured run taken a minute
apart could differ by 30% with nothing wrong in either; steps taken in turn see the same
machine. The runs are
done --repeats times (default 2); the one whose untraced median was fastest (least
disturbed) counts, with its own costs.

The table shows, per schedule, the predicted and measured step times, the error of the
prediction, the predicted bubble next to the bubble the traced steps measured (idle task
time over ranks x step), the traced steps' own median step, the spread of the runs (the
slowest run's median over the fastest's), and what tells a disturbed run: `cpu/work`, the
CPU seconds the ranks spent per untraced step (all threads, summed over ranks) over the work
the simulation charged (`Simulation.work`, summed: the task and issue times at full speed
measured on the traced steps), about 1 when tracing changed nothing; `others`, the share of
the cores other processes used during the run (/proc/stat less the ranks' own CPU time);
and the load average after the schedule's runs. With --settle S, each run first waits, up
to S seconds, for the cores to be nearly idle.

On a machine with fewer cores than ranks (4 ranks on 2 cores here), a task runs slower
while more ranks compute at once. The traced steps run under the same contention as the
untraced ones; with --host-cores N (default: this machine's core count, when below 4) it
takes each task's time out of the contention it was measured under and the simulation
shares N cores among the ranks' running tasks again (processor sharing); --host-cores 0
uses the raw times, as if each rank had a core of its own.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pipeline_vs_torch import (  # noqa: E402
    LR,
    WORLD,
    fork_server,
    gpt_options,
    join,
    load_average,
    run_contender,
    set_up,
)

import piperc  # noqa: E402
from piperc import schedules  # noqa: E402
from piperc.simulator import Costs, Network, calibrate, profile_trace  # noqa: E402


def stages_for(name: str, microbatches: int) -> int | None:
    """How many stages schedule `name` runs at pp=WORLD: 2 x WORLD when it places several
    stages per device, WORLD when it runs one; None when it runs at neither."""
    for stages in (2 * WORLD, WORLD):
        try:
            schedules.builtin(name, stages, microbatches, num_devices=WORLD)
        except schedules.ScheduleError:
            continue
        return stages
    return None


def compile_schedule(name: str, stages: int, config: dict, model, batch) -> piperc.Compiled:
    """The benchmark GPT compiled for pp=WORLD under schedule `name`, its blocks split evenly
    over `stages` stages."""
    per_stage = config["layers"] // stages
    strategy = [piperc.pipeline(axis="pp", stages=stages, microbatches=config["microbatches"], schedule=name,
                                split_at=[f"blocks.{s * per_stage}" for s in range(1, stages)])]
    return piperc.compile(model, batch, mesh=piperc.Mesh(pp=WORLD), strategy=strategy,
                          optimizer=piperc.optim.SGD(lr=LR), keep_ir=False)


def worker(name: str, scratch: Path, rank: int, port: int) -> None:
    """Runs the compiled job in scratch/<name> as `rank`, untraced and traced one step of each
    in turn, every step between two barriers; writes the untraced steps' times and CPU
    seconds (all the process's threads) and the whole process's CPU seconds. The traced
    executor writes its trace to scratch/<name>.trace."""
    from piperc import runtime

    config = join(name, scratch, rank, port)
    batches = torch.load(scratch / "batches.pt", weights_only=True)
    untraced = runtime.load(scratch / name)
    traced = runtime.load(scratch / name, trace=scratch / f"{name}.trace")
    times, cpu = [], []
    for i, batch in enumerate(batches):
        dist.barrier()  # also ends the last traced step
        start, start_cpu = time.perf_counter(), time.process_time()
        untraced.step(tuple(batch))
        step_cpu = time.process_time() - start_cpu
        dist.barrier()
        if i >= config["warmup"]:
            times.append(time.perf_counter() - start)
            cpu.append(step_cpu)
        traced.step(tuple(batch))
    dist.barrier()
    result = {"times": times, "cpu": cpu, "process_cpu": time.process_time()}
    (scratch / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    untraced.close()
    traced.close()


@dataclass(frozen=True)
class Run:
    """A run: its untraced median step (the slowest rank's), the CPU seconds per untraced
    step (summed over ranks, median over steps), the share of the cores other processes
    used meanwhile (None where /proc/stat cannot be read), and the costs its traced steps
    gave."""

    step: float
    cpu: float
    others: float | None
    costs: Costs


def busy_seconds() -> float | None:
    """CPU seconds this machine's cores spent busy since boot (/proc/stat: all but idle and
    iowait, steal included), or None where there is no /proc/stat."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def settle(limit: float) -> None:
    """Waits, up to `limit` seconds, until the cores were at least 90% idle over 2 s: other
    processes' work would slow the next run."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = busy_seconds()
        if before is None:
            return
        time.sleep(2.0)
        if busy_seconds() - before < 0.1 * 2.0 * (os.cpu_count() or 1):
            return


def measure(context, name: str, compiled: piperc.Compiled, scratch: Path, warmup: int, network: Network,
            host_cores: int | None) -> Run:
    """A run of `compiled` (`Run`); its traced steps from `warmup` on give the costs."""
    compiled.save(str(scratch / name))
    busy, start, own = busy_seconds(), time.perf_counter(), time.process_time()
    ranks = run_contender(context, name, scratch, target=worker)
    wall = time.perf_counter() - start
    per_step = [max(times) for times in zip(*(r["times"] for r in ranks), strict=True)]
    cpu = statistics.median(sum(step) for step in zip(*(r["cpu"] for r in ranks), strict=True))
    others = None
    if busy is not None:
        mine = sum(r["process_cpu"] for r in ranks) + time.process_time() - own
        others = max(0.0, busy_seconds() - busy - mine) / (wall * (os.cpu_count() or 1))
    costs = profile_trace(compiled, scratch / f"{name}.trace", warmup=warmup, network=network, host_cores=host_cores)
    return Run(statistics.median(per_step), cpu, others, costs)


def main(argv: list[str] | None = None) -> int:
    """Profiles, simulates and measures each schedule; prints the table."""
    names = sorted(schedules.BUILTIN_SCHEDULES)
    ap = gpt_options(__doc__.splitlines()[0], names, "transformer blocks (multiple of 8)")
    ap.set_defaults(steps=10)
    ap.add_argument("--repeats", type=int, default=2, help="runs per schedule; the least disturbed counts")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds each run may wait for the cores to be nearly idle first")
    cores = os.cpu_count() or 1
    ap.add_argument("--host-cores", type=int, default=cores if cores < WORLD else 0,
                    help="cores the ranks share in the cost model (0: a core each)")
    args = ap.parse_args(argv)
    if args.layers % (2 * WORLD):
        raise SystemExit(f"--layers {args.layers} must be a multiple of {2 * WORLD}")
    config, command, model, batches = set_up(args, argv, __file__, " (pp)")
    chosen = [args.only] if args.only else names
    host_cores = args.host_cores or None

    start = time.perf_counter()
    network = calibrate(world=WORLD)
    print(f"calibrated in {time.perf_counter() - start:.1f} s: {network}", flush=True)
    context = fork_server()
    rows = []
    with tempfile.TemporaryDirectory(prefix="piperc-simbench-") as tmp:
        scratch = Path(tmp)
        (scratch / "config.json").write_text(json.dumps(config))
        torch.save(batches, scratch / "batches.pt")
        for name in chosen:
            stages = stages_for(name, args.microbatches)
            if stages is None:
                print(f"{name}: does not run at pp={WORLD} with {args.microbatches} microbatches; skipped")
                continue
            try:
                compiled = compile_schedule(name, stages, config, model, batches[0])
            except piperc.PipercError as e:
                print(f"{name}: does not compile at pp={WORLD}, {stages} stages ({type(e).__name__}: "
                      f"{str(e).splitlines()[0]}); skipped", flush=True)
                continue
            runs = []
            for _ in range(args.repeats):
                settle(args.settle)
                runs.append(measure(context, f"piperc-{name}", compiled, scratch, args.warmup, network, host_cores))
            best = min(runs, key=lambda r: r.step)
            costs = best.costs
            sim = compiled.simulate(costs)
            error = sim.step_time / best.step - 1
            load = load_average()
            rows.append((name, stages, sim.step_time, best.step, error, sim.bubble_fraction,
                         costs.measured.bubble_fraction, costs.measured.step_time,
                         max(r.step for r in runs) / best.step - 1, best.cpu / sum(sim.work), best.others, load))
            print(f"{name}: predicted {sim.step_time:.4f} s, measured {best.step:.4f} s ({error:+.1%}); runs: "
                  + "; ".join(f"untraced {r.step:.4f} s, traced {r.costs.measured.step_time:.4f} s, "
                              f"CPU {r.cpu:.3f} s/step" for r in runs)
                  + f"; work {sum(sim.work):.3f} s/step, issue {costs.issue * 1e3:.2f} ms, "
                  f"p2p delay {costs.p2p_delay * 1e3:.2f} ms; load average {load}", flush=True)

    print()
    print(f"{'schedule':<14} {'stages':>6} {'predicted s':>11} {'measured s':>10} {'error':>7} "
          f"{'bubble pred':>11} {'bubble meas':>11} {'traced s':>10} {'spread':>7} {'cpu/work':>8} "
          f"{'others':>6}  load")
    for (name, stages, predicted, measured, error, bubble, measured_bubble, traced, spread, speed, others,
         load) in rows:
        shown = "?" if others is None else f"{others:.0%}"
        print(f"{name:<14} {stages:>6} {predicted:>11.4f} {measured:>10.4f} {error:>+7.1%} "
              f"{bubble:>11.1%} {measured_bubble:>11.1%} {traced:>10.4f} {spread:>+7.1%} {speed:>8.2f} "
              f"{shown:>6}  {load}")
    print()
    print(f"measured: the untraced steps' median step in the fastest of {args.repeats} runs; cost model: "
          f"piperc.simulator.profile_trace of that run's traced steps ({args.steps} after {args.warmup} warm-up, "
          f"taken in turn with the untraced ones, {WORLD} ranks on {os.cpu_count()} cores), "
          + (f"taken out of contention and shared over {host_cores} cores" if host_cores else "raw times")
          + f"; network {network}")
    print(f"load average after: {load_average()}")
    print(f"command: {command}")
    if rows and max(abs(r[4]) for r in rows) > 0.10:
        print("note: some predictions are off by more than 10%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
