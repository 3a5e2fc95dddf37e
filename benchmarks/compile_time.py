"""How long `piperc.capture` takes on a GPT, stage by stage, and how that grows with depth.

    python benchmarks/compile_time.py [--layers 6,12,24] [--d-model 768] [--repeat N]

Each depth is captured twice per repeat: once step by step, calling the steps of
`piperc.frontend.capture` in the order it calls them, to time the stages

    export   torch.export + AOTAutograd joint graph (and the fx bookkeeping after it)
    import   torch-mlir FX importer to generic IR text
    parse    xDSL parse + verify (and attaching origins and the signature)

and once as a single `piperc.capture` call (total; `cpu s` is that call's process
CPU time, so a total well above it means the machine was busy). With --repeat N
each time is the minimum over N runs. A 1-layer capture runs first, untimed, so one-time costs
(lazy imports, op classes built from ATen schemas) land in no row.
"""

from __future__ import annotations

import argparse
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

from piperc import frontend  # noqa: E402
from piperc.examples import gpt  # noqa: E402


@dataclasses.dataclass
class Row:
    """The measurements of one depth; times in seconds."""

    layers: int
    params: int
    fx_nodes: int
    ops: int
    export: float
    import_: float
    parse: float
    total: float
    total_cpu: float


def staged_capture(model, inputs) -> Row:
    """Captures like `frontend.capture` does, timing export, import and parse apart."""
    start = time.perf_counter()
    joint = frontend._joint_graph(model, inputs)
    gm = joint.graph_module
    params, _ = frontend._fold_tied_parameters(model, gm)
    frontend._check_outputs(model, gm)
    frontend._drop_none_outputs(gm)
    marks = frontend._node_marks(gm)
    exported = time.perf_counter()
    text, op_nodes = frontend._import(gm, marks)
    imported = time.perf_counter()
    module, _ = frontend._parse(text)
    frontend._attach_origins(module, op_nodes, marks)
    frontend._attach_signature(module, gm)
    module.verify()
    parsed = time.perf_counter()
    return Row(
        layers=0,
        params=sum(p.numel() for p in params.values()),
        fx_nodes=len(gm.graph.nodes),
        ops=sum(1 for _ in frontend.main_function(module).body.walk()),
        export=exported - start,
        import_=imported - exported,
        parse=parsed - imported,
        total=0.0,
        total_cpu=0.0,
    )


def timed_capture(model, inputs) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one `piperc.capture` call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    frontend.capture(model, inputs)
    return time.perf_counter() - start, time.process_time() - start_cpu


def measure(config: dict, layers: int, repeat: int) -> Row:
    """The minimum over `repeat` runs of each stage and of the total, at one depth."""
    model, inputs = gpt.make(**config, n_layers=layers)
    runs = []
    for _ in range(repeat):
        row = staged_capture(model, inputs)
        gc.collect()
        row.total, row.total_cpu = timed_capture(model, inputs)
        gc.collect()
        runs.append(row)
    return dataclasses.replace(
        runs[0],
        layers=layers,
        export=min(r.export for r in runs),
        import_=min(r.import_ for r in runs),
        parse=min(r.parse for r in runs),
        total=min(r.total for r in runs),
        total_cpu=min(r.total_cpu for r in runs),
    )


def format_table(rows: list[Row]) -> str:
    """The results as a fixed-width table, one line per depth."""
    lines = [
        f"{'layers':>6} {'params (M)':>10} {'fx nodes':>9} {'ops':>7} "
        f"{'export s':>9} {'import s':>9} {'parse s':>8} {'total s':>8} {'cpu s':>6}"
    ]
    for r in rows:
        lines.append(
            f"{r.layers:>6} {r.params / 1e6:>10.1f} {r.fx_nodes:>9} {r.ops:>7} "
            f"{r.export:>9.2f} {r.import_:>9.2f} {r.parse:>8.2f} {r.total:>8.2f} {r.total_cpu:>6.2f}"
        )
    return "\n".join(lines)


def format_growth(rows: list[Row]) -> str:
    """How the total grows between consecutive depths, next to linear growth."""
    lines = []
    for small, large in zip(rows, rows[1:], strict=False):
        lines.append(
            f"total {large.layers}/{small.layers} layers: {large.total / small.total:.2f}x "
            f"(linear: {large.layers / small.layers:.2f}x)"
        )
    return "\n".join(lines)


def parse_layers(text: str) -> list[int]:
    """'6,12,24' as [6, 12, 24]."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts, got '{text}'") from e
    if not layers or min(layers) < 1:
        raise argparse.ArgumentTypeError(f"layer counts must be positive, got '{text}'")
    return layers


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints its table; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=parse_layers, default=[6, 12, 24], help="depths to capture")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-heads", type=int, help="attention heads (default: d_model / 64)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1, help="runs per depth; the minimum is reported")
    args = ap.parse_args(argv)
    config = {
        "vocab": args.vocab,
        "d_model": args.d_model,
        "n_heads": args.n_heads or max(1, args.d_model // 64),
        "seq": args.seq,
        "batch": args.batch,
    }
    print("GPT " + " ".join(f"{k}={v}" for k, v in config.items()) + f", repeat={args.repeat}")
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    sys.stdout.flush()

    staged_capture(*gpt.make(**config, n_layers=1))
    rows = []
    for layers in args.layers:
        rows.append(measure(config, layers, args.repeat))
        gc.collect()
    print(format_table(rows))
    if len(rows) > 1:
        print(format_growth(rows))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS: {peak:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
