"""Ring attention: scaled-dot-product attention over a sequence split across a group of ranks.

Each rank of the group holds one block of every sequence (block i on the rank at position i:
one contiguous chunk, or two under a zigzag cut, below): its queries, keys and values,
`[batch, heads, L, head]`. A rank's queries attend
to the keys of chunk c when the mask allows some pair of them (`need[i][c]`): under a causal
mask chunk c <= i, under a given mask `[batch, 1|heads, L, S]` (its columns are the whole
sequence's keys) where that mask's block of chunk c allows anything. Every rank learns every
other's needs first (an all_gather of W booleans per rank).

The keys and values of chunk c travel around the ring from its owner, c -> c+1 -> ..., as far
as the last rank that needs them, and no further: at step j a rank holds chunk (i - j) mod W
while that chunk's path reaches it. The next step's transfer is posted before the current
block is computed, so communication overlaps computation. A rank computes a block only when
it needs it (`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` on the block, with the
causal flag on its own chunk or the mask's block), and merges the partial results by
log-sum-exp. A pack of documents that each lie within one rank needs no block of another
rank: nothing travels.

The backward walks the same paths: each rank adds its contribution to the gradient of the
keys and values of the block it holds (the kernel's backward with the whole attention's output
and log-sum-exp, which makes each block's contribution exact) and passes that sum on with the
block; the last rank on a chunk's path sends it to the owner. The queries' gradient is the sum
of the rank's blocks'.

Under a zigzag cut (`zigzag=True`, `runtime/zigzag.py`) rank i's block is chunks i and 2W-1-i
of 2W. A block's needs and path are as above, and within a block a rank computes each pair of
its query chunk and the block's key chunk that causality (or the mask) lets through, the
diagonal pairs causal (pairs that share a piece in full are one kernel call): under a causal
mask every rank computes the same number of pairs.

Bytes sent are counted in `Runtime.sent_bytes` under `ring_attention <where>`.
Standard library and torch only, like the rest of the runtime.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import zigzag as zigzag_pieces

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class Ring:
    """One ring attention call's view of its group: positions, needs and paths.

    Rank i's block is what it holds of the sequence: chunk i of W (contiguous), or under
    `zigzag` chunks i and 2W-1-i of 2W (`runtime/zigzag.py`), its two pieces. Needs and paths
    are per block; the attention itself is computed per pair of pieces (`pairs`, `calls`)."""

    def __init__(self, rt, q: torch.Tensor, mask: torch.Tensor | None, causal: bool, group: str, where: str,
                 zigzag: bool = False):
        self.rt = rt
        self.group = group
        self.ranks = rt._groups[group].ranks
        self.size = len(self.ranks)
        self.index = self.ranks.index(rt.rank)
        self.length = q.shape[-2]
        self.zigzag = zigzag
        self.piece = self.length // 2 if zigzag else self.length  # the rows of one chunk
        self.mask = mask
        self.causal = causal
        self.key = f"ring_attention {where}" if where else "ring_attention"
        self._pairs: dict[int, list] = {}  # block -> `pairs`, each scanned from the mask once
        self.need = self._needs()
        # how many ranks chunk c visits: from its owner to the last rank that needs it
        self.path = [1 + max(d for d in range(self.size) if self.need[(c + d) % self.size][c])
                     for c in range(self.size)]

    def chunks(self, c: int) -> tuple[int, ...]:
        """The chunks of the sequence that block c holds, in order (their positions in it)."""
        return zigzag_pieces.chunks_of(self.size, c) if self.zigzag else (c,)

    def pairs(self, c: int) -> list[tuple[int, int, bool, torch.Tensor | None]]:
        """The pieces of this rank's queries and of block c's keys to attend: (query piece, key
        piece, is_causal, attn_mask) for each pair the mask lets through. This rank's own pairs
        of equal chunks always come, so that every query row has a part."""
        if c in self._pairs:
            return self._pairs[c]
        out = self._pairs[c] = []
        for k, a in enumerate(self.chunks(self.index)):
            for j, b in enumerate(self.chunks(c)):
                own = a == b
                if self.mask is not None:
                    mask = self.mask[..., k * self.piece:(k + 1) * self.piece, b * self.piece:(b + 1) * self.piece]
                    if own or _allows(mask):
                        out.append((k, j, False, mask))
                elif own or not self.causal or b < a:
                    out.append((k, j, self.causal and own, None))
        return out

    def calls(self, c: int) -> list[tuple[slice, slice, bool, torch.Tensor | None]]:
        """The kernel calls for this rank's queries against block c: (query rows, key rows,
        is_causal, attn_mask), one per pair of `pairs`, except that under a zigzag cut without a
        mask a query piece that attends to both of the block's pieces in full is one call, and
        so is a key piece both query pieces attend to in full (a block of an earlier rank gives
        one call, of a later rank one, this rank's own three)."""
        pairs = self.pairs(c)
        if self.mask is not None or not self.zigzag:
            return [(self.rows(k), self.rows(j), causal, mask) for k, j, causal, mask in pairs]
        full = {(k, j) for k, j, causal, _ in pairs if not causal}
        whole, out, done = slice(0, self.length), [], set()
        for k in (0, 1):
            if {(k, 0), (k, 1)} <= full:
                out.append((self.rows(k), whole, False, None))
                done |= {(k, 0), (k, 1)}
        for j in (0, 1):
            if {(0, j), (1, j)} <= full - done:
                out.append((whole, self.rows(j), False, None))
                done |= {(0, j), (1, j)}
        return out + [(self.rows(k), self.rows(j), causal, None) for k, j, causal, _ in pairs if (k, j) not in done]

    def _needs(self) -> list[list[bool]]:
        """need[i][c]: whether rank i's queries attend to some key of block c."""
        W, i = self.size, self.index
        if self.mask is None:
            return [[not self.causal or any(b <= a for a in self.chunks(r) for b in self.chunks(c)) for c in range(W)]
                    for r in range(W)]
        mine = torch.tensor([bool(self.pairs(c)) for c in range(W)], dtype=torch.uint8)
        mine[i] = 1  # its own block: always held, never sent
        work, gathered = self.rt.all_gather(mine.to(self.mask.device), self.group, 0, None)
        self.rt.wait(work)
        return [[bool(x) for x in gathered[r * W:(r + 1) * W].tolist()] for r in range(W)]

    def ring_bytes(self, block: int) -> int:
        """The most bytes a rank sends for one attention's forward and backward by ring, for
        blocks (keys or values) of `block` bytes: per hop two blocks forward and four back (the
        blocks and their gradient sums), and the sums a path's last rank sends home."""
        sent = [0] * self.size
        for c in range(self.size):
            for d in range(self.path[c] - 1):
                sent[(c + d) % self.size] += 6 * block
            if self.path[c] > 1:
                sent[(c + self.path[c] - 1) % self.size] += 2 * block
        return max(sent)

    def ulysses_bytes(self, block: int) -> int:
        """The bytes a rank sends for one attention's forward and backward by Ulysses: eight
        all_to_alls of a block (q, k, v, the output; then the output's gradient and dq, dk,
        dv) and four more in the backward (q, k, v and the output again), each keeping 1/W."""
        return 12 * block * (self.size - 1) // self.size

    def rows(self, k: int) -> slice:
        """The rows (along the sequence) of piece k of a block."""
        return slice(k * self.piece, (k + 1) * self.piece)

    def holds(self, c: int, step: int) -> bool:
        """Whether this rank holds chunk c at ring step `step` (c = index - step)."""
        return step < self.path[c]

    def exchange(self, send: list[torch.Tensor] | None, recv_like: list[torch.Tensor] | None, what: str):
        """Posts sending `send` to the next rank and receiving tensors like `recv_like` from the
        previous one, together; returns (work or None, the receive buffers)."""
        nxt, prev = self.ranks[(self.index + 1) % self.size], self.ranks[(self.index - 1) % self.size]
        return self.post([(t, nxt) for t in send or []], [(t, prev) for t in recv_like or []], what)

    def post(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], what: str):
        """Posts the sends (tensor, global rank) and receives (a tensor like the one to come,
        global rank) together, over the group; returns (work or None, the receive buffers)."""
        handle = self.rt._member(self.group, what)
        sent = [(t.contiguous(), peer) for t, peer in sends]
        received = [(torch.empty_like(t, memory_format=torch.contiguous_format), peer) for t, peer in recvs]
        ops = [dist.P2POp(dist.isend, t, peer, group=handle) for t, peer in sent]
        ops += [dist.P2POp(dist.irecv, b, peer, group=handle) for b, peer in received]
        buffers = [b for b, _ in received]
        if not ops:
            return None, buffers
        return self.rt._p2p_batch(what, ops, self.group, sent, received, self.key), buffers


