"""Fuzzing: random schedule tables are rejected before running or run to the end, and
random mutations of IR files make piperc-opt fail cleanly, never crash.

The schedule tables come from tools/fuzz_schedules.py (seeded: the same 1000 tables on
every run); the tool's full run also launches 50 of them for real.
"""

from __future__ import annotations

import contextlib
import io
import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xdsl.dialects import func

import piperc
from piperc import schedules
from piperc.errors import PipercError
from piperc.examples import gpt
from piperc.frontend import capture
from piperc.ir import print_ir
from piperc.opt import main
from piperc.passmanager import run_pipeline
from piperc.reference import TOLERANCE, compare, train_eager
from tools.fuzz_schedules import Case, check, generate, pipeline_text

REPO = Path(__file__).resolve().parent.parent
TABLES = generate(1000, seed=0)


def accepted_cases() -> list[Case]:
    """The distinct generated tables the checks accept, that use no W and one row per stage."""
    found = {}
    for case in TABLES:
        try:
            check(case)
        except schedules.ScheduleError:
            continue
        if len(case.rows) == case.stages and not any("W" in a for r in case.rows for a in r):
            found.setdefault(case.key(), case)
    return list(found.values())


@pytest.fixture(scope="module")
def captured():
    model, (tokens, targets) = gpt.make(n_layers=4, d_model=16, n_heads=2, seq=8, batch=8)
    return capture(model, (tokens[:1], targets[:1]))


# ---------------------------------------------------------------- schedule tables


def test_every_random_table_is_rejected_with_a_schedule_error_or_simulates():
    rejected = accepted = 0
    for case in TABLES:
        try:
            sched = check(case)
        except schedules.ScheduleError:
            rejected += 1
            continue
        accepted += 1
        schedules.simulate(sched, comm_time=0.5)
    assert len(TABLES) == 1000 and rejected > 500 and accepted > 100


def test_the_sample_to_run_holds_50_distinct_accepted_tables_on_2_and_4_devices():
    cases = accepted_cases()
    assert len(cases) >= 50
    assert {c.stages for c in cases} == {2, 4}


def test_a_table_whose_sends_cross_under_nccls_rule_receives_early_and_compiles(captured):
    # Buffered sends would let device 0 run all its forwards first; under NCCL's rule its
    # send of microbatch 2 waits for device 1, which waits to send a gradient first. Device
    # 1 then posts the receive of 0F2 (and 0F3) in the batch it waits at (`receive_plan`),
    # and the generated programs pass verify-exec's simulation of the same rule.
    table = "0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3\n1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3"
    schedule = schedules.from_table(table)
    schedules.validate(schedule)
    plan = schedules.receive_plan(schedule)
    assert plan[0] == {} and [str(m.producer) for ms in plan[1].values() for m in ms] == ["0F2", "0F3"]
    run_pipeline(captured.module.clone(), captured.ctx, pipeline_text(Case(2, 4, schedule.to_rows(), "table")))


def test_a_device_with_no_actions_is_rejected():
    with pytest.raises(schedules.ScheduleError, match="device 2 runs no action"):
        schedules.validate(schedules.from_lists([["0F0", "0B0"], ["1F0", "1B0"], []]))


def compile_sample() -> list[Case]:
    """Two accepted tables for 2 devices and two for 4, picked at random (seeded)."""
    cases = accepted_cases()
    random.Random(1).shuffle(cases)
    return [c for c in cases if c.stages == 2][:2] + [c for c in cases if c.stages == 4][:2]


@pytest.mark.parametrize("index", range(4))
def test_accepted_tables_compile_through_verify_exec(captured, index):
    run_pipeline(captured.module.clone(), captured.ctx, pipeline_text(compile_sample()[index]))


def test_accepted_tables_with_weight_gradient_actions_compile_with_the_backward_split(captured):
    found = {}
    for case in TABLES:
        if len(case.rows) == case.stages and any("W" in a for r in case.rows for a in r):
            try:
                check(case)
            except schedules.ScheduleError:
                continue
            found.setdefault(case.key(), case)
    assert len(found) >= 5
    for case in list(found.values())[:5]:
        assert "outline-stages{split-weights=true}" in pipeline_text(case)
        try:
            run_pipeline(captured.module.clone(), captured.ctx, pipeline_text(case))
        except PipercError as e:
            pytest.fail(f"{case.rows}: {e}")


def test_a_table_with_w_on_one_stage_only_batches_each_actions_sends_with_the_next_actions(captured):
    # Found by the fuzzer: stages 1-3 list no W, so their B actions run B and W tasks; the
    # sends of B must wait for the next action's batch, as the checker models them, not
    # go out alone before W (a lone send batch blocks until received: deadlock at pp=4).
    rows = [r.split() for r in (
        "0F0 0F1 0F2 0F3 0F4 0F5 0B0 0W0 0B1 0W1 0B2 0W2 0B3 0W3 0B4 0W4 0B5 0W5",
        "1F0 1F1 1F2 1F3 1F4 1F5 1B0 1B1 1B2 1B3 1B4 1B5",
        "2F0 2F1 2F2 2F3 2F4 2F5 2B0 2B1 2B2 2B3 2B4 2B5",
        "3F0 3F1 3F2 3F3 3B0 3F4 3B1 3F5 3B2 3B3 3B4 3B5")]
    case = Case(4, 6, rows, "random warm-up, split_backward")
    check(case)
    run_pipeline(captured.module.clone(), captured.ctx, pipeline_text(case))


