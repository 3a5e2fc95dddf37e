"""`piperc.nn`: layers in plain torch that piperc's passes know how to distribute.

Imports torch and `piperc.annotate` only, so models can use these layers without the
compiler, and train them eagerly like any other module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from piperc.annotate import annotate

MOE_REGION = "moe"
"""The `piperc.annotate` region every op of a mixture-of-experts layer runs in."""


class MoE(nn.Module):
    """A token-routed mixture of SwiGLU experts with a fixed capacity per expert
    (GShard / Switch Transformer routing; Mixtral's experts and gate normalisation).

    `forward(x)` takes `[..., d_model]` and returns `(y, aux_loss)`: `y` has the shape of
    `x`, and `aux_loss` is a scalar load-balancing loss the model adds to its own loss.

    Semantics, for one call on T = x.numel() // d_model tokens, E = n_experts, k = top_k:

    - Router: `probs = softmax(x @ router.weight.T)` over the E experts (a bias-free
      Linear). Each token picks its k most probable experts (`topk`, ties broken as torch's
      topk breaks them). Its gates are those k probabilities renormalised to sum to 1
      (Mixtral) when k > 1; with k = 1 the gate is the probability itself (Switch), since
      renormalising one probability gives 1 and the router would get no gradient from
      the model's loss.
    - Capacity: every expert takes at most
      `C = min(T, ceil(capacity_factor * T * k / E))` tokens per call, computed in Python
      from the static token count of the call. The `min` changes no result (an expert
      never receives more than T tokens); it only bounds the buffer. Capacity is per
      call: under `piperc.compile` the captured call is one microbatch of one data-parallel
      rank, so C is per (microbatch, data rank), as in GShard, and the one-device run that
      matches a compiled one cuts each batch into the same slices.
    - Drop order: the k*T (token, choice) assignments are ranked choice-major: every
      token's first choice in token order, then every token's second choice, and so on
      (GShard's priority of top-1 over top-2). An assignment whose rank among those of its
      expert is C or more is dropped: its combine weight is 0, so a token whose every
      choice is dropped leaves the layer as 0 (the residual stream carries it).
    - Experts: expert e computes `(silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]` (SwiGLU) on
      the tokens in its buffer.
    - Output: `y[t] = sum over t's kept choices j of gate[t, j] * expert_j(x[t])`; the gates
      are not renormalised over the kept choices.
    - Auxiliary loss (Switch Transformer, with GShard's / Mixtral's top-k counting):
      `aux_loss = aux_loss_coef * E * sum_e f_e * P_e`, where
      `f_e` = (number of the k*T assignments whose expert is e) / (k*T), counted before
      capacity drops (no gradient), and `P_e` = mean over the T tokens of probs[:, e].
      sum_e f_e = 1, so perfectly balanced routing gives `aux_loss_coef`. Like C, it is per
      call: a microbatched step averages the microbatches' aux losses.

    THE CONTRACT the expert-parallel pass routes by (a user's own MoE module that follows
    it is routed like this one):

    1. The layer's whole forward runs inside `with piperc.annotate("moe"):` and is the
       forward of one nn.Module: its ops' `#par.origin` has region "moe" and the module's
       path, which names the layer (one layer per module path). Backward ops inherit both
       from the forward op they differentiate. Regions do not nest: inside a model's own
       `piperc.annotate` region the layer's ops carry "moe" instead of the model's name.
    2. Tokens are a 2-D `[T, d]` tensor; the router's probabilities are `[T, E]` and one
       `aten.topk` over the E dimension picks `[T, k]` experts.
    3. Dispatch: a zero `[E*C, d]` buffer filled by one `aten.scatter_add` along dimension 0
       from a `[k*T, d]` source (the token rows, dropped rows zeroed), then viewed as the
       dispatched buffer `[E, C, d]`. Each (expert, slot) row receives at most one
       non-zero row.
    4. Experts: the experts' parameters are the layer's 3-D parameters, each `[E, ...]`
       (here w1, w3 `[E, d, h]` and w2 `[E, h, d]`); in the forward each is read only by an
       `aten.bmm` whose batch dimension is the expert. Between the dispatched buffer and
       the expert output `[E, C, d]` there are only these bmm's and elementwise ops, so
       every op there is independent per expert.
    5. Combine: the expert output, viewed `[E*C, d]`, is read only by one `aten.gather`
       along dimension 0 with the same slot indices as the dispatch's scatter_add, giving
       `[k*T, d]` rows that are weighted by the gates and summed back to `[T, d]`.

    The router and everything outside steps 3-5 is ordinary replicated compute; the pass
    moves the `[E, C, d]` buffer from "tokens of this data rank" to "experts of this
    expert rank" (an all-to-all) before step 4 and back after it.
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, top_k: int = 2,
                 capacity_factor: float = 1.25, aux_loss_coef: float = 0.01):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("n_experts", n_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoE: {name} must be an int >= 1, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
            raise ValueError(f"MoE: top_k must be an int in 1..n_experts={n_experts}, got {top_k!r}")
        if not capacity_factor > 0:
            raise ValueError(f"MoE: capacity_factor must be > 0, got {capacity_factor!r}")
        if not aux_loss_coef >= 0:
            raise ValueError(f"MoE: aux_loss_coef must be >= 0, got {aux_loss_coef!r}")
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef = aux_loss_coef
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises each expert's matrices as nn.Linear initialises its weight:
        uniform in +-1/sqrt(fan_in)."""
        for w in (self.w1, self.w3, self.w2):
            bound = w.shape[1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    def capacity(self, tokens: int) -> int:
        """C, the tokens each expert takes in a call on `tokens` tokens:
        min(tokens, ceil(capacity_factor * tokens * top_k / n_experts))."""
        return min(tokens, math.ceil(self.capacity_factor * tokens * self.top_k / self.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, aux_loss) for `x` of shape [..., d_model]; see the class docstring."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE: expected [..., {self.d_model}] input, got {list(x.shape)}")
        with annotate(MOE_REGION):
            tokens = x.reshape(-1, self.d_model)
            n_tokens, n_experts, k = tokens.shape[0], self.n_experts, self.top_k
            capacity = self.capacity(n_tokens)

            probs = self.router(tokens).softmax(dim=-1)
            gates, experts = probs.topk(k, dim=-1)
            if k > 1:
                gates = gates / gates.sum(dim=-1, keepdim=True)

            # Choice-major order: all first choices by token, then all second choices.
            choice_expert = experts.t().reshape(-1)
            choice_gate = gates.t().reshape(-1)
            one_hot = choice_expert.unsqueeze(1) == torch.arange(n_experts, device=x.device)
            rank = one_hot.cumsum(dim=0).gather(1, choice_expert.unsqueeze(1)).squeeze(1) - 1
            kept = rank < capacity
            # A dropped assignment still needs a slot: it adds a zero row to its expert's
            # last slot, which leaves that slot unchanged.
            slot = choice_expert * capacity + rank.clamp(max=capacity - 1)
            slot_rows = slot.unsqueeze(1).expand(-1, self.d_model)

            rows = tokens.unsqueeze(0).expand(k, n_tokens, self.d_model).reshape(k * n_tokens, self.d_model)
            rows = torch.where(kept.unsqueeze(1), rows, 0.0)
            buffer = tokens.new_zeros(n_experts * capacity, self.d_model).scatter_add(0, slot_rows, rows)
            dispatched = buffer.view(n_experts, capacity, self.d_model)

            hidden = F.silu(torch.bmm(dispatched, self.w1)) * torch.bmm(dispatched, self.w3)
            expert_out = torch.bmm(hidden, self.w2).view(n_experts * capacity, self.d_model)

            combined = expert_out.gather(0, slot_rows) * torch.where(kept, choice_gate, 0.0).unsqueeze(1)
            y = combined.view(k, n_tokens, self.d_model).sum(dim=0).view(x.shape)

            assigned = one_hot.sum(dim=0)  # f_e * k * T
            aux_loss = (assigned * probs.mean(dim=0)).sum() * (self.aux_loss_coef * n_experts / (k * n_tokens))
        return y, aux_loss
