"""`piperc capture` and the compile-time benchmark, run as a user runs them: as processes."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from piperc.cli import main as cli_main
from piperc.examples import gpt
from piperc.ir import parse_module
from piperc.schedules import BUILTIN_SCHEDULES

ROOT = Path(__file__).resolve().parents[1]

KNOWN = ", ".join(sorted(BUILTIN_SCHEDULES))  # what an unknown schedule name is told


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
        ("examples/gpt.py:mk", "examples/gpt.py has no function 'mk' (its functions: causal_attention, document_mask, make"),
        ("examples/nope.py:make", "cannot read examples/nope.py: no such file"),
    ],
)
def test_a_target_that_does_not_exist_is_a_one_line_error(target, message):
    result = piperc("capture", target)
    assert result.returncode == 1
    assert result.stderr.startswith(f"piperc: error: {message}")
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- piperc schedule show
# `main` is called in-process here (a process costs seconds of imports); the exit status
# test runs one process as the shell does.

GPIPE_4_8 = """\
schedule gpipe: 4 devices, 4 stages, 8 microbatches

actions per device:
device 0: 0F0 0F1 0F2 0F3 0F4 0F5 0F6 0F7 0B0 0B1 0B2 0B3 0B4 0B5 0B6 0B7
device 1: 1F0 1F1 1F2 1F3 1F4 1F5 1F6 1F7 1B0 1B1 1B2 1B3 1B4 1B5 1B6 1B7
device 2: 2F0 2F1 2F2 2F3 2F4 2F5 2F6 2F7 2B0 2B1 2B2 2B3 2B4 2B5 2B6 2B7
device 3: 3F0 3F1 3F2 3F3 3F4 3F5 3F6 3F7 3B0 3B1 3B2 3B3 3B4 3B5 3B6 3B7

closed-form bubble: (p-1)/(m+p-1) = 27.3% (p=4, m=8)

idealised time slots (F=1, B=1; communication free):
time     | 0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19 20 21
device 0 | F0 F1 F2 F3 F4 F5 F6 F7 .  .  .  .  .  .  B0 B1 B2 B3 B4 B5 B6 B7
device 1 | .  F0 F1 F2 F3 F4 F5 F6 F7 .  .  .  .  B0 B1 B2 B3 B4 B5 B6 B7 .
device 2 | .  .  F0 F1 F2 F3 F4 F5 F6 F7 .  .  B0 B1 B2 B3 B4 B5 B6 B7 .  .
device 3 | .  .  .  F0 F1 F2 F3 F4 F5 F6 F7 B0 B1 B2 B3 B4 B5 B6 B7 .  .  .
gpipe: makespan 22, bubble 27.3%

peak in-flight activations (microbatches held for their backward):
device 0: 8
device 1: 8
device 2: 8
device 3: 8
"""

ONE_F_ONE_B_4_8 = """\
schedule 1f1b: 4 devices, 4 stages, 8 microbatches

actions per device:
device 0: 0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7
device 1: 1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 1B6 1B7
device 2: 2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7
device 3: 3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7

closed-form bubble: (p-1)/(m+p-1) = 27.3% (p=4, m=8)

idealised time slots (F=1, B=1; communication free):
time     | 0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19 20 21
device 0 | F0 F1 F2 F3 .  .  .  B0 F4 B1 F5 B2 F6 B3 F7 B4 .  B5 .  B6 .  B7
device 1 | .  F0 F1 F2 .  .  B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 .  B6 .  B7 .
device 2 | .  .  F0 F1 .  B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 .  B7 .  .
device 3 | .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 .  .  .
1f1b: makespan 22, bubble 27.3%

peak in-flight activations (microbatches held for their backward):
device 0: 4
device 1: 3
device 2: 2
device 3: 1
"""


@pytest.mark.parametrize(("name", "expected"), [("gpipe", GPIPE_4_8), ("1f1b", ONE_F_ONE_B_4_8)])
def test_schedule_show_prints_the_tabular_view(name, expected, capsys):
    assert cli_main(["schedule", "show", name, "--pp", "4", "--microbatches", "8"]) == 0
    assert capsys.readouterr().out == expected


def test_schedule_show_writes_the_picture(tmp_path, capsys):
    svg = tmp_path / "1f1b.svg"
    argv = ["schedule", "show", "1f1b", "--pp", "4", "--microbatches", "8", "--costs", "F=1,B=2"]
    assert cli_main([*argv, "--svg", str(svg)]) == 0
    out, err = capsys.readouterr()
    assert "idealised time slots (F=1, B=2; communication free)" in out
    assert "1f1b: makespan 33, bubble 27.3%" in out
    assert err == f"piperc: wrote {svg}\n"
    root = ET.parse(svg).getroot()
    assert root.findtext("{http://www.w3.org/2000/svg}title") == "1f1b: makespan 33, bubble 27.3%"
    boxes = root.findall(".//{http://www.w3.org/2000/svg}g/{http://www.w3.org/2000/svg}rect")
    assert len(boxes) == 4 * 8 * 2


def test_schedule_show_reads_a_user_table(tmp_path, capsys):
    table = tmp_path / "hand.txt"
    table.write_text(
        "# a 1F1B on two devices, by hand\n"
        "device 0: 0F0 0F1 0B0 0F2 0B1 0B2\n"
        "device 1: 1F0 1B0 1F1 1B1 1F2 1B2\n"
    )
    assert cli_main(["schedule", "show", str(table), "--costs", "F=1,B=2"]) == 0
    assert capsys.readouterr().out == """\
schedule hand: 2 devices, 2 stages, 3 microbatches

actions per device:
device 0: 0F0 0F1 0B0 0F2 0B1 0B2
device 1: 1F0 1B0 1F1 1B1 1F2 1B2

closed-form bubble: none

