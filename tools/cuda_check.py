"""The CUDA/NCCL path on a machine with ONE GPU, where the exactness tests' CUDA cases skip.

NCCL refuses two ranks on one GPU, and tests/test_train_exact.py's CUDA cases need a GPU per
rank, so on a one-GPU machine they all skip. This script checks what one GPU can check: jobs
on meshes of size 1 whose programs still hold their collectives (an NCCL world of one), the
compute and communication streams, events and waits, microbatching and ZeRO's gathers, seeded
dropout, frozen parameters, BatchNorm's running statistics, checkpoint/resume, two stages on
one device (interleaved), the backward split into B and W (zb-h1) and overlap groups on a second compute stream
(dualpipev), run by piperc's runtime alone and compared
with single-device eager training on CPU and on the GPU.

    python tools/cuda_check.py prepare OUT [--device cuda] [--only NAME ...]   # the compiler; no GPU
    python tools/cuda_check.py run OUT RESULTS               # needs torch and piperc.runtime only

On a GPU machine without the compiler's packages (or the project's Python), `run` needs only
the runtime as the package `piperc.runtime`; copy it out and run from outside the checkout,
whose `piperc/` (the driver, without `runtime/`) would otherwise shadow it in the rank processes:

    S=$(mktemp -d); cp -r piperc runtime examples tools/cuda_check.py $S/ && mv $S/runtime $S/examples $S/piperc/
    cd $S && PYTHONPATH=$S python3 cuda_check.py run /abs/path/to/OUT RESULTS

`prepare` compiles each job, saves it (`compiled.save`) with its batches and the CPU eager
reference; `run` (on the GPU machine) launches each with `piperc.runtime.launch_dir`, trains
the same model eagerly on the GPU, and writes RESULTS/summary.json: losses, relative errors
against both references, predicted and measured peak bytes, `torch.cuda.max_memory_allocated`.
A job compiled with a seed draws its dropout masks per microbatch slice (and BatchNorm
normalises each slice on its own), so both eager references run the same slices, each random op seeded as the program seeds it; CPU and CUDA
generators draw different numbers from the same seed, so such a job's errors against CPU
eager are recorded, not checked. A resumed job also trains with checkpoints for its first
steps, resumes from the last one, and compares the two halves with an uninterrupted run.
It exits 1 unless every job matches eager training on the GPU to 1e-5 (and every resumed job
its uninterrupted run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from piperc.runtime.comm import random_seed

STEPS = 3
TOLERANCE = 1e-5
CHECKPOINTED_STEPS = 2
"""A resumed job's first run: this many steps, a checkpoint after each."""


class DropoutMLP(nn.Module):
    """Residual MLP blocks with dropout (training mode), then a squared-error loss."""

    def __init__(self, width: int = 32, n_layers: int = 2, p: float = 0.1):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(p),
                          nn.Linear(4 * width, width), nn.Dropout(p))
            for _ in range(n_layers))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean squared error of the blocks' output against `y`."""
        for block in self.blocks:
            x = x + block(x)
        return ((self.head(x) - y) ** 2).mean()


def make_dropout_mlp(*, n_layers: int = 2, seed: int = 0) -> tuple[DropoutMLP, tuple[torch.Tensor, torch.Tensor]]:
    """A DropoutMLP and an (x, y) batch of 16 rows, as the examples' `make`: the same seed gives
    the same weights and batch."""
    torch.manual_seed(seed)
    model = DropoutMLP(n_layers=n_layers)
    return model, (torch.randn(16, 32), torch.randn(16, 32))


class NormedMLP(nn.Module):
    """Blocks of linear + BatchNorm (training mode: batch statistics, running statistics
    updated) + ReLU, then a squared-error loss."""

    def __init__(self, width: int = 32, n_layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width, momentum=0.2), nn.ReLU())
            for _ in range(n_layers))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean squared error of the blocks' output against `y`."""
        for block in self.blocks:
            x = block(x)
        return ((self.head(x) - y) ** 2).mean()


def make_normed_mlp(*, n_layers: int = 2, seed: int = 0) -> tuple[NormedMLP, tuple[torch.Tensor, torch.Tensor]]:
    """A NormedMLP and an (x, y) batch of 16 rows, as `make_dropout_mlp`."""
    torch.manual_seed(seed)
    model = NormedMLP(n_layers=n_layers)
    return model, (torch.randn(16, 32), torch.randn(16, 32))


