"""The communication-aware simulator (`piperc.simulator`): exec programs in, predicted
timelines out.

The IR tests hand in small per-rank programs whose timelines can be worked out by hand
(tasks of 1, 2 or 3 seconds, links with round latencies); the compiled tests check that a
generated 1F1B program runs in the schedule's own makespan, that the predicted trace names
what a real run's trace names, and that a profile of a real run gives a cost for every task.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

import piperc
from piperc import schedules
from piperc.cli import main as cli_main
from piperc.dialects import exec as ex
from piperc.examples import gpt
from piperc.ir import parse_module
from piperc.runtime.trace import FORMAT, HOST_WAITS, STEP
from piperc.simulator import (
    Costs,
    Link,
    Network,
    SimulationError,
    _callees,
    calibrate,
    cluster,
    collective_time,
    p2p_delay,
    simulate,
)
from tests.test_trace import program_transfers

T = "!torch.vtensor<[4,4],f32>"  # 64 bytes


def function(name: str) -> str:
    """A task function: one 4x4 matmul (128 FLOPs)."""
    return f"""\
func.func @{name}(%x: {T} {{piperc.key = "input:0"}}) -> ({T} {{piperc.key = "v0"}}) {{
  %y = "torch.aten.mm"(%x, %x) : ({T}, {T}) -> {T}
  func.return %y : {T}
}}
"""


FUNCTIONS = "".join(function(name) for name in ("A", "B", "C"))
FREE_LOSS = {"world": Link()}
"""A network override that makes the executor's loss all_reduce free, so the step ends with the programs."""


def run(text: str, compute: dict[str, float], device: str = "cuda", link: Link | None = None):
    """Simulates the programs of `text` (after FUNCTIONS) over `link` (default: free), the loss free."""
    module = parse_module(FUNCTIONS + text)
    module.verify()
    return simulate(module, Costs(compute, Network(link or Link(), groups=FREE_LOSS), device))


