"""The object a generated rank program drives: `step(rt)` calls these methods.

`Runtime` gives a program its inputs and state, streams and events, and
asynchronous point-to-point and collective communication on named process
groups. Every communication returns a `Work`; its result tensors may be read
on a stream once `rt.wait(work, stream=s)` ran. On CUDA, streams and events are
real, communication goes through NCCL and a wait only makes the stream wait;
on CPU (gloo) streams and events are named placeholders and a wait blocks, so
the same program runs unchanged on both.

It also counts live bytes, by storage: tensors made by launches (`rt.produced`,
`rt.produced_gradients`), receives and collectives, minus those released by
`rt.free`, and the staging buffers a collective holds until its wait; storage
that the rank's state owns (a launch may return a view of a parameter) is
counted once, as state. `peak_live_bytes` is the peak over the steps run so
far, and `peak_live_items` its split into gradients, activations and
communication buffers (`LIVE_ITEMS`) at that peak. A collective issued inside
a stage function (`stream=None`) is part of that function's work, not counted.

With a `recorder` (tracing, `trace.py`), it also records every task launched
through `launch`, every communication from its issue to its wait, and every
wait; without one it does none of this.

A communication that fails or times out names the rank that is stuck: the
failing rank publishes what it waited for in the job's store (the default
group's), then reads the reports of the ranks it waited on, and of those they
wait on in turn, for up to `REPORT_WAIT` seconds (at most the timeout). A rank
that reports nothing is stalled in its own code, or dead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import zigzag as zigzag_pieces
from .manifest import Layout, local_part
from .trace import Recorder, task_name

# torch 2.13 names these two collectives `*_single` and deprecates their older names; an older
# torch on a training machine has only the older names, with the same signatures.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

REDUCE_OPS = ("sum", "avg", "max")
REPORT_WAIT = 10.0
"""Seconds a failed rank waits, at most, for the reports of the ranks it waited on."""
LIVE_ITEMS = ("gradients", "activations", "comm_buffers", "weight_stash")
"""What the live count is split into, in the order of `Runtime.peak_live_items`."""
_GRADIENTS, _ACTIVATIONS, _COMM_BUFFERS, _WEIGHT_STASH = range(len(LIVE_ITEMS))


@dataclass(frozen=True)
class Group:
    """A named process group of the manifest: its global ranks and its torch handle
    (None on ranks outside the group)."""

    name: str
    ranks: tuple[int, ...]
    handle: Any


@dataclass(frozen=True)
class CpuStream:
    """A stream on CPU: only a name, since gloo work is already asynchronous."""

    name: str


@dataclass(frozen=True)
class CpuEvent:
    """An event on CPU: records nothing, as CPU streams do not reorder work."""

    stream: CpuStream


class Work:
    """One communication in flight. Pass it to `Runtime.wait`.

    `handle` is a torch work handle, or a list of them for a batch of transfers
    issued together (`batch_isend_irecv`), which completes when all have.
    `peers` are the ranks it waits on (None: every rank); `collective` is
    (group, n) for the n-th collective issued over a group, the same
    communication on every member.
    """

    def __init__(
        self,
        what: str,
        handle: Any,
        outputs: Sequence[torch.Tensor] = (),
        finish: Callable[[], None] | None = None,
    ):
        self.what = what
        self.handles = list(handle) if isinstance(handle, list | tuple) else [handle]
        # Holding the tensors keeps their buffers alive until the transfer completed.
        self.outputs = tuple(outputs)
        self.finish = finish
        self.peers: tuple[int, ...] | None = None
        self.collective: tuple[str, int] | None = None
        self.done = False
        self.completed = False
        self.staged = 0  # bytes of staging buffers counted live until the wait

    def is_completed(self) -> bool:
        """Whether the communication finished (a query: it never blocks)."""
        if not self.completed:
            self.completed = all(h.is_completed() for h in self.handles)
        return self.completed

    def __repr__(self) -> str:
        return f"<Work {self.what}{' (done)' if self.done else ''}>"


def _issuing(method: Callable) -> Callable:
    """Marks a method that issues a communication: while tracing, the communication's event
    starts when the host enters the method, before the backend posts it (gloo's posting can
    take milliseconds on a busy host), not when the backend returned."""

    @functools.wraps(method)
    def issue(self: Runtime, *args, **kwargs):
        if self.recorder is not None:
            self._issue_start = self.recorder.now()
        return method(self, *args, **kwargs)

    return issue


class Runtime:
    """What a rank program sees as `rt` during one training step."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        coords: dict[str, int],
        groups: dict[str, Group],
        timeout: float,
        input_names: Sequence[str],
        readable_inputs: Sequence[int],
        mesh: dict[str, int],
        input_layouts: Sequence[Layout],
        microbatches: int,
        state: dict[str, torch.Tensor],
        seed: int = 0,
        zigzag: Mapping[str, int] | None = None,
    ):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.coords = dict(coords)
        self.timeout = timeout
        self.outputs: dict[str, torch.Tensor] = {}
        self.last_progress = time.monotonic()
        self._groups = groups
        self._input_names = tuple(input_names)
        self._readable_inputs = frozenset(readable_inputs)
        self._mesh = dict(mesh)
        self._input_layouts = tuple(input_layouts)
        self._zigzag = dict(zigzag or {})  # axis -> the sequence length it cuts zigzag
        self._microbatches = microbatches
        self._state = state
        self.seed = seed
        self._host_work = 0  # host_work() contexts open
        self.step_index = 0  # the training step running (steps done before it)
        self._microbatch = 0  # of the task running
        batch_axes = self._input_layouts[0][0] if self._input_layouts and self._input_layouts[0] else ()
        self._replica = 0  # which replica's rows this rank holds: row-major over the batch dim's axes
        for axis in batch_axes:
            self._replica = self._replica * self._mesh[axis] + self.coords[axis]
        self._batch: tuple[torch.Tensor | None, ...] | None = None
        self._batch_is_shard = False
        self._streams: dict[str, Any] = {}
        self._pending: list[Work] = []
        self._sequence = {}
        self._collectives: dict[str, int] = {}  # group -> collectives issued over it so far
        self._outstanding: list[Work] = []
        self._outstanding_lock = threading.Lock()
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, references, item]
        self._state_storages: frozenset[int] = frozenset()
        self._carried: dict[str, torch.Tensor] = {}  # what a step's program hands to the next (`carry`)
        self.live_bytes = 0
        self.live_items = [0] * len(LIVE_ITEMS)
        self.peak_live_bytes = 0
        self.peak_live_items: tuple[int, ...] = (0,) * len(LIVE_ITEMS)
        self.sent_bytes: dict[str, int] = {}
        """Bytes this rank has sent to other ranks, by what sent them: `p2p` (sends), and
        `all_to_all <where>` (the slices for the other members of the group; the slice a rank
        keeps does not travel), `where` the model location the program names. Other
        collectives are not counted: their traffic depends on the algorithm."""
        self.recorder: Recorder | None = None
        """Set while tracing (`Executor(trace=...)`): records tasks, communications and waits."""
        self._issue_start: float | None = None  # while tracing: when the host began the issue being made

    # ------------------------------------------------------------ streams and events

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def stream(self, name: str):
        """The stream called `name`; "compute" is the device's default stream."""
        if name not in self._streams:
            if not self._cuda:
                self._streams[name] = CpuStream(name)
            elif name == "compute":
                self._streams[name] = torch.cuda.default_stream(self.device)
            else:
                self._streams[name] = torch.cuda.Stream(device=self.device)
        return self._streams[name]

    def on(self, stream):
        """Context manager: kernels launched inside run on `stream`."""
        if self._cuda:
            return torch.cuda.stream(stream)
        return contextlib.nullcontext()

    def launch(self, task: str, stage: int, pass_kind: str, microbatch: int | None, stream):
        """Context manager around one launch of stage function `task` (`exec.launch`): kernels
        inside run on `stream`, as with `on`. When tracing, the launch is recorded as a task
        of `stage`, `pass_kind` and `microbatch` (None for an update)."""
        self._microbatch = microbatch or 0
        if self.recorder is None:
            return self.on(stream)
        return self._traced_launch(task, stage, pass_kind, microbatch, stream)

    @contextlib.contextmanager
    def _traced_launch(self, task: str, stage: int, pass_kind: str, microbatch: int | None, stream):
        start = self.recorder.begin_task(task_name(task, microbatch), self._lane(stream))
        with self.on(stream):
            yield
        self.recorder.end_task(start, {"stage": stage, "pass": pass_kind, "microbatch": microbatch})

    def _lane(self, stream) -> str | None:
        """The name of `stream` (None: the stream of the running task)."""
        if stream is None:
            return None
        return next(name for name, s in self._streams.items() if s is stream)

    def seed_random(self, index: int) -> None:
        """Seeds torch's generators for random op `index` of the model's forward (its place
        among the forward's random ops) in the running task: from the job's seed, the step,
        the task's microbatch slice of the global batch (replica x microbatches + microbatch,
        the order one device accumulating over the same slices takes them) and `index`
        (`random_seed`). So a launch draws what every other launch draws, and what one device
        draws when it seeds the same way (`piperc.reference.train_eager(seed=)`)."""
        torch.manual_seed(random_seed(self.seed, self.step_index, self.slice_index(), index))

    def slice_index(self) -> int:
        """The slice of the global batch the running task works on (`par.slice_index`):
        replica x microbatches + microbatch, the order one device accumulating over the
        same slices takes them."""
        return self._replica * self._microbatches + self._microbatch

    def event_record(self, stream):
        """Records an event on `stream`: a point that `event_wait` can wait for."""
        if not self._cuda:
            return CpuEvent(stream)
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def event_wait(self, stream, event) -> None:
        """Makes later work on `stream` wait until `event` was reached."""
        if self._cuda:
            stream.wait_event(event)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        """Marks `tensor`, made on another stream, as used by `stream`: on CUDA its
        memory is not reused before the work queued on `stream` so far is done."""
        if self._cuda:
            tensor.record_stream(stream)

    # ------------------------------------------------------------ live bytes

    def produced(self, *tensors: torch.Tensor) -> None:
        """Counts tensors a launch made as live activations (a storage shared by
        several counts once; a view of state is not counted)."""
        self._count(tensors, _ACTIVATIONS)
        if self.recorder is not None:
            self.recorder.made(tensors)

    def produced_gradients(self, *tensors: torch.Tensor) -> None:
        """Counts tensors a launch made as live parameter gradients."""
        self._count(tensors, _GRADIENTS)
        if self.recorder is not None:
            self.recorder.made(tensors)

    def stashed(self, *tensors: torch.Tensor) -> None:
        """Counts weight versions an update has replaced but a later backward still reads
        (an asynchronous pipeline's weight stash) as live, until the program frees them."""
        self._count(tensors, _WEIGHT_STASH, force=True)

    def carry(self, name: str, tensor: torch.Tensor) -> None:
        """Hands `tensor` to this rank's next step under `name` (`exec.carry`): an
        asynchronous pipeline's in-flight activations and stashed weights."""
        batch = {t.untyped_storage().data_ptr() for t in self._batch or () if t is not None}
        if tensor.untyped_storage().data_ptr() in batch:  # a microbatch of the step's input: keep
            tensor = tensor.clone()  # its rows, not the whole global batch, into the next step
        self._carried[name] = tensor

    def carried(self, name: str, stash: bool = False) -> torch.Tensor:
        """Takes the tensor the previous step handed on under `name` (`exec.carried`) and
        counts it as live (a weight version if `stash`, else an activation), unless it views
        this step's state (the latest weights)."""
        if name not in self._carried:
            raise RuntimeError(
                f"rank {self.rank}: the program takes the carried value {name!r}, which the previous step did "
                f"not hand on (it holds {sorted(self._carried)}); a program that carries values between steps "
                "runs its first_step program first"
            )
        tensor = self._carried.pop(name)
        self._count((tensor,), _WEIGHT_STASH if stash else _ACTIVATIONS)  # a view of state is state
        return tensor

    def _count(self, tensors: Sequence[torch.Tensor], item: int, force: bool = False) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            entry = self._live.get(key)
            if entry is not None:
                entry[1] += 1
            elif force or key not in self._state_storages:
                size = storage.nbytes()
                self._live[key] = [size, 1, item]
                self._grow(size, item)

    def _grow(self, size: int, item: int) -> None:
        self.live_bytes += size
        self.live_items[item] += size
        if self.live_bytes > self.peak_live_bytes:
            self.peak_live_bytes = self.live_bytes
            self.peak_live_items = tuple(self.live_items)

    def _item_of(self, tensor: torch.Tensor) -> int:
        """The item a collective's result counts as: its input's (activations if uncounted)."""
        entry = self._live.get(tensor.untyped_storage().data_ptr())
        return _ACTIVATIONS if entry is None else entry[2]

    def _made(self, stream, tensors: Sequence[torch.Tensor], item: int) -> None:
        """Counts the results of a communication the program issued on `stream`."""
        if stream is not None:
            self._count(tensors, item)

    def _stage(self, work: Work, stream, *buffers: torch.Tensor) -> Work:
        """Counts the staging buffers `work` holds until its wait as communication
        buffers (a `source` that is its tensor, not a copy, is not one)."""
        if stream is not None and buffers:
            work.staged = sum(b.untyped_storage().nbytes() for b in buffers)
            self._grow(work.staged, _COMM_BUFFERS)
        return work

    def free(self, *tensors: torch.Tensor) -> None:
        """Releases the count of tensors the program frees (`exec.free`); tensors
        that were never counted (state, inputs) are ignored."""
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr()
            entry = self._live.get(key)
            if entry is None:
                continue
            if entry[1] > 1:
                entry[1] -= 1
                continue
            del self._live[key]
            self.live_bytes -= entry[0]
            self.live_items[entry[2]] -= entry[0]

    # ------------------------------------------------------------ inputs, state, outputs

    def input(self, index: int, microbatch: int) -> torch.Tensor:
        """This rank's microbatch `microbatch` of global input `index` for this step:
        the rank's part under the input's layout (each dimension cut by the mesh axes
        the layout names, at this rank's coordinates), then microbatch `microbatch`
        of `microbatches` equal slices of that part along dim 0."""
        if self._batch is None:
            raise RuntimeError(f"rank {self.rank}: rt.input() called outside a training step")
        if index not in self._readable_inputs:
            raise RuntimeError(
                f"rank {self.rank}: the program reads input {index} ({self._input_name(index)}), "
                f"but the manifest gives this rank only inputs {sorted(self._readable_inputs)}"
            )
        if not 0 <= microbatch < self._microbatches:
            raise RuntimeError(
                f"rank {self.rank}: microbatch {microbatch} is outside 0..{self._microbatches - 1}"
            )
        tensor = self._batch[index]
        # A shard (`shard()`) is already this rank's part; a global batch is cut here.
        if not self._batch_is_shard:
            try:
                tensor = local_part(tensor, self._input_layouts[index], self._mesh, self.coords, self._zigzag)
            except ValueError as e:
                raise RuntimeError(
                    f"rank {self.rank}: input {index} ({self._input_name(index)}): {e}"
                ) from None
        rows = tensor.shape[0]
        if rows % self._microbatches:
            raise RuntimeError(
                f"rank {self.rank}: input {index} ({self._input_name(index)}) has {rows} rows on "
                f"this rank, which do not split into {self._microbatches} microbatches"
            )
        size = rows // self._microbatches
        return tensor.narrow(0, microbatch * size, size).to(self.device).contiguous()

    def _input_name(self, index: int) -> str:
        return self._input_names[index] if 0 <= index < len(self._input_names) else "?"

    def state(self, name: str) -> torch.Tensor:
        """The current value of this rank's state tensor `name`."""
        if name not in self._state:
            raise KeyError(
                f"rank {self.rank} owns no state named {name!r}; it owns {sorted(self._state)}"
            )
        return self._state[name]

    def set_state(self, name: str, tensor: torch.Tensor) -> None:
        """Replaces this rank's state tensor `name` (same shape) with `tensor`."""
        old = self.state(name)
        if old.shape != tensor.shape:
            raise ValueError(
                f"rank {self.rank}: set_state({name!r}) with shape {tuple(tensor.shape)}, "
                f"but the state has shape {tuple(old.shape)}"
            )
        self._state[name] = tensor

    def output(self, name: str, tensor: torch.Tensor) -> None:
        """Reports a value to the host (the executor reads "loss")."""
        self.outputs[name] = tensor

    # ------------------------------------------------------------ point-to-point

    @_issuing
    def send(self, tensor: torch.Tensor, dst: int, group: str, tag: int, stream) -> Work:
        """Starts sending `tensor` to global rank `dst` of `group`. Transfers between
        two ranks match in issue order (NCCL ignores `tag`)."""
        what = f"send to rank {dst} (tag {tag}, group {group})"
        handle = self._member(group, what, peer=dst)
        self._next_tag(dst, self.rank)
        tensor = tensor.contiguous()
        with self.on(stream):
            work = dist.isend(tensor, dst, group=handle, tag=tag)
        return self._track(Work(what, work, [tensor]), stream, group, sends=((tensor, dst),))

    @_issuing
    def recv(
        self, shape: Sequence[int], dtype: torch.dtype, src: int, group: str, tag: int, stream
    ) -> tuple[Work, torch.Tensor]:
        """Starts receiving a `shape` x `dtype` tensor from global rank `src` of `group`."""
        what = f"recv from rank {src} (tag {tag}, group {group})"
        handle = self._member(group, what, peer=src)
        self._next_tag(self.rank, src)
        with self.on(stream):
            buffer = torch.empty(tuple(shape), dtype=dtype, device=self.device)
            work = dist.irecv(buffer, src, group=handle, tag=tag)
        self._count([buffer], _ACTIVATIONS)
        return self._track(Work(what, work, [buffer]), stream, group, recvs=((buffer, src),)), buffer

    def _next_tag(self, to: int, sender: int) -> int:
        """The sequence number of the next message from `sender` to `to` in this step.

        Messages between two ranks pair up in issue order; gloo pairs them by
        tag, so every message (plain or batched) carries its sequence number,
        which the compiler also writes as the tag of plain sends and receives.
        """
        key = (sender, to)
        self._sequence[key] = self._sequence.get(key, -1) + 1
        return self._sequence[key]

    @_issuing
    def batch_p2p(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[Sequence[int], torch.dtype, int]],
        group: str,
        stream,
    ) -> tuple[Work, list[torch.Tensor]]:
        """Starts sends `(tensor, dst)` and receives `(shape, dtype, src)` on `group`
        together (`batch_isend_irecv`), so none waits for another to be matched;
        returns one work for all of them and the receive buffers."""
        peers = sorted({dst for _, dst in sends} | {src for _, _, src in recvs})
        what = (
            f"batch of {len(sends)} send(s) and {len(recvs)} recv(s) with ranks {peers} "
            f"(group {group})"
        )
        handle = self._member(group, what)
        for peer in peers:
            self._member(group, what, peer=peer)
        with self.on(stream):
            sent = [(tensor.contiguous(), dst) for tensor, dst in sends]
            buffers = [
                torch.empty(tuple(shape), dtype=dtype, device=self.device) for shape, dtype, _ in recvs
            ]
            ops = [dist.P2POp(dist.isend, t, dst, group=handle, tag=self._next_tag(dst, self.rank))
                   for t, dst in sent]
            ops += [
                dist.P2POp(dist.irecv, b, src, group=handle, tag=self._next_tag(self.rank, src))
                for b, (_, _, src) in zip(buffers, recvs, strict=True)
            ]
            works = dist.batch_isend_irecv(ops)
        self._count(buffers, _ACTIVATIONS)
        work = Work(what, works, [t for t, _ in sent] + buffers)
        received = tuple(zip(buffers, (src for _, _, src in recvs), strict=True))
        return self._track(work, stream, group, sends=sent, recvs=received), buffers

    def _p2p_batch(self, what: str, ops: list, group: str, sends: Sequence[tuple[torch.Tensor, int]],
                   recvs: Sequence[tuple[torch.Tensor, int]], sent_as: str) -> Work:
        """Posts the `dist.P2POp`s `ops` together, inside a stage function (`stream=None`),
        as one work over `group`; their bytes count under `sent_as`."""
        work = Work(what, dist.batch_isend_irecv(ops), [t for t, _ in (*sends, *recvs)])
        return self._track(work, None, group, sends=sends, recvs=recvs, sent_as=sent_as)

    def zigzag_piece(self, tensor: torch.Tensor, dim: int, group: str) -> torch.Tensor:
        """This rank's zigzag piece of `tensor` along `dim` over `group` (a `par.all_slice` of a
        dimension the mesh cuts zigzag: chunks i and 2W-1-i of 2W, `runtime/zigzag.py`); nothing
        is sent."""
        ranks = self._groups[group].ranks
        return zigzag_pieces.piece(tensor, dim, len(ranks), ranks.index(self.rank))

    def ring_attention(self, *args, **kwargs):
        """Ring attention over a group, inside a stage function: `aten._scaled_dot_product_flash_
        attention_for_cpu`'s arguments, plus `group` and `where` (`runtime/ring.py`)."""
        from .ring import ring_attention

        return ring_attention(self, *args, **kwargs)

    def ring_attention_backward(self, *args, **kwargs):
        """The backward of `ring_attention` (`runtime/ring.py`)."""
        from .ring import ring_attention_backward

        return ring_attention_backward(self, *args, **kwargs)

    # ------------------------------------------------------------ collectives

    @_issuing
    def all_reduce(
        self, tensors: Sequence[torch.Tensor], group: str, op: str, stream
    ) -> tuple[Work, list[torch.Tensor]]:
        """Reduces a bucket of tensors over `group` with one collective.

        The tensors are flattened into one buffer; the returned tensors are views
        of it, holding the reduced values once the work was waited for.
        """
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        what = f"all_reduce {op} of {len(tensors)} tensor(s) over group {group}"
        handle = self._member(group, what)
        if not tensors:
            raise ValueError(f"rank {self.rank}: {what}: the bucket is empty")
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise ValueError(f"rank {self.rank}: {what}: a bucket needs one dtype, got {dtypes}")
        with self.on(stream):
            flat = torch.cat([t.reshape(-1) for t in tensors])
            torch_op, finish = self._reduction(op, flat, group, what)
            work = dist.all_reduce(flat, op=torch_op, group=handle, async_op=True)
        views = [
            v.view(t.shape)
            for v, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
        ]
        self._made(stream, views, _COMM_BUFFERS)
        return self._track(Work(what, work, [flat], finish), stream, group, f"all_reduce {op}", tensors), views

    @_issuing
    def all_gather(
        self, tensor: torch.Tensor, group: str, dim: int, stream, zigzag: bool = False
    ) -> tuple[Work, torch.Tensor]:
        """Concatenates every group member's `tensor` along `dim`, in group rank order; with
        `zigzag`, the members hold zigzag pieces (`runtime/zigzag.py`) and the result is put
        back in natural order."""
        what = f"all_gather along dim {dim} over group {group}"
        handle = self._member(group, what)
        n = len(self._groups[group].ranks)
        dim = dim % tensor.dim()
        shape = list(tensor.shape)
        shape[dim] *= n
        with self.on(stream):
            out = torch.empty(shape, dtype=tensor.dtype, device=self.device)
            self._made(stream, [out], self._item_of(tensor))
            if dim == 0 and not zigzag:
                work = _all_gather_single(out, tensor.contiguous(), group=handle, async_op=True)
                return self._track(Work(what, work, [out]), stream, group, "all_gather", (tensor,)), out
            gathered = torch.empty(
                (n * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=self.device
            )
            work = _all_gather_single(
                gathered, tensor.contiguous(), group=handle, async_op=True
            )

        def finish() -> None:
            whole = gathered.view(n, *tensor.shape).movedim(0, dim).reshape(shape)
            out.copy_(zigzag_pieces.from_ranks(whole, dim, n) if zigzag else whole)

        work = self._track(Work(what, work, [out, gathered], finish), stream, group, "all_gather", (tensor,))
        return self._stage(work, stream, gathered), out

    @_issuing
    def reduce_scatter(
        self, tensor: torch.Tensor, group: str, dim: int, op: str, stream, zigzag: bool = False
    ) -> tuple[Work, torch.Tensor]:
        """Reduces `tensor` over `group`; member i keeps slice i of `n` along `dim` (with
        `zigzag`, its zigzag piece: `runtime/zigzag.py`)."""
        what = f"reduce_scatter {op} along dim {dim} over group {group}"
        handle = self._member(group, what)
        n = len(self._groups[group].ranks)
        dim = dim % tensor.dim()
        if tensor.shape[dim] % n:
            raise ValueError(
                f"rank {self.rank}: {what}: dim {dim} of size {tensor.shape[dim]} "
                f"does not split into {n} equal slices"
            )
        shape = list(tensor.shape)
        shape[dim] //= n
        with self.on(stream):
            if zigzag:
                tensor = zigzag_pieces.to_ranks(tensor, dim, n)
            source = tensor.movedim(dim, 0).contiguous()
            piece = torch.empty(
                (shape[dim], *source.shape[1:]), dtype=tensor.dtype, device=self.device
            )
            torch_op, reduce_finish = self._reduction(op, piece, group, what)
            work = _reduce_scatter_single(
                piece, source, op=torch_op, group=handle, async_op=True
            )
            copies = [source] if _copied(source, tensor) else []
            if dim == 0:
                self._made(stream, [piece], self._item_of(tensor))
                work = self._track(
                    Work(what, work, [piece, source], reduce_finish), stream, group, f"reduce_scatter {op}", (tensor,)
                )
                return self._stage(work, stream, *copies), piece
            out = torch.empty(shape, dtype=tensor.dtype, device=self.device)
            self._made(stream, [out], self._item_of(tensor))

        def finish() -> None:
            if reduce_finish is not None:
                reduce_finish()
            out.copy_(piece.movedim(0, dim))

        work = self._track(
            Work(what, work, [out, piece, source], finish), stream, group, f"reduce_scatter {op}", (tensor,)
        )
        return self._stage(work, stream, piece, *copies), out

    @_issuing
    def all_gather_bucket(
        self, tensors: Sequence[torch.Tensor], group: str, stream
    ) -> tuple[Work, tuple[torch.Tensor, ...]]:
        """Gathers several tensors along dim 0 in one collective: each member's tensors are
        flattened into one buffer, the buffers gathered, and cut back into one tensor each."""
        what = f"all_gather of a bucket of {len(tensors)} tensors over group {group}"
        handle = self._member(group, what)
        n = len(self._groups[group].ranks)
        with self.on(stream):
            flat = torch.cat([t.reshape(-1) for t in tensors])
            gathered = torch.empty(n * flat.numel(), dtype=flat.dtype, device=self.device)
            work = _all_gather_single(gathered, flat, group=handle, async_op=True)
            outs = [torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=self.device) for t in tensors]
            self._made(stream, outs, self._item_of(tensors[0]))

        def finish() -> None:
            rows, offset = gathered.view(n, -1), 0
            for t, out in zip(tensors, outs, strict=True):
                out.view(n, -1).copy_(rows[:, offset:offset + t.numel()])
                offset += t.numel()

        work = self._track(Work(what, work, [*outs, gathered, flat], finish), stream, group, "all_gather", tensors)
        return self._stage(work, stream, gathered, flat), tuple(outs)

    @_issuing
    def reduce_scatter_bucket(
        self, tensors: Sequence[torch.Tensor], group: str, op: str, stream
    ) -> tuple[Work, tuple[torch.Tensor, ...]]:
        """Reduces several tensors over `group` in one collective; member i keeps slice i of
        `n` of each along dim 0."""
        what = f"reduce_scatter {op} of a bucket of {len(tensors)} tensors over group {group}"
        handle = self._member(group, what)
        n = len(self._groups[group].ranks)
        bad = [tuple(t.shape) for t in tensors if t.dim() == 0 or t.shape[0] % n]
        if bad:
            raise ValueError(f"rank {self.rank}: {what}: shapes {bad} do not split into {n} slices along dim 0")
        with self.on(stream):
            source = torch.cat([t.reshape(n, -1) for t in tensors], dim=1).reshape(-1)
            piece = torch.empty(source.numel() // n, dtype=source.dtype, device=self.device)
            torch_op, reduce_finish = self._reduction(op, piece, group, what)
            work = _reduce_scatter_single(piece, source, op=torch_op, group=handle, async_op=True)
            outs = [torch.empty((t.shape[0] // n, *t.shape[1:]), dtype=t.dtype, device=self.device) for t in tensors]
            self._made(stream, outs, self._item_of(tensors[0]))

        def finish() -> None:
            if reduce_finish is not None:
                reduce_finish()
            offset = 0
            for out in outs:
                out.view(-1).copy_(piece[offset:offset + out.numel()])
                offset += out.numel()

        work = self._track(
            Work(what, work, [*outs, piece, source], finish), stream, group, f"reduce_scatter {op}", tensors
        )
        return self._stage(work, stream, piece, source), tuple(outs)

    @_issuing
    def all_to_all(
        self, tensor: torch.Tensor, group: str, split_dim: int, concat_dim: int, stream, where: str = "",
        zigzag: tuple[bool, bool] = (False, False),
    ) -> tuple[Work, torch.Tensor]:
        """Sends slice i of `tensor` along `split_dim` to member i of `group` and
        concatenates what arrives along `concat_dim`, in group rank order; counts the
        slices for the others in `sent_bytes` under `all_to_all <where>`. `zigzag` says,
        for the split and the concatenated dimension, whether it is cut in zigzag pieces
        (`runtime/zigzag.py`): member i is then sent its zigzag piece, and the result is
        put back in natural order."""
        what = f"all_to_all split {split_dim} concat {concat_dim} over group {group}"
        handle = self._member(group, what)
        n = len(self._groups[group].ranks)
        split_dim, concat_dim = split_dim % tensor.dim(), concat_dim % tensor.dim()
        if tensor.shape[split_dim] % n:
            raise ValueError(
                f"rank {self.rank}: {what}: dim {split_dim} of size {tensor.shape[split_dim]} "
                f"does not split into {n} equal slices"
            )
        with self.on(stream):
            if zigzag[0]:
                tensor = zigzag_pieces.to_ranks(tensor, split_dim, n)
            source = tensor.movedim(split_dim, 0).contiguous()
            arrived = torch.empty_like(source)
            work = dist.all_to_all_single(arrived, source, group=handle, async_op=True)
            key = f"all_to_all {where}" if where else "all_to_all"
            self.sent_bytes[key] = self.sent_bytes.get(key, 0) + source.nbytes * (n - 1) // n
            pieces = [p.movedim(0, split_dim) for p in arrived.chunk(n)]
            shape = list(pieces[0].shape)
            shape[concat_dim] *= n
            out = torch.empty(shape, dtype=tensor.dtype, device=self.device)
            self._made(stream, [out], self._item_of(tensor))
            copies = [source] if _copied(source, tensor) else []

        def finish() -> None:
            if zigzag[1]:
                out.copy_(zigzag_pieces.from_ranks(torch.cat(pieces, dim=concat_dim), concat_dim, n))
            else:
                torch.cat(pieces, dim=concat_dim, out=out)

        work = self._track(Work(what, work, [out, arrived, source], finish), stream, group, "all_to_all", (tensor,))
        return self._stage(work, stream, arrived, *copies), out

    @_issuing
    def broadcast(
        self, tensor: torch.Tensor, group: str, src: int, stream
    ) -> tuple[Work, torch.Tensor]:
        """Every member of `group` gets global rank `src`'s `tensor`; elsewhere
        `tensor` only gives the shape and dtype of the result."""
        what = f"broadcast from rank {src} over group {group}"
        handle = self._member(group, what, peer=src, peer_may_be_self=True)
        with self.on(stream):
            buffer = tensor.contiguous() if src == self.rank else torch.empty_like(tensor)
            work = dist.broadcast(buffer, src, group=handle, async_op=True)
        self._made(stream, [buffer], self._item_of(tensor))
        return self._track(Work(what, work, [buffer]), stream, group, f"broadcast from {src}", (tensor,)), buffer

    def _reduction(self, op: str, buffer: torch.Tensor, group: str, what: str):
        """The torch reduce op for `op`, and what to do after the collective (gloo has
        no average: it sums, then divides by the group size)."""
        if op not in REDUCE_OPS:
            raise ValueError(f"rank {self.rank}: {what}: op {op!r} is not one of {REDUCE_OPS}")
        if op == "max":
            return dist.ReduceOp.MAX, None
        if op == "sum":
            return dist.ReduceOp.SUM, None
        if self._cuda:
            return dist.ReduceOp.AVG, None
        size = len(self._groups[group].ranks)
        return dist.ReduceOp.SUM, lambda: buffer.div_(size)

    # ------------------------------------------------------------ waiting

    def wait(self, *works: Work, stream=None) -> None:
        """Makes `stream` (default: the current stream) wait for each work; its
        results may be read there afterwards.

        On CUDA the host does not block: the stream waits for the NCCL work (NCCL's
        watchdog enforces the timeout). On CPU the host blocks, and RuntimeError
        names the op and this rank when the work failed or did not complete within
        the timeout. A waited work is no longer outstanding for `_end_step`, and on
        CPU it is released at once (the watchdog only tracks unfinished work).
        """
        for work in works:
            if work.done:
                continue
            start = self.recorder.now() if self.recorder is not None else 0.0
            with self.on(stream) if stream is not None else contextlib.nullcontext():
                self._wait_one(work)
            if self.recorder is not None:
                self.recorder.waited(work, start)
            work.done = True
            self.live_bytes -= work.staged
            self.live_items[_COMM_BUFFERS] -= work.staged
        self._pending = [w for w in self._pending if not w.done]
        if any(w.completed for w in works):  # CPU: release finished work (and its buffers) now
            with self._outstanding_lock:
                self._outstanding = [w for w in self._outstanding if not w.completed]

    def _wait_one(self, work: Work) -> None:
        try:
            for handle in work.handles:
                if self._cuda:
                    handle.wait()
                elif handle.wait(timeout=timedelta(seconds=self.timeout)) is False:
                    raise RuntimeError(f"timed out after {self.timeout:g} s")
        except RuntimeError as e:
            # The message carries the backend's error; its chained traceback adds nothing.
            raise RuntimeError(
                f"rank {self.rank}: {work.what} failed (timeout {self.timeout:g} s): {e}"
                + "".join(f"\nrank {self.rank}: {line}" for line in self._find_stuck(work))
            ) from None
        if work.finish is not None:
            work.finish()
        if self._cuda:
            current = torch.cuda.current_stream(self.device)
            for tensor in work.outputs:
                tensor.record_stream(current)
            return
        work.completed = True
        self.last_progress = time.monotonic()

    def poll_progress(self) -> float:
        """`last_progress`, after checking outstanding work for completion.

        On CUDA `wait` returns before the work is done, so progress is a work
        seen complete here (`is_completed()`, which never blocks), not the host
        returning from a wait. Safe to call from another thread (the watchdog).
        """
        if self._host_work:
            self.last_progress = time.monotonic()
        with self._outstanding_lock:
            outstanding = list(self._outstanding)
        finished = [w for w in outstanding if w.is_completed()]
        if finished:
            self.last_progress = time.monotonic()
            with self._outstanding_lock:
                self._outstanding = [w for w in self._outstanding if not w.completed]
        return self.last_progress

    @contextlib.contextmanager
    def host_work(self):
        """Marks work between steps that communicates on its own, with its own timeouts (a
        checkpoint's torch.distributed.checkpoint collectives and file I/O): the watchdog
        counts it as progress until it ends, however long a large model's save takes."""
        self._host_work += 1
        try:
            yield
        finally:
            self._host_work -= 1
            self.last_progress = time.monotonic()

    def _track(
        self,
        work: Work,
        stream,
        group: str,
        kind: str = "",
        data: Sequence[torch.Tensor] = (),
        *,
        sends: Sequence[tuple[torch.Tensor, int]] = (),
        recvs: Sequence[tuple[torch.Tensor, int]] = (),
        sent_as: str = "p2p",
    ) -> Work:
        """Notes `work` as in flight until its wait, and the peers it waits on. When tracing,
        also records its issue: a collective `kind` of `data` over `group`, or the transfers
        `sends` (tensor, dst) and `recvs` (buffer, src), whose bytes count in `sent_bytes`
        under `sent_as`."""
        if sends or recvs:
            work.peers = tuple(sorted({peer for _, peer in (*sends, *recvs)}))
            self.sent_bytes[sent_as] = self.sent_bytes.get(sent_as, 0) + sum(t.nbytes for t, _ in sends)
        else:
            work.peers = tuple(r for r in self._groups[group].ranks if r != self.rank)
            work.collective = (group, self._collectives.get(group, 0))
            self._collectives[group] = work.collective[1] + 1
        self._pending.append(work)
        with self._outstanding_lock:
            self._outstanding.append(work)
        if self.recorder is not None:
            self._record_issue(work, stream, group, kind, data, sends, recvs)
        return work

    def _record_issue(self, work: Work, stream, group: str, kind: str, data, sends, recvs) -> None:
        """Names a communication as `trace.py` documents and hands it to the recorder."""
        recorder = self.recorder
        start, self._issue_start = self._issue_start, None
        if sends or recvs:
            parts = [f"send {recorder.describe((t,))} -> {dst}" for t, dst in sends]
            parts += [f"recv <- {src}" for _, src in recvs]
            tensors = [t for t, _ in (*sends, *recvs)]
            peers = sorted({peer for _, peer in (*sends, *recvs)})
            args = {"peers": peers, "bytes": sum(t.nbytes for t in tensors), "group": group}
            recorder.issued(work, self._lane(stream), ", ".join(parts), "p2p", args, start)
            return
        args = {"bytes": sum(t.nbytes for t in data), "group": group}
        recorder.issued(work, self._lane(stream), f"{kind} {recorder.describe(data)} over {group}", "collective",
                        args, start)

    # ------------------------------------------------------------ finding a stuck rank

    def _find_stuck(self, work: Work, store: dist.Store | None = None) -> list[str]:
        """Lines saying which ranks `work` waited on are stuck, and where: this rank reports
        `work` in the job's `store` (default: the default group's), then reads the reports of
        its peers, and of the peers they wait on, for up to `REPORT_WAIT` s (at most the
        timeout). A rank without a report is stalled or dead."""
        if store is None:
            if not dist.is_initialized():
                return []
            store = dist.distributed_c10d._get_default_store()
        self.last_progress = time.monotonic()  # a bounded search: the watchdog leaves it alone
        wait = min(self.timeout, REPORT_WAIT)
        report = {"what": work.what, "peers": work.peers, "collective": work.collective}
        try:
            store.set(_report_key(self.rank), json.dumps(report))
        except RuntimeError as e:
            return [_store_lost(e)]
        asked, reports, lost = self._read_reports(store, work.peers, wait)
        lines = [_silent(p, wait, lost) for p in asked if p not in reports]
        same = [p for p in asked if p in reports and work.collective is not None
                and tuple(reports[p]["collective"] or ()) == work.collective]
        lines += [f"rank {p} is stuck in {reports[p]['what']}" for p in asked if p in reports and p not in same]
        if same:
            lines.append(f"ranks {same} fail in the same collective")
        return lines

    def _read_reports(self, store, peers: tuple[int, ...] | None, wait: float):
        """The ranks asked (`peers`, then the peers they report waiting on), the reports read
        within `wait` s, and the store's error if it stopped answering (its host exited)."""
        everyone = [r for r in range(self.world_size) if r != self.rank]
        asked = list(everyone if peers is None else peers)
        reports: dict[int, dict] = {}
        deadline = time.monotonic() + wait
        while len(reports) < len(asked) and time.monotonic() < deadline:
            try:
                arrived = [p for p in asked if p not in reports and store.check([_report_key(p)])]
                for p in arrived:
                    reports[p] = json.loads(store.get(_report_key(p)))
            except RuntimeError as e:
                return asked, reports, e
            for p in arrived:
                theirs = reports[p]["peers"]
                asked += [q for q in (everyone if theirs is None else theirs) if q != self.rank and q not in asked]
            time.sleep(0.1)
        return asked, reports, None

    def _member(self, group: str, what: str, peer: int | None = None, peer_may_be_self=False):
        """The torch handle of `group`, after checking that this rank (and `peer`) are in it."""
        if group not in self._groups:
            raise ValueError(
                f"rank {self.rank}: {what}: no process group {group!r}; "
                f"the manifest defines {sorted(self._groups)}"
            )
        g = self._groups[group]
        if self.rank not in g.ranks:
            raise ValueError(
                f"rank {self.rank}: {what}: this rank is not in group {group} {list(g.ranks)}"
            )
        if peer is not None and peer not in g.ranks:
            raise ValueError(
                f"rank {self.rank}: {what}: rank {peer} is not in group {group} {list(g.ranks)}"
            )
        if peer == self.rank and not peer_may_be_self:
            raise ValueError(
                f"rank {self.rank}: {what}: a rank cannot send to or receive from itself"
            )
        return g.handle

    # ------------------------------------------------------------ step boundaries (executor)

    def _begin_step(self, batch: tuple[torch.Tensor | None, ...], shard: bool = False, step: int = 0) -> None:
        self._batch = batch
        self.step_index = step
        self._batch_is_shard = shard
        self.outputs = {}
        self._pending = []
        self._sequence: dict[tuple[int, int], int] = {}
        self._live = {}
        self._state_storages = frozenset(t.untyped_storage().data_ptr() for t in self._state.values())
        self.live_bytes = 0
        self.live_items = [0] * len(LIVE_ITEMS)

    def _end_step(self) -> None:
        """Waits for work the program left in flight (sends nobody waited for)."""
        self.wait(*self._pending)
        self._batch = None
        self.last_progress = time.monotonic()


def _report_key(rank: int) -> str:
    """The store key under which `rank` reports the communication it failed in."""
    return f"piperc/stuck/rank{rank}"


def _rank0_serves_store() -> bool:
    """Whether rank 0's process serves the job's store (torchrun's agent serves it otherwise)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def _store_lost(error: Exception) -> str:
    """Why the stuck rank cannot be found when the job's store does not answer."""
    if _rank0_serves_store():
        return f"rank 0 is gone: the job's store, which rank 0 serves, does not answer ({error})"
    return f"cannot ask the other ranks which one is stuck: torchrun's store does not answer ({error})"


def _silent(rank: int, wait: float, lost: Exception | None) -> str:
    """What a rank that did not report is: stalled or dead, or gone with the store."""
    if lost is None:
        return f"rank {rank} is stalled or dead: it reported no failed communication within {wait:g} s"
    if rank == 0 and _rank0_serves_store():
        return f"rank 0 is gone: the job's store, which rank 0 serves, stopped answering ({lost})"
    return f"rank {rank} is stalled or dead, or had not reported when the job's store stopped answering ({lost})"


def random_seed(seed: int, step: int, piece: int, index: int) -> int:
    """The seed of random op `index` (its place among the forward's random ops) at `step` for
    microbatch slice `piece` of the global batch, under the job's `seed`: a hash of the four,
    so that neighbouring slices and steps draw unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{step}/{piece}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _copied(source: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether `source` (a rearranged `tensor`) is a copy rather than `tensor`'s own storage."""
    return source.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
