"""Sequence parallelism with Ulysses attention (`piperc.sequence_parallel`): the
`unflatten-matmul` rewrite that keeps a linear's sequence dimension apart (IR in, IR out),
the `sequence-parallel` pass's errors, and real runs of the GPT and Llama examples with
`F.scaled_dot_product_attention` (`make(sdpa=True)`) against one device, 3 AdamW steps.

LINEAR is `nn.Linear(4, 5)` on a `[2, 3, 4]` input with a squared-error loss, as captured:
the view to `[6, 4]`, addmm, the view back; in the backward the view of the gradient, the
weight gradient `mm(t(dy), x)` and the bias gradient summed over the 6 rows.
"""

import functools

import pytest

import piperc
from piperc.examples import gpt, llama
from tests import shared
from tests.test_passes_ir import ir, run, section
from tests.test_tensor_parallel import GPT_PLAN, LLAMA_PLAN

PLACEHOLDERS = {
    "FFC": '{piperc.origin = #par.origin<"fc", F>}',
    "BFC": '{piperc.origin = #par.origin<"fc", B>}',
    "FR": '{piperc.origin = #par.origin<"", F>}',
    "BR": '{piperc.origin = #par.origin<"", B>}',
}
"""Spelled out in the IR below: the origin of the linear's ops (F, B) and of the loss's."""


def spelled(text: str) -> str:
    """`text` with its placeholders spelled out."""
    for short, long in PLACEHOLDERS.items():
        text = text.replace(f" {short} ", f" {long} ")
    return text


