"""expert-parallel: each MoE layer's experts sharded over the data-parallel axis, its dispatched
tokens resharded to them and back (all_to_all), trained exactly against one device run on the
same (replica x microbatch) slices.

MOE is a hand-written captured step in the form `piperc.nn.MoE` captures (router, topk, the
scatter_add dispatch into [E*C, d] viewed [E, C, d] = [2, 2, 3], two expert bmm's, the view back
and the gather combine; then the backward), with a dense `embed.w` before the layer and a frozen
router. The real runs train `examples/moe.py` (2 blocks) for 3 AdamW steps.
"""

import functools
import types

import pytest
import torch

import piperc
from piperc.examples import moe
from piperc.examples.gpt import sample_batch
from piperc.nn import MoE
from piperc.reference import compare
from tests import shared
from tests.test_moe import loop_reference
from tests.test_passes_ir import ir, run, section

PLACEHOLDERS = {
    "FL": '{piperc.origin = #par.origin<"moe", F, region "moe">, par.layouts = [#par.sharding<[["dp"], [], []]>]}',
    "BL": '{piperc.origin = #par.origin<"moe", B, region "moe">, par.layouts = [#par.sharding<[["dp"], [], []]>]}',
    "FM": '{piperc.origin = #par.origin<"moe", F, region "moe">}',
    "BM": '{piperc.origin = #par.origin<"moe", B, region "moe">}',
    "EXPERTS": '#par.sharding<[["dp"], [], []]>',
    "TOKENS": '#par.sharding<[[], ["dp"], []]>',
}
"""Spelled out in the IR below: FM/BM an op of the layer's forward/backward, FL/BL one that the
pass laid out by expert, EXPERTS and TOKENS the two layouts of the dispatched buffer."""


def spelled(text: str) -> str:
    """`text` with its placeholders spelled out."""
    for short, long in PLACEHOLDERS.items():
        text = text.replace(short, long)
    return text


def moe_ir(text: str) -> str:
    """`text` as IR, its placeholders spelled out."""
    return spelled(ir(text))


