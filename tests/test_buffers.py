"""Buffers the forward updates: BatchNorm's running statistics and counters (issue 12, item 4).

Capture returns each updated buffer's increment (the update with the old value read as
zeros) and its decay; `running-buffers` weights each slice's increment by
decay**(S-1-slice), sums them over microbatches and replicas, and updates the buffer once
per step: what one device running the step's S = replicas x microbatches slices in order
leaves (`train_eager(slices=S)`). IR tests first, then capture, errors, and real
multi-process runs against one device (with a checkpoint resumed under another strategy).
"""

import tempfile

import pytest
import torch
from torch import nn

import piperc
from piperc.checkpoint import to_state_dict
from piperc.errors import CaptureError
from piperc.frontend import capture
from piperc.reference import compare, train_eager
from tests.test_passes_ir import functions, header, ir, section
from tests.test_passes_ir import run as run_ir

# The captured step of a linear layer followed by a running mean of its output and a
# counter, as capture writes BatchNorm's: `bn.running_mean` becomes 0.9 * itself + the
# increment `0.1 * mean(h, 0)`, `bn.count` (si64) itself + 1.
RUNNING = ir(
    """
    builtin.module {
      func.func @main(%w: !torch.vtensor<[4,4],f32> {piperc.param = "lin.w"}, %mean: !torch.vtensor<[4],f32> {piperc.buffer = "bn.running_mean"}, %count: !torch.vtensor<[],si64> {piperc.buffer = "bn.count"}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[4,4],f32> {piperc.grad = "lin.w"}, !torch.vtensor<[4],f32> {piperc.increment = "bn.running_mean", piperc.decay = 9.000000e-01 : f64}, !torch.vtensor<[],si64> {piperc.increment = "bn.count", piperc.decay = 1.000000e+00 : f64}) {
        %h = "torch.aten.mm"(%x, %w) {piperc.origin = #par.origin<"lin", F>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %none = "torch.constant.none"() {piperc.origin = #par.origin<"", F>} : () -> !torch.none
        %loss = "torch.aten.sum"(%h, %none) {piperc.origin = #par.origin<"", F>} : (!torch.vtensor<[2,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
        %c0 = "torch.constant.int"() <{value = 0 : i64}> {piperc.origin = #par.origin<"bn", F>} : () -> !torch.int
        %rows = "torch.prim.ListConstruct"(%c0) {piperc.origin = #par.origin<"bn", F>} : (!torch.int) -> !torch.list<int>
        %false = "torch.constant.bool"() <{value = false}> {piperc.origin = #par.origin<"bn", F>} : () -> !torch.bool
        %m = "torch.aten.mean.dim"(%h, %rows, %false, %none) {piperc.origin = #par.origin<"bn", F>} : (!torch.vtensor<[2,4],f32>, !torch.list<int>, !torch.bool, !torch.none) -> !torch.vtensor<[4],f32>
        %momentum = "torch.constant.float"() <{value = 1.000000e-01 : f64}> {piperc.origin = #par.origin<"bn", F>} : () -> !torch.float
        %inc = "torch.aten.mul.Scalar"(%m, %momentum) {piperc.origin = #par.origin<"bn", F>} : (!torch.vtensor<[4],f32>, !torch.float) -> !torch.vtensor<[4],f32>
        %scalar = "torch.prim.ListConstruct"() {piperc.origin = #par.origin<"bn", F>} : () -> !torch.list<int>
        %int64 = "torch.constant.int"() <{value = 4 : i64}> {piperc.origin = #par.origin<"bn", F>} : () -> !torch.int
        %cpu = "torch.constant.device"() <{value = "cpu"}> {piperc.origin = #par.origin<"bn", F>} : () -> !torch.Device
        %zero = "torch.aten.zeros"(%scalar, %int64, %none, %cpu, %false) {piperc.origin = #par.origin<"bn", F>} : (!torch.list<int>, !torch.int, !torch.none, !torch.Device, !torch.bool) -> !torch.vtensor<[],si64>
        %c1 = "torch.constant.int"() <{value = 1 : i64}> {piperc.origin = #par.origin<"bn", F>} : () -> !torch.int
        %step = "torch.aten.add.Scalar"(%zero, %c1, %c1) {piperc.origin = #par.origin<"bn", F>} : (!torch.vtensor<[],si64>, !torch.int, !torch.int) -> !torch.vtensor<[],si64>
        %c2 = "torch.constant.int"() <{value = 2 : i64}> {piperc.origin = #par.origin<"", B>} : () -> !torch.int
        %c4 = "torch.constant.int"() <{value = 4 : i64}> {piperc.origin = #par.origin<"", B>} : () -> !torch.int
        %size = "torch.prim.ListConstruct"(%c2, %c4) {piperc.origin = #par.origin<"", B>} : (!torch.int, !torch.int) -> !torch.list<int>
        %g = "torch.aten.expand"(%dloss, %size, %false) {piperc.origin = #par.origin<"", B>} : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[2,4],f32>
        %xt = "torch.aten.t"(%x) {piperc.origin = #par.origin<"lin", B>} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw = "torch.aten.mm"(%xt, %g) {piperc.origin = #par.origin<"lin", B>} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        func.return %loss, %dw, %inc, %step : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4],f32>, !torch.vtensor<[],si64>
      }
    }
    """
)

