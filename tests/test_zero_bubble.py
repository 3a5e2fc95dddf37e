"""Zero-bubble pipelines: the backward split into B (input gradients) and W (weight
gradients), and the ZB-H1 schedule (issue 8).

`outline-stages{split-weights}` puts each stage's weight-gradient ops in `@s<i>_W`; the
pipeline directive asks for it when its schedule runs W actions (`zb-h1`, or a table
with W). The arithmetic is the backward's own, so a zero-bubble run is bit-identical to
1F1B. IR first, then the schedule as data, then real multi-process runs.
"""

import functools

import pytest
import torch

import piperc
from piperc import schedules
from piperc.examples import gpt, llama
from tests.shared import check_exact, compile_, device_param, setup
from tests.test_passes_ir import functions, ir, run, section

SPLIT = 'mesh{shape="pp=2"},pipeline-split{stages=2 split-at="blocks.1"},outline-stages{split-weights=true}'


def test_the_weight_gradient_of_a_stage_is_a_function_of_its_own():
    out = run(SPLIT)
    assert functions(out) == ["s0_F", "s1_F", "s1_B", "s1_W", "s0_B", "main"]
    # Stage 1's B computes the input gradient g0 (sent to stage 0) and hands W what it needs.
    assert section(out, "func.func @s1_W") == ir("""
        func.func @s1_W(%0: !torch.vtensor<[4,2],f32> {piperc.key = "v1", par.layout = #par.sharding<[[], []]>}, %1: !torch.vtensor<[2,4],f32> {piperc.key = "v2", par.layout = #par.sharding<[[], []]>}) -> (!torch.vtensor<[4,4],f32> {piperc.key = "grad:blocks.1.w", par.layout = #par.sharding<[[], []]>}) {
          %dw1 = "torch.aten.mm"(%0, %1) {piperc.origin = #par.origin<"blocks.1.lin", B>, par.stage = 1 : i64} : (!torch.vtensor<[4,2],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[4,4],f32>
          func.return %dw1 : !torch.vtensor<[4,4],f32>
        }
    """)
    main = section(out, "func.func @main")
    assert ("%h0t, %g1, %g0 = par.task @s1_B stage 1 pass B (%dloss, %h0, %w1)" in main
            and "%dw1 = par.task @s1_W stage 1 pass W (%h0t, %g1)" in main)
    # Stage 0's only weight gradient reads the gradient stage 1 sends, which arrives at B:
    # it stays in B, and stage 0 has no W.
    assert "%dw0 = par.task @s0_B stage 0 pass B (%x, %g0)" in main


def test_without_the_option_the_backward_is_whole():
    out = run(SPLIT.replace("{split-weights=true}", ""))
    assert functions(out) == ["s0_F", "s1_F", "s1_B", "s0_B", "main"]


# ---------------------------------------------------------------- the schedule


def test_zb_h1_defers_weight_gradients_into_1f1bs_bubbles_within_its_peak_memory():
    schedule = schedules.builtin("zb-h1", 2, 4)
    assert schedule.table() == (
        "device 0: 0F0 0F1 0B0 0W0 0B1 0F2 0W1 0F3 0B2 0W2 0B3 0W3\n"
        "device 1: 1F0 1B0 1F1 1B1 1W0 1W1 1F2 1B2 1F3 1B3 1W2 1W3")
    for p, m, zb, one_f_one_b in [(2, 4, 1 / 13, 0.2), (4, 8, 5 / 29, 9 / 33), (4, 16, 5 / 53, 9 / 57)]:
        schedule = schedules.builtin("zb-h1", p, m)
        schedules.validate(schedule)
        # at equal F, B and W; 1F1B's backward does B and W together
        assert schedules.simulate(schedule, f_time=1, b_time=1, w_time=1).bubble_fraction == pytest.approx(zb)
        assert schedules.simulate(schedules.builtin("1f1b", p, m), f_time=1, b_time=2).bubble_fraction == (
            pytest.approx(one_f_one_b))
        # 1F1B's peak (p microbatches, on device 0), on every device
        assert schedules.peak_in_flight(schedule) == [p] * p
        assert schedules.receive_plan(schedule) == [{} for _ in range(p)]


def test_zb_h1_runs_one_stage_per_device():
    with pytest.raises(schedules.ScheduleError, match="'zb-h1' runs one stage per device"):
        schedules.builtin("zb-h1", 4, 8, num_devices=2)


# ---------------------------------------------------------------- against 1F1B and one device