MOE = moe_ir(
    """

    builtin.module {
      func.func @main(%w0: !torch.vtensor<[3,3],f32> {piperc.param = "embed.w"}, %wr: !torch.vtensor<[2,3],f32> {piperc.param = "moe.router.weight"}, %w1: !torch.vtensor<[2,3,5],f32> {piperc.param = "moe.w1"}, %w2: !torch.vtensor<[2,5,3],f32> {piperc.param = "moe.w2"}, %x0: !torch.vtensor<[4,3],f32> {piperc.input = #builtin.int<0>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[3,3],f32> {piperc.grad = "embed.w"}, !torch.vtensor<[2,3,5],f32> {piperc.grad = "moe.w1"}, !torch.vtensor<[2,5,3],f32> {piperc.grad = "moe.w2"}) {
        %x = "torch.aten.mm"(%x0, %w0) {piperc.origin = #par.origin<"embed", F>} : (!torch.vtensor<[4,3],f32>, !torch.vtensor<[3,3],f32>) -> !torch.vtensor<[4,3],f32>
        %rt = "torch.aten.t"(%wr) {piperc.origin = #par.origin<"moe.router", F, region "moe">} : (!torch.vtensor<[2,3],f32>) -> !torch.vtensor<[3,2],f32>
        %logits = "torch.aten.mm"(%x, %rt) {piperc.origin = #par.origin<"moe.router", F, region "moe">} : (!torch.vtensor<[4,3],f32>, !torch.vtensor<[3,2],f32>) -> !torch.vtensor<[4,2],f32>
        %c0 = "torch.constant.int"() <{value = 0 : i64}> FM : () -> !torch.int
        %c1 = "torch.constant.int"() <{value = 1 : i64}> FM : () -> !torch.int
        %c2 = "torch.constant.int"() <{value = 2 : i64}> FM : () -> !torch.int
        %c3 = "torch.constant.int"() <{value = 3 : i64}> FM : () -> !torch.int
        %c4 = "torch.constant.int"() <{value = 4 : i64}> FM : () -> !torch.int
        %true = "torch.constant.bool"() <{value = true}> FM : () -> !torch.bool
        %false = "torch.constant.bool"() <{value = false}> FM : () -> !torch.bool
        %none = "torch.constant.none"() FM : () -> !torch.none
        %probs = "torch.aten._softmax"(%logits, %c1, %false) FM : (!torch.vtensor<[4,2],f32>, !torch.int, !torch.bool) -> !torch.vtensor<[4,2],f32>
        %gates, %experts = "torch.aten.topk"(%probs, %c1, %c1, %true, %true) FM : (!torch.vtensor<[4,2],f32>, !torch.int, !torch.int, !torch.bool, !torch.bool) -> (!torch.vtensor<[4,1],f32>, !torch.vtensor<[4,1],si64>)
        %slot = "torch.aten.mul.Scalar"(%experts, %c2) FM : (!torch.vtensor<[4,1],si64>, !torch.int) -> !torch.vtensor<[4,1],si64>
        %rows = "torch.prim.ListConstruct"(%c4, %c3) FM : (!torch.int, !torch.int) -> !torch.list<int>
        %idx = "torch.aten.expand"(%slot, %rows, %false) FM : (!torch.vtensor<[4,1],si64>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[4,3],si64>
        %zeros = "torch.aten.new_zeros"(%x, %rows, %none, %none, %none, %none) FM : (!torch.vtensor<[4,3],f32>, !torch.list<int>, !torch.none, !torch.none, !torch.none, !torch.none) -> !torch.vtensor<[4,3],f32>
        %buf = "torch.aten.scatter_add"(%zeros, %c0, %idx, %x) FM : (!torch.vtensor<[4,3],f32>, !torch.int, !torch.vtensor<[4,3],si64>, !torch.vtensor<[4,3],f32>) -> !torch.vtensor<[4,3],f32>
        %ecd = "torch.prim.ListConstruct"(%c2, %c2, %c3) FM : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
        %dispatched = "torch.aten.view"(%buf, %ecd) FM : (!torch.vtensor<[4,3],f32>, !torch.list<int>) -> !torch.vtensor<[2,2,3],f32>
        %h = "torch.aten.bmm"(%dispatched, %w1) FM : (!torch.vtensor<[2,2,3],f32>, !torch.vtensor<[2,3,5],f32>) -> !torch.vtensor<[2,2,5],f32>
        %a = "torch.aten.relu"(%h) FM : (!torch.vtensor<[2,2,5],f32>) -> !torch.vtensor<[2,2,5],f32>
        %out = "torch.aten.bmm"(%a, %w2) FM : (!torch.vtensor<[2,2,5],f32>, !torch.vtensor<[2,5,3],f32>) -> !torch.vtensor<[2,2,3],f32>
        %flat = "torch.aten.view"(%out, %rows) FM : (!torch.vtensor<[2,2,3],f32>, !torch.list<int>) -> !torch.vtensor<[4,3],f32>
        %y = "torch.aten.gather"(%flat, %c0, %idx, %false) FM : (!torch.vtensor<[4,3],f32>, !torch.int, !torch.vtensor<[4,3],si64>, !torch.bool) -> !torch.vtensor<[4,3],f32>
        %yg = "torch.aten.mul.Tensor"(%y, %gates) FM : (!torch.vtensor<[4,3],f32>, !torch.vtensor<[4,1],f32>) -> !torch.vtensor<[4,3],f32>
        %loss = "torch.aten.sum"(%yg, %none) {piperc.origin = #par.origin<"", F>} : (!torch.vtensor<[4,3],f32>, !torch.none) -> !torch.vtensor<[],f32>
        %rows2 = "torch.prim.ListConstruct"(%c4, %c3) {piperc.origin = #par.origin<"", B>} : (!torch.int, !torch.int) -> !torch.list<int>
        %dy = "torch.aten.expand"(%dloss, %rows2, %false) {piperc.origin = #par.origin<"", B>} : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[4,3],f32>
        %dyg = "torch.aten.mul.Tensor"(%dy, %gates) BM : (!torch.vtensor<[4,3],f32>, !torch.vtensor<[4,1],f32>) -> !torch.vtensor<[4,3],f32>
        %zeros2 = "torch.aten.new_zeros"(%dyg, %rows2, %none, %none, %none, %none) BM : (!torch.vtensor<[4,3],f32>, !torch.list<int>, !torch.none, !torch.none, !torch.none, !torch.none) -> !torch.vtensor<[4,3],f32>
        %dflat = "torch.aten.scatter_add"(%zeros2, %c0, %idx, %dyg) BM : (!torch.vtensor<[4,3],f32>, !torch.int, !torch.vtensor<[4,3],si64>, !torch.vtensor<[4,3],f32>) -> !torch.vtensor<[4,3],f32>
        %ecd2 = "torch.prim.ListConstruct"(%c2, %c2, %c3) BM : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
        %dout = "torch.aten.view"(%dflat, %ecd2) BM : (!torch.vtensor<[4,3],f32>, !torch.list<int>) -> !torch.vtensor<[2,2,3],f32>
        %at = "torch.aten.transpose.int"(%a, %c1, %c2) BM : (!torch.vtensor<[2,2,5],f32>, !torch.int, !torch.int) -> !torch.vtensor<[2,5,2],f32>
        %dw2 = "torch.aten.bmm"(%at, %dout) BM : (!torch.vtensor<[2,5,2],f32>, !torch.vtensor<[2,2,3],f32>) -> !torch.vtensor<[2,5,3],f32>
        %w2t = "torch.aten.transpose.int"(%w2, %c1, %c2) BM : (!torch.vtensor<[2,5,3],f32>, !torch.int, !torch.int) -> !torch.vtensor<[2,3,5],f32>
        %da = "torch.aten.bmm"(%dout, %w2t) BM : (!torch.vtensor<[2,2,3],f32>, !torch.vtensor<[2,3,5],f32>) -> !torch.vtensor<[2,2,5],f32>
        %dh = "torch.aten.threshold_backward"(%da, %a, %c0) BM : (!torch.vtensor<[2,2,5],f32>, !torch.vtensor<[2,2,5],f32>, !torch.int) -> !torch.vtensor<[2,2,5],f32>
        %dt = "torch.aten.transpose.int"(%dispatched, %c1, %c2) BM : (!torch.vtensor<[2,2,3],f32>, !torch.int, !torch.int) -> !torch.vtensor<[2,3,2],f32>
        %dw1 = "torch.aten.bmm"(%dt, %dh) BM : (!torch.vtensor<[2,3,2],f32>, !torch.vtensor<[2,2,5],f32>) -> !torch.vtensor<[2,3,5],f32>
        %w1t = "torch.aten.transpose.int"(%w1, %c1, %c2) BM : (!torch.vtensor<[2,3,5],f32>, !torch.int, !torch.int) -> !torch.vtensor<[2,5,3],f32>
        %ddisp = "torch.aten.bmm"(%dh, %w1t) BM : (!torch.vtensor<[2,2,5],f32>, !torch.vtensor<[2,5,3],f32>) -> !torch.vtensor<[2,2,3],f32>
        %dbuf = "torch.aten.view"(%ddisp, %rows2) BM : (!torch.vtensor<[2,2,3],f32>, !torch.list<int>) -> !torch.vtensor<[4,3],f32>
        %dx = "torch.aten.gather"(%dbuf, %c0, %idx, %false) BM : (!torch.vtensor<[4,3],f32>, !torch.int, !torch.vtensor<[4,3],si64>, !torch.bool) -> !torch.vtensor<[4,3],f32>
        %x0t = "torch.aten.t"(%x0) {piperc.origin = #par.origin<"embed", B>} : (!torch.vtensor<[4,3],f32>) -> !torch.vtensor<[3,4],f32>
        %dw0 = "torch.aten.mm"(%x0t, %dx) {piperc.origin = #par.origin<"embed", B>} : (!torch.vtensor<[3,4],f32>, !torch.vtensor<[4,3],f32>) -> !torch.vtensor<[3,3],f32>
        func.return %loss, %dw0, %dw1, %dw2 : !torch.vtensor<[],f32>, !torch.vtensor<[3,3],f32>, !torch.vtensor<[2,3,5],f32>, !torch.vtensor<[2,5,3],f32>
      }
    }
    """
)


