"""Code generation: one readable Python program per rank, plus the manifest.

Reads a module lowered by `lower-to-exec`. Each `exec.program @rank<r>`
becomes `rank<r>.py`: the stage functions it launches, written one statement
per `torch.aten` op, then `def step(rt)` with one statement per exec op and
a comment naming the stage, microbatch and stream of every launch. The
programs import torch alone and call the runtime object `rt`
(`piperc.runtime`).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue
from xdsl.traits import IsTerminator

from piperc.dialects import exec as ex
from piperc.dialects import par
from piperc.dialects import torch as t
from piperc.dialects.roles import ORIGIN
from piperc.errors import PassError
from piperc.interpreter import enum_value
from piperc.ir import cycle_collection_paused, last_uses
from piperc.passes.lower_to_exec import DEVICE
from piperc.passes.mesh import find_mesh
from piperc.passes.microbatch import MICROBATCHES
from piperc.passes.outline_stages import arg_keys, result_keys
from piperc.passes.sharding_rules import RING, RING_METHOD

_DTYPES = {"f32": "torch.float32", "f64": "torch.float64", "f16": "torch.float16",
           "bf16": "torch.bfloat16", "si64": "torch.int64", "si32": "torch.int32", "i1": "torch.bool"}


def python_name(key: str) -> str:
    """A readable identifier for a keyed value: `param:blocks.0.attn.qkv.weight` -> `p_blocks_0_attn_qkv_weight`."""
    prefixes = {"param": "p", "buffer": "buf", "input": "input", "grad": "g", "state": "st", "tangent": "tangent"}
    role, _, rest = key.partition(":")
    if not rest:
        return "x_" + re.sub(r"\W", "_", key)
    return f"{prefixes.get(role, role)}_{re.sub(r'[^0-9a-zA-Z]', '_', rest)}"


class _Names:
    """Unique Python names for SSA values."""

    def __init__(self):
        self.names: dict[SSAValue, str] = {}
        self.used: set[str] = set()
        self.counter = 0

    def bind(self, value: SSAValue, name: str | None = None) -> str:
        base = name or "v"
        sep = "" if base == "v" else "_"
        while name is None or name in self.used:
            name = f"{base}{sep}{self.counter}"
            self.counter += 1
        self.used.add(name)
        self.names[value] = name
        return name

    def __getitem__(self, value: SSAValue) -> str:
        return self.names[value]


def _literal(op: Operation, jit_type=None) -> str | None:
    """Python source of a constant/list op, or None if it is not one."""
    if isinstance(op, t.ConstantIntOp):
        value = op.value.value.data
        enum = enum_value(jit_type, value) if jit_type is not None else None
        return str(enum) if enum is not None else repr(value)  # str(torch.float32) == "torch.float32"
    if isinstance(op, t.ConstantFloatOp):
        value = op.value.value.data
        return repr(value) if value == value and abs(value) != float("inf") else f"float('{value}')"
    if isinstance(op, t.ConstantBoolOp):
        return repr(bool(op.value.value.data))
    if isinstance(op, t.ConstantNoneOp):
        return "None"
    if isinstance(op, t.ConstantStrOp):
        return repr(op.value.data)
    if isinstance(op, t.ConstantDeviceOp):
        return "DEVICE"
    return None


_PASS_WORDS = {"F": "forward", "B": "backward", "W": "weight gradient", "update": "optimizer update"}


def _function_source(fn: func.FuncOp, launch: ex.LaunchOp) -> list[str]:
    """The Python function for `fn`; `launch` (its first launch) says its stage and pass."""
    names = _Names()
    keys = arg_keys(fn)
    params = [names.bind(a, python_name(k)) for a, k in zip(fn.args, keys, strict=True)]
    lines = [f"def {fn.sym_name.data}({', '.join(params)}):"]
    doc = f"Stage {launch.stage.value.data}, {_PASS_WORDS.get(launch.pass_kind.data, launch.pass_kind.data)}. "
    doc += f"Returns {', '.join(result_keys(fn))}."
    first, *rest = textwrap.wrap(doc, MAX_LINE - 10)
    lines += ['    """' + first, *("    " + line for line in rest)]
    lines[-1] += '"""'
    inline: dict[SSAValue, str] = {}
    last_use = last_uses(fn.body.block)
    args = set(fn.args)
    for op in fn.body.block.ops:
        if op.has_trait(IsTerminator):
            lines.append(f"    return ({', '.join(_operand(names, inline, v) for v in op.operands)}{',' if len(op.operands) == 1 else ''})")
            break
        if isinstance(op, t.ListConstructOp):
            inline[op.results[0]] = "[" + ", ".join(_operand(names, inline, v) for v in op.operands) + "]"
            continue
        if _literal(op) is not None:
            inline[op.results[0]] = ""  # resolved per use, where the schema type is known
            continue
        targets = [names.bind(r) for r in op.results]
        lhs = ", ".join(targets) + ("," if len(targets) == 1 and isinstance(op, t.ListUnpackOp) else "")
        if isinstance(op, t.ListUnpackOp):
            lines.append(f"    {lhs} = {_operand(names, inline, op.operands[0])}")
        elif isinstance(op, t.AtenOp):
            if t.RANDOM_INDEX in op.attributes:  # draws as one device would for this microbatch slice
                lines.append(f"    RT.seed_random({op.attributes[t.RANDOM_INDEX].value.data})")
            call = _aten_call(op, names, inline)
            lines.append(f"    {lhs} = {call}" if targets else f"    {call}")  # an op may return nothing
        elif isinstance(op, par.SliceIndexOp):
            lines.append(f"    {lhs} = RT.slice_index()")
        elif isinstance(op, par.AllGatherBucketOp | par.ReduceScatterBucketOp):
            lines += _bucket_statements(op, targets, [names[v] for v in op.inputs])
        elif isinstance(op, par.CollectiveOp):
            lines += _collective_statements(op, lhs, names[op.operands[0]])
        else:
            raise NotImplementedError(f"code generation has no rule for {op.name}")
        dead = [names[v] for v in last_use.get(op, ()) if v in names.names and v not in args]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    return lines


