"""Sequence parallelism with ring attention (`piperc.sequence_parallel(method="ring")`): the
sharding rule that keeps attention sequence split, the generated call, real runs of the GPT and
Llama examples against one device (3 AdamW steps, as tests/test_ulysses.py checks Ulysses), the
bytes ring attention sends, and the errors.

Ring attention's primitive itself (runtime/ring.py) is checked against the whole-sequence
kernel on 2 and 4 gloo ranks, causal, masked and full, forward and backward, in fp64.
"""

import dataclasses
import functools
import json
import os
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import piperc
from piperc.reference import compare
from piperc.runtime import ring
from piperc.runtime import zigzag as zigzag_pieces
from piperc.runtime.comm import Group, Runtime
from piperc.runtime.manifest import local_part
from tests import shared
from tests.test_passes_ir import ir, run
from tests.test_tensor_parallel import GPT_PLAN, LLAMA_PLAN
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
CONTIGUOUS = piperc.sequence_parallel(axis="sp", method="ring", balance="contiguous")
ZIGZAG = piperc.sequence_parallel(axis="sp", method="ring", balance="zigzag")
RUNS = {
    "gpt-sp2": (GPT, piperc.Mesh(sp=2), [RING], 1),
    "gpt-sp4": (GPT, piperc.Mesh(sp=4), [RING], 1),
    "llama-sp2": (LLAMA, piperc.Mesh(sp=2), [RING], 1),
    "llama-sp4": (LLAMA, piperc.Mesh(sp=4), [RING], 1),
    "gpt-sp2-packed": (GPT_PACKED, piperc.Mesh(sp=2), [RING], 1),
    "gpt-sp4-packed": (GPT_PACKED, piperc.Mesh(sp=4), [RING], 1),
    "llama-sp2-packed": (LLAMA_PACKED, piperc.Mesh(sp=2), [RING], 1),
    "llama-sp4-packed": (LLAMA_PACKED, piperc.Mesh(sp=4), [RING], 1),
    "gpt-dp2-sp2": (GPT, piperc.Mesh(dp=2, sp=2), [piperc.data_parallel(axis="dp"), RING], 2),
    "llama-dp2-sp2": (LLAMA, piperc.Mesh(dp=2, sp=2), [piperc.data_parallel(axis="dp"), RING], 2),
    "gpt-pp2-sp2": (GPT, piperc.Mesh(pp=2, sp=2), [piperc.pipeline(axis="pp", stages=2, microbatches=2), RING], 2),
    "llama-pp2-sp2": (LLAMA, piperc.Mesh(pp=2, sp=2),
                      [piperc.pipeline(axis="pp", stages=2, microbatches=2), RING], 2),
    "gpt-tp2-sp2": (GPT, piperc.Mesh(tp=2, sp=2), [piperc.tensor_parallel(axis="tp", plan=GPT_PLAN), RING], 1),
    "llama-tp2-sp2": (LLAMA, piperc.Mesh(tp=2, sp=2), [piperc.tensor_parallel(axis="tp", plan=LLAMA_PLAN), RING], 1),
    "llama-sp4-auto": (LLAMA, piperc.Mesh(sp=4), [AUTO], 1),
    "gpt-sp2-packed-auto": (GPT_PACKED, piperc.Mesh(sp=2), [AUTO], 1),
    "llama-sp2-contiguous": (LLAMA, piperc.Mesh(sp=2), [CONTIGUOUS], 1),
    "gpt-sp4-packed-zigzag": (GPT_PACKED, piperc.Mesh(sp=4), [ZIGZAG], 1),
    "llama-sp4-auto-zigzag": (LLAMA, piperc.Mesh(sp=4),
                              [piperc.sequence_parallel(axis="sp", method="auto", balance="zigzag")], 1),
}
"""example, mesh, strategy, and the row slices of the one-device noise floor (replicas x
microbatches, each cut into the sp axis's sequence pieces), as in tests/test_ulysses.py. Ring
attention on causal inputs cuts the sequence zigzag (the default balance); on packed ones
contiguously; the last three cases choose the other way."""


trained = trainer(RUNS)


@pytest.mark.parametrize("case", sorted(RUNS))
def test_trains_as_one_device(case):
    """Against one device on whole batches: 1e-5, or twice one device's error accumulating
    each batch over as many slices as the sequence and batch are cut into (AdamW)."""
    check_trains_as_one_device(RUNS, trained, case)


