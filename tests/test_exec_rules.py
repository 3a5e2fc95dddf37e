"""The communication rules of exec programs, which make them run under NCCL as under gloo.

Each test hands in IR text: a correct program that is accepted, and the same
program broken in one place, rejected with a message naming the op. Rules that
one program shows are checked by `exec.program`'s verifier (so at every pass
boundary); rules across programs by the `verify-exec` pass.
"""

from __future__ import annotations

import re

import pytest
from xdsl.context import Context
from xdsl.dialects.builtin import Builtin, ModuleOp
from xdsl.parser import Parser
from xdsl.utils.exceptions import VerifyException

from piperc.dialects.exec import Exec
from piperc.dialects.torch import Torch
from piperc.errors import PassError
from piperc.passes import PASSES
from piperc.passes.verify_exec import VerifyExecPass, simulate


@pytest.fixture(scope="module")
def ctx() -> Context:
    ctx = Context()
    for d in (Builtin, Torch, Exec):
        ctx.load_dialect(d)
    return ctx


def parse(ctx: Context, text: str) -> ModuleOp:
    module = Parser(ctx, text).parse_module()
    module.verify()
    return module


def verify_exec(ctx: Context, text: str) -> None:
    VerifyExecPass().apply(ctx, parse(ctx, text))


def broken(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


A = "!torch.vtensor<[4,16],f32>"
B = "!torch.vtensor<[16],f32>"

# ---------------------------------------------------------------- one program

# Stage 0 of a pipeline: forward on "compute", send the activation on "comm",
# receive its gradient, backward. Ops are numbered from 0 in the program.
STAGE0 = f"""\
exec.process_group @pp_0 ranks [0, 1]
exec.program @rank0 rank 0 world 2 {{
  %compute = exec.stream "compute"
  %comm = exec.stream "comm"
  %x = exec.load_input "x" microbatch 0 : {A}
  %a = exec.launch @s0_F_mb0(%x) on %compute stage 0 pass "F" microbatch 0 : ({A}) -> {A}
  %done = exec.event_record %compute
  exec.event_wait %comm, %done
  exec.record_stream %a, %comm : {A}
  %sent = exec.send %a to 1 group @pp_0 tag 0 on %comm : {A}
  %got, %g = exec.recv from 1 group @pp_0 tag 1 on %comm : {A}
  exec.wait %sent, %got on %compute
  exec.free %a : {A}
  exec.record_stream %g, %compute : {A}
  exec.launch @s0_B_mb0(%g) on %compute stage 0 pass "B" microbatch 0 : ({A}) -> ()
  exec.free %g : {A}
}}"""


def test_a_correct_program_is_accepted(ctx: Context):
    parse(ctx, STAGE0)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        pytest.param(
            f"  exec.wait %sent, %got on %compute\n  exec.free %a : {A}\n",
            f"  exec.free %a : {A}\n  exec.wait %sent, %got on %compute\n",
            "exec.free of %a at op #9 comes before the exec.wait of the exec.send at op #7 "
            "that reads it",
            id="free-before-wait",
        ),
        pytest.param(
            f"  exec.free %g : {A}\n",
            f"  exec.free %g : {A}\n  exec.free %g : {A}\n",
            "exec.free at op #14 frees %g again; it was freed at op #13",
            id="double-free",
        ),
        pytest.param(
            f"  exec.record_stream %a, %comm : {A}\n",
            "",
            'exec.send at op #6 reads %a on stream "comm", but %a is made on stream "compute" '
            "by the exec.launch at op #3; add exec.record_stream %a, %comm before op #6",
            id="cross-stream-read-without-record",
        ),
        pytest.param(
            "  exec.event_wait %comm, %done\n",
            "",
            'exec.send at op #6 reads %a on stream "comm", but %a is made on stream "compute" '
            'by the exec.launch at op #3 and nothing orders "comm" after it',
            id="cross-stream-read-without-event",
        ),
        pytest.param(
            "  exec.wait %sent, %got on %compute\n",
            "  exec.wait %sent, %got on %comm\n",
            'exec.launch at op #12 reads %g on stream "compute", but %g is made on stream "comm" '
            'by the exec.recv at op #8 and nothing orders "compute" after it',
            id="recv-waited-on-another-stream",
        ),
        pytest.param(
            "  exec.wait %sent, %got on %compute\n",
            "  exec.wait %sent on %compute\n",
            "exec.launch at op #12 reads %g before the exec.wait of the exec.recv at op #8 "
            "that writes it",
            id="recv-read-before-wait",
        ),
        pytest.param(
            "  exec.wait %sent, %got on %compute\n",
            "  exec.wait %sent, %got on %compute\n  exec.wait %got on %compute\n",
            "exec.wait at op #10 waits for %got again; it was waited at op #9",
            id="waited-twice",
        ),
        pytest.param(
            f"  exec.free %g : {A}\n",
            f"  exec.free %g : {A}\n  exec.output \"g\", %g : {A}\n",
            "exec.output at op #14 reads %g after its exec.free at op #13",
            id="use-after-free",
        ),
    ],
)
def test_a_broken_program_is_rejected_naming_the_op(ctx: Context, old: str, new: str, message: str):
    with pytest.raises(VerifyException, match=re.escape(message)):
        parse(ctx, broken(STAGE0, old, new))


