"""Several stages per pipeline device: interleaved 1F1B, and the real runs of Hanayo's waves
and Chimera's stage replicas (issue 8).

`pipeline(stages=v * pp, schedule="interleaved")` places stage s on device s mod pp and
runs torch's Interleaved1F1B order (the schedule as data: tests/test_schedules.py). The IR
side: a device's program holds the tasks of all its stages, gradient buckets reduce over
the devices that hold their stages, and a weight tied across two stages of one device is
refused. Then real multi-process runs against one device.
"""

import pytest

import piperc
from piperc.errors import PassError, StrategyError
from piperc.examples import gpt, llama, tied
from tests.shared import check_exact, compile_, device_param, setup
from tests.test_passes_ir import ir, section
from tests.test_passes_ir import run as run_ir

# Four single-matmul stages, two per device, one microbatch (loop placement: stages 0 and 2
# on device 0, 1 and 3 on device 1).
FOUR_BLOCKS = ir(
    """
    builtin.module {
      func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w"}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w"}, %w2: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.2.w"}, %w3: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.3.w"}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.0.w"}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.1.w"}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.2.w"}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.3.w"}) {
        %h0 = "torch.aten.mm"(%x, %w0) {piperc.origin = #par.origin<"blocks.0.lin", F>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %h1 = "torch.aten.mm"(%h0, %w1) {piperc.origin = #par.origin<"blocks.1.lin", F>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %h2 = "torch.aten.mm"(%h1, %w2) {piperc.origin = #par.origin<"blocks.2.lin", F>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %h3 = "torch.aten.mm"(%h2, %w3) {piperc.origin = #par.origin<"blocks.3.lin", F>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %none = "torch.constant.none"() {piperc.origin = #par.origin<"", F>} : () -> !torch.none
        %loss = "torch.aten.sum"(%h3, %none) {piperc.origin = #par.origin<"", F>} : (!torch.vtensor<[2,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
        %c2 = "torch.constant.int"() <{value = 2 : i64}> {piperc.origin = #par.origin<"", B>} : () -> !torch.int
        %c4 = "torch.constant.int"() <{value = 4 : i64}> {piperc.origin = #par.origin<"", B>} : () -> !torch.int
        %size = "torch.prim.ListConstruct"(%c2, %c4) {piperc.origin = #par.origin<"", B>} : (!torch.int, !torch.int) -> !torch.list<int>
        %false = "torch.constant.bool"() <{value = false}> {piperc.origin = #par.origin<"", B>} : () -> !torch.bool
        %g3 = "torch.aten.expand"(%dloss, %size, %false) {piperc.origin = #par.origin<"", B>} : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[2,4],f32>
        %h2t = "torch.aten.t"(%h2) {piperc.origin = #par.origin<"blocks.3.lin", B>} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw3 = "torch.aten.mm"(%h2t, %g3) {piperc.origin = #par.origin<"blocks.3.lin", B>} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        %w3t = "torch.aten.t"(%w3) {piperc.origin = #par.origin<"blocks.3.lin", B>} : (!torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
        %g2 = "torch.aten.mm"(%g3, %w3t) {piperc.origin = #par.origin<"blocks.3.lin", B>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %h1t = "torch.aten.t"(%h1) {piperc.origin = #par.origin<"blocks.2.lin", B>} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw2 = "torch.aten.mm"(%h1t, %g2) {piperc.origin = #par.origin<"blocks.2.lin", B>} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        %w2t = "torch.aten.t"(%w2) {piperc.origin = #par.origin<"blocks.2.lin", B>} : (!torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
        %g1 = "torch.aten.mm"(%g2, %w2t) {piperc.origin = #par.origin<"blocks.2.lin", B>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %h0t = "torch.aten.t"(%h0) {piperc.origin = #par.origin<"blocks.1.lin", B>} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw1 = "torch.aten.mm"(%h0t, %g1) {piperc.origin = #par.origin<"blocks.1.lin", B>} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        %w1t = "torch.aten.t"(%w1) {piperc.origin = #par.origin<"blocks.1.lin", B>} : (!torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
        %g0 = "torch.aten.mm"(%g1, %w1t) {piperc.origin = #par.origin<"blocks.1.lin", B>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %xt = "torch.aten.t"(%x) {piperc.origin = #par.origin<"blocks.0.lin", B>} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw0 = "torch.aten.mm"(%xt, %g0) {piperc.origin = #par.origin<"blocks.0.lin", B>} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        func.return %loss, %dw0, %dw1, %dw2, %dw3 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
      }
    }
    """
)

