"""GPT whose output projection shares its weight with the token embedding.

The one parameter `embed.weight` is read by the first op and the last matmul of the network,
so a pipeline split puts it on both the first and the last stage.
"""

from collections.abc import Callable

import torch
from torch import nn

from piperc.examples.gpt import GPT, Block, sample_batch


class TiedGPT(GPT):
    """GPT with `head.weight` tied to `embed.weight`."""

    def __init__(
        self, vocab: int, d_model: int, n_layers: int, seq: int, new_block: Callable[[], nn.Module]
    ):
        super().__init__(vocab, d_model, n_layers, seq, new_block)
        self.head.weight = self.embed.weight
        # GPT-2's init for a tied embedding: N(0, 1) rows would also be the output
        # projection, giving logits of size ~sqrt(d_model) and a saturated softmax.
        nn.init.normal_(self.embed.weight, std=0.02)


def make(
    *,
    vocab: int = 64,
    d_model: int = 32,
    n_heads: int = 4,
    n_layers: int = 4,
    seq: int = 16,
    batch: int = 8,
    seed: int = 0,
) -> tuple[TiedGPT, tuple[torch.Tensor, torch.Tensor]]:
    """A TiedGPT and a (tokens, targets) batch; the same seed gives the same weights and batch."""
    torch.manual_seed(seed)
    model = TiedGPT(vocab, d_model, n_layers, seq, lambda: Block(d_model, n_heads))
    return model, sample_batch(vocab, seq, batch)