# ---------------------------------------------------------------- across programs


def two_ranks(rank0: str, rank1: str, groups: str = "exec.process_group @pp_0 ranks [0, 1]") -> str:
    def program(rank: int, body: str) -> str:
        lines = "\n".join("  " + line for line in body.strip().splitlines())
        return f"exec.program @rank{rank} rank {rank} world 2 {{\n{lines}\n}}"

    return f"{groups}\n{program(0, rank0)}\n{program(1, rank1)}"


SENDS_A_THEN_B = f"""
%comm = exec.stream "comm"
%a = exec.state "a" : {A}
%b = exec.state "b" : {B}
%w0 = exec.send %a to 1 group @pp_0 tag 0 on %comm : {A}
%w1 = exec.send %b to 1 group @pp_0 tag 1 on %comm : {B}
exec.wait %w0, %w1 on %comm
"""

RECEIVES_A_THEN_B = f"""
%comm = exec.stream "comm"
%w0, %a = exec.recv from 0 group @pp_0 tag 0 on %comm : {A}
%w1, %b = exec.recv from 0 group @pp_0 tag 1 on %comm : {B}
exec.wait %w0, %w1 on %comm
"""


def test_sends_and_receives_in_one_order_are_accepted(ctx: Context):
    verify_exec(ctx, two_ranks(SENDS_A_THEN_B, RECEIVES_A_THEN_B))


def test_receives_in_another_order_than_the_sends_are_rejected(ctx: Context):
    swapped = broken(
        RECEIVES_A_THEN_B,
        f"%w0, %a = exec.recv from 0 group @pp_0 tag 0 on %comm : {A}\n"
        f"%w1, %b = exec.recv from 0 group @pp_0 tag 1 on %comm : {B}\n",
        f"%w1, %b = exec.recv from 0 group @pp_0 tag 1 on %comm : {B}\n"
        f"%w0, %a = exec.recv from 0 group @pp_0 tag 0 on %comm : {A}\n",
    )
    with pytest.raises(
        PassError,
        match=re.escape(
            f"verify-exec: the exec.send at op #3 of @rank0 is send #0 to rank 1 on @pp_0 ({A}), "
            f"so it is matched by the exec.recv at op #1 of @rank1, which receives {B}; "
            "point-to-point transfers match in issue order"
        ),
    ):
        verify_exec(ctx, two_ranks(SENDS_A_THEN_B, swapped))


