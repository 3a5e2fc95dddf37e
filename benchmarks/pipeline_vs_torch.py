"""Training step time of piperc next to torch's own distributed training, on 4 CPU ranks.

    python benchmarks/pipeline_vs_torch.py [--steps 20] [--warmup 3] [--d-model 128]
        [--layers 8] [--batch 32] [--seq 64] [--microbatches 8] [--only pp|dp]

Two pairs of contenders train the same GPT (examples/gpt.py, 4 heads, vocab 1024) from the
same initial weights on the same global batches, each a full step with an SGD update:

    pp   piperc pp=4, 1F1B       vs  torch.distributed.pipelining PipelineStage + Schedule1F1B
    dp   piperc dp=4             vs  torch.nn.parallel.DistributedDataParallel

Both pipelines cut the model at the same places: stage 0 holds the embeddings and the first
quarter of the blocks, stage 3 the last quarter, the final norm, the head and the loss.
The default size (8 blocks, d_model 128, seq 64, global batch 32: 1.85M parameters) takes
about 0.4-0.8 s a step on 2 shared cores; d_model 256 takes 1.4-1.8 s.

Each contender runs in 4 fresh worker processes (gloo, one thread each), so its peak RSS is
its own (it includes the torch library, in every process). Every step sits between two
barriers; a step's time is the slowest rank's, and the table shows the median and the
extremes over the timed steps. The step-0 losses of each pair must agree to 1e-5, or the
contenders do not train the same model on the same data and the script fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from piperc.examples import gpt  # noqa: E402

WORLD = 4
N_HEADS = 4
VOCAB = 1024
LR = 0.01
LOSS_TOLERANCE = 1e-5
JOB_TIMEOUT = 600.0
LOG_TAIL_LINES = 30

PAIRS = {
    "pp": ("piperc-pp", "torch-pipelining"),
    "dp": ("piperc-dp", "torch-ddp"),
}
LABELS = {
    "piperc-pp": "piperc pp=4 1F1B",
    "torch-pipelining": "torch pipelining Schedule1F1B",
    "piperc-dp": "piperc dp=4",
    "torch-ddp": "torch DDP",
}

Step = Callable[[tuple[torch.Tensor, torch.Tensor]], float | None]
"""One training step on the global batch; returns what this rank knows of the step's loss."""


# ----------------------------------------------------------------------------- contenders
# Each builds this rank's part of the training step. A returned loss is either the global
# mean (piperc), the mean over this rank's rows (DDP), or None where the rank holds no loss
# (torch pipelining, stages 0-2); the mean of the losses the ranks return is the global loss.


def piperc_step(config: dict, scratch: Path, rank: int, pair: str) -> Step:
    """piperc's compiled program for this rank, loaded by the runtime alone."""
    from piperc import runtime

    executor = runtime.load(scratch / f"piperc-{pair}")
    return executor.step


