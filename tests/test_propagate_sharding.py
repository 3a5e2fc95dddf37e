"""propagate-sharding, the sharding rules, `par.layout_cast`, and seeding layouts from a plan.

IR text in, IR text out: each rule-family test is a small hand-written `@main` on the mesh
`["tp"=2]` whose arguments carry seeded layouts; the checks read the printed IR in order,
as FileCheck's CHECK lines do: every value's `par.layouts`, and each `par.layout_cast` the
pass inserts where an operand's layout is not the one its op's rule needs. Then conflict
resolution, the no-rule fallback and strict mode, the fused-QKV and Megatron plans on
real captures of the example models, and the rule coverage of every example's ops.
"""

import textwrap

import pytest

import piperc
from piperc.dialects.torch import AtenOp
from piperc.errors import PassError, StrategyError
from piperc.examples import gpt, llama, moe, tied
from piperc.ir import make_context, parse_module, print_ir
from piperc.passes.propagate_sharding import sharding_report
from piperc.passes.sharding_rules import reshape_factors, sharding_rule
from piperc.passes.tensor_parallel import Partial, Replicate, Shard, seed_layouts
from piperc.passmanager import run_pipeline


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def step(args: str, results: str, body: str, returned: str, mesh: str = '["tp"=2]',
         result_types: str | None = None) -> str:
    """A module declaring `@mesh` with one `@main(args) -> (results)` running `body`."""
    lines = "\n".join("    " + line for line in ir(body).splitlines())
    return (f"builtin.module {{\n  par.mesh @mesh #par.mesh<{mesh}>\n"
            f"  func.func @main({args}) -> ({results}) {{\n{lines}\n"
            f"    func.return {returned} : {result_types or results}\n  }}\n}}\n")


def propagate(text: str, options: str = "") -> tuple[str, list[str]]:
    """Runs propagate-sharding on `text`; the printed module and the sharding report."""
    ctx = make_context()
    module = parse_module(text, ctx)
    run_pipeline(module, ctx, "propagate-sharding" + options)
    return print_ir(module), sharding_report(module)


def check(out: str, *patterns: str) -> None:
    """Each pattern occurs in `out`, on a line after the previous pattern's (FileCheck's CHECK)."""
    lines = out.splitlines()
    at = 0
    for pattern in patterns:
        found = next((i for i in range(at, len(lines)) if pattern in lines[i]), None)
        assert found is not None, f"not found after line {at}: {pattern}\n{out}"
        at = found + 1


def casts(out: str) -> list[str]:
    """The `par.layout_cast` lines of `out`, up to the reason."""
    return [line.strip().split(" because ")[0] for line in out.splitlines() if "par.layout_cast" in line]


def L(rank: int, dim: int | None = None, partial: bool = False) -> str:
    """The layout of a rank-`rank` tensor split along `dim` over "tp" and/or a pending sum over it."""
    dims = ", ".join('["tp"]' if d == dim else "[]" for d in range(rank))
    return f'#par.sharding<[{dims}]' + (', partial = ["tp"]>' if partial else ">")


def T(shape: str, dtype: str = "f32") -> str:
    return f"!torch.vtensor<[{shape}],{dtype}>"


def arg(name: str, shape: str, layout: str | None = None) -> str:
    return f"%{name}: {T(shape)}" + (f" {{par.layout = {layout}}}" if layout else "")


# ---------------------------------------------------------------- matmul family


def test_column_parallel_mm_shards_the_output_columns():
    out, report = propagate(step(
        f"{arg('x', '16,32')}, {arg('w', '32,64', L(2, 1))}", T("16,64"),
        f'%y = "torch.aten.mm"(%x, %w) : ({T("16,32")}, {T("32,64")}) -> {T("16,64")}', "%y"))
    check(out,
          f'func.func @main(%x: {T("16,32")} {{par.layout = {L(2)}}}, %w: {T("32,64")} {{par.layout = {L(2, 1)}}}) '
          f'-> ({T("16,64")} {{par.layout = {L(2, 1)}}})',
          f'%y = "torch.aten.mm"(%x, %w) {{par.layouts = [{L(2, 1)}]}}')
    assert casts(out) == [] and report == []


def test_row_parallel_mm_leaves_a_pending_sum():
    out, _ = propagate(step(
        f"{arg('x', '16,32', L(2, 1))}, {arg('w', '32,64', L(2, 0))}", T("16,64"),
        f'%y = "torch.aten.mm"(%x, %w) : ({T("16,32")}, {T("32,64")}) -> {T("16,64")}', "%y"))
    check(out, f'%y = "torch.aten.mm"(%x, %w) {{par.layouts = [{L(2, partial=True)}]}}')
    assert casts(out) == []


def test_bmm_keeps_the_batch_sharding():
    out, _ = propagate(step(
        f"{arg('a', '4,8,16', L(3, 0))}, {arg('b', '4,16,8', L(3, 0))}", T("4,8,8"),
        f'%y = "torch.aten.bmm"(%a, %b) : ({T("4,8,16")}, {T("4,16,8")}) -> {T("4,8,8")}', "%y"))
    check(out, f'%y = "torch.aten.bmm"(%a, %b) {{par.layouts = [{L(3, 0)}]}}')
    assert casts(out) == []


