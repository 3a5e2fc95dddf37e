"""Mixtral-like mixture-of-experts decoder: pre-RMSNorm rotary attention, then a routed
`piperc.nn.MoE` of SwiGLU experts in every block.

Routing is real: each token goes to its top-k experts through fixed-capacity expert buffers
(see `piperc.nn.MoE` for the capacity, the drop order and the load-balancing loss). The
model's loss is the next-token cross-entropy plus every block's load-balancing loss.
"""

import torch
import torch.nn.functional as F
from torch import nn

from piperc.examples.gpt import sample_batch
from piperc.examples.llama import Attention, GroupedQueryAttention, RMSNorm
from piperc.nn import MoE


class Block(nn.Module):
    """x + attn(attn_norm(x)), then x + moe(moe_norm(x)); returns the new x and the MoE's
    load-balancing loss."""

    def __init__(self, d_model: int, n_heads: int, seq: int, moe: MoE, n_kv_heads: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = (Attention(d_model, n_heads, seq) if n_kv_heads is None
                     else GroupedQueryAttention(d_model, n_heads, n_kv_heads, seq))
        self.moe_norm = RMSNorm(d_model)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x))
        y, aux_loss = self.moe(self.moe_norm(x))
        return x + y, aux_loss


class MoEDecoder(nn.Module):
    """Decoder-only language model of MoE blocks whose forward returns the mean next-token
    cross-entropy plus the sum of the blocks' load-balancing losses."""

    def __init__(self, vocab: int, d_model: int, blocks: list[Block]):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        aux_loss = x.new_zeros(())
        for block in self.blocks:
            x, block_aux_loss = block(x)
            aux_loss = aux_loss + block_aux_loss
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1)) + aux_loss


def make(
    *,
    vocab: int = 64,
    d_model: int = 32,
    n_heads: int = 4,
    n_layers: int = 4,
    seq: int = 16,
    batch: int = 8,
    n_experts: int = 4,
    top_k: int = 2,
    capacity_factor: float = 1.25,
    aux_loss_coef: float = 0.01,
    n_kv_heads: int | None = None,
    seed: int = 0,
) -> tuple[MoEDecoder, tuple[torch.Tensor, torch.Tensor]]:
    """An MoE decoder and a (tokens, targets) batch; the same seed gives the same weights and
    batch. Each block's MoE has n_experts SwiGLU experts of hidden size 4 * d_model, top_k
    routing and the given capacity factor and load-balancing coefficient; n_kv_heads gives
    grouped-query attention, as in `llama.make`."""
    torch.manual_seed(seed)
    blocks = [
        Block(d_model, n_heads, seq, MoE(d_model, 4 * d_model, n_experts, top_k, capacity_factor, aux_loss_coef),
              n_kv_heads)
        for _ in range(n_layers)
    ]
    model = MoEDecoder(vocab, d_model, blocks)
    return model, sample_batch(vocab, seq, batch)
