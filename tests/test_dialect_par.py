"""The `par` dialect: every op and attribute round-trips in custom and generic form,
every verifier rejects what it should, and the mesh and schedule helpers compute
what their docstrings say."""

import io
import re
import textwrap

import pytest
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, FunctionType, ModuleOp, f32
from xdsl.ir import Attribute
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.utils.exceptions import ParseError, VerifyException

from piperc.dialects.par import (
    AccumulateOp,
    ActionAttr,
    AllGatherOp,
    AllReduceBucketOp,
    AllReduceOp,
    AllToAllOp,
    DeviceOp,
    InputOp,
    MeshAttr,
    MeshOp,
    OriginAttr,
    OutputOp,
    PassKind,
    ProgramOp,
    RecvOp,
    ReduceKind,
    ReduceScatterOp,
    ScheduleOp,
    SendOp,
    SetStateOp,
    ShardingAttr,
    ShardOp,
    StateOp,
    TaskOp,
    is_zigzag,
    zigzag_lengths,
)
from piperc.dialects.torch import ValueTensorType
from piperc.ir import make_context


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def parse(text: str) -> ModuleOp:
    module = Parser(make_context(), text).parse_module()
    module.verify()
    return module


def show(op_or_attr: ModuleOp | Attribute, generic: bool = False) -> str:
    out = io.StringIO()
    printer = Printer(stream=out, print_generic_format=generic)
    if isinstance(op_or_attr, ModuleOp):
        printer.print_op(op_or_attr)
    else:
        printer.print_attribute(op_or_attr)
    return out.getvalue() + "\n"


def check_roundtrip(custom: str, generic: str) -> None:
    """Custom and generic text each parse, verify and print back as both forms."""
    custom, generic = ir(custom), ir(generic)
    for text in (custom, generic):
        module = parse(text)
        assert show(module) == custom
        assert show(module, generic=True) == generic


def check_attr(text: str) -> Attribute:
    attr = Parser(make_context(), text).parse_attribute()
    assert show(attr) == text + "\n"
    return attr


def verify_error(text: str, match: str) -> None:
    module = Parser(make_context(), ir(text)).parse_module()
    with pytest.raises(VerifyException, match=match):
        module.verify()


T = "!torch.vtensor<[8,16],f32>"
T6 = "!torch.vtensor<[6,16],f32>"
TR, T6R = re.escape(T), re.escape(T6)  # the types as regex patterns, for error messages


# ---------------------------------------------------------------- #par.mesh, par.mesh


def test_mesh_roundtrip():
    check_roundtrip(
        """
        builtin.module {
          par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
        }
        """,
        """
        "builtin.module"() ({
          "par.mesh"() <{sym_name = "mesh", shape = #par.mesh<["pp"=2, "dp"=2]>}> : () -> ()
        }) : () -> ()
        """,
    )


def test_mesh_layout_is_row_major():
    mesh = check_attr('#par.mesh<["pp"=2, "dp"=3]>')
    assert isinstance(mesh, MeshAttr)
    assert mesh == MeshAttr([("pp", 2), ("dp", 3)])
    assert mesh.axis_names() == ("pp", "dp")
    assert mesh.axis_size("dp") == 3
    assert mesh.size() == 6
    assert mesh.coords(4) == {"pp": 1, "dp": 1}
    assert mesh.rank_of({"pp": 1, "dp": 1}) == 4
    assert mesh.group_ranks("dp", 4) == (3, 4, 5)
    assert mesh.group_ranks("pp", 4) == (1, 4)
    assert mesh.all_groups("dp") == [(0, 1, 2), (3, 4, 5)]
    assert mesh.all_groups("pp") == [(0, 3), (1, 4), (2, 5)]