@dataclasses.dataclass(frozen=True)
class Job:
    """One job on a mesh of size 1: `make(n_layers=, seed=)` builds the model and a batch (the
    examples' `make`); `frozen` names parameters set to requires_grad=False; `seed` is
    `compile(seed=)` (None: the default, for a model that draws nothing); `resume` also checks
    checkpointing and resuming."""

    make: Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]
    mesh: Any
    strategy: list
    optimizer: Any
    frozen: tuple[str, ...] = ()
    seed: int | None = None
    resume: bool = False


def jobs_to_check() -> dict[str, Job]:
    """Every job `prepare` compiles, by name."""
    import piperc
    from piperc.examples import gpt, llama

    adamw = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)
    sgd = piperc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.01)
    llama_plan = {"blocks.*.attn.[qkv].weight": piperc.Shard(0), "blocks.*.attn.o.weight": piperc.Shard(1),
                  "blocks.*.mlp.gate.weight": piperc.Shard(0), "blocks.*.mlp.up.weight": piperc.Shard(0),
                  "blocks.*.mlp.down.weight": piperc.Shard(1)}
    one_stage = {"axis": "pp", "stages": 1, "microbatches": 4}
    return {
        "gpt-dp1-buckets-adamw": Job(gpt.make, piperc.Mesh(dp=1), [piperc.data_parallel(axis="dp")], adamw),
        "gpt-dp1-zero3-adamw": Job(gpt.make, piperc.Mesh(dp=1), [piperc.data_parallel(axis="dp", zero=3)], adamw),
        "gpt-pp1xdp1-1f1b-mb4-zero3-keep-adamw": Job(
            gpt.make, piperc.Mesh(pp=1, dp=1),
            [piperc.pipeline(**one_stage, schedule="1f1b"),
             piperc.data_parallel(axis="dp", zero=3, reshard_after_forward=False)], adamw),
        "gpt-pp1xdp1-gpipe-mb4-zero2-sgd": Job(
            gpt.make, piperc.Mesh(pp=1, dp=1),
            [piperc.pipeline(**one_stage, schedule="gpipe"), piperc.data_parallel(axis="dp", zero=2)], sgd),
        "llama-tp1-adamw": Job(llama.make, piperc.Mesh(tp=1), [piperc.tensor_parallel(axis="tp", plan=llama_plan)],
                               adamw),
        "llama-tp1xdp1-zero3-adamw": Job(
            llama.make, piperc.Mesh(dp=1, tp=1),
            [piperc.data_parallel(axis="dp", zero=3), piperc.tensor_parallel(axis="tp", plan=llama_plan)], adamw),
        "mlp-dropout-pp1-1f1b-mb4-seed7-adamw": Job(
            make_dropout_mlp, piperc.Mesh(pp=1), [piperc.pipeline(**one_stage, schedule="1f1b")], adamw, seed=7),
        "gpt-frozen-embed-dp1-zero3-adamw": Job(
            gpt.make, piperc.Mesh(dp=1), [piperc.data_parallel(axis="dp", zero=3)], adamw, frozen=("embed.weight",)),
        "mlp-dropout-pp1xdp1-gpipe-mb4-zero3-seed7-adamw-resume": Job(
            make_dropout_mlp, piperc.Mesh(pp=1, dp=1),
            [piperc.pipeline(**one_stage, schedule="gpipe"), piperc.data_parallel(axis="dp", zero=3)], adamw,
            seed=7, resume=True),
        # BatchNorm normalises each slice on its own and updates its running statistics per slice
        "mlp-batchnorm-pp1xdp1-1f1b-mb4-adamw": Job(
            make_normed_mlp, piperc.Mesh(pp=1, dp=1),
            [piperc.pipeline(**one_stage, schedule="1f1b"), piperc.data_parallel(axis="dp")], adamw),
        # two stages on the one device (interleaved), and the backward split into B and W (zb-h1)
        "gpt-pp1-interleaved-v2-mb4-adamw": Job(
            gpt.make, piperc.Mesh(pp=1),
            [piperc.pipeline(axis="pp", stages=2, microbatches=4, schedule="interleaved")], adamw),
        "gpt-pp1-zb-h1-mb4-adamw": Job(gpt.make, piperc.Mesh(pp=1), [piperc.pipeline(**one_stage, schedule="zb-h1")], adamw),
        # DualPipeV on one device: its two stages in V placement, each overlap group's backward
        # on a second CUDA stream (compute1) beside the forward, ordered by events
        "gpt-pp1-dualpipev-mb4-adamw": Job(
            gpt.make, piperc.Mesh(pp=1),
            [piperc.pipeline(axis="pp", stages=2, microbatches=4, schedule="dualpipev")], adamw),
    }


