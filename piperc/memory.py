"""Predicted peak memory of every rank, read from its `exec.program`.

`predict_memory(module)` walks each rank's program in order and keeps the count the
runtime keeps while it runs the program (`piperc.runtime.comm.Runtime.produced`
and `free`), so that prediction and measurement agree by construction on what
they count:

  * state: one tensor per `exec.state` name, at the local shape the op carries
    (so state held in parts counts its part). A state the update reads as
    optimizer state (`state:` key) is optimizer state; the rest are parameters
    (and model buffers);
  * a launch (but not an update, whose results become state) makes its results
    live. Results that are views of the same tensor share one storage, counted
    once at the size of that tensor; a result that is a view of state is state,
    not counted again (views come from the ATen schemas' alias annotations in
    the callee's body). Results with a `grad:` key are gradients, the rest
    activations;
  * a receive makes an activation; a bucketed all-reduce one flat communication
    buffer that its results view; other collectives a result of the kind of
    their input, plus the staging copies the runtime allocates (held until the
    collective's `exec.wait`);
  * `exec.free` releases a storage once every value counted on it is freed;
  * an asynchronous pipeline's weight stash: the weights an update replaces that a later
    backward still reads (`exec.stashed_operands`), and the weights a step takes from the
    previous one (`exec.carried ... stash`); its other carried values are activations.
    A carried value handed on (`exec.carry`) stays counted to the end of the program.

A rank with several phases' programs (first, step, drain) peaks at the largest of them.

The peak is the largest sum over the program; its items are their values there.
Temporaries inside a launch (a stage function's intermediates) are not in the
count, as they are not in the runtime's.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import BlockArgument, Operation, SSAValue

from piperc.dialects import exec as ex
from piperc.dialects import par
from piperc.dialects import torch as t
from piperc.passes.outline_stages import arg_keys, result_keys
from piperc.runtime.comm import LIVE_ITEMS
from piperc.runtime.launch import PeakMemory, mib

__all__ = ["PeakMemory", "memory_table", "predict_memory"]

_GRADIENTS, _ACTIVATIONS, _COMM_BUFFERS, _WEIGHT_STASH = range(len(LIVE_ITEMS))


_SHARES_STORAGE_UNANNOTATED = ("torch.aten._unsafe_view",)
"""ATen ops whose result shares its first operand's storage without saying so in the schema."""


def predict_memory(module: ModuleOp) -> list[PeakMemory]:
    """The predicted peak memory of every `exec.program` of `module`, in rank order."""
    functions = {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}
    views: dict[str, list[int | SSAValue]] = {}
    peaks: dict[int, PeakMemory] = {}
    programs = [p for p in module.ops if isinstance(p, ex.ProgramOp)]
    handed: dict[int, dict[str, tuple[int, int, str | None]]] = {}  # rank -> carried name -> (storage, bytes, state)
    for program in programs:
        if program.phase_name() == "step" and any(isinstance(o, ex.CarryOp) for o in program.body.block.ops):
            count = _LiveCount(program, functions, views)
            count.run()
            handed[program.rank.value.data] = count.handed
    for program in programs:  # a rank's largest phase
        peak = _LiveCount(program, functions, views, handed.get(program.rank.value.data, {})).run()
        rank = program.rank.value.data
        if rank not in peaks or peak.total > peaks[rank].total:
            peaks[rank] = peak
    return [peaks[rank] for rank in sorted(peaks)]