def test_addmm_with_a_bias_does_not_sum_the_bias_twice():
    """A row-parallel addmm would add the bias on every device; the pass gathers instead."""
    out, _ = propagate(step(
        f"{arg('b', '64')}, {arg('x', '16,32', L(2, 1))}, {arg('w', '32,64', L(2, 0))}", T("16,64"),
        f"""
        %one = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
        %y = "torch.aten.addmm"(%b, %x, %w, %one, %one) : ({T("64")}, {T("16,32")}, {T("32,64")}, !torch.int, !torch.int) -> {T("16,64")}
        """, "%y"))
    assert casts(out) == [
        f'%0 = par.layout_cast %x @mesh from {L(2, 1)} to {L(2)}',
        f'%1 = par.layout_cast %w @mesh from {L(2, 0)} to {L(2)}',
    ]
    check(out, f'%y = "torch.aten.addmm"(%b, %0, %1, %one, %one) {{par.layouts = [{L(2)}]}}')


# ---------------------------------------------------------------- reshape


def test_reshape_factors_are_the_common_refinement():
    assert reshape_factors([2, 8, 96], [16, 3, 32]) == ([2, 8, 3, 32], ((0,), (1,), (2, 3)), ((0, 1), (2,), (3,)))
    assert reshape_factors([2, 1, 32], [2, 4, 8]) == ([2, 4, 8], ((0,), (), (1, 2)), ((0,), (1,), (2,)))
    assert reshape_factors([2, 3], [3, 2]) is None


VIEW = '%y = "torch.aten.view"(%x, %s) : ({src}, !torch.list<int>) -> {dst}'


def view(src: str, dst: str, layout: str, mesh: str = '["tp"=2]') -> str:
    sizes = dst.split(",")
    consts = "\n".join(f'%c{i} = "torch.constant.int"() <{{value = {n} : i64}}> : () -> !torch.int'
                       for i, n in enumerate(sizes))
    listed = ", ".join(f"%c{i}" for i in range(len(sizes)))
    body = (f"{consts}\n%s = \"torch.prim.ListConstruct\"({listed}) : ({', '.join(['!torch.int'] * len(sizes))})"
            f" -> !torch.list<int>\n" + VIEW.format(src=T(src), dst=T(dst)))
    return step(arg("x", src, layout), T(dst), body, "%y", mesh)


def test_split_dimension_keeps_the_shard_on_its_outer_factor():
    out, _ = propagate(view("2,8,32", "2,8,4,8", L(3, 2)))
    check(out, f'%y = "torch.aten.view"(%x, %s) {{par.layouts = [{L(4, 2)}]}}')
    assert casts(out) == []


def test_split_dimension_whose_outer_factor_the_shards_do_not_divide_is_gathered():
    """[2,8,96] split over tp=2 into [2,8,3,32]: 3 pieces do not split over 2 devices."""
    out, _ = propagate(view("2,8,96", "2,8,3,32", L(3, 2)))
    assert casts(out) == [f'%0 = par.layout_cast %x @mesh from {L(3, 2)} to {L(3)}']
    out, _ = propagate(view("2,8,96", "2,8,3,32", L(3, 2), mesh='["tp"=3]'))
    check(out, f'{{par.layouts = [{L(4, 2)}]}}')
    assert casts(out) == []


def test_merged_dimensions_keep_a_shard_of_the_major_one():
    out, _ = propagate(view("2,8,32", "16,32", L(3, 0)))
    check(out, f'{{par.layouts = [{L(2, 0)}]}}')
    assert casts(out) == []


def test_merged_dimensions_move_a_shard_of_a_minor_one_to_the_major_one():
    """[2,4,8] -> [8,8] with the 4 split: device 0 would hold rows 0,1,4,5, not a block. An
    all_to_all that splits the 2 instead (half the bytes of a gather) makes it a block."""
    out, report = propagate(view("2,4,8", "8,8", L(3, 1)))
    assert casts(out) == [f'%0 = par.layout_cast %x @mesh from {L(3, 1)} to {L(3, 0)}']
    check(out, f'%y = "torch.aten.view"(%0, %s) {{par.layouts = [{L(2, 0)}]}}')
    assert "64 bytes per device" in report[0]


# ---------------------------------------------------------------- transpose and permute


def test_transpose_and_permute_move_the_sharded_dimension():
    out, _ = propagate(step(
        arg("w", "96,32", L(2, 0)), f"{T('32,96')}, {T('32,1,96')}",
        f"""
        %t = "torch.aten.t"(%w) : ({T("96,32")}) -> {T("32,96")}
        %c0 = "torch.constant.int"() <{{value = 0 : i64}}> : () -> !torch.int
        %c1 = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
        %u = "torch.aten.unsqueeze"(%t, %c1) : ({T("32,96")}, !torch.int) -> {T("32,1,96")}
        %p = "torch.prim.ListConstruct"(%c1, %c0) : (!torch.int, !torch.int) -> !torch.list<int>
        %q = "torch.aten.permute"(%w, %p) : ({T("96,32")}, !torch.list<int>) -> {T("32,96")}
        """, "%q, %u"))
    check(out,
          f'%t = "torch.aten.t"(%w) {{par.layouts = [{L(2, 1)}]}}',
          f'%u = "torch.aten.unsqueeze"(%t, %c1) {{par.layouts = [{L(3, 2)}]}}',
          f'%q = "torch.aten.permute"(%w, %p) {{par.layouts = [{L(2, 1)}]}}')


# ---------------------------------------------------------------- split and cat