def test_gpt_sp2_trains_as_one_device_with_sgd():
    """GPT at sp=2 with SGD, which needs no noise floor: within 1e-5 of one device, every loss
    and parameter."""
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
    assert "where='blocks.0.attn', zigzag=True)" in source and 'group=AXIS_GROUPS["sp"],' in source


def block_bytes(case: str) -> int:
    """Bytes of one rank's keys (or values) of one attention: [batch, heads, seq / sp, head], f32."""
    compiled, _ = trained(case)
    line = next(line for line in dict(compiled.ir_after)["localise-shapes"].splitlines()
                if '"torch.aten._scaled_dot_product_flash_attention_for_cpu"' in line)
    shape = line.split("!torch.vtensor<[")[1].split("]")[0]
    return 4 * int(torch.tensor([int(d) for d in shape.split(",")]).prod())


@pytest.mark.parametrize(("case", "blocks"), [("llama-sp2-contiguous", (6, 2)), ("llama-sp2", (8, 8))])
def test_causal_ring_sends_a_block_only_to_the_ranks_that_need_it(case, blocks):
    """Causal, sp=2, per attention and step, as measured. Contiguous: chunk 0's keys and values
    go to rank 1 (forward, and again in the backward with their gradient sums), chunk 1's are
    needed by rank 1 alone; rank 1 sends chunk 0's sums home: rank 0 sends 6 blocks, rank 1 2.
    Zigzag (rank 0 holds chunks 0 and 3 of 4, rank 1 chunks 1 and 2): each rank's queries need
    the other's keys, so each sends 8, and each computes 3 of the 6 (query, key) chunk pairs
    that causality lets through, where contiguous gives rank 0 one and rank 1 three."""
    _, result = trained(case)
    block, steps = block_bytes(case), len(result.losses)
    for rank, count in enumerate(blocks):
        sent = {k: v for k, v in result.sent_bytes[rank].items() if k.startswith("ring_attention")}
        assert sent == {f"ring_attention blocks.{i}.attn": count * block * steps for i in range(LAYERS)}, sent


def test_causal_ring_attention_cuts_the_sequence_zigzag():
    """With a causal attention and no mask, sequence-parallel declares on the mesh that sp cuts
    the sequence (16 tokens) zigzag; the positions (an arange) are cut so, the head's gathers and
    all_to_alls keep to it, and ring attention is called with zigzag=True. A packed batch's
    document mask keeps the contiguous cut."""
    compiled, _ = trained("llama-sp2")
    after = dict(compiled.ir_after)["sequence-parallel"]
    assert 'par.mesh @mesh #par.mesh<["pp"=1, "sp"=2]> {par.zigzag = {sp = 16 : i64}}' in after
    source = compiled.files["rank0.py"]
    assert source.count("zigzag=True)") >= 2 * LAYERS and 'RT.zigzag_piece(' in source
    assert json.loads(compiled.files["manifest.json"])["zigzag"] == {"sp": 16}
    # Memory: predicted = measured on every rank (a zigzag piece is a new tensor, not a view).
    _, result = trained("llama-sp2")
    assert result.peak_memory == [dataclasses.replace(p, at="") for p in compiled.memory()]
    packed, _ = trained("gpt-sp2-packed")
    assert "par.zigzag" not in dict(packed.ir_after)["sequence-parallel"] and "zigzag" not in packed.files["rank0.py"]


CAUSAL = ir("""
    builtin.module {
      func.func @main(%arg0: !torch.vtensor<[1,1,8,4],f32> {piperc.input = #builtin.int<0>}) -> (!torch.vtensor<[],f32> {piperc.loss}) {
        %0 = "torch.constant.float"() <{value = 0.000000e+00 : f64}> : () -> !torch.float
        %1 = "torch.constant.bool"() <{value = true}> : () -> !torch.bool
        %2 = "torch.constant.none"() : () -> !torch.none
        %3, %4 = "torch.aten._scaled_dot_product_flash_attention_for_cpu"(%arg0, %arg0, %arg0, %0, %1, %2, %2) : (!torch.vtensor<[1,1,8,4],f32>, !torch.vtensor<[1,1,8,4],f32>, !torch.vtensor<[1,1,8,4],f32>, !torch.float, !torch.bool, !torch.none, !torch.none) -> (!torch.vtensor<[1,1,8,4],f32>, !torch.vtensor<[1,1,8],f32>)
        %5 = "torch.aten.mean"(%3, %2) : (!torch.vtensor<[1,1,8,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
        func.return %5 : !torch.vtensor<[],f32>
      }
    }
    """)
