"""running-buffers: updates the buffers the forward updates (BatchNorm's running statistics)
as one device running the step's slices in order would.

Capture returns each such buffer's increment `u` (`piperc.increment`): on one slice,
the buffer becomes `decay * buffer + u` (`piperc.decay`; BatchNorm's running mean and
variance have decay `1 - momentum`, `num_batches_tracked` decay 1 and `u = 1`). One
device running the S = replicas x microbatches slices of a step in order leaves

    decay**S * buffer + sum_j decay**(S-1-j) * u_j          (slice j = replica * microbatches + microbatch)

since each update is linear in the buffer. The terms of the sum are independent, so
slices need not run in order or on one device:

  * the forward that returns `u` weights it by `decay**(S-1-j)`, with `j` from
    `par.slice_index` (nothing to weight when decay is 1 or S is 1);
  * the microbatch pass has already summed the weighted increments over microbatches
    (`par.accumulate`); data parallelism left them partial over its axis, and this pass
    sums them over it with `par.all_reduce_bucket` (one bucket per stage and dtype);
  * `@s<i>_buffers` (an update task of stage i) computes `decay**S * buffer + total`, and
    the step returns it as the buffer (`piperc.buffer`), which the device programs store.

    func.func @s0_buffers(%b: T {piperc.key = "buffer:bn.running_mean"}, %u: T {piperc.key = "increment:bn.running_mean"}) -> T
      %s = torch.aten.mul.Scalar(%b, 0.6561)         // 0.9**4: 2 replicas x 2 microbatches
      %n = torch.aten.add.Tensor(%s, %u, 1)
    %t = par.all_reduce_bucket 1 stage 0 (%acc) over @mesh ["dp"] stages [0] : T
    %n = par.task @s0_buffers stage 0 pass update (%b, %t) : (T, T) -> T

The one-device run this equals is `piperc.reference.train_eager(..., slices=S)`: its
forwards run slice by slice, each updating the running statistics. A model with no such
buffer is left unchanged. Options: directive (quoted in errors). Requires: microbatch has run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, FloatAttr, ModuleOp, StringAttr
from xdsl.ir import Block, BlockArgument, Region, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects.par import (
    AccumulateOp,
    AllReduceBucketOp,
    PassKind,
    ShardingAttr,
    SliceIndexOp,
    TaskOp,
    layout_of,
)
from piperc.dialects.roles import (
    ARG_BUFFER,
    RES_DECAY,
    main_function,
    result_roles,
)
from piperc.dialects.torch import FloatType, IntType
from piperc.dialects.torch_builder import TorchBuilder
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL
from piperc.passes.microbatch import MICROBATCHES, REPLICAS, rebuild_task
from piperc.passes.outline_stages import KEY, find_function, named, step_result_layouts, with_layout
from piperc.passes.pipeline_split import module_count


def buffers_name(stage: int) -> str:
    """`s0_buffers`: the function that updates stage `stage`'s buffers once per step."""
    return f"s{stage}_buffers"


@dataclass
class _Increment:
    """One buffer the forward updates: its name, decay, the step's value of its summed
    increment, and the `@main` argument holding the buffer."""

    name: str
    decay: float
    total: SSAValue
    buffer: BlockArgument
    stage: int = 0
    layout: ShardingAttr | None = None
    """The layout of the total once summed (the forward's, without its pending sums)."""


