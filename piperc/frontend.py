"""Capture: one training step of an `nn.Module` as a joint forward+backward xDSL module.

    model, example inputs
      -> AOTAutograd joint graph (fx)         one trace: forward + backward, seq_nr pairs
                                              them; module paths, annotate regions
      -> torch-mlir FX importer               `torch` dialect (MLIR, in memory)
      -> xDSL module (piperc.ir context)      built op by op: typed, verified, with origins

When that fails, capture runs the two-trace path instead (torch.export, then
AOTAutograd on the exported module): its errors name the construct that cannot
be traced, and its nodes carry the source lines that build errors quote. Both
paths give the same IR (tests/test_capture.py checks it on every example).

The captured `func.func @main` takes the parameters, buffers, user inputs and
the tangents of the outputs (1.0 for the loss) as arguments, and returns the
loss, any further outputs, and one gradient per parameter that requires grad. A
frozen parameter (`requires_grad=False`) is a `piperc.param` argument with no
`piperc.grad` result: passes place and shard it like any parameter, and nothing
updates, reduces or keeps optimizer state for it. Each argument and result says
what it is in its attributes; each op carries `piperc.origin`.

A forward that writes a parameter or a buffer in place (`self.w.add_(1)` under
no_grad, `.data` writes, BatchNorm's running statistics) is a `CaptureError`
that names the tensor and its module: the step is a function of its arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
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
    IntegerAttr,
    ModuleOp,
    StringAttr,
    UnitAttr,
)
from xdsl.ir import Attribute, Block, Operation, Region, SSAValue
from xdsl.irdl import IRDLOperation
from xdsl.parser import Parser

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
from piperc.dialects.torch import RANDOM_INDEX, AtenOp, OperatorOp, aten_is_random, aten_overload
from piperc.errors import CaptureError, first_line, user_frame
from piperc.ir import PipercContext, cycle_collection_paused, make_context, print_ir


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

    gm = _trace(model, example_inputs)
    mutation = None
    if gm is not None:
        try:
            return _captured(model, example_inputs, gm)
        except CaptureError as e:  # reported below, from the graph whose nodes carry source lines
            mutation = e if _state_mutation(model, gm) else None
    try:
        exported = _export(model, example_inputs)
    except CaptureError:
        if mutation is not None:  # torch.export fails on `.data` writes; the mutation is the cause
            raise mutation from None
        raise
    return _captured(model, example_inputs, _joint_graph(model, exported, example_inputs))


def _captured(model: torch.nn.Module, example_inputs: tuple, gm: torch.fx.GraphModule) -> Captured:
    """The captured step made from the joint graph `gm` of `model`."""
    mutation = _state_mutation(model, gm)
    if mutation:
        raise CaptureError(mutation)
    params, buffers = _fold_tied_parameters(model, gm)
    num_outputs = _check_outputs(model, gm)
    _drop_none_outputs(gm)
    marks = _node_marks(gm)
    with cycle_collection_paused():
        module, ctx = _build(_import(gm), marks)
        _attach_signature(module, gm)
        module.verify()
    return Captured(module, ctx, params, buffers, len(example_inputs), num_outputs)


# ---------------------------------------------------------------- torch side


def _trace(model: torch.nn.Module, example_inputs: tuple) -> torch.fx.GraphModule | None:
    """AOTAutograd's joint forward+backward graph of `model` in one trace, or None if it fails.

    Forward nodes get `nn_module_stack` from `_module_paths` (the same
    `{key: (path, type)}` torch.export records) and `piperc.annotate` marks
    through `preserve_node_meta`. One trace instead of torch.export's and then
    AOTAutograd's over the exported graph (an fx Interpreter under anomaly mode)
    takes about 28% less time (24-layer GPT: 9.7 s -> 7.0 s).
    """
    with fx_traceback.preserve_node_meta(), _module_paths(model):
        try:
            with contextlib.ExitStack() as stack:
                return aot_export_joint_with_descriptors(stack, model, example_inputs).graph_module
        except Exception:  # any failure: the two-trace path says what and where
            return None


@contextlib.contextmanager
def _module_paths(model: torch.nn.Module):
    """While open, ops traced inside a submodule of `model` record its path in `nn_module_stack`."""
    paths: dict[int, str] = {}
    for name, m in model.named_modules():
        paths.setdefault(id(m), name)
    outer: list = []

    def enter(module, args):
        meta = fx_traceback.current_meta
        outer.append(meta.get("nn_module_stack"))
        stack = dict(outer[-1] or {})
        path = paths.get(id(module))
        if path is not None:
            kind = type(module)
            stack[f"L__self__{path}"] = (path, f"{kind.__module__}.{kind.__qualname__}")
        meta["nn_module_stack"] = stack

    def leave(module, args, output):
        stack = outer.pop()
        if stack is None:
            fx_traceback.current_meta.pop("nn_module_stack", None)
        else:
            fx_traceback.current_meta["nn_module_stack"] = stack

    hooks = (
        torch.nn.modules.module.register_module_forward_pre_hook(enter),
        torch.nn.modules.module.register_module_forward_hook(leave, always_call=True),
    )
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _export(model: torch.nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """torch.export of `model` (non-strict), keeping `piperc.annotate` marks on the nodes."""
    with fx_traceback.preserve_node_meta():
        try:
            return torch.export.export(model, example_inputs, strict=False)
        except Exception as e:  # torch.export raises many types; all mean "cannot trace"
            raise CaptureError(
                f"torch.export cannot trace {type(model).__name__}: {first_line(e)}"
                f"{user_frame(e)}"
            ) from e


def _joint_graph(model: torch.nn.Module, exported: torch.export.ExportedProgram,
                 example_inputs: tuple) -> torch.fx.GraphModule:
    """AOTAutograd's joint forward+backward graph of the exported model."""
    with fx_traceback.preserve_node_meta():
        try:
            with contextlib.ExitStack() as stack:
                joint = aot_export_joint_with_descriptors(stack, exported.module(), example_inputs)
                return joint.graph_module
        except Exception as e:
            raise CaptureError(
                f"AOTAutograd cannot build the backward of {type(model).__name__}: "
                f"{first_line(e)}{user_frame(e)}"
            ) from e


