"""zero: shards optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3) over
the data-parallel axis, as layouts and `par.reshard`s; no new runtime machinery.

Each parameter `w` of an update function is sharded along its first dimension that the
axis size divides (`Shard(d)`, written `#par.sharding<[["dp"], []]>`); a parameter with
no such dimension stays replicated and is updated whole on every replica. Next to tensor
parallelism the functions hold each rank's tp piece, and the piece is what is sharded:
its layout (the shard's `base`, `[["tp"], []]`) gains the axis innermost on that
dimension (`[["tp", "dp"], []]`), and every reshard below goes to or from `base` instead
of replicated. For a sharded `w`, per stage:

  zero=1  the optimizer state of `w` (`state:w.*`) is held and updated as this replica's
          shard. The update function slices the all-reduced gradient and the parameter to
          the shard (`par.reshard` Replicate -> Shard: a local `all_slice`) and gathers the
          updated shard back (Shard -> Replicate: `all_gather`).
  zero=2  as zero=1, and the gradient is no longer all-reduced in a bucket: the update
          function reads the backward's partial sum and reduce-scatters it (Partial ->
          Shard). A weight tied across stages keeps its bucket (it sums over stages too).
  zero=3  as zero=2, and the parameter itself is held as a shard (`@main`'s argument and
          result, the rank's state); the update works on the shard alone. Where the
          forward and backward get the whole parameter is the `reshard-after-forward`
          policy (FSDP2's name for it):
            true   each forward and backward function that reads it gathers it on entry
                   (Shard -> Replicate inside the function) and drops the whole copy when
                   it returns, so every microbatch's F and B regathers it: least memory;
            false  the step gathers it once (a `par.reshard` in `@main` that every F and B
                   task reads), so it stays whole across all microbatches until its last
                   backward: one gather per step. expand-schedule issues the gather as soon
                   as the step starts, on the communication stream, ahead of the first
                   task that needs it (a prefetch).

    func.func @s0_update(%w: !torch.vtensor<[8,4],f32> {piperc.key = "param:w"},
                         %g: !torch.vtensor<[8,4],f32> {..., par.layout = #par.sharding<[[], []], partial = ["dp"]>},
                         %m: !torch.vtensor<[4,4],f32> {..., par.layout = #par.sharding<[["dp"], []]>}, ...) {
      %ws = par.reshard %w @mesh from #par.sharding<[[], []]> to #par.sharding<[["dp"], []]> : ...
      %gs = par.reshard %g @mesh from #par.sharding<[[], []], partial = ["dp"]> to #par.sharding<[["dp"], []]> : ...
      ... the update, on [4,4] shards ...
      %wr = par.reshard %w2 @mesh from #par.sharding<[["dp"], []]> to #par.sharding<[[], []]> : ...

The update's ops are elementwise (`optimizer` writes them), so they run on shards
unchanged: the pass only gives their results the shard's shape, and an op that is not
elementwise is an error naming it. `lower-reshard` then turns the reshards into
collectives inside the functions, `lower-collectives` declares the axis groups, and the
runtime holds each state tensor as the layout of its `par.state` says.

Options: stage (1, 2 or 3), axis (default dp), reshard-after-forward (zero=3; default
true), directive (quoted in errors).
Requires: data-parallel has run over `axis` (gradient buckets and layouts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp, StringAttr
from xdsl.ir import Attribute, Block, BlockArgument, Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.rewriter import InsertPoint, Rewriter

from piperc.dialects.par import (
    LAYOUT,
    AllReduceBucketOp,
    PassKind,
    ReshardOp,
    ShardingAttr,
    TaskOp,
    layout_of,
)
from piperc.dialects.roles import argument_roles, main_function
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL, find_axis
from piperc.passes.outline_stages import (
    KEY,
    arg_keys,
    find_function,
    result_keys,
    step_result_layouts,
    step_tasks,
    with_layout,
)

ELEMENTWISE = frozenset(
    f"torch.aten.{name}"
    for name in (
        "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "mul.Tensor", "mul.Scalar",
        "div.Tensor", "div.Scalar", "lerp.Scalar", "lerp.Tensor", "addcmul", "addcdiv", "sqrt", "rsqrt",
        "reciprocal", "neg", "pow.Scalar", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "clone", "abs", "sign",
        "maximum", "minimum", "clamp", "where.self",
    )
)
"""The update ops that act element by element (with broadcasting), so they run on shards."""


@dataclass
class _Shard:
    """How one parameter is sharded: its layout before ZeRO (`base`: replicated, or its
    tensor-parallel layout) and after (`layout`), its shard's type and its type under `base`."""

    base: ShardingAttr
    layout: ShardingAttr
    local: ValueTensorType
    whole: ValueTensorType