"""A causal attention of one [1, 1, 8, 4] input with itself (the sequence is dimension 2), and
its mean as the loss."""


@pytest.mark.parametrize("balance", ["auto", "contiguous"])
def test_sequence_parallel_declares_the_zigzag_cut_on_the_mesh(balance):
    """sequence-parallel{method=ring} on a causal attention without a mask: the input split along
    the sequence, the loss whole, the attention marked ring, and (balance auto) the mesh declares
    that sp cuts the 8 positions zigzag; balance=contiguous declares nothing."""
    out = run(f'mesh{{shape="sp=2"}},sequence-parallel{{axis=sp seq-dim=2 method=ring balance={balance}}}', CAUSAL)
    zigzag = " {par.zigzag = {sp = 8 : i64}}" if balance == "auto" else ""
    assert out == ir(f"""
        builtin.module {{
          par.mesh @mesh #par.mesh<["sp"=2]>{zigzag}
          func.func @main(%arg0: !torch.vtensor<[1,1,8,4],f32> {{piperc.input = #builtin.int<0>, par.layout = #par.sharding<[[], [], ["sp"], []]>}}) -> (!torch.vtensor<[],f32> {{piperc.loss, par.layout = #par.sharding<[]>}}) {{
            %0 = "torch.constant.float"() <{{value = 0.000000e+00 : f64}}> : () -> !torch.float
            %1 = "torch.constant.bool"() <{{value = true}}> : () -> !torch.bool
            %2 = "torch.constant.none"() : () -> !torch.none
            %3, %4 = "torch.aten._scaled_dot_product_flash_attention_for_cpu"(%arg0, %arg0, %arg0, %0, %1, %2, %2) {{piperc.ring = "sp"}} : (!torch.vtensor<[1,1,8,4],f32>, !torch.vtensor<[1,1,8,4],f32>, !torch.vtensor<[1,1,8,4],f32>, !torch.float, !torch.bool, !torch.none, !torch.none) -> (!torch.vtensor<[1,1,8,4],f32>, !torch.vtensor<[1,1,8],f32>)
            %5 = "torch.aten.mean"(%3, %2) : (!torch.vtensor<[1,1,8,4],f32>, !torch.none) -> !torch.vtensor<[],f32>
            func.return %5 : !torch.vtensor<[],f32>
          }}
        }}
        """)


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


BUCKETED = ir("""
    builtin.module {
      par.mesh @mesh #par.mesh<["sp"=2]>ZIGZAG
      func.func @f(%arg0: !torch.vtensor<[8,4],f32>, %arg1: !torch.vtensor<[8,2],f32>) -> (!torch.vtensor<[16,4],f32>, !torch.vtensor<[16,2],f32>) {
        %0 = par.all_gather %arg0 over @mesh "sp" dim 0 : !torch.vtensor<[8,4],f32> -> !torch.vtensor<[16,4],f32>
        %1 = par.all_gather %arg1 over @mesh "sp" dim 0 : !torch.vtensor<[8,2],f32> -> !torch.vtensor<[16,2],f32>
        func.return %0, %1 : !torch.vtensor<[16,4],f32>, !torch.vtensor<[16,2],f32>
      }
    }
    """)
"""Two gathers of 16 rows over sp, ready at entry: one bucket, unless the mesh cuts 16 zigzag."""


@pytest.mark.parametrize("zigzag", [False, True])
def test_a_collective_of_a_zigzag_cut_joins_no_bucket(zigzag):
    """bucket-collectives merges the two gathers into one flat buffer of contiguous pieces; where
    the mesh cuts their rows zigzag, each keeps its own all_gather (which code generation calls
    with zigzag=True)."""
    declared = " {par.zigzag = {sp = 16 : i64}}" if zigzag else ""
    out = run("bucket-collectives", BUCKETED.replace("ZIGZAG", declared))
    assert out.count("par.all_gather_bucket") == (0 if zigzag else 1)
    assert out.count("par.all_gather %") == (2 if zigzag else 0)