LINEAR = spelled(ir(
    """
    builtin.module {
      func.func @main(%arg0: !torch.vtensor<[5,4],f32> {piperc.param = "fc.weight"}, %arg1: !torch.vtensor<[5],f32> {piperc.param = "fc.bias"}, %arg2: !torch.vtensor<[2,3,4],f32> {piperc.input = #builtin.int<0>}, %arg3: !torch.vtensor<[2,3,5],f32> {piperc.input = #builtin.int<1>}, %arg4: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[5,4],f32> {piperc.grad = "fc.weight"}, !torch.vtensor<[5],f32> {piperc.grad = "fc.bias"}) {
        %0 = "torch.constant.int"() <{value = 6 : i64}> FFC : () -> !torch.int
        %1 = "torch.constant.int"() <{value = 4 : i64}> FFC : () -> !torch.int
        %2 = "torch.prim.ListConstruct"(%0, %1) FFC : (!torch.int, !torch.int) -> !torch.list<int>
        %3 = "torch.aten.view"(%arg2, %2) FFC : (!torch.vtensor<[2,3,4],f32>, !torch.list<int>) -> !torch.vtensor<[6,4],f32>
        %4 = "torch.aten.t"(%arg0) FFC : (!torch.vtensor<[5,4],f32>) -> !torch.vtensor<[4,5],f32>
        %5 = "torch.constant.int"() <{value = 1 : i64}> FFC : () -> !torch.int
        %6 = "torch.constant.int"() <{value = 1 : i64}> FFC : () -> !torch.int
        %7 = "torch.aten.addmm"(%arg1, %3, %4, %5, %6) FFC : (!torch.vtensor<[5],f32>, !torch.vtensor<[6,4],f32>, !torch.vtensor<[4,5],f32>, !torch.int, !torch.int) -> !torch.vtensor<[6,5],f32>
        %8 = "torch.constant.int"() <{value = 2 : i64}> FFC : () -> !torch.int
        %9 = "torch.constant.int"() <{value = 3 : i64}> FFC : () -> !torch.int
        %10 = "torch.constant.int"() <{value = 5 : i64}> FFC : () -> !torch.int
        %11 = "torch.prim.ListConstruct"(%8, %9, %10) FFC : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
        %12 = "torch.aten.view"(%7, %11) FFC : (!torch.vtensor<[6,5],f32>, !torch.list<int>) -> !torch.vtensor<[2,3,5],f32>
        %13 = "torch.constant.int"() <{value = 1 : i64}> FR : () -> !torch.int
        %14 = "torch.aten.sub.Tensor"(%12, %arg3, %13) FR : (!torch.vtensor<[2,3,5],f32>, !torch.vtensor<[2,3,5],f32>, !torch.int) -> !torch.vtensor<[2,3,5],f32>
        %15 = "torch.constant.int"() <{value = 2 : i64}> FR : () -> !torch.int
        %16 = "torch.aten.pow.Tensor_Scalar"(%14, %15) FR : (!torch.vtensor<[2,3,5],f32>, !torch.int) -> !torch.vtensor<[2,3,5],f32>
        %17 = "torch.constant.none"() FR : () -> !torch.none
        %18 = "torch.aten.mean"(%16, %17) FR : (!torch.vtensor<[2,3,5],f32>, !torch.none) -> !torch.vtensor<[],f32>
        %19 = "torch.constant.int"() <{value = 2 : i64}> BR : () -> !torch.int
        %20 = "torch.constant.int"() <{value = 3 : i64}> BR : () -> !torch.int
        %21 = "torch.constant.int"() <{value = 5 : i64}> BR : () -> !torch.int
        %22 = "torch.prim.ListConstruct"(%19, %20, %21) BR : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
        %23 = "torch.constant.bool"() <{value = false}> BR : () -> !torch.bool
        %24 = "torch.aten.expand"(%arg4, %22, %23) BR : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[2,3,5],f32>
        %25 = "torch.constant.int"() <{value = 30 : i64}> BR : () -> !torch.int
        %26 = "torch.aten.div.Scalar"(%24, %25) BR : (!torch.vtensor<[2,3,5],f32>, !torch.int) -> !torch.vtensor<[2,3,5],f32>
        %27 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> BR : () -> !torch.float
        %28 = "torch.aten.pow.Tensor_Scalar"(%14, %27) BR : (!torch.vtensor<[2,3,5],f32>, !torch.float) -> !torch.vtensor<[2,3,5],f32>
        %29 = "torch.constant.float"() <{value = 2.000000e+00 : f64}> BR : () -> !torch.float
        %30 = "torch.aten.mul.Scalar"(%28, %29) BR : (!torch.vtensor<[2,3,5],f32>, !torch.float) -> !torch.vtensor<[2,3,5],f32>
        %31 = "torch.aten.mul.Tensor"(%26, %30) BR : (!torch.vtensor<[2,3,5],f32>, !torch.vtensor<[2,3,5],f32>) -> !torch.vtensor<[2,3,5],f32>
        %32 = "torch.constant.int"() <{value = 6 : i64}> BFC : () -> !torch.int
        %33 = "torch.constant.int"() <{value = 5 : i64}> BFC : () -> !torch.int
        %34 = "torch.prim.ListConstruct"(%32, %33) BFC : (!torch.int, !torch.int) -> !torch.list<int>
        %35 = "torch.aten.view"(%31, %34) BFC : (!torch.vtensor<[2,3,5],f32>, !torch.list<int>) -> !torch.vtensor<[6,5],f32>
        %36 = "torch.aten.t"(%35) BFC : (!torch.vtensor<[6,5],f32>) -> !torch.vtensor<[5,6],f32>
        %37 = "torch.aten.mm"(%36, %3) BFC : (!torch.vtensor<[5,6],f32>, !torch.vtensor<[6,4],f32>) -> !torch.vtensor<[5,4],f32>
        %38 = "torch.aten.t"(%37) BFC : (!torch.vtensor<[5,4],f32>) -> !torch.vtensor<[4,5],f32>
        %39 = "torch.constant.int"() <{value = 0 : i64}> BFC : () -> !torch.int
        %40 = "torch.prim.ListConstruct"(%39) BFC : (!torch.int) -> !torch.list<int>
        %41 = "torch.constant.bool"() <{value = true}> BFC : () -> !torch.bool
        %42 = "torch.constant.none"() BFC : () -> !torch.none
        %43 = "torch.aten.sum.dim_IntList"(%35, %40, %41, %42) BFC : (!torch.vtensor<[6,5],f32>, !torch.list<int>, !torch.bool, !torch.none) -> !torch.vtensor<[1,5],f32>
        %44 = "torch.constant.int"() <{value = 5 : i64}> BFC : () -> !torch.int
        %45 = "torch.prim.ListConstruct"(%44) BFC : (!torch.int) -> !torch.list<int>
        %46 = "torch.aten.view"(%43, %45) BFC : (!torch.vtensor<[1,5],f32>, !torch.list<int>) -> !torch.vtensor<[5],f32>
        %47 = "torch.aten.t"(%38) BFC : (!torch.vtensor<[4,5],f32>) -> !torch.vtensor<[5,4],f32>
        func.return %18, %47, %46 : !torch.vtensor<[],f32>, !torch.vtensor<[5,4],f32>, !torch.vtensor<[5],f32>
      }
    }
    """
))


