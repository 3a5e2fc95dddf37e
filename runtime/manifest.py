"""The manifest of a compiled model: what each rank runs and which state it owns.

Code generation writes `manifest.json` next to `state.pt` and the `rank{r}.py`
programs. This module reads it into plain dataclasses and checks what the
runtime relies on, so that a malformed directory fails at load time with the
field named, not in the middle of a training step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = 1
STATE_KINDS = ("param", "zeros", "scalar")


class ManifestError(ValueError):
    """`manifest.json` is missing, malformed, or inconsistent with itself."""


@dataclass(frozen=True)
class StateEntry:
    """One named tensor a rank owns: a parameter, optimizer zeros, or a scalar."""

    name: str
    kind: str
    like: str | None = None
    value: float = 0.0


@dataclass(frozen=True)
class RankPlan:
    """What one rank runs (`program`) and what it reads and owns."""

    rank: int
    program: str
    coords: dict[str, int]
    dp_index: int
    inputs: tuple[int, ...]
    state: tuple[StateEntry, ...]


@dataclass(frozen=True)
class Manifest:
    """The parts of `manifest.json` the runtime reads."""

    path: Path
    world_size: int
    device: str
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    input_names: tuple[str, ...]
    dp_size: int
    microbatches: int
    ranks: tuple[RankPlan, ...]
    params: dict[str, tuple[int, ...]]


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
        groups = tuple((str(name), tuple(int(r) for r in ranks)) for name, ranks in data["groups"])
        input_names = tuple(
            str(i["name"]) for i in sorted(data["inputs"], key=lambda i: i["index"])
        )
        dp_size = int(data["dp_size"])
        microbatches = int(data["microbatches"])
        ranks = tuple(_parse_rank(r) for r in data["ranks"])
        params = {str(n): tuple(int(o) for o in p["owners"]) for n, p in data["params"].items()}
    except ManifestError:
        raise
    except KeyError as e:
        raise fail(f"missing field {e}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise fail(f"malformed field: {e}") from e

    if device not in ("cpu", "cuda"):
        raise fail(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    if world_size < 1 or dp_size < 1 or microbatches < 1:
        raise fail("world_size, dp_size and microbatches must be >= 1")
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
        if not 0 <= plan.dp_index < dp_size:
            raise fail(f"rank {plan.rank}: dp_index {plan.dp_index} is outside 0..{dp_size - 1}")
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
    return Manifest(
        path, world_size, device, groups, input_names, dp_size, microbatches, ranks, params
    )


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
            )
        )
    return RankPlan(
        rank=int(data["rank"]),
        program=str(data["program"]),
        coords={str(k): int(v) for k, v in data.get("coords", {}).items()},
        dp_index=int(data.get("dp_index", 0)),
        inputs=tuple(int(i) for i in data["inputs"]),
        state=tuple(state),
    )


def shard(manifest: Manifest, rank: int, global_batch) -> tuple:
    """What `rank` needs of one global batch: the inputs its stages read, cut to
    its data-parallel replica's rows (dim 0); None for the inputs it never reads."""
    plan = manifest.ranks[rank]
    out = []
    for index, tensor in enumerate(global_batch):
        if index not in plan.inputs:
            out.append(None)
            continue
        rows = tensor.shape[0] // manifest.dp_size
        out.append(tensor.narrow(0, plan.dp_index * rows, rows).clone())
    return tuple(out)
