"""lower-collectives: declares the process groups that collectives inside stage functions run on.

A stage function may hold `par` collectives over a mesh axis (`par.all_reduce`,
`all_gather`, `reduce_scatter`, `all_to_all`, `all_slice`, as `lower-reshard`
writes them), and ring attention (an attention op marked `piperc.ring = "<axis>"`). Every rank that launches the function runs each of them over its
own group along the axis. For every mesh axis such a collective names, this
pass declares one group per set of ranks along that axis, tagged with the axis:

    exec.process_group @dp_0 ranks [0, 1] axis "dp"

Ranks are in axis order, so a rank's position in its group is its coordinate
on the axis (the piece `par.all_slice` keeps, the place `par.all_gather` puts
its piece). The groups follow those `lower-to-exec` declared, so every rank
creates them in the same order. Code generation gives each rank program a
table from axis to the group holding the rank.

Options: none. Requires: lower-to-exec has run; lower-reshard has run on the
stage functions (no `par.reshard` is left in them).
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.traits import SymbolOpInterface

from piperc.dialects import exec as ex
from piperc.dialects import par
from piperc.errors import PassError
from piperc.passes.mesh import MESH_SYMBOL, find_mesh
from piperc.passes.sharding_rules import RING


def function_collective_axes(module: ModuleOp) -> list[str]:
    """The mesh axes that collectives inside the module's functions run over, in mesh order.

    Raises PassError for a `par.reshard` still in a function, or a collective over
    another mesh than `@mesh`.
    """
    axes: set[str] = set()
    for fn in module.ops:
        if not isinstance(fn, func.FuncOp):
            continue
        for op in fn.walk():
            if isinstance(op, par.ReshardOp):
                raise PassError(
                    f"lower-collectives: @{fn.sym_name.data} still holds {op.describe()}; "
                    "run lower-reshard before lower-to-exec"
                )
            if RING in op.attributes:  # ring attention sends keys and values along its axis
                axes.add(op.attributes[RING].data)
                continue
            if not isinstance(op, par.CollectiveOp):
                continue
            if op.mesh.root_reference.data != MESH_SYMBOL:
                raise PassError(
                    f"lower-collectives: {op.name} over '{op.axis.data}' in @{fn.sym_name.data} "
                    f"names mesh {op.mesh}; stage functions run on @{MESH_SYMBOL}"
                )
            axes.add(op.axis.data)
    return [a for a in find_mesh(module).axis_names() if a in axes]


@dataclass(frozen=True)
class LowerCollectivesPass(ModulePass):
    """Declares an axis-tagged `exec.process_group` for each group along every mesh axis
    that a collective inside a stage function uses.

    Options: none. Requires: lower-to-exec and lower-reshard have run.
    """

    name = "lower-collectives"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        programs = [p for p in op.ops if isinstance(p, ex.ProgramOp)]
        if not programs:
            raise PassError("lower-collectives: the module has no exec.program; run lower-to-exec first")
        mesh = find_mesh(op)
        groups = [g for g in op.ops if isinstance(g, ex.ProcessGroupOp)]
        declared = {g.axis.data for g in groups if g.axis is not None}
        taken = {
            name.data
            for o in op.ops
            if (symbol := o.get_trait(SymbolOpInterface)) and (name := symbol.get_sym_attr_name(o))
        }
        anchor = groups[-1] if groups else None
        for axis in function_collective_axes(op):
            if axis in declared:
                continue
            for i, ranks in enumerate(mesh.all_groups(axis)):
                name = f"{axis}_{i}"
                while name in taken:
                    name += "_axis"
                taken.add(name)
                group = ex.ProcessGroupOp(name, ranks, axis=axis)
                if anchor is None:
                    op.body.block.insert_op_before(group, programs[0])
                else:
                    op.body.block.insert_op_after(group, anchor)
                anchor = group
