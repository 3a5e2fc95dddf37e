"""Rank 0 of TinyMLP (fc1 -> tanh -> fc2 -> MSE) as a 2-stage pipeline, 2 microbatches.

Hand-written in the format of piperc's code generator. Stage 0: fc1 + tanh.
Optimizer: torch.optim.SGD(lr=0.1, momentum=0.9).
"""

import torch

aten = torch.ops.aten


def s0_F(p_fc1_weight, p_fc1_bias, x_x):
    v0 = aten.t.default(p_fc1_weight)
    v1 = aten.addmm.default(p_fc1_bias, x_x, v0)
    act = aten.tanh.default(v1)
    return (act, x_x, act)


def s0_B(saved_x, saved_act, g_act):
    v0 = aten.mul.Tensor(saved_act, saved_act)
    v1 = aten.rsub.Scalar(v0, 1)
    v2 = aten.mul.Tensor(g_act, v1)
    v3 = aten.t.default(v2)
    g_fc1_weight = aten.mm.default(v3, saved_x)
    g_fc1_bias = aten.sum.dim_IntList(v2, [0])
    return (g_fc1_weight, g_fc1_bias)


def update_sgd(p, g, momentum_buffer):
    v0 = aten.mul.Scalar(momentum_buffer, 0.9)
    new_buffer = aten.add.Tensor(v0, g)
    new_p = aten.add.Tensor(p, new_buffer, alpha=-0.1)
    return (new_p, new_buffer)


def step(rt):
    compute = rt.stream("compute")
    comm = rt.stream("comm")
    # 0F0: stage 0, forward, microbatch 0, stream compute
    x0 = rt.input(0, 0)
    with rt.on(compute):
        act0, sv0, sv1 = s0_F(rt.state("fc1.weight"), rt.state("fc1.bias"), x0)
    e0 = rt.event_record(compute)
    rt.event_wait(comm, e0)
    # SEND_F: stage 0 -> 1, microbatch 0, stream comm
    rt.record_stream(act0, comm)
    w0 = rt.send(act0, dst=1, group="pp_0", tag=0, stream=comm)
    # 0F1: stage 0, forward, microbatch 1, stream compute
    x1 = rt.input(0, 1)
    with rt.on(compute):
        act1, sv2, sv3 = s0_F(rt.state("fc1.weight"), rt.state("fc1.bias"), x1)
    e1 = rt.event_record(compute)
    rt.event_wait(comm, e1)
    # SEND_F microbatch 1 and RECV_B microbatch 0 in one batch: rank 1 issues them in the
    # opposite order, and a send may wait for its receive (NCCL), stream comm
    rt.record_stream(act1, comm)
    w1, (g_act0,) = rt.batch_p2p(
        sends=[(act1, 1)], recvs=[((4, 16), torch.float32, 1)], group="pp_0", stream=comm
    )
    rt.wait(w1, stream=compute)
    del w1
    rt.record_stream(g_act0, compute)
    # 0B0: stage 0, backward, microbatch 0, stream compute
    with rt.on(compute):
        g0, g1 = s0_B(sv0, sv1, g_act0)
    del sv0, sv1, g_act0
    # RECV_B: stage 1 -> 0, microbatch 1, stream comm
    w3, g_act1 = rt.recv((4, 16), torch.float32, src=1, group="pp_0", tag=3, stream=comm)
    rt.wait(w3, stream=compute)
    del w3
    rt.record_stream(g_act1, compute)
    # 0B1: stage 0, backward, microbatch 1, stream compute
    with rt.on(compute):
        g2, g3 = s0_B(sv2, sv3, g_act1)
        g_fc1_weight = aten.add.Tensor(g0, g2)
        g_fc1_bias = aten.add.Tensor(g1, g3)
    del sv2, sv3, g_act1, g0, g1, g2, g3
    # 0U: stage 0, optimizer update, stream compute
    with rt.on(compute):
        p0, m0 = update_sgd(
            rt.state("fc1.weight"), g_fc1_weight, rt.state("fc1.weight.momentum_buffer")
        )
        p1, m1 = update_sgd(rt.state("fc1.bias"), g_fc1_bias, rt.state("fc1.bias.momentum_buffer"))
        n = aten.add.Tensor(rt.state("step"), 1)
    rt.set_state("fc1.weight", p0)
    rt.set_state("fc1.weight.momentum_buffer", m0)
    rt.set_state("fc1.bias", p1)
    rt.set_state("fc1.bias.momentum_buffer", m1)
    rt.set_state("step", n)
    rt.wait(w0, stream=comm)
    del w0, act0, act1
