"""How long `piperc.compile` takes on a GPT, phase by phase, and how that grows with depth.

    python benchmarks/compile_time.py [--layers 6,12,24] [--d-model 768] [--repeat N]

Each depth is compiled whole, as a user compiles it: `piperc.compile(..., keep_ir=False)`
on a mesh pp=4 x dp=2 with a 1F1B pipeline of 4 microbatches, data parallelism and AdamW.
The phases are timed inside that one call, in CPU seconds of this process (steadier than
wall-clock time on a shared machine; torch runs single-threaded here):

    trace            AOTAutograd's joint forward+backward graph, traced once from the model
    import           torch-mlir's FX importer (MLIR in memory)
    build IR         the xDSL module built from it, origins, signature, verification
    <pass>           each pass of the pipeline, without the verification after it
    verify           verifying the IR before the first pass and after every pass
    codegen          the per-rank Python programs and the manifest
    other            the rest (fx bookkeeping, strategy checks, initial state)

`cpu` is the call's CPU time (the phases add up to it) and `wall` its wall-clock time (a
wall well above cpu means the machine was busy). With --repeat N each number is the minimum over N
compiles. A 4-layer compile runs first, untimed, so one-time costs (lazy imports, op
classes built from ATen schemas) land in no column.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import piperc  # noqa: E402
from piperc import codegen, frontend, passmanager  # noqa: E402
from piperc.examples import gpt  # noqa: E402

MESH = {"pp": 4, "dp": 2}
MICROBATCHES = 4


@dataclasses.dataclass
class Run:
    """One compile: seconds per phase, in the order they ran, and the totals."""

    phases: dict[str, float]
    wall: float
    cpu: float


class Clock:
    """Start and end times of the calls a compile makes to a few functions."""

    def __init__(self):
        self.calls: list[tuple[str, float, float]] = []
        self.passes: list[str] = []

    @contextlib.contextmanager
    def watch(self, module, name: str):
        """Records every call of `module.name` while the context is open."""
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.append((name, start, time.process_time()))

        setattr(module, name, timed)
        try:
            yield
        finally:
            setattr(module, name, original)

    def after_pass(self, p, module) -> None:
        """PipelineOptions.after_pass: names the pass whose verification just ended."""
        self.passes.append(p.name)

    def phases(self) -> dict[str, float]:
        """CPU seconds per phase; a pass runs from the end of one verification to the start of the next."""
        span = {name: (start, end) for name, start, end in self.calls if name != "_verify"}
        verifies = [(start, end) for name, start, end in self.calls if name == "_verify"]
        phases = {
            "trace": span["_trace"][1] - span["_trace"][0],
            "import": span["_import"][1] - span["_import"][0],
            "build IR": verifies[0][0] - span["_import"][1],
        }
        for name, before, after in zip(self.passes, verifies[:-1], verifies[1:], strict=True):
            phases[name] = after[0] - before[1]
        phases["verify"] = sum(end - start for start, end in verifies)
        phases["codegen"] = span["generate"][1] - span["generate"][0]
        return phases


def compile_once(model, inputs) -> Run:
    """Compiles `model` once, timing each phase inside the one `piperc.compile` call."""
    clock = Clock()
    with contextlib.ExitStack() as stack:
        for module, name in ((frontend, "_trace"), (frontend, "_import"),
                             (passmanager, "_verify"), (codegen, "generate")):
            stack.enter_context(clock.watch(module, name))
        start, start_cpu = time.perf_counter(), time.process_time()
        piperc.compile(
            model, inputs,
            mesh=piperc.Mesh(**MESH),
            strategy=[piperc.pipeline(stages=MESH["pp"], microbatches=MICROBATCHES, schedule="1f1b"),
                      piperc.data_parallel()],
            optimizer=piperc.optim.AdamW(lr=1e-3),
            options=piperc.PipelineOptions(after_pass=clock.after_pass),
            keep_ir=False,
        )  # fmt: skip
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    phases = clock.phases()
    phases["other"] = cpu - sum(phases.values())
    return Run(phases, wall, cpu)


def measure(config: dict, layers: int, repeat: int) -> Run:
    """The minimum over `repeat` compiles of each phase and of the totals, at one depth."""
    model, inputs = gpt.make(**config, n_layers=layers)
    runs = []
    for _ in range(repeat):
        runs.append(compile_once(model, inputs))
        gc.collect()
    return Run(
        {name: min(r.phases[name] for r in runs) for name in runs[0].phases},
        min(r.wall for r in runs),
        min(r.cpu for r in runs),
    )


def format_table(layers: list[int], runs: list[Run]) -> str:
    """One line per phase, one column per depth, seconds."""
    head = f"{'phase':<18}" + "".join(f"{f'{n} layers':>11}" for n in layers)
    lines = [head]
    for name in runs[0].phases:
        lines.append(f"{name:<18}" + "".join(f"{r.phases[name]:>11.2f}" for r in runs))
    lines.append(f"{'cpu':<18}" + "".join(f"{r.cpu:>11.2f}" for r in runs))
    lines.append(f"{'wall':<18}" + "".join(f"{r.wall:>11.2f}" for r in runs))
    return "\n".join(lines)


def format_growth(layers: list[int], runs: list[Run]) -> str:
    """How the CPU time grows between consecutive depths, next to linear growth."""
    lines = []
    for i in range(1, len(runs)):
        small, large = layers[i - 1], layers[i]
        ratio = runs[i].cpu / runs[i - 1].cpu
        lines.append(f"cpu {large}/{small} layers: {ratio:.2f}x (linear: {large / small:.2f}x)")
    return "\n".join(lines)


def parse_layers(text: str) -> list[int]:
    """'6,12,24' as [6, 12, 24]."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts, got '{text}'") from e
    if not layers or min(layers) < MESH["pp"]:
        raise argparse.ArgumentTypeError(
            f"layer counts must be at least {MESH['pp']} (one block per pipeline stage), got '{text}'"
        )
    return layers


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints its table; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=parse_layers, default=[6, 12, 24], help="depths to compile")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-heads", type=int, help="attention heads (default: d_model / 64)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split into 2 replicas x 4 microbatches)")
    ap.add_argument("--repeat", type=int, default=1, help="compiles per depth; the minimum is reported")
    args = ap.parse_args(argv)
    config = {
        "vocab": args.vocab,
        "d_model": args.d_model,
        "n_heads": args.n_heads or max(1, args.d_model // 64),
        "seq": args.seq,
        "batch": args.batch,
    }
    print(
        "GPT " + " ".join(f"{k}={v}" for k, v in config.items())
        + f"; mesh pp={MESH['pp']} x dp={MESH['dp']}, 1f1b, {MICROBATCHES} microbatches; repeat={args.repeat}"
    )
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    sys.stdout.flush()

    compile_once(*gpt.make(**config, n_layers=MESH["pp"]))
    runs = []
    for layers in args.layers:
        runs.append(measure(config, layers, args.repeat))
        gc.collect()
    print(format_table(args.layers, runs))
    if len(runs) > 1:
        print(format_growth(args.layers, runs))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS: {peak:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
