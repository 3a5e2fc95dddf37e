"""The runtime, run for real: worker processes over gloo executing hand-written rank
programs (tests/programs/, in the format code generation emits), compared with the
same model trained in one process with torch.optim.SGD."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from piperc.runtime import LaunchError, ManifestError, launch_dir, load, progress_bar, read_manifest
from piperc.runtime.comm import Runtime

PROGRAMS = Path(__file__).parent / "programs"
REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "piperc" / "runtime"
STEPS = 3


class TinyMLP(torch.nn.Module):
    """The model of the mlp_* programs: fc1 -> tanh -> fc2, MSE loss."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x, target):
        return torch.nn.functional.mse_loss(self.fc2(torch.tanh(self.fc1(x))), target)


def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TinyMLP().state_dict().items()}


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)) for _ in range(STEPS)]


@pytest.fixture(scope="module")
def batches():
    return make_batches()


@pytest.fixture(scope="module")
def reference(batches):
    """Losses and final parameters of TinyMLP trained in this process."""
    model = TinyMLP()
    model.load_state_dict(initial_state())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = model(x, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def program_dir(tmp_path: Path, name: str, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of tests/programs/NAME with its state.pt, as the compiler would write it."""
    target = tmp_path / name
    shutil.copytree(PROGRAMS / name, target)
    torch.save(initial_state() if state is None else state, target / "state.pt")
    return target


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_matches_reference(losses, state_dict, reference) -> None:
    ref_losses, ref_state = reference
    assert len(losses) == len(ref_losses)
    assert relative_error(torch.tensor(losses), torch.tensor(ref_losses)) < 1e-5, (
        losses,
        ref_losses,
    )
    assert list(state_dict) == list(ref_state)
    for name, expected in ref_state.items():
        assert relative_error(state_dict[name], expected) < 1e-5, name


def workers_alive(directory: Path) -> list[int]:
    """Pids of live processes that run `directory`'s programs: started from its path
    (torchrun, a shell) or, as the launcher's ranks are, writing their output into a
    launch's scratch directory."""
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            output = os.readlink(proc / "fd" / "1")
            state = next(
                li for li in (proc / "status").read_text().splitlines() if li.startswith("State")
            )
        except (OSError, StopIteration):
            continue
        ours = str(directory).encode() in cmdline or ("/piperc-launch-" in output and _descends_from_us(proc))
        if ours and "zombie" not in state:
            alive.append(int(proc.name))
    return alive


def _descends_from_us(proc: Path) -> bool:
    """Whether the process is a child of this one, or a child's child (the launcher's
    forkserver forks the ranks)."""
    for _ in range(2):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if parent == os.getpid():
            return True
        proc = Path("/proc") / str(parent)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- training matches one process


def test_pipeline_pp2_matches_single_process(tmp_path, batches, reference):
    steps = []
    result = launch_dir(
        program_dir(tmp_path, "mlp_pp2"), batches, progress=lambda i, loss: steps.append((i, loss))
    )
    assert_matches_reference(result.losses, result.state_dict, reference)
    assert steps == list(enumerate(result.losses))


def test_data_parallel_dp2_bucketed_all_reduce_matches_single_process(tmp_path, batches, reference):
    result = launch_dir(program_dir(tmp_path, "mlp_dp2"), batches)
    assert_matches_reference(result.losses, result.state_dict, reference)


def test_torchrun_runs_the_same_program_directory(tmp_path, batches, reference):
    directory = program_dir(tmp_path, "mlp_pp2")
    torch.save(batches, tmp_path / "batches.pt")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [
        str(torchrun), "--nproc-per-node", "2", "--standalone",
        "-m", "piperc.runtime.worker", str(directory),
        "--batches", str(tmp_path / "batches.pt"), "--result", str(tmp_path / "result.pt"),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line.split()[1] for line in run.stdout.splitlines() if "PIPERC_STEP" in line] == [
        "0", "1", "2",
    ]  # fmt: skip
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert_matches_reference(result["losses"], result["state_dict"], reference)


def test_every_communication_gives_the_expected_values(tmp_path):
    x = torch.arange(24.0).reshape(4, 6)
    directory = program_dir(tmp_path, "collectives", {"w": torch.ones(3)})
    result = launch_dir(directory, [(x,)])
    assert result.losses == [x.sum().item()]
    assert torch.equal(result.state_dict["w"], torch.ones(3))


def test_batched_p2p_record_stream_and_live_bytes(tmp_path):
    x = torch.arange(8.0).reshape(2, 4)
    result = launch_dir(program_dir(tmp_path, "exchange", {"w": torch.ones(1)}), [(x,), (x,)])
    assert result.losses == [x.sum().item()] * 2
    # Per rank: a 4x16 and a 16-element f32 tensor made, and the peer's two received.
    assert result.peak_live_bytes == [640, 640]


def test_training_reports_the_peak_of_live_activation_bytes(tmp_path, batches):
    result = launch_dir(program_dir(tmp_path, "mlp_dp2"), batches)
    assert len(result.peak_live_bytes) == 2 and all(p > 0 for p in result.peak_live_bytes)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("mlp_single", marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA device")),
        pytest.param("mlp_pp2", marks=pytest.mark.skipif(
            torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")),
    ],
)  # fmt: skip
def test_cuda_nccl_matches_single_process(tmp_path, batches, reference, name):
    directory = program_dir(tmp_path, name)
    manifest = directory / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"device": "cpu"', '"device": "cuda"'))
    result = launch_dir(directory, batches)
    assert_matches_reference(result.losses, result.state_dict, reference)


# ---------------------------------------------------------------- failures end every rank


def test_a_killed_rank_fails_the_launch_and_no_worker_survives(tmp_path, batches, monkeypatch):
    directory = program_dir(tmp_path, "mlp_pp2")
    monkeypatch.setenv("PIPERC_TEST_DIE_AT_STEP", "2")
    start = time.monotonic()
    # A long grace period: rank 0 must end with an error by itself, not be terminated.
    with pytest.raises(LaunchError, match="rank 1 was killed by SIGKILL") as info:
        launch_dir(directory, batches, grace=60)
    assert time.monotonic() - start < 60
    assert sorted(info.value.ranks) == [0, 1]
    assert "terminated" not in str(info.value)
    assert (
        "rank 0: batch of 1 send(s) and 1 recv(s) with ranks [1] (group pp_0) failed"
        in str(info.value)
    )
    assert workers_alive(directory) == []


def test_a_stalled_rank_ends_every_rank_on_its_own(tmp_path, batches, monkeypatch):
    # A long grace period: the launcher does not terminate anyone, so both ranks must
    # end by themselves: rank 0 by its communication timeout, rank 1 by its watchdog.
    directory = program_dir(tmp_path, "mlp_dp2")
    monkeypatch.setenv("PIPERC_TEST_STALL_AT_STEP", "1")
    monkeypatch.setenv("PIPERC_TIMEOUT", "2")
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch_dir(directory, batches, grace=60)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert sorted(info.value.ranks) == [0, 1]
    assert "terminated" not in message
    assert "rank 0: all_reduce sum of 2 tensor(s) over group dp_0 failed" in message
    assert "[rank 1] piperc watchdog: no communication completed" in message
    assert workers_alive(directory) == []


def test_the_launch_timeout_terminates_every_rank(tmp_path, batches, monkeypatch):
    directory = program_dir(tmp_path, "mlp_dp2")
    monkeypatch.setenv("PIPERC_TEST_STALL_AT_STEP", "1")  # rank 1 stalls; rank 0 waits for it
    with pytest.raises(LaunchError, match=r"did not finish within 2 s; ranks \[0, 1\]"):
        launch_dir(directory, batches, timeout=2)
    assert workers_alive(directory) == []


def test_world_size_mismatch_is_a_clear_error(tmp_path, batches, monkeypatch):
    directory = program_dir(tmp_path, "mlp_pp2")
    for name, value in dict(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(
        RuntimeError, match="compiled for world size 2, but this job has world size 3"
    ):
        load(directory)
    with pytest.raises(
        LaunchError, match="was compiled for world size 2, but this job has world size 1"
    ):
        launch_dir(directory, batches, nprocs=1)


# ---------------------------------------------------------------- the runtime needs torch alone

ISOLATED = textwrap.dedent(
    """
    import importlib.abc, os, sys

    class BlockCompiler(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("xdsl", "torch_mlir"):
                raise ImportError(f"{name} is not installed on this machine")
            return None

    sys.meta_path.insert(0, BlockCompiler())
    import torch
    import piperc.runtime

    directory, batches, result, port = sys.argv[1:]
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    with piperc.runtime.load(directory) as executor:
        losses = [executor.step(batch) for batch in torch.load(batches)]
        state = executor.state_dict()
    torch.save({"losses": losses, "state_dict": state}, result)
    loaded = [m for m in sys.modules if m.split(".")[0] in ("piperc", "xdsl", "torch_mlir")]
    try:
        import xdsl  # noqa: F401
    except ImportError:
        print(" ".join(sorted(loaded)))
    """
)


def test_runtime_runs_a_program_without_xdsl_or_torch_mlir(tmp_path, batches, reference):
    directory = program_dir(tmp_path, "mlp_single")
    torch.save(batches, tmp_path / "batches.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = [
        str(directory),
        str(tmp_path / "batches.pt"),
        str(tmp_path / "result.pt"),
        str(free_port()),
    ]
    run = subprocess.run(
        [sys.executable, "-c", ISOLATED, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = run.stdout.split()
    assert "piperc.runtime" in loaded, "the compiler blocker let xdsl through"
    assert all(m in ("piperc", "piperc.annotate") or m.startswith("piperc.runtime") for m in loaded)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert_matches_reference(result["losses"], result["state_dict"], reference)


def test_runtime_sources_import_only_torch_the_standard_library_and_each_other():
    for path in RUNTIME.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root == "torch" or root in sys.stdlib_module_names, f"{path.name}: {root}"


# ---------------------------------------------------------------- pieces, in this process


def make_runtime(dp_index: int) -> Runtime:
    return Runtime(
        rank=dp_index,
        world_size=2,
        device=torch.device("cpu"),
        coords={"dp": dp_index},
        groups={},
        timeout=1.0,
        input_names=["x", "target"],
        readable_inputs=[0],
        mesh={"dp": 2},
        input_layouts=[(("dp",), ()), (("dp",), ())],
        microbatches=2,
        state={"w": torch.zeros(3)},
    )


def test_input_is_the_microbatch_of_this_ranks_dp_shard():
    x = torch.arange(16.0).reshape(8, 2)
    rt = make_runtime(dp_index=1)
    rt._begin_step((x, x))
    assert torch.equal(rt.input(0, 0), x[4:6])
    assert torch.equal(rt.input(0, 1), x[6:8])
    with pytest.raises(
        RuntimeError,
        match=r"reads input 1 \(target\), but the manifest gives this rank only inputs \[0\]",
    ):
        rt.input(1, 0)
    rt._begin_step((x[:6], x))
    with pytest.raises(
        RuntimeError, match=r"input 0 \(x\) has 3 rows on this rank, which do not split into 2 microbatches"
    ):
        rt.input(0, 0)


def test_a_shard_holds_only_this_replicas_rows():
    x = torch.arange(16.0).reshape(8, 2)
    rt = make_runtime(dp_index=1)
    rt._begin_step((x[4:8], None), shard=True)
    assert torch.equal(rt.input(0, 0), x[4:6])
    assert torch.equal(rt.input(0, 1), x[6:8])


def test_shard_cuts_a_global_batch_to_what_a_rank_reads():
    from piperc.runtime import read_manifest, shard

    manifest = read_manifest(PROGRAMS / "mlp_pp2")
    x, y = torch.arange(16.0).reshape(8, 2), torch.arange(8.0).reshape(8, 1)
    first, last = shard(manifest, 0, (x, y)), shard(manifest, 1, (x, y))
    assert [t is None for t in first] == [i not in manifest.ranks[0].inputs for i in range(2)]
    assert [t is None for t in last] == [i not in manifest.ranks[1].inputs for i in range(2)]
    assert any(t is None for t in first + last), "a pipeline stage should not receive every input"


def test_state_names_and_shapes_are_checked():
    rt = make_runtime(dp_index=0)
    with pytest.raises(KeyError, match="owns no state named 'v'"):
        rt.state("v")
    with pytest.raises(ValueError, match=r"set_state\('w'\) with shape \(4,\)"):
        rt.set_state("w", torch.zeros(4))


def test_manifest_errors_name_the_field(tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(PROGRAMS / "mlp_pp2", directory)
    manifest = directory / "manifest.json"
    original = manifest.read_text()
    manifest.write_text(original.replace('"kind": "zeros"', '"kind": "ones"', 1))
    with pytest.raises(ManifestError, match="state 'fc1.weight.momentum_buffer' has kind 'ones'"):
        read_manifest(directory)
    manifest.write_text(original.replace('"owners": [1]', '"owners": [0]', 1))
    with pytest.raises(
        ManifestError, match="param 'fc2.weight': owner rank 0 has no 'param' state"
    ):
        read_manifest(directory)


def test_progress_bar_draws_in_place(capsys):
    on_step = progress_bar(2, width=4)
    on_step(0, 1.5)
    on_step(1, 0.25)
    assert capsys.readouterr().err == "\rstep 1/2 [##  ] loss 1.5\rstep 2/2 [####] loss 0.25\n"