def test_mesh_declares_the_axes_that_cut_a_length_zigzag():
    """`par.zigzag` on the mesh: the axis sp cuts a dimension of 16 zigzag (`zigzag_lengths`,
    `is_zigzag`); it must name an axis of the mesh and a length its 2W chunks divide."""
    module = parse('builtin.module {\n  par.mesh @mesh #par.mesh<["dp"=2, "sp"=4]> {par.zigzag = {sp = 16 : i64}}\n}')
    assert show(module) == ir("""
        builtin.module {
          par.mesh @mesh #par.mesh<["dp"=2, "sp"=4]> {par.zigzag = {sp = 16 : i64}}
        }
        """)
    mesh = next(iter(module.ops))
    assert zigzag_lengths(mesh) == {"sp": 16}
    assert is_zigzag(mesh, "sp", 16) and not is_zigzag(mesh, "sp", 8) and not is_zigzag(mesh, "dp", 16)
    verify_error('builtin.module {\n  par.mesh @mesh #par.mesh<["sp"=4]> {par.zigzag = {tp = 16 : i64}}\n}',
                 r"par.zigzag names axis 'tp', which the mesh \['sp'\] lacks")
    verify_error('builtin.module {\n  par.mesh @mesh #par.mesh<["sp"=4]> {par.zigzag = {sp = 12 : i64}}\n}',
                 "a zigzag cut needs a length that 8 chunks divide")


@pytest.mark.parametrize(
    "axes, match",
    [
        ([("pp", 2), ("pp", 2)], "axis 'pp' is declared twice"),
        ([("", 2)], "an axis name is empty"),
        ([("dp", 0)], "axis 'dp' has size 0, must be >= 1"),
    ],
)
def test_mesh_attr_rejects(axes, match):
    with pytest.raises(VerifyException, match=match):
        MeshAttr(axes)


# ---------------------------------------------------------------- #par.sharding, par.shard


def test_sharding_attr():
    check_attr('#par.sharding<[["dp"], [], ["tp", "sp"]], partial = ["pp"]>')
    replicated = check_attr("#par.sharding<[[], []]>")
    assert replicated == ShardingAttr.replicated(2)
    assert replicated.is_replicated()
    split = ShardingAttr.split(2, 1, "tp")
    assert show(split) == '#par.sharding<[[], ["tp"]]>\n'
    assert split.dim_axes(1) == ("tp",)
    assert not split.is_replicated()
    assert not ShardingAttr([[], []], partial=["tp"]).is_replicated()


def test_sharding_attr_rejects_an_axis_used_twice():
    with pytest.raises(VerifyException, match="mesh axis 'tp' is used twice"):
        ShardingAttr([["dp"], ["tp"]], partial=["tp"])


def test_shard_roundtrip():
    check_roundtrip(
        f"""
        builtin.module {{
          par.mesh @mesh #par.mesh<["dp"=2, "tp"=4]>
          func.func @f(%x: {T}) {{
            %0 = par.shard %x @mesh #par.sharding<[["dp"], []]> : {T}
            %1 = par.shard %x @mesh #par.sharding<[[], ["dp", "tp"]]> : {T}
            %2 = par.shard %x @mesh #par.sharding<[[], []], partial = ["tp"]> : {T}
            func.return
          }}
        }}
        """,
        f"""
        "builtin.module"() ({{
          "par.mesh"() <{{sym_name = "mesh", shape = #par.mesh<["dp"=2, "tp"=4]>}}> : () -> ()
          "func.func"() <{{sym_name = "f", function_type = ({T}) -> ()}}> ({{
          ^bb0(%x: {T}):
            %0 = "par.shard"(%x) <{{mesh = @mesh, sharding = #par.sharding<[["dp"], []]>}}> : ({T}) -> {T}
            %1 = "par.shard"(%x) <{{mesh = @mesh, sharding = #par.sharding<[[], ["dp", "tp"]]>}}> : ({T}) -> {T}
            %2 = "par.shard"(%x) <{{mesh = @mesh, sharding = #par.sharding<[[], []], partial = ["tp"]>}}> : ({T}) -> {T}
            "func.return"() : () -> ()
          }}) : () -> ()
        }}) : () -> ()
        """,
    )


@pytest.mark.parametrize(
    "sharding, match",
    [
        ('[["dp"]]', r"sharding has 1 dimensions, the value .* has 2"),
        (
            '[["dp", "tp"], []]',
            r"dimension 0 of size 8 does not split evenly over 16 devices \(axes dp, tp\)",
        ),
        ('[["ep"], []]', "mesh @mesh has no axis 'ep' \\(axes: dp, tp\\)"),
    ],
)
def test_shard_rejects(sharding, match):
    verify_error(
        f"""
        par.mesh @mesh #par.mesh<["dp"=2, "tp"=8]>
        func.func @f(%x: {T}) {{
          %0 = par.shard %x @mesh #par.sharding<{sharding}> : {T}
          func.return
        }}
        """,
        match,
    )


