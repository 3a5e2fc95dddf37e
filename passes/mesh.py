"""mesh: declares the device mesh (`par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>`).

Option `shape`: named axes with sizes, `pp=2,dp=2` (first axis slowest).
Strategy passes refer to the mesh by its symbol `@mesh` and to its axes by
name. Requires: nothing; replaces an existing `@mesh`.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass

from piperc.dialects.par import MeshAttr, MeshOp
from piperc.errors import StrategyError

MESH_SYMBOL = "mesh"


def parse_shape(text: str) -> list[tuple[str, int]]:
    """`pp=2,dp=2` -> [("pp", 2), ("dp", 2)]; raises StrategyError on bad text."""
    axes = []
    for part in text.split(","):
        name, _, size = part.strip().partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise StrategyError(f"mesh: '{part.strip()}' is not an axis; write name=size, e.g. dp=2")
        if name in (a for a, _ in axes):
            raise StrategyError(f"mesh: axis '{name}' appears twice in '{text}'")
        axes.append((name, int(size)))
    return axes


def find_mesh(module: ModuleOp) -> MeshAttr:
    """The shape of `@mesh`; raises StrategyError if the module declares none."""
    for op in module.ops:
        if isinstance(op, MeshOp) and op.sym_name.data == MESH_SYMBOL:
            return op.shape
    raise StrategyError("no device mesh is declared; run the mesh pass first")


def find_axis(module: ModuleOp, axis: str, directive: str) -> MeshAttr:
    """The shape of `@mesh` (`find_mesh`); raises StrategyError naming `directive` if it has
    no axis `axis`."""
    mesh = find_mesh(module)
    if axis not in mesh.axis_names():
        raise StrategyError(f"{directive}: axis '{axis}' is not in the mesh {list(mesh.axis_names())}")
    return mesh


@dataclass(frozen=True)
class MeshPass(ModulePass):
    """Inserts `par.mesh @mesh` at the top of the module. Option: shape (`pp=2,dp=2`)."""

    name = "mesh"

    shape: str = "dp=1"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = MeshOp(MESH_SYMBOL, MeshAttr(parse_shape(self.shape)))
        for old in list(op.ops):
            if isinstance(old, MeshOp) and old.sym_name.data == MESH_SYMBOL:
                old.detach()
                old.erase()
        first = op.body.block.first_op
        if first is None:
            op.body.block.add_op(mesh)
        else:
            op.body.block.insert_op_before(mesh, first)
