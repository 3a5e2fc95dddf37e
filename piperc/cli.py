"""`piperc`: captures a model's training step as IR, optionally runs a pipeline over it;
shows a pipeline schedule as tables without running it; checks a strategy against one device.

    piperc capture examples/gpt.py:make --set n_layers=2 --dump-dir out/
    piperc capture piperc.examples.gpt:make -p 'fold-detach,cse' --dump-dir out/
    piperc schedule show 1f1b --pp 4 --microbatches 8 --costs F=1,B=2 --svg 1f1b.svg
    piperc verify piperc.examples.gpt:make --mesh pp=2,dp=2 --pipeline stages=2,microbatches=4 --dp zero=3
    piperc simulate piperc.examples.gpt:make --mesh pp=4 --pipeline stages=4,microbatches=8 --costs profile
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable

from piperc import schedules
from piperc.errors import PipercError, describe

CAPTURE_HELP = """\
TARGET names a function that builds the model: FILE.py:FUNC or package.module:FUNC.
It is called with the --set values as keyword arguments and must return
(model, example_inputs). The current directory is put on sys.path first, so a
model file may import from its repository (`from piperc.examples.gpt import ...`).

Where the IR goes:
  without --dump-dir   the IR (after the pipeline, if any) is printed to stdout
                       and the summary line to stderr;
  --dump-dir DIR       without -p: DIR/00-captured.mlir holds the captured IR;
                       with -p: DIR/00-input.mlir holds the captured IR and
                       DIR/NN-<pass>.mlir the IR after the NN-th pass, so the
                       file with the highest number is the final IR.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of piperc."""
    ap = argparse.ArgumentParser(prog="piperc", description="The piperc compiler.")
    commands = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cap = commands.add_parser(
        "capture",
        help="capture a model's training step as IR",
        description="Capture one training step (forward + backward) of a model as IR.",
        epilog=CAPTURE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cap.add_argument("target", metavar="TARGET", help="FILE.py:FUNC or package.module:FUNC")
    cap.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                     metavar="KEY=VALUE",
                     help="keyword argument for FUNC; VALUE is read as int, float or str (repeatable)")
    cap.add_argument("--dump-dir", metavar="DIR", help="write the IR to DIR (see below)")
    cap.add_argument("-p", "--passes", default="", metavar="PIPELINE",
                     help="pass pipeline to run after capture, e.g. 'fold-detach,cse'")
    cap.add_argument("--print-ir-after-all", action="store_true",
                     help="print the IR after every pass to stderr")
    cap.set_defaults(run=capture_command)

    schedule = commands.add_parser(
        "schedule", help="show a pipeline schedule", description="Pipeline schedules as data."
    ).add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")
    show = schedule.add_parser(
        "show",
        help="print a schedule's tabular view",
        description="Print a schedule's tabular view without running it: the actions per "
                    "device, the closed-form bubble ratio, the idealised time-slot table and "
                    "the peak in-flight activations per device.",
        epilog=SCHEDULE_SHOW_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("name", metavar="NAME",
                      help=f"a built-in schedule ({', '.join(schedules.BUILTIN_SCHEDULES)}) or a "
                           "table file, one row per device")
    show.add_argument("--pp", type=int, metavar="N", help="pipeline devices")
    show.add_argument("--stages", type=int, metavar="S",
                      help="pipeline stages (default: --pp, one per device; 2 x --pp for zbv and "
                           "dualpipev); interleaved and interleaved-zb run S / N stages per device")
    show.add_argument("--microbatches", type=int, metavar="M", help="microbatches per step")
    show.add_argument("--costs", type=parse_costs, default={}, metavar="F=1,B=1,W=1",
                      help="time per F, B and W action for the time-slot table (default 1 each)")
    show.add_argument("--svg", metavar="FILE", help="also draw the time-slot table to FILE")
    show.set_defaults(run=schedule_show_command)

    ver = commands.add_parser(
        "verify",
        help="train a strategy and one device on the same batches, and compare",
        description="Compile a model for a strategy, train it on local processes and on one "
                    "device (torch.optim) on the same batches, and print piperc.verify's "
                    "report: per-step loss errors, the worst parameters, the noise floor of "
                    "one-device accumulation over the same slices, and a verdict. Exit "
                    "status 1 when the run does not train as one device does.",
        epilog=VERIFY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_strategy_arguments(ver)
    ver.add_argument("--batches", metavar="FILE",
                     help="torch.save'd list of global batches, one per step (as the runtime worker takes)")
    ver.add_argument("--steps", type=int, default=3,
                     help="without --batches: train this many steps on the example inputs (default 3)")
    ver.set_defaults(run=verify_command)

    sim = commands.add_parser(
        "simulate",
        help="predict a strategy's step time without running it",
        description="Compile a model for a strategy and simulate one training step of the "
                    "generated per-rank programs (piperc.simulator): tasks on streams, "
                    "transfers and collectives under a network model. Prints the predicted "
                    "step time, bubble, busy time and peak memory per rank.",
        epilog=SIMULATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_strategy_arguments(sim)
    sim.add_argument("--costs", choices=("profile", "flops"), default="flops",
                     help="task times: measured by a short run on local processes (profile) or "
                          "counted from matmul FLOPs at --flops-rate (flops, the default)")
    sim.add_argument("--steps", type=int, default=3, help="with --costs profile: timed steps (default 3)")
    sim.add_argument("--flops-rate", type=float, default=100e12, metavar="FLOP/S",
                     help="with --costs flops: FLOP/s of one device (default 1e14)")
    sim.add_argument("--cluster", default=None, metavar="KEY=VALUE,...|local",
                     help="the network: piperc.simulator.cluster(...) keyword arguments, e.g. "
                          "gpus_per_node=8,intra_gbps=400,inter_gbps=50,latency_us=5, or 'local': "
                          "calibrate this machine (default: local with --costs profile, cluster's "
                          "defaults with --costs flops)")
    sim.add_argument("--host-cores", type=int, metavar="N",
                     help="with --costs profile on CPU: the ranks share N cores")
    sim.add_argument("--trace", metavar="DIR", help="write the predicted timeline to DIR (rank<r>.json)")
    sim.set_defaults(run=simulate_command)
    return ap


def add_strategy_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and strategy options of `piperc verify` and `piperc simulate`."""
    parser.add_argument("target", metavar="TARGET", help="FILE.py:FUNC or package.module:FUNC, as for capture")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                        metavar="KEY=VALUE", help="keyword argument for FUNC (repeatable)")
    parser.add_argument("--mesh", required=True, type=parse_options, metavar="AXIS=SIZE,...",
                        help="the device mesh, e.g. pp=2,dp=2")
    parser.add_argument("--pipeline", nargs="?", const={}, type=parse_options, metavar="KEY=VALUE,...",
                        help="piperc.pipeline(...) keyword arguments, e.g. stages=2,microbatches=4,schedule=1f1b")
    parser.add_argument("--dp", nargs="?", const={}, type=parse_options, metavar="KEY=VALUE,...",
                        help="piperc.data_parallel(...) keyword arguments, e.g. zero=3")
    parser.add_argument("--ep", nargs="?", const={}, type=parse_options, metavar="KEY=VALUE,...",
                        help="piperc.expert_parallel(...) keyword arguments, e.g. axis=ep (default axis: dp)")
    parser.add_argument("--optimizer", default="adamw", metavar="KIND[:KEY=VALUE,...]",
                        help="sgd or adamw and keyword arguments, e.g. sgd:lr=0.05,momentum=0.9 "
                             "(default: adamw, piperc.optim.AdamW's defaults)")