def test_the_dispatched_buffer_is_resharded_to_the_experts_and_back():
    """The [2, 2, 3] buffer of this rank's tokens becomes [1, 4, 3]: this rank's expert, every
    rank's slots; the expert weights and gradients are this rank's [1, ...] expert; the expert
    output, and in the backward the dispatched buffer's gradient, go back before their view to
    [E*C, d]. Everything else is as captured."""
    out = run('mesh{shape="dp=2"},expert-parallel', MOE)
    assert section(out, "func.func @main") == moe_ir(
        """
    func.func @main(%w0: !torch.vtensor<[3,3],f32> {piperc.param = "embed.w"}, %wr: !torch.vtensor<[2,3],f32> {piperc.param = "moe.router.weight"}, %w1: !torch.vtensor<[1,3,5],f32> {piperc.param = "moe.w1", par.layout = EXPERTS}, %w2: !torch.vtensor<[1,5,3],f32> {piperc.param = "moe.w2", par.layout = EXPERTS}, %x0: !torch.vtensor<[4,3],f32> {piperc.input = #builtin.int<0>}, %dloss: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[3,3],f32> {piperc.grad = "embed.w"}, !torch.vtensor<[1,3,5],f32> {piperc.grad = "moe.w1", par.layout = EXPERTS}, !torch.vtensor<[1,5,3],f32> {piperc.grad = "moe.w2", par.layout = EXPERTS}) {
      %x = "torch.aten.mm"(%x0, %w0) {piperc.origin = #par.origin<"embed", F>} : (!torch.vtensor<[4,3],f32>, !torch.vtensor<[3,3],f32>) -> !torch.vtensor<[4,3],f32>
      %rt = "torch.aten.t"(%wr) {piperc.origin = #par.origin<"moe.router", F, region "moe">} : (!torch.vtensor<[2,3],f32>) -> !torch.vtensor<[3,2],f32>
      %logits = "torch.aten.mm"(%x, %rt) {piperc.origin = #par.origin<"moe.router", F, region "moe">} : (!torch.vtensor<[4,3],f32>, !torch.vtensor<[3,2],f32>) -> !torch.vtensor<[4,2],f32>
      %c0 = "torch.constant.int"() <{value = 0 : i64}> FM : () -> !torch.int
      %c1 = "torch.constant.int"() <{value = 1 : i64}> FM : () -> !torch.int
      %c2 = "torch.constant.int"() <{value = 2 : i64}> FM : () -> !torch.int
      %c3 = "torch.constant.int"() <{value = 3 : i64}> FM : () -> !torch.int
      %c4 = "torch.constant.int"() <{value = 4 : i64}> FM : () -> !torch.int
      %true = "torch.constant.bool"() <{value = true}> FM : () -> !torch.bool
      %false = "torch.constant.bool"() <{value = false}> FM : () -> !torch.bool
      %none = "torch.constant.none"() FM : () -> !torch.none
      %probs = "torch.aten._softmax"(%logits, %c1, %false) FM : (!torch.vtensor<[4,2],f32>, !torch.int, !torch.bool) -> !torch.vtensor<[4,2],f32>
      %gates, %experts = "torch.aten.topk"(%probs, %c1, %c1, %true, %true) FM : (!torch.vtensor<[4,2],f32>, !torch.int, !torch.int, !torch.bool, !torch.bool) -> (!torch.vtensor<[4,1],f32>, !torch.vtensor<[4,1],si64>)
      %slot = "torch.aten.mul.Scalar"(%experts, %c2) FM : (!torch.vtensor<[4,1],si64>, !torch.int) -> !torch.vtensor<[4,1],si64>
      %rows = "torch.prim.ListConstruct"(%c4, %c3) FM : (!torch.int, !torch.int) -> !torch.list<int>
      %idx = "torch.aten.expand"(%slot, %rows, %false) FM : (!torch.vtensor<[4,1],si64>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[4,3],si64>
      %zeros = "torch.aten.new_zeros"(%x, %rows, %none, %none, %none, %none) FM : (!torch.vtensor<[4,3],f32>, !torch.list<int>, !torch.none, !torch.none, !torch.none, !torch.none) -> !torch.vtensor<[4,3],f32>
      %buf = "torch.aten.scatter_add"(%zeros, %c0, %idx, %x) FM : (!torch.vtensor<[4,3],f32>, !torch.int, !torch.vtensor<[4,3],si64>, !torch.vtensor<[4,3],f32>) -> !torch.vtensor<[4,3],f32>
      %ecd = "torch.prim.ListConstruct"(%c2, %c2, %c3) FM : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
      %dispatched = "torch.aten.view"(%buf, %ecd) FM : (!torch.vtensor<[4,3],f32>, !torch.list<int>) -> !torch.vtensor<[2,2,3],f32>
      %dispatched_1 = par.reshard %dispatched @mesh from TOKENS to EXPERTS FM : !torch.vtensor<[2,2,3],f32> -> !torch.vtensor<[1,4,3],f32>
      %h = "torch.aten.bmm"(%dispatched_1, %w1) FL : (!torch.vtensor<[1,4,3],f32>, !torch.vtensor<[1,3,5],f32>) -> !torch.vtensor<[1,4,5],f32>
      %a = "torch.aten.relu"(%h) FL : (!torch.vtensor<[1,4,5],f32>) -> !torch.vtensor<[1,4,5],f32>
      %out = "torch.aten.bmm"(%a, %w2) FL : (!torch.vtensor<[1,4,5],f32>, !torch.vtensor<[1,5,3],f32>) -> !torch.vtensor<[1,4,3],f32>
      %0 = par.reshard %out @mesh from EXPERTS to TOKENS FM : !torch.vtensor<[1,4,3],f32> -> !torch.vtensor<[2,2,3],f32>
      %flat = "torch.aten.view"(%0, %rows) FM : (!torch.vtensor<[2,2,3],f32>, !torch.list<int>) -> !torch.vtensor<[4,3],f32>
      %y = "torch.aten.gather"(%flat, %c0, %idx, %false) FM : (!torch.vtensor<[4,3],f32>, !torch.int, !torch.vtensor<[4,3],si64>, !torch.bool) -> !torch.vtensor<[4,3],f32>
      %yg = "torch.aten.mul.Tensor"(%y, %gates) FM : (!torch.vtensor<[4,3],f32>, !torch.vtensor<[4,1],f32>) -> !torch.vtensor<[4,3],f32>
      %loss = "torch.aten.sum"(%yg, %none) {piperc.origin = #par.origin<"", F>} : (!torch.vtensor<[4,3],f32>, !torch.none) -> !torch.vtensor<[],f32>
      %rows2 = "torch.prim.ListConstruct"(%c4, %c3) {piperc.origin = #par.origin<"", B>} : (!torch.int, !torch.int) -> !torch.list<int>
      %dy = "torch.aten.expand"(%dloss, %rows2, %false) {piperc.origin = #par.origin<"", B>} : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[4,3],f32>
      %dyg = "torch.aten.mul.Tensor"(%dy, %gates) BM : (!torch.vtensor<[4,3],f32>, !torch.vtensor<[4,1],f32>) -> !torch.vtensor<[4,3],f32>
      %zeros2 = "torch.aten.new_zeros"(%dyg, %rows2, %none, %none, %none, %none) BM : (!torch.vtensor<[4,3],f32>, !torch.list<int>, !torch.none, !torch.none, !torch.none, !torch.none) -> !torch.vtensor<[4,3],f32>
      %dflat = "torch.aten.scatter_add"(%zeros2, %c0, %idx, %dyg) BM : (!torch.vtensor<[4,3],f32>, !torch.int, !torch.vtensor<[4,3],si64>, !torch.vtensor<[4,3],f32>) -> !torch.vtensor<[4,3],f32>
      %ecd2 = "torch.prim.ListConstruct"(%c2, %c2, %c3) BM : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
      %dout = "torch.aten.view"(%dflat, %ecd2) BM : (!torch.vtensor<[4,3],f32>, !torch.list<int>) -> !torch.vtensor<[2,2,3],f32>
      %dout_1 = par.reshard %dout @mesh from TOKENS to EXPERTS BM : !torch.vtensor<[2,2,3],f32> -> !torch.vtensor<[1,4,3],f32>
      %at = "torch.aten.transpose.int"(%a, %c1, %c2) BL : (!torch.vtensor<[1,4,5],f32>, !torch.int, !torch.int) -> !torch.vtensor<[1,5,4],f32>
      %dw2 = "torch.aten.bmm"(%at, %dout_1) BL : (!torch.vtensor<[1,5,4],f32>, !torch.vtensor<[1,4,3],f32>) -> !torch.vtensor<[1,5,3],f32>
      %w2t = "torch.aten.transpose.int"(%w2, %c1, %c2) BL : (!torch.vtensor<[1,5,3],f32>, !torch.int, !torch.int) -> !torch.vtensor<[1,3,5],f32>
      %da = "torch.aten.bmm"(%dout_1, %w2t) BL : (!torch.vtensor<[1,4,3],f32>, !torch.vtensor<[1,3,5],f32>) -> !torch.vtensor<[1,4,5],f32>
      %dh = "torch.aten.threshold_backward"(%da, %a, %c0) BL : (!torch.vtensor<[1,4,5],f32>, !torch.vtensor<[1,4,5],f32>, !torch.int) -> !torch.vtensor<[1,4,5],f32>
      %dt = "torch.aten.transpose.int"(%dispatched_1, %c1, %c2) BL : (!torch.vtensor<[1,4,3],f32>, !torch.int, !torch.int) -> !torch.vtensor<[1,3,4],f32>
      %dw1 = "torch.aten.bmm"(%dt, %dh) BL : (!torch.vtensor<[1,3,4],f32>, !torch.vtensor<[1,4,5],f32>) -> !torch.vtensor<[1,3,5],f32>
      %w1t = "torch.aten.transpose.int"(%w1, %c1, %c2) BL : (!torch.vtensor<[1,3,5],f32>, !torch.int, !torch.int) -> !torch.vtensor<[1,5,3],f32>
      %ddisp = "torch.aten.bmm"(%dh, %w1t) BL : (!torch.vtensor<[1,4,5],f32>, !torch.vtensor<[1,5,3],f32>) -> !torch.vtensor<[1,4,3],f32>
      %1 = par.reshard %ddisp @mesh from EXPERTS to TOKENS BM : !torch.vtensor<[1,4,3],f32> -> !torch.vtensor<[2,2,3],f32>
      %dbuf = "torch.aten.view"(%1, %rows2) BM : (!torch.vtensor<[2,2,3],f32>, !torch.list<int>) -> !torch.vtensor<[4,3],f32>
      %dx = "torch.aten.gather"(%dbuf, %c0, %idx, %false) BM : (!torch.vtensor<[4,3],f32>, !torch.int, !torch.vtensor<[4,3],si64>, !torch.bool) -> !torch.vtensor<[4,3],f32>
      %x0t = "torch.aten.t"(%x0) {piperc.origin = #par.origin<"embed", B>} : (!torch.vtensor<[4,3],f32>) -> !torch.vtensor<[3,4],f32>
      %dw0 = "torch.aten.mm"(%x0t, %dx) {piperc.origin = #par.origin<"embed", B>} : (!torch.vtensor<[3,4],f32>, !torch.vtensor<[4,3],f32>) -> !torch.vtensor<[3,3],f32>
      func.return %loss, %dw0, %dw1, %dw2 : !torch.vtensor<[],f32>, !torch.vtensor<[3,3],f32>, !torch.vtensor<[1,3,5],f32>, !torch.vtensor<[1,5,3],f32>
    }
        """
    )


