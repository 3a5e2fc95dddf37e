"""The strategy passes, IR text in and IR text out.

Every test starts from TWO_BLOCKS, a hand-written captured step of a two-block model
(`loss = sum(x @ w0 @ w1)`, forward ops first, then backward), runs a textual pipeline
that ends with the pass under test, and compares the printed IR with the IR the pass
should write. Where a module grows long, the test compares the function, the step (`@main`)
or the device program the pass writes. The error tests show the message a user sees for
input a pass rejects.
"""

import re
import textwrap

import pytest

from piperc.errors import PassError, StrategyError
from piperc.ir import make_context, parse_module, print_ir
from piperc.passes import PASSES
from piperc.passes.data_parallel import DataParallelPass
from piperc.passes.expand_schedule import ExpandSchedulePass
from piperc.passes.lower_to_exec import LowerToExecPass
from piperc.passes.mesh import MeshPass
from piperc.passes.microbatch import MicrobatchPass
from piperc.passes.optimizer import OptimizerPass
from piperc.passes.outline_stages import OutlineStagesPass
from piperc.passes.pipeline_split import PipelineSplitPass
from piperc.passes.schedule import SchedulePass
from piperc.passmanager import parse_pipeline, run_pipeline
from piperc.schedules import BUILTIN_SCHEDULES

STRATEGY_PASSES = (MeshPass, PipelineSplitPass, OutlineStagesPass, OptimizerPass,
                   DataParallelPass, MicrobatchPass, SchedulePass, ExpandSchedulePass, LowerToExecPass)

KNOWN = ", ".join(sorted(BUILTIN_SCHEDULES))  # what an unknown schedule name is told


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def run(pipeline: str, text: str | None = None) -> str:
    """Runs the textual `pipeline` on `text` (TWO_BLOCKS by default) and prints the result."""
    ctx = make_context()
    module = parse_module(TWO_BLOCKS if text is None else text, ctx)
    run_pipeline(module, ctx, pipeline)
    return print_ir(module)


