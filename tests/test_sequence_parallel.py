"""Megatron sequence parallelism: `piperc.tensor_parallel(..., sequence_parallel=True)`.

The plan is the same; `tensor-parallel{sequence-parallel=true}` also writes the PREFERRED
layout `par.prefer` = "dimension 1 split over tp" on the model's `[batch, sequence, ...]`
inputs, and propagate-sharding splits every value traced back to that dimension along it
wherever that moves no more bytes. IR text in, IR text out on a hand-written residual MLP
(the row-parallel pending sum becomes a reduce_scatter onto the sequence, the next
column-parallel input an all_gather along it); then the same on captured models: GPT
forward and backward (its vocab-parallel embedding's sum, the layer norms' input
gradients, the layer-norm weight gradients summed) and Llama's bias-free row-parallel
projections; the errors; and real two-process training against one device.
"""

import textwrap

import pytest

import piperc
from piperc.errors import PassError, StrategyError
from piperc.examples import gpt, llama
from piperc.ir import make_context, parse_module, print_ir
from piperc.passes.propagate_sharding import sharding_report
from piperc.passes.tensor_parallel import plan_text
from piperc.passmanager import run_pipeline
from piperc.reference import compare, train_eager
from tests.test_tensor_parallel import ADAMW, GPT_PLAN, LLAMA_PLAN, STEPS, TOLERANCE


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


# x + relu(x @ w1) @ w2 (w1 column-, w2 row-parallel), a layer norm, and the next
# column-parallel matmul: the residual stream between the two.
RESIDUAL_MLP = ir("""
    builtin.module {
      par.mesh @mesh #par.mesh<["tp"=2]>
      func.func @main(%x: !torch.vtensor<[2,8,32],f32> {piperc.input = #builtin.int<0>}, %w1: !torch.vtensor<[32,64],f32> {piperc.param = "fc.weight"}, %w2: !torch.vtensor<[64,32],f32> {piperc.param = "proj.weight"}, %g: !torch.vtensor<[32],f32> {piperc.param = "norm.weight"}, %b: !torch.vtensor<[32],f32> {piperc.param = "norm.bias"}, %w3: !torch.vtensor<[32,64],f32> {piperc.param = "next.weight"}) -> (!torch.vtensor<[16,64],f32> {piperc.output = #builtin.int<0>}) {
        %c2 = "torch.constant.int"() <{value = 2 : i64}> : () -> !torch.int
        %c8 = "torch.constant.int"() <{value = 8 : i64}> : () -> !torch.int
        %c16 = "torch.constant.int"() <{value = 16 : i64}> : () -> !torch.int
        %c32 = "torch.constant.int"() <{value = 32 : i64}> : () -> !torch.int
        %one = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
        %eps = "torch.constant.float"() <{value = 1.000000e-05 : f64}> : () -> !torch.float
        %flat = "torch.prim.ListConstruct"(%c16, %c32) : (!torch.int, !torch.int) -> !torch.list<int>
        %seq = "torch.prim.ListConstruct"(%c2, %c8, %c32) : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
        %n = "torch.prim.ListConstruct"(%c32) : (!torch.int) -> !torch.list<int>
        %f = "torch.aten.view"(%x, %flat) : (!torch.vtensor<[2,8,32],f32>, !torch.list<int>) -> !torch.vtensor<[16,32],f32>
        %h = "torch.aten.mm"(%f, %w1) : (!torch.vtensor<[16,32],f32>, !torch.vtensor<[32,64],f32>) -> !torch.vtensor<[16,64],f32>
        %a = "torch.aten.relu"(%h) : (!torch.vtensor<[16,64],f32>) -> !torch.vtensor<[16,64],f32>
        %o = "torch.aten.mm"(%a, %w2) : (!torch.vtensor<[16,64],f32>, !torch.vtensor<[64,32],f32>) -> !torch.vtensor<[16,32],f32>
        %o3 = "torch.aten.view"(%o, %seq) : (!torch.vtensor<[16,32],f32>, !torch.list<int>) -> !torch.vtensor<[2,8,32],f32>
        %r = "torch.aten.add.Tensor"(%x, %o3, %one) : (!torch.vtensor<[2,8,32],f32>, !torch.vtensor<[2,8,32],f32>, !torch.int) -> !torch.vtensor<[2,8,32],f32>
        %y, %mean, %rstd = "torch.aten.native_layer_norm"(%r, %n, %g, %b, %eps) : (!torch.vtensor<[2,8,32],f32>, !torch.list<int>, !torch.vtensor<[32],f32>, !torch.vtensor<[32],f32>, !torch.float) -> (!torch.vtensor<[2,8,32],f32>, !torch.vtensor<[2,8,1],f32>, !torch.vtensor<[2,8,1],f32>)
        %yf = "torch.aten.view"(%y, %flat) : (!torch.vtensor<[2,8,32],f32>, !torch.list<int>) -> !torch.vtensor<[16,32],f32>
        %z = "torch.aten.mm"(%yf, %w3) : (!torch.vtensor<[16,32],f32>, !torch.vtensor<[32,64],f32>) -> !torch.vtensor<[16,64],f32>
        func.return %z : !torch.vtensor<[16,64],f32>
      }
    }""")
