"""Placements, named and meaning as DTensor's, and seeding parameter layouts from a plan.

A plan maps globs over parameter names to a placement along one mesh axis:

    {"blocks.*.attn.qkv.weight": piperc.Shard(0), "blocks.*.attn.proj.weight": piperc.Shard(1)}

`seed_layouts` writes the matching parameters' `par.layout` (`#par.sharding`) on `@main`;
the propagate-sharding pass derives every other value's layout from them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass

from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp

from piperc.dialects.par import LAYOUT, ShardingAttr, layout_of
from piperc.dialects.roles import main_function, parameter_names
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError


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


def _example(attrs: list[DictionaryAttr]) -> str:
    return next((n[0] for a in attrs if (n := parameter_names(a))), "?")
