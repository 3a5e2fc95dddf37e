"""outline-stages: cuts the captured step into stage functions; `@main` becomes a graph of tasks.

    func.func @s0_F(%p: T {piperc.key = "param:embed.weight", par.layout = #par.sharding<[[], []]>},
                    %x: T {piperc.key = "input:0", ...}) -> (T {piperc.key = "v3", ...}, ...)
    func.func @main(%p: T {piperc.param = "embed.weight", ...}, %x: T {piperc.input = 0, ...}, ...) {
      %h:2 = par.task @s0_F stage 0 pass F (%p, %x) : (T, T) -> (T, T)
      %y = par.task @s1_F stage 1 pass F (%h#0, ...) : ...
      %g:2 = par.task @s1_B stage 1 pass B (%h#1, ...) : ...
      ...
      func.return %loss, %grad_0, ... : ...
    }

Each stage gets one forward function and its backward, and `@main` runs them
as `par.task`s whose operands and results carry the data flow between stages
and passes as SSA values: activations (F of stage s to F of a later stage),
values saved for backward (F to B of any stage) and gradients (B of stage s to
B of an earlier stage). Every argument and result carries the layout its value
has in `@main` (`par.layout`/`par.layouts`, as tensor parallelism writes them;
replicated where none is written) and a `piperc.key`, which is only a readable
name. Constants are re-created in each function that uses them.

With `split-backward` (the default) each stage's backward is cut into one
function per block, in the order the backward runs them, named after the
block (`@s1_B_blocks_3`, `@s1_B_blocks_2`): the gradients of a block are final
as soon as its chunk has run, so they can be reduced while the chunks of
earlier blocks still compute.

A parameter used by several stages (tied weights) has its gradient summed by
an `add` whose operands come from different stages; that add is dropped and
the step returns each stage's partial gradient (both under the parameter's
`piperc.grad`); the optimizer sums them over the stages that hold the
parameter. Requires: pipeline-split has run.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp, StringAttr
from xdsl.ir import Block, BlockArgument, Operation, Region, SSAValue
from xdsl.passes import ModulePass
from xdsl.traits import ConstantLike, IsTerminator

from piperc.dialects.par import (
    LAYOUT,
    AccumulateOp,
    OriginAttr,
    PassKind,
    ShardingAttr,
    TaskOp,
    layout_of,
)
from piperc.dialects.roles import ORIGIN, argument_roles, main_function, result_roles
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.pipeline_split import NUM_STAGES, module_count, stage_of, unit_of
from piperc.passes.propagate_sharding import value_layout

KEY = "piperc.key"
"""The attribute giving a function argument or result a readable name (`param:w`, `v3`)."""


def key_of(attrs: DictionaryAttr) -> str:
    """The `piperc.key` of an argument or result attribute dictionary."""
    value = attrs.data.get(KEY)
    if not isinstance(value, StringAttr):
        raise StrategyError(f"missing {KEY} in {attrs}")
    return value.data


def arg_keys(fn: func.FuncOp) -> list[str]:
    """The keys of a stage function's arguments, in order."""
    return [key_of(a) for a in fn.arg_attrs.data] if fn.arg_attrs else []


def result_keys(fn: func.FuncOp) -> list[str]:
    """The keys of a stage function's results, in order."""
    return [key_of(a) for a in fn.res_attrs.data] if fn.res_attrs else []


def function_name(stage: int, kind: PassKind, chunk: str | None = None) -> str:
    """`s1_F`, `s0_B`, `s0_B_blocks_2`, `s2_update`: the function of one stage, pass and
    backward chunk (named after the block whose backward it runs)."""
    return f"s{stage}_{kind.value}" + ("" if chunk is None else f"_{chunk}")


def step_tasks(module: ModuleOp) -> list[TaskOp]:
    """The `par.task` ops of the step `@main`, in the order the step runs them."""
    return [o for o in main_function(module).body.block.ops if isinstance(o, TaskOp)]


def stage_functions(module: ModuleOp, stage: int, kind: PassKind) -> list[func.FuncOp]:
    """The functions the step runs for one stage and pass, in order (backward chunks in order)."""
    names = [t.callee.root_reference.data for t in step_tasks(module)
             if t.stage.value.data == stage and t.pass_kind.data == kind]
    return [find_function(module, n) for n in dict.fromkeys(names)]


