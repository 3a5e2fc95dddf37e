"""The correctness oracle: the same training run on one device, with torch.optim.

Every strategy must reproduce it: same losses, same parameters after the
same steps (fp32, up to float reassociation).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from piperc.strategy import SGD, AdamW


def torch_optimizer(optimizer: SGD | AdamW, params) -> torch.optim.Optimizer:
    """The torch.optim optimizer a piperc optimizer directive stands for."""
    if isinstance(optimizer, SGD):
        return torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum,
                               weight_decay=optimizer.weight_decay, foreach=False)
    return torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                             weight_decay=optimizer.weight_decay, foreach=False)


def train_eager(model: torch.nn.Module, batches: Sequence[Sequence[torch.Tensor]],
                optimizer: SGD | AdamW) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Trains a copy of `model` on one device; returns the losses and final state_dict."""
    model = copy.deepcopy(model)
    opt = torch_optimizer(optimizer, model.parameters())
    losses = []
    for batch in batches:
        opt.zero_grad()
        out = model(*batch)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def compare(result_losses: Sequence[float], result_state: dict[str, torch.Tensor],
            losses: Sequence[float], state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max relative loss error, max relative parameter error) of a run against the oracle.

    A parameter's error is max|a - b| / max|b| over its elements.
    """
    loss_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(result_losses, losses, strict=True))
    missing = set(state) - set(result_state)
    if missing:
        raise AssertionError(f"the run returned no value for {sorted(missing)}")
    param_err = 0.0
    for name, ref in state.items():
        got = result_state[name].to(ref.device)
        param_err = max(param_err, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return loss_err, param_err