def _fold_tied_parameters(model, gm: torch.fx.GraphModule):
    """One argument per distinct tensor: a parameter known under several names
    (tied weights) keeps its first name and its uses are redirected to it.

    Its gradients under the several names are summed, in the order the backward
    computes them (as autograd accumulates them), into the result of the last
    name; the other names' results become None."""
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
    _sum_tied_gradients(gm, aliases)
    gm.meta["piperc_aliases"] = aliases
    return params, buffers


def _sum_tied_gradients(gm: torch.fx.GraphModule, aliases: dict[str, str]) -> None:
    """One gradient per tied parameter (see `_fold_tied_parameters`)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    grads: dict[str, list[int]] = {}
    for i, (a, d) in enumerate(zip(out.args[0], out.meta["desc"], strict=True)):
        if a is not None and isinstance(d, aot_desc.GradAOTOutput) and isinstance(d.grad_of, aot_desc.ParamAOTInput):
            grads.setdefault(aliases.get(d.grad_of.target, d.grad_of.target), []).append(i)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    results = list(out.args[0])
    for slots in grads.values():
        if len(slots) < 2:
            continue
        parts = sorted((results[i] for i in slots), key=order.__getitem__)
        total = parts[0]
        for part in parts[1:]:  # each partial sum lies right after its last part
            with gm.graph.inserting_after(part):
                total = gm.graph.call_function(torch.ops.aten.add.Tensor, (total, part))
            total.meta["val"] = torch.ops.aten.add.Tensor(total.args[0].meta["val"], part.meta["val"])
            total.meta["partitioner_tag"] = "is_backward"
        for i in slots:
            results[i] = None
        results[slots[-1]] = total
    out.args = (tuple(results),)


def _state_mutation(model: torch.nn.Module, gm: torch.fx.GraphModule) -> str | None:
    """Why `model`'s forward cannot be captured if it writes a parameter or a buffer in place
    (the joint graph returns the new value as an `InputMutationAOTOutput`), else None.

    A captured step is a function of the parameters and buffers: its only state change is
    the optimizer's update of the parameters. Carrying buffer updates (BatchNorm's running
    statistics) from one microbatch and step to the next is not supported.
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    params: list[tuple[str, torch.fx.Node]] = []
    buffers: dict[str, list[str]] = {}
    for a, d in zip(out.args[0], out.meta["desc"], strict=True):
        if not isinstance(d, aot_desc.InputMutationAOTOutput):
            continue
        target = d.mutated_input
        if isinstance(target, aot_desc.ParamAOTInput):
            params.append((target.target, a))
        elif isinstance(target, aot_desc.BufferAOTInput):
            buffers.setdefault(target.target.rpartition(".")[0], []).append(target.target)
    root = type(model).__name__
    if params:
        name, node = params[0]
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        where = f"in '{path}' ({_module_kind(model, path)})" if path else f"in {root}.forward"
        source = _source(node)
        return (
            f"{root}.forward updates parameter '{name}' in place ({where}"
            f"{f', at {source}' if source else ''}); in piperc a parameter changes only in the "
            "optimizer step. Compute the changed weight as a new tensor instead (e.g. "
            "`w = self.weight * 0.5`, not `self.weight.data.mul_(0.5)` or `self.weight.add_(1)` "
            "under no_grad)"
        )
    if buffers:
        path, names = next(iter(buffers.items()))
        listed = ", ".join(f"'{n}'" for n in names)
        owner = f"'{path}' ({_module_kind(model, path)})" if path else root
        return (
            f"{root}.forward updates buffer{'s' if len(names) > 1 else ''} {listed} of {owner} in place; "
            "piperc does not carry buffer updates from one microbatch or step to the next. For a "
            "BatchNorm, construct it with track_running_stats=False (batch statistics, no running "
            f"state) or put it in eval mode ({'.'.join(('model', path) if path else ('model',))}.eval(): "
            "running statistics read, not updated); or use LayerNorm/GroupNorm"
        )
    return None


