"""`par.reshard`, its lowering to collectives, and collectives inside stage functions.

IR text in, IR text out: each lowering case is one reshard in a function on the mesh
`["dp"=2, "tp"=4]` and the collectives `lower-reshard` writes for it. Types are
per-device shapes. The verifier tests show the message a user sees for a reshard whose
layouts do not fit its value. The last test trains a model whose stage forward runs a
collective on every step, on two processes, and compares it with one-device training.
"""

import textwrap
from dataclasses import dataclass

import pytest
import torch
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass

import piperc
from piperc.dialects.par import ReshardOp, ShardingAttr
from piperc.dialects.torch import ValueTensorType
from piperc.errors import PassError
from piperc.ir import make_context, parse_module, print_ir
from piperc.passes.lower_collectives import LowerCollectivesPass
from piperc.passes.lower_reshard import LowerReshardPass
from piperc.passes.mesh import find_mesh
from piperc.passes.outline_stages import arg_keys, find_function
from piperc.passmanager import run_pipeline
from piperc.reference import compare, train_eager
from piperc.strategy import Directive, Fragment, StrategyContext


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def run(text: str, pipeline: str) -> str:
    ctx = make_context()
    module = parse_module(text, ctx)
    run_pipeline(module, ctx, pipeline)
    return print_ir(module)


def with_body(arg: str, result: str, body: str, returned: str) -> str:
    """A module with the mesh and one function `@f(%x: arg) -> result` running `body`."""
    lines = "\n".join("    " + line for line in ir(body).splitlines())
    return (
        "builtin.module {\n"
        '  par.mesh @mesh #par.mesh<["dp"=2, "tp"=4]>\n'
        f"  func.func @f(%x: !torch.vtensor<{arg},f32>) -> !torch.vtensor<{result},f32> {{\n"
        f"{lines}\n"
        f"    func.return {returned} : !torch.vtensor<{result},f32>\n"
        "  }\n"
        "}\n"
    )


# ---------------------------------------------------------------- lower-reshard

