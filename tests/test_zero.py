"""ZeRO over the data-parallel axis (the `zero` pass): IR text in, IR text out, then real
multi-process training against one device.

The IR tests run on TWO_BLOCKS (tests/test_passes_ir.py): two [4,4] weights split over
`dp=2` into [2,4] shards along dimension 0, with SGD and momentum so that each weight has
optimizer state.
"""

import json
import re

import pytest

import piperc
from piperc.errors import PassError, StrategyError
from piperc.examples import gpt, llama, tied
from piperc.reference import compare, train_eager
from tests.test_passes_ir import header, ir, run, section
from tests.test_tensor_parallel import GPT_PLAN

ZERO = ('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
        'optimizer{lr=0.1 momentum=0.9},data-parallel{axis="dp"},zero{stage=STAGE}')


def zero(stage: int) -> str:
    return ZERO.replace("STAGE", str(stage))


def test_zero1_updates_the_shard_of_each_weight_and_gathers_it_back():
    # The momentum is held as this replica's [2,4] shard; the all-reduced gradient and the
    # weight are sliced to it (Replicate -> Shard: no communication) and the new weight is
    # gathered whole (Shard -> Replicate).
    out = run(zero(1))
    assert section(out, "func.func @s1_update") == ir(
        """
        func.func @s1_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[[], []]>}, %2: !torch.vtensor<[2,4],f32> {piperc.key = "state:blocks.1.w.momentum", par.layout = #par.sharding<[["dp"], []]>}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[2,4],f32> {piperc.key = "state:blocks.1.w.momentum", par.layout = #par.sharding<[["dp"], []]>}) {
          %3 = par.reshard %0 @mesh from #par.sharding<[[], []]> to #par.sharding<[["dp"], []]> : !torch.vtensor<[4,4],f32> -> !torch.vtensor<[2,4],f32>
          %4 = par.reshard %1 @mesh from #par.sharding<[[], []]> to #par.sharding<[["dp"], []]> : !torch.vtensor<[4,4],f32> -> !torch.vtensor<[2,4],f32>
          %5 = "torch.constant.float"() <{value = 9.000000e-01 : f64}> : () -> !torch.float
          %6 = "torch.aten.mul.Scalar"(%2, %5) : (!torch.vtensor<[2,4],f32>, !torch.float) -> !torch.vtensor<[2,4],f32>
          %7 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %8 = "torch.aten.add.Tensor"(%6, %4, %7) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>, !torch.float) -> !torch.vtensor<[2,4],f32>
          %9 = "torch.constant.float"() <{value = -1.000000e-01 : f64}> : () -> !torch.float
          %10 = "torch.aten.add.Tensor"(%3, %8, %9) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>, !torch.float) -> !torch.vtensor<[2,4],f32>
          %11 = par.reshard %10 @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], []]> : !torch.vtensor<[2,4],f32> -> !torch.vtensor<[4,4],f32>
          func.return %11, %8 : !torch.vtensor<[4,4],f32>, !torch.vtensor<[2,4],f32>
        }
    """
    )
    step = section(out, "func.func @main")
    assert "par.all_reduce_bucket 0 stage 1 (%dw1)" in step
    assert ('%1: !torch.vtensor<[2,4],f32> {piperc.state = "blocks.1.w.momentum", '
            'par.layout = #par.sharding<[["dp"], []]>}') in header(step)


def test_zero2_reduce_scatters_the_gradient_instead_of_all_reducing_it():
    out = run(zero(2))
    assert "par.all_reduce_bucket" not in section(out, "func.func @main")
    update = section(out, "func.func @s1_update").splitlines()
    assert update[2] == (
        '  %4 = par.reshard %1 @mesh from #par.sharding<[[], []], partial = ["dp"]> to '
        '#par.sharding<[["dp"], []]> : !torch.vtensor<[4,4],f32> -> !torch.vtensor<[2,4],f32>')


def test_zero3_holds_weights_as_shards_and_gathers_them_in_every_forward_and_backward():
    out = run(zero(3))
    assert header(section(out, "func.func @main")).startswith(
        'func.func @main(%w0: !torch.vtensor<[2,4],f32> {piperc.param = "blocks.0.w", '
        'par.layout = #par.sharding<[["dp"], []]>}, %w1: !torch.vtensor<[2,4],f32> {piperc.param = "blocks.1.w", '
        'par.layout = #par.sharding<[["dp"], []]>}')
    for fn in ("@s1_F", "@s1_B"):
        gather = section(out, f"func.func {fn}").splitlines()[1]
        assert gather.startswith("  %") and " = par.reshard " in gather
        assert ('@mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], []]> : '
                '!torch.vtensor<[2,4],f32> -> !torch.vtensor<[4,4],f32>') in gather
    update = section(out, "func.func @s1_update")
    assert update.count("par.reshard") == 1  # the gradient's reduce-scatter; the weight stays a shard