def test_shard_rejects_an_undefined_mesh():
    verify_error(
        f"""
        func.func @f(%x: {T}) {{
          %0 = par.shard %x @grid #par.sharding<[["dp"], []]> : {T}
          func.return
        }}
        """,
        "mesh @grid is not defined",
    )


# ---------------------------------------------------------------- #par.pass, #par.origin, #par.action


def test_pass_attr():
    for text in ("#par.pass<F>", "#par.pass<B>", "#par.pass<W>", "#par.pass<update>"):
        check_attr(text)
    assert check_attr("#par.pass<update>").data is PassKind.UPDATE


def test_origin_attr():
    plain = check_attr('#par.origin<"blocks.3.attn.qkv", F>')
    assert plain == OriginAttr("blocks.3.attn.qkv", PassKind.F)
    assert (plain.path, plain.pass_kind, plain.region, plain.region_index) == (
        "blocks.3.attn.qkv",
        PassKind.F,
        None,
        None,
    )
    in_region = check_attr('#par.origin<"blocks.3.attn.qkv", B, region "stage1" 0>')
    assert in_region == OriginAttr("blocks.3.attn.qkv", PassKind.B, "stage1", 0)
    assert (in_region.region, in_region.region_index) == ("stage1", 0)
    check_attr('#par.origin<"", F, region "stage1">')


@pytest.mark.parametrize(
    "args, match",
    [
        (("fc", PassKind.W), "forward \\(F\\) or backward \\(B\\) pass, not W"),
        (("fc", PassKind.F, None, 2), "region index 2 without a region"),
    ],
)
def test_origin_attr_rejects(args, match):
    with pytest.raises(VerifyException, match=match):
        OriginAttr(*args)


def test_action_attr():
    for text in ("#par.action<0F1>", "#par.action<1B0>", "#par.action<0W3>", "#par.action<1U0>"):
        check_attr(text)
    action = ActionAttr.from_str("12B3")
    assert (action.stage, action.pass_kind, action.microbatch) == (12, PassKind.B, 3)
    assert action.compact() == "12B3"
    assert ActionAttr(1, PassKind.UPDATE, 0).compact() == "1U0"


def test_action_attr_rejects():
    with pytest.raises(ValueError, match="'0X1' is not a schedule action"):
        ActionAttr.from_str("0X1")
    with pytest.raises(ParseError, match="'0F' is not a schedule action"):
        Parser(make_context(), "#par.action<0F>").parse_attribute()


# ---------------------------------------------------------------- stage functions and par.program

# A stage function as outline-stages writes it: every argument and result carries a
# layout, the input split over "dp", the parameter replicated.
RL = "{par.layout = #par.sharding<[[], []]>}"
DL = '{par.layout = #par.sharding<[["dp"], []]>}'
STAGE_FUNCTIONS = f"""
  par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
  func.func @s0_F(%x: {T} {{par.layout = #par.sharding<[["dp"], []]>, piperc.key = "input:0"}}, %w: {T} {RL}) -> ({T} {DL}) {{
    func.return %x : {T}
  }}
  func.func @s0_B_accumulate(%acc: {T} {RL}, %new: {T} {RL}) -> ({T} {RL}) {{
    func.return %acc : {T}
  }}
"""


