"""Rank 0 of TinyMLP (fc1 -> tanh -> fc2 -> MSE) with data parallelism dp=2, 2 microbatches.

Hand-written in the format of piperc's code generator. Gradients are summed over
dp_0 in two buckets; the loss tangent 1/4 (2 replicas x 2 microbatches) makes the
sum the gradient of the global mean loss. Optimizer: torch.optim.SGD(lr=0.1, momentum=0.9).
"""

import torch

aten = torch.ops.aten


def s0_F(p_fc1_weight, p_fc1_bias, p_fc2_weight, p_fc2_bias, x_x, x_target):
    v0 = aten.t.default(p_fc1_weight)
    v1 = aten.addmm.default(p_fc1_bias, x_x, v0)
    h = aten.tanh.default(v1)
    v2 = aten.t.default(p_fc2_weight)
    v3 = aten.addmm.default(p_fc2_bias, h, v2)
    diff = aten.sub.Tensor(v3, x_target)
    v4 = aten.mul.Tensor(diff, diff)
    loss = aten.mean.default(v4)
    return (loss, x_x, h, diff)


def s0_B(p_fc2_weight, saved_x, saved_h, saved_diff):
    # Tangent 1/4; d mean(diff^2) / d diff = 2 * diff / 8 for a 2x4 microbatch.
    g_y = aten.mul.Scalar(saved_diff, 0.0625)
    v0 = aten.t.default(g_y)
    g_fc2_weight = aten.mm.default(v0, saved_h)
    g_fc2_bias = aten.sum.dim_IntList(g_y, [0])
    g_h = aten.mm.default(g_y, p_fc2_weight)
    v1 = aten.mul.Tensor(saved_h, saved_h)
    v2 = aten.rsub.Scalar(v1, 1)
    g_z = aten.mul.Tensor(g_h, v2)
    v3 = aten.t.default(g_z)
    g_fc1_weight = aten.mm.default(v3, saved_x)
    g_fc1_bias = aten.sum.dim_IntList(g_z, [0])
    return (g_fc1_weight, g_fc1_bias, g_fc2_weight, g_fc2_bias)


def update_sgd(p, g, momentum_buffer):
    v0 = aten.mul.Scalar(momentum_buffer, 0.9)
    new_buffer = aten.add.Tensor(v0, g)
    new_p = aten.add.Tensor(p, new_buffer, alpha=-0.1)
    return (new_p, new_buffer)


def step(rt):
    compute = rt.stream("compute")
    comm = rt.stream("comm")
    params = [rt.state(n) for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    # 0F0: stage 0, forward, microbatch 0, stream compute
    x0 = rt.input(0, 0)
    t0 = rt.input(1, 0)
    with rt.on(compute):
        loss0, sv0, sv1, sv2 = s0_F(*params, x0, t0)
    # 0B0: stage 0, backward, microbatch 0, stream compute
    with rt.on(compute):
        g0, g1, g2, g3 = s0_B(params[2], sv0, sv1, sv2)
    del sv0, sv1, sv2
    # 0F1: stage 0, forward, microbatch 1, stream compute
    x1 = rt.input(0, 1)
    t1 = rt.input(1, 1)
    with rt.on(compute):
        loss1, sv3, sv4, sv5 = s0_F(*params, x1, t1)
    # 0B1: stage 0, backward, microbatch 1, stream compute
    with rt.on(compute):
        g4, g5, g6, g7 = s0_B(params[2], sv3, sv4, sv5)
        g_fc2_weight = aten.add.Tensor(g2, g6)
        g_fc2_bias = aten.add.Tensor(g3, g7)
    del sv3, sv4, sv5
    e0 = rt.event_record(compute)
    rt.event_wait(comm, e0)
    # bucket 0: fc2 gradients, sum over dp_0, stream comm
    w0, (r0, r1) = rt.all_reduce([g_fc2_weight, g_fc2_bias], group="dp_0", op="sum", stream=comm)
    with rt.on(compute):
        g_fc1_weight = aten.add.Tensor(g0, g4)
        g_fc1_bias = aten.add.Tensor(g1, g5)
    e1 = rt.event_record(compute)
    rt.event_wait(comm, e1)
    # bucket 1: fc1 gradients, sum over dp_0, stream comm
    w1, (r2, r3) = rt.all_reduce([g_fc1_weight, g_fc1_bias], group="dp_0", op="sum", stream=comm)
    rt.wait(w0, w1, stream=comm)
    del w0, w1
    e2 = rt.event_record(comm)
    rt.event_wait(compute, e2)
    # 0U: stage 0, optimizer update, stream compute
    with rt.on(compute):
        p0, m0 = update_sgd(params[0], r2, rt.state("fc1.weight.momentum_buffer"))
        p1, m1 = update_sgd(params[1], r3, rt.state("fc1.bias.momentum_buffer"))
        p2, m2 = update_sgd(params[2], r0, rt.state("fc2.weight.momentum_buffer"))
        p3, m3 = update_sgd(params[3], r1, rt.state("fc2.bias.momentum_buffer"))
        n = aten.add.Tensor(rt.state("step"), 1)
        v0 = aten.add.Tensor(loss0, loss1)
        loss = aten.mul.Scalar(v0, 0.25)
    rt.set_state("fc1.weight", p0)
    rt.set_state("fc1.weight.momentum_buffer", m0)
    rt.set_state("fc1.bias", p1)
    rt.set_state("fc1.bias.momentum_buffer", m1)
    rt.set_state("fc2.weight", p2)
    rt.set_state("fc2.weight.momentum_buffer", m2)
    rt.set_state("fc2.bias", p3)
    rt.set_state("fc2.bias.momentum_buffer", m3)
    rt.set_state("step", n)
    rt.output("loss", loss)