def with_layout(attrs: DictionaryAttr, type_, layout: ShardingAttr | None = None) -> DictionaryAttr:
    """`attrs` with `par.layout` set: `layout`, or replicated over the mesh."""
    if layout is None:
        layout = ShardingAttr.replicated(len(type_.get_shape()) if isinstance(type_, ValueTensorType) else 0)
    return DictionaryAttr({**attrs.data, LAYOUT: layout})


def named(key: str, type_, layout: ShardingAttr | None = None) -> DictionaryAttr:
    """The attributes of a function argument or result: its readable name and its layout."""
    return with_layout(DictionaryAttr({KEY: StringAttr(key)}), type_, layout)


def step_result_layouts(module: ModuleOp) -> None:
    """Gives each result of the step `@main` the layout its producer's function declares
    (a pass that changes function layouts calls it to keep the step's results in line)."""
    main = main_function(module)
    attrs = []
    for a, v in zip(main.res_attrs.data, main.body.block.last_op.operands, strict=True):
        owner = v.owner
        if isinstance(owner, TaskOp | AccumulateOp):
            fn = find_function(module, owner.callee.root_reference.data)
            a = DictionaryAttr({**a.data, LAYOUT: fn.res_attrs.data[v.index].data[LAYOUT]})
        attrs.append(a)
    main.res_attrs = ArrayAttr(attrs)


def find_function(module: ModuleOp, name: str) -> func.FuncOp:
    """The `func.func` named `name` in `module`."""
    for op in module.ops:
        if isinstance(op, func.FuncOp) and op.sym_name.data == name:
            return op
    raise StrategyError(f"the module has no function @{name}")


def _pass_of(op: Operation) -> PassKind:
    origin = op.attributes.get(ORIGIN)
    return origin.pass_kind if isinstance(origin, OriginAttr) else PassKind.F


