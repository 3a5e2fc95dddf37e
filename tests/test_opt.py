"""`piperc-opt` end to end: each case runs once as a real `python -m piperc.opt` process
and once in-process through `main(argv)`, and checks the exit code, stdout and stderr."""

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.rewriter import Rewriter
from xdsl.utils.exceptions import PassFailedException

from piperc.dialects.torch import ConstantIntOp, FloatType
from piperc.ir import parse_module, print_ir
from piperc.opt import main
from piperc.passes import PASSES

REPO = Path(__file__).resolve().parents[1]
TWO_LAYER = "tests/ir/two_layer.mlir"


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


# tests/ir/two_layer.mlir as piperc prints it.
INPUT = ir(
    """
    builtin.module {
      func.func @main(%arg0: !torch.vtensor<[3,4],f32>, %arg1: !torch.vtensor<[8,4],f32>, %arg2: !torch.vtensor<[2,8],f32>) -> !torch.vtensor<[3,2],f32> {
        %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
        %1 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
        %2 = "torch.prim.ListConstruct"(%0, %1) : (!torch.int, !torch.int) -> !torch.list<int>
        %3 = "torch.aten.permute"(%arg1, %2) : (!torch.vtensor<[8,4],f32>, !torch.list<int>) -> !torch.vtensor<[4,8],f32>
        %4 = "torch.aten.mm"(%arg0, %3) : (!torch.vtensor<[3,4],f32>, !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[3,8],f32>
        %5 = "torch.aten.relu"(%4) : (!torch.vtensor<[3,8],f32>) -> !torch.vtensor<[3,8],f32>
        %6 = "torch.aten.detach"(%5) : (!torch.vtensor<[3,8],f32>) -> !torch.vtensor<[3,8],f32>
        %7 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
        %8 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
        %9 = "torch.prim.ListConstruct"(%7, %8) : (!torch.int, !torch.int) -> !torch.list<int>
        %10 = "torch.aten.permute"(%arg2, %9) : (!torch.vtensor<[2,8],f32>, !torch.list<int>) -> !torch.vtensor<[8,2],f32>
        %11 = "torch.aten.mm"(%6, %10) : (!torch.vtensor<[3,8],f32>, !torch.vtensor<[8,2],f32>) -> !torch.vtensor<[3,2],f32>
        %12 = "torch.aten.detach"(%11) : (!torch.vtensor<[3,2],f32>) -> !torch.vtensor<[3,2],f32>
        func.return %12 : !torch.vtensor<[3,2],f32>
      }
    }
    """
)

AFTER_FOLD_DETACH = ir(
    """
    builtin.module {
      func.func @main(%arg0: !torch.vtensor<[3,4],f32>, %arg1: !torch.vtensor<[8,4],f32>, %arg2: !torch.vtensor<[2,8],f32>) -> !torch.vtensor<[3,2],f32> {
        %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
        %1 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
        %2 = "torch.prim.ListConstruct"(%0, %1) : (!torch.int, !torch.int) -> !torch.list<int>
        %3 = "torch.aten.permute"(%arg1, %2) : (!torch.vtensor<[8,4],f32>, !torch.list<int>) -> !torch.vtensor<[4,8],f32>
        %4 = "torch.aten.mm"(%arg0, %3) : (!torch.vtensor<[3,4],f32>, !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[3,8],f32>
        %5 = "torch.aten.relu"(%4) : (!torch.vtensor<[3,8],f32>) -> !torch.vtensor<[3,8],f32>
        %6 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
        %7 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
        %8 = "torch.prim.ListConstruct"(%6, %7) : (!torch.int, !torch.int) -> !torch.list<int>
        %9 = "torch.aten.permute"(%arg2, %8) : (!torch.vtensor<[2,8],f32>, !torch.list<int>) -> !torch.vtensor<[8,2],f32>
        %10 = "torch.aten.mm"(%5, %9) : (!torch.vtensor<[3,8],f32>, !torch.vtensor<[8,2],f32>) -> !torch.vtensor<[3,2],f32>
        func.return %10 : !torch.vtensor<[3,2],f32>
      }
    }
    """
)

AFTER_CSE = ir(
    """
    builtin.module {
      func.func @main(%arg0: !torch.vtensor<[3,4],f32>, %arg1: !torch.vtensor<[8,4],f32>, %arg2: !torch.vtensor<[2,8],f32>) -> !torch.vtensor<[3,2],f32> {
        %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
        %1 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
        %2 = "torch.prim.ListConstruct"(%0, %1) : (!torch.int, !torch.int) -> !torch.list<int>
        %3 = "torch.aten.permute"(%arg1, %2) : (!torch.vtensor<[8,4],f32>, !torch.list<int>) -> !torch.vtensor<[4,8],f32>
        %4 = "torch.aten.mm"(%arg0, %3) : (!torch.vtensor<[3,4],f32>, !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[3,8],f32>
        %5 = "torch.aten.relu"(%4) : (!torch.vtensor<[3,8],f32>) -> !torch.vtensor<[3,8],f32>
        %6 = "torch.aten.permute"(%arg2, %2) : (!torch.vtensor<[2,8],f32>, !torch.list<int>) -> !torch.vtensor<[8,2],f32>
        %7 = "torch.aten.mm"(%5, %6) : (!torch.vtensor<[3,8],f32>, !torch.vtensor<[8,2],f32>) -> !torch.vtensor<[3,2],f32>
        func.return %7 : !torch.vtensor<[3,2],f32>
      }
    }
    """
)


