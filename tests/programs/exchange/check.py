"""Both ranks exchange tensors with one batched p2p and count live activation bytes.

Both ranks run this program. A send and a receive issued together
(`rt.batch_p2p`) is how two pipeline stages exchange a forward activation and
a backward gradient that they issue in opposite orders: one send alone could
wait for a receive the peer has not posted. Rank r's "stage" makes
a = (r + 1) * ones(4, 16) (256 bytes), a view of a, and b = 2 * a[0] (64 bytes);
it sends a and b to its peer, receives the peer's, and records the received
tensors on the stream that reads them. Live bytes: 320 after the launch (the
view shares a's storage), 640 with the received tensors, 0 once all are freed.
The loss output is the sum of input 0 on rank 0.
"""

import torch

aten = torch.ops.aten


def stage(rank):
    a = torch.full((4, 16), float(rank + 1))
    return a, a[:2], aten.mul.Scalar(a[0], 2)


def check(what, actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def step(rt):
    compute = rt.stream("compute")
    comm = rt.stream("comm")
    peer = 1 - rt.rank
    with rt.on(compute):
        a, a_rows, b = stage(rt.rank)
    rt.produced(a, a_rows, b)
    assert rt.live_bytes == 320, rt.live_bytes
    ready = rt.event_record(compute)
    rt.event_wait(comm, ready)
    rt.record_stream(a, comm)
    rt.record_stream(b, comm)
    w0, (ra, rb) = rt.batch_p2p(
        sends=[(a, peer), (b, peer)],
        recvs=[((4, 16), torch.float32, peer), ((16,), torch.float32, peer)],
        group="pp_0",
        stream=comm,
    )
    rt.wait(w0, stream=compute)
    del w0
    rt.record_stream(ra, compute)
    rt.record_stream(rb, compute)
    assert rt.live_bytes == 640, rt.live_bytes
    check("received activation", ra, torch.full((4, 16), float(peer + 1)))
    check("received row", rb, torch.full((16,), 2.0 * (peer + 1)))
    rt.free(a, a_rows, b)
    del a, a_rows, b
    rt.free(ra, rb)
    del ra, rb
    assert rt.live_bytes == 0, rt.live_bytes
    if rt.rank == 0:
        rt.output("loss", aten.sum.default(rt.input(0, 0)))
