"""tensor-parallel: seeds the parameter layouts of a tensor-parallel plan on the captured `@main`.

    tensor-parallel{axis=tp plan="blocks.*.attn.qkv.weight=0,blocks.*.attn.proj.weight=1,head.weight=replicate"}
    tensor-parallel{axis=tp plan="..." sequence-parallel=true}

The plan maps fnmatch globs over parameter names (tied names included) to a placement
along `axis`: a dimension (`Shard(dim)`) or `replicate`. `Shard`, `Replicate` and `Partial`
(named and meaning as DTensor's; `piperc.Shard` etc.) live here. The pass writes the matching
parameters' `par.layout` (`seed_layouts`), and replicated layouts on the
step's loss and outputs, which every device must hold whole. The `piperc.tensor_parallel`
directive runs it before `propagate-sharding{mesh-axes=<axis>}` (every value's layout,
reshards where they conflict) and `localise-shapes` (per-device shapes), on the captured
`@main` before it is split into stages.

Sequence parallelism (Megatron's): with `sequence-parallel=true` the pass also writes, on
every model input of rank 2 or more, the PREFERRED layout (`par.prefer`, see
propagate-sharding) "dimension 1 split over `axis`". The sequence dimension is defined so:
a model input is `[batch, sequence, ...]` (GPT's tokens and targets are `[batch, seq]`), and
a value's sequence dimension is the one propagation traces back to an input's dimension 1
through the sharding rules (the residual stream's dimension 1; a dimension that merges it
with another, a flattened `[batch*seq]`, is none). Propagation splits those values along it
wherever that moves no more bytes than keeping them whole: the residual stream, layer
norms and residual adds between a row-parallel matmul and the next column-parallel one
are sharded along the sequence, a pending sum resolves there by a reduce_scatter onto the
sequence dimension instead of an all_reduce, a column-parallel matmul's input is
all-gathered along it, and the backward mirrors both. The inputs themselves stay whole.

Options: axis (default tp), plan (text as above), sequence_parallel (default false),
directive (quoted in errors). Requires: the mesh pass (the axis and its size), a captured
`@main` with parameter and input roles.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, IntAttr, ModuleOp
from xdsl.passes import ModulePass

from piperc.dialects.par import LAYOUT, ShardingAttr, layout_of
from piperc.dialects.roles import ARG_INPUT, RES_LOSS, RES_OUTPUT, main_function, parameter_names
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.mesh import find_mesh
from piperc.passes.propagate_sharding import PREFERRED


@dataclass(frozen=True)
class Shard:
    """Split dimension `dim` of the tensor evenly over the mesh axis (DTensor's Shard)."""

    dim: int


@dataclass(frozen=True)
class Replicate:
    """Every device of the mesh axis holds the whole tensor (DTensor's Replicate)."""


@dataclass(frozen=True)
class Partial:
    """Every device holds a term of a pending sum over the mesh axis (DTensor's Partial).

    Values such as a row-parallel matmul's output are Partial; a parameter is not, so a
    plan may not name it.
    """


Placement = Shard | Replicate | Partial


def seed_layouts(module: ModuleOp, axis: str, plan: Mapping[str, Placement], mesh_axes: Mapping[str, int]) -> None:
    """Writes the `par.layout` of each parameter of `@main` that a glob of `plan` matches
    (fnmatch, against its name and the names it is tied to), adding `axis` to the layout
    it already has.

    `mesh_axes` maps each mesh axis to its size. Raises StrategyError, naming the plan entry,
    for a plan entry that matches no parameter, a parameter matched by two entries, a
    `Partial` placement, a dimension the tensor does not have, and a dimension whose size
    does not divide evenly over the axis.
    """
    if axis not in mesh_axes:
        raise StrategyError(f"tensor plan: axis '{axis}' is not a mesh axis (axes: {', '.join(mesh_axes)})")
    fn = main_function(module)
    attrs = list(fn.arg_attrs.data) if fn.arg_attrs else []
    types = fn.function_type.inputs.data
    matched: dict[int, str] = {}
    for pattern, placement in plan.items():
        if not isinstance(placement, Shard | Replicate | Partial):
            raise StrategyError(f"tensor plan entry '{pattern}': {placement!r} is not a placement; "
                                "use piperc.Shard(dim) or piperc.Replicate()")
        if isinstance(placement, Partial):
            raise StrategyError(f"tensor plan entry '{pattern}': a parameter cannot be Partial (a pending "
                                "sum); use piperc.Shard(dim) or piperc.Replicate()")
        hits = [i for i, a in enumerate(attrs) if any(fnmatch.fnmatchcase(n, pattern) for n in parameter_names(a))]
        if not hits:
            raise StrategyError(f"tensor plan entry '{pattern}' matches no parameter of the model; "
                                f"parameters are named as in model.state_dict(), e.g. '{_example(attrs)}'")
        for i in hits:
            name = parameter_names(attrs[i])[0]
            if i in matched:
                raise StrategyError(f"tensor plan: parameter '{name}' is matched by both '{matched[i]}' and "
                                    f"'{pattern}'; make the globs disjoint")
            matched[i] = pattern
            type_ = types[i]
            assert isinstance(type_, ValueTensorType)
            shape = type_.get_shape()
            layout = layout_of(attrs[i]) or ShardingAttr.replicated(len(shape))
            if isinstance(placement, Replicate):
                continue
            dim = placement.dim + len(shape) if placement.dim < 0 else placement.dim
            if not 0 <= dim < len(shape):
                raise StrategyError(f"tensor plan entry '{pattern}': Shard({placement.dim}) of '{name}', which "
                                    f"has {len(shape)} dimensions {list(shape)}")
            dims = [list(layout.dim_axes(d)) for d in range(len(shape))]
            dims[dim].append(axis)
            parts = math.prod(mesh_axes[a] for a in dims[dim])
            if shape[dim] % parts:
                raise StrategyError(f"tensor plan entry '{pattern}': dimension {dim} of '{name}' has size "
                                    f"{shape[dim]}, which does not divide evenly over {parts} devices "
                                    f"(axes {', '.join(dims[dim])})")
            data = dict(attrs[i].data)
            data[LAYOUT] = ShardingAttr(dims, layout.partial_axes())
            attrs[i] = DictionaryAttr(data)
    fn.arg_attrs = ArrayAttr(attrs)


SEQUENCE_DIM = 1
"""The dimension of a `[batch, sequence, ...]` model input that is its sequence."""


def prefer_sequence_split(module: ModuleOp, axis: str, size: int) -> None:
    """Writes `par.prefer` = "dimension `SEQUENCE_DIM` split over `axis`" on every model input
    of `@main` of rank 2 or more (see the module docstring).

    Raises StrategyError when no input has a sequence dimension, or when an input's sequence
    length does not divide over the `size` devices of `axis`, naming the input.
    """
    fn = main_function(module)
    attrs = list(fn.arg_attrs.data) if fn.arg_attrs else []
    inputs = [(i, a, t) for i, (a, t) in enumerate(zip(attrs, fn.function_type.inputs.data, strict=True))
              if ARG_INPUT in a.data and isinstance(t, ValueTensorType)]
    ranked = [(i, a, t) for i, a, t in inputs if len(t.get_shape()) > SEQUENCE_DIM]
    if not ranked:
        raise StrategyError(f"sequence parallelism splits dimension {SEQUENCE_DIM} of the model's "
                            f"[batch, sequence, ...] inputs, but the model's inputs are "
                            f"{', '.join(str(t) for _, _, t in inputs) or 'none'}; use sequence_parallel=False")
    for i, attr, type_ in ranked:
        shape = type_.get_shape()
        index = attr.data[ARG_INPUT]
        if shape[SEQUENCE_DIM] % size:
            raise StrategyError(f"sequence parallelism splits model input "
                                f"{index.data if isinstance(index, IntAttr) else index} "
                                f"{type_} along its sequence (dimension {SEQUENCE_DIM}, length "
                                f"{shape[SEQUENCE_DIM]}) over the {size} devices of axis '{axis}', and "
                                f"{shape[SEQUENCE_DIM]} is not a multiple of {size}; make the sequence length "
                                f"a multiple of {size} or use sequence_parallel=False")
        layout = layout_of(attr) or ShardingAttr.replicated(len(shape))
        dims = [list(layout.dim_axes(d)) for d in range(len(shape))]
        dims[SEQUENCE_DIM].append(axis)
        attrs[i] = DictionaryAttr({**attr.data, PREFERRED: ShardingAttr(dims)})
    fn.arg_attrs = ArrayAttr(attrs)


def _example(attrs: list[DictionaryAttr]) -> str:
    return next((n[0] for a in attrs if (n := parameter_names(a))), "?")


REPLICATE = "replicate"
"""How a plan written as text says `Replicate()`."""


def plan_text(plan: Mapping[str, Placement]) -> str:
    """The plan as the pass's `plan` option: `glob=dim` or `glob=replicate`, comma-separated."""
    entries = []
    for glob, placement in plan.items():
        if not isinstance(glob, str) or not glob or "," in glob or "=" in glob:
            raise StrategyError(f"tensor plan entry {glob!r}: a glob over parameter names is a non-empty string "
                                "without ',' or '='")
        if isinstance(placement, Shard):
            entries.append(f"{glob}={placement.dim}")
        elif isinstance(placement, Replicate):
            entries.append(f"{glob}={REPLICATE}")
        else:
            raise StrategyError(f"tensor plan entry '{glob}': {placement!r} is not a placement a parameter can "
                                "have; use piperc.Shard(dim) or piperc.Replicate()")
    return ",".join(entries)


def parse_plan(text: str, directive: str) -> dict[str, Placement]:
    """The plan a `plan` option spells (the inverse of `plan_text`)."""
    plan: dict[str, Placement] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        glob, sep, placement = entry.rpartition("=")
        if not sep or not glob:
            raise StrategyError(f"{directive}: plan entry '{entry}' is not 'glob=dim' or 'glob={REPLICATE}'")
        if placement == REPLICATE:
            plan[glob] = Replicate()
        elif placement.lstrip("-").isdigit():
            plan[glob] = Shard(int(placement))
        else:
            raise StrategyError(f"{directive}: plan entry '{entry}' places '{glob}' as '{placement}'; write a "
                                f"dimension or '{REPLICATE}'")
    if not plan:
        raise StrategyError(f"{directive}: the plan is empty; name the parameters to shard, e.g. "
                            "{'blocks.*.mlp.fc.weight': piperc.Shard(0)}")
    return plan


@dataclass(frozen=True)
class TensorParallelPass(ModulePass):
    """Seeds a tensor-parallel plan's parameter layouts (and whole losses and outputs) on `@main`;
    with sequence_parallel, the preferred split of the inputs' sequence dimension."""

    name = "tensor-parallel"

    axis: str = "tp"
    plan: str = ""
    sequence_parallel: bool = False
    directive: str = "tensor-parallel"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = find_mesh(op)
        sizes = {a: mesh.axis_size(a) for a in mesh.axis_names()}
        try:
            seed_layouts(op, self.axis, parse_plan(self.plan, self.directive), sizes)
            if self.sequence_parallel:
                prefer_sequence_split(op, self.axis, sizes[self.axis])
        except StrategyError as e:
            raise StrategyError(f"{self.directive}: {e}") from None
        seed_whole_results(main_function(op))


def seed_whole_results(fn) -> None:
    """Lays out the step's loss and outputs replicated: every device holds them whole
    (propagation resolves the pending sums and splits that reach them)."""
    results = fn.function_type.outputs.data
    attrs = fn.res_attrs.data if fn.res_attrs else [DictionaryAttr({}) for _ in results]
    fn.res_attrs = ArrayAttr(
        DictionaryAttr({**a.data, LAYOUT: ShardingAttr.replicated(len(t.get_shape()))})
        if (RES_LOSS in a.data or RES_OUTPUT in a.data) and isinstance(t, ValueTensorType) else a
        for a, t in zip(attrs, results, strict=True))