@dataclasses.dataclass
class Run:
    rc: int
    out: str
    err: str


def run_subprocess(*args: str) -> Run:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "piperc.opt", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def opt_in_process(capsys, monkeypatch):
    """Runs `piperc.opt.main` from the repository root, as the subprocess does."""
    monkeypatch.chdir(REPO)

    def run(*args: str) -> Run:
        rc = main(list(args))
        captured = capsys.readouterr()
        return Run(rc, captured.out, captured.err)

    return run


@pytest.fixture(params=["subprocess", "in-process"])
def piperc_opt(request, opt_in_process):
    """Runs piperc-opt both ways: each process costs a torch import, so only the main
    cases use this; the rest run in-process."""
    return run_subprocess if request.param == "subprocess" else opt_in_process


def test_fixture_is_torch_mlir_generic_text_of_input():
    text = (REPO / TWO_LAYER).read_text()
    assert text.startswith('"builtin.module"() ({\n  "func.func"()')
    assert print_ir(parse_module(text)) == INPUT


def test_two_pass_pipeline_folds_detach_and_merges_constants(piperc_opt):
    r = piperc_opt(TWO_LAYER, "-p", "fold-detach,cse")
    assert (r.rc, r.err) == (0, "")
    assert r.out == AFTER_CSE


def test_empty_pipeline_prints_the_input(opt_in_process):
    r = opt_in_process(TWO_LAYER)
    assert (r.rc, r.out, r.err) == (0, INPUT, "")


def test_print_ir_after_all(piperc_opt):
    r = piperc_opt(TWO_LAYER, "-p", "fold-detach,cse", "--print-ir-after-all")
    assert r.rc == 0
    assert r.out == AFTER_CSE
    assert r.err == (
        "// -----// IR Dump After fold-detach //----- //\n" + AFTER_FOLD_DETACH
        + "// -----// IR Dump After cse //----- //\n" + AFTER_CSE
    )


def test_dump_dir_writes_one_parsable_file_per_pass(piperc_opt, tmp_path):
    dump = tmp_path / "dump"
    r = piperc_opt(TWO_LAYER, "-p", "fold-detach,cse", "--dump-dir", str(dump))
    assert (r.rc, r.out, r.err) == (0, AFTER_CSE, "")
    assert sorted(os.listdir(dump)) == ["00-input.mlir", "01-fold-detach.mlir", "02-cse.mlir"]
    expected = {"00-input.mlir": INPUT, "01-fold-detach.mlir": AFTER_FOLD_DETACH, "02-cse.mlir": AFTER_CSE}
    for name, text in expected.items():
        written = (dump / name).read_text()
        assert written == text
        parse_module(written, name=name).verify()


def test_print_ir_before_and_time_passes(piperc_opt):
    r = piperc_opt(TWO_LAYER, "-p", "fold-detach,cse", "--print-ir-before=cse", "--time-passes")
    assert (r.rc, r.out) == (0, AFTER_CSE)
    header = "// -----// IR Dump Before cse //----- //\n"
    assert r.err.startswith(header + AFTER_FOLD_DETACH)
    report = r.err.removeprefix(header + AFTER_FOLD_DETACH).splitlines()
    assert "... Pass execution timing report ..." in report[1]
    assert re.fullmatch(r"  Total Execution Time: \d+\.\d{4} seconds", report[3])
    assert report[5] == "  ----Wall Time----  ----Name----"
    rows = [re.fullmatch(r"  \d+\.\d{4} \( *\d+\.\d%\)  (\S+)", line) for line in report[6:]]
    assert [m.group(1) for m in rows if m] == ["fold-detach", "cse", "Total"]


def test_malformed_file_names_file_line_and_column(piperc_opt, tmp_path):
    bad = tmp_path / "bad.mlir"
    bad.write_text(
        ir(
            """
            func.func @main() {
              %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
              %1 = "torch.constant.int"( <{value = 2 : i64}> : () -> !torch.int
              func.return
            }
            """
        )
    )
    r = piperc_opt(str(bad), "-p", "cse")
    assert (r.rc, r.out) == (1, "")
    assert re.search(r"^piperc-opt: .*bad\.mlir:3:\d+$", r.err, re.MULTILINE)
    assert "operand expected" in r.err
    assert "Traceback" not in r.err


def test_input_that_does_not_verify(opt_in_process, tmp_path):
    bad = tmp_path / "unverified.mlir"
    bad.write_text(
        ir(
            """
            func.func @main(%arg0: !torch.vtensor<[4],f32>) {
              %0 = "torch.aten.relu"(%arg0, %arg0) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
              func.return
            }
            """
        )
    )
    r = opt_in_process(str(bad), "-p", "cse")
    assert (r.rc, r.out) == (1, "")
    assert "IR after the input does not verify: torch.aten.relu takes 1 operands" in r.err
    assert "Traceback" not in r.err


