"""Predicted peak memory (`compiled.memory()`, `piperc.memory.predict_memory`) against the
runtime's measurement (`result.peak_memory`).

The IR tests hand in an exec program and check the numbers it predicts; the launch tests
compile and train the example GPT on local processes and compare, per rank, the
prediction with what the runtime counted.
"""

from __future__ import annotations

import pytest

import piperc
from piperc.examples import gpt
from piperc.ir import parse_module
from piperc.memory import memory_table, predict_memory
from piperc.runtime.launch import PeakMemory

T = "!torch.vtensor<[8,4],f32>"  # 128 bytes
X = "!torch.vtensor<[2,4],f32>"  # 32 bytes
Y = "!torch.vtensor<[2,8],f32>"  # 64 bytes
WT = "!torch.vtensor<[4,8],f32>"

# Rank 0 of two data-parallel ranks, one microbatch. The forward returns y = x @ w.t(),
# the view w.t() (state: not counted again) and the two halves of y (views of y: one
# storage of 64 bytes for the three). The backward makes the gradient of w (128 bytes),
# the bucketed all-reduce a flat buffer of 128 bytes, which the update reads.
FUNCTIONS = f"""\
func.func @s0_F(%w: {T} {{piperc.key = "param:w"}}, %x: {X} {{piperc.key = "input:0"}})
    -> ({Y} {{piperc.key = "v0"}}, {WT} {{piperc.key = "v1"}}, {X} {{piperc.key = "v2"}},
        {X} {{piperc.key = "v3"}}) {{
  %wt = "torch.aten.t"(%w) : ({T}) -> {WT}
  %y = "torch.aten.mm"(%x, %wt) : ({X}, {WT}) -> {Y}
  %four = "torch.constant.int"() <{{value = 4 : i64}}> : () -> !torch.int
  %one = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
  %halves = "torch.aten.split.Tensor"(%y, %four, %one) : ({Y}, !torch.int, !torch.int) -> !torch.list<vtensor>
  %a, %b = "torch.prim.ListUnpack"(%halves) : (!torch.list<vtensor>) -> ({X}, {X})
  func.return %y, %wt, %a, %b : {Y}, {WT}, {X}, {X}
}}
func.func @s0_B(%y: {Y} {{piperc.key = "v0"}}, %x: {X} {{piperc.key = "input:0"}})
    -> ({T} {{piperc.key = "grad:w"}}) {{
  %yt = "torch.aten.t"(%y) : ({Y}) -> !torch.vtensor<[8,2],f32>
  %gw = "torch.aten.mm"(%yt, %x) : (!torch.vtensor<[8,2],f32>, {X}) -> {T}
  func.return %gw : {T}
}}
func.func @s0_update(%w: {T} {{piperc.key = "param:w"}}, %g: {T} {{piperc.key = "grad:w"}},
                     %m: {T} {{piperc.key = "state:w.exp_avg"}})
    -> ({T} {{piperc.key = "param:w"}}, {T} {{piperc.key = "state:w.exp_avg"}}) {{
  %alpha = "torch.constant.float"() <{{value = 1.0 : f64}}> : () -> !torch.float
  %m2 = "torch.aten.add.Tensor"(%m, %g, %alpha) : ({T}, {T}, !torch.float) -> {T}
  %w2 = "torch.aten.sub.Tensor"(%w, %m2, %alpha) : ({T}, {T}, !torch.float) -> {T}
  func.return %w2, %m2 : {T}, {T}
}}
"""

DATA_PARALLEL = FUNCTIONS + f"""\
exec.process_group @grad_0 ranks [0, 1]
exec.program @rank0 rank 0 world 2 {{
  %compute = exec.stream "compute"
  %comm = exec.stream "comm"
  %w = exec.state "w" : {T}
  %x = exec.load_input "0" microbatch 0 : {X}
  %y, %wt, %a, %b = exec.launch @s0_F(%w, %x) on %compute stage 0 pass "F" microbatch 0
      : ({T}, {X}) -> ({Y}, {WT}, {X}, {X})
  %g = exec.launch @s0_B(%y, %x) on %compute stage 0 pass "B" microbatch 0 : ({Y}, {X}) -> {T}
  exec.free %x, %y, %wt, %a, %b : {X}, {Y}, {WT}, {X}, {X}
  %e = exec.event_record %compute
  exec.event_wait %comm, %e
  exec.record_stream %g, %comm : {T}
  %work, %sum = exec.all_reduce %g group @grad_0 sum on %comm : {T}
  exec.wait %work on %compute
  exec.free %g : {T}
  exec.record_stream %sum, %compute : {T}
  %m = exec.state "w.exp_avg" : {T}
  %w2, %m2 = exec.launch @s0_update(%w, %sum, %m) on %compute stage 0 pass "update"
      : ({T}, {T}, {T}) -> ({T}, {T})
  exec.free %w, %sum, %m : {T}, {T}, {T}
  exec.set_state "w", %w2 : {T}
  exec.set_state "w.exp_avg", %m2 : {T}
  exec.free %w2, %m2 : {T}, {T}
}}
"""