STAGED = ('pipeline-split{stages=4},outline-stages,optimizer{lr=0.1},data-parallel,microbatch{count=1 replicas=2},'
          'schedule{kind="interleaved"},expand-schedule')


def run(pipeline: str) -> str:
    return run_ir(pipeline, FOUR_BLOCKS)


def test_a_device_runs_the_tasks_of_its_two_stages_and_reduces_both_stages_gradients():
    out = run('mesh{shape="pp=2,dp=2"},' + STAGED)
    # Device 1 holds stages 1 and 3: it receives stage 0's output, runs 1F0, sends to stage 2
    # (device 0) in one batch with the receive of stage 2's output, runs 3F0 and 3B0, updates
    # stage 3 once its bucket is reduced, and on the way back runs 1B0 and updates stage 1.
    assert section(out, "par.program @device1") == ir("""
        par.program @device1 device 1 {
          %h0 = par.recv from 0 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %w1 = par.state "blocks.1.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %h1 = par.task @s1_F stage 1 pass F microbatch 0 (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h1 to 0 "h1 mb0" batch 1 : !torch.vtensor<[2,4],f32>
          %h2 = par.recv from 0 "h2 mb0" batch 1 : !torch.vtensor<[2,4],f32>
          %w3 = par.state "blocks.3.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %loss, %0 = par.task @s3_F stage 3 pass F microbatch 0 (%h2, %w3) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          par.output "loss", %0 : !torch.vtensor<[],f32>
          %g2, %dw3 = par.task @s3_B stage 3 pass B microbatch 0 (%h2, %w3) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          par.send %g2 to 0 "g2 mb0" batch 2 : !torch.vtensor<[2,4],f32>
          %1 = par.all_reduce_bucket 0 stage 3 (%dw3) over @mesh ["dp"] stages [3] : !torch.vtensor<[4,4],f32>
          %2 = par.task @s3_update stage 3 pass update (%w3, %1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.3.w", %2 : !torch.vtensor<[4,4],f32>
          %g1 = par.recv from 0 "g1 mb0" batch 3 : !torch.vtensor<[2,4],f32>
          %g0, %dw1 = par.task @s1_B stage 1 pass B microbatch 0 (%h0, %g1, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          par.send %g0 to 0 "g0 mb0" batch 4 : !torch.vtensor<[2,4],f32>
          %3 = par.all_reduce_bucket 0 stage 1 (%dw1) over @mesh ["dp"] stages [1] : !torch.vtensor<[4,4],f32>
          %4 = par.task @s1_update stage 1 pass update (%w1, %3) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.1.w", %4 : !torch.vtensor<[4,4],f32>
        }
    """)


def test_each_stages_bucket_reduces_over_the_replicas_of_its_own_device():
    out = run('mesh{shape="pp=2,dp=2"},' + STAGED + ",lower-to-exec")
    # ranks (pp, dp): 0 = (0, 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1); stages 1 and 3 live on
    # pipeline device 1, so both their buckets reduce over ranks 2 and 3.
    groups = [line.strip() for line in out.splitlines() if "exec.process_group @grad" in line]
    assert groups == ["exec.process_group @grad_0 ranks [0, 1]", "exec.process_group @grad_1 ranks [2, 3]"]


def test_stages_that_do_not_divide_over_the_devices_are_an_error():
    with pytest.raises(PassError, match="stages must be a multiple of 2"):
        run('mesh{shape="pp=2,dp=2"},' + STAGED.replace("stages=4", "stages=3"))