def test_program_roundtrip():
    check_roundtrip(
        f"""
        builtin.module {{
          par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
          func.func @s0_F(%x: {T} {{par.layout = #par.sharding<[["dp"], []]>, piperc.key = "input:0"}}, %w: {T} {RL}) -> ({T} {DL}) {{
            func.return %x : {T}
          }}
          func.func @s0_B_accumulate(%acc: {T} {RL}, %new: {T} {RL}) -> ({T} {RL}) {{
            func.return %acc : {T}
          }}
          par.program @device0 device 0 {{
            %w = par.state "blocks.0.w" layout #par.sharding<[[], []]> : {T}
            %x = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : {T}
            %y = par.task @s0_F stage 0 pass F microbatch 1 (%x, %w) : ({T}, {T}) -> {T}
            %z = par.task @s0_F stage 0 pass F (%x, %w) : ({T}, {T}) -> {T}
            par.send %y to 1 "s0_F.0 mb1" batch 3 : {T}
            %dy = par.recv from 1 "s1_B.0 mb0" batch 3 : {T}
            par.send %z to 1 "s0_F.0 mb0" : {T}
            %dz = par.recv from 1 "s1_B.0 mb1" : {T}
            %g = par.accumulate @s0_B_accumulate stage 0 (%dy) : {T}
            %r, %s = par.all_reduce_bucket 0 stage 0 (%g, %dz) over @mesh ["dp"] stages [0, 1] : {T}, {T}
            par.set_state "blocks.0.w", %r : {T}
            par.output "loss", %s : {T}
          }}
        }}
        """,
        f"""
        "builtin.module"() ({{
          "par.mesh"() <{{sym_name = "mesh", shape = #par.mesh<["pp"=2, "dp"=2]>}}> : () -> ()
          "func.func"() <{{sym_name = "s0_F", function_type = ({T}, {T}) -> {T}, arg_attrs = [{{par.layout = #par.sharding<[["dp"], []]>, piperc.key = "input:0"}}, {RL}], res_attrs = [{DL}]}}> ({{
          ^bb0(%x: {T}, %w: {T}):
            "func.return"(%x) : ({T}) -> ()
          }}) : () -> ()
          "func.func"() <{{sym_name = "s0_B_accumulate", function_type = ({T}, {T}) -> {T}, arg_attrs = [{RL}, {RL}], res_attrs = [{RL}]}}> ({{
          ^bb0(%acc: {T}, %new: {T}):
            "func.return"(%acc) : ({T}) -> ()
          }}) : () -> ()
          "par.program"() <{{sym_name = "device0", device = 0 : i64}}> ({{
            %w = "par.state"() <{{state_name = "blocks.0.w", layout = #par.sharding<[[], []]>}}> : () -> {T}
            %x = "par.input"() <{{index = 0 : i64, microbatch = 1 : i64, layout = #par.sharding<[["dp"], []]>}}> : () -> {T}
            %y = "par.task"(%x, %w) <{{callee = @s0_F, stage = 0 : i64, pass_kind = #par.pass<F>, microbatch = 1 : i64}}> : ({T}, {T}) -> {T}
            %z = "par.task"(%x, %w) <{{callee = @s0_F, stage = 0 : i64, pass_kind = #par.pass<F>}}> : ({T}, {T}) -> {T}
            "par.send"(%y) <{{peer = 1 : i64, label = "s0_F.0 mb1", batch = 3 : i64}}> : ({T}) -> ()
            %dy = "par.recv"() <{{peer = 1 : i64, label = "s1_B.0 mb0", batch = 3 : i64}}> : () -> {T}
            "par.send"(%z) <{{peer = 1 : i64, label = "s0_F.0 mb0"}}> : ({T}) -> ()
            %dz = "par.recv"() <{{peer = 1 : i64, label = "s1_B.0 mb1"}}> : () -> {T}
            %g = "par.accumulate"(%dy) <{{callee = @s0_B_accumulate, stage = 0 : i64}}> : ({T}) -> {T}
            %r, %s = "par.all_reduce_bucket"(%g, %dz) <{{bucket = 0 : i64, stage = 0 : i64, mesh = @mesh, axes = ["dp"], stages = [#builtin.int<0>, #builtin.int<1>]}}> : ({T}, {T}) -> ({T}, {T})
            "par.set_state"(%r) <{{state_name = "blocks.0.w"}}> : ({T}) -> ()
            "par.output"(%s) <{{output_name = "loss"}}> : ({T}) -> ()
          }}) : () -> ()
        }}) : () -> ()
        """,
    )


def test_task_action():
    module = parse(f"""
        {STAGE_FUNCTIONS}
        par.program @device0 device 0 {{
          %w = par.state "blocks.0.w" layout #par.sharding<[[], []]> : {T}
          %y = par.task @s0_F stage 0 pass F microbatch 3 (%w, %w) : ({T}, {T}) -> {T}
          %u = par.task @s0_F stage 0 pass update (%w, %w) : ({T}, {T}) -> {T}
        }}
        """)
    program = next(op for op in module.ops if isinstance(op, ProgramOp))
    assert [op.action() for op in program.body.ops if isinstance(op, TaskOp)] == ["0F3", "0U"]