SPLIT = """
%c32 = "torch.constant.int"() <{{value = 32 : i64}}> : () -> !torch.int
%d = "torch.constant.int"() <{{value = {dim} : i64}}> : () -> !torch.int
%l = "torch.aten.split.Tensor"(%x, %c32, %d) : ({x}, !torch.int, !torch.int) -> !torch.list<vtensor>
%a, %b = "torch.prim.ListUnpack"(%l) : (!torch.list<vtensor>) -> ({p}, {p})
%j = "torch.prim.ListConstruct"(%b, %a) : ({p}, {p}) -> !torch.list<vtensor>
%y = "torch.aten.cat"(%j, %d) : (!torch.list<vtensor>, !torch.int) -> {x}
"""


def test_split_of_a_sharded_dimension_gathers_it_first():
    text = SPLIT.format(dim=1, x=T("8,64"), p=T("8,32"))
    out, report = propagate(step(arg("x", "8,64", L(2, 1)), T("8,64"), text, "%y"))
    assert casts(out) == [f'%0 = par.layout_cast %x @mesh from {L(2, 1)} to {L(2)}']
    check(out, f'%a, %b = "torch.prim.ListUnpack"(%l) {{par.layouts = [{L(2)}, {L(2)}]}}',
          f'%y = "torch.aten.cat"(%j, %d) {{par.layouts = [{L(2)}]}}')
    assert report == [f'%x {T("8,64")}: {L(2, 1)} -> {L(2)}, 1024 bytes per device, '
                      "for torch.aten.split.Tensor, operand 0 (split)"]


def test_split_and_cat_along_another_dimension_keep_the_shard():
    text = SPLIT.format(dim=1, x=T("8,64"), p=T("8,32"))
    out, _ = propagate(step(arg("x", "8,64", L(2, 0)), T("8,64"), text, "%y"))
    check(out, f'%a, %b = "torch.prim.ListUnpack"(%l) {{par.layouts = [{L(2, 0)}, {L(2, 0)}]}}',
          f'%y = "torch.aten.cat"(%j, %d) {{par.layouts = [{L(2, 0)}]}}')
    assert casts(out) == []


# ---------------------------------------------------------------- slicing

SLICE = """
%d = "torch.constant.int"() <{{value = 0 : i64}}> : () -> !torch.int
%start = "torch.constant.int"() <{{value = 0 : i64}}> : () -> !torch.int
%end = "torch.constant.int"() <{{value = {end} : i64}}> : () -> !torch.int
%step = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
%y = "torch.aten.slice.Tensor"(%x, %d, %start, %end, %step) : ({x}, !torch.int, !torch.int, !torch.int, !torch.int) -> {y}
"""


def test_a_slice_that_keeps_the_whole_dimension_keeps_the_shard():
    out, _ = propagate(step(arg("x", "8,4", L(2, 0)), T("8,4"),
                            SLICE.format(end=9223372036854775807, x=T("8,4"), y=T("8,4")), "%y"))
    check(out, f'{{par.layouts = [{L(2, 0)}]}}')
    assert casts(out) == []


def test_a_slice_that_cuts_a_sharded_dimension_gathers_it():
    out, _ = propagate(step(arg("x", "8,4", L(2, 0)), T("4,4"),
                            SLICE.format(end=4, x=T("8,4"), y=T("4,4")), "%y"))
    assert casts(out) == [f'%0 = par.layout_cast %x @mesh from {L(2, 0)} to {L(2)}']


# ---------------------------------------------------------------- embedding

EMBEDDING = f"""
%pad = "torch.constant.int"() <{{value = -1 : i64}}> : () -> !torch.int
%no = "torch.constant.bool"() <{{value = false}}> : () -> !torch.bool
%y = "torch.aten.embedding"(%w, %i, %pad, %no, %no) : ({T("64,32")}, {T("2,8", "si64")}, !torch.int, !torch.bool, !torch.bool) -> {T("2,8,32")}
%v = "torch.constant.int"() <{{value = 64 : i64}}> : () -> !torch.int
%g = "torch.aten.embedding_dense_backward"(%y, %i, %v, %pad, %no) : ({T("2,8,32")}, {T("2,8", "si64")}, !torch.int, !torch.int, !torch.bool) -> {T("64,32")}
"""


def test_vocab_parallel_embedding_is_a_pending_sum_and_its_gradient_keeps_the_rows():
    out, _ = propagate(step(f"{arg('w', '64,32', L(2, 0))}, %i: {T('2,8', 'si64')}", f"{T('2,8,32')}, {T('64,32')}",
                            EMBEDDING, "%y, %g"))
    check(out, f'%y = "torch.aten.embedding"(%w, %i, %pad, %no, %no) {{par.layouts = [{L(3, partial=True)}]}}',
          f'%g = "torch.aten.embedding_dense_backward"(%y, %i, %v, %pad, %no) {{par.layouts = [{L(2, partial=True)}]}}')
    assert casts(out) == []


def test_embedding_split_along_its_width_shards_the_result():
    out, _ = propagate(step(f"{arg('w', '64,32', L(2, 1))}, %i: {T('2,8', 'si64')}", f"{T('2,8,32')}, {T('64,32')}",
                            EMBEDDING, "%y, %g"))
    check(out, f'%y = "torch.aten.embedding"(%w, %i, %pad, %no, %no) {{par.layouts = [{L(3, 2)}]}}',
          f'%g = "torch.aten.embedding_dense_backward"(%y, %i, %v, %pad, %no) {{par.layouts = [{L(2, 1)}]}}')
    assert casts(out) == []