@dataclass(frozen=True)
class ZeroPass(ModulePass):
    """Shards optimizer state (1), gradients (2) and parameters (3) over the data-parallel axis."""

    name = "zero"

    stage: int = 1
    axis: str = "dp"
    reshard_after_forward: bool = True
    directive: str = "zero"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.stage not in (1, 2, 3):
            raise StrategyError(f"{self.directive}: zero must be 0, 1, 2 or 3, got {self.stage}")
        mesh = find_axis(op, self.axis, self.directive)
        updates = [task for task in step_tasks(op) if task.pass_kind.data == PassKind.UPDATE]
        if not updates:
            raise StrategyError(f"{self.directive}: run optimizer and data-parallel first (the step has no update)")
        _Rewrite(op, self, mesh.axis_size(self.axis)).run(updates)


@dataclass
class _Rewrite:
    """One application of the pass: the shards chosen and the values rewritten so far."""

    module: ModuleOp
    options: ZeroPass
    size: int
    shards: dict[str, _Shard] = field(default_factory=dict)
    local: set[SSAValue] = field(default_factory=set)
    """Values of the function being rewritten that now hold shards."""

    def run(self, updates: list[TaskOp]) -> None:
        main = main_function(self.module)
        for task in updates:
            self.update(task)
        roles = argument_roles(main)
        for arg, (role, name) in zip(list(main.args), roles, strict=True):
            shard = self.shards.get(_owner(role, name))
            if shard is not None and (role == "state" or (role == "param" and self.options.stage == 3)):
                self.retype_argument(main, arg.index, shard)
        if self.options.stage == 3 and self.options.reshard_after_forward:
            for task in step_tasks(self.module):
                if task.pass_kind.data in (PassKind.F, PassKind.B):
                    self.gather_on_entry(task, roles)
            self.recompute_in_backward(roles)
        elif self.options.stage == 3:
            self.gather_once(main, roles)
        main.update_function_type()
        step_result_layouts(self.module)

    # ------------------------------------------------------------ the update function

    def update(self, task: TaskOp) -> None:
        """Rewrites one update task and its function to work on shards."""
        fn = find_function(self.module, task.callee.root_reference.data)
        keys = arg_keys(fn)
        for key, arg, attrs in zip(keys, fn.args, fn.arg_attrs.data, strict=True):
            if key.startswith("param:"):
                shard = self.choose(arg.type, layout_of(attrs))
                if shard is not None:
                    self.shards[key.removeprefix("param:")] = shard
        block = fn.body.block
        first = block.first_op
        self.local = set()
        for index, key in enumerate(keys):
            role, _, name = key.partition(":")
            shard = self.shards.get(_owner(role, name))
            if shard is None:
                continue
            if role == "state" or (role == "param" and self.options.stage == 3):
                self.retype_argument(fn, index, shard)
            elif role == "param":
                self.reshard_argument(block, first, fn, index, shard.base, shard)
            elif role == "grad":
                source = self.gradient_source(task, index, name)
                self.reshard_argument(block, first, fn, index, source, shard)
        self.retype_body(fn)
        ret = block.last_op
        assert ret is not None
        for index, key in enumerate(result_keys(fn)):
            role, _, name = key.partition(":")
            shard = self.shards.get(_owner(role, name))
            if shard is None:
                continue
            if role == "param" and self.options.stage < 3:
                gather = ReshardOp(ret.operands[index], MESH_SYMBOL, shard.layout, shard.base, shard.whole)
                block.insert_op_before(gather, ret)
                ret.operands[index] = gather.result
            else:
                self.set_result_layout(fn, index, shard.layout)
                Rewriter.replace_value_with_new_type(task.outs[index], ret.operands[index].type)
        fn.update_function_type()

    def choose(self, type_: Attribute, base: ShardingAttr | None) -> _Shard | None:
        """The shard of a parameter of `type_` laid out as `base` (None: replicated): its
        (local) first dimension that the axis size divides, split further over the axis,
        innermost (`[["tp"], []]` becomes `[["tp", "dp"], []]`)."""
        if not isinstance(type_, ValueTensorType):
            return None
        shape = type_.get_shape()
        base = base or ShardingAttr.replicated(len(shape))
        for dim, size in enumerate(shape):
            if size >= self.size and size % self.size == 0:
                local = list(shape)
                local[dim] = size // self.size
                dims = [[*base.dim_axes(d), *([self.options.axis] if d == dim else [])] for d in range(len(shape))]
                return _Shard(base, ShardingAttr(dims, base.partial_axes()),
                              ValueTensorType(local, type_.dtype), type_)
        return None

    def gradient_source(self, task: TaskOp, index: int, name: str) -> ShardingAttr:
        """The layout the update reads gradient `name` in; for zero >= 2, its bucket entry is
        dissolved so the update reads the partial sum (a tied weight keeps its bucket)."""
        shard = self.shards[name]
        value = task.operands[index]
        bucket = value.owner
        if self.options.stage < 2 or not isinstance(bucket, AllReduceBucketOp) or len(bucket.stage_list()) > 1:
            return shard.base
        entry = list(bucket.sums).index(value)
        task.operands[index] = bucket.values[entry]
        _drop_entry(bucket, entry)
        base = shard.base
        return ShardingAttr([base.dim_axes(d) for d in range(base.rank())], [*base.partial_axes(), self.options.axis])

    def reshard_argument(self, block: Block, before: Operation | None, fn: func.FuncOp, index: int,
                         source: ShardingAttr, shard: _Shard) -> None:
        """Reads argument `index` (laid out as `source`) as its shard, at the function's entry."""
        self.local.add(_reshard_at_entry(block, before, fn.args[index], source, shard.layout, shard.local))
        self.set_argument_layout(fn, index, source)

    def retype_body(self, fn: func.FuncOp) -> None:
        """Gives every op that reads a shard the shape its operands now broadcast to."""
        for op in fn.body.block.ops:
            if isinstance(op, ReshardOp | func.ReturnOp) or not any(v in self.local for v in op.operands):
                continue
            if op.name not in ELEMENTWISE:
                raise StrategyError(
                    f"{self.options.directive}: {op.name} in @{fn.sym_name.data} is not elementwise, so the "
                    "update cannot run on a shard; ZeRO supports optimizers whose update is elementwise "
                    "(sgd, adamw)")
            tensors = [v.type.get_shape() for v in op.operands if isinstance(v.type, ValueTensorType)]
            shape = _broadcast(op, tensors, self.options.directive)
            for r in op.results:
                if isinstance(r.type, ValueTensorType):
                    self.local.add(Rewriter.replace_value_with_new_type(r, ValueTensorType(shape, r.type.dtype)))

    # ------------------------------------------------------------ signatures

    def retype_argument(self, fn: func.FuncOp, index: int, shard: _Shard) -> None:
        """Makes argument `index` of `fn` the shard: its local type and its layout."""
        self.local.add(Rewriter.replace_value_with_new_type(fn.args[index], shard.local))
        self.set_argument_layout(fn, index, shard.layout)

    @staticmethod
    def set_argument_layout(fn: func.FuncOp, index: int, layout: ShardingAttr) -> None:
        """Sets the `par.layout` of argument `index` of `fn`."""
        attrs = list(fn.arg_attrs.data)
        attrs[index] = with_layout(attrs[index], fn.args[index].type, layout)
        fn.arg_attrs = ArrayAttr(attrs)

    @staticmethod
    def set_result_layout(fn: func.FuncOp, index: int, layout: ShardingAttr) -> None:
        """Sets the `par.layout` of result `index` of `fn`."""
        attrs = list(fn.res_attrs.data)
        attrs[index] = with_layout(attrs[index], None, layout)
        fn.res_attrs = ArrayAttr(attrs)

    def gather_on_entry(self, task: TaskOp, roles: list[tuple[str, object]]) -> None:
        """ZeRO-3: the forward or backward function reads each sharded parameter as its shard
        and gathers it whole on entry."""
        main = main_function(self.module)
        fn = find_function(self.module, task.callee.root_reference.data)
        block = fn.body.block
        first = block.first_op
        for index, value in enumerate(task.args):
            if not (isinstance(value, BlockArgument) and value.owner is main.body.block):
                continue
            role, name = roles[value.index]
            shard = self.shards.get(str(name)) if role == "param" else None
            if shard is None or layout_of(fn.arg_attrs.data[index]) == shard.layout:
                continue
            _reshard_at_entry(block, first, fn.args[index], shard.layout, shard.base, shard.whole)
            self.retype_argument(fn, index, shard)
        fn.update_function_type()

    # ------------------------------------------------------------ what the backward recomputes

    def recompute_in_backward(self, roles: list[tuple[str, object]]) -> None:
        """ZeRO-3 regathering per microbatch: a forward result that the backward reads and that
        depends on the gathered parameters alone (`t(w)`, a view of `w`) would keep the whole
        parameter alive from forward to backward. The backward recomputes it from its own
        gather instead, and the forward stops returning it."""
        main = main_function(self.module)
        params = {str(name): arg for arg, (role, name) in zip(main.args, roles, strict=True) if role == "param"}
        derived: dict[func.FuncOp, dict[SSAValue, list[tuple[str, SSAValue]]]] = {}
        for btask in [t for t in step_tasks(self.module) if t.pass_kind.data == PassKind.B]:
            self.recompute_task(btask, params, derived)
        for ftask in [t for t in step_tasks(self.module) if t.pass_kind.data == PassKind.F]:
            _drop_unread_results(self.module, ftask)

    def recompute_task(self, btask: TaskOp, params: dict[str, BlockArgument],
                       derived_in: dict[func.FuncOp, dict[SSAValue, list[tuple[str, SSAValue]]]]) -> None:
        """Recomputes in `btask`'s function every parameter-derived forward result it reads
        (`derived_in` keeps `parameter_derived` of each forward function, computed once)."""
        bf = find_function(self.module, btask.callee.root_reference.data)
        operands = list(btask.args)
        attrs = list(bf.arg_attrs.data)
        drop = []
        for index, value in enumerate(btask.args):
            ftask = value.owner
            if not (isinstance(ftask, TaskOp) and ftask.pass_kind.data == PassKind.F):
                continue
            ff = find_function(self.module, ftask.callee.root_reference.data)
            inner = ff.body.block.last_op.operands[value.index]
            if ff not in derived_in:
                derived_in[ff] = self.parameter_derived(ff)
            derived = derived_in[ff]
            if inner not in derived:
                continue
            chain = _ancestors(inner, ff)
            mapping: dict[SSAValue, SSAValue] = {}
            for name, gathered in derived[inner]:
                mapping[gathered] = self.gathered_in(bf, name, params[name], operands, attrs)
            point = _after_gathers(bf)
            for op in chain:
                clone = op.clone(value_mapper=mapping)
                if point is None:
                    bf.body.block.add_op(clone)
                else:
                    bf.body.block.insert_op_before(clone, point)
            bf.args[index].replace_all_uses_with(mapping[inner])
            drop.append(index)
        if not drop:
            return
        for index in reversed(drop):
            bf.body.block.erase_arg(bf.args[index])
            del operands[index], attrs[index]
        bf.arg_attrs = ArrayAttr(attrs)
        bf.update_function_type()
        new = TaskOp(btask.callee.root_reference.data, btask.stage.value.data, btask.pass_kind.data, operands,
                     list(btask.outs.types))
        Rewriter.replace_op(btask, new)

    def parameter_derived(self, fn: func.FuncOp) -> dict[SSAValue, list[tuple[str, SSAValue]]]:
        """The values of `fn` computed from its gathered parameters (and constants) alone, each
        with the gathers `(parameter name, gathered value)` it depends on."""
        keys = arg_keys(fn)
        derived: dict[SSAValue, list[tuple[str, SSAValue]]] = {}
        for op in fn.body.block.ops:
            if isinstance(op, ReshardOp) and isinstance(op.input, BlockArgument) and op.input.owner is fn.body.block:
                name = keys[op.input.index].removeprefix("param:")
                if name in self.shards and op.target == self.shards[name].base:
                    derived[op.result] = [(name, op.result)]
                continue
            if op.regions or isinstance(op, func.ReturnOp) or not op.results:
                continue
            sources: list[tuple[str, SSAValue]] = []
            for v in op.operands:
                if v in derived:
                    sources += [s for s in derived[v] if s not in sources]
                elif isinstance(v, BlockArgument) or any(isinstance(w.type, ValueTensorType) for w in v.owner.operands):
                    break  # reads an argument or a computed value that is not parameter-derived
            else:
                for r in op.results:
                    derived[r] = sources
        return {v: src for v, src in derived.items() if src}

    def gathered_in(self, fn: func.FuncOp, name: str, param: BlockArgument, operands: list[SSAValue],
                    attrs: list[DictionaryAttr]) -> SSAValue:
        """`fn`'s whole copy of parameter `name`: its gather, added (with the shard as a new
        argument) when `fn` does not read the parameter yet."""
        shard = self.shards[name]
        for op in fn.body.block.ops:
            if not isinstance(op, ReshardOp):
                break
            arg = op.input
            if isinstance(arg, BlockArgument) and operands[arg.index] is param:
                return op.result
        arg = fn.body.block.insert_arg(shard.local, len(fn.args))
        operands.append(param)
        attrs.append(DictionaryAttr({KEY: StringAttr(f"param:{name}"), LAYOUT: shard.layout}))
        block = fn.body.block
        return _reshard_at_entry(block, block.first_op, arg, shard.layout, shard.base, shard.whole)

    def gather_once(self, main: func.FuncOp, roles: list[tuple[str, object]]) -> None:
        """ZeRO-3 without resharding after forward: one gather of each sharded parameter per
        step, in `@main` before the first forward or backward task that reads it."""
        order = {op: i for i, op in enumerate(main.body.block.ops)}
        for arg, (role, name) in zip(main.args, roles, strict=True):
            shard = self.shards.get(str(name)) if role == "param" else None
            if shard is None:
                continue
            by_stage: dict[int, list[TaskOp]] = {}
            for use in arg.uses:  # a weight tied across stages is gathered on each of its stages
                task = use.operation
                if isinstance(task, TaskOp) and task.pass_kind.data in (PassKind.F, PassKind.B):
                    by_stage.setdefault(task.stage.value.data, []).append(task)
            for tasks in by_stage.values():
                gather = ReshardOp(arg, MESH_SYMBOL, shard.layout, shard.base, shard.whole)
                gather.result.name_hint = f"{arg.name_hint}_whole" if arg.name_hint else None
                main.body.block.insert_op_before(gather, min(tasks, key=order.__getitem__))
                arg.replace_uses_with_if(gather.result, lambda use, ts=tasks: use.operation in ts)


