"""Runs one rank of a compiled model: process groups, state, and the rank program."""

from __future__ import annotations

import importlib.util
import itertools
import os
import pickle
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist

from .comm import Group, Runtime, Work
from .manifest import (
    Manifest,
    RankPlan,
    StateEntry,
    check_batch,
    local_part,
    part_box,
    read_manifest,
)
from .trace import Recorder

DEFAULT_TIMEOUT = 60.0
_program_ids = itertools.count()


def default_trace() -> Path | None:
    """Where ranks write their traces when no directory is given: PIPERC_TRACE, or nowhere."""
    value = os.environ.get("PIPERC_TRACE")
    return Path(value) if value else None


def default_timeout() -> float:
    """Seconds a communication may take before it is an error: PIPERC_TIMEOUT, or 60."""
    value = os.environ.get("PIPERC_TIMEOUT")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"PIPERC_TIMEOUT must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"PIPERC_TIMEOUT must be positive, got {value!r}")
    return seconds


class Executor:
    """This process's rank of a compiled model, ready to run training steps.

    Construct it with `piperc.runtime.load`. It joins (or initialises, from the
    torchrun environment) the default process group, creates the manifest's
    groups, loads this rank's state and imports this rank's program. With a
    `trace` directory, it records this rank's timeline and writes it there as
    `rank<r>.json` on `close` (`piperc.runtime.trace`).
    """

    def __init__(self, directory: str | Path, timeout: float | None = None, trace: str | Path | None = None):
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self._owns_default_group = _init_distributed(self.manifest, self.timeout)
        self.rank = dist.get_rank()
        self.plan: RankPlan = self.manifest.ranks[self.rank]
        device = _device(self.manifest)
        groups = _create_groups(self.manifest, self.timeout)
        self._created_groups = [
            g.handle for g in groups.values() if g.name != "world" and g.handle is not None
        ]
        self.runtime = Runtime(
            rank=self.rank,
            world_size=self.manifest.world_size,
            device=device,
            coords=self.plan.coords,
            groups=groups,
            timeout=self.timeout,
            input_names=self.manifest.input_names,
            readable_inputs=self.plan.inputs,
            mesh=self.manifest.mesh,
            input_layouts=self.manifest.input_layouts,
            microbatches=self.manifest.microbatches,
            state=_load_state(self.directory / "state.pt", self.manifest, self.plan, device),
            seed=self.manifest.seed,
            zigzag=self.manifest.zigzag,
        )
        self.program = _import_program(self.directory / self.plan.program, self.rank)
        self.steps_done = 0
        self.drained = False
        self.trace_dir = None if trace is None else Path(trace)
        if self.trace_dir is not None:
            coords = ", ".join(f"{axis}={i}" for axis, i in self.plan.coords.items())
            self.runtime.recorder = Recorder(self.rank, device, f"rank {self.rank} ({coords})")

    @property
    def last_progress(self) -> float:
        """time.monotonic() of the last communication seen complete, or step finished
        (polls outstanding work: on CUDA a wait returns before the work is done)."""
        return self.runtime.poll_progress()

    def step(self, global_batch: tuple[torch.Tensor, ...]) -> float:
        """Runs one training step on the full global batch (every rank gets the same
        batch and reads its own slices); returns the global mean loss."""
        check_batch(self.manifest, global_batch, f"step() {self.steps_done}")
        return self._run(tuple(global_batch), shard=False)

    def step_shard(self, shard: tuple[torch.Tensor | None, ...]) -> float:
        """Runs one training step on this rank's own data, as `shard()` cuts it
        (only the inputs its stages read, only its replica's rows); returns the
        global mean loss."""
        check_batch(self.manifest, shard, f"step_shard() {self.steps_done}", whole=False)
        batch = tuple(shard)
        missing = [i for i in self.plan.inputs if batch[i] is None]
        if missing:
            raise ValueError(f"rank {self.rank}: step_shard() got no data for inputs {missing}")
        return self._run(batch, shard=True)

    @property
    def carries(self) -> bool:
        """Whether the program hands values from one step to the next (an asynchronous
        pipeline): it then has a `first_step` for step 0 and a `drain` to run after the last."""
        return callable(getattr(self.program, "drain", None))

    def drain(self) -> None:
        """Finishes what a program that carries values between steps still has in flight after
        the last step (an asynchronous pipeline's last backwards and updates); nothing for
        other programs. Every rank calls it once, after its last step and before `state_dict`."""
        if not self.carries or self.drained:
            return
        rt = self.runtime
        started = rt.recorder.begin_step(self.steps_done) if rt.recorder is not None else 0.0
        rt._begin_step((None,) * len(self.manifest.input_names), shard=True, step=self.steps_done)
        if self.steps_done:
            self.program.drain(rt)
        rt._end_step()
        if rt.recorder is not None:
            rt.recorder.end_step(started)
        self.drained = True

    def _run(self, batch: tuple, shard: bool) -> float:
        rt = self.runtime
        if self.drained:
            raise RuntimeError(f"rank {self.rank}: step() after drain(); the pipeline has been drained")
        started = rt.recorder.begin_step(self.steps_done) if rt.recorder is not None else 0.0
        rt._begin_step(batch, shard=shard, step=self.steps_done)
        first = getattr(self.program, "first_step", None) if self.steps_done == 0 else None
        (first or self.program.step)(rt)
        rt._end_step()
        total = torch.zeros((), dtype=torch.float64, device=rt.device)
        loss = rt.outputs.get("loss")
        if loss is not None:
            if loss.numel() != 1:
                raise ValueError(
                    f"rank {self.rank}: the program's 'loss' output has shape "
                    f"{tuple(loss.shape)}; it must be a single value"
                )
            total += loss.detach().reshape(()).to(rt.device, torch.float64)
        work = Work("all_reduce of the step's loss over group world",
                    dist.all_reduce(total, group=dist.group.WORLD, async_op=True), [total])
        if rt.recorder is not None:
            rt.recorder.issued(work, "comm", "all_reduce loss over world", "collective",
                               {"bytes": total.nbytes, "group": "world"})
        rt.wait(work)
        if rt.recorder is not None:
            rt.recorder.end_step(started)
        self.steps_done += 1
        return total.item()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full parameters by name (tied ones under each of their names), on CPU; the same
        dict on every rank.

        Collective: every rank must call it. The lowest owner of each whole
        parameter contributes its copy; a parameter held in parts (its state
        entry has a layout) is put together from every owner's part.
        """
        params = self.manifest.params
        layouts = [{e.name: e.layout for e in plan.state} for plan in self.manifest.ranks]
        mine = {
            name: self.runtime.state(name).detach().cpu()
            for name, owners in params.items()
            if self.rank in owners and (layouts[self.rank][name] is not None or min(owners) == self.rank)
        }
        gathered: list[dict[str, torch.Tensor] | None] = [None] * self.manifest.world_size
        dist.all_gather_object(gathered, mine)
        whole = {name: self._whole(name, owners, gathered, layouts) for name, owners in params.items()}
        return whole | {alias: whole[name] for alias, name in self.manifest.aliases.items()}

    def _whole(self, name: str, owners: tuple[int, ...], parts: list, layouts: list[dict]) -> torch.Tensor:
        """Parameter `name`, whole, from the parts its owners sent (`layouts`: per rank, each
        state entry's layout, None for a whole tensor)."""
        first = parts[min(owners)][name]
        layout = layouts[min(owners)][name]
        if layout is None:
            return first
        mesh = self.manifest.mesh
        coords = self.manifest.ranks[min(owners)].coords
        shape = [size for _, size in part_box(layout, first.shape, mesh, coords)]
        whole = torch.empty(shape, dtype=first.dtype)
        for rank in owners:
            local_part(whole, layouts[rank][name], mesh, self.manifest.ranks[rank].coords).copy_(parts[rank][name])
        return whole

    def save_checkpoint(self, root: str | Path) -> Path:
        """Writes this program's state after `steps_done` steps to `root/step_<n>` (DCP
        format, each rank its own parts) and publishes it atomically; returns the path.
        Collective: every rank must call it (`piperc.runtime.checkpoint.save`)."""
        from . import checkpoint  # torch.distributed.checkpoint takes 2 s to import; only when used

        return checkpoint.save(self, root)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continues from the checkpoint at `path`, written under this or another strategy:
        parameters, optimizer state and step count, resharded to this program's layouts.
        Collective: every rank must call it (`piperc.runtime.checkpoint.load`)."""
        from . import checkpoint

        checkpoint.load(self, path)

    def peak_live_bytes(self) -> list[int]:
        """Per rank, the peak of its live activation bytes over the steps run so far
        (launch, receive and collective results not yet freed). Collective: every
        rank must call it; every rank gets the whole list."""
        peaks: list[int | None] = [None] * self.manifest.world_size
        dist.all_gather_object(peaks, self.runtime.peak_live_bytes)
        return [int(p) for p in peaks]

    def close(self) -> None:
        """Writes the trace (when tracing) and destroys the process groups this executor
        created (the default group too, when `load` initialised it)."""
        if self.runtime.recorder is not None:
            self.runtime.recorder.trace.write(self.trace_dir)
            self.runtime.recorder = None
        if not dist.is_initialized():
            return
        for handle in self._created_groups:
            dist.destroy_process_group(handle)
        self._created_groups = []
        if self._owns_default_group:
            dist.destroy_process_group()
            self._owns_default_group = False

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, timeout: float | None = None, trace: str | Path | None = None) -> Executor:
    """Loads the compiled model directory `path` for this process's rank.

    The process joins torch.distributed from the torchrun environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless it already did. `timeout` bounds
    every communication, in seconds (default: PIPERC_TIMEOUT, or 60). With a
    `trace` directory (default: PIPERC_TRACE, or none), the rank writes its
    timeline there as `rank<r>.json` when closed.
    """
    return Executor(path, timeout, default_trace() if trace is None else trace)


def _init_distributed(manifest: Manifest, timeout: float) -> bool:
    """Joins the default process group; True when this call initialised it."""
    expected = manifest.world_size
    if dist.is_initialized():
        if dist.get_world_size() != expected:
            raise RuntimeError(_world_size_message(manifest, dist.get_world_size()))
        return False
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"{manifest.path.parent}: cannot join torch.distributed: {', '.join(missing)} not set; "
            f"start the program with torchrun (--nproc-per-node {expected}) or "
            f"piperc.runtime.launch_dir"
        )
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != expected:
        raise RuntimeError(_world_size_message(manifest, world_size))
    if manifest.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if manifest.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return True


def _world_size_message(manifest: Manifest, actual: int) -> str:
    return (
        f"{manifest.path.parent} was compiled for world size {manifest.world_size}, "
        f"but this job has world size {actual}; start it with "
        f"{manifest.world_size} processes (torchrun --nproc-per-node {manifest.world_size})"
    )


def _device(manifest: Manifest) -> torch.device:
    if manifest.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _create_groups(manifest: Manifest, timeout: float) -> dict[str, Group]:
    """Every rank creates every group, in manifest order, as new_group requires."""
    world = tuple(range(manifest.world_size))
    groups = {"world": Group("world", world, dist.group.WORLD)}
    rank = dist.get_rank()
    for name, ranks in manifest.groups:
        if name == "world":
            if tuple(sorted(ranks)) != world:
                raise RuntimeError(
                    f"{manifest.path}: group 'world' must hold every rank, got {list(ranks)}"
                )
            continue
        handle = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout))
        groups[name] = Group(name, ranks, handle if rank in ranks else None)
    return groups


def _load_state(path: Path, manifest: Manifest, plan: RankPlan, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's state: its parameters from `state.pt`, zeros and scalars; the part its
    layout gives the rank, for state held in parts."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the initial parameters (state.pt) are missing")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a state file torch.load can read ({first_line(e)})") from e
    state: dict[str, torch.Tensor] = {}
    for entry in plan.state:
        source = entry.name if entry.kind == "param" else entry.like
        if entry.kind != "scalar" and source not in saved:
            raise KeyError(
                f"{path}: rank {plan.rank} state {entry.name!r} ({entry.kind}) needs the "
                f"parameter {source!r}, which state.pt does not hold"
            )
        if entry.kind == "param":
            state[entry.name] = _part(saved[source], entry, manifest, plan).detach().to(device).clone()
        elif entry.kind == "zeros":
            state[entry.name] = torch.zeros_like(_part(saved[source], entry, manifest, plan), device=device)
        else:
            state[entry.name] = torch.tensor(entry.value, dtype=torch.float64, device=device)
    return state


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name when it has none): what a user
    is shown of an error in what they gave, without a traceback."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _part(tensor: torch.Tensor, entry: StateEntry, manifest: Manifest, plan: RankPlan) -> torch.Tensor:
    """The part of a whole state tensor that the rank holds under the entry's layout."""
    if entry.layout is None:
        return tensor
    return local_part(tensor, entry.layout, manifest.mesh, plan.coords)


def _import_program(path: Path, rank: int) -> ModuleType:
    """Imports a rank program under a module name of its own."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: rank {rank}'s program is missing")
    name = f"piperc_program_{next(_program_ids)}_rank{rank}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "step", None)):
        raise AttributeError(f"{path}: a rank program must define `def step(rt):`")
    return module
