"""microbatch: makes per-microbatch stage functions add up to one step on the global batch.

The step is captured on one microbatch (global batch / data-parallel replicas
/ microbatches rows). For the sum over all microbatches and replicas to equal
the global mean loss and its gradient, this pass

  * replaces the loss tangent (`tangent:0`, an argument of the last stage's
    backward) by the constant 1/(replicas*microbatches);
  * zeroes the tangents of further outputs;
  * makes the last stage's forward also return `loss_share`, the loss times
    the same factor;
  * sums what the step reads once (gradients, the loss share) over
    microbatches: `%s:2 = par.accumulate @s0_B_accumulate stage 0 (%g1, %g2)`
    after the task that makes them, with the combiner
    `@s0_B_accumulate(acc..., new...) -> (acc + new)...`; buckets, updates and
    the step's results read the sums.

The loss must be a mean over the batch dimension (as `F.cross_entropy` is).
An asynchronous pipeline applies fewer microbatches per update than a step holds: with
`per_update` = k, the loss tangent is 1/(replicas*k), so an update applies the mean gradient
of its k microbatches (PipeDream: k = 1; 2BW: k = count); the loss share keeps
1/(replicas*count), so a step still reports the mean loss of its microbatches.
Options: count (microbatches), replicas (data-parallel size), per_update (0: count), directive.
Requires: outline-stages has run.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, IntegerAttr, ModuleOp
from xdsl.ir import Block, Region
from xdsl.passes import ModulePass

from piperc.dialects.par import AccumulateOp, AllReduceBucketOp, PassKind, TaskOp, layout_of
from piperc.dialects.roles import argument_roles, main_function, result_roles
from piperc.dialects.torch import ValueTensorType
from piperc.dialects.torch_builder import TorchBuilder
from piperc.errors import StrategyError
from piperc.passes.outline_stages import (
    find_function,
    named,
    result_keys,
    step_result_layouts,
    step_tasks,
)
from piperc.passes.pipeline_split import NUM_STAGES, module_count

MICROBATCHES = "par.microbatches"
REPLICAS = "par.replicas"
"""Module attributes: how many microbatches and data-parallel replicas cut each global batch."""
LOSS_SHARE = "loss_share"


def accumulate_name(function: str) -> str:
    """`s0_B_blocks_1_accumulate`: sums one function's per-microbatch results over microbatches."""
    return f"{function}_accumulate"