def _allows(mask: torch.Tensor) -> bool:
    """Whether a block of a mask (boolean, or additive with -inf) allows any (query, key) pair."""
    if mask.dtype == torch.bool:
        return bool(mask.any())
    return bool((mask > float("-inf")).any())


def _merge(out, lse, part, part_lse):
    """The log-sum-exp merge of two partial attentions (out, lse) and (part, part_lse); rows a
    block's mask hides entirely (part_lse = -inf) contribute nothing."""
    part = torch.where(torch.isneginf(part_lse).unsqueeze(-1), torch.zeros_like(part), part)
    if out is None:
        return part, part_lse
    new = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    return out * torch.exp(lse - safe).unsqueeze(-1) + part * torch.exp(part_lse - safe).unsqueeze(-1), new


def choose(ring: Ring, query: torch.Tensor, method: str) -> str:
    """`method`, or for "auto" the one that sends fewer bytes from the busiest rank on this batch
    (ring counts the documents: a block travels only as far as it is needed; Ulysses needs the
    heads to divide over the group). Every rank decides alike: the needs are shared."""
    if method != "auto":
        return method
    if query.shape[1] % ring.size:
        return "ring"
    block = query.numel() * query.element_size()
    return "ring" if ring.ring_bytes(block) <= ring.ulysses_bytes(block) else "ulysses"


