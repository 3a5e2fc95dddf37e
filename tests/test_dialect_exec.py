"""The `exec` dialect: every op and attribute prints, parses and prints back the
same in custom and generic form, and each verifier rejects what it should."""

from __future__ import annotations

import io
import re

import pytest
from xdsl.context import Context
from xdsl.dialects.builtin import Builtin, ModuleOp, f32
from xdsl.dialects.func import Func
from xdsl.ir import Block, Operation, Region
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.utils.exceptions import VerifyException

from piperc.dialects.exec import (
    AllReduceOp,
    Exec,
    ProcessGroupOp,
    ProgramOp,
    ReductionKind,
    StateOp,
    StreamOp,
    WaitOp,
)
from piperc.dialects.torch import Torch, ValueTensorType


@pytest.fixture(scope="module")
def ctx() -> Context:
    ctx = Context()
    for d in (Builtin, Func, Torch, Exec):
        ctx.load_dialect(d)
    return ctx


def parse(ctx: Context, text: str) -> ModuleOp:
    module = Parser(ctx, text).parse_module()
    module.verify()
    return module


def show(op: Operation, *, generic: bool = False) -> str:
    out = io.StringIO()
    Printer(stream=out, print_generic_format=generic).print_op(op)
    return out.getvalue()


# ---------------------------------------------------------------- programs and groups

GROUPS = """\
builtin.module {
  exec.process_group @dp_1 ranks [1, 3]
  exec.program @rank1 rank 1 world 4 {
    %s = exec.stream "compute"
  }
}"""

GROUPS_GENERIC = """\
"builtin.module"() ({
  "exec.process_group"() <{sym_name = "dp_1", ranks = array<i64: 1, 3>}> : () -> ()
  "exec.program"() <{sym_name = "rank1", rank = 1 : i64, world_size = 4 : i64}> ({
    %s = "exec.stream"() <{name = "compute"}> : () -> !exec.stream
  }) : () -> ()
}) : () -> ()"""


def test_program_and_process_group_round_trip(ctx: Context):
    assert show(parse(ctx, GROUPS)) == GROUPS
    assert show(parse(ctx, GROUPS), generic=True) == GROUPS_GENERIC
    assert show(parse(ctx, GROUPS_GENERIC), generic=True) == GROUPS_GENERIC
    assert show(parse(ctx, GROUPS_GENERIC)) == GROUPS


# One step of the last pipeline stage on rank 1 (pp 2 x dp 2): receive the
# activation, forward with the loss, backward, send the input gradient back,
# average the gradients over data parallelism in one bucket, update.
LAST_STAGE = """\
builtin.module {
  exec.process_group @pp_0 ranks [0, 1]
  exec.process_group @dp_1 ranks [1, 3]
  exec.program @rank1 rank 1 world 4 {
    %compute = exec.stream "compute"
    %comm = exec.stream "comm" priority -1
    %w = exec.state "head.weight" : !torch.vtensor<[16,16],f32>
    %b = exec.state "head.bias" : !torch.vtensor<[16],f32>
    %labels = exec.load_input "labels" microbatch 0 : !torch.vtensor<[4],si64>
    %recv_h, %h = exec.recv from 0 group @pp_0 tag 0 on %comm : !torch.vtensor<[4,16],f32>
    exec.wait %recv_h on %compute
    exec.record_stream %h, %compute : !torch.vtensor<[4,16],f32>
    %loss = exec.launch @s1_F_mb0(%h, %w, %b, %labels) on %compute stage 1 pass "F" microbatch 0 : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16,16],f32>, !torch.vtensor<[16],f32>, !torch.vtensor<[4],si64>) -> !torch.vtensor<[],f32>
    exec.output "loss", %loss : !torch.vtensor<[],f32>
    %dh, %dw, %db = exec.launch @s1_B_mb0(%h, %w, %loss) on %compute stage 1 pass "B" microbatch 0 : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16,16],f32>, !torch.vtensor<[],f32>) -> (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16,16],f32>, !torch.vtensor<[16],f32>)
    exec.free %h, %labels, %loss : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4],si64>, !torch.vtensor<[],f32>
    %grads_ready = exec.event_record %compute
    exec.event_wait %comm, %grads_ready
    exec.record_stream %dh, %comm : !torch.vtensor<[4,16],f32>
    exec.record_stream %dw, %comm : !torch.vtensor<[16,16],f32>
    exec.record_stream %db, %comm : !torch.vtensor<[16],f32>
    %send_dh = exec.send %dh to 0 group @pp_0 tag 1 on %comm : !torch.vtensor<[4,16],f32>
    %sync, %dw_avg, %db_avg = exec.all_reduce %dw, %db group @dp_1 avg on %comm : !torch.vtensor<[16,16],f32>, !torch.vtensor<[16],f32>
    exec.wait %send_dh, %sync on %comm
    exec.free %dh : !torch.vtensor<[4,16],f32>
    exec.set_state "head.weight", %dw_avg : !torch.vtensor<[16,16],f32>
    exec.set_state "head.bias", %db_avg : !torch.vtensor<[16],f32>
    exec.launch @s1_update() on %compute stage 1 pass "update" : () -> ()
  }
}"""