def test_a_linear_keeps_its_leading_dimensions_apart():
    """The forward is matmul of [2, 3, 4] by the transposed weight plus the bias; the weight
    gradient sums the per-row-block matmuls of the transposed output gradient and the input
    over dimension 0; the bias gradient sums the [2, 3, 5] gradient over both leading
    dimensions. No [6, ...] view is left."""
    out = section(run("unflatten-matmul", LINEAR), "func.func @main")
    assert out == spelled(ir(
        """
        func.func @main(%arg0: !torch.vtensor<[5,4],f32> {piperc.param = "fc.weight"}, %arg1: !torch.vtensor<[5],f32> {piperc.param = "fc.bias"}, %arg2: !torch.vtensor<[2,3,4],f32> {piperc.input = #builtin.int<0>}, %arg3: !torch.vtensor<[2,3,5],f32> {piperc.input = #builtin.int<1>}, %arg4: !torch.vtensor<[],f32> {piperc.tangent = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}, !torch.vtensor<[5,4],f32> {piperc.grad = "fc.weight"}, !torch.vtensor<[5],f32> {piperc.grad = "fc.bias"}) {
          %0 = "torch.aten.t"(%arg0) FFC : (!torch.vtensor<[5,4],f32>) -> !torch.vtensor<[4,5],f32>
          %1 = "torch.aten.matmul"(%arg2, %0) FFC : (!torch.vtensor<[2,3,4],f32>, !torch.vtensor<[4,5],f32>) -> !torch.vtensor<[2,3,5],f32>
          %2 = "torch.constant.int"() <{value = 1 : i64}> FFC : () -> !torch.int
          %3 = "torch.aten.add.Tensor"(%1, %arg1, %2) FFC : (!torch.vtensor<[2,3,5],f32>, !torch.vtensor<[5],f32>, !torch.int) -> !torch.vtensor<[2,3,5],f32>
          %4 = "torch.constant.int"() <{value = 1 : i64}> FR : () -> !torch.int
          %5 = "torch.aten.sub.Tensor"(%3, %arg3, %4) FR : (!torch.vtensor<[2,3,5],f32>, !torch.vtensor<[2,3,5],f32>, !torch.int) -> !torch.vtensor<[2,3,5],f32>
          %6 = "torch.constant.int"() <{value = 2 : i64}> FR : () -> !torch.int
          %7 = "torch.aten.pow.Tensor_Scalar"(%5, %6) FR : (!torch.vtensor<[2,3,5],f32>, !torch.int) -> !torch.vtensor<[2,3,5],f32>
          %8 = "torch.constant.none"() FR : () -> !torch.none
          %9 = "torch.aten.mean"(%7, %8) FR : (!torch.vtensor<[2,3,5],f32>, !torch.none) -> !torch.vtensor<[],f32>
          %10 = "torch.constant.int"() <{value = 2 : i64}> BR : () -> !torch.int
          %11 = "torch.constant.int"() <{value = 3 : i64}> BR : () -> !torch.int
          %12 = "torch.constant.int"() <{value = 5 : i64}> BR : () -> !torch.int
          %13 = "torch.prim.ListConstruct"(%10, %11, %12) BR : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
          %14 = "torch.constant.bool"() <{value = false}> BR : () -> !torch.bool
          %15 = "torch.aten.expand"(%arg4, %13, %14) BR : (!torch.vtensor<[],f32>, !torch.list<int>, !torch.bool) -> !torch.vtensor<[2,3,5],f32>
          %16 = "torch.constant.int"() <{value = 30 : i64}> BR : () -> !torch.int
          %17 = "torch.aten.div.Scalar"(%15, %16) BR : (!torch.vtensor<[2,3,5],f32>, !torch.int) -> !torch.vtensor<[2,3,5],f32>
          %18 = "torch.constant.float"() <{value = 1.000000e+00 : f64}> BR : () -> !torch.float
          %19 = "torch.aten.pow.Tensor_Scalar"(%5, %18) BR : (!torch.vtensor<[2,3,5],f32>, !torch.float) -> !torch.vtensor<[2,3,5],f32>
          %20 = "torch.constant.float"() <{value = 2.000000e+00 : f64}> BR : () -> !torch.float
          %21 = "torch.aten.mul.Scalar"(%19, %20) BR : (!torch.vtensor<[2,3,5],f32>, !torch.float) -> !torch.vtensor<[2,3,5],f32>
          %22 = "torch.aten.mul.Tensor"(%17, %21) BR : (!torch.vtensor<[2,3,5],f32>, !torch.vtensor<[2,3,5],f32>) -> !torch.vtensor<[2,3,5],f32>
          %23 = "torch.constant.int"() <{value = 1 : i64}> BFC : () -> !torch.int
          %24 = "torch.constant.int"() <{value = 2 : i64}> BFC : () -> !torch.int
          %25 = "torch.aten.transpose.int"(%22, %23, %24) BFC : (!torch.vtensor<[2,3,5],f32>, !torch.int, !torch.int) -> !torch.vtensor<[2,5,3],f32>
          %26 = "torch.aten.matmul"(%25, %arg2) BFC : (!torch.vtensor<[2,5,3],f32>, !torch.vtensor<[2,3,4],f32>) -> !torch.vtensor<[2,5,4],f32>
          %27 = "torch.constant.int"() <{value = 0 : i64}> BFC : () -> !torch.int
          %28 = "torch.prim.ListConstruct"(%27) BFC : (!torch.int) -> !torch.list<int>
          %29 = "torch.constant.bool"() <{value = false}> BFC : () -> !torch.bool
          %30 = "torch.constant.none"() BFC : () -> !torch.none
          %31 = "torch.aten.sum.dim_IntList"(%26, %28, %29, %30) BFC : (!torch.vtensor<[2,5,4],f32>, !torch.list<int>, !torch.bool, !torch.none) -> !torch.vtensor<[5,4],f32>
          %32 = "torch.aten.t"(%31) BFC : (!torch.vtensor<[5,4],f32>) -> !torch.vtensor<[4,5],f32>
          %33 = "torch.constant.bool"() <{value = true}> BFC : () -> !torch.bool
          %34 = "torch.constant.none"() BFC : () -> !torch.none
          %35 = "torch.constant.int"() <{value = 0 : i64}> BFC : () -> !torch.int
          %36 = "torch.constant.int"() <{value = 1 : i64}> BFC : () -> !torch.int
          %37 = "torch.prim.ListConstruct"(%35, %36) BFC : (!torch.int, !torch.int) -> !torch.list<int>
          %38 = "torch.aten.sum.dim_IntList"(%22, %37, %33, %34) BFC : (!torch.vtensor<[2,3,5],f32>, !torch.list<int>, !torch.bool, !torch.none) -> !torch.vtensor<[1,1,5],f32>
          %39 = "torch.constant.int"() <{value = 1 : i64}> BFC : () -> !torch.int
          %40 = "torch.constant.int"() <{value = 5 : i64}> BFC : () -> !torch.int
          %41 = "torch.prim.ListConstruct"(%39, %40) BFC : (!torch.int, !torch.int) -> !torch.list<int>
          %42 = "torch.aten.view"(%38, %41) BFC : (!torch.vtensor<[1,1,5],f32>, !torch.list<int>) -> !torch.vtensor<[1,5],f32>
          %43 = "torch.constant.int"() <{value = 5 : i64}> BFC : () -> !torch.int
          %44 = "torch.prim.ListConstruct"(%43) BFC : (!torch.int) -> !torch.list<int>
          %45 = "torch.aten.view"(%42, %44) BFC : (!torch.vtensor<[1,5],f32>, !torch.list<int>) -> !torch.vtensor<[5],f32>
          %46 = "torch.aten.t"(%32) BFC : (!torch.vtensor<[4,5],f32>) -> !torch.vtensor<[5,4],f32>
          func.return %9, %46, %45 : !torch.vtensor<[],f32>, !torch.vtensor<[5,4],f32>, !torch.vtensor<[5],f32>
        }
        """
    ))
    assert "[6," not in out