def test_an_accepted_table_whose_gradient_send_crosses_a_forward_compiles(captured):
    case = Case(2, 4, [["0F0", "0F1", "0B0", "0F2", "0F3", "0B1", "0B2", "0B3"],
                       ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2", "1F3", "1B3"]], "random warm-up")
    check(case)
    try:
        run_pipeline(captured.module.clone(), captured.ctx, pipeline_text(case))
    except PipercError as e:
        pytest.fail(str(e))


def test_an_accepted_random_table_trains_like_one_device():
    case = next(c for c in accepted_cases() if c.stages == 2 and c.microbatches == 4
                and c.made == "random warm-up")
    model, _ = gpt.make(n_layers=2, d_model=16, n_heads=2, seq=8, batch=8)
    batches = [tuple(x[:4] for x in gpt.sample_batch(64, 8, 8)) for _ in range(2)]
    opt = piperc.optim.SGD(lr=0.05, momentum=0.9)
    compiled = piperc.compile(model, batches[0], mesh=piperc.Mesh(pp=2), optimizer=opt, keep_ir=False,
                              strategy=[piperc.pipeline(stages=2, microbatches=4, schedule=case.rows)])
    result = piperc.launch(compiled, batches, timeout=120)
    losses, state = train_eager(model, batches, opt, slices=4)
    assert max(compare(result.losses, result.state_dict, losses, state)) <= TOLERANCE


# ---------------------------------------------------------------- IR mutations


@pytest.fixture(scope="module")
def sources(captured) -> dict[str, str]:
    """IR texts to mutate: the torch-level test file, and the rank programs of a pp=2 1F1B
    step (exec with sends, receives and batched transfers, par mesh and schedule; the
    stage functions left out, which programs do not need to verify)."""
    module = captured.module.clone()
    run_pipeline(module, captured.ctx, (
        'fold-detach,mesh{shape="pp=2"},pipeline-split{stages=2},outline-stages,'
        'optimizer{kind="sgd" lr=0.05},microbatch{count=2 replicas=1},'
        'schedule{kind="1f1b"},expand-schedule,lower-to-exec'))
    for op in [op for op in module.ops if isinstance(op, func.FuncOp)]:
        op.detach()
        op.erase()
    return {"two_layer": (REPO / "tests/ir/two_layer.mlir").read_text(), "programs": print_ir(module)}


def run_opt(text: str, *argv: str) -> tuple[int, str]:
    """piperc-opt on `text` from stdin, in this process: (exit code, stderr)."""
    err = io.StringIO()
    stdin, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["-", *argv])
    finally:
        sys.stdin = stdin
    return code, err.getvalue()


@st.composite
def mutations(draw, text: str) -> str:
    """`text` with 1 to 3 edits: a line deleted, duplicated or swapped with another, a token
    replaced by another of the text's tokens or by random characters, or the text cut short."""
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i, j = (draw(st.integers(0, len(lines) - 1)) for _ in range(2))
        edit = draw(st.sampled_from(["delete", "duplicate", "swap", "token", "chars", "truncate"]))
        if edit == "delete" and len(lines) > 1:
            del lines[i]
        elif edit == "duplicate":
            lines.insert(j, lines[i])
        elif edit == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif edit in ("token", "chars"):
            words = lines[i].split()
            if words:
                k = draw(st.integers(0, len(words) - 1))
                words[k] = (draw(st.sampled_from(text.split())) if edit == "token"
                            else draw(st.text(st.sampled_from('%@#:=,()[]{}<>"!^x0159-.'), max_size=6)))
                lines[i] = " ".join(words) + "\n"
        elif edit == "truncate":
            lines = lines[:i] + [lines[i][: draw(st.integers(0, len(lines[i])))]]
    return "".join(lines)


@pytest.mark.parametrize("source, count", [("two_layer", 100), ("programs", 30)])
def test_mutated_ir_is_printed_or_refused_in_one_line(sources, source, count):
    """Parse and verify (no passes), then fold-detach on the torch file: every outcome is
    exit 0, or exit 1 with one `piperc-opt:` line (a parse error may add its caret
    lines), never an exception out of main."""
    argv = ("-p", "fold-detach") if source == "two_layer" else ()

    @settings(max_examples=count, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutations(sources[source]))
    def check_outcome(text: str) -> None:
        code, err = run_opt(text, *argv)
        if code == 0:
            return
        assert code == 1
        assert err.startswith("piperc-opt: ") and "Traceback" not in err
        assert err.count("piperc-opt:") == 1

    check_outcome()
