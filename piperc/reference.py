"""The correctness oracle: the same training run on one device, with torch.optim.

Every strategy must reproduce it: same losses, same parameters after the
same steps (fp32, up to float reassociation). `verify` is the user's form of
that check: it trains a compiled strategy and the oracle on the same batches
and says how far apart they are, next to the noise floor of float reassociation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from piperc import asynchronous
from piperc.runtime.comm import random_seed
from piperc.runtime.launch import LaunchResult
from piperc.strategy import SGD, AdamW

TOLERANCE = 1e-5
"""Relative error up to which a run is exact against one device (fp32)."""


def torch_optimizer(optimizer: SGD | AdamW, params) -> torch.optim.Optimizer:
    """The torch.optim optimizer a piperc optimizer directive stands for."""
    if isinstance(optimizer, SGD):
        return torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum,
                               weight_decay=optimizer.weight_decay, foreach=False)
    return torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                             weight_decay=optimizer.weight_decay, foreach=False)


def train_eager(model: torch.nn.Module, batches: Sequence[Sequence[torch.Tensor]],
                optimizer: SGD | AdamW, slices: int = 1,
                groups: int = 1, seed: int | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Trains a copy of `model` on one device; returns the losses and final state_dict.

    With `slices` > 1, each step accumulates the gradient over that many equal row
    slices of the batch, in order, each slice's loss scaled by 1/slices (as a strategy
    that cuts the batch into replicas x microbatches does); the step's loss is the sum
    of the scaled slice losses. With `groups` > 1 (a divisor of `slices`), the slices
    are summed as data parallelism sums them: each of `groups` consecutive runs of
    slices (a replica's rows, its microbatches) is accumulated on its own, and the
    step's gradient is the sum of the groups' in order.

    Each slice is its own forward, so a layer that normalises over the batch (BatchNorm
    with `track_running_stats=False`) sees slice-sized batches, as a strategy's
    microbatches do: that is the one-device run such a model matches.

    With a `seed`, random ops (dropout) draw as a compiled program with that seed does
    (`compile(seed=)`): each is seeded from (seed, step, slice, its index among the slice's
    forward's random ops). A program cut into the same slices then draws the same numbers.
    """
    if slices % groups:
        raise ValueError(f"{slices} slices do not split into {groups} equal groups")
    model = copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch_optimizer(optimizer, params)
    losses = []
    for step, batch in enumerate(batches):
        rows = batch[0].shape[0]
        if rows % slices:
            raise ValueError(f"batch {step} has {rows} rows, which do not split into {slices} equal slices")
        total = torch.zeros(())
        summed: list[torch.Tensor | None] | None = None
        parts = _row_slices(batch, slices)
        for group in range(groups):
            opt.zero_grad()
            for piece in range(group * slices // groups, (group + 1) * slices // groups):
                part = parts[piece]
                with _Seeded(seed, step, piece) if seed is not None else contextlib.nullcontext():
                    out = model(*part)
                loss = (out[0] if isinstance(out, tuple) else out) * (1.0 / slices)
                loss.backward()
                total = total + loss.detach()
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            summed = grads if summed is None else [
                a if b is None else b if a is None else a + b for a, b in zip(summed, grads, strict=True)]
        for p, g in zip(params, summed, strict=True):
            p.grad = g
        opt.step()
        losses.append(total.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def stale_training(model: torch.nn.Module, plan, batches: Sequence[Sequence[torch.Tensor]],
                   optimizer: SGD | AdamW, stages: Sequence[Sequence[str]], replicas: int = 1
                   ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Trains a copy of `model` on one process exactly as the update plan `plan`
    (`piperc.asynchronous.UpdatePlan`: PipeDream, PipeDream-2BW or a flushed schedule) says;
    returns the loss of each step and the final state_dict.

    `stages[s]` names stage s's parameters (as in `model.named_parameters()`); every
    trainable parameter is in one stage. Each global batch of `batches` (one per step of
    the plan) is cut into `plan.microbatches` equal row slices, microbatch n being slice
    n % microbatches of batch n // microbatches. The plan alone decides the run: microbatch
    m's gradient is the whole model's at the mixed point of the versions its forward read on
    each stage (`plan.versions()`; weight stashing makes its backward read the same), and
    each update of stage s applies the mean of its microbatches' gradients for the stage's
    parameters with that stage's own optimizer (torch.optim, its state per stage). A step's
    loss is the mean of its microbatches' losses, each at its own mixed point. Nothing is
    written per schedule: a synchronous plan trains as `train_eager(..., slices=microbatches)`.
    With `replicas` > 1, each microbatch's gradient is summed over that many equal row slices,
    each scaled by 1/replicas, as data parallelism sums it (the same value, summed in its order).
    """
    plan.check()
    if len(batches) != plan.steps:
        raise ValueError(f"the plan runs {plan.steps} steps, got {len(batches)} batches")
    if len(stages) != plan.num_stages:
        raise ValueError(f"the plan has {plan.num_stages} stages, got parameter names for {len(stages)}")
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    owner: dict[str, int] = {}
    for s, names in enumerate(stages):
        for name in names:
            if name not in named or name in owner:
                raise ValueError(f"stage {s} names parameter {name!r}, which the model lacks or another stage has")
            owner[name] = s
    missing = sorted(n for n, p in named.items() if p.requires_grad and n not in owner)
    if missing:
        raise ValueError(f"no stage holds the trainable parameters {missing}")
    masters = [{n: torch.nn.Parameter(named[n].detach().clone()) for n in names} for names in stages]
    optimizers = [torch_optimizer(optimizer, list(m.values())) for m in masters]
    history = [{0: {n: p.detach().clone() for n, p in m.items()}} for m in masters]
    made = [0] * plan.num_stages
    versions = plan.versions()
    readers = [{} for _ in stages]  # per stage: version -> microbatches whose gradient still reads it
    for s, seen in enumerate(versions):
        for m, v in seen.items():
            readers[s].setdefault(v, set()).add(m)
    pieces = []
    for step, batch in enumerate(batches):
        rows = batch[0].shape[0]
        if rows % plan.microbatches:
            raise ValueError(f"batch {step} has {rows} rows, which do not split into {plan.microbatches} "
                             "microbatches")
        pieces += _row_slices(batch, plan.microbatches)
    grads: dict[int, dict[str, torch.Tensor]] = {}
    losses: dict[int, float] = {}

    def gradient(m: int) -> None:
        """m's loss and gradient at the mixed point of the versions its forward read."""
        with torch.no_grad():
            for s in range(plan.num_stages):
                for n, value in history[s][versions[s][m]].items():
                    named[n].copy_(value)
        for p in named.values():
            p.grad = None
        losses[m] = 0.0
        for part in _row_slices(pieces[m], replicas):
            out = model(*part)
            loss = (out[0] if isinstance(out, tuple) else out) / replicas
            loss.backward()
            losses[m] += loss.item()
        grads[m] = {n: (torch.zeros_like(named[n]) if named[n].grad is None else named[n].grad.clone())
                    for n in owner}
        for s in range(plan.num_stages):
            v = versions[s][m]
            readers[s][v].discard(m)
            if not readers[s][v] and v != made[s]:
                del history[s][v]  # no microbatch reads that version any more

    times = asynchronous.timeline(plan)
    order = sorted((times[s][e][0], s, i) for s, row in enumerate(plan.stages) for i, e in enumerate(row))
    for _, s, i in order:
        e = plan.stages[s][i]
        if e.kind in ("B", "W") and e.microbatches[0] not in grads:
            gradient(e.microbatches[0])
        if e.kind != "U":
            continue
        for n, p in masters[s].items():
            p.grad = torch.stack([grads[m][n] for m in e.microbatches]).mean(dim=0)
        optimizers[s].step()
        made[s] += 1
        history[s][made[s]] = {n: p.detach().clone() for n, p in masters[s].items()}
        if not readers[s].get(made[s] - 1) and made[s] - 1 in history[s]:
            del history[s][made[s] - 1]
        for m in e.microbatches:
            for n in masters[s]:
                del grads[m][n]
    with torch.no_grad():
        for m in masters:
            for n, p in m.items():
                named[n].copy_(p)
    step_losses = [sum(losses[m] for m in range(t * plan.microbatches, (t + 1) * plan.microbatches))
                   / plan.microbatches for t in range(plan.steps)]
    return step_losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _row_slices(batch: Sequence[torch.Tensor], count: int) -> list[tuple[torch.Tensor, ...]]:
    """`batch` (one tensor per model input) cut into `count` equal row slices, in order."""
    return list(zip(*(x.tensor_split(count) for x in batch), strict=True))


class _Seeded(TorchDispatchMode):
    """Seeds torch's generator before each random op of one slice's forward as
    `Runtime.seed_random` does in a compiled program."""

    def __init__(self, seed: int, step: int, piece: int):
        super().__init__()
        self.seed, self.step, self.piece, self.index = seed, step, piece, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            torch.manual_seed(random_seed(self.seed, self.step, self.piece, self.index))
            self.index += 1
        return func(*args, **(kwargs or {}))


def compare(result_losses: Sequence[float], result_state: dict[str, torch.Tensor],
            losses: Sequence[float], state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max relative loss error, max relative parameter error) of a run against the oracle.

    A parameter's error is max|a - b| / max|b| over its elements.
    """
    return max(loss_errors(result_losses, losses)), max(parameter_errors(result_state, state).values(), default=0.0)


def parameter_errors(result_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per entry of `state`, the relative error of `result_state`'s value: max|a - b| / max|b|."""
    missing = set(state) - set(result_state)
    if missing:
        raise AssertionError(f"the run returned no value for {sorted(missing)}")
    errors = {}
    for name, ref in state.items():
        got = result_state[name].to(ref.device)
        errors[name] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return errors


def loss_errors(result_losses: Sequence[float], losses: Sequence[float]) -> list[float]:
    """Per step, the relative error of a run's loss against the oracle's."""
    return [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(result_losses, losses, strict=True)]


def compiled_training(compiled) -> tuple[SGD | AdamW, int, int]:
    """The optimizer `compiled` updates with, how many equal row slices it cuts each global
    batch into (replicas x microbatches) and how many data-parallel replicas sum them, as
    `piperc.compile` recorded them on it."""
    return compiled.optimizer, compiled.replicas * compiled.microbatches, compiled.replicas


@dataclasses.dataclass
class Verification:
    """What `verify` found: a compiled strategy's training run next to one device's.

    `floor_*` are the errors of the same one-device training when it accumulates each
    batch over the strategy's `slices` (float reassociation alone, no strategy): the
    larger, per step and per parameter, of accumulating them in order and of summing them
    per replica first, as data parallelism does. A run whose errors stay within twice
    those differs from one device by summation order.
    """

    losses: list[float]
    """The compiled strategy's loss per step."""
    reference_losses: list[float]
    """One device's loss per step (torch.optim, the whole batch at once)."""
    loss_errors: list[float]
    """Per step, the compiled loss's relative error against one device's."""
    floor_loss_errors: list[float]
    """Per step, the relative loss error of one-device training accumulating `slices` slices."""
    parameter_errors: dict[str, float]
    """Per parameter, the final value's relative error (max|a - b| / max|b|) against one device's."""
    floor_parameter_errors: dict[str, float]
    """Per parameter, the same error of one-device training accumulating `slices` slices."""
    slices: int
    """How many row slices the strategy cuts each batch into (replicas x microbatches)."""
    run: LaunchResult
    """The compiled strategy's launch result (losses, final parameters, peak memory)."""
    tolerance: float = TOLERANCE
    oracle: str = ""
    """What the run is compared with when it is not one device's training: an asynchronous
    pipeline's stale-training oracle (its floor: the oracle summing each microbatch's gradient
    over the data-parallel replicas, or not; 0 without data parallelism)."""

    @property
    def loss_error(self) -> float:
        """The largest relative loss error over the steps."""
        return max(self.loss_errors, default=0.0)

    @property
    def parameter_error(self) -> float:
        """The largest relative parameter error."""
        return max(self.parameter_errors.values(), default=0.0)

    @property
    def floor(self) -> tuple[float, float]:
        """(loss, parameter): the largest errors of one-device training over `slices` slices."""
        return (max(self.floor_loss_errors, default=0.0), max(self.floor_parameter_errors.values(), default=0.0))

    @property
    def verdict(self) -> str:
        """`exact` (every error within `tolerance`), `within the noise floor` (each of the
        loss and parameter errors within `tolerance` or twice its floor), or `mismatch`."""
        if self.loss_error <= self.tolerance and self.parameter_error <= self.tolerance:
            return "exact"
        loss_floor, parameter_floor = self.floor
        if (self.loss_error <= max(self.tolerance, 2 * loss_floor)
                and self.parameter_error <= max(self.tolerance, 2 * parameter_floor)):
            return "within the noise floor"
        return "mismatch"

    @property
    def ok(self) -> bool:
        """Whether the run trains as one device does (the verdict is not `mismatch`)."""
        return self.verdict != "mismatch"

    def worst_parameters(self, count: int = 5) -> list[tuple[str, float]]:
        """The `count` parameters with the largest relative error, largest first."""
        return sorted(self.parameter_errors.items(), key=lambda item: -item[1])[:count]

    def __str__(self) -> str:
        loss_floor, parameter_floor = self.floor
        lines = [
            f"{len(self.losses)} steps against one device (torch.optim); floor: one device "
            f"accumulating each batch over the strategy's {self.slices} slices",
            "  step  loss            one device      rel. error  floor",
        ] if not self.oracle else [
            f"{len(self.losses)} steps against {self.oracle}",
            "  step  loss            oracle          rel. error  floor",
        ]
        for step, values in enumerate(zip(self.losses, self.reference_losses, self.loss_errors,
                                          self.floor_loss_errors, strict=True)):
            lines.append(f"  {step:4d}  {values[0]:<14.8g}  {values[1]:<14.8g}  {values[2]:<10.2e}  {values[3]:.2e}")
        worst = self.worst_parameters()
        width = max((len(name) for name, _ in worst), default=0)
        lines.append(f"  {'worst parameters':<{width + 2}}  rel. error  floor")
        for name, error in worst:
            lines.append(f"    {name:<{width}}  {error:<10.2e}  {self.floor_parameter_errors[name]:.2e}")
        lines += [
            f"  max relative loss error      {self.loss_error:.2e}  (floor {loss_floor:.2e})",
            f"  max relative parameter error {self.parameter_error:.2e}  (floor {parameter_floor:.2e})",
            f"  verdict: {self._explain()}",
        ]
        return "\n".join(lines)

    def _explain(self) -> str:
        verdict = self.verdict
        if verdict == "exact":
            return f"exact (every error <= {self.tolerance:g})"
        if verdict == "within the noise floor":
            return "within the noise floor (each error <= 2x the floor's): summation order only"
        if self.oracle:
            return f"MISMATCH: errors above {self.tolerance:g}; the compiled run does not train as its oracle does"
        return (f"MISMATCH: errors above {self.tolerance:g} and above 2x the floor's; "
                "the compiled run does not train as one device does")


def verify(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], compiled,
           batches: Sequence[Sequence[torch.Tensor]] | None = None, *,
           progress: bool = False, timeout: float | None = None) -> Verification:
    """Trains `compiled` on local processes and `model` on one device, on the same
    batches from the same initial parameters; returns how far apart they are.

    `batches` are global batches, one per step (default: `example_inputs` for 3
    steps). The one-device runs start from `compiled.initial_state`, use the
    optimizer the strategy was compiled with (torch.optim), and are trained twice:
    on whole batches (the reference) and accumulating each batch over the
    strategy's slices (the noise floor: in order, and, with several replicas that each
    hold several microbatches, per replica and then summed; the larger error of the two).
    A model with random ops (`compiled.random_ops`) or batch statistics
    (`compiled.batch_statistics`: BatchNorm in training mode) or MoE layers
    (`compiled.moe_layers`: capacity and load-balancing loss per call) computes per slice,
    so its reference runs the strategy's slices in order too.
    `progress` and `timeout` are `launch`'s.
    """
    from piperc.compiler import launch

    batches = [tuple(example_inputs)] * 3 if batches is None else [tuple(b) for b in batches]
    if not batches:
        raise ValueError("verify needs at least one batch")
    optimizer, slices, replicas = compiled_training(compiled)
    start = _at_initial_state(model, compiled)
    run = launch(compiled, batches, progress=progress, timeout=timeout)
    if compiled.asynchronous:  # stale updates: the oracle is the same plan on one process
        plan = compiled.update_plan(len(batches))
        sliced = [interleave_replicas(b, replicas, compiled.microbatches) for b in batches]
        stages = compiled.stage_parameters()
        losses, state = stale_training(start, plan, sliced, optimizer, stages, replicas)
        # Its floor: the same oracle summing each microbatch's gradient in one piece.
        whole = stale_training(start, plan, sliced, optimizer, stages) if replicas > 1 else (losses, state)
        return Verification(
            losses=list(run.losses), reference_losses=losses, loss_errors=loss_errors(run.losses, losses),
            floor_loss_errors=loss_errors(whole[0], losses), parameter_errors=parameter_errors(run.state_dict, state),
            floor_parameter_errors=parameter_errors(whole[1], state), slices=slices, run=run,
            oracle=f"the {compiled.asynchronous} plan's stale training on one process (reference.stale_training); "
                   "floor: the same, each microbatch's gradient not summed over its replicas")
    # A model that draws random numbers draws them per slice, and one that normalises over
    # the batch (BatchNorm) normalises each slice on its own: one device matches it only
    # when it runs the same slices (in order), seeded the same way.
    seed = compiled.seed if compiled.random_ops else None
    sliced = seed is not None or compiled.batch_statistics > 0 or compiled.moe_layers > 0
    reference_losses, reference_state = train_eager(start, batches, optimizer, slices if sliced else 1,
                                                    seed=seed)
    floor_loss, floor_parameter = [], {}
    for groups in (1, replicas) if 1 < replicas < slices else (1,):
        losses, state = train_eager(start, batches, optimizer, slices, groups, seed=seed)
        errors = loss_errors(losses, reference_losses)
        floor_loss = [max(pair) for pair in zip(floor_loss, errors, strict=True)] if floor_loss else errors
        for name, error in parameter_errors(state, reference_state).items():
            floor_parameter[name] = max(error, floor_parameter.get(name, 0.0))
    return Verification(
        losses=list(run.losses),
        reference_losses=reference_losses,
        loss_errors=loss_errors(run.losses, reference_losses),
        floor_loss_errors=floor_loss,
        parameter_errors=parameter_errors(run.state_dict, reference_state),
        floor_parameter_errors=floor_parameter,
        slices=slices,
        run=run,
    )


def interleave_replicas(batch: Sequence[torch.Tensor], replicas: int, microbatches: int) -> tuple[torch.Tensor, ...]:
    """`batch` with its rows reordered so that its `microbatches` contiguous slices are the
    strategy's microbatches: microbatch m is every replica's m-th slice (replica r holds the
    r-th block of rows, cut into `microbatches`), which data parallelism averages into one
    gradient. The identity with one replica."""
    if replicas == 1:
        return tuple(batch)
    out = []
    for x in batch:
        rows = x.shape[0] // (replicas * microbatches)
        out.append(torch.cat([x[(r * microbatches + m) * rows:(r * microbatches + m + 1) * rows]
                              for m in range(microbatches) for r in range(replicas)]))
    return tuple(out)


def _at_initial_state(model: torch.nn.Module, compiled) -> torch.nn.Module:
    """A copy of `model` holding the parameters and buffers `compiled` starts from."""
    copied = copy.deepcopy(model)
    tensors = {**dict(copied.named_parameters(remove_duplicate=False)),
               **dict(copied.named_buffers(remove_duplicate=False))}
    initial = compiled.initial_state
    unknown = sorted(set(initial) - set(tensors))
    missing = sorted(set(tensors) - set(initial) - set(compiled.aliases))
    mismatched = sorted(name for name in set(initial) & set(tensors) if initial[name].shape != tensors[name].shape)
    if unknown or missing or mismatched:
        raise ValueError(
            f"the model is not the one compiled (compiled only: {unknown}; model only: {missing}; "
            f"other shapes: {mismatched}); pass the model given to piperc.compile"
        )
    with torch.no_grad():
        for name, value in initial.items():
            tensors[name].copy_(value)
    return copied
