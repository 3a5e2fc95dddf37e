"""propagate-sharding: gives every tensor value of `@main` a layout, from a few seeded ones.

Seeds are the `par.layout` attributes of `@main`'s arguments (an argument without one is
replicated), the `par.layout` of its results (a gradient result without one takes the
layout of its parameter, as DTensor gradients do), and any `par.reshard` /
`par.layout_cast` already in `@main`. From them the pass propagates through the per-op
rules of `sharding_rules.py`, forward (each op's layout from its operands') and backward
(an op whose results' users all want one layout is asked for it), to a fixpoint.

For one op, the candidate layouts are its factor shardings as each operand and each
wanted result layout implies them, all of them merged, and none at all; a candidate is
made consistent (a need-replication factor takes no axis; a dimension whose major factor
is not fully split takes none on its minor ones, as a block layout cannot say that), and
the cheapest one is chosen. Conflict policy:

  * user-seeded layouts win: arguments keep theirs, and a result with a seeded layout is
    cast to it at the return;
  * otherwise the candidate that moves the fewest bytes (`reshard_bytes`, per device,
    over its operands and the results wanted of it);
  * ties go to the candidate that gives the most results their preferred layout (below),
    then to fewer layout changes, then to fewer elements computed per device, then to
    the first candidate in the order above (merged, operand 0, 1, ..., wanted results,
    preferred results, replicated): deterministic.

Preferred layouts are soft seeds: an argument's `par.prefer` (written by
`tensor-parallel{sequence-parallel=true}` on the model's inputs) is carried forward, before
propagation, through the rules to every value computed from the argument along the factors
it splits (a dimension that merges such a factor with an unsplit major one, as a flattened
[batch*seq] does, carries none); each such layout is one more candidate of its op and wins
ties on bytes. Without any `par.prefer` the pass chooses exactly as it would without them.

Pending sums (Partial) pass through an op only where its rule says it is linear in the
operands holding them (add: all of them; mm: one); otherwise they are reduced first.

Output, on global types (shape localisation is a later pass):
  * every op with tensor results gets `par.layouts = [#par.sharding<...>, ...]`, one per
    result; `@main`'s arguments and results get `par.layout`;
  * where an operand's layout is not the one the op's rule chose, a
    `par.layout_cast %v @mesh from L1 to L2 because "<op, rule>" : T` is inserted: a
    reshard whose operand and result have the same global type. It is its own op rather
    than a `par.reshard` (whose types are per-device shapes) so that no pass can mistake
    one for the other; shape localisation turns each into a `par.reshard`.
  * An op with no rule is computed replicated: its operands are cast to replicated and
    its results are replicated; `sharding_report` lists it. With `strict=true` it is a
    StrategyError naming the op, where it is in the model and the missing rule.

`sharding_report(module)` lists, from the IR, each layout cast (value, from -> to, bytes
moved per device, why) and each op computed replicated for want of a rule.

Options: `mesh-axes` (the mesh axes layouts may use; default all of `@mesh`'s),
`strict` (default false). Requires: `par.mesh @mesh` (the mesh pass) and a captured
`@main` that has not been split into stages.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp, StringAttr
from xdsl.ir import Attribute, Operation, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects.par import (
    LAYOUT,
    LayoutCastOp,
    MeshAttr,
    OriginAttr,
    ReshardOp,
    ShardingAttr,
    layout_of,
    value_name,
)
from piperc.dialects.roles import ORIGIN, RES_GRAD, main_function, parameter_names
from piperc.dialects.torch import (
    DTYPE_BYTES,
    AtenOp,
    ListConstructOp,
    ListUnpackOp,
    ValueTensorType,
)
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL, find_mesh
from piperc.passes.sharding_rules import (
    FactorKind,
    OpShardingRule,
    sharding_rule,
    tensor_operand_uses,
    tensor_operands,
    tensor_results,
)

LAYOUTS = "par.layouts"
"""The op attribute that holds the layout of each of its results."""

PREFERRED = "par.prefer"
"""The argument attribute of `@main` that names a layout preferred, not required: the values
computed from the argument along the factors the layout splits are given that split
wherever it costs no more bytes than any other choice (sequence parallelism)."""

_ROUNDS = 16
"""Forward + backward sweeps at most; the examples reach the fixpoint in two or three."""

def element_bytes(type_: ValueTensorType) -> int:
    """Bytes per element of a tensor type (4 when the dtype is not known)."""
    return _dtype_bytes(type_.dtype)


@functools.cache
def _dtype_bytes(dtype: Attribute) -> int:
    return DTYPE_BYTES.get(str(dtype), 4)


def reshard_bytes(source: ShardingAttr, target: ShardingAttr, type_: ValueTensorType, mesh: MeshAttr) -> float:
    """Bytes each device receives to change a global tensor of `type_` from `source` to
    `target`, step by step as lower-reshard does it: an all_gather of a local piece of b
    bytes over n devices receives b*(n-1), an all_to_all b*(n-1)/n, an all_reduce
    2*b*(n-1)/n, a reduce_scatter b*(n-1)/n, a local slice nothing. Infinite when the
    target holds a pending sum the source does not (no reshard makes one)."""
    if source == target:
        return 0.0
    if any(a not in source.partial_axes() for a in target.partial_axes()):
        return math.inf
    dims = [list(source.dim_axes(d)) for d in range(source.rank())]
    goal = [list(target.dim_axes(d)) for d in range(target.rank())]
    local = math.prod(max(s, 1) for s in type_.get_shape()) * element_bytes(type_)
    local /= math.prod(mesh.axis_size(a) for axes in dims for a in axes)
    moved = 0.0

    def next_home(axis: str) -> int | None:
        for d, axes in enumerate(goal):
            if dims[d] == axes[: len(dims[d])] and axes[len(dims[d]): len(dims[d]) + 1] == [axis]:
                return d
        return None

    for d in range(len(dims)):
        while dims[d] != goal[d][: len(dims[d])]:
            axis = dims[d].pop()
            n = mesh.axis_size(axis)
            home = next_home(axis)
            if home is None:
                moved += local * (n - 1)
                local *= n
            else:
                moved += local * (n - 1) / n
                dims[home].append(axis)
    for axis in [a for a in source.partial_axes() if a not in target.partial_axes()]:
        n = mesh.axis_size(axis)
        home = next_home(axis)
        if home is None:
            moved += 2 * local * (n - 1) / n
        else:
            moved += local * (n - 1) / n
            local /= n
            dims[home].append(axis)
    return moved


def _layout(dims, partial, mesh: MeshAttr) -> ShardingAttr:
    """A ShardingAttr with its pending-sum axes in mesh order (so equal layouts compare equal)."""
    return _sharding(tuple(map(tuple, dims)), tuple(a for a in mesh.axis_names() if a in partial))


@functools.cache
def _sharding(dims: tuple[tuple[str, ...], ...], partial: tuple[str, ...]) -> ShardingAttr:
    """Made once per layout: building and verifying an attribute costs more than choosing it."""
    return ShardingAttr(dims, partial)


def _replicated(value: SSAValue) -> ShardingAttr:
    assert isinstance(value.type, ValueTensorType)
    return ShardingAttr.replicated(len(value.type.get_shape()))


def value_layout(value: SSAValue) -> ShardingAttr:
    """The layout of a tensor value as the IR writes it: a function argument's `par.layout`,
    a result's entry of its op's `par.layouts`, a reshard's or layout cast's target;
    replicated where none is written (and for values that are not tensors, as rank 0)."""
    if not isinstance(value.type, ValueTensorType):
        return ShardingAttr.replicated(0)
    owner = value.owner
    if isinstance(owner, ReshardOp | LayoutCastOp):
        return owner.target
    if isinstance(owner, Operation):
        layouts = owner.attributes.get(LAYOUTS)
        if isinstance(layouts, ArrayAttr):
            index = [r for r in owner.results if isinstance(r.type, ValueTensorType)].index(value)
            return layouts.data[index]
        return _replicated(value)
    fn = owner.parent_op()
    if isinstance(fn, func.FuncOp) and fn.arg_attrs is not None:
        return layout_of(fn.arg_attrs.data[value.index]) or _replicated(value)
    return _replicated(value)


def where(op: Operation) -> str:
    """`torch.aten.mm in 'blocks.0.attn.proj' (F)`, for messages and reasons."""
    origin = op.attributes.get(ORIGIN)
    if not isinstance(origin, OriginAttr):
        return op.name
    return f"{op.name} in '{origin.path}' ({origin.pass_kind.value})"


# ---------------------------------------------------------------- one op


@dataclass
class _Choice:
    """The layouts an op reads its tensor operands in and gives its tensor results."""

    operands: list[ShardingAttr]
    results: list[ShardingAttr]
    family: str | None
    """The rule family; None when the op has no rule and is computed replicated."""


FactorAxes = tuple[tuple[str, ...], ...]


@dataclass
class _OpChooser:
    """Chooses an op's layouts by its rule, from its operands' layouts and the results wanted."""

    rule: OpShardingRule
    mesh: MeshAttr
    operands: list[SSAValue]
    results: list[SSAValue]
    preferred: list[ShardingAttr | None]
    """Per result, the layout it is preferred in (see `PREFERRED`), or None."""
    sizes: list[int] = field(init=False)
    chosen: dict[tuple, _Choice] = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.sizes = [f.size for f in self.rule.factors]

    def choose(self, current: list[ShardingAttr], wanted: list[ShardingAttr | None]) -> _Choice:
        """The cheapest candidate (see the module docstring), remembered per operand and wanted layouts."""
        key = (*current, None, *wanted)
        if key not in self.chosen:
            self.chosen[key] = self._choose(current, wanted)
        return self.chosen[key]

    def _choose(self, current: list[ShardingAttr], wanted: list[ShardingAttr | None]) -> _Choice:
        sources = [*(self._project(lay, m) for lay, m in zip(current, self.rule.operands, strict=True)),
                   *(self._project(w, m) for w, m in zip(wanted, self.rule.results, strict=True) if w is not None),
                   *(self._project(p, m) for p, m in zip(self.preferred, self.rule.results, strict=True)
                     if p is not None)]
        candidates = [self._merge(sources), *sources, tuple(() for _ in self.sizes)]
        best, best_cost = None, None
        seen = set()
        index = 0
        for raw in candidates:
            for shift in (False, True):
                candidate = self._repair(raw, shift)
                if candidate in seen:
                    continue
                seen.add(candidate)
                choice = self._layouts(candidate, current)
                cost = self._cost(choice, current, wanted, index)
                index += 1
                if best_cost is None or cost < best_cost:
                    best, best_cost = choice, cost
        assert best is not None
        return best

    def _project(self, layout: ShardingAttr, mapping) -> FactorAxes:
        """The factor shardings a tensor's layout implies; axes that fit no factor are dropped."""
        axes: list[tuple[str, ...]] = [() for _ in self.sizes]
        for dim, factors in enumerate(mapping):
            left = {f: self.sizes[f] for f in factors}
            position = 0
            for axis in layout.dim_axes(dim):
                n = self.mesh.axis_size(axis)
                while position < len(factors) and left[factors[position]] == 1:
                    position += 1
                if position == len(factors) or left[factors[position]] % n:
                    break
                f = factors[position]
                axes[f] = (*axes[f], axis)
                left[f] //= n
        return tuple(a if self.rule.factors[f].kind != FactorKind.REPLICATED else ()
                     for f, a in enumerate(axes))

    def _merge(self, sources: list[FactorAxes]) -> FactorAxes:
        """Each factor takes the axes of the first source that shards it, unless an axis is taken."""
        merged: list[tuple[str, ...]] = [() for _ in self.sizes]
        used: set[str] = set()
        for source in sources:
            for f, axes in enumerate(source):
                if axes and not merged[f] and not used.intersection(axes):
                    merged[f] = axes
                    used.update(axes)
        return tuple(merged)

    def _repair(self, candidate: FactorAxes, shift: bool) -> FactorAxes:
        """Drops axes a block layout cannot express: an axis used twice, or axes on a minor
        factor of a dimension whose more major factor is not split all the way. With `shift`,
        such axes move to that major factor instead when they divide what is left of it:
        [2, 4] -> [8] with the 4 split becomes the 2 split (an all_to_all, not a gather)."""
        axes = list(candidate)
        used: set[str] = set()
        for f, a in enumerate(axes):
            if used.intersection(a):
                axes[f] = ()
            used.update(axes[f])
        changed = True
        while changed:
            changed = False
            for mapping in (*self.rule.operands, *self.rule.results):
                for factors in mapping:
                    open_: int | None = None
                    for f in factors:
                        if axes[f] and open_ is not None:
                            moved, axes[f] = axes[f], ()
                            changed = True
                            if shift and self._left(open_, axes[open_]) % self._parts(moved) == 0 and \
                                    self.rule.factors[open_].kind != FactorKind.REPLICATED:
                                axes[open_] = (*axes[open_], *moved)
                        if open_ is None and self._left(f, axes[f]) > 1:
                            open_ = f
        return tuple(axes)

    def _parts(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.axis_size(a) for a in axes)

    def _left(self, factor: int, axes: tuple[str, ...]) -> int:
        """How much of `factor` each device still holds once `axes` split it."""
        return self.sizes[factor] // self._parts(axes)

    def _dims(self, candidate: FactorAxes, mapping) -> list[list[str]]:
        return [[a for f in factors for a in candidate[f]] for factors in mapping]

    def _layouts(self, candidate: FactorAxes, current: list[ShardingAttr]) -> _Choice:
        used = {a for axes in candidate for a in axes}
        kept: set[str] = set()
        keep_in: list[set[str]] = [set() for _ in current]
        for axis in self.mesh.axis_names():
            holders = frozenset(i for i, lay in enumerate(current) if axis in lay.partial_axes())
            if holders and axis not in used and holders in self.rule.linear_in:
                kept.add(axis)
                for i in holders:
                    keep_in[i].add(axis)
        results = []
        summed_by_all: set[str] = set()
        for mapping in self.rule.results:
            present = {f for factors in mapping for f in factors}
            summed = {a for f, axes in enumerate(candidate) for a in axes
                      if f not in present and self.rule.factors[f].kind == FactorKind.REDUCTION}
            summed_by_all |= summed
            results.append(_layout(self._dims(candidate, mapping), kept | summed, self.mesh))
        for i in self.rule.added:
            keep_in[i] |= summed_by_all
        operands = [_layout(self._dims(candidate, m), keep_in[i], self.mesh)
                    for i, m in enumerate(self.rule.operands)]
        return _Choice(operands, results, self.rule.family)

    def _cost(self, choice: _Choice, current, wanted, index: int) -> tuple:
        moved, changes = 0.0, 0
        for value, have, want in zip(self.operands, current, choice.operands, strict=True):
            if have != want:
                moved += reshard_bytes(have, want, value.type, self.mesh)
                changes += 1
        for value, have, want in zip(self.results, choice.results, wanted, strict=True):
            if want is not None and have != want:
                moved += reshard_bytes(have, want, value.type, self.mesh)
                changes += 1
        elements = sum(_local_elements(v, lay, self.mesh) for v, lay in zip(self.results, choice.results, strict=True))
        missed = sum(p is not None and p != have for p, have in zip(self.preferred, choice.results, strict=True))
        return (moved, missed, changes, elements, index)

    def carry(self, preferred: list[ShardingAttr | None]) -> list[ShardingAttr | None]:
        """The preferred layouts of the results, from those of the operands: the factor shardings
        the operands' preferences imply, merged and made expressible (axes that would need a
        strided shard are dropped, not moved); None for a result they do not split."""
        sources = [self._project(p, m) for p, m in zip(preferred, self.rule.operands, strict=True) if p is not None]
        if not sources:
            return [None for _ in self.results]
        candidate = self._repair(self._merge(sources), False)
        dims = [self._dims(candidate, mapping) for mapping in self.rule.results]
        return [_layout(d, (), self.mesh) if any(d) else None for d in dims]