# (operand shape, result shape, the reshard, what lower-reshard writes for it)
LOWERINGS = {
    "partial to replicated: all_reduce": (
        "[8,16]", "[8,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[[], []], partial = ["dp"]> to #par.sharding<[[], []]> '
        ": !torch.vtensor<[8,16],f32> -> !torch.vtensor<[8,16],f32>",
        '%r = par.all_reduce %x over @mesh "dp" sum : !torch.vtensor<[8,16],f32>',
    ),
    "partial to shard: reduce_scatter": (
        "[8,16]", "[4,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[[], []], partial = ["dp"]> to #par.sharding<[["dp"], []]> '
        ": !torch.vtensor<[8,16],f32> -> !torch.vtensor<[4,16],f32>",
        '%r = par.reduce_scatter %x over @mesh "dp" dim 0 sum : !torch.vtensor<[8,16],f32> -> !torch.vtensor<[4,16],f32>',
    ),
    "shard to replicated: all_gather": (
        "[4,16]", "[8,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], []]> '
        ": !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,16],f32>",
        '%r = par.all_gather %x over @mesh "dp" dim 0 : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,16],f32>',
    ),
    "shard to shard of another dimension: all_to_all": (
        "[4,16]", "[8,8]",
        '%r = par.reshard %x @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], ["dp"]]> '
        ": !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,8],f32>",
        '%r = par.all_to_all %x over @mesh "dp" split 1 concat 0 : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,8],f32>',
    ),
    "replicated to shard: all_slice, no communication": (
        "[8,16]", "[8,4]",
        '%r = par.reshard %x @mesh from #par.sharding<[[], []]> to #par.sharding<[[], ["tp"]]> '
        ": !torch.vtensor<[8,16],f32> -> !torch.vtensor<[8,4],f32>",
        '%r = par.all_slice %x over @mesh "tp" dim 1 : !torch.vtensor<[8,16],f32> -> !torch.vtensor<[8,4],f32>',
    ),
    # Several axes: one collective per axis. A dimension gives up its axes from the innermost.
    "two sharded dimensions to replicated: two all_gathers": (
        "[4,4]", "[8,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[["dp"], ["tp"]]> to #par.sharding<[[], []]> '
        ": !torch.vtensor<[4,4],f32> -> !torch.vtensor<[8,16],f32>",
        """
        %r = par.all_gather %x over @mesh "dp" dim 0 : !torch.vtensor<[4,4],f32> -> !torch.vtensor<[8,4],f32>
        %r_1 = par.all_gather %r over @mesh "tp" dim 1 : !torch.vtensor<[8,4],f32> -> !torch.vtensor<[8,16],f32>
        """,
    ),
    "one dimension over two axes to replicated: inner axis first": (
        "[1,16]", "[8,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[["dp", "tp"], []]> to #par.sharding<[[], []]> '
        ": !torch.vtensor<[1,16],f32> -> !torch.vtensor<[8,16],f32>",
        """
        %r = par.all_gather %x over @mesh "tp" dim 0 : !torch.vtensor<[1,16],f32> -> !torch.vtensor<[4,16],f32>
        %r_1 = par.all_gather %r over @mesh "dp" dim 0 : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,16],f32>
        """,
    ),
    "inner axis moves to another dimension, outer axis is gathered": (
        "[1,16]", "[8,4]",
        '%r = par.reshard %x @mesh from #par.sharding<[["dp", "tp"], []]> to #par.sharding<[[], ["tp"]]> '
        ": !torch.vtensor<[1,16],f32> -> !torch.vtensor<[8,4],f32>",
        """
        %r = par.all_to_all %x over @mesh "tp" split 1 concat 0 : !torch.vtensor<[1,16],f32> -> !torch.vtensor<[4,4],f32>
        %r_1 = par.all_gather %r over @mesh "dp" dim 0 : !torch.vtensor<[4,4],f32> -> !torch.vtensor<[8,4],f32>
        """,
    ),
    "partial sum reduced into a dimension's inner axis": (
        "[2,16]", "[1,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[["tp"], []], partial = ["dp"]> '
        'to #par.sharding<[["tp", "dp"], []]> : !torch.vtensor<[2,16],f32> -> !torch.vtensor<[1,16],f32>',
        '%r = par.reduce_scatter %x over @mesh "dp" dim 0 sum : !torch.vtensor<[2,16],f32> -> !torch.vtensor<[1,16],f32>',
    ),
    "partial over one axis, replicated to sharded over the other": (
        "[8,16]", "[8,4]",
        '%r = par.reshard %x @mesh from #par.sharding<[[], []], partial = ["dp"]> to #par.sharding<[[], ["tp"]]> '
        ": !torch.vtensor<[8,16],f32> -> !torch.vtensor<[8,4],f32>",
        """
        %r = par.all_reduce %x over @mesh "dp" sum : !torch.vtensor<[8,16],f32>
        %r_1 = par.all_slice %r over @mesh "tp" dim 1 : !torch.vtensor<[8,16],f32> -> !torch.vtensor<[8,4],f32>
        """,
    ),
    "replicated to two axes of one dimension: outer axis first": (
        "[8,16]", "[1,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[[], []]> to #par.sharding<[["dp", "tp"], []]> '
        ": !torch.vtensor<[8,16],f32> -> !torch.vtensor<[1,16],f32>",
        """
        %r = par.all_slice %x over @mesh "dp" dim 0 : !torch.vtensor<[8,16],f32> -> !torch.vtensor<[4,16],f32>
        %r_1 = par.all_slice %r over @mesh "tp" dim 0 : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[1,16],f32>
        """,
    ),
}


