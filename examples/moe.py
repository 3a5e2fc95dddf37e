"""Mixture-of-experts GPT: the MLP of each block is a top-2 routed set of experts.

Routing is computed densely: every expert runs on every token and the outputs are combined
with a [tokens, n_experts] gate matrix that is zero for unselected experts. Shapes therefore
never depend on the routing decision, so the model traces, while the loss is numerically that
of top-2 routing.
"""

import torch
from torch import nn

from piperc.examples.gpt import GPT, MLP, CausalSelfAttention, sample_batch

TOP_K = 2


class MoE(nn.Module):
    """Top-2 mixture of GELU MLP experts behind a linear router."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        if n_experts < TOP_K:
            raise ValueError(f"n_experts={n_experts} is below the top-{TOP_K} routing")
        self.router = nn.Linear(d_model, n_experts)
        self.experts = nn.ModuleList(MLP(d_model, 4 * d_model) for _ in range(n_experts))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights [..., n_experts]: the renormalised top-2 router
        probabilities, zero for the other experts."""
        probs = self.router(x).softmax(dim=-1)
        weights, chosen = probs.topk(TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, chosen, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-2)
        return (outputs * self.gates(x).unsqueeze(-1)).sum(dim=-2)


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + moe(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int, n_experts: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.moe = MoE(d_model, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.moe(self.ln2(x))


def make(
    *,
    vocab: int = 64,
    d_model: int = 32,
    n_heads: int = 4,
    n_layers: int = 4,
    seq: int = 16,
    batch: int = 8,
    n_experts: int = 4,
    seed: int = 0,
) -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    """A GPT with MoE blocks and a (tokens, targets) batch; the same seed gives the same
    weights and batch."""
    torch.manual_seed(seed)
    model = GPT(vocab, d_model, n_layers, seq, lambda: Block(d_model, n_heads, n_experts))
    return model, sample_batch(vocab, seq, batch)