MLP_PLAN = "fc.weight=1,proj.weight=0,next.weight=1"


def lowered(text: str, sequence_parallel: bool) -> str:
    """The module after the tensor-parallel passes and lower-reshard (collectives on local types)."""
    ctx = make_context()
    module = parse_module(text, ctx)
    sp = "true" if sequence_parallel else "false"
    run_pipeline(module, ctx, f'tensor-parallel{{plan="{MLP_PLAN}" sequence-parallel={sp}}},'
                              "propagate-sharding,localise-shapes,lower-reshard")
    return print_ir(module)


def collectives(out: str) -> list[str]:
    return [line.strip().split(" : ")[0] for line in out.splitlines() if "= par." in line]


def test_the_plain_plan_all_reduces_the_row_parallel_sum():
    assert collectives(lowered(RESIDUAL_MLP, sequence_parallel=False)) == [
        '%0 = par.all_reduce %o3 over @mesh "tp" sum',
        '%1 = par.all_gather %z over @mesh "tp" dim 1',  # the whole output the step returns
    ]


def test_sequence_parallelism_reduce_scatters_onto_the_sequence_and_gathers_it_before_the_next_matmul():
    assert lowered(RESIDUAL_MLP, sequence_parallel=True) == ir("""
        builtin.module {
          par.mesh @mesh #par.mesh<["tp"=2]>
          func.func @main(%x: !torch.vtensor<[2,8,32],f32> {piperc.input = #builtin.int<0>, par.prefer = #par.sharding<[[], ["tp"], []]>, par.layout = #par.sharding<[[], [], []]>}, %w1: !torch.vtensor<[32,32],f32> {piperc.param = "fc.weight", par.layout = #par.sharding<[[], ["tp"]]>}, %w2: !torch.vtensor<[32,32],f32> {piperc.param = "proj.weight", par.layout = #par.sharding<[["tp"], []]>}, %g: !torch.vtensor<[32],f32> {piperc.param = "norm.weight", par.layout = #par.sharding<[[]]>}, %b: !torch.vtensor<[32],f32> {piperc.param = "norm.bias", par.layout = #par.sharding<[[]]>}, %w3: !torch.vtensor<[32,32],f32> {piperc.param = "next.weight", par.layout = #par.sharding<[[], ["tp"]]>}) -> (!torch.vtensor<[16,64],f32> {piperc.output = #builtin.int<0>, par.layout = #par.sharding<[[], []]>}) {
            %c2 = "torch.constant.int"() <{value = 2 : i64}> : () -> !torch.int
            %c8 = "torch.constant.int"() <{value = 8 : i64}> : () -> !torch.int
            %c16 = "torch.constant.int"() <{value = 16 : i64}> : () -> !torch.int
            %c32 = "torch.constant.int"() <{value = 32 : i64}> : () -> !torch.int
            %one = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
            %eps = "torch.constant.float"() <{value = 1.000000e-05 : f64}> : () -> !torch.float
            %flat = "torch.prim.ListConstruct"(%c16, %c32) : (!torch.int, !torch.int) -> !torch.list<int>
            %seq = "torch.prim.ListConstruct"(%c2, %c8, %c32) : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
            %n = "torch.prim.ListConstruct"(%c32) : (!torch.int) -> !torch.list<int>
            %f = "torch.aten.view"(%x, %flat) {par.layouts = [#par.sharding<[[], []]>]} : (!torch.vtensor<[2,8,32],f32>, !torch.list<int>) -> !torch.vtensor<[16,32],f32>
            %h = "torch.aten.mm"(%f, %w1) {par.layouts = [#par.sharding<[[], ["tp"]]>]} : (!torch.vtensor<[16,32],f32>, !torch.vtensor<[32,32],f32>) -> !torch.vtensor<[16,32],f32>
            %a = "torch.aten.relu"(%h) {par.layouts = [#par.sharding<[[], ["tp"]]>]} : (!torch.vtensor<[16,32],f32>) -> !torch.vtensor<[16,32],f32>
            %o = "torch.aten.mm"(%a, %w2) {par.layouts = [#par.sharding<[[], []], partial = ["tp"]>]} : (!torch.vtensor<[16,32],f32>, !torch.vtensor<[32,32],f32>) -> !torch.vtensor<[16,32],f32>
            %o3 = "torch.aten.view"(%o, %seq) {par.layouts = [#par.sharding<[[], [], []], partial = ["tp"]>]} : (!torch.vtensor<[16,32],f32>, !torch.list<int>) -> !torch.vtensor<[2,8,32],f32>
            %0 = par.all_slice %x over @mesh "tp" dim 1 : !torch.vtensor<[2,8,32],f32> -> !torch.vtensor<[2,4,32],f32>
            %1 = par.reduce_scatter %o3 over @mesh "tp" dim 1 sum : !torch.vtensor<[2,8,32],f32> -> !torch.vtensor<[2,4,32],f32>
            %r = "torch.aten.add.Tensor"(%0, %1, %one) {par.layouts = [#par.sharding<[[], ["tp"], []]>]} : (!torch.vtensor<[2,4,32],f32>, !torch.vtensor<[2,4,32],f32>, !torch.int) -> !torch.vtensor<[2,4,32],f32>
            %y, %mean, %rstd = "torch.aten.native_layer_norm"(%r, %n, %g, %b, %eps) {par.layouts = [#par.sharding<[[], ["tp"], []]>, #par.sharding<[[], ["tp"], []]>, #par.sharding<[[], ["tp"], []]>]} : (!torch.vtensor<[2,4,32],f32>, !torch.list<int>, !torch.vtensor<[32],f32>, !torch.vtensor<[32],f32>, !torch.float) -> (!torch.vtensor<[2,4,32],f32>, !torch.vtensor<[2,4,1],f32>, !torch.vtensor<[2,4,1],f32>)
            %2 = par.all_gather %y over @mesh "tp" dim 1 : !torch.vtensor<[2,4,32],f32> -> !torch.vtensor<[2,8,32],f32>
            %yf = "torch.aten.view"(%2, %flat) {par.layouts = [#par.sharding<[[], []]>]} : (!torch.vtensor<[2,8,32],f32>, !torch.list<int>) -> !torch.vtensor<[16,32],f32>
            %z = "torch.aten.mm"(%yf, %w3) {par.layouts = [#par.sharding<[[], ["tp"]]>]} : (!torch.vtensor<[16,32],f32>, !torch.vtensor<[32,32],f32>) -> !torch.vtensor<[16,32],f32>
            %3 = par.all_gather %z over @mesh "tp" dim 1 : !torch.vtensor<[16,32],f32> -> !torch.vtensor<[16,64],f32>
            func.return %3 : !torch.vtensor<[16,64],f32>
          }
        }""")


