"""Checkpoints: DCP-format state that reloads under another strategy, atomic publication,
and resuming after a rank is SIGKILLed, against one-device training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import piperc
from piperc.examples import gpt
from piperc.reference import loss_errors, parameter_errors, train_eager
from piperc.runtime import checkpoint
from piperc.runtime.launch import LaunchError
from piperc.runtime.manifest import local_part, part_box

REPO = Path(__file__).resolve().parent.parent
OPT = piperc.optim.AdamW(lr=1e-3, weight_decay=0.1)
STEPS = 10
TOL = 1e-5


@pytest.fixture(scope="module")
def run():
    """The model, its example inputs, STEPS distinct batches and one-device training on them."""
    model, inputs = gpt.make(n_layers=2)
    generator = torch.Generator().manual_seed(7)
    batches = [
        tuple(torch.randint(0, 64, t.shape, generator=generator) for t in inputs) for _ in range(STEPS)
    ]
    losses, state = train_eager(model, batches, OPT)
    return model, inputs, batches, losses, state


def noise_floor(run) -> dict[str, float]:
    """Per parameter, the error of one-device AdamW training that accumulates each batch over
    the slices the chain's strategies cut it into (2 or 4; in order, or per replica first)
    against whole batches: float reassociation, which AdamW turns into steps of about lr
    where gradients are near zero."""
    model, _, batches, _, state = run
    floor: dict[str, float] = {}
    for slices, groups in ((2, 1), (4, 1), (4, 2)):
        _, accumulated = train_eager(model, batches, OPT, slices, groups)
        for name, error in parameter_errors(accumulated, state).items():
            floor[name] = max(error, floor.get(name, 0.0))
    return floor


def compile_as(model, inputs, name):
    pipeline = piperc.pipeline(axis="pp", stages=2, microbatches=2)
    megatron_mlp = piperc.tensor_parallel(axis="tp", plan={
        "blocks.*.mlp.fc.weight": piperc.Shard(0), "blocks.*.mlp.proj.weight": piperc.Shard(1)})
    strategies = {
        "pp2 x dp2": (piperc.Mesh(pp=2, dp=2), [pipeline, piperc.data_parallel(axis="dp")]),
        "dp4 zero3": (piperc.Mesh(dp=4), [piperc.data_parallel(axis="dp", zero=3)]),
        "dp2 x tp2": (piperc.Mesh(dp=2, tp=2), [piperc.data_parallel(axis="dp"), megatron_mlp]),
        "dp2 x tp2 zero3": (piperc.Mesh(dp=2, tp=2), [piperc.data_parallel(axis="dp", zero=3), megatron_mlp]),
    }
    mesh, strategy = strategies[name]
    return piperc.compile(model, inputs, mesh=mesh, strategy=strategy, optimizer=OPT, keep_ir=False)


# ---------------------------------------------------------------- layouts as DCP chunks


@pytest.mark.parametrize("layout,coords", [
    ((("dp",), ()), {"dp": 1, "tp": 0}),
    ((("tp", "dp"), ()), {"dp": 1, "tp": 1}),
    ((("dp", "tp"), ()), {"dp": 1, "tp": 0}),
    (((), ("tp",)), {"dp": 0, "tp": 1}),
    (((), ()), {"dp": 1, "tp": 1}),
])
def test_part_box_is_where_local_part_cut(layout, coords):
    whole = torch.arange(8 * 6).reshape(8, 6)
    part = local_part(whole, layout, {"dp": 2, "tp": 2}, coords)
    box = part_box(layout, part.shape, {"dp": 2, "tp": 2}, coords)
    assert [size for _, size in box] == [8, 6]
    rows, cols = ((start, start + n) for (start, _), n in zip(box, part.shape, strict=True))
    assert torch.equal(whole[rows[0]:rows[1], cols[0]:cols[1]], part)


# ---------------------------------------------------------------- reshard on load


def test_a_checkpoint_reloads_under_each_other_strategy_and_trains_on_exactly(run, tmp_path):
    """One training run of STEPS steps, two steps per strategy, each continuing from the
    checkpoint the previous one wrote: unsharded -> ZeRO-3 -> tensor parallel -> tensor
    parallel with ZeRO-3 (two axes on one dimension) -> pipeline, then read back in one
    process. Every pair reshards (whole to parts, parts to other parts, parts to whole), and
    the run trains as one device does: losses within 1e-5, parameters within 1e-5 or twice
    the AdamW noise floor of the same slicing."""
    model, inputs, batches, eager_losses, eager_state = run
    root = tmp_path / "ckpt"
    chain = ["pp2 x dp2", "dp4 zero3", "dp2 x tp2", "dp2 x tp2 zero3", "pp2 x dp2"]
    losses = []
    for i, name in enumerate(chain):
        result = piperc.launch(compile_as(model, inputs, name), batches[: 2 * (i + 1)],
                               checkpoint_dir=root, checkpoint_every=2, resume=i > 0)
        assert result.first_step == 2 * i, name
        losses += result.losses
        assert checkpoint.latest(root).name == f"step_{2 * (i + 1):08d}"
    assert max(loss_errors(losses, eager_losses)) <= TOL
    floor = noise_floor(run)
    errors = parameter_errors(result.state_dict, eager_state)
    above = {name: (error, floor[name]) for name, error in errors.items() if error > max(TOL, 2 * floor[name])}
    assert not above, above

    plain = piperc.checkpoint.to_state_dict(root)  # the latest, step 10, in this process
    assert sorted(plain) == sorted(eager_state)
    assert parameter_errors(plain, result.state_dict) == dict.fromkeys(plain, 0.0)
    info = checkpoint.read_info(checkpoint.latest(root))
    assert info["steps_done"] == STEPS and info["mesh"] == {"pp": 2, "dp": 2}


# ---------------------------------------------------------------- crash and resume


def test_resume_after_a_rank_is_sigkilled_loses_only_the_steps_since_the_last_checkpoint(run, tmp_path):
    """Resuming repeats the steps since the last checkpoint, and from there trains bit for
    bit as the run that was never interrupted."""
    model, inputs, batches, *_ = run
    compiled = compile_as(model, inputs, "pp2 x dp2")
    job, root = tmp_path / "job", tmp_path / "ckpt"
    compiled.save(job)
    uninterrupted = piperc.runtime.launch_dir(job, batches)
    program = (job / "rank1.py").read_text()
    # Test hook, not something the generator emits: rank 1 is SIGKILLed as its 6th step starts.
    (job / "rank1.py").write_text(program + (
        "\n\nimport os as _os, signal as _signal\n_step = step\n\n\n"
        "def step(rt):\n"
        "    if int(rt.state('step')) == 5:\n"
        "        _os.kill(_os.getpid(), _signal.SIGKILL)\n"
        "    _step(rt)\n"
    ))
    with pytest.raises(LaunchError, match="rank 1 was killed by SIGKILL"):
        piperc.runtime.launch_dir(job, batches, checkpoint_dir=root, checkpoint_every=2)
    assert checkpoint.latest(root).name == "step_00000004"

    # Resumed under torchrun with the unchanged program: steps 4..7 run again.
    (job / "rank1.py").write_text(program)
    torch.save(batches, tmp_path / "batches.pt")
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "4", "-m", "piperc.runtime.worker", str(job),
         "--batches", str(tmp_path / "batches.pt"), "--result", str(tmp_path / "result.pt"),
         "--checkpoint-dir", str(root), "--checkpoint-every", "2", "--resume"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "(4 steps done)" in proc.stderr
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["first_step"] == 4
    assert result["losses"] == uninterrupted.losses[4:]
    assert parameter_errors(result["state_dict"], uninterrupted.state_dict) == dict.fromkeys(uninterrupted.state_dict, 0.0)
    assert checkpoint.latest(root).name == f"step_{STEPS:08d}"


# ---------------------------------------------------------------- publication and errors


def test_a_save_that_never_finished_is_not_a_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    (root / "step_00000006.partial").mkdir(parents=True)  # what a crash mid-save leaves
    (root / "step_00000006.partial" / "__0_0.distcp").write_bytes(b"half")
    assert checkpoint.latest(root) is None
    (root / "step_00000004").mkdir()
    (root / "step_00000004" / "piperc.json").write_text(json.dumps({"steps_done": 4}))
    assert checkpoint.latest(root) == root / "step_00000004"
    with pytest.raises(checkpoint.CheckpointError, match=r"no piperc.json here \(a save that did not finish\)"):
        checkpoint.read_info(root / "step_00000006.partial")
    with pytest.raises(checkpoint.CheckpointError, match="not a published checkpoint"):
        piperc.checkpoint.to_state_dict(tmp_path)


def test_checkpoint_arguments_are_checked_before_any_process_starts(run, tmp_path):
    model, inputs, batches, *_ = run
    compiled = compile_as(model, inputs, "pp2 x dp2")
    with pytest.raises(ValueError, match="checkpoint_every and resume need a checkpoint_dir"):
        piperc.launch(compiled, batches, resume=True)
    with pytest.raises(ValueError, match=r"checkpoint_every must be a whole number >= 0, got '2'"):
        piperc.launch(compiled, batches, checkpoint_dir=tmp_path, checkpoint_every="2")