def memory_table(predicted: Sequence[PeakMemory], measured: Sequence[PeakMemory] | None = None) -> str:
    """Per rank, the items of its predicted peak (and its measured one, with the
    measured total's difference from the prediction), in MiB."""
    blocks = []
    for rank, guess in enumerate(predicted):
        actual = measured[rank] if measured is not None else None
        lines = [f"rank {rank}: predicted peak at {guess.at}",
                 f"  {'item':<20}{'predicted MiB':>14}" + (f"{'measured MiB':>14}" if actual else "")]
        for item in (*PeakMemory.ITEMS, "total"):
            if item == "weight_stash" and not guess.weight_stash and not (actual and actual.weight_stash):
                continue
            line = f"  {item.replace('_', ' '):<20}{mib(getattr(guess, item)):>14}"
            if actual is not None:
                line += f"{mib(getattr(actual, item)):>14}"
                if item == "total":
                    line += f"  ({(actual.total - guess.total) / max(guess.total, 1):+.1%})"
            lines.append(line)
        if actual is not None and actual.cuda_max_allocated is not None:
            lines.append(f"  {'cuda max allocated':<20}{'':>14}{mib(actual.cuda_max_allocated):>14}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


class _Storage:
    """Memory the count tracks: its size, how many live values it counts, their item."""

    __slots__ = ("size", "refs", "item", "state")

    def __init__(self, size: int, item: int = _ACTIVATIONS, state: bool = False):
        self.size = size
        self.refs = 0
        self.item = item
        self.state = state


class _LiveCount:
    """The runtime's live count, kept over one program without running it."""

    def __init__(self, program: ex.ProgramOp, functions: dict[str, func.FuncOp],
                 views: dict[str, list[int | SSAValue]], carried: dict[str, tuple[int, int, str | None]] | None = None):
        self.program = program
        self.carried = carried or {}  # carried name -> (storage group, bytes, state): views share one
        self.carried_storage: dict[int, _Storage] = {}
        self.handing: list[tuple[str, _Storage]] = []  # what this program hands on
        self.state_names: dict[int, str] = {}  # storage read as state -> its name
        self.state_storage: dict[str, _Storage] = {}  # state name -> its storage in this program
        self.stored: dict[str, int] = {}  # state name -> the storage this program stores
        self.functions = functions
        self.views = views
        self.storage: dict[SSAValue, _Storage] = {}
        self.staged: dict[Operation, int] = {}
        self.live = [0] * len(LIVE_ITEMS)
        self.peak = -1
        self.peak_items: tuple[int, ...] = (0,) * len(LIVE_ITEMS)
        self.peak_at = ""

    def run(self) -> PeakMemory:
        """The program's predicted peak."""
        for i, op in enumerate(self.program.body.block.ops):
            self.step(op)
            if sum(self.live) > self.peak:
                self.peak, self.peak_items, self.peak_at = sum(self.live), tuple(self.live), _describe(i, op)
        parameters, optimizer_state = self.state_bytes()
        return PeakMemory(parameters, optimizer_state, *self.peak_items, at=self.peak_at)

    @property
    def handed(self) -> dict[str, tuple[int, int, str | None]]:
        """What the program hands on: carried name -> (its storage, bytes, the state name that
        storage is in the next step: stored by this program, or read as state and not replaced;
        None for any other tensor)."""
        stored = {storage: name for name, storage in self.stored.items()}
        found = {}
        for name, storage in self.handing:
            state = stored.get(id(storage))
            if state is None and storage.state and self.state_names.get(id(storage)) not in self.stored:
                state = self.state_names.get(id(storage))
            found[name] = (id(storage), storage.size, state)
        return found

    def state_bytes(self) -> tuple[int, int]:
        """Bytes of the parameters and of the optimizer state the program reads."""
        sizes: dict[str, int] = {}
        optimizer: set[str] = set()
        for op in self.program.body.block.ops:
            if isinstance(op, ex.StateOp):
                sizes.setdefault(op.state_name.data, op.output.type.nbytes())
            elif isinstance(op, ex.LaunchOp):
                keys = arg_keys(self.functions[op.callee.root_reference.data])
                for value, key in zip(op.args, keys, strict=True):
                    if isinstance(value.owner, ex.StateOp) and key.startswith("state:"):
                        optimizer.add(value.owner.state_name.data)
        return (sum(b for name, b in sizes.items() if name not in optimizer),
                sum(b for name, b in sizes.items() if name in optimizer))

    # ------------------------------------------------------------ the count

    def storage_of(self, value: SSAValue) -> _Storage:
        if value not in self.storage:
            self.storage[value] = _Storage(value.type.nbytes())
        return self.storage[value]

    def grow(self, size: int, item: int) -> None:
        self.live[item] += size

    def count(self, values: Sequence[SSAValue], item: int, force: bool = False) -> None:
        """`Runtime._count`: each value counts once more on its storage (state too if `force`)."""
        for value in values:
            storage = self.storage_of(value)
            if storage.state and not force:
                continue
            if storage.refs == 0:
                storage.item = item
                self.grow(storage.size, item)
            storage.refs += 1

    def free(self, values: Sequence[SSAValue]) -> None:
        """`Runtime.free`."""
        for value in values:
            storage = self.storage_of(value)
            if storage.refs == 0:
                continue
            storage.refs -= 1
            if storage.refs == 0:
                self.live[storage.item] -= storage.size

    def item_of(self, value: SSAValue) -> int:
        """`Runtime._item_of`: the item of a counted storage, activations otherwise."""
        storage = self.storage_of(value)
        return storage.item if storage.refs else _ACTIVATIONS

    def stage(self, op: Operation, size: int) -> None:
        """Staging buffers `op` holds until its wait."""
        self.staged[op] = size
        self.grow(size, _COMM_BUFFERS)

    # ------------------------------------------------------------ one op

    def step(self, op: Operation) -> None:
        if isinstance(op, ex.StateOp):
            name = op.state_name.data
            self.storage[op.output] = self.state_storage.setdefault(name, _Storage(op.output.type.nbytes(), state=True))
            self.state_names[id(self.storage[op.output])] = name
        elif isinstance(op, ex.SetStateOp):
            self.stored[op.state_name.data] = id(self.storage_of(op.value))
        elif isinstance(op, ex.LaunchOp):
            self.launch(op)
            if op.pass_kind.data == "update":  # `Runtime.stashed`
                keys = arg_keys(self.functions[op.callee.root_reference.data])
                self.count(ex.stashed_operands(op, keys), _WEIGHT_STASH, force=True)
        elif isinstance(op, ex.CarriedOp):
            group = self.carried.get(op.carry_name.data)
            if group is not None:  # the tensor it views, which other carried values may view too;
                # a view of what is state in this step (the latest weights) is that state
                if group[2] is not None:
                    storage = self.state_storage.setdefault(group[2], _Storage(group[1], state=True))
                else:
                    storage = self.carried_storage.setdefault(group[0], _Storage(group[1]))
                self.storage[op.output] = storage
            self.count([op.output], _WEIGHT_STASH if op.stash is not None else _ACTIVATIONS)
        elif isinstance(op, ex.CarryOp):
            self.handing.append((op.carry_name.data, self.storage_of(op.value)))
        elif isinstance(op, ex.RecvOp):
            self.count([op.output], _ACTIVATIONS)
        elif isinstance(op, ex.BatchP2POp):
            self.count(list(op.recvs), _ACTIVATIONS)
        elif isinstance(op, ex.AllReduceOp):
            bucket = _Storage(sum(v.type.nbytes() for v in op.inputs))
            for value in op.outputs:
                self.storage[value] = bucket
            self.count(list(op.outputs), _COMM_BUFFERS)
        elif isinstance(op, ex.AllGatherOp):
            self.count([op.output], self.item_of(op.input))
            if op.dim.value.data != 0:
                self.stage(op, op.output.type.nbytes())
        elif isinstance(op, ex.ReduceScatterOp):
            dim = op.dim.value.data
            self.count([op.output], self.item_of(op.input))
            piece = op.output.type.nbytes() if dim != 0 else 0
            self.stage(op, piece + _copy_bytes(op.input, dim))
        elif isinstance(op, ex.AllToAllOp):
            self.count([op.output], self.item_of(op.input))
            self.stage(op, op.input.type.nbytes() + _copy_bytes(op.input, op.split_dim.value.data))
        elif isinstance(op, ex.BroadcastOp):
            if op.src.value.data == self.program.rank.value.data:
                self.storage[op.output] = self.storage_of(op.input)
            self.count([op.output], self.item_of(op.input))
        elif isinstance(op, ex.WaitOp):
            for work in op.works:
                self.live[_COMM_BUFFERS] -= self.staged.pop(work.owner, 0)
        elif isinstance(op, ex.FreeOp):
            self.free(list(op.buffers))

    def launch(self, op: ex.LaunchOp) -> None:
        """Results take the storage the callee gives them (an argument's, or a new one
        per distinct tensor it makes); all but an update's are counted, non-gradients
        first (as the generated code calls `rt.produced`, then `rt.produced_gradients`)."""
        callee = op.callee.root_reference.data
        if callee not in self.views:
            self.views[callee] = _result_views(self.functions[callee])
        made: dict[SSAValue, _Storage] = {}
        for result, view in zip(op.outs, self.views[callee], strict=True):
            if isinstance(view, int):
                self.storage[result] = self.storage_of(op.args[view])
            else:
                self.storage[result] = made.setdefault(view, _Storage(view.type.nbytes()))
        if op.pass_kind.data == "update":
            return
        grads = {r for r, key in zip(op.outs, result_keys(self.functions[callee]), strict=True)
                 if key.startswith("grad:")}
        self.count([r for r in op.outs if r not in grads], _ACTIVATIONS)
        self.count([r for r in op.outs if r in grads], _GRADIENTS)


def _copy_bytes(value: SSAValue, dim: int) -> int:
    """Bytes of the copy the runtime makes to bring `dim` of a (contiguous) tensor to the
    front: none when every dimension before it has size 1."""
    shape = value.type.get_shape()
    return value.type.nbytes() if any(size != 1 for size in shape[:dim]) else 0


def _result_views(fn: func.FuncOp) -> list[int | SSAValue]:
    """For each result of `fn`, what holds its memory: the index of the argument it is a
    view of, or the tensor made inside `fn` that it is (a view of)."""
    base: dict[SSAValue, SSAValue] = {arg: arg for arg in fn.args}
    for op in fn.body.block.ops:
        for i, result in enumerate(op.results):
            source = _viewed_operand(op, i)
            base[result] = result if source is None else base.get(source, source)
    ret = fn.body.block.last_op
    assert ret is not None
    out: list[int | SSAValue] = []
    for value in ret.operands:
        root = base.get(value, value)
        if isinstance(root, BlockArgument) and root.owner is fn.body.block:
            out.append(root.index)
        elif isinstance(root.type, t.ValueTensorType):
            out.append(root)
        else:
            out.append(value)
    return out


def _viewed_operand(op: Operation, index: int) -> SSAValue | None:
    """The operand whose storage result `index` of `op` shares, if any: by the ATen
    schema's alias annotation (`Tensor(a) self -> Tensor(a)`, also for lists), an
    element of an unpacked list of views, or a `par.all_slice` piece (not a zigzag one)."""
    if isinstance(op, t.ListUnpackOp):
        return op.operands[0]
    if isinstance(op, par.AllSliceOp):  # a contiguous piece is a view; a zigzag one a new tensor
        return None if any(par.zigzag_cuts(op)) else op.operands[0]
    if not isinstance(op, t.AtenOp):
        return None
    if op.name in _SHARES_STORAGE_UNANNOTATED:
        return op.operands[0]
    schema = op.aten._schema
    alias = schema.returns[index].alias_info
    if alias is None:
        return None
    for operand, argument in zip(op.operands, schema.arguments, strict=True):
        if argument.alias_info is not None and (not alias.before_set or alias.before_set & argument.alias_info.before_set):
            return operand
    return None


def _describe(index: int, op: Operation) -> str:
    """Where a peak is: `op #12 exec.launch @s0_B (stage 0, pass B, microbatch 1)`."""
    if isinstance(op, ex.LaunchOp):
        where = f"stage {op.stage.value.data}, pass {op.pass_kind.data}"
        if op.microbatch is not None:
            where += f", microbatch {op.microbatch.value.data}"
        return f"op #{index} {op.name} @{op.callee.root_reference.data} ({where})"
    return f"op #{index} {op.name}"
