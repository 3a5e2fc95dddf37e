"""Asynchronous pipelines compiled (issue 11): PipeDream and PipeDream-2BW as programs that
never flush, checked against the stale-training oracle that runs the same plan on one
process (`piperc.reference.stale_training`), with real processes over gloo.

The IR tests read like the programs `expand-async` writes: per device a first step (the
warm-up), the steady step every later step runs, and the drain after the last step; what a
step leaves to the next is handed on by name (`par.carry` / `par.carried`).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch

import piperc
from piperc.errors import StrategyError
from piperc.examples import gpt
from tests.shared import setup
from tests.test_passes_ir import ir, run, section

STEPS = 8
LAYERS = 4
ASYNC_DP = ('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
            'optimizer{lr=0.1},data-parallel,microbatch{count=2 per-update=PER},schedule{kind="1f1b"},'
            'expand-async{plan="PLAN"}')


def expand(plan: str, per_update: int) -> str:
    """The two-block test module at pp=2 x dp=2, 2 microbatches, expanded asynchronously."""
    return run(ASYNC_DP.replace("PLAN", plan).replace("PER", str(per_update)))


# ---------------------------------------------------------------- the programs, as IR


def test_pipedream_writes_a_first_a_steady_and_a_drain_program_per_device():
    out = expand("pipedream", 1)
    # Device 0 (stage 0, one forward of warm-up): its step runs the forward of the step's
    # microbatch 0, then the backward of the previous step's last microbatch (its input
    # handed on, its gradient sent by device 1 in this step), an update after each backward;
    # the second forward reads the weights the first update made.
    assert section(out, "par.program @device0_first") == ir(
        """
        par.program @device0_first device 0 phase "first" {
          %0 = par.input 0 microbatch 0 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %h0 = par.task @s0_F stage 0 pass F microbatch 0 (%0, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0 to 1 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %1 = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %h0_1 = par.task @s0_F stage 0 pass F microbatch 1 (%1, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0_1 to 1 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
          %g0 = par.recv from 1 "g0 mb0" batch 1 : !torch.vtensor<[2,4],f32>
          %dw0 = par.task @s0_B stage 0 pass B microbatch 0 (%0, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %2 = par.all_reduce_bucket 0 stage 0 (%dw0) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %3 = par.task @s0_update stage 0 pass update (%w0, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.0.w", %3 : !torch.vtensor<[4,4],f32>
          par.carry "input0 mb-1", %1 : !torch.vtensor<[2,4],f32>
        }
        """
    )
    assert section(out, "par.program @device0") == ir(
        """
        par.program @device0 device 0 {
          %0 = par.carried "input0 mb-1" : !torch.vtensor<[2,4],f32>
          %1 = par.input 0 microbatch 0 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %h0 = par.task @s0_F stage 0 pass F microbatch 0 (%1, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0 to 1 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %g0 = par.recv from 1 "g0 mb-1" batch 0 : !torch.vtensor<[2,4],f32>
          %dw0 = par.task @s0_B stage 0 pass B microbatch 1 (%0, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %2 = par.all_reduce_bucket 0 stage 0 (%dw0) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %3 = par.task @s0_update stage 0 pass update (%w0, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %4 = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %h0_1 = par.task @s0_F stage 0 pass F microbatch 1 (%4, %3) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0_1 to 1 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
          %g0_1 = par.recv from 1 "g0 mb0" batch 1 : !torch.vtensor<[2,4],f32>
          %dw0_1 = par.task @s0_B stage 0 pass B microbatch 0 (%1, %g0_1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %5 = par.all_reduce_bucket 0 stage 0 (%dw0_1) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %6 = par.task @s0_update stage 0 pass update (%3, %5) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.0.w", %6 : !torch.vtensor<[4,4],f32>
          par.carry "input0 mb-1", %4 : !torch.vtensor<[2,4],f32>
        }
        """
    )
    assert section(out, "par.program @device0_drain") == ir(
        """
        par.program @device0_drain device 0 phase "drain" {
          %0 = par.carried "input0 mb-1" : !torch.vtensor<[2,4],f32>
          %g0 = par.recv from 1 "g0 mb-1" batch 0 : !torch.vtensor<[2,4],f32>
          %dw0 = par.task @s0_B stage 0 pass B microbatch 1 (%0, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %1 = par.all_reduce_bucket 0 stage 0 (%dw0) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %2 = par.task @s0_update stage 0 pass update (%w0, %1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.0.w", %2 : !torch.vtensor<[4,4],f32>
        }
        """
    )
    # Device 1 (the last stage): F and B of each microbatch back to back; the gradient of its
    # last backward is read by device 0 in the next step, so it is handed on and sent there.
    assert section(out, "par.program @device1") == ir(
        """
        par.program @device1 device 1 {
          %g0 = par.carried "s1_B#0 mb-1" : !torch.vtensor<[2,4],f32>
          par.send %g0 to 0 "g0 mb-1" batch 0 : !torch.vtensor<[2,4],f32>
          %h0 = par.recv from 0 "h0 mb0" batch 1 : !torch.vtensor<[2,4],f32>
          %w1 = par.state "blocks.1.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %loss, %0 = par.task @s1_F stage 1 pass F microbatch 0 (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %g0_1, %dw1 = par.task @s1_B stage 1 pass B microbatch 0 (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          par.send %g0_1 to 0 "g0 mb0" batch 2 : !torch.vtensor<[2,4],f32>
          %1 = par.all_reduce_bucket 0 stage 1 (%dw1) over @mesh ["dp"] stages [1] : !torch.vtensor<[4,4],f32>
          %2 = par.task @s1_update stage 1 pass update (%w1, %1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %h0_1 = par.recv from 0 "h0 mb1" batch 3 : !torch.vtensor<[2,4],f32>
          %loss_1, %3 = par.task @s1_F stage 1 pass F microbatch 1 (%h0_1, %2) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %4 = par.task @s1_F_accumulate stage 1 pass F microbatch 1 (%0, %3) : (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>) -> !torch.vtensor<[],f32>
          %g0_2, %dw1_1 = par.task @s1_B stage 1 pass B microbatch 1 (%h0_1, %2) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          %5 = par.all_reduce_bucket 0 stage 1 (%dw1_1) over @mesh ["dp"] stages [1] : !torch.vtensor<[4,4],f32>
          %6 = par.task @s1_update stage 1 pass update (%2, %5) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.output "loss", %4 : !torch.vtensor<[],f32>
          par.set_state "blocks.1.w", %6 : !torch.vtensor<[4,4],f32>
          par.carry "s1_B#0 mb-1", %g0_2 : !torch.vtensor<[2,4],f32>
        }
        """
    )
    assert section(out, "par.program @device1_drain") == ir(
        """
        par.program @device1_drain device 1 phase "drain" {
          %g0 = par.carried "s1_B#0 mb-1" : !torch.vtensor<[2,4],f32>
          par.send %g0 to 0 "g0 mb-1" batch 0 : !torch.vtensor<[2,4],f32>
        }
        """
    )


def test_2bw_updates_once_per_step_and_hands_the_gradient_sum_on():
    out = expand("pipedream-2bw", 2)
    # Stage 0's update comes after microbatch 1's backward, which runs in the next step:
    # the first step hands its sum on, each step adds the carried sum to the backward of
    # the previous step's last microbatch, updates, and starts the next sum.
    assert section(out, "par.program @device0_first") == ir(
        """
        par.program @device0_first device 0 phase "first" {
          %0 = par.input 0 microbatch 0 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %h0 = par.task @s0_F stage 0 pass F microbatch 0 (%0, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0 to 1 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %1 = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %h0_1 = par.task @s0_F stage 0 pass F microbatch 1 (%1, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0_1 to 1 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
          %g0 = par.recv from 1 "g0 mb0" batch 1 : !torch.vtensor<[2,4],f32>
          %dw0 = par.task @s0_B stage 0 pass B microbatch 0 (%0, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.carry "input0 mb-1", %1 : !torch.vtensor<[2,4],f32>
          par.carry "s0_B_accumulate#0 sum", %dw0 : !torch.vtensor<[4,4],f32>
        }
        """
    )
    assert section(out, "par.program @device0") == ir(
        """
        par.program @device0 device 0 {
          %0 = par.carried "input0 mb-1" : !torch.vtensor<[2,4],f32>
          %dw0 = par.carried "s0_B_accumulate#0 sum" : !torch.vtensor<[4,4],f32>
          %1 = par.input 0 microbatch 0 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %h0 = par.task @s0_F stage 0 pass F microbatch 0 (%1, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0 to 1 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %g0 = par.recv from 1 "g0 mb-1" batch 0 : !torch.vtensor<[2,4],f32>
          %dw0_1 = par.task @s0_B stage 0 pass B microbatch 1 (%0, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %dw0_2 = par.task @s0_B_accumulate stage 0 pass B microbatch 1 (%dw0, %dw0_1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %2 = par.all_reduce_bucket 0 stage 0 (%dw0_2) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %3 = par.task @s0_update stage 0 pass update (%w0, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %4 = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %h0_1 = par.task @s0_F stage 0 pass F microbatch 1 (%4, %3) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0_1 to 1 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
          %g0_1 = par.recv from 1 "g0 mb0" batch 1 : !torch.vtensor<[2,4],f32>
          %dw0_3 = par.task @s0_B stage 0 pass B microbatch 0 (%1, %g0_1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.0.w", %3 : !torch.vtensor<[4,4],f32>
          par.carry "input0 mb-1", %4 : !torch.vtensor<[2,4],f32>
          par.carry "s0_B_accumulate#0 sum", %dw0_3 : !torch.vtensor<[4,4],f32>
        }
        """
    )
    assert section(out, "par.program @device0_drain") == ir(
        """
        par.program @device0_drain device 0 phase "drain" {
          %0 = par.carried "input0 mb-1" : !torch.vtensor<[2,4],f32>
          %dw0 = par.carried "s0_B_accumulate#0 sum" : !torch.vtensor<[4,4],f32>
          %g0 = par.recv from 1 "g0 mb-1" batch 0 : !torch.vtensor<[2,4],f32>
          %dw0_1 = par.task @s0_B stage 0 pass B microbatch 1 (%0, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %dw0_2 = par.task @s0_B_accumulate stage 0 pass B microbatch 1 (%dw0, %dw0_1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %1 = par.all_reduce_bucket 0 stage 0 (%dw0_2) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %2 = par.task @s0_update stage 0 pass update (%w0, %1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.0.w", %2 : !torch.vtensor<[4,4],f32>
        }
        """
    )


# ---------------------------------------------------------------- real runs against the oracle


@functools.cache
def batches() -> list[tuple[torch.Tensor, ...]]:
    """STEPS global batches of the shared GPT's shape (8 rows of 16 tokens)."""
    return [gpt.make(n_layers=LAYERS, seed=200 + s)[1] for s in range(STEPS)]


OPTIMIZERS = {"sgd": piperc.optim.SGD(lr=0.1, momentum=0.9), "adamw": piperc.optim.AdamW(lr=1e-2)}


def compile_async(plan: str, pp: int, microbatches: int, optimizer: str, dp: int = 1, zero: int = 0
                  ) -> piperc.Compiled:
    """The shared GPT under `plan` at pp (x dp, with ZeRO `zero`), through the shared captures."""
    s = setup(gpt, LAYERS)
    mesh = piperc.Mesh(pp=pp, dp=dp) if dp > 1 else piperc.Mesh(pp=pp)
    strategy = [piperc.pipeline(axis="pp", stages=pp, microbatches=microbatches, schedule=plan)]
    if dp > 1:
        strategy.append(piperc.data_parallel(axis="dp", zero=zero))
    return piperc.compile(s.model, s.inputs, mesh=mesh, strategy=strategy, optimizer=OPTIMIZERS[optimizer],
                          captures=s.captures, keep_ir=False)


CASES = [
    pytest.param("pipedream", 2, 2, "sgd", 1, id="pipedream-pp2-sgd"),
    pytest.param("pipedream", 2, 2, "adamw", 1, id="pipedream-pp2-adamw"),
    pytest.param("pipedream-2bw", 2, 2, "sgd", 1, id="2bw-pp2-sgd"),
    pytest.param("pipedream-2bw", 2, 2, "adamw", 1, id="2bw-pp2-adamw"),
    pytest.param("pipedream", 4, 4, "sgd", 1, id="pipedream-pp4-sgd"),
    pytest.param("pipedream", 4, 4, "adamw", 1, id="pipedream-pp4-adamw"),
    pytest.param("pipedream-2bw", 4, 4, "sgd", 1, id="2bw-pp4-sgd"),
    pytest.param("pipedream-2bw", 4, 4, "adamw", 1, id="2bw-pp4-adamw"),
    pytest.param("pipedream", 2, 2, "sgd", 2, id="pipedream-pp2xdp2-sgd"),
    pytest.param("pipedream", 2, 2, "adamw", 2, id="pipedream-pp2xdp2-adamw"),
    pytest.param("pipedream-2bw", 2, 2, "sgd", 2, id="2bw-pp2xdp2-sgd"),
    pytest.param("pipedream-2bw", 2, 2, "adamw", 2, id="2bw-pp2xdp2-adamw"),
    pytest.param("pipedream", 4, 4, "sgd", 2, id="pipedream-pp4xdp2-sgd"),
    pytest.param("pipedream", 4, 4, "adamw", 2, id="pipedream-pp4xdp2-adamw"),
    pytest.param("pipedream-2bw", 4, 4, "sgd", 2, id="2bw-pp4xdp2-sgd"),
    pytest.param("pipedream-2bw", 4, 4, "adamw", 2, id="2bw-pp4xdp2-adamw"),
    pytest.param("pipedream", 2, 2, "adamw", 2, 3, id="pipedream-pp2xdp2-zero3-adamw"),
]


@pytest.mark.parametrize("plan, pp, microbatches, optimizer, dp, zero", [
    pytest.param(*case.values, *([0] if len(case.values) == 5 else []), id=case.id) for case in CASES])
def test_an_asynchronous_pipeline_trains_as_its_stale_training_oracle(plan, pp, microbatches, optimizer, dp, zero):
    compiled = compile_async(plan, pp, microbatches, optimizer, dp, zero)
    assert compiled.asynchronous == plan
    s = setup(gpt, LAYERS)
    check = piperc.verify(s.model, s.inputs, compiled, batches())
    assert check.ok, str(check)  # <= 1e-5 (or 2x the floor) against the same stale updates, 8 steps
    # The oracle is not one device: the same run flushed every step trains differently.
    assert "stale_training" in str(check)
    # Memory: predicted = measured on every rank, the weight stash included; PipeDream's stage s
    # keeps a version per microbatch in flight past an update (stages - 1 - s of them).
    predicted = [dataclasses.replace(p, at="") for p in compiled.memory()]
    assert check.run.peak_memory == predicted, (predicted, check.run.peak_memory)
    if plan == "pipedream" and dp == 1:  # (at pp=2 x dp=2 the peak comes where no stash is live)
        assert [p.weight_stash > 0 for p in predicted] == [s < pp - 1 for s in range(pp)]


# ---------------------------------------------------------------- lowering, code and errors


def test_each_phase_lowers_to_a_program_per_rank_verified_on_its_own():
    out = run(ASYNC_DP.replace("PLAN", "pipedream").replace("PER", "1") + ",lower-to-exec,verify-exec")
    heads = [line.strip() for line in out.splitlines() if line.strip().startswith("exec.program")]
    assert heads == [f"exec.program @rank{r}{suffix} rank {r} world 4{phase} {{"
                     for suffix, phase in (("_first", ' phase "first"'), ("", ""), ("_drain", ' phase "drain"'))
                     for r in range(4)]
    # What a step hands on is not freed there: the next step takes it and frees it.
    rank0 = section(out, "exec.program @rank0").splitlines()
    carry = next(line for line in rank0 if line.strip().startswith('exec.carry "input0 mb-1"'))
    handed = carry.split(", ")[1].split(" ")[0]
    frees = [line for line in rank0 if line.strip().startswith("exec.free")]
    assert not any(handed in line.replace(",", " ").split() for line in frees), (handed, frees)
    assert any(line.strip().startswith('%4 = exec.carried "input0 mb-1"') for line in rank0)
    assert any(line.strip().startswith("exec.free %4,") for line in rank0)  # freed after its backward


def test_a_rank_program_runs_its_first_step_then_its_steady_step_and_drains():
    files = compile_async("pipedream", 2, 2, "sgd").files
    for rank in (0, 1):
        source = files[f"rank{rank}.py"]
        assert [line for line in source.splitlines() if line.startswith("def ") and "(rt)" in line] == [
            "def first_step(rt):", "def step(rt):", "def drain(rt):"]
    assert 'rt.carried("input0 mb-1")' in files["rank0.py"]
    assert "rt.stashed(" not in files["rank1.py"]  # the last stage's backward follows its forward


@pytest.mark.parametrize("strategy, message", [
    ([piperc.pipeline(axis="pp", stages=4, microbatches=2, schedule="pipedream")],
     "schedule 'pipedream' needs microbatches >= stages - 1 (3): the first stage's warm-up forwards must fit"),
    ([piperc.pipeline(axis="pp", stages=8, microbatches=8, schedule="pipedream-2bw")],
     "schedule 'pipedream-2bw' runs one stage per device: stages must equal the size of axis 'pp' (4)"),
])
def test_an_asynchronous_schedule_that_cannot_run_is_a_compile_time_error(strategy, message):
    s = setup(gpt, LAYERS)
    with pytest.raises(StrategyError, match=re.escape(message)):
        piperc.compile(s.model, s.inputs, mesh=piperc.Mesh(pp=4), strategy=strategy,
                       optimizer=OPTIMIZERS["sgd"], captures=s.captures)


def test_a_per_step_gather_next_to_an_asynchronous_pipeline_names_what_it_cannot_write():
    # ZeRO-3 keeping parameters whole across a step's microbatches gathers them once per step;
    # an asynchronous pipeline has no step-wide version to gather.
    s = setup(gpt, LAYERS)
    with pytest.raises(StrategyError, match=r"schedule 'pipedream' composes with data parallelism \(buckets\) and "
                                            r"per-stage updates; the step also has par\.\w+ \(stage 0\), from ZeRO"):
        piperc.compile(s.model, s.inputs, mesh=piperc.Mesh(pp=2, dp=2), optimizer=OPTIMIZERS["sgd"],
                       strategy=[piperc.pipeline(axis="pp", stages=2, microbatches=2, schedule="pipedream"),
                                 piperc.data_parallel(axis="dp", zero=3, reshard_after_forward=False)],
                       captures=s.captures)


def test_a_checkpoint_of_an_asynchronous_pipeline_is_refused(tmp_path):
    compiled = compile_async("pipedream", 2, 2, "sgd")
    with pytest.raises(piperc.runtime.launch.LaunchError, match="this program is an asynchronous pipeline"):
        piperc.launch(compiled, batches()[:2], checkpoint_dir=str(tmp_path), checkpoint_every=1)


def test_a_run_of_one_step_drains_after_its_first_step():
    """The drain follows whichever step was last: after the warm-up step alone it runs the
    backwards and updates still in flight, and the run matches the oracle's one step."""
    compiled = compile_async("pipedream-2bw", 4, 4, "adamw")
    s = setup(gpt, LAYERS)
    assert piperc.verify(s.model, s.inputs, compiled, batches()[:1]).verdict == "exact"
