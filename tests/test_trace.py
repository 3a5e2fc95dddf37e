"""Timelines of real runs (`piperc.launch(..., trace=dir)`), in the Chrome trace format that
`piperc.runtime.trace` documents: one file per rank, the program's tasks in order, its
transfers with their peers, and the waits."""

import json
from collections import Counter, defaultdict

import piperc
from piperc.dialects import exec as ex
from piperc.examples import gpt
from piperc.reference import compare, train_eager
from piperc.runtime.executor import default_trace
from piperc.runtime.trace import Trace, task_name

OPT = piperc.optim.SGD(lr=0.05, momentum=0.9)
STEPS = 2


def timed(data: dict) -> list[dict]:
    """The complete events of a trace file, in order of start."""
    return sorted((e for e in data["traceEvents"] if e["ph"] == "X"), key=lambda e: e["ts"])


def lanes(data: dict) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}


def program_transfers(program: ex.ProgramOp, stream: str | None = None) -> list[str]:
    """The p2p event names a rank's program issues (on `stream`, when given), in order: a
    send is named after the launch that made its tensor."""
    def send(value, peer: int) -> str:
        launch = value.owner
        return f"send {task_name(launch.callee.root_reference.data, launch.microbatch.value.data)} -> {peer}"

    names = []
    for op in program.body.block.ops:
        if stream is not None and getattr(op, "stream", None) is not None and op.stream.owner.stream_name.data != stream:
            continue
        if isinstance(op, ex.SendOp):
            names.append(send(op.input, op.peer.value.data))
        elif isinstance(op, ex.RecvOp):
            names.append(f"recv <- {op.peer.value.data}")
        elif isinstance(op, ex.BatchP2POp):
            parts = [send(v, peer) for v, peer in op.send_list()]
            names.append(", ".join(parts + [f"recv <- {peer}" for _, peer in op.recv_list()]))
    return names


def test_a_traced_1f1b_run_writes_each_ranks_tasks_transfers_and_waits(tmp_path):
    model, inputs = gpt.make(n_layers=2)
    compiled = piperc.compile(
        model, inputs, mesh=piperc.Mesh(pp=2),
        strategy=[piperc.pipeline(axis="pp", stages=2, microbatches=2, schedule="1f1b")],
        optimizer=OPT, keep_ir=False,
    )
    batches = [gpt.make(n_layers=2, seed=10 + s)[1] for s in range(STEPS)]
    result = piperc.launch(compiled, batches, trace=tmp_path / "trace")

    losses, state = train_eager(model, batches, OPT)
    assert max(compare(result.losses, result.state_dict, losses, state)) <= 1e-5
    expected_tasks = {
        0: ["s0_F mb0", "s0_F mb1", "s0_B mb0", "s0_B mb1", "s0_B_accumulate mb1", "s0_update"],
        1: ["s1_F mb0", "s1_B mb0", "s1_F mb1", "s1_F_accumulate mb1", "s1_B mb1", "s1_B_accumulate mb1",
            "s1_update"],
    }
    expected_transfers = {
        0: ["send s0_F mb0 -> 1", "send s0_F mb1 -> 1", "recv <- 1", "recv <- 1"],
        1: ["recv <- 0", "send s1_B mb0 -> 0", "recv <- 0", "send s1_B mb1 -> 0"],
    }
    programs = {p.rank.value.data: p for p in compiled.module.walk() if isinstance(p, ex.ProgramOp)}
    for rank, program in programs.items():
        data = json.loads((tmp_path / "trace" / f"rank{rank}.json").read_text())
        events = timed(data)
        assert {"compute", "comm", "host waits", "step"} <= set(lanes(data).values())
        assert all(e["pid"] == rank and e["dur"] >= 0 for e in events)
        launches = [task_name(op.callee.root_reference.data, None if op.microbatch is None else op.microbatch.value.data)
                    for op in program.walk() if isinstance(op, ex.LaunchOp)]
        assert launches == expected_tasks[rank]
        assert program_transfers(program) == expected_transfers[rank]
        assert [e["name"] for e in events if e["cat"] == "step"] == [f"step {s}" for s in range(STEPS)]
        for step in range(STEPS):
            in_step = [e for e in events if e["args"]["step"] == step]
            tasks = [e for e in in_step if e["cat"] == "task"]
            assert [e["name"] for e in tasks] == launches
            assert all(e["args"]["stage"] == rank and e["args"]["pass"] in ("F", "B", "update") for e in tasks)
            transfers = [e for e in in_step if e["cat"] == "p2p"]
            assert [e["name"] for e in transfers] == expected_transfers[rank]
            assert all(e["args"]["peers"] == [1 - rank] and e["args"]["bytes"] > 0 for e in transfers)
            # Each communication ends when the host's wait for it returns (the k-th of a name
            # at the k-th wait for that name).
            waits = defaultdict(list)
            for e in in_step:
                if e["cat"] == "wait":
                    waits[e["name"]].append(e["ts"] + e["dur"])
            seen = Counter()
            for e in transfers:
                assert abs(waits[f"wait {e['name']}"][seen[e["name"]]] - (e["ts"] + e["dur"])) < 1e-3
                seen[e["name"]] += 1
    merged = json.loads((tmp_path / "trace" / "trace.json").read_text())
    assert {e["pid"] for e in timed(merged)} == {0, 1}


def test_crossing_events_go_to_a_lane_of_their_own_and_nested_ones_stay():
    trace = Trace(3)
    for name, start, end in [("a", 0, 10), ("b", 5, 15), ("c", 11, 14), ("d", 6, 9), ("e", 9, 12)]:
        trace.complete(name, "p2p", "comm", start, end, {})
    data = trace.to_json()
    assert [lanes(data)[e["tid"]] for e in timed(data)] == ["comm", "comm 2", "comm", "comm 2", "comm"]
    assert {e["pid"] for e in data["traceEvents"]} == {3}


def test_PIPERC_TRACE_turns_tracing_on(monkeypatch, tmp_path):
    monkeypatch.delenv("PIPERC_TRACE", raising=False)
    assert default_trace() is None
    monkeypatch.setenv("PIPERC_TRACE", str(tmp_path))
    assert default_trace() == tmp_path
