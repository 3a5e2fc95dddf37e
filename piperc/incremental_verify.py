"""Verifying a module again after a pass, re-checking only what the pass may have changed.

Every pass verifies its output, and most of a module (the model's ATen ops, their
constants and lists, the stage functions, a rank program's frees and state reads) comes
out of most passes untouched. `IncrementalVerifier.verify(module)` accepts and rejects
exactly what `module.verify()` does, with the same errors, but skips an op's own checks
(`verify_`: IRDL's operand, result, region and property checks, the op's traits and its
own verifier) when

- its class is in `LOCAL_OPS`: its own checks read only the op and the ops nested in it;
- nothing they read changed since this verifier last accepted the op: the op's operands,
  their types, its results and their types, its properties and attributes, the block
  that holds it, its regions, their blocks and block arguments; and every op nested in
  it, at any depth, is unchanged in the same sense and in the same order.

The last op of a block is still checked for ending its block as a terminator, and the
structural rules (parent pointers, empty blocks, erased operands, successors) hold for
every op: they depend only on what the skip condition compares. Ops of other classes
(calls, returns, tasks, collectives: anything that resolves a symbol or reads its
parent) are checked in full every time.
"""

from __future__ import annotations

from operator import attrgetter

from xdsl.dialects import builtin, func
from xdsl.ir import Block, Operation, Region
from xdsl.traits import IsTerminator, NoTerminator
from xdsl.utils.exceptions import VerifyException

from piperc.dialects import exec as exec_
from piperc.dialects import par, torch

LOCAL_OPS: tuple[type[Operation], ...] = (
    torch.AtenOp,
    torch.ConstantIntOp,
    torch.ConstantFloatOp,
    torch.ConstantBoolOp,
    torch.ConstantNoneOp,
    torch.ConstantStrOp,
    torch.ConstantDeviceOp,
    torch.ListConstructOp,
    torch.ListUnpackOp,
    torch.OperatorOp,
    par.SetStateOp,
    par.ProgramOp,
    exec_.ProgramOp,
    exec_.StreamOp,
    exec_.EventRecordOp,
    exec_.EventWaitOp,
    exec_.LaunchOp,
    exec_.WaitOp,
    exec_.RecordStreamOp,
    exec_.FreeOp,
    exec_.LoadInputOp,
    exec_.StateOp,
    exec_.SetStateOp,
    exec_.OutputOp,
    func.FuncOp,
)
"""Op classes whose own checks (`verify_`, with IRDL's generic checks and the traits) read
only the op itself and the ops nested in it (`func.func`'s IsolatedFromAbove walks its body;
`exec.program` checks its ops' order). An op class whose verifier starts reading anything
else (its parent, a symbol it names, the module's mesh) must leave this list."""

_TYPE = attrgetter("_type")


class IncrementalVerifier:
    """Verifies modules like `Operation.verify`, remembering what it accepted.

    One verifier follows one module through a pipeline: every `verify` walks the whole
    module and checks its structure, but skips the own checks of the unchanged ops of
    `LOCAL_OPS` (see the module docstring).
    """

    def __init__(self) -> None:
        # id(op) -> what the op's checks read, as last accepted. An id is not reused while
        # its entry lives: the entry holds the op's results, and they hold the op.
        self._accepted: dict[int, tuple] = {}
        self._block_ops: dict[Block, tuple[Operation, ...]] = {}
        self._local: dict[type[Operation], bool] = {}

    def verify(self, module: builtin.ModuleOp) -> None:
        """Raises what `module.verify()` raises when the module does not verify."""
        accepted: dict[int, tuple] = {}
        block_ops: dict[Block, tuple[Operation, ...]] = {}
        self._verify_regions(module, accepted, block_ops)
        module.verify(verify_nested_ops=False)
        self._accepted, self._block_ops = accepted, block_ops

    def _verify_regions(self, op: Operation, accepted: dict[int, tuple],
                        block_ops: dict[Block, tuple[Operation, ...]]) -> bool:
        """`Region.verify` for each region of `op`; True if nothing in them changed.

        `Operation.verify` checks an op's own position (operands not erased, successors,
        terminator) before its nested ops and its own checks after them; here both come
        after them, which changes nothing but which of two errors is reported when both the
        op's position and a nested op are wrong.
        """
        unchanged = True
        for region in op.regions:
            for block in region.blocks:
                unchanged = self._verify_block(block, accepted, block_ops) and unchanged
                if block.parent is not region:
                    raise ValueError("Parent pointer of block does not refer to containing region")
        return unchanged

    def _verify_block(self, block: Block, accepted: dict[int, tuple],
                      block_ops: dict[Block, tuple[Operation, ...]]) -> bool:
        """`Block.verify`, skipping the own checks of unchanged local ops; True if nothing
        in the block changed (its ops, their order, the ops nested in them)."""
        previous = self._accepted
        local = self._local
        last = block.last_op
        ops = []
        unchanged = True
        op = block.first_op
        while op is not None:
            if op.parent is not block:
                raise ValueError("Parent pointer of operation does not refer to containing region")
            ops.append(op)
            # Private fields: the public properties are Python calls, some building a new
            # sequence per call, and this runs for every op after every pass.
            operands, results, props = op._operands, op.results, op.properties
            key = (
                type(op), block, operands, results, op.regions, op._successors,
                *map(_TYPE, operands), *map(_TYPE, results),
                len(props), *props.items(), *op.attributes.items(),
            )  # fmt: skip
            if op.regions:
                key += _region_structure(op.regions)
            same = previous.get(id(op)) == key
            if op.regions:
                same = self._verify_regions(op, accepted, block_ops) and same
            is_local = local.get(type(op))
            if is_local is None:
                is_local = local[type(op)] = issubclass(type(op), LOCAL_OPS)
            if not (same and is_local) or op._successors or (op is last and not _may_end_block(op, block)):
                op.verify(verify_nested_ops=False)
            accepted[id(op)] = key
            unchanged = unchanged and same
            op = op._next_op
        block_ops[block] = tuple(ops)
        if last is None:
            _verify_empty_block(block)
        return unchanged and self._block_ops.get(block) == block_ops[block]


def _region_structure(regions: tuple[Region, ...]) -> tuple:
    """The blocks of `regions`, each with its arguments and their types."""
    structure = []
    for region in regions:
        for block in region.blocks:
            structure += (block, block.args, *[a.type for a in block.args])
        structure.append(None)
    return tuple(structure)


def _may_end_block(op: Operation, block: Block) -> bool:
    """True if `op`, the last op of `block`, passes `Operation.verify`'s terminator check."""
    region = block.parent
    if region is None or op.has_trait(IsTerminator):
        return True
    if len(region.blocks) > 1:
        return False
    return region.parent is None or region.parent.has_trait(NoTerminator)


def _verify_empty_block(block: Block) -> None:
    """`Block.verify`'s check of an empty block."""
    region = block.parent
    parent_op = region.parent if region is not None else None
    if parent_op is not None and len(region.blocks) == 1 and not parent_op.has_trait(NoTerminator):
        raise VerifyException(
            f"Operation {parent_op.name} contains empty block in "
            "single-block region that expects at least a terminator"
        )