ADAMW = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)
LAYERS = 2


GPT, LLAMA = shared.variant(gpt, "gpt_sdpa", sdpa=True), shared.variant(llama, "llama_sdpa", sdpa=True)
GPT_PACKED = shared.variant(gpt, "gpt_sdpa_packed", sdpa=True, packed=True)
LLAMA_PACKED = shared.variant(llama, "llama_sdpa_packed", sdpa=True, packed=True)
"""The examples with attention through F.scaled_dot_product_attention (and, packed, document
ids in their batches: attention within each document)."""
SP = piperc.sequence_parallel(axis="sp")
RUNS = {
    "gpt-sp2": (GPT, piperc.Mesh(sp=2), [SP], 1),
    "gpt-sp4": (GPT, piperc.Mesh(sp=4), [SP], 1),
    "llama-sp2": (LLAMA, piperc.Mesh(sp=2), [SP], 1),
    "llama-sp4": (LLAMA, piperc.Mesh(sp=4), [SP], 1),
    "gpt-dp2-sp2": (GPT, piperc.Mesh(dp=2, sp=2), [piperc.data_parallel(axis="dp"), SP], 2),
    "llama-pp2-sp2": (LLAMA, piperc.Mesh(pp=2, sp=2),
                      [piperc.pipeline(axis="pp", stages=2, microbatches=2), SP], 2),
    "gpt-sp2-packed": (GPT_PACKED, piperc.Mesh(sp=2), [SP], 1),
    "gpt-sp4-packed": (GPT_PACKED, piperc.Mesh(sp=4), [SP], 1),
    "llama-sp2-packed": (LLAMA_PACKED, piperc.Mesh(sp=2), [SP], 1),
    "llama-sp4-packed": (LLAMA_PACKED, piperc.Mesh(sp=4), [SP], 1),
    "llama-dp2-sp2": (LLAMA, piperc.Mesh(dp=2, sp=2), [piperc.data_parallel(axis="dp"), SP], 2),
    "gpt-pp2-sp2": (GPT, piperc.Mesh(pp=2, sp=2), [piperc.pipeline(axis="pp", stages=2, microbatches=2), SP], 2),
    "gpt-tp2-sp2": (GPT, piperc.Mesh(tp=2, sp=2), [piperc.tensor_parallel(axis="tp", plan=GPT_PLAN), SP], 1),
    "llama-tp2-sp2": (LLAMA, piperc.Mesh(tp=2, sp=2), [piperc.tensor_parallel(axis="tp", plan=LLAMA_PLAN), SP], 1),
    "llama-sp4-zigzag": (LLAMA, piperc.Mesh(sp=4), [piperc.sequence_parallel(axis="sp", balance="zigzag")], 1),
}
"""example, mesh, strategy, and the row slices of the one-device noise floor (replicas x
microbatches; each is further cut into the sp axis's sequence pieces, `shared.bounds`). Next to
tensor parallelism (issue 7's plans), heads are split by tp and the sequence by sp, both laid
out by one propagation over the two axes. Zigzag: the all_to_alls put the whole sequence back
in natural order for the heads' attention, and cut it back into zigzag pieces."""


