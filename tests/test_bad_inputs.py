"""A corpus of bad inputs: each is refused with one clear error, before any work is wasted.

One table per surface: `piperc.compile`, `piperc.launch`, the saved-job loader
(`read_manifest`, `piperc.runtime.load`, the worker process), the `piperc` CLI and the
`piperc-opt` CLI. A row is an id, what to run, the error class (or exit status) and a
regex of the message's key words. A CLI row also checks that stderr holds one error line
and no Python traceback.

Nothing here trains: compile rows fail in argument checking or on one tiny model, launch
rows in the batch checks (starting a process fails the test), loader rows before or right
after joining a one-rank process group made in memory. CLI rows, the worker's among them,
call `main(argv)` in process; one process per installed command (`piperc`, `piperc-opt`)
shows it answers the same way.
"""

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import piperc
from piperc import cli, opt
from piperc.errors import CaptureError, StrategyError
from piperc.runtime import ManifestError, read_manifest, worker
from piperc.schedules import BUILTIN_SCHEDULES

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = REPO / "tests" / "programs"
TWO_LAYER = "tests/ir/two_layer.mlir"

KNOWN = ", ".join(sorted(BUILTIN_SCHEDULES))  # what an unknown schedule name is told


class Tiny(nn.Module):
    """forward(x, y) -> the mean squared error of a two-layer MLP's output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x, y):
        return F.mse_loss(self.out(torch.relu(self.lin(x))), y)


class ReturnsLogits(Tiny):
    def forward(self, x, y):
        return self.out(self.lin(x))


class UpdatesItsWeight(Tiny):
    def forward(self, x, y):
        with torch.no_grad():
            self.lin.weight.mul_(0.5)
        return super().forward(x, y)


X, Y = torch.randn(8, 4), torch.randn(8, 4)
SGD = piperc.optim.SGD(lr=0.1)


def table(rows):
    """pytest params named by each row's first field."""
    return [pytest.param(*values, id=name) for name, *values in rows]


# ---------------------------------------------------------------- piperc.compile


def compiling(model=None, inputs=None, **options):
    """A call of piperc.compile: Tiny on (X, Y), dp=2, SGD, but for what `options` change."""
    options = {"mesh": piperc.Mesh(dp=2), "strategy": [piperc.data_parallel()], "optimizer": SGD,
               "keep_ir": False, **options}
    return lambda: piperc.compile(Tiny() if model is None else model, (X, Y) if inputs is None else inputs,
                                  **options)


def pipelined(**pipeline):
    """compiling(...) on a pp=2 mesh with piperc.pipeline(**pipeline)."""
    return lambda: compiling(mesh=piperc.Mesh(pp=2), strategy=[piperc.pipeline(**pipeline)])()