def _where(op: Operation) -> str:
    """`, where="blocks.0.moe"`: the model location (`piperc.origin`) a collective moves data
    for, which the runtime counts its bytes by; nothing for a collective without one."""
    origin = op.attributes.get(ORIGIN)
    return f", where={origin.path!r}" if isinstance(origin, par.OriginAttr) else ""


def _collective_statements(op: par.CollectiveOp, result: str, source: str) -> list[str]:
    """A collective inside a stage function, on this rank's group along its mesh axis
    (`AXIS_GROUPS`, see `_axis_group_tables`): issued through the step's runtime `RT` on
    the stream the function runs on (`stream=None`), then waited for."""
    axis = op.axis.data
    group = f'group=AXIS_GROUPS["{axis}"]'
    cuts = par.zigzag_cuts(op)  # which of the dimensions it cuts or assembles are zigzag
    zigzag = ", zigzag=True" if any(cuts) else ""
    if isinstance(op, par.AllSliceOp):
        dim = op.dim.value.data
        if any(cuts):
            return [f'    {result} = RT.zigzag_piece({source}, {dim}, {group})']
        return [f'    {result} = aten.chunk.default({source}, {op.group_size()}, {dim})'
                f'[AXIS_INDEX["{axis}"]]']
    if isinstance(op, par.AllReduceOp):
        return [f'    work, ({result},) = RT.all_reduce([{source}], {group}, op="{op.reduce.data.value}", stream=None)',
                "    RT.wait(work)"]
    if isinstance(op, par.AllGatherOp):
        call = f"RT.all_gather({source}, {group}, dim={op.dim.value.data}, stream=None{zigzag})"
    elif isinstance(op, par.ReduceScatterOp):
        call = (f'RT.reduce_scatter({source}, {group}, dim={op.dim.value.data}, '
                f'op="{op.reduce.data.value}", stream=None{zigzag})')
    elif isinstance(op, par.AllToAllOp):
        zigzag = f", zigzag={cuts}" if any(cuts) else ""
        call = (f"RT.all_to_all({source}, {group}, split_dim={op.split_dim.value.data}, "
                f"concat_dim={op.concat_dim.value.data}, stream=None{_where(op)}{zigzag})")
    else:
        raise NotImplementedError(f"code generation has no rule for {op.name}")
    return [f"    work, {result} = {call}", "    RT.wait(work)"]