# ---------------------------------------------------------------- a captured GPT, forward and backward

REPLICATED, SEQUENCE = "#par.sharding<[[], [], []]>", '#par.sharding<[[], ["tp"], []]>'
PENDING = '#par.sharding<[[], [], []], partial = ["tp"]>'


@pytest.fixture(scope="module")
def gpt_casts():
    """The sharding report of a one-block GPT (batch 2, sequence 8) on tp=2, per plan: the
    report's lines keyed by the value cast, each `from -> to, bytes, for whom`."""
    model, inputs = gpt.make(n_layers=1, batch=2, seq=8)
    captured = piperc.capture(model, inputs)
    made = {}
    for sp in ("false", "true"):
        module = captured.module.clone()
        run_pipeline(module, captured.ctx, f'mesh{{shape="tp=2"}},tensor-parallel{{plan="{plan_text(GPT_PLAN)}" '
                                           f'sequence-parallel={sp}}},propagate-sharding{{strict=true}}')
        made[sp == "true"] = sharding_report(module)
    return made


def cast_of(report: list[str], value: str, reader: str = "") -> str:
    """The cast of `value` (`result 0 of torch.aten.embedding in 'embed' (F)`) for `reader`, from
    its layout on."""
    lines = [line.split(": ", 1)[1] for line in report if line.startswith(value + " ") and f"for {reader}" in line]
    assert len(lines) == 1, (value, report)
    return lines[0]