SCHEDULE_SHOW_HELP = """\
NAME is a built-in schedule, sized by --pp and --microbatches (both needed) and
--stages, or a file holding a table as `Schedule.table()` writes it
(`device 0: 0F0 0F1 0B0 0B1`, one line per device, overlap groups joined by `+`,
`#` comments); a table gives its own sizes, and --pp, --stages and --microbatches,
when given, must agree with it. gpipe, 1f1b, zb-h1 and zb-h2 run one stage per
device; interleaved and interleaved-zb run several, stage s on device s % N; zbv and
dualpipev run two in V placement, stages d and 2N - 1 - d on device d:

  piperc schedule show interleaved --pp 4 --stages 8 --microbatches 4
  piperc schedule show dualpipev --pp 4 --microbatches 8
"""


VERIFY_HELP = """\
The strategy is the directives given: --pipeline, --dp and --ep (each KEY=VALUE list
is passed to piperc.pipeline / piperc.data_parallel / piperc.expert_parallel; values are
read as int, float or str). Tensor-parallel plans are not taken from the command line: use piperc.verify
from Python for those. Example:

  piperc verify piperc.examples.gpt:make --mesh pp=2,dp=2 \\
      --pipeline stages=2,microbatches=4,schedule=1f1b --dp zero=3 --optimizer adamw:lr=1e-4
"""