LOWERED = ('mesh{shape="pp=1,dp=2"},expert-parallel,pipeline-split{stages=1},outline-stages,optimizer{kind=sgd lr=0.1},'
           'data-parallel,microbatch{count=1 replicas=2},schedule{kind=gpipe},expand-schedule,lower-reshard')


def test_lower_reshard_makes_the_reshards_all_to_alls_and_only_dense_gradients_are_summed():
    """Forward and backward each all_to_all the buffer to the experts (split the expert
    dimension, concatenate the slots) and back; the device holds its expert's weights; the
    data-parallel bucket sums embed.w's gradient, not the experts'. Each all_to_all carries the
    layer's origin (the statistics count its bytes by it)."""
    out = run(LOWERED, MOE)
    moved = [line.strip() for line in out.splitlines() if "par.all_to_all" in line or "par.all_reduce_bucket" in line
             or "par.state" in line]
    assert moved == moe_ir(
        """
        %dispatched_1 = par.all_to_all %dispatched over @mesh "dp" split 0 concat 1 FM : !torch.vtensor<[2,2,3],f32> -> !torch.vtensor<[1,4,3],f32>
        %5 = par.all_to_all %out over @mesh "dp" split 1 concat 0 FM : !torch.vtensor<[1,4,3],f32> -> !torch.vtensor<[2,2,3],f32>
        %dout_1 = par.all_to_all %dout over @mesh "dp" split 0 concat 1 BM : !torch.vtensor<[2,2,3],f32> -> !torch.vtensor<[1,4,3],f32>
        %14 = par.all_to_all %ddisp over @mesh "dp" split 1 concat 0 BM : !torch.vtensor<[1,4,3],f32> -> !torch.vtensor<[2,2,3],f32>
        %2 = par.all_reduce_bucket 0 stage 0 (%dw0_1) over @mesh ["dp"] stages [0] : !torch.vtensor<[3,3],f32>
        %w0 = par.state "embed.w" layout #par.sharding<[[], []]> : !torch.vtensor<[3,3],f32>
        %wr = par.state "moe.router.weight" layout #par.sharding<[[], []]> : !torch.vtensor<[2,3],f32>
        %w1 = par.state "moe.w1" layout #par.sharding<[["dp"], [], []]> : !torch.vtensor<[1,3,5],f32>
        %w2 = par.state "moe.w2" layout #par.sharding<[["dp"], [], []]> : !torch.vtensor<[1,5,3],f32>
        %2 = par.all_reduce_bucket 0 stage 0 (%dw0) over @mesh ["dp"] stages [0] : !torch.vtensor<[3,3],f32>
        """
    ).splitlines()