def test_rank_program_round_trip(ctx: Context):
    module = parse(ctx, LAST_STAGE)
    assert show(module) == LAST_STAGE
    generic = show(module, generic=True)
    assert show(parse(ctx, generic), generic=True) == generic
    assert show(parse(ctx, generic)) == LAST_STAGE


def test_python_builders_make_the_same_ir(ctx: Context):
    grad = ValueTensorType([16], f32)
    comm = StreamOp("comm", priority=-1)
    param = StateOp("head.bias", grad)
    sync = AllReduceOp([param.output], "dp_1", comm.stream, ReductionKind.AVG)
    body = Block([comm, param, sync, WaitOp([sync.work], comm.stream)])
    module = ModuleOp([ProcessGroupOp("dp_1", [1, 3]), ProgramOp("rank1", 1, 4, Region(body))])
    module.verify()
    assert show(module) == show(
        parse(
            ctx,
            """\
exec.process_group @dp_1 ranks [1, 3]
exec.program @rank1 rank 1 world 4 {
  %0 = exec.stream "comm" priority -1
  %1 = exec.state "head.bias" : !torch.vtensor<[16],f32>
  %2, %3 = exec.all_reduce %1 group @dp_1 avg on %0 : !torch.vtensor<[16],f32>
  exec.wait %2 on %0
}""",
        )
    )


# ---------------------------------------------------------------- one op at a time

# Each op below is parsed as the last step of this program; `{op}` is one line.
FRAME = """\
exec.process_group @pp_0 ranks [0, 1]
exec.process_group @dp_1 ranks [1, 3]
exec.program @rank1 rank 1 world 4 {{
  %s = exec.stream "comm"
  %e = exec.event_record %s
  %x = exec.state "x" : !torch.vtensor<[4,16],f32>
  %b = exec.state "b" : !torch.vtensor<[16],f32>
  %z = exec.state "z" : !torch.vtensor<[3],f32>
  %v = exec.state "v" : !torch.vtensor<[4,16],f32>
  %w0, %h = exec.recv from 0 group @pp_0 tag 0 on %s : !torch.vtensor<[4,16],f32>
  %w1 = exec.send %v to 0 group @pp_0 tag 1 on %s : !torch.vtensor<[4,16],f32>
  {op}
}}"""


def last_op(ctx: Context, op_text: str) -> Operation:
    module = parse(ctx, FRAME.format(op=op_text))
    program = module.body.block.last_op
    assert isinstance(program, ProgramOp)
    op = program.body.block.last_op
    assert op is not None
    return op