# ---------------------------------------------------------------- elementwise and broadcasting


def test_broadcast_operands_are_cut_locally_and_scalars_keep_pending_sums():
    out, report = propagate(step(
        f"{arg('x', '2,8,32', L(3, 2))}, {arg('b', '32')}, {arg('p', '2,8,32', L(3, partial=True))}",
        f"{T('2,8,32')}, {T('2,8,32')}",
        f"""
        %one = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
        %y = "torch.aten.add.Tensor"(%x, %b, %one) : ({T("2,8,32")}, {T("32")}, !torch.int) -> {T("2,8,32")}
        %half = "torch.constant.float"() <{{value = 5.000000e-01 : f64}}> : () -> !torch.float
        %q = "torch.aten.mul.Scalar"(%p, %half) : ({T("2,8,32")}, !torch.float) -> {T("2,8,32")}
        """, "%y, %q"))
    assert casts(out) == [f'%0 = par.layout_cast %b @mesh from {L(1)} to {L(1, 0)}']
    check(out, f'%y = "torch.aten.add.Tensor"(%x, %0, %one) {{par.layouts = [{L(3, 2)}]}}',
          f'%q = "torch.aten.mul.Scalar"(%p, %half) {{par.layouts = [{L(3, partial=True)}]}}')
    assert report[0].endswith("0 bytes per device, for torch.aten.add.Tensor, operand 1 (elementwise)")


def test_a_nonlinear_op_reduces_a_pending_sum_first():
    out, _ = propagate(step(
        arg("p", "8,32", L(2, partial=True)), T("8,32"),
        f"""
        %none = "torch.constant.str"() <{{value = "none"}}> : () -> !torch.str
        %y = "torch.aten.gelu"(%p, %none) : ({T("8,32")}, !torch.str) -> {T("8,32")}
        """, "%y"))
    assert casts(out) == [f'%0 = par.layout_cast %p @mesh from {L(2, partial=True)} to {L(2)}']


# ---------------------------------------------------------------- reductions

REDUCE = """
%d = "torch.constant.int"() <{{value = {dim} : i64}}> : () -> !torch.int
%dims = "torch.prim.ListConstruct"(%d) : (!torch.int) -> !torch.list<int>
%keep = "torch.constant.bool"() <{{value = false}}> : () -> !torch.bool
%none = "torch.constant.none"() : () -> !torch.none
%s = "torch.aten.sum.dim_IntList"(%x, %dims, %keep, %none) : ({x}, !torch.list<int>, !torch.bool, !torch.none) -> {r}
%m = "torch.aten.mean.dim"(%x, %dims, %keep, %none) : ({x}, !torch.list<int>, !torch.bool, !torch.none) -> {r}
%one = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
%v = "torch.aten.var.correction"(%x, %dims, %one, %keep) : ({x}, !torch.list<int>, !torch.int, !torch.bool) -> {r}
"""


def test_sum_and_mean_over_a_sharded_dimension_are_pending_sums_var_gathers():
    out, _ = propagate(step(arg("x", "8,32", L(2, 0)), f"{T('32')}, {T('32')}, {T('32')}",
                            REDUCE.format(dim=0, x=T("8,32"), r=T("32")), "%s, %m, %v"))
    check(out, f'%s = "torch.aten.sum.dim_IntList"(%x, %dims, %keep, %none) {{par.layouts = [{L(1, partial=True)}]}}',
          f'%m = "torch.aten.mean.dim"(%x, %dims, %keep, %none) {{par.layouts = [{L(1, partial=True)}]}}',
          f'%0 = par.layout_cast %x @mesh from {L(2, 0)} to {L(2)}',
          f'%v = "torch.aten.var.correction"(%0, %dims, %one, %keep) {{par.layouts = [{L(1)}]}}')


def test_reductions_over_another_dimension_keep_the_shard():
    out, _ = propagate(step(arg("x", "8,32", L(2, 1)), f"{T('32')}, {T('32')}, {T('32')}",
                            REDUCE.format(dim=0, x=T("8,32"), r=T("32")), "%s, %m, %v"))
    check(out, f'%s = "torch.aten.sum.dim_IntList"(%x, %dims, %keep, %none) {{par.layouts = [{L(1, 0)}]}}',
          f'%v = "torch.aten.var.correction"(%x, %dims, %one, %keep) {{par.layouts = [{L(1, 0)}]}}')
    assert casts(out) == []


# ---------------------------------------------------------------- softmax and layer norm

SOFTMAX = f"""
%d = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
%no = "torch.constant.bool"() <{{value = false}}> : () -> !torch.bool
%y = "torch.aten._softmax"(%x, %d, %no) : ({T("8,64")}, !torch.int, !torch.bool) -> {T("8,64")}
%f = "torch.constant.int"() <{{value = 6 : i64}}> : () -> !torch.int
%g = "torch.aten._softmax_backward_data"(%y, %y, %d, %f) : ({T("8,64")}, {T("8,64")}, !torch.int, !torch.int) -> {T("8,64")}
"""