DP2_MB2 = ('mesh{shape="pp=1,dp=2"},pipeline-split{stages=1},outline-stages,optimizer{lr=0.1},data-parallel,'
           "microbatch{count=2 replicas=2}")


def run(pipeline: str, text: str = RUNNING) -> str:
    return run_ir(pipeline, text)


def test_the_forward_weights_its_increment_by_the_decay_to_the_slices_after_its_own():
    out = run(DP2_MB2 + ",running-buffers")
    forward = section(out, "func.func @s0_F")
    # 2 replicas x 2 microbatches = 4 slices: slice j's increment counts 0.9**(3 - j) times;
    # the counter (decay 1) is not weighted.
    assert forward.endswith(ir("""
          %4 = par.slice_index : !torch.int
          %5 = "torch.constant.int"() <{value = 3 : i64}> : () -> !torch.int
          %6 = "torch.aten.sub.int"(%5, %4) : (!torch.int, !torch.int) -> !torch.int
          %7 = "torch.constant.float"() <{value = 9.000000e-01 : f64}> : () -> !torch.float
          %8 = "torch.aten.pow.float_int"(%7, %6) : (!torch.float, !torch.int) -> !torch.float
          %9 = "torch.aten.mul.Scalar"(%inc, %8) : (!torch.vtensor<[4],f32>, !torch.float) -> !torch.vtensor<[4],f32>
          func.return %loss, %9, %step, %3 : !torch.vtensor<[],f32>, !torch.vtensor<[4],f32>, !torch.vtensor<[],si64>, !torch.vtensor<[],f32>
        }
    """))
    # The increments are partial sums over dp (data-parallel), as the gradients are.
    assert ('!torch.vtensor<[4],f32> {piperc.key = "increment:bn.running_mean", '
            'par.layout = #par.sharding<[[]], partial = ["dp"]>}') in header(forward)