def _reshaping_gpt():
    """A one-block GPT (sdpa) whose step views the sequence [b, s, d] as [b, s/2, 2d] and scales
    it by an arange over s/2 (the reviewer's case: the view keeps each device's rows in zigzag
    order, the arange of s/2 would be cut contiguously), then gathers two [b*s, d] values for a
    cumulative sum (two all_gathers a bucket would merge)."""
    from piperc.examples import gpt

    class Reshaping(gpt.GPT):
        def forward(self, tokens, targets):
            b, s = tokens.shape
            x = self.embed(tokens)
            h = x.view(b, s // 2, 2 * x.shape[-1])
            x = (h * (1.0 + torch.arange(s // 2, dtype=x.dtype)[None, :, None] / s)).view(b, s, -1)
            for block in self.blocks:
                x = block(x)
            d = x.shape[-1]
            c = torch.cat([x.reshape(b * s, d), torch.tanh(x).reshape(b * s, d)], 0).cumsum(0) / (2 * s)
            logits = self.head(self.norm((c[:b * s] + c[b * s:]).reshape(b, s, d)))
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    torch.manual_seed(0)
    model = Reshaping(64, 32, 1, 16, lambda: gpt.Block(32, 4))
    del model.pos
    gpt.use_sdpa(model, True)
    return model, gpt.sample_batch(64, 16, 1)


def test_a_view_of_the_sequence_keeps_the_cut_contiguous_or_is_an_error():
    """Causal ring attention would cut zigzag (balance auto), but a view of the sequence turns
    the cut into one of another length: check-zigzag withdraws the declaration, and the step
    trains as one device. Asked for (balance="zigzag"), the view is a compile-time error naming
    it."""
    model, batch = _reshaping_gpt()
    sgd = piperc.optim.SGD(lr=0.1)
    compiled = piperc.compile(model, batch, mesh=piperc.Mesh(sp=2), optimizer=sgd, strategy=[RING], keep_ir=True)
    assert "par.zigzag" in dict(compiled.ir_after)["sequence-parallel"]
    assert "par.zigzag" not in dict(compiled.ir_after)["check-zigzag"]
    result = piperc.launch(compiled, [batch] * 2, timeout=240)
    assert max(compare(result.losses, result.state_dict, *piperc.reference.train_eager(model, [batch] * 2, sgd))) < 1e-5
    with pytest.raises(piperc.StrategyError) as e:
        piperc.compile(model, batch, mesh=piperc.Mesh(sp=2), optimizer=sgd, strategy=[ZIGZAG])
    assert str(e.value) == (
        "sequence_parallel(axis='sp', method='ring', balance='zigzag'): torch.aten.view in '' (F) turns the zigzag "
        "cut of the sequence (16 long) over axis 'sp' into a cut of a dimension of another length, locally; use "
        "balance='contiguous'")


def test_state_laid_out_over_a_zigzag_cut_is_refused():
    """State is saved and gathered in contiguous boxes, so code generation refuses a state
    layout that cuts a dimension of the zigzag length over the axis ([8] on each of 2 devices
    of a 16 the mesh cuts zigzag), and takes one of another length."""
    from xdsl.dialects.builtin import DictionaryAttr, IntegerAttr, ModuleOp, f32

    from piperc.codegen import _refuse_zigzag_state
    from piperc.dialects import exec as ex
    from piperc.dialects import par
    from piperc.dialects.torch import ValueTensorType
    from piperc.errors import PassError

    mesh = par.MeshOp("mesh", par.MeshAttr([("sp", 2)]))
    mesh.attributes[par.ZIGZAG] = DictionaryAttr({"sp": IntegerAttr(16, 64)})
    states = [ex.StateOp(name, ValueTensorType([n], f32), par.ShardingAttr.split(1, 0, "sp"))
              for name, n in (("pos", 8), ("w", 4))]
    ModuleOp([mesh, *states])
    with pytest.raises(PassError, match="state pos is cut over axis 'sp' along dimension 0 of 16, which the mesh "
                                        "cuts zigzag"):
        _refuse_zigzag_state(states[0], mesh.shape)
    _refuse_zigzag_state(states[1], mesh.shape)


@pytest.mark.parametrize(("sp", "message"), [
    (8, "model input 0 !torch.vtensor<[8,12],si64> has sequence length 12 (dimension 1), which does not divide over "
        "the 8 devices of axis 'sp'"),
    (4, "a zigzag cut needs the sequence length to divide into 8 chunks (two per device of axis 'sp'), but the model "
        "inputs' sequence is 12 long; use balance='contiguous' or a length that divides"),
])
def test_a_sequence_the_axis_does_not_divide_is_a_compile_time_error(sp, message):
    """A sequence of 12 over sp=8 does not divide; over sp=4 it does, but not into the 8 chunks
    of a zigzag cut (causal ring attention's default), which balance='contiguous' then avoids."""
    model, inputs = functools.partial(GPT.make, seq=12)(n_layers=1)
    with pytest.raises(piperc.StrategyError) as e:
        piperc.compile(model, inputs, mesh=piperc.Mesh(sp=sp), strategy=[RING], optimizer=ADAMW)
    assert str(e.value) == f"sequence_parallel(axis='sp', method='ring'): {message}"
    if sp == 4:
        piperc.compile(model, inputs, mesh=piperc.Mesh(sp=sp), strategy=[CONTIGUOUS], optimizer=ADAMW)


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

    def all_gather(self, tensor, group, dim, stream, zigzag=False):
        pieces = [torch.empty_like(tensor) for _ in self._groups[group].ranks]
        dist.all_gather(pieces, tensor.contiguous())
        return [], torch.cat(pieces, dim)

    def wait(self, works):
        for w in works:
            w.wait()


def _check_ring(rank: int, world: int, port: int, zigzag: bool, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    b, h, s, d = 2, 4, 16, 8
    doc = torch.tensor([[0] * 3 + [1] * 7 + [2] * 6, [0] * 5 + [1] * 5 + [2] * 6])
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    masked = torch.zeros(b, 1, s, s, dtype=torch.float64).masked_fill(~allowed[:, None], float("-inf"))
    length = s // world

    def mine(t: torch.Tensor, dim: int = 2) -> torch.Tensor:  # this rank's piece along the sequence
        return zigzag_pieces.piece(t, dim, world, rank) if zigzag else t.narrow(dim, rank * length, length)

    worst = 0.0
    for causal, mask in ((True, None), (False, masked), (False, None)):
        q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64) for _ in range(3))
        out, lse = ring._FLASH(q, k, v, 0.0, causal, attn_mask=mask)[:2]
        grad = torch.randn_like(out)
        whole = ring._FLASH_BACKWARD(grad, q, k, v, out, lse, 0.0, causal, attn_mask=mask)
        rt = _Runtime(rank, world)
        local_mask = None if mask is None else mine(mask)
        o, lse_ = ring.ring_attention(rt, mine(q), mine(k), mine(v), 0.0, causal, attn_mask=local_mask, group="sp",
                                      zigzag=zigzag)
        g = ring.ring_attention_backward(rt, mine(grad), mine(q), mine(k), mine(v), o, lse_, 0.0, causal,
                                         attn_mask=local_mask, group="sp", zigzag=zigzag)
        for got, want in zip((o, lse_, *g), (out, lse, *whole), strict=True):
            worst = max(worst, float((got - mine(want)).abs().max()))
    errors[rank] = worst
    dist.destroy_process_group()


@pytest.mark.parametrize("zigzag", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 4])
def test_the_primitive_equals_whole_sequence_attention_forward_and_backward(world, zigzag):
    """Causal, a document mask with documents across rank boundaries, and no mask: each rank's
    output, log-sum-exp and gradients equal the whole-sequence kernel's rows (fp64, 1e-12), the
    ranks holding contiguous pieces of the sequence or zigzag ones (chunks r and 2W-1-r of 2W)."""
    errors = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_check_ring, args=(world, _free_port(), zigzag, errors), nprocs=world, start_method="spawn")
    assert len(errors) == world and max(errors.values()) < 1e-12, dict(errors)


def attention_work(world: int, zigzag: bool) -> list[float]:
    """Per rank, the (query, key) score elements ring attention computes on a causal sequence of
    16 (a causal diagonal block counting half), from the kernel calls it makes (`Ring.calls`)."""
    work = []
    for rank in range(world):
        rt = types.SimpleNamespace(rank=rank, _groups={"sp": _Group(tuple(range(world)), None)})
        plan = ring.Ring(rt, torch.empty(1, 1, 16 // world, 1), None, True, "sp", "", zigzag)
        work.append(sum((rows.stop - rows.start) * (cols.stop - cols.start) / (2 if causal else 1)
                        for c in range(world) if plan.need[rank][c] for rows, cols, causal, _ in plan.calls(c)))
    return work


def test_zigzag_gives_every_rank_the_same_causal_attention_work():
    """Causal, 16 positions: contiguous chunks leave rank r r full blocks and a diagonal one (at
    sp=4, 8 to 56 score elements); zigzag chunks give every rank 32, in 4 kernel calls at sp=2
    (its own block's three pairs, and one for the other rank's block) where contiguous makes 1
    and 2."""
    assert attention_work(4, zigzag=False) == [8, 24, 40, 56]
    assert attention_work(4, zigzag=True) == [32] * 4
    assert attention_work(2, zigzag=False) == [32, 96] and attention_work(2, zigzag=True) == [64, 64]
    for rank in range(2):
        rt = types.SimpleNamespace(rank=rank, _groups={"sp": _Group((0, 1), None)})
        plan = ring.Ring(rt, torch.empty(1, 1, 8, 1), None, True, "sp", "", True)
        assert [len(plan.calls(c)) for c in range(2)] == ([3, 1] if rank == 0 else [1, 3])


def _check_zigzag_collectives(rank: int, world: int, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(rank=rank, world_size=world, device=torch.device("cpu"), coords={"sp": rank},
                 groups={"sp": Group("sp", tuple(range(world)), dist.group.WORLD)}, timeout=30.0, input_names=[],
                 readable_inputs=[], mesh={"sp": world}, input_layouts=[], microbatches=1, state={},
                 zigzag={"sp": 8 * world})
    whole = torch.arange(3 * 8 * world * 2 * world, dtype=torch.float64).reshape(3, 8 * world, 2 * world)
    piece = rt.zigzag_piece(whole, 1, "sp")
    checks = {"piece": piece.equal(torch.cat([whole.chunk(2 * world, 1)[c] for c in (rank, 2 * world - 1 - rank)], 1))}
    work, gathered = rt.all_gather(piece, "sp", 1, None, zigzag=True)
    rt.wait(work)
    checks["all_gather"] = gathered.equal(whole)
    work, summed = rt.reduce_scatter(whole * (rank + 1), "sp", 1, "sum", None, zigzag=True)
    rt.wait(work)
    checks["reduce_scatter"] = summed.equal(piece * (world * (world + 1) // 2))
    work, heads = rt.all_to_all(piece, "sp", split_dim=2, concat_dim=1, stream=None, zigzag=(False, True))
    rt.wait(work)
    checks["all_to_all to whole"] = heads.equal(whole.chunk(world, 2)[rank])
    work, back = rt.all_to_all(heads, "sp", split_dim=1, concat_dim=2, stream=None, zigzag=(True, False))
    rt.wait(work)
    checks["all_to_all back"] = back.equal(piece)
    errors[rank] = [name for name, ok in checks.items() if not ok]
    dist.destroy_process_group()


def test_collectives_keep_to_zigzag_pieces():
    """On 4 gloo ranks, along a dimension the mesh cuts zigzag: each rank's piece is its chunks
    r and 2W-1-r; all_gather puts the pieces back in natural order; reduce_scatter leaves each
    rank the sum's piece; all_to_all from the pieces to a whole sequence (split another
    dimension) and back."""
    errors = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_check_zigzag_collectives, args=(4, _free_port(), errors), nprocs=4, start_method="spawn")
    assert dict(errors) == {r: [] for r in range(4)}


def test_zigzag_pieces_and_the_input_cut():
    """Chunks r and 2W-1-r of 2W: the pieces in rank order and back, and the runtime's input cut
    (`local_part`) over a zigzag axis next to a contiguous one, outermost first."""
    assert zigzag_pieces.order(2) == [0, 3, 1, 2] and zigzag_pieces.order(4) == [0, 7, 1, 6, 2, 5, 3, 4]
    x = torch.arange(16)
    assert zigzag_pieces.piece(x, 0, 4, 1).tolist() == [2, 3, 12, 13]
    assert zigzag_pieces.to_ranks(x, 0, 4).tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert zigzag_pieces.from_ranks(zigzag_pieces.to_ranks(x, 0, 4), 0, 4).equal(x)
    tokens = torch.arange(32).reshape(2, 16)
    part = local_part(tokens, (("dp",), ("sp",)), {"dp": 2, "sp": 2}, {"dp": 1, "sp": 0}, {"sp": 16})
    assert part.tolist() == [[16, 17, 18, 19, 28, 29, 30, 31]]
    assert local_part(tokens, ((), ("sp", "tp")), {"sp": 2, "tp": 2}, {"sp": 1, "tp": 1}, {"sp": 16}).tolist() == [
        [8, 9, 10, 11], [24, 25, 26, 27]]


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
