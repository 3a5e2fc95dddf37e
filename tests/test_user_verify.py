"""`piperc.verify` and `piperc verify`: a strategy's training run against one device's,
next to the noise floor of one-device accumulation over the strategy's slices."""

from types import SimpleNamespace

import pytest
import torch

import piperc
from piperc import cli
from piperc.examples import gpt
from piperc.reference import Verification, compiled_training, train_eager
from piperc.runtime.launch import LaunchResult

GPT = ["piperc.examples.gpt:make", "--set", "n_layers=2", "--set", "d_model=32", "--set", "n_heads=2",
       "--set", "seq=8", "--set", "batch=8"]  # fmt: skip


def test_cli_verifies_a_strategy(capsys):
    status = cli.main(["verify", *GPT, "--mesh", "pp=2,dp=2", "--pipeline", "stages=2,microbatches=2",
                       "--dp", "zero=3", "--optimizer", "adamw:lr=1e-5,weight_decay=0.1", "--steps", "2"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.startswith(
        "piperc verify: GPT, mesh Mesh(pp=2, dp=2); strategy pipeline(axis='pp', stages=2, microbatches=2, "
        "schedule='1f1b'), data_parallel(axis='dp', zero=3); AdamW(lr=1e-05, betas=(0.9, 0.999), eps=1e-08, "
        "weight_decay=0.1)\n"
        "2 steps against one device (torch.optim); floor: one device accumulating each batch over the "
        "strategy's 4 slices\n"
        "  step  loss            one device      rel. error  floor\n"
        "     0  "
    )  # fmt: skip
    assert "  worst parameters" in out
    assert out.endswith("  verdict: exact (every error <= 1e-05)\n")


@pytest.mark.parametrize("argv,message", [
    (["--mesh", "pp=2", "--pipeline", "stage=2"], "--pipeline stage=2: pipeline() got an unexpected keyword argument 'stage'"),
    (["--mesh", "dp=2", "--dp", "--optimizer", "rmsprop"], "--optimizer: unknown kind 'rmsprop' (known: sgd, adamw)"),
])  # fmt: skip
def test_cli_rejects_a_strategy_it_cannot_build(argv, message, capsys):
    assert cli.main(["verify", *GPT, *argv]) == 2
    assert capsys.readouterr().err == f"piperc: error: {message}\n"


@pytest.mark.parametrize("optimizer", [
    piperc.optim.AdamW(lr=1e-5, betas=(0.9, 0.95), eps=1e-12, weight_decay=1e-6),
    piperc.optim.SGD(lr=0.05, momentum=0.9),
])  # fmt: skip
def test_the_optimizer_and_slices_are_the_ones_compiled(optimizer):
    torch.manual_seed(0)
    compiled = piperc.compile(Regression(), (torch.randn(8, 8), torch.randn(8, 1)), mesh=piperc.Mesh(pp=1, dp=2),
                              strategy=[piperc.pipeline(stages=1, microbatches=4), piperc.data_parallel()],
                              optimizer=optimizer, keep_ir=False)
    assert compiled_training(compiled) == (optimizer, 8, 2)


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 1)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.fc(x), y)


def test_accumulating_over_slices_differs_from_the_whole_batch_by_rounding_only():
    torch.manual_seed(0)
    model = Regression()
    batches = [(torch.randn(8, 8), torch.randn(8, 1)) for _ in range(3)]
    optimizer = piperc.optim.SGD(lr=0.1)
    losses, state = train_eager(model, batches, optimizer)
    sliced_losses, sliced_state = train_eager(model, batches, optimizer, slices=4)
    assert sliced_losses == pytest.approx(losses, rel=1e-6)
    assert (state["fc.weight"] - model.fc.weight).abs().max() > 1e-3
    for name, value in state.items():
        assert torch.allclose(sliced_state[name], value, rtol=1e-6, atol=1e-7), name
    with pytest.raises(ValueError, match="batch 0 has 8 rows, which do not split into 3 equal slices"):
        train_eager(model, batches, optimizer, slices=3)
    # two replicas of two microbatches: each pair summed on its own, then the pairs added
    grouped_losses, grouped_state = train_eager(model, batches, optimizer, slices=4, groups=2)
    assert grouped_losses == pytest.approx(losses, rel=1e-6)
    for name, value in state.items():
        assert torch.allclose(grouped_state[name], value, rtol=1e-6, atol=1e-7), name
    with pytest.raises(ValueError, match="4 slices do not split into 3 equal groups"):
        train_eager(model, batches, optimizer, slices=4, groups=3)


def verification(loss_error: float, parameter_error: float, loss_floor: float, parameter_floor: float):
    run = LaunchResult(losses=[1.0], state_dict={}, peak_memory=[])
    return Verification(
        losses=[1.0], reference_losses=[1.0], loss_errors=[loss_error], floor_loss_errors=[loss_floor],
        parameter_errors={"w": parameter_error}, floor_parameter_errors={"w": parameter_floor}, slices=4, run=run)


@pytest.mark.parametrize("errors,verdict", [
    ((2e-7, 9e-6, 0.0, 0.0), "exact"),
    ((2e-7, 5e-5, 0.0, 3e-5), "within the noise floor"),
    ((2e-7, 7e-5, 0.0, 3e-5), "mismatch"),
    ((2e-5, 1e-6, 0.0, 1e-6), "mismatch"),
])  # fmt: skip
def test_verdict(errors, verdict):
    result = verification(*errors)
    assert result.verdict == verdict
    assert result.ok == (verdict != "mismatch")
    assert ("verdict: MISMATCH: errors above 1e-05 and above 2x the floor's" in str(result)) == (verdict == "mismatch")


def test_verify_refuses_a_model_that_is_not_the_one_compiled():
    optimizer = piperc.optim.SGD(lr=0.1)
    compiled = SimpleNamespace(
        optimizer=optimizer, microbatches=1, replicas=1,
        initial_state={"fc.weight": torch.zeros(1, 4), "head.weight": torch.zeros(1)}, aliases={})
    batch = (torch.randn(8, 8), torch.randn(8, 1))
    with pytest.raises(ValueError, match=r"compiled only: \['head.weight'\]; model only: \['fc.bias'\]; "
                                         r"other shapes: \['fc.weight'\]"):
        piperc.verify(Regression(), batch, compiled)


def test_cli_refuses_batches_unlike_the_example_inputs_without_a_traceback(tmp_path, capsys):
    _, inputs = gpt.make(n_layers=2, d_model=32, n_heads=2, seq=4, batch=8)  # GPT's, 4 tokens short
    torch.save([inputs], tmp_path / "batches.pt")
    status = cli.main(["verify", *GPT, "--mesh", "dp=2", "--dp", "--batches", str(tmp_path / "batches.pt")])
    err = capsys.readouterr().err
    assert status == 1
    assert err == ("piperc: error: batch 0: input 0 (input0) has shape (8, 4), but the program was compiled for "
                   "(8, 8) (a global batch; compile again for another shape)\n")