# (custom form, generic form) of every op that lives in a program.
OPS = [
    (
        '%c = exec.stream "compute"',
        '%c = "exec.stream"() <{name = "compute"}> : () -> !exec.stream',
    ),
    (
        '%c = exec.stream "compute" priority -1',
        '%c = "exec.stream"() <{name = "compute", priority = -1 : i64}> : () -> !exec.stream',
    ),
    (
        "%e2 = exec.event_record %s",
        '%e2 = "exec.event_record"(%s) : (!exec.stream) -> !exec.event',
    ),
    (
        "exec.event_wait %s, %e",
        '"exec.event_wait"(%s, %e) : (!exec.stream, !exec.event) -> ()',
    ),
    (
        '%y = exec.launch @s1_F_mb0(%x, %b) on %s stage 1 pass "F" microbatch 0 : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>) -> !torch.vtensor<[4,16],f32>',
        '%y = "exec.launch"(%x, %b, %s) <{callee = @s1_F_mb0, stage = 1 : i64, pass_kind = "F", microbatch = 0 : i64}> : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !exec.stream) -> !torch.vtensor<[4,16],f32>',
    ),
    (
        '%dx, %db = exec.launch @s1_B_mb3(%x) on %s stage 1 pass "B" microbatch 3 : (!torch.vtensor<[4,16],f32>) -> (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>)',
        '%dx, %db = "exec.launch"(%x, %s) <{callee = @s1_B_mb3, stage = 1 : i64, pass_kind = "B", microbatch = 3 : i64}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>)',
    ),
    (
        'exec.launch @s1_update() on %s stage 1 pass "update" : () -> ()',
        '"exec.launch"(%s) <{callee = @s1_update, stage = 1 : i64, pass_kind = "update"}> : (!exec.stream) -> ()',
    ),
    (
        "%ar, %xr = exec.all_reduce %x group @dp_1 max on %s : !torch.vtensor<[4,16],f32>",
        '%ar, %xr = "exec.all_reduce"(%x, %s) <{group = @dp_1, reduction = #exec<reduction max>}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[4,16],f32>)',
    ),
    (
        "%ar, %xr, %br, %zr = exec.all_reduce %x, %b, %z group @dp_1 sum on %s : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !torch.vtensor<[3],f32>",
        '%ar, %xr, %br, %zr = "exec.all_reduce"(%x, %b, %z, %s) <{group = @dp_1, reduction = #exec<reduction sum>}> : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !torch.vtensor<[3],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !torch.vtensor<[3],f32>)',
    ),
    (
        "%ag, %full = exec.all_gather %x group @dp_1 dim 0 on %s : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,16],f32>",
        '%ag, %full = "exec.all_gather"(%x, %s) <{group = @dp_1, dim = 0 : i64}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[8,16],f32>)',
    ),
    (
        "%rs, %part = exec.reduce_scatter %x group @dp_1 dim 1 avg on %s : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[4,8],f32>",
        '%rs, %part = "exec.reduce_scatter"(%x, %s) <{group = @dp_1, dim = 1 : i64, reduction = #exec<reduction avg>}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[4,8],f32>)',
    ),
    (
        "%a2a, %routed = exec.all_to_all %x group @dp_1 split 0 concat 1 on %s : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[2,32],f32>",
        '%a2a, %routed = "exec.all_to_all"(%x, %s) <{group = @dp_1, split_dim = 0 : i64, concat_dim = 1 : i64}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[2,32],f32>)',
    ),
    (
        "%bc, %xb = exec.broadcast %x group @dp_1 src 3 on %s : !torch.vtensor<[4,16],f32>",
        '%bc, %xb = "exec.broadcast"(%x, %s) <{group = @dp_1, src = 3 : i64}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[4,16],f32>)',
    ),
    (
        "%sent = exec.send %x to 0 group @pp_0 tag 7 on %s : !torch.vtensor<[4,16],f32>",
        '%sent = "exec.send"(%x, %s) <{peer = 0 : i64, group = @pp_0, tag = 7 : i64}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> !exec.work',
    ),
    (
        "%got, %g = exec.recv from 0 group @pp_0 tag 7 on %s : !torch.vtensor<[4,16],f32>",
        '%got, %g = "exec.recv"(%s) <{peer = 0 : i64, group = @pp_0, tag = 7 : i64}> : (!exec.stream) -> (!exec.work, !torch.vtensor<[4,16],f32>)',
    ),
    (
        "%bp, %g = exec.batch_p2p group @pp_0 on %s [send %x to 0 : !torch.vtensor<[4,16],f32>, send %b to 0 : !torch.vtensor<[16],f32>, recv from 0 : !torch.vtensor<[4,16],f32>]",
        '%bp, %g = "exec.batch_p2p"(%x, %b, %s) <{group = @pp_0, send_peers = array<i64: 0, 0>, recv_peers = array<i64: 0>}> : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[4,16],f32>)',
    ),
    (
        "%bp = exec.batch_p2p group @pp_0 on %s [send %x to 0 : !torch.vtensor<[4,16],f32>]",
        '%bp = "exec.batch_p2p"(%x, %s) <{group = @pp_0, send_peers = array<i64: 0>, recv_peers = array<i64>}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> !exec.work',
    ),
    (
        "%bp, %g = exec.batch_p2p group @pp_0 on %s [recv from 0 : !torch.vtensor<[4,16],f32>]",
        '%bp, %g = "exec.batch_p2p"(%s) <{group = @pp_0, send_peers = array<i64>, recv_peers = array<i64: 0>}> : (!exec.stream) -> (!exec.work, !torch.vtensor<[4,16],f32>)',
    ),
    (
        "exec.wait %w0 on %s",
        '"exec.wait"(%w0, %s) : (!exec.work, !exec.stream) -> ()',
    ),
    (
        "exec.wait %w0, %w1 on %s",
        '"exec.wait"(%w0, %w1, %s) : (!exec.work, !exec.work, !exec.stream) -> ()',
    ),
    (
        "exec.record_stream %x, %s : !torch.vtensor<[4,16],f32>",
        '"exec.record_stream"(%x, %s) : (!torch.vtensor<[4,16],f32>, !exec.stream) -> ()',
    ),
    (
        "exec.free %x, %b : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>",
        '"exec.free"(%x, %b) : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>) -> ()',
    ),
    (
        '%tokens = exec.load_input "tokens" microbatch 2 : !torch.vtensor<[2,128],si64>',
        '%tokens = "exec.load_input"() <{name = "tokens", microbatch = 2 : i64}> : () -> !torch.vtensor<[2,128],si64>',
    ),
    (
        '%qkv = exec.state "blocks.0.attn.qkv.weight" : !torch.vtensor<[192,64],f32>',
        '%qkv = "exec.state"() <{name = "blocks.0.attn.qkv.weight"}> : () -> !torch.vtensor<[192,64],f32>',
    ),
    (
        'exec.set_state "x", %x : !torch.vtensor<[4,16],f32>',
        '"exec.set_state"(%x) <{name = "x"}> : (!torch.vtensor<[4,16],f32>) -> ()',
    ),
    (
        'exec.output "loss", %z : !torch.vtensor<[3],f32>',
        '"exec.output"(%z) <{name = "loss"}> : (!torch.vtensor<[3],f32>) -> ()',
    ),
]