ADAMW = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)
# pp=2 with a user table that runs W actions: 1F1B, each W right after its B
TABLE = [["0F0", "0F1", "0B0", "0W0", "0F2", "0B1", "0W1", "0F3", "0B2", "0W2", "0B3", "0W3"],
         ["1F0", "1B0", "1W0", "1F1", "1B1", "1W1", "1F2", "1B2", "1W2", "1F3", "1B3", "1W3"]]
# Settings, each run once under 1F1B (one stage per device) and then under every zero-bubble
# schedule: both models at both pipeline sizes, and one data-parallel composition per
# schedule. name -> (example, layers, mesh, microbatches).
SETTINGS = {
    "gpt-pp2": (gpt, 4, piperc.Mesh(pp=2), 4),
    "llama-pp2": (llama, 4, piperc.Mesh(pp=2), 4),
    "gpt-pp4": (gpt, 8, piperc.Mesh(pp=4), 8),
    "llama-pp4": (llama, 8, piperc.Mesh(pp=4), 8),
    "gpt-pp2xdp2": (gpt, 4, piperc.Mesh(pp=2, dp=2), 4),
}
# case -> (setting, schedule, stages per device)
CASES = {
    **{f"{kind}-{setting}": (setting, kind, per_device)
       for kind, per_device in [("zb-h1", 1), ("zb-h2", 1), ("interleaved-zb", 2), ("zbv", 2), ("dualpipev", 2)]
       for setting in SETTINGS},
    "table-llama-pp2": ("llama-pp2", TABLE, 1),
}


def _train(setting, schedule, per_device, device):
    example, layers, mesh, microbatches = SETTINGS[setting]
    strategy = [piperc.pipeline(stages=per_device * mesh.axes["pp"], microbatches=microbatches,
                                schedule=schedule)]
    strategy += [piperc.data_parallel()] if "dp" in mesh.axes else []
    compiled = compile_(example, layers, mesh=mesh, strategy=strategy, optimizer=ADAMW, device=device)
    return piperc.launch(compiled, setup(example, layers).batches, timeout=240)


@functools.cache
def _one_f_one_b(setting, device):
    return _train(setting, "1f1b", 1, device)


@pytest.mark.parametrize("name,device", [device_param(n, SETTINGS[CASES[n][0]][2].size, d)
                                         for d in ("cpu", "cuda") for n in CASES])
def test_zero_bubble_is_bit_identical_to_1f1b_and_trains_as_one_device(name, device):
    setting, schedule, per_device = CASES[name]
    zero_bubble = _train(setting, schedule, per_device, device)
    one_f_one_b = _one_f_one_b(setting, device)
    assert zero_bubble.losses == one_f_one_b.losses
    assert all(torch.equal(zero_bubble.state_dict[k], v) for k, v in one_f_one_b.state_dict.items())
    example, layers, mesh, microbatches = SETTINGS[setting]
    check_exact(example, layers, ADAMW, zero_bubble, microbatches * mesh.axes.get("dp", 1))


def test_dualpipev_refuses_fewer_than_two_microbatches_per_device():
    model, inputs = gpt.make(n_layers=4)
    with pytest.raises(piperc.StrategyError, match="'dualpipev' on 2 devices needs at least 4 microbatches"):
        piperc.compile(model, inputs, mesh=piperc.Mesh(pp=2), optimizer=ADAMW,
                       strategy=[piperc.pipeline(stages=4, microbatches=2, schedule="dualpipev")])


def test_a_single_stage_runs_its_whole_backward_as_w():
    # No earlier stage waits for an input gradient, so every backward op computes a weight
    # gradient: the B actions run nothing and the W actions everything, bit-identical to 1F1B.
    model, inputs = gpt.make(n_layers=2)
    batches = [gpt.make(n_layers=2, seed=100 + s)[1] for s in range(2)]
    runs = {}
    for kind in ("zb-h1", "1f1b"):
        compiled = piperc.compile(model, inputs, mesh=piperc.Mesh(pp=1), optimizer=ADAMW, keep_ir=False,
                                  strategy=[piperc.pipeline(stages=1, microbatches=2, schedule=kind)])
        runs[kind] = (compiled.files["rank0.py"], piperc.launch(compiled, batches, timeout=120))
    program = runs["zb-h1"][0]
    assert 'rt.launch("s0_W"' in program and 'rt.launch("s0_B' not in program
    assert runs["zb-h1"][1].losses == runs["1f1b"][1].losses
    assert all(torch.equal(runs["zb-h1"][1].state_dict[k], v) for k, v in runs["1f1b"][1].state_dict.items())
