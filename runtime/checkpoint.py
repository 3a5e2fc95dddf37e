"""Checkpoints: every rank's state in torch.distributed.checkpoint (DCP) format.

A checkpoint is a directory `ROOT/step_<n>` (n = training steps done, 8 digits) written by
`save`, collectively: each rank writes the parts of the global tensors it holds, once per
part (replicas are written by one of them), and the coordinator writes DCP's `.metadata`
and `piperc.json`. What is saved, by global name:

- every parameter, whole-tensor offsets and sizes as the manifest's layouts cut it;
- the optimizer's state (`<param>.exp_avg`, `<param>.momentum_buffer`, ..., `step`);
- `piperc.steps_done`, the number of training steps done;
- `piperc.rng.rank<r>`, each rank's torch (and CUDA) generator state.

The names and the global shapes do not depend on the strategy, so `load` reads a
checkpoint into a program compiled under any other strategy with the same model and
optimizer: DCP reads, for each part the new rank holds, the pieces of the saved parts that
overlap it. Generator states are restored only when the world size is the same.

Publication is atomic: the ranks write `ROOT/step_<n>.partial`, and rank 0 renames it to
`ROOT/step_<n>` after every rank's write completed. A crash mid-save leaves a `.partial`
directory, which `latest` ignores and the next save of that step replaces; the last
published checkpoint is never touched. On several machines, ROOT must be a shared file system.

`to_state_dict(path)` reads a checkpoint back in one process, without the compiler or a
process group, as a plain `model.state_dict()`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from .comm import Work
from .manifest import part_box

if TYPE_CHECKING:
    from .executor import Executor

STEPS_KEY = "piperc.steps_done"
RNG_PREFIX = "piperc.rng.rank"
INFO_FILE = "piperc.json"
_STEP_DIR = re.compile(r"step_(\d{8})")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the program loading it."""


class _Part:
    """One rank's block of a global tensor, as DCP addresses it: the local tensor, its offsets
    in the global tensor and the global size (the `_Checkpointable` protocol DTensor implements,
    for layouts DTensor cannot state: several mesh axes on one dimension in any order)."""

    def __init__(self, local: torch.Tensor, offsets: tuple[int, ...], size: tuple[int, ...]):
        self.local = local
        self.offsets = torch.Size(offsets)
        self.global_size = torch.Size(size)

    def size(self) -> torch.Size:
        """The global size (what DCP compares with the saved tensor's)."""
        return self.global_size

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        return [WriteItem(
            index=MetadataIndex(fqn, self.offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=self.__create_chunk_list__()[0],
                properties=TensorProperties.create_from_tensor(self.local),
                size=self.global_size,
            ),
        )]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.shape)]


def _local(state: dict, index: MetadataIndex):
    value = state[index.fqn]
    return value.local if isinstance(value, _Part) else value


class _SavePlanner(DefaultSavePlanner):
    """DCP's default save planner (it writes each replicated part once), reading `_Part`s
    from a flat state dict."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex):
        return _local(self.state_dict, index)


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner (it reads the overlap of saved and wanted parts), into
    `_Part`s of a flat state dict. Its set-up keeps the `_Part`s: the default one turns
    every value that is not a tensor into None."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        self.original_state_dict = self.state_dict = state_dict
        self.mappings = {}
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _local(self.state_dict, index)


def step_dir(root: str | Path, steps_done: int) -> Path:
    """Where the checkpoint after `steps_done` steps is published under `root`."""
    return Path(root) / f"step_{steps_done:08d}"


def latest(root: str | Path) -> Path | None:
    """The published checkpoint with the most steps under `root` (None when there is none);
    `.partial` directories left by a crash mid-save are not checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / INFO_FILE).is_file()]
    return max(done, key=lambda p: p.name, default=None)


def _refuse_carried(executor: Executor) -> None:
    """CheckpointError for a program that carries microbatches between steps: their
    activations and stashed weights are not part of a checkpoint."""
    if executor.carries:
        raise CheckpointError(
            "this program is an asynchronous pipeline: microbatches in flight carry activations and stashed "
            "weights from one step to the next, which a checkpoint does not hold; checkpoints need a "
            "synchronous schedule"
        )