def _local_elements(value: SSAValue, layout: ShardingAttr, mesh: MeshAttr) -> float:
    assert isinstance(value.type, ValueTensorType)
    parts = math.prod(mesh.axis_size(a) for d in range(layout.rank()) for a in layout.dim_axes(d))
    return math.prod(max(s, 1) for s in value.type.get_shape()) / parts


# ---------------------------------------------------------------- the function


class _Propagation:
    """Layouts of every tensor value of one function, and the choices of its ops."""

    def __init__(self, fn: func.FuncOp, mesh: MeshAttr, axes: tuple[str, ...], strict: bool):
        self.fn = fn
        self.mesh = mesh
        self.axes = axes
        self.strict = strict
        self.block = fn.body.block
        self.layout: dict[SSAValue, ShardingAttr] = {}
        self.seeded: dict[SSAValue, ShardingAttr] = {}
        self.wanted: dict[SSAValue, ShardingAttr] = {}
        self.preferred: dict[SSAValue, ShardingAttr] = {}
        self.choices: dict[Operation, _Choice] = {}
        self.rules: dict[Operation, _OpChooser | None] = {}
        self.result_layouts: list[ShardingAttr] = []

    # -- seeds

    def seed(self) -> None:
        """Reads the seeded layouts of the arguments and results (see the module docstring)."""
        args = self.fn.arg_attrs.data if self.fn.arg_attrs else [None] * len(self.block.args)
        params: dict[str, ShardingAttr] = {}
        for i, (arg, attrs) in enumerate(zip(self.block.args, args, strict=True)):
            if not isinstance(arg.type, ValueTensorType):
                continue
            if attrs is not None and LAYOUT in attrs.data and layout_of(attrs) is None:
                raise StrategyError(f"propagate-sharding: @{self.fn.sym_name.data} argument {i}{_named(attrs)} has "
                                    f"{LAYOUT} = {attrs.data[LAYOUT]}, which is not a #par.sharding<...>")
            layout = layout_of(attrs) or _replicated(arg)
            self._check_seed(layout, arg.type, f"argument {i}{_named(attrs)}")
            self.layout[arg] = layout
            preferred = attrs.data.get(PREFERRED) if attrs is not None else None
            if preferred is not None:
                if not isinstance(preferred, ShardingAttr) or preferred.partial_axes():
                    raise StrategyError(f"propagate-sharding: @{self.fn.sym_name.data} argument {i}{_named(attrs)} "
                                        f"has {PREFERRED} = {preferred}, which is not a #par.sharding<...> "
                                        "without pending sums")
                self._check_seed(preferred, arg.type, f"argument {i}{_named(attrs)} ({PREFERRED})")
                self.preferred[arg] = preferred
            for name in parameter_names(attrs):
                params[name] = layout
        ret = self.block.last_op
        assert isinstance(ret, func.ReturnOp)
        results = self.fn.res_attrs.data if self.fn.res_attrs else [None] * len(ret.operands)
        for i, (value, attrs) in enumerate(zip(ret.operands, results, strict=True)):
            layout = layout_of(attrs)
            if layout is None and attrs is not None and isinstance(attrs.data.get(RES_GRAD), StringAttr):
                layout = params.get(attrs.data[RES_GRAD].data)
            if layout is not None:
                self._check_seed(layout, value.type, f"result {i}{_named(attrs)}")
                self.seeded.setdefault(value, layout)
            self.result_layouts.append(layout)

    def _check_seed(self, layout: ShardingAttr, type_: Attribute, what: str) -> None:
        assert isinstance(type_, ValueTensorType)
        shape = type_.get_shape()
        if layout.rank() != len(shape):
            raise StrategyError(f"propagate-sharding: @{self.fn.sym_name.data} {what} has layout {layout} of "
                                f"{layout.rank()} dimensions, but its type {type_} has {len(shape)}")
        for axis in [a for d in range(layout.rank()) for a in layout.dim_axes(d)] + list(layout.partial_axes()):
            if axis not in self.axes:
                raise StrategyError(f"propagate-sharding: @{self.fn.sym_name.data} {what} has layout {layout}, "
                                    f"which names mesh axis '{axis}'; propagation uses the axes "
                                    f"{', '.join(self.axes)} (option mesh-axes)")
        for d, size in enumerate(shape):
            parts = math.prod(self.mesh.axis_size(a) for a in layout.dim_axes(d))
            if size % parts:
                raise StrategyError(f"propagate-sharding: @{self.fn.sym_name.data} {what}: dimension {d} of "
                                    f"{type_} has size {size}, which does not split over {parts} devices "
                                    f"(layout {layout})")

    def carry_preferences(self) -> None:
        """Carries the arguments' preferred layouts (`PREFERRED`) forward through the rules, in
        program order, to every value computed from them along the factors they split."""
        if not self.preferred:
            return
        for op in self._ops():
            chooser = self._chooser(op)
            if chooser is None:
                continue
            chooser.preferred = chooser.carry([self.preferred.get(v) for v in chooser.operands])
            for value, layout in zip(chooser.results, chooser.preferred, strict=True):
                if layout is not None:
                    self.preferred[value] = layout

    # -- propagation

    def run(self) -> None:
        """Forward and backward sweeps until no layout changes."""
        for _ in range(_ROUNDS):
            before = dict(self.layout)
            self._forward()
            self._backward()
            if self.layout == before:
                return

    def _ops(self) -> list[Operation]:
        """The ops that choose layouts: every op with tensor results except list plumbing."""
        return [op for op in self.block.ops
                if not isinstance(op, ListUnpackOp | ListConstructOp | func.ReturnOp) and tensor_results(op)]

    def _chooser(self, op: Operation) -> _OpChooser | None:
        if op not in self.rules:
            rule = sharding_rule(op) if isinstance(op, AtenOp) else None
            if rule is None and self.strict and not isinstance(op, ReshardOp | LayoutCastOp):
                origin = op.attributes.get(ORIGIN)
                path = f"module '{origin.path}'" if isinstance(origin, OriginAttr) else "an unknown module"
                raise StrategyError(
                    f"propagate-sharding (strict): {op.name} in {path} has no sharding rule. Add a rule for "
                    f"'{op.name}' to piperc.passes.sharding_rules.RULES, or run with strict=false to compute "
                    "it replicated")
            results = tensor_results(op)
            self.rules[op] = None if rule is None else _OpChooser(rule, self.mesh, tensor_operands(op), results,
                                                                  [None for _ in results])
        return self.rules[op]

    def _decide(self, op: Operation) -> _Choice:
        if isinstance(op, ReshardOp | LayoutCastOp):
            return _Choice([op.source], [op.target], "reshard")
        chooser = self._chooser(op)
        if chooser is None:
            return _Choice([_replicated(v) for v in tensor_operands(op)],
                           [_replicated(v) for v in tensor_results(op)], None)
        return chooser.choose([self.layout[v] for v in chooser.operands],
                              [self.seeded.get(v, self.wanted.get(v)) for v in chooser.results])

    def _forward(self) -> None:
        for op in self._ops():
            choice = self._decide(op)
            self.choices[op] = choice
            for value, layout in zip(tensor_results(op), choice.results, strict=True):
                self.layout[value] = layout

    def _backward(self) -> None:
        """Asks each op for the layout all users of its results read them in."""
        reads: dict[SSAValue, set[ShardingAttr]] = {}
        ret = self.block.last_op
        assert isinstance(ret, func.ReturnOp)
        for value, layout in zip(ret.operands, self.result_layouts, strict=True):
            if isinstance(value.type, ValueTensorType):
                reads.setdefault(value, set()).add(layout or self.layout[value])
        for op in reversed(self._ops()):
            results = tensor_results(op)
            for v in results:
                if len(reads.get(v, ())) == 1:
                    self.wanted[v] = next(iter(reads[v]))
                else:
                    self.wanted.pop(v, None)
            choice = self._decide(op)
            self.choices[op] = choice
            for value, layout in zip(tensor_operands(op), choice.operands, strict=True):
                reads.setdefault(value, set()).add(layout)

    # -- writing the IR

    def write(self, mesh_name: str) -> None:
        """Writes `par.layouts`, the arguments' and results' `par.layout`, and the layout casts."""
        casts: dict[tuple[SSAValue, ShardingAttr], SSAValue] = {}

        def cast(value: SSAValue, target: ShardingAttr, user: Operation, index: int, why: str) -> None:
            source = self.layout[value]
            if source == target:
                return
            key = (value, target)
            if key not in casts:
                op = LayoutCastOp(value, mesh_name, source, target, why)
                user.parent_block().insert_op_before(op, user)
                casts[key] = op.result
            user.operands[index] = casts[key]

        for op in list(self.block.ops):
            if isinstance(op, func.ReturnOp):
                for i, (value, layout) in enumerate(zip(op.operands, self.result_layouts, strict=True)):
                    if layout is not None:
                        cast(value, layout, op, i, f"result {i} of @{self.fn.sym_name.data} (seeded layout)")
                continue
            choice = self.choices.get(op)
            if choice is None:
                continue
            rule = choice.family or "no rule: computed replicated"
            for (user, i), layout in zip(tensor_operand_uses(op), choice.operands, strict=True):
                at = f"operand {i}" if user is op else \
                    f"operand {list(op.operands).index(user.results[0])} element {i}"
                cast(user.operands[i], layout, user, i, f"{where(op)}, {at} ({rule})")
        for op in self.block.ops:
            values = [r for r in op.results if isinstance(r.type, ValueTensorType)]
            if values and len(values) == len(op.results) and not isinstance(op, LayoutCastOp):
                op.attributes[LAYOUTS] = ArrayAttr(self.layout[v] for v in values)
        self.fn.arg_attrs = ArrayAttr(
            _with_layout(attrs, self.layout.get(arg)) for arg, attrs in
            zip(self.block.args, self.fn.arg_attrs.data if self.fn.arg_attrs else [None] * len(self.block.args),
                strict=True))
        ret = self.block.last_op
        assert isinstance(ret, func.ReturnOp)
        res = self.fn.res_attrs.data if self.fn.res_attrs else [None] * len(ret.operands)
        self.fn.res_attrs = ArrayAttr(
            _with_layout(attrs, layout or self.layout.get(value))
            for attrs, value, layout in zip(res, ret.operands, self.result_layouts, strict=True))


