"""Sequence parallelism with ring attention (`piperc.sequence_parallel(method="ring")`): the
sharding rule that keeps attention sequence split, the generated call, real runs of the GPT and
Llama examples against one device (3 AdamW steps, as tests/test_ulysses.py checks Ulysses), the
bytes ring attention sends, and the errors.

Ring attention's primitive itself (runtime/ring.py) is checked against the whole-sequence
kernel on 2 and 4 gloo ranks, causal, masked and full, forward and backward, in fp64.
"""

import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import piperc
from piperc.runtime import ring
from tests import shared
from tests.test_tensor_parallel import LLAMA_PLAN
from tests.test_ulysses import (
    ADAMW,
    GPT,
    GPT_PACKED,
    LAYERS,
    LLAMA,
    LLAMA_PACKED,
    check_trains_as_one_device,
    trainer,
)

RING = piperc.sequence_parallel(axis="sp", method="ring")
AUTO = piperc.sequence_parallel(axis="sp", method="auto")
RUNS = {
    "gpt-sp4": (GPT, piperc.Mesh(sp=4), [RING], 4),
    "llama-sp2": (LLAMA, piperc.Mesh(sp=2), [RING], 2),
    "llama-sp4": (LLAMA, piperc.Mesh(sp=4), [RING], 4),
    "gpt-sp2-packed": (GPT_PACKED, piperc.Mesh(sp=2), [RING], 2),
    "gpt-sp4-packed": (GPT_PACKED, piperc.Mesh(sp=4), [RING], 4),
    "llama-sp2-packed": (LLAMA_PACKED, piperc.Mesh(sp=2), [RING], 2),
    "llama-sp4-packed": (LLAMA_PACKED, piperc.Mesh(sp=4), [RING], 4),
    "gpt-dp2-sp2": (GPT, piperc.Mesh(dp=2, sp=2), [piperc.data_parallel(axis="dp"), RING], 4),
    "llama-pp2-sp2": (LLAMA, piperc.Mesh(pp=2, sp=2),
                      [piperc.pipeline(axis="pp", stages=2, microbatches=2), RING], 4),
    "llama-tp2-sp2": (LLAMA, piperc.Mesh(tp=2, sp=2), [piperc.tensor_parallel(axis="tp", plan=LLAMA_PLAN), RING], 2),
    "llama-sp4-auto": (LLAMA, piperc.Mesh(sp=4), [AUTO], 4),
    "gpt-sp2-packed-auto": (GPT_PACKED, piperc.Mesh(sp=2), [AUTO], 2),
}
"""example, mesh, strategy, and the slices of the one-device noise floor (sequence pieces x
replicas x microbatches), as in tests/test_ulysses.py. GPT at sp=2 is below, with SGD: under
this AdamW its blocks.1.mlp.proj.weight ends 3.6e-5 from one device against a bound of 1.7e-5
(twice the 2-slice floor), all of it one element whose step-0 gradient is -6.7e-10 (the median
is 1.3e-3), where AdamW turns the rounding of the blockwise attention into a step of about lr;
GPT at tp=2 x sp=2 ends 2.05e-5 from one device on the same parameter, against 1.7e-5."""


trained = trainer(RUNS)


@pytest.mark.parametrize("case", sorted(RUNS))
def test_trains_as_one_device(case):
    """Against one device on whole batches: 1e-5, or twice one device's error accumulating
    each batch over as many slices as the sequence and batch are cut into (AdamW)."""
    check_trains_as_one_device(RUNS, trained, case)


def test_gpt_sp2_trains_as_one_device_with_sgd():
    """GPT at sp=2 with SGD (see RUNS): within 1e-5 of one device, every loss and parameter."""
    sgd = piperc.optim.SGD(lr=0.1, momentum=0.9)
    compiled = shared.compile_(GPT, LAYERS, mesh=piperc.Mesh(sp=2), optimizer=sgd, strategy=[RING])
    result = piperc.launch(compiled, shared.setup(GPT, LAYERS).batches, timeout=240)
    assert max(shared.errors(GPT, LAYERS, sgd, result)) <= 1e-5