@pytest.mark.parametrize(
    ("custom", "generic"), OPS, ids=[re.search(r"exec\.\w+", c).group() for c, _ in OPS]
)
def test_op_round_trip(ctx: Context, custom: str, generic: str):
    from_custom = last_op(ctx, custom)
    assert show(from_custom) == custom
    assert show(from_custom, generic=True) == generic
    from_generic = last_op(ctx, generic)
    assert show(from_generic, generic=True) == generic
    assert show(from_generic) == custom


@pytest.mark.parametrize(
    "text",
    [
        "!exec.stream",
        "!exec.event",
        "!exec.work",
        "#exec<reduction sum>",
        "#exec<reduction avg>",
        "#exec<reduction max>",
    ],
)
def test_attribute_round_trip(ctx: Context, text: str):
    assert str(Parser(ctx, text).parse_attribute()) == text


# ---------------------------------------------------------------- verifiers


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            'exec.program @rank4 rank 4 world 4 {\n  %s = exec.stream "compute"\n}',
            "exec.program @rank4: rank 4 is outside world size 4",
        ),
        (
            'exec.program @rank0 rank -1 world 4 {\n  %s = exec.stream "compute"\n}',
            "exec.program @rank0: rank -1 is outside world size 4",
        ),
        (
            'exec.program @rank0 rank 0 world 1 {\n  %a = exec.stream "comm"\n  %b = exec.stream "comm"\n}',
            'exec.program @rank0: stream "comm" is created twice',
        ),
        ("exec.process_group @dp_0 ranks []", "exec.process_group @dp_0: a group needs a rank"),
        (
            "exec.process_group @dp_0 ranks [0, 2, 0]",
            "exec.process_group @dp_0: ranks [0, 2, 0] repeat a rank",
        ),
        (
            "exec.process_group @dp_0 ranks [-1, 2]",
            "exec.process_group @dp_0: ranks [-1, 2] hold a negative rank",
        ),
    ],
)
def test_module_level_verifiers(ctx: Context, module: str, message: str):
    with pytest.raises(VerifyException, match=re.escape(message)):
        parse(ctx, module)


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (
            '%c = exec.stream "compute" priority -2',
            'exec.stream "compute": priority -2 is below -1, the highest priority',
        ),
        ('%c = exec.stream ""', "exec.stream: the stream name must not be empty"),
        (
            'exec.launch @s1_X_mb0(%x) on %s stage 1 pass "X" microbatch 0 : (!torch.vtensor<[4,16],f32>) -> ()',
            'exec.launch @s1_X_mb0: pass "X" is not one of F, B, W, update',
        ),
        (
            'exec.launch @s1_update() on %s stage 1 pass "update" microbatch 0 : () -> ()',
            "exec.launch @s1_update: an update covers all microbatches; drop `microbatch`",
        ),
        (
            'exec.launch @s1_W() on %s stage 1 pass "W" : () -> ()',
            'exec.launch @s1_W: pass "W" needs a microbatch',
        ),
        (
            'exec.launch @f() on %s stage -1 pass "F" microbatch 0 : () -> ()',
            "exec.launch: stage must be >= 0, got -1",
        ),
        (
            "%ar, %xr = exec.all_reduce %x group @tp_0 sum on %s : !torch.vtensor<[4,16],f32>",
            "exec.all_reduce: @tp_0 does not name an exec.process_group",
        ),
        (
            "%ar, %xr = exec.all_reduce %x group @rank1 sum on %s : !torch.vtensor<[4,16],f32>",
            "exec.all_reduce: @rank1 does not name an exec.process_group",
        ),
        (
            '%ar = "exec.all_reduce"(%s) <{group = @dp_1, reduction = #exec<reduction sum>}> : (!exec.stream) -> !exec.work',
            "exec.all_reduce: a bucket needs at least one tensor",
        ),
        (
            '%ar, %xr = "exec.all_reduce"(%x, %b, %s) <{group = @dp_1, reduction = #exec<reduction sum>}> : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[4,16],f32>)',
            "exec.all_reduce: 2 tensors in but 1 out; a bucket returns one result per operand",
        ),
        (
            '%ar, %xr, %br = "exec.all_reduce"(%x, %b, %s) <{group = @dp_1, reduction = #exec<reduction sum>}> : (!torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[4,16],f32>, !torch.vtensor<[3],f32>)',
            "exec.all_reduce: bucket entry 1 is !torch.vtensor<[16],f32> in but !torch.vtensor<[3],f32> out",
        ),
        (
            "%ag, %full = exec.all_gather %x group @dp_1 dim 2 on %s : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,16],f32>",
            "exec.all_gather: dim 2 is out of range for a tensor of rank 2",
        ),
        (
            "%ag, %full = exec.all_gather %x group @dp_1 dim 1 on %s : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,16],f32>",
            "exec.all_gather: result shape [8, 16] should be [4, 32]",
        ),
        (
            "%ag, %full = exec.all_gather %x group @dp_1 dim 0 on %s : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[8,16],bf16>",
            "exec.all_gather: result dtype bf16 differs from operand dtype f32",
        ),
        (
            "%rs, %part = exec.reduce_scatter %z group @dp_1 dim 0 sum on %s : !torch.vtensor<[3],f32> -> !torch.vtensor<[1],f32>",
            "exec.reduce_scatter: dimension 0 of size 3 does not split evenly across 2 ranks",
        ),
        (
            "%a2a, %routed = exec.all_to_all %x group @dp_1 split 0 concat 2 on %s : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[2,32],f32>",
            "exec.all_to_all: concat dim 2 is out of range for a tensor of rank 2",
        ),
        (
            "%bc, %xb = exec.broadcast %x group @dp_1 src 0 on %s : !torch.vtensor<[4,16],f32>",
            "exec.broadcast: source rank 0 is not in process group @dp_1 with ranks [1, 3]",
        ),
        (
            '%bc, %xb = "exec.broadcast"(%x, %s) <{group = @dp_1, src = 1 : i64}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> (!exec.work, !torch.vtensor<[3],f32>)',
            "exec.broadcast: the result must have the operand's type",
        ),
        (
            "%sent = exec.send %x to 1 group @pp_0 tag 0 on %s : !torch.vtensor<[4,16],f32>",
            "exec.send: rank 1 cannot transfer to itself",
        ),
        (
            "%sent = exec.send %x to 3 group @pp_0 tag 0 on %s : !torch.vtensor<[4,16],f32>",
            "exec.send: peer rank 3 is not in process group @pp_0 with ranks [0, 1]",
        ),
        (
            "%sent = exec.send %x to 0 group @pp_0 tag -1 on %s : !torch.vtensor<[4,16],f32>",
            "exec.send: tag must be >= 0, got -1",
        ),
        (
            "%got, %g = exec.recv from 2 group @pp_0 tag 0 on %s : !torch.vtensor<[4,16],f32>",
            "exec.recv: peer rank 2 is not in process group @pp_0 with ranks [0, 1]",
        ),
        ('"exec.wait"(%s) : (!exec.stream) -> ()', "exec.wait: needs at least one work handle"),
        (
            '%bp = "exec.batch_p2p"(%s) <{group = @pp_0, send_peers = array<i64>, recv_peers = array<i64>}> : (!exec.stream) -> !exec.work',
            "exec.batch_p2p: a batch needs at least one send or receive",
        ),
        (
            "%bp = exec.batch_p2p group @pp_0 on %s [send %x to 1 : !torch.vtensor<[4,16],f32>]",
            "exec.batch_p2p: rank 1 cannot transfer to itself",
        ),
        (
            "%bp, %g = exec.batch_p2p group @pp_0 on %s [recv from 3 : !torch.vtensor<[4,16],f32>]",
            "exec.batch_p2p: peer rank 3 is not in process group @pp_0 with ranks [0, 1]",
        ),
        (
            '%bp = "exec.batch_p2p"(%x, %s) <{group = @pp_0, send_peers = array<i64>, recv_peers = array<i64>}> : (!torch.vtensor<[4,16],f32>, !exec.stream) -> !exec.work',
            "exec.batch_p2p: 1 tensors to send but 0 send peers",
        ),
        ('"exec.free"() : () -> ()', "exec.free: needs at least one buffer"),
        (
            '%t = exec.load_input "tokens" microbatch -1 : !torch.vtensor<[2,128],si64>',
            "exec.load_input: microbatch must be >= 0, got -1",
        ),
        (
            '%t = exec.load_input "" microbatch 0 : !torch.vtensor<[2,128],si64>',
            "exec.load_input: the input name must not be empty",
        ),
        (
            '%p = exec.state "" : !torch.vtensor<[4],f32>',
            "exec.state: the state name must not be empty",
        ),
        (
            'exec.set_state "", %x : !torch.vtensor<[4,16],f32>',
            "exec.set_state: the state name must not be empty",
        ),
        (
            'exec.output "", %x : !torch.vtensor<[4,16],f32>',
            "exec.output: the output name must not be empty",
        ),
    ],
)
def test_op_verifiers(ctx: Context, op: str, message: str):
    with pytest.raises(VerifyException, match=re.escape(message)):
        last_op(ctx, op)


def test_collective_from_a_rank_outside_the_group(ctx: Context):
    text = FRAME.format(
        op="%ar, %xr = exec.all_reduce %x group @dp_0 sum on %s : !torch.vtensor<[4,16],f32>"
    ).replace("@dp_1 ranks [1, 3]", "@dp_0 ranks [0, 2]")
    with pytest.raises(
        VerifyException,
        match=re.escape(
            "exec.all_reduce: rank 1 (program @rank1) is not a member of "
            "process group @dp_0 with ranks [0, 2]"
        ),
    ):
        parse(ctx, text)