def _named(attrs: DictionaryAttr | None) -> str:
    names = parameter_names(attrs)
    return f" ({names[0]})" if names else ""


def _with_layout(attrs: DictionaryAttr | None, layout: ShardingAttr | None) -> DictionaryAttr:
    data = dict(attrs.data) if attrs is not None else {}
    if layout is not None:
        data[LAYOUT] = layout
    return DictionaryAttr(data)


# ---------------------------------------------------------------- report


def sharding_report(module: ModuleOp) -> list[str]:
    """What propagate-sharding decided that costs something, read back from the IR: one line
    per `par.layout_cast` (the value, from -> to, bytes each device receives, and the op and
    rule that needed it), then one per op of `@main` computed replicated for want of a rule."""
    mesh = find_mesh(module)
    lines = []
    for op in module.walk():
        if isinstance(op, LayoutCastOp):
            assert isinstance(op.input.type, ValueTensorType)
            moved = reshard_bytes(op.source, op.target, op.input.type, mesh)
            producer = op.input.owner
            value = (f"result {op.input.index} of {where(producer)}" if isinstance(producer, Operation)
                     else value_name(op.input))
            why = op.reason.data if op.reason is not None else "unknown"
            lines.append(f"{value} {op.input.type}: {op.source} -> {op.target}, {moved:.0f} bytes per device, "
                         f"for {why}")
    for op in main_function(module).body.block.ops:
        if isinstance(op, AtenOp) and tensor_results(op) and sharding_rule(op) is None:
            lines.append(f"note: {where(op)} has no sharding rule; it was computed replicated")
    return lines


@dataclass(frozen=True)
class PropagateShardingPass(ModulePass):
    """Gives every tensor value of `@main` a layout by propagating the seeded ones through
    per-op sharding rules, and casts operands whose layout differs from what their op needs.

    Options: mesh_axes (axes layouts may use; default all of `@mesh`'s), strict (an op with
    no rule is an error instead of being computed replicated). Requires: `@mesh`, `@main`.
    """

    name = "propagate-sharding"

    mesh_axes: tuple[str, ...] = ()
    strict: bool = False

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = find_mesh(op)
        axes = self.mesh_axes or mesh.axis_names()
        for axis in axes:
            if axis not in mesh.axis_names():
                raise StrategyError(f"propagate-sharding: mesh-axes names '{axis}', which the mesh {mesh} "
                                    "does not have")
        propagation = _Propagation(main_function(op), mesh, tuple(axes), self.strict)
        propagation.seed()
        propagation.carry_preferences()
        propagation.run()
        propagation.write(MESH_SYMBOL)