def _module_kind(model: torch.nn.Module, path: str) -> str:
    """The class name of the submodule of `model` at `path`."""
    try:
        return type(model.get_submodule(path)).__name__
    except AttributeError:
        return "module"


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
        seq_nr = node.meta.get("seq_nr")
        if node.meta.get("partitioner_tag") == "is_backward":
            fwd = forward_by_seq.get(seq_nr) if seq_nr is not None else None
            path = fwd.path if fwd else ""
            region = custom.get(REGION_KEY, fwd.region if fwd else None)
            index = custom.get(INDEX_KEY, fwd.region_index if fwd else None)
            marks[node.name] = _Mark(path, PassKind.B, region, index, fwd.source if fwd else None)
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        mark = _Mark(path, PassKind.F, custom.get(REGION_KEY), custom.get(INDEX_KEY), _source(node))
        marks[node.name] = mark
        if seq_nr is not None:
            forward_by_seq.setdefault(seq_nr, mark)
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


def _import(gm: torch.fx.GraphModule) -> mlir_ir.Module:
    """Imports the joint graph with torch-mlir; each op's location names its fx node."""
    context = mlir_ir.Context()
    torch_mlir_dialect.register_dialect(context)
    importer = FxImporter(context=context)
    importer._cc.__class__ = _NodeNamingContextCache
    importer.import_stateless_graph(gm.graph, func_name="main")
    return importer.module


def _build(mlir_module: mlir_ir.Module, marks: dict[str, _Mark]) -> tuple[ModuleOp, PipercContext]:
    """The xDSL module equal to torch-mlir's, built op by op from its in-memory IR.

    `torch.operator` ops become the `torch.aten.*` ops they name; every op
    made for an fx node carries that node's `piperc.origin`.
    """
    ctx = make_context()
    module = _Builder(ctx, marks).op(mlir_module.operation)
    assert isinstance(module, ModuleOp)
    return module, ctx


