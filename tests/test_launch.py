"""Compiled programs run under torchrun, survive no dead peer, and bad strategies
are compile-time errors naming the directive."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import piperc
from piperc.errors import StrategyError
from piperc.examples import gpt
from piperc.reference import compare, train_eager

REPO = Path(__file__).resolve().parent.parent
OPT = piperc.optim.SGD(lr=0.05, momentum=0.9)


def small_gpt():
    return gpt.make(n_layers=2)


def compile_pp2_dp2(model, inputs, schedule="1f1b"):
    return piperc.compile(
        model, inputs, mesh=piperc.Mesh(pp=2, dp=2),
        strategy=[piperc.pipeline(axis="pp", stages=2, microbatches=2, schedule=schedule),
                  piperc.data_parallel(axis="dp")],
        optimizer=OPT, keep_ir=False,
    )


def env(**extra):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    e.update({k: str(v) for k, v in extra.items()})
    return e


def test_generated_programs_are_readable_python_within_120_columns():
    model, inputs = gpt.make(n_layers=4)
    files = compile_pp2_dp2(model, inputs).files
    programs = {name: text for name, text in files.items() if name.endswith(".py")}
    assert sorted(programs) == ["rank0.py", "rank1.py", "rank2.py", "rank3.py"]
    for name, text in programs.items():
        compile(text, name, "exec")  # valid Python
        long = [line for line in text.splitlines() if len(line) > 120]
        assert not long, f"{name}: {long[0]}"
        assert '"""Stage 0, forward. Returns' in text or '"""Stage 1, forward. Returns' in text
    # Stage 1's backward is cut per block and named after it; a call with many
    # arguments is wrapped, not cut.
    assert "def s1_B_blocks_3(" in programs["rank2.py"] and "def s1_B_blocks_2(" in programs["rank2.py"]
    assert "def s0_F(p_embed_weight, input_0, p_pos_weight," in programs["rank0.py"]


@pytest.fixture(scope="module")
def saved_job(tmp_path_factory):
    """A small pp=2 x dp=2 GPT job saved once, and its example batch."""
    model, inputs = small_gpt()
    return compile_pp2_dp2(model, inputs).save(str(tmp_path_factory.mktemp("saved") / "job")), inputs


@pytest.mark.parametrize("change,message", [
    (lambda b: b[:1], "batch 1: got 1 inputs, but the model takes 2: ['input0', 'input1']"),
    (lambda b: (b[0], b[1].float()), "batch 1: input 1 (input1) has dtype float32, but the program was compiled "
                                     "for int64"),
    (lambda b: (b[0][:, :8], b[1]), "batch 1: input 0 (input0) has shape (8, 8), but the program was compiled "
                                    "for (8, 16) (a global batch; compile again for another shape)"),
    (lambda b: (b[0].tolist(), b[1]), "batch 1: input 0 (input0) is a list, not a tensor"),
])  # fmt: skip
def test_a_batch_unlike_the_compiled_one_is_refused_before_any_process_starts(saved_job, change, message):
    job, inputs = saved_job
    manifest = piperc.runtime.read_manifest(job)
    assert manifest.input_signature == (((8, 16), "int64"), ((8, 16), "int64"))
    started = time.perf_counter()
    with pytest.raises(ValueError) as e:
        piperc.runtime.launch_dir(job, [inputs, change(inputs)], timeout=60)
    assert str(e.value) == message
    assert time.perf_counter() - started < 5  # refused, not run


def test_saved_programs_run_under_torchrun(tmp_path):
    model, inputs = small_gpt()
    batches = [gpt.make(n_layers=2, seed=10 + s)[1] for s in range(3)]
    compile_pp2_dp2(model, inputs).save(tmp_path / "job")
    torch.save(batches, tmp_path / "batches.pt")
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "4", "-m", "piperc.runtime.worker",
         str(tmp_path / "job"), "--batches", str(tmp_path / "batches.pt"), "--result", str(tmp_path / "result.pt")],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    losses, state = train_eager(model, batches, OPT)
    loss_err, param_err = compare(result["losses"], result["state_dict"], losses, state)
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killing_one_rank_mid_step_ends_every_rank_with_an_error(tmp_path):
    model, inputs = small_gpt()
    compile_pp2_dp2(model, inputs).save(tmp_path / "job")
    torch.save([inputs] * 200, tmp_path / "batches.pt")
    port = free_port()
    procs = []
    for rank in range(4):
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "piperc.runtime.worker", str(tmp_path / "job"),
             "--batches", str(tmp_path / "batches.pt")],
            env=env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=4, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                    PIPERC_TIMEOUT=20),
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=log, text=True,
        ))
    try:
        assert procs[0].stdout.readline().startswith("PIPERC_STEP 0"), "training did not start"
        procs[2].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        for rank in (0, 1, 3):
            code = procs[rank].wait(timeout=60)
            assert code != 0, f"rank {rank} exited cleanly after its peer died"
        assert time.monotonic() - killed_at < 60
        errors = (tmp_path / "rank0.log").read_text() + (tmp_path / "rank3.log").read_text()
        assert re.search(r"rank \d", errors) and "Error" in errors
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- bad strategies


def test_mesh_size_different_from_world_size():
    model, inputs = small_gpt()
    with pytest.raises(StrategyError, match=r"Mesh\(pp=2, dp=2\) has 4 ranks but the world size is 8"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2, dp=2), world_size=8,
                       strategy=[piperc.pipeline(stages=2, microbatches=2), piperc.data_parallel()],
                       optimizer=OPT)


def test_an_axis_used_twice():
    model, inputs = small_gpt()
    with pytest.raises(StrategyError, match=r"data_parallel\(axis='pp'\): axis 'pp' is already used by pipeline"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2),
                       strategy=[piperc.pipeline(axis="pp", stages=2, microbatches=2),
                                 piperc.data_parallel(axis="pp")], optimizer=OPT)


def test_microbatches_that_do_not_divide_the_per_rank_batch():
    model, inputs = small_gpt()  # global batch 8 -> 4 rows per dp replica
    with pytest.raises(StrategyError, match=r"pipeline\(axis='pp', stages=2, microbatches=3.*does not split into 2 replica"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2, dp=2),
                       strategy=[piperc.pipeline(stages=2, microbatches=3), piperc.data_parallel()],
                       optimizer=OPT)


def test_more_stages_than_blocks():
    model, inputs = small_gpt()  # 2 blocks
    with pytest.raises(StrategyError, match=r"pipeline\(axis='pp', stages=4.*4 stages but the model has only 2 blocks"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=4),
                       strategy=[piperc.pipeline(stages=4, microbatches=4)], optimizer=OPT)


def test_a_schedule_that_deadlocks():
    model, inputs = small_gpt()
    table = [["0F0", "0B0", "0F1", "0B1"], ["1F1", "1B1", "1F0", "1B0"]]
    with pytest.raises(StrategyError, match=r"pipeline\(axis='pp'.*deadlock.*0B0.*1F1"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2),
                       strategy=[piperc.pipeline(stages=2, microbatches=2, schedule=table)], optimizer=OPT)


def test_a_schedule_that_misses_an_action():
    model, inputs = small_gpt()
    table = "0F0 0F1 0B0 0B1\n1F0 1B0 1F1"
    with pytest.raises(StrategyError, match=r"pipeline\(axis='pp'.*1B1.*missing"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2),
                       strategy=[piperc.pipeline(stages=2, microbatches=2, schedule=table)], optimizer=OPT)


def test_an_unknown_split_point():
    model, inputs = small_gpt()
    with pytest.raises(StrategyError, match=r"split point 'blocks.9' is not a block of the model; blocks are: blocks.0, blocks.1"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2),
                       strategy=[piperc.pipeline(stages=2, microbatches=2, split_at=["blocks.9"])], optimizer=OPT)


def test_an_axis_no_directive_uses():
    model, inputs = small_gpt()
    with pytest.raises(StrategyError, match=r"axis 'dp' \(size 2\) is used by no directive"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2, dp=2),
                       strategy=[piperc.pipeline(stages=2, microbatches=2)], optimizer=OPT)
