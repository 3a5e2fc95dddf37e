"""Llama-style decoder: RMSNorm, rotary position embeddings, SwiGLU MLP, no biases.

`make(n_kv_heads=...)` gives grouped-query attention with a fused key/value projection instead of
separate q/k/v heads; without it the model is plain multi-head attention.
"""

import torch
import torch.nn.functional as F
from torch import nn

from piperc.examples.gpt import (
    causal_attention,
    document_mask,
    packed_documents,
    sample_batch,
    use_sdpa,
)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, over the last dimension."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(head_dim: int, seq: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles of positions 0..seq-1, each [seq, head_dim]."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Multi-head causal attention with rotary embeddings on q and k.

    Each layer keeps its own cos/sin tables (non-persistent buffers) so a layer carries
    everything it needs when the compiler places it on a pipeline stage.
    """

    def __init__(self, d_model: int, n_heads: int, seq: int, base: float = 10000.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.sdpa = False  # make(sdpa=True): one F.scaled_dot_product_attention
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        cos, sin = rotary_tables(d_model // n_heads, seq, base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = (
            proj(x).view(batch, seq, self.n_heads, d_model // self.n_heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        cos, sin = self.cos[:seq], self.sin[:seq]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = causal_attention(q, k, v, sdpa=self.sdpa, mask=mask)
        return self.o(y.transpose(1, 2).reshape(batch, seq, d_model))


class GroupedQueryAttention(nn.Module):
    """Causal attention with rotary embeddings whose n_kv_heads key/value heads are each shared
    by n_heads / n_kv_heads consecutive query heads (grouped-query attention).

    Keys and values come from one fused projection `kv` whose rows are [k; v]: the keys of all
    n_kv_heads heads, then the values. Rotary tables are per layer, as in `Attention`.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, seq: int, base: float = 10000.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.sdpa = False  # make(sdpa=True): one F.scaled_dot_product_attention
        head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_kv_heads * head_dim, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        cos, sin = rotary_tables(head_dim, seq, base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, d_model = x.shape
        head_dim = d_model // self.n_heads
        q = self.q(x).view(batch, seq, self.n_heads, head_dim).transpose(1, 2)
        k, v = (
            t.view(batch, seq, self.n_kv_heads, head_dim).transpose(1, 2)
            for t in self.kv(x).split(self.n_kv_heads * head_dim, dim=2)
        )
        cos, sin = self.cos[:seq], self.sin[:seq]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = self.n_heads // self.n_kv_heads
        k, v = (
            t.unsqueeze(2).expand(batch, self.n_kv_heads, group, seq, head_dim).reshape(batch, self.n_heads, seq, head_dim)
            for t in (k, v)
        )
        y = causal_attention(q, k, v, sdpa=self.sdpa, mask=mask)
        return self.o(y.transpose(1, 2).reshape(batch, seq, d_model))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-RMSNorm block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)).

    Attention is grouped-query (`GroupedQueryAttention`) when n_kv_heads is given.
    """

    def __init__(self, d_model: int, n_heads: int, seq: int, n_kv_heads: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = (Attention(d_model, n_heads, seq) if n_kv_heads is None
                     else GroupedQueryAttention(d_model, n_heads, n_kv_heads, seq))
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, 4 * d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + (self.attn(self.attn_norm(x)) if mask is None else self.attn(self.attn_norm(x), mask))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only language model whose forward returns the mean next-token cross-entropy."""

    def __init__(self, vocab: int, d_model: int, n_heads: int, n_layers: int, seq: int,
                 n_kv_heads: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, seq, n_kv_heads) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        """The loss; with `doc` (packed sequences' document ids) attention stays within each
        document (`gpt.document_mask`)."""
        x = self.embed(tokens)
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
    n_kv_heads: int | None = None,
    sdpa: bool = False,
    packed: bool = False,
) -> tuple[Llama, tuple[torch.Tensor, ...]]:
    """A Llama and a (tokens, targets) batch; the same seed gives the same weights and batch.

    n_kv_heads (default None: multi-head attention with separate q, k, v) gives every block
    grouped-query attention with that many key/value heads and a fused `kv` projection.
    With `sdpa`, attention is one `F.scaled_dot_product_attention` instead of its ops; with
    `packed`, the batch also holds document ids and attention stays within each document.
    """
    torch.manual_seed(seed)
    model = Llama(vocab, d_model, n_heads, n_layers, seq, n_kv_heads)
    use_sdpa(model, sdpa)
    tokens, targets = sample_batch(vocab, seq, batch)
    return model, (tokens, targets, packed_documents(batch, seq)) if packed else (tokens, targets)
