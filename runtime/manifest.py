"""The manifest of a compiled model: what each rank runs and which state it owns.

Code generation writes `manifest.json` next to `state.pt` and the `rank{r}.py`
programs. This module reads it into plain dataclasses and checks what the
runtime relies on, so that a malformed directory fails at load time with the
field named, not in the middle of a training step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .zigzag import cut as zigzag_cut

FORMAT = 3
STATE_KINDS = ("param", "zeros", "scalar")

Layout = tuple[tuple[str, ...], ...]
"""How a global tensor (an input, sharded state) is split over the mesh: per dimension, the mesh
axes that cut it, outermost first."""


class ManifestError(ValueError):
    """`manifest.json` is missing, malformed, or inconsistent with itself."""


@dataclass(frozen=True)
class StateEntry:
    """One named tensor a rank owns: a parameter, optimizer zeros, or a scalar. With a
    `layout`, the rank holds only its part of the tensor, cut as `local_part` cuts it."""

    name: str
    kind: str
    like: str | None = None
    value: float = 0.0
    layout: Layout | None = None


@dataclass(frozen=True)
class RankPlan:
    """What one rank runs (`program`) and what it reads and owns."""

    rank: int
    program: str
    coords: dict[str, int]
    inputs: tuple[int, ...]
    state: tuple[StateEntry, ...]


@dataclass(frozen=True)
class Manifest:
    """The parts of `manifest.json` the runtime reads."""

    path: Path
    world_size: int
    device: str
    mesh: dict[str, int]
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    input_names: tuple[str, ...]
    input_layouts: tuple[Layout, ...]
    microbatches: int
    ranks: tuple[RankPlan, ...]
    params: dict[str, tuple[int, ...]]
    input_signature: tuple[tuple[tuple[int, ...], str] | None, ...] = ()
    """Per input, the global (shape, dtype name) it was compiled for; None where the
    manifest does not say (then `check_batch` checks the count of inputs only)."""
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    """The other names of tied parameters, each mapped to the name in `params`."""
    seed: int = 0
    """The seed the programs' random ops draw from (`Runtime.seed_random`)."""
    zigzag: dict[str, int] = dataclasses.field(default_factory=dict)
    """Mesh axis -> the sequence length it cuts in zigzag pieces (`runtime/zigzag.py`)."""


