"""The benchmarks run end to end, as a user runs them, at a tiny size.

Only that they finish and report what they promise: times on shared cores are too noisy to
assert on.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "4", "--d-model", "32", "--steps", "2", "--warmup", "1",
        "--batch", "8", "--seq", "16", "--microbatches", "4"]  # fmt: skip


def test_pipeline_vs_torch_reports_both_ratios():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/pipeline_vs_torch.py", *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for pair in ("pp", "dp"):
        ratio = re.search(rf"^{pair} ratio piperc/torch: (\d+\.\d+)", result.stdout, re.M)
        assert ratio, f"no {pair} ratio in:\n{result.stdout}"
        assert float(ratio.group(1)) > 0
    assert "command: " in result.stdout


def test_compile_time_reports_every_phase_by_depth():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/compile_time.py", "--layers", "4,8", "--d-model", "32",
         "--vocab", "64", "--seq", "16", "--batch", "8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^phase +4 layers +8 layers$", result.stdout, re.M), result.stdout
    for phase in ("trace", "import", "build IR", "pipeline-split",
                  "lower-to-exec", "verify", "codegen", "cpu", "wall"):  # fmt: skip
        assert re.search(rf"^{phase} +\d+\.\d\d +\d+\.\d\d$", result.stdout, re.M), f"no {phase} row in:\n{result.stdout}"
    assert "cpu 8/4 layers: " in result.stdout


def test_sharding_vs_torch_reports_zero3_and_tp_time_and_memory_ratios():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tiny = ["--layers", "2", "--d-model", "32", "--steps", "2", "--warmup", "1", "--batch", "8", "--seq", "16"]
    result = subprocess.run(
        [sys.executable, "benchmarks/sharding_vs_torch.py", *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for pair in ("zero3", "tp"):
        for kind in ("", "memory "):
            ratio = re.search(rf"^{pair} {kind}ratio piperc/torch: (\d+\.\d+)", result.stdout, re.M)
            assert ratio, f"no {pair} {kind}ratio in:\n{result.stdout}"
            assert float(ratio.group(1)) > 0
    assert "command: " in result.stdout


def test_pp_zero_memory_reports_the_largest_microbatch_count_per_policy():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/pp_zero_memory.py", "--microbatches", "2", "--budget-mib", "100", "--d-model", "32",
         "--vocab", "64", "--seq", "8", "--layers", "2", "--no-measure"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for policy in ("dp", "zero3", "zero3-keep"):
        assert re.search(rf"^{policy}: largest count that fits \d+", result.stdout, re.M), result.stdout


def test_schedules_vs_torch_reports_the_interleaved_ratio():
    # The 1f1b pair is pipeline_vs_torch's, smoke-tested above; interleaved alone keeps this short.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tiny = ["--layers", "8", "--d-model", "16", "--steps", "1", "--warmup", "0",
            "--batch", "4", "--seq", "8", "--microbatches", "4", "--only", "interleaved"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "benchmarks/schedules_vs_torch.py", *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    ratio = re.search(r"^interleaved ratio piperc/torch: (\d+\.\d+)", result.stdout, re.M)
    assert ratio, f"no interleaved ratio in:\n{result.stdout}"
    assert float(ratio.group(1)) > 0
    assert "command: " in result.stdout


def test_moe_reports_step_time_and_memory_ratios_over_ep():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tiny = ["--layers", "1", "--d-model", "16", "--experts", "4", "--steps", "1", "--warmup", "0",
            "--batch", "4", "--seq", "8"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "benchmarks/moe.py", *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("ep", "dense-dp", "masked"):
        row = re.search(rf"^{name} \(.*?\)((?: +\d+\.\d+){{10}})$", result.stdout, re.M)
        assert row, f"no {name} row in:\n{result.stdout}"
        assert all(float(x) > 0 for x in row.group(1).split()), row.group(0)
    for name in ("dense-dp", "masked"):
        ratio = re.search(rf"^{name} ratio over ep: (\d+\.\d+) by median step, (\d+\.\d+) by peak memory",
                          result.stdout, re.M)
        assert ratio, f"no {name} ratio in:\n{result.stdout}"
        assert float(ratio.group(1)) > 0 and float(ratio.group(2)) > 0
    dispatch = re.search(r"^ep dispatch: (\d+\.\d+) MiB per step per rank.*measured by the runtime: (\d+\.\d+) MiB",
                         result.stdout, re.M)
    assert dispatch and dispatch.group(1) == dispatch.group(2), result.stdout  # predicted = measured
    assert "command: " in result.stdout


def test_staleness_prints_every_method_at_every_stage_count(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    plot = tmp_path / "staleness.svg"
    result = subprocess.run(
        [sys.executable, "benchmarks/staleness.py", "--quick", "--stages", "2,4", "--out", str(plot)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for problem in ("quadratic", "logistic", "gpt"):
        for s in (2, 4):
            for method in ("sync", "pipedream", "2bw", "localsgd"):
                row = rf"^{problem} +{s} +{method} +2\^-?\d+[<>]? +(\d\S*|inf) +(\d\S*|inf) +2\^"
                assert re.search(row, result.stdout, re.M), f"no {problem} S={s} {method} row in:\n{result.stdout}"
            verdict = rf"^  {problem} +S={s}: pipedream \S+ vs localsgd \S+ .*: ((pipedream|localsgd) lower|about equal);"
            assert re.search(verdict, result.stdout, re.M), f"no {problem} S={s} verdict in:\n{result.stdout}"
    for s, seed_max in ((2, 3), (4, 14)):
        assert re.search(rf"^ +{s} +pipedream +\S+ +{seed_max} +{seed_max}$", result.stdout, re.M), result.stdout
    assert result.stdout.count("seed's claims, here:") == 1
    assert plot.read_text().count("<polyline") == 3 * 2 * 4  # a line per method, problem and S
    assert "command: " in result.stdout


def test_pipedream_reports_measured_and_simulated_ratios_to_1f1b():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/pipedream.py", *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^1f1b ratio piperc/torch: \d+\.\d+", result.stdout, re.M), result.stdout
    for kind in ("pipedream", "pipedream-2bw"):
        line = re.search(rf"^{kind}: simulated 8 slots per step \(0\.571 of 1f1b's\), bubble .*; measured "
                         rf"{kind}/1f1b by median step: (\d+\.\d+)", result.stdout, re.M)
        assert line and float(line.group(1)) > 0, result.stdout


def test_sequence_vs_torch_reports_ring_ulysses_torch_and_dp_ratios():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tiny = ["--layers", "1", "--d-model", "32", "--steps", "1", "--warmup", "1", "--batch", "4", "--seq", "32"]
    result = subprocess.run(
        [sys.executable, "benchmarks/sequence_vs_torch.py", *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for label in ("ring zigzag piperc/torch balanced", "ring contiguous piperc/torch", "ring zigzag/contiguous",
                  "causal ring/ulysses", "packed ring/ulysses", "causal ring/dp", "causal ulysses/dp"):
        ratio = re.search(rf"^{label}: (\d+\.\d+) by median step", result.stdout, re.M)
        assert ratio and float(ratio.group(1)) > 0, f"no {label} ratio in:\n{result.stdout}"
