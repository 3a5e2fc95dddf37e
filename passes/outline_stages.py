"""outline-stages: turns the staged `@main` into one F and one B function per stage.

    func.func @s0_F(%p: T {piperc.key = "param:embed.weight"}, %x: T {piperc.key = "input:0"})
        -> (T {piperc.key = "v3"}, ...)
    func.func @s0_B(%g: T {piperc.key = "v41"}, ...) -> (T {piperc.key = "grad:embed.weight"}, ...)

Every value that crosses functions gets a key, on the producer's result and
on each consumer's argument, so later passes see the data flow between stages
and passes explicitly: activations (F of stage s to F of a later stage),
values saved for backward (F to B of any stage: a stage's backward reads the
activation it received) and gradients (B of stage s to B of an earlier stage). Constants are re-created in each function that
uses them.

With `split-backward` (the default) each stage's backward is cut into one
function per block, in the order the backward runs them (`@s1_B0`, `@s1_B1`,
...): the gradients of a block are final as soon as its chunk has run, so
they can be reduced while the chunks of earlier blocks still compute.

A parameter used by several stages (tied weights) has its gradient summed by
an `add` whose operands come from different stages; that add is dropped and
each stage returns its own partial gradient under the same `grad:` key (the
partials are summed across the stages that hold the parameter when gradients
are reduced). Requires: pipeline-split has run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, IntegerAttr, ModuleOp, StringAttr
from xdsl.ir import Block, BlockArgument, Operation, Region, SSAValue
from xdsl.passes import ModulePass
from xdsl.traits import ConstantLike, IsTerminator

from piperc.dialects.par import OriginAttr, PassKind, PassKindAttr
from piperc.dialects.roles import ORIGIN, argument_roles, main_function, result_roles
from piperc.errors import StrategyError
from piperc.passes.pipeline_split import NUM_STAGES, STAGE, module_count, stage_of, unit_of

KEY = "piperc.key"
"""The attribute naming a function argument or result in the step's data flow."""

PASS = "par.pass"


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


CHUNK = "par.chunk"
"""On a backward function: its position among the stage's backward chunks."""


def function_name(stage: int, kind: PassKind, chunk: int | None = None) -> str:
    """`s1_F`, `s0_B`, `s0_B2`, `s2_update`: the function of one stage, pass and chunk."""
    return f"s{stage}_{kind.value}" + ("" if chunk is None else str(chunk))


def stage_functions(module: ModuleOp, stage: int, kind: PassKind) -> list[func.FuncOp]:
    """The functions of one stage and pass, in execution order (backward chunks in order)."""
    found = []
    for op in module.ops:
        if not isinstance(op, func.FuncOp):
            continue
        s, k = op.attributes.get(STAGE), op.attributes.get(PASS)
        if s is not None and k is not None and s.value.data == stage and k.data == kind:
            chunk = op.attributes.get(CHUNK)
            found.append((chunk.value.data if chunk is not None else 0, op))
    return [f for _, f in sorted(found, key=lambda item: item[0])]


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

    Options: split-backward (one backward function per block), directive
    (quoted in errors). Requires: `par.stage` on every op.
    """

    name = "outline-stages"

    split_backward: bool = True
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

        groups: dict[tuple[int, PassKind, int], list[Operation]] = defaultdict(list)
        chunk = {s: (0, None) for s in range(num_stages)}  # stage -> (chunk, its block)
        for o in block.ops:
            if o is ret or o.has_trait(ConstantLike) or o in dropped:
                continue
            stage, kind = stage_of(o), _pass_of(o)
            index = 0
            if kind == PassKind.B and self.split_backward:
                index, current = chunk[stage]
                origin = o.attributes.get(ORIGIN)
                block_path = unit_of(origin.path) if isinstance(origin, OriginAttr) else None
                if block_path is not None and block_path != current:
                    index = index + 1 if current is not None else index
                    chunk[stage] = (index, block_path)
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

        new_funcs = []
        for stage in range(num_stages):
            new_funcs.append(self._outline(function_name(stage, PassKind.F), (stage, PassKind.F, 0),
                                           groups, inputs, outputs))
            chunks = sorted(c for s_, k, c in groups if s_ == stage and k == PassKind.B) or [0]
            for c in chunks:
                name = function_name(stage, PassKind.B, c if len(chunks) > 1 else None)
                fn = self._outline(name, (stage, PassKind.B, c), groups, inputs, outputs)
                fn.attributes[CHUNK] = IntegerAttr(c, 64)
                new_funcs.append(fn)
        main.detach()
        main.erase()
        for f in new_funcs:
            op.body.block.add_op(f)

    def _check_flow(self, src, dst, consumer: Operation, producer: Operation) -> None:
        (s1, k1, c1), (s2, k2, c2) = src, dst
        # Forward values may feed any later forward and any backward (saved
        # activations are sent at the forward and received at the backward).
        ok = (
            (k1 == PassKind.F and k2 == PassKind.F and s2 > s1)
            or (k1 == PassKind.F and k2 == PassKind.B)
            or (k1 == PassKind.B and k2 == PassKind.B and (s2 < s1 or (s2 == s1 and c2 > c1)))
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
        stage, kind, _ = group
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
            arg_attrs=ArrayAttr(DictionaryAttr({KEY: StringAttr(k)}) for k in inputs),
            res_attrs=ArrayAttr(DictionaryAttr({KEY: StringAttr(k)}) for k, _ in outputs),
        )
        fn.attributes[STAGE] = IntegerAttr(stage, 64)
        fn.attributes[PASS] = PassKindAttr(kind)
        return fn