SIMULATE_HELP = """\
The strategy options are piperc verify's. Task times come from matmul FLOPs at
--flops-rate (--costs flops) or from a short real run on local processes that
trains --steps steps on the example inputs (--costs profile); communication from
a target cluster (--cluster) or this machine, calibrated. Examples:

  piperc simulate piperc.examples.gpt:make --set n_layers=4 --mesh pp=4 \\
      --pipeline stages=4,microbatches=8,schedule=1f1b --cluster gpus_per_node=2,inter_gbps=10
  piperc simulate piperc.examples.gpt:make --mesh pp=2 --pipeline stages=2,microbatches=4 \\
      --costs profile --trace predicted/

Open DIR/trace.json (all ranks) or DIR/rank<r>.json in ui.perfetto.dev, next to a
measured trace (piperc.launch(..., trace="measured/")).
"""


class UsageError(PipercError):
    """The command line names no such thing or lacks an option (exit status 2)."""


def parse_costs(text: str) -> dict[str, float]:
    """`F=1,B=2` as {"F": 1.0, "B": 2.0}: the time of each kind of action, F, B or W."""
    costs = {}
    for item in text.split(","):
        kind, _, value = item.strip().partition("=")
        try:
            time = float(value)
        except ValueError:
            time = math.nan
        if kind not in schedules.KINDS or not time >= 0:
            raise argparse.ArgumentTypeError(
                f"expected KIND=TIME with KIND F, B or W and TIME >= 0, got '{item}'"
            )
        costs[kind] = time
    return costs


def parse_options(text: str) -> dict[str, int | float | str]:
    """`KEY=VALUE,KEY=VALUE` as a dict, each VALUE read as `parse_override` reads it."""
    return dict(parse_override(item.strip()) for item in text.split(",") if item.strip())