def prepare(out: Path, device: str, only: list[str] | None = None) -> None:
    """Compiles and saves every job (or those named in `only`), with its batches and CPU eager
    reference, under `out`."""
    import piperc
    from piperc.reference import compiled_training, train_eager

    jobs = jobs_to_check()
    unknown = sorted(set(only or ()) - set(jobs))
    if unknown:
        raise SystemExit(f"unknown jobs {unknown}; the jobs are {sorted(jobs)}")
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, job in jobs.items():
        if only and name not in only:
            continue
        model, inputs = job.make(n_layers=2)
        for frozen in job.frozen:
            model.get_parameter(frozen).requires_grad_(False)
        batches = [job.make(n_layers=2, seed=100 + s)[1] for s in range(STEPS)]
        compiled = piperc.compile(model, inputs, mesh=job.mesh, strategy=job.strategy, optimizer=job.optimizer,
                                  device=device, keep_ir=False, seed=0 if job.seed is None else job.seed)
        if job.seed is not None and not compiled.random_ops:
            raise SystemExit(f"{name}: compiled with seed={job.seed} but its model draws no random numbers")
        compiled.save(str(out / name))
        # A model that draws random numbers draws them per slice, and BatchNorm normalises each
        # slice on its own: eager matches it only on the same slices.
        slices = compiled_training(compiled)[1] if job.seed is not None or compiled.batch_statistics else 1
        losses, state = train_eager(model, batches, job.optimizer, slices, seed=job.seed)
        torch.save({"batches": batches, "losses": losses, "state": state, "model": model},
                   out / name / "reference.pt")
        index[name] = {"optimizer": {"kind": type(job.optimizer).__name__, **vars(job.optimizer)},
                       "predicted": [m.total for m in compiled.memory()],
                       "frozen": list(job.frozen), "seed": job.seed, "slices": slices, "resume": job.resume}
        print(f"{name}: compiled, predicted peak {index[name]['predicted']} B", flush=True)
    (out / "index.json").write_text(json.dumps(index, indent=1))


def errors(losses, state, ref_losses, ref_state) -> tuple[float, float]:
    """(max relative loss error, max relative parameter error), as piperc.reference.compare."""
    loss_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses, strict=True))
    param_err = 0.0
    for name, ref in ref_state.items():
        got = state[name].to(ref.device).float()
        param_err = max(param_err, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return loss_err, param_err


class Seeded(TorchDispatchMode):
    """Seeds torch's generators before each random op of one slice's forward, as the compiled
    program does (`Runtime.seed_random`; piperc.reference's `_Seeded`, which this half cannot
    import)."""

    def __init__(self, seed: int, step: int, piece: int):
        super().__init__()
        self.seed, self.step, self.piece, self.index = seed, step, piece, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            torch.manual_seed(random_seed(self.seed, self.step, self.piece, self.index))
            self.index += 1
        return func(*args, **(kwargs or {}))


def train_eager_on(device: torch.device, model, batches, optimizer: dict, frozen=(), slices: int = 1,
                   seed: int | None = None):
    """Single-device eager training on `device` (torch.optim, as piperc.reference does), with
    the parameters named in `frozen` frozen. Each step accumulates the gradient over `slices`
    equal row slices of the batch, in order, each slice's loss scaled by 1/slices; with a
    `seed`, each slice's random ops are seeded as the compiled program seeds them."""
    model = copy.deepcopy(model).to(device)
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    if optimizer["kind"] == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=optimizer["lr"], momentum=optimizer["momentum"],
                              weight_decay=optimizer["weight_decay"], foreach=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=optimizer["lr"], betas=tuple(optimizer["betas"]),
                                eps=optimizer["eps"], weight_decay=optimizer["weight_decay"], foreach=False)
    losses = []
    for step, batch in enumerate(batches):
        opt.zero_grad()
        total = torch.zeros((), device=device)
        for piece, part in enumerate(zip(*(t.to(device).tensor_split(slices) for t in batch), strict=True)):
            with Seeded(seed, step, piece) if seed is not None else contextlib.nullcontext():
                out = model(*part)
            loss = (out[0] if isinstance(out, tuple) else out) * (1.0 / slices)
            loss.backward()
            total = total + loss.detach()
        opt.step()
        losses.append(total.item())
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def resumed(directory: Path, batches, uninterrupted) -> dict:
    """Trains the job in `directory` for CHECKPOINTED_STEPS steps with a checkpoint after each,
    then resumes it on all `batches`; compares the two runs' losses and the final state with
    the `uninterrupted` run's."""
    import piperc.runtime as rt

    with tempfile.TemporaryDirectory(prefix="cuda-check-ckpt-") as checkpoints:
        first = rt.launch_dir(directory, batches[:CHECKPOINTED_STEPS], timeout=240, checkpoint_dir=checkpoints,
                              checkpoint_every=1)
        rest = rt.launch_dir(directory, batches, timeout=240, checkpoint_dir=checkpoints, resume=True)
    losses = first.losses + rest.losses
    bitwise = losses == uninterrupted.losses and all(
        torch.equal(rest.state_dict[k], v) for k, v in uninterrupted.state_dict.items())
    return {"first_step": rest.first_step, "losses": losses, "bitwise": bitwise,
            "vs_uninterrupted": errors(losses, rest.state_dict, uninterrupted.losses, uninterrupted.state_dict),
            "state": rest.state_dict}


