"""Dense GPT: learned positions, pre-LayerNorm causal attention and a GELU MLP.

Attention is written out op by op (no scaled_dot_product_attention) so that every ATen op in
the traced graph maps back to a line here.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdpa: bool = False,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention over [batch, heads, seq, head_dim] tensors: written out op by
    op, or with `sdpa` one `F.scaled_dot_product_attention` (what sequence parallelism's
    Ulysses splits by heads). `mask` ([batch, 1, seq, seq], True where a query may attend,
    causality included: `document_mask`) replaces the causal mask."""
    if sdpa:
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    seq, head_dim = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def document_mask(doc: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed sequences: `doc` [batch, seq] gives each token's document;
    a query attends to the earlier tokens of its own document. [batch, 1, seq, seq] bools."""
    seq = doc.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def packed_documents(batch: int, seq: int) -> torch.Tensor:
    """Document ids of `batch` packed sequences of length `seq` (>= 8): two short documents
    (3 and 2 tokens), one from token 5 across the middle of the sequence, and the rest."""
    ids = torch.zeros(seq, dtype=torch.long)
    for start in (3, 5, seq // 2 + 2):
        ids[start:] += 1
    return ids.expand(batch, seq).contiguous()


def sample_batch(vocab: int, seq: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random next-token batch: `targets` is `tokens` shifted left by one position."""
    stream = torch.randint(0, vocab, (batch, seq + 1))
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.sdpa = False  # make(sdpa=True): one F.scaled_dot_product_attention
        # No bias: the key bias's gradient is identically zero (softmax ignores a
        # shift shared by all keys), so it is pure rounding noise, and AdamW's
        # m/sqrt(v) turns that noise into steps of size lr. No two correct
        # implementations agree on it; modern GPTs leave it out.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, d_model = x.shape
        heads = [
            t.view(batch, seq, self.n_heads, d_model // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).split(d_model, dim=2)
        ]
        y = causal_attention(*heads, sdpa=self.sdpa, mask=mask)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, d_model))


class MLP(nn.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden)
        self.proj = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, 4 * d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + (self.attn(self.ln1(x)) if mask is None else self.attn(self.ln1(x), mask))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only language model whose forward returns the mean next-token cross-entropy.

    `new_block` builds one [batch, seq, d_model] -> [batch, seq, d_model] layer; other examples
    pass their own (the MoE example swaps the MLP for routed experts).
    """

    def __init__(
        self, vocab: int, d_model: int, n_layers: int, seq: int, new_block: Callable[[], nn.Module]
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(new_block() for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        """The loss; with `doc` (packed sequences' document ids) attention stays within each
        document (`document_mask`)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        mask = None if doc is None else document_mask(doc)
        for block in self.blocks:
            x = block(x) if mask is None else block(x, mask)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def make(
    *,
    vocab: int = 64,
    d_model: int = 32,
    n_heads: int = 4,
    n_layers: int = 4,
    seq: int = 16,
    batch: int = 8,
    seed: int = 0,
    sdpa: bool = False,
    packed: bool = False,
) -> tuple[GPT, tuple[torch.Tensor, ...]]:
    """A GPT and a (tokens, targets) batch; the same seed gives the same weights and batch.
    With `sdpa`, attention is one `F.scaled_dot_product_attention` (same weights, same
    function) instead of its ops written out; with `packed`, the batch also holds document
    ids (`packed_documents`) and attention stays within each document."""
    torch.manual_seed(seed)
    model = GPT(vocab, d_model, n_layers, seq, lambda: Block(d_model, n_heads))
    use_sdpa(model, sdpa)
    tokens, targets = sample_batch(vocab, seq, batch)
    return model, (tokens, targets, packed_documents(batch, seq)) if packed else (tokens, targets)


def use_sdpa(model: nn.Module, sdpa: bool) -> None:
    """Sets every attention module of `model` to compute with one scaled-dot-product op (or not)."""
    for module in model.modules():
        if hasattr(module, "sdpa"):
            module.sdpa = sdpa
