"""A strategy is directives, and a directive is a pipeline fragment: these tests add a
directive from outside piperc and check where `piperc.compile` runs its passes."""

import dataclasses
import re

import pytest
from xdsl.context import Context
from xdsl.dialects.builtin import IntegerAttr, ModuleOp
from xdsl.passes import ModulePass

import piperc
from piperc.errors import PassError, StrategyError
from piperc.examples import gpt
from piperc.opt import main as piperc_opt
from piperc.passes import PASSES
from piperc.passes.schedule import find_schedule

OPT = piperc.optim.SGD(lr=0.05)
PP2 = piperc.Mesh(pp=2)


@dataclasses.dataclass(frozen=True)
class TagSchedulePass(ModulePass):
    """Writes how many devices the schedule has; fails unless `schedule` ran before it."""

    name = "test-tag-schedule"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        op.attributes["test.schedule_devices"] = IntegerAttr(len(find_schedule(op).table()), 64)


@dataclasses.dataclass(frozen=True)
class CheckTagPass(ModulePass):
    """Marks the module checked; fails unless `test-tag-schedule` ran before it."""

    name = "test-check-tag"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        op.attributes["test.checked"] = op.attributes["test.schedule_devices"]


@dataclasses.dataclass(frozen=True)
class BrokenPass(ModulePass):
    """A pass with a bug: it raises `error`."""

    name = "test-broken"

    error: str = "key"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.error == "key":
            raise KeyError("stage 7")
        try:
            int("seven")
        except ValueError as e:
            raise StrategyError("broken(): stage 'seven' is not a number; write 7") from e


@pytest.fixture(autouse=True)
def test_passes(monkeypatch):
    for cls in (TagSchedulePass, CheckTagPass, BrokenPass):
        monkeypatch.setitem(PASSES, cls.name, lambda cls=cls: cls)


@dataclasses.dataclass(frozen=True)
class TagSchedule(piperc.Directive):
    """Lists its fragments in the wrong order: the facts put them right."""

    def fragments(self, ctx):
        return [piperc.Fragment((CheckTagPass(),), requires=("tagged",)),
                piperc.Fragment((TagSchedulePass(),), requires=("schedule",), provides=("tagged",))]


@dataclasses.dataclass(frozen=True)
class Requires(piperc.Directive):
    """One fragment per (requires, provides) pair, each running `test-broken`."""

    facts: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]

    def __str__(self):
        return "requires()"

    def fragments(self, ctx):
        return [piperc.Fragment((BrokenPass(),), requires=r, provides=p) for r, p in self.facts]


@dataclasses.dataclass(frozen=True)
class Broken(piperc.Directive):
    error: str

    def fragments(self, ctx):
        return [piperc.Fragment((BrokenPass(error=self.error),))]


def test_a_directive_from_outside_piperc_runs_its_passes_where_its_facts_say(tmp_path):
    model, inputs = gpt.make(n_layers=2)
    compiled = piperc.compile(model, inputs, mesh=PP2, optimizer=OPT,
                              strategy=[TagSchedule(), piperc.pipeline(stages=2, microbatches=2)])
    run = [p.name for p in piperc.parse_pipeline(compiled.pipeline)]
    assert run.index("schedule") < run.index("test-tag-schedule") < run.index("test-check-tag")
    assert run.index("test-check-tag") < run.index("lower-to-exec")
    after = dict(compiled.ir_after)
    assert "test.schedule_devices = 2 : i64" in after["test-tag-schedule"]
    assert "test.checked = 2 : i64" in after["test-check-tag"]

    compiled.dump(str(tmp_path / "job"))
    pipeline = (tmp_path / "job" / "pipeline.txt").read_text().strip()
    replay = tmp_path / "replay.mlir"
    assert piperc_opt([str(tmp_path / "job" / "ir" / "00-captured.mlir"), "-p", pipeline, "-o", str(replay)]) == 0
    assert replay.read_text() == compiled.ir_after[-1][1]


