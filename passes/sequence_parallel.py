"""sequence-parallel: splits the model's sequences over a mesh axis, with Ulysses attention.

    sequence-parallel{axis=sp seq-dim=1}

Seeds, on the captured `@main` (forward and backward together), the layouts the sequence
split needs, and leaves the rest to `propagate-sharding{mesh-axes=<axis>}` and
`localise-shapes`, which the `piperc.sequence_parallel` directive runs after it (and
`unflatten-matmul` before it, so that linears keep the sequence dimension apart):

- every model input of rank > `seq-dim` (tokens, targets, positions, document ids) is laid
  out "dimension `seq-dim` split over the axis": each device holds its piece of every
  sequence, and the runtime cuts it so (`#par.sharding<[[], ["sp"]]>` for `[batch, seq]`);
- the loss and outputs are whole on every device: propagation resolves the loss's pending
  sum over the axis, and the gradients of the (replicated) parameters, which every device
  computes from its own tokens, are pending sums it resolves in the backward;
- Ulysses (DeepSpeed): each scaled-dot-product attention, forward and backward, reads its
  `[batch, heads, seq, ...]` operands through a `par.layout_cast` from "sequence split" to
  "heads split". Every device runs the whole sequence's attention for its heads, with the
  whole causal mask; each cast becomes one all_to_all after localisation. Propagation takes
  the casts as written and chooses the rest (the attention's results come out heads split,
  and move back to the sequence split where the next op needs it).

    %q2 = par.layout_cast %q @mesh from #par.sharding<[[], [], ["sp"], []]>
            to #par.sharding<[[], ["sp"], [], []]> because "ulysses: ..." : !torch.vtensor<[4,4,16,8],f32>
    %o, %lse = "torch.aten._scaled_dot_product_flash_attention_for_cpu"(%q2, %k2, %v2, ...)

Positions the model computes (`arange` over the sequence) stay global: a value derived from
an input's sequence dimension is split with it.

Ring attention (`method=ring`): each CPU flash attention, forward and backward, is marked
`piperc.ring = "sp"` and keeps its queries, keys and values sequence split (its sharding rule,
`sharding_rules.attention`, then splits queries and keys by separate factors and reads a
mask's key dimension whole). Inside it the keys and values travel around the axis (code
generation calls `Runtime.ring_attention` / `ring_attention_backward`, runtime/ring.py): each
device merges its queries' attention over every block it needs by log-sum-exp, skips the
blocks its mask hides, and sends a block on only while a later device needs it.

With `method=auto` the ops are marked as for ring, and `piperc.ring_method = "auto"`: each
call chooses, per batch, ring or Ulysses (all_to_alls inside the op), whichever sends fewer
bytes from its busiest rank given the batch's documents (`runtime/ring.py` `choose`).

Load balance (`balance`): under a causal mask the contiguous cut gives the last device the most
attention work (device r attends to r + 1 chunks). `balance=zigzag` cuts the sequence into 2W
chunks and gives device r chunks r and 2W-1-r; the pass declares it on the mesh, which the
layouts need not repeat:

    par.mesh @mesh #par.mesh<["sp"=2]> {par.zigzag = {sp = 8 : i64}}

Every cut over the axis of a dimension of that length is then zigzag (`par.ZIGZAG`): the
runtime's input cut, the pieces an arange or a whole value is cut into, the collectives over
the axis (a gathered value is back in natural order) and ring attention, which computes only
the pairs of chunks causality lets through. `balance=auto` (the default) chooses zigzag for
ring attention when every attention is causal without a mask, contiguous otherwise (a
document mask's short documents then stay within one device). `check-zigzag` (below) runs
once the layouts are final and withdraws a zigzag cut that a view of the sequence would break
(or, asked for, refuses it).

Errors (StrategyError naming the directive and the tensor): an input whose sequence length
does not divide over the axis (or, zigzag, into its 2W chunks); inputs split along the sequence
with different lengths; an attention whose heads do not divide over it (Ulysses); a model with
no scaled-dot-product attention.

Options: axis (default sp), seq_dim (the inputs' sequence dimension, default 1), method
(ulysses, ring or auto), balance (auto, zigzag or contiguous), directive
(quoted in errors). Requires: the mesh pass; runs on the captured `@main`, before it is split
into stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import (
    ArrayAttr,
    DictionaryAttr,
    IntAttr,
    IntegerAttr,
    ModuleOp,
    StringAttr,
)
from xdsl.ir import Operation
from xdsl.passes import ModulePass

from piperc.dialects.par import (
    LAYOUT,
    ZIGZAG,
    LayoutCastOp,
    MeshOp,
    ReshardOp,
    ShardingAttr,
    zigzag_lengths,
)
from piperc.dialects.roles import ARG_INPUT, main_function
from piperc.dialects.torch import ConstantNoneOp, ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL, find_axis
from piperc.passes.propagate_sharding import value_layout, where
from piperc.passes.sharding_rules import ATTENTION_OPS, RING, RING_METHOD, RING_OPS
from piperc.passes.tensor_parallel import seed_whole_results
from piperc.passes.unflatten_matmul import is_true

METHODS = ("ulysses", "ring", "auto")
"""The attention methods the pass builds."""
BALANCES = ("auto", "zigzag", "contiguous")
"""How the pass may cut the sequence (`balance`)."""

_HEADS, _SEQ = 1, 2
"""The head and sequence dimensions of attention's `[batch, heads, seq, ...]` tensors."""


