"""The dispatch statistics of expert parallelism: per MoE layer, how its tokens are routed,
which rank holds which experts, and the bytes each rank dispatches per step, predicted from
the programs and, given a run's result, measured by the runtime.

Read from the lowered module (`Compiled.module`): the `par.all_to_all` ops inside the stage
functions that carry a layer's `piperc.origin` (lower-reshard copies it from the reshards the
expert-parallel pass wrote), the `exec.launch` ops of each rank's program (how often each
function runs per step), and the expert parameters' `par.layout` on the functions' arguments
(`[[axis], [], []]`: rank r holds the experts of its coordinate on the axis). The runtime
counts the bytes of each all_to_all under its model location (`LaunchResult.sent_bytes`),
the slices for the other members only, as the prediction does.

    compiled.experts()          # the table, predicted
    compiled.experts(result)    # with the measured bytes of `piperc.launch`'s result
    compiled.dump(dir, result)  # writes it to dir/experts.txt
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp

from piperc.dialects import exec as ex
from piperc.dialects import par
from piperc.dialects.roles import ORIGIN
from piperc.nn import MOE_REGION
from piperc.passes.mesh import find_mesh
from piperc.passes.outline_stages import arg_keys


@dataclasses.dataclass
class LayerDispatch:
    """One MoE layer's routing, read from the lowered programs."""

    path: str
    axis: str
    exchanges: list[str] = dataclasses.field(default_factory=list)
    """Each all_to_all of the layer in one launch of its functions, as text."""
    experts: int = 0
    buffer: tuple[int, ...] = ()
    """The dispatched buffer `[E, C, d]` of one (microbatch, rank), padded to capacity C."""
    held: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    """rank -> (first expert, experts held)."""
    predicted: dict[int, int] = dataclasses.field(default_factory=dict)
    """rank -> bytes the rank sends to other ranks per step for this layer."""


def dispatch_layers(module: ModuleOp) -> list[LayerDispatch]:
    """The MoE layers of a lowered module whose tokens travel by all_to_all, in model order,
    with their predicted bytes per rank per step."""
    mesh = find_mesh(module)
    functions = {op.sym_name.data: op for op in module.ops if isinstance(op, func.FuncOp)}
    launches: dict[int, Counter] = {}
    for program in module.walk():
        if isinstance(program, ex.ProgramOp):
            launches[program.rank.value.data] = Counter(
                op.callee.root_reference.data for op in program.walk() if isinstance(op, ex.LaunchOp))
    layers: dict[str, LayerDispatch] = {}
    for name, fn in functions.items():
        if not any(counts[name] for counts in launches.values()):
            continue  # not a task function (the captured @main)
        for op in fn.walk():
            origin = op.attributes.get(ORIGIN)
            if not (isinstance(op, par.AllToAllOp) and isinstance(origin, par.OriginAttr)
                    and origin.region == MOE_REGION):
                continue
            layer = layers.setdefault(origin.path, LayerDispatch(origin.path, op.axis.data))
            n = mesh.axis_size(op.axis.data)
            sent = op.input.type.nbytes() * (n - 1) // n
            text = (f"{origin.pass_kind.value}: {op.input.type} -> {op.result.type} all_to_all over "
                    f"'{op.axis.data}' (split {op.split_dim.value.data}, concat {op.concat_dim.value.data}), "
                    f"{sent} B out per rank")
            if text not in layer.exchanges:
                layer.exchanges.append(text)
            if origin.pass_kind.value == "F" and op.split_dim.value.data == 0:
                layer.buffer = tuple(op.input.type.get_shape())
            for rank, counts in launches.items():
                if counts[name]:
                    layer.predicted[rank] = layer.predicted.get(rank, 0) + counts[name] * sent
        _expert_ranks(fn, mesh, launches, name, layers)
    return list(layers.values())


def _expert_ranks(fn: func.FuncOp, mesh: par.MeshAttr, launches: dict[int, Counter], name: str,
                  layers: dict[str, LayerDispatch]) -> None:
    """Fills in which experts each rank that launches `fn` holds, from the layout of the
    layers' expert parameters among `fn`'s arguments."""
    for key, attrs, arg in zip(arg_keys(fn), fn.arg_attrs.data, fn.args, strict=True):
        layout = par.layout_of(attrs)
        if not key.startswith("param:") or layout is None or not layout.dim_axes(0):
            continue
        path = key.removeprefix("param:").rsplit(".", 1)[0]
        layer = layers.get(path)
        if layer is None or layout.dim_axes(0) != (layer.axis,):
            continue
        local = arg.type.get_shape()[0]
        n = mesh.axis_size(layer.axis)
        layer.experts = local * n
        for rank, counts in launches.items():
            if counts[name]:
                layer.held[rank] = (mesh.coords(rank)[layer.axis] * local, local)


def dispatch_table(module: ModuleOp, sent_per_step: list[dict[str, float]] | None = None) -> str:
    """The dispatch statistics as text: per layer, its all_to_alls, the experts each rank
    holds, and the bytes each rank sends per step (predicted; measured next to it when given
    `LaunchResult.sent_per_step()`)."""
    layers = dispatch_layers(module)
    if not layers:
        return "no MoE layer dispatches tokens (no expert_parallel directive)\n"
    lines = []
    for layer in layers:
        lines.append(f"MoE layer {layer.path}: {layer.experts} experts over axis '{layer.axis}', dispatched "
                     f"buffer [E, C, d] = {list(layer.buffer)} per (microbatch, rank), padded to capacity")
        lines += [f"  {text}" for text in layer.exchanges]
        held = ", ".join(f"rank {r}: {first}" + (f"-{first + count - 1}" if count > 1 else "")
                         for r, (first, count) in sorted(layer.held.items()))
        lines.append(f"  experts held: {held}")
        lines.append("  bytes sent per step   rank  predicted" + ("  measured" if sent_per_step else ""))
        for rank, predicted in sorted(layer.predicted.items()):
            row = f"                        {rank:>4}  {predicted:>9}"
            if sent_per_step:
                row += f"  {sent_per_step[rank].get(f'all_to_all {layer.path}', 0):>8.0f}"
            lines.append(row)
    return "\n".join(lines) + "\n"
