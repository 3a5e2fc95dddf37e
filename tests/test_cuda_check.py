"""tools/cuda_check.py, the one-GPU check of the CUDA path, runs its two halves on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "cuda_check.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def prepare_and_run(tmp_path, jobs: list[str]) -> subprocess.CompletedProcess:
    prepared = subprocess.run([sys.executable, TOOL, "prepare", str(tmp_path / "jobs"), "--device", "cpu",
                               "--only", *jobs], env=ENV, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    ran = subprocess.run([sys.executable, TOOL, "run", str(tmp_path / "jobs"), str(tmp_path / "results")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran


def test_cuda_check_prepares_a_job_and_runs_it_with_the_runtime_alone(tmp_path):
    ran = prepare_and_run(tmp_path, ["gpt-pp1xdp1-1f1b-mb4-zero3-keep-adamw"])
    assert "all 1 jobs exact against eager (1e-05)" in ran.stdout
    assert (tmp_path / "results" / "summary.json").exists()


def test_cuda_check_seeds_dropout_per_slice_freezes_and_resumes_as_eager_does(tmp_path):
    dropout, frozen, resumed = ("mlp-dropout-pp1-1f1b-mb4-seed7-adamw", "gpt-frozen-embed-dp1-zero3-adamw",
                                "mlp-dropout-pp1xdp1-gpipe-mb4-zero3-seed7-adamw-resume")
    ran = prepare_and_run(tmp_path, [dropout, frozen, resumed])
    assert "all 3 jobs exact against eager (1e-05)" in ran.stdout
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    # Both eager references draw each of the 4 microbatch slices' masks as the program does.
    assert (summary[dropout]["seed"], summary[dropout]["slices"]) == (7, 4)
    assert max(summary[dropout]["vs_eager_here"]) <= 1e-5 and max(summary[dropout]["vs_eager_cpu"]) <= 1e-5
    assert max(summary[frozen]["vs_eager_here"]) <= 1e-5
    # Trained 2 steps with a checkpoint after each, then resumed at step 2: the same run, bit for bit.
    again = summary[resumed]["resumed"]
    assert again["first_step"] == 2 and again["bitwise"]
    assert again["losses"] == summary[resumed]["losses"]
