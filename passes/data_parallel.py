"""data-parallel: replicates every stage along a mesh axis and reduces gradients over it.

Each replica takes an equal slice of the global batch: the step's inputs get
the layout "dimension 0 split over `axis`", and so does every activation that
depends on them (the first dimension that is a multiple of the rows a replica
holds); the gradients the backward tasks return (and the buffer increments a forward
returns, see `running-buffers`) are partial sums over `axis`
(`partial = ["dp"]`), on top of the layouts they already have (tensor parallelism's
shards and pending sums are kept). The pass then sums them over the axis before each
stage's update with `par.all_reduce_bucket`, grouping the gradients of a stage
into buckets of at most `bucket-mb` MiB in the order the backward produces them
(last parameters first), so each bucket can be issued as soon as its gradients
are final. A weight tied across stages is summed over its stages too (its
bucket lists them). The microbatch pass scales the loss so the sum over
replicas is the global mean. A value whose layout already splits a dimension
over `axis` (expert parallelism's experts, what they compute and their
gradients: each device holds its own piece, whole) keeps that layout, and its
gradient joins no bucket.

    %r:2 = par.all_reduce_bucket 0 stage 1 (%g1, %g2) over @mesh ["dp"] stages [1] : T1, T2
    %u = par.task @s1_update stage 1 pass update (%w1, %r#0, ...) : ...

Options: axis (the mesh axis, default dp), bucket-mb, directive.
Requires: mesh, outline-stages and optimizer have run.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp
from xdsl.ir import BlockArgument, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects.par import AllReduceBucketOp, PassKind, ShardingAttr, TaskOp, layout_of
from piperc.dialects.roles import argument_roles, main_function, result_roles
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL, find_axis
from piperc.passes.outline_stages import (
    arg_keys,
    find_function,
    step_result_layouts,
    step_tasks,
    with_layout,
)


def reduce_gradients(module: ModuleOp, axes: tuple[str, ...], limit_bytes: float, shared_only: bool) -> None:
    """Sums the gradients each update task reads with `par.all_reduce_bucket` over `axes`
    and over every stage that holds the same parameter, in buckets of at most `limit_bytes`.

    Buckets written earlier are dissolved first, and the axes they summed over join `axes`
    (two data-parallel axes, e.g. `dp` and an expert axis of its own, sum each dense gradient
    once, over both). A gradient whose layout already splits a dimension over one of the axes
    (an expert's, whole on the ranks holding it) is summed over the other axes only, in
    buckets of its own. With `shared_only`, only the gradients of parameters held by several
    stages (tied weights) are summed.
    """
    main = main_function(module)
    earlier: list[str] = []
    for bucket in [o for o in main.body.block.ops if isinstance(o, AllReduceBucketOp)]:
        earlier += [a for a in bucket.axis_names() if a not in earlier]
        for r, v in zip(bucket.sums, bucket.values, strict=True):
            r.replace_all_uses_with(v)
        bucket.detach()
        bucket.erase()
    axes = (*earlier, *(a for a in axes if a not in earlier))
    updates = [t for t in step_tasks(module) if t.pass_kind.data == PassKind.UPDATE]
    holders: dict[SSAValue, list[int]] = {}
    for task in updates:
        for v in task.args:
            if isinstance(v, BlockArgument):
                holders.setdefault(v, []).append(task.stage.value.data)
    for task in updates:
        stage = task.stage.value.data
        keys = arg_keys(find_function(module, task.callee.root_reference.data))
        params = {k.removeprefix("param:"): v for k, v in zip(keys, task.args, strict=True) if k.startswith("param:")}
        grads = [(i, params[k.removeprefix("grad:")]) for i, k in enumerate(keys) if k.startswith("grad:")]
        buckets: list[tuple[tuple[int, ...], tuple[str, ...], list[int]]] = []
        open_bucket: dict[tuple, tuple[list[int], int]] = {}  # (stages, axes) -> (its bucket, bytes)
        update = find_function(module, task.callee.root_reference.data)
        for index, param in reversed(grads):
            group = tuple(holders[param])
            if shared_only and len(group) == 1:
                continue
            layout = layout_of(update.arg_attrs.data[index])
            over = tuple(a for a in axes if not _splits_over(layout, (a,)))
            if not over and len(group) == 1:
                continue  # each device holds its own piece, computed whole (expert parallelism's experts)
            nbytes = task.args[index].type.nbytes()
            current, size = open_bucket.get((group, over), (None, 0))
            if current is None or size + nbytes > limit_bytes:
                current, size = [], 0
                buckets.append((group, over, current))
            current.append(index)
            open_bucket[(group, over)] = (current, size + nbytes)
        for number, (group, over, indices) in enumerate(buckets):
            op = AllReduceBucketOp(number, stage, [task.args[i] for i in indices], MESH_SYMBOL, over, group)
            main.body.block.insert_op_before(op, task)
            for i, r in zip(indices, op.sums, strict=True):
                task.operands[i] = r


@dataclass(frozen=True)
class DataParallelPass(ModulePass):
    """Splits the batch over `axis` (input layouts) and sums gradients over it in buckets."""

    name = "data-parallel"

    axis: str = "dp"
    bucket_mb: int | float = 25.0
    directive: str = "data-parallel"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        find_axis(op, self.axis, self.directive)
        if self.bucket_mb <= 0:
            raise StrategyError(f"{self.directive}: bucket_mb must be > 0, got {self.bucket_mb}")
        if not any(t.pass_kind.data == PassKind.UPDATE for t in step_tasks(op)):
            raise StrategyError(f"{self.directive}: run optimizer first (the step has no update tasks)")
        reduce_gradients(op, (self.axis,), self.bucket_mb * 2**20, shared_only=False)
        self._split_batch(op)
        step_result_layouts(op)

    def _split_batch(self, module: ModuleOp) -> None:
        """Writes the layouts of data parallelism on the step and on every task's function."""
        main = main_function(module)
        roles = argument_roles(main)
        inputs = [a for a, (role, _) in zip(main.args, roles, strict=True) if role == "input"]
        if not inputs:
            raise StrategyError(f"{self.directive}: the step reads no model input to split")
        rows = inputs[0].type.get_shape()[0]
        batched: set[SSAValue] = set(inputs)
        main.arg_attrs = ArrayAttr(
            with_layout(attrs, None, self._layout(attrs, a.type, rows, a in batched))
            for attrs, a in zip(main.arg_attrs.data, main.args, strict=True))
        for task in step_tasks(module):
            fn = find_function(module, task.callee.root_reference.data)
            depends = any(v in batched for v in task.args)
            fn.arg_attrs = ArrayAttr(
                with_layout(attrs, None, self._layout(attrs, v.type, rows, v in batched))
                for attrs, v in zip(fn.arg_attrs.data, task.args, strict=True))
            if not depends:
                continue
            batched.update(task.outs)
            is_grad = _gradient_results(main, task)
            fn.res_attrs = ArrayAttr(
                with_layout(attrs, None, self._partial(attrs, r.type) if grad else self._layout(attrs, r.type, rows, True))
                for attrs, r, grad in zip(fn.res_attrs.data, task.outs, is_grad, strict=True))

    def _layout(self, attrs: DictionaryAttr, type_, rows: int, batched: bool) -> ShardingAttr:
        """The layout `attrs` give (replicated if none), split over the axis along the first
        dimension holding whole rows if `batched` (the axis outermost: each replica's rows are
        then laid out over the other axes as before)."""
        shape = type_.get_shape() if isinstance(type_, ValueTensorType) else ()
        layout = layout_of(attrs) or ShardingAttr.replicated(len(shape))
        if not batched or _splits_over(layout, (self.axis,)):
            return layout
        for dim, size in enumerate(shape):
            if size > 0 and size % rows == 0:
                return ShardingAttr([[self.axis, *layout.dim_axes(d)] if d == dim else layout.dim_axes(d)
                                     for d in range(len(shape))], layout.partial_axes())
        return self._partial(attrs, type_)

    def _partial(self, attrs: DictionaryAttr, type_) -> ShardingAttr:
        """The layout `attrs` give (replicated if none), also a pending sum over the axis (a
        loss that propagation already made pending over every axis stays as it is)."""
        layout = layout_of(attrs) or ShardingAttr.replicated(len(type_.get_shape()))
        if _splits_over(layout, (self.axis,)):
            return layout
        partial = layout.partial_axes()
        return ShardingAttr([layout.dim_axes(d) for d in range(layout.rank())],
                            partial if self.axis in partial else [self.axis, *partial])


def _splits_over(layout: ShardingAttr | None, axes: tuple[str, ...]) -> bool:
    """Whether `layout` splits a dimension over one of `axes`: a value each device along them
    holds a different piece of, whole (expert parallelism's experts and what they compute from
    every replica's tokens), which the batch split leaves as it is and nothing sums."""
    return layout is not None and any(a in axes for d in range(layout.rank()) for a in layout.dim_axes(d))


def _gradient_results(main: func.FuncOp, task: TaskOp) -> list[bool]:
    """Which results of `task` are sums over the batch: parameter gradients (read by an update
    or a bucket) and buffer increments (returned by the step, see `running-buffers`)."""
    ret = main.body.block.last_op
    increments = {v for (role, _), v in zip(result_roles(main), ret.operands, strict=True) if role == "increment"}
    readers = [[u.operation for u in r.uses] for r in task.outs]
    return [r in increments or any(
        isinstance(o, AllReduceBucketOp) or (isinstance(o, TaskOp) and o.pass_kind.data == PassKind.UPDATE)
        for o in users) for r, users in zip(task.outs, readers, strict=True)]