def test_the_step_sums_the_increments_over_dp_and_updates_each_buffer_once():
    out = run(DP2_MB2 + ",running-buffers")
    assert functions(out) == ["s0_F", "s0_B", "s0_update", "s0_F_accumulate", "s0_B_accumulate", "s0_buffers", "main"]
    # decay**4 times the buffer plus the summed increments; the counter adds its count
    # with an integer alpha.
    assert section(out, "func.func @s0_buffers") == ir("""
        func.func @s0_buffers(%0: !torch.vtensor<[4],f32> {piperc.key = "buffer:bn.running_mean", par.layout = #par.sharding<[[]]>}, %1: !torch.vtensor<[4],f32> {piperc.key = "increment:bn.running_mean", par.layout = #par.sharding<[[]]>}, %2: !torch.vtensor<[],si64> {piperc.key = "buffer:bn.count", par.layout = #par.sharding<[]>}, %3: !torch.vtensor<[],si64> {piperc.key = "increment:bn.count", par.layout = #par.sharding<[]>}) -> (!torch.vtensor<[4],f32> {piperc.key = "buffer:bn.running_mean", par.layout = #par.sharding<[[]]>}, !torch.vtensor<[],si64> {piperc.key = "buffer:bn.count", par.layout = #par.sharding<[]>}) {
          %4 = "torch.constant.float"() <{value = 6.561000e-01 : f64}> : () -> !torch.float
          %5 = "torch.aten.mul.Scalar"(%0, %4) : (!torch.vtensor<[4],f32>, !torch.float) -> !torch.vtensor<[4],f32>
          %6 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %7 = "torch.aten.add.Tensor"(%5, %1, %6) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>, !torch.float) -> !torch.vtensor<[4],f32>
          %8 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
          %9 = "torch.aten.add.Tensor"(%2, %3, %8) : (!torch.vtensor<[],si64>, !torch.vtensor<[],si64>, !torch.int) -> !torch.vtensor<[],si64>
          func.return %7, %9 : !torch.vtensor<[4],f32>, !torch.vtensor<[],si64>
        }
    """)
    main = section(out, "func.func @main")
    assert ir("\n".join(main.splitlines()[1:])) == ir("""
          %loss, %inc, %step, %0 = par.task @s0_F stage 0 pass F (%x, %w) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[4],f32>, !torch.vtensor<[],si64>, !torch.vtensor<[],f32>)
          %inc_1, %step_1, %1 = par.accumulate @s0_F_accumulate stage 0 (%inc, %step, %0) : !torch.vtensor<[4],f32>, !torch.vtensor<[],si64>, !torch.vtensor<[],f32>
          %dw = par.task @s0_B stage 0 pass B (%x) : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %dw_1 = par.accumulate @s0_B_accumulate stage 0 (%dw) : !torch.vtensor<[4,4],f32>
          %2 = par.all_reduce_bucket 0 stage 0 (%dw_1) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %3 = par.task @s0_update stage 0 pass update (%w, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %4 = par.all_reduce_bucket 1 stage 0 (%inc_1) over @mesh ["dp"] stages [0] : !torch.vtensor<[4],f32>
          %5 = par.all_reduce_bucket 2 stage 0 (%step_1) over @mesh ["dp"] stages [0] : !torch.vtensor<[],si64>
          %mean_1, %count_1 = par.task @s0_buffers stage 0 pass update (%mean, %4, %count, %5) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>, !torch.vtensor<[],si64>, !torch.vtensor<[],si64>) -> (!torch.vtensor<[4],f32>, !torch.vtensor<[],si64>)
          func.return %1, %mean_1, %count_1, %3 : !torch.vtensor<[],f32>, !torch.vtensor<[4],f32>, !torch.vtensor<[],si64>, !torch.vtensor<[4,4],f32>
        }
    """)
    # The step returns the new buffers; the device programs store them.
    assert header(main).endswith(
        '-> (!torch.vtensor<[],f32> {piperc.loss, par.layout = #par.sharding<[], partial = ["dp"]>}, '
        '!torch.vtensor<[4],f32> {piperc.buffer = "bn.running_mean", par.layout = #par.sharding<[[]]>}, '
        '!torch.vtensor<[],si64> {piperc.buffer = "bn.count", par.layout = #par.sharding<[]>}, '
        '!torch.vtensor<[4,4],f32> {piperc.param = "lin.w", par.layout = #par.sharding<[[], []]>}) {')
    program = section(run(DP2_MB2 + ',running-buffers,schedule{kind="gpipe"},expand-schedule'), "par.program @device0")
    assert 'par.set_state "bn.running_mean", %mean_1' in program and 'par.set_state "bn.count", %count_1' in program