def _mutate(old: str, new: str) -> str:
    """MOE with one line's text `old` replaced by `new` (both with placeholders)."""
    old, new = spelled(old), spelled(new)
    assert MOE.count(old) == 1, old
    return MOE.replace(old, new)


CONTRACT_ERRORS = {
    "weight read by mul": (
        _mutate('%h = "torch.aten.bmm"(%dispatched, %w1) FM',
                '%w1x = "torch.aten.mul.Scalar"(%w1, %c2) FM : (!torch.vtensor<[2,3,5],f32>, !torch.int) -> '
                '!torch.vtensor<[2,3,5],f32>\n        %h = "torch.aten.bmm"(%dispatched, %w1x) FM'),
        "dp=2",
        "MoE layer 'moe': expert parameter 'moe.w1' !torch.vtensor<[2,3,5],f32> is read by torch.aten.mul.Scalar "
        "in 'moe' (F); in the forward the contract reads each expert parameter only as the weight of an aten.bmm "
        "whose batch dimension is the expert"),
    "experts do not divide": (
        MOE, "dp=4",
        "MoE layer 'moe': its 2 experts do not divide over the 4 ranks of axis 'dp'; use a number of experts that "
        "is a multiple of 4"),
    "softmax between the experts": (
        _mutate('%a = "torch.aten.relu"(%h) FM : (!torch.vtensor<[2,2,5],f32>)',
                '%a = "torch.aten._softmax"(%h, %c1, %false) FM : (!torch.vtensor<[2,2,5],f32>, !torch.int, '
                '!torch.bool)'),
        "dp=2",
        "MoE layer 'moe': torch.aten._softmax in 'moe' (F) reads the experts' part (!torch.vtensor<[1,4,5],f32>); "
        "between the dispatch and the combine the contract allows aten.bmm on the dispatched buffer and the "
        "expert parameters, elementwise ops, and in the backward the transposes of bmm's operands"),
    "no topk in the region": (
        _mutate('"torch.aten.topk"(%probs, %c1, %c1, %true, %true) FM',
                '"torch.aten.topk"(%probs, %c1, %c1, %true, %true) {piperc.origin = #par.origin<"moe", F>}'),
        "dp=2",
        "MoE layer 'moe': its forward has 0 aten.topk ops; the router picks each token's experts with exactly one"),
    "combine along dimension 1": (
        _mutate('%y = "torch.aten.gather"(%flat, %c0, %idx, %false) FM : (!torch.vtensor<[4,3],f32>, !torch.int, '
                '!torch.vtensor<[4,3],si64>, !torch.bool)',
                '%y = "torch.aten.gather"(%flat, %c1, %idx, %false) FM : (!torch.vtensor<[4,3],f32>, !torch.int, '
                '!torch.vtensor<[4,3],si64>, !torch.bool)'),
        "dp=2",
        "MoE layer 'moe': the combine's aten.gather reads !torch.vtensor<[4,3],f32> along dimension 1; it gathers "
        "along dimension 0 the expert output [E, C, d] = [2, 2, 3] viewed [E*C, d]"),
}