@pytest.mark.parametrize(
    "content, message",
    [(None, "No such file or directory"), (b"\xff\xfe", "not UTF-8 text (byte 0)")],
)
def test_unreadable_file(opt_in_process, tmp_path, content, message):
    path = tmp_path / "model.mlir"
    if content is not None:
        path.write_bytes(content)
    r = opt_in_process(str(path))
    assert (r.rc, r.out) == (1, "")
    assert r.err == f"piperc-opt: cannot read {path}: {message}\n"


def test_unknown_pass_lists_known_passes(piperc_opt):
    r = piperc_opt(TWO_LAYER, "-p", "fold-detach,no-such-pass")
    assert (r.rc, r.out) == (1, "")
    known = ", ".join(sorted(PASSES))
    assert r.err == (
        "piperc-opt: error: unknown pass 'no-such-pass' in pipeline "
        f"'fold-detach,no-such-pass' (known: {known})\n"
    )
    assert "fold-detach" in known and "cse" in known


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("fold-detach{", "cannot parse pipeline 'fold-detach{'"),
        ("fold-detach{x=1}", "bad options for pass 'fold-detach'"),
    ],
)
def test_malformed_pipeline(opt_in_process, pipeline, message):
    r = opt_in_process(TWO_LAYER, "-p", pipeline)
    assert (r.rc, r.out) == (1, "")
    assert r.err.startswith(f"piperc-opt: error: {message}")
    assert "Traceback" not in r.err


def test_list_passes(piperc_opt):
    r = piperc_opt("--list-passes")
    assert (r.rc, r.err) == (0, "")
    assert r.out.splitlines() == sorted(PASSES)
    assert {"fold-detach", "cse", "dce"} <= set(r.out.splitlines())


# ---------------------------------------------------------------- passes that go wrong


@dataclasses.dataclass(frozen=True)
class GivesUp(ModulePass):
    name = "gives-up"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        raise PassFailedException("nothing to do here")


@dataclasses.dataclass(frozen=True)
class MistypesConstants(ModulePass):
    name = "mistypes-constants"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for c in op.walk():
            if isinstance(c, ConstantIntOp):
                Rewriter.replace_value_with_new_type(c.result, FloatType())


@pytest.mark.parametrize(
    "pass_class, message",
    [
        (GivesUp, "pass 'gives-up' failed: PassFailedException: nothing to do here"),
        (
            MistypesConstants,
            "IR after pass 'mistypes-constants' does not verify: result 'result' at position 0 "
            "does not verify:\n!torch.float should be of base attribute torch.int",
        ),
    ],
)
def test_a_failing_pass_is_named_without_a_traceback(
    monkeypatch, capsys, pass_class: type[ModulePass], message: str
):
    monkeypatch.setitem(PASSES, pass_class.name, lambda: pass_class)
    monkeypatch.chdir(REPO)
    assert main([TWO_LAYER, "-p", f"fold-detach,{pass_class.name}"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"piperc-opt: error: {message}")


def test_a_compiled_pipeline_replays_with_piperc_opt(tmp_path, capsys):
    """`Compiled.dump` writes the pass pipeline it ran; piperc-opt replays it on the
    captured IR and gets the same final IR."""
    import piperc
    from piperc.examples import gpt

    model, inputs = gpt.make(n_layers=2)
    compiled = piperc.compile(
        model, inputs, mesh=piperc.Mesh(pp=2, dp=2),
        strategy=[piperc.pipeline(stages=2, microbatches=2), piperc.data_parallel()],
        optimizer=piperc.optim.AdamW(lr=1e-3))
    out = compiled.dump(str(tmp_path / "job"))
    ir_dir = tmp_path / "job" / "ir"
    pipeline = (tmp_path / "job" / "pipeline.txt").read_text().strip()
    assert main([str(ir_dir / "00-captured.mlir"), "-p", pipeline, "-o", str(tmp_path / "replay.mlir")]) == 0
    assert out == str(tmp_path / "job")
    last = sorted(ir_dir.iterdir())[-1]
    assert last.name.endswith("-verify-exec.mlir")
    assert (tmp_path / "replay.mlir").read_text() == last.read_text()


def test_pipeline_text_reads_back_small_floats():
    # xDSL prints 1e-05, which its own pipeline lexer rejects; pipeline_text writes 1.0e-05
    from piperc.passes.optimizer import OptimizerPass
    from piperc.passmanager import parse_pipeline, pipeline_text

    passes = [OptimizerPass(kind="adamw", lr=1e-5, eps=1e-12, beta2=0.95, weight_decay=0.0),
              *parse_pipeline('mesh{shape="pp=2,dp=2"},zero{stage=3 reshard-after-forward=false}')]
    text = pipeline_text(passes)
    assert "lr=1.0e-05" in text and "eps=1.0e-12" in text and "beta2=0.95" in text
    assert parse_pipeline(text) == passes
