"""Stale pipelines against LocalSGD at equal samples: PipeDream, PipeDream-2BW, synchronous
1F1B and LocalSGD on a quadratic, logistic regression and the small GPT (issue 11).

    python benchmarks/staleness.py [--stages 2,4,8] [--problems quadratic,logistic,gpt]
        [--samples N] [--quick] [--out staleness.svg]

Randomized PipeDream (Ilin & Richtarik, arXiv 2606.03498) finds that PipeDream's stale
gradients beat LocalSGD on a quadratic and on a small language model's training loss, and
lose to it on logistic regression as the number of stages S grows. This script runs that
comparison on one process: nothing here is distributed, every method is simulated exactly
(`piperc.reference.stale_training` trains a model as an update plan of
`piperc.asynchronous` says, PipeDream's weight stashing included).

Problems (each a torch module whose parameters split into S stage blocks):

  quadratic  noiseless least squares 0.5 * mean((X w - y)^2) on the microbatch's rows, n = 512
             rows, d = 64; X = sqrt(n) U diag(s) V^T with U, V random orthonormal and s spread
             geometrically over 0.1..1 (the Hessian's eigenvalues over 0.01..1), y = X w*,
             w* ~ N(0, I); w (from 0) held as S contiguous blocks w.0 .. w.{S-1}. Minimum 0.
  logistic   mean logistic loss log(1 + exp(-y x.w)) + 1e-4/2 |w|^2 on 512 separable points
             x ~ N(0, I_64), y = sign(x.w*) for a unit w*, keeping only points with
             |x.w*| >= 0.5 (the margin); w from 0, S blocks. The tiny L2 term gives the loss a
             minimum (0.00496, found by Newton's method): without it the loss of separable data
             falls to 0 as |w| grows, the best step size is the largest that does not diverge,
             and the final losses (1e-7 .. 1e-23, or 0 in fp32) compare nothing.
  gpt        piperc.examples.gpt with S blocks (d_model 32, 4 heads, vocab 64, seq 16, seed 0);
             stages [embed, pos, blocks.0], blocks.1, ..., [blocks.{S-1}, norm, head]. The
             tokens come from a fixed random Markov chain (each token has 4 possible successors,
             Dirichlet(1) probabilities; a sequence starts from the stationary distribution),
             not from gpt.sample_batch's uniform tokens, whose best loss is log(64) from the
             first step; the chain's entropy rate is the least reachable loss.

Methods, S stages, M = S microbatches per step, every one on the same stream of N microbatches
(8 rows each; N = 512 for quadratic and logistic, 256 for gpt), so on equal samples:

  sync       `asynchronous.synchronous("1f1b", S, M, N/M)`: one update per step, the mean
             gradient of its M microbatches, no staleness (N/M updates);
  pipedream  `asynchronous.pipedream(S, M, N/M)`: 1F1B without a flush, every stage updating
             after each of its backwards with that microbatch's gradient (N updates per stage);
  2bw        `asynchronous.pipedream_2bw(S, M, N/M)`: as pipedream, but each stage applies the
             mean gradient of M microbatches (N/M updates per stage, delay 1);
  localsgd   S replicas of the whole model; replica r takes microbatches r, r+S, r+2S, ... and
             runs one SGD step on each; the replicas' parameters are averaged every H = S local
             steps (written here, plain torch).

Plain SGD for all (`piperc.optim.SGD`, no momentum). Step sizes: for each (problem, S, method)
powers of 2 from a start grid, extended one power at a time while the best is at an edge of
what was tried (the best is then between two tried step sizes, or the edge is marked `<` or
`>` in the table); the best has the lowest final loss. Final loss: the mean training loss over
the last 10% of the run's steps, each step's loss being the mean of its M microbatches' losses
where the method computed them (pipedream: at each microbatch's mixed weight versions;
localsgd: at its replica's weights). `end objective` is the loss at the final weights on the
whole dataset (gpt: a held-out batch of 64 sequences of the same chain); for localsgd the
final weights are the replicas' average (N is a multiple of S^2, so the run ends on one).
`floor` is the least reachable loss: 0 for the quadratic, the regularised minimum for
logistic, the chain's entropy rate for gpt (a bound the model need not reach); the verdict
compares the excess over it.

How to read the output:

  staleness   per S, from `asynchronous.staleness`: per stage the largest steady-state delay
              in the stage's own updates, and the largest in Randomized PipeDream's global
              units, next to the seed's S^2 - S/2;
  final       problem, S, method, chosen lr, final loss, end objective; a diverged run's loss
              is inf;
  curves      per problem and S, the mean step loss over each eighth of the run, by the
              microbatches processed at its end;
  verdict     per problem and S, whether pipedream or localsgd ends lower (final loss, its
              excess over the floor and their ratio, 'about equal' when the ratio is within
              0.9..1/0.9; and whether the end objective agrees), then each of the seed's
              three claims: holds, holds in part, or does not hold.

The plot (--out, SVG) has one panel per problem and S, the loss per step (averaged over a few
steps, log scale) of each method at its chosen lr, against microbatches processed; a dashed
line marks a floor above 0. The defaults take about 2 minutes on 2 shared cores (one thread;
gpt three quarters of it); --quick (64 microbatches, three step sizes, no extension) is for
smoke tests only. Every run is deterministic (fixed seeds, one thread): a rerun prints the same
losses.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from piperc import asynchronous
from piperc.examples import gpt
from piperc.reference import stale_training, torch_optimizer
from piperc.strategy import SGD

PROBLEMS = ("quadratic", "logistic", "gpt")
METHODS = ("sync", "pipedream", "2bw", "localsgd")
ROWS = 8
"""Rows (samples; sequences for gpt) per microbatch."""
SAMPLES = {"quadratic": 512, "logistic": 512, "gpt": 256}
"""Default microbatches per run, the same for every method and S."""
QUICK_SAMPLES = 64
START = {"quadratic": range(-2, 3), "logistic": range(-3, 2), "gpt": range(-3, 2)}
"""Exponents of 2 tried first for each problem's step size."""
QUICK_START = {"quadratic": range(-1, 2), "logistic": range(-2, 1), "gpt": range(-2, 1)}
EXPONENTS = range(-20, 9)
"""The step sizes an extension may reach: 2^-20 .. 2^8."""
DIM, POINTS, MARGIN, DECAY = 64, 512, 0.5, 1e-4
VOCAB, SEQ, D_MODEL, SUCCESSORS, HELD_OUT = 64, 16, 32, 4, 64
TIE = 0.9
"""Excess ratios within TIE..1/TIE count as about equal in the verdict."""
COLORS = {"sync": "#1f77b4", "pipedream": "#d62728", "2bw": "#ff7f0e", "localsgd": "#2ca02c"}