@pytest.mark.parametrize("arg,result,reshard,lowered", LOWERINGS.values(), ids=LOWERINGS.keys())
def test_lower_reshard(arg, result, reshard, lowered):
    final = ir(lowered).splitlines()[-1].split(" = ")[0]
    assert run(with_body(arg, result, reshard, "%r"), "lower-reshard") == with_body(arg, result, lowered, final)


def test_identical_layouts_fold_to_the_operand():
    same = with_body(
        "[4,16]", "[4,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[["dp"], []]> '
        ": !torch.vtensor<[4,16],f32> -> !torch.vtensor<[4,16],f32>",
        "%r",
    )
    assert run(same, "lower-reshard") == ir(
        """
        builtin.module {
          par.mesh @mesh #par.mesh<["dp"=2, "tp"=4]>
          func.func @f(%x: !torch.vtensor<[4,16],f32>) -> !torch.vtensor<[4,16],f32> {
            func.return %x : !torch.vtensor<[4,16],f32>
          }
        }
        """
    )


def test_lower_reshard_reaches_reshards_in_nested_regions():
    nested = ir(
        """
        builtin.module {
          builtin.module @inner {
            par.mesh @mesh #par.mesh<["dp"=2]>
            func.func @f(%x: !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[8,8],f32> {
              %g = par.reshard %x @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], []]> : !torch.vtensor<[4,8],f32> -> !torch.vtensor<[8,8],f32>
              func.return %g : !torch.vtensor<[8,8],f32>
            }
          }
        }
        """
    )
    assert run(nested, "lower-reshard") == nested.replace(
        '%g = par.reshard %x @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], []]> :',
        '%g = par.all_gather %x over @mesh "dp" dim 0 :',
    )


@pytest.mark.parametrize("source", ["[[], []]", '[["dp"], []]'])
def test_lower_reshard_rejects_making_a_partial_sum(source):
    arg = "[8,16]" if source == "[[], []]" else "[4,16]"
    text = with_body(
        arg, "[8,16]",
        f'%grad_w = par.reshard %x @mesh from #par.sharding<{source}> to #par.sharding<[[], []], partial = ["dp"]> '
        f": !torch.vtensor<{arg},f32> -> !torch.vtensor<[8,16],f32>",
        "%grad_w",
    )
    with pytest.raises(PassError) as raised:
        run(text, "lower-reshard")
    assert str(raised.value) == (
        f"lower-reshard: par.reshard of %x from #par.sharding<{source}> to "
        '#par.sharding<[[], []], partial = ["dp"]>: the target holds a partial sum over axis \'dp\' that '
        "the source does not; a reshard cannot turn a value into pending partial sums (every device but "
        "one would have to drop its data). Partial sums come from compute, such as a matmul whose "
        "contracted dimension is sharded; keep the axis out of the target's `partial`"
    )


# ---------------------------------------------------------------- the verifier


def reshard_of_grad_w(source: str, target: str, arg: str, result: str, result_dtype: str = "f32") -> str:
    return ir(
        f"""
        builtin.module {{
          par.mesh @mesh #par.mesh<["dp"=2, "tp"=4]>
          func.func @f(%grad_w: !torch.vtensor<{arg},f32>) {{
            %r = par.reshard %grad_w @mesh from #par.sharding<{source}> to #par.sharding<{target}> : !torch.vtensor<{arg},f32> -> !torch.vtensor<{result},{result_dtype}>
            func.return
          }}
        }}
        """
    )