def _causal_without_mask(op: Operation) -> bool:
    """Whether an attention op (forward or backward) is causal by its `is_causal` flag and reads
    no `attn_mask` (a none)."""
    names = [a.name for a in op.aten._schema.arguments]
    mask = op.operands[names.index("attn_mask")].owner if "attn_mask" in names else None
    return is_true(op.operands[names.index("is_causal")]) and (mask is None or isinstance(mask, ConstantNoneOp))


def _split(rank: int, dim: int, axis: str) -> ShardingAttr:
    return ShardingAttr([[axis] if d == dim else [] for d in range(rank)])


@dataclass(frozen=True)
class SequenceParallelPass(ModulePass):
    """Lays out the model inputs' sequence dimension over `axis`, the loss and outputs whole,
    and each attention's operands heads split (Ulysses; see the module docstring)."""

    name = "sequence-parallel"

    axis: str = "sp"
    seq_dim: int = 1
    method: str = "ulysses"
    balance: str = "auto"
    directive: str = "sequence-parallel"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.method not in METHODS:
            raise StrategyError(f"{self.directive}: method must be 'ulysses', 'ring' or 'auto', got {self.method!r}")
        if self.balance not in BALANCES:
            raise StrategyError(f"{self.directive}: balance must be 'auto', 'zigzag' or 'contiguous', got "
                                f"{self.balance!r}")
        mesh = find_axis(op, self.axis, self.directive)
        size = mesh.axis_size(self.axis)
        main = main_function(op)
        lengths = self.seed(main, size)
        attention = [o for o in main.body.block.ops if o.name in ATTENTION_OPS]
        if self.zigzag(attention, lengths):
            self.declare_zigzag(op, lengths.pop(), size)
        if not attention:
            how = "Ulysses splits attention by heads" if self.method == "ulysses" else "ring attention rewrites it"
            raise StrategyError(f"{self.directive}: the model has no scaled-dot-product attention; {how}, so "
                                "attention must go through torch.nn.functional.scaled_dot_product_attention")
        for o in attention:
            if self.method == "ulysses":
                self.ulysses(o, size)
            else:
                self.ring(o)
                if self.method == "auto":  # ring or Ulysses per batch, inside the op (runtime/ring.py)
                    o.attributes[RING_METHOD] = StringAttr("auto")

    def zigzag(self, attention: list[Operation], lengths: set[int]) -> bool:
        """Whether the sequence is cut zigzag: as `balance` says, or for "auto" when attention
        runs by ring, every attention is causal without a mask (with a mask, a contiguous cut
        keeps a pack's short documents within one device) and the split inputs share one
        length. An explicit zigzag needs that one length."""
        if self.balance == "zigzag" and len(lengths) > 1:
            raise StrategyError(f"{self.directive}: the model inputs' dimension {self.seq_dim} has lengths "
                                f"{sorted(lengths)}; a zigzag cut needs the inputs split along the sequence to share "
                                "its length")
        if self.balance != "auto":
            return self.balance == "zigzag"
        return (self.method == "ring" and bool(attention) and len(lengths) == 1
                and all(_causal_without_mask(o) for o in attention))

    def declare_zigzag(self, module: ModuleOp, length: int, size: int) -> None:
        """Declares on the mesh (`par.ZIGZAG`) that the axis cuts the sequence zigzag, after
        checking that the length divides into its 2W chunks."""
        if length % (2 * size):
            raise StrategyError(
                f"{self.directive}: a zigzag cut needs the sequence length to divide into {2 * size} chunks (two "
                f"per device of axis '{self.axis}'), but the model inputs' sequence is {length} long; use "
                "balance='contiguous' or a length that divides")
        mesh = next(o for o in module.ops if isinstance(o, MeshOp) and o.sym_name.data == MESH_SYMBOL)
        mesh.attributes[ZIGZAG] = DictionaryAttr({self.axis: IntegerAttr(length, 64)})

    def seed(self, main, size: int) -> set[int]:
        """Every input of rank > seq_dim split along it; the loss and outputs whole. Returns the
        split inputs' sequence lengths."""
        attrs = list(main.arg_attrs.data)
        split = 0
        lengths = set()
        for i, (attr, type_) in enumerate(zip(attrs, main.function_type.inputs.data, strict=True)):
            if ARG_INPUT not in attr.data or not isinstance(type_, ValueTensorType):
                continue
            shape = type_.get_shape()
            if len(shape) <= self.seq_dim:
                continue
            if shape[self.seq_dim] % size:
                index = attr.data[ARG_INPUT]
                raise StrategyError(
                    f"{self.directive}: model input {index.data if isinstance(index, IntAttr) else index} {type_} "
                    f"has sequence length {shape[self.seq_dim]} (dimension {self.seq_dim}), which does not divide "
                    f"over the {size} devices of axis '{self.axis}'")
            attrs[i] = DictionaryAttr({**attr.data, LAYOUT: _split(len(shape), self.seq_dim, self.axis)})
            split += 1
            lengths.add(shape[self.seq_dim])
        if not split:
            raise StrategyError(f"{self.directive}: no model input has a dimension {self.seq_dim} to split (the "
                                "sequence); give seq_dim")
        main.arg_attrs = ArrayAttr(attrs)
        seed_whole_results(main)
        return lengths

    def ring(self, op: Operation) -> None:
        """Marks `op` as ring attention over the axis (`RING`): its queries, keys and values stay
        sequence split, and the keys and values travel between the devices inside it (forward:
        `Runtime.ring_attention`; backward: `ring_attention_backward`). CPU flash attention only."""
        if op.name not in RING_OPS:
            raise StrategyError(f"{self.directive}: {where(op)} is {op.name}; ring attention rewrites the CPU "
                                f"flash attention ({', '.join(RING_OPS)})")
        op.attributes[RING] = StringAttr(self.axis)

    def ulysses(self, op: Operation, size: int) -> None:
        """Casts each `[batch, heads, seq, ...]` operand of `op` from sequence split to heads
        split (not the forward's results a backward reads: they are heads split already; not
        a mask shared by the heads, which the attention reads whole), checking that its
        heads divide over the axis."""
        heads = next(v.type.get_shape()[_HEADS] for v in op.operands if isinstance(v.type, ValueTensorType))
        for index, value in enumerate(op.operands):
            if not isinstance(value.type, ValueTensorType) or len(value.type.get_shape()) < 3:
                continue
            if isinstance(value.owner, Operation) and value.owner.name in ATTENTION_OPS:
                continue  # the forward's output and log-sum-exp, heads split already
            shape = value.type.get_shape()
            if shape[_HEADS] != heads:
                continue  # a mask shared by the heads ([batch, 1, seq, seq]): propagation keeps it whole
            if shape[_HEADS] % size:
                raise StrategyError(
                    f"{self.directive}: {where(op)} reads operand {index} {value.type} with {shape[_HEADS]} heads, "
                    f"which do not divide over the {size} devices of axis '{self.axis}' (Ulysses splits "
                    "attention by heads)")
            cast = LayoutCastOp(value, MESH_SYMBOL, _split(len(shape), _SEQ, self.axis),
                                _split(len(shape), _HEADS, self.axis),
                                f"ulysses: {where(op)}, operand {index} (sequence split to heads split)")
            op.parent_block().insert_op_before(cast, op)
            op.operands[index] = cast.result


