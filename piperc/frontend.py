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

A buffer the forward updates as `decay * buffer + u` (BatchNorm's running
statistics, counters) is returned as its increment `u` (`piperc.increment`, with
`piperc.decay`), after the gradients; `running-buffers` applies it over all slices
of the batch. A forward that writes a parameter in place (`self.w.add_(1)` under
no_grad, `.data` writes), or a buffer in another form, is a `CaptureError` that
names the tensor and its module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
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
    FloatAttr,
    IntAttr,
    IntegerAttr,
    ModuleOp,
    StringAttr,
    UnitAttr,
    f64,
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
    RES_DECAY,
    RES_GRAD,
    RES_INCREMENT,
    RES_LOSS,
    RES_OUTPUT,
    argument_roles,
    main_function,
    result_roles,
)
from piperc.dialects.torch import (
    RANDOM_INDEX,
    AtenOp,
    ConstantFloatOp,
    OperatorOp,
    aten_is_random,
    aten_overload,
)
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

    _check_cumulative_batch_norm(model)
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


class Captures:
    """The captures of one model, one per microbatch shape, for compiling it under several
    strategies: `compile(..., captures=c)` captures the model on its first compile with each
    microbatch shape and reuses that capture (a copy of its module) afterwards.

    A capture is reused while the model's parameters and buffers are the same tensors with
    the same shapes, dtypes and `requires_grad`, and every submodule's train/eval mode is
    unchanged; a change to any of these captures again. Parameter values may change in
    place (a reused capture reads them at compile time). A change to the model's code or
    its Python attributes (a config flag that `forward` reads) is not seen: make a new
    `Captures` after one.
    """

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise CaptureError(f"Captures expects an nn.Module, got {type(model).__name__}")
        self.model = model
        self._by_key: dict[tuple, Captured] = {}

    def __len__(self) -> int:
        """How many captures it holds (one per microbatch shape and model state)."""
        return len(self._by_key)

    def get(self, model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> Captured:
        """The capture of `model` on `example_inputs` (one microbatch), captured now or reused.

        The result's module is a fresh copy that the caller may rewrite. CaptureError if
        `model` is not the model these captures belong to.
        """
        if model is not self.model:
            raise CaptureError(f"these captures belong to a {type(self.model).__name__} object, not to this "
                               f"{type(model).__name__}: make one piperc.Captures(model) per model")
        key = (tuple((tuple(x.shape), x.dtype) for x in example_inputs), _state_key(model))
        if key not in self._by_key:
            self._by_key[key] = capture(model, example_inputs)
        captured = self._by_key[key]
        return dataclasses.replace(captured, module=captured.module.clone())


def _state_key(model: torch.nn.Module) -> tuple:
    """What a capture of `model` depends on besides its inputs and code: which tensors its
    parameters and buffers are (by identity, shape, dtype, requires_grad) and each
    submodule's train/eval mode."""
    tensors = tuple((name, id(t), tuple(t.shape), t.dtype, t.requires_grad)
                    for name, t in [*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)])
    return tensors, tuple(m.training for m in model.modules())


def _check_cumulative_batch_norm(model: torch.nn.Module) -> None:
    """A training-mode BatchNorm with `momentum=None` (a cumulative average) is a CaptureError:
    its factor `1 / num_batches_tracked` is computed in Python from the buffer's value, so
    the update is not a fixed function of the buffer that capture could record."""
    for path, m in model.named_modules():
        if (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
                and m.momentum is None):
            raise CaptureError(
                f"'{path}' ({type(m).__name__}) has momentum=None: its running statistics are a "
                "cumulative average whose factor 1/num_batches_tracked is read from the buffer "
                "in Python, which capture cannot record. Give it a momentum (e.g. 0.1), construct "
                "it with track_running_stats=False, or put it in eval mode")


def _captured(model: torch.nn.Module, example_inputs: tuple, gm: torch.fx.GraphModule) -> Captured:
    """The captured step made from the joint graph `gm` of `model`."""
    mutation = _state_mutation(model, gm)
    if mutation:
        raise CaptureError(mutation)
    decays = _buffer_increments(model, gm)
    params, buffers = _fold_tied_parameters(model, gm)
    num_outputs = _check_outputs(model, gm)
    _drop_none_outputs(gm)
    marks = _node_marks(gm)
    with cycle_collection_paused():
        module, ctx = _build(_import(gm), marks)
        _attach_signature(module, gm, decays)
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
    """Why `model`'s forward cannot be captured if it writes a parameter in place (the joint
    graph returns the new value as an `InputMutationAOTOutput`), else None: a parameter
    changes only in the optimizer's update. Buffer updates are `_buffer_increments`'."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    params: list[tuple[str, torch.fx.Node]] = []
    for a, d in zip(out.args[0], out.meta["desc"], strict=True):
        if isinstance(d, aot_desc.InputMutationAOTOutput) and isinstance(d.mutated_input, aot_desc.ParamAOTInput):
            params.append((d.mutated_input.target, a))
    if not params:
        return None
    root = type(model).__name__
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


_BATCH_NORM = torch.ops.aten._native_batch_norm_legit_functional.default
_RUNNING_SLOTS = {3: "running_mean", 4: "running_var"}  # result and argument index in _BATCH_NORM


def _buffer_increments(model: torch.nn.Module, gm: torch.fx.GraphModule) -> dict[str, float]:
    """Rewrites each buffer update of the forward into its increment; returns each updated
    buffer's decay.

    An update `new = decay * old + u` (u not reading the buffer) can be split over slices
    of the batch: a step over slices 0..S-1 in order leaves
    `decay**S * old + sum_j decay**(S-1-j) * u_j` (`running-buffers` builds that sum).
    Capture makes the graph return `u`, the update with the old value read as zeros, after
    every other output (`@main` results `piperc.increment`, `piperc.decay`). Two forms are
    recognised: BatchNorm's running statistics in training mode (decay `1 - momentum`) and
    a counter `buf + k` (`num_batches_tracked`, decay 1). Anything else is a CaptureError
    naming the buffer and its module.
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    placeholders = {n.meta["desc"].target: n for n in gm.graph.nodes if n.op == "placeholder"
                    and isinstance(n.meta.get("desc"), aot_desc.BufferAOTInput)}
    kept, moved, decays = [], [], {}
    for a, d in zip(out.args[0], out.meta["desc"], strict=True):
        if not (isinstance(d, aot_desc.InputMutationAOTOutput) and isinstance(d.mutated_input, aot_desc.BufferAOTInput)):
            kept.append((a, d))
            continue
        name = d.mutated_input.target
        old = placeholders[name]
        decays[name] = _split_update(model, gm, name, old, a)
        moved.append((a, d))
    out.args = (tuple(a for a, _ in [*kept, *moved]),)
    out.meta["desc"] = [d for _, d in [*kept, *moved]]
    return decays