def test_attention_stays_sequence_split_and_runs_around_the_axis():
    """No layout cast reaches a ring attention's forward (its rule passes the sequence through
    q, k, v and its results alike), the ops are marked with their axis, and the stage functions
    call the runtime's ring attention on the axis group."""
    compiled, _ = trained("llama-sp2")
    propagated = dict(compiled.ir_after)["propagate-sharding"]
    forward = [line for line in propagated.splitlines() if '_flash_attention_for_cpu"(' in line]
    backward = [line for line in propagated.splitlines() if '_flash_attention_for_cpu_backward"(' in line]
    assert len(forward) == len(backward) == LAYERS
    assert all('piperc.ring = "sp"' in line for line in forward + backward)
    # The forward reads q, k and v as the projections made them; (a backward may receive its
    # output's gradient batch split, as propagation lays out the head's backward, and cast it.)
    assert not [line for line in propagated.splitlines()
                if "par.layout_cast" in line and "ring-attention" in line and "(F)" in line]
    source = compiled.files["rank0.py"]
    assert source.count("RT.ring_attention(") == LAYERS and source.count("RT.ring_attention_backward(") == LAYERS
    assert "where='blocks.0.attn')" in source and 'group=AXIS_GROUPS["sp"],' in source


def block_bytes(case: str) -> int:
    """Bytes of one rank's keys (or values) of one attention: [batch, heads, seq / sp, head], f32."""
    compiled, _ = trained(case)
    line = next(line for line in dict(compiled.ir_after)["localise-shapes"].splitlines()
                if '"torch.aten._scaled_dot_product_flash_attention_for_cpu"' in line)
    shape = line.split("!torch.vtensor<[")[1].split("]")[0]
    return 4 * int(torch.tensor([int(d) for d in shape.split(",")]).prod())


def test_causal_ring_sends_a_block_only_to_the_ranks_that_need_it():
    """Causal, sp=2: chunk 0's keys and values go to rank 1 (forward, and again in the backward
    with their gradient sums), chunk 1's are needed by rank 1 alone; rank 1 sends chunk 0's sums
    home. Per attention and step: rank 0 sends 6 blocks, rank 1 2, as measured."""
    _, result = trained("llama-sp2")
    block, steps = block_bytes("llama-sp2"), len(result.losses)
    for rank, blocks in ((0, 6), (1, 2)):
        sent = {k: v for k, v in result.sent_bytes[rank].items() if k.startswith("ring_attention")}
        assert sent == {f"ring_attention blocks.{i}.attn": blocks * block * steps for i in range(LAYERS)}, sent


@pytest.mark.parametrize("case", ["gpt-sp2-packed", "gpt-sp2-packed-auto"])
def test_a_pack_of_rank_local_documents_sends_nothing_for_attention(case):
    """Documents of 4 tokens, two per rank at sp=2: no query attends to another rank's keys,
    so ring attention sends 0 bytes (the mask tells each rank what it needs; the ranks share
    that in a 2-boolean all_gather), `auto` chooses ring (no Ulysses all_to_all either), and
    training still matches one device."""
    compiled, _ = trained(case)
    tokens, targets, _ = shared.setup(GPT_PACKED, LAYERS).batches[0]
    local = torch.arange(16).div(4, rounding_mode="floor").expand(tokens.shape[0], 16).contiguous()
    batches = [(tokens, targets, local)] * 2
    result = piperc.launch(compiled, batches, timeout=240)
    for rank, sent in enumerate(result.sent_bytes):
        assert sum(v for k, v in sent.items() if k.startswith(("ring_attention", "all_to_all ulysses"))) == 0, (
            rank, sent)
    model = shared.setup(GPT_PACKED, LAYERS).model
    losses, _ = piperc.reference.train_eager(model, batches, ADAMW)
    assert result.losses == pytest.approx(losses, rel=1e-5)


def test_a_sequence_the_axis_does_not_divide_is_a_compile_time_error():
    model, inputs = functools.partial(GPT.make, seq=12)(n_layers=1)
    with pytest.raises(piperc.StrategyError) as e:
        piperc.compile(model, inputs, mesh=piperc.Mesh(sp=8), strategy=[RING], optimizer=ADAMW)
    assert str(e.value) == ("sequence_parallel(axis='sp', method='ring'): model input 0 !torch.vtensor<[8,12],si64> "
                            "has sequence length 12 (dimension 1), which does not divide over the 8 devices of axis "
                            "'sp'")