def _bucket_statements(op: par.AllGatherBucketOp | par.ReduceScatterBucketOp, results: list[str],
                       sources: list[str]) -> list[str]:
    """A bucketed collective inside a stage function: one flat exchange for all its values,
    on this rank's group along its axis, then waited for."""
    group = f'group=AXIS_GROUPS["{op.axis.data}"]'
    if isinstance(op, par.AllGatherBucketOp):
        call = f"RT.all_gather_bucket([{', '.join(sources)}], {group}, stream=None)"
    else:
        call = f'RT.reduce_scatter_bucket([{", ".join(sources)}], {group}, op="{op.reduce.data.value}", stream=None)'
    return [f"    work, ({', '.join(results)},) = {call}", "    RT.wait(work)"]


def _axis_groups(program: ex.ProgramOp) -> list[ex.ProcessGroupOp]:
    """The axis-tagged process groups holding `program`'s rank (from lower-collectives)."""
    rank = program.rank.value.data
    module = program.parent_op()
    assert isinstance(module, ModuleOp)
    return [g for g in module.ops if isinstance(g, ex.ProcessGroupOp) and g.axis is not None
            and rank in g.rank_list()]


def _axis_group_tables(program: ex.ProgramOp) -> list[str]:
    """Module-level names the collectives of stage functions use: `RT` (the running step's
    runtime), `AXIS_GROUPS` (this rank's group along each mesh axis) and `AXIS_INDEX` (its
    position in that group). None when no stage function communicates."""
    rank = program.rank.value.data
    groups = _axis_groups(program)
    if not groups:
        return []
    table = ", ".join(f'"{g.axis.data}": "{g.sym_name.data}"' for g in groups)
    index = ", ".join(f'"{g.axis.data}": {g.rank_list().index(rank)}' for g in groups)
    return ["# Stage functions issue collectives through the runtime of the running step, on this",
            "# rank's process group along each mesh axis; AXIS_INDEX is the rank's position in it.",
            "RT = None", f"AXIS_GROUPS = {{{table}}}", f"AXIS_INDEX = {{{index}}}", "", ""]


def _operand(names: _Names, inline: dict[SSAValue, str], v: SSAValue, jit_type=None) -> str:
    if v in names.names:
        return names[v]
    src = inline.get(v)
    if src == "" or src is None:
        literal = _literal(v.owner, jit_type)
        if literal is None:
            raise NotImplementedError(f"code generation cannot inline {v.owner.name}")
        return literal
    return src


def _aten_call(op: t.AtenOp, names: _Names, inline) -> str:
    overload = op.aten
    schema = overload._schema
    args, kwargs = [], []
    for arg, v in zip(schema.arguments, op.operands, strict=True):
        src = _operand(names, inline, v, arg.real_type)
        if arg.kwarg_only:
            kwargs.append(f"{arg.name}={src}")
        else:
            args.append(src)
    ring = op.attributes.get(RING)
    if ring is not None:  # the attention runs around the axis (runtime/ring.py), keys and values travel
        method = "ring_attention_backward" if op.name.endswith("_backward") else "ring_attention"
        choice = op.attributes.get(RING_METHOD)
        chosen = f", method={choice.data!r}" if choice is not None else ""
        length = op.operands[0].type.get_shape()[2] * find_mesh(op.get_toplevel_object()).axis_size(ring.data)
        chosen += ", zigzag=True" if par.is_zigzag(op, ring.data, length) else ""  # the queries' sequence
        return f'RT.{method}({", ".join(args + kwargs)}, group=AXIS_GROUPS["{ring.data}"]{_where(op)}{chosen})'
    if op.name == "torch.aten.view":
        # Value semantics make view and reshape equal; reshape also takes a tensor whose
        # strides differ from those capture saw (a collective's output, or attention's, which
        # follows its query's memory format), where view would fail.
        return f"aten.reshape.default({', '.join(args)})"
    packet = op.name.removeprefix("torch.aten.").split(".")[0]
    return f"aten.{packet}.{overload._overloadname}({', '.join(args + kwargs)})"


_PHASE_FUNCTIONS = {"first": ("first_step", "The first training step"), "step": ("step", "One training step"),
                    "drain": ("drain", "After the last step: what is still in flight")}
"""The function of a rank's file that runs each phase's program, and its docstring's start."""