@dataclass(frozen=True)
class MicrobatchPass(ModulePass):
    """Scales the loss for `count` microbatches x `replicas` and sums per-microbatch results."""

    name = "microbatch"

    count: int = 1
    replicas: int = 1
    per_update: int = 0
    directive: str = "microbatch"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.count < 1 or self.replicas < 1 or self.per_update < 0:
            raise StrategyError(f"{self.directive}: microbatches and replicas must be >= 1")
        module_count(op, NUM_STAGES, self.directive, "pipeline-split")
        if not step_tasks(op):
            raise StrategyError(f"{self.directive}: run outline-stages first (the step has no tasks)")
        scale = 1.0 / (self.count * self.replicas)
        main = main_function(op)
        self._replace_tangents(op, main, 1.0 / ((self.per_update or self.count) * self.replicas))
        self._add_loss_share(op, main, scale)
        for task in step_tasks(op):
            if task.pass_kind.data != PassKind.UPDATE:
                self._accumulate(op, main, task)
        step_result_layouts(op)
        op.attributes[MICROBATCHES] = IntegerAttr(self.count, 64)
        op.attributes[REPLICAS] = IntegerAttr(self.replicas, 64)

    def _replace_tangents(self, module: ModuleOp, main: func.FuncOp, scale: float) -> None:
        """Replaces the tangent arguments of the step by constants: 1/(replicas*microbatches)
        for the loss, zero for further outputs."""
        roles = argument_roles(main)
        tangents = [a for a, (role, _) in zip(main.args, roles, strict=True) if role == "tangent"]
        for task in step_tasks(module):
            keep = [i for i, v in enumerate(task.args) if v not in tangents]
            if len(keep) == len(task.args):
                continue
            fn = find_function(module, task.callee.root_reference.data)
            block = fn.body.block
            for index in reversed(range(len(task.args))):
                if index in keep:
                    continue
                arg = block.args[index]
                value = scale if roles[task.args[index].index][1] == 0 else 0.0
                b = TorchBuilder(block, before=block.first_op)
                c = b.aten(
                    "torch.aten.full",
                    [b.int_list(arg.type.get_shape()), b.float(value), b.int(_dtype_code(arg.type)),
                     b.none(), b.device(), b.none()],
                    [arg.type],
                )
                arg.replace_all_uses_with(c)
                _remove_argument(fn, index)
            rebuild_task(task, [task.args[i] for i in keep], list(fn.function_type.outputs.data))
        for arg in reversed(tangents):
            _remove_argument(main, arg.index)

    def _add_loss_share(self, module: ModuleOp, main: func.FuncOp, scale: float) -> None:
        """The task computing the loss also returns `loss_share`, the loss times `scale`;
        the step reports the sum of the shares."""
        ret = main.body.block.last_op
        loss = ret.operands[0]
        task = loss.owner
        if result_roles(main)[0][0] != "loss" or not isinstance(task, TaskOp):
            raise StrategyError(f"{self.directive}: no stage computes the loss")
        fn = find_function(module, task.callee.root_reference.data)
        fret = fn.body.block.last_op
        b = TorchBuilder(fn.body.block, before=fret)
        share = b.aten("torch.aten.mul.Scalar", [fret.operands[loss.index], b.float(scale)])
        _add_result(fn, share, LOSS_SHARE)
        new = rebuild_task(task, list(task.args), list(fn.function_type.outputs.data))
        ret.operands = [new.outs[-1], *ret.operands[1:]]

    def _accumulate(self, module: ModuleOp, main: func.FuncOp, task: TaskOp) -> None:
        """Sums the results of `task` that the step reads once (gradients, the loss share)
        over microbatches with `par.accumulate`."""
        per_step = [r for r in task.outs if any(_reads_once_per_step(u.operation) for u in r.uses)]
        if not per_step:
            return
        fn = find_function(module, task.callee.root_reference.data)
        keys = [result_keys(fn)[r.index] for r in per_step]
        layouts = [layout_of(fn.res_attrs.data[r.index]) for r in per_step]
        combiner = _sum_function(accumulate_name(fn.sym_name.data), keys, [r.type for r in per_step], layouts)
        module.body.block.insert_op_before(combiner, main)
        acc = AccumulateOp(combiner.sym_name.data, task.stage.value.data, per_step)
        main.body.block.insert_op_after(acc, task)
        for r, total in zip(per_step, acc.sums, strict=True):
            r.replace_uses_with_if(total, lambda use: _reads_once_per_step(use.operation))


def _reads_once_per_step(op) -> bool:
    """Whether `op` runs once per step rather than once per microbatch."""
    return isinstance(op, AllReduceBucketOp | func.ReturnOp) or (
        isinstance(op, TaskOp) and op.pass_kind.data == PassKind.UPDATE)


def rebuild_task(task: TaskOp, args, result_types) -> TaskOp:
    """Replaces `task` by the same task with new operands and result types (results in
    common keep their uses)."""
    new = TaskOp(task.callee.root_reference.data, task.stage.value.data, task.pass_kind.data, args,
                 result_types)
    task.parent_block().insert_op_before(new, task)
    for old, r in zip(task.outs, new.outs, strict=False):
        old.replace_all_uses_with(r)
        r.name_hint = old.name_hint
    task.detach()
    task.erase()
    return new


def _sum_function(name: str, keys: list[str], types: list, layouts: list) -> func.FuncOp:
    """`@name(acc..., new...) -> (acc + new)...`, each value laid out as what it sums."""
    block = Block(arg_types=[*types, *types])
    b = TorchBuilder(block)
    n = len(keys)
    sums = [b.aten("torch.aten.add.Tensor", [block.args[i], block.args[n + i], b.one(types[i])]) for i in range(n)]
    block.add_op(func.ReturnOp(*sums))
    return func.FuncOp(
        name,
        ([*types, *types], types),
        Region(block),
        arg_attrs=ArrayAttr(named(k, t, lay) for k, t, lay in zip([*keys, *keys], [*types, *types],
                                                                  [*layouts, *layouts], strict=True)),
        res_attrs=ArrayAttr(named(k, t, lay) for k, t, lay in zip(keys, types, layouts, strict=True)),
    )


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
    fn.res_attrs = ArrayAttr([*fn.res_attrs.data, named(key, value.type, _share_layout(fn))])


def _share_layout(fn: func.FuncOp):
    """The loss share is partial wherever the loss is (over the data-parallel axis)."""
    layouts = [layout_of(a) for a in fn.res_attrs.data]
    return next((lay for lay, t in zip(layouts, fn.function_type.outputs.data, strict=True)
                 if lay is not None and not t.get_shape()), None)