def test_softmax_gathers_its_dimension_and_keeps_the_others():
    out, _ = propagate(step(arg("x", "8,64", L(2, 1)), T("8,64"), SOFTMAX, "%g"))
    assert casts(out) == [f'%0 = par.layout_cast %x @mesh from {L(2, 1)} to {L(2)}']
    out, _ = propagate(step(arg("x", "8,64", L(2, 0)), T("8,64"), SOFTMAX, "%g"))
    check(out, f'%y = "torch.aten._softmax"(%x, %d, %no) {{par.layouts = [{L(2, 0)}]}}',
          f'%g = "torch.aten._softmax_backward_data"(%y, %y, %d, %f) {{par.layouts = [{L(2, 0)}]}}')
    assert casts(out) == []


LAYER_NORM = f"""
%c = "torch.constant.int"() <{{value = 32 : i64}}> : () -> !torch.int
%n = "torch.prim.ListConstruct"(%c) : (!torch.int) -> !torch.list<int>
%eps = "torch.constant.float"() <{{value = 1.000000e-05 : f64}}> : () -> !torch.float
%y, %mean, %rstd = "torch.aten.native_layer_norm"(%x, %n, %w, %b, %eps) : ({T("8,32")}, !torch.list<int>, {T("32")}, {T("32")}, !torch.float) -> ({T("8,32")}, {T("8,1")}, {T("8,1")})
%t = "torch.constant.bool"() <{{value = true}}> : () -> !torch.bool
%mask = "torch.prim.ListConstruct"(%t, %t, %t) : (!torch.bool, !torch.bool, !torch.bool) -> !torch.list<bool>
%dx, %dw, %db = "torch.aten.native_layer_norm_backward"(%y, %x, %n, %mean, %rstd, %w, %b, %mask) : ({T("8,32")}, {T("8,32")}, !torch.list<int>, {T("8,1")}, {T("8,1")}, {T("32")}, {T("32")}, !torch.list<bool>) -> ({T("8,32")}, {T("32")}, {T("32")})
"""


def test_layer_norm_keeps_row_shards_and_its_backward_sums_weight_gradients():
    out, _ = propagate(step(f"{arg('x', '8,32', L(2, 0))}, {arg('w', '32')}, {arg('b', '32')}",
                            f"{T('8,32')}, {T('32')}", LAYER_NORM, "%dx, %dw"))
    check(out, f'%y, %mean, %rstd = "torch.aten.native_layer_norm"(%x, %n, %w, %b, %eps) {{par.layouts = '
               f'[{L(2, 0)}, {L(2, 0)}, {L(2, 0)}]}}',
          f'{{par.layouts = [{L(2, 0)}, {L(1, partial=True)}, {L(1, partial=True)}]}}')
    assert casts(out) == []


def test_layer_norm_gathers_a_sharded_normalised_dimension():
    out, _ = propagate(step(f"{arg('x', '8,32', L(2, 1))}, {arg('w', '32')}, {arg('b', '32')}",
                            f"{T('8,32')}, {T('32')}", LAYER_NORM, "%dx, %dw"))
    assert casts(out)[0] == f'%0 = par.layout_cast %x @mesh from {L(2, 1)} to {L(2)}'


# ---------------------------------------------------------------- attention

Q = T("2,4,8,8")
ATTENTION = f"""
%p = "torch.constant.float"() <{{value = 0.000000e+00 : f64}}> : () -> !torch.float
%causal = "torch.constant.bool"() <{{value = true}}> : () -> !torch.bool
%none = "torch.constant.none"() : () -> !torch.none
%o, %lse = "torch.aten._scaled_dot_product_flash_attention_for_cpu"(%q, %k, %v, %p, %causal, %none, %none) : ({Q}, {Q}, {Q}, !torch.float, !torch.bool, !torch.none, !torch.none) -> ({Q}, {T("2,4,8")})
%dq, %dk, %dv = "torch.aten._scaled_dot_product_flash_attention_for_cpu_backward"(%o, %q, %k, %v, %o, %lse, %p, %causal, %none, %none) : ({Q}, {Q}, {Q}, {Q}, {Q}, {T("2,4,8")}, !torch.float, !torch.bool, !torch.none, !torch.none) -> ({Q}, {Q}, {Q})
"""


def attention_step(layout: str) -> str:
    return step(f"{arg('q', '2,4,8,8', layout)}, {arg('k', '2,4,8,8', layout)}, {arg('v', '2,4,8,8', layout)}",
                f"{Q}, {Q}", ATTENTION, "%o, %dq")


def test_attention_keeps_head_shards():
    out, _ = propagate(attention_step(L(4, 1)))
    check(out, f'%o, %lse = "torch.aten._scaled_dot_product_flash_attention_for_cpu"(%q, %k, %v, %p, %causal, '
               f'%none, %none) {{par.layouts = [{L(4, 1)}, {L(3, 1)}]}}',
          f'{{par.layouts = [{L(4, 1)}, {L(4, 1)}, {L(4, 1)}]}}')
    assert casts(out) == []


def test_attention_gathers_a_sharded_sequence():
    out, _ = propagate(attention_step(L(4, 2)))
    assert casts(out) == [f'%{i} = par.layout_cast %{v} @mesh from {L(4, 2)} to {L(4)}' for i, v in enumerate("qkv")]


# ---------------------------------------------------------------- loss

LOSS = f"""
%none = "torch.constant.none"() : () -> !torch.none
%mean = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
%ignore = "torch.constant.int"() <{{value = -100 : i64}}> : () -> !torch.int
%loss, %total = "torch.aten.nll_loss_forward"(%x, %t, %none, %mean, %ignore) : ({T("16,64")}, {T("16", "si64")}, !torch.none, !torch.int, !torch.int) -> ({T("")}, {T("")})
"""


