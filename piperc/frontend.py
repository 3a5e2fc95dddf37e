"""Capture: one training step of an `nn.Module` as a joint forward+backward xDSL module.

    model, example inputs
      -> torch.export (non-strict)            module paths, annotate regions
      -> AOTAutograd joint graph (fx)         forward + backward, seq_nr pairs them
      -> torch-mlir FX importer               generic `torch` dialect text
      -> xDSL module (piperc.ir context)      typed, verified, marked with origins

The captured `func.func @main` takes the parameters, buffers, user inputs and
the tangents of the outputs (1.0 for the loss) as arguments, and returns the
loss, any further outputs, and one gradient per parameter. Each argument and
result says what it is in its attributes; each op carries `piperc.origin`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import traceback
from collections.abc import Sequence

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch._functorch._aot_autograd import descriptors as aot_desc
from torch._functorch.aot_autograd import aot_export_joint_with_descriptors
from torch_mlir import ir as mlir_ir
from torch_mlir.dialects import torch as torch_mlir_dialect
from torch_mlir.extras.fx_importer import ContextCache, FxImporter
from xdsl.dialects import func
from xdsl.dialects.builtin import (
    ArrayAttr,
    DictionaryAttr,
    IntAttr,
    ModuleOp,
    StringAttr,
    UnitAttr,
)
from xdsl.rewriter import Rewriter
from xdsl.utils.exceptions import ParseError

from piperc.annotate import INDEX_KEY, REGION_KEY
from piperc.dialects.par import OriginAttr, PassKind
from piperc.dialects.roles import (  # noqa: F401 - the captured step's conventions, re-exported
    ARG_ALIASES,
    ARG_BUFFER,
    ARG_INPUT,
    ARG_PARAM,
    ARG_TANGENT,
    ORIGIN,
    RES_GRAD,
    RES_LOSS,
    RES_OUTPUT,
    argument_roles,
    main_function,
    result_roles,
)
from piperc.dialects.torch import OperatorOp, aten_overload
from piperc.errors import CaptureError
from piperc.ir import PipercContext, make_context, parse_module, print_ir


@dataclasses.dataclass
class Captured:
    """A captured training step.

    `module` is the xDSL module holding `func.func @main`; `str(captured)` is
    its IR text. `params` and `buffers` map names (as in `model.state_dict()`)
    to the model's tensors, in argument order.
    """

    module: ModuleOp
    ctx: PipercContext
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    num_inputs: int
    num_outputs: int

    def __str__(self) -> str:
        return print_ir(self.module)

    @property
    def main(self) -> func.FuncOp:
        """The captured training step function."""
        return main_function(self.module)

    def arguments(self, params=None, buffers=None, inputs=()) -> list[torch.Tensor]:
        """The argument list of `@main`: parameters, buffers, inputs, then tangents.

        The loss tangent is 1.0; tangents of further outputs are zero.
        """
        return bind_arguments(
            self.main,
            params if params is not None else self.params,
            buffers if buffers is not None else self.buffers,
            inputs,
        )


def bind_arguments(fn: func.FuncOp, params, buffers, inputs: Sequence[torch.Tensor]) -> list:
    """Orders named parameters, buffers and positional inputs as `fn`'s arguments."""
    args = []
    for (role, key), arg in zip(argument_roles(fn), fn.args, strict=True):
        if role == "param":
            args.append(params[key])
        elif role == "buffer":
            args.append(buffers[key])
        elif role == "input":
            args.append(inputs[key])
        else:
            args.append(torch.ones(()) if key == 0 else torch.zeros(arg.type.get_shape()))
    return args