def test_one_slice_needs_no_weight_and_no_reduction():
    out = run('mesh{shape="pp=1"},pipeline-split{stages=1},outline-stages,optimizer{lr=0.1},microbatch,running-buffers')
    assert "par.slice_index" not in out and "par.all_reduce_bucket" not in out
    assert '"torch.constant.float"() <{value = 9.000000e-01 : f64}>' in section(out, "func.func @s0_buffers")


def test_a_step_without_increments_is_left_as_it_is():
    from tests.test_passes_ir import TWO_BLOCKS
    pipeline = 'mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,optimizer{lr=0.1},microbatch'
    assert run(pipeline + ",running-buffers", TWO_BLOCKS) == run(pipeline, TWO_BLOCKS)


def test_expand_schedule_refuses_increments_that_were_never_turned_into_updates():
    with pytest.raises(Exception, match="running-buffers"):
        run(DP2_MB2 + ',schedule{kind="gpipe"},expand-schedule')


# ---------------------------------------------------------------- capture


class Normed(nn.Module):
    def __init__(self, **bn):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)
        self.bn = nn.BatchNorm1d(4, **bn)

    def forward(self, x):
        return self.bn(self.lin(x)).pow(2).mean()


def test_capture_returns_each_running_statistic_as_an_increment_with_its_decay():
    main = section(str(capture(Normed(momentum=0.25), (torch.randn(8, 4),))), "func.func @main")
    results = header(main).split(" -> ")[1]
    assert results.startswith("(!torch.vtensor<[],f32> {piperc.loss}, ")
    assert results.endswith(
        '!torch.vtensor<[4],f32> {piperc.increment = "bn.running_mean", piperc.decay = 7.500000e-01 : f64}, '
        '!torch.vtensor<[4],f32> {piperc.increment = "bn.running_var", piperc.decay = 7.500000e-01 : f64}, '
        '!torch.vtensor<[],si64> {piperc.increment = "bn.num_batches_tracked", piperc.decay = 1.000000e+00 : f64}) {')
    # The forward reads zeros where it read the running statistics: its results are the increments.
    norm = next(line for line in main.splitlines() if "_native_batch_norm_legit_functional" in line)
    zeros = [line.split(" = ")[0].strip() for line in main.splitlines() if '"torch.aten.zeros"' in line]
    assert len(zeros) == 3 and all(z in norm for z in zeros[1:])


class Custom(nn.Module):
    def __init__(self, update):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(4))
        self.update = update

    def forward(self, x):
        h = self.lin(x)
        with torch.no_grad():
            self.update(self.seen, h)
        return h.pow(2).mean()


@pytest.mark.parametrize("update", [
    lambda seen, h: seen.mul_(0.5),
    lambda seen, h: seen.copy_(h.mean(0)),
    lambda seen, h: seen.add_(h.mean(0)).mul_(0.9),
], ids=["scale", "overwrite", "add-then-scale"])
def test_a_buffer_update_that_is_not_decay_times_buffer_plus_increment_is_a_capture_error(update):
    with pytest.raises(CaptureError) as e:
        capture(Custom(update), (torch.randn(8, 4),))
    assert str(e.value).startswith("Custom.forward updates buffer 'seen' of Custom in place")
    assert "cannot split over microbatches and replicas" in str(e.value)
    assert "BatchNorm's running statistics" in str(e.value)


def test_a_counter_buffer_is_an_increment_with_decay_one():
    main = section(str(capture(Custom(lambda seen, h: seen.add_(2.0)), (torch.randn(8, 4),))), "func.func @main")
    assert header(main).endswith(
        '!torch.vtensor<[4],f32> {piperc.increment = "seen", piperc.decay = 1.000000e+00 : f64}) {')


def test_a_batchnorm_with_a_cumulative_average_is_a_capture_error_naming_it():
    with pytest.raises(CaptureError) as e:
        capture(Normed(momentum=None), (torch.randn(8, 4),))
    assert str(e.value).startswith("'bn' (BatchNorm1d) has momentum=None")
    assert "Give it a momentum" in str(e.value)