def test_a_weight_tied_across_two_stages_of_one_device_is_an_error():
    model, inputs = tied.make(n_layers=4)
    # stages 0 (the embedding) and 3 (the head, tied to it) both on device 0
    table = [["0F0", "3F0", "3B0", "0B0"], ["1F0", "2F0", "2B0", "1B0"]]
    with pytest.raises(StrategyError, match=r"tied across stages \[0, 3\] would have two of them on one device"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2), strategy=[piperc.pipeline(stages=4, schedule=table)],
                       optimizer=piperc.optim.SGD(lr=0.1), keep_ir=False)


# ---------------------------------------------------------------- against one device

ADAMW = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)
CASES = {
    # name: (example, layers, mesh, stages, microbatches, schedule)
    "gpt-pp2-v2": (gpt, 4, piperc.Mesh(pp=2), 4, 4, "interleaved"),
    "llama-pp2-v2": (llama, 4, piperc.Mesh(pp=2), 4, 4, "interleaved"),
    "gpt-pp4-v2": (gpt, 8, piperc.Mesh(pp=4), 8, 8, "interleaved"),
    "llama-pp4-v2": (llama, 8, piperc.Mesh(pp=4), 8, 8, "interleaved"),
    "gpt-pp2xdp2-v2": (gpt, 4, piperc.Mesh(pp=2, dp=2), 4, 2, "interleaved"),
    # Hanayo's wave placement: one wave at pp=2 and pp=4, two waves (8 stages) at pp=2 x dp=2.
    # Every schedule runs GPT and Llama at pp=2 and pp=4 and GPT at pp=2 x dp=2.
    "hanayo-gpt-pp2": (gpt, 4, piperc.Mesh(pp=2), 4, 4, "hanayo"),
    "hanayo-llama-pp4": (llama, 8, piperc.Mesh(pp=4), 8, 4, "hanayo"),
    "hanayo-gpt-pp4": (gpt, 8, piperc.Mesh(pp=4), 8, 8, "hanayo"),
    "hanayo-llama-pp2": (llama, 4, piperc.Mesh(pp=2), 4, 4, "hanayo"),
    "hanayo-gpt-pp2xdp2-w2": (gpt, 8, piperc.Mesh(pp=2, dp=2), 8, 2, "hanayo"),
    # Chimera: one stage per device in each of two pipelines over replicas of the stages
    "chimera-gpt-pp2": (gpt, 4, piperc.Mesh(pp=2), 2, 4, "chimera"),
    "chimera-llama-pp4": (llama, 8, piperc.Mesh(pp=4), 4, 8, "chimera"),
    "chimera-gpt-pp4": (gpt, 8, piperc.Mesh(pp=4), 4, 8, "chimera"),
    "chimera-llama-pp2": (llama, 4, piperc.Mesh(pp=2), 2, 4, "chimera"),
    "chimera-gpt-pp2xdp2": (gpt, 4, piperc.Mesh(pp=2, dp=2), 2, 4, "chimera"),
}


@pytest.mark.parametrize("name,device", [device_param(n, CASES[n][2].size, d) for d in ("cpu", "cuda") for n in CASES])
def test_several_stages_per_device_train_as_one_device(name, device):
    example, layers, mesh, stages, microbatches, schedule = CASES[name]
    strategy = [piperc.pipeline(stages=stages, microbatches=microbatches, schedule=schedule)]
    if "dp" in mesh.axes:
        strategy.append(piperc.data_parallel())
    compiled = compile_(example, layers, mesh=mesh, strategy=strategy, optimizer=ADAMW, device=device)
    assert {compiled.schedule.device_of(s) for s in range(stages)} == set(range(mesh.axes["pp"]))
    assert compiled.schedule.replicas == (2 if schedule == "chimera" else 1)
    result = piperc.launch(compiled, setup(example, layers).batches, timeout=240)
    check_exact(example, layers, ADAMW, result, microbatches * mesh.axes.get("dp", 1))