def capture(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> Captured:
    """Captures one training step of `model` on `example_inputs` as an xDSL module.

    `model.forward(*example_inputs)` must return the scalar loss, or a tuple
    whose first element is the scalar loss. Parameters, buffers and inputs
    become arguments of `func.func @main`; gradients become its results; no
    weight is embedded in the IR. Raises `CaptureError` with the reason and
    the place in the model when the model cannot be captured.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects an nn.Module, got {type(model).__name__}")
    example_inputs = tuple(example_inputs)
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"example input {i} is a {type(x).__name__}; inputs must be tensors")

    joint = _joint_graph(model, example_inputs)
    gm = joint.graph_module
    params, buffers = _fold_tied_parameters(model, gm)
    num_outputs = _check_outputs(model, gm)
    _drop_none_outputs(gm)
    marks = _node_marks(gm)
    mlir_text, op_nodes = _import(gm, marks)
    module, ctx = _parse(mlir_text)
    _attach_origins(module, op_nodes, marks)
    _attach_signature(module, gm)
    module.verify()
    return Captured(module, ctx, params, buffers, len(example_inputs), num_outputs)


# ---------------------------------------------------------------- torch side


def _joint_graph(model, example_inputs):
    with fx_traceback.preserve_node_meta():
        try:
            exported = torch.export.export(model, example_inputs, strict=False)
        except Exception as e:  # torch.export raises many types; all mean "cannot trace"
            raise CaptureError(
                f"torch.export cannot trace {type(model).__name__}: {_first_line(e)}"
                f"{_model_frame(e, model)}"
            ) from e
        try:
            with contextlib.ExitStack() as stack:
                return aot_export_joint_with_descriptors(stack, exported.module(), example_inputs)
        except Exception as e:
            raise CaptureError(
                f"AOTAutograd cannot build the backward of {type(model).__name__}: "
                f"{_first_line(e)}{_model_frame(e, model)}"
            ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _model_frame(e: BaseException, model: torch.nn.Module) -> str:
    """' (at file:line in function)' for the innermost traceback frame in user code."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if not f.filename.startswith(torch_dir) and f.filename != __file__
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f"\n  at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _fold_tied_parameters(model, gm: torch.fx.GraphModule):
    """One argument per distinct tensor: a parameter known under several names
    (tied weights) keeps its first name and its uses are redirected to it."""
    by_identity: dict[int, str] = {}
    aliases: dict[str, str] = {}
    params: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = by_identity.setdefault(id(p), name)
        if canonical == name:
            params[name] = p
        else:
            aliases[name] = canonical
    buffers = dict(model.named_buffers())

    placeholders = {}
    for node in list(gm.graph.nodes):
        if node.op != "placeholder":
            continue
        desc = node.meta.get("desc")
        if isinstance(desc, aot_desc.ParamAOTInput) and desc.target in aliases:
            canonical = aliases[desc.target]
            node.replace_all_uses_with(placeholders[canonical])
            gm.graph.erase_node(node)
            continue
        if isinstance(desc, aot_desc.ParamAOTInput | aot_desc.BufferAOTInput):
            placeholders[desc.target] = node
    gm.meta["piperc_aliases"] = aliases
    return params, buffers


def _check_outputs(model, gm: torch.fx.GraphModule) -> int:
    """Checks that output 0 is a scalar floating loss; returns the number of plain outputs."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    plain = [
        a for a, d in zip(out.args[0], out.meta["desc"], strict=True)
        if isinstance(d, aot_desc.PlainAOTOutput)
    ]
    if not plain:
        raise CaptureError(f"{type(model).__name__}.forward returns no tensor; it must return the loss")
    loss = plain[0].meta.get("val") if isinstance(plain[0], torch.fx.Node) else plain[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        what = (
            f"a tensor of shape {list(loss.shape)} and dtype {loss.dtype}"
            if isinstance(loss, torch.Tensor)
            else repr(loss)
        )
        raise CaptureError(
            f"{type(model).__name__}.forward must return a scalar floating-point loss "
            f"(or a tuple with the loss first), but it returns {what}. "
            "Reduce the loss to a scalar, e.g. with .mean()."
        )
    return len(plain)


def _drop_none_outputs(gm: torch.fx.GraphModule) -> None:
    """Removes outputs that are None (gradients of integer inputs, folded tied weights)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    kept = [(a, d) for a, d in zip(out.args[0], out.meta["desc"], strict=True) if a is not None]
    out.args = (tuple(a for a, _ in kept),)
    out.meta["desc"] = [d for _, d in kept]


@dataclasses.dataclass(frozen=True)
class _Mark:
    path: str
    pass_kind: PassKind
    region: str | None
    region_index: int | None
    source: str | None


def _node_marks(gm: torch.fx.GraphModule) -> dict[str, _Mark]:
    """Origin of every call node: module path, F/B and annotate region.

    Backward nodes inherit path and region from the forward node with the
    same `seq_nr` (the op they differentiate).
    """
    forward_by_seq: dict[int, _Mark] = {}
    marks: dict[str, _Mark] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        custom = node.meta.get("custom") or {}
        if node.meta.get("partitioner_tag") == "is_backward":
            fwd = forward_by_seq.get(node.meta.get("seq_nr"))
            path = fwd.path if fwd else ""
            region = custom.get(REGION_KEY, fwd.region if fwd else None)
            index = custom.get(INDEX_KEY, fwd.region_index if fwd else None)
            marks[node.name] = _Mark(path, PassKind.B, region, index, fwd.source if fwd else None)
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        mark = _Mark(path, PassKind.F, custom.get(REGION_KEY), custom.get(INDEX_KEY), _source(node))
        marks[node.name] = mark
        forward_by_seq.setdefault(node.meta.get("seq_nr"), mark)
    return marks


def _source(node: torch.fx.Node) -> str | None:
    """'file:line' of the innermost user frame that produced a node."""
    frames = re.findall(r'File "([^"]+)", line ([0-9]+)', node.meta.get("stack_trace") or "")
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f[0].startswith(torch_dir)]
    if not user:
        return None
    return f"{user[-1][0]}:{user[-1][1]}"


# ---------------------------------------------------------------- torch-mlir import

_NODE_LOC = "piperc.node:"


