"""How close the simulator's predicted step time is to a real run's, for every built-in schedule.

    python benchmarks/simulator_accuracy.py [--steps 10] [--warmup 3] [--profile-steps 3]
        [--repeats 2] [--host-cores N] [--only SCHEDULE] [--d-model 128] [--layers 8]
        [--batch 32] [--seq 64] [--microbatches 8]

The benchmark GPT of benchmarks/pipeline_vs_torch.py (8 blocks, d_model 128, 4 heads, vocab
1024, global batch 32) on pp=4 with 8 microbatches, once per schedule of
`piperc.schedules.BUILTIN_SCHEDULES` that runs at pp=4: four stages (two blocks each) for the
schedules that run one stage per device, eight (one block each) for those that run several.
Per schedule:

  1. profile: `piperc.profile(compiled, batches, steps=--profile-steps)`, a short traced run on
     4 local ranks, gives each task's mean time, the host's time to issue a communication
     and the transfers' delay beyond the link (`Costs.p2p_delay`); the network is
     `calibrate`d once, on 4 processes, for all schedules;
  2. predict: `compiled.simulate(costs)`;
  3. measure: the compiled job run by the runtime alone in 4 fresh processes, as
     benchmarks/pipeline_vs_torch.py runs piperc (each step between two barriers, the slowest
     rank's time, the median over --steps timed steps).

The machine may be shared with other work, which slows whichever run it overlaps: steps 1
and 3 are done --repeats times each (default 2); the profile whose own run was fastest
gives the costs, and the fastest run's median is the measured time.

The table shows, per schedule, the predicted and measured step times, the error of the
prediction, the predicted bubble next to the bubble the profiled run measured (its trace:
idle task time over ranks x step), the profiled run's own step time (traced, without
barriers between steps), and the spread of the measured runs (the slowest run's median over
the fastest's: how much other load moved them).

On a machine with fewer cores than ranks (4 ranks on 2 cores here), a task runs slower
while more ranks compute at once. The profile is taken under the same contention as the
measured run; with --host-cores N (default: this machine's core count, when below 4) it
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from pipeline_vs_torch import (  # noqa: E402
    LR,
    WORLD,
    fork_server,
    gpt_options,
    join,
    load_average,
    run_contender,
    set_up,
    timed_steps,
)

import piperc  # noqa: E402
from piperc import schedules  # noqa: E402
from piperc.simulator import calibrate  # noqa: E402


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
    """Runs the compiled job in scratch/<name> as `rank` and writes its step times."""
    from piperc import runtime

    config = join(name, scratch, rank, port)
    batches = torch.load(scratch / "batches.pt", weights_only=True)
    executor = runtime.load(scratch / name)
    losses, times = timed_steps(executor.step, batches, config["warmup"])
    (scratch / f"{name}.rank{rank}.json").write_text(json.dumps({"losses": losses, "times": times}))
    executor.close()


def measure(context, name: str, compiled: piperc.Compiled, scratch: Path) -> float:
    """The median step time (slowest rank per step) of a real run of `compiled`."""
    compiled.save(str(scratch / name))
    ranks = run_contender(context, name, scratch, target=worker)
    per_step = [max(times) for times in zip(*(r["times"] for r in ranks), strict=True)]
    return statistics.median(per_step)


def main(argv: list[str] | None = None) -> int:
    """Profiles, simulates and measures each schedule; prints the table."""
    names = sorted(schedules.BUILTIN_SCHEDULES)
    ap = gpt_options(__doc__.splitlines()[0], names, "transformer blocks (multiple of 8)")
    ap.set_defaults(steps=10)
    ap.add_argument("--profile-steps", type=int, default=3, help="timed steps of each profile")
    ap.add_argument("--repeats", type=int, default=2,
                    help="profiles and measured runs per schedule; the least disturbed of each counts")
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
            # Other processes share this machine: of --repeats profiles, the one whose own run was
            # fastest (least disturbed) gives the costs, and the fastest of --repeats runs is measured.
            costs = min((piperc.profile(compiled, batches, steps=args.profile_steps, network=network,
                                        host_cores=host_cores) for _ in range(args.repeats)),
                        key=lambda c: c.measured.step_time)
            sim = compiled.simulate(costs)
            runs = [measure(context, f"piperc-{name}", compiled, scratch) for _ in range(args.repeats)]
            measured = min(runs)
            error = sim.step_time / measured - 1
            rows.append((name, stages, sim.step_time, measured, error, sim.bubble_fraction,
                         costs.measured.bubble_fraction, costs.measured.step_time, max(runs) / measured - 1))
            print(f"{name}: predicted {sim.step_time:.4f} s, measured {measured:.4f} s ({error:+.1%}), "
                  f"profiled run {costs.measured.step_time:.4f} s, issue {costs.issue * 1e3:.2f} ms, "
                  f"p2p delay {costs.p2p_delay * 1e3:.2f} ms; load average {load_average()}", flush=True)

    print()
    print(f"{'schedule':<12} {'stages':>6} {'predicted s':>11} {'measured s':>10} {'error':>7} "
          f"{'bubble pred':>11} {'bubble meas':>11} {'profiled s':>10} {'spread':>7}")
    for name, stages, predicted, measured, error, bubble, measured_bubble, profiled, spread in rows:
        print(f"{name:<12} {stages:>6} {predicted:>11.4f} {measured:>10.4f} {error:>+7.1%} "
              f"{bubble:>11.1%} {measured_bubble:>11.1%} {profiled:>10.4f} {spread:>+7.1%}")
    print()
    print(f"measured: the fastest of {args.repeats} runs' median step; cost model: piperc.profile "
          f"({args.profile_steps} steps after 1 warm-up, the fastest of {args.repeats} profiles, same "
          f"{WORLD} ranks on {os.cpu_count()} cores), "
          + (f"taken out of contention and shared over {host_cores} cores" if host_cores else "raw times")
          + f"; network {network}")
    print(f"load average after: {load_average()}")
    print(f"command: {command}")
    if rows and max(abs(r[4]) for r in rows) > 0.10:
        print("note: some predictions are off by more than 10%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