def trainer(runs: dict):
    """`trained(case)`: the compiled job of `runs[case]` and the result of its 3 steps, once."""

    @functools.cache
    def trained(case: str):
        example, mesh, strategy, _ = runs[case]
        compiled = shared.compile_(example, LAYERS, mesh=mesh, optimizer=ADAMW, strategy=strategy, keep_ir=True)
        return compiled, piperc.launch(compiled, shared.setup(example, LAYERS).batches, timeout=240)

    return trained


def check_trains_as_one_device(runs: dict, trained, case: str) -> None:
    """Against one device on whole batches: 1e-5, or twice one device's error accumulating
    each batch over the slices the strategy cuts it into: its row slices (replicas x
    microbatches), each over the sp axis's sequence pieces (AdamW)."""
    example, mesh, _, slices = runs[case]
    _, result = trained(case)
    errs = shared.errors(example, LAYERS, ADAMW, result)
    limits = shared.bounds(example, LAYERS, ADAMW, slices, mesh.axes["sp"])
    assert all(e <= b for e, b in zip(errs, limits, strict=True)), (errs, limits)


trained = trainer(RUNS)


@pytest.mark.parametrize("case", sorted(RUNS))
def test_trains_as_one_device(case):
    """Against one device on whole batches: 1e-5, or twice one device's error accumulating
    each batch over the slices the strategy cuts it into (AdamW; see check_trains_as_one_device)."""
    check_trains_as_one_device(RUNS, trained, case)


