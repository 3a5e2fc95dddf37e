"""Frozen parameters, buffers and in-place writes (issue 12, item 4).

A frozen parameter (`requires_grad=False`) is captured as a `piperc.param` argument with no
`piperc.grad` result. It is placed and sharded like any parameter, never updated, reduced
or given optimizer state, and ZeRO keeps it whole. A stage whose parameters are all frozen
has no backward. A forward that writes a parameter in place is a CaptureError naming the
tensor and its module (buffers the forward updates: tests/test_buffers.py). BatchNorm trains
with batch statistics
(`track_running_stats=False`), and those are per microbatch: the one-device reference runs
microbatch-sized forwards (`train_eager(slices=replicas x microbatches)`).

IR tests first, then three real multi-process runs against one device.
"""

import json
import re

import pytest
import torch
from torch import nn

import piperc
from piperc.errors import CaptureError, PassError
from piperc.examples import gpt
from piperc.frontend import capture
from piperc.ir import make_context, parse_module
from piperc.passmanager import run_pipeline
from piperc.reference import compare, compiled_training, train_eager
from tests.test_passes_ir import PIPELINED_DP, TWO_BLOCKS, functions, header, ir, run, section
from tests.test_tensor_parallel import GPT_PLAN
from tests.test_zero import zero

# TWO_BLOCKS with blocks.0.w frozen, as capture writes it: no gradient of blocks.0.w and,
# since nothing before blocks.1 trains, no gradient of blocks.1's input either.
FROZEN_W0 = re.sub(r"    %(w1t|g0|xt|dw0) = .*\n", "", TWO_BLOCKS).replace(
    ' !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.0.w"},', "").replace(
    "func.return %loss, %dw0, %dw1 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, ",
    "func.return %loss, %dw1 : !torch.vtensor<[],f32>, ")


def run_frozen(pipeline: str) -> str:
    return run(pipeline, FROZEN_W0)


def test_a_frozen_weight_gets_no_update_no_state_and_stays_whole_under_zero3():
    out = run_frozen(zero(3))
    # Stage 0 reads only the frozen weight: it has neither a backward nor an update.
    assert functions(out) == ["s0_F", "s1_F", "s1_B", "s1_update", "main"]
    # blocks.0.w stays whole ([4,4], replicated) and is not a result; blocks.1.w is sharded.
    assert header(section(out, "func.func @main")) == (
        'func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", '
        'par.layout = #par.sharding<[[], []]>}, %w1: !torch.vtensor<[2,4],f32> {piperc.param = "blocks.1.w", '
        'par.layout = #par.sharding<[["dp"], []]>}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>, '
        'par.layout = #par.sharding<[["dp"], []]>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>, '
        'par.layout = #par.sharding<[]>}, %0: !torch.vtensor<[2,4],f32> {piperc.state = "blocks.1.w.momentum", '
        'par.layout = #par.sharding<[["dp"], []]>}) -> (!torch.vtensor<[],f32> {piperc.loss, '
        'par.layout = #par.sharding<[], partial = ["dp"]>}, !torch.vtensor<[2,4],f32> {piperc.param = "blocks.1.w", '
        'par.layout = #par.sharding<[["dp"], []]>}, !torch.vtensor<[2,4],f32> {piperc.state = "blocks.1.w.momentum", '
        'par.layout = #par.sharding<[["dp"], []]>}) {')


def test_the_schedule_runs_nothing_for_the_backward_of_a_frozen_stage():
    out = run_frozen(PIPELINED_DP + ',schedule{kind="gpipe"},expand-schedule')
    # Device 0 runs its forwards and sends them on; no gradient comes back, nothing is reduced.
    assert section(out, "par.program @device0") == ir("""
        par.program @device0 device 0 {
          %0 = par.input 0 microbatch 0 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %h0 = par.task @s0_F stage 0 pass F microbatch 0 (%0, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0 to 1 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %1 = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
          %h0_1 = par.task @s0_F stage 0 pass F microbatch 1 (%1, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0_1 to 1 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
        }
    """)


def test_a_model_whose_parameters_are_all_frozen_is_an_error_of_the_optimizer():
    all_frozen = re.sub(r"    %(h0t|dw1|c2|c4|size|false|g1) = .*\n", "", FROZEN_W0).replace(
        ', !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.1.w"}', "").replace(
        "func.return %loss, %dw1 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>",
        "func.return %loss : !torch.vtensor<[],f32>")
    ctx = make_context()
    module = parse_module(all_frozen, ctx)
    with pytest.raises(PassError) as e:
        run_pipeline(module, ctx, 'mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},'
                                  'outline-stages,optimizer{lr=0.1}')
    assert str(e.value.__cause__) == (
        "optimizer: every parameter of the model is frozen (requires_grad=False), so there is nothing "
        "to train; unfreeze the parameters to train")


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 1, bias=False)
        self.lin.weight.requires_grad_(False)

    def forward(self, x):
        return self.head(self.lin(x)).sum()


def test_capture_gives_a_frozen_parameter_an_argument_and_no_gradient():
    main = section(str(capture(Frozen(), (torch.randn(2, 4),))), "func.func @main")
    assert header(main).startswith(
        'func.func @main(%arg0: !torch.vtensor<[4,4],f32> {piperc.param = "lin.weight"}, '
        '%arg1: !torch.vtensor<[1,4],f32> {piperc.param = "head.weight"}, ')
    assert header(main).endswith(
        '-> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[1,4],f32> {piperc.grad = "head.weight"}) {')


