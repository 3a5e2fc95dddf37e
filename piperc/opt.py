"""`piperc-opt`: reads a .mlir file, runs a pipeline of piperc passes, prints the result.

    piperc-opt model.mlir -p 'fold-detach,cse' --print-ir-after-all --dump-dir out/
"""

from __future__ import annotations

import argparse
import os
import sys

from xdsl.utils.exceptions import ParseError

from piperc.errors import PipercError
from piperc.ir import make_context, parse_module, print_ir
from piperc.passes import PASSES
from piperc.passmanager import PipelineOptions, parse_pipeline, run_pipeline


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of piperc-opt."""
    ap = argparse.ArgumentParser(
        prog="piperc-opt", description="Run piperc passes over an MLIR file."
    )
    ap.add_argument("input", nargs="?", default="-", help=".mlir file to read ('-' for stdin)")
    ap.add_argument("-p", "--passes", default="", help="pass pipeline, e.g. 'fold-detach,cse'")
    ap.add_argument("-o", "--output", default="-", help="where to write the result ('-' for stdout)")
    ap.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    ap.add_argument("--print-ir-after", action="append", default=[], metavar="NAME",
                    help="print the IR after pass NAME (repeatable)")
    ap.add_argument("--print-ir-before", action="append", default=[], metavar="NAME",
                    help="print the IR before pass NAME (repeatable)")
    ap.add_argument("--dump-dir", help="write the IR before the first and after every pass to DIR")
    ap.add_argument("--time-passes", action="store_true", help="print how long each pass took")
    ap.add_argument("--list-passes", action="store_true", help="list the registered passes")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of piperc-opt; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.list_passes:
        for name in sorted(PASSES):
            print(name)
        return 0
    try:
        passes = parse_pipeline(args.passes)
    except PipercError as e:
        print(f"piperc-opt: error: {e}", file=sys.stderr)
        return 1
    usage = _usage_error(args, [p.name for p in passes])
    if usage:
        print(f"piperc-opt: error: {usage}", file=sys.stderr)
        return 1
    name = "<stdin>" if args.input == "-" else args.input
    try:
        text = sys.stdin.read() if args.input == "-" else _read(args.input)
    except OSError as e:
        print(f"piperc-opt: cannot read {name}: {e.strerror}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as e:
        print(f"piperc-opt: cannot read {name}: not UTF-8 text (byte {e.start})", file=sys.stderr)
        return 1
    ctx = make_context()
    try:
        module = parse_module(text, ctx, name)
    except ParseError as e:
        print(f"piperc-opt: {e}", file=sys.stderr)
        return 1
    options = PipelineOptions(
        print_ir_after_all=args.print_ir_after_all,
        print_ir_after=frozenset(args.print_ir_after),
        print_ir_before=frozenset(args.print_ir_before),
        dump_dir=args.dump_dir,
        time_passes=args.time_passes,
    )
    try:
        run_pipeline(module, ctx, passes, options)
    except PipercError as e:
        print(f"piperc-opt: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # writing --dump-dir
        print(f"piperc-opt: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    result = print_ir(module)
    if args.output == "-":
        sys.stdout.write(result)
        return 0
    try:
        with open(args.output, "w") as f:
            f.write(result)
    except OSError as e:
        print(f"piperc-opt: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


def _usage_error(args: argparse.Namespace, pipeline: list[str]) -> str | None:
    """What is wrong with options that name passes or a directory, before any work is done."""
    for flag in ("print_ir_after", "print_ir_before"):
        for name in getattr(args, flag):
            if name not in pipeline:
                option = "--" + flag.replace("_", "-")
                return (f"{option}={name}: the pipeline {args.passes!r} has no pass {name!r} "
                        f"(its passes: {', '.join(pipeline) or 'none'})")
    if args.dump_dir and os.path.exists(args.dump_dir) and not os.path.isdir(args.dump_dir):
        return f"--dump-dir {args.dump_dir} is a file; give a directory (it is made if missing)"
    return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":
    sys.exit(main())
