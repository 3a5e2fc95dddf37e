"""The demo (`make demo`, `python -m piperc.demo`) runs as the README shows, for each strategy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# `make demo` runs pp-dp; zero's passes are covered by tests/test_zero.py (the demo's
# strategies share all their code but the directive list).
@pytest.mark.parametrize("strategy,directive", [("tp", "tensor_parallel(axis='tp', plan=")])
def test_demo_strategy_matches_one_device(strategy, directive, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "piperc.demo", "--strategy", strategy, "--steps", "2", "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "against single-device training with torch.optim (piperc.verify):" in result.stdout
    assert "\n  MATCH\n" in result.stdout
    assert directive in result.stdout
    assert (tmp_path / "memory.txt").read_text().startswith("rank 0: predicted peak at op #")
