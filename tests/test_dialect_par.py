"""The `par` dialect: every op and attribute round-trips in custom and generic form,
every verifier rejects what it should, and the mesh and schedule helpers compute
what their docstrings say."""

import io
import textwrap

import pytest
from xdsl.dialects.builtin import ModuleOp, f32
from xdsl.ir import Attribute
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.utils.exceptions import ParseError, VerifyException

from piperc.dialects.par import (
    ActionAttr,
    AllGatherOp,
    AllReduceOp,
    AllToAllOp,
    DeviceOp,
    MeshAttr,
    MeshOp,
    OriginAttr,
    PassKind,
    RecvOp,
    ReduceKind,
    ReduceScatterOp,
    ScheduleOp,
    SendOp,
    ShardingAttr,
    ShardOp,
    TaskOp,
    YieldOp,
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


# ---------------------------------------------------------------- par.task, par.yield


def test_task_roundtrip():
    check_roundtrip(
        f"""
        builtin.module {{
          func.func @f(%a: {T}, %b: {T}) {{
            %p, %q = par.task "s0_F_mb1" stage 0 pass F microbatch 1 (%a, %b) : ({T}, {T}) -> ({T}, {T}) {{
            ^bb0(%x: {T}, %y: {T}):
              par.yield %y, %x : {T}, {T}
            }}
            par.task "s0_U" stage 0 pass update microbatch -1 () : () -> () {{
              par.yield
            }}
            func.return
          }}
        }}
        """,
        f"""
        "builtin.module"() ({{
          "func.func"() <{{sym_name = "f", function_type = ({T}, {T}) -> ()}}> ({{
          ^bb0(%a: {T}, %b: {T}):
            %p, %q = "par.task"(%a, %b) <{{sym_name = "s0_F_mb1", stage = 0 : i64, pass_kind = #par.pass<F>, microbatch = 1 : i64}}> ({{
            ^bb0(%x: {T}, %y: {T}):
              "par.yield"(%y, %x) : ({T}, {T}) -> ()
            }}) : ({T}, {T}) -> ({T}, {T})
            "par.task"() <{{sym_name = "s0_U", stage = 0 : i64, pass_kind = #par.pass<update>, microbatch = -1 : i64}}> ({{
              "par.yield"() : () -> ()
            }}) : () -> ()
            "func.return"() : () -> ()
          }}) : () -> ()
        }}) : () -> ()
        """,
    )


@pytest.mark.parametrize(
    "task, match",
    [
        (
            f"""%r = par.task "t" stage 0 pass F microbatch 0 (%a) : ({T}) -> !torch.vtensor<[8],f32> {{
              ^bb0(%x: !torch.vtensor<[8],f32>):
                par.yield %x : !torch.vtensor<[8],f32>
              }}""",
            r'par.task "t": body arguments \(!torch.vtensor<\[8\],f32>\) must match the inputs',
        ),
        (
            f"""%r = par.task "t" stage 0 pass F microbatch 0 (%a) : ({T}) -> {T} {{
              ^bb0(%x: {T}):
                par.yield %x, %x : {T}, {T}
              }}""",
            r'par.task "t": par.yield gives \(.*, .*\), the task returns \(.*\)',
        ),
        (
            f"""%r = par.task "t" stage 0 pass F microbatch 0 () : () -> {T} {{
                par.yield %a : {T}
              }}""",
            "value defined out of its IsolatedFromAbove parent",
        ),
        (
            """par.task "t" stage -1 pass F microbatch 0 () : () -> () {
                par.yield
              }""",
            'par.task "t": stage -1 must be >= 0',
        ),
        (
            """par.task "t" stage 0 pass F microbatch -2 () : () -> () {
                par.yield
              }""",
            'par.task "t": microbatch -2 must be >= 0, or -1 for all microbatches',
        ),
    ],
)
def test_task_rejects(task, match):
    verify_error(
        f"""
        func.func @f(%a: {T}) {{
          {task}
          func.return
        }}
        """,
        match,
    )


def test_yield_outside_a_task_is_rejected():
    verify_error("par.yield", "'par.yield' expects parent op 'par.task'")


# ---------------------------------------------------------------- par.send, par.recv


def test_send_recv_roundtrip():
    check_roundtrip(
        f"""
        builtin.module {{
          func.func @f(%a: {T}) {{
            par.send %a to stage 1 tag "act_s0_mb1" : {T}
            %0 = par.recv from stage 0 tag "act_s0_mb1" : {T}
            func.return
          }}
        }}
        """,
        f"""
        "builtin.module"() ({{
          "func.func"() <{{sym_name = "f", function_type = ({T}) -> ()}}> ({{
          ^bb0(%a: {T}):
            "par.send"(%a) <{{peer_stage = 1 : i64, tag = "act_s0_mb1"}}> : ({T}) -> ()
            %0 = "par.recv"() <{{peer_stage = 0 : i64, tag = "act_s0_mb1"}}> : () -> {T}
            "func.return"() : () -> ()
          }}) : () -> ()
        }}) : () -> ()
        """,
    )


def test_send_rejects_a_negative_stage():
    verify_error(
        f"""
        func.func @f(%a: {T}) {{
          par.send %a to stage -1 tag "x" : {T}
          func.return
        }}
        """,
        "par.send: peer stage -1 must be >= 0",
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
    task = TaskOp("s1_F_mb0", 1, PassKind.F, 0, [], [t])
    recv = RecvOp(t, 0, "act_s0_mb0")
    shard = ShardOp(recv.result, "mesh", ShardingAttr.split(2, 0, "dp"))
    reduced = AllReduceOp(shard.result, "mesh", "dp", ReduceKind.AVG)
    gathered = AllGatherOp(reduced.result, "mesh", "dp", 0, ValueTensorType([16, 16], f32))
    scattered = ReduceScatterOp(gathered.result, "mesh", "dp", 0, t)
    swapped = AllToAllOp(scattered.result, "mesh", "dp", 0, 1, ValueTensorType([4, 32], f32))
    send = SendOp(swapped.result, 2, "act_s1_mb0")
    task.body.block.add_ops([recv, shard, reduced, gathered, scattered, swapped, send])
    task.body.block.add_op(YieldOp(scattered.result))
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
    module = ModuleOp([mesh, task, schedule])
    module.verify()
    assert show(module) == ir(
        f"""
        builtin.module {{
          par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
          %0 = par.task "s1_F_mb0" stage 1 pass F microbatch 0 () : () -> {T} {{
            %1 = par.recv from stage 0 tag "act_s0_mb0" : {T}
            %2 = par.shard %1 @mesh #par.sharding<[["dp"], []]> : {T}
            %3 = par.all_reduce %2 over @mesh "dp" avg : {T}
            %4 = par.all_gather %3 over @mesh "dp" dim 0 : {T} -> !torch.vtensor<[16,16],f32>
            %5 = par.reduce_scatter %4 over @mesh "dp" dim 0 sum : !torch.vtensor<[16,16],f32> -> {T}
            %6 = par.all_to_all %5 over @mesh "dp" split 0 concat 1 : {T} -> !torch.vtensor<[4,32],f32>
            par.send %6 to stage 2 tag "act_s1_mb0" : !torch.vtensor<[4,32],f32>
            par.yield %5 : {T}
          }}
          par.schedule @sched mesh @mesh axis "pp" {{
            par.device 0 [0F0, 0B0]
            par.device 1 [1F0, 1B0] overlap [[1F0, 1B0]]
          }}
        }}
        """
    )
