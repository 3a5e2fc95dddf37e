"""Chimera: two pipelines in opposite directions over replicas of the stages (issue 8).

`pipeline(stages=p, microbatches=m, schedule="chimera")`: the down pipeline runs stage s
on device s and microbatches 0..m/2-1, the up pipeline its replica of stage s (schedule
stage p + s) on device p - 1 - s and microbatches m/2..m-1. A replica runs the same stage
functions on the same state; each device sums the gradients of the microbatches it ran,
and the two replicas of a stage sum theirs across their two devices before both apply the
same update. The schedule as data first, then the IR expand-schedule writes; the real
multi-process runs against one device are tests/test_interleaved.py's chimera cases.
"""

import pytest

import piperc
from piperc import cli, schedules
from piperc.examples import gpt, tied
from tests.test_passes_ir import ir, run, section

ADAMW = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)

# ---------------------------------------------------------------- the schedule


def test_chimera_merges_two_opposite_1f1b_pipelines_per_device():
    schedule = schedules.builtin("chimera", 4, 8)
    # device d runs stage d of the down pipeline (microbatches 0-3) and stage 7 - d, the up
    # pipeline's replica of stage 3 - d (microbatches 4-7)
    assert schedule.table() == (
        "device 0: 0F0 0F1 0F2 0F3 7F4 7B4 7F5 7B5 7F6 7B6 0B0 7F7 7B7 0B1 0B2 0B3\n"
        "device 1: 1F0 1F1 6F4 1F2 6F5 6B4 6F6 1B0 1F3 6B5 6F7 6B6 1B1 1B2 6B7 1B3\n"
        "device 2: 5F4 2F0 5F5 2F1 5F6 2B0 2F2 5B4 5F7 2B1 2F3 2B2 5B5 5B6 2B3 5B7\n"
        "device 3: 4F4 4F5 4F6 4F7 3F0 3B0 3F1 3B1 3F2 3B2 4B4 3F3 3B3 4B5 4B6 4B7")
    assert (schedule.num_stages, schedule.replicas) == (4, 2)
    assert schedule.stage_device == {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 2, 6: 1, 7: 0}
    assert [schedule.model_stage(s) for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    schedules.validate(schedule)
    # up's stage 4 (model stage 0) sends its activation to stage 5 on device 2, not to stage 3
    assert schedules.messages(schedule)[(3, 2)][0] == schedules.Message(3, 2, "act", 4, 4, 2 * (4 * 8 + 4))


# idle over devices x makespan: p * m * 2 units of work; chimera at pp=4, m=8 takes 18 units, 1F1B 22
@pytest.mark.parametrize("p, m, chimera, one_f_one_b", [(4, 8, 8 / 72, 24 / 88), (4, 4, 12 / 44, 24 / 56),
                                                        (2, 4, 0, 4 / 20), (4, 16, 8 / 136, 24 / 152)])
def test_chimera_has_a_smaller_bubble_than_1f1b_under_unit_costs(p, m, chimera, one_f_one_b):
    assert schedules.simulate(schedules.builtin("chimera", p, m), f_time=1, b_time=1).bubble_fraction == (
        pytest.approx(chimera))
    assert schedules.simulate(schedules.builtin("1f1b", p, m), f_time=1, b_time=1).bubble_fraction == (
        pytest.approx(one_f_one_b))


def test_piperc_schedule_show_prints_chimera(capsys):
    assert cli.main(["schedule", "show", "chimera", "--pp", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("schedule chimera: 4 devices, 4 stages, 8 microbatches")
    assert "device 0: 0F0 0F1 0F2 0F3 7F4 7B4" in out and "chimera: makespan 18, bubble 11.1%" in out


@pytest.mark.parametrize("stages, devices, mbs", [(3, 3, 4), (4, 4, 5), (8, 4, 8)])
def test_chimera_needs_one_stage_per_device_an_even_device_count_and_an_even_microbatch_count(stages, devices, mbs):
    with pytest.raises(schedules.ScheduleError, match=f"got {stages} stages, {devices} devices and {mbs} microbatches"):
        schedules.builtin("chimera", stages, mbs, num_devices=devices)


@pytest.mark.parametrize("rows, message", [
    # microbatch 1 on both pipelines
    ([["0F0", "0B0", "3F1", "3B1"], ["1F0", "1B0", "2F1", "2B1", "1F1", "1B1"]],
     r"microbatch 1 runs in two pipelines \(3F1 and 1F1\)"),
    # the up pipeline's stage 2 forgets a backward
    ([["0F0", "3F1", "3B1", "0B0"], ["2F1", "1F0", "1B0"]], "action 2B1 is missing"),
])
def test_validate_checks_each_microbatch_runs_whole_in_one_pipeline(rows, message):
    with pytest.raises(schedules.ScheduleError, match=message):
        schedules.validate(schedules.from_lists(rows, 2, 2, replicas=2))


# ---------------------------------------------------------------- the device programs

CHIMERA = ('pipeline-split{stages=2 split-at="blocks.1"},outline-stages,optimizer{lr=0.1},'
           'microbatch{count=4},schedule{kind="chimera"},expand-schedule')


def test_the_schedule_names_the_replica_stages():
    assert section(run('mesh{shape="pp=2"},' + CHIMERA), "par.schedule @schedule") == ir("""
        par.schedule @schedule mesh @mesh axis "pp" {
          par.device 0 [0F0, 0F1, 3F2, 3B2, 3F3, 0B0, 3B3, 0B1]
          par.device 1 [2F2, 2F3, 1F0, 1B0, 1F1, 2B2, 1B1, 2B3]
        }
    """)


def test_a_replica_stage_runs_its_stage_functions_on_its_pipelines_microbatches():
    out = run('mesh{shape="pp=2"},' + CHIMERA)
    # Device 1 holds stage 1 (down) and stage 2, the up pipeline's replica of stage 0: it runs
    # @s0_F and @s0_B as stage 2 on microbatches 2 and 3 (sending to stage 3 on device 0) and
    # stage 1 on 0 and 1; it sums each stage's gradients over its own two microbatches, reports
    # the loss of the two microbatches its last stage ran, and sums each stage's gradient with
    # the other replica's (`over @mesh []`: the devices that hold stages 0 and 2, or 1 and 3)
    # before the update, which both replicas apply.
    assert section(out, "par.program @device1") == ir("""
        par.program @device1 device 1 {
          %0 = par.input 0 microbatch 2 layout #par.sharding<[[], []]> : !torch.vtensor<[2,4],f32>
          %w0 = par.state "blocks.0.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %h0 = par.task @s0_F stage 2 pass F microbatch 2 (%0, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0 to 0 "h0 mb2" batch 0 : !torch.vtensor<[2,4],f32>
          %h0_1 = par.recv from 0 "h0 mb0" batch 0 : !torch.vtensor<[2,4],f32>
          %1 = par.input 0 microbatch 3 layout #par.sharding<[[], []]> : !torch.vtensor<[2,4],f32>
          %h0_2 = par.task @s0_F stage 2 pass F microbatch 3 (%1, %w0) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[2,4],f32>
          par.send %h0_2 to 0 "h0 mb3" batch 1 : !torch.vtensor<[2,4],f32>
          %h0_3 = par.recv from 0 "h0 mb1" batch 1 : !torch.vtensor<[2,4],f32>
          %w1 = par.state "blocks.1.w" layout #par.sharding<[[], []]> : !torch.vtensor<[4,4],f32>
          %loss, %2 = par.task @s1_F stage 1 pass F microbatch 0 (%h0_1, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %g0, %dw1 = par.task @s1_B stage 1 pass B microbatch 0 (%h0_1, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          par.send %g0 to 0 "g0 mb0" batch 2 : !torch.vtensor<[2,4],f32>
          %g0_1 = par.recv from 0 "g0 mb2" batch 2 : !torch.vtensor<[2,4],f32>
          %loss_1, %3 = par.task @s1_F stage 1 pass F microbatch 1 (%h0_3, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>)
          %4 = par.task @s1_F_accumulate stage 1 pass F microbatch 1 (%2, %3) : (!torch.vtensor<[],f32>, !torch.vtensor<[],f32>) -> !torch.vtensor<[],f32>
          par.output "loss", %4 : !torch.vtensor<[],f32>
          %dw0 = par.task @s0_B stage 2 pass B microbatch 2 (%0, %g0_1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %g0_2, %dw1_1 = par.task @s1_B stage 1 pass B microbatch 1 (%h0_3, %w1) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>) -> (!torch.vtensor<[2,4],f32>, !torch.vtensor<[4,4],f32>)
          %dw1_2 = par.task @s1_B_accumulate stage 1 pass B microbatch 1 (%dw1, %dw1_1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.send %g0_2 to 0 "g0 mb1" batch 3 : !torch.vtensor<[2,4],f32>
          %g0_3 = par.recv from 0 "g0 mb3" batch 3 : !torch.vtensor<[2,4],f32>
          %dw0_1 = par.task @s0_B stage 2 pass B microbatch 3 (%1, %g0_3) : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          %dw0_2 = par.task @s0_B_accumulate stage 2 pass B microbatch 3 (%dw0, %dw0_1) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          %5 = par.all_reduce_bucket 0 stage 2 (%dw0_2) over @mesh [] stages [0, 2] : !torch.vtensor<[4,4],f32>
          %6 = par.task @s0_update stage 2 pass update (%w0, %5) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.0.w", %6 : !torch.vtensor<[4,4],f32>
          %7 = par.all_reduce_bucket 0 stage 1 (%dw1_2) over @mesh [] stages [1, 3] : !torch.vtensor<[4,4],f32>
          %8 = par.task @s1_update stage 1 pass update (%w1, %7) : (!torch.vtensor<[4,4],f32>, !torch.vtensor<[4,4],f32>) -> !torch.vtensor<[4,4],f32>
          par.set_state "blocks.1.w", %8 : !torch.vtensor<[4,4],f32>
        }
    """)


def test_data_parallel_buckets_sum_over_the_replicas_too():
    out = run('mesh{shape="pp=2,dp=2"},' + CHIMERA.replace("optimizer{lr=0.1},", "optimizer{lr=0.1},data-parallel,")
              .replace("count=4", "count=2 replicas=2") + ",lower-to-exec")
    # Each data-parallel bucket of a stage also spans the device of its replica: ranks (pp, dp)
    # 0 = (0, 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1), every stage on both pipeline devices.
    assert out.count("exec.all_reduce") == 2 * 4
    groups = [line.strip() for line in out.splitlines() if "exec.process_group @grad" in line]
    assert groups == ["exec.process_group @grad_0 ranks [0, 1, 2, 3]"]


def test_a_schedule_function_may_return_replicas_of_the_stages():
    def chimera_late_up(stages, microbatches, devices):
        schedule = schedules.chimera(stages, microbatches, devices)
        schedule.devices[1].remove(schedules.Action(1, "B", 1))
        schedule.devices[1].append(schedules.Action(1, "B", 1))
        return schedule

    model, inputs = gpt.make(n_layers=2)
    compiled = piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2), optimizer=ADAMW, keep_ir=False,
                              strategy=[piperc.pipeline(stages=2, microbatches=4, schedule=chimera_late_up)])
    assert compiled.schedule.replicas == 2
    assert ('schedule{kind="user" table="0F0 0F1 3F2 3B2 3F3 0B0 3B3 0B1;2F2 2F3 1F0 1B0 1F1 2B2 2B3 1B1" '
            'replicas=2') in compiled.pipeline

    def chimera_without_2b3(stages, microbatches, devices):
        schedule = schedules.chimera(stages, microbatches, devices)
        schedule.devices[1].remove(schedules.Action(2, "B", 3))
        return schedule

    with pytest.raises(piperc.StrategyError, match=r"action 2B3 is missing \(stage 2 runs on device 1\)"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2), optimizer=ADAMW, keep_ir=False,
                       strategy=[piperc.pipeline(stages=2, microbatches=4, schedule=chimera_without_2b3)])


def test_a_weight_tied_across_the_first_and_last_stage_is_refused():
    # device 0 holds stage 0 and the up pipeline's replica of stage 1 (the head, tied to stage 0)
    model, inputs = tied.make(n_layers=4)
    with pytest.raises(piperc.StrategyError, match=r"tied across stages \[0, 1\] would have two of them on one "
                                                   r"device \(\[0, 1, 1, 0\], replicas included\).*untie it"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2), optimizer=piperc.optim.SGD(lr=0.1), keep_ir=False,
                       strategy=[piperc.pipeline(stages=2, microbatches=2, schedule="chimera")])