REJECTED = {
    "layout rank": (
        ('[["dp"]]', "[[], []]", "[4,16]", "[8,16]"),
        "the source layout has 1 dimensions, but %grad_w has rank 2; give one axis list per dimension",
    ),
    "unknown axis": (
        ("[[], []]", '[["ep"], []]', "[8,16]", "[4,16]"),
        "the target layout names axis 'ep', which mesh @mesh does not have (axes: dp, tp)",
    ),
    "indivisible": (
        ("[[], []]", '[[], ["dp", "tp"]]', "[8,12]", "[8,2]"),
        "dimension 1 of the global shape has size 12, which does not split evenly over the 8 devices "
        "of axes dp, tp",
    ),
    "other global shape": (
        ('[["dp"], []]', "[[], []]", "[4,16]", "[4,16]"),
        "the result type !torch.vtensor<[4,16],f32> does not describe the same global tensor as the "
        "operand type !torch.vtensor<[4,16],f32>; its local shape should be [8,16]",
    ),
}


@pytest.mark.parametrize("layouts,message", REJECTED.values(), ids=REJECTED.keys())
def test_reshard_verifier_names_the_value_and_layouts(layouts, message):
    source, target = layouts[0], layouts[1]
    with pytest.raises(Exception) as raised:
        parse_module(reshard_of_grad_w(*layouts)).verify()
    assert str(raised.value) == (
        f"par.reshard of %grad_w from #par.sharding<{source}> to #par.sharding<{target}>: {message}"
    )


def test_reshard_verifier_rejects_a_change_of_dtype():
    with pytest.raises(Exception) as raised:
        parse_module(reshard_of_grad_w("[[], []]", "[[], []]", "[8,16]", "[8,16]", "f16")).verify()
    assert str(raised.value) == (
        "par.reshard of %grad_w from #par.sharding<[[], []]> to #par.sharding<[[], []]>: the result "
        "dtype f16 differs from the operand dtype f32; a reshard moves data, it does not convert it"
    )


def test_all_slice_verifier_checks_the_piece():
    text = with_body("[8,16]", "[8,16]",
                     '%s = par.all_slice %x over @mesh "tp" dim 1 : !torch.vtensor<[8,16],f32> -> !torch.vtensor<[8,8],f32>',
                     "%x")
    with pytest.raises(Exception) as raised:
        parse_module(text).verify()
    assert str(raised.value) == (
        "par.all_slice over 'tp' (4 devices): result !torch.vtensor<[8,8],f32> should have shape [8,4]"
    )


# ---------------------------------------------------------------- lower-collectives

# A stage function gathers over "dp" on the mesh pp=2 x dp=2; lowering already declared
# the pipeline groups. lower-collectives adds one group per set of ranks along "dp",
# tagged with the axis, after them; each rank's program reaches its group through the tag.
BEFORE_LOWER_COLLECTIVES = ir(
    """
    builtin.module {
      par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>
      func.func @s0_F(%x: !torch.vtensor<[2,8],f32>) -> !torch.vtensor<[4,8],f32> {
        %g = par.all_gather %x over @mesh "dp" dim 0 : !torch.vtensor<[2,8],f32> -> !torch.vtensor<[4,8],f32>
        func.return %g : !torch.vtensor<[4,8],f32>
      }
      exec.process_group @pp_0 ranks [0, 2]
      exec.process_group @pp_1 ranks [1, 3]
      exec.program @rank0 rank 0 world 4 {
        %compute = exec.stream "compute"
      }
    }
    """
)


def test_lower_collectives_declares_the_groups_of_each_axis_a_function_collective_uses():
    assert run(BEFORE_LOWER_COLLECTIVES, "lower-collectives") == BEFORE_LOWER_COLLECTIVES.replace(
        "  exec.process_group @pp_1 ranks [1, 3]\n",
        "  exec.process_group @pp_1 ranks [1, 3]\n"
        '  exec.process_group @dp_0 ranks [0, 1] axis "dp"\n'
        '  exec.process_group @dp_1 ranks [2, 3] axis "dp"\n',
    )


def test_lower_collectives_runs_once_per_axis():
    once = run(BEFORE_LOWER_COLLECTIVES, "lower-collectives")
    assert run(once, "lower-collectives") == once