def predict(text: str) -> list[PeakMemory]:
    module = parse_module(text)
    module.verify()
    return predict_memory(module)


def test_data_parallel_step_peaks_at_the_bucket():
    """The peak is the gradient and its bucket together: the forward's views (of the state,
    and of y) add nothing, and the update's results become state."""
    [rank0] = predict(DATA_PARALLEL)
    assert rank0 == PeakMemory(parameters=128, optimizer_state=128, gradients=128, activations=0,
                               comm_buffers=128, at="op #10 exec.all_reduce")
    assert rank0.total == 512


# The same step on one rank: the update reads the gradient itself.
ONE_RANK = FUNCTIONS + f"""\
exec.program @rank0 rank 0 world 1 {{
  %compute = exec.stream "compute"
  %w = exec.state "w" : {T}
  %x = exec.load_input "0" microbatch 0 : {X}
  %y, %wt, %a, %b = exec.launch @s0_F(%w, %x) on %compute stage 0 pass "F" microbatch 0
      : ({T}, {X}) -> ({Y}, {WT}, {X}, {X})
  %g = exec.launch @s0_B(%y, %x) on %compute stage 0 pass "B" microbatch 0 : ({Y}, {X}) -> {T}
  exec.free %x, %y, %wt, %a, %b : {X}, {Y}, {WT}, {X}, {X}
  %m = exec.state "w.exp_avg" : {T}
  %w2, %m2 = exec.launch @s0_update(%w, %g, %m) on %compute stage 0 pass "update"
      : ({T}, {T}, {T}) -> ({T}, {T})
  exec.free %w, %g, %m : {T}, {T}, {T}
  exec.set_state "w", %w2 : {T}
  exec.set_state "w.exp_avg", %m2 : {T}
  exec.free %w2, %m2 : {T}, {T}
}}
"""


def test_forward_views_share_one_storage():
    """Without the bucket the peak is the backward: y and its halves, one storage of 64
    bytes (w.t() is the state's), next to the gradient."""
    [rank0] = predict(ONE_RANK)
    assert rank0 == PeakMemory(parameters=128, optimizer_state=128, gradients=128, activations=64, comm_buffers=0,
                               at="op #4 exec.launch @s0_B (stage 0, pass B, microbatch 0)")


H = "!torch.vtensor<[4,6],f32>"  # 96 bytes
# Collectives along dimension 1 over a group of two: the all-gather stages its [8,6]
# (192 bytes) and the reduce-scatter its moved-dimension copy of the input (96 bytes)
# and its piece (48 bytes), until their wait.
COLLECTIVES = f"""\
func.func @s0_F(%w: {H} {{piperc.key = "param:w"}}) -> ({H} {{piperc.key = "v0"}}) {{
  %alpha = "torch.constant.float"() <{{value = 1.0 : f64}}> : () -> !torch.float
  %h = "torch.aten.add.Tensor"(%w, %w, %alpha) : ({H}, {H}, !torch.float) -> {H}
  func.return %h : {H}
}}
exec.process_group @tp_0 ranks [0, 1] axis "tp"
exec.program @rank0 rank 0 world 2 {{
  %compute = exec.stream "compute"
  %comm = exec.stream "comm"
  %w = exec.state "w" : {H}
  %h = exec.launch @s0_F(%w) on %compute stage 0 pass "F" microbatch 0 : ({H}) -> {H}
  %e = exec.event_record %compute
  exec.event_wait %comm, %e
  exec.record_stream %h, %comm : {H}
  %w1, %gathered = exec.all_gather %h group @tp_0 dim 1 on %comm : {H} -> !torch.vtensor<[4,12],f32>
  %w2, %piece = exec.reduce_scatter %h group @tp_0 dim 1 sum on %comm : {H} -> !torch.vtensor<[4,3],f32>
  exec.wait %w1, %w2 on %compute
  exec.free %w, %h, %gathered, %piece : {H}, {H}, !torch.vtensor<[4,12],f32>, !torch.vtensor<[4,3],f32>
}}
"""


