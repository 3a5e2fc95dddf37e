"""The strategy passes, IR text in and IR text out.

Every test starts from TWO_BLOCKS, a hand-written captured step of a two-block model
(`loss = sum(x @ w0 @ w1)`, forward ops first, then backward), runs a textual pipeline
that ends with the pass under test, and compares the printed IR with the IR the pass
should write. Where a module grows long, the test compares the function or program the
pass writes. The error tests show the message a user sees for input a pass rejects.
"""

import re
import textwrap

import pytest

from piperc.errors import PassError, StrategyError
from piperc.ir import make_context, parse_module, print_ir
from piperc.passes import PASSES
from piperc.passes.data_parallel import DataParallelPass
from piperc.passes.lower_to_exec import LowerToExecPass
from piperc.passes.mesh import MeshPass
from piperc.passes.microbatch import MicrobatchPass
from piperc.passes.optimizer import OptimizerPass
from piperc.passes.outline_stages import OutlineStagesPass
from piperc.passes.pipeline_split import PipelineSplitPass
from piperc.passes.schedule import SchedulePass
from piperc.passmanager import parse_pipeline, run_pipeline

STRATEGY_PASSES = (MeshPass, PipelineSplitPass, OutlineStagesPass, OptimizerPass,
                   DataParallelPass, MicrobatchPass, SchedulePass, LowerToExecPass)


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def run(pipeline: str) -> str:
    """Runs the textual `pipeline` on TWO_BLOCKS and prints the result."""
    ctx = make_context()
    module = parse_module(TWO_BLOCKS, ctx)
    run_pipeline(module, ctx, pipeline)
    return print_ir(module)


