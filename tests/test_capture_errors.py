"""Bad input to capture is a clear CaptureError that says what and where."""

import re

import pytest
import torch
import torch.nn as nn

import piperc
from piperc.errors import CaptureError


class ReturnsLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


def test_forward_that_does_not_return_a_scalar():
    with pytest.raises(CaptureError, match=re.escape("must return a scalar floating-point loss")) as e:
        piperc.capture(ReturnsLogits(), (torch.randn(2, 4),))
    assert "shape [2, 3]" in str(e.value)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # data-dependent control flow: torch.export cannot trace this
            h = h * 2
        return h.mean()


def test_model_that_torch_export_cannot_trace():
    with pytest.raises(CaptureError, match="torch.export cannot trace DataDependent") as e:
        piperc.capture(DataDependent(), (torch.randn(2, 4),))
    message = str(e.value)
    assert "data-dependent" in message.lower() or "symbolic" in message.lower() or "guard" in message.lower()
    assert "test_capture_errors.py" in message and "if h.sum() > 0" in message


@torch.library.custom_op("piperc_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


def _wobble_backward(ctx, grad):
    return grad * 1.5


wobble.register_autograd(_wobble_backward)


class UsesCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return wobble(self.lin(x)).mean()


def test_op_the_dialects_cannot_represent():
    with pytest.raises(CaptureError, match="cannot be represented") as e:
        piperc.capture(UsesCustomOp(), (torch.randn(2, 4),))
    assert "torch.piperc_test.wobble" in str(e.value)


def test_inputs_must_be_tensors():
    with pytest.raises(CaptureError, match="example input 0 is a list"):
        piperc.capture(ReturnsLogits(), ([1, 2],))


@pytest.mark.parametrize("model,inputs,message", [
    (lambda x: x, (torch.ones(2, 4),), "model must be a torch.nn.Module, got function"),
    (ReturnsLogits(), torch.ones(2, 4), "example_inputs must be a non-empty tuple of tensors"),
    (ReturnsLogits(), (), "example_inputs must be a non-empty tuple of tensors"),
    (ReturnsLogits(), (torch.ones(2, 4), 3), "example input 1 is a int, not a tensor"),
])  # fmt: skip
def test_compile_checks_its_model_and_example_inputs_first(model, inputs, message):
    with pytest.raises(CaptureError, match=re.escape(message)):
        piperc.compile(model, inputs, mesh=piperc.Mesh(dp=2), strategy=[piperc.data_parallel()],
                       optimizer=piperc.optim.SGD(lr=0.1))


@pytest.mark.parametrize("optimizer,message", [
    (piperc.optim.SGD(lr=-0.1), "SGD(lr=-0.1, momentum=0.0, weight_decay=0.0): invalid lr -0.1; torch.optim "
                                "requires >= 0"),
    (piperc.optim.SGD(lr=0.1, momentum=-0.9), "invalid momentum -0.9; torch.optim requires >= 0"),
    (piperc.optim.SGD(lr="0.1"), "lr must be a number, got '0.1'"),
    (piperc.optim.AdamW(betas=(0.9, 1.0)), "invalid betas[1] 1.0; torch.optim requires 0 <= beta < 1"),
    (piperc.optim.AdamW(eps=-1e-8), "invalid eps -1e-08; torch.optim requires >= 0"),
    (piperc.optim.AdamW(weight_decay=float("nan")), "invalid weight_decay nan"),
    (piperc.optim.AdamW(betas=0.9), "betas must be a pair (beta1, beta2), got 0.9"),
])  # fmt: skip
def test_optimizer_hyperparameters_are_checked_as_torch_optim_checks_them(optimizer, message):
    model = ReturnsLogits()
    with pytest.raises(piperc.StrategyError, match=re.escape(message)):
        piperc.compile(model, (torch.ones(2, 4),), mesh=piperc.Mesh(dp=2), strategy=[piperc.data_parallel()],
                       optimizer=optimizer)