@pytest.mark.parametrize(
    "op, match",
    [
        (
            f"%y = par.task @s0_F stage 0 pass F (%w) : ({T}) -> {T}",
            rf"par.task @s0_F: operands \({TR}\) do not match @s0_F's arguments \({TR}, {TR}\)",
        ),
        (
            f"%y = par.task @s0_F stage 0 pass F (%w, %w) : ({T}, {T}) -> {T6}",
            rf"par.task @s0_F: results \({T6R}\) do not match @s0_F's results \({TR}\)",
        ),
        (
            f"%y = par.task @nowhere stage 0 pass F (%w) : ({T}) -> {T}",
            "par.task: @nowhere is not a func.func of the module",
        ),
        (
            f"%y = par.task @s0_F stage 0 pass F microbatch -1 (%w, %w) : ({T}, {T}) -> {T}",
            "par.task @s0_F: microbatch -1 must be >= 0",
        ),
        (
            f"%y = par.task @s0_F stage -1 pass F (%w, %w) : ({T}, {T}) -> {T}",
            "par.task @s0_F: stage -1 must be >= 0",
        ),
        (
            f"%g, %h = par.accumulate @s0_F stage 0 (%w, %w) : {T}, {T}",
            r"par.accumulate @s0_F: the combiner must take \(acc..., new...\) and return acc... "
            rf"for the types \({TR}, {TR}\)",
        ),
        (
            f'%r = par.all_reduce_bucket 0 stage 1 (%w) over @mesh ["dp"] stages [0] : {T}',
            r"par.all_reduce_bucket 0 of stage 1: its own stage is not among the stages \[0\]",
        ),
        (
            f'%r = par.all_reduce_bucket 0 stage 0 (%w) over @mesh ["tp"] stages [0] : {T}',
            "par.all_reduce_bucket: mesh @mesh has no axis 'tp'",
        ),
        (
            f'par.send %w to -1 "s0_F.0 mb0" : {T}',
            'par.send "s0_F.0 mb0": peer device -1 must be >= 0',
        ),
        (
            f'%r = par.recv from -2 "s1_B.0 mb0" : {T}',
            'par.recv "s1_B.0 mb0": peer device -2 must be >= 0',
        ),
        (
            f'%r = par.recv from 1 "s1_B.0 mb0" batch -1 : {T}',
            'par.recv "s1_B.0 mb0": batch must be >= 0',
        ),
        (
            f'%s = par.state "blocks.0.w" layout #par.sharding<[[]]> : {T}',
            rf'par.state "blocks.0.w": layout #par.sharding<\[\[\]\]> has 1 dimensions, the value {TR} has 2',
        ),
        (
            f'%x = par.input 0 microbatch 0 layout #par.sharding<[["tp"], []]> : {T}',
            r"""par.input 0: layout #par.sharding<\[\["tp"\], \[\]\]> names axis 'tp', which the mesh""",
        ),
    ],
)
def test_program_ops_reject(op, match):
    verify_error(
        f"""
        {STAGE_FUNCTIONS}
        par.program @device0 device 0 {{
          %w = par.state "blocks.0.w" layout #par.sharding<[[], []]> : {T}
          {op}
        }}
        """,
        match,
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (
            f"%x: {T} {{piperc.key = \"input:0\"}}, %w: {T} {RL}",
            r"@s0_F argument 0 \(input:0\) has no layout; every value that crosses a function "
            r"boundary carries `par.layout = #par.sharding<...>`",
        ),
        (
            f"%x: {T} {DL}, %w: {T} {{par.layout = #par.sharding<[[]]>, piperc.key = \"param:blocks.0.w\"}}",
            rf"@s0_F argument 1 \(param:blocks.0.w\): layout #par.sharding<\[\[\]\]> has 1 dimensions, "
            rf"the value {TR} has 2",
        ),
        (
            f"%x: {T} {{par.layout = #par.sharding<[[\"tp\"], []]>}}, %w: {T} {RL}",
            r"""@s0_F argument 0: layout #par.sharding<\[\["tp"\], \[\]\]> names axis 'tp', which the mesh """
            r"""#par.mesh<\["pp"=2, "dp"=2\]> does not have""",
        ),
    ],
)
def test_task_rejects_a_callee_without_fitting_layouts(args, match):
    verify_error(
        f"""
        par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
        func.func @s0_F({args}) -> ({T} {DL}) {{
          func.return %x : {T}
        }}
        par.program @device0 device 0 {{
          %w = par.state "blocks.0.w" layout #par.sharding<[[], []]> : {T}
          %y = par.task @s0_F stage 0 pass F microbatch 0 (%w, %w) : ({T}, {T}) -> {T}
        }}
        """,
        match,
    )