def test_loss_gathers_the_classes_and_sums_over_a_sharded_batch():
    out, _ = propagate(step(f"{arg('x', '16,64', L(2, 1))}, %t: {T('16', 'si64')}", T(""), LOSS, "%loss"))
    assert casts(out) == [f'%0 = par.layout_cast %x @mesh from {L(2, 1)} to {L(2)}']
    out, _ = propagate(step(f"{arg('x', '16,64', L(2, 0))}, %t: {T('16', 'si64')}", T(""), LOSS, "%loss"))
    check(out, f'{{par.layouts = [{L(0, partial=True)}, {L(0, partial=True)}]}}')
    assert casts(out) == [f'%0 = par.layout_cast %t @mesh from {L(1)} to {L(1, 0)}']


# ---------------------------------------------------------------- conflicts


def test_a_seeded_result_layout_wins_over_the_propagated_one():
    text = step(f"{arg('x', '16,32')}, {arg('w', '32,64', L(2, 1))}",
                f"{T('16,64')} {{par.layout = {L(2)}}}",
                f'%y = "torch.aten.mm"(%x, %w) : ({T("16,32")}, {T("32,64")}) -> {T("16,64")}', "%y",
                result_types=T("16,64"))
    out, report = propagate(text)
    check(out, f'%y = "torch.aten.mm"(%x, %w) {{par.layouts = [{L(2, 1)}]}}',
          f'%0 = par.layout_cast %y @mesh from {L(2, 1)} to {L(2)} '
          'because "result 0 of @main (seeded layout)"',
          "func.return %0")
    assert report == [f'result 0 of torch.aten.mm {T("16,64")}: {L(2, 1)} -> {L(2)}, '
                      "2048 bytes per device, for result 0 of @main (seeded layout)"]


def test_the_cheapest_reshard_is_chosen():
    """x [16,32] wants rows split, w [32,64] columns, over the same axis: gathering x moves
    1 KiB per device, gathering w 4 KiB, so x is gathered."""
    out, _ = propagate(step(
        f"{arg('x', '16,32', L(2, 0))}, {arg('w', '32,64', L(2, 1))}", T("16,64"),
        f'%y = "torch.aten.mm"(%x, %w) : ({T("16,32")}, {T("32,64")}) -> {T("16,64")}', "%y"))
    assert casts(out) == [f'%0 = par.layout_cast %x @mesh from {L(2, 0)} to {L(2)}']


def test_a_pending_sum_meeting_a_shard_is_reduce_scattered_rather_than_all_reduced():
    out, report = propagate(step(
        f"{arg('a', '64,64', L(2, 0))}, {arg('b', '64,64', L(2, partial=True))}", T("64,64"),
        f"""
        %one = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
        %y = "torch.aten.add.Tensor"(%a, %b, %one) : ({T("64,64")}, {T("64,64")}, !torch.int) -> {T("64,64")}
        """, "%y"))
    assert casts(out) == [f'%0 = par.layout_cast %b @mesh from {L(2, partial=True)} to {L(2, 0)}']
    assert "8192 bytes per device" in report[0]


def test_a_creation_op_makes_the_piece_its_users_want():
    """`ones` has no operand to follow; backward propagation gives it its user's layout."""
    out, _ = propagate(step(
        arg("x", "8,32", L(2, 0)), T("8,32"),
        f"""
        %c8 = "torch.constant.int"() <{{value = 8 : i64}}> : () -> !torch.int
        %c32 = "torch.constant.int"() <{{value = 32 : i64}}> : () -> !torch.int
        %s = "torch.prim.ListConstruct"(%c8, %c32) : (!torch.int, !torch.int) -> !torch.list<int>
        %none = "torch.constant.none"() : () -> !torch.none
        %o = "torch.aten.ones"(%s, %none, %none, %none, %none) : (!torch.list<int>, !torch.none, !torch.none, !torch.none, !torch.none) -> {T("8,32")}
        %one = "torch.constant.int"() <{{value = 1 : i64}}> : () -> !torch.int
        %y = "torch.aten.add.Tensor"(%x, %o, %one) : ({T("8,32")}, {T("8,32")}, !torch.int) -> {T("8,32")}
        """, "%y"))
    check(out, f'%o = "torch.aten.ones"(%s, %none, %none, %none, %none) {{par.layouts = [{L(2, 0)}]}}')
    assert casts(out) == []


# ---------------------------------------------------------------- ops without a rule

CUMSUM = f"""
%d = "torch.constant.int"() <{{value = 0 : i64}}> : () -> !torch.int
%none = "torch.constant.none"() : () -> !torch.none
%y = "torch.aten.cumsum"(%x, %d, %none) : ({T("8,32")}, !torch.int, !torch.none) -> {T("8,32")}
"""