def section(text: str, head: str) -> str:
    """The op of `text` that begins with `head` (`func.func @s0_B`, `exec.program @rank0`),
    through its closing brace, dedented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s*{re.escape(head)}[( ]", line))
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    end = lines.index(indent + "}", start)
    return ir("\n".join(lines[start : end + 1]))


def functions(text: str) -> list[str]:
    return re.findall(r"^  func\.func @(\w+)", text, re.MULTILINE)


def header(text: str) -> str:
    return text.splitlines()[0]


# The captured step of
#
#     class TwoBlocks(nn.Module):     # blocks = ModuleList([Lin(4, 4), Lin(4, 4)]), Lin(x) = x @ w
#         def forward(self, x):
#             return self.blocks[1](self.blocks[0](x)).sum()
#
# in the form piperc.capture writes it: parameters, the input and the loss tangent are
# arguments, the loss and one gradient per parameter are results, and every op says which
# module it came from and whether it belongs to the forward (F) or the backward (B).
TWO_BLOCKS = ir(
    """
    builtin.module {
      func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w"}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w"}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.0.w"}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.1.w"}) {
        %h0 = "torch.aten.mm"(%x, %w0) {piperc.origin = #par.origin<"blocks.0.lin", F>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %h1 = "torch.aten.mm"(%h0, %w1) {piperc.origin = #par.origin<"blocks.1.lin", F>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %none = "torch.constant.none"() {piperc.origin = #par.origin<"", F>} : () -> !torch.none
        %loss = "torch.aten.sum"(%h1, %none) {piperc.origin = #par.origin<"", F>} : (!torch.vtensor<[2,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
        %c2 = "torch.constant.int"() <{value = 2 : i64}> {piperc.origin = #par.origin<"", B>} : () -> !torch.int
        %c4 = "torch.constant.int"() <{value = 4 : i64}> {piperc.origin = #par.origin<"", B>} : () -> !torch.int
        %size = "torch.prim.ListConstruct"(%c2, %c4) {piperc.origin = #par.origin<"", B>} : (!torch.int, !torch.int) -> !torch.list<int>
        %false = "torch.constant.bool"() <{value = false}> {piperc.origin = #par.origin<"", B>} : () -> !torch.bool
        %g1 = "torch.aten.expand"(%dloss, %size, %false) {piperc.origin = #par.origin<"", B>} : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[2,4],f32>
        %h0t = "torch.aten.t"(%h0) {piperc.origin = #par.origin<"blocks.1.lin", B>} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw1 = "torch.aten.mm"(%h0t, %g1) {piperc.origin = #par.origin<"blocks.1.lin", B>} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        %w1t = "torch.aten.t"(%w1) {piperc.origin = #par.origin<"blocks.1.lin", B>} : (!torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
        %g0 = "torch.aten.mm"(%g1, %w1t) {piperc.origin = #par.origin<"blocks.1.lin", B>} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %xt = "torch.aten.t"(%x) {piperc.origin = #par.origin<"blocks.0.lin", B>} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw0 = "torch.aten.mm"(%xt, %g0) {piperc.origin = #par.origin<"blocks.0.lin", B>} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        func.return %loss, %dw0, %dw1 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
      }
    }
    """
)


def test_input_is_printed_as_written():
    assert run("") == TWO_BLOCKS


# ---------------------------------------------------------------- mesh


def test_mesh_declares_the_mesh_first_in_the_module_and_replaces_an_earlier_one():
    out = run('mesh{shape="dp=4"},mesh{shape="pp=2,dp=2"}')
    assert out == TWO_BLOCKS.replace(
        "builtin.module {\n",
        'builtin.module {\n  par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>\n',
    )


# ---------------------------------------------------------------- pipeline-split

# blocks.0 runs on stage 0 and blocks.1 on stage 1. The loss (after the last block) joins
# stage 1; the loss gradient (backward ops before the first backward block op) goes to the
# last stage; each backward op follows its block; constants take their first user's stage.
AFTER_PIPELINE_SPLIT = ir(
    """
    builtin.module attributes {par.num_stages = 2 : i64} {
      par.mesh @mesh #par.mesh<["pp"=2]>
      func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w"}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w"}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.0.w"}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.1.w"}) {
        %h0 = "torch.aten.mm"(%x, %w0) {piperc.origin = #par.origin<"blocks.0.lin", F>, par.stage = 0 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %h1 = "torch.aten.mm"(%h0, %w1) {piperc.origin = #par.origin<"blocks.1.lin", F>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %none = "torch.constant.none"() {piperc.origin = #par.origin<"", F>, par.stage = 1 : i64} : () -> !torch.none
        %loss = "torch.aten.sum"(%h1, %none) {piperc.origin = #par.origin<"", F>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
        %c2 = "torch.constant.int"() <{value = 2 : i64}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.int
        %c4 = "torch.constant.int"() <{value = 4 : i64}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.int
        %size = "torch.prim.ListConstruct"(%c2, %c4) {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : (!torch.int, !torch.int) -> !torch.list<int>
        %false = "torch.constant.bool"() <{value = false}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.bool
        %g1 = "torch.aten.expand"(%dloss, %size, %false) {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[2,4],f32>
        %h0t = "torch.aten.t"(%h0) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw1 = "torch.aten.mm"(%h0t, %g1) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        %w1t = "torch.aten.t"(%w1) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
        %g0 = "torch.aten.mm"(%g1, %w1t) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %xt = "torch.aten.t"(%x) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw0 = "torch.aten.mm"(%xt, %g0) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        func.return %loss, %dw0, %dw1 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
      }
    }
    """
)


def test_pipeline_split_at_a_block():
    out = run('mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"}')
    assert out == AFTER_PIPELINE_SPLIT


def test_pipeline_split_balances_equal_blocks_into_one_block_per_stage():
    # Both blocks cost one [2,4]x[4,4] mm, so the min-max partition splits between them.
    assert run('mesh{shape="pp=2"},pipeline-split{stages=2}') == AFTER_PIPELINE_SPLIT


# ---------------------------------------------------------------- outline-stages

# One F and one B function per stage. Keys connect them: "v0" (h0) goes from s0_F to
# s1_F and is also the activation s1_B reads; "v1" (the gradient of h0) goes from s1_B
# to s0_B. Constants are re-created where they are used.
AFTER_OUTLINE_STAGES = ir(
    """
    builtin.module attributes {par.num_stages = 2 : i64} {
      par.mesh @mesh #par.mesh<["pp"=2]>
      func.func @s0_F(%0: !torch.vtensor<[2,4],f32> {piperc.key = "input:0"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w"}) -> (!torch.vtensor<[2,4],f32> {piperc.key = "v0"}) attributes {par.stage = 0 : i64, par.pass = #par.pass<F>} {
        %h0 = "torch.aten.mm"(%0, %1) {piperc.origin = #par.origin<"blocks.0.lin", F>, par.stage = 0 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        func.return %h0 : !torch.vtensor<[2,4],f32>
      }
      func.func @s0_B(%0: !torch.vtensor<[2,4],f32> {piperc.key = "input:0"}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "v1"}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w"}) attributes {par.stage = 0 : i64, par.pass = #par.pass<B>, par.chunk = 0 : i64} {
        %xt = "torch.aten.t"(%0) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw0 = "torch.aten.mm"(%xt, %1) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        func.return %dw0 : !torch.vtensor<[4,4],f32>
      }
      func.func @s1_F(%0: !torch.vtensor<[2,4],f32> {piperc.key = "v0"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}) -> (!torch.vtensor<[],f32> {piperc.key = "loss"}) attributes {par.stage = 1 : i64, par.pass = #par.pass<F>} {
        %h1 = "torch.aten.mm"(%0, %1) {piperc.origin = #par.origin<"blocks.1.lin", F>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        %none = "torch.constant.none"() {piperc.origin = #par.origin<"", F>, par.stage = 1 : i64} : () -> !torch.none
        %loss = "torch.aten.sum"(%h1, %none) {piperc.origin = #par.origin<"", F>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
        func.return %loss : !torch.vtensor<[],f32>
      }
      func.func @s1_B(%0: !torch.vtensor<[],f32> {piperc.key = "tangent:0"}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "v0"}, %2: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}) -> (!torch.vtensor<[2,4],f32> {piperc.key = "v1"}, !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}) attributes {par.stage = 1 : i64, par.pass = #par.pass<B>, par.chunk = 0 : i64} {
        %c2 = "torch.constant.int"() <{value = 2 : i64}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.int
        %c4 = "torch.constant.int"() <{value = 4 : i64}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.int
        %size = "torch.prim.ListConstruct"(%c2, %c4) {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : (!torch.int, !torch.int) -> !torch.list<int>
        %false = "torch.constant.bool"() <{value = false}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.bool
        %g1 = "torch.aten.expand"(%0, %size, %false) {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[2,4],f32>
        %h0t = "torch.aten.t"(%1) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
        %dw1 = "torch.aten.mm"(%h0t, %g1) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
        %w1t = "torch.aten.t"(%2) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
        %g0 = "torch.aten.mm"(%g1, %w1t) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
        func.return %g0, %dw1 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>
      }
    }
    """
)


def test_outline_stages_writes_an_f_and_a_b_function_per_stage():
    out = run('mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages')
    assert out == AFTER_OUTLINE_STAGES


def test_outline_stages_cuts_a_stage_backward_into_one_chunk_per_block():
    out = run("pipeline-split{stages=1},outline-stages")
    # The backward runs blocks.1 (with the loss gradient before it) then blocks.0.
    assert functions(out) == ["s0_F", "s0_B0", "s0_B1"]
    assert section(out, "func.func @s0_B1") == ir(
        """
        func.func @s0_B1(%0: !torch.vtensor<[2,4],f32> {piperc.key = "input:0"}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "v1"}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w"}) attributes {par.stage = 0 : i64, par.pass = #par.pass<B>, par.chunk = 1 : i64} {
          %xt = "torch.aten.t"(%0) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
          %dw0 = "torch.aten.mm"(%xt, %1) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          func.return %dw0 : !torch.vtensor<[4,4],f32>
        }
        """
    )
    whole = run("pipeline-split{stages=1},outline-stages{split-backward=false}")
    assert functions(whole) == ["s0_F", "s0_B"]
    assert header(section(whole, "func.func @s0_B")) == (
        'func.func @s0_B(%0: !torch.vtensor<[],f32> {piperc.key = "tangent:0"}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "v0"}, %2: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}, %3: !torch.vtensor<[2,4],f32> {piperc.key = "input:0"}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w"}, !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}) attributes {par.stage = 0 : i64, par.pass = #par.pass<B>, par.chunk = 0 : i64} {'
    )


# ---------------------------------------------------------------- optimizer

OUTLINED = 'mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages'


def test_optimizer_sgd_with_momentum_and_weight_decay():
    out = run(OUTLINED + ',optimizer{kind="sgd" lr=0.1 momentum=0.9 weight-decay=0.01}')
    assert functions(out) == ["s0_F", "s0_B", "s1_F", "s1_B", "s0_update", "s1_update"]
    # d = g + 0.01*p;  m = 0.9*m + d;  p = p - 0.1*m
    assert section(out, "func.func @s0_update") == ir(
        """
        func.func @s0_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w"}, %2: !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.0.w.momentum"}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w"}, !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.0.w.momentum"}) attributes {par.stage = 0 : i64, par.pass = #par.pass<update>} {
          %3 = "torch.constant.float"() <{value = 1.000000e-02 : f64}> : () -> !torch.float
          %4 = "torch.aten.add.Tensor"(%1, %0, %3) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          %5 = "torch.constant.float"() <{value = 9.000000e-01 : f64}> : () -> !torch.float
          %6 = "torch.aten.mul.Scalar"(%2, %5) : (!torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          %7 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %8 = "torch.aten.add.Tensor"(%6, %4, %7) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          %9 = "torch.constant.float"() <{value = -1.000000e-01 : f64}> : () -> !torch.float
          %10 = "torch.aten.add.Tensor"(%0, %8, %9) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          func.return %10, %8 : !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
        }
        """
    )
    assert header(section(out, "func.func @s1_update")).startswith(
        'func.func @s1_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}, '
        '%1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}, '
        '%2: !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.momentum"})'
    )


def test_optimizer_adamw():
    out = run(OUTLINED + ',optimizer{kind="adamw" lr=0.001 weight-decay=0.01}')
    # t = t + 1;  step_size = lr / (1 - 0.9^t);  bc2_sqrt = sqrt(1 - 0.999^t)
    # p = p * (1 - 0.001*0.01);  m = lerp(m, g, 0.1);  v = 0.999*v + 0.001*g*g
    # p = p - (m / (sqrt(v) / bc2_sqrt + 1e-8)) * step_size
    assert section(out, "func.func @s1_update") == ir(
        """
        func.func @s1_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}, %2: !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.exp_avg"}, %3: !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.exp_avg_sq"}, %4: !torch.vtensor<[],f64> {piperc.key = "state:step"}) -> (!torch.vtensor<[],f64> {piperc.key = "state:step"}, !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}, !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.exp_avg"}, !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.exp_avg_sq"}) attributes {par.stage = 1 : i64, par.pass = #par.pass<update>} {
          %5 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %6 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %7 = "torch.aten.add.Scalar"(%4, %5, %6) : (!torch.vtensor<[],f64>, !torch.float, !torch.float) -> !torch.vtensor<[],f64>
          %8 = "torch.constant.float"() <{value = 9.000000e-01 : f64}> : () -> !torch.float
          %9 = "torch.aten.pow.Scalar"(%8, %7) : (!torch.float, !torch.vtensor<[],f64>) -> !torch.vtensor<[],f64>
          %10 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %11 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %12 = "torch.aten.rsub.Scalar"(%9, %10, %11) : (!torch.vtensor<[],f64>, !torch.float, !torch.float) -> !torch.vtensor<[],f64>
          %13 = "torch.aten.reciprocal"(%12) : (!torch.vtensor<[],f64>) -> !torch.vtensor<[],f64>
          %14 = "torch.constant.float"() <{value = 1.000000e-03 : f64}> : () -> !torch.float
          %15 = "torch.aten.mul.Scalar"(%13, %14) : (!torch.vtensor<[],f64>, !torch.float) -> !torch.vtensor<[],f64>
          %16 = "torch.constant.float"() <{value = 9.990000e-01 : f64}> : () -> !torch.float
          %17 = "torch.aten.pow.Scalar"(%16, %7) : (!torch.float, !torch.vtensor<[],f64>) -> !torch.vtensor<[],f64>
          %18 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %19 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %20 = "torch.aten.rsub.Scalar"(%17, %18, %19) : (!torch.vtensor<[],f64>, !torch.float, !torch.float) -> !torch.vtensor<[],f64>
          %21 = "torch.aten.sqrt"(%20) : (!torch.vtensor<[],f64>) -> !torch.vtensor<[],f64>
          %22 = "torch.constant.float"() <{value = 9.999900e-01 : f64}> : () -> !torch.float
          %23 = "torch.aten.mul.Scalar"(%0, %22) : (!torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          %24 = "torch.constant.float"() <{value = 0.099999999999999978 : f64}> : () -> !torch.float
          %25 = "torch.aten.lerp.Scalar"(%2, %1, %24) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          %26 = "torch.constant.float"() <{value = 9.990000e-01 : f64}> : () -> !torch.float
          %27 = "torch.aten.mul.Scalar"(%3, %26) : (!torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          %28 = "torch.constant.float"() <{value = 0.0010000000000000009 : f64}> : () -> !torch.float
          %29 = "torch.aten.addcmul"(%27, %1, %1, %28) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          %30 = "torch.aten.sqrt"(%29) : (!torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %31 = "torch.aten.div.Tensor"(%30, %21) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[],f64>) -> !torch.vtensor<[4,4],f32>
          %32 = "torch.constant.float"() <{value = 1.000000e-08 : f64}> : () -> !torch.float
          %33 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %34 = "torch.aten.add.Scalar"(%31, %32, %33) : (!torch.vtensor<[4,4],f32>, !torch.float, !torch.float) -> !torch.vtensor<[4,4],f32>
          %35 = "torch.aten.div.Tensor"(%25, %34) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %36 = "torch.aten.mul.Tensor"(%35, %15) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[],f64>) -> !torch.vtensor<[4,4],f32>
          %37 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %38 = "torch.aten.sub.Tensor"(%23, %36, %37) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          func.return %7, %38, %25, %29 : !torch.vtensor<[],f64>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
        }
        """
    )


# ---------------------------------------------------------------- data-parallel


def test_data_parallel_reduces_every_update_gradient_over_the_axis():
    out = run('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
              'optimizer{lr=0.1},data-parallel{axis="dp"}')
    assert header(out) == 'builtin.module attributes {par.num_stages = 2 : i64, par.dp_axis = "dp"} {'
    assert section(out, "func.func @s0_update") == ir(
        """
        func.func @s0_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w"}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w"}) attributes {par.stage = 0 : i64, par.pass = #par.pass<update>} {
          %2 = par.all_reduce %1 over @mesh "dp" sum {par.bucket = 0 : i64} : !torch.vtensor<[4,4],f32>
          %3 = "torch.constant.float"() <{value = -1.000000e-01 : f64}> : () -> !torch.float
          %4 = "torch.aten.add.Tensor"(%0, %2, %3) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          func.return %4 : !torch.vtensor<[4,4],f32>
        }
        """
    )
    assert section(out, "func.func @s1_update") == ir(
        """
        func.func @s1_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}) attributes {par.stage = 1 : i64, par.pass = #par.pass<update>} {
          %2 = par.all_reduce %1 over @mesh "dp" sum {par.bucket = 0 : i64} : !torch.vtensor<[4,4],f32>
          %3 = "torch.constant.float"() <{value = -1.000000e-01 : f64}> : () -> !torch.float
          %4 = "torch.aten.add.Tensor"(%0, %2, %3) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          func.return %4 : !torch.vtensor<[4,4],f32>
        }
        """
    )


def test_data_parallel_numbers_buckets_in_the_order_the_backward_produces_gradients():
    # Each gradient is 64 bytes and a bucket holds at most ~105 bytes: one gradient per
    # bucket. The backward finishes blocks.1.w first, so it is bucket 0.
    out = run('mesh{shape="pp=1,dp=2"},pipeline-split,outline-stages,optimizer{lr=0.1},'
              'data-parallel{axis="dp" bucket-mb=0.0001}')
    assert section(out, "func.func @s0_update") == ir(
        """
        func.func @s0_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w"}, %2: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}, %3: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w"}, !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}) attributes {par.stage = 0 : i64, par.pass = #par.pass<update>} {
          %4 = par.all_reduce %1 over @mesh "dp" sum {par.bucket = 1 : i64} : !torch.vtensor<[4,4],f32>
          %5 = par.all_reduce %3 over @mesh "dp" sum {par.bucket = 0 : i64} : !torch.vtensor<[4,4],f32>
          %6 = "torch.constant.float"() <{value = -1.000000e-01 : f64}> : () -> !torch.float
          %7 = "torch.aten.add.Tensor"(%0, %4, %6) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          %8 = "torch.constant.float"() <{value = -1.000000e-01 : f64}> : () -> !torch.float
          %9 = "torch.aten.add.Tensor"(%2, %5, %8) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          func.return %7, %9 : !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
        }
        """
    )


# ---------------------------------------------------------------- microbatch


def test_microbatch_scales_the_loss_and_adds_accumulate_functions():
    # 2 microbatches x 2 replicas: the loss tangent becomes full([], 0.25) and the last
    # stage's forward also returns loss_share = loss * 0.25.
    out = run('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
              'optimizer{lr=0.1},microbatch{count=2 replicas=2}')
    assert header(out) == ("builtin.module attributes {par.num_stages = 2 : i64, "
                           "par.microbatches = 2 : i64, par.replicas = 2 : i64} {")
    assert functions(out) == ["s0_F", "s0_B", "s1_F", "s1_B", "s0_update", "s1_update",
                              "s0_B_accumulate", "s1_B_accumulate", "s1_accumulate_loss"]
    assert section(out, "func.func @s0_F") == section(AFTER_OUTLINE_STAGES, "func.func @s0_F")
    assert section(out, "func.func @s0_B") == section(AFTER_OUTLINE_STAGES, "func.func @s0_B")
    assert section(out, "func.func @s1_F") == ir(
        """
        func.func @s1_F(%0: !torch.vtensor<[2,4],f32> {piperc.key = "v0"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}) -> (!torch.vtensor<[],f32> {piperc.key = "loss"}, !torch.vtensor<[],f32> {piperc.key = "loss_share"}) attributes {par.stage = 1 : i64, par.pass = #par.pass<F>} {
          %h1 = "torch.aten.mm"(%0, %1) {piperc.origin = #par.origin<"blocks.1.lin", F>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          %none = "torch.constant.none"() {piperc.origin = #par.origin<"", F>, par.stage = 1 : i64} : () -> !torch.none
          %loss = "torch.aten.sum"(%h1, %none) {piperc.origin = #par.origin<"", F>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
          %2 = "torch.constant.float"() <{value = 2.500000e-01 : f64}> : () -> !torch.float
          %3 = "torch.aten.mul.Scalar"(%loss, %2) : (!torch.vtensor<[],f32>, !torch.float) -> !torch.vtensor<[],f32>
          func.return %loss, %3 : !torch.vtensor<[],f32>, !torch.vtensor<[],f32>
        }
        """
    )
    # The tangent argument is gone; full(size=[], 0.25, dtype=6 (f32), layout, device, pin_memory).
    assert section(out, "func.func @s1_B") == ir(
        """
        func.func @s1_B(%0: !torch.vtensor<[2,4],f32> {piperc.key = "v0"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w"}) -> (!torch.vtensor<[2,4],f32> {piperc.key = "v1"}, !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}) attributes {par.stage = 1 : i64, par.pass = #par.pass<B>, par.chunk = 0 : i64} {
          %2 = "torch.constant.int"() <{value = 6 : i64}> : () -> !torch.int
          %3 = "torch.prim.ListConstruct"() : () -> !torch.list<int>
          %4 = "torch.constant.float"() <{value = 2.500000e-01 : f64}> : () -> !torch.float
          %5 = "torch.constant.none"() : () -> !torch.none
          %6 = "torch.constant.device"() <{value = "cpu"}> : () -> !torch.Device
          %7 = "torch.constant.none"() : () -> !torch.none
          %8 = "torch.aten.full"(%3, %4, %2, %5, %6, %7) : (!torch.list<int>, !torch.float, !torch.int, !torch.none, !torch.Device, !torch.none) -> !torch.vtensor<[],f32>
          %c2 = "torch.constant.int"() <{value = 2 : i64}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.int
          %c4 = "torch.constant.int"() <{value = 4 : i64}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.int
          %size = "torch.prim.ListConstruct"(%c2, %c4) {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : (!torch.int, !torch.int) -> !torch.list<int>
          %false = "torch.constant.bool"() <{value = false}> {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : () -> !torch.bool
          %g1 = "torch.aten.expand"(%8, %size, %false) {piperc.origin = #par.origin<"", B>, par.stage = 1 : i64} : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[2,4],f32>
          %h0t = "torch.aten.t"(%0) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
          %dw1 = "torch.aten.mm"(%h0t, %g1) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %w1t = "torch.aten.t"(%1) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %g0 = "torch.aten.mm"(%g1, %w1t) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          func.return %g0, %dw1 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>
        }
        """
    )
    assert section(out, "func.func @s1_B_accumulate") == ir(
        """
        func.func @s1_B_accumulate(%0: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w"}) attributes {par.stage = 1 : i64} {
          %2 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %3 = "torch.aten.add.Tensor"(%0, %1, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          func.return %3 : !torch.vtensor<[4,4],f32>
        }
        """
    )
    assert section(out, "func.func @s1_accumulate_loss") == ir(
        """
        func.func @s1_accumulate_loss(%0: !torch.vtensor<[],f32> {piperc.key = "loss_share"}, %1: !torch.vtensor<[],f32> {piperc.key = "loss_share"}) -> (!torch.vtensor<[],f32> {piperc.key = "loss_share"}) attributes {par.stage = 1 : i64} {
          %2 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %3 = "torch.aten.add.Tensor"(%0, %1, %2) : (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>, !torch.float) -> !torch.vtensor<[],f32>
          func.return %3 : !torch.vtensor<[],f32>
        }
        """
    )


# ---------------------------------------------------------------- schedule

MICROBATCHED = OUTLINED + ",optimizer{lr=0.1},microbatch{count=2}"


@pytest.mark.parametrize(
    "options, schedule",
    [
        pytest.param(
            '{kind="gpipe"}',
            """
            par.schedule @schedule mesh @mesh axis "pp" {
              par.device 0 [0F0, 0F1, 0B0, 0B1]
              par.device 1 [1F0, 1F1, 1B0, 1B1]
            }
            """,
            id="gpipe",
        ),
        pytest.param(
            '{kind="1f1b" axis="pp"}',
            """
            par.schedule @schedule mesh @mesh axis "pp" {
              par.device 0 [0F0, 0F1, 0B0, 0B1]
              par.device 1 [1F0, 1B0, 1F1, 1B1]
            }
            """,
            id="1f1b",
        ),
        pytest.param(
            '{kind="user" table="0F0 0F1 0B0 0B1;1F0 1B0 1F1 1B1"}',
            """
            par.schedule @schedule mesh @mesh axis "pp" {
              par.device 0 [0F0, 0F1, 0B0, 0B1]
              par.device 1 [1F0, 1B0, 1F1, 1B1]
            }
            """,
            id="user-table",
        ),
    ],
)
def test_schedule_writes_one_row_of_actions_per_device(options, schedule):
    out = run(MICROBATCHED + ",schedule" + options)
    assert section(out, "par.schedule @schedule") == ir(schedule)


# ---------------------------------------------------------------- lower-to-exec


def test_lower_to_exec_writes_a_program_per_rank_with_sends_and_receives():
    # Two stages, two microbatches, GPipe. Tags: v0 to stage 1 is message 0, v1 to stage 0
    # is message 1; tag = message * 2 + microbatch.
    out = run(MICROBATCHED + ',schedule{kind="gpipe"},lower-to-exec')
    assert header(out) == ('builtin.module attributes {par.num_stages = 2 : i64, par.microbatches = 2 : i64, '
                           'par.replicas = 1 : i64, exec.device = "cpu"} {')
    assert "\n  exec.process_group @pp_0 ranks [0, 1]\n  exec.program @rank0 " in out
    assert out.count("exec.process_group") == 1
    assert section(out, "exec.program @rank0") == ir(
        """
        exec.program @rank0 rank 0 world 2 {
          %0 = exec.stream "compute"
          %1 = exec.stream "comm"
          %2 = exec.load_input "0" microbatch 0 : !torch.vtensor<[2,4],f32>
          %3 = exec.state "blocks.0.w" : !torch.vtensor<[4,4],f32>
          %4 = exec.launch @s0_F(%2, %3) on %0 stage 0 pass "F" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %2 : !torch.vtensor<[2,4],f32>
          %5 = exec.event_record %0
          exec.event_wait %1, %5
          %6 = exec.send %4 to 1 group @pp_0 tag 0 on %1 : !torch.vtensor<[2,4],f32>
          exec.free %4 : !torch.vtensor<[2,4],f32>
          %7 = exec.load_input "0" microbatch 1 : !torch.vtensor<[2,4],f32>
          %8 = exec.launch @s0_F(%7, %3) on %0 stage 0 pass "F" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %7 : !torch.vtensor<[2,4],f32>
          %9 = exec.event_record %0
          exec.event_wait %1, %9
          %10 = exec.send %8 to 1 group @pp_0 tag 1 on %1 : !torch.vtensor<[2,4],f32>
          exec.free %8 : !torch.vtensor<[2,4],f32>
          %11 = exec.load_input "0" microbatch 0 : !torch.vtensor<[2,4],f32>
          %12, %13 = exec.recv from 1 group @pp_0 tag 2 on %1 : !torch.vtensor<[2,4],f32>
          exec.wait %12
          %14 = exec.launch @s0_B(%11, %13) on %0 stage 0 pass "B" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          exec.free %11, %13 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          %15 = exec.load_input "0" microbatch 1 : !torch.vtensor<[2,4],f32>
          %16, %17 = exec.recv from 1 group @pp_0 tag 3 on %1 : !torch.vtensor<[2,4],f32>
          exec.wait %16
          %18 = exec.launch @s0_B(%15, %17) on %0 stage 0 pass "B" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          exec.free %15, %17 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          %19 = exec.launch @s0_B_accumulate(%14, %18) on %0 stage 0 pass "B" microbatch 1 : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          exec.free %14, %18 : !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
          %20 = exec.launch @s0_update(%3, %19) on %0 stage 0 pass "update" : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          exec.free %3, %19 : !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
          exec.set_state "blocks.0.w", %20 : !torch.vtensor<[4,4],f32>
          exec.free %20 : !torch.vtensor<[4,4],f32>
          exec.wait %6, %10
        }
        """
    )
    # Stage 1 keeps the activation it received for its backward, sums the loss shares
    # and reports the loss.
    assert section(out, "exec.program @rank1") == ir(
        """
        exec.program @rank1 rank 1 world 2 {
          %0 = exec.stream "compute"
          %1 = exec.stream "comm"
          %2, %3 = exec.recv from 0 group @pp_0 tag 0 on %1 : !torch.vtensor<[2,4],f32>
          exec.wait %2
          %4 = exec.state "blocks.1.w" : !torch.vtensor<[4,4],f32>
          %5, %6 = exec.launch @s1_F(%3, %4) on %0 stage 1 pass "F" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          exec.free %5 : !torch.vtensor<[],f32>
          %7, %8 = exec.recv from 0 group @pp_0 tag 1 on %1 : !torch.vtensor<[2,4],f32>
          exec.wait %7
          %9, %10 = exec.launch @s1_F(%8, %4) on %0 stage 1 pass "F" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          exec.free %9 : !torch.vtensor<[],f32>
          %11 = exec.launch @s1_accumulate_loss(%6, %10) on %0 stage 1 pass "F" microbatch 1 : (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>) -> !torch.vtensor<[],f32>
          exec.free %6, %10 : !torch.vtensor<[],f32>, !torch.vtensor<[],f32>
          %12, %13 = exec.launch @s1_B(%3, %4) on %0 stage 1 pass "B" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          exec.free %3 : !torch.vtensor<[2,4],f32>
          %14 = exec.event_record %0
          exec.event_wait %1, %14
          %15 = exec.send %12 to 0 group @pp_0 tag 2 on %1 : !torch.vtensor<[2,4],f32>
          exec.free %12 : !torch.vtensor<[2,4],f32>
          %16, %17 = exec.launch @s1_B(%8, %4) on %0 stage 1 pass "B" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          exec.free %8 : !torch.vtensor<[2,4],f32>
          %18 = exec.event_record %0
          exec.event_wait %1, %18
          %19 = exec.send %16 to 0 group @pp_0 tag 3 on %1 : !torch.vtensor<[2,4],f32>
          exec.free %16 : !torch.vtensor<[2,4],f32>
          %20 = exec.launch @s1_B_accumulate(%13, %17) on %0 stage 1 pass "B" microbatch 1 : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          exec.free %13, %17 : !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
          %21 = exec.launch @s1_update(%4, %20) on %0 stage 1 pass "update" : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          exec.free %4, %20 : !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
          exec.set_state "blocks.1.w", %21 : !torch.vtensor<[4,4],f32>
          exec.free %21 : !torch.vtensor<[4,4],f32>
          exec.output "loss", %11 : !torch.vtensor<[],f32>
          exec.free %11 : !torch.vtensor<[],f32>
          exec.wait %15, %19
        }
        """
    )


def test_lower_to_exec_reduces_each_bucket_as_soon_as_its_backward_chunk_has_run():
    # One stage on two data-parallel ranks; the backward has two chunks (s0_B0: blocks.1,
    # s0_B1: blocks.0) and each gradient has its own bucket, so blocks.1.w is reduced
    # while s0_B1 still computes.
    out = run('mesh{shape="pp=1,dp=2"},pipeline-split,outline-stages,optimizer{lr=0.1},'
              'data-parallel{axis="dp" bucket-mb=0.0001},microbatch{replicas=2},'
              'schedule{kind="gpipe"},lower-to-exec')
    # One stage sends nothing, so only the gradient group is declared.
    assert re.findall(r"^  exec\.process_group .*$", out, re.MULTILINE) == [
        "  exec.process_group @grad_0 ranks [0, 1]",
    ]
    assert "par.all_reduce" not in out
    assert section(out, "exec.program @rank0") == ir(
        """
        exec.program @rank0 rank 0 world 2 {
          %0 = exec.stream "compute"
          %1 = exec.stream "comm"
          %2 = exec.load_input "0" microbatch 0 : !torch.vtensor<[2,4],f32>
          %3 = exec.state "blocks.0.w" : !torch.vtensor<[4,4],f32>
          %4 = exec.state "blocks.1.w" : !torch.vtensor<[4,4],f32>
          %5, %6, %7 = exec.launch @s0_F(%2, %3, %4) on %0 stage 0 pass "F" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          exec.free %2, %6 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[],f32>
          %8, %9 = exec.launch @s0_B0(%5, %4) on %0 stage 0 pass "B" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          exec.free %5 : !torch.vtensor<[2,4],f32>
          %10 = exec.event_record %0
          exec.event_wait %1, %10
          %11, %12 = exec.all_reduce %9 group @grad_0 sum on %1 : !torch.vtensor<[4,4],f32>
          exec.free %9 : !torch.vtensor<[4,4],f32>
          %13 = exec.load_input "0" microbatch 0 : !torch.vtensor<[2,4],f32>
          %14 = exec.launch @s0_B1(%13, %8) on %0 stage 0 pass "B" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          exec.free %8, %13 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          %15 = exec.event_record %0
          exec.event_wait %1, %15
          %16, %17 = exec.all_reduce %14 group @grad_0 sum on %1 : !torch.vtensor<[4,4],f32>
          exec.free %14 : !torch.vtensor<[4,4],f32>
          exec.wait %11, %16
          %18, %19 = exec.launch @s0_update(%3, %17, %4, %12) on %0 stage 0 pass "update" : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>)
          exec.free %3, %4, %12, %17 : !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
          exec.set_state "blocks.0.w", %18 : !torch.vtensor<[4,4],f32>
          exec.free %18 : !torch.vtensor<[4,4],f32>
          exec.set_state "blocks.1.w", %19 : !torch.vtensor<[4,4],f32>
          exec.free %19 : !torch.vtensor<[4,4],f32>
          exec.output "loss", %7 : !torch.vtensor<[],f32>
          exec.free %7 : !torch.vtensor<[],f32>
        }
        """
    )
    # The other replica runs the same program.
    assert section(out, "exec.program @rank1") == section(out, "exec.program @rank0").replace(
        "@rank0 rank 0", "@rank1 rank 1")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ('mesh{shape="pp=two"}', "mesh: 'pp=two' is not an axis; write name=size, e.g. dp=2"),
        ('mesh{shape="pp=0"}', "mesh: 'pp=0' is not an axis; write name=size, e.g. dp=2"),
        ('mesh{shape="pp=2,pp=2"}', "mesh: axis 'pp' appears twice in 'pp=2,pp=2'"),
        ('pipeline-split{stages=2 split-at="blocks.0.lin"}',
         "pipeline-split: split point 'blocks.0.lin' is not a block of the model; "
         "blocks are: blocks.0, blocks.1"),
        ('pipeline-split{stages=2 split-at="blocks.0"}',
         "pipeline-split: split points must be distinct, in model order, and after the first "
         "block: blocks.0"),
        ("pipeline-split{stages=3}",
         "pipeline-split: 3 stages but the model has only 2 blocks (blocks.0, blocks.1); "
         "use at most 2 stages, or mark stages in the model with piperc.annotate('stage', i) "
         "and pass region='stage'"),
        ("pipeline-split{stages=0}", "pipeline-split: stages must be >= 1, got 0"),
        ("outline-stages", "outline-stages: run pipeline-split first (the module has no par.num_stages)"),
        (OUTLINED + ',optimizer{kind="adam"}', "optimizer: unknown optimizer 'adam' (known: sgd, adamw)"),
        (OUTLINED + ",optimizer{lr=-0.1}", "optimizer: lr must be > 0, got -0.1"),
        (OUTLINED + ',optimizer,data-parallel{axis="dp"}',
         "data-parallel: axis 'dp' is not in the mesh ['pp']"),
        ('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
         'optimizer,data-parallel{bucket-mb=-1.0}',
         "data-parallel: bucket_mb must be > 0, got -1.0"),
        (OUTLINED + ",optimizer,microbatch{count=0}", "microbatch: microbatches and replicas must be >= 1"),
        (MICROBATCHED + ',schedule{table="0F0 0B0 0F1 0B1;1F0 1F1 1B0 1B1"}',
         "schedule: schedule 'user': deadlock: device 0 waits at 0B0 for 1B0 on device 1; "
         "device 1 waits at 1F1 for 0F1 on device 0"),
        (MICROBATCHED + ',schedule{kind="zb"}', "schedule: unknown schedule 'zb' (known: 1f1b, gpipe)"),
        (MICROBATCHED + ',schedule{axis="dp"}', "schedule: axis 'dp' is not in the mesh ['pp']"),
        (MICROBATCHED.replace("pp=2", "pp=1") + ",schedule",
         "schedule: 2 stages on a 'pp' axis of size 1; piperc runs one stage per device"),
        (MICROBATCHED + ',schedule,lower-to-exec{device="tpu"}',
         "lower-to-exec: device must be cpu or cuda, got 'tpu'"),
        (MICROBATCHED.replace("pp=2", "pp=2,tp=2") + ",schedule,lower-to-exec",
         "mesh axis 'tp' is used by no directive"),
    ],
)
def test_pass_rejects(pipeline, message):
    with pytest.raises(PassError) as raised:
        run(pipeline)
    assert isinstance(raised.value.__cause__, StrategyError)
    assert str(raised.value.__cause__) == message


# ---------------------------------------------------------------- registry, prerequisites, options


def test_strategy_passes_are_registered():
    assert {p.name for p in STRATEGY_PASSES} <= set(PASSES)
    passes = parse_pipeline(
        'mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
        'optimizer,data-parallel,microbatch,schedule,lower-to-exec')
    assert [type(p) for p in passes] == [MeshPass, PipelineSplitPass, OutlineStagesPass, OptimizerPass,
                                         DataParallelPass, MicrobatchPass, SchedulePass, LowerToExecPass]


def test_optimizer_requires_outline_stages():
    with pytest.raises(PassError) as raised:
        run('mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},optimizer')
    assert str(raised.value.__cause__) == "optimizer: run outline-stages first (the module has no stage functions)"


@pytest.mark.parametrize(
    "pipeline, missing",
    [
        ("microbatch", "pipeline-split"),
        ('mesh{shape="dp=2"},data-parallel', "pipeline-split"),
        ('mesh{shape="pp=2"},schedule', "pipeline-split"),
        (OUTLINED + ",optimizer,schedule", "microbatch"),
    ],
)
def test_missing_prerequisite_pass_is_named(pipeline, missing):
    with pytest.raises(PassError) as raised:
        run(pipeline)
    assert isinstance(raised.value.__cause__, StrategyError)
    assert missing in str(raised.value)


def test_float_options_accept_integer_literals():
    out = run('mesh{shape="pp=1,dp=2"},pipeline-split,outline-stages,optimizer{lr=1},'
              'data-parallel{bucket-mb=25}')
    assert "par.all_reduce" in out
