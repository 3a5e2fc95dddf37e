"""The CUDA/NCCL path on a machine with ONE GPU, where the exactness tests' CUDA cases skip.

NCCL refuses two ranks on one GPU, and tests/test_train_exact.py's CUDA cases need a GPU per
rank, so on a one-GPU machine they all skip. This script checks what one GPU can check: jobs
on meshes of size 1 whose programs still hold their collectives (an NCCL world of one), the
compute and communication streams, events and waits, microbatching and ZeRO's gathers, run by
piperc's runtime alone and compared with single-device eager training on CPU and on the GPU.

    python tools/cuda_check.py prepare OUT [--device cuda] [--only NAME ...]   # the compiler; no GPU
    python tools/cuda_check.py run OUT RESULTS               # needs torch and piperc.runtime only

`prepare` compiles each job, saves it (`compiled.save`) with its batches and the CPU eager
reference; `run` (on the GPU machine) launches each with `piperc.runtime.launch_dir`, trains
the same model eagerly on the GPU, and writes RESULTS/summary.json: losses, relative errors
against both references, predicted and measured peak bytes, `torch.cuda.max_memory_allocated`.
It exits 1 unless every job matches eager training on the GPU to 1e-5.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

STEPS = 3
TOLERANCE = 1e-5


def prepare(out: Path, device: str, only: list[str] | None = None) -> None:
    """Compiles and saves every job (or those named in `only`), with its batches and CPU eager
    reference, under `out`."""
    import piperc
    from piperc.examples import gpt, llama
    from piperc.reference import train_eager

    adamw = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)
    sgd = piperc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.01)
    llama_plan = {"blocks.*.attn.[qkv].weight": piperc.Shard(0), "blocks.*.attn.o.weight": piperc.Shard(1),
                  "blocks.*.mlp.gate.weight": piperc.Shard(0), "blocks.*.mlp.up.weight": piperc.Shard(0),
                  "blocks.*.mlp.down.weight": piperc.Shard(1)}
    one_stage = {"axis": "pp", "stages": 1, "microbatches": 4}
    jobs = {
        "gpt-dp1-buckets-adamw": (gpt, piperc.Mesh(dp=1), [piperc.data_parallel(axis="dp")], adamw),
        "gpt-dp1-zero3-adamw": (gpt, piperc.Mesh(dp=1), [piperc.data_parallel(axis="dp", zero=3)], adamw),
        "gpt-pp1xdp1-1f1b-mb4-zero3-keep-adamw": (
            gpt, piperc.Mesh(pp=1, dp=1),
            [piperc.pipeline(**one_stage, schedule="1f1b"),
             piperc.data_parallel(axis="dp", zero=3, reshard_after_forward=False)], adamw),
        "gpt-pp1xdp1-gpipe-mb4-zero2-sgd": (
            gpt, piperc.Mesh(pp=1, dp=1),
            [piperc.pipeline(**one_stage, schedule="gpipe"), piperc.data_parallel(axis="dp", zero=2)], sgd),
        "llama-tp1-adamw": (llama, piperc.Mesh(tp=1), [piperc.tensor_parallel(axis="tp", plan=llama_plan)], adamw),
        "llama-tp1xdp1-zero3-adamw": (
            llama, piperc.Mesh(dp=1, tp=1),
            [piperc.data_parallel(axis="dp", zero=3), piperc.tensor_parallel(axis="tp", plan=llama_plan)], adamw),
    }
    unknown = sorted(set(only or ()) - set(jobs))
    if unknown:
        raise SystemExit(f"unknown jobs {unknown}; the jobs are {sorted(jobs)}")
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, (example, mesh, strategy, optimizer) in jobs.items():
        if only and name not in only:
            continue
        model, inputs = example.make(n_layers=2)
        batches = [example.make(n_layers=2, seed=100 + s)[1] for s in range(STEPS)]
        compiled = piperc.compile(model, inputs, mesh=mesh, strategy=strategy, optimizer=optimizer,
                                  device=device, keep_ir=False)
        compiled.save(str(out / name))
        losses, state = train_eager(model, batches, optimizer)
        torch.save({"batches": batches, "losses": losses, "state": state, "model": model},
                   out / name / "reference.pt")
        index[name] = {"optimizer": {"kind": type(optimizer).__name__, **vars(optimizer)},
                       "predicted": [m.total for m in compiled.memory()]}
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


def train_eager_on(device: torch.device, model, batches, optimizer: dict):
    """Single-device eager training on `device` (torch.optim, as piperc.reference does)."""
    model = copy.deepcopy(model).to(device)
    if optimizer["kind"] == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=optimizer["lr"], momentum=optimizer["momentum"],
                              weight_decay=optimizer["weight_decay"], foreach=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=optimizer["lr"], betas=tuple(optimizer["betas"]),
                                eps=optimizer["eps"], weight_decay=optimizer["weight_decay"], foreach=False)
    losses = []
    for batch in batches:
        opt.zero_grad()
        out = model(*[t.to(device) for t in batch])
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


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
        except Exception as e:  # reported; the next job still runs
            summary[name] = {"error": f"{type(e).__name__}: {e}"[:4000]}
            print(f"{name}: FAILED {summary[name]['error']}", flush=True)
            continue
        eager = train_eager_on(device, ref["model"], ref["batches"], info["optimizer"])
        peak = result.peak_memory[0]
        summary[name] = {
            "losses": result.losses, "wall_s": round(time.time() - start, 1),
            "vs_eager_here": errors(result.losses, result.state_dict, *eager),
            "vs_eager_cpu": errors(result.losses, result.state_dict, ref["losses"], ref["state"]),
            "eager_here_vs_eager_cpu": errors(*eager, ref["losses"], ref["state"]),
            "predicted_total": info["predicted"][0], "measured_total": peak.total,
            "cuda_max_allocated": peak.cuda_max_allocated,
        }
        print(name, json.dumps(summary[name]), flush=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    bad = [n for n, s in summary.items() if "error" in s or max(s["vs_eager_here"]) > TOLERANCE]
    print(f"NOT EXACT OR FAILED: {bad}" if bad else f"all {len(summary)} jobs exact against eager ({TOLERANCE})")
    return 1 if bad else 0


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