@pytest.mark.parametrize("case", sorted(CONTRACT_ERRORS))
def test_a_layer_that_breaks_the_contract_is_an_error_naming_the_layer_and_the_mismatch(case):
    text, mesh, message = CONTRACT_ERRORS[case]
    with pytest.raises(piperc.PassError) as e:
        run(f'mesh{{shape="{mesh}"}},expert-parallel{{directive="expert_parallel(axis=\'dp\')"}}', text)
    assert isinstance(e.value.__cause__, piperc.StrategyError)
    assert str(e.value.__cause__) == f"expert_parallel(axis='dp'): {message}; see piperc.nn.MoE's contract"


def test_a_model_without_moe_layers_is_an_error():
    with pytest.raises(piperc.PassError) as e:
        run('mesh{shape="dp=2"},expert-parallel{region=experts}', MOE)
    assert str(e.value.__cause__) == (
        "expert-parallel: the model has no MoE layer: no op of its forward runs in the annotated region 'experts' "
        "(piperc.nn.MoE, or a module whose forward runs inside piperc.annotate('experts'))")


ADAMW = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)
LAYERS = 2


ATTENTION_PLAN = {"blocks.*.attn.[qkv].weight": piperc.Shard(0), "blocks.*.attn.o.weight": piperc.Shard(1)}
"""Megatron's attention split: tensor parallelism on the dense part, the MoE layers whole."""


@pytest.mark.parametrize("mesh,directives,message", [
    (piperc.Mesh(dp=2), [piperc.data_parallel(), piperc.expert_parallel(axis="ep")],
     "expert_parallel(axis='ep'): axis 'ep' is not in Mesh(dp=2)"),
    (piperc.Mesh(dp=2), [piperc.data_parallel(zero=1), piperc.expert_parallel()],
     "expert_parallel(axis='dp'): next to data_parallel(axis='dp', zero=1): ZeRO would shard the experts' "
     "parameters a second time over the same axis; use data_parallel without zero"),
    (piperc.Mesh(pp=2), [piperc.pipeline(axis="pp", stages=2, microbatches=2), piperc.expert_parallel(axis="pp")],
     "expert_parallel(axis='pp'): axis 'pp' is already used by pipeline(axis='pp', stages=2, microbatches=2, "
     "schedule='1f1b'); the experts go over a data-parallel axis or an axis of their own"),
])
def test_strategies_expert_parallelism_cannot_join_are_refused_before_capture(mesh, directives, message):
    s = shared.setup(moe, LAYERS)
    with pytest.raises(piperc.StrategyError) as e:
        piperc.compile(s.model, s.inputs, mesh=mesh, strategy=directives, optimizer=ADAMW)
    assert str(e.value) == message


TOP1 = shared.variant(moe, "moe_top1", top_k=1)
DROPS = shared.variant(moe, "moe_drops", capacity_factor=0.5)
DP, EP = piperc.data_parallel(axis="dp"), piperc.expert_parallel(axis="dp")
RUNS = {
    "top2-dp2": (moe, piperc.Mesh(dp=2), [DP, EP]),
    "top2-dp4": (moe, piperc.Mesh(dp=4), [DP, EP]),
    "top1-dp4": (TOP1, piperc.Mesh(dp=4), [DP, EP]),
    "drops-dp2": (DROPS, piperc.Mesh(dp=2), [DP, EP]),
    "top2-dp2-ep2": (moe, piperc.Mesh(dp=2, ep=2), [DP, piperc.expert_parallel(axis="ep")]),
    "top2-pp2-dp2": (moe, piperc.Mesh(pp=2, dp=2),
                     [piperc.pipeline(axis="pp", stages=2, microbatches=2), DP, EP]),
    "top2-dp2-tp2": (moe, piperc.Mesh(dp=2, tp=2), [DP, piperc.tensor_parallel(plan=ATTENTION_PLAN), EP]),
    "top2-dp2zero3-ep2": (moe, piperc.Mesh(dp=2, ep=2),
                          [piperc.data_parallel(axis="dp", zero=3), piperc.expert_parallel(axis="ep")]),
}
"""example, mesh, strategy. The one-device run that matches cuts each batch into as many
slices as the strategy has (data rank x microbatch) slices."""


def slices(case: str) -> int:
    """How many (data rank x microbatch) slices `case`'s strategy cuts each batch into."""
    compiled, _ = trained(case)
    return compiled.replicas * compiled.microbatches


@functools.cache
def trained(case: str) -> tuple[piperc.Compiled, object]:
    """The compiled job of `case` and the result of its 3 steps."""
    example, mesh, strategy = RUNS[case]
    compiled = shared.compile_(example, LAYERS, mesh=mesh, optimizer=ADAMW, strategy=strategy)
    return compiled, piperc.launch(compiled, shared.setup(example, LAYERS).batches, timeout=240)


@pytest.mark.parametrize("case", sorted(RUNS))
def test_trains_like_one_device_on_the_same_slices(case):
    """Capacity and the aux loss are per (data rank, microbatch) slice, so the one-device run
    that matches trains each batch as that many slices accumulated."""
    example = RUNS[case][0]
    _, result = trained(case)
    loss_err, param_err = compare(result.losses, result.state_dict,
                                  *shared.eager(example, LAYERS, ADAMW, slices(case)))
    assert loss_err <= 1e-5, f"loss relative error {loss_err:.2e}"
    assert param_err <= 1e-5, f"parameter relative error {param_err:.2e}"