# ---------------------------------------------------------------- the primitive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Group:
    def __init__(self, ranks, handle):
        self.ranks, self.handle = ranks, handle


class _Runtime:
    """What ring attention uses of `Runtime`, over the default group of a spawned job."""

    def __init__(self, rank: int, world: int):
        self.rank = rank
        self._groups = {"sp": _Group(tuple(range(world)), dist.group.WORLD)}

    def _member(self, group, what, **_):
        return self._groups[group].handle

    def _p2p_batch(self, what, ops, group, sends, recvs, sent_as):
        return dist.batch_isend_irecv(ops)

    def all_gather(self, tensor, group, dim, stream):
        pieces = [torch.empty_like(tensor) for _ in self._groups[group].ranks]
        dist.all_gather(pieces, tensor.contiguous())
        return [], torch.cat(pieces, dim)

    def wait(self, works):
        for w in works:
            w.wait()


def _check_ring(rank: int, world: int, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    b, h, s, d = 2, 4, 16, 8
    doc = torch.tensor([[0] * 3 + [1] * 7 + [2] * 6, [0] * 5 + [1] * 5 + [2] * 6])
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    masked = torch.zeros(b, 1, s, s, dtype=torch.float64).masked_fill(~allowed[:, None], float("-inf"))
    length = s // world
    rows = slice(rank * length, (rank + 1) * length)
    worst = 0.0
    for causal, mask in ((True, None), (False, masked), (False, None)):
        q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64) for _ in range(3))
        out, lse = ring._FLASH(q, k, v, 0.0, causal, attn_mask=mask)[:2]
        grad = torch.randn_like(out)
        whole = ring._FLASH_BACKWARD(grad, q, k, v, out, lse, 0.0, causal, attn_mask=mask)
        rt = _Runtime(rank, world)
        local_mask = None if mask is None else mask[:, :, rows]
        o, lse_ = ring.ring_attention(rt, q[:, :, rows], k[:, :, rows], v[:, :, rows], 0.0, causal,
                                      attn_mask=local_mask, group="sp")
        g = ring.ring_attention_backward(rt, grad[:, :, rows], q[:, :, rows], k[:, :, rows], v[:, :, rows], o, lse_,
                                         0.0, causal, attn_mask=local_mask, group="sp")
        for mine, theirs in zip((o, lse_, *g), (out, lse, *whole), strict=True):
            worst = max(worst, float((mine - theirs[:, :, rows]).abs().max()))
    errors[rank] = worst
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_the_primitive_equals_whole_sequence_attention_forward_and_backward(world):
    """Causal, a document mask with documents across rank boundaries, and no mask: each rank's
    output, log-sum-exp and gradients equal the whole-sequence kernel's rows (fp64, 1e-12)."""
    errors = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_check_ring, args=(world, _free_port(), errors), nprocs=world, start_method="spawn")
    assert len(errors) == world and max(errors.values()) < 1e-12, dict(errors)


def test_auto_chooses_per_batch_by_the_bytes_each_method_sends():
    """Causal at sp=4, ring would send up to 18 blocks per attention from one rank (a chunk goes
    on to every later rank, forward and back) and Ulysses 12 x 3/4 = 9: auto runs Ulysses inside
    the op (its all_to_alls counted under `all_to_all ulysses <where>`), no ring transfer. On the
    packed batches at sp=2 (a document across the middle), ring sends 6 blocks from rank 0 and
    Ulysses 6: the tie goes to ring."""
    _, causal = trained("llama-sp4-auto")
    assert all(not any(k.startswith("ring_attention") for k in sent) for sent in causal.sent_bytes)
    assert all(sent.get("all_to_all ulysses blocks.0.attn", 0) > 0 for sent in causal.sent_bytes)
    _, packed = trained("gpt-sp2-packed-auto")
    assert packed.sent_bytes[0].get("ring_attention blocks.0.attn", 0) > 0
    assert not any(k.startswith("all_to_all ulysses") for sent in packed.sent_bytes for k in sent)