def test_task_rejects_a_callee_result_without_a_layout():
    verify_error(
        f"""
        par.mesh @mesh #par.mesh<["pp"=2]>
        func.func @s1_F(%x: {T} {RL}) -> {T} {{
          func.return %x : {T}
        }}
        func.func @main(%x: {T}) -> {T} {{
          %y = par.task @s1_F stage 1 pass F (%x) : ({T}) -> {T}
          func.return %y : {T}
        }}
        """,
        "@s1_F result 0 has no layout",
    )


# ---------------------------------------------------------------- collectives


def test_collectives_roundtrip():
    check_roundtrip(
        f"""
        builtin.module {{
          par.mesh @mesh #par.mesh<["dp"=2, "tp"=4]>
          func.func @f(%a: {T}) {{
            %0 = par.all_reduce %a over @mesh "dp" sum : {T}
            %1 = par.all_reduce %a over @mesh "tp" max : {T}
            %2 = par.all_gather %a over @mesh "tp" dim 1 : {T} -> !torch.vtensor<[8,64],f32>
            %3 = par.reduce_scatter %a over @mesh "dp" dim 0 avg : {T} -> !torch.vtensor<[4,16],f32>
            %4 = par.all_to_all %a over @mesh "tp" split 0 concat 1 : {T} -> !torch.vtensor<[2,64],f32>
            func.return
          }}
        }}
        """,
        f"""
        "builtin.module"() ({{
          "par.mesh"() <{{sym_name = "mesh", shape = #par.mesh<["dp"=2, "tp"=4]>}}> : () -> ()
          "func.func"() <{{sym_name = "f", function_type = ({T}) -> ()}}> ({{
          ^bb0(%a: {T}):
            %0 = "par.all_reduce"(%a) <{{mesh = @mesh, axis = "dp", reduce = #par.reduce<sum>}}> : ({T}) -> {T}
            %1 = "par.all_reduce"(%a) <{{mesh = @mesh, axis = "tp", reduce = #par.reduce<max>}}> : ({T}) -> {T}
            %2 = "par.all_gather"(%a) <{{mesh = @mesh, axis = "tp", dim = 1 : i64}}> : ({T}) -> !torch.vtensor<[8,64],f32>
            %3 = "par.reduce_scatter"(%a) <{{mesh = @mesh, axis = "dp", dim = 0 : i64, reduce = #par.reduce<avg>}}> : ({T}) -> !torch.vtensor<[4,16],f32>
            %4 = "par.all_to_all"(%a) <{{mesh = @mesh, axis = "tp", split_dim = 0 : i64, concat_dim = 1 : i64}}> : ({T}) -> !torch.vtensor<[2,64],f32>
            "func.return"() : () -> ()
          }}) : () -> ()
        }}) : () -> ()
        """,
    )


