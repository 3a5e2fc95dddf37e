"""Rank 1 of TinyMLP (fc1 -> tanh -> fc2 -> MSE) as a 2-stage pipeline, 2 microbatches.

Hand-written in the format of piperc's code generator. Stage 1: fc2 + MSE loss.
Optimizer: torch.optim.SGD(lr=0.1, momentum=0.9).

Test hook (not something the generator emits): with PIPERC_TEST_DIE_AT_STEP=N
this rank kills itself in the middle of step N, after its peer started it.
"""

import os
import signal

import torch

aten = torch.ops.aten

DIE_AT_STEP = os.environ.get("PIPERC_TEST_DIE_AT_STEP")


def s1_F(p_fc2_weight, p_fc2_bias, x_act, x_target):
    v0 = aten.t.default(p_fc2_weight)
    v1 = aten.addmm.default(p_fc2_bias, x_act, v0)
    diff = aten.sub.Tensor(v1, x_target)
    v2 = aten.mul.Tensor(diff, diff)
    loss = aten.mean.default(v2)
    return (loss, x_act, diff)


def s1_B(p_fc2_weight, saved_act, saved_diff):
    # The loss tangent is 1/2 (the mean over 2 microbatches); d mean(diff^2) / d diff
    # is 2 * diff / 16 for a 4x4 microbatch: 2 * 0.5 / 16 = 0.0625.
    g_y = aten.mul.Scalar(saved_diff, 0.0625)
    v0 = aten.t.default(g_y)
    g_fc2_weight = aten.mm.default(v0, saved_act)
    g_fc2_bias = aten.sum.dim_IntList(g_y, [0])
    g_act = aten.mm.default(g_y, p_fc2_weight)
    return (g_act, g_fc2_weight, g_fc2_bias)


def update_sgd(p, g, momentum_buffer):
    v0 = aten.mul.Scalar(momentum_buffer, 0.9)
    new_buffer = aten.add.Tensor(v0, g)
    new_p = aten.add.Tensor(p, new_buffer, alpha=-0.1)
    return (new_p, new_buffer)


def step(rt):
    compute = rt.stream("compute")
    comm = rt.stream("comm")
    # RECV_F: stage 0 -> 1, microbatch 0, stream comm
    w0, act0 = rt.recv((4, 16), torch.float32, src=0, group="pp_0", tag=0, stream=comm)
    rt.wait(w0, stream=compute)
    del w0
    rt.record_stream(act0, compute)
    if DIE_AT_STEP is not None and int(rt.state("step")) == int(DIE_AT_STEP):
        os.kill(os.getpid(), signal.SIGKILL)
    # 1F0: stage 1, forward, microbatch 0, stream compute
    t0 = rt.input(1, 0)
    with rt.on(compute):
        loss0, sv0, sv1 = s1_F(rt.state("fc2.weight"), rt.state("fc2.bias"), act0, t0)
    del act0
    # 1B0: stage 1, backward, microbatch 0, stream compute
    with rt.on(compute):
        g_act0, g0, g1 = s1_B(rt.state("fc2.weight"), sv0, sv1)
    del sv0, sv1
    e0 = rt.event_record(compute)
    rt.event_wait(comm, e0)
    # SEND_B microbatch 0 and RECV_F microbatch 1 in one batch: rank 0 issues them in the
    # opposite order, and a send may wait for its receive (NCCL), stream comm
    rt.record_stream(g_act0, comm)
    w1, (act1,) = rt.batch_p2p(
        sends=[(g_act0, 0)], recvs=[((4, 16), torch.float32, 0)], group="pp_0", stream=comm
    )
    rt.wait(w1, stream=compute)
    del w1
    rt.record_stream(act1, compute)
    # 1F1: stage 1, forward, microbatch 1, stream compute
    t1 = rt.input(1, 1)
    with rt.on(compute):
        loss1, sv2, sv3 = s1_F(rt.state("fc2.weight"), rt.state("fc2.bias"), act1, t1)
    del act1
    # 1B1: stage 1, backward, microbatch 1, stream compute
    with rt.on(compute):
        g_act1, g2, g3 = s1_B(rt.state("fc2.weight"), sv2, sv3)
    del sv2, sv3
    e1 = rt.event_record(compute)
    rt.event_wait(comm, e1)
    # SEND_B: stage 1 -> 0, microbatch 1, stream comm
    rt.record_stream(g_act1, comm)
    w3 = rt.send(g_act1, dst=0, group="pp_0", tag=3, stream=comm)
    # 1U: stage 1, optimizer update, stream compute
    with rt.on(compute):
        g_fc2_weight = aten.add.Tensor(g0, g2)
        g_fc2_bias = aten.add.Tensor(g1, g3)
        p0, m0 = update_sgd(
            rt.state("fc2.weight"), g_fc2_weight, rt.state("fc2.weight.momentum_buffer")
        )
        p1, m1 = update_sgd(rt.state("fc2.bias"), g_fc2_bias, rt.state("fc2.bias.momentum_buffer"))
        n = aten.add.Tensor(rt.state("step"), 1)
        v0 = aten.add.Tensor(loss0, loss1)
        loss = aten.mul.Scalar(v0, 0.5)
    rt.set_state("fc2.weight", p0)
    rt.set_state("fc2.weight.momentum_buffer", m0)
    rt.set_state("fc2.bias", p1)
    rt.set_state("fc2.bias.momentum_buffer", m1)
    rt.set_state("step", n)
    rt.output("loss", loss)
    rt.wait(w3, stream=comm)
    del w3, g_act0, g_act1