def ring_attention(rt, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None,
                   group: str, where: str = "", method: str = "ring", zigzag: bool = False):
    """`aten._scaled_dot_product_flash_attention_for_cpu` on the sequence split over `group`
    (see the module docstring): (output, logsumexp) of this rank's queries. `method="auto"`
    runs each call by ring or by Ulysses (`choose`, `ulysses_attention`). With `zigzag` the
    ranks hold zigzag pieces of the sequence (`runtime/zigzag.py`): under a causal mask
    every rank then computes the same number of pairs of chunks."""
    if dropout_p:
        raise ValueError(f"rank {rt.rank}: ring attention at {where or 'an attention'} has dropout {dropout_p}; "
                         "ring attention runs without dropout")
    ring = Ring(rt, query, attn_mask, is_causal, group, where, zigzag)
    if choose(ring, query, method) == "ulysses":
        return ulysses_attention(rt, query, key, value, is_causal, attn_mask, scale, group, where, zigzag)
    pieces = len(ring.chunks(ring.index))
    outs: list = [None] * pieces
    lses: list = [None] * pieces
    block = [key, value]
    for step in range(ring.size):
        c = (ring.index - step) % ring.size
        nxt = (ring.index - step - 1) % ring.size
        send = block if ring.holds(c, step + 1) else None  # its path goes on past this rank
        recv = [key, value] if ring.holds(nxt, step + 1) else None
        work, arrived = ring.exchange(send, recv, f"ring attention step {step} over group {group}")
        if ring.holds(c, step) and ring.need[ring.index][c]:
            for rows, cols, causal, mask in ring.calls(c):
                part, part_lse = _FLASH(query[..., rows, :], block[0][..., cols, :], block[1][..., cols, :], 0.0,
                                        causal, attn_mask=mask, scale=scale)[:2]
                if mask is not None:  # the kernel gives a row its mask hides entirely log-sum-exp 0, not -inf
                    hidden = ~mask.any(-1) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1)
                    part_lse = part_lse.masked_fill(hidden.expand_as(part_lse), float("-inf"))
                for k in range(rows.start // ring.piece, rows.stop // ring.piece):  # the query pieces it covers
                    at = slice(k * ring.piece - rows.start, (k + 1) * ring.piece - rows.start)
                    outs[k], lses[k] = _merge(outs[k], lses[k], part[..., at, :], part_lse[..., at])
        if work is not None:
            rt.wait(work)
        if arrived:
            block = arrived
    if pieces == 1:
        return outs[0], lses[0]
    out = torch.empty_like(query)  # the kernel's output follows its query's memory format: so does this one
    for k, piece in enumerate(outs):
        out[..., ring.rows(k), :] = piece
    return out, torch.cat(lses, dim=-1)


def ring_attention_backward(rt, grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *,
                            attn_mask=None, scale=None, group: str, where: str = "", method: str = "ring",
                            zigzag: bool = False):
    """The gradients (dq, dk, dv) of `ring_attention`, this rank's pieces (by the method its
    forward chose: the choice depends only on the batch)."""
    ring = Ring(rt, query, attn_mask, is_causal, group, where, zigzag)
    if choose(ring, query, method) == "ulysses":
        return ulysses_attention_backward(rt, grad_out, query, key, value, out, logsumexp, is_causal, attn_mask,
                                          scale, group, where, zigzag)
    dq = torch.zeros_like(query)
    block = [key, value]
    acc = [torch.zeros_like(key), torch.zeros_like(value)]
    finals: dict[int, list[torch.Tensor]] = {}  # owner position -> the sums this rank sends home
    for step in range(ring.size):
        c = (ring.index - step) % ring.size
        nxt = (ring.index - step - 1) % ring.size
        holding, goes_on, comes = ring.holds(c, step), ring.holds(c, step + 1), ring.holds(nxt, step + 1)
        what = f"ring attention backward step {step} over group {group}"
        work, arrived = ring.exchange(block if goes_on else None, [key, value] if comes else None, what)
        if holding and ring.need[ring.index][c]:
            for rows, cols, causal, mask in ring.calls(c):
                g = _FLASH_BACKWARD(grad_out[..., rows, :], query[..., rows, :], block[0][..., cols, :],
                                    block[1][..., cols, :], out[..., rows, :], logsumexp[..., rows], 0.0, causal,
                                    attn_mask=mask, scale=scale)
                dq[..., rows, :] += g[0]
                acc[0][..., cols, :] += g[1]
                acc[1][..., cols, :] += g[2]
        sums_work, sums = ring.exchange(acc if goes_on else None, [key, value] if comes else None, what + " (sums)")
        if holding and not goes_on:
            finals[c] = acc  # the last on chunk c's path: its sums go to the owner (itself, or sent)
        if work is not None:
            rt.wait(work)
        if sums_work is not None:
            rt.wait(sums_work)
        if arrived:
            block, acc = arrived, sums
    mine = finals.pop(ring.index, None)
    last = ring.ranks[(ring.index + ring.path[ring.index] - 1) % ring.size]  # where this rank's sums end
    work, received = ring.post([(t, ring.ranks[c]) for c, sums in sorted(finals.items()) for t in sums],
                               [] if mine is not None else [(key, last), (value, last)],
                               f"ring attention backward sums over group {group}")
    if work is not None:
        rt.wait(work)
    dk, dv = mine if mine is not None else received
    return dq, dk, dv


# ---------------------------------------------------------------- Ulysses, for method="auto"


def _to_heads(rt, tensor: torch.Tensor, group: str, where: str, zigzag: bool) -> torch.Tensor:
    """[batch, heads, L, ...] sequence split -> [batch, heads / W, S, ...] heads split (the
    sequence in natural order, whether or not the pieces are `zigzag`)."""
    work, out = rt.all_to_all(tensor, group, split_dim=1, concat_dim=2, stream=None, where=where,
                              zigzag=(False, zigzag))
    rt.wait(work)
    return out


def _to_sequence(rt, tensor: torch.Tensor, group: str, where: str, zigzag: bool) -> torch.Tensor:
    """[batch, heads / W, S, ...] heads split -> [batch, heads, L, ...] sequence split."""
    work, out = rt.all_to_all(tensor, group, split_dim=2, concat_dim=1, stream=None, where=where,
                              zigzag=(zigzag, False))
    rt.wait(work)
    return out


def _whole_mask(rt, mask: torch.Tensor | None, group: str, zigzag: bool) -> torch.Tensor | None:
    """The whole sequence's mask rows (an all_gather of each rank's), or None."""
    if mask is None:
        return None
    work, whole = rt.all_gather(mask, group, 2, None, zigzag=zigzag)
    rt.wait(work)
    return whole


def ulysses_attention(rt, query, key, value, is_causal, attn_mask, scale, group: str, where: str = "",
                      zigzag: bool = False):
    """Attention by Ulysses inside the call (`method="auto"` on a batch where it sends less):
    q, k, v to heads split, the whole sequence's attention for those heads, back."""
    key_of = f"ulysses {where}" if where else "ulysses"
    q, k, v = (_to_heads(rt, t, group, key_of, zigzag) for t in (query, key, value))
    out, lse = _FLASH(q, k, v, 0.0, is_causal, attn_mask=_whole_mask(rt, attn_mask, group, zigzag), scale=scale)[:2]
    return (_to_sequence(rt, out, group, key_of, zigzag),
            _to_sequence(rt, lse.unsqueeze(-1), group, key_of, zigzag).squeeze(-1))


def ulysses_attention_backward(rt, grad_out, query, key, value, out, logsumexp, is_causal, attn_mask, scale,
                               group: str, where: str = "", zigzag: bool = False):
    """The gradients of `ulysses_attention`, back to sequence split."""
    key_of = f"ulysses {where}" if where else "ulysses"
    g, q, k, v, o = (_to_heads(rt, t, group, key_of, zigzag) for t in (grad_out, query, key, value, out))
    lse = _to_heads(rt, logsumexp.unsqueeze(-1), group, key_of, zigzag).squeeze(-1)
    grads = _FLASH_BACKWARD(g, q, k, v, o, lse, 0.0, is_causal, attn_mask=_whole_mask(rt, attn_mask, group, zigzag),
                            scale=scale)
    return tuple(_to_sequence(rt, t, group, key_of, zigzag) for t in grads[:3])