@dataclass(frozen=True)
class RunningBuffersPass(ModulePass):
    """Turns the step's buffer increments into buffer updates over all slices of the batch."""

    name = "running-buffers"

    directive: str = "running-buffers"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        main = main_function(op)
        increments = self._increments(main)
        if not increments:
            return
        slices = (module_count(op, MICROBATCHES, self.directive, "microbatch")
                  * module_count(op, REPLICAS, self.directive, "microbatch"))
        for inc in increments:
            self._weight(op, inc, slices)
        self._reduce(op, main, increments)
        self._update(op, main, increments, slices)
        step_result_layouts(op)

    def _increments(self, main: func.FuncOp) -> list[_Increment]:
        """The buffers whose increments the step returns, in result order."""
        ret = main.body.block.last_op
        by_name = {attrs.data[ARG_BUFFER].data: a for a, attrs in zip(main.args, main.arg_attrs.data, strict=True)
                   if isinstance(attrs.data.get(ARG_BUFFER), StringAttr)}
        found = []
        for (role, name), attrs, v in zip(result_roles(main), main.res_attrs.data, ret.operands, strict=True):
            if role != "increment":
                continue
            decay = attrs.data.get(RES_DECAY)
            if not isinstance(decay, FloatAttr):
                raise StrategyError(f"{self.directive}: the increment of buffer '{name}' has no {RES_DECAY}")
            if name not in by_name:
                raise StrategyError(f"{self.directive}: the step updates buffer '{name}' but has no argument for it")
            found.append(_Increment(name, decay.value.data, v, by_name[name]))
        return found

    def _forward(self, inc: _Increment) -> tuple[TaskOp, int]:
        """The forward task that returns `inc`'s increment, and which of its results it is."""
        v = inc.total
        if isinstance(v.owner, AccumulateOp):
            v = v.owner.values[v.index]
        if not isinstance(v.owner, TaskOp) or v.owner.pass_kind.data != PassKind.F:
            raise StrategyError(f"{self.directive}: the increment of buffer '{inc.name}' is not computed by "
                                f"a forward task")
        inc.stage = v.owner.stage.value.data
        return v.owner, v.index

    def _weight(self, module: ModuleOp, inc: _Increment, slices: int) -> None:
        """Weights the increment the forward returns by decay**(slices-1-slice). When the
        increment is also read by another task (BatchNorm's backward takes the running
        statistics), the forward returns the weighted value as a further result."""
        task, index = self._forward(inc)
        if inc.decay == 1.0 or slices == 1:
            return
        fn = find_function(module, task.callee.root_reference.data)
        ret = fn.body.block.last_op
        b = TorchBuilder(fn.body.block, before=ret)
        j = b.insert(SliceIndexOp()).results[0]
        power = b.aten("torch.aten.sub.int", [b.int(slices - 1), j], [IntType()])
        weight = b.aten("torch.aten.pow.float_int", [b.float(inc.decay), power], [FloatType()])
        weighted = b.aten("torch.aten.mul.Scalar", [ret.operands[index], weight])
        if all(isinstance(u.operation, AccumulateOp | func.ReturnOp) for u in task.outs[index].uses):
            ret.operands = [weighted if i == index else r for i, r in enumerate(ret.operands)]
            return
        ret.operands = [*ret.operands, weighted]
        attrs = fn.res_attrs.data[index]
        fn.res_attrs = ArrayAttr([*fn.res_attrs.data, DictionaryAttr({**attrs.data, KEY: StringAttr(
            f"increment:{inc.name}")})])
        fn.function_type = func.FunctionType.from_lists(list(fn.function_type.inputs.data),
                                                        [*fn.function_type.outputs.data, weighted.type])
        new = rebuild_task(task, list(task.args), list(fn.function_type.outputs.data))
        step_use = inc.total.owner if isinstance(inc.total.owner, AccumulateOp) else None
        if step_use is None:
            inc.total = new.outs[-1]
        else:
            step_use.operands = [new.outs[-1] if v is new.outs[index] else v for v in step_use.operands]

    def _reduce(self, module: ModuleOp, main: func.FuncOp, increments: list[_Increment]) -> None:
        """Sums the increments that are partial over mesh axes (data parallelism's) over them."""
        groups: dict[tuple, list[_Increment]] = defaultdict(list)
        for inc in increments:
            layout = self._layout(module, inc.total)
            inc.layout = ShardingAttr([layout.dim_axes(d) for d in range(layout.rank())], [])
            if layout.partial_axes():
                groups[(inc.stage, tuple(layout.partial_axes()), str(inc.total.type.dtype))].append(inc)
        ret = main.body.block.last_op
        numbers = defaultdict(lambda: 0)
        for o in main.body.block.ops:
            if isinstance(o, AllReduceBucketOp):
                stage = o.stage.value.data
                numbers[stage] = max(numbers[stage], o.bucket.value.data + 1)
        for (stage, axes, _), members in groups.items():
            bucket = AllReduceBucketOp(numbers[stage], stage, [m.total for m in members], MESH_SYMBOL, axes, [stage])
            numbers[stage] += 1
            main.body.block.insert_op_before(bucket, ret)
            for m, total in zip(members, bucket.sums, strict=True):
                m.total = total

    def _layout(self, module: ModuleOp, v: SSAValue) -> ShardingAttr:
        """The layout the function producing `v` declares for it."""
        owner = v.owner
        if isinstance(owner, TaskOp | AccumulateOp):
            fn = find_function(module, owner.callee.root_reference.data)
            layout = layout_of(fn.res_attrs.data[v.index])
            if layout is not None:
                return layout
        return ShardingAttr.replicated(len(v.type.get_shape()))

    def _update(self, module: ModuleOp, main: func.FuncOp, increments: list[_Increment], slices: int) -> None:
        """One `@s<i>_buffers` task per stage; the step returns the updated buffers."""
        ret = main.body.block.last_op
        new_value: dict[str, SSAValue] = {}
        by_stage: dict[int, list[_Increment]] = defaultdict(list)
        for inc in increments:
            by_stage[inc.stage].append(inc)
        for stage, members in sorted(by_stage.items()):
            fn = self._function(main, stage, members, slices)
            module.body.block.insert_op_before(fn, main)
            args = [v for m in members for v in (m.buffer, m.total)]
            task = TaskOp(fn.sym_name.data, stage, PassKind.UPDATE, args, [m.buffer.type for m in members])
            main.body.block.insert_op_before(task, ret)
            for m, r in zip(members, task.outs, strict=True):
                r.name_hint = m.buffer.name_hint
                new_value[m.name] = r
        roles = result_roles(main)
        operands, attrs = [], []
        for (role, name), a, v in zip(roles, main.res_attrs.data, ret.operands, strict=True):
            if role == "increment":
                v = new_value[name]
                a = DictionaryAttr({ARG_BUFFER: StringAttr(name)})
            operands.append(v)
            attrs.append(a)
        ret.operands = operands
        main.function_type = func.FunctionType.from_lists(list(main.function_type.inputs.data),
                                                         [v.type for v in operands])
        main.res_attrs = ArrayAttr(with_layout(a, v.type, layout_of(a)) for a, v in zip(attrs, operands, strict=True))

    def _function(self, main: func.FuncOp, stage: int, members: list[_Increment], slices: int) -> func.FuncOp:
        """`@s<i>_buffers(buffer..., increment...)`: each buffer times decay**slices plus its increment."""
        types = [t for m in members for t in (m.buffer.type, m.total.type)]
        block = Block(arg_types=types)
        b = TorchBuilder(block)
        results, arg_attrs, res_attrs = [], [], []
        for i, m in enumerate(members):
            old, total = block.args[2 * i], block.args[2 * i + 1]
            buffer_layout = layout_of(main.arg_attrs.data[m.buffer.index]) or ShardingAttr.replicated(
                len(m.buffer.type.get_shape()))
            if m.layout != buffer_layout:
                raise StrategyError(f"{self.directive}: buffer '{m.name}' is laid out {buffer_layout} but its "
                                    f"update {m.layout}; a buffer the forward updates must be laid out as its update")
            if m.decay != 1.0:
                old = b.aten("torch.aten.mul.Scalar", [old, b.float(m.decay ** slices)])
            results.append(b.aten("torch.aten.add.Tensor", [old, total, b.one(m.buffer.type)]))
            arg_attrs += [named(f"buffer:{m.name}", m.buffer.type, buffer_layout),
                          named(f"increment:{m.name}", m.total.type, m.layout)]
            res_attrs.append(named(f"buffer:{m.name}", m.buffer.type, buffer_layout))
        block.add_op(func.ReturnOp(*results))
        return func.FuncOp(buffers_name(stage), (types, [m.buffer.type for m in members]), Region(block),
                           arg_attrs=ArrayAttr(arg_attrs), res_attrs=ArrayAttr(res_attrs))