def events(sim, rank: int, cat: str) -> dict[str, tuple[float, float]]:
    """The (start, end) in seconds of rank's trace events of `cat`, by name."""
    data = sim.traces[rank].to_json()
    return {e["name"]: (e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in data["traceEvents"]
            if e["ph"] == "X" and e["cat"] == cat}


def near(a, b) -> bool:
    return a == pytest.approx(b, abs=1e-9)


# Rank 0 computes A and sends its result; rank 1 receives it and computes B with it.
SEND_AFTER_A = f"""\
exec.process_group @pp ranks [0, 1]
exec.program @rank0 rank 0 world 2 {{
  %s = exec.stream "compute"
  %x = exec.load_input "0" microbatch 0 : {T}
  %y = exec.launch @A(%x) on %s stage 0 pass "F" microbatch 0 : ({T}) -> {T}
  %w = exec.send %y to 1 group @pp tag 0 on %s : {T}
  exec.wait %w on %s
  exec.free %x, %y : {T}, {T}
}}
exec.program @rank1 rank 1 world 2 {{
  %s = exec.stream "compute"
  %w, %x = exec.recv from 0 group @pp tag 0 on %s : {T}
  exec.wait %w on %s
  %y = exec.launch @B(%x) on %s stage 1 pass "F" microbatch 0 : ({T}) -> {T}
  exec.free %x, %y : {T}, {T}
}}
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_transfers_latency_delays_the_receiver(device):
    """A ends at 1; the 64-byte message takes 0.5 + 64 / 128 = 1 s; B runs from 2 to 3."""
    sim = run(SEND_AFTER_A, {"A": 1.0, "B": 1.0}, device, Link(latency=0.5, bandwidth=128.0))
    assert events(sim, 0, "task") == {"A mb0": (0.0, 1.0)}
    assert events(sim, 1, "task") == {"B mb0": (2.0, 3.0)}
    assert events(sim, 1, "p2p") == {"recv <- 0": (0.0, 2.0)}
    assert events(sim, 0, "p2p") == {"send A mb0 -> 1": (1.0, 2.0)}
    assert near(sim.step_time, 3.0) and sim.finished == [3.0, 3.0]  # the loss all_reduce waits for rank 1
    assert sim.busy == [1.0, 1.0]
    assert near(sim.bubble_fraction, 1 - 2 / 6)


def test_a_cpu_transfer_takes_its_p2p_delay_beyond_the_link():
    """On CPU the message takes the link's 1 s and the measured delay's 0.5 s: B runs from 2.5."""
    module = parse_module(FUNCTIONS + SEND_AFTER_A)
    network = Network(Link(latency=0.5, bandwidth=128.0), groups=FREE_LOSS)
    sim = simulate(module, Costs({"A": 1.0, "B": 1.0}, network, "cpu", p2p_delay=0.5))
    assert events(sim, 1, "task") == {"B mb0": (2.5, 3.5)}
    assert events(sim, 0, "p2p") == {"send A mb0 -> 1": (1.0, 2.5)}
    with pytest.raises(ValueError, match="p2p_delay=0.5 must be seconds >= 0, and only on device 'cpu'"):
        Costs({}, device="cuda", p2p_delay=0.5)


def trace_event(rank: int, cat: str, name: str, start_ms: float, end_ms: float, **args) -> dict:
    """One complete event of a measured trace (`piperc.runtime.trace`), in step 1."""
    return {"ph": "X", "name": name, "cat": cat, "ts": start_ms * 1e3, "dur": (end_ms - start_ms) * 1e3,
            "pid": rank, "tid": 0, "args": {**args, "step": 1}}


def test_profile_takes_the_p2p_delay_from_receivers_that_waited_for_the_sender():
    """Rank 1 waits from 0 ms for its first message, which rank 0 begins to send at 1 ms and
    which arrives at 4 ms: 3 ms, less the link's 1 ms. Rank 1 posts its second receive only
    at 9 ms, after rank 0 sent at 6 ms, so that one tells nothing of the transfer's time."""
    p2p = {"bytes": 64, "group": "pp"}
    events = [
        [trace_event(0, "p2p", "send s0_F mb0 -> 1", 1, 5, peers=[1], **p2p),
         trace_event(0, "p2p", "send s0_F mb1 -> 1", 6, 10, peers=[1], **p2p)],
        [trace_event(1, "p2p", "recv <- 0", 0, 4, peers=[0], **p2p),
         trace_event(1, "wait", "wait recv <- 0", 0, 4),
         trace_event(1, "p2p", "recv <- 0", 9, 10, peers=[0], **p2p),
         trace_event(1, "wait", "wait recv <- 0", 9.5, 10)],
    ]
    assert p2p_delay(events, 1, Network(Link(latency=1e-3 - 64 / 1e9, bandwidth=1e9))) == pytest.approx(2e-3)
    assert p2p_delay(events, 2, Network()) == 0.0  # no step from step 2 on


# Rank 1 computes C (2 s) before it posts its receive, on the same stream: rank 0's send
# cannot complete before, so its wait holds back A.
RENDEZVOUS = f"""\
exec.process_group @pp ranks [0, 1]
exec.program @rank0 rank 0 world 2 {{
  %s = exec.stream "compute"
  %x = exec.load_input "0" microbatch 0 : {T}
  %w = exec.send %x to 1 group @pp tag 0 on %s : {T}
  exec.wait %w on %s
  %y = exec.launch @A(%x) on %s stage 0 pass "F" microbatch 0 : ({T}) -> {T}
  exec.free %x, %y : {T}, {T}
}}
exec.program @rank1 rank 1 world 2 {{
  %s = exec.stream "compute"
  %x = exec.load_input "0" microbatch 0 : {T}
  %z = exec.launch @C(%x) on %s stage 1 pass "F" microbatch 0 : ({T}) -> {T}
  %w, %r = exec.recv from 0 group @pp tag 0 on %s : {T}
  exec.wait %w on %s
  exec.free %x, %z, %r : {T}, {T}, {T}
}}
"""


@pytest.mark.parametrize(("device", "wait"), [
    ("cpu", (0.0, 2.0)),   # the host blocks in the wait
    ("cuda", (2.0, 2.0)),  # the send holds its stream, which reaches the wait when it is done
])
def test_a_send_completes_only_when_its_receive_is_posted(device, wait):
    sim = run(RENDEZVOUS, {"A": 1.0, "C": 2.0}, device)
    assert events(sim, 0, "p2p") == {"send [4, 4] -> 1": (0.0, 2.0)}
    assert events(sim, 0, "wait")["wait send [4, 4] -> 1"] == wait
    assert events(sim, 0, "task") == {"A mb0": (2.0, 3.0)}
    assert near(sim.step_time, 3.0)


# One rank, two compute streams; B reads nothing of A's unless `ordered` adds an event.
TWO_STREAMS = f"""\
exec.program @rank0 rank 0 world 1 {{
  %s1 = exec.stream "compute"
  %s2 = exec.stream "compute 2"
  %x = exec.load_input "0" microbatch 0 : {T}
  %y = exec.launch @A(%x) on %s1 stage 0 pass "F" microbatch 0 : ({T}) -> {T}
  ORDER
  %z = exec.launch @B(%x) on %s2 stage 0 pass "F" microbatch 1 : ({T}) -> {T}
  exec.free %x, %y, %z : {T}, {T}, {T}
}}
"""
EVENT = "%e = exec.event_record %s1\n  exec.event_wait %s2, %e"


@pytest.mark.parametrize(("device", "order", "b", "step"), [
    ("cuda", "", (0.0, 1.0), 1.0),        # the streams overlap
    ("cuda", EVENT, (1.0, 2.0), 2.0),     # the event orders B after A
    ("cpu", "", (1.0, 2.0), 2.0),         # the host runs one task at a time
])
def test_two_streams_overlap_unless_an_event_orders_them(device, order, b, step):
    sim = run(TWO_STREAMS.replace("ORDER", order), {"A": 1.0, "B": 1.0}, device)
    assert events(sim, 0, "task") == {"A mb0": (0.0, 1.0), "B mb1": b}
    assert sim.step_time == step
    assert sim.busy == [step]  # busy time is the union of the tasks
    assert {lane["args"]["name"] for lane in sim.traces[0].to_json()["traceEvents"]
            if lane["name"] == "thread_name"} >= {"compute", "step"} | ({"compute 2"} if device == "cuda" else set())


# Three ranks compute for 1, 2 and 3 s, then all-reduce their results.
COLLECTIVE = "exec.process_group @dp ranks [0, 1, 2]\n" + "".join(f"""\
exec.program @rank{r} rank {r} world 3 {{
  %s = exec.stream "compute"
  %c = exec.stream "comm"
  %x = exec.load_input "0" microbatch 0 : {T}
  %y = exec.launch @{name}(%x) on %s stage 0 pass "B" microbatch 0 : ({T}) -> {T}
  %e = exec.event_record %s
  exec.event_wait %c, %e
  exec.record_stream %y, %c : {T}
  %w, %sum = exec.all_reduce %y group @dp sum on %c : {T}
  exec.wait %w on %s
  exec.free %x, %y, %sum : {T}, {T}, {T}
}}
""" for r, name in enumerate("ABC"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_collective_starts_when_its_slowest_member_posts_it(device):
    """The all-reduce over 3 ranks takes 2 x 2 latencies (0.1 s each): 3.0 to 3.4 everywhere."""
    sim = run(COLLECTIVE, {"A": 1.0, "B": 2.0, "C": 3.0}, device, Link(latency=0.1))
    for rank, (name, issued) in enumerate(zip("ABC", [1.0, 2.0, 3.0], strict=True)):
        start, end = events(sim, rank, "collective")[f"all_reduce sum {name} mb0 over dp"]
        assert near(start, issued) and near(end, 3.4)
    assert sim.busy == [1.0, 2.0, 3.0]
    assert near(sim.step_time, 3.4)
    assert near(sim.bubble_fraction, 1 - 6 / (3 * 3.4))


def test_ranks_on_one_host_core_share_it():
    """The three tasks (1, 2 and 3 s of work) share one core: all three run at a third of
    their speed until A ends at 3, B and C at half until B ends at 5, C alone until 6; the
    all-reduce takes 0.4 s. Each rank's work is what it takes alone, an issue's included:
    with 0.5 s to issue the all-reduce, the core has 7.5 s of work, and the step lasts that
    long (the all-reduce, posted as its last issue begins at 7, is over at 7.4)."""
    module = parse_module(FUNCTIONS + COLLECTIVE)
    network = Network(Link(latency=0.1), groups=FREE_LOSS)
    sim = simulate(module, Costs({"A": 1.0, "B": 2.0, "C": 3.0}, network, "cpu", host_cores=1))
    assert [events(sim, r, "task")[f"{name} mb0"] for r, name in enumerate("ABC")] == [
        pytest.approx((0.0, end)) for end in (3.0, 5.0, 6.0)]
    assert sim.work == [1.0, 2.0, 3.0]
    assert near(sim.step_time, 6.4)
    issuing = simulate(module, Costs({"A": 1.0, "B": 2.0, "C": 3.0}, network, "cpu", host_cores=1, issue=0.5))
    assert issuing.work == [1.5, 2.5, 3.5]
    assert near(issuing.step_time, sum(issuing.work))


def test_the_executors_loss_all_reduce_ends_the_step():
    """Without the free override, every rank sums the loss after its program: 2 latencies over 2 ranks."""
    module = parse_module(FUNCTIONS + SEND_AFTER_A)
    sim = simulate(module, Costs({"A": 1.0, "B": 1.0}, Network(Link(latency=0.25))))
    assert near(sim.step_time, 1.25 + 1 + 0.5)
    assert events(sim, 0, "collective") == {"all_reduce loss over world": pytest.approx((1.25, 2.75))}


# Each rank waits for the other's message before it sends its own.
DEADLOCK = "exec.process_group @pp ranks [0, 1]\n" + "".join(f"""\
exec.program @rank{r} rank {r} world 2 {{
  %s = exec.stream "compute"
  %w, %x = exec.recv from {1 - r} group @pp tag 0 on %s : {T}
  exec.wait %w on %s
  %y = exec.launch @A(%x) on %s stage {r} pass "F" microbatch 0 : ({T}) -> {T}
  %v = exec.send %y to {1 - r} group @pp tag 0 on %s : {T}
  exec.wait %v on %s
  exec.free %x, %y : {T}, {T}
}}
""" for r in range(2))


@pytest.mark.parametrize(("device", "where"), [
    ("cpu", "the host is stuck at op #2 exec.wait"),
    ("cuda", 'stream "compute" is stuck at op #1 exec.recv'),
])
def test_a_deadlock_names_each_ranks_stuck_op(device, where):
    with pytest.raises(SimulationError) as error:
        run(DEADLOCK, {"A": 1.0}, device)
    message = str(error.value)
    assert "deadlock" in message
    for rank in range(2):
        assert (f"rank {rank}: {where}" in message
                and f"transfer #0 from rank {1 - rank} to rank {rank}, not posted by rank(s) [{1 - rank}]" in message)


def test_a_task_without_a_cost_is_an_error():
    with pytest.raises(SimulationError, match="no cost for task.*@B"):
        run(SEND_AFTER_A, {"A": 1.0})


def test_flops_costs_count_matmuls():
    module = parse_module(FUNCTIONS + SEND_AFTER_A)
    costs = Costs.from_flops(module, flops_per_second=64.0)
    assert dict(costs.compute) == {"A": 2.0, "B": 2.0}  # 2 x 4 x 4 x 4 = 128 FLOPs each


def test_a_cluster_puts_ranks_on_nodes():
    network = cluster(gpus_per_node=8, intra_gbps=400, inter_gbps=50, latency_us=5)
    assert network.link("pp_0", (0, 7)) == Link(pytest.approx(5e-6), 400e9)
    assert network.link("pp_0", (7, 8)) == Link(pytest.approx(5e-6), 50e9)
    assert network.link("dp_0", range(16)).bandwidth == 50e9
    assert collective_time("all_reduce", 4000, 4, Link(1.0, 1000.0)) == 2 * 3 * (1.0 + 1.0)
    assert collective_time("all_gather", 4000, 4, Link(1.0, 1000.0)) == 3 * (1.0 + 1.0)
    assert collective_time("all_reduce", 4000, 1, Link(1.0, 1000.0)) == 0.0


# ---------------------------------------------------------------- compiled jobs


@pytest.fixture(scope="module")
def one_f_one_b():
    model, inputs = gpt.make(n_layers=2)
    compiled = piperc.compile(
        model, inputs, mesh=piperc.Mesh(pp=2),
        strategy=[piperc.pipeline(axis="pp", stages=2, microbatches=4, schedule="1f1b")],
        optimizer=piperc.optim.SGD(lr=0.05), keep_ir=False,
    )
    return compiled, inputs


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_generated_1f1b_takes_the_schedules_makespan_with_unit_costs(one_f_one_b, device):
    """F = B = 1, everything else (accumulation, update, communication) free: the programs
    run in the idealised time-slot table's makespan, (m + p - 1) x (F + B) = 10."""
    compiled, _ = one_f_one_b
    unit = {name: float(name.endswith(("_F", "_B"))) for name in _callees(compiled.module)}
    sim = compiled.simulate(Costs(unit, device=device))
    assert sim.step_time == schedules.simulate(compiled.schedule, f_time=1, b_time=1).makespan == 10
    assert sim.busy == [8.0, 8.0]
    assert sim.bubble_fraction == pytest.approx(0.2)
    assert sim.memory == compiled.memory()


def test_the_predicted_trace_opens_as_a_measured_one(one_f_one_b, tmp_path):
    """rank<r>.json in runtime.trace's format: the tasks and transfers a real run's trace
    names (tests/test_trace.py), in program order, on the same lanes; merged into trace.json."""
    compiled, _ = one_f_one_b
    unit = {name: 1.0 for name in _callees(compiled.module)}
    sim = compiled.simulate(Costs(unit, Network(Link(1e-3, 1e9))))
    paths = sim.trace(tmp_path)
    programs = sorted((p for p in compiled.module.ops if isinstance(p, ex.ProgramOp)), key=lambda p: p.rank.value.data)
    for rank, (path, program) in enumerate(zip(paths, programs, strict=True)):
        data = json.loads(path.read_text())
        assert path.name == f"rank{rank}.json" and data["otherData"] == {"piperc_trace": FORMAT, "rank": rank}
        timed = sorted((e for e in data["traceEvents"] if e["ph"] == "X"), key=lambda e: (e["ts"], e["name"]))
        lanes = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
        assert {"compute", "comm", HOST_WAITS, STEP} <= lanes
        launches = [op for op in program.body.block.ops if isinstance(op, ex.LaunchOp)]
        tasks = [e for e in timed if e["cat"] == "task"]
        assert [e["name"] for e in tasks] == [
            op.callee.root_reference.data + ("" if op.microbatch is None else f" mb{op.microbatch.value.data}")
            for op in launches]
        assert all(e["pid"] == rank and e["args"]["step"] == 0 for e in timed)
        # each stream's transfers in program order (the streams of the two directions run apart;
        # transfers in flight together on one stream are drawn on lanes "<stream> 2", ...)
        names = {e["tid"]: re.sub(r" \d+$", "", e["args"]["name"])
                 for e in data["traceEvents"] if e["name"] == "thread_name"}
        by_stream = defaultdict(list)
        for e in sorted((e for e in timed if e["cat"] == "p2p"), key=lambda e: e["ts"]):
            by_stream[names[e["tid"]]].append(e["name"])
        assert by_stream and by_stream == {s: program_transfers(program, s) for s in by_stream}
        assert [e["name"] for e in timed if e["cat"] == STEP] == ["step 0"]
    merged = json.loads((tmp_path / "trace.json").read_text())
    assert {e["pid"] for e in merged["traceEvents"] if e["ph"] == "X"} == {0, 1}


def test_profile_measures_every_task_of_a_real_run(one_f_one_b):
    compiled, inputs = one_f_one_b
    costs = piperc.profile(compiled, [inputs], steps=1, network=Network(), host_cores=2)
    assert set(costs.compute) == _callees(compiled.module)
    assert all(t > 0 for t in costs.compute.values())
    assert costs.device == "cpu" and costs.issue >= 0 and costs.p2p_delay >= 0 and costs.host_cores == 2
    assert costs.measured.steps == 1 and 0 < costs.measured.bubble_fraction < 1
    sim = compiled.simulate(costs)
    assert sim.step_time > max(costs.compute.values())


def test_calibrate_fits_a_link_to_this_machine():
    link = calibrate(world=2, sizes=(1 << 10, 1 << 20), repeats=2).intra
    assert link.latency >= 0 and 0 < link.bandwidth


def test_cli_simulate_prints_the_prediction(capsys, tmp_path):
    argv = ["simulate", "piperc.examples.gpt:make", "--set", "n_layers=2", "--mesh", "pp=2",
            "--pipeline", "stages=2,microbatches=2", "--cluster", "gpus_per_node=1,inter_gbps=10",
            "--flops-rate", "1e9", "--trace", str(tmp_path)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("predicted step: ") and "matmul FLOPs at 0.001 TFLOP/s" in out
    assert "1 ranks per node" in out and "10 GB/s between nodes" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank1.json", "trace.json"]
    assert cli_main([*argv[:-2], "--cluster", "nodes=2"]) == 2