def test_cumsum_keeps_the_other_dimensions_split_and_a_pending_sum_pending():
    out, _ = propagate(step(arg("x", "8,32", L(2, 1)), T("8,32"), CUMSUM, "%y"))
    check(out, f'%y = "torch.aten.cumsum"(%x, %d, %none) {{par.layouts = [{L(2, 1)}]}}')
    out, _ = propagate(step(arg("x", "8,32", L(2, None, partial=True)), T("8,32"), CUMSUM, "%y"))
    check(out, f'%y = "torch.aten.cumsum"(%x, %d, %none) {{par.layouts = [{L(2, None, partial=True)}]}}')
    # split along the summed dimension, it is gathered first
    out, _ = propagate(step(arg("x", "8,32", L(2, 0)), T("8,32"), CUMSUM, "%y"))
    check(out, f"%0 = par.layout_cast %x @mesh from {L(2, 0)} to {L(2)}", '%y = "torch.aten.cumsum"(%0, %d, %none)')


CUMPROD = f"""
%d = "torch.constant.int"() <{{value = 0 : i64}}> : () -> !torch.int
%none = "torch.constant.none"() : () -> !torch.none
%y = "torch.aten.cumprod"(%x, %d, %none) {{piperc.origin = #par.origin<"blocks.0.mix", F>}} : ({T("8,32")}, !torch.int, !torch.none) -> {T("8,32")}
"""


def test_an_op_without_a_rule_is_computed_replicated_with_a_note():
    out, report = propagate(step(arg("x", "8,32", L(2, 1)), T("8,32"), CUMPROD, "%y"))
    check(out, f'%0 = par.layout_cast %x @mesh from {L(2, 1)} to {L(2)} because '
               "\"torch.aten.cumprod in 'blocks.0.mix' (F), operand 0 (no rule: computed replicated)\"",
          f'%y = "torch.aten.cumprod"(%0, %d, %none) {{piperc.origin = #par.origin<"blocks.0.mix", F>, '
          f'par.layouts = [{L(2)}]}}')
    assert report[-1] == "note: torch.aten.cumprod in 'blocks.0.mix' (F) has no sharding rule; it was computed replicated"


def test_strict_mode_names_the_op_its_module_and_the_missing_rule():
    with pytest.raises(PassError) as e:
        propagate(step(arg("x", "8,32", L(2, 1)), T("8,32"), CUMPROD, "%y"), "{strict=true}")
    assert isinstance(e.value.__cause__, StrategyError)
    assert str(e.value.__cause__) == (
        "propagate-sharding (strict): torch.aten.cumprod in module 'blocks.0.mix' has no sharding rule. "
        "Add a rule for 'torch.aten.cumprod' to piperc.passes.sharding_rules.RULES, or run with strict=false "
        "to compute it replicated")


def test_a_seed_on_an_axis_propagation_does_not_use_is_an_error():
    text = step(arg("x", "8,32", "#par.sharding<[[\"dp\"], []]>"), T("8,32"), CUMSUM, "%y", mesh='["dp"=2, "tp"=2]')
    with pytest.raises(PassError, match="names mesh axis 'dp'; propagation uses the axes tp"):
        propagate(text, "{mesh-axes=tp}")


# ---------------------------------------------------------------- par.layout_cast


def test_layout_cast_round_trips_and_cannot_create_a_pending_sum():
    text = step(arg("x", "8,32"), T("8,32"),
                f'%y = par.layout_cast %x @mesh from {L(2)} to {L(2, 0)} because "why" : {T("8,32")}',
                "%y")
    module = parse_module(text)
    module.verify()
    printed = print_ir(module)
    assert print_ir(parse_module(printed)) == printed
    check(printed, f'%y = par.layout_cast %x @mesh from {L(2)} to {L(2, 0)} because "why" : {T("8,32")}')
    bad = text.replace(f'to {L(2, 0)}', f'to {L(2, partial=True)}')
    with pytest.raises(Exception, match="a change of layout cannot create pending sums"):
        parse_module(bad).verify()


# ---------------------------------------------------------------- seeding from a plan

PARAMS = step(
    f'%w: {T("96,32")} {{piperc.param = "blocks.0.attn.qkv.weight"}}, '
    f'%b: {T("30")} {{piperc.param = "blocks.0.attn.qkv.bias"}}, %x: {T("8,32")} {{piperc.input = 0 : i64}}',
    T("96,32"), "", "%w")


@pytest.mark.parametrize("plan, message", [
    ({"blocks.*.mlp.fc.weight": Shard(0)},
     "tensor plan entry 'blocks.*.mlp.fc.weight' matches no parameter of the model; parameters are named as in "
     "model.state_dict(), e.g. 'blocks.0.attn.qkv.weight'"),
    ({"blocks.*.attn.qkv.weight": Shard(2)},
     "tensor plan entry 'blocks.*.attn.qkv.weight': Shard(2) of 'blocks.0.attn.qkv.weight', which has 2 dimensions "
     "[96, 32]"),
    ({"blocks.*.attn.qkv.bias": Shard(0)},
     "tensor plan entry 'blocks.*.attn.qkv.bias': dimension 0 of 'blocks.0.attn.qkv.bias' has size 30, which does "
     "not divide evenly over 4 devices (axes tp)"),
    ({"blocks.*.attn.qkv.weight": Partial()},
     "tensor plan entry 'blocks.*.attn.qkv.weight': a parameter cannot be Partial (a pending sum); use "
     "piperc.Shard(dim) or piperc.Replicate()"),
    ({"blocks.*.attn.*": Replicate(), "*.qkv.weight": Shard(0)},
     "tensor plan: parameter 'blocks.0.attn.qkv.weight' is matched by both 'blocks.*.attn.*' and '*.qkv.weight'; "
     "make the globs disjoint"),
])
def test_plan_errors_name_the_entry_and_the_tensor(plan, message):
    with pytest.raises(StrategyError) as e:
        seed_layouts(parse_module(PARAMS), "tp", plan, {"tp": 4})
    assert str(e.value) == message


