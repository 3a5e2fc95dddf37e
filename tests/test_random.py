"""Random ops (dropout): numbered at capture, seeded per (seed, step, microbatch slice, op) in
the programs, and drawn as one device draws when it cuts each batch into the same slices."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import piperc
from piperc.errors import StrategyError
from piperc.reference import compare, train_eager
from piperc.runtime.comm import random_seed

SGD = piperc.optim.SGD(lr=0.1, momentum=0.9)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return x + self.drop(torch.relu(self.fc(x)))


class Net(nn.Module):
    """Two residual blocks with dropout, then a squared-error loss."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(8, 1)

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return ((self.head(x) - y) ** 2).mean()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 8, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(3)]
    return Net(), batches


def compile_pp2_dp2(model, inputs, seed):
    return piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2, dp=2),
                          strategy=[piperc.pipeline(stages=2, microbatches=2), piperc.data_parallel()],
                          optimizer=SGD, seed=seed, keep_ir=False)


def test_capture_numbers_the_random_ops_in_execution_order(net):
    model, batches = net
    captured = str(piperc.capture(model, batches[0]))
    random = re.findall(r'"torch\.aten\.(\w+)".*\{piperc\.random = (\d+) : i64, piperc\.origin = #par\.origin<"([\w.]+)"',
                        captured)
    assert random == [("native_dropout", "0", "blocks.0.drop"), ("native_dropout", "1", "blocks.1.drop")]
    assert "native_dropout_backward" in captured  # the backward reads the saved mask; it draws nothing


def test_each_random_op_is_seeded_in_the_program_of_its_stage(net):
    model, batches = net
    files = compile_pp2_dp2(model, batches[0], seed=3).files
    for rank, index in ((0, 0), (2, 1)):  # stage 0 on ranks 0-1, stage 1 on ranks 2-3
        lines = files[f"rank{rank}.py"].splitlines()
        at = lines.index(f"    RT.seed_random({index})")
        assert "aten.native_dropout.default(" in lines[at + 1]
        assert "    global RT" in lines and "    RT = rt" in lines
    assert '"seed": 3' in files["manifest.json"]


def test_seeds_differ_by_every_coordinate():
    seeds = {random_seed(s, t, p, i) for s in (0, 1) for t in (0, 1) for p in (0, 1, 2) for i in (0, 1)}
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)


def test_dropout_trains_as_one_device_that_runs_the_same_slices_with_the_same_seed(net):
    """pp=2 x dp=2 with 2 microbatches cuts each batch into 4 slices, summed per replica: one
    device doing that with seed 3 draws the same masks and ends with the same parameters; the
    whole-batch run and another seed draw other masks."""
    model, batches = net
    result = piperc.launch(compile_pp2_dp2(model, batches[0], seed=3), batches)
    losses, state = train_eager(model, batches, SGD, slices=4, groups=2, seed=3)
    loss_err, param_err = compare(result.losses, result.state_dict, losses, state)
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)
    for others in (train_eager(model, batches, SGD, slices=4, groups=2, seed=4), train_eager(model, batches, SGD, seed=3)):
        assert min(compare(result.losses, result.state_dict, *others)) > 1e-3


def test_dropout_on_a_tensor_parallel_shard_draws_the_whole_mask_and_keeps_its_piece(net):
    """fc's output is split over tp, so its dropout is drawn whole (as one device draws it) and
    each device keeps its columns: tp=2 trains as one device does with the same seed."""
    model, batches = net
    compiled = piperc.compile(
        model, batches[0], mesh=piperc.Mesh(tp=2), optimizer=SGD, seed=5,
        strategy=[piperc.tensor_parallel(axis="tp", plan={"blocks.*.fc.weight": piperc.Shard(0)})])
    after = dict(compiled.ir_after)["localise-shapes"]
    draws = [line for line in after.splitlines() if "piperc.random" in line]
    assert len(draws) == 2 and all('"torch.aten.bernoulli.p"' in line and "[8,8],f32>" in line for line in draws)
    assert "native_dropout\"" not in after and after.count("native_dropout_backward") == 2
    result = piperc.launch(compiled, batches)
    losses, state = train_eager(model, batches, SGD, seed=5)
    loss_err, param_err = compare(result.losses, result.state_dict, losses, state)
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)


def test_compile_seed_must_be_a_whole_number(net):
    model, batches = net
    with pytest.raises(StrategyError, match=r"compile: seed must be a whole number >= 0, got 1\.5"):
        compile_pp2_dp2(model, batches[0], seed=1.5)


class Attention(nn.Module):
    """Causal scaled-dot-product attention over [batch, 2 heads, seq, 4] with `dropout_p`."""

    def __init__(self, dropout_p: float):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.dropout_p = dropout_p

    def forward(self, x, y):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, 2, 4).transpose(1, 2) for z in self.qkv(x).split(8, dim=2))
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=True)
        return ((out.transpose(1, 2).reshape(b, t, 8) - y) ** 2).mean()


@pytest.mark.parametrize("dropout_p,random_ops", [(0.0, 0), (0.25, 1)])
def test_attention_is_random_only_with_dropout(dropout_p, random_ops):
    """torch tags scaled-dot-product attention `nondeterministic_seeded` for its dropout; with
    dropout_p = 0 it draws nothing, so capture does not number it (and sharding lays it out
    like any other op)."""
    torch.manual_seed(0)
    model = Attention(dropout_p)
    compiled = piperc.compile(model, (torch.randn(2, 6, 8), torch.randn(2, 6, 8)), mesh=piperc.Mesh(dp=1),
                              strategy=[], optimizer=SGD)
    assert compiled.random_ops == random_ops