def _reshard_at_entry(block: Block, before: Operation | None, arg: BlockArgument, source: ShardingAttr,
                      target: ShardingAttr, result_type: ValueTensorType) -> SSAValue:
    """Reshards function argument `arg` from `source` to `target` before `before` (appended when
    None), and makes every other use of `arg` read the result, which it returns."""
    reshard = ReshardOp(arg, MESH_SYMBOL, source, target, result_type)
    if before is None:
        block.add_op(reshard)
    else:
        block.insert_op_before(reshard, before)
    arg.replace_uses_with_if(reshard.result, lambda use: use.operation is not reshard)
    return reshard.result


def _ancestors(value: SSAValue, fn: func.FuncOp) -> list[Operation]:
    """The ops of `fn` that `value` is computed from (not its gathers), in program order."""
    needed: set[Operation] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        op = v.owner
        if isinstance(op, Operation) and not isinstance(op, ReshardOp) and op not in needed:
            needed.add(op)
            stack.extend(op.operands)
    return [op for op in fn.body.block.ops if op in needed]


def _after_gathers(fn: func.FuncOp) -> Operation | None:
    """The first op of `fn` after the gathers at its entry."""
    for op in fn.body.block.ops:
        if not isinstance(op, ReshardOp):
            return op
    return None


def _drop_unread_results(module: ModuleOp, task: TaskOp) -> None:
    """Removes the results of `task` (and of its function) that nothing reads any more."""
    keep = [i for i, r in enumerate(task.outs) if r.uses]
    if len(keep) == len(task.outs):
        return
    fn = find_function(module, task.callee.root_reference.data)
    ret = fn.body.block.last_op
    assert isinstance(ret, func.ReturnOp)
    new_ret = func.ReturnOp(*[ret.operands[i] for i in keep])
    Rewriter.replace_op(ret, new_ret)
    fn.res_attrs = ArrayAttr([fn.res_attrs.data[i] for i in keep])
    fn.update_function_type()
    new = TaskOp(task.callee.root_reference.data, task.stage.value.data, task.pass_kind.data, list(task.args),
                 [task.outs[i].type for i in keep])
    for i, r in zip(keep, new.outs, strict=True):
        r.name_hint = task.outs[i].name_hint
        task.outs[i].replace_all_uses_with(r)
    Rewriter.replace_op(task, new, new_results=[None] * len(task.outs))