@pytest.mark.parametrize(
    "facts, message",
    [
        ((((), ("x",)), (("y",), ())),
         "requires(): its passes require 'y', which no directive provides "
         "(provided: exec, layouts, mesh, microbatches, schedule, stages, update, x)"),
        ((((), ("x",)), (("x", "z"), ("y",)), (("y",), ("z",))),
         "the strategy's passes cannot be ordered, their requirements form a cycle: "
         "requires() requires 'z' from requires(); requires() requires 'y' from requires()"),
        (((("schedule",), ("mesh",)),),
         "the strategy's passes cannot be ordered, their requirements form a cycle: "
         "piperc's schedule, expand-schedule requires 'mesh' from requires(); "
         "requires() requires 'schedule' from piperc's schedule, expand-schedule"),
    ],
    ids=["missing", "cycle", "cycle-through-piperc"],
)
def test_facts_nobody_provides_and_cycles_are_strategy_errors(facts, message):
    model, inputs = gpt.make(n_layers=2)
    with pytest.raises(StrategyError, match=re.escape(message)):
        piperc.compile(model, inputs, mesh=piperc.Mesh(dp=1), strategy=[Requires(facts)], optimizer=OPT)


def test_a_bug_in_a_pass_names_the_pass_and_keeps_its_cause():
    model, inputs = gpt.make(n_layers=2)
    with pytest.raises(PassError, match=re.escape("pass 'test-broken' failed: KeyError: 'stage 7'")) as raised:
        piperc.compile(model, inputs, mesh=PP2, optimizer=OPT,
                       strategy=[Broken("key"), piperc.pipeline(stages=2, microbatches=2)])
    assert isinstance(raised.value.__cause__, KeyError)


def test_a_strategy_error_in_a_pass_reaches_the_user_as_itself():
    model, inputs = gpt.make(n_layers=2)
    with pytest.raises(StrategyError, match=re.escape("broken(): stage 'seven' is not a number")) as raised:
        piperc.compile(model, inputs, mesh=PP2, optimizer=OPT,
                       strategy=[Broken("strategy"), piperc.pipeline(stages=2, microbatches=2)])
    assert isinstance(raised.value.__cause__, ValueError)


# ---------------------------------------------------------------- schedule functions


def eager_1f1b(stages, microbatches, devices):
    """1F1B with one more warm-up forward per device (the README's example)."""
    rows = []
    for s in range(stages):
        warmup = min(stages - s, microbatches)
        row = [f"{s}F{m}" for m in range(warmup)]
        for m in range(warmup, microbatches):
            row += [f"{s}F{m}", f"{s}B{m - warmup}"]
        rows.append(row + [f"{s}B{m}" for m in range(microbatches - warmup, microbatches)])
    return rows


def backwards_first(stages, microbatches, devices):
    return [[f"{s}B{m}" for m in range(microbatches)] + [f"{s}F{m}" for m in range(microbatches)]
            for s in range(stages)]


def test_a_schedule_function_compiles_runs_and_matches_one_device():
    model, inputs = gpt.make(n_layers=2)
    optimizer = piperc.optim.SGD(lr=0.05, momentum=0.9)
    compiled = piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2), optimizer=optimizer, keep_ir=False,
                              strategy=[piperc.pipeline(stages=2, microbatches=4, schedule=eager_1f1b)])
    assert compiled.schedule.to_rows() == eager_1f1b(2, 4, 2)
    assert piperc.verify(model, inputs, compiled).verdict == "exact"


@pytest.mark.parametrize("schedule,message", [
    (backwards_first, r"schedule='backwards_first'\): schedule 'backwards_first': 0B0 runs before 0F0 on "
                      r"device 0, but needs its result; move 0B0 after 0F0"),
    (lambda stages, microbatches, devices: 1 / 0,
     r"<lambda>\(2, 4, 2\) raised ZeroDivisionError: division by zero"),
    (lambda stages, microbatches, devices: "0F0 0B0",
     r"<lambda> must return a piperc.schedules.Schedule or one list of actions per device, got str"),
])
def test_a_bad_schedule_function_is_refused_before_anything_runs(schedule, message):
    model, inputs = gpt.make(n_layers=2)
    with pytest.raises(StrategyError, match=message):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2), optimizer=piperc.optim.SGD(lr=0.05), keep_ir=False,
                       strategy=[piperc.pipeline(stages=2, microbatches=4, schedule=schedule)])