def test_gpt_the_vocab_parallel_sum_is_reduce_scattered_onto_the_sequence_and_gathered_before_qkv(gpt_casts):
    embedding = "result 0 of torch.aten.embedding in 'embed' (F)"
    assert cast_of(gpt_casts[False], embedding) == (
        f"{PENDING} -> {REPLICATED}, 2048 bytes per device, for torch.aten.add.Tensor in '' (F), operand 0 "
        "(elementwise)")
    assert cast_of(gpt_casts[True], embedding) == (
        f"{PENDING} -> {SEQUENCE}, 1024 bytes per device, for torch.aten.add.Tensor in '' (F), operand 0 "
        "(elementwise)")
    # the layer norm runs on the sequence shard; the column-parallel qkv reads it whole
    assert cast_of(gpt_casts[True], "result 0 of torch.aten.native_layer_norm in 'blocks.0.ln1' (F)") == (
        f"{SEQUENCE} -> {REPLICATED}, 1024 bytes per device, for torch.aten.view in 'blocks.0.attn.qkv' (F), "
        "operand 0 (reshape)")


def test_gpt_backward_reduce_scatters_the_input_gradients_of_the_layer_norms(gpt_casts):
    for norm in ("blocks.0.ln1", "blocks.0.ln2"):
        grad = f"result 0 of torch.aten.native_layer_norm_backward in '{norm}' (B)"
        assert cast_of(gpt_casts[False], grad).startswith(f"{PENDING} -> {REPLICATED}, 2048 bytes per device")
        assert not [line for line in gpt_casts[True] if line.startswith(grad + " ")]
    # the column-parallel matmuls' input gradients are what the layer norm backwards read
    for linear in ("blocks.0.attn.qkv", "blocks.0.mlp.fc"):
        reader = "torch.aten.native_layer_norm_backward"
        assert cast_of(gpt_casts[True], f"result 0 of torch.aten.view in '{linear}' (B)", reader).startswith(
            f"{PENDING} -> {SEQUENCE}, 1024 bytes per device, for {reader}")


def test_gpt_layer_norm_weight_gradients_are_summed_over_tp(gpt_casts):
    for norm, first in (("blocks.0.ln1", 3), ("blocks.0.ln2", 8), ("norm", 14)):
        for k in (1, 2):
            grad = f"result {k} of torch.aten.native_layer_norm_backward in '{norm}' (B)"
            assert cast_of(gpt_casts[True], grad) == (
                f'#par.sharding<[[]], partial = ["tp"]> -> #par.sharding<[[]]>, 128 bytes per device, for result '
                f"{first + k - 1} of @main (seeded layout)")