def parse_override(text: str) -> tuple[str, int | float | str]:
    """`KEY=VALUE` as (key, value); VALUE becomes an int, else a float, else stays a str."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def load_function(target: str) -> Callable:
    """The function TARGET names (`FILE.py:FUNC` or `package.module:FUNC`).

    Raises PipercError when the file or module cannot be found or lacks FUNC.
    """
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise PipercError(f"TARGET must be FILE.py:FUNC or package.module:FUNC, got '{target}'")
    # Model files import from their repository (`from piperc.examples.gpt import ...`).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _load_file(where) if where.endswith(".py") or os.sep in where else _load_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(
            n for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_")
        )
        raise PipercError(
            f"{where} has no function '{name}' (its functions: {', '.join(defined) or 'none'})"
        )
    return fn


def _load_file(path: str):
    if not os.path.isfile(path):
        raise PipercError(f"cannot read {path}: no such file")
    stem = os.path.splitext(os.path.basename(path))[0]
    # Registered under its stem, unless that would shadow a module already imported (torch.py).
    name = stem if stem not in sys.modules else f"_piperc_target_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise PipercError(f"cannot import {path}: {describe(e)}") from e
    return module


def _load_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise PipercError(f"cannot import {name}: {e}") from e
    except Exception as e:
        raise PipercError(f"cannot import {name}: {describe(e)}") from e


def build_model(fn: Callable, overrides: dict[str, object]):
    """Calls the model function with `overrides`; returns (model, example_inputs)."""
    try:
        inspect.signature(fn).bind(**overrides)
    except TypeError as e:
        raise PipercError(f"cannot call {fn.__name__} with --set {_show(overrides)}: {e}") from e
    try:
        built = fn(**overrides)
    except Exception as e:
        call = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise PipercError(f"{fn.__name__}({call}) failed: {describe(e)}") from e
    if not (isinstance(built, tuple) and len(built) == 2):
        raise PipercError(
            f"{fn.__name__} must return (model, example_inputs), got {type(built).__name__}"
        )
    return built


def _show(overrides: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "(none)"


def capture_command(args: argparse.Namespace) -> int:
    """`piperc capture`: see CAPTURE_HELP."""
    if args.dump_dir and os.path.exists(args.dump_dir) and not os.path.isdir(args.dump_dir):
        raise UsageError(f"--dump-dir {args.dump_dir} is a file; give a directory (it is made if missing)")
    fn = load_function(args.target)
    # Imported here, not at the top, so that --help and a mistyped TARGET answer at once.
    from piperc.frontend import capture
    from piperc.ir import print_ir
    from piperc.passmanager import PipelineOptions, parse_pipeline, run_pipeline

    passes = parse_pipeline(args.passes)
    model, example_inputs = build_model(fn, dict(args.overrides))
    captured = capture(model, example_inputs)
    if passes:
        options = PipelineOptions(print_ir_after_all=args.print_ir_after_all, dump_dir=args.dump_dir)
        run_pipeline(captured.module, captured.ctx, passes, options)
    elif args.dump_dir:
        os.makedirs(args.dump_dir, exist_ok=True)
        with open(os.path.join(args.dump_dir, "00-captured.mlir"), "w") as f:
            f.write(print_ir(captured.module))

    ops = sum(1 for _ in captured.main.body.walk())
    values = sum(p.numel() for p in captured.params.values())
    summary = (
        f"piperc: captured {type(model).__name__}: {ops} ops, "
        f"{len(captured.params)} parameters ({values / 1e6:.2f}M values)"
    )
    if passes:
        summary += f", after {len(passes)} passes"
    if not args.dump_dir:
        sys.stdout.write(print_ir(captured.module))
        print(summary, file=sys.stderr)
        return 0
    written = f"00-input.mlir .. {len(passes):02d}-{passes[-1].name}.mlir" if passes else "00-captured.mlir"
    print(f"{summary}; wrote {os.path.join(args.dump_dir, written)}")
    return 0


def load_schedule(args: argparse.Namespace):
    """The schedule `piperc schedule show` names: a built-in sized by the options, or a table file."""
    if args.name in schedules.BUILTIN_SCHEDULES:
        if args.pp is None or args.microbatches is None:
            raise UsageError(f"schedule '{args.name}' needs --pp and --microbatches")
        stages = args.stages
        if stages is None:
            stages = args.pp * (2 if args.name in schedules.V_PLACEMENT else 1)
        try:
            return schedules.builtin(args.name, stages, args.microbatches, num_devices=args.pp)
        except schedules.ScheduleError as e:
            raise UsageError(str(e)) from e
    if not os.path.isfile(args.name):
        known = ", ".join(sorted(schedules.BUILTIN_SCHEDULES))
        raise UsageError(
            f"unknown schedule '{args.name}': neither a built-in schedule ({known}) nor a table file"
        )
    try:
        with open(args.name, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise PipercError(f"cannot read {args.name}: not UTF-8 text (byte {e.start}); a table file is text, "
                          "one row of actions per device") from e
    name = os.path.splitext(os.path.basename(args.name))[0]
    schedule = schedules.from_table(
        text, num_stages=args.stages, num_microbatches=args.microbatches, name=name
    )
    if args.pp is not None and args.pp != len(schedule.devices):
        raise PipercError(
            f"{args.name} has {len(schedule.devices)} device rows but --pp is {args.pp}; "
            f"give one row per pipeline device or drop --pp"
        )
    return schedule


def schedule_show_command(args: argparse.Namespace) -> int:
    """`piperc schedule show`: see SCHEDULE_SHOW_HELP."""
    view = load_schedule(args).view(args.costs)
    sys.stdout.write(str(view))
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(view.svg())
        print(f"piperc: wrote {args.svg}", file=sys.stderr)
    return 0


def build_strategy(args: argparse.Namespace):
    """(mesh, directives, optimizer) from `piperc verify`'s options; UsageError names the
    option whose keyword arguments its constructor rejects."""
    import piperc

    kind, _, options = args.optimizer.partition(":")
    optimizers = {"sgd": piperc.optim.SGD, "adamw": piperc.optim.AdamW}
    if kind not in optimizers:
        raise UsageError(f"--optimizer: unknown kind '{kind}' (known: sgd, adamw)")
    parts = [("--mesh", piperc.Mesh, args.mesh), ("--optimizer", optimizers[kind], parse_options(options))]
    if args.pipeline is not None:
        parts.append(("--pipeline", piperc.pipeline, args.pipeline))
    if args.dp is not None:
        parts.append(("--dp", piperc.data_parallel, args.dp))
    if args.ep is not None:
        parts.append(("--ep", piperc.expert_parallel, args.ep))
    built = []
    for flag, make, kwargs in parts:
        try:
            built.append(make(**kwargs))
        except TypeError as e:
            raise UsageError(f"{flag} {_show(kwargs)}: {e}") from e
    mesh, optimizer, *directives = built
    return mesh, directives, optimizer


def verify_command(args: argparse.Namespace) -> int:
    """`piperc verify`: see VERIFY_HELP."""
    fn = load_function(args.target)
    import torch

    import piperc

    mesh, directives, optimizer = build_strategy(args)
    model, example_inputs = build_model(fn, dict(args.overrides))
    if args.batches:
        if not os.path.isfile(args.batches):
            raise PipercError(f"cannot read {args.batches}: no such file")
        try:
            batches = torch.load(args.batches, weights_only=True)
        except Exception as e:
            raise PipercError(f"cannot read {args.batches}: torch.load fails ({type(e).__name__}); --batches "
                              "takes a file written by torch.save(list_of_batches)") from e
        if not isinstance(batches, list | tuple) or not batches or not all(
                isinstance(b, list | tuple) and all(isinstance(t, torch.Tensor) for t in b) for b in batches):
            raise PipercError(f"{args.batches} holds a {type(batches).__name__}, not a non-empty list of global "
                              "batches, each a tuple of tensors (one per model input)")
    elif args.steps >= 1:
        batches = [example_inputs] * args.steps
    else:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    print(f"piperc verify: {type(model).__name__}, mesh {mesh!r}; strategy "
          f"{', '.join(map(str, directives)) or '(none)'}; {optimizer}", flush=True)
    compiled = piperc.compile(model, example_inputs, mesh=mesh, strategy=directives, optimizer=optimizer,
                              keep_ir=False)
    try:
        result = piperc.verify(model, example_inputs, compiled, batches)
    except ValueError as e:  # a batch unlike the example inputs, or a model unlike the compiled one
        raise PipercError(str(e)) from e
    print(result)
    if args.ep is not None:  # the dispatch statistics, measured in the run
        print(compiled.experts(result.run), end="")
    return 0 if result.ok else 1


def simulate_command(args: argparse.Namespace) -> int:
    """`piperc simulate`: see SIMULATE_HELP."""
    fn = load_function(args.target)
    import piperc
    from piperc import simulator

    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if not args.flops_rate > 0:
        raise UsageError(f"--flops-rate must be positive, got {args.flops_rate}")
    if args.host_cores is not None and (args.costs != "profile" or args.host_cores < 1):
        raise UsageError("--host-cores takes a count >= 1 and needs --costs profile")
    cluster = args.cluster or ("local" if args.costs == "profile" else "")
    if cluster == "local":
        network = None
    else:
        try:
            network = simulator.cluster(**parse_options(cluster))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise UsageError(f"--cluster {cluster}: {e}") from e
    mesh, directives, optimizer = build_strategy(args)
    model, example_inputs = build_model(fn, dict(args.overrides))
    compiled = piperc.compile(model, example_inputs, mesh=mesh, strategy=directives, optimizer=optimizer,
                              keep_ir=False)
    if args.costs == "profile":
        costs = simulator.profile(compiled, [example_inputs], steps=args.steps, network=network,
                                  host_cores=args.host_cores)
    else:
        costs = simulator.Costs.from_flops(compiled, args.flops_rate,
                                           simulator.calibrate(max(2, compiled.world_size))
                                           if network is None else network)
    result = compiled.simulate(costs)
    sys.stdout.write(result.table())
    if args.trace:
        result.trace(args.trace)
        print(f"piperc: wrote {args.trace}/rank<r>.json and trace.json", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of piperc; returns the process exit code (2 for a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"piperc: error: {e}", file=sys.stderr)
        return 2
    except PipercError as e:
        print(f"piperc: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.filename is None:  # not about a file the user named
            raise
        print(f"piperc: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