@dataclass(frozen=True)
class CheckZigzagPass(ModulePass):
    """Checks, once the layouts are final, that no op of `@main` turns a zigzag cut over `axis`
    into a contiguous one locally (or back): a view that reshapes the sequence, such as
    `[b, s, d] -> [b, s/2, 2d]`, keeps each device's rows in zigzag order, but a dimension of
    another length is cut contiguously, so its later collectives, arange pieces and attention
    would mix the two. A layout cast is communication, so it may. Where an op does, a zigzag
    cut that `balance="auto"` chose is withdrawn (the sequence is cut contiguously, nothing
    else changes: layouts do not depend on the cut); one asked for is a StrategyError naming
    the op. Nothing to do where the mesh declares no zigzag cut.

    Options: axis, balance, directive. Requires: the layouts are final and localised (runs
    after localise-shapes, before the step is split into stages)."""

    name = "check-zigzag"

    axis: str = "sp"
    balance: str = "auto"
    directive: str = "sequence-parallel"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = next((o for o in op.ops if isinstance(o, MeshOp) and o.sym_name.data == MESH_SYMBOL), None)
        length = zigzag_lengths(mesh).get(self.axis) if mesh is not None else None
        if length is None:
            return
        sizes = {a: mesh.shape.axis_size(a) for a in mesh.shape.axis_names()}
        for o in main_function(op).body.walk():
            if isinstance(o, LayoutCastOp | ReshardOp):
                continue
            cuts = {zigzag for v in (*o.operands, *o.results) for zigzag in self.cuts(v, length, sizes)}
            if len(cuts) < 2:
                continue
            if self.balance == "zigzag":
                raise StrategyError(
                    f"{self.directive}: {where(o)} turns the zigzag cut of the sequence ({length} long) over axis "
                    f"'{self.axis}' into a cut of a dimension of another length, locally; use "
                    "balance='contiguous'")
            del mesh.attributes[ZIGZAG]
            return

    def cuts(self, value, length: int, sizes: dict[str, int]) -> list[bool]:
        """Per dimension of `value` cut over the axis: whether the cut is zigzag (the dimension,
        whole at that cut, is `length` long)."""
        if not isinstance(value.type, ValueTensorType):
            return []
        layout = value_layout(value)
        out = []
        for dim, local in enumerate(value.type.get_shape()):
            axes = layout.dim_axes(dim)
            if self.axis in axes:
                out.append(local * math.prod(sizes[a] for a in axes[axes.index(self.axis):]) == length)
        return out
