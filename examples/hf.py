"""Hugging Face `transformers` causal language models, built from a config with random weights.

Nothing is downloaded: `make(name)` builds a tiny GPT-2, Llama, Qwen2, Mistral, Qwen2-MoE or
Mixtral from its config class (fp32, no dropout, no KV cache) and wraps it in `CausalLM`, whose
`forward(tokens, targets)` returns the loss, as `piperc.compile` needs. transformers is an
optional dependency (`pip install -e .[hf]`); importing this module without it raises
ImportError.

What the wrapper and the config settle so that one AOTAutograd trace captures the model:

- The causal mask is passed in as a 4-D additive mask (0 or -inf), which transformers uses as
  given. Given no mask, transformers builds one itself and first checks the position ids for
  packed sequences with a data-dependent `if (...).all()`. It skips that check when it detects
  tracing (torch.compile, torch.export, fx, jit, fake tensors), but not under AOTAutograd's
  functional tensors, so the one-trace capture fails on `aten._local_scalar_dense`. The mask
  is causal over the whole sequence: Mistral's sliding window (4096 tokens) is not applied.
- Attention is transformers' "eager" implementation: matmul, additive mask, softmax, matmul.
- MoE experts use transformers' "batched_mm" implementation: each token's top-k experts'
  weights are gathered (`gate_up_proj[expert_ids]`) and applied with `bmm`, so no shape
  depends on the routing. The default implementation loops over the experts that received
  tokens (`nonzero`, `torch.where`), whose shapes depend on the data.

Pipeline stages split at the decoder layers: `piperc.pipeline(stages=2)` balances them, or
`split_at=[f"{layers_path(name)}.1"]` names the layer where stage 1 begins.
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from piperc.examples.gpt import sample_batch


class CausalLM(nn.Module):
    """A transformers causal LM whose forward returns the mean next-token cross-entropy.

    `targets` are the next tokens (`tokens` shifted left by one), as in the other examples;
    the loss is computed here rather than with transformers' `labels=`, which shifts again.
    """

    def __init__(self, model: transformers.PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        future = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).triu(1)
        mask = torch.zeros(seq, seq, device=tokens.device).masked_fill(future, float("-inf"))
        logits = self.model(input_ids=tokens, attention_mask=mask[None, None]).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes `make` builds a model with."""

    vocab: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    seq: int
    n_experts: int


def _gpt2(s: Sizes) -> dict:
    """GPT-2's config arguments (learned positions, LayerNorm, GELU MLP, tied output embedding)."""
    return dict(vocab_size=s.vocab, n_positions=s.seq, n_embd=s.d_model, n_layer=s.n_layers, n_head=s.n_heads,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _decoder(s: Sizes) -> dict:
    """A Llama-family decoder's config arguments (RMSNorm, rotary, SwiGLU, grouped-query attention)."""
    return dict(vocab_size=s.vocab, hidden_size=s.d_model, intermediate_size=2 * s.d_model,
                num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads,
                max_position_embeddings=s.seq, attention_dropout=0.0)


def _qwen2_moe(s: Sizes) -> dict:
    """Qwen2-MoE's: top-2 of n_experts routed experts plus a gated shared expert per layer."""
    return dict(_decoder(s), moe_intermediate_size=s.d_model, shared_expert_intermediate_size=s.d_model,
                num_experts=s.n_experts, num_experts_per_tok=2)


def _mixtral(s: Sizes) -> dict:
    """Mixtral's: top-2 of n_experts routed experts per layer."""
    return dict(_decoder(s), intermediate_size=s.d_model, num_local_experts=s.n_experts, num_experts_per_tok=2)


MODELS: dict[str, tuple[type, type, Callable[[Sizes], dict], str]] = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, _gpt2, "model.transformer.h"),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, _decoder, "model.model.layers"),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, _decoder, "model.model.layers"),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, _decoder, "model.model.layers"),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, _qwen2_moe, "model.model.layers"),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, _mixtral, "model.model.layers"),
}
"""Per model name: its transformers config and model classes, the config arguments that give
it `Sizes`, and the module path of its list of decoder layers inside `CausalLM`."""

SETTINGS = dict(use_cache=False, attn_implementation="eager", experts_implementation="batched_mm",
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
"""Config arguments every model is built with (see the module docstring)."""


def layers_path(name: str) -> str:
    """The module path of model `name`'s decoder layers in `CausalLM` (`model.model.layers`):
    `f"{layers_path(name)}.{i}"` is layer i, a pipeline split point."""
    return MODELS[_known(name)][3]


def _known(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return name


def make(
    name: str = "llama",
    *,
    vocab: int = 128,
    d_model: int = 32,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    n_layers: int = 2,
    seq: int = 16,
    batch: int = 4,
    n_experts: int = 4,
    seed: int = 0,
) -> tuple[CausalLM, tuple[torch.Tensor, torch.Tensor]]:
    """A randomly initialised transformers model `name` in `CausalLM`, and a (tokens, targets)
    batch; the same seed gives the same weights and batch.

    `name` is one of `MODELS`: "gpt2", "llama", "qwen2", "mistral", "qwen2_moe", "mixtral".
    n_kv_heads is the key/value heads of grouped-query attention (not used by GPT-2);
    n_experts the routed experts of the MoE models, each token going to its top 2.
    """
    config_class, model_class, sizes, _ = MODELS[_known(name)]
    config = config_class(**sizes(Sizes(vocab, d_model, n_heads, n_kv_heads, n_layers, seq, n_experts)), **SETTINGS)
    torch.manual_seed(seed)
    model = CausalLM(model_class(config))
    return model, sample_batch(vocab, seq, batch)