class _NodeNamingContextCache(ContextCache):
    """Names each op's location after its fx node, so ops can be traced back to nodes."""

    __slots__ = ()

    def get_node_location(self, node):
        return mlir_ir.Location.name(_NODE_LOC + node.name, context=self._c)


def _import(gm: torch.fx.GraphModule, marks) -> tuple[str, list[str | None]]:
    """Imports the joint graph; returns generic IR text and each op's fx node name (walk order)."""
    context = mlir_ir.Context()
    torch_mlir_dialect.register_dialect(context)
    importer = FxImporter(context=context)
    importer._cc.__class__ = _NodeNamingContextCache
    importer.import_stateless_graph(gm.graph, func_name="main")

    op_nodes: list[str | None] = []

    def visit(op):
        loc = str(op.location)
        m = re.match(r'loc\("' + re.escape(_NODE_LOC) + r'([^"]+)"', loc)
        node = m.group(1) if m else None
        if op.operation.name == "torch.operator" and aten_overload(_string(op.attributes["name"])) is None:
            name = _string(op.attributes["name"])
            mark = marks.get(node)
            where = f" in '{mark.path}'" if mark and mark.path else ""
            src = f" ({mark.source})" if mark and mark.source else ""
            raise CaptureError(
                f"op {name} (fx node '{node}'){where}{src} cannot be represented: "
                "it is not an ATen operator, and piperc's `torch` dialect holds ATen "
                "operators only. Rewrite that part of the model with ATen operators."
            )
        op_nodes.append(node)
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    visit(inner)

    visit(importer.module.operation)
    text = importer.module.operation.get_asm(print_generic_op_form=True, large_resource_limit=0)
    return text, op_nodes


def _string(attr) -> str:
    """The Python str of a torch-mlir StringAttr."""
    return mlir_ir.StringAttr(attr).value


def _parse(text: str) -> tuple[ModuleOp, PipercContext]:
    ctx = make_context()
    try:
        module = parse_module(text, ctx, "captured")
    except ParseError as e:
        op = re.search(r'"(torch\.[\w.]+)"', str(e))
        raise CaptureError(
            f"the captured graph uses {op.group(1) if op else 'an op'} that piperc's "
            f"`torch` dialect cannot represent:\n{e}"
        ) from e
    for op in list(module.walk()):
        if isinstance(op, OperatorOp):
            aten = op.as_aten_op()
            Rewriter.replace_op(op, aten)
    return module, ctx


def _attach_origins(module: ModuleOp, op_nodes: list[str | None], marks) -> None:
    ops = list(module.walk())
    assert len(ops) == len(op_nodes), "torch-mlir and xDSL disagree on the op count"
    for op, node in zip(ops, op_nodes, strict=True):
        mark = marks.get(node) if node else None
        if mark is None:
            continue
        op.attributes[ORIGIN] = OriginAttr(mark.path, mark.pass_kind, mark.region, mark.region_index)


def _attach_signature(module: ModuleOp, gm: torch.fx.GraphModule) -> None:
    fn = main_function(module)
    aliases_of: dict[str, list[str]] = {}
    for alias, canonical in gm.meta["piperc_aliases"].items():
        aliases_of.setdefault(canonical, []).append(alias)

    arg_attrs = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        d = node.meta["desc"]
        if isinstance(d, aot_desc.ParamAOTInput):
            entry = {ARG_PARAM: StringAttr(d.target)}
            if d.target in aliases_of:
                entry[ARG_ALIASES] = ArrayAttr(StringAttr(a) for a in aliases_of[d.target])
        elif isinstance(d, aot_desc.BufferAOTInput):
            entry = {ARG_BUFFER: StringAttr(d.target)}
        elif isinstance(d, aot_desc.PlainAOTInput):
            entry = {ARG_INPUT: IntAttr(d.idx)}
        elif isinstance(d, aot_desc.TangentAOTInput) and isinstance(d.output, aot_desc.PlainAOTOutput):
            entry = {ARG_TANGENT: IntAttr(d.output.idx)}
        else:
            raise CaptureError(f"unsupported graph input {node.name}: {d}")
        arg_attrs.append(DictionaryAttr(entry))

    out = next(n for n in gm.graph.nodes if n.op == "output")
    res_attrs = []
    for d in out.meta["desc"]:
        if isinstance(d, aot_desc.PlainAOTOutput):
            entry = {RES_LOSS: UnitAttr()} if d.idx == 0 else {RES_OUTPUT: IntAttr(d.idx)}
        elif isinstance(d, aot_desc.GradAOTOutput) and isinstance(d.grad_of, aot_desc.ParamAOTInput):
            entry = {RES_GRAD: StringAttr(gm.meta["piperc_aliases"].get(d.grad_of.target, d.grad_of.target))}
        else:
            raise CaptureError(
                f"unsupported graph output {d} (the model mutates a buffer or an input; "
                "piperc captures functional training steps only)"
            )
        res_attrs.append(DictionaryAttr(entry))
    fn.arg_attrs = ArrayAttr(arg_attrs)
    fn.res_attrs = ArrayAttr(res_attrs)