# ---------------------------------------------------------------- against one device


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8, bias=False)  # a bias before BatchNorm has no gradient
        self.bn = nn.BatchNorm1d(8, momentum=0.2)

    def forward(self, x):
        return torch.relu(self.bn(self.lin(x)))


class NormedMLP(nn.Module):
    """Two blocks with BatchNorm in training mode (running statistics), then a head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 1)

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return (self.head(x).squeeze(1) - y).pow(2).mean()


def normed_mlp(seed):
    torch.manual_seed(seed)
    return NormedMLP(), (torch.randn(16, 8), torch.randn(16))


ADAMW = piperc.optim.AdamW(lr=1e-3, weight_decay=0.01)
PP2xDP2 = (piperc.Mesh(pp=2, dp=2), [piperc.pipeline(stages=2, microbatches=2, schedule="1f1b"), piperc.data_parallel()])


def buffers(state):
    return {k: v for k, v in state.items() if "running" in k or "num_batches" in k}


def test_running_statistics_train_under_pp2xdp2_as_one_device_running_the_slices_in_order():
    model, inputs = normed_mlp(0)
    batches = [normed_mlp(100 + s)[1] for s in range(3)]
    compiled = piperc.compile(model, inputs, mesh=PP2xDP2[0], strategy=PP2xDP2[1], optimizer=ADAMW, keep_ir=False)
    assert compiled.batch_statistics == 2
    result = piperc.launch(compiled, batches, timeout=240)
    losses, state = train_eager(model, batches, ADAMW, slices=4, groups=2)
    loss_err, param_err = compare(result.losses, result.state_dict, losses, state)
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)
    got = buffers(result.state_dict)
    assert set(got) == set(buffers(model.state_dict())) and len(got) == 6
    # 3 steps of 4 slices each; the running statistics moved.
    assert all(got[f"blocks.{i}.bn.num_batches_tracked"].item() == 12 for i in (0, 1))
    assert not torch.equal(got["blocks.1.bn.running_var"], model.state_dict()["blocks.1.bn.running_var"])


def test_verify_of_a_batchnorm_model_compares_with_the_sliced_run_and_says_exact():
    model, inputs = normed_mlp(1)
    compiled = piperc.compile(model, inputs, mesh=piperc.Mesh(dp=2), strategy=[piperc.data_parallel(zero=3)],
                              optimizer=ADAMW, keep_ir=False)
    report = piperc.verify(model, inputs, compiled)
    assert report.verdict == "exact", report


def test_running_statistics_travel_in_a_checkpoint_resumed_under_another_strategy():
    # pp=2 x dp=2 with 2 microbatches and dp=4 cut each batch into the same 4 slices.
    model, inputs = normed_mlp(2)
    batches = [normed_mlp(200 + s)[1] for s in range(4)]
    first = piperc.compile(model, inputs, mesh=PP2xDP2[0], strategy=PP2xDP2[1], optimizer=ADAMW, keep_ir=False)
    then = piperc.compile(model, inputs, mesh=piperc.Mesh(dp=4), strategy=[piperc.data_parallel(zero=3)],
                          optimizer=ADAMW, keep_ir=False)
    with tempfile.TemporaryDirectory() as root:
        piperc.launch(first, batches[:2], checkpoint_dir=root, checkpoint_every=2, timeout=240)
        assert to_state_dict(root)["blocks.0.bn.num_batches_tracked"].item() == 8
        result = piperc.launch(then, batches, checkpoint_dir=root, resume=True, timeout=240)
    losses, state = train_eager(model, batches, ADAMW, slices=4)
    assert result.first_step == 2
    loss_err, param_err = compare(result.losses, result.state_dict, losses[2:], state)
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)
    assert result.state_dict["blocks.1.bn.num_batches_tracked"].item() == 16