def test_an_expert_axis_of_its_own_sums_expert_gradients_over_the_other_data_axis_only():
    """Mesh(dp=2, ep=2): the dense gradients are summed once over dp and ep, each expert's over
    dp (the ranks holding a replica of it), in buckets of their own."""
    example, mesh, strategy = RUNS["top2-dp2-ep2"]
    text = shared.compile_(example, LAYERS, mesh=mesh, optimizer=ADAMW, strategy=strategy, keep_ir=True).ir_after
    after = dict(text)["data-parallel"]
    sums = sorted({line.split(" over @mesh ")[1].split(" stages")[0] for line in after.splitlines()
                   if "par.all_reduce_bucket" in line})
    assert sums == ['["dp", "ep"]', '["dp"]']
    expert_bucket = next(line for line in after.splitlines() if 'over @mesh ["dp"] ' in line)
    assert expert_bucket.count("!torch.vtensor<[2,") == 6  # w1, w3, w2 of both blocks: 2 of 4 experts each


def test_zero3_on_the_other_data_axis_shards_the_experts_replicas_too():
    """Mesh(dp=2, ep=2) with ZeRO-3 over dp: each rank holds half of its ep rank's experts and
    half of the dense part (and their AdamW state), as predicted; the run above is exact."""
    plain, _ = trained("top2-dp2-ep2")
    compiled, result = trained("top2-dp2zero3-ep2")
    assert [(m.parameters, m.optimizer_state) for m in result.peak_memory] == [
        (m.parameters, m.optimizer_state) for m in compiled.memory()]
    for sharded, whole in zip(compiled.memory(), plain.memory(), strict=True):
        assert sharded.parameters < 0.51 * whole.parameters and sharded.optimizer_state < 0.51 * whole.optimizer_state


def dropped(example: types.ModuleType, slices: int) -> int:
    """How many (token, choice) assignments the MoE layers drop on the first batch cut into
    `slices`, at the initial weights (`tests.test_moe.loop_reference`)."""
    s = shared.setup(example, LAYERS)
    layers = [m for m in s.model.modules() if isinstance(m, MoE)]
    seen: list[tuple[MoE, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0]))) for m in layers]
    try:
        with torch.no_grad():
            for piece in zip(*(x.chunk(slices) for x in s.batches[0]), strict=True):
                s.model(*piece)
    finally:
        for h in hooks:
            h.remove()
    return sum(len(loop_reference(m, x)[2]) for m, x in seen)


def test_the_small_capacity_drops_tokens_on_each_rank_slice():
    """The drops-dp2 run above is exact with tokens dropped: per slice of 64 tokens, top-2 over 4
    experts at capacity factor 0.5 gives each expert 16 of the 128 assignments' slots."""
    assert dropped(DROPS, 2) > 0
    assert dropped(moe, 2) < dropped(DROPS, 2)