@pytest.mark.parametrize(
    "op, match",
    [
        (
            f'%0 = par.all_reduce %a over @mesh "ep" sum : {T}',
            "par.all_reduce: mesh @mesh has no axis 'ep'",
        ),
        (
            f'%0 = par.all_gather %a over @mesh "tp" dim 0 : {T} -> {T}',
            r"par.all_gather over 'tp' \(4 devices\): result .* should have shape \[32,16\]",
        ),
        (
            f'%0 = par.all_gather %a over @mesh "tp" dim 2 : {T} -> {T}',
            "par.all_gather: dim 2 is outside the rank-2 operand",
        ),
        (
            f'%0 = par.reduce_scatter %b over @mesh "tp" dim 0 sum : {T6} -> !torch.vtensor<[2,16],f32>',
            "dimension 0 of size 6 does not split evenly over the 4 devices of axis 'tp'",
        ),
        (
            f'%0 = par.reduce_scatter %a over @mesh "dp" dim 0 sum : {T} -> !torch.vtensor<[4,16],f16>',
            "result dtype f16 differs from operand dtype f32",
        ),
        (
            f'%0 = par.all_to_all %a over @mesh "tp" split 1 concat 0 : {T} -> !torch.vtensor<[2,64],f32>',
            r"par.all_to_all over 'tp' \(4 devices\): result .* should have shape \[32,4\]",
        ),
    ],
)
def test_collectives_reject(op, match):
    verify_error(
        f"""
        par.mesh @mesh #par.mesh<["dp"=2, "tp"=4]>
        func.func @f(%a: {T}, %b: {T6}) {{
          {op}
          func.return
        }}
        """,
        match,
    )


# ---------------------------------------------------------------- par.schedule, par.device


SCHEDULE = """
builtin.module {
  par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
  par.schedule @sched mesh @mesh axis "pp" {
    par.device 0 [0F0, 0F1, 0B0, 0B1, 0U0]
    par.device 1 [1F0, 1B0, 1F1, 1B1, 1U0] overlap [[1F1, 1B0]]
  }
}
"""


def test_schedule_roundtrip():
    check_roundtrip(
        SCHEDULE,
        """
        "builtin.module"() ({
          "par.mesh"() <{sym_name = "mesh", shape = #par.mesh<["pp"=2, "dp"=2]>}> : () -> ()
          "par.schedule"() <{sym_name = "sched", mesh = @mesh, axis = "pp"}> ({
            "par.device"() <{index = 0 : i64, actions = [#par.action<0F0>, #par.action<0F1>, #par.action<0B0>, #par.action<0B1>, #par.action<0U0>]}> : () -> ()
            "par.device"() <{index = 1 : i64, actions = [#par.action<1F0>, #par.action<1B0>, #par.action<1F1>, #par.action<1B1>, #par.action<1U0>], overlap = [[#par.action<1F1>, #par.action<1B0>]]}> : () -> ()
          }) : () -> ()
        }) : () -> ()
        """,
    )


def test_schedule_table():
    schedule = next(op for op in parse(SCHEDULE).ops if isinstance(op, ScheduleOp))
    table = {d: [a.compact() for a in actions] for d, actions in schedule.table().items()}
    assert table == {
        0: ["0F0", "0F1", "0B0", "0B1", "0U0"],
        1: ["1F0", "1B0", "1F1", "1B1", "1U0"],
    }
    assert [a.compact() for a in schedule.devices()[1].overlap_groups()[0]] == ["1F1", "1B0"]


@pytest.mark.parametrize(
    "devices, match",
    [
        (
            "par.device 0 [0F0, 0B0]\n par.device 1 [1F0, 0B0]",
            r"action 0B0 appears twice \(devices 0 and 1\)",
        ),
        (
            "par.device 0 [0F0]\n par.device 2 [1F0]",
            r"device indices \[0, 2\] must be 0..1, once each",
        ),
        ("par.device 0 [0F0]", "axis 'pp' has 2 devices, the schedule lists 1"),
        (
            "par.device 0 [0F0]\n par.device 1 [1F0, 1B0] overlap [[1B0, 1F1]]",
            "par.device 1: overlap action 1F1 is not in the device's actions",
        ),
    ],
)
def test_schedule_rejects(devices, match):
    verify_error(
        f"""
        par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
        par.schedule @sched mesh @mesh axis "pp" {{
          {devices}
        }}
        """,
        match,
    )


# ---------------------------------------------------------------- building from Python


