"""Dense GPT: learned positions, pre-LayerNorm causal attention and a GELU MLP.

Attention is written out op by op (no scaled_dot_product_attention) so that every ATen op in
the traced graph maps back to a line here.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention over [batch, heads, seq, head_dim] tensors."""
    seq, head_dim = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


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
        # No bias: the key bias's gradient is identically zero (softmax ignores a
        # shift shared by all keys), so it is pure rounding noise, and AdamW's
        # m/sqrt(v) turns that noise into steps of size lr. No two correct
        # implementations agree on it; modern GPTs leave it out.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        heads = [
            t.view(batch, seq, self.n_heads, d_model // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).split(d_model, dim=2)
        ]
        y = causal_attention(*heads)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
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

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
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
) -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    """A GPT and a (tokens, targets) batch; the same seed gives the same weights and batch."""
    torch.manual_seed(seed)
    model = GPT(vocab, d_model, n_layers, seq, lambda: Block(d_model, n_heads))
    return model, sample_batch(vocab, seq, batch)