def test_a_frozen_embedding_under_zero3_is_whole_in_the_manifest_and_has_no_optimizer_state():
    model, inputs = gpt.make(n_layers=2)
    model.embed.weight.requires_grad_(False)
    compiled = piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2, dp=2), keep_ir=False,
                              strategy=[piperc.pipeline(stages=2, microbatches=2), piperc.data_parallel(zero=3)],
                              optimizer=piperc.optim.AdamW(lr=1e-4))
    state = {s["name"]: s for s in json.loads(compiled.files["manifest.json"])["ranks"][0]["state"]}
    assert state["embed.weight"] == {"name": "embed.weight", "kind": "param"}
    assert state["pos.weight"]["layout"] == [["dp"], []]
    assert sorted(n for n in state if n.startswith(("embed.", "pos."))) == [
        "embed.weight", "pos.weight", "pos.weight.exp_avg", "pos.weight.exp_avg_sq"]


# ---------------------------------------------------------------- in-place writes


class NoGradAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.add_(1)
        return self.lin(x).sum()


class DataWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.lin.weight.data.mul_(0.5)
        return self.lin(x).sum()


class Clamped(nn.Linear):
    def forward(self, x):
        with torch.no_grad():
            self.weight.clamp_(-1, 1)
        return super().forward(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(Clamped(4, 4))

    def forward(self, x):
        return self.inner(x).sum()


@pytest.mark.parametrize("model,where", [
    (NoGradAdd(), "parameter 'lin.weight' in place (in NoGradAdd.forward)"),
    (DataWrite(), "parameter 'lin.weight' in place (in DataWrite.forward)"),
    (Outer(), "parameter 'inner.0.weight' in place (in 'inner.0' (Clamped)"),
], ids=["no-grad-add", "data-write", "submodule"])
def test_an_in_place_write_of_a_parameter_is_a_capture_error_naming_it(model, where):
    with pytest.raises(CaptureError) as e:
        capture(model, (torch.randn(2, 4),))
    assert where in str(e.value)
    assert "a parameter changes only in the optimizer step" in str(e.value)


# ---------------------------------------------------------------- buffers


class Normed(nn.Module):
    def __init__(self, **bn):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4, **bn)

    def forward(self, x):
        return self.bn(self.lin(x)).pow(2).mean()


def test_running_statistics_in_eval_mode_are_read_only_buffer_arguments():
    model = Normed()
    model.bn.eval()
    main = section(str(capture(model, (torch.randn(8, 4),))), "func.func @main")
    assert '{piperc.buffer = "bn.running_mean"}' in header(main)
    assert '{piperc.grad = "bn.weight"}' in header(main)
    assert "piperc.buffer" not in header(main).split(" -> ")[1]


# ---------------------------------------------------------------- against one device


class FrozenStageMLP(nn.Module):
    """A frozen feature stage, then a trained head with BatchNorm on batch statistics."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16, track_running_stats=False),
                                  nn.Tanh(), nn.Linear(16, 1))
        self.features.requires_grad_(False)

    def forward(self, x, y):
        return (self.head(self.features(x)).squeeze(1) - y).pow(2).mean()


def frozen_stage_mlp(seed):
    torch.manual_seed(seed)
    return FrozenStageMLP(), (torch.randn(16, 8), torch.randn(16))


def gpt_frozen(seed, frozen):
    model, inputs = gpt.make(n_layers=4, seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model, inputs


RUNS = {
    # a frozen embedding next to trained weights of the same stage; ZeRO-3 shards those only
    "gpt-frozen-embed-pp2xdp2-zero3": (
        lambda seed: gpt_frozen(seed, {"embed.weight"}), piperc.Mesh(pp=2, dp=2),
        [piperc.pipeline(stages=2, microbatches=2, schedule="1f1b"), piperc.data_parallel(zero=3)],
        piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)),
    # stage 0 all frozen (no backward); BatchNorm normalises each microbatch of each replica
    "frozen-stage-batchnorm-pp2xdp2": (
        frozen_stage_mlp, piperc.Mesh(pp=2, dp=2),
        [piperc.pipeline(stages=2, microbatches=2, schedule="gpipe", split_at=["head.0"]), piperc.data_parallel()],
        piperc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.01)),
    # frozen tensor-parallel weights: the embedding's rows and an MLP's column-parallel weight
    "gpt-frozen-tp-weights-tp2": (
        lambda seed: gpt_frozen(seed, {"embed.weight", "blocks.0.mlp.fc.weight"}), piperc.Mesh(tp=2),
        [piperc.tensor_parallel(plan=GPT_PLAN)], piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", list(RUNS))
def test_frozen_parameters_train_exactly_as_on_one_device(case):
    make, mesh, strategy, optimizer = RUNS[case]
    model, inputs = make(0)
    batches = [make(100 + s)[1] for s in range(3)]
    compiled = piperc.compile(model, inputs, mesh=mesh, strategy=strategy, optimizer=optimizer, keep_ir=False)
    result = piperc.launch(compiled, batches, timeout=240)
    _, slices, groups = compiled_training(compiled)
    losses, state = train_eager(model, batches, optimizer, slices=slices, groups=groups)
    loss_err, param_err = compare(result.losses, result.state_dict, losses, state)
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(result.state_dict[n], model.state_dict()[n]) for n in frozen)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(not torch.equal(result.state_dict[n], model.state_dict()[n]) for n in trained)
