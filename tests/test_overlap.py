"""Overlap groups: two actions of one device that run together on two compute streams
(issue 8, DualPipeV's F of one stage next to B of another).

A schedule's overlap group (`par.device 0 [...] overlap [[0F1, 3B0]]`, written `0F1+3B0`
in a table) is one step of its device: expand-schedule receives what the group reads in
the batch before it, writes its tasks back to back, each marked with its lane (its place
in the group), and sends what they make after the group; lower-to-exec launches lane k > 0
on a stream `compute<k>` and orders every cross-stream read with an event. Then a real
multi-process run in V placement, bit-identical to the same rows without the group.
"""

import re

import pytest
import torch
from xdsl.utils.exceptions import VerifyException

import piperc
from piperc import schedules
from piperc.errors import PassError, StrategyError
from piperc.examples import gpt
from piperc.ir import make_context, parse_module
from piperc.passes.schedule import parse_table, table_text
from tests.shared import check_exact, compile_, device_param, setup
from tests.test_interleaved import FOUR_BLOCKS
from tests.test_passes_ir import ir, section
from tests.test_passes_ir import run as run_ir

# V placement on two devices: device 0 holds stages 0 and 3, device 1 stages 1 and 2. On
# device 0, stage 0's second forward overlaps stage 3's first backward.
V_TABLE = "0F0 3F0 0F1+3B0 3F1 3B1 0B0 0B1;1F0 2F0 1F1 2B0 2F1 1B0 2B1 1B1"
ADAMW = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)
STAGED = ('mesh{shape="pp=2"},pipeline-split{stages=4},outline-stages,optimizer{lr=0.1},microbatch{count=2},'
          'schedule{table="%s"},expand-schedule')


TYPES = {"T": "!torch.vtensor<[2,4],f32>", "W": "!torch.vtensor<[4,4],f32>", "L": "!torch.vtensor<[],f32>"}


def typed(text: str) -> str:
    """IR text written with T (activations), W (weights and their gradients) and L (losses)
    for its tensor types."""
    return re.sub(r"(?<![\w.@%\"])(?<!pass )([TWL])(?!\w)", lambda m: TYPES[m[1]], ir(text))