def test_equal_types_in_another_order_are_caught_by_their_tags(ctx: Context):
    sends = SENDS_A_THEN_B.replace(B, A).replace('"b"', '"b2"')
    receives = RECEIVES_A_THEN_B.replace(B, A).replace("tag 0", "tag 9").replace("tag 1", "tag 0")
    with pytest.raises(
        PassError,
        match=re.escape(
            "verify-exec: the exec.send at op #3 of @rank0 is send #0 to rank 1 on @pp_0 (tag 0), "
            "so it is matched by the exec.recv at op #1 of @rank1, which expects tag 9"
        ),
    ):
        verify_exec(ctx, two_ranks(sends, receives))


def test_a_send_nobody_receives_is_rejected(ctx: Context):
    one_recv = RECEIVES_A_THEN_B.replace(
        f"%w1, %b = exec.recv from 0 group @pp_0 tag 1 on %comm : {B}\n", ""
    ).replace("exec.wait %w0, %w1", "exec.wait %w0")
    with pytest.raises(
        PassError,
        match=re.escape(
            "verify-exec: the exec.send at op #4 of @rank0 is send #1 to rank 1 on @pp_0, "
            "but rank 1 receives only 1 tensor(s) from rank 0 there"
        ),
    ):
        verify_exec(ctx, two_ranks(SENDS_A_THEN_B, one_recv))


# Both ranks send their activation and then receive the peer's: on one stream,
# with a send that waits for its receive, each send waits for a receive queued
# behind the other rank's send (the forward-send/backward-recv crossing of 1F1B).
EXCHANGE = f"""
%comm = exec.stream "comm"
%mine = exec.state "mine" : {A}
%sent = exec.send %mine to PEER group @pp_0 tag 0 on %comm : {A}
%got, %theirs = exec.recv from PEER group @pp_0 tag 0 on %comm : {A}
exec.wait %sent, %got on %comm
"""

BATCHED_EXCHANGE = f"""
%comm = exec.stream "comm"
%mine = exec.state "mine" : {A}
%both, %theirs = exec.batch_p2p group @pp_0 on %comm [send %mine to PEER : {A}, recv from PEER : {A}]
exec.wait %both on %comm
"""


def test_send_then_recv_on_both_ranks_deadlocks(ctx: Context):
    module = parse(ctx, two_ranks(EXCHANGE.replace("PEER", "1"), EXCHANGE.replace("PEER", "0")))
    with pytest.raises(
        PassError,
        match=re.escape(
            "verify-exec: deadlock: "
            'rank 0: its host waits at exec.wait at op #4 (for the exec.send at op #2, the exec.recv at op #3), '
            'stream "comm" is stuck at exec.send at op #2, waiting for rank 1 to start its exec.recv at op #3; '
            'rank 1: its host waits at exec.wait at op #4 (for the exec.send at op #2, the exec.recv at op #3), '
            'stream "comm" is stuck at exec.send at op #2, waiting for rank 0 to start its exec.recv at op #3'
        ),
    ):
        simulate(module)


def test_the_same_exchange_as_one_batch_per_rank_runs(ctx: Context):
    text = two_ranks(BATCHED_EXCHANGE.replace("PEER", "1"), BATCHED_EXCHANGE.replace("PEER", "0"))
    simulate(parse(ctx, text))
    verify_exec(ctx, text)


def test_a_batch_on_one_side_pairs_with_plain_transfers_on_the_other(ctx: Context):
    verify_exec(ctx, two_ranks(BATCHED_EXCHANGE.replace("PEER", "1"), EXCHANGE.replace("PEER", "0")))