def _split_update(model: torch.nn.Module, gm: torch.fx.GraphModule, name: str, old: torch.fx.Node,
                  new: torch.fx.Node) -> float:
    """The decay of the update `new` of buffer `name` (placeholder `old`); rewrites `new` to
    read zeros instead of `old` (see `_buffer_increments`)."""
    if (new.target is operator.getitem and isinstance(new.args[0], torch.fx.Node)
            and new.args[0].target is _BATCH_NORM and new.args[1] in _RUNNING_SLOTS
            and new.args[0].args[new.args[1]] is old and len(old.users) == 1):
        norm = new.args[0]
        _read_zeros(gm, norm, new.args[1], old)
        return 1.0 - float(norm.args[6])
    if (new.target is torch.ops.aten.add.Tensor and new.args[0] is old and len(old.users) == 1
            and new.kwargs.get("alpha", 1) == 1 and not isinstance(new.args[1], torch.fx.Node)):
        _read_zeros(gm, new, 0, old)
        return 1.0
    path = name.rpartition(".")[0]
    owner = f"'{path}' ({_module_kind(model, path)})" if path else type(model).__name__
    source = _source(new)
    raise CaptureError(
        f"{type(model).__name__}.forward updates buffer '{name}' of {owner} in place"
        f"{f' (at {source})' if source else ''} in a form piperc cannot split over microbatches "
        "and replicas. Supported: BatchNorm's running statistics in training mode (with a "
        "momentum; momentum=None is not) and counters `buf += k` with a constant k. Otherwise "
        "compute the value as a new tensor each step, construct the BatchNorm with "
        "track_running_stats=False, or put the module in eval mode"
    )


def _read_zeros(gm: torch.fx.GraphModule, user: torch.fx.Node, index: int, old: torch.fx.Node) -> None:
    """Makes argument `index` of `user` a tensor of zeros shaped like `old` (made just before
    `user`, with its module path)."""
    val = old.meta["val"]
    with gm.graph.inserting_before(user):
        zeros = gm.graph.call_function(torch.ops.aten.zeros.default, (list(val.shape),),
                                       {"dtype": val.dtype, "device": val.device, "pin_memory": False})
    zeros.meta.update({k: user.meta[k] for k in ("nn_module_stack", "stack_trace", "custom", "seq_nr")
                       if k in user.meta})
    zeros.meta["val"] = torch.zeros_like(val)
    args = list(user.args)
    args[index] = zeros
    user.args = tuple(args)


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
            operator, op = op, op.as_aten_op()
            operator.erase()  # and with it its uses of the operands, which passes would see
        if isinstance(op, AtenOp) and aten_is_random(op.aten) and not _draws_nothing(op):
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


def _attach_signature(module: ModuleOp, gm: torch.fx.GraphModule, decays: dict[str, float]) -> None:
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
        elif isinstance(d, aot_desc.InputMutationAOTOutput) and d.mutated_input.target in decays:
            name = d.mutated_input.target
            entry = {RES_INCREMENT: StringAttr(name), RES_DECAY: FloatAttr(decays[name], f64)}
        else:
            raise CaptureError(
                f"unsupported graph output {d} (the model mutates an input; "
                "piperc captures functional training steps only)"
            )
        res_attrs.append(DictionaryAttr(entry))
    fn.arg_attrs = ArrayAttr(arg_attrs)
    fn.res_attrs = ArrayAttr(res_attrs)


def _draws_nothing(op: AtenOp) -> bool:
    """A random-tagged op that draws nothing here: scaled-dot-product attention whose
    `dropout_p` is the constant 0 (torch tags the op `nondeterministic_seeded` for its
    dropout), so it is deterministic and lays out like any other op."""
    names = [a.name for a in op.aten._schema.arguments]
    if "dropout_p" not in names or not op.name.startswith("torch.aten._scaled_dot_product"):
        return False
    owner = op.operands[names.index("dropout_p")].owner
    return isinstance(owner, ConstantFloatOp) and owner.value.value.data == 0.0