def section(text: str, head: str) -> str:
    """The op of `text` that begins with `head` (`func.func @main`, `par.program @device0`),
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

# One F and one B function per stage, and `@main` rewritten into the step: one par.task per
# function, with the data flow between them as SSA values (h0 goes from s0_F to s1_F and
# is also the activation s1_B reads; g0, the gradient of h0, goes from s1_B to s0_B).
# Keys name what each argument/result is; every argument/result carries a layout
# (replicated here: the mesh has no data-parallel axis). Constants are re-created where used.
AFTER_OUTLINE_STAGES = ir(
    """
        builtin.module attributes {par.num_stages = 2 : i64} {
          par.mesh @mesh #par.mesh<["pp"=2]>
          func.func @s0_F(%0: !torch.vtensor<[2,4],f32> {piperc.key = "input:0", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[2,4],f32> {piperc.key = "v0", par.layout = #par.sharding<[[], []]>}) {
            %h0 = "torch.aten.mm"(%0, %1) {piperc.origin = #par.origin<"blocks.0.lin", F>, par.stage = 0 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
            func.return %h0 : !torch.vtensor<[2,4],f32>
          }
          func.func @s1_F(%0: !torch.vtensor<[2,4],f32> {piperc.key = "v0", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[],f32> {piperc.key = "loss", par.layout = #par.sharding<[]>}) {
            %h1 = "torch.aten.mm"(%0, %1) {piperc.origin = #par.origin<"blocks.1.lin", F>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
            %none = "torch.constant.none"() {piperc.origin = #par.origin<"", F>, par.stage = 1 : i64} : () -> !torch.none
            %loss = "torch.aten.sum"(%h1, %none) {piperc.origin = #par.origin<"", F>, par.stage = 1 : i64} : (!torch.vtensor<[2,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
            func.return %loss : !torch.vtensor<[],f32>
          }
          func.func @s1_B(%0: !torch.vtensor<[],f32> {piperc.key = "tangent:0", par.layout = #par.sharding<[]>}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "v0", par.layout = #par.sharding<[[], []]>}, %2: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[2,4],f32> {piperc.key = "v1", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[[], []]>}) {
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
          func.func @s0_B(%0: !torch.vtensor<[2,4],f32> {piperc.key = "input:0", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "v1", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w", par.layout = #par.sharding<[[], []]>}) {
            %xt = "torch.aten.t"(%0) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
            %dw0 = "torch.aten.mm"(%xt, %1) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
            func.return %dw0 : !torch.vtensor<[4,4],f32>
          }
          func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>, par.layout = #par.sharding<[[], []]>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>, par.layout = #par.sharding<[]>}) -> (!torch.vtensor<[],f32> {piperc.loss, par.layout = #par.sharding<[]>}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.1.w", par.layout = #par.sharding<[[], []]>}) {
            %h0 = par.task @s0_F stage 0 pass F (%x, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
            %loss = par.task @s1_F stage 1 pass F (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[],f32>
            %g0, %dw1 = par.task @s1_B stage 1 pass B (%dloss, %h0, %w1) : (!torch.vtensor<[],f32>, !torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
            %dw0 = par.task @s0_B stage 0 pass B (%x, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
            func.return %loss, %dw0, %dw1 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
          }
        }
    """
)


def test_outline_stages_writes_stage_functions_and_the_step():
    out = run('mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages')
    assert out == AFTER_OUTLINE_STAGES


def test_outline_stages_cuts_a_stage_backward_into_one_chunk_per_block():
    out = run("pipeline-split{stages=1},outline-stages")
    # The backward runs blocks.1 (with the loss gradient before it) then blocks.0.
    assert section(out, "func.func @s0_B_blocks_0") == ir(
        """
        func.func @s0_B_blocks_0(%0: !torch.vtensor<[2,4],f32> {piperc.key = "input:0", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "v1", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w", par.layout = #par.sharding<[[], []]>}) {
          %xt = "torch.aten.t"(%0) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,2],f32>
          %dw0 = "torch.aten.mm"(%xt, %1) {piperc.origin = #par.origin<"blocks.0.lin", B>, par.stage = 0 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          func.return %dw0 : !torch.vtensor<[4,4],f32>
        }
    """
    )
    whole = run("pipeline-split{stages=1},outline-stages{split-backward=false}")
    assert functions(whole) == ["s0_F", "s0_B", "main"]
    assert section(whole, "func.func @main") == ir(
        """
        func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>, par.layout = #par.sharding<[[], []]>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>, par.layout = #par.sharding<[]>}) -> (!torch.vtensor<[],f32> {piperc.loss, par.layout = #par.sharding<[]>}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.1.w", par.layout = #par.sharding<[[], []]>}) {
          %h0, %loss = par.task @s0_F stage 0 pass F (%x, %w0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[],f32>)
          %dw0, %dw1 = par.task @s0_B stage 0 pass B (%dloss, %h0, %w1, %x) : (!torch.vtensor<[],f32>, !torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[2,4],f32>) -> (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>)
          func.return %loss, %dw0, %dw1 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
        }
    """
    )


def test_outline_stages_names_each_backward_chunk_after_its_block():
    out = run("pipeline-split{stages=1},outline-stages")
    assert functions(out) == ["s0_F", "s0_B_blocks_1", "s0_B_blocks_0", "main"]
    assert section(out, "func.func @main") == ir(
        """
        func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>, par.layout = #par.sharding<[[], []]>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>, par.layout = #par.sharding<[]>}) -> (!torch.vtensor<[],f32> {piperc.loss, par.layout = #par.sharding<[]>}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.grad = "blocks.1.w", par.layout = #par.sharding<[[], []]>}) {
          %h0, %loss = par.task @s0_F stage 0 pass F (%x, %w0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[],f32>)
          %g0, %dw1 = par.task @s0_B_blocks_1 stage 0 pass B (%dloss, %h0, %w1) : (!torch.vtensor<[],f32>, !torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          %dw0 = par.task @s0_B_blocks_0 stage 0 pass B (%x, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          func.return %loss, %dw0, %dw1 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
        }
    """
    )


# ---------------------------------------------------------------- optimizer

OUTLINED = 'mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages'


def test_optimizer_sgd_with_momentum_and_weight_decay():
    out = run(OUTLINED + ',optimizer{kind="sgd" lr=0.1 momentum=0.9 weight-decay=0.01}')
    assert functions(out) == ["s0_F", "s1_F", "s1_B", "s0_B", "s0_update", "s1_update", "main"]
    # d = g + 0.01*p;  m = 0.9*m + d;  p = p - 0.1*m
    assert section(out, "func.func @s0_update") == ir(
        """
        func.func @s0_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.0.w", par.layout = #par.sharding<[[], []]>}, %2: !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.0.w.momentum", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.0.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.0.w.momentum", par.layout = #par.sharding<[[], []]>}) {
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
    assert header(section(out, "func.func @s1_update")) == (
        "func.func @s1_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = \"param:blocks.1.w\", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = \"grad:blocks.1.w\", par.layout = #par.sharding<[[], []]>}, %2: !torch.vtensor<[4,4],f32> {piperc.key = \"state:blocks.1.w.momentum\", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[4,4],f32> {piperc.key = \"param:blocks.1.w\", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.key = \"state:blocks.1.w.momentum\", par.layout = #par.sharding<[[], []]>}) {"
    )
    # The momentum buffers become step arguments (piperc.state); each stage's update task
    # reads its parameter, its gradient and its state, and the step returns the loss and
    # the new parameters and state.
    assert section(out, "func.func @main") == ir(
        """
        func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>, par.layout = #par.sharding<[[], []]>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>, par.layout = #par.sharding<[]>}, %0: !torch.vtensor<[4,4],f32> {piperc.state = "blocks.0.w.momentum", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.state = "blocks.1.w.momentum", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[],f32> {piperc.loss, par.layout = #par.sharding<[]>}, !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.state = "blocks.0.w.momentum", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.state = "blocks.1.w.momentum", par.layout = #par.sharding<[[], []]>}) {
          %h0 = par.task @s0_F stage 0 pass F (%x, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          %loss = par.task @s1_F stage 1 pass F (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[],f32>
          %g0, %dw1 = par.task @s1_B stage 1 pass B (%dloss, %h0, %w1) : (!torch.vtensor<[],f32>, !torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          %dw0 = par.task @s0_B stage 0 pass B (%x, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %2, %3 = par.task @s0_update stage 0 pass update (%w0, %dw0, %0) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>)
          %4, %5 = par.task @s1_update stage 1 pass update (%w1, %dw1, %1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>)
          func.return %loss, %2, %3, %4, %5 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
        }
    """
    )


def test_optimizer_adamw():
    out = run(OUTLINED + ',optimizer{kind="adamw" lr=0.001 weight-decay=0.01}')
    # t = t + 1;  step_size = lr / (1 - 0.9^t);  bc2_sqrt = sqrt(1 - 0.999^t)
    # p = p * (1 - 0.001*0.01);  m = lerp(m, g, 0.1);  v = 0.999*v + 0.001*g*g
    # p = p - (m / (sqrt(v) / bc2_sqrt + 1e-8)) * step_size
    assert section(out, "func.func @s1_update") == ir(
        """
        func.func @s1_update(%0: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[[], []]>}, %2: !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.exp_avg", par.layout = #par.sharding<[[], []]>}, %3: !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.exp_avg_sq", par.layout = #par.sharding<[[], []]>}, %4: !torch.vtensor<[],f64> {piperc.key = "state:step", par.layout = #par.sharding<[]>}) -> (!torch.vtensor<[],f64> {piperc.key = "state:step", par.layout = #par.sharding<[]>}, !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.exp_avg", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.key = "state:blocks.1.w.exp_avg_sq", par.layout = #par.sharding<[[], []]>}) {
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
    # The input and the activations are split over dp, the loss and the gradients are
    # partial sums over dp, the parameters are replicated.
    assert header(section(out, "func.func @s1_B")) == (
        "func.func @s1_B(%0: !torch.vtensor<[],f32> {piperc.key = \"tangent:0\", par.layout = #par.sharding<[]>}, %1: !torch.vtensor<[2,4],f32> {piperc.key = \"v0\", par.layout = #par.sharding<[[\"dp\"], []]>}, %2: !torch.vtensor<[4,4],f32> {piperc.key = \"param:blocks.1.w\", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[2,4],f32> {piperc.key = \"v1\", par.layout = #par.sharding<[[\"dp\"], []]>}, !torch.vtensor<[4,4],f32> {piperc.key = \"grad:blocks.1.w\", par.layout = #par.sharding<[[], []], partial = [\"dp\"]>}) {"
    )
    # Each stage's gradients are summed over dp in a bucket before its update.
    assert section(out, "func.func @main") == ir(
        """
        func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>, par.layout = #par.sharding<[["dp"], []]>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>, par.layout = #par.sharding<[]>}) -> (!torch.vtensor<[],f32> {piperc.loss, par.layout = #par.sharding<[], partial = ["dp"]>}, !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}) {
          %h0 = par.task @s0_F stage 0 pass F (%x, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          %loss = par.task @s1_F stage 1 pass F (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[],f32>
          %g0, %dw1 = par.task @s1_B stage 1 pass B (%dloss, %h0, %w1) : (!torch.vtensor<[],f32>, !torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          %dw0 = par.task @s0_B stage 0 pass B (%x, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %0 = par.all_reduce_bucket 0 stage 0 (%dw0) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %1 = par.task @s0_update stage 0 pass update (%w0, %0) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %2 = par.all_reduce_bucket 0 stage 1 (%dw1) over @mesh ["dp"] stages [1] : !torch.vtensor<[4,4],f32>
          %3 = par.task @s1_update stage 1 pass update (%w1, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          func.return %loss, %1, %3 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
        }
    """
    )


def test_data_parallel_numbers_buckets_in_the_order_the_backward_produces_gradients():
    # Each gradient is 64 bytes and a bucket holds at most ~105 bytes: one gradient per
    # bucket. The backward finishes blocks.1.w first, so it is bucket 0.
    out = run('mesh{shape="pp=1,dp=2"},pipeline-split,outline-stages,optimizer{lr=0.1},'
              'data-parallel{axis="dp" bucket-mb=0.0001}')
    step = section(out, "func.func @main").splitlines()
    assert [line.strip() for line in step if "all_reduce_bucket" in line or "@s0_update" in line] == [
        "%0 = par.all_reduce_bucket 0 stage 0 (%dw1) over @mesh [\"dp\"] stages [0] : !torch.vtensor<[4,4],f32>",
        "%1 = par.all_reduce_bucket 1 stage 0 (%dw0) over @mesh [\"dp\"] stages [0] : !torch.vtensor<[4,4],f32>",
        "%2, %3 = par.task @s0_update stage 0 pass update (%w0, %1, %w1, %0) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>)",
    ]


# ---------------------------------------------------------------- microbatch

MICROBATCHED_DP = ('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
                   'optimizer{lr=0.1},data-parallel{axis="dp"},microbatch{count=2 replicas=2}')


def test_microbatch_scales_the_loss_and_adds_accumulate_functions():
    # 2 microbatches x 2 replicas: the loss tangent becomes full([], 0.25) and the last
    # stage's forward also returns loss_share = loss * 0.25.
    out = run(MICROBATCHED_DP)
    assert header(out) == ("builtin.module attributes {par.num_stages = 2 : i64, "
                           "par.microbatches = 2 : i64, par.replicas = 2 : i64} {")
    assert functions(out) == ["s0_F", "s1_F", "s1_B", "s0_B", "s0_update", "s1_update",
                              "s1_F_accumulate", "s1_B_accumulate", "s0_B_accumulate", "main"]
    assert section(out, "func.func @s1_F") == ir(
        """
        func.func @s1_F(%0: !torch.vtensor<[2,4],f32> {piperc.key = "v0", par.layout = #par.sharding<[["dp"], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[],f32> {piperc.key = "loss", par.layout = #par.sharding<[], partial = ["dp"]>}, !torch.vtensor<[],f32> {piperc.key = "loss_share", par.layout = #par.sharding<[], partial = ["dp"]>}) {
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
        func.func @s1_B(%0: !torch.vtensor<[2,4],f32> {piperc.key = "v0", par.layout = #par.sharding<[["dp"], []]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "param:blocks.1.w", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[2,4],f32> {piperc.key = "v1", par.layout = #par.sharding<[["dp"], []]>}, !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[[], []], partial = ["dp"]>}) {
          %2 = "torch.prim.ListConstruct"() : () -> !torch.list<int>
          %3 = "torch.constant.float"() <{value = 2.500000e-01 : f64}> : () -> !torch.float
          %4 = "torch.constant.int"() <{value = 6 : i64}> : () -> !torch.int
          %5 = "torch.constant.none"() : () -> !torch.none
          %6 = "torch.constant.device"() <{value = "cpu"}> : () -> !torch.Device
          %7 = "torch.constant.none"() : () -> !torch.none
          %8 = "torch.aten.full"(%2, %3, %4, %5, %6, %7) : (!torch.list<int>, !torch.float, !torch.int, !torch.none, !torch.Device, !torch.none) -> !torch.vtensor<[],f32>
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
    # The step sums the loss shares and each gradient over the microbatches right after
    # the task that makes them, then reduces the sums over dp and updates; it returns the
    # summed loss share as the loss.
    assert section(out, "func.func @main") == ir(
        """
        func.func @main(%w0: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, %w1: !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}, %x: !torch.vtensor<[2,4],f32> {piperc.input = #builtin.int<0>, par.layout = #par.sharding<[["dp"], []]>}) -> (!torch.vtensor<[],f32> {piperc.loss, par.layout = #par.sharding<[], partial = ["dp"]>}, !torch.vtensor<[4,4],f32> {piperc.param = "blocks.0.w", par.layout = #par.sharding<[[], []]>}, !torch.vtensor<[4,4],f32> {piperc.param = "blocks.1.w", par.layout = #par.sharding<[[], []]>}) {
          %h0 = par.task @s0_F stage 0 pass F (%x, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          %loss, %0 = par.task @s1_F stage 1 pass F (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %1 = par.accumulate @s1_F_accumulate stage 1 (%0) : !torch.vtensor<[],f32>
          %g0, %dw1 = par.task @s1_B stage 1 pass B (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          %dw1_1 = par.accumulate @s1_B_accumulate stage 1 (%dw1) : !torch.vtensor<[4,4],f32>
          %dw0 = par.task @s0_B stage 0 pass B (%x, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %dw0_1 = par.accumulate @s0_B_accumulate stage 0 (%dw0) : !torch.vtensor<[4,4],f32>
          %2 = par.all_reduce_bucket 0 stage 0 (%dw0_1) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
          %3 = par.task @s0_update stage 0 pass update (%w0, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %4 = par.all_reduce_bucket 0 stage 1 (%dw1_1) over @mesh ["dp"] stages [1] : !torch.vtensor<[4,4],f32>
          %5 = par.task @s1_update stage 1 pass update (%w1, %4) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          func.return %1, %3, %5 : !torch.vtensor<[],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>
        }
    """
    )


def test_microbatch_combiners_carry_the_layout_of_what_they_sum():
    out = run(MICROBATCHED_DP)
    assert section(out, "func.func @s1_B_accumulate") == ir(
        """
        func.func @s1_B_accumulate(%0: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[[], []], partial = ["dp"]>}, %1: !torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[[], []], partial = ["dp"]>}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[[], []], partial = ["dp"]>}) {
          %2 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> : () -> !torch.float
          %3 = "torch.aten.add.Tensor"(%0, %1, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>, !torch.float) -> !torch.vtensor<[4,4],f32>
          func.return %3 : !torch.vtensor<[4,4],f32>
        }
    """
    )
    assert section(out, "func.func @s1_F_accumulate") == ir(
        """
        func.func @s1_F_accumulate(%0: !torch.vtensor<[],f32> {piperc.key = "loss_share", par.layout = #par.sharding<[], partial = ["dp"]>}, %1: !torch.vtensor<[],f32> {piperc.key = "loss_share", par.layout = #par.sharding<[], partial = ["dp"]>}) -> (!torch.vtensor<[],f32> {piperc.key = "loss_share", par.layout = #par.sharding<[], partial = ["dp"]>}) {
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


# ---------------------------------------------------------------- expand-schedule

PIPELINED_DP = ('mesh{shape="pp=2,dp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages,'
                'optimizer{lr=0.1},data-parallel,microbatch{count=2}')

# Device 0 under both schedules: each forward's send follows its task; the receive of
# g0 mb0 is issued with the send of h0 mb1 as one batch (they cross between the
# devices); the combiner sums the gradients from the second microbatch on; the bucket,
# the update and the store follow.
DEVICE0_PROGRAM = ir(
    """
    par.program @device0 device 0 {
      %0 = par.input 0 microbatch 0 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
      %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
      %h0 = par.task @s0_F stage 0 pass F microbatch 0 (%0, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
      par.send %h0 to 1 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
      %1 = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,4],f32>
      %h0_1 = par.task @s0_F stage 0 pass F microbatch 1 (%1, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
      par.send %h0_1 to 1 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
      %g0 = par.recv from 1 "g0 mb0" batch 1 : !torch.vtensor<[2,4],f32>
      %dw0 = par.task @s0_B stage 0 pass B microbatch 0 (%0, %g0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
      %g0_1 = par.recv from 1 "g0 mb1" batch 2 : !torch.vtensor<[2,4],f32>
      %dw0_1 = par.task @s0_B stage 0 pass B microbatch 1 (%1, %g0_1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
      %dw0_2 = par.task @s0_B_accumulate stage 0 pass B microbatch 1 (%dw0, %dw0_1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
      %2 = par.all_reduce_bucket 0 stage 0 (%dw0_2) over @mesh ["dp"] stages [0] : !torch.vtensor<[4,4],f32>
      %3 = par.task @s0_update stage 0 pass update (%w0, %2) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
      par.set_state "blocks.0.w", %3 : !torch.vtensor<[4,4],f32>
    }
"""
)


def test_expand_schedule_gpipe():
    out = run(PIPELINED_DP + ',schedule{kind="gpipe"},expand-schedule')
    assert section(out, "par.program @device0") == DEVICE0_PROGRAM
    # Device 1 receives in the order device 0 sends, runs both forwards, reports the
    # summed loss share, then sends the gradients in the order device 0 receives them.
    assert section(out, "par.program @device1") == ir(
        """
        par.program @device1 device 1 {
          %h0 = par.recv from 0 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %w1 = par.state "blocks.1.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %loss, %0 = par.task @s1_F stage 1 pass F microbatch 0 (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %h0_1 = par.recv from 0 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
          %loss_1, %1 = par.task @s1_F stage 1 pass F microbatch 1 (%h0_1, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %2 = par.task @s1_F_accumulate stage 1 pass F microbatch 1 (%0, %1) : (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>) -> !torch.vtensor<[],f32>
          par.output "loss", %2 : !torch.vtensor<[],f32>
          %g0, %dw1 = par.task @s1_B stage 1 pass B microbatch 0 (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          par.send %g0 to 0 "g0 mb0" batch 2 : !torch.vtensor<[2,4],f32>
          %g0_1, %dw1_1 = par.task @s1_B stage 1 pass B microbatch 1 (%h0_1, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          %dw1_2 = par.task @s1_B_accumulate stage 1 pass B microbatch 1 (%dw1, %dw1_1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.send %g0_1 to 0 "g0 mb1" batch 3 : !torch.vtensor<[2,4],f32>
          %3 = par.all_reduce_bucket 0 stage 1 (%dw1_2) over @mesh ["dp"] stages [1] : !torch.vtensor<[4,4],f32>
          %4 = par.task @s1_update stage 1 pass update (%w1, %3) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.1.w", %4 : !torch.vtensor<[4,4],f32>
        }
    """
    )


def test_expand_schedule_1f1b():
    out = run(PIPELINED_DP + ',schedule{kind="1f1b"},expand-schedule')
    assert section(out, "par.program @device0") == DEVICE0_PROGRAM
    # Device 1 alternates: the send of g0 mb0 and the receive of h0 mb1 are one batch.
    assert section(out, "par.program @device1") == ir(
        """
        par.program @device1 device 1 {
          %h0 = par.recv from 0 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %w1 = par.state "blocks.1.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %loss, %0 = par.task @s1_F stage 1 pass F microbatch 0 (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %g0, %dw1 = par.task @s1_B stage 1 pass B microbatch 0 (%h0, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          par.send %g0 to 0 "g0 mb0" batch 1 : !torch.vtensor<[2,4],f32>
          %h0_1 = par.recv from 0 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
          %loss_1, %1 = par.task @s1_F stage 1 pass F microbatch 1 (%h0_1, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %2 = par.task @s1_F_accumulate stage 1 pass F microbatch 1 (%0, %1) : (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>) -> !torch.vtensor<[],f32>
          par.output "loss", %2 : !torch.vtensor<[],f32>
          %g0_1, %dw1_1 = par.task @s1_B stage 1 pass B microbatch 1 (%h0_1, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          %dw1_2 = par.task @s1_B_accumulate stage 1 pass B microbatch 1 (%dw1, %dw1_1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.send %g0_1 to 0 "g0 mb1" batch 2 : !torch.vtensor<[2,4],f32>
          %3 = par.all_reduce_bucket 0 stage 1 (%dw1_2) over @mesh ["dp"] stages [1] : !torch.vtensor<[4,4],f32>
          %4 = par.task @s1_update stage 1 pass update (%w1, %3) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.1.w", %4 : !torch.vtensor<[4,4],f32>
        }
    """
    )


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
        (MICROBATCHED + ',schedule{table="0F0 0F1 0B0;1F0 1B0 1F1 1B1"},expand-schedule',
         "schedule: schedule 'user': action 0B1 is missing (stage 0 runs on device 0)"),
        (MICROBATCHED + ',schedule{table="0F0 0B0 0F1 0B1;1B0 1F0 1F1 1B1"},expand-schedule',
         "schedule: schedule 'user': 1B0 runs before 1F0 on device 1, but needs its result; move 1B0 after 1F0"),
        (MICROBATCHED + ',schedule{table="0F0 0F1 0B0 0W0 0B1 0W1;1F0 1B0 1W0 1F1 1B1 1W1"},expand-schedule',
         "expand-schedule: schedule action 0W0 on device 0 runs nothing: stage 0 has no W task "
         "(the backward is not split into B and W)"),
        (MICROBATCHED + ',schedule{kind="zb"}', f"schedule: unknown schedule 'zb' (known: {KNOWN})"),
        (MICROBATCHED + ',schedule{axis="dp"}', "schedule: axis 'dp' is not in the mesh ['pp']"),
        (MICROBATCHED.replace("pp=2", "pp=1") + ",schedule",
         "schedule: schedule '1f1b' runs one stage per device, but got 2 stages for 1 devices; "
         "use schedule 'interleaved' to run several stages per device, or give 1 stages"),
        (MICROBATCHED + ',schedule,lower-to-exec{device="tpu"}',
         "lower-to-exec: device must be cpu or cuda, got 'tpu'"),
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
        'optimizer,data-parallel,microbatch,schedule,expand-schedule,lower-to-exec')
    assert [type(p) for p in passes] == [MeshPass, PipelineSplitPass, OutlineStagesPass, OptimizerPass,
                                         DataParallelPass, MicrobatchPass, SchedulePass, ExpandSchedulePass,
                                         LowerToExecPass]


def test_optimizer_requires_outline_stages():
    with pytest.raises(PassError) as raised:
        run('mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},optimizer')
    assert str(raised.value.__cause__) == "optimizer: run outline-stages first (the module has no stage functions)"


@pytest.mark.parametrize(
    "pipeline, missing",
    [
        ("microbatch", "pipeline-split"),
        ('mesh{shape="dp=2"},data-parallel', "optimizer"),
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
