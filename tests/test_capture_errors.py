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
