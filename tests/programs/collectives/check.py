"""Runs every communication of the runtime on 2 ranks and checks each result.

Both ranks run this program. Rank r contributes t_r = (r + 1) * arange(24).view(2, 3, 4);
a wrong result raises AssertionError, which fails the step. The loss output is the
sum of this rank's slice of input 0, so the reported loss is the sum of the input.
"""

import torch

aten = torch.ops.aten


def contribution(rank):
    return torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) * (rank + 1)


def check(what, actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def step(rt):
    comm = rt.stream("comm")
    assert rt.world_size == 2 and rt.coords == {"dp": rt.rank}, (rt.world_size, rt.coords)
    t = [contribution(r) for r in (0, 1)]
    total = t[0] + t[1]
    mine = t[rt.rank]
    w0, (s, s0) = rt.all_reduce([mine, mine[0]], group="dp_0", op="sum", stream=comm)
    w1, (a,) = rt.all_reduce([mine], group="world", op="avg", stream=comm)
    w2, (mx,) = rt.all_reduce([mine], group="dp_0", op="max", stream=comm)
    w3, g0 = rt.all_gather(mine, group="dp_0", dim=0, stream=comm)
    w4, g1 = rt.all_gather(mine, group="dp_0", dim=1, stream=comm)
    w5, rs0 = rt.reduce_scatter(mine, group="dp_0", dim=0, op="sum", stream=comm)
    w6, rs2 = rt.reduce_scatter(mine, group="dp_0", dim=2, op="avg", stream=comm)
    w7, a2a = rt.all_to_all(mine, group="dp_0", split_dim=2, concat_dim=1, stream=comm)
    w8, b = rt.broadcast(mine, group="world", src=1, stream=comm)
    rt.wait(w0, w1, w2, w3, w4, w5, w6, w7, w8, stream=comm)
    check("all_reduce sum", s, total)
    check("all_reduce sum, second tensor of the bucket", s0, total[0])
    check("all_reduce avg", a, total / 2)
    check("all_reduce max", mx, torch.maximum(t[0], t[1]))
    check("all_gather dim 0", g0, torch.cat(t, 0))
    check("all_gather dim 1", g1, torch.cat(t, 1))
    check("reduce_scatter sum dim 0", rs0, total.chunk(2, 0)[rt.rank])
    check("reduce_scatter avg dim 2", rs2, (total / 2).chunk(2, 2)[rt.rank])
    check("all_to_all split 2 concat 1", a2a, torch.cat([x.chunk(2, 2)[rt.rank] for x in t], 1))
    check("broadcast from rank 1", b, t[1])
    check("inputs of collectives are left unchanged", mine, contribution(rt.rank))
    # Transfers between two ranks match in issue order (NCCL has no tags).
    if rt.rank == 0:
        w9 = rt.send(mine, dst=1, group="dp_0", tag=5, stream=comm)
        w10 = rt.send(aten.mul.Scalar(mine, 10), dst=1, group="dp_0", tag=6, stream=comm)
        rt.wait(w9, w10, stream=comm)
    else:
        w9, r5 = rt.recv((2, 3, 4), torch.float32, src=0, group="dp_0", tag=5, stream=comm)
        w10, r6 = rt.recv((2, 3, 4), torch.float32, src=0, group="dp_0", tag=6, stream=comm)
        rt.wait(w9, w10, stream=comm)
        check("first recv", r5, t[0])
        check("second recv", r6, t[0] * 10)
    # Only the lowest owner's copy of a replicated parameter is reported by state_dict().
    rt.set_state("w", aten.add.Tensor(rt.state("w"), rt.rank))
    x = rt.input(0, 0)
    rt.output("loss", aten.sum.default(x))