def _program_source(programs: list[ex.ProgramOp], functions: dict[str, func.FuncOp], header: str,
                    function_sources: dict[tuple[str, int, str], list[str]]) -> str:
    """The text of one rank's file, from its `programs` (its step program, and the first and
    drain programs of a program that carries values between steps: `def first_step(rt)`,
    `def drain(rt)`). `function_sources` holds the wrapped lines of the stage functions
    already written for other programs (the ranks of one stage share them)."""
    first_launch = {}
    for program in programs:
        for op in program.walk():
            if isinstance(op, ex.LaunchOp):
                first_launch.setdefault(op.callee.root_reference.data, op)
    lines = [header, "import torch", "", "aten = torch.ops.aten", 'DEVICE = torch.device("cpu")', "", ""]
    lines += _axis_group_tables(programs[0])
    out = _wrap_lines(lines)
    for name, launch in first_launch.items():
        key = (name, launch.stage.value.data, launch.pass_kind.data)
        if key not in function_sources:
            function_sources[key] = _wrap_lines([*_function_source(functions[name], launch), "", ""])
        out += function_sources[key]
    for i, program in enumerate(programs):
        out += ([""] * 2 if i else []) + _wrap_lines(_step_source(program, functions))
    return "\n".join(out) + "\n"


def _wrap_lines(lines: list[str]) -> list[str]:
    return [wrapped for line in lines for wrapped in wrap_line(line)]


MAX_LINE = 120
"""No line of a generated program is longer (long calls and signatures are wrapped)."""


_BRACKETS_QUOTES_COMMAS = re.compile(r"[\"'()\[\]{},]")


def wrap_line(line: str) -> list[str]:
    """`line` as lines of at most MAX_LINE characters, broken after commas inside brackets
    (a tuple on the left of `=`, and the targets of `del`, are bracketed first); a line that cannot break is kept."""
    if len(line) <= MAX_LINE:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    if line.lstrip().startswith("del "):
        line = f"{indent}del ({line.lstrip()[4:]})"
    lhs, eq, rhs = line.lstrip().partition(" = ")
    if eq and _top_level_comma(lhs) and not lhs.startswith(("(", "def ", "return")):
        line = f"{indent}({lhs}) = {rhs}"
    breaks, depth, quote = [], 0, ""
    for match in _BRACKETS_QUOTES_COMMAS.finditer(line):  # the only characters that matter below
        i, ch = match.start(), match.group()
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth > 0:
            breaks.append(i + 1)
    out, start, last = [], 0, None
    prefix = ""
    for b in [*breaks, len(line)]:
        if len(prefix) + b - start > MAX_LINE and last is not None:
            out.append(prefix + line[start:last].rstrip())
            start, prefix = last, indent + "        "
            while start < len(line) and line[start] == " ":
                start += 1
        last = b
    out.append(prefix + line[start:])
    return out