@dataclass(frozen=True)
class OutlineStagesPass(ModulePass):
    """Outlines `@main` into `@s<i>_F` and `@s<i>_B[<chunk>]` per stage with keyed arguments/results.

    Options: split-backward (one backward function per block), split-weights (each
    stage's weight gradients in `@s<i>_W`, apart from the input gradients of
    `@s<i>_B`, for schedules that run W actions: zero bubble), directive (quoted in
    errors). Requires: `par.stage` on every op.
    """

    name = "outline-stages"

    split_backward: bool = True
    split_weights: bool = False
    directive: str = "outline-stages"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        main = main_function(op)
        num_stages = module_count(op, NUM_STAGES, self.directive, "pipeline-split")
        block = main.body.block

        arg_key: dict[SSAValue, str] = {}
        for (role, key), arg in zip(argument_roles(main), block.args, strict=True):
            arg_key[arg] = f"{role}:{key}"

        ret = block.last_op
        assert ret is not None and ret.has_trait(IsTerminator)
        wanted: dict[str, SSAValue] = {}
        for (role, key), v in zip(result_roles(main), ret.operands, strict=True):
            wanted["loss" if role == "loss" else f"{role}:{key}"] = v

        partial_grads, dropped = self._split_tied_sums(wanted)

        weights = self._weight_gradient_ops(block, ret, wanted, dropped) if self.split_weights else set()
        groups: dict[tuple[int, PassKind, int], list[Operation]] = defaultdict(list)
        chunk = {s: (0, None) for s in range(num_stages)}  # stage -> (chunk, its block)
        chunk_paths: dict[tuple[int, int], str | None] = {}
        first_op_index: dict[tuple[int, PassKind, int], int] = {}
        for position, o in enumerate(block.ops):
            if o is ret or o.has_trait(ConstantLike) or o in dropped:
                continue
            stage, kind = stage_of(o), _pass_of(o)
            if o in weights:
                kind = PassKind.W
            index = 0
            if kind == PassKind.B and self.split_backward:
                index, current = chunk[stage]
                origin = o.attributes.get(ORIGIN)
                block_path = unit_of(origin.path) if isinstance(origin, OriginAttr) else None
                if block_path is not None and block_path != current:
                    index = index + 1 if current is not None else index
                    chunk[stage] = (index, block_path)
                if chunk_paths.get((stage, index)) is None:
                    chunk_paths[(stage, index)] = block_path
            first_op_index.setdefault((stage, kind, index), position)
            if kind == PassKind.W:  # after every op of the B pass it reads: at its last op
                first_op_index[(stage, kind, index)] = position
            groups[(stage, kind, index)].append(o)
        group_of = {o: g for g, ops in groups.items() for o in ops}

        value_key: dict[SSAValue, str] = {}
        outputs: dict[tuple[int, PassKind, int], list[tuple[str, SSAValue]]] = defaultdict(list)

        def cross_key(v: SSAValue) -> str:
            if v not in value_key:
                value_key[v] = f"v{len(value_key)}"
            return value_key[v]

        # Which values each function needs from elsewhere.
        inputs: dict[tuple[int, PassKind, int], dict[str, SSAValue]] = defaultdict(dict)
        exported: set[SSAValue] = set()
        for g, ops in groups.items():
            for o in ops:
                for v in o.operands:
                    if isinstance(v, BlockArgument):
                        inputs[g][arg_key[v]] = v
                        continue
                    producer = v.owner
                    if producer.has_trait(ConstantLike) or group_of[producer] == g:
                        continue
                    self._check_flow(group_of[producer], g, o, producer)
                    k = cross_key(v)
                    inputs[g][k] = v
                    if v not in exported:
                        exported.add(v)
                        outputs[group_of[producer]].append((k, v))
        for k, v in wanted.items():
            if k.startswith("grad:") and k in partial_grads:
                for part in partial_grads[k]:
                    outputs[group_of[part.owner]].append((k, part))
                continue
            if isinstance(v, BlockArgument) or v.owner.has_trait(ConstantLike):
                raise StrategyError(
                    f"{self.directive}: result '{k}' of the step is not computed by any stage"
                )
            outputs[group_of[v.owner]].append((k, v))

        order = sorted(groups, key=lambda g: first_op_index[g])
        names = self._function_names(order, chunk_paths)
        new_funcs = [self._outline(names[g], g, groups, inputs, outputs) for g in order]
        for fn in new_funcs:
            op.body.block.insert_op_before(fn, main)
        self._rewrite_step(main, order, names, new_funcs, inputs, outputs, wanted, partial_grads)

    def _function_names(self, order, chunk_paths) -> dict:
        """F and B function names; a stage's backward chunks are named after their blocks."""
        names = {}
        for stage, kind, index in order:
            chunks = [c for s_, k, c in order if s_ == stage and k == kind]
            if kind != PassKind.B or len(chunks) == 1:
                names[(stage, kind, index)] = function_name(stage, kind)
                continue
            path = chunk_paths.get((stage, index))
            same = [c for c in chunks if chunk_paths.get((stage, c)) == path]
            label = re.sub(r"\W", "_", path) if path and len(same) == 1 else f"chunk{index}"
            names[(stage, kind, index)] = function_name(stage, kind, label)
        return names

    def _rewrite_step(self, main, order, names, functions, inputs, outputs, wanted, partial_grads) -> None:
        """Makes `@main` the step as a graph of tasks: one `par.task` per function, data flow as SSA."""
        block = main.body.block
        produced: dict[SSAValue, SSAValue] = {}
        new_ops: list[Operation] = []
        for group, fn in zip(order, functions, strict=True):
            stage, kind, _ = group
            args = [v if isinstance(v, BlockArgument) else produced[v] for v in inputs.get(group, {}).values()]
            task = TaskOp(names[group], stage, kind, args, list(fn.function_type.outputs.data))
            new_ops.append(task)
            for (_, v), r in zip(outputs.get(group, []), task.outs, strict=True):
                produced.setdefault(v, r)
                if isinstance(r.type, ValueTensorType):
                    r.name_hint = v.name_hint
        results, res_attrs = [], []
        for attrs, (key, v) in zip(main.res_attrs.data, wanted.items(), strict=True):
            for part in partial_grads.get(key, [v]):
                results.append(part if isinstance(part, BlockArgument) else produced[part])
                res_attrs.append(attrs)
        for o in reversed(list(block.ops)):
            o.detach()
            o.erase(safe_erase=False)
        for o in new_ops:
            block.add_op(o)
        block.add_op(func.ReturnOp(*results))
        main.function_type = func.FunctionType.from_lists(list(main.function_type.inputs.data),
                                                         [r.type for r in results])
        main.res_attrs = ArrayAttr(with_layout(a, r.type, layout_of(a)) for a, r in zip(res_attrs, results, strict=True))
        main.arg_attrs = ArrayAttr(with_layout(a, t, layout_of(a)) for a, t in zip(main.arg_attrs.data,
                                                                                   main.function_type.inputs.data,
                                                                                   strict=True))

    def _weight_gradient_ops(self, block: Block, ret: Operation, wanted: dict[str, SSAValue],
                             dropped: set[Operation]) -> set[Operation]:
        """The backward ops that only compute weight gradients (the W pass): those whose results
        reach nothing but the step's `grad:` results and other such ops of their stage, and
        read nothing from another stage (the gradient a later stage sends arrives at B). The
        rest of the backward (B) computes the input gradients the earlier stages need."""
        grads = {v for k, v in wanted.items() if k.startswith("grad:")}
        for o in dropped:  # a tied weight's sum over stages: each part is a gradient result
            grads.update(o.operands)
        weights: set[Operation] = set()
        for o in reversed(list(block.ops)):
            if o is ret or o in dropped or o.has_trait(ConstantLike) or _pass_of(o) != PassKind.B:
                continue
            uses = [u for r in o.results for u in r.uses]
            # what comes from another stage (its input gradient) arrives at the B pass
            local = all(isinstance(v, BlockArgument) or v.owner.has_trait(ConstantLike)
                        or stage_of(v.owner) == stage_of(o) for v in o.operands)
            if uses and local and all(
                (u.operation is ret and u.operation.operands[u.index] in grads)
                or u.operation in dropped
                or (u.operation in weights and stage_of(u.operation) == stage_of(o))
                for u in uses
            ):
                weights.add(o)
        return weights

    def _check_flow(self, src, dst, consumer: Operation, producer: Operation) -> None:
        (s1, k1, c1), (s2, k2, c2) = src, dst
        # Forward values may feed any later forward and any backward (saved
        # activations are sent at the forward and received at the backward); a stage's
        # weight gradients (W) read its forward's and its input-gradient backward's values.
        ok = (
            (k1 == PassKind.F and k2 == PassKind.F and s2 > s1)
            or (k1 == PassKind.F and k2 in (PassKind.B, PassKind.W))
            or (k1 == PassKind.B and k2 == PassKind.B and (s2 < s1 or (s2 == s1 and c2 > c1)))
            or (k1 == PassKind.B and k2 == PassKind.W and s2 == s1)
        )
        if ok:
            return
        where = consumer.attributes.get(ORIGIN)
        path = f" in '{where.path}'" if isinstance(where, OriginAttr) and where.path else ""
        raise StrategyError(
            f"{self.directive}: {consumer.name}{path} ({k2.value} of stage {s2}) reads the result "
            f"of {producer.name} ({k1.value} of stage {s1}); a pipeline only passes activations "
            "to later stages and gradients to earlier ones. Move the split point so that both "
            "ops fall in one stage."
        )

    def _split_tied_sums(self, wanted: dict[str, SSAValue]):
        """Finds gradient sums over stages (tied weights): add(a from stage i, b from stage j)."""
        partial: dict[str, list[SSAValue]] = {}
        dropped: set[Operation] = set()
        for k, v in wanted.items():
            if not k.startswith("grad:") or isinstance(v, BlockArgument):
                continue
            producer = v.owner
            if producer.name != "torch.aten.add.Tensor":
                continue
            a, b = producer.operands[0], producer.operands[1]
            if isinstance(a, BlockArgument) or isinstance(b, BlockArgument):
                continue
            if stage_of(a.owner) == stage_of(b.owner):
                continue
            partial[k] = [a, b]
            dropped.add(producer)
        return partial, dropped

    def _outline(self, name, group, groups, all_inputs, all_outputs) -> func.FuncOp:
        ops, inputs, outputs = groups.get(group, []), all_inputs.get(group, {}), all_outputs.get(group, [])
        arg_types = [v.type for v in inputs.values()]
        body = Block(arg_types=arg_types)
        mapping: dict[SSAValue, SSAValue] = dict(zip(inputs.values(), body.args, strict=True))
        for o in ops:
            for v in o.operands:
                if v not in mapping and not isinstance(v, BlockArgument) and v.owner.has_trait(ConstantLike):
                    c = v.owner.clone()
                    body.add_op(c)
                    mapping[v] = c.results[0]
            clone = o.clone(value_mapper=mapping)
            body.add_op(clone)
            for old, new in zip(o.results, clone.results, strict=True):
                mapping[old] = new
        body.add_op(func.ReturnOp(*[mapping[v] for _, v in outputs]))
        fn = func.FuncOp(
            name,
            (arg_types, [v.type for _, v in outputs]),
            Region(body),
            arg_attrs=ArrayAttr(named(k, v.type, value_layout(v)) for k, v in inputs.items()),
            res_attrs=ArrayAttr(named(k, v.type, value_layout(v)) for k, v in outputs),
        )
        return fn
