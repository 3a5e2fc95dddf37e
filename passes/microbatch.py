"""microbatch: makes per-microbatch stage functions add up to one step on the global batch.

The step is captured on one microbatch (global batch / data-parallel replicas
/ microbatches rows). For the sum over all microbatches and replicas to equal
the global mean loss and its gradient, this pass

  * replaces the loss tangent (`tangent:0`, an argument of the last stage's
    backward) by the constant 1/(replicas*microbatches);
  * zeroes the tangents of further outputs;
  * makes the last stage's forward also return `loss_share`, the loss times
    the same factor;
  * adds `@<backward>_accumulate(acc..., new...) -> (acc + new)...` for the
    gradients each backward function sums over microbatches, and
    `@s<last>_accumulate_loss` for the loss shares.

The loss must be a mean over the batch dimension (as `F.cross_entropy` is).
Options: count (microbatches), replicas (data-parallel size), directive.
Requires: outline-stages has run.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, IntegerAttr, ModuleOp, StringAttr
from xdsl.ir import Block, Region
from xdsl.passes import ModulePass

from piperc.dialects.par import PassKind
from piperc.dialects.torch import ValueTensorType
from piperc.dialects.torch_builder import TorchBuilder
from piperc.errors import StrategyError
from piperc.passes.outline_stages import (
    KEY,
    arg_keys,
    find_function,
    function_name,
    result_keys,
    stage_functions,
)
from piperc.passes.pipeline_split import NUM_STAGES, STAGE, module_count

MICROBATCHES = "par.microbatches"
REPLICAS = "par.replicas"
LOSS_SHARE = "loss_share"


def accumulate_name(backward: str) -> str:
    """`s0_B2_accumulate`: the function that sums one backward function's gradients over microbatches."""
    return f"{backward}_accumulate"


def accumulate_loss_name(stage: int) -> str:
    """`s1_accumulate_loss`: sums the last stage's per-microbatch loss shares."""
    return f"s{stage}_accumulate_loss"


@dataclass(frozen=True)
class MicrobatchPass(ModulePass):
    """Scales the loss for `count` microbatches x `replicas` and adds accumulate functions."""

    name = "microbatch"

    count: int = 1
    replicas: int = 1
    directive: str = "microbatch"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.count < 1 or self.replicas < 1:
            raise StrategyError(f"{self.directive}: microbatches and replicas must be >= 1")
        stages = module_count(op, NUM_STAGES, self.directive, "pipeline-split")
        scale = 1.0 / (self.count * self.replicas)
        for backward in stage_functions(op, stages - 1, PassKind.B):
            self._replace_tangents(backward, scale)
        last_f = find_function(op, function_name(stages - 1, PassKind.F))
        self._add_loss_share(last_f, scale)
        for stage in range(stages):
            for fn in self._accumulate(op, stage):
                op.body.block.add_op(fn)
        op.attributes[MICROBATCHES] = IntegerAttr(self.count, 64)
        op.attributes[REPLICAS] = IntegerAttr(self.replicas, 64)

    def _replace_tangents(self, fn: func.FuncOp, scale: float) -> None:
        keys = arg_keys(fn)
        block = fn.body.block
        for index in reversed(range(len(keys))):
            if not keys[index].startswith("tangent:"):
                continue
            arg = block.args[index]
            b = TorchBuilder(block, before=block.first_op)
            value = scale if keys[index] == "tangent:0" else 0.0
            shape = arg.type.get_shape()
            dtype = b.int(_dtype_code(arg.type))
            c = b.aten(
                "torch.aten.full",
                [b.int_list(shape), b.float(value), dtype, b.none(), b.device(), b.none()],
                [arg.type],
            )
            arg.replace_all_uses_with(c)
            _remove_argument(fn, index)

    def _add_loss_share(self, fn: func.FuncOp, scale: float) -> None:
        keys = result_keys(fn)
        if "loss" not in keys:
            raise StrategyError(f"{self.directive}: the last stage does not compute the loss")
        ret = fn.body.block.last_op
        loss = ret.operands[keys.index("loss")]
        b = TorchBuilder(fn.body.block, before=ret)
        share = b.aten("torch.aten.mul.Scalar", [loss, b.float(scale)])
        _add_result(fn, share, LOSS_SHARE)

    def _accumulate(self, module: ModuleOp, stage: int) -> list[func.FuncOp]:
        fns = []
        for backward in stage_functions(module, stage, PassKind.B):
            grads = [k for k in result_keys(backward) if k.startswith("grad:")]
            if grads:
                fns.append(_sum_function(accumulate_name(backward.sym_name.data), stage, grads, backward))
        forward = find_function(module, function_name(stage, PassKind.F))
        if LOSS_SHARE in result_keys(forward):
            fns.append(_sum_function(accumulate_loss_name(stage), stage, [LOSS_SHARE], forward))
        return fns


def _sum_function(name: str, stage: int, keys: list[str], producer: func.FuncOp) -> func.FuncOp:
    """`@name(acc..., new...) -> (acc + new)...` over the results `keys` of `producer`."""
    produced = result_keys(producer)
    types = [producer.function_type.outputs.data[produced.index(k)] for k in keys]
    block = Block(arg_types=[*types, *types])
    b = TorchBuilder(block)
    n = len(keys)
    sums = [b.aten("torch.aten.add.Tensor", [block.args[i], block.args[n + i], b.float(1.0)]) for i in range(n)]
    block.add_op(func.ReturnOp(*sums))
    fn = func.FuncOp(
        name,
        ([*types, *types], types),
        Region(block),
        arg_attrs=ArrayAttr(DictionaryAttr({KEY: StringAttr(k)}) for k in [*keys, *keys]),
        res_attrs=ArrayAttr(DictionaryAttr({KEY: StringAttr(k)}) for k in keys),
    )
    fn.attributes[STAGE] = IntegerAttr(stage, 64)
    return fn


# ATen's ScalarType numbering, as torch-mlir writes dtypes.
_DTYPE_CODES = {"f32": 6, "f64": 7, "f16": 5, "bf16": 15}


def _dtype_code(t: ValueTensorType) -> int:
    return _DTYPE_CODES[str(t.dtype)]


def _remove_argument(fn: func.FuncOp, index: int) -> None:
    block = fn.body.block
    block.erase_arg(block.args[index])
    inputs = list(fn.function_type.inputs.data)
    del inputs[index]
    attrs = list(fn.arg_attrs.data)
    del attrs[index]
    fn.function_type = func.FunctionType.from_lists(inputs, list(fn.function_type.outputs.data))
    fn.arg_attrs = ArrayAttr(attrs)


def _add_result(fn: func.FuncOp, value, key: str) -> None:
    ret = fn.body.block.last_op
    ret.operands = [*ret.operands, value]
    outputs = [*fn.function_type.outputs.data, value.type]
    fn.function_type = func.FunctionType.from_lists(list(fn.function_type.inputs.data), outputs)
    fn.res_attrs = ArrayAttr([*fn.res_attrs.data, DictionaryAttr({KEY: StringAttr(key)})])