# Rank 0 receives on "comm", computes on "compute" and sends the result on "out";
# rank 1 answers only after it got that result. Making "compute" wait for the
# receive (an event) closes a cycle.
WAITS_FOR_AN_EVENT = f"""
%compute = exec.stream "compute"
%comm = exec.stream "comm"
%out = exec.stream "out"
%mine = exec.state "mine" : {A}
%got, %g = exec.recv from 1 group @pp_0 tag 1 on %comm : {A}
%arrived = exec.event_record %comm
exec.event_wait %compute, %arrived
%y = exec.launch @f(%mine) on %compute stage 0 pass "F" microbatch 0 : ({A}) -> {A}
%done = exec.event_record %compute
exec.event_wait %out, %done
exec.record_stream %y, %out : {A}
%sent = exec.send %y to 1 group @pp_0 tag 0 on %out : {A}
exec.wait %got, %sent on %out
"""

ANSWERS_AFTER_THE_RESULT = f"""
%comm = exec.stream "comm"
%w0, %y = exec.recv from 0 group @pp_0 tag 0 on %comm : {A}
exec.wait %w0 on %comm
%g = exec.state "g" : {A}
%w1 = exec.send %g to 0 group @pp_0 tag 1 on %comm : {A}
exec.wait %w1 on %comm
"""


def test_an_event_wait_that_closes_a_cycle_deadlocks(ctx: Context):
    free_running = broken(WAITS_FOR_AN_EVENT, "exec.event_wait %compute, %arrived\n", "")
    verify_exec(ctx, two_ranks(free_running, ANSWERS_AFTER_THE_RESULT))
    with pytest.raises(
        PassError,
        match=re.escape(
            "verify-exec: deadlock: "
            "rank 0: its host waits at exec.wait at op #12 (for the exec.recv at op #4, the exec.send at op #11), "
            'stream "comm" is stuck at exec.recv at op #4, waiting for rank 1 to start its exec.send at op #4, '
            'stream "compute" is stuck at exec.event_wait at op #6, waiting for the exec.event_record at op #5, '
            'stream "out" is stuck at exec.event_wait at op #9, waiting for the exec.event_record at op #8; '
            "rank 1: its host waits at exec.wait at op #2 (for the exec.recv at op #1), "
            'stream "comm" is stuck at exec.recv at op #1, waiting for rank 0 to start its exec.send at op #11'
        ),
    ):
        verify_exec(ctx, two_ranks(WAITS_FOR_AN_EVENT, ANSWERS_AFTER_THE_RESULT))


COLLECTIVES = f"""
%comm = exec.stream "comm"
%a = exec.state "a" : {A}
%b = exec.state "b" : {B}
%w0, %ra = exec.all_reduce %a group @dp_0 sum on %comm : {A}
%w1, %rb = exec.all_reduce %b group @dp_0 sum on %comm : {B}
exec.wait %w0, %w1 on %comm
"""


def test_collectives_in_one_order_run_and_in_two_orders_are_rejected(ctx: Context):
    groups = "exec.process_group @dp_0 ranks [0, 1]"
    verify_exec(ctx, two_ranks(COLLECTIVES, COLLECTIVES, groups))
    swapped = broken(
        COLLECTIVES,
        f"%w0, %ra = exec.all_reduce %a group @dp_0 sum on %comm : {A}\n"
        f"%w1, %rb = exec.all_reduce %b group @dp_0 sum on %comm : {B}\n",
        f"%w1, %rb = exec.all_reduce %b group @dp_0 sum on %comm : {B}\n"
        f"%w0, %ra = exec.all_reduce %a group @dp_0 sum on %comm : {A}\n",
    )
    with pytest.raises(
        PassError,
        match=re.escape(
            f"verify-exec: collective #0 on @dp_0 is exec.all_reduce "
            f"{{group = @dp_0, reduction = #exec<reduction sum>}} ({B}) at op #3 of @rank1 but "
            f"exec.all_reduce {{group = @dp_0, reduction = #exec<reduction sum>}} ({A}) at op #3 "
            f"of @rank0; every member of a group issues its collectives in the same order"
        ),
    ):
        verify_exec(ctx, two_ranks(COLLECTIVES, swapped, groups))


def test_verify_exec_is_a_registered_pass():
    assert PASSES["verify-exec"]() is VerifyExecPass
