"""Fuzzes user pipeline schedules: random tables, checked before running, then run.

    OMP_NUM_THREADS=1 python tools/fuzz_schedules.py [--tables 1000] [--compile 40] [--run 50]
                                                     [--seed 0] [--timeout 120]

Tables start from valid ones (GPipe, 1F1B, 1F1B with random warm-ups, random
dependency orders of every action; pp in {2, 4}, 1 to 8 microbatches) and get
random perturbations: actions swapped, moved across rows, dropped, duplicated;
rows swapped, reversed, shuffled; a stage, microbatch or pass changed; a B/W
split; an empty row added. The same seed gives the same tables.

Each table goes through the checks a compile applies before any run
(`schedules.from_lists` and `schedules.validate`, then one stage per device, as the
schedule pass requires). A rejected table must be rejected with a ScheduleError;
any other exception is a crash of the checker. Every accepted table is then
simulated (`schedules.simulate`, with communication costs); a sample of the
accepted ones goes through the pass pipeline down to `verify-exec` on one shared
capture; and a sample of accepted, distinct tables runs for real
(`piperc.compile` + `piperc.launch`, 2 SGD steps, a timeout so that a hang is
counted, not waited on) against the model trained on one device
(`piperc.reference`, relative error 1e-5). An accepted table that verify-exec
rejects, or whose run hangs, crashes or differs from one device, is a checker
gap: it is printed with its table. Exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

Rows = list[list[str]]

SIZES = [(2, m) for m in (1, 2, 3, 4, 5, 6, 8)] + [(4, m) for m in (1, 2, 3, 4, 5, 6, 8)]
"""The (pipeline devices, microbatches) the tables are made for."""

TOLERANCE = 1e-5


# ---------------------------------------------------------------- valid tables


def _needs(stage: int, kind: str, mb: int, stages: int) -> list[tuple[int, str, int]]:
    """What an action needs done before it starts (F: the previous stage's F; B: its own F
    and the next stage's B)."""
    if kind == "F":
        return [(stage - 1, "F", mb)] if stage > 0 else []
    return [(stage, "F", mb)] + ([(stage + 1, "B", mb)] if stage < stages - 1 else [])


def random_order(rng: random.Random, stages: int, mbs: int) -> Rows:
    """Every action once, in a random order that respects the dependencies, cut into rows."""
    pending = [(s, k, m) for s in range(stages) for k in "FB" for m in range(mbs)]
    done: set[tuple[int, str, int]] = set()
    rows: Rows = [[] for _ in range(stages)]
    while pending:
        ready = [a for a in pending if all(d in done for d in _needs(*a, stages))]
        action = rng.choice(ready)
        pending.remove(action)
        done.add(action)
        rows[action[0]].append(f"{action[0]}{action[1]}{action[2]}")
    return rows


def random_warmup(rng: random.Random, stages: int, mbs: int) -> Rows:
    """1F1B with a random number of warm-up forwards per device, each device at least one
    more than the next (up to GPipe's all)."""
    warmups = [0] * (stages + 1)
    for s in reversed(range(stages)):
        warmups[s] = rng.randint(min(warmups[s + 1] + (s < stages - 1), mbs), mbs)
    rows = []
    for s in range(stages):
        warmup = warmups[s]
        row = [f"{s}F{m}" for m in range(warmup)]
        for m in range(warmup, mbs):
            row += [f"{s}F{m}", f"{s}B{m - warmup}"]
        rows.append(row + [f"{s}B{m}" for m in range(mbs - warmup, mbs)])
    return rows


def valid_table(rng: random.Random, stages: int, mbs: int) -> tuple[str, Rows]:
    """GPipe's, 1F1B's, a random warm-up's or a random dependency order's rows for these
    sizes, and which."""
    from piperc import schedules

    kind = rng.choice(["gpipe", "1f1b", "random warm-up", "random warm-up", "random order"])
    if kind == "random warm-up":
        return kind, random_warmup(rng, stages, mbs)
    if kind == "random order":
        return kind, random_order(rng, stages, mbs)
    return kind, schedules.builtin(kind, stages, mbs).to_rows()


# ---------------------------------------------------------------- perturbations


def _row(rng: random.Random, rows: Rows, min_len: int = 1) -> list[str] | None:
    candidates = [r for r in rows if len(r) >= min_len]
    return rng.choice(candidates) if candidates else None


def swap_adjacent(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Swaps two neighbouring actions of a row."""
    row = _row(rng, rows, 2)
    if row:
        i = rng.randrange(len(row) - 1)
        row[i], row[i + 1] = row[i + 1], row[i]


def swap_two(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Swaps two actions anywhere in a row."""
    row = _row(rng, rows, 2)
    if row:
        i, j = rng.sample(range(len(row)), 2)
        row[i], row[j] = row[j], row[i]


def move_within(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Moves one action to another place in its row."""
    row = _row(rng, rows, 2)
    if row:
        action = row.pop(rng.randrange(len(row)))
        row.insert(rng.randrange(len(row) + 1), action)


def move_across(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Moves one action to another row."""
    src = _row(rng, rows)
    if src and len(rows) > 1:
        dst = rng.choice([r for r in rows if r is not src])
        dst.insert(rng.randrange(len(dst) + 1), src.pop(rng.randrange(len(src))))


def drop(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Drops one action."""
    row = _row(rng, rows)
    if row:
        row.pop(rng.randrange(len(row)))


def duplicate(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Repeats one action somewhere in its row."""
    row = _row(rng, rows)
    if row:
        row.insert(rng.randrange(len(row) + 1), rng.choice(row))


def swap_rows(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Swaps two devices' rows."""
    if len(rows) > 1:
        i, j = rng.sample(range(len(rows)), 2)
        rows[i], rows[j] = rows[j], rows[i]


def reverse_row(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Reverses a row."""
    row = _row(rng, rows)
    if row:
        row.reverse()


def shuffle_row(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Shuffles a row."""
    row = _row(rng, rows)
    if row:
        rng.shuffle(row)


def _retext(rng: random.Random, rows: Rows, change: Callable[[int, str, int], str]) -> None:
    row = _row(rng, rows)
    if row:
        i = rng.randrange(len(row))
        kind = next(k for k in "FBW" if k in row[i])
        stage, mb = row[i].split(kind)
        row[i] = change(int(stage), kind, int(mb))


def change_microbatch(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Changes one action's microbatch (sometimes to one out of range)."""
    _retext(rng, rows, lambda s, k, m: f"{s}{k}{rng.randrange(mbs + 1)}")


def change_stage(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Changes one action's stage (sometimes to one out of range)."""
    _retext(rng, rows, lambda s, k, m: f"{rng.randrange(stages + 1)}{k}{m}")


def change_kind(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Changes one action's pass to another of F, B, W."""
    _retext(rng, rows, lambda s, k, m: f"{s}{rng.choice([x for x in 'FBW' if x != k])}{m}")


def split_backward(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Gives one stage a W right after each of its Bs (a valid B/W split)."""
    row = _row(rng, rows)
    if row:
        stage = rng.choice([a.split(k)[0] for a in row for k in "FBW" if k in a])
        row[:] = [x for a in row for x in ([a, a.replace("B", "W")] if a.startswith(stage + "B") else [a])]


def add_empty_row(rng: random.Random, rows: Rows, stages: int, mbs: int) -> None:
    """Adds a device with no actions."""
    rows.append([])


PERTURBATIONS = [swap_adjacent, swap_two, move_within, move_across, drop, duplicate, swap_rows,
                 reverse_row, shuffle_row, change_microbatch, change_stage, change_kind,
                 split_backward, add_empty_row]


@dataclass
class Case:
    """One generated table: its sizes, rows and how it was made."""

    stages: int
    microbatches: int
    rows: Rows
    made: str

    def text(self) -> str:
        """The table as `piperc.pipeline(schedule=...)` takes it as text."""
        return "\n".join(" ".join(r) for r in self.rows)

    def key(self) -> tuple:
        """What makes two cases the same table."""
        return self.stages, self.microbatches, tuple(tuple(r) for r in self.rows)


def generate(count: int, seed: int) -> list[Case]:
    """`count` tables: a valid one for random sizes, then 0 to 3 random perturbations
    (none for three tables in ten, so that many distinct valid tables are among them)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        stages, mbs = rng.choice(SIZES)
        kind, rows = valid_table(rng, stages, mbs)
        made = [kind]
        for _ in range(0 if rng.random() < 0.3 else rng.randint(1, 3)):
            perturb = rng.choice(PERTURBATIONS)
            perturb(rng, rows, stages, mbs)
            made.append(perturb.__name__)
        cases.append(Case(stages, mbs, rows, ", ".join(made)))
    return cases


# ---------------------------------------------------------------- checks


def check(case: Case):
    """The schedule a compile would accept for `case`, or raises ScheduleError: the checks of
    the schedule pass (from_lists with the pipeline's sizes, validate, stage s on device s)."""
    from piperc import schedules

    sched = schedules.from_lists(case.rows, case.stages, case.microbatches)
    schedules.validate(sched)
    for s in range(case.stages):
        if sched.device_of(s) != s:
            raise schedules.ScheduleError(f"stage {s} runs on device {sched.device_of(s)}, not {s}")
    return sched


def pipeline_text(case: Case) -> str:
    """The pass pipeline, from the capture to verify-exec, that compiles `case` (pp only, SGD;
    the weight gradients split off when the table runs W actions)."""
    table = ";".join(" ".join(r) for r in case.rows)
    split = "{split-weights=true}" if any("W" in a for r in case.rows for a in r) else ""
    return (f'fold-detach,mesh{{shape="pp={case.stages}"}},pipeline-split{{stages={case.stages}}},'
            f'outline-stages{split},optimizer{{kind="sgd" lr=0.05}},microbatch{{count={case.microbatches} replicas=1}},'
            f'schedule{{kind="user" table="{table}"}},expand-schedule,lower-to-exec,verify-exec')


def report(title: str, case: Case, error: object) -> None:
    """Prints a finding with its table, as `piperc.pipeline(schedule=...)` takes it."""
    print(f"  {title}: pp={case.stages} microbatches={case.microbatches} ({case.made})")
    for d, row in enumerate(case.rows):
        print(f"    device {d}: {' '.join(row)}")
    print(f"    -> {str(error)[:600]}")


def main(argv: list[str] | None = None) -> int:
    """Runs the fuzzer; prints the counts and every checker gap it found."""
    ap = argparse.ArgumentParser(prog="fuzz_schedules", description=__doc__.split("\n")[0])
    ap.add_argument("--tables", type=int, default=1000, help="how many tables to generate")
    ap.add_argument("--compile", type=int, default=40, help="how many accepted tables to compile")
    ap.add_argument("--run", type=int, default=50, help="how many accepted distinct tables to run for real")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a real run may take")
    args = ap.parse_args(argv)

    import piperc
    from piperc import schedules
    from piperc.errors import PipercError, StrategyError
    from piperc.examples import gpt
    from piperc.frontend import capture
    from piperc.passmanager import run_pipeline
    from piperc.reference import compare, train_eager
    from piperc.runtime.launch import LaunchError

    start = time.monotonic()
    counts: Counter[str] = Counter()
    gaps = 0
    cases = generate(args.tables, args.seed)
    counts["generated"] = len(cases)
    accepted: list[Case] = []
    for case in cases:
        try:
            sched = check(case)
        except schedules.ScheduleError:
            counts["rejected"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - any other exception is the finding
            counts["checker crashes"] += 1
            gaps += 1
            report("checker crash", case, repr(e))
            continue
        counts["accepted"] += 1
        accepted.append(case)
        try:
            schedules.simulate(sched, comm_time=0.5)
            counts["simulated"] += 1
        except Exception as e:  # noqa: BLE001
            gaps += 1
            report("simulation failed", case, repr(e))
    distinct = list({c.key(): c for c in accepted}.values())
    counts["accepted distinct"] = len(distinct)
    print(f"checked {len(cases)} tables in {time.monotonic() - start:.1f} s")

    rng = random.Random(args.seed + 1)
    # Tables that use W or an extra empty row first, so that the sample covers them; then
    # the rest in random order.
    odd = [c for c in distinct if any("W" in a for r in c.rows for a in r) or len(c.rows) != c.stages]
    plain = [c for c in distinct if c not in odd]
    rng.shuffle(plain)
    model, (tokens, targets) = gpt.make(n_layers=4, d_model=16, n_heads=2, seq=8, batch=8)
    captured = capture(model, (tokens[:1], targets[:1]))
    refused: set[tuple] = set()
    for case in (odd + plain)[: args.compile]:
        module = captured.module.clone()
        try:
            run_pipeline(module, captured.ctx, pipeline_text(case))
            counts["compiled"] += 1
        except PipercError as e:
            cause = e.__cause__ if isinstance(e.__cause__, StrategyError) else e
            if isinstance(cause, StrategyError) and "runs nothing" in str(cause):
                counts["compile refused (no B/W split)"] += 1
                continue
            gaps += 1
            refused.add(case.key())
            counts["compile rejected (checker gap)"] += 1
            report("accepted, but the compile rejects it", case, cause)
    print(f"compiled in {time.monotonic() - start:.1f} s")

    opt = piperc.optim.SGD(lr=0.05, momentum=0.9)
    # A table the compile already refused is a gap counted once, not run again.
    runnable = [c for c in plain if len(c.rows) == c.stages and c.key() not in refused]
    pp2 = [c for c in runnable if c.stages == 2]
    pp4 = [c for c in runnable if c.stages == 4][: max(args.run // 3, args.run - len(pp2))]
    pp2 = pp2[: args.run - len(pp4)]
    for case in pp2 + pp4:
        # One row per microbatch, as the shared capture was made with.
        batches = [tuple(x[: case.microbatches] for x in gpt.sample_batch(64, 8, 8)) for _ in range(2)]
        try:
            compiled = piperc.compile(
                model, batches[0], mesh=piperc.Mesh(pp=case.stages),
                strategy=[piperc.pipeline(stages=case.stages, microbatches=case.microbatches,
                                          schedule=case.rows)],
                optimizer=opt, keep_ir=False)
        except PipercError as e:
            gaps += 1
            counts["compile rejected (checker gap)"] += 1
            report("accepted, but piperc.compile rejects it", case, e)
            continue
        try:
            result = piperc.launch(compiled, batches, timeout=args.timeout)
        except LaunchError as e:
            gaps += 1
            hang = "did not finish within" in str(e)
            counts["hangs" if hang else "crashes"] += 1
            report("hang" if hang else "crash", case, e)
            continue
        counts["run"] += 1
        losses, state = train_eager(model, batches, opt, slices=case.microbatches)
        loss_error, param_error = compare(result.losses, result.state_dict, losses, state)
        if max(loss_error, param_error) > TOLERANCE:
            gaps += 1
            counts["runs unlike one device"] += 1
            report("differs from one device", case, f"loss error {loss_error:.2e}, parameters {param_error:.2e}")
        else:
            counts[f"run pp={case.stages} exact"] += 1
        print(f"  run {counts['run']}: pp={case.stages} m={case.microbatches} ok "
              f"({time.monotonic() - start:.0f} s)", flush=True)
    for name in ("generated", "rejected", "accepted", "accepted distinct", "simulated", "compiled", "run",
                 "hangs", "crashes"):
        counts.setdefault(name, 0)
    print(f"\nwall time {time.monotonic() - start:.0f} s")
    for name, n in counts.items():
        print(f"{name:>34}: {n}")
    print(f"{'checker gaps':>34}: {gaps}")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
