"""Both ranks of a 2-rank job run this program: each step launches a stage function, then
issues and waits for every kind of communication that generated programs use, one at a time.

Test hook (not something the generator emits): with PIPERC_TEST_FAULT=KIND:ACTION:RANK, rank
RANK, in step 1, stalls (ACTION `stall`: sleeps for an hour) or dies (`die`: SIGKILLs itself)
where it would issue KIND: one of `FAULT_POINTS`. `stage` is inside the stage function; `loss`
is after the program's last communication, so that the peer waits in the executor's loss
all_reduce. Before it faults, the rank writes `piperc-test-fault <time.time()>` to stderr.
"""

import os
import signal
import sys
import time

import torch

aten = torch.ops.aten

FAULT_POINTS = (
    "stage", "send", "recv", "batch_p2p", "all_reduce", "all_gather", "reduce_scatter", "all_to_all",
    "broadcast", "loss",
)
FAULT_STEP = 1


def parse_fault(value):
    """(kind, action, rank) of the hook's KIND:ACTION:RANK, or None without the hook."""
    if value is None:
        return None
    parts = value.split(":")
    if len(parts) != 3 or parts[0] not in FAULT_POINTS or parts[1] not in ("stall", "die") or not parts[2].isdigit():
        raise ValueError(
            f"PIPERC_TEST_FAULT={value!r}: expected KIND:ACTION:RANK, KIND one of {FAULT_POINTS}, "
            "ACTION stall or die"
        )
    return parts[0], parts[1], int(parts[2])


FAULT = parse_fault(os.environ.get("PIPERC_TEST_FAULT"))


def fault_point(kind, rank, step):
    """Stalls or kills this process when the hook names this point, rank and step."""
    if FAULT is None or (kind, rank, step) != (FAULT[0], FAULT[2], FAULT_STEP):
        return
    sys.stderr.write(f"piperc-test-fault {time.time()!r}\n")
    sys.stderr.flush()
    if FAULT[1] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600)


def s0_F(w, x, rank, step):
    fault_point("stage", rank, step)
    v0 = aten.mul.Tensor(x, w)
    return (aten.tanh.default(v0),)


def step(rt):
    compute = rt.stream("compute")
    comm = rt.stream("comm")
    r, peer = rt.rank, 1 - rt.rank
    n = int(rt.state("step"))
    x = rt.input(0, 0)
    with rt.launch("s0_F", 0, "F", 0, compute):
        (h,) = s0_F(rt.state("w"), x, r, n)
    # Rank 0 sends to rank 1, then rank 1 to rank 0, so a fault at either rank's send (or
    # recv) leaves its peer waiting.
    for sender in (0, 1):
        if r == sender:
            fault_point("send", r, n)
            w0 = rt.send(h, dst=peer, group="dp_0", tag=sender, stream=comm)
        else:
            fault_point("recv", r, n)
            w0, _ = rt.recv(tuple(h.shape), h.dtype, src=peer, group="dp_0", tag=sender, stream=comm)
        rt.wait(w0, stream=comm)
    fault_point("batch_p2p", r, n)
    w1, _ = rt.batch_p2p([(h, peer)], [(tuple(h.shape), h.dtype, peer)], group="dp_0", stream=comm)
    rt.wait(w1, stream=comm)
    fault_point("all_reduce", r, n)
    w2, _ = rt.all_reduce([h], group="dp_0", op="sum", stream=comm)
    rt.wait(w2, stream=comm)
    fault_point("all_gather", r, n)
    w3, _ = rt.all_gather(h, group="dp_0", dim=0, stream=comm)
    rt.wait(w3, stream=comm)
    fault_point("reduce_scatter", r, n)
    w4, _ = rt.reduce_scatter(h, group="dp_0", dim=1, op="avg", stream=comm)
    rt.wait(w4, stream=comm)
    fault_point("all_to_all", r, n)
    w5, _ = rt.all_to_all(h, group="dp_0", split_dim=1, concat_dim=0, stream=comm)
    rt.wait(w5, stream=comm)
    fault_point("broadcast", r, n)
    w6, _ = rt.broadcast(h, group="world", src=1, stream=comm)
    rt.wait(w6, stream=comm)
    rt.set_state("step", aten.add.Tensor(rt.state("step"), 1))
    rt.output("loss", aten.sum.default(h))
    fault_point("loss", r, n)