COMPILE = [
    # the model and its example inputs
    ("model-is-a-function", compiling(model=lambda x, y: x.sum()), CaptureError,
     r"model must be a torch\.nn\.Module, got function"),
    ("model-is-a-class", compiling(model=Tiny), CaptureError, r"model must be a torch\.nn\.Module, got type"),
    ("inputs-a-dict", compiling(inputs={"x": X, "y": Y}), CaptureError,
     r"example_inputs must be a non-empty tuple of tensors"),
    ("inputs-a-tensor", compiling(inputs=X), CaptureError, r"example_inputs must be a non-empty tuple of tensors"),
    ("inputs-empty", compiling(inputs=()), CaptureError, r"example_inputs must be a non-empty tuple"),
    ("input-an-int", compiling(inputs=(X, 3)), CaptureError, r"example input 1 is a int, not a tensor"),
    ("input-requires-grad", compiling(inputs=(X.clone().requires_grad_(), Y)), CaptureError,
     r"example input 0 requires grad.*x\.detach\(\)"),
    ("input-int64-for-fp32", compiling(inputs=(X.long(), Y)), CaptureError,
     r"Tiny\.forward fails on the example inputs, run eagerly.*int64\[4, 4\].*same dtype.*\n  at .*in forward"),
    ("input-bf16-for-fp32", compiling(inputs=(X.bfloat16(), Y)), CaptureError,
     r"run eagerly on one microbatch \(bfloat16\[4, 4\], float32\[4, 4\]\).*BFloat16 and Float"),
    ("input-wrong-width", compiling(inputs=(torch.randn(8, 5), Y)), CaptureError,
     r"fails on the example inputs.*shapes cannot be multiplied"),
    ("too-few-inputs", compiling(inputs=(X,)), CaptureError, r"missing 1 required positional argument: 'y'"),
    ("inputs-of-two-batch-sizes", compiling(inputs=(X, Y[:6])), StrategyError,
     r"example input 1 does not share the batch dimension 0 of size 8"),
    ("input-a-scalar", compiling(inputs=(X, torch.tensor(1.0))), StrategyError,
     r"example input 1 does not share the batch dimension"),
    ("batch-does-not-split", compiling(inputs=(X[:6], Y[:6]), mesh=piperc.Mesh(dp=4)), StrategyError,
     r"global batch of 6 rows does not split into 4 replica\(s\) x 1 microbatch"),
    ("returns-logits", compiling(model=ReturnsLogits()), CaptureError, r"must return a scalar floating-point loss"),
    ("updates-a-parameter-in-place", compiling(model=UpdatesItsWeight()), CaptureError,
     r"updates parameter 'lin\.weight' in place"),
    # the mesh, the strategy and the device
    ("mesh-a-dict", compiling(mesh={"dp": 2}), StrategyError, r"mesh must be a piperc\.Mesh, got dict"),
    ("mesh-without-axes", lambda: piperc.Mesh(), StrategyError, r"Mesh\(\) needs at least one axis"),
    ("mesh-axis-of-size-0", lambda: piperc.Mesh(dp=0), StrategyError, r"axis 'dp' must have an int size >= 1, got 0"),
    ("mesh-axis-a-float", lambda: piperc.Mesh(dp=2.0), StrategyError, r"axis 'dp' must have an int size >= 1, got 2\.0"),
    ("strategy-not-a-list", compiling(strategy=piperc.data_parallel()), StrategyError,
     r"strategy must be a list of directives"),
    ("strategy-holds-a-str", compiling(strategy=["dp"]), StrategyError, r"unknown directive 'dp'"),
    ("axis-not-in-mesh", compiling(strategy=[piperc.data_parallel(axis="data")]), StrategyError,
     r"data_parallel\(axis='data'\): axis 'data' is not in Mesh\(dp=2\)"),
    ("axis-no-directive-uses", compiling(mesh=piperc.Mesh(dp=2, tp=2)), StrategyError,
     r"axis 'tp' \(size 2\) is used by no directive"),
    ("world-size-differs", compiling(world_size=8), StrategyError, r"Mesh\(dp=2\) has 2 ranks but the world size is 8"),
    ("world-size-a-str", compiling(world_size="2"), StrategyError, r"has 2 ranks but the world size is '2'"),
    ("device-gpu", compiling(device="gpu"), StrategyError, r"device must be 'cpu' or 'cuda', got 'gpu'"),
    # directives
    ("microbatches-a-str", pipelined(stages=2, microbatches="2"), StrategyError,
     r"pipeline\(axis='pp'.*microbatches must be an int >= 1, got '2'"),
    ("stages-a-float", pipelined(stages=2.0, microbatches=2), StrategyError, r"stages must be an int >= 1, got 2\.0"),
    ("microbatches-0", pipelined(stages=2, microbatches=0), StrategyError, r"microbatches must be an int >= 1, got 0"),
    ("stages-unlike-the-axis", pipelined(stages=3, microbatches=2), StrategyError,
     r"3 stages on axis 'pp' of size 2; each device holds the same number of stages, so stages must be a "
     r"multiple of 2"),
    ("unknown-schedule", pipelined(stages=2, microbatches=2, schedule="zigzag"), StrategyError,
     rf"unknown schedule 'zigzag'; use a built-in \({KNOWN}\) or a table"),
    ("schedule-an-int", pipelined(stages=2, microbatches=2, schedule=1), StrategyError,
     r"schedule must be a name .* or a table"),
    ("split-at-an-int", pipelined(stages=2, microbatches=2, split_at=[1]), StrategyError,
     r"split_at must be module paths"),
    ("zero-4", compiling(strategy=[piperc.data_parallel(zero=4)]), StrategyError, r"zero must be 0, 1, 2 or 3, got 4"),
    ("reshard-without-zero-3", compiling(strategy=[piperc.data_parallel(zero=2, reshard_after_forward=False)]),
     StrategyError, r"reshard_after_forward applies to zero=3"),
    ("bucket-of-0-mib", compiling(strategy=[piperc.data_parallel(bucket_mb=0)]), StrategyError,
     r"bucket_mb must be a number of MiB > 0, got 0"),
    ("tp-plan-empty", compiling(mesh=piperc.Mesh(tp=2), strategy=[piperc.tensor_parallel()]), StrategyError,
     r"the plan is empty"),
    ("tp-plan-a-list", lambda: piperc.tensor_parallel(plan=["lin.weight"]), StrategyError,
     r"plan must map parameter globs to placements"),
    ("tp-plan-matches-nothing",
     compiling(mesh=piperc.Mesh(tp=2), strategy=[piperc.tensor_parallel(plan={"nosuch.*": piperc.Shard(0)})]),
     StrategyError, r"plan entry 'nosuch\.\*' matches no parameter of the model.*'lin\.weight'"),
    # the optimizer
    ("optimizer-in-the-strategy-too", compiling(strategy=[piperc.data_parallel(), piperc.optim.AdamW()]),
     StrategyError, r"only one optimizer is allowed; pass it as optimizer="),
    ("optimizer-from-torch", compiling(optimizer=torch.optim.SGD), StrategyError,
     r"optimizer must be piperc\.optim\.SGD or piperc\.optim\.AdamW"),
    ("adamw-lr-nan", compiling(optimizer=piperc.optim.AdamW(lr=float("nan"))), StrategyError,
     r"AdamW\(lr=nan.*invalid lr nan; torch\.optim requires >= 0"),
    ("adamw-beta-1.5", compiling(optimizer=piperc.optim.AdamW(betas=(1.5, 0.999))), StrategyError,
     r"invalid betas\[0\] 1\.5; torch\.optim requires 0 <= beta < 1"),
    ("sgd-lr-a-str", compiling(optimizer=piperc.optim.SGD(lr="0.1")), StrategyError, r"lr must be a number, got '0\.1'"),
    ("seed-a-str", compiling(seed="0"), StrategyError, r"compile: seed must be a whole number >= 0, got '0'"),
    ("seed-negative", compiling(seed=-1), StrategyError, r"seed must be a whole number >= 0, got -1"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, words", table(COMPILE))
def test_compile_refuses(call, error, words):
    with pytest.raises(error) as e:
        call()
    assert type(e.value) is error
    assert re.search(words, str(e.value)), str(e.value)


def test_a_frozen_parameter_compiles_without_optimizer_state():
    model = Tiny()
    model.lin.weight.requires_grad_(False)
    compiled = compiling(model=model, optimizer=piperc.optim.AdamW())()
    state = {s["name"] for s in json.loads(compiled.files["manifest.json"])["ranks"][0]["state"]}
    assert {"lin.weight", "lin.bias.exp_avg"} <= state and "lin.weight.exp_avg" not in state


class Drops(Tiny):
    def forward(self, x, y):
        return F.dropout(super().forward(x, y), 0.5)


class CountsCalls(Tiny):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, y):
        self.calls += 1
        return super().forward(x, y)


def test_the_eager_run_leaves_the_random_state_and_the_buffers_as_they_were():
    call = compiling(model=Drops())
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    call()
    assert torch.equal(torch.rand(3), expected)
    model = CountsCalls()
    compiled = compiling(model=model)()
    assert model.calls.item() == 0
    # A counter the forward bumps is a buffer the step updates (tests/test_buffers.py).
    assert 'rt.set_state("calls"' in compiled.files["rank0.py"]


# ---------------------------------------------------------------- piperc.launch


@pytest.fixture(scope="module")
def compiled():
    """Tiny compiled for one rank, on (X, Y)."""
    return compiling(mesh=piperc.Mesh(dp=1))()


LAUNCH = [
    ("not-a-compiled-job", lambda c: piperc.launch(Tiny(), [(X, Y)]), TypeError,
     r"compiled must be what piperc\.compile returns, got Tiny"),
    ("no-batches", lambda c: piperc.launch(c, []), ValueError, r"batches must be a non-empty list of global batches"),
    ("batches-none", lambda c: piperc.launch(c, None), ValueError, r"non-empty list of global batches"),
    ("one-batch-not-a-list", lambda c: piperc.launch(c, (X, Y)), ValueError,
     r"batches holds tensors, not batches.*pass \[\(x, y\)\]"),
    ("too-few-inputs", lambda c: piperc.launch(c, [(X, Y), (X,)]), ValueError,
     r"batch 1: got 1 inputs, but the model takes 2: \['input0', 'input1'\]"),
    ("a-batch-is-a-dict", lambda c: piperc.launch(c, [{"x": X, "y": Y}]), ValueError,
     r"batch 0: got a dict, but the model takes 2"),
    ("float64-for-float32", lambda c: piperc.launch(c, [(X, Y), (X.double(), Y)]), ValueError,
     r"batch 1: input 0 \(input0\) has dtype float64, but the program was compiled for float32"),
    ("int64-for-float32", lambda c: piperc.launch(c, [(X, Y.long())]), ValueError,
     r"input 1 \(input1\) has dtype int64, but the program was compiled for float32"),
    ("another-batch-size", lambda c: piperc.launch(c, [(X[:6], Y[:6])]), ValueError,
     r"input 0 \(input0\) has shape \(6, 4\), but the program was compiled for \(8, 4\)"),
    ("a-list-for-a-tensor", lambda c: piperc.launch(c, [(X, Y.tolist())]), ValueError,
     r"input 1 \(input1\) is a list, not a tensor"),
    ("checkpoint-every-negative", lambda c: piperc.launch(c, [(X, Y)], checkpoint_dir="ckpt", checkpoint_every=-1),
     ValueError, r"checkpoint_every must be a whole number >= 0, got -1"),
    ("resume-without-a-directory", lambda c: piperc.launch(c, [(X, Y)], resume=True), ValueError,
     r"checkpoint_every and resume need a checkpoint_dir"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, words", table(LAUNCH))
def test_launch_refuses_before_any_process_starts(call, error, words, compiled, monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("launch started a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(error) as e:
        call(compiled)
    assert type(e.value) is error
    assert re.search(words, str(e.value)), str(e.value)


# ---------------------------------------------------------------- the saved-job loader


@pytest.fixture(scope="module")
def job(compiled, tmp_path_factory):
    """`compiled`, saved: manifest.json, rank0.py, state.pt."""
    return Path(compiled.save(str(tmp_path_factory.mktemp("saved") / "job")))


def broken(manifest=None, write=None, remove=None):
    """A copy of the saved job with `manifest(dict)` applied to manifest.json, `write` =
    (file, text or object to torch.save) written and `remove` deleted."""

    def make(job: Path, tmp_path: Path) -> Path:
        path = tmp_path / "job"
        shutil.copytree(job, path)
        if manifest is not None:
            data = json.loads((path / "manifest.json").read_text())
            manifest(data)
            (path / "manifest.json").write_text(json.dumps(data))
        if write is not None:
            name, content = write
            if isinstance(content, str):
                (path / name).write_text(content)
            else:
                torch.save(content, path / name)
        if remove is not None:
            (path / remove).unlink()
        return path

    return make


def in_a_world_of_one(path):
    """piperc.runtime.load(path) in a one-rank gloo process group made here, in memory."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        piperc.runtime.load(path)
    finally:
        dist.destroy_process_group()


def first_state(m):
    return m["ranks"][0]["state"][0]


LOADER = [
    ("no-directory", lambda job, tmp: tmp / "nowhere", read_manifest, ManifestError,
     r"nowhere/manifest\.json: no manifest here; is .* a compiled program directory"),
    ("not-json", broken(write=("manifest.json", "{format: 3")), read_manifest, ManifestError, r"not valid JSON"),
    ("json-but-a-list", broken(write=("manifest.json", "[3]")), read_manifest, ManifestError,
     r"must be a JSON object"),
    ("format-2", broken(lambda m: m.update(format=2)), read_manifest, ManifestError,
     r"format 2 is not supported \(this runtime reads format 3\)"),
    ("no-world-size", broken(lambda m: m.pop("world_size")), read_manifest, ManifestError,
     r"missing field 'world_size'"),
    ("world-size-a-word", broken(lambda m: m.update(world_size="one")), read_manifest, ManifestError,
     r"malformed field: invalid literal for int\(\).*'one'"),
    ("mesh-unlike-world", broken(lambda m: m.update(world_size=4)), read_manifest, ManifestError,
     r"mesh \{'pp': 1, 'dp': 1\} has 1 devices, world_size is 4"),
    ("device-tpu", broken(lambda m: m.update(device="tpu")), read_manifest, ManifestError,
     r"device 'tpu' is not supported; use 'cpu' or 'cuda'"),
    ("microbatches-0", broken(lambda m: m.update(microbatches=0)), read_manifest, ManifestError,
     r"world_size and microbatches must be >= 1"),
    ("ranks-out-of-order", broken(lambda m: m["ranks"][0].update(rank=1)), read_manifest, ManifestError,
     r"'ranks' must list ranks 0\.\.0 in order, got \[1\]"),
    ("state-of-unknown-kind", broken(lambda m: first_state(m).update(kind="ones")), read_manifest, ManifestError,
     r"state 'lin\.weight' has kind 'ones'; expected one of"),
    ("owner-not-a-rank", broken(lambda m: m["params"]["lin.bias"].update(owners=[3])), read_manifest,
     ManifestError, r"param 'lin\.bias': owner 3 is not a rank"),
    ("owner-without-the-param", broken(lambda m: m["ranks"][0]["state"].pop(1)), read_manifest, ManifestError,
     r"param 'lin\.bias': owner rank 0 has no 'param' state entry"),
    ("coords-miss-an-axis", broken(lambda m: m["ranks"][0].update(coords={"pp": 0})), read_manifest, ManifestError,
     r"rank 0: coords \{'pp': 0\} must name the mesh axes \['pp', 'dp'\]"),
    ("layout-on-an-unknown-axis", broken(lambda m: m["inputs"][0].update(layout=[["tp"], []])), read_manifest,
     ManifestError, r"input 'input0': layout names axes \['tp'\] that the mesh .* lacks"),
    ("group-beyond-the-world", broken(lambda m: m["groups"].append(["g", [0, 5]])), read_manifest, ManifestError,
     r"group 'g' has ranks \[0, 5\] outside 0\.\.0"),
    ("outside-torchrun", lambda job, tmp: job, piperc.runtime.load, RuntimeError,
     r"cannot join torch\.distributed: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set; start the program "
     r"with torchrun \(--nproc-per-node 1\)"),
    ("world-of-another-size", lambda job, tmp: PROGRAMS / "mlp_dp2", in_a_world_of_one, RuntimeError,
     r"compiled for world size 2, but this job has world size 1; start it with 2 processes"),
    ("rank-program-missing", broken(remove="rank0.py"), in_a_world_of_one, FileNotFoundError,
     r"rank0\.py: rank 0's program is missing"),
    ("rank-program-without-step", broken(write=("rank0.py", "STEP = None\n")), in_a_world_of_one, AttributeError,
     r"rank0\.py: a rank program must define `def step\(rt\):`"),
    ("rank-program-not-python", broken(write=("rank0.py", "def step(rt:\n")), in_a_world_of_one, SyntaxError,
     r"\(rank0\.py, line 1\)"),
    ("state-missing", broken(remove="state.pt"), in_a_world_of_one, FileNotFoundError,
     r"state\.pt: the initial parameters \(state\.pt\) are missing"),
    ("state-without-a-parameter", broken(write=("state.pt", {})), in_a_world_of_one, KeyError,
     r"rank 0 state 'lin\.weight' \(param\) needs the parameter 'lin\.weight', which state\.pt does not hold"),
    ("state-not-a-torch-file", broken(write=("state.pt", "not a tensor file")), in_a_world_of_one,
     ValueError, r"state\.pt: not a state file torch\.load can read"),
]  # fmt: skip


@pytest.mark.parametrize("make_dir, read, error, words", table(LOADER))
def test_the_loader_refuses_a_broken_job(make_dir, read, error, words, job, tmp_path):
    with pytest.raises(error) as e:
        read(make_dir(job, tmp_path))
    assert type(e.value) is error
    assert re.search(words, str(e.value)), str(e.value)


@pytest.fixture
def worker_main(monkeypatch, capsys):
    """Runs the worker's main(argv) in this process: its exit raises SystemExit instead of
    ending the process; returns (status, stderr). The worker sets torch's thread count."""

    def exit_here(status, message):
        sys.stderr.write(message)
        raise SystemExit(status)

    monkeypatch.setattr(worker, "_exit", exit_here)
    threads = torch.get_num_threads()

    def run(argv):
        with pytest.raises(SystemExit) as e:
            worker.main([str(a) for a in argv])
        return e.value.code, capsys.readouterr().err

    yield run
    torch.set_num_threads(threads)


BATCHES = "{tmp}/batches.pt"
WORKER = [
    ("broken-manifest", broken(lambda m: m.update(format=2)), ["--batches", BATCHES], 1,
     r"format 2 is not supported"),
    ("no-batches-file", lambda job, tmp: job, ["--batches", "{tmp}/missing.pt"], 1, r"missing\.pt"),
    ("no-batches-option", lambda job, tmp: job, [], 2, r"the following arguments are required: --batches"),
    ("resume-without-a-directory", lambda job, tmp: job, ["--batches", BATCHES, "--resume"], 2,
     r"--checkpoint-every and --resume need --checkpoint-dir"),
    ("checkpoint-every-negative", lambda job, tmp: job,
     ["--batches", BATCHES, "--checkpoint-dir", "{tmp}", "--checkpoint-every", "-1"], 2,
     r"--checkpoint-every must be >= 0, got -1"),
]  # fmt: skip


@pytest.mark.parametrize("make_dir, options, status, words", table(WORKER))
def test_the_worker_refuses_a_broken_job_in_one_line(make_dir, options, status, words, job, tmp_path, worker_main):
    torch.save([(X, Y)], tmp_path / "batches.pt")
    code, err = worker_main([make_dir(job, tmp_path), *(o.replace("{tmp}", str(tmp_path)) for o in options)])
    assert code == status
    # argparse's usage lines come before its error line; any other error is one line.
    assert_one_error_line(err, "python -m piperc.runtime.worker: error:" if status == 2 else "")
    assert re.search(words, err), err


# ---------------------------------------------------------------- the CLIs


def assert_one_error_line(err: str, prefix: str) -> None:
    """stderr holds no traceback and exactly one line that starts with `prefix` (argparse's
    usage lines and a diagnostic's context lines may surround it; "" counts every line)."""
    assert "Traceback" not in err, err
    assert sum(line.startswith(prefix) for line in err.splitlines()) == 1, err


def run_main(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a CLI's main(argv), whether it returns or exits."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Model files and tables for the CLI rows in tmp_path; the working directory is the repository."""
    monkeypatch.chdir(REPO)
    for name, text in {
        "syntax.py": "def make(:\n",
        "raises.py": "def make():\n    raise ValueError('boom')\n",
        "number.py": "def make():\n    return 3\n",
        "logits.py": "import torch\nfrom torch import nn\n\n\ndef make():\n"
                     "    return nn.Linear(4, 3), (torch.ones(2, 4),)\n",
        "dead.table": "0F0 0B0 0F1 0B1\n1F1 1B1 1F0 1B0\n",
        "two.table": "0F0 0B0\n1F0 1B0\n",
        "bad.mlir": 'func.func @main() {\n  %0 = "torch.constant.int"( <{value = 2 : i64}> : () -> !torch.int\n'
                    "  func.return\n}\n",
        "unverified.mlir": 'func.func @main(%arg0: !torch.vtensor<[4],f32>) {\n  %0 = "torch.aten.relu"(%arg0, '
                           "%arg0) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>\n"
                           "  func.return\n}\n",
        "a-file": "",
    }.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    torch.save({"x": X}, tmp_path / "dict.pt")
    return tmp_path


GPT = "examples/gpt.py:make"
VERIFY = ["verify", GPT, "--set", "n_layers=2"]
PIPERC = [
    ("no-command", [], 2, r"the following arguments are required: COMMAND"),
    ("unknown-command", ["compile"], 2, r"invalid choice: 'compile'"),
    ("target-without-a-function", ["capture", "gpt"], 1, r"TARGET must be FILE\.py:FUNC or package\.module:FUNC"),
    ("target-file-missing", ["capture", "{tmp}/nope.py:make"], 1, r"cannot read .*nope\.py: no such file"),
    ("target-function-missing", ["capture", "examples/gpt.py:mk"], 1,
     r"examples/gpt\.py has no function 'mk' \(its functions: causal_attention, document_mask, make"),
    ("target-module-missing", ["capture", "nosuch.models:make"], 1, r"cannot import nosuch\.models: No module named"),
    ("target-file-not-python", ["capture", "{tmp}/syntax.py:make"], 1,
     r"cannot import .*syntax\.py: SyntaxError: .*\(syntax\.py, line 1\)"),
    ("target-raises", ["capture", "{tmp}/raises.py:make"], 1,
     r"make\(\) failed: ValueError: boom\n  at .*raises\.py:2 in make"),
    ("target-returns-a-number", ["capture", "{tmp}/number.py:make"], 1,
     r"make must return \(model, example_inputs\), got int"),
    ("set-an-unknown-argument", ["capture", GPT, "--set", "n_layerz=1"], 1,
     r"cannot call make with --set n_layerz=1: got an unexpected keyword argument 'n_layerz'"),
    ("set-a-size-the-model-refuses", ["capture", GPT, "--set", "d_model=30"], 1,
     r"make\(d_model=30\) failed: ValueError: d_model=30 is not divisible by n_heads=4\n  at .*gpt\.py"),
    ("set-without-a-value", ["capture", GPT, "--set", "n_layers"], 2, r"--set: expected KEY=VALUE, got 'n_layers'"),
    ("dump-dir-a-file", ["capture", GPT, "--dump-dir", "{tmp}/a-file"], 2, r"--dump-dir .*a-file is a file"),
    ("unknown-pass", ["capture", GPT, "-p", "fold-detach,nosuch"], 1, r"unknown pass 'nosuch' in pipeline"),
    ("model-returns-logits", ["capture", "{tmp}/logits.py:make"], 1, r"must return a scalar floating-point loss"),
    ("schedule-unknown", ["schedule", "show", "zigzag"], 2,
     rf"unknown schedule 'zigzag': neither a built-in schedule \({KNOWN}\) nor a table file"),
    ("schedule-without-sizes", ["schedule", "show", "1f1b"], 2, r"schedule '1f1b' needs --pp and --microbatches"),
    ("schedule-of-0-stages", ["schedule", "show", "gpipe", "--pp", "0", "--microbatches", "2"], 2,
     r"a schedule needs at least one stage and one microbatch, got 0 stages"),
    ("costs-of-an-unknown-kind", ["schedule", "show", "1f1b", "--pp", "2", "--microbatches", "2", "--costs", "X=1"],
     2, r"--costs: expected KIND=TIME with KIND F, B or W"),
    ("table-that-deadlocks", ["schedule", "show", "{tmp}/dead.table"], 1,
     r"schedule 'dead': deadlock: device 0 waits at 0B0 for 1B0 on device 1"),
    ("table-not-text", ["schedule", "show", "{tmp}/binary"], 1, r"cannot read .*binary: not UTF-8 text \(byte 0\)"),
    ("table-rows-unlike-pp", ["schedule", "show", "{tmp}/two.table", "--pp", "3"], 1,
     r"two\.table has 2 device rows but --pp is 3"),
    ("svg-into-a-directory", ["schedule", "show", "1f1b", "--pp", "2", "--microbatches", "2", "--svg", "{tmp}"], 1,
     r"piperc: error: .*: Is a directory"),
    ("verify-without-a-mesh", VERIFY, 2, r"the following arguments are required: --mesh"),
    ("verify-mesh-size-a-word", [*VERIFY, "--mesh", "pp=two"], 1, r"axis 'pp' must have an int size >= 1, got 'two'"),
    ("verify-unknown-optimizer", [*VERIFY, "--mesh", "dp=2", "--dp", "--optimizer", "lion"], 2,
     r"--optimizer: unknown kind 'lion' \(known: sgd, adamw\)"),
    ("verify-sgd-without-lr", [*VERIFY, "--mesh", "dp=2", "--dp", "--optimizer", "sgd:momentum=0.9"], 2,
     r"--optimizer momentum=0\.9: .*missing 1 required positional argument: 'lr'"),
    ("verify-negative-lr", [*VERIFY, "--mesh", "dp=2", "--dp", "--optimizer", "sgd:lr=-1"], 1,
     r"invalid lr -1; torch\.optim requires >= 0"),
    ("verify-unknown-pipeline-option", [*VERIFY, "--mesh", "pp=2", "--pipeline", "stages=2,depth=1"], 2,
     r"--pipeline stages=2 depth=1: .*unexpected keyword argument 'depth'"),
    ("verify-microbatches-a-word", [*VERIFY, "--mesh", "pp=2", "--pipeline", "microbatches=four"], 1,
     r"microbatches must be an int >= 1, got 'four'"),
    ("verify-dp-off-the-mesh", [*VERIFY, "--mesh", "pp=2", "--dp"], 1, r"axis 'dp' is not in Mesh\(pp=2\)"),
    ("verify-zero-5", [*VERIFY, "--mesh", "dp=2", "--dp", "zero=5"], 1, r"zero must be 0, 1, 2 or 3, got 5"),
    ("verify-ep-unknown-option", [*VERIFY, "--mesh", "dp=2", "--dp", "--ep", "experts=2"], 2,
     r"--ep experts=2: .*unexpected keyword argument 'experts'"),
    ("verify-ep-on-a-model-without-moe", [*VERIFY, "--mesh", "dp=2", "--dp", "--ep"], 1,
     r"expert_parallel\(axis='dp'\): the model has no MoE layer"),
    ("verify-0-steps", [*VERIFY, "--mesh", "dp=2", "--dp", "--steps", "0"], 2, r"--steps must be at least 1, got 0"),
    ("verify-batches-missing", [*VERIFY, "--mesh", "dp=2", "--dp", "--batches", "{tmp}/nope.pt"], 1,
     r"cannot read .*nope\.pt: no such file"),
    ("verify-batches-not-torch", [*VERIFY, "--mesh", "dp=2", "--dp", "--batches", "{tmp}/two.table"], 1,
     r"cannot read .*two\.table: torch\.load fails \(UnpicklingError\)"),
    ("verify-batches-a-dict", [*VERIFY, "--mesh", "dp=2", "--dp", "--batches", "{tmp}/dict.pt"], 1,
     r"dict\.pt holds a dict, not a non-empty list of global batches"),
]  # fmt: skip


@pytest.mark.parametrize("argv, status, words", table(PIPERC))
def test_piperc_refuses_in_one_line(argv, status, words, files, capsys):
    code, err = run_main(cli.main, [a.replace("{tmp}", str(files)) for a in argv], capsys)
    assert code == status, err
    assert_one_error_line(err, "piperc")
    assert re.search(words, err), err


PIPERC_OPT = [
    ("input-missing", ["{tmp}/nope.mlir"], 1, r"piperc-opt: cannot read .*nope\.mlir: No such file or directory"),
    ("input-a-directory", ["{tmp}"], 1, r"cannot read .*: Is a directory"),
    ("input-not-text", ["{tmp}/binary"], 1, r"cannot read .*binary: not UTF-8 text \(byte 0\)"),
    ("input-does-not-parse", ["{tmp}/bad.mlir", "-p", "cse"], 1, r"bad\.mlir:2:\d+(.|\n)*operand expected"),
    ("input-does-not-verify", ["{tmp}/unverified.mlir", "-p", "cse"], 1,
     r"IR after the input does not verify: torch\.aten\.relu takes 1 operands"),
    ("unknown-pass", [TWO_LAYER, "-p", "fold-detach,nosuch"], 1, r"unknown pass 'nosuch' in pipeline .* \(known: "),
    ("pipeline-does-not-parse", [TWO_LAYER, "-p", "fold-detach{"], 1, r"cannot parse pipeline 'fold-detach\{'"),
    ("unknown-pass-option", [TWO_LAYER, "-p", "fold-detach{depth=1}"], 1, r"bad options for pass 'fold-detach'"),
    ("print-after-an-unknown-pass", [TWO_LAYER, "-p", "cse", "--print-ir-after=unknown"], 1,
     r"--print-ir-after=unknown: the pipeline 'cse' has no pass 'unknown' \(its passes: cse\)"),
    ("print-before-a-pass-not-run", [TWO_LAYER, "-p", "cse", "--print-ir-before", "fold-detach"], 1,
     r"--print-ir-before=fold-detach: the pipeline 'cse' has no pass 'fold-detach'"),
    ("dump-dir-a-file", [TWO_LAYER, "-p", "cse", "--dump-dir", "{tmp}/a-file"], 1,
     r"--dump-dir .*a-file is a file; give a directory"),
    ("output-a-directory", [TWO_LAYER, "-p", "cse", "-o", "{tmp}"], 1, r"piperc-opt: cannot write .*: Is a directory"),
    ("output-in-a-missing-directory", [TWO_LAYER, "-o", "{tmp}/nowhere/out.mlir"], 1,
     r"cannot write .*nowhere/out\.mlir: No such file or directory"),
    ("stages-before-a-split", [TWO_LAYER, "-p", "outline-stages"], 1,
     r"pass 'outline-stages' failed: StrategyError: outline-stages: run pipeline-split first"),
    ("lowering-without-a-mesh", [TWO_LAYER, "-p", "lower-to-exec"], 1,
     r"pass 'lower-to-exec' failed: .*no device mesh is declared; run the mesh pass first"),
    ("mesh-of-size-0", [TWO_LAYER, "-p", 'mesh{shape="dp=0"}'], 1, r"mesh: 'dp=0' is not an axis; write name=size"),
    ("split-into-0-stages", [TWO_LAYER, "-p", "pipeline-split{stages=0}"], 1,
     r"pipeline-split: stages must be >= 1, got 0"),
    ("expand-without-a-schedule", [TWO_LAYER, "-p", "expand-schedule"], 1,
     r"no pipeline schedule; run the schedule pass first"),
    ("unknown-flag", [TWO_LAYER, "--print-ir-after-each"], 2, r"unrecognized arguments: --print-ir-after-each"),
]  # fmt: skip


@pytest.mark.parametrize("argv, status, words", table(PIPERC_OPT))
def test_piperc_opt_refuses_in_one_line(argv, status, words, files, capsys):
    code, err = run_main(opt.main, [a.replace("{tmp}", str(files)) for a in argv], capsys)
    assert code == status, err
    assert_one_error_line(err, "piperc-opt")
    assert re.search(words, err), err


def test_piperc_opt_names_stdin_when_it_does_not_parse(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO('"func.func"() ({\n'))
    code, err = run_main(opt.main, ["-", "-p", "cse"], capsys)
    assert code == 1
    assert_one_error_line(err, "piperc-opt")
    assert re.search(r"<stdin>:\d+:\d+", err), err


# ---------------------------------------------------------------- the installed commands, as processes


def command(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)


@pytest.mark.parametrize("name, argv, status, words", table([
    ("piperc", "piperc", ["capture", "{tmp}/syntax.py:make"], 1,
     r"^piperc: error: cannot import .*syntax\.py: SyntaxError"),
    ("piperc-opt", "piperc-opt", [TWO_LAYER, "-p", "cse", "--dump-dir", "{tmp}/a-file"], 1,
     r"^piperc-opt: error: --dump-dir .*a-file is a file"),
]))  # fmt: skip
def test_the_installed_command_refuses_in_one_line(name, argv, status, words, files):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    run = subprocess.run([command(name), *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout) == (status, "")
    assert_one_error_line(run.stderr, name)
    assert re.search(words, run.stderr, re.MULTILINE), run.stderr