KEEP_WHOLE = ('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
              'optimizer{lr=0.1},data-parallel,zero{stage=3 reshard-after-forward=false},microbatch{count=2},'
              'schedule{kind="gpipe"},expand-schedule')


def test_zero3_without_resharding_after_forward_gathers_each_weight_once_per_step():
    # The gather is a reshard of the step: the device issues it first, and every
    # microbatch's forward and backward reads the one whole copy; the update reads the shard.
    program = section(run(KEEP_WHOLE), "par.program @device0").splitlines()
    assert [line.strip() for line in program[1:5]] == [
        '%w0 = par.state "blocks.0.w" layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>',
        '%w0_whole = par.reshard %w0 @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], []]> '
        ': !torch.vtensor<[2,4],f32> -> !torch.vtensor<[4,4],f32>',
        '%0 = par.input 0 microbatch 0 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>',
        '%h0 = par.task @s0_F stage 0 pass F microbatch 0 (%0, %w0_whole) : '
        '(!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>',
    ]
    assert sum("%w0_whole)" in line for line in program) == 2  # the forwards of microbatches 0 and 1
    assert any(line.strip().startswith("%2 = par.task @s0_update stage 0 pass update (%w0, ") for line in program)
    # Lowered, it is an asynchronous all-gather on the communication stream, waited by the
    # compute stream right before the first forward (a prefetch).
    rank0 = section(run(KEEP_WHOLE + ",lower-reshard,lower-to-exec"), "exec.program @rank0").splitlines()
    assert [line.strip() for line in rank0[6:10]] == [
        "%5, %6 = exec.all_gather %4 group @grad_0 dim 0 on %1 : !torch.vtensor<[2,4],f32> -> !torch.vtensor<[4,4],f32>",
        '%7 = exec.load_input "0" microbatch 0 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>',
        "exec.wait %5 on %0",
        "exec.record_stream %6, %0 : !torch.vtensor<[4,4],f32>",
    ]


def test_zero_lowers_to_collectives_inside_the_update():
    update = section(run(zero(2) + ",lower-reshard"), "func.func @s1_update")
    lines = [line.strip() for line in update.splitlines() if "par.all_" in line or "par.reduce" in line]
    assert lines == [
        '%3 = par.all_slice %0 over @mesh "dp" dim 0 : !torch.vtensor<[4,4],f32> -> !torch.vtensor<[2,4],f32>',
        '%4 = par.reduce_scatter %1 over @mesh "dp" dim 0 sum : !torch.vtensor<[4,4],f32> -> !torch.vtensor<[2,4],f32>',
        '%11 = par.all_gather %10 over @mesh "dp" dim 0 : !torch.vtensor<[2,4],f32> -> !torch.vtensor<[4,4],f32>',
    ]


TENSOR_PARALLEL = ('mesh{shape="pp=2,dp=2,tp=2"},tensor-parallel{plan="blocks.0.w=1,blocks.1.w=0"},propagate-sharding,'
                   'localise-shapes,pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
                   'optimizer{lr=0.1 momentum=0.9},data-parallel{axis="dp"},zero{stage=STAGE}')