def between(text: str, first: str, last: str) -> str:
    """The lines of `text` from the first one holding `first` through the next one holding
    `last`, dedented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if last in lines[i])
    return ir("\n".join(lines[start : end + 1]))


def run(table: str, lower: bool = False) -> str:
    return run_ir(STAGED % table + (",lower-to-exec,verify-exec" if lower else ""), FOUR_BLOCKS)


def test_schedule_writes_the_tables_overlap_group():
    assert section(run(V_TABLE), "par.schedule @schedule") == ir("""
        par.schedule @schedule mesh @mesh axis "pp" {
          par.device 0 [0F0, 3F0, 0F1, 3B0, 3F1, 3B1, 0B0, 0B1] overlap [[0F1, 3B0]]
          par.device 1 [1F0, 2F0, 1F1, 2B0, 2F1, 1B0, 2B1, 1B1]
        }
    """)


def test_expand_schedule_marks_the_lanes_of_a_group_and_sends_after_it():
    # 0F1 (lane 0) and 3B0 (lane 1) follow each other with no transfer between them; what
    # both make leaves in one batch after the group, with the receive 3F1 needs. Nothing
    # outside the group has a lane.
    assert section(run(V_TABLE), "par.program @device0") == typed("""
        par.program @device0 device 0 {
          %0 = par.input 0 microbatch 0 layout #par.sharding<[[], []]> : T
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : W
          %h0 = par.task @s0_F stage 0 pass F microbatch 0 (%0, %w0) : (T, W) -> T
          par.send %h0 to 1 "h0 mb0" batch 0 : T
          %h2 = par.recv from 1 "h2 mb0" batch 0 : T
          %w3 = par.state "blocks.3.w" layout #par.sharding<[[], []]> : W
          %loss, %1 = par.task @s3_F stage 3 pass F microbatch 0 (%h2, %w3) : (T, W) -> (L, L)
          %2 = par.input 0 microbatch 1 layout #par.sharding<[[], []]> : T
          %h0_1 = par.task @s0_F stage 0 pass F microbatch 1 lane 0 (%2, %w0) : (T, W) -> T
          %g2, %dw3 = par.task @s3_B stage 3 pass B microbatch 0 lane 1 (%h2, %w3) : (T, W) -> (T, W)
          par.send %h0_1 to 1 "h0 mb1" batch 1 : T
          par.send %g2 to 1 "g2 mb0" batch 1 : T
          %h2_1 = par.recv from 1 "h2 mb1" batch 1 : T
          %loss_1, %3 = par.task @s3_F stage 3 pass F microbatch 1 (%h2_1, %w3) : (T, W) -> (L, L)
          %4 = par.task @s3_F_accumulate stage 3 pass F microbatch 1 (%1, %3) : (L, L) -> L
          par.output "loss", %4 : L
          %g2_1, %dw3_1 = par.task @s3_B stage 3 pass B microbatch 1 (%h2_1, %w3) : (T, W) -> (T, W)
          %dw3_2 = par.task @s3_B_accumulate stage 3 pass B microbatch 1 (%dw3, %dw3_1) : (W, W) -> W
          %5 = par.task @s3_update stage 3 pass update (%w3, %dw3_2) : (W, W) -> W
          par.set_state "blocks.3.w", %5 : W
          par.send %g2_1 to 1 "g2 mb1" batch 2 : T
          %g0 = par.recv from 1 "g0 mb0" batch 2 : T
          %dw0 = par.task @s0_B stage 0 pass B microbatch 0 (%0, %g0) : (T, T) -> W
          %g0_1 = par.recv from 1 "g0 mb1" batch 3 : T
          %dw0_1 = par.task @s0_B stage 0 pass B microbatch 1 (%2, %g0_1) : (T, T) -> W
          %dw0_2 = par.task @s0_B_accumulate stage 0 pass B microbatch 1 (%dw0, %dw0_1) : (W, W) -> W
          %6 = par.task @s0_update stage 0 pass update (%w0, %dw0_2) : (W, W) -> W
          par.set_state "blocks.0.w", %6 : W
        }
    """)


def test_lower_to_exec_runs_the_second_lane_on_its_own_stream():
    out = run(V_TABLE, lower=True)
    rank0 = section(out, "exec.program @rank0")
    assert between(rank0, "exec.stream", "exec.stream \"compute1\"") == typed("""
        %0 = exec.stream "compute"
        %1 = exec.stream "to1"
        %2 = exec.stream "from1"
        %3 = exec.stream "compute1"
    """)
    # compute1 is ordered after what compute made before the group (the received h2 mb0 was
    # waited there), so 0F1 and 3B0 run side by side; each send after the group waits for
    # its own lane only; later, stage 3's gradient sum on compute waits for compute1's dw3 mb0.
    assert between(rank0, 'exec.load_input "0" microbatch 1', "exec.free %16, %17") == typed("""
        %14 = exec.load_input "0" microbatch 1 layout #par.sharding<[[], []]> : T
        %15 = exec.event_record %0
        exec.event_wait %3, %15
        exec.record_stream %10, %3 : T
        exec.record_stream %11, %3 : W
        %16 = exec.launch @s0_F(%14, %5) on %0 stage 0 pass "F" microbatch 1 : (T, W) -> T
        %17, %18 = exec.launch @s3_B(%10, %11) on %3 stage 3 pass "B" microbatch 0 : (T, W) -> (T, W)
        exec.free %10 : T
        %19 = exec.event_record %0
        exec.event_wait %1, %19
        exec.record_stream %16, %1 : T
        %20 = exec.send %16 to 1 group @p2p_0_1 tag 1 on %1 : T
        %21 = exec.event_record %3
        exec.event_wait %1, %21
        exec.record_stream %17, %1 : T
        %22 = exec.send %17 to 1 group @p2p_0_1 tag 2 on %1 : T
        %23, %24 = exec.recv from 1 group @p2p_1_0 tag 1 on %2 : T
        exec.wait %23 on %0
        exec.wait %20, %22 on %1
        exec.free %16, %17 : T, T
    """)
    assert between(rank0, "%30 = exec.event_record", "@s3_B_accumulate") == typed("""
        %30 = exec.event_record %3
        exec.event_wait %0, %30
        exec.record_stream %18, %0 : W
        %31 = exec.launch @s3_B_accumulate(%18, %29) on %0 stage 3 pass "B" microbatch 1 : (W, W) -> W
    """)
    # Device 1 runs no group, and has no second compute stream.
    assert "compute1" not in section(out, "exec.program @rank1")


def test_the_program_verifier_rejects_a_lane_read_without_its_event():
    out = run(V_TABLE, lower=True)
    broken = out.replace("    exec.event_wait %3, %15\n", "", 1)
    assert broken != out
    with pytest.raises(VerifyException, match=(
            r'exec.launch at op #24 reads %10 on stream "compute1", but %10 is made on stream "from1" by the '
            r'exec.recv at op #11 and nothing orders "compute1" after it;')):
        parse_module(broken, make_context()).verify()


def test_a_gradient_sum_two_lanes_add_to_is_ordered_between_them():
    # Stage 3's two backwards overlap, and both add to stage 3's weight-gradient sum. A sum
    # is a new value per microbatch, so lane 1's addition reads lane 0's backward result and
    # waits for it; the two backwards themselves run side by side.
    table = "0F0 0F1 3F0 3F1 3B0+3B1 0B0 0B1;1F0 2F0 1F1 2F1 2B0 1B0 2B1 1B1"
    assert between(section(run(table), "par.program @device0"), "lane 0", "lane 1 (%dw3") == typed("""
        %g2, %dw3 = par.task @s3_B stage 3 pass B microbatch 0 lane 0 (%h2, %w3) : (T, W) -> (T, W)
        %g2_1, %dw3_1 = par.task @s3_B stage 3 pass B microbatch 1 lane 1 (%h2_1, %w3) : (T, W) -> (T, W)
        %dw3_2 = par.task @s3_B_accumulate stage 3 pass B microbatch 1 lane 1 (%dw3, %dw3_1) : (W, W) -> W
    """)
    rank0 = section(run(table, lower=True), "exec.program @rank0")
    assert between(rank0, "%24, %25 = exec.launch", "@s3_B_accumulate") == typed("""
        %24, %25 = exec.launch @s3_B(%14, %15) on %0 stage 3 pass "B" microbatch 0 : (T, W) -> (T, W)
        exec.free %14 : T
        %26, %27 = exec.launch @s3_B(%19, %15) on %3 stage 3 pass "B" microbatch 1 : (T, W) -> (T, W)
        exec.free %19 : T
        %28 = exec.event_record %0
        exec.event_wait %3, %28
        exec.record_stream %25, %3 : W
        %29 = exec.launch @s3_B_accumulate(%25, %27) on %3 stage 3 pass "B" microbatch 1 : (W, W) -> W
    """)


def test_a_loss_made_on_a_later_lane_is_read_once_compute_is_ordered_after_it():
    # 3F1, the last microbatch's forward of the last stage, runs in lane 1; a receive it
    # reads is waited on compute1, and the host reads the loss once compute waits for it.
    table = "0F0 0F1 3F0 3B0+3F1 3B1 0B0 0B1;1F0 2F0 1F1 2F1 2B0 1B0 2B1 1B1"
    rank0 = section(run(table, lower=True), "exec.program @rank0")
    assert between(rank0, "exec.wait %18", "exec.output") == typed("""
        exec.wait %18 on %3
        exec.wait %12 on %1
        exec.free %10 : T
        %20 = exec.event_record %0
        exec.event_wait %3, %20
        exec.record_stream %19, %3 : T
        exec.record_stream %15, %3 : W
        exec.record_stream %17, %3 : L
        %21, %22 = exec.launch @s3_B(%14, %15) on %0 stage 3 pass "B" microbatch 0 : (T, W) -> (T, W)
        exec.free %14 : T
        %23, %24 = exec.launch @s3_F(%19, %15) on %3 stage 3 pass "F" microbatch 1 : (T, W) -> (L, L)
        exec.free %23 : L
        %25 = exec.launch @s3_F_accumulate(%17, %24) on %3 stage 3 pass "F" microbatch 1 : (L, L) -> L
        exec.free %17, %24 : L, L
        %26 = exec.event_record %3
        exec.event_wait %0, %26
        exec.record_stream %25, %0 : L
        exec.output "loss", %25 : L
    """)


def test_a_schedules_overlap_groups_travel_as_the_schedule_pass_table():
    table = table_text(v_overlapped(4, 4, 2))
    assert table.split(";")[0] == "0F0 0F1 0F2 3F0 3B0 3F1 0F3+3B1 0B0 3F2 3B2 0B1 3F3 3B3 0B2 0B3"
    assert parse_table(table, 4, 4).overlap == v_overlapped(4, 4, 2).overlap


def test_a_group_apart_in_its_row_is_refused():
    def apart(stages, microbatches, devices):
        made = schedules.from_lists([row.replace("+", " ").split() for row in V_TABLE.split(";")])
        made.overlap = [[(schedules.Action.parse("0F1"), schedules.Action.parse("3F1"))], []]
        return made

    model, inputs = gpt.make(n_layers=4)
    with pytest.raises(StrategyError, match=r"overlap group \[0F1 3F1\] on device 0 is not contiguous"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2), optimizer=ADAMW, keep_ir=False,
                       strategy=[piperc.pipeline(stages=4, microbatches=2, schedule=apart)])


def test_expand_schedule_refuses_a_written_group_apart_in_its_row():
    scheduled = run_ir(STAGED.removesuffix(",expand-schedule") % V_TABLE, FOUR_BLOCKS)
    text = scheduled.replace("overlap [[0F1, 3B0]]", "overlap [[0F1, 3F1]]")
    assert text != scheduled
    with pytest.raises(PassError, match=r"overlap group \[0F1, 3F1\] on device 0 is not contiguous in its row"):
        run_ir("expand-schedule", text)


# ---------------------------------------------------------------- against one device

# pp=2, 4 stages in V placement, 4 microbatches; on device 0, DualPipeV's (0F3;3B1).
V_ROWS = [
    "0F0 0F1 0F2 3F0 3B0 3F1 0F3 3B1 0B0 3F2 3B2 0B1 3F3 3B3 0B2 0B3".split(),
    "1F0 1F1 2F0 1F2 2F1 2B0 1B0 2F2 1F3 2B1 1B1 2F3 2B2 1B2 2B3 1B3".split(),
]


def v_overlapped(stages, microbatches, devices):
    """V_ROWS with 0F3 and 3B1 overlapped on device 0."""
    made = schedules.from_lists(V_ROWS, stages, microbatches, name="v_overlapped")
    made.overlap = [[(schedules.Action.parse("0F3"), schedules.Action.parse("3B1"))], []]
    return made


@pytest.mark.parametrize("name,device", [device_param("gpt-pp2-v", 2, d) for d in ("cpu", "cuda")])
def test_an_overlapped_v_schedule_is_bit_identical_to_its_rows_and_trains_as_one_device(name, device):
    runs = []
    for schedule in (v_overlapped, V_ROWS):
        compiled = compile_(gpt, 4, mesh=piperc.Mesh(pp=2), optimizer=ADAMW, device=device,
                            strategy=[piperc.pipeline(stages=4, microbatches=4, schedule=schedule)])
        assert {s: compiled.schedule.device_of(s) for s in range(4)} == {0: 0, 1: 1, 2: 1, 3: 0}
        runs.append((compiled.files["rank0.py"], piperc.launch(compiled, setup(gpt, 4).batches, timeout=240)))
    (program, overlapped), (plain_program, plain) = runs
    assert 'compute1 = rt.stream("compute1")' in program and "compute1" not in plain_program
    assert 'rt.launch("s3_B", stage=3, pass_kind="B", microbatch=1, stream=compute1)' in program
    assert overlapped.losses == plain.losses
    assert all(torch.equal(overlapped.state_dict[k], v) for k, v in plain.state_dict.items())
    check_exact(gpt, 4, ADAMW, overlapped, 4)