def _top_level_comma(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            return True
    return False


def _step_source(program: ex.ProgramOp, functions: dict[str, func.FuncOp]) -> list[str]:
    names = _Names()
    rank = program.rank.value.data
    function, doc = _PHASE_FUNCTIONS[program.phase_name()]
    lines = [
        f"def {function}(rt):",
        f'    """{doc} of rank {rank}."""',
        "    global DEVICE",
        "    DEVICE = rt.device",
    ]
    if _axis_groups(program) or _asks_runtime(program, functions):
        lines += ["    global RT", "    RT = rt"]
    for op in program.body.block.ops:
        lines += ["    " + line for line in _exec_statement(op, names, functions)]
    return lines


def _asks_runtime(program: ex.ProgramOp, functions: dict[str, func.FuncOp]) -> bool:
    """Whether a function `program` launches asks the running step about its task: a random
    op (its code calls `RT.seed_random`) or `par.slice_index` (`RT.slice_index`)."""
    called = {op.callee.root_reference.data for op in program.walk() if isinstance(op, ex.LaunchOp)}
    return any(t.RANDOM_INDEX in op.attributes or isinstance(op, par.SliceIndexOp)
               for name in called for op in functions[name].walk())


def _type_args(type_: t.ValueTensorType) -> str:
    shape = tuple(type_.get_shape())
    return f"{shape!r}, {_DTYPES[str(type_.dtype)]}"


def _exec_statement(op: Operation, names: _Names, functions: dict[str, func.FuncOp]) -> list[str]:
    n = names.__getitem__
    if isinstance(op, ex.StreamOp):
        return [f'{names.bind(op.results[0], op.stream_name.data)} = rt.stream("{op.stream_name.data}")']
    if isinstance(op, ex.EventRecordOp):
        return [f"{names.bind(op.results[0], 'event')} = rt.event_record({n(op.stream)})"]
    if isinstance(op, ex.EventWaitOp):
        return [f"rt.event_wait({n(op.stream)}, {n(op.event)})"]
    if isinstance(op, ex.StateOp):
        return [f'{names.bind(op.results[0], python_name("state:" + op.state_name.data))} = rt.state("{op.state_name.data}")']
    if isinstance(op, ex.SetStateOp):
        return [f'rt.set_state("{op.state_name.data}", {n(op.value)})']
    if isinstance(op, ex.LoadInputOp):
        mb = op.microbatch.value.data
        value = names.bind(op.results[0], f"input{op.input_name.data}_mb{mb}")
        return [f"{value} = rt.input({op.input_name.data}, {mb})  # layout {json.dumps(_layout_json(op))}"]
    if isinstance(op, ex.LaunchOp):
        callee = op.callee.root_reference.data
        kind = op.pass_kind.data
        stage = op.stage.value.data
        where = f"stage {stage}"
        action = f"{stage}U"
        if op.microbatch is not None:
            mb = op.microbatch.value.data
            where += f", microbatch {mb}"
            action = f"{stage}{kind}{mb}"
        if "_accumulate" in callee:
            suffix = "_sum"
        elif op.microbatch is not None:
            suffix = f"_mb{op.microbatch.value.data}"
        else:
            suffix = "_new"
        keys = result_keys(functions[callee])
        results = [names.bind(r, python_name(k) + suffix) for r, k in zip(op.outs, keys, strict=True)]
        lhs = (", ".join(results) + ("," if len(results) == 1 else "")) if results else "_"
        args = ", ".join(n(a) for a in op.args)
        microbatch = None if op.microbatch is None else op.microbatch.value.data
        lines = ["", f"# {action} ({callee}): {where}, stream {n(op.stream)}",
                 f'with rt.launch("{callee}", stage={stage}, pass_kind="{kind}", microbatch={microbatch}, '
                 f"stream={n(op.stream)}):", f"    {lhs} = {callee}({args})"]
        if results and kind != "update":
            grads = [r for r, k in zip(results, keys, strict=True) if k.startswith("grad:")]
            others = [r for r in results if r not in grads]
            if others:
                lines.append(f"rt.produced({', '.join(others)})")
            if grads:
                lines.append(f"rt.produced_gradients({', '.join(grads)})")
        stashed = ex.stashed_operands(op, arg_keys(functions[callee])) if kind == "update" else []
        if stashed:
            lines.append(f"rt.stashed({', '.join(n(v) for v in stashed)})  # still read by later backwards")
        return lines
    if isinstance(op, ex.CarriedOp):
        stash = ", stash=True" if op.stash is not None else ""
        value = names.bind(op.results[0], python_name("carried:" + op.carry_name.data))
        return [f'{value} = rt.carried("{op.carry_name.data}"{stash})']
    if isinstance(op, ex.CarryOp):
        return [f'rt.carry("{op.carry_name.data}", {n(op.value)})']
    if isinstance(op, ex.SendOp):
        group = op.group.root_reference.data
        return [f'{names.bind(op.work, "w")} = rt.send({n(op.input)}, dst={op.peer.value.data}, group="{group}", '
                f"tag={op.tag.value.data}, stream={n(op.stream)})"]
    if isinstance(op, ex.RecvOp):
        group = op.group.root_reference.data
        w = names.bind(op.work, "w")
        v = names.bind(op.output, "recv")
        return [f'{w}, {v} = rt.recv({_type_args(op.output.type)}, src={op.peer.value.data}, group="{group}", '
                f"tag={op.tag.value.data}, stream={n(op.stream)})"]
    if isinstance(op, ex.AllReduceOp):
        group = op.group.root_reference.data
        w = names.bind(op.work, "w")
        outs = [names.bind(r, "reduced") for r in op.outputs]
        ins = ", ".join(n(v) for v in op.inputs)
        return ["", f"# gradient bucket of {len(outs)} tensor(s), group {group}",
                f'{w}, ({", ".join(outs)},) = rt.all_reduce([{ins}], group="{group}", '
                f'op="{op.reduction.data.value}", stream={n(op.stream)})']
    if isinstance(op, ex.AllGatherOp | ex.ReduceScatterOp | ex.AllToAllOp):
        group = op.group.root_reference.data
        w, out = names.bind(op.work, "w"), names.bind(op.output, "gathered" if isinstance(op, ex.AllGatherOp) else "part")
        if isinstance(op, ex.AllGatherOp):
            call = f'rt.all_gather({n(op.input)}, group="{group}", dim={op.dim.value.data}'
        elif isinstance(op, ex.ReduceScatterOp):
            call = (f'rt.reduce_scatter({n(op.input)}, group="{group}", dim={op.dim.value.data}, '
                    f'op="{op.reduction.data.value}"')
        else:
            call = (f'rt.all_to_all({n(op.input)}, group="{group}", split_dim={op.split_dim.value.data}, '
                    f"concat_dim={op.concat_dim.value.data}{_where(op)}")
        return [f"{w}, {out} = {call}, stream={n(op.stream)})"]
    if isinstance(op, ex.BatchP2POp):
        group = op.group.root_reference.data
        w = names.bind(op.work, "w")
        sends = ", ".join(f"({n(v)}, {peer})" for v, peer in op.send_list())
        recvs = ", ".join(f"({_type_args(v.type)}, {peer})" for v, peer in op.recv_list())
        outs = [names.bind(v, "recv") for v in op.recvs]
        lhs = f"{w}, ({', '.join(outs)},)" if outs else f"{w}, _"
        return [f'{lhs} = rt.batch_p2p(sends=[{sends}], recvs=[{recvs}], group="{group}", stream={n(op.stream)})']
    if isinstance(op, ex.WaitOp):
        works = ", ".join(n(w) for w in op.works)
        return [f"rt.wait({works}, stream={n(op.stream)})", f"del {works}"]
    if isinstance(op, ex.RecordStreamOp):
        return [f"rt.record_stream({n(op.tensor)}, {n(op.stream)})"]
    if isinstance(op, ex.FreeOp):
        buffers = ", ".join(n(b) for b in op.buffers)
        return [f"rt.free({buffers})", f"del {buffers}"]
    if isinstance(op, ex.OutputOp):
        return [f'rt.output("{op.output_name.data}", {n(op.value)})']
    raise NotImplementedError(f"code generation has no rule for {op.name}")


def _layout_json(op: ex.LoadInputOp) -> list[list[str]]:
    """The input's layout as the manifest writes it: per dimension, the mesh axes that split it."""
    if op.layout is None:
        raise ValueError(f'exec.load_input "{op.input_name.data}" has no layout; the runtime cuts '
                         "inputs by it (lower-to-exec writes one from par.input)")
    return _axes_json(op.layout)


def _refuse_zigzag_state(op: ex.StateOp, mesh: par.MeshAttr) -> None:
    """Raises PassError for state whose layout cuts a dimension zigzag (`par.ZIGZAG`): state
    is saved and gathered by contiguous boxes (`runtime.manifest.part_box`)."""
    if op.layout is None:
        return
    lengths = par.zigzag_lengths(op)
    for dim, size in enumerate(op.results[0].type.get_shape()):
        axes = op.layout.dim_axes(dim)
        whole = size * math.prod(mesh.axis_size(a) for a in axes)
        for axis in axes:
            if lengths.get(axis) == whole:
                raise PassError(f"code generation: state {op.state_name.data} is cut over axis '{axis}' along "
                                f"dimension {dim} of {whole}, which the mesh cuts zigzag; state is saved and "
                                "gathered in contiguous pieces, so it cannot be laid out over a zigzag cut")
            whole //= mesh.axis_size(axis)


def _axes_json(layout: par.ShardingAttr) -> list[list[str]]:
    """Per dimension of a layout, the mesh axes that split it (the manifest's form)."""
    return [list(layout.dim_axes(d)) for d in range(layout.rank())]


def _input_layouts(programs: list[ex.ProgramOp]) -> dict[int, list[list[str]]]:
    """Input index -> its layout, which every rank that loads the input must agree on."""
    layouts: dict[int, list[list[str]]] = {}
    for program in programs:
        for op in program.walk():
            if not isinstance(op, ex.LoadInputOp):
                continue
            index, layout = int(op.input_name.data), _layout_json(op)
            if layouts.setdefault(index, layout) != layout:
                raise ValueError(f"input {index} is loaded with layout {layout} on @{program.sym_name.data} "
                                 f"but {layouts[index]} elsewhere; an input has one layout")
    return layouts


@cycle_collection_paused()  # the text is built from many small strings, and nothing here makes cycles
def generate(module: ModuleOp, state_kinds: dict[str, dict[str, Any]],
             signature: Sequence[tuple[tuple[int, ...], str]] = (),
             aliases: dict[str, str] | None = None, seed: int = 0) -> dict[str, str]:
    """Files of a compiled step: `rank<r>.py` for every program and `manifest.json`.

    `seed` is the seed random ops draw from (`Runtime.seed_random`), written into the manifest.
    `aliases` maps each other name of a tied parameter to the one the programs use; the
    manifest lists them so that the runtime's state dicts hold every name the model's does.

    `signature` gives each global input's shape and dtype name (`int64`), written into the
    manifest so that the runtime checks every batch against it before running; without it
    the manifest has no input shapes and batches are not checked.

    `state_kinds` maps each state name that is not a model tensor to how the
    runtime creates it (`{"kind": "zeros", "like": "w"}`, `{"kind": "scalar",
    "value": 0.0}`); model tensors are `{"kind": "param"}`.
    """
    functions = {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}
    groups = [(g.sym_name.data, list(g.ranks.get_values())) for g in module.ops if isinstance(g, ex.ProcessGroupOp)]
    programs = [p for p in module.ops if isinstance(p, ex.ProgramOp)]
    phases: dict[int, list[ex.ProgramOp]] = defaultdict(list)  # rank -> its programs, in phase order
    for p in sorted(programs, key=lambda p: list(_PHASE_FUNCTIONS).index(p.phase_name())):
        phases[p.rank.value.data].append(p)
    programs = [p for p in programs if p.phase_name() == "step"]
    mesh = find_mesh(module)
    device = module.attributes[DEVICE].data
    files: dict[str, str] = {}
    ranks = []
    owners: dict[str, list[int]] = defaultdict(list)
    function_sources: dict[tuple[str, int, str], list[str]] = {}
    for program in programs:
        rank = program.rank.value.data
        coords = mesh.coords(rank)
        header = (f"# piperc program for rank {rank} of {program.world_size.value.data} "
                  f"({', '.join(f'{a}={i}' for a, i in coords.items())}); generated code, do not edit")
        files[f"rank{rank}.py"] = _program_source(phases[rank], functions, header, function_sources)
        state = []
        for op in (o for p in phases[rank] for o in p.body.block.ops):
            if isinstance(op, ex.StateOp) and op.state_name.data not in (s["name"] for s in state):
                name = op.state_name.data
                _refuse_zigzag_state(op, mesh)
                layout = {} if op.layout is None else {"layout": _axes_json(op.layout)}
                state.append({"name": name, **state_kinds.get(name, {"kind": "param"}), **layout})
                if state_kinds.get(name, {"kind": "param"})["kind"] == "param":
                    owners[name].append(rank)
        inputs = sorted({int(op.input_name.data) for p in phases[rank] for op in p.walk()
                         if isinstance(op, ex.LoadInputOp)})
        ranks.append({"rank": rank, "program": f"rank{rank}.py", "coords": coords, "inputs": inputs, "state": state})
    world = list(range(mesh.size()))
    layouts = _input_layouts(programs)
    manifest = {
        "format": 3,
        "world_size": mesh.size(),
        "mesh": [[a, mesh.axis_size(a)] for a in mesh.axis_names()],
        "device": device,
        "groups": [["world", world], *groups],
        "inputs": [{"index": i, "name": f"input{i}", "layout": layout,
                    **({"shape": list(signature[i][0]), "dtype": signature[i][1]} if i < len(signature) else {})}
                   for i, layout in sorted(layouts.items())],
        "microbatches": module.attributes[MICROBATCHES].value.data,
        "ranks": ranks,
        "params": {name: {"owners": r} for name, r in sorted(owners.items())},
        "aliases": dict(sorted((aliases or {}).items())),
        "seed": seed,
        **({"zigzag": zigzag} if (zigzag := par.zigzag_lengths(module)) else {}),
    }
    files["manifest.json"] = json.dumps(manifest, indent=1) + "\n"
    return files