def test_ops_build_from_python():
    t = ValueTensorType([8, 16], f32)
    replicated, split = ShardingAttr.replicated(2), ShardingAttr.split(2, 0, "dp")
    layout = DictionaryAttr({"par.layout": replicated})
    stage_fn = func.FuncOp("s1_F", FunctionType.from_lists([t, t], [t]), arg_attrs=ArrayAttr([layout, layout]),
                           res_attrs=ArrayAttr([layout]))
    stage_fn.body.block.add_op(func.ReturnOp(stage_fn.args[0]))
    combiner = func.FuncOp("s1_accumulate", FunctionType.from_lists([t, t], [t]))
    combiner.body.block.add_op(func.ReturnOp(combiner.args[0]))
    state = StateOp("blocks.1.w", replicated, t)
    data = InputOp(0, 1, split, t)
    recv = RecvOp(t, 0, "s0_F.0 mb1", batch=2)
    shard = ShardOp(recv.result, "mesh", split)
    reduced = AllReduceOp(shard.result, "mesh", "dp", ReduceKind.AVG)
    gathered = AllGatherOp(reduced.result, "mesh", "dp", 0, ValueTensorType([16, 16], f32))
    scattered = ReduceScatterOp(gathered.result, "mesh", "dp", 0, t)
    swapped = AllToAllOp(scattered.result, "mesh", "dp", 0, 1, ValueTensorType([4, 32], f32))
    task = TaskOp("s1_F", 1, PassKind.F, [scattered.result, state.result], [t], microbatch=1)
    accumulated = AccumulateOp("s1_accumulate", 1, [task.outs[0]])
    bucket = AllReduceBucketOp(0, 1, [accumulated.sums[0], data.result], "mesh", ["dp"], [1])
    send = SendOp(swapped.result, 0, "s1_B.0 mb1")
    program = ProgramOp("device1", 1)
    program.body.block.add_ops([
        state, data, recv, shard, reduced, gathered, scattered, swapped, task, accumulated, bucket, send,
        SetStateOp("blocks.1.w", bucket.sums[0]), OutputOp("loss", bucket.sums[1]),
    ])
    schedule = ScheduleOp(
        "sched",
        "mesh",
        "pp",
        [
            DeviceOp(0, [ActionAttr.from_str("0F0"), ActionAttr.from_str("0B0")]),
            DeviceOp(
                1,
                [ActionAttr.from_str("1F0"), ActionAttr.from_str("1B0")],
                overlap=[[ActionAttr.from_str("1F0"), ActionAttr.from_str("1B0")]],
            ),
        ],
    )
    mesh = MeshOp("mesh", MeshAttr([("pp", 2), ("dp", 2)]))
    module = ModuleOp([mesh, stage_fn, combiner, program, schedule])
    module.verify()
    assert show(module) == ir(
        f"""
        builtin.module {{
          par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
          func.func @s1_F(%0: {T} {RL}, %1: {T} {RL}) -> ({T} {RL}) {{
            func.return %0 : {T}
          }}
          func.func @s1_accumulate(%0: {T}, %1: {T}) -> {T} {{
            func.return %0 : {T}
          }}
          par.program @device1 device 1 {{
            %0 = par.state "blocks.1.w" layout #par.sharding<[[], []]> : {T}
            %1 = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : {T}
            %2 = par.recv from 0 "s0_F.0 mb1" batch 2 : {T}
            %3 = par.shard %2 @mesh #par.sharding<[["dp"], []]> : {T}
            %4 = par.all_reduce %3 over @mesh "dp" avg : {T}
            %5 = par.all_gather %4 over @mesh "dp" dim 0 : {T} -> !torch.vtensor<[16,16],f32>
            %6 = par.reduce_scatter %5 over @mesh "dp" dim 0 sum : !torch.vtensor<[16,16],f32> -> {T}
            %7 = par.all_to_all %6 over @mesh "dp" split 0 concat 1 : {T} -> !torch.vtensor<[4,32],f32>
            %8 = par.task @s1_F stage 1 pass F microbatch 1 (%6, %0) : ({T}, {T}) -> {T}
            %9 = par.accumulate @s1_accumulate stage 1 (%8) : {T}
            %10, %11 = par.all_reduce_bucket 0 stage 1 (%9, %1) over @mesh ["dp"] stages [1] : {T}, {T}
            par.send %7 to 0 "s1_B.0 mb1" : !torch.vtensor<[4,32],f32>
            par.set_state "blocks.1.w", %10 : {T}
            par.output "loss", %11 : {T}
          }}
          par.schedule @sched mesh @mesh axis "pp" {{
            par.device 0 [0F0, 0B0]
            par.device 1 [1F0, 1B0] overlap [[1F0, 1B0]]
          }}
        }}
        """
    )