def test_seed_layouts_writes_the_parameter_layouts():
    module = parse_module(PARAMS)
    seed_layouts(module, "tp", {"blocks.*.qkv.weight": Shard(-1)}, {"tp": 4})
    check(print_ir(module), f'%w: {T("96,32")} {{piperc.param = "blocks.0.attn.qkv.weight", '
                            f'par.layout = {L(2, 1)}}}')


def test_placements_are_exported_by_piperc():
    assert (piperc.Shard, piperc.Replicate, piperc.Partial) == (Shard, Replicate, Partial)


# ---------------------------------------------------------------- the example models


@pytest.fixture(scope="module")
def captures():
    """One small capture per example (one block), made once."""
    made = {}
    for name, example in (("gpt", gpt), ("llama", llama), ("tied", tied), ("moe", moe)):
        model, inputs = example.make(n_layers=1, batch=2, seq=8)
        made[name] = piperc.capture(model, inputs)
    return made


def propagated(captured, plan: dict, tp: int = 2):
    module = captured.module.clone()
    seed_layouts(module, "tp", plan, {"tp": tp})
    run_pipeline(module, captured.ctx, f'mesh{{shape="tp={tp}"}},propagate-sharding{{strict=true}}')
    return module


def forward_casts(module) -> list[str]:
    """The sharding report's lines for casts that forward ops need."""
    return [line for line in sharding_report(module) if "(F), operand" in line]


def test_every_op_of_the_examples_has_a_rule(captures):
    missing = {op.name for c in captures.values() for op in c.main.body.block.ops
               if isinstance(op, AtenOp) and sharding_rule(op) is None}
    assert missing == set()


@pytest.mark.parametrize("options", ["kind=adamw", "kind=sgd momentum=0.9 weight-decay=0.1"])
def test_every_op_of_the_optimizer_updates_has_a_rule(captures, options):
    module = captures["gpt"].module.clone()
    run_pipeline(module, captures["gpt"].ctx,
                 f'mesh{{shape="pp=1"}},pipeline-split{{stages=1}},outline-stages,optimizer{{{options}}}')
    updates = [op for fn in module.ops if getattr(fn, "sym_name", None) and fn.sym_name.data.endswith("_update")
               for op in fn.body.block.ops if isinstance(op, AtenOp)]
    assert updates and {op.name for op in updates if sharding_rule(op) is None} == set()


def test_fused_qkv_shard_crosses_the_split_so_q_k_v_are_gathered_not_head_sharded(captures):
    """qkv.weight [96, 32] as Shard(0) over 2 devices holds [q; k[:16]] and [k[16:]; v]: the
    split of the [2,8,96] activation into q, k and v crosses the shard boundary."""
    module = propagated(captures["gpt"], {"blocks.*.attn.qkv.weight": Shard(0)})
    text = print_ir(module)
    check(text,
          f'"torch.aten._unsafe_view"(%27, %31) {{piperc.origin = #par.origin<"blocks.0.attn.qkv", F>, '
          f'par.layouts = [{L(3, 2)}]}}',
          f"par.layout_cast %32 @mesh from {L(3, 2)} to {L(3)} because "
          "\"torch.aten.split.Tensor in 'blocks.0.attn' (F), operand 0 (split)\"",
          f'"torch.prim.ListUnpack"(%36) {{piperc.origin = #par.origin<"blocks.0.attn", F>, par.layouts = '
          f'[{L(3)}, {L(3)}, {L(3)}]}}')
    assert forward_casts(module)[0] == (
        f"result 0 of torch.aten._unsafe_view in 'blocks.0.attn.qkv' (F) {T('2,8,96')}: {L(3, 2)} -> "
        f"{L(3)}, 3072 bytes per device, for torch.aten.split.Tensor in 'blocks.0.attn' (F), operand 0 "
        "(split)")


MEGATRON_LLAMA = {"blocks.*.attn.[qkv].weight": Shard(0), "blocks.*.attn.o.weight": Shard(1),
                  "blocks.*.mlp.gate.weight": Shard(0), "blocks.*.mlp.up.weight": Shard(0),
                  "blocks.*.mlp.down.weight": Shard(1)}


def test_megatron_mlp_needs_only_the_row_parallel_sum(captures):
    module = propagated(captures["llama"], MEGATRON_LLAMA)
    mlp = [line for line in forward_casts(module) if "mlp" in line]
    assert mlp == [
        f"result 0 of torch.aten._unsafe_view in 'blocks.0.mlp.down' (F) {T('2,8,32')}: "
        f"{L(3, partial=True)} -> {L(3)}, 2048 bytes per device, for "
        "torch.aten.add.Tensor in 'blocks.0' (F), operand 1 (elementwise)"]


@pytest.mark.xfail(strict=True, reason="attention's matmul merges [batch, heads] into one dimension, and a block "
                                       "layout cannot say 'heads split, batch whole' (a strided shard): q, k "
                                       "and v move their shard from heads to batch (all_to_all) before the "
                                       "batched matmul")
def test_megatron_attention_needs_only_the_row_parallel_sum(captures):
    module = propagated(captures["llama"], MEGATRON_LLAMA)
    assert [line for line in forward_casts(module) if "attn" in line and "partial" not in line] == []