def run(jobs: Path, results: Path) -> int:
    """Runs every prepared job with the runtime alone; writes results/summary.json."""
    import piperc.runtime as rt

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(),
              torch.cuda.get_device_name(0), flush=True)
    index = json.loads((jobs / "index.json").read_text())
    summary = {}
    for name, info in index.items():
        ref = torch.load(jobs / name / "reference.pt", weights_only=False)
        start = time.time()
        try:
            result = rt.launch_dir(jobs / name, ref["batches"], timeout=240)
            again = resumed(jobs / name, ref["batches"], result) if info.get("resume") else None
        except Exception as e:  # reported; the next job still runs
            summary[name] = {"error": f"{type(e).__name__}: {e}"[:4000]}
            print(f"{name}: FAILED {summary[name]['error']}", flush=True)
            continue
        eager = train_eager_on(device, ref["model"], ref["batches"], info["optimizer"], info.get("frozen", ()),
                               info.get("slices", 1), info.get("seed"))
        peak = result.peak_memory[0]
        summary[name] = {
            "losses": result.losses, "wall_s": round(time.time() - start, 1),
            "vs_eager_here": errors(result.losses, result.state_dict, *eager),
            "vs_eager_cpu": errors(result.losses, result.state_dict, ref["losses"], ref["state"]),
            "eager_here_vs_eager_cpu": errors(*eager, ref["losses"], ref["state"]),
            "predicted_total": info["predicted"][0], "measured_total": peak.total,
            "cuda_max_allocated": peak.cuda_max_allocated,
        }
        if info.get("seed") is not None:
            summary[name]["seed"], summary[name]["slices"] = info["seed"], info["slices"]
        if again is not None:
            summary[name]["resumed"] = {
                **{k: v for k, v in again.items() if k != "state"},
                "vs_eager_here": errors(again["losses"], again["state"], *eager)}
        print(name, json.dumps(summary[name]), flush=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    bad = [n for n, s in summary.items() if "error" in s or not exact(s)]
    print(f"NOT EXACT OR FAILED: {bad}" if bad else f"all {len(summary)} jobs exact against eager ({TOLERANCE})")
    return 1 if bad else 0


def exact(entry: dict) -> bool:
    """Whether a job's summary entry matches eager training here to TOLERANCE and, for a
    resumed job, whether the resumed run started after the checkpointed steps and matches
    both the uninterrupted run and eager training."""
    if max(entry["vs_eager_here"]) > TOLERANCE:
        return False
    again = entry.get("resumed")
    return again is None or (again["first_step"] == CHECKPOINTED_STEPS and max(again["vs_uninterrupted"]) <= TOLERANCE
                             and max(again["vs_eager_here"]) <= TOLERANCE)


def main(argv: list[str] | None = None) -> int:
    """`prepare OUT [--device]` or `run OUT RESULTS`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", nargs="*", help="job names (default: all)")
    r = sub.add_parser("run")
    r.add_argument("jobs", type=Path)
    r.add_argument("results", type=Path)
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, args.device, args.only)
        return 0
    return run(args.jobs, args.results)


if __name__ == "__main__":
    sys.exit(main())