class _Builder:
    """Turns torch-mlir's ops, values, types and attributes into their xDSL equals.

    Types and attributes are uniqued in an MLIR context, so each distinct one
    is converted once, through its text (the text piperc's dialects parse).
    """

    def __init__(self, ctx: PipercContext, marks: dict[str, _Mark]):
        self.ctx = ctx
        self.marks = marks
        self.values: dict[mlir_ir.Value, SSAValue] = {}
        self.types: dict[mlir_ir.Type, Attribute] = {}
        self.attrs: dict[mlir_ir.Attribute, Attribute] = {}
        self.origins: dict[tuple, OriginAttr] = {}
        self.random_ops = 0  # random ops built so far, in the graph's (execution) order

    def op(self, mlir_op) -> Operation:
        """The xDSL op for `mlir_op` (an Operation or OpView), its regions built too."""
        mlir_op = mlir_op.operation
        name = mlir_op.name
        node = _node_name(mlir_op.location)
        cls = self.ctx.get_optional_op(name)
        if cls is None:
            raise CaptureError(
                f"the captured graph uses {name}{self._where(node)} that piperc's `torch` "
                "dialect cannot represent"
            )
        properties, attributes = self._attributes(mlir_op, cls, node)
        op = cls.create(
            operands=[self.values[v] for v in mlir_op.operands],
            result_types=[self.type(r.type) for r in mlir_op.results],
            properties=properties,
            attributes=attributes,
            regions=[self._region(r) for r in mlir_op.regions],
        )
        if isinstance(op, OperatorOp):
            op = op.as_aten_op()
        if isinstance(op, AtenOp) and aten_is_random(op.aten):
            op.attributes[RANDOM_INDEX] = IntegerAttr(self.random_ops, 64)
            self.random_ops += 1
        mark = self.marks.get(node) if node else None
        if mark is not None:
            op.attributes[ORIGIN] = self.origin(mark)
        self.values.update(zip(mlir_op.results, op.results, strict=True))
        return op

    def origin(self, mark: _Mark) -> OriginAttr:
        """The `piperc.origin` of an op made for a node with `mark` (one attribute per origin)."""
        key = (mark.path, mark.pass_kind, mark.region, mark.region_index)
        origin = self.origins.get(key)
        if origin is None:
            origin = self.origins[key] = OriginAttr(*key)
        return origin

    def type(self, mlir_type: mlir_ir.Type) -> Attribute:
        """The xDSL type equal to an MLIR type."""
        t = self.types.get(mlir_type)
        if t is None:
            t = self.types[mlir_type] = Parser(self.ctx, str(mlir_type)).parse_type()
        return t

    def attribute(self, mlir_attr: mlir_ir.Attribute) -> Attribute:
        """The xDSL attribute equal to an MLIR attribute."""
        a = self.attrs.get(mlir_attr)
        if a is None:
            a = self.attrs[mlir_attr] = Parser(self.ctx, str(mlir_attr)).parse_attribute()
        return a

    def _attributes(self, mlir_op, cls: type[Operation], node: str | None):
        """An op's attributes, split as xDSL's parser splits them: the ones its
        class declares as properties, and the others."""
        declared = cls.get_irdl_definition().properties if issubclass(cls, IRDLOperation) else {}
        properties: dict[str, Attribute] = {}
        attributes: dict[str, Attribute] = {}
        mlir_attributes = mlir_op.attributes
        for i in range(len(mlir_attributes)):
            named = mlir_attributes[i]
            attr = self.attribute(named.attr)
            (properties if named.name in declared else attributes)[named.name] = attr
        if cls is OperatorOp and aten_overload(properties["name"].data) is None:
            raise CaptureError(
                f"op {properties['name'].data}{self._where(node)} cannot be represented: "
                "it is not an ATen operator, and piperc's `torch` dialect holds ATen "
                "operators only. Rewrite that part of the model with ATen operators."
            )
        return properties, attributes

    def _where(self, node: str | None) -> str:
        """' (fx node 'n') in 'path' (file:line)' for an op made for fx node `node`."""
        if node is None:
            return ""
        mark = self.marks.get(node)
        where = f" in '{mark.path}'" if mark and mark.path else ""
        src = f" ({mark.source})" if mark and mark.source else ""
        return f" (fx node '{node}'){where}{src}"

    def _region(self, mlir_region) -> Region:
        region = Region()
        for mlir_block in mlir_region.blocks:
            block = Block(arg_types=[self.type(a.type) for a in mlir_block.arguments])
            for i, (mlir_arg, arg) in enumerate(zip(mlir_block.arguments, block.args, strict=True)):
                arg.name_hint = f"arg{i}"  # as torch-mlir names them in its text
                self.values[mlir_arg] = arg
            block.add_ops(self.op(o) for o in mlir_block.operations)
            region.add_block(block)
        return region


def _node_name(location) -> str | None:
    """The fx node an op was made for, from the location `_import` gave it."""
    name = getattr(location, "name_str", None)
    if name is None or not name.startswith(_NODE_LOC):
        return None
    return name.removeprefix(_NODE_LOC)


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
