"""Running pass pipelines: parse, verify after every pass, print, dump, time.

The options mirror mlir-opt's, so a user debugging a strategy reaches for the
same flags: `--print-ir-after-all`, `--print-ir-after=NAME`,
`--print-ir-before=NAME`, `--dump-dir DIR`, `--time-passes`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.utils.arg_spec import parse_pipeline as parse_pipeline_spec
from xdsl.utils.exceptions import ArgSpecParseError, VerifyException

from piperc.errors import PassError
from piperc.incremental_verify import IncrementalVerifier
from piperc.ir import cycle_collection_paused, print_ir
from piperc.passes import PASSES


@dataclasses.dataclass
class PipelineOptions:
    """How to observe a pipeline while it runs.

    `print_ir_after` / `print_ir_before` hold pass names; `dump_dir` receives
    `00-input.mlir` and one `NN-<pass>.mlir` per pass; `time_passes` prints a
    timing table at the end. All printing goes to `stream` (stderr by default).
    """

    print_ir_after_all: bool = False
    print_ir_after: frozenset[str] = frozenset()
    print_ir_before: frozenset[str] = frozenset()
    dump_dir: str | None = None
    time_passes: bool = False
    stream: TextIO | None = None
    after_pass: Callable[[ModulePass, ModuleOp], None] | None = None
    """Called with each pass and the module after the pass ran and verified."""


def parse_pipeline(text: str) -> list[ModulePass]:
    """Parses `a,b{opt=1}` into pass instances; unknown names and bad options raise PassError."""
    if not text.strip():
        return []
    try:
        specs = list(parse_pipeline_spec(text))
    except (ArgSpecParseError, Exception) as e:  # ArgSpecParseError is a BaseException
        raise PassError(f"cannot parse pipeline '{text}': {e}") from e
    passes = []
    for spec in specs:
        if spec.name not in PASSES:
            known = ", ".join(sorted(PASSES))
            raise PassError(f"unknown pass '{spec.name}' in pipeline '{text}' (known: {known})")
        try:
            passes.append(PASSES[spec.name]().from_pass_spec(spec))
        except Exception as e:
            raise PassError(f"bad options for pass '{spec.name}': {e}") from e
    return passes


def pipeline_text(passes: Sequence[ModulePass]) -> str:
    """The textual form of a pipeline: the inverse of `parse_pipeline`."""
    texts = []
    for p in passes:
        spec = p.pipeline_pass_spec()
        options = " ".join(f"{key}={','.join(_option_text(v) for v in values)}" if values else key
                           for key, values in spec.parameters.items())
        texts.append(f"{spec.name}{{{options}}}" if options else spec.name)
    return ",".join(texts)


def _option_text(value: object) -> str:
    """One pass option value as `parse_pipeline` reads it back. xDSL's own printing writes a
    float in exponent form as `1e-05`, which its pipeline lexer rejects (it reads an exponent
    only after a fraction), so such a float is written `1.0e-05`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    text = repr(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}.0e{exponent}"
    return text


def run_pipeline(
    module: ModuleOp,
    ctx: Context,
    pipeline: str | Sequence[ModulePass],
    options: PipelineOptions | None = None,
) -> list[tuple[str, float]]:
    """Runs `pipeline` on `module` in place, verifying the IR after each pass.

    `pipeline` is text (`fold-detach,cse`) or pass objects. A pass that raises,
    or leaves IR that does not verify, raises PassError naming the pass and the
    offending op. Returns (pass name, seconds) for each pass run. Each
    verification accepts and rejects what `module.verify()` does, but re-checks
    only the ops that changed since the previous one (`piperc.incremental_verify`).
    """
    options = options or PipelineOptions()
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    out = options.stream or sys.stderr
    if options.dump_dir:
        os.makedirs(options.dump_dir, exist_ok=True)
        _dump(options.dump_dir, 0, "input", module)
    verifier = IncrementalVerifier()
    _verify(verifier, module, "the input")
    timings = []
    for i, p in enumerate(passes, start=1):
        if p.name in options.print_ir_before:
            _print(out, f"IR Dump Before {p.name}", module)
        start = time.perf_counter()
        try:
            with cycle_collection_paused():
                p.apply(ctx, module)
        except PassError:
            raise
        except Exception as e:
            raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e}") from e
        timings.append((p.name, time.perf_counter() - start))
        _verify(verifier, module, f"pass '{p.name}'")
        if options.print_ir_after_all or p.name in options.print_ir_after:
            _print(out, f"IR Dump After {p.name}", module)
        if options.dump_dir:
            _dump(options.dump_dir, i, p.name, module)
        if options.after_pass is not None:
            options.after_pass(p, module)
    if options.time_passes:
        out.write(format_timings(timings))
    return timings


def _verify(verifier: IncrementalVerifier, module: ModuleOp, after: str) -> None:
    try:
        with cycle_collection_paused():
            verifier.verify(module)
    except VerifyException as e:
        raise PassError(f"IR after {after} does not verify: {e}") from e


def _print(out: TextIO, title: str, module: ModuleOp) -> None:
    out.write(f"// -----// {title} //----- //\n")
    out.write(print_ir(module))


def _dump(directory: str, index: int, name: str, module: ModuleOp) -> None:
    safe = re.sub(r"[^\w.-]", "_", name)
    with open(os.path.join(directory, f"{index:02d}-{safe}.mlir"), "w") as f:
        f.write(print_ir(module))


def format_timings(timings: Sequence[tuple[str, float]]) -> str:
    """The `--time-passes` report: one line per pass and the total, in seconds."""
    total = sum(t for _, t in timings)
    lines = ["===-------------------------------------------------------------------------===",
             "                         ... Pass execution timing report ...",
             "===-------------------------------------------------------------------------===",
             f"  Total Execution Time: {total:.4f} seconds", "",
             "  ----Wall Time----  ----Name----"]
    for name, t in timings:
        pct = 100.0 * t / total if total else 0.0
        lines.append(f"  {t:.4f} ({pct:5.1f}%)  {name}")
    lines.append(f"  {total:.4f} (100.0%)  Total")
    return "\n".join(lines) + "\n"
