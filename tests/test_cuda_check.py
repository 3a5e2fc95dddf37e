"""tools/cuda_check.py, the one-GPU check of the CUDA path, runs its two halves on CPU."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_check_prepares_a_job_and_runs_it_with_the_runtime_alone(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tool = str(ROOT / "tools" / "cuda_check.py")
    prepared = subprocess.run([sys.executable, tool, "prepare", str(tmp_path / "jobs"), "--device", "cpu",
                               "--only", "gpt-pp1xdp1-1f1b-mb4-zero3-keep-adamw"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    ran = subprocess.run([sys.executable, tool, "run", str(tmp_path / "jobs"), str(tmp_path / "results")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "all 1 jobs exact against eager (1e-05)" in ran.stdout
    assert (tmp_path / "results" / "summary.json").exists()