idealised time slots (F=1, B=2; communication free):
time     | 0  1  2  3  4  5  6  7  8  9  10 11
device 0 | F0 F1 .  .  B0 B0 F2 B1 B1 .  B2 B2
device 1 | .  F0 B0 B0 F1 B1 B1 F2 B2 B2 .  .
hand: makespan 12, bubble 25.0%

peak in-flight activations (microbatches held for their backward):
device 0: 2
device 1: 1
"""


def test_schedule_show_rejects_a_bad_table_naming_the_action(tmp_path, capsys):
    table = tmp_path / "short.txt"
    table.write_text("device 0: 0F0 0F1 0B0 0B1\ndevice 1: 1F0 1B0 1F1\n")
    assert cli_main(["schedule", "show", str(table)]) == 1
    assert capsys.readouterr().err == (
        "piperc: error: schedule 'short': action 1B1 is missing (stage 1 runs on device 1)\n"
    )


def test_schedule_show_checks_the_tables_sizes_against_the_options(tmp_path, capsys):
    table = tmp_path / "t.txt"
    table.write_text("0F0 0B0\n1F0 1B0\n")
    assert cli_main(["schedule", "show", str(table), "--pp", "4"]) == 1
    assert f"{table} has 2 device rows but --pp is 4" in capsys.readouterr().err
    assert cli_main(["schedule", "show", str(table), "--microbatches", "2"]) == 1
    assert "action 0F1 is missing" in capsys.readouterr().err


def test_schedule_show_unknown_name_is_a_usage_error():
    result = piperc("schedule", "show", "zb", "--pp", "4", "--microbatches", "8")
    assert result.returncode == 2
    assert result.stderr == (
        f"piperc: error: unknown schedule 'zb': neither a built-in schedule ({KNOWN}) "
        "nor a table file\n"
    )
    assert result.stdout == ""


def test_schedule_show_interleaved_runs_several_stages_per_device(capsys):
    assert cli_main(["schedule", "show", "interleaved", "--pp", "2", "--stages", "4",
                     "--microbatches", "3"]) == 0
    assert capsys.readouterr().out == """\
schedule interleaved: 2 devices, 4 stages, 3 microbatches

actions per device:
device 0: 0F0 0F1 0F2 2F0 2F1 2F2 2B0 2B1 2B2 0B0 0B1 0B2
device 1: 1F0 1F1 1F2 3F0 3B0 3F1 3B1 3F2 3B2 1B0 1B1 1B2

closed-form bubble: (p-1)/(v*m+p-1) = 14.3% (p=2, v=2, m=3)

idealised time slots (F=1, B=1; communication free):
time     | 0   1   2   3   4   5   6   7   8   9   10  11  12  13
device 0 | 0F0 0F1 0F2 2F0 2F1 2F2 2B0 .   2B1 .   2B2 0B0 0B1 0B2
device 1 | .   1F0 1F1 1F2 3F0 3B0 3F1 3B1 3F2 3B2 1B0 1B1 1B2 .
interleaved: makespan 14, bubble 14.3%

peak in-flight activations (microbatches held for their backward):
device 0: 6
device 1: 4
"""


def test_schedule_show_interleaved_with_two_rounds_shows_the_view(capsys):
    """torch's order at pp=4 x v=2 x 8 microbatches crosses gradient sends; the compiled
    programs post those receives early (`schedules.receive_plan`), so the schedule is shown."""
    argv = ["schedule", "show", "interleaved", "--pp", "4", "--stages", "8", "--microbatches", "8"]
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("schedule interleaved: 4 devices, 8 stages, 8 microbatches\n")
    assert "closed-form bubble: (p-1)/(v*m+p-1) = 15.8% (p=4, v=2, m=8)" in out
    assert out.endswith("device 0: 11\ndevice 1: 9\ndevice 2: 7\ndevice 3: 5\n")


@pytest.mark.parametrize(("argv", "message"), [
    (["interleaved", "--pp", "4", "--stages", "6", "--microbatches", "8"],
     "schedule 'interleaved': 6 stages do not divide evenly over 4 devices; stage s runs on "
     "device s % 4, so give a multiple of 4 stages, e.g. 8"),
    (["interleaved", "--pp", "4", "--stages", "8", "--microbatches", "9"],
     "schedule 'interleaved': 9 microbatches on 4 devices run in max(1, 9 // 4) = 2 rounds and "
     "do not split evenly into them (torch's ScheduleInterleaved1F1B refuses this too); "
     "use 8 or 10 microbatches"),
    (["1f1b", "--pp", "4", "--stages", "8", "--microbatches", "8"],
     "schedule '1f1b' runs one stage per device, but got 8 stages for 4 devices; use schedule "
     "'interleaved' to run several stages per device, or give 4 stages"),
])
def test_schedule_show_an_invalid_combination_is_a_usage_error(argv, message, capsys):
    assert cli_main(["schedule", "show", *argv]) == 2
    assert capsys.readouterr().err == f"piperc: error: {message}\n"


def test_schedule_show_a_builtin_needs_its_sizes(capsys):
    assert cli_main(["schedule", "show", "1f1b", "--pp", "4"]) == 2
    assert capsys.readouterr().err == (
        "piperc: error: schedule '1f1b' needs --pp and --microbatches\n"
    )


@pytest.mark.parametrize("costs", ["F=1,X=2", "B=-1", "B"])
def test_schedule_show_bad_costs_exit_2(costs, capsys):
    argv = ["schedule", "show", "gpipe", "--pp", "2", "--microbatches", "2", "--costs", costs]
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    bad = costs.split(",")[-1]
    assert capsys.readouterr().err.endswith(
        f"argument --costs: expected KIND=TIME with KIND F, B or W and TIME >= 0, got '{bad}'\n"
    )
