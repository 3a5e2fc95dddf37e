"""Asynchronous pipelines as data (`piperc.asynchronous`) and their oracle
(`piperc.reference.stale_training`): PipeDream's and 2BW's update plans, the weight version
each microbatch reads, the staleness in per-stage and in Randomized PipeDream's units, and
training exactly as a plan says, checked against hand-computed small cases and against
`train_eager` for a flushed schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import piperc
from piperc import asynchronous
from piperc.reference import compare, stale_training, train_eager
from piperc.schedules import ScheduleError


def test_pipedream_updates_each_stage_after_each_backward_without_a_flush():
    assert asynchronous.pipedream(2, 2, 2).table() == (
        "stage 0: F0 F1 B0 U(0) F2 B1 U(1) F3 B2 U(2) B3 U(3)\n"
        "stage 1: F0 B0 U(0) F1 B1 U(1) F2 B2 U(2) F3 B3 U(3)\n")


def test_2bw_updates_once_per_step_with_the_steps_microbatches_without_a_flush():
    assert asynchronous.pipedream_2bw(2, 2, 2).table() == (
        "stage 0: F0 F1 B0 F2 B1 U(0,1) F3 B2 B3 U(2,3)\n"
        "stage 1: F0 B0 F1 B1 U(0,1) F2 B2 F3 B3 U(2,3)\n")


def test_a_flushed_schedule_updates_once_per_step_after_its_last_action():
    assert asynchronous.synchronous("1f1b", 2, 2, 2).table() == (
        "stage 0: F0 F1 B0 B1 U(0,1) F2 F3 B2 B3 U(2,3)\n"
        "stage 1: F0 B0 F1 B1 U(0,1) F2 B2 F3 B3 U(2,3)\n")


def test_versions_are_the_updates_before_each_forward():
    """PipeDream, 2 stages: stage 0 forwards microbatch 2 after one update, stage 1 after two."""
    assert asynchronous.pipedream(2, 1, 4).versions() == [{0: 0, 1: 0, 2: 1, 3: 2}, {0: 0, 1: 1, 2: 2, 3: 3}]
    assert asynchronous.pipedream_2bw(2, 2, 2).versions() == [{0: 0, 1: 0, 2: 0, 3: 1}, {0: 0, 1: 0, 2: 1, 3: 1}]


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
def test_pipedream_delays_are_stage_depth_and_the_seeds_s2_minus_s_over_2(stages):
    """Per stage s, in its own updates: S - 1 - s (its in-flight microbatches). In Randomized
    PipeDream's global units (every stage's updates in one order), the steady-state maximum
    is floor(S^2 - S/2), on the first stage's block: 3, 7, 14 and 60 for S = 2, 3, 4, 8."""
    delays = asynchronous.staleness(asynchronous.pipedream(stages, 10 * stages, 1))
    assert delays.stage_max() == [stages - 1 - s for s in range(stages)]
    assert delays.global_max() == int(stages * stages - stages / 2)


def test_2bw_delays_one_update_and_a_flushed_schedule_none():
    assert asynchronous.staleness(asynchronous.pipedream_2bw(4, 8, 4)).stage_max() == [1, 1, 1, 0]
    assert asynchronous.staleness(asynchronous.synchronous("1f1b", 4, 8, 4)).stage_max() == [0, 0, 0, 0]
    assert asynchronous.staleness(asynchronous.synchronous("gpipe", 4, 8, 4)).stage_max() == [0, 0, 0, 0]


def test_a_plan_that_applies_a_gradient_before_its_backward_is_refused():
    plan = asynchronous.pipedream(2, 1, 2)
    plan.stages[0].insert(0, asynchronous.Event("U", (0,)))
    with pytest.raises(ScheduleError, match=r"stage 0: U\(0\) applies microbatches \[0\] before their backward"):
        plan.check()


class Chain(nn.Module):
    """y_hat = w1 * (w0 * x): one scalar weight per stage, squared error."""

    def __init__(self):
        super().__init__()
        self.w0 = nn.Parameter(torch.tensor(0.7))
        self.w1 = nn.Parameter(torch.tensor(-1.3))

    def forward(self, x, y):
        return ((self.w1 * (self.w0 * x) - y) ** 2).mean()


def test_pipedream_on_two_stages_reads_the_versions_by_hand():
    """Microbatch m's gradient at (w0 version, w1 version) = (0, 0), (0, 1), (1, 2), (2, 3)
    (test_versions...), each update one SGD step of that microbatch's gradient."""
    batches = [(torch.tensor([[1.5], [0.5]]) * (k + 1), torch.tensor([[0.2], [-0.4]]) * k) for k in range(4)]
    lr = 0.05
    w0, w1 = [torch.tensor(0.7)], [torch.tensor(-1.3)]
    reads = [(0, 0), (0, 1), (1, 2), (2, 3)]
    losses = []
    for (x, y), (v0, v1) in zip(batches, reads, strict=True):
        a, b = w0[v0].clone().requires_grad_(), w1[v1].clone().requires_grad_()
        loss = ((b * (a * x) - y) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        w0.append(w0[-1] - lr * a.grad)
        w1.append(w1[-1] - lr * b.grad)
    got_losses, state = stale_training(Chain(), asynchronous.pipedream(2, 1, 4), batches, piperc.optim.SGD(lr=lr),
                                       [["w0"], ["w1"]])
    assert got_losses == pytest.approx(losses, rel=1e-6)
    assert state["w0"].item() == pytest.approx(w0[-1].item(), rel=1e-6)
    assert state["w1"].item() == pytest.approx(w1[-1].item(), rel=1e-6)


class Net(nn.Module):
    """Three tanh layers, one per stage, squared error."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x, y):
        return ((self.c(torch.tanh(self.b(torch.tanh(self.a(x))))) - y) ** 2).mean()


STAGES = [["a.weight", "a.bias"], ["b.weight", "b.bias"], ["c.weight", "c.bias"]]


@pytest.mark.parametrize("optimizer", [piperc.optim.SGD(lr=0.1, momentum=0.9), piperc.optim.AdamW(lr=1e-2)],
                         ids=["sgd", "adamw"])
def test_a_flushed_plan_trains_as_one_device_accumulating_the_microbatches(optimizer):
    torch.manual_seed(0)
    model = Net()
    batches = [(torch.randn(8, 6), torch.randn(8, 1)) for _ in range(4)]
    run = stale_training(model, asynchronous.synchronous("1f1b", 3, 4, 4), batches, optimizer, STAGES)
    loss_err, param_err = compare(*run, *train_eager(model, batches, optimizer, slices=4))
    assert loss_err <= 1e-6 and param_err <= 1e-6


def test_the_stages_must_cover_the_trainable_parameters_once():
    batches = [(torch.randn(4, 6), torch.randn(4, 1))]
    plan = asynchronous.pipedream(3, 2, 1)
    sgd = piperc.optim.SGD(lr=0.1)
    with pytest.raises(ValueError, match=r"no stage holds the trainable parameters \['c.bias'\]"):
        stale_training(Net(), plan, batches, sgd, [STAGES[0], STAGES[1], ["c.weight"]])
    with pytest.raises(ValueError, match=r"stage 2 names parameter 'a.bias', which the model lacks or another"):
        stale_training(Net(), plan, batches, sgd, [STAGES[0], STAGES[1], ["c.weight", "c.bias", "a.bias"]])