def test_attention_moves_from_the_sequence_to_the_heads_and_back():
    """Ulysses in the IR: q, k and v of each attention are cast from "sequence split" to
    "heads split" (three all_to_alls after localisation), and so are the backward's
    operands that the forward did not make."""
    compiled, _ = trained("gpt-sp2")
    after = dict(compiled.ir_after)["sequence-parallel"]
    casts = [line for line in after.splitlines() if "par.layout_cast" in line and "ulysses" in line]
    forward = [c for c in casts if "for_cpu in 'blocks.0.attn' (F)" in c]
    assert len(forward) == 3
    assert all('from #par.sharding<[[], [], ["sp"], []]> to #par.sharding<[[], ["sp"], [], []]>' in c
               for c in casts)
    lowered = dict(compiled.ir_after)["lower-reshard"]
    assert lowered.count("par.all_to_all") >= 4 * LAYERS


def test_packed_documents_split_with_the_sequence_and_attention_reads_the_whole_mask():
    """The packs (gpt.packed_documents: documents of 3 and 2 tokens, one across the middle of
    the sequence, the rest) come as a third input, split along the sequence like the tokens;
    each attention reads q, k and v heads split and its document mask [batch, 1, seq, seq]
    (captured as an additive float mask) as propagation lays it out: shared by the heads, it
    is not cast."""
    assert gpt.packed_documents(1, 16).tolist() == [[0] * 3 + [1] * 2 + [2] * 5 + [3] * 6]
    compiled, _ = trained("gpt-sp2-packed")
    after = dict(compiled.ir_after)["sequence-parallel"]
    assert after.count('{piperc.input = #builtin.int<2>, par.layout = #par.sharding<[[], ["sp"]]>}') == 1
    attention = next(line for line in dict(compiled.ir_after)["propagate-sharding"].splitlines()
                     if '"torch.aten._scaled_dot_product_flash_attention_for_cpu"' in line)
    assert "!torch.vtensor<[8,1,16,16],f32>" in attention  # the mask, as an additive float mask
    casts = [line for line in after.splitlines() if "par.layout_cast" in line and "for_cpu in 'blocks.0.attn' (F)" in line]
    assert len(casts) == 3


@pytest.mark.parametrize("make,mesh,strategy,message", [
    (GPT.make, piperc.Mesh(sp=8), [SP],
     "sequence_parallel(axis='sp', method='ulysses'): torch.aten._scaled_dot_product_flash_attention_for_cpu in "
     "'blocks.0.attn' (F) reads operand 0 !torch.vtensor<[8,4,16,8],f32> with 4 heads, which do not divide over "
     "the 8 devices of axis 'sp' (Ulysses splits attention by heads)"),
    (functools.partial(gpt.make, sdpa=True, seq=12), piperc.Mesh(sp=8), [SP],
     "sequence_parallel(axis='sp', method='ulysses'): model input 0 !torch.vtensor<[8,12],si64> has sequence length "
     "12 (dimension 1), which does not divide over the 8 devices of axis 'sp'"),
    (gpt.make, piperc.Mesh(sp=2), [SP],
     "sequence_parallel(axis='sp', method='ulysses'): the model has no scaled-dot-product attention; Ulysses splits "
     "attention by heads, so attention must go through torch.nn.functional.scaled_dot_product_attention"),
    (GPT.make, piperc.Mesh(sp=2), [piperc.sequence_parallel(method="zigzag")],
     "sequence_parallel(axis='sp', method='zigzag'): unknown method 'zigzag'; use one of 'ulysses', 'ring', 'auto'"),
])
def test_what_cannot_split_is_a_compile_time_error_naming_the_tensor_and_the_directive(make, mesh, strategy,
                                                                                     message):
    model, inputs = make(n_layers=1)
    with pytest.raises(piperc.StrategyError) as e:
        piperc.compile(model, inputs, mesh=mesh, strategy=strategy, optimizer=ADAMW)
    assert str(e.value) == message