def test_zero_shards_the_tensor_parallel_piece_of_each_weight_further_over_dp():
    # blocks.1.w is Shard(0) over tp: its local [2,4] piece is split again along dimension 0,
    # dp innermost, so each rank holds [1,4] (rows 2t+d of 4). blocks.0.w is Shard(1) over tp:
    # its [4,2] piece is split along dimension 0 over dp. The update reduce-scatters over dp
    # alone; the forward gathers over dp back to the tensor-parallel piece, never over tp.
    out = run(TENSOR_PARALLEL.replace("STAGE", "3"))
    assert header(section(out, "func.func @main")).startswith(
        'func.func @main(%w0: !torch.vtensor<[2,2],f32> {piperc.param = "blocks.0.w", '
        'par.layout = #par.sharding<[["dp"], ["tp"]]>}, %w1: !torch.vtensor<[1,4],f32> {piperc.param = "blocks.1.w", '
        'par.layout = #par.sharding<[["tp", "dp"], []]>}')
    assert section(out, "func.func @s1_F").splitlines()[1] == (
        '  %2 = par.reshard %1 @mesh from #par.sharding<[["tp", "dp"], []]> to #par.sharding<[["tp"], []]> : '
        '!torch.vtensor<[1,4],f32> -> !torch.vtensor<[2,4],f32>')
    assert section(out, "func.func @s1_update") == ir(
        """
        func.func @s1_update(%0: !torch.vtensor<[1,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[["tp", "dp"], []]>}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[["tp"], []], partial = ["dp"]>}, %2: !torch.vtensor<[1,4],f32> {piperc.key = "state:blocks.1.w.momentum", par.layout = #par.sharding<[["tp", "dp"], []]>}) -> (!torch.vtensor<[1,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[["tp", "dp"], []]>}, !torch.vtensor<[1,4],f32> {piperc.key = "state:blocks.1.w.momentum", par.layout = #par.sharding<[["tp", "dp"], []]>}) {
          %3 = par.reshard %1 @mesh from #par.sharding<[["tp"], []], partial = ["dp"]> to #par.sharding<[["tp", "dp"], []]> : !torch.vtensor<[2,4],f32> -> !torch.vtensor<[1,4],f32>
          %4 = "torch.constant.float"() <{value = 9.000000e-01 : f64}> : () -> !torch.float
          %5 = "torch.aten.mul.Scalar"(%2, %4) : (!torch.vtensor<[1,4],f32>, !torch.float) -> !torch.vtensor<[1,4],f32>
          %6 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %7 = "torch.aten.add.Tensor"(%5, %3, %6) : (!torch.vtensor<[1,4],f32>, !torch.vtensor<[1,4],f32>, !torch.float) -> !torch.vtensor<[1,4],f32>
          %8 = "torch.constant.float"() <{value = -1.000000e-01 : f64}> : () -> !torch.float
          %9 = "torch.aten.add.Tensor"(%0, %7, %8) : (!torch.vtensor<[1,4],f32>, !torch.vtensor<[1,4],f32>, !torch.float) -> !torch.vtensor<[1,4],f32>
          func.return %9, %7 : !torch.vtensor<[1,4],f32>, !torch.vtensor<[1,4],f32>
        }
    """
    )
    # zero=1 slices the tensor-parallel piece to its dp shard and gathers the new shard back to it
    update = section(run(TENSOR_PARALLEL.replace("STAGE", "1") + ",lower-reshard"), "func.func @s1_update")
    assert [line.strip() for line in update.splitlines() if "par.all_" in line] == [
        '%3 = par.all_slice %0 over @mesh "dp" dim 0 : !torch.vtensor<[2,4],f32> -> !torch.vtensor<[1,4],f32>',
        '%4 = par.all_slice %1 over @mesh "dp" dim 0 : !torch.vtensor<[2,4],f32> -> !torch.vtensor<[1,4],f32>',
        '%11 = par.all_gather %10 over @mesh "dp" dim 0 : !torch.vtensor<[1,4],f32> -> !torch.vtensor<[2,4],f32>',
    ]


@pytest.mark.parametrize("pipeline,message", [
    (zero(4), "zero must be 0, 1, 2 or 3, got 4"),
    ('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,zero',
     "zero: run optimizer and data-parallel first (the step has no update)"),
])
def test_zero_rejects(pipeline, message):
    with pytest.raises((PassError, StrategyError), match=re.escape(message)):
        run(pipeline)


def test_data_parallel_rejects_an_unknown_zero_stage():
    model, inputs = gpt.make(n_layers=2)
    with pytest.raises(StrategyError, match=re.escape("data_parallel(axis='dp', zero=5): zero must be 0, 1, 2 or 3")):
        piperc.compile(model, inputs, mesh=piperc.Mesh(dp=2), strategy=[piperc.data_parallel(zero=5)],
                       optimizer=ADAMW)


# ---------------------------------------------------------------- training, real processes

STEPS = 3
TOLERANCE = 1e-5
ADAMW = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)  # the lr tests/test_train_exact.py explains
MODELS = {"gpt": gpt, "llama": llama, "tied": tied}
CASES = [  # model, zero, mesh axes, microbatches, reshard_after_forward
    ("gpt", 1, {"dp": 2}, 1, True),
    ("llama", 1, {"dp": 4}, 1, True),
    ("llama", 2, {"dp": 2}, 1, True),
    ("gpt", 2, {"dp": 4}, 1, True),
    ("gpt", 3, {"dp": 4}, 1, True),
    ("llama", 3, {"pp": 2, "dp": 2}, 2, True),
    ("gpt", 3, {"pp": 2, "dp": 2}, 4, False),
    ("tied", 3, {"pp": 2, "dp": 2}, 2, False),
    ("gpt", 3, {"dp": 2, "tp": 2}, 1, True),  # next to tensor parallelism (issue 7's plan)
]