# ------------------------------------------------------------------------------ problems


class BlockQuadratic(nn.Module):
    """Least squares 0.5 * mean((x w - y)^2), w held as `stages` contiguous blocks w.0 .. w.{S-1}."""

    def __init__(self, dim: int, stages: int):
        super().__init__()
        sizes = [dim // stages + (s < dim % stages) for s in range(stages)]
        self.w = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss on these rows."""
        return 0.5 * ((x @ torch.cat(list(self.w)) - y) ** 2).mean()


class BlockLogistic(BlockQuadratic):
    """Mean logistic loss log(1 + exp(-y x.w)) + DECAY/2 |w|^2 for labels y in {-1, 1}, w in
    `stages` blocks."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss on these rows."""
        w = torch.cat(list(self.w))
        return nn.functional.softplus(-y * (x @ w)).mean() + 0.5 * DECAY * w.dot(w)


def logistic_minimum(x: torch.Tensor, y: torch.Tensor) -> float:
    """The least value of BlockLogistic's loss on all of (x, y), by Newton's method in float64."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(-y * (x @ w))
        gradient = -(x * (y * p)[:, None]).mean(dim=0) + DECAY * w
        hessian = (x.T * (p * (1 - p))) @ x / x.shape[0] + DECAY * torch.eye(x.shape[1], dtype=torch.float64)
        w = w - torch.linalg.solve(hessian, gradient)
    return (nn.functional.softplus(-y * (x @ w)).mean() + 0.5 * DECAY * w.dot(w)).item()


@dataclass
class Problem:
    """A model split into stages, the stream of microbatches every method trains on, and the
    objective at final weights."""

    name: str
    model: nn.Module
    stages: list[list[str]]
    stream: list[tuple[torch.Tensor, ...]]
    objective: Callable[[dict[str, torch.Tensor]], float]
    floor: float = 0.0
    """The least reachable loss: 0, the regularised minimum or the Markov chain's entropy rate."""
    floor_note: str = "its minimum"


def block_stages(model: nn.Module, stages: int) -> list[list[str]]:
    """Stage s holds block w.s."""
    return [[f"w.{s}"] for s in range(stages)]


def gpt_stages(model: nn.Module, stages: int) -> list[list[str]]:
    """[embed, pos, blocks.0], blocks.1, ..., [blocks.{S-1}, norm, head]."""
    out: list[list[str]] = [[] for _ in range(stages)]
    for name, _ in model.named_parameters():
        top = name.split(".")[0]
        if top in ("embed", "pos"):
            out[0].append(name)
        elif top in ("norm", "head"):
            out[-1].append(name)
        elif top == "blocks":
            out[int(name.split(".")[1])].append(name)
        else:
            raise ValueError(f"gpt parameter {name!r} belongs to no stage")
    return out


def epochs(rows: torch.Tensor, labels: torch.Tensor, microbatches: int, gen: torch.Generator):
    """`microbatches` microbatches of ROWS rows, in shuffled passes over the data."""
    order = torch.cat([torch.randperm(rows.shape[0], generator=gen)
                       for _ in range(math.ceil(microbatches * ROWS / rows.shape[0]))])
    return [(rows[i], labels[i]) for i in order[:microbatches * ROWS].split(ROWS)]


def objective_of(model: nn.Module, *data: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], float]:
    """The loss of `model` loaded with a state_dict, on `data`."""
    def objective(state: dict[str, torch.Tensor]) -> float:
        """The loss at `state`."""
        probe = copy.deepcopy(model)
        probe.load_state_dict(state)
        with torch.no_grad():
            return probe(*data).item()
    return objective