def test_collectives_hold_staging_buffers_until_their_wait():
    [rank0] = predict(COLLECTIVES)
    assert rank0 == PeakMemory(parameters=96, optimizer_state=0, gradients=0, activations=96 + 192 + 48,
                               comm_buffers=192 + 96 + 48, at="op #8 exec.reduce_scatter")


# ---------------------------------------------------------------- measured on local processes

ONE_F_ONE_B = piperc.pipeline(axis="pp", stages=2, microbatches=4, schedule="1f1b")
CASES = {  # name: mesh, strategy, batch shape (the peak is in the backward, or, for short rows, at the bucket)
    "dp2": (piperc.Mesh(dp=2), [piperc.data_parallel(axis="dp")], {"batch": 16}),
    "pp2": (piperc.Mesh(pp=2), [ONE_F_ONE_B], {"batch": 16}),
    "pp2xdp2": (piperc.Mesh(pp=2, dp=2), [ONE_F_ONE_B, piperc.data_parallel(axis="dp")], {"batch": 16}),
    "dp2_bucket_peak": (piperc.Mesh(dp=2), [piperc.data_parallel(axis="dp")], {"batch": 2, "seq": 4}),
    "dp2_zero1": (piperc.Mesh(dp=2), [piperc.data_parallel(axis="dp", zero=1)], {"batch": 16}),
    "dp2_zero2": (piperc.Mesh(dp=2), [piperc.data_parallel(axis="dp", zero=2)], {"batch": 16}),
    "dp2_zero3": (piperc.Mesh(dp=2), [piperc.data_parallel(axis="dp", zero=3)], {"batch": 16}),
    "tp2": (piperc.Mesh(tp=2), [piperc.tensor_parallel(axis="tp", plan={
        "blocks.*.attn.qkv.weight": piperc.Shard(0), "blocks.*.attn.proj.weight": piperc.Shard(1),
        "blocks.*.mlp.fc.weight": piperc.Shard(0), "blocks.*.mlp.proj.weight": piperc.Shard(1)})], {"batch": 16}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prediction_matches_the_runtime_count(name, tmp_path):
    """Per rank, the predicted peak is within 10% of the measured one, and so are its
    gradients and its activations; the state items and the communication buffers are the
    same bytes (sharded state, with zero, at its shard's size)."""
    mesh, strategy, shape = CASES[name]
    model, inputs = gpt.make(**shape)
    batches = [gpt.make(**shape, seed=100 + s)[1] for s in range(2)]
    compiled = piperc.compile(model, inputs, mesh=mesh, strategy=strategy, optimizer=piperc.optim.AdamW(lr=1e-3),
                              keep_ir=False)
    predicted = compiled.memory()
    result = piperc.launch(compiled, batches, timeout=240)
    measured = result.peak_memory
    report = memory_table(predicted, measured)
    assert len(predicted) == len(measured) == mesh.size, report
    for rank, (guess, actual) in enumerate(zip(predicted, measured, strict=True)):
        assert abs(actual.total - guess.total) <= 0.1 * guess.total, f"rank {rank}\n{report}"
        assert (actual.parameters, actual.optimizer_state, actual.comm_buffers) == (
            guess.parameters, guess.optimizer_state, guess.comm_buffers), report
        for item in ("gradients", "activations"):
            assert abs(getattr(actual, item) - getattr(guess, item)) <= 0.1 * getattr(guess, item), (
                f"rank {rank}, {item}\n{report}")
        assert actual.total - actual.parameters - actual.optimizer_state == result.peak_live_bytes[rank], report
        assert guess.gradients > 0 and (guess.comm_buffers > 0) == (name == "dp2_bucket_peak"), report
    compiled.dump(str(tmp_path), result=result)
    assert (tmp_path / "memory.txt").read_text() == report