@pytest.mark.parametrize("model_name,stage,axes,microbatches,reshard", CASES,
                         ids=[f"{c[0]}-zero{c[1]}-" + "x".join(f"{a}{n}" for a, n in c[2].items())
                              + ("" if c[4] else "-keep") for c in CASES])
def test_zero_matches_single_device_training(model_name, stage, axes, microbatches, reshard):
    model, inputs = MODELS[model_name].make(n_layers=4)
    batches = [MODELS[model_name].make(n_layers=4, seed=100 + s)[1] for s in range(STEPS)]
    strategy = [piperc.data_parallel(zero=stage, reshard_after_forward=reshard)]
    if "pp" in axes:
        strategy.insert(0, piperc.pipeline(stages=axes["pp"], microbatches=microbatches, schedule="1f1b"))
    if "tp" in axes:
        strategy.append(piperc.tensor_parallel(plan=GPT_PLAN))
    compiled = piperc.compile(model, inputs, mesh=piperc.Mesh(**axes), strategy=strategy, optimizer=ADAMW,
                              keep_ir=False)
    sharded = [e for e in json.loads(compiled.files["manifest.json"])["ranks"][0]["state"] if "layout" in e]
    assert sharded, "no state is held in shards"
    assert (stage == 3) == any(e["kind"] == "param" for e in sharded)
    result = piperc.launch(compiled, batches, timeout=240)
    whole = {name: tuple(p.shape) for name, p in [*model.named_parameters(), *model.named_buffers()]}
    assert {name: tuple(result.state_dict[name].shape) for name in whole} == whole  # gathered from shards
    loss_err, param_err = compare(result.losses, result.state_dict, *train_eager(model, batches, ADAMW))
    assert loss_err <= TOLERANCE, f"loss relative error {loss_err:.2e}"
    assert param_err <= TOLERANCE, f"parameter relative error {param_err:.2e}"


def test_zero3_backward_recomputes_what_it_reads_of_the_parameters():
    # A forward result made from gathered parameters alone (t(w) for the backward's matmul)
    # would keep the whole parameter alive between a microbatch's forward and backward; the
    # backward recomputes it from its own gather instead. So ZeRO-3 holds no more activations
    # than plain data parallelism, and less of everything else.
    model, inputs = gpt.make(n_layers=2)
    memory = {}
    for stage in (0, 3):
        compiled = piperc.compile(
            model, inputs, mesh=piperc.Mesh(pp=2, dp=2), optimizer=ADAMW, keep_ir=False,
            strategy=[piperc.pipeline(stages=2, microbatches=2), piperc.data_parallel(zero=stage)])
        memory[stage] = compiled.memory()[0]
    assert memory[3].activations == memory[0].activations
    assert memory[3].parameters * 2 == memory[0].parameters
    assert memory[3].optimizer_state * 2 - 8 == memory[0].optimizer_state  # all but AdamW's step count
    assert memory[3].total < memory[0].total


def test_bucket_collectives_merges_a_functions_gathers_and_reduce_scatters():
    # One stage holds both weights: its forward gathers both at entry, its update
    # reduce-scatters both gradients; each pair becomes one flat exchange.
    out = run('mesh{shape="pp=1,dp=2"},pipeline-split,outline-stages,optimizer{lr=0.1 momentum=0.9},'
              'data-parallel,zero{stage=3},lower-reshard,bucket-collectives')
    forward = section(out, "func.func @s0_F").splitlines()
    assert forward[1] == (
        '  %3, %4 = par.all_gather_bucket %1, %2 over @mesh "dp" : !torch.vtensor<[2,4],f32>, '
        '!torch.vtensor<[2,4],f32> -> !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>')
    assert "par.all_gather %" not in "\n".join(forward)
    update = section(out, "func.func @s0_update")
    assert ('%6, %7 = par.reduce_scatter_bucket %1, %4 over @mesh "dp" sum : !torch.vtensor<[4,4],f32>, '
            '!torch.vtensor<[4,4],f32> -> !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>') in update
    assert "par.reduce_scatter %" not in update
