"""The xDSL context piperc parses and prints with, and IR text helpers."""

from __future__ import annotations

import contextlib
import gc
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import Builtin, ModuleOp
from xdsl.dialects.func import Func
from xdsl.ir import Block, Operation, SSAValue
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.traits import IsTerminator

from piperc.dialects.torch import Torch, aten_op_class


@dataclass
class PipercContext(Context):
    """An xDSL context with piperc's dialects loaded.

    `torch.aten.*` op names resolve on demand to op classes made from torch's
    operator schemas, so any ATen operator torch knows parses as a verified op.
    Names that are neither loaded nor ATen operators are errors.
    """

    def get_optional_op(self, name: str, *, dialect_stack=()) -> type[Operation] | None:
        if name not in self._loaded_ops and name.startswith("torch.aten."):
            cls = aten_op_class(name)
            if cls is not None:
                self.load_op(cls)
        return super().get_optional_op(name, dialect_stack=dialect_stack)

    def clone(self) -> PipercContext:
        return PipercContext(
            self.allow_unregistered,
            self._loaded_dialects.copy(),
            self._loaded_ops.copy(),
            self._loaded_attrs.copy(),
            self._loaded_types.copy(),
            self._registered_dialects.copy(),
        )


def make_context() -> PipercContext:
    """A fresh context with builtin, func, torch, par and exec loaded."""
    from piperc.dialects.exec import Exec
    from piperc.dialects.par import Par

    ctx = PipercContext()
    for d in (Builtin, Func, Torch, Par, Exec):
        ctx.load_dialect(d)
    return ctx


def parse_module(text: str, ctx: Context | None = None, name: str = "<input>") -> ModuleOp:
    """Parses IR text (generic or custom form) into a module; raises ParseError with line:col."""
    ctx = ctx or make_context()
    return Parser(ctx, text, name).parse_module()


def last_uses(block: Block) -> dict[Operation, list[SSAValue]]:
    """For each op of `block`, the values it is the last user of (its terminator excluded),
    so an executor can drop a value right after that op."""
    last: dict[SSAValue, Operation] = {}
    for op in block.ops:
        for v in op.operands:
            last[v] = op
    by_op: dict[Operation, list[SSAValue]] = defaultdict(list)
    for v, op in last.items():
        if not op.has_trait(IsTerminator):
            by_op[op].append(v)
    return by_op


def print_ir(op: Operation) -> str:
    """The IR text of an op, in the form piperc dumps and tests compare."""
    import io

    out = io.StringIO()
    Printer(stream=out).print_op(op)
    return out.getvalue() + "\n"


@contextlib.contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while building or rewriting IR.

    Making and verifying ops allocates objects by the hundred thousand; each allocation
    burst sets off a collection that walks every live object (the model, its fx graphs,
    the whole module), which cost as much as the building itself. The cycles a rewrite
    leaves behind (erased ops) are collected when the collector resumes.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