def _owner(role: str, name: object) -> str:
    """The parameter a step value belongs to: `w` for param/grad `w` and state `w.exp_avg`."""
    name = str(name)
    return name.rsplit(".", 1)[0] if role == "state" else name


def _broadcast(op: Operation, shapes: list[tuple[int, ...]], directive: str) -> tuple[int, ...]:
    """The broadcast of `shapes` (numpy rules), or an error naming `op`."""
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for i, size in enumerate(shape, start=rank - len(shape)):
            if size != 1 and out[i] not in (1, size):
                raise StrategyError(f"{directive}: {op.name} mixes shapes {shapes} that do not broadcast")
            if size != 1:
                out[i] = size
    return tuple(out)


def _drop_entry(bucket: AllReduceBucketOp, entry: int) -> None:
    """Removes entry `entry` of a gradient bucket (erasing the bucket when it empties)."""
    keep = [i for i in range(len(bucket.values)) if i != entry]
    if keep:
        new = AllReduceBucketOp(bucket.bucket.value.data, bucket.stage.value.data,
                                [bucket.values[i] for i in keep], bucket.mesh.root_reference.data,
                                bucket.axis_names(), bucket.stage_list())
        Rewriter.insert_op(new, InsertPoint.before(bucket))
        for i, result in zip(keep, new.sums, strict=True):
            bucket.sums[i].replace_all_uses_with(result)
    bucket.detach()
    bucket.erase()