def test_each_rank_holds_its_experts_and_their_optimizer_state():
    """Per rank, parameters and AdamW state are the dense part plus 1/n of the experts (n the
    expert-parallel degree): the expert part halves from n=2 to n=4 (predicted), an expert axis
    of its own holds as much as a data-parallel one of its size, and the runs measure what is
    predicted."""
    s = shared.setup(moe, LAYERS)
    expert = sum(w.numel() * w.element_size() for m in s.model.modules() if isinstance(m, MoE)
                 for w in (m.w1, m.w2, m.w3))
    dense = set()
    for case, degree in (("top2-dp2", 2), ("top2-dp4", 4), ("top2-dp2-ep2", 2)):
        compiled, result = trained(case)
        predicted = compiled.memory()
        assert [(m.parameters, m.optimizer_state) for m in result.peak_memory] == [
            (m.parameters, m.optimizer_state) for m in predicted]
        dense |= {(m.parameters - expert // degree, m.optimizer_state - 2 * expert // degree) for m in predicted}
    assert len(dense) == 1


class SwitchFFN(torch.nn.Module):
    """A user's own top-1 (Switch Transformer) MoE layer, written without piperc.nn, that
    follows the routing contract: GELU experts `[E, d, h]` / `[E, h, d]` read only by bmm,
    token-major drop order, no auxiliary loss."""

    def __init__(self, d: int, hidden: int, experts: int, capacity_factor: float):
        super().__init__()
        self.d, self.experts, self.capacity_factor = d, experts, capacity_factor
        self.gate = torch.nn.Linear(d, experts, bias=False)
        self.w_in = torch.nn.Parameter(torch.randn(experts, d, hidden) * d ** -0.5)
        self.w_out = torch.nn.Parameter(torch.randn(experts, hidden, d) * hidden ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with piperc.annotate("moe"):
            tokens = x.reshape(-1, self.d)
            n, e = tokens.shape[0], self.experts
            c = max(1, int(self.capacity_factor * n / e))
            p, expert = torch.softmax(self.gate(tokens), dim=-1).topk(1, dim=-1)
            mine = (expert == torch.arange(e, device=x.device)).long()  # [T, E]
            position = (mine.cumsum(dim=0) * mine).sum(dim=1) - 1
            keep = (position < c).unsqueeze(1)
            index = (expert.squeeze(1) * c + position.clamp(max=c - 1)).unsqueeze(1).expand(n, self.d)
            buffer = tokens.new_zeros(e * c, self.d).scatter_add(0, index, torch.where(keep, tokens, 0.0))
            hidden = torch.nn.functional.gelu(torch.bmm(buffer.view(e, c, self.d), self.w_in))
            out = torch.bmm(hidden, self.w_out).view(e * c, self.d)
            y = out.gather(0, index) * torch.where(keep, p, 0.0)
        return y.view(x.shape)


class LoopFFN(torch.nn.Module):
    """A top-1 MoE layer that breaks the contract: its experts are separate Linear modules run
    on the tokens each picked, with no dispatch buffer."""

    def __init__(self, d: int, hidden: int, experts: int, capacity_factor: float):
        super().__init__()
        self.gate = torch.nn.Linear(d, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with piperc.annotate("moe"):
            p, expert = torch.softmax(self.gate(x), dim=-1).topk(1, dim=-1)
            return sum(torch.where(expert == i, p, 0.0) * f(x) for i, f in enumerate(self.experts))


class SwitchLM(torch.nn.Module):
    """Embedding, `layers` residual blocks of a norm and an MoE layer, head; mean cross-entropy."""

    def __init__(self, layer: type, layers: int, vocab: int = 64, d: int = 32, experts: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.ffns = torch.nn.ModuleList(layer(d, 2 * d, experts, 1.0) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for norm, ffn in zip(self.norms, self.ffns, strict=True):
            x = x + ffn(norm(x))
        logits = self.head(x)
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def _user_model(name: str, layer: type) -> types.ModuleType:
    """An example module (`make(n_layers, seed)`) of SwitchLM over `layer`, for `tests.shared`."""
    def make(*, n_layers: int, seed: int = 0):
        torch.manual_seed(seed)
        return SwitchLM(layer, n_layers), sample_batch(64, 16, 8)
    example = types.ModuleType(name)
    example.make = make
    return example


SWITCH = _user_model("switch", SwitchFFN)


def test_a_users_own_moe_layer_that_follows_the_contract_is_routed_and_trains_like_one_device():
    """dp=2: SwitchFFN's experts are sharded (2 of 4 per rank) and trained exactly against one
    device on the same slices; at capacity factor 1 some tokens drop."""
    compiled = shared.compile_(SWITCH, LAYERS, mesh=piperc.Mesh(dp=2), optimizer=ADAMW, strategy=[DP, EP])
    assert {m.parameters for m in compiled.memory()} == {
        sum(p.numel() * 4 for n, p in shared.setup(SWITCH, LAYERS).model.named_parameters()
            if not n.endswith(("w_in", "w_out"))) + sum(
            p.numel() * 2 for n, p in shared.setup(SWITCH, LAYERS).model.named_parameters()
            if n.endswith(("w_in", "w_out")))}
    result = piperc.launch(compiled, shared.setup(SWITCH, LAYERS).batches, timeout=240)
    loss_err, param_err = compare(result.losses, result.state_dict, *shared.eager(SWITCH, LAYERS, ADAMW, 2))
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)


class FlatLoopFFN(LoopFFN):
    """LoopFFN on flattened `[T, d]` tokens: its router matches the contract, its experts do not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


@pytest.mark.parametrize("layer,message", [
    (LoopFFN, "aten.topk reads !torch.vtensor<[4,16,4],f32> along dimension -1; the router's probabilities are "
              "[T, E], topk picks along E"),
    (FlatLoopFFN, "its forward has 0 aten.scatter_add ops; the dispatch fills the [E*C, d] buffer with exactly one"),
], ids=["3-d tokens", "no dispatch"])
def test_a_users_own_moe_layer_that_breaks_the_contract_is_a_compile_time_error(layer, message):
    s = shared.setup(_user_model(layer.__name__, layer), LAYERS)
    with pytest.raises(piperc.StrategyError) as e:
        piperc.compile(s.model, s.inputs, mesh=piperc.Mesh(dp=2), optimizer=ADAMW, strategy=[DP, EP])
    assert str(e.value) == f"expert_parallel(axis='dp'): MoE layer 'ffns.0': {message}; see piperc.nn.MoE's contract"


def test_the_dispatch_statistics_show_the_routing_the_experts_held_and_the_measured_bytes(tmp_path):
    """pp=2 x dp=2: each stage's layer exchanges its [4, 20, 32] buffer four times per
    microbatch (dispatch and combine, forward and backward), 5120 B of it leaving each rank
    each time; two microbatches make 40960 B per step, which the runtime measures."""
    compiled, result = trained("top2-pp2-dp2")
    exchanges = [
        "  F: !torch.vtensor<[4,20,32],f32> -> !torch.vtensor<[2,40,32],f32> all_to_all over 'dp' (split 0, "
        "concat 1), 5120 B out per rank",
        "  F: !torch.vtensor<[2,40,32],f32> -> !torch.vtensor<[4,20,32],f32> all_to_all over 'dp' (split 1, "
        "concat 0), 5120 B out per rank",
        "  B: !torch.vtensor<[4,20,32],f32> -> !torch.vtensor<[2,40,32],f32> all_to_all over 'dp' (split 0, "
        "concat 1), 5120 B out per rank",
        "  B: !torch.vtensor<[2,40,32],f32> -> !torch.vtensor<[4,20,32],f32> all_to_all over 'dp' (split 1, "
        "concat 0), 5120 B out per rank",
    ]
    header = ("MoE layer blocks.{}.moe: 4 experts over axis 'dp', dispatched buffer [E, C, d] = [4, 20, 32] per "
              "(microbatch, rank), padded to capacity")
    expected = [header.format(0), *exchanges, "  experts held: rank 0: 0-1, rank 1: 2-3",
                "  bytes sent per step   rank  predicted  measured",
                "                           0      40960     40960",
                "                           1      40960     40960",
                header.format(1), *exchanges, "  experts held: rank 2: 0-1, rank 3: 2-3",
                "  bytes sent per step   rank  predicted  measured",
                "                           2      40960     40960",
                "                           3      40960     40960"]
    assert compiled.experts(result).splitlines() == expected
    compiled.dump(str(tmp_path), result)
    assert (tmp_path / "experts.txt").read_text() == compiled.experts(result)
    assert result.sent_per_step()[0]["p2p"] > 0  # the activations to stage 1 are counted apart


def test_without_expert_parallelism_there_are_no_dispatch_statistics():
    compiled = shared.compile_(moe, LAYERS, mesh=piperc.Mesh(dp=2), optimizer=ADAMW, strategy=[DP])
    assert compiled.experts() == "no MoE layer dispatches tokens (no expert_parallel directive)\n"