def test_lower_collectives_requires_the_reshards_lowered():
    text = with_body(
        "[4,16]", "[8,16]",
        '%r = par.reshard %x @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], []]> '
        ": !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,16],f32>",
        "%r",
    ).replace("  }\n}\n", "  }\n  exec.program @rank0 rank 0 world 8 {\n    %compute = exec.stream \"compute\"\n  }\n}\n")
    with pytest.raises(PassError) as raised:
        run(text, "lower-collectives")
    assert str(raised.value) == (
        'lower-collectives: @f still holds par.reshard of %x from #par.sharding<[["dp"], []]> to '
        "#par.sharding<[[], []]>; run lower-reshard before lower-to-exec"
    )


# ---------------------------------------------------------------- end to end


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.out(torch.tanh(self.inp(x))), y)


@dataclass(frozen=True)
class ReshardParameterRoundTrip(ModulePass):
    """Test only: in `@s0_F`, the parameter `param` (replicated over `axis`) goes
    Replicate -> Shard(0) -> Shard(1) -> Replicate before the forward reads it."""

    name = "test-reshard-parameter-round-trip"

    param: str
    axis: str

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        fn = find_function(op, "s0_F")
        weight = fn.args[arg_keys(fn).index(f"param:{self.param}")]
        n = find_mesh(op).axis_size(self.axis)
        rows, cols = weight.type.get_shape()
        layouts = [ShardingAttr.replicated(2), ShardingAttr.split(2, 0, self.axis),
                   ShardingAttr.split(2, 1, self.axis), ShardingAttr.replicated(2)]
        shapes = [[rows // n, cols], [rows, cols // n], [rows, cols]]
        value, first = weight, None
        for source, target, shape in zip(layouts, layouts[1:], shapes, strict=False):
            reshard = ReshardOp(value, "mesh", source, target, ValueTensorType(shape, weight.type.dtype))
            fn.body.block.insert_op_before(reshard, fn.body.block.first_op) if first is None else \
                fn.body.block.insert_op_after(reshard, value.owner)
            first, value = first or reshard, reshard.result
        weight.replace_uses_with_if(value, lambda use: use.operation is not first)


@dataclass(frozen=True)
class RoundTrip(Directive):
    """Test only: reshards a parameter inside the stage forward, then lowers the reshards
    and declares the groups their collectives run on."""

    param: str
    axis: str

    def fragments(self, ctx: StrategyContext) -> list[Fragment]:
        return [
            Fragment((ReshardParameterRoundTrip(self.param, self.axis), LowerReshardPass()),
                     requires=("stages",)),
            Fragment((LowerCollectivesPass(),), requires=("exec",)),
        ]


def test_collectives_inside_a_stage_forward_train_like_one_device():
    torch.manual_seed(0)
    model = MLP()
    batches = [(torch.randn(8, 8), torch.randn(8, 4)) for _ in range(3)]
    optimizer = piperc.optim.SGD(lr=0.05, momentum=0.9)
    compiled = piperc.compile(
        model, batches[0], mesh=piperc.Mesh(dp=2), optimizer=optimizer, keep_ir=False,
        strategy=[piperc.data_parallel(axis="dp"), RoundTrip("inp.weight", "dp")])
    program = compiled.files["rank1.py"]
    assert 'AXIS_GROUPS = {"dp": "dp_0"}\nAXIS_INDEX = {"dp": 1}\n' in program
    for statement in ('aten.chunk.default(p_inp_weight, 2, 0)[AXIS_INDEX["dp"]]',
                      'RT.all_to_all(v0, group=AXIS_GROUPS["dp"], split_dim=1, concat_dim=0, stream=None)',
                      'RT.all_gather(v1, group=AXIS_GROUPS["dp"], dim=1, stream=None)',
                      "RT.wait(work)"):
        assert statement in program, statement
    result = piperc.launch(compiled, batches, timeout=120)
    loss_err, param_err = compare(result.losses, result.state_dict, *train_eager(model, batches, optimizer))
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)
