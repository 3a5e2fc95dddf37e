"""`piperc capture` and the compile-time benchmark, run as a user runs them: as processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from piperc.examples import gpt
from piperc.ir import parse_module

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def piperc(*args: str) -> subprocess.CompletedProcess:
    return run("-m", "piperc.cli", *args)


def test_capture_writes_the_captured_ir(tmp_path):
    result = piperc("capture", "examples/gpt.py:make", "--set", "n_layers=1", "--dump-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-captured.mlir"]
    module = parse_module((tmp_path / "00-captured.mlir").read_text())
    assert any(op.name.startswith("torch.aten.") for op in module.walk())
    model, _ = gpt.make(n_layers=1)
    assert f"{len(list(model.parameters()))} parameters" in result.stdout
    assert str(tmp_path / "00-captured.mlir") in result.stdout


def test_capture_with_a_pipeline_dumps_the_ir_before_and_after_each_pass(tmp_path):
    result = piperc(
        "capture", "piperc.examples.gpt:make", "--set", "n_layers=1", "--set", "d_model=16",
        "-p", "fold-detach,cse", "--dump-dir", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.mlir", "01-fold-detach.mlir", "02-cse.mlir"]
    for name in names:
        parse_module((tmp_path / name).read_text(), name=name)
    assert "02-cse.mlir" in result.stdout


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("examples/gpt.py:mk", "examples/gpt.py has no function 'mk' (its functions: causal_attention, make"),
        ("examples/nope.py:make", "cannot read examples/nope.py: no such file"),
    ],
)
def test_a_target_that_does_not_exist_is_a_one_line_error(target, message):
    result = piperc("capture", target)
    assert result.returncode == 1
    assert result.stderr.startswith(f"piperc: error: {message}")
    assert "Traceback" not in result.stderr