def quadratic(stages: int, microbatches: int) -> Problem:
    """Noiseless least squares, X's singular values / sqrt(n) over 0.1..1 (see the module docstring)."""
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(POINTS, DIM, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
    spectrum = torch.logspace(-1, 0, DIM)
    x = POINTS**0.5 * u @ torch.diag(spectrum) @ v.T
    y = x @ torch.randn(DIM, generator=gen)
    model = BlockQuadratic(DIM, stages)
    return Problem("quadratic", model, block_stages(model, stages), epochs(x, y, microbatches, gen),
                   objective_of(model, x, y))


def logistic(stages: int, microbatches: int) -> Problem:
    """Separable logistic regression with margin MARGIN and a tiny L2 term (see the module docstring)."""
    gen = torch.Generator().manual_seed(2)
    truth = torch.randn(DIM, generator=gen)
    truth /= truth.norm()
    kept: list[torch.Tensor] = []
    while sum(len(k) for k in kept) < POINTS:
        x = torch.randn(POINTS, DIM, generator=gen)
        kept.append(x[(x @ truth).abs() >= MARGIN])
    x = torch.cat(kept)[:POINTS]
    y = torch.sign(x @ truth)
    model = BlockLogistic(DIM, stages)
    return Problem("logistic", model, block_stages(model, stages), epochs(x, y, microbatches, gen),
                   objective_of(model, x, y), logistic_minimum(x, y), "the regularised minimum")


def markov_chain(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A random transition matrix with SUCCESSORS successors per token, its stationary
    distribution and its entropy rate (nats per token)."""
    transition = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for token in range(VOCAB):
        successors = torch.randperm(VOCAB, generator=gen)[:SUCCESSORS]
        weights = -torch.log(torch.rand(SUCCESSORS, generator=gen, dtype=torch.float64))  # Dirichlet(1)
        transition[token, successors] = weights / weights.sum()
    stationary = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
    for _ in range(10_000):
        stationary = stationary @ transition
    logs = torch.where(transition > 0, transition.log(), torch.zeros_like(transition))
    rate = -(stationary * (transition * logs).sum(dim=1)).sum().item()
    return transition, stationary, rate


def chain_batch(transition: torch.Tensor, stationary: torch.Tensor, batch: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` sequences of the chain as (tokens, targets), targets = tokens shifted by one."""
    stream = torch.empty(batch, SEQ + 1, dtype=torch.long)
    stream[:, 0] = torch.multinomial(stationary, batch, replacement=True, generator=gen)
    for t in range(SEQ):
        stream[:, t + 1] = torch.multinomial(transition[stream[:, t]], 1, generator=gen)[:, 0]
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


def gpt_problem(stages: int, microbatches: int) -> Problem:
    """The example GPT with one block per stage on Markov-chain tokens (see the module docstring)."""
    gen = torch.Generator().manual_seed(3)
    transition, stationary, rate = markov_chain(gen)
    model, _ = gpt.make(vocab=VOCAB, d_model=D_MODEL, n_layers=stages, seq=SEQ, seed=0)
    stream = [chain_batch(transition, stationary, ROWS, gen) for _ in range(microbatches)]
    held_out = chain_batch(transition, stationary, HELD_OUT, gen)
    return Problem("gpt", model, gpt_stages(model, stages), stream, objective_of(model, *held_out), rate,
                   f"the chain's entropy rate; uniform guessing: {math.log(VOCAB):.3g}")


MAKERS = {"quadratic": quadratic, "logistic": logistic, "gpt": gpt_problem}


# ------------------------------------------------------------------------------- methods


def local_sgd(problem: Problem, stages: int, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """LocalSGD: `stages` replicas, replica r runs one SGD step on each microbatch n with
    n % stages == r; parameters averaged every H = `stages` local steps. Returns the loss of
    each microbatch (at its replica's weights before the step) and the averaged final state."""
    replicas = [copy.deepcopy(problem.model) for _ in range(stages)]
    optimizers = [torch_optimizer(SGD(lr=lr), list(r.parameters())) for r in replicas]
    losses = []
    for n, microbatch in enumerate(problem.stream):
        r = n % stages
        optimizers[r].zero_grad()
        loss = replicas[r](*microbatch)
        loss.backward()
        optimizers[r].step()
        losses.append(loss.item())
        if (n + 1) % (stages * stages) == 0 or n + 1 == len(problem.stream):
            with torch.no_grad():
                for params in zip(*(r.parameters() for r in replicas), strict=True):
                    mean = torch.stack([p for p in params]).mean(dim=0)
                    for p in params:
                        p.copy_(mean)
    return losses, {k: v.detach().clone() for k, v in replicas[0].state_dict().items()}


def plan_of(method: str, stages: int, steps: int) -> asynchronous.UpdatePlan:
    """The update plan of a pipeline method, M = `stages` microbatches per step."""
    if method == "sync":
        return asynchronous.synchronous("1f1b", stages, stages, steps)
    return {"pipedream": asynchronous.pipedream, "2bw": asynchronous.pipedream_2bw}[method](stages, stages, steps)


@dataclass
class Run:
    """One method at one step size: per-step losses, final loss, objective at the end."""

    lr: float
    losses: list[float]
    final: float
    end: float


def train(problem: Problem, method: str, stages: int, lr: float) -> Run:
    """Trains `problem` with `method` at step size `lr`; a run whose losses are not finite
    has final loss inf."""
    steps = len(problem.stream) // stages
    if method == "localsgd":
        per_microbatch, state = local_sgd(problem, stages, lr)
        losses = [sum(per_microbatch[t * stages:(t + 1) * stages]) / stages for t in range(steps)]
    else:
        batches = [tuple(torch.cat(parts) for parts in zip(*problem.stream[t * stages:(t + 1) * stages], strict=True))
                   for t in range(steps)]
        losses, state = stale_training(problem.model, plan_of(method, stages, steps), batches, SGD(lr=lr),
                                       problem.stages)
    tail = losses[-max(1, round(steps / 10)):]
    final = sum(tail) / len(tail)
    end = problem.objective(state)
    if not all(math.isfinite(v) for v in losses) or not math.isfinite(end):
        final = end = math.inf
    return Run(lr, losses, final, end)


@dataclass
class Tuned:
    """The best run over the step sizes tried, and where it sits among them."""

    best: Run
    tried: dict[int, float] = field(default_factory=dict)
    """exponent -> final loss."""

    @property
    def edge(self) -> str:
        """'<' if the best is the smallest step size tried, '>' the largest, else ''."""
        e = round(math.log2(self.best.lr))
        return "<" if e == min(self.tried) else ">" if e == max(self.tried) else ""


def tune(problem: Problem, method: str, stages: int, start: range, extend: bool) -> Tuned:
    """The best step size 2^e: `start`'s exponents first, then (with `extend`) one more below
    or above while the best is the smallest or the largest tried, within EXPONENTS."""
    runs: dict[int, Run] = {}
    todo = list(start)
    while todo:
        for e in todo:
            runs[e] = train(problem, method, stages, 2.0**e)
        todo = []
        best = min(runs, key=lambda e: (runs[e].final, e))
        if extend and best == min(runs) and best - 1 in EXPONENTS:
            todo = [best - 1]
        elif extend and best == max(runs) and best + 1 in EXPONENTS:
            todo = [best + 1]
    best = min(runs, key=lambda e: (runs[e].final, e))
    return Tuned(runs[best], {e: r.final for e, r in sorted(runs.items())})


# ------------------------------------------------------------------------------- output


def staleness_table(stage_counts: list[int]) -> list[str]:
    """Per S, the steady-state delays of pipedream and 2bw (M = S)."""
    lines = ["staleness (steady state, M = S; per stage in its own updates; global in the seed's units)",
             f"{'S':>3}  {'plan':<10} {'per-stage max':<26} {'global max':>10}  {'S^2 - S/2':>9}"]
    for s in stage_counts:
        for name, make in (("pipedream", asynchronous.pipedream), ("2bw", asynchronous.pipedream_2bw)):
            delays = asynchronous.staleness(make(s, s, 10))
            per_stage = ",".join(map(str, delays.stage_max()))
            lines.append(f"{s:>3}  {name:<10} {per_stage:<26} {delays.global_max():>10}  {s * s - s / 2:>9g}")
    return lines


def checkpoints(losses: list[float], count: int = 8) -> list[float]:
    """The mean step loss over each of `count` equal parts of the run (fewer if it is short)."""
    count = min(count, len(losses))
    bounds = [round(k * len(losses) / count) for k in range(count + 1)]
    return [sum(losses[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:], strict=False)]


def fmt(value: float) -> str:
    """A loss in 3 significant digits."""
    return "inf" if not math.isfinite(value) else f"{value:.3g}"


def svg_plot(results: dict[tuple[str, int], dict[str, Tuned]], samples: dict[str, int], floors: dict[str, float],
             path: str) -> None:
    """One panel per (problem, S): each method's step losses (smoothed), log y, and the
    problem's floor (dashed) where it is above 0, to `path`."""
    problems = list(dict.fromkeys(p for p, _ in results))
    stage_counts = sorted({s for _, s in results})
    width, height, left, top, gap = 300, 200, 56, 28, 30
    cols, rows = len(stage_counts), len(problems)
    total_w, total_h = cols * (width + left + gap) + gap, rows * (height + top + 40) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="{total_w}" height="{total_h}" fill="white"/>']
    for i, method in enumerate(METHODS):
        x = gap + i * 110
        out.append(f'<line x1="{x}" y1="16" x2="{x + 20}" y2="16" stroke="{COLORS[method]}" stroke-width="2"/>')
        out.append(f'<text x="{x + 24}" y="20">{method}</text>')
    for row, problem in enumerate(problems):
        for col, s in enumerate(stage_counts):
            if (problem, s) not in results:
                continue
            x0, y0 = gap + left + col * (width + left + gap), 40 + top + row * (height + top + 40)
            series = {}
            for method, tuned in results[(problem, s)].items():
                steps = tuned.best.losses
                window = max(1, len(steps) // 64)
                points = [(min(len(steps), k + window) * s, sum(steps[k:k + window]) / len(steps[k:k + window]))
                          for k in range(0, len(steps), window)]
                series[method] = [(n, v) for n, v in points if math.isfinite(v) and v > 0]
            values = [v for pts in series.values() for _, v in pts] + [floors[problem]] * (floors[problem] > 0)
            if not values:
                continue
            lo, hi = math.log10(min(values)), math.log10(max(values))
            if hi - lo >= 1:  # whole decades, a tick at each
                lo, hi = math.floor(lo), math.ceil(hi)
                ticks = [(10.0**d, f"1e{d}") for d in range(lo, hi + 1)]
            else:  # under a decade: the range itself, padded, ticked at its ends
                pad = max(0.05 * (hi - lo), 0.01)
                lo, hi = lo - pad, hi + pad
                ticks = [(v, fmt(v)) for v in (min(values), max(values))]

            def px(n: float, _x0: float = x0, _total: int = samples[problem]) -> float:
                return _x0 + width * n / _total

            def py(v: float, _y0: float = y0, _lo: float = lo, _hi: float = hi) -> float:
                return _y0 + height * (1 - (math.log10(v) - _lo) / (_hi - _lo))

            out.append(f'<rect x="{x0}" y="{y0}" width="{width}" height="{height}" fill="none" stroke="#888"/>')
            out.append(f'<text x="{x0 + width / 2}" y="{y0 - 8}" text-anchor="middle">{problem}, S = {s}</text>')
            for value, label in ticks:
                y = py(value)
                out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#eee"/>')
                out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
            for frac in (0, 0.5, 1):
                n = samples[problem] * frac
                out.append(f'<text x="{px(n):.1f}" y="{y0 + height + 14}" text-anchor="middle">{n:g}</text>')
            out.append(f'<text x="{x0 + width / 2}" y="{y0 + height + 28}" text-anchor="middle">'
                       'microbatches processed</text>')
            if floors[problem] > 0:
                y = py(floors[problem])
                out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#444" '
                           'stroke-dasharray="4,3"/>')
            for method, pts in series.items():
                line = " ".join(f"{px(n):.1f},{py(v):.1f}" for n, v in pts)
                out.append(f'<polyline points="{line}" fill="none" stroke="{COLORS[method]}" stroke-width="1.5"/>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def claim(name: str, wins: dict[int, bool | None], expect_pipedream: bool) -> str:
    """'holds', 'holds at S = ...' or 'does not hold' for "pipedream beats localsgd" (or loses);
    `wins[S]` is None where the two are about equal."""
    good = [s for s, pipedream_lower in wins.items() if pipedream_lower == expect_pipedream]
    state = "holds" if len(good) == len(wins) else "holds in part" if good else "does not hold"
    said = {True: "pipedream lower", None: "about equal", False: "localsgd lower"}
    parts = [f"{text} at S = {', '.join(str(s) for s, w in wins.items() if w is key)}"
             for key, text in said.items() if key in wins.values()]
    return f"{name}: {state} ({'; '.join(parts)})"


def excess_ratio(pipedream: float, localsgd: float) -> float:
    """pipedream's excess over localsgd's (inf where localsgd's is not positive and finite)."""
    return pipedream / localsgd if 0 < localsgd < math.inf else math.inf


def verdict(results: dict[tuple[str, int], dict[str, Tuned]], floors: dict[str, float]) -> list[str]:
    """Per problem and S, pipedream against localsgd by final loss (and whether the end
    objective agrees); then the seed's claims."""
    lines = ["verdict (pipedream vs localsgd by final loss; excess = final loss - floor; "
             f"ratio = pipedream's excess / localsgd's, 'about equal' within {TIE:g}..{1 / TIE:.3g})"]
    wins: dict[str, dict[int, bool | None]] = {}
    ratios: dict[str, dict[int, float]] = {}
    for (problem, s), methods in results.items():
        pd, ls = methods["pipedream"].best, methods["localsgd"].best
        floor = floors[problem]
        ratio = ratios.setdefault(problem, {})[s] = excess_ratio(pd.final - floor, ls.final - floor)
        win = wins.setdefault(problem, {})[s] = None if TIE <= ratio <= 1 / TIE else pd.final < ls.final
        said = {None: "about equal", True: "pipedream lower", False: "localsgd lower"}[win]
        end = "pipedream lower" if pd.end < ls.end else "localsgd lower"
        agree = "" if win is None else " (agrees)" if (pd.end < ls.end) == win else " (disagrees)"
        lines.append(f"  {problem:<10} S={s}: pipedream {fmt(pd.final)} vs localsgd {fmt(ls.final)} "
                     f"(excess {fmt(pd.final - floor)} vs {fmt(ls.final - floor)}, ratio {fmt(ratio)}): "
                     f"{said}; end objective {fmt(pd.end)} vs {fmt(ls.end)}: {end}{agree}")
    lines.append("seed's claims, here:")
    if "quadratic" in wins:
        lines.append("  " + claim("pipedream beats localsgd on the quadratic", wins["quadratic"], True))
    if "gpt" in wins:
        lines.append("  " + claim("pipedream beats localsgd on the small LM's training loss", wins["gpt"], True))
    if "logistic" in wins:
        by_s = sorted(ratios["logistic"])
        r = [ratios["logistic"][s] for s in by_s]
        loses_at_top = wins["logistic"][by_s[-1]] is False
        grows = len(r) > 1 and all(b > a for a, b in zip(r, r[1:], strict=False))
        state = ("holds" if loses_at_top and grows else
                 "holds in part" if loses_at_top or (grows and r[-1] > r[0]) else "does not hold")
        lines.append(f"  pipedream loses to localsgd on logistic regression as S grows: {state} "
                     f"(ratio {', '.join(f'{fmt(x)} at S={s}' for s, x in zip(by_s, r, strict=True))}; "
                     f"pipedream {'loses' if loses_at_top else 'does not lose'} at S={by_s[-1]}; the ratio "
                     f"{'grows with S' if grows else 'does not grow steadily with S'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison and prints the tables and the verdict."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="2,4,8", help="stage counts S, comma-separated")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated, of " + ", ".join(PROBLEMS))
    ap.add_argument("--samples", type=int, default=None,
                    help="microbatches per run for every problem, a multiple of every S^2 "
                         f"(default {SAMPLES['quadratic']} for quadratic and logistic, {SAMPLES['gpt']} for gpt)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke-test size: {QUICK_SAMPLES} microbatches, three step sizes, no extension")
    ap.add_argument("--out", default="staleness.svg", help="the SVG plot's path")
    args = ap.parse_args(argv)
    stage_counts = [int(s) for s in args.stages.split(",")]
    problems = args.problems.split(",")
    unknown = [p for p in problems if p not in PROBLEMS]
    if unknown or any(s < 2 for s in stage_counts):
        raise SystemExit(f"unknown problems {unknown}, or a stage count under 2: {stage_counts}")
    samples = {p: args.samples or (QUICK_SAMPLES if args.quick else SAMPLES[p]) for p in problems}
    for p, n in samples.items():
        bad = [s for s in stage_counts if n % (s * s)]
        if bad:
            raise SystemExit(f"{p}: {n} microbatches is not a multiple of S^2 for S = {bad}")
    torch.set_num_threads(1)
    began = time.perf_counter()
    print(f"stale pipelines vs LocalSGD: S = {stage_counts}, M = S microbatches per step, {ROWS} rows each, "
          f"plain SGD; microbatches per run: " + ", ".join(f"{p} {n}" for p, n in samples.items()))
    print()
    print("\n".join(staleness_table(stage_counts)))
    results: dict[tuple[str, int], dict[str, Tuned]] = {}
    timing = {}
    floors: dict[str, tuple[float, str]] = {}
    for problem_name in problems:
        t0 = time.perf_counter()
        for s in stage_counts:
            problem = MAKERS[problem_name](s, samples[problem_name])
            floors[problem_name] = (problem.floor, problem.floor_note)
            start = (QUICK_START if args.quick else START)[problem_name]
            results[(problem_name, s)] = {m: tune(problem, m, s, start, not args.quick) for m in METHODS}
        timing[problem_name] = time.perf_counter() - t0
    print()
    print("final loss = mean training loss over the last 10% of steps (lr chosen by it, powers of 2; "
          "< / > = the smallest / largest tried); end objective = loss at the final weights on the whole data")
    print(f"{'problem':<10} {'S':>2}  {'method':<10} {'lr':>12}  {'final loss':>10}  {'end objective':>13}  tried")
    for (problem_name, s), methods in results.items():
        for method, tuned in methods.items():
            lr = f"2^{round(math.log2(tuned.best.lr))}{tuned.edge}"
            print(f"{problem_name:<10} {s:>2}  {method:<10} {lr:>12}  {fmt(tuned.best.final):>10}  "
                  f"{fmt(tuned.best.end):>13}  2^{min(tuned.tried)}..2^{max(tuned.tried)}")
    print("floor (least reachable loss): " + "; ".join(f"{p} {floor:.4g} ({note})"
                                                       for p, (floor, note) in floors.items()))
    print()
    print("loss against microbatches processed (mean step loss over each eighth of the run, chosen lr)")
    for (problem_name, s), methods in results.items():
        n = samples[problem_name]
        marks = [round(n * (k + 1) / len(checkpoints(methods['sync'].best.losses)))
                 for k in range(len(checkpoints(methods['sync'].best.losses)))]
        print(f"{problem_name}, S={s}: {'microbatches':<10}" + "".join(f"{m:>9}" for m in marks))
        for method, tuned in methods.items():
            print(f"{'':>{len(problem_name) + 8}}{method:<12}" + "".join(f"{fmt(v):>9}"
                                                                    for v in checkpoints(tuned.best.losses)))
    print()
    print("\n".join(verdict(results, {p: floor for p, (floor, _) in floors.items()})))
    svg_plot(results, samples, {p: floor for p, (floor, _) in floors.items()}, args.out)
    print()
    print(f"plot: {args.out}")
    print("time: " + ", ".join(f"{p} {t:.1f} s" for p, t in timing.items())
          + f"; total {time.perf_counter() - began:.1f} s (one thread; {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, Python {platform.python_version()})")
    print("command: " + shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                                    *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
