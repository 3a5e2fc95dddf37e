"""Reference interpreter: runs single-device IR with torch, one ATen call per op.

Each `torch.aten.*` op runs as the torch operator it names
(`torch.ops.aten.<name>.<overload>`), with its literal operands turned back
into Python values as the operator's schema expects them. It is the oracle
that proves capture exact: on a captured module it must reproduce eager
autograd's loss and gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block, Operation, SSAValue
from xdsl.traits import IsTerminator

from piperc.dialects import torch as tdialect
from piperc.ir import last_uses

# torch-mlir writes enum arguments as ints, numbered as in ATen's c10 enums.
_SCALAR_TYPES = {
    0: torch.uint8,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    7: torch.float64,
    9: torch.complex64,
    10: torch.complex128,
    11: torch.bool,
    15: torch.bfloat16,
}
_LAYOUTS = {0: torch.strided, 1: torch.sparse_coo}
_MEMORY_FORMATS = {
    0: torch.contiguous_format,
    1: torch.preserve_format,
    2: torch.channels_last,
    3: torch.channels_last_3d,
}
_ENUMS = {"ScalarType": _SCALAR_TYPES, "Layout": _LAYOUTS, "MemoryFormat": _MEMORY_FORMATS}


class InterpreterError(RuntimeError):
    """An op cannot be evaluated; the message names the op."""


Evaluator = Callable[[Operation, list[Any]], Sequence[Any]]
"""Evaluates one op: given its operand values, returns its result values."""

EVALUATORS: dict[type[Operation], Evaluator] = {}


def evaluator(*op_types: type[Operation]):
    """Registers the decorated function as the evaluator of `op_types`."""

    def register(fn: Evaluator) -> Evaluator:
        for t in op_types:
            EVALUATORS[t] = fn
        return fn

    return register


@evaluator(tdialect.ConstantIntOp, tdialect.ConstantFloatOp, tdialect.ConstantStrOp)
def _constant(op, _):
    return [op.value.value.data if hasattr(op.value, "value") else op.value.data]


@evaluator(tdialect.ConstantBoolOp)
def _constant_bool(op, _):
    return [bool(op.value.value.data)]


@evaluator(tdialect.ConstantNoneOp)
def _constant_none(op, _):
    return [None]


@evaluator(tdialect.ConstantDeviceOp)
def _constant_device(op, _):
    return [torch.device(op.value.data)]


@evaluator(tdialect.ListConstructOp)
def _list(op, values):
    return [list(values)]


@evaluator(tdialect.ListUnpackOp)
def _unpack(op, values):
    return list(values[0])


def _aten(op: tdialect.AtenOp, values: list[Any]) -> Sequence[Any]:
    overload = op.aten
    args = []
    kwargs = {}
    for arg, value in zip(overload._schema.arguments, values, strict=True):
        value = _to_schema(arg.real_type, value)
        if arg.kwarg_only:
            kwargs[arg.name] = value
        else:
            args.append(value)
    out = overload(*args, **kwargs)
    if len(op.results) == 1:
        return [out]
    return list(out)


def enum_value(jit_type, value):
    """The torch enum (dtype, layout, memory format) an int literal stands for, or None.

    torch-mlir writes `dtype=torch.float32` as the int 6; the argument's
    `real_type` in the schema (`Optional[ScalarType]`; its `type` says `int`)
    says which enum an int means.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    table = _ENUMS.get(str(jit_type).removeprefix("Optional[").removesuffix("]"))
    return table[value] if table is not None else None


def _to_schema(jit_type, value):
    """Turns an IR literal into what the schema's argument type expects."""
    enum = enum_value(jit_type, value)
    return value if enum is None else enum


def evaluate(op: Operation, values: list[Any]) -> Sequence[Any]:
    """Runs one op on concrete operand values and returns its result values."""
    if isinstance(op, tdialect.AtenOp):
        try:
            return _aten(op, values)
        except Exception as e:
            raise InterpreterError(f"{op.name} failed: {e}") from e
    fn = EVALUATORS.get(type(op))
    if fn is None:
        raise InterpreterError(f"the reference interpreter cannot evaluate {op.name}")
    return fn(op, values)


def run_block(block: Block, args: Sequence[Any]) -> list[Any]:
    """Runs the ops of `block` with its arguments bound to `args`.

    Returns the operand values of the block's terminator (e.g. `func.return`).
    Values are dropped after their last use, so peak memory follows the program.
    """
    env: dict[SSAValue, Any] = dict(zip(block.args, args, strict=True))
    last_use = last_uses(block)
    for op in block.ops:
        values = [env[v] for v in op.operands]
        if op.has_trait(IsTerminator):
            return values
        results = evaluate(op, values)
        for r, v in zip(op.results, results, strict=True):
            env[r] = v
        for v in last_use.get(op, ()):
            env.pop(v, None)
    raise InterpreterError("block has no terminator")


def run_function(fn: func.FuncOp, args: Sequence[Any]) -> list[Any]:
    """Runs a `func.func` on concrete arguments and returns its results."""
    if len(args) != len(fn.args):
        raise InterpreterError(f"@{fn.sym_name.data} takes {len(fn.args)} arguments, got {len(args)}")
    with torch.no_grad():
        return run_block(fn.body.block, args)


def run_module(module: ModuleOp, args: Sequence[Any], name: str = "main") -> list[Any]:
    """Runs function `name` of `module`."""
    for op in module.ops:
        if isinstance(op, func.FuncOp) and op.sym_name.data == name:
            return run_function(op, args)
    raise InterpreterError(f"the module has no function @{name}")