def save(executor: Executor, root: str | Path) -> Path:
    """Writes `executor`'s state after its `steps_done` steps to `root/step_<n>` and publishes
    it; returns that path. Collective: every rank calls it with the same `root`."""
    _refuse_carried(executor)
    root = Path(root)
    final = step_dir(root, executor.steps_done)
    partial = final.with_name(final.name + ".partial")
    if executor.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a crash mid-save
            shutil.rmtree(partial)
        partial.mkdir()
    _barrier(executor, "creating the checkpoint directory")
    state = _parts(executor)
    state[STEPS_KEY] = torch.tensor(executor.steps_done, dtype=torch.int64)
    state[f"{RNG_PREFIX}{executor.rank}"] = _rng_state(executor)
    with executor.runtime.host_work():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(partial), planner=_SavePlanner())
    if executor.rank == 0:  # dcp.save returns once every rank's write and the metadata are done
        manifest = executor.manifest
        info = {
            "steps_done": executor.steps_done,
            "world_size": manifest.world_size,
            "mesh": manifest.mesh,
            "params": sorted(manifest.params),
            "aliases": manifest.aliases,
        }
        (partial / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        if final.exists():  # published by an earlier run that got this far; replaced whole
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(partial, final)
            shutil.rmtree(old)
        else:
            os.rename(partial, final)
    _barrier(executor, "publishing the checkpoint")
    return final


def load(executor: Executor, path: str | Path) -> None:
    """Reads the checkpoint at `path` into `executor`'s state and step count, resharding it
    to this program's layouts. Collective: every rank calls it with the same `path`.

    Raises CheckpointError, before reading any tensor, when the checkpoint is not published or
    lacks a tensor this program holds, or holds it with another shape."""
    _refuse_carried(executor)
    path = Path(path)
    info = read_info(path)
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = _parts(executor, empty=True)
    for name, part in state.items():
        saved = metadata.get(name)
        if not isinstance(saved, TensorStorageMetadata):
            raise CheckpointError(
                f"{path}: holds no tensor {name!r}, which rank {executor.rank} of "
                f"{executor.directory} needs (a checkpoint of another model or optimizer?)"
            )
        if saved.size != part.global_size:
            raise CheckpointError(
                f"{path}: {name!r} has shape {tuple(saved.size)}, the program "
                f"{executor.directory} holds it as {tuple(part.global_size)}"
            )
    rng = f"{RNG_PREFIX}{executor.rank}"
    same_world = info["world_size"] == executor.manifest.world_size
    if same_world:
        current = _rng_state(executor)
        state[rng] = _Part(torch.empty_like(current), (0,), current.shape)
    with executor.runtime.host_work():
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=_LoadPlanner())
    rt = executor.runtime
    for name, part in state.items():
        if name != rng:
            rt.state(name).copy_(part.local)
    if same_world:
        _set_rng_state(executor, state[rng].local)
    executor.steps_done = int(info["steps_done"])


def read_info(path: str | Path) -> dict:
    """The `piperc.json` of a published checkpoint: steps done, world size, mesh, parameter names."""
    path = Path(path)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        why = "a save that did not finish" if path.name.endswith(".partial") else "not a published checkpoint"
        raise CheckpointError(f"{path}: no {INFO_FILE} here ({why})")
    return json.loads(info_file.read_text())


def to_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters of the checkpoint at `path` (a `step_<n>` directory, or a root whose
    latest one is read), whole and on CPU: a plain `model.state_dict()` for
    `model.load_state_dict`. Runs in one process; no process group is needed."""
    path = Path(path)
    if not (path / INFO_FILE).is_file() and latest(path) is not None:
        path = latest(path)
    info = read_info(path)
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    params = {
        name: torch.empty(metadata[name].size, dtype=metadata[name].properties.dtype)
        for name in info["params"]
    }
    with warnings.catch_warnings():  # DCP warns that it loads in one process, as asked
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(params, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return params | {alias: params[name] for alias, name in info.get("aliases", {}).items()}


def _parts(executor: Executor, empty: bool = False) -> dict[str, _Part]:
    """This rank's state entries as `_Part`s of their global tensors (new empty local tensors
    with `empty`, for loading into)."""
    manifest, plan = executor.manifest, executor.plan
    parts = {}
    for entry in plan.state:
        local = executor.runtime.state(entry.name).detach()
        if entry.kind == "scalar" or entry.layout is None:
            offsets, size = (0,) * local.dim(), tuple(local.shape)
        else:
            box = part_box(entry.layout, local.shape, manifest.mesh, plan.coords)
            offsets, size = tuple(start for start, _ in box), tuple(total for _, total in box)
        local = torch.empty_like(local, device="cpu") if empty else local.cpu()
        parts[entry.name] = _Part(local.contiguous(), offsets, size)
    return parts


def _rng_state(executor: Executor) -> torch.Tensor:
    """This rank's generator states, CPU and (on CUDA) its device's, as one byte tensor."""
    states = [torch.get_rng_state()]
    if executor.runtime.device.type == "cuda":
        states.append(torch.cuda.get_rng_state(executor.runtime.device))
    return torch.cat(states)


def _set_rng_state(executor: Executor, state: torch.Tensor) -> None:
    cpu = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu].clone())
    if executor.runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu:].clone(), executor.runtime.device)


def _barrier(executor: Executor, what: str) -> None:
    """A barrier over every rank that fails after the executor's timeout, naming `what`."""
    executor.runtime.wait(Work(f"barrier while {what}", dist.barrier(async_op=True), []))