def test_llama_row_parallel_sums_are_reduce_scattered_onto_the_sequence():
    """Llama's projections have no bias, so attn.o and mlp.down leave pending sums (a bias
    would be added once per term: GPT's addmm gathers its input instead)."""
    model, inputs = llama.make(n_layers=1, batch=2, seq=8)
    captured = piperc.capture(model, inputs)
    for sp, target, moved in (("false", REPLICATED, 2048), ("true", SEQUENCE, 1024)):
        module = captured.module.clone()
        run_pipeline(module, captured.ctx, f'mesh{{shape="tp=2"}},tensor-parallel{{plan="{plan_text(LLAMA_PLAN)}" '
                                           f'sequence-parallel={sp}}},propagate-sharding{{strict=true}}')
        for linear in ("blocks.0.attn.o", "blocks.0.mlp.down"):
            assert cast_of(sharding_report(module), f"result 0 of torch.aten._unsafe_view in '{linear}' (F)") == (
                f"{PENDING} -> {target}, {moved} bytes per device, for torch.aten.add.Tensor in 'blocks.0' (F), "
                "operand 1 (elementwise)")


def test_a_sequence_that_does_not_split_over_tp_is_a_strategy_error():
    model, inputs = gpt.make(n_layers=1, batch=2, seq=7)
    with pytest.raises(StrategyError) as e:
        piperc.compile(model, inputs, mesh=piperc.Mesh(tp=2), optimizer=ADAMW,
                       strategy=[piperc.tensor_parallel(plan=GPT_PLAN, sequence_parallel=True)])
    assert str(e.value).startswith("tensor_parallel(axis='tp', plan={")
    assert str(e.value).endswith(
        ", sequence_parallel=True): sequence parallelism splits model input 0 !torch.vtensor<[2,7],si64> along its "
        "sequence (dimension 1, length 7) over the 2 devices of axis 'tp', and 7 is not a multiple of 2; make the "
        "sequence length a multiple of 2 or use sequence_parallel=False")


# ---------------------------------------------------------------- training, against one device


def test_gpt_tp2_sequence_parallel_matches_single_device_training():
    sizes = {"n_layers": 2, "batch": 2, "seq": 8}
    model, inputs = gpt.make(**sizes)
    compiled = piperc.compile(model, inputs, mesh=piperc.Mesh(tp=2), optimizer=ADAMW,
                              strategy=[piperc.tensor_parallel(plan=GPT_PLAN, sequence_parallel=True)])
    batches = [gpt.make(seed=100 + s, **sizes)[1] for s in range(STEPS)]
    result = piperc.launch(compiled, batches, timeout=240)
    losses, state = train_eager(model, batches, ADAMW)
    loss_err, param_err = compare(result.losses, result.state_dict, losses, state)
    assert loss_err <= TOLERANCE, f"loss relative error {loss_err:.2e}"
    assert param_err <= TOLERANCE, f"parameter relative error {param_err:.2e}"


def test_a_model_without_a_sequence_dimension_is_a_strategy_error():
    text = ir("""
        builtin.module {
          par.mesh @mesh #par.mesh<["tp"=2]>
          func.func @main(%x: !torch.vtensor<[8],f32> {piperc.input = #builtin.int<0>}, %w: !torch.vtensor<[8],f32> {piperc.param = "w"}) -> (!torch.vtensor<[8],f32> {piperc.output = #builtin.int<0>}) {
            %y = "torch.aten.mul.Tensor"(%x, %w) : (!torch.vtensor<[8],f32>, !torch.vtensor<[8],f32>) -> !torch.vtensor<[8],f32>
            func.return %y : !torch.vtensor<[8],f32>
          }
        }""")
    ctx = make_context()
    with pytest.raises(PassError) as e:
        run_pipeline(parse_module(text, ctx), ctx, 'tensor-parallel{plan="w=0" sequence-parallel=true}')
    assert str(e.value.__cause__) == (
        "tensor-parallel: sequence parallelism splits dimension 1 of the model's [batch, sequence, ...] inputs, but "
        "the model's inputs are !torch.vtensor<[8],f32>; use sequence_parallel=False")