class GPTStage(nn.Module):
    """One pipeline stage of a GPT: its share of the blocks, with the embeddings on the first
    stage and the final norm and head on the last (which returns logits)."""

    def __init__(self, model: gpt.GPT, stage: int, stages: int):
        super().__init__()
        per_stage = len(model.blocks) // stages
        self.blocks = nn.ModuleList(model.blocks[stage * per_stage : (stage + 1) * per_stage])
        first, last = stage == 0, stage == stages - 1
        self.embed = model.embed if first else None
        self.pos = model.pos if first else None
        self.norm = model.norm if last else None
        self.head = model.head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.embed(x) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss `gpt.GPT.forward` computes from its logits: mean cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def torch_pipelining_step(config: dict, scratch: Path, rank: int) -> Step:
    """This rank's stage under torch.distributed.pipelining's 1F1B schedule, then SGD."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    module = GPTStage(initial_model(config, scratch), rank, WORLD)
    stage = PipelineStage(module, rank, WORLD, torch.device("cpu"))
    # scale_grads (the default) divides by the microbatch count: the mean loss's gradient.
    schedule = Schedule1F1B(stage, n_microbatches=config["microbatches"], loss_fn=next_token_loss)
    return pipelining_step(schedule, torch.optim.SGD(module.parameters(), lr=LR), rank)


def pipelining_step(schedule, optimizer: torch.optim.Optimizer, rank: int, last: int = WORLD - 1) -> Step:
    """One training step under a torch.distributed.pipelining `schedule`, then `optimizer`:
    rank 0 feeds the tokens (it holds the first stage), rank `last` the targets (it holds
    the last stage: the last rank in 1F1B's and in loop placement, rank 0 in V placement);
    the loss is that rank's mean."""

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float | None:
        tokens, targets = batch
        losses: list[torch.Tensor] = []
        inputs = (tokens,) if rank == 0 else ()
        # return_outputs=False: piperc does not gather the logits either.
        if rank == last:
            schedule.step(*inputs, target=targets, losses=losses, return_outputs=False)
        else:
            schedule.step(*inputs, return_outputs=False)
        optimizer.step()
        optimizer.zero_grad()
        return torch.stack(losses).mean().item() if losses else None

    return step


def torch_ddp_step(config: dict, scratch: Path, rank: int) -> Step:
    """The whole model under DistributedDataParallel on this rank's quarter of the batch."""
    model = nn.parallel.DistributedDataParallel(initial_model(config, scratch))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rows = config["batch"] // WORLD

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        tokens, targets = (x[rank * rows : (rank + 1) * rows] for x in batch)
        loss = model(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


CONTENDERS: dict[str, Callable[[dict, Path, int], Step]] = {
    "piperc-pp": lambda config, scratch, rank: piperc_step(config, scratch, rank, "pp"),
    "torch-pipelining": torch_pipelining_step,
    "piperc-dp": lambda config, scratch, rank: piperc_step(config, scratch, rank, "dp"),
    "torch-ddp": torch_ddp_step,
}


def new_model(config: dict) -> gpt.GPT:
    """The benchmark's GPT, with freshly initialised weights."""
    model, _ = gpt.make(
        vocab=VOCAB,
        d_model=config["d_model"],
        n_heads=N_HEADS,
        n_layers=config["layers"],
        seq=config["seq"],
        batch=1,
    )
    return model


def initial_model(config: dict, scratch: Path) -> gpt.GPT:
    """The benchmark's GPT with the initial weights piperc compiled from."""
    model = new_model(config)
    model.load_state_dict(torch.load(scratch / "initial.pt", weights_only=True))
    return model


# ----------------------------------------------------------------------------- worker


def worker(name: str, scratch: Path, rank: int, port: int) -> None:
    """Runs contender `name` as `rank` and writes its measurements to the scratch folder."""
    run_worker("pipeline_vs_torch", name, scratch, rank, port)


def run_worker(script: str, name: str, scratch: Path, rank: int, port: int) -> None:
    """Runs contender `name` of benchmark `script` (a module of benchmarks/ with a `CONTENDERS`
    table) as `rank` and writes its measurements to the scratch folder; a benchmark's workers
    are `functools.partial(run_worker, "<script>")`."""
    contenders = importlib.import_module(script).CONTENDERS
    config = join(name, scratch, rank, port)
    batches = torch.load(scratch / "batches.pt", weights_only=True)
    step = contenders[name](config, scratch, rank)
    cpu = []
    losses, times = timed_steps(step, batches, config["warmup"], cpu)
    result = {"losses": losses, "times": times, "cpu_times": cpu, "peak_rss_mib": peak_rss_mib()}
    (scratch / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def join(name: str, scratch: Path, rank: int, port: int, world: int = WORLD) -> dict:
    """Sends this worker's output to its log in the scratch folder, joins the gloo group of
    `world` ranks on `port` with one thread; returns the run's config."""
    log = os.open(scratch / f"{name}.rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    config = json.loads((scratch / "config.json").read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    return config


def timed_steps(step: Step, batches, warmup: int, cpu: list[float] | None = None
                ) -> tuple[list[float | None], list[float]]:
    """Runs `step` on every batch, each between two barriers; returns the losses and the
    times of the steps after the first `warmup` (and appends to `cpu`, if given, the CPU
    seconds this process spent in each of them: its work, whatever the cores it shares)."""
    losses, times = [], []
    for i, batch in enumerate(batches):
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        losses.append(step(tuple(batch)))
        used = time.process_time() - start_cpu
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if cpu is not None:
                cpu.append(used)
    return losses, times


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over an exec, so a worker
    could report its launcher's size instead of its own.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- launcher


def fork_server() -> mp.context.ForkServerContext:
    """Starts workers from a fresh process that has imported torch once, so a contender's
    4 processes do not each spend seconds importing it again on the shared cores.

    Only what every contender needs is preloaded, so each contender's own machinery
    (piperc's runtime, torch.distributed.pipelining, DDP) counts in its own peak RSS.
    ("__main__" cannot be preloaded: Python 3.11's forkserver never passes it the path.)
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "torch.nn.functional"])
    return context


def run_contender(
    context: mp.context.BaseContext, name: str, scratch: Path, target: Callable = worker, world: int = WORLD
) -> list[dict]:
    """Runs contender `name` in `world` fresh processes, each `target(name, scratch, rank, port)`
    (by default this script's `worker`, which joins a group of WORLD); returns each rank's
    measurements."""
    port = free_port()
    procs = [
        context.Process(target=target, args=(name, scratch, rank, port)) for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        while any(p.exitcode is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(
                    f"{name}: rank(s) {failed} failed\n" + log_tails(name, scratch, failed)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name}: did not finish within {JOB_TIMEOUT:g} s\n"
                    + log_tails(name, scratch, range(world))
                )
            time.sleep(0.1)
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"{name}: rank(s) {failed} failed\n" + log_tails(name, scratch, failed))
    finally:
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join()
    return [json.loads((scratch / f"{name}.rank{r}.json").read_text()) for r in range(world)]


def log_tails(name: str, scratch: Path, ranks) -> str:
    """The last lines each of `ranks` printed."""
    parts = []
    for rank in ranks:
        lines = (scratch / f"{name}.rank{rank}.log").read_text(errors="replace").splitlines()
        shown = "\n".join(lines[-LOG_TAIL_LINES:]) or "(no output)"
        parts.append(f"--- {name} rank {rank} ---\n{shown}")
    return "\n".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- driver


def compile_piperc(pair: str, config: dict, model: gpt.GPT, batch, scratch: Path) -> float:
    """Compiles the piperc contender of `pair` into scratch/piperc-<pair>; returns seconds."""
    import piperc

    if pair == "pp":
        per_stage = config["layers"] // WORLD
        mesh = piperc.Mesh(pp=WORLD)
        strategy = [
            piperc.pipeline(
                axis="pp",
                stages=WORLD,
                microbatches=config["microbatches"],
                schedule="1f1b",
                split_at=[f"blocks.{s * per_stage}" for s in range(1, WORLD)],
            )
        ]
    else:
        mesh = piperc.Mesh(dp=WORLD)
        strategy = [piperc.data_parallel(axis="dp")]
    start = time.perf_counter()
    compiled = piperc.compile(
        model, batch, mesh=mesh, strategy=strategy, optimizer=piperc.optim.SGD(lr=LR), keep_ir=False
    )
    compiled.save(str(scratch / f"piperc-{pair}"))
    return time.perf_counter() - start


def summarize(ranks: list[dict]) -> dict:
    """Median step time (slowest rank per step), step-0 and last losses, peak RSS per rank, and
    each rank's median CPU seconds per step."""
    per_step = [max(times) for times in zip(*(r["times"] for r in ranks), strict=True)]

    def loss_at(i: int) -> float:
        known = [r["losses"][i] for r in ranks if r["losses"][i] is not None]
        return sum(known) / len(known)

    return {
        "median": statistics.median(per_step),
        "min": min(per_step),
        "max": max(per_step),
        "loss0": loss_at(0),
        "loss_last": loss_at(-1),
        "rss": [r["peak_rss_mib"] for r in ranks],
        "cpu": [statistics.median(r["cpu_times"]) if r.get("cpu_times") else None for r in ranks],
    }


def machine() -> str:
    """The CPU model, core count and torch version, in one line."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or "unknown"."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def check_config(args: argparse.Namespace) -> None:
    if args.layers % WORLD:
        raise SystemExit(f"--layers {args.layers} must be a multiple of {WORLD} (blocks per stage)")
    if args.d_model % N_HEADS:
        raise SystemExit(f"--d-model {args.d_model} must be a multiple of {N_HEADS} heads")
    if args.batch % WORLD or args.batch % args.microbatches:
        raise SystemExit(
            f"--batch {args.batch} must split into {WORLD} replicas and into "
            f"{args.microbatches} microbatches"
        )
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")


def gpt_options(description: str, pairs, layers_help: str) -> argparse.ArgumentParser:
    """The options of a benchmark timing pairs of contenders on the example GPT."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8, help=layers_help)
    ap.add_argument("--batch", type=int, default=32, help="global batch (rows)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=8, help="pipeline microbatches")
    ap.add_argument("--only", choices=sorted(pairs), help="run one pair only")
    return ap


def set_up(args: argparse.Namespace, argv: list[str] | None, script: str, split: str):
    """The run's config, the command that repeats it, the model and the batches (warm-up and
    timed) from `gpt_options`' `args`; prints the run's header (`split` says how the
    microbatches are used, e.g. " (pp)")."""
    config = {
        "steps": args.steps,
        "warmup": args.warmup,
        "d_model": args.d_model,
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "microbatches": args.microbatches,
    }
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(script), *argv])
    model = new_model(config)
    params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(1)
    batches = [gpt.sample_batch(VOCAB, args.seq, args.batch) for _ in range(args.warmup + args.steps)]
    print(
        f"GPT: {args.layers} blocks, d_model={args.d_model}, {N_HEADS} heads, seq={args.seq}, "
        f"vocab={VOCAB}, {params / 1e6:.2f}M parameters; global batch {args.batch}, "
        f"{args.microbatches} microbatches{split}; SGD lr={LR}"
    )
    print(f"{WORLD} ranks (gloo, 1 thread each) on {machine()}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per contender; "
          f"load average before: {load_average()}", flush=True)
    return config, command, model, batches


def main(argv: list[str] | None = None) -> int:
    """Runs the chosen pairs and prints the table; returns the exit code."""
    args = gpt_options(__doc__.splitlines()[0], PAIRS, "transformer blocks (multiple of 4)").parse_args(argv)
    check_config(args)
    pairs = [args.only] if args.only else list(PAIRS)
    config, command, model, batches = set_up(args, argv, __file__, " (pp)")

    ranks = run_pairs({pair: PAIRS[pair] for pair in pairs}, config, model, batches,
                      lambda pair, scratch: compile_piperc(pair, config, model, batches[0], scratch))
    results = {name: summarize(r) for name, r in ranks.items()}
    print_steps({pair: PAIRS[pair] for pair in pairs}, results, LABELS, width=4)
    print()
    for pair in pairs:
        step_ratio(pair, *(results[name] for name in PAIRS[pair]))
    print_footer(command)
    return 0


def run_pairs(pairs: dict[str, tuple[str, ...]], config: dict, model, batches: list,
              compile_one: Callable[[str, Path], float], target: Callable | None = None,
              worlds: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Compiles piperc's side of each pair (`compile_one(pair, scratch)` -> seconds) and runs
    every contender in fresh worker processes (`target`, default `worker`; `worlds[pair]` of
    them, default WORLD) on the same initial weights and batches; per contender, its ranks'
    results."""
    ranks: dict[str, list[dict]] = {}
    context = fork_server()
    with tempfile.TemporaryDirectory(prefix="piperc-bench-") as tmp:
        scratch = Path(tmp)
        (scratch / "config.json").write_text(json.dumps(config))
        torch.save(model.state_dict(), scratch / "initial.pt")
        torch.save(batches, scratch / "batches.pt")
        for pair, names in pairs.items():
            seconds = compile_one(pair, scratch)
            print(f"compiled piperc {pair} in {seconds:.1f} s", flush=True)
            for name in names:
                start = time.perf_counter()
                ranks[name] = run_contender(context, name, scratch, target=target or worker,
                                            world=(worlds or {}).get(pair, WORLD))
                print(f"ran {name} in {time.perf_counter() - start:.1f} s", flush=True)
    return ranks


def print_steps(pairs: dict[str, tuple[str, ...]], results: dict[str, dict], labels: dict[str, str],
                width: int) -> None:
    """The step-time table: one line per contender."""
    print()
    label = max(len(label) for label in labels.values()) + 1
    print(f"{'pair':<{width}}  {'contender':<{label}} {'median s':>9} {'min s':>7} {'max s':>7} "
          f"{'loss@0':>9} {'loss@last':>9}  peak RSS MiB, by rank")
    for pair, names in pairs.items():
        for name in names:
            r = results[name]
            rss = "/".join(f"{m:.0f}" for m in r["rss"])
            print(f"{pair:<{width}}  {labels[name]:<{label}} {r['median']:>9.4f} {r['min']:>7.4f} "
                  f"{r['max']:>7.4f} {r['loss0']:>9.6f} {r['loss_last']:>9.6f}  {rss}")


def step_ratio(pair: str, mine: dict, theirs: dict) -> float:
    """Prints piperc's step time over torch's; fails when the step-0 losses differ (the
    contenders would not train the same model on the same data). Returns the loss gap."""
    gap = abs(mine["loss0"] - theirs["loss0"])
    if gap > LOSS_TOLERANCE:
        raise SystemExit(
            f"{pair}: step-0 losses differ by {gap:.2e} (piperc {mine['loss0']!r}, torch "
            f"{theirs['loss0']!r}), above {LOSS_TOLERANCE:g}: the contenders do not train "
            "the same model on the same data"
        )
    print(f"{pair} ratio piperc/torch: {mine['median'] / theirs['median']:.3f} by median step, "
          f"{mine['min'] / theirs['min']:.3f} by fastest step (below 1 = piperc faster; "
          f"step-0 losses agree to {gap:.1e})")
    return gap


def print_footer(command: str, ranks: int = WORLD) -> None:
    """The note on noise (`ranks`: the most processes that ran at once) and the command that
    reproduces the run."""
    print()
    print(f"note: {ranks} ranks share {os.cpu_count()} cores, and anything else running on them "
          f"shows up in the step times (load average after: {load_average()}); compare ratios "
          "from the same run, and rerun before trusting a difference under ~10%")
    print(f"command: {command}")


if __name__ == "__main__":
    sys.exit(main())