def read_manifest(directory: str | Path) -> Manifest:
    """Reads and checks `directory/manifest.json`."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ManifestError(
            f"{path}: no manifest here; is {directory} a compiled program directory?"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: the manifest must be a JSON object, got a {type(data).__name__}")
    return _parse(path, data)


def _parse(path: Path, data: dict) -> Manifest:
    def fail(message: str) -> ManifestError:
        return ManifestError(f"{path}: {message}")

    try:
        if data.get("format") != FORMAT:
            raise fail(
                f"format {data.get('format')!r} is not supported (this runtime reads format {FORMAT})"
            )
        world_size = int(data["world_size"])
        device = str(data["device"])
        mesh = {str(axis): int(size) for axis, size in data["mesh"]}
        groups = tuple((str(name), tuple(int(r) for r in ranks)) for name, ranks in data["groups"])
        inputs = sorted(data["inputs"], key=lambda i: i["index"])
        input_names = tuple(str(i["name"]) for i in inputs)
        input_layouts = tuple(
            tuple(tuple(str(a) for a in axes) for axes in i["layout"]) for i in inputs
        )
        input_signature = tuple(
            (tuple(int(n) for n in i["shape"]), str(i["dtype"])) if "shape" in i else None for i in inputs
        )
        microbatches = int(data["microbatches"])
        ranks = tuple(_parse_rank(r) for r in data["ranks"])
        params = {str(n): tuple(int(o) for o in p["owners"]) for n, p in data["params"].items()}
        aliases = {str(a): str(n) for a, n in data.get("aliases", {}).items()}
        seed = int(data.get("seed", 0))
        zigzag = {str(axis): int(length) for axis, length in data.get("zigzag", {}).items()}
    except ManifestError:
        raise
    except KeyError as e:
        raise fail(f"missing field {e}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise fail(f"malformed field: {e}") from e

    if device not in ("cpu", "cuda"):
        raise fail(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    if world_size < 1 or microbatches < 1:
        raise fail("world_size and microbatches must be >= 1")
    if math.prod(mesh.values()) != world_size:
        raise fail(f"mesh {mesh} has {math.prod(mesh.values())} devices, world_size is {world_size}")
    if [a for a in zigzag if a not in mesh]:
        raise fail(f"zigzag names axes {[a for a in zigzag if a not in mesh]} that the mesh {mesh} lacks")
    for name, layout in zip(input_names, input_layouts, strict=True):
        unknown = [a for axes in layout for a in axes if a not in mesh]
        if unknown:
            raise fail(f"input {name!r}: layout names axes {unknown} that the mesh {mesh} lacks")
    if [r.rank for r in ranks] != list(range(world_size)):
        raise fail(
            f"'ranks' must list ranks 0..{world_size - 1} in order, got {[r.rank for r in ranks]}"
        )
    seen_groups = set()
    for name, members in groups:
        if name in seen_groups:
            raise fail(f"group {name!r} is listed twice")
        seen_groups.add(name)
        bad = [m for m in members if not 0 <= m < world_size]
        if bad or not members:
            raise fail(f"group {name!r} has ranks {list(members)} outside 0..{world_size - 1}")
    for plan in ranks:
        if set(plan.coords) != set(mesh):
            raise fail(f"rank {plan.rank}: coords {plan.coords} must name the mesh axes {list(mesh)}")
        for entry in plan.state:
            unknown = [a for axes in entry.layout or () for a in axes if a not in mesh]
            if unknown:
                raise fail(f"rank {plan.rank}: state {entry.name!r}: layout names axes {unknown} that the "
                           f"mesh {mesh} lacks")
        bad = [i for i in plan.inputs if not 0 <= i < len(input_names)]
        if bad:
            raise fail(f"rank {plan.rank}: inputs {bad} are not listed in 'inputs'")
    owned = {plan.rank: {s.name for s in plan.state if s.kind == "param"} for plan in ranks}
    for name, owners in params.items():
        if not owners:
            raise fail(f"param {name!r} has no owners")
        for owner in owners:
            if owner not in owned:
                raise fail(f"param {name!r}: owner {owner} is not a rank")
            if name not in owned[owner]:
                raise fail(f"param {name!r}: owner rank {owner} has no 'param' state entry for it")
    for alias, name in aliases.items():
        if name not in params or alias in params:
            raise fail(f"alias {alias!r} must name another name of a param, got {name!r}")
    return Manifest(
        path, world_size, device, mesh, groups, input_names, input_layouts, microbatches, ranks, params,
        input_signature, aliases, seed, zigzag,
    )


def check_batch(manifest: Manifest, batch, what: str, whole: bool = True) -> None:
    """Raises ValueError, naming the input and the difference, unless `batch` has one
    tensor per model input with the dtype and (`whole`: a global batch, not a rank's
    shard) the shape the program was compiled for. `what` says which batch (`batch 3`)."""
    names = manifest.input_names
    if not isinstance(batch, (tuple, list)) or len(batch) != len(names):
        got = f"{len(batch)} inputs" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise ValueError(f"{what}: got {got}, but the model takes {len(names)}: {list(names)}")
    for index, (name, tensor) in enumerate(zip(names, batch, strict=True)):
        expected = manifest.input_signature[index] if index < len(manifest.input_signature) else None
        if tensor is None and not whole:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what}: input {index} ({name}) is a {type(tensor).__name__}, not a tensor")
        if expected is None:
            continue
        shape, dtype = expected
        if str(tensor.dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"{what}: input {index} ({name}) has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                             f"but the program was compiled for {dtype}")
        if whole and tuple(tensor.shape) != shape:
            raise ValueError(f"{what}: input {index} ({name}) has shape {tuple(tensor.shape)}, but the program "
                             f"was compiled for {shape} (a global batch; compile again for another shape)")


def _parse_rank(data: dict) -> RankPlan:
    state = []
    for entry in data["state"]:
        kind = entry["kind"]
        if kind not in STATE_KINDS:
            raise ValueError(
                f"rank {data['rank']}: state {entry['name']!r} has kind {kind!r}; expected one of {STATE_KINDS}"
            )
        if kind == "zeros" and "like" not in entry:
            raise ValueError(
                f"rank {data['rank']}: state {entry['name']!r} of kind 'zeros' needs 'like'"
            )
        state.append(
            StateEntry(
                name=str(entry["name"]),
                kind=kind,
                like=entry.get("like"),
                value=float(entry.get("value", 0.0)),
                layout=None if "layout" not in entry else tuple(tuple(str(a) for a in axes) for axes in entry["layout"]),
            )
        )
    return RankPlan(
        rank=int(data["rank"]),
        program=str(data["program"]),
        coords={str(k): int(v) for k, v in data.get("coords", {}).items()},
        inputs=tuple(int(i) for i in data["inputs"]),
        state=tuple(state),
    )


def local_part(
    tensor: torch.Tensor, layout: Layout, mesh: Mapping[str, int], coords: Mapping[str, int],
    zigzag: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """The part of a global `tensor` that the rank at `coords` holds under `layout`: each
    dimension cut into equal slices over the mesh axes that split it (outermost first,
    row-major over their coordinates), a view; a cut the mesh declares `zigzag` (axis ->
    sequence length) keeps the rank's two zigzag chunks instead (`runtime/zigzag.py`), a copy.
    Raises ValueError when a dimension does not split."""
    if len(layout) != tensor.dim():
        raise ValueError(
            f"layout {[list(a) for a in layout]} has {len(layout)} dimensions, "
            f"the tensor has {tensor.dim()} (shape {tuple(tensor.shape)})"
        )
    for dim, axes in enumerate(layout):
        tensor = zigzag_cut(tensor, dim, axes, mesh, coords, zigzag or {})
    return tensor


def part_box(
    layout: Layout, local_shape: Sequence[int], mesh: Mapping[str, int], coords: Mapping[str, int]
) -> list[tuple[int, int]]:
    """Per dimension, (offset, global size) of the part of shape `local_shape` that the rank at
    `coords` holds under `layout`: where `local_part` cut it from the global tensor."""
    box = []
    for axes, size in zip(layout, local_shape, strict=True):
        parts, index = _slice(axes, mesh, coords)
        box.append((index * size, parts * size))
    return box


def _slice(axes: Sequence[str], mesh: Mapping[str, int], coords: Mapping[str, int]) -> tuple[int, int]:
    """Into how many slices `axes` cut a dimension, and which of them the rank at `coords` holds."""
    parts, index = 1, 0
    for axis in axes:
        parts *= mesh[axis]
        index = index * mesh[axis] + coords[axis]
    return parts, index


def shard(manifest: Manifest, rank: int, global_batch) -> tuple:
    """What `rank` needs of one global batch: the inputs its stages read, each cut to
    the rank's part under the input's layout (`local_part`); None for the inputs it
    never reads."""
    plan = manifest.ranks[rank]
    out = []
    for index, tensor in enumerate(global_batch):
        if index not in plan.inputs:
            out.append(None)
            continue
        layout = manifest.input_layouts[index]
        out.append(local_part(tensor, layout, manifest.mesh, plan.coords, manifest.zigzag).clone())
    return tuple(out)
