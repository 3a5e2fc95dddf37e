"""The `par` dialect: how a model's compute is spread over devices.

A device mesh is a symbol (`par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>`)
with named axes. Values carry shardings over its axes (`par.shard`), compute
is cut into tasks, one per stage, pass and microbatch (`par.task`), values
move between stages by `par.send`/`par.recv` and within a mesh axis by
collectives, and `par.schedule` says, per device along the pipeline axis,
in which order the tasks run, in torch.distributed.pipelining's vocabulary
(`0F1` = stage 0, forward, microbatch 1).
"""

from __future__ import annotations

import math
import re
import weakref
from abc import ABC
from collections.abc import Iterable, Sequence
from typing import ClassVar

from xdsl.dialects import func
from xdsl.dialects.builtin import (
    I64,
    ArrayAttr,
    DictionaryAttr,
    FlatSymbolRefAttr,
    IntAttr,
    IntegerAttr,
    ModuleOp,
    NoneAttr,
    StringAttr,
    SymbolNameConstraint,
    UnitAttr,
)
from xdsl.dialects.utils import EnumAttribute
from xdsl.ir import Attribute, Block, Dialect, Operation, ParametrizedAttribute, Region, SSAValue
from xdsl.irdl import (
    IRDLOperation,
    VarConstraint,
    base,
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    opt_prop_def,
    prop_def,
    region_def,
    result_def,
    traits_def,
    var_operand_def,
    var_result_def,
)
from xdsl.irdl.declarative_assembly_format import (
    CustomDirective,
    ParsingState,
    PrintingState,
    UniqueBaseAttributeVariable,
    irdl_custom_directive,
)
from xdsl.parser import AttrParser, Parser
from xdsl.printer import Printer
from xdsl.traits import (
    HasParent,
    IsolatedFromAbove,
    NoTerminator,
    Pure,
    SymbolOpInterface,
    SymbolTable,
)
from xdsl.utils.exceptions import VerifyException
from xdsl.utils.str_enum import StrEnum

from piperc.dialects.torch import IntType, ValueTensorType

# ---------------------------------------------------------------- attributes


@irdl_attr_definition
class MeshAttr(ParametrizedAttribute):
    """A device mesh: ordered named axes with sizes, `#par.mesh<["pp"=2, "dp"=2]>`.

    Ranks are laid out row-major over the axes in order: the last axis varies
    fastest, so on the mesh above ranks 0 and 1 share a pipeline stage.
    """

    name = "par.mesh"

    axes: ArrayAttr[StringAttr]
    sizes: ArrayAttr[IntAttr]

    def __init__(self, axes: Iterable[tuple[str, int]]):
        pairs = list(axes)
        super().__init__(
            ArrayAttr(StringAttr(n) for n, _ in pairs),
            ArrayAttr(IntAttr(s) for _, s in pairs),
        )

    def axis_names(self) -> tuple[str, ...]:
        """The axis names, in mesh order."""
        return tuple(a.data for a in self.axes.data)

    def axis_size(self, name: str) -> int:
        """The number of devices along axis `name`."""
        names = self.axis_names()
        if name not in names:
            raise KeyError(f"mesh {self} has no axis '{name}' (axes: {', '.join(names)})")
        return self.sizes.data[names.index(name)].data

    def size(self) -> int:
        """The number of devices in the mesh."""
        return math.prod(s.data for s in self.sizes.data)

    def coords(self, rank: int) -> dict[str, int]:
        """The position of `rank` along each axis."""
        if not 0 <= rank < self.size():
            raise ValueError(f"rank {rank} is outside mesh {self} of {self.size()} devices")
        position: dict[str, int] = {}
        rest = rank
        for name, size in reversed(list(zip(self.axis_names(), self._sizes(), strict=True))):
            rest, position[name] = divmod(rest, size)
        return {name: position[name] for name in self.axis_names()}

    def rank_of(self, coords: dict[str, int]) -> int:
        """The rank at `coords`, which gives a position for every axis."""
        if set(coords) != set(self.axis_names()):
            raise ValueError(f"coords {coords} must name exactly the axes of mesh {self}")
        rank = 0
        for name, size in zip(self.axis_names(), self._sizes(), strict=True):
            if not 0 <= coords[name] < size:
                raise ValueError(f"coordinate {name}={coords[name]} is outside mesh {self}")
            rank = rank * size + coords[name]
        return rank

    def group_ranks(self, axis: str, rank: int) -> tuple[int, ...]:
        """The ranks that differ from `rank` only along `axis`, in axis order."""
        coords = self.coords(rank)
        return tuple(self.rank_of(coords | {axis: i}) for i in range(self.axis_size(axis)))

    def all_groups(self, axis: str) -> list[tuple[int, ...]]:
        """Every group of ranks along `axis`, ordered by their first rank."""
        return [
            self.group_ranks(axis, rank)
            for rank in range(self.size())
            if self.coords(rank)[axis] == 0
        ]

    def _sizes(self) -> tuple[int, ...]:
        return tuple(s.data for s in self.sizes.data)

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        def parse_axis() -> tuple[str, int]:
            name = parser.parse_str_literal(" for a mesh axis name")
            parser.parse_punctuation("=")
            return name, parser.parse_integer(allow_boolean=False)

        with parser.in_angle_brackets():
            pairs = parser.parse_comma_separated_list(parser.Delimiter.SQUARE, parse_axis)
        return (
            ArrayAttr(StringAttr(n) for n, _ in pairs),
            ArrayAttr(IntAttr(s) for _, s in pairs),
        )

    def print_parameters(self, printer: Printer) -> None:
        def print_axis(name: str, size: int) -> None:
            printer.print_string_literal(name)
            printer.print_string(f"={size}")

        with printer.in_angle_brackets(), printer.in_square_brackets():
            printer.print_list(
                zip(self.axis_names(), self._sizes(), strict=True),
                lambda axis: print_axis(*axis),
            )

    def verify(self) -> None:
        names = self.axis_names()
        if len(names) != len(self.sizes.data):
            raise VerifyException(
                f"{self.name}: {len(names)} axis names but {len(self.sizes.data)} sizes"
            )
        if "" in names:
            raise VerifyException(f"{self.name}: an axis name is empty")
        for name in names:
            if names.count(name) > 1:
                raise VerifyException(f"{self.name}: axis '{name}' is declared twice")
        for name, size in zip(names, self._sizes(), strict=True):
            if size < 1:
                raise VerifyException(f"{self.name}: axis '{name}' has size {size}, must be >= 1")


@irdl_attr_definition
class ShardingAttr(ParametrizedAttribute):
    """How a tensor is laid out over mesh axes.

    `#par.sharding<[["dp"], [], ["tp", "sp"]], partial = ["ep"]>`: one list
    per tensor dimension, naming the mesh axes that split it, outermost first
    (an empty list leaves the dimension whole); `partial` names the axes over
    which each device holds a partial sum still to be reduced, and is printed
    only when non-empty. A sharding with neither is replicated.
    """

    name = "par.sharding"

    dims: ArrayAttr[ArrayAttr[StringAttr]]
    partial: ArrayAttr[StringAttr]

    def __init__(self, dims: Iterable[Iterable[str]], partial: Iterable[str] = ()):
        super().__init__(
            ArrayAttr(ArrayAttr(StringAttr(a) for a in axes) for axes in dims),
            ArrayAttr(StringAttr(a) for a in partial),
        )

    @classmethod
    def replicated(cls, rank: int) -> ShardingAttr:
        """The replicated sharding of a rank-`rank` tensor."""
        return cls([[] for _ in range(rank)])

    @classmethod
    def split(cls, rank: int, dim: int, axis: str) -> ShardingAttr:
        """A rank-`rank` tensor split along `dim` over mesh axis `axis`."""
        if not 0 <= dim < rank:
            raise ValueError(f"dimension {dim} is outside a rank-{rank} tensor")
        return cls([[axis] if d == dim else [] for d in range(rank)])

    def rank(self) -> int:
        """The rank of the tensors this sharding applies to."""
        return len(self.dims.data)

    def dim_axes(self, dim: int) -> tuple[str, ...]:
        """The mesh axes splitting dimension `dim`, outermost first."""
        return tuple(a.data for a in self.dims.data[dim].data)

    def partial_axes(self) -> tuple[str, ...]:
        """The mesh axes over which the value is a pending partial sum."""
        return tuple(a.data for a in self.partial.data)

    def is_replicated(self) -> bool:
        """True when no dimension is split and no sum is pending."""
        return not self.partial.data and all(not axes.data for axes in self.dims.data)

    def _used_axes(self) -> list[str]:
        used = [a for d in range(self.rank()) for a in self.dim_axes(d)]
        return used + list(self.partial_axes())

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        def parse_axes() -> ArrayAttr[StringAttr]:
            return ArrayAttr(
                StringAttr(a)
                for a in parser.parse_comma_separated_list(
                    parser.Delimiter.SQUARE, lambda: parser.parse_str_literal(" for a mesh axis")
                )
            )

        with parser.in_angle_brackets():
            dims = parser.parse_comma_separated_list(parser.Delimiter.SQUARE, parse_axes)
            partial = ArrayAttr[StringAttr](())
            if parser.parse_optional_punctuation(","):
                parser.parse_keyword("partial")
                parser.parse_punctuation("=")
                partial = parse_axes()
        return (ArrayAttr(dims), partial)

    def print_parameters(self, printer: Printer) -> None:
        def print_axes(axes: ArrayAttr[StringAttr]) -> None:
            with printer.in_square_brackets():
                printer.print_list(axes.data, lambda a: printer.print_string_literal(a.data))

        with printer.in_angle_brackets():
            with printer.in_square_brackets():
                printer.print_list(self.dims.data, print_axes)
            if self.partial.data:
                printer.print_string(", partial = ")
                print_axes(self.partial)

    def verify(self) -> None:
        used = self._used_axes()
        if "" in used:
            raise VerifyException(f"{self.name}: an axis name is empty")
        for axis in used:
            if used.count(axis) > 1:
                raise VerifyException(
                    f"{self.name}: mesh axis '{axis}' is used twice; an axis splits one "
                    "dimension or holds a partial sum, not both"
                )


class _BracketedEnum:
    """Prints an enum attribute as `#dialect.name<value>`, as MLIR's enum attributes do.

    xDSL's EnumAttribute alone prints `#dialect.namevalue`. Ops write the bare
    value through the `EnumKeyword` directive.
    """

    enum_type: ClassVar[type[StrEnum]]
    data: StrEnum

    def print_parameter(self, printer: Printer) -> None:
        printer.print_string(f"<{self.data.value}>")

    @classmethod
    def parse_parameter(cls, parser: AttrParser) -> StrEnum:
        with parser.in_angle_brackets():
            return parser.parse_str_enum(cls.enum_type)


class PassKind(StrEnum):
    """Which pass over the model a piece of compute belongs to."""

    F = "F"
    """Forward."""
    B = "B"
    """Backward: input gradients, and weight gradients too unless the schedule splits them off as W."""
    W = "W"
    """Backward, gradient with respect to the weights."""
    UPDATE = "update"
    """Optimizer update."""


@irdl_attr_definition
class PassKindAttr(_BracketedEnum, EnumAttribute[PassKind]):
    """The pass of a task: `#par.pass<F>`, `#par.pass<B>`, `#par.pass<W>`, `#par.pass<update>`."""

    name = "par.pass"


_PASS_LETTERS = {PassKind.F: "F", PassKind.B: "B", PassKind.W: "W", PassKind.UPDATE: "U"}
_LETTER_PASSES = {letter: kind for kind, letter in _PASS_LETTERS.items()}
_ACTION_RE = re.compile(r"(\d+)([FBWU])(\d+)")


@irdl_attr_definition
class OriginAttr(ParametrizedAttribute):
    """Where an op came from in the model.

    `#par.origin<"blocks.3.attn.qkv", F>`: the module path ("" for the top
    module) and the pass (F or B) that produced the op. An op inside an
    annotated region also names the region and, optionally, its index:
    `#par.origin<"blocks.3.attn.qkv", B, region "stage1" 0>`.
    """

    name = "par.origin"

    module_path: StringAttr
    kind: PassKindAttr
    region_name: StringAttr | NoneAttr
    index: IntAttr | NoneAttr

    def __init__(
        self,
        path: str,
        pass_kind: PassKind,
        region: str | None = None,
        region_index: int | None = None,
    ):
        super().__init__(
            StringAttr(path),
            PassKindAttr(pass_kind),
            NoneAttr() if region is None else StringAttr(region),
            NoneAttr() if region_index is None else IntAttr(region_index),
        )

    @property
    def path(self) -> str:
        """The module path, e.g. `blocks.3.attn.qkv`."""
        return self.module_path.data

    @property
    def pass_kind(self) -> PassKind:
        """F or B."""
        return self.kind.data

    @property
    def region(self) -> str | None:
        """The name of the annotated region, if any."""
        return self.region_name.data if isinstance(self.region_name, StringAttr) else None

    @property
    def region_index(self) -> int | None:
        """The index of the annotated region, if any."""
        return self.index.data if isinstance(self.index, IntAttr) else None

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        with parser.in_angle_brackets():
            path = parser.parse_str_literal(" for the module path")
            parser.parse_punctuation(",")
            kind = parser.parse_str_enum(PassKind)
            region: Attribute = NoneAttr()
            index: Attribute = NoneAttr()
            if parser.parse_optional_punctuation(","):
                parser.parse_keyword("region")
                region = StringAttr(parser.parse_str_literal(" for the region name"))
                found = parser.parse_optional_integer(allow_boolean=False)
                if found is not None:
                    index = IntAttr(found)
        return (StringAttr(path), PassKindAttr(kind), region, index)

    def print_parameters(self, printer: Printer) -> None:
        with printer.in_angle_brackets():
            printer.print_string_literal(self.path)
            printer.print_string(f", {self.pass_kind.value}")
            if self.region is not None:
                printer.print_string(", region ")
                printer.print_string_literal(self.region)
            if self.region_index is not None:
                printer.print_string(f" {self.region_index}")

    def verify(self) -> None:
        if self.pass_kind not in (PassKind.F, PassKind.B):
            raise VerifyException(
                f"{self.name}: an op comes from the forward (F) or backward (B) pass, "
                f"not {self.pass_kind.value}"
            )
        if self.region_index is None:
            return
        if self.region is None:
            raise VerifyException(f"{self.name}: region index {self.region_index} without a region")
        if self.region_index < 0:
            raise VerifyException(f"{self.name}: region index {self.region_index} must be >= 0")


@irdl_attr_definition
class ActionAttr(ParametrizedAttribute):
    """One schedule action: a stage, a pass and a microbatch, `#par.action<0F1>`.

    Written as torch.distributed.pipelining writes it: `<stage><pass><mb>`,
    with pass F, B, W or U (optimizer update): `0F1`, `1B0`, `0W3`, `1U0`.
    """

    name = "par.action"

    stage_id: IntAttr
    kind: PassKindAttr
    mb: IntAttr

    def __init__(self, stage: int, pass_kind: PassKind, microbatch: int):
        super().__init__(IntAttr(stage), PassKindAttr(pass_kind), IntAttr(microbatch))

    @classmethod
    def from_str(cls, text: str) -> ActionAttr:
        """The action written `text`, e.g. `0F1`."""
        match = _ACTION_RE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"'{text}' is not a schedule action; write <stage><F|B|W|U><microbatch>, e.g. 0F1"
            )
        stage, letter, mb = match.groups()
        return cls(int(stage), _LETTER_PASSES[letter], int(mb))

    def compact(self) -> str:
        """The action as written in a schedule table, e.g. `0F1`."""
        return f"{self.stage}{_PASS_LETTERS[self.pass_kind]}{self.microbatch}"

    @property
    def stage(self) -> int:
        """The pipeline stage."""
        return self.stage_id.data

    @property
    def pass_kind(self) -> PassKind:
        """The pass."""
        return self.kind.data

    @property
    def microbatch(self) -> int:
        """The microbatch."""
        return self.mb.data

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        with parser.in_angle_brackets():
            action = _parse_action(parser)
        return (action.stage_id, action.kind, action.mb)

    def print_parameters(self, printer: Printer) -> None:
        printer.print_string(f"<{self.compact()}>")

    def verify(self) -> None:
        if self.stage < 0 or self.microbatch < 0:
            raise VerifyException(
                f"{self.name}: stage and microbatch must be >= 0, got {self.stage} "
                f"and {self.microbatch}"
            )


def _parse_action(parser: AttrParser) -> ActionAttr:
    """Parses a compact action such as `0F1` (lexed as the integer 0, then `F1`)."""
    pos = parser.pos
    stage = parser.parse_integer(allow_boolean=False, allow_negative=False)
    rest = parser.parse_optional_identifier() or ""
    try:
        return ActionAttr.from_str(f"{stage}{rest}")
    except ValueError as e:
        parser.raise_error(str(e), pos, parser.pos)


def _print_actions(printer: Printer, actions: ArrayAttr[ActionAttr]) -> None:
    with printer.in_square_brackets():
        printer.print_list(actions.data, lambda a: printer.print_string(a.compact()))


class ReduceKind(StrEnum):
    """How a collective combines the values of a group."""

    SUM = "sum"
    AVG = "avg"
    MAX = "max"


@irdl_attr_definition
class ReduceKindAttr(_BracketedEnum, EnumAttribute[ReduceKind]):
    """The reduction of a collective: `#par.reduce<sum>`, `<avg>` or `<max>`."""

    name = "par.reduce"


@irdl_custom_directive
class EnumKeyword(CustomDirective):
    """Writes an enum property as its bare value in an op's syntax: `pass F`, `sum`."""

    value: UniqueBaseAttributeVariable

    def parse(self, parser: Parser, state: ParsingState) -> None:
        attr_type = self.value.unique_base
        assert issubclass(attr_type, EnumAttribute)
        self.value.set(state, attr_type(parser.parse_str_enum(attr_type.enum_type)))

    def print(self, printer: Printer, state: PrintingState, op: IRDLOperation) -> None:
        attr = self.value.get(op)
        assert isinstance(attr, EnumAttribute)
        state.print_whitespace(printer)
        printer.print_string(attr.data.value)


# ---------------------------------------------------------------- mesh and sharding


@irdl_op_definition
class MeshOp(IRDLOperation):
    """Declares a device mesh as a symbol: `par.mesh @mesh #par.mesh<["pp"=2, "dp"=2]>`."""

    name = "par.mesh"

    sym_name = prop_def(SymbolNameConstraint())
    shape = prop_def(MeshAttr)

    traits = traits_def(SymbolOpInterface())

    assembly_format = "$sym_name qualified($shape) attr-dict"

    def __init__(self, sym_name: str, shape: MeshAttr):
        super().__init__(properties={"sym_name": StringAttr(sym_name), "shape": shape})

    def verify_(self) -> None:
        """A zigzag declaration (`ZIGZAG`) names axes of the mesh, each with a length its 2W
        chunks divide."""
        lengths = self.attributes.get(ZIGZAG)
        if lengths is None:
            return
        if not isinstance(lengths, DictionaryAttr):
            raise VerifyException(f"par.mesh: {ZIGZAG} must be a dictionary axis -> length, got {lengths}")
        for axis, length in lengths.data.items():
            if axis not in self.shape.axis_names():
                raise VerifyException(f"par.mesh: {ZIGZAG} names axis '{axis}', which the mesh "
                                      f"{list(self.shape.axis_names())} lacks")
            chunks = 2 * self.shape.axis_size(axis)
            if not isinstance(length, IntegerAttr) or length.value.data % chunks:
                raise VerifyException(f"par.mesh: {ZIGZAG} gives axis '{axis}' length {length}; a zigzag "
                                      f"cut needs a length that {chunks} chunks divide")


ZIGZAG = "par.zigzag"
"""An attribute of `par.mesh`, `{par.zigzag = {sp = 64 : i64}}`: on each axis it names, a cut of a
dimension of that many elements (the sequence length) is zigzag. The axis's W devices then
hold 2W equal chunks, device r chunks r and 2W-1-r, in that order (causal attention's work is
then the same on every device; `piperc.runtime.zigzag`); every other cut is contiguous.
Layouts stay as they are (`#par.sharding` names the axes); the collectives over the axis, the
runtime's input cut and ring attention keep to the declaration, and a whole value is always in
natural order. `sequence-parallel{balance=zigzag}` declares it."""


def zigzag_lengths(op: Operation) -> dict[str, int]:
    """Mesh axis -> the dimension length it cuts zigzag (`ZIGZAG`), as the `par.mesh` of the
    module holding `op` declares; empty when it declares none."""
    top = op.get_toplevel_object()
    for o in top.regions[0].block.ops if isinstance(top, Operation) and top.regions else ():
        if isinstance(o, MeshOp):
            lengths = o.attributes.get(ZIGZAG)
            return {axis: length.value.data for axis, length in lengths.data.items()
                    if isinstance(length, IntegerAttr)} if isinstance(lengths, DictionaryAttr) else {}
    return {}


def is_zigzag(op: Operation, axis: str, size: int) -> bool:
    """Whether a cut over `axis` of a dimension of `size` elements is zigzag in `op`'s module."""
    return zigzag_lengths(op).get(axis) == size


def zigzag_cuts(op: Operation) -> tuple[bool, ...]:
    """Per dimension a collective cuts or assembles over its axis, whether the cut is zigzag
    (`ZIGZAG`), judged on the value whole over the axis: an all_slice's and a reduce_scatter's
    operand dimension, an all_gather's result dimension, an all_to_all's split (operand) and
    concatenated (result) dimensions; none for an all_reduce."""
    if isinstance(op, AllToAllOp):
        dims = [(op.operands[0], op.split_dim), (op.results[0], op.concat_dim)]
    elif isinstance(op, AllGatherOp):
        dims = [(op.results[0], op.dim)]
    elif isinstance(op, AllSliceOp | ReduceScatterOp):
        dims = [(op.operands[0], op.dim)]
    else:
        return ()
    length = zigzag_lengths(op).get(op.axis.data)
    return tuple(value.type.get_shape()[dim.value.data] == length for value, dim in dims)


def lookup_mesh(op: IRDLOperation, mesh: FlatSymbolRefAttr) -> MeshAttr:
    """The mesh that `op` refers to as `mesh`; raises VerifyException when undefined."""
    try:
        found = SymbolTable.lookup_symbol(op, mesh)
    except ValueError:  # `op` is in no module, so nothing is defined for it
        found = None
    if not isinstance(found, MeshOp):
        raise VerifyException(
            f"{op.name}: mesh @{mesh.root_reference.data} is not defined; "
            f"declare it with `par.mesh @{mesh.root_reference.data} #par.mesh<[...]>`"
        )
    return found.shape


def _mesh_axis_size(op: IRDLOperation, mesh: FlatSymbolRefAttr, axis: str) -> int:
    shape = lookup_mesh(op, mesh)
    if axis not in shape.axis_names():
        raise VerifyException(
            f"{op.name}: mesh @{mesh.root_reference.data} has no axis '{axis}' "
            f"(axes: {', '.join(shape.axis_names())})"
        )
    return shape.axis_size(axis)


def _shape_of(op: IRDLOperation, value: SSAValue) -> tuple[int, ...]:
    assert isinstance(value.type, ValueTensorType)
    if not value.type.has_shape:
        raise VerifyException(f"{op.name}: {value.type} has no shape")
    return value.type.get_shape()


@irdl_op_definition
class ShardOp(IRDLOperation):
    """Attaches a sharding over a mesh to a value.

    `%1 = par.shard %0 @mesh #par.sharding<[["dp"], []]> : !torch.vtensor<[8,16],f32>`.
    The result is the operand, laid out as the sharding says; types are
    global (unsharded) shapes.
    """

    name = "par.shard"

    T: ClassVar = VarConstraint("T", base(ValueTensorType))

    input = operand_def(T)
    result = result_def(T)
    mesh = prop_def(FlatSymbolRefAttr)
    sharding = prop_def(ShardingAttr)

    traits = traits_def(Pure())

    assembly_format = "$input $mesh qualified($sharding) attr-dict `:` type($input)"

    def __init__(self, input: SSAValue, mesh: str, sharding: ShardingAttr):
        super().__init__(
            operands=[input],
            result_types=[input.type],
            properties={"mesh": FlatSymbolRefAttr(mesh), "sharding": sharding},
        )

    def verify_(self) -> None:
        shape = _shape_of(self, self.input)
        if self.sharding.rank() != len(shape):
            raise VerifyException(
                f"{self.name}: sharding has {self.sharding.rank()} dimensions, "
                f"the value {self.input.type} has {len(shape)}"
            )
        for axis in self.sharding.partial_axes():
            _mesh_axis_size(self, self.mesh, axis)
        for dim, size in enumerate(shape):
            axes = self.sharding.dim_axes(dim)
            parts = math.prod(_mesh_axis_size(self, self.mesh, a) for a in axes)
            if size >= 0 and size % parts:
                raise VerifyException(
                    f"{self.name}: dimension {dim} of size {size} does not split evenly "
                    f"over {parts} devices (axes {', '.join(axes)})"
                )


# ---------------------------------------------------------------- tasks and the step


LAYOUT = "par.layout"
"""The argument and result attribute of stage functions and `@main`: the value's layout."""


def global_shape(local: Sequence[int], layout: ShardingAttr, mesh: MeshAttr) -> list[int]:
    """The shape over the whole mesh of a tensor whose per-device shape is `local` under
    `layout`: each dimension times the parts its axes split it into (-1 stays unknown)."""
    return [size * math.prod(mesh.axis_size(a) for a in layout.dim_axes(dim)) if size >= 0 else -1
            for dim, size in enumerate(local)]


def layout_of(attrs: DictionaryAttr | None) -> ShardingAttr | None:
    """The `par.layout` in an argument or result attribute dictionary, if any."""
    if attrs is None:
        return None
    found = attrs.data.get(LAYOUT)
    return found if isinstance(found, ShardingAttr) else None


def verify_layout(layout: Attribute | None, value_type: Attribute, mesh: MeshAttr, what: str) -> None:
    """Raises VerifyException naming `what` unless `layout` fits a value of `value_type` on `mesh`."""
    if not isinstance(layout, ShardingAttr):
        raise VerifyException(f"{what} has no layout; every value that crosses a function "
                              f"boundary carries `{LAYOUT} = #par.sharding<...>`")
    if not isinstance(value_type, ValueTensorType) or not value_type.has_shape:
        return
    shape = value_type.get_shape()
    if layout.rank() != len(shape):
        raise VerifyException(f"{what}: layout {layout} has {layout.rank()} dimensions, "
                              f"the value {value_type} has {len(shape)}")
    names = mesh.axis_names()
    for axis in layout._used_axes():
        if axis not in names:
            raise VerifyException(f"{what}: layout {layout} names axis '{axis}', which the mesh "
                                  f"{mesh} does not have")


_LAYOUTS_VERIFIED: weakref.WeakKeyDictionary[func.FuncOp, tuple[Attribute | None, ...]] = (
    weakref.WeakKeyDictionary()
)
"""Functions whose layouts passed `verify_function_layouts`, with the attributes it read."""


def verify_function_layouts(fn: func.FuncOp, mesh: MeshAttr) -> None:
    """Checks that every argument and result of `fn` carries a layout that fits it.

    One function serves many tasks (one per microbatch per device), and each task checks
    its callee in every verification, so a check that passed is not repeated while the
    attributes it read (immutable, so compared by identity) stay the same.
    """
    read = (fn.arg_attrs, fn.res_attrs, fn.function_type, mesh)
    passed = _LAYOUTS_VERIFIED.get(fn)
    if passed is not None and all(a is b for a, b in zip(passed, read, strict=True)):
        return
    args = fn.arg_attrs.data if fn.arg_attrs else [None] * len(fn.function_type.inputs.data)
    results = fn.res_attrs.data if fn.res_attrs else [None] * len(fn.function_type.outputs.data)
    for i, (attrs, type_) in enumerate(zip(args, fn.function_type.inputs.data, strict=True)):
        verify_layout(layout_of(attrs), type_, mesh, f"@{fn.sym_name.data} argument {i}{_named(attrs)}")
    for i, (attrs, type_) in enumerate(zip(results, fn.function_type.outputs.data, strict=True)):
        verify_layout(layout_of(attrs), type_, mesh, f"@{fn.sym_name.data} result {i}{_named(attrs)}")
    _LAYOUTS_VERIFIED[fn] = read


def _named(attrs: DictionaryAttr | None) -> str:
    name = attrs.data.get("piperc.key") if attrs is not None else None
    return f" ({name.data})" if isinstance(name, StringAttr) else ""


def _module_mesh(op: Operation) -> MeshAttr | None:
    """The module's `@mesh`, or None when `op` is not in a module that declares one."""
    module = op.get_toplevel_object()
    if not isinstance(module, ModuleOp):
        return None
    for o in module.ops:
        if isinstance(o, MeshOp) and o.sym_name.data == "mesh":
            return o.shape
    return None


_SYMBOLS: weakref.WeakKeyDictionary[ModuleOp, dict[str, Operation]] = weakref.WeakKeyDictionary()
"""Each module's symbols by name (the first op that defines each), as `_callee` last saw them."""


def _callee(op: IRDLOperation, callee: FlatSymbolRefAttr) -> func.FuncOp | None:
    """The function `callee` names; None when `op` is not in a module yet.

    Every task looks its callee up in every verification, so the module's symbols are
    kept by name and read again whenever the entry found is missing, no longer in the
    module or renamed. (A name defined twice fails the module's own symbol-table check.)
    """
    module = op.get_toplevel_object()
    if not isinstance(module, ModuleOp):
        return None
    name = callee.root_reference.data
    symbols = _SYMBOLS.get(module, {})
    found = symbols.get(name)
    if not (isinstance(found, func.FuncOp) and found.parent is module.body.block and found.sym_name.data == name):
        symbols = {}
        for o in module.ops:
            if (symbol := o.get_trait(SymbolOpInterface)) is not None:
                symbols.setdefault(symbol.get_sym_attr_name(o).data, o)
        _SYMBOLS[module] = symbols
        found = symbols.get(name)
    if not isinstance(found, func.FuncOp):
        raise VerifyException(f"{op.name}: @{callee.root_reference.data} is not a func.func of the module")
    return found


def _verify_call(op: IRDLOperation, callee: FlatSymbolRefAttr, operands, results, where: str) -> None:
    fn = _callee(op, callee)
    if fn is None:
        return
    inputs, outputs = fn.function_type.inputs.data, fn.function_type.outputs.data
    if tuple(operands.types) != tuple(inputs):
        raise VerifyException(f"{where}: operands ({', '.join(map(str, operands.types))}) do not match "
                              f"@{fn.sym_name.data}'s arguments ({', '.join(map(str, inputs))})")
    if tuple(results.types) != tuple(outputs):
        raise VerifyException(f"{where}: results ({', '.join(map(str, results.types))}) do not match "
                              f"@{fn.sym_name.data}'s results ({', '.join(map(str, outputs))})")
    mesh = _module_mesh(op)
    if mesh is not None:
        verify_function_layouts(fn, mesh)


@irdl_op_definition
class TaskOp(IRDLOperation):
    """Runs a stage function for one stage, pass and (optionally) microbatch.

    ```
    %r:2 = par.task @s0_F stage 0 pass F (%p, %x) : (T, T) -> (T, T)
    %g = par.task @s0_B1 stage 0 pass B microbatch 3 (%a, %dy) : (T, T) -> T
    ```
    In `@main` (the step) a task has no microbatch: it stands for every
    microbatch. In a `par.program`, `expand-schedule` gives each task its
    microbatch; an optimizer update has none. Operands and results match the
    callee's signature, whose arguments and results all carry layouts.

    `lane k` (`par.task @s0_F stage 0 pass F microbatch 3 lane 1 (...)`) marks a
    task of an overlap group of the schedule: the group's k-th action in row
    order (lane 0 the first), which runs next to the group's other lanes on a
    compute stream of its own (`compute` for lane 0, `compute<k>` otherwise).
    A task without a lane runs on `compute`.
    """

    name = "par.task"

    callee = prop_def(FlatSymbolRefAttr)
    stage = prop_def(IntegerAttr[I64])
    pass_kind = prop_def(PassKindAttr)
    microbatch = opt_prop_def(IntegerAttr[I64])
    lane = opt_prop_def(IntegerAttr[I64])
    args = var_operand_def()
    outs = var_result_def()

    assembly_format = (
        "$callee `stage` $stage `pass` custom<EnumKeyword>($pass_kind) (`microbatch` $microbatch^)? "
        "(`lane` $lane^)? ` ` `(` $args `)` attr-dict `:` functional-type($args, $outs)"
    )

    custom_directives = (EnumKeyword,)

    def __init__(self, callee: str, stage: int, pass_kind: PassKind, args: Sequence[SSAValue],
                 result_types: Sequence[Attribute], microbatch: int | None = None, lane: int | None = None):
        super().__init__(
            operands=[args],
            result_types=[result_types],
            properties={
                "callee": FlatSymbolRefAttr(callee),
                "stage": IntegerAttr(stage, 64),
                "pass_kind": PassKindAttr(pass_kind),
                "microbatch": None if microbatch is None else IntegerAttr(microbatch, 64),
                "lane": None if lane is None else IntegerAttr(lane, 64),
            },
        )

    def lane_index(self) -> int:
        """The task's lane: 0 (`compute`) unless it runs in an overlap group's later lane."""
        return 0 if self.lane is None else self.lane.value.data

    def action(self) -> str:
        """The task as a schedule action, `0F1` (`0U` for an update)."""
        letter = _PASS_LETTERS[self.pass_kind.data]
        mb = "" if self.microbatch is None else str(self.microbatch.value.data)
        return f"{self.stage.value.data}{letter}{mb}"

    def verify_(self) -> None:
        where = f"{self.name} @{self.callee.root_reference.data}"
        if self.stage.value.data < 0:
            raise VerifyException(f"{where}: stage {self.stage.value.data} must be >= 0")
        if self.microbatch is not None and self.microbatch.value.data < 0:
            raise VerifyException(f"{where}: microbatch {self.microbatch.value.data} must be >= 0")
        if self.lane is not None and (self.lane.value.data < 0 or self.microbatch is None):
            raise VerifyException(f"{where}: lane {self.lane.value.data} needs a microbatch and must be >= 0 "
                                  "(a lane is a place in an overlap group of a device program)")
        _verify_call(self, self.callee, self.args, self.outs, where)


@irdl_op_definition
class AccumulateOp(IRDLOperation):
    """Sums per-microbatch values over the step's microbatches.

    `%s:2 = par.accumulate @s0_B1_accumulate stage 0 (%g1, %g2) : T1, T2`: the
    operands are produced once per microbatch; the results are their sums,
    computed by the combiner `@fn(acc..., new...) -> acc...`.
    """

    name = "par.accumulate"

    callee = prop_def(FlatSymbolRefAttr)
    stage = prop_def(IntegerAttr[I64])
    values = var_operand_def(ValueTensorType)
    sums = var_result_def(ValueTensorType)

    def __init__(self, callee: str, stage: int, values: Sequence[SSAValue]):
        super().__init__(
            operands=[values],
            result_types=[[v.type for v in values]],
            properties={"callee": FlatSymbolRefAttr(callee), "stage": IntegerAttr(stage, 64)},
        )

    @classmethod
    def parse(cls, parser: Parser) -> AccumulateOp:
        callee = parser.parse_symbol_name()
        parser.parse_keyword("stage")
        stage = parser.parse_integer(allow_boolean=False)
        values = parser.parse_comma_separated_list(parser.Delimiter.PAREN, parser.parse_unresolved_operand)
        attrs = parser.parse_optional_attr_dict()
        parser.parse_punctuation(":")
        types = parser.parse_comma_separated_list(parser.Delimiter.NONE, parser.parse_type)
        values = [parser.resolve_operand(v, t) for v, t in zip(values, types, strict=True)]
        op = cls(callee.data, stage, values)
        op.attributes |= attrs
        return op

    def print(self, printer: Printer) -> None:
        printer.print_string(f" @{self.callee.root_reference.data} stage {self.stage.value.data} (")
        printer.print_list(self.values, printer.print_operand)
        printer.print_string(")")
        printer.print_op_attributes(self.attributes)
        printer.print_string(" : ")
        printer.print_list(self.values.types, printer.print_attribute)

    def verify_(self) -> None:
        where = f"{self.name} @{self.callee.root_reference.data}"
        types = list(self.values.types)
        fn = _callee(self, self.callee)
        if fn is None:
            return
        if list(fn.function_type.inputs.data) != types + types or list(fn.function_type.outputs.data) != types:
            raise VerifyException(f"{where}: the combiner must take (acc..., new...) and return acc... "
                                  f"for the types ({', '.join(map(str, types))})")


@irdl_op_definition
class AllReduceBucketOp(IRDLOperation):
    """Sums one bucket of gradients over a group of devices, issued as one collective.

    `%r:2 = par.all_reduce_bucket 0 stage 1 (%a, %b) over @mesh ["dp"] stages [1, 3] : T1, T2`:
    bucket 0 of stage 1's gradients, summed over the devices that differ along
    `axes` and hold one of `stages` along the pipeline axis (a weight tied
    across stages sums its partial gradients over every stage that holds it).
    The results are the sums, replicated over the group.
    """

    name = "par.all_reduce_bucket"

    bucket = prop_def(IntegerAttr[I64])
    stage = prop_def(IntegerAttr[I64])
    mesh = prop_def(FlatSymbolRefAttr)
    axes = prop_def(ArrayAttr[StringAttr])
    stages = prop_def(ArrayAttr[IntAttr])
    values = var_operand_def(ValueTensorType)
    sums = var_result_def(ValueTensorType)

    def __init__(self, bucket: int, stage: int, values: Sequence[SSAValue], mesh: str,
                 axes: Sequence[str], stages: Sequence[int]):
        super().__init__(
            operands=[values],
            result_types=[[v.type for v in values]],
            properties={
                "bucket": IntegerAttr(bucket, 64),
                "stage": IntegerAttr(stage, 64),
                "mesh": FlatSymbolRefAttr(mesh),
                "axes": ArrayAttr(StringAttr(a) for a in axes),
                "stages": ArrayAttr(IntAttr(s) for s in stages),
            },
        )

    def axis_names(self) -> tuple[str, ...]:
        """The mesh axes the group spans."""
        return tuple(a.data for a in self.axes.data)

    def stage_list(self) -> tuple[int, ...]:
        """The pipeline stages whose devices take part."""
        return tuple(s.data for s in self.stages.data)

    @classmethod
    def parse(cls, parser: Parser) -> AllReduceBucketOp:
        bucket = parser.parse_integer(allow_boolean=False)
        parser.parse_keyword("stage")
        stage = parser.parse_integer(allow_boolean=False)
        values = parser.parse_comma_separated_list(parser.Delimiter.PAREN, parser.parse_unresolved_operand)
        parser.parse_keyword("over")
        mesh = parser.parse_symbol_name()
        axes = parser.parse_comma_separated_list(parser.Delimiter.SQUARE, parser.parse_str_literal)
        parser.parse_keyword("stages")
        stages = parser.parse_comma_separated_list(
            parser.Delimiter.SQUARE, lambda: parser.parse_integer(allow_boolean=False))
        attrs = parser.parse_optional_attr_dict()
        parser.parse_punctuation(":")
        types = parser.parse_comma_separated_list(parser.Delimiter.NONE, parser.parse_type)
        values = [parser.resolve_operand(v, t) for v, t in zip(values, types, strict=True)]
        op = cls(bucket, stage, values, mesh.data, axes, stages)
        op.attributes |= attrs
        return op

    def print(self, printer: Printer) -> None:
        printer.print_string(f" {self.bucket.value.data} stage {self.stage.value.data} (")
        printer.print_list(self.values, printer.print_operand)
        printer.print_string(f") over @{self.mesh.root_reference.data} [")
        printer.print_list(self.axis_names(), printer.print_string_literal)
        printer.print_string(f"] stages [{', '.join(map(str, self.stage_list()))}]")
        printer.print_op_attributes(self.attributes)
        printer.print_string(" : ")
        printer.print_list(self.values.types, printer.print_attribute)

    def verify_(self) -> None:
        where = f"{self.name} {self.bucket.value.data} of stage {self.stage.value.data}"
        for axis in self.axis_names():
            _mesh_axis_size(self, self.mesh, axis)
        if self.stage.value.data not in self.stage_list():
            raise VerifyException(f"{where}: its own stage is not among the stages {list(self.stage_list())}")
        if not self.values:
            raise VerifyException(f"{where}: a bucket holds at least one gradient")


@irdl_op_definition
class ProgramOp(IRDLOperation):
    """One device's program along the pipeline axis, in issue order.

    ```
    par.program @device1 device 1 {
      %w = par.state "blocks.1.w" layout #par.sharding<[[], []]> : T
      %x = par.recv from 0 "h0 mb0" batch 0 : T
      %y = par.task @s1_F stage 1 pass F microbatch 0 (%x, %w) : (T, T) -> T
      ...
    }
    ```
    Written by `expand-schedule` from `@main` and the schedule: tasks with
    their microbatch, the transfers between stages (`par.send`/`par.recv`,
    paired in issue order per pair of devices), gradient accumulation and
    bucketed reductions, and the state it reads and writes. Every data-parallel
    replica of the device runs the same program (SPMD over the other axes).
    """

    name = "par.program"

    sym_name = prop_def(SymbolNameConstraint())
    device = prop_def(IntegerAttr[I64])
    phase = opt_prop_def(StringAttr)
    body = region_def("single_block")

    traits = traits_def(SymbolOpInterface(), NoTerminator(), IsolatedFromAbove())

    assembly_format = "$sym_name `device` $device (`phase` $phase^)? attr-dict-with-keyword $body"

    def __init__(self, sym_name: str, device: int, body: Region | None = None, phase: str | None = None):
        super().__init__(
            properties={"sym_name": StringAttr(sym_name), "device": IntegerAttr(device, 64),
                        "phase": None if phase is None else StringAttr(phase)},
            regions=[body if body is not None else Region(Block())],
        )

    def phase_name(self) -> str:
        """Which steps run the program: `step` (every step; the default), or, for a program
        that hands values from one step to the next (`par.carry`), `first` (the first step)
        and `drain` (once after the last step)."""
        return PHASE_STEP if self.phase is None else self.phase.data

    def verify_(self) -> None:
        if self.phase_name() not in PHASES:
            raise VerifyException(f"{self.name} @{self.sym_name.data}: phase must be one of {list(PHASES)}, "
                                  f"got {self.phase_name()!r}")


PHASE_STEP, PHASE_FIRST, PHASE_DRAIN = "step", "first", "drain"
PHASES = (PHASE_FIRST, PHASE_STEP, PHASE_DRAIN)
"""The phases a device's programs may have, in the order a run meets them: the first step,
every later step, and the drain after the last step (`par.program ... phase "first"`)."""


@irdl_op_definition
class CarryOp(IRDLOperation):
    """Hands a value to the next step's program of this device: `par.carry "h0 mb-1", %h : T`.

    The value stays alive between the steps (the runtime keeps it by name); the next
    step's program takes it with `par.carried` of the same name. An asynchronous pipeline
    carries its in-flight microbatches' activations and stashed weights so."""

    name = "par.carry"

    carry_name = prop_def(StringAttr)
    value = operand_def(ValueTensorType)

    assembly_format = "$carry_name `,` $value attr-dict `:` type($value)"

    def __init__(self, carry_name: str, value: SSAValue):
        super().__init__(operands=[value], properties={"carry_name": StringAttr(carry_name)})


@irdl_op_definition
class CarriedOp(IRDLOperation):
    """Takes the value the previous step's program handed on with `par.carry` of the same
    name: `%h = par.carried "h0 mb-1" : T`; `stash` marks a stashed weight version (memory
    counts it as such)."""

    name = "par.carried"

    carry_name = prop_def(StringAttr)
    stash = opt_prop_def(UnitAttr)
    result = result_def(ValueTensorType)

    assembly_format = "$carry_name (`stash` $stash^)? attr-dict `:` type($result)"

    def __init__(self, carry_name: str, result_type: Attribute, stash: bool = False):
        super().__init__(result_types=[result_type], properties={
            "carry_name": StringAttr(carry_name), "stash": UnitAttr() if stash else None})


@irdl_op_definition
class StateOp(IRDLOperation):
    """Reads a named state tensor (parameter, buffer, optimizer state) of this device.

    `%w = par.state "blocks.0.w" layout #par.sharding<[[], []]> : T`.
    """

    name = "par.state"

    state_name = prop_def(StringAttr)
    layout = prop_def(ShardingAttr)
    result = result_def(ValueTensorType)

    assembly_format = "$state_name `layout` qualified($layout) attr-dict `:` type($result)"

    def __init__(self, state_name: str, layout: ShardingAttr, result_type: Attribute):
        super().__init__(result_types=[result_type],
                         properties={"state_name": StringAttr(state_name), "layout": layout})

    def verify_(self) -> None:
        mesh = _module_mesh(self)
        if mesh is not None:
            verify_layout(self.layout, self.result.type, mesh, f'{self.name} "{self.state_name.data}"')


@irdl_op_definition
class SetStateOp(IRDLOperation):
    """Stores a named state tensor for the next step: `par.set_state "blocks.0.w", %w : T`."""

    name = "par.set_state"

    state_name = prop_def(StringAttr)
    value = operand_def(ValueTensorType)

    assembly_format = "$state_name `,` $value attr-dict `:` type($value)"

    def __init__(self, state_name: str, value: SSAValue):
        super().__init__(operands=[value], properties={"state_name": StringAttr(state_name)})


@irdl_op_definition
class InputOp(IRDLOperation):
    """Reads this device's rows of one model input for one microbatch.

    `%x = par.input 0 microbatch 1 layout #par.sharding<[["dp"], []]> : T`: the
    layout says which mesh axes split the global batch, the microbatch which
    slice of this device's rows; the type is the per-device microbatch.
    """

    name = "par.input"

    index = prop_def(IntegerAttr[I64])
    microbatch = prop_def(IntegerAttr[I64])
    layout = prop_def(ShardingAttr)
    result = result_def(ValueTensorType)

    assembly_format = "$index `microbatch` $microbatch `layout` qualified($layout) attr-dict `:` type($result)"

    def __init__(self, index: int, microbatch: int, layout: ShardingAttr, result_type: Attribute):
        super().__init__(result_types=[result_type], properties={
            "index": IntegerAttr(index, 64), "microbatch": IntegerAttr(microbatch, 64), "layout": layout})

    def verify_(self) -> None:
        mesh = _module_mesh(self)
        if mesh is not None:
            verify_layout(self.layout, self.result.type, mesh, f"{self.name} {self.index.value.data}")


@irdl_op_definition
class OutputOp(IRDLOperation):
    """Reports a named result of the step, e.g. the loss: `par.output "loss", %l : T`."""

    name = "par.output"

    output_name = prop_def(StringAttr)
    value = operand_def(ValueTensorType)

    assembly_format = "$output_name `,` $value attr-dict `:` type($value)"

    def __init__(self, output_name: str, value: SSAValue):
        super().__init__(operands=[value], properties={"output_name": StringAttr(output_name)})


@irdl_op_definition
class SliceIndexOp(IRDLOperation):
    """The slice of the global batch the running task works on: `%j = par.slice_index : !torch.int`.

    Slices are numbered as one device accumulating over them takes them: replica x
    microbatches + microbatch, where the replica is the position of this device's rows
    along the batch dimension's mesh axes. Only a function that a per-microbatch task runs
    (a stage's forward or backward) has a slice; the step `@main` and update functions do
    not. `running-buffers` weights a buffer's increment with it; the runtime answers it
    (`Runtime.slice_index`).
    """

    name = "par.slice_index"

    result = result_def(IntType)

    assembly_format = "attr-dict `:` type($result)"

    def __init__(self):
        super().__init__(result_types=[IntType()])

    def verify_(self) -> None:
        fn = self.parent_op()
        while fn is not None and not isinstance(fn, func.FuncOp):
            fn = fn.parent_op()
        if fn is None or fn.sym_name.data == "main":
            raise VerifyException(f"{self.name} must be inside a stage function (a function a par.task "
                                  "runs per microbatch), not in the step @main")


# ---------------------------------------------------------------- point to point


class _Transfer(IRDLOperation, ABC):
    """A point-to-point transfer between two devices along the pipeline axis."""

    peer = prop_def(IntegerAttr[I64])
    label = prop_def(StringAttr)
    batch = opt_prop_def(IntegerAttr[I64])

    def transfer_properties(self) -> None:
        """Checks the peer and the batch number."""
        if self.peer.value.data < 0:
            raise VerifyException(f"{self.name} \"{self.label.data}\": peer device "
                                  f"{self.peer.value.data} must be >= 0")
        if self.batch is not None and self.batch.value.data < 0:
            raise VerifyException(f"{self.name} \"{self.label.data}\": batch must be >= 0")


def _transfer_props(peer: int, label: str, batch: int | None) -> dict[str, Attribute | None]:
    return {"peer": IntegerAttr(peer, 64), "label": StringAttr(label),
            "batch": None if batch is None else IntegerAttr(batch, 64)}


@irdl_op_definition
class SendOp(_Transfer):
    """Sends a value to another device along the pipeline axis.

    `par.send %v to 1 "s0_F.0 mb1" batch 3 : T`: sends and receives between two
    devices pair up in the order each device issues them (the label is only a
    readable name). Consecutive transfers with the same `batch` are issued
    together, as one batched p2p, so that a send and a receive that cross
    between two devices cannot block each other.
    """

    name = "par.send"

    input = operand_def(ValueTensorType)

    assembly_format = "$input `to` $peer $label (`batch` $batch^)? attr-dict `:` type($input)"

    def __init__(self, input: SSAValue, peer: int, label: str, batch: int | None = None):
        super().__init__(operands=[input], properties=_transfer_props(peer, label, batch))

    def verify_(self) -> None:
        self.transfer_properties()


@irdl_op_definition
class RecvOp(_Transfer):
    """Receives a value from another device along the pipeline axis.

    `%v = par.recv from 0 "s0_F.0 mb1" batch 3 : T` (see `par.send`).
    """

    name = "par.recv"

    result = result_def(ValueTensorType)

    assembly_format = "`from` $peer $label (`batch` $batch^)? attr-dict `:` type($result)"

    def __init__(self, result_type: Attribute, peer: int, label: str, batch: int | None = None):
        super().__init__(result_types=[result_type], properties=_transfer_props(peer, label, batch))

    def verify_(self) -> None:
        self.transfer_properties()


# ---------------------------------------------------------------- collectives


class CollectiveOp(IRDLOperation, ABC):
    """A collective among the devices that differ only along one mesh axis."""

    mesh = prop_def(FlatSymbolRefAttr)
    axis = prop_def(StringAttr)

    @staticmethod
    def group_properties(mesh: str, axis: str) -> dict[str, Attribute]:
        """The `mesh` and `axis` properties every collective has."""
        return {"mesh": FlatSymbolRefAttr(mesh), "axis": StringAttr(axis)}

    def group_size(self) -> int:
        """The number of devices in each group; raises VerifyException if unresolvable."""
        return _mesh_axis_size(self, self.mesh, self.axis.data)

    def check_result_shape(self, input: SSAValue, result: SSAValue, expected: list[int]) -> None:
        """Raises unless `result` has `input`'s dtype and the shape `expected`."""
        assert isinstance(input.type, ValueTensorType)
        assert isinstance(result.type, ValueTensorType)
        if input.type.dtype != result.type.dtype:
            raise VerifyException(
                f"{self.name}: result dtype {result.type.dtype} differs from "
                f"operand dtype {input.type.dtype}"
            )
        actual = _shape_of(self, result)
        if len(actual) != len(expected) or any(
            e >= 0 and a >= 0 and a != e for a, e in zip(actual, expected, strict=True)
        ):
            dims = ",".join("?" if d < 0 else str(d) for d in expected)
            raise VerifyException(
                f"{self.name} over '{self.axis.data}' ({self.group_size()} devices): "
                f"result {result.type} should have shape [{dims}]"
            )

    def check_dim(self, input: SSAValue, dim: IntegerAttr, role: str) -> int:
        """Returns `dim` after checking it names a dimension of `input`."""
        rank = len(_shape_of(self, input))
        if not 0 <= dim.value.data < rank:
            raise VerifyException(
                f"{self.name}: {role} {dim.value.data} is outside the rank-{rank} operand"
            )
        return dim.value.data


@irdl_op_definition
class AllReduceOp(CollectiveOp):
    """Reduces a value over a mesh axis; every device gets the result.

    `%r = par.all_reduce %v over @mesh "dp" sum : T`.
    """

    name = "par.all_reduce"

    T: ClassVar = VarConstraint("T", base(ValueTensorType))

    input = operand_def(T)
    result = result_def(T)
    reduce = prop_def(ReduceKindAttr)

    traits = traits_def(Pure())

    assembly_format = (
        "$input `over` $mesh $axis custom<EnumKeyword>($reduce) attr-dict `:` type($input)"
    )

    custom_directives = (EnumKeyword,)

    def __init__(self, input: SSAValue, mesh: str, axis: str, reduce: ReduceKind = ReduceKind.SUM):
        super().__init__(
            operands=[input],
            result_types=[input.type],
            properties=self.group_properties(mesh, axis) | {"reduce": ReduceKindAttr(reduce)},
        )

    def verify_(self) -> None:
        self.group_size()


class _AlongDimOp(CollectiveOp, ABC):
    """A collective that changes one dimension of its operand (gathers or slices it)."""

    input = operand_def(ValueTensorType)
    result = result_def(ValueTensorType)
    dim = prop_def(IntegerAttr[I64])

    traits = traits_def(Pure())

    assembly_format = (
        "$input `over` $mesh $axis `dim` $dim attr-dict `:` type($input) `->` type($result)"
    )

    def __init__(self, input: SSAValue, mesh: str, axis: str, dim: int, result_type: Attribute):
        super().__init__(
            operands=[input],
            result_types=[result_type],
            properties=self.group_properties(mesh, axis) | {"dim": IntegerAttr(dim, 64)},
        )


@irdl_op_definition
class AllGatherOp(_AlongDimOp):
    """Concatenates the group's pieces along `dim`.

    `%r = par.all_gather %v over @mesh "tp" dim 0 : !torch.vtensor<[2,8],f32> -> !torch.vtensor<[4,8],f32>`.
    """

    name = "par.all_gather"

    def verify_(self) -> None:
        n = self.group_size()
        dim = self.check_dim(self.input, self.dim, "dim")
        expected = list(_shape_of(self, self.input))
        expected[dim] = expected[dim] * n if expected[dim] >= 0 else -1
        self.check_result_shape(self.input, self.result, expected)


@irdl_op_definition
class ReduceScatterOp(CollectiveOp):
    """Reduces over the group and leaves each device one piece along `dim`.

    `%r = par.reduce_scatter %v over @mesh "dp" dim 0 sum : !torch.vtensor<[4,8],f32> -> !torch.vtensor<[2,8],f32>`.
    """

    name = "par.reduce_scatter"

    input = operand_def(ValueTensorType)
    result = result_def(ValueTensorType)
    dim = prop_def(IntegerAttr[I64])
    reduce = prop_def(ReduceKindAttr)

    traits = traits_def(Pure())

    assembly_format = (
        "$input `over` $mesh $axis `dim` $dim custom<EnumKeyword>($reduce) attr-dict "
        "`:` type($input) `->` type($result)"
    )

    custom_directives = (EnumKeyword,)

    def __init__(
        self,
        input: SSAValue,
        mesh: str,
        axis: str,
        dim: int,
        result_type: Attribute,
        reduce: ReduceKind = ReduceKind.SUM,
    ):
        super().__init__(
            operands=[input],
            result_types=[result_type],
            properties=self.group_properties(mesh, axis)
            | {"dim": IntegerAttr(dim, 64), "reduce": ReduceKindAttr(reduce)},
        )

    def verify_(self) -> None:
        n = self.group_size()
        dim = self.check_dim(self.input, self.dim, "dim")
        expected = list(_shape_of(self, self.input))
        expected[dim] = _split(self, expected[dim], n, dim)
        self.check_result_shape(self.input, self.result, expected)


@irdl_op_definition
class AllToAllOp(CollectiveOp):
    """Splits along `split` and sends piece i to device i, which concatenates along `concat`.

    `%r = par.all_to_all %v over @mesh "ep" split 0 concat 1 : !torch.vtensor<[4,8],f32> -> !torch.vtensor<[2,16],f32>`.
    """

    name = "par.all_to_all"

    input = operand_def(ValueTensorType)
    result = result_def(ValueTensorType)
    split_dim = prop_def(IntegerAttr[I64])
    concat_dim = prop_def(IntegerAttr[I64])

    traits = traits_def(Pure())

    assembly_format = (
        "$input `over` $mesh $axis `split` $split_dim `concat` $concat_dim attr-dict "
        "`:` type($input) `->` type($result)"
    )

    def __init__(
        self,
        input: SSAValue,
        mesh: str,
        axis: str,
        split_dim: int,
        concat_dim: int,
        result_type: Attribute,
    ):
        super().__init__(
            operands=[input],
            result_types=[result_type],
            properties=self.group_properties(mesh, axis)
            | {"split_dim": IntegerAttr(split_dim, 64), "concat_dim": IntegerAttr(concat_dim, 64)},
        )

    def verify_(self) -> None:
        n = self.group_size()
        split = self.check_dim(self.input, self.split_dim, "split dim")
        concat = self.check_dim(self.input, self.concat_dim, "concat dim")
        expected = list(_shape_of(self, self.input))
        expected[split] = _split(self, expected[split], n, split)
        expected[concat] = expected[concat] * n if expected[concat] >= 0 else -1
        self.check_result_shape(self.input, self.result, expected)


def _split(op: CollectiveOp, size: int, n: int, dim: int) -> int:
    """`size` / `n`, raising if dimension `dim` does not split evenly; -1 stays dynamic."""
    if size < 0:
        return -1
    if size % n:
        raise VerifyException(
            f"{op.name}: dimension {dim} of size {size} does not split evenly over "
            f"the {n} devices of axis '{op.axis.data}'"
        )
    return size // n


# ---------------------------------------------------------------- resharding


class _BucketOp(CollectiveOp, ABC):
    """One collective over several values, each changed along its dimension 0: the group
    exchanges one flat buffer instead of one message per value (`bucket-collectives`)."""

    inputs = var_operand_def(ValueTensorType)
    outputs = var_result_def(ValueTensorType)

    traits = traits_def(Pure())

    def _verify_bucket(self, whole: bool) -> None:
        """Checks one result per operand, each the operand's dimension 0 gathered (`whole`)
        or split over the group."""
        n = self.group_size()
        if not self.inputs or len(self.inputs) != len(self.outputs):
            raise VerifyException(f"{self.name} over '{self.axis.data}': {len(self.inputs)} values in, "
                                  f"{len(self.outputs)} out; a bucket has one result per value, at least one")
        for value, result in zip(self.inputs, self.outputs, strict=True):
            expected = list(_shape_of(self, value))
            if not expected:
                raise VerifyException(f"{self.name}: {value_name(value)} has no dimension 0 to gather or split")
            expected[0] = expected[0] * n if whole else _split(self, expected[0], n, 0)
            self.check_result_shape(value, result, expected)


@irdl_op_definition
class AllGatherBucketOp(_BucketOp):
    """Gathers several values along dimension 0 in one collective.

    `%a, %b = par.all_gather_bucket %x, %y over @mesh "dp" : !torch.vtensor<[2,8],f32>,
    !torch.vtensor<[4],f32> -> !torch.vtensor<[4,8],f32>, !torch.vtensor<[8],f32>` (2 devices):
    the same results as one `par.all_gather ... dim 0` per value.
    """

    name = "par.all_gather_bucket"

    assembly_format = "$inputs `over` $mesh $axis attr-dict `:` type($inputs) `->` type($outputs)"

    def __init__(self, inputs: Sequence[SSAValue], mesh: str, axis: str, result_types: Sequence[Attribute]):
        super().__init__(operands=[inputs], result_types=[result_types],
                         properties=self.group_properties(mesh, axis))

    def verify_(self) -> None:
        self._verify_bucket(whole=True)


@irdl_op_definition
class ReduceScatterBucketOp(_BucketOp):
    """Reduces several values over the group in one collective; each device keeps its piece of
    each along dimension 0.

    `%a, %b = par.reduce_scatter_bucket %x, %y over @mesh "dp" sum : T1, T2 -> R1, R2`: the same
    results as one `par.reduce_scatter ... dim 0` per value.
    """

    name = "par.reduce_scatter_bucket"

    reduce = prop_def(ReduceKindAttr)

    assembly_format = (
        "$inputs `over` $mesh $axis custom<EnumKeyword>($reduce) attr-dict `:` type($inputs) `->` type($outputs)"
    )

    custom_directives = (EnumKeyword,)

    def __init__(self, inputs: Sequence[SSAValue], mesh: str, axis: str, result_types: Sequence[Attribute],
                 reduce: ReduceKind = ReduceKind.SUM):
        super().__init__(operands=[inputs], result_types=[result_types],
                         properties=self.group_properties(mesh, axis) | {"reduce": ReduceKindAttr(reduce)})

    def verify_(self) -> None:
        self._verify_bucket(whole=False)


@irdl_op_definition
class AllSliceOp(_AlongDimOp):
    """Keeps this device's piece of a value along `dim`, by its position on a mesh axis.

    `%r = par.all_slice %v over @mesh "dp" dim 0 : !torch.vtensor<[4,8],f32> -> !torch.vtensor<[2,8],f32>`:
    the device at position i of the n devices of axis "dp" keeps piece i of n
    along dimension 0. No data moves; it undoes a `par.all_gather` over the
    same axis and dimension. This is MLIR's `shard.all_slice` (`slice_axis` is
    `dim`, `grid_axes` the one mesh axis).
    """

    name = "par.all_slice"

    def verify_(self) -> None:
        n = self.group_size()
        dim = self.check_dim(self.input, self.dim, "dim")
        expected = list(_shape_of(self, self.input))
        expected[dim] = _split(self, expected[dim], n, dim)
        self.check_result_shape(self.input, self.result, expected)


def value_name(value: SSAValue) -> str:
    """How messages name a value: its name in the IR text (`%grad_w`), else what defines it."""
    if value.name_hint:
        return f"%{value.name_hint}"
    owner = value.owner
    if isinstance(owner, Block):
        return f"block argument {value.index}"
    return f"result {value.index} of {owner.name}"


@irdl_op_definition
class ReshardOp(IRDLOperation):
    """Changes how a value is laid out over a mesh, from one sharding to another.

    ```
    %r = par.reshard %grad_w @mesh from #par.sharding<[[], []], partial = ["dp"]>
           to #par.sharding<[["dp"], []]> : !torch.vtensor<[8,4],f32> -> !torch.vtensor<[4,4],f32>
    ```
    Types are per-device (local) shapes, as for the collectives: the operand is
    this device's piece of a global tensor laid out as `source` says, the
    result its piece of the same global tensor laid out as `target` says.
    `lower-reshard` turns it into collectives. This is DTensor's
    `redistribute`; in MLIR's `shard` dialect the same change is a
    `shard.shard` of a value followed by one with `annotate_for_users`, which
    shard partitioning lowers to `shard.all_reduce`/`all_gather`/`all_slice`/
    `all_to_all`.
    """

    name = "par.reshard"

    input = operand_def(ValueTensorType)
    result = result_def(ValueTensorType)
    mesh = prop_def(FlatSymbolRefAttr)
    source = prop_def(ShardingAttr)
    target = prop_def(ShardingAttr)

    traits = traits_def(Pure())

    assembly_format = (
        "$input $mesh `from` qualified($source) `to` qualified($target) attr-dict "
        "`:` type($input) `->` type($result)"
    )

    def __init__(
        self,
        input: SSAValue,
        mesh: str,
        source: ShardingAttr,
        target: ShardingAttr,
        result_type: Attribute,
    ):
        super().__init__(
            operands=[input],
            result_types=[result_type],
            properties={"mesh": FlatSymbolRefAttr(mesh), "source": source, "target": target},
        )

    def describe(self) -> str:
        """`par.reshard of %v from <source> to <target>`, for messages."""
        return f"{self.name} of {value_name(self.input)} from {self.source} to {self.target}"

    def verify_(self) -> None:
        where = self.describe()
        local_in, local_out = _shape_of(self, self.input), _shape_of(self, self.result)
        assert isinstance(self.input.type, ValueTensorType)
        assert isinstance(self.result.type, ValueTensorType)
        if self.input.type.dtype != self.result.type.dtype:
            raise VerifyException(
                f"{where}: the result dtype {self.result.type.dtype} differs from the operand "
                f"dtype {self.input.type.dtype}; a reshard moves data, it does not convert it"
            )
        for role, layout, local in (("source", self.source, local_in), ("target", self.target, local_out)):
            if layout.rank() != len(local):
                raise VerifyException(
                    f"{where}: the {role} layout has {layout.rank()} dimensions, but "
                    f"{value_name(self.input)} has rank {len(local)}; give one axis list per dimension"
                )
        mesh = lookup_mesh(self, self.mesh)
        for role, layout in (("source", self.source), ("target", self.target)):
            used = [a for d in range(layout.rank()) for a in layout.dim_axes(d)]
            for axis in used + list(layout.partial_axes()):
                if axis not in mesh.axis_names():
                    raise VerifyException(
                        f"{where}: the {role} layout names axis '{axis}', which mesh "
                        f"@{self.mesh.root_reference.data} does not have "
                        f"(axes: {', '.join(mesh.axis_names())})"
                    )
        expected = []
        for dim, size in enumerate(self._global_shape(mesh)):
            axes = self.target.dim_axes(dim)
            parts = math.prod(mesh.axis_size(a) for a in axes)
            if size >= 0 and size % parts:
                raise VerifyException(
                    f"{where}: dimension {dim} of the global shape has size {size}, which does not "
                    f"split evenly over the {parts} devices of axes {', '.join(axes)}"
                )
            expected.append(size // parts if size >= 0 else -1)
        if any(e >= 0 and a >= 0 and a != e for a, e in zip(local_out, expected, strict=True)):
            dims = ",".join("?" if d < 0 else str(d) for d in expected)
            raise VerifyException(
                f"{where}: the result type {self.result.type} does not describe the same global "
                f"tensor as the operand type {self.input.type}; its local shape should be [{dims}]"
            )

    def _global_shape(self, mesh: MeshAttr) -> list[int]:
        return global_shape(_shape_of(self, self.input), self.source, mesh)


@irdl_op_definition
class LayoutCastOp(IRDLOperation):
    """A change of layout written before shapes are localised: a `par.reshard` on global types.

    ```
    %q = par.layout_cast %qkv @mesh from #par.sharding<[[], [], ["tp"]]> to #par.sharding<[[], [], []]>
           because "torch.aten.split.Tensor in 'blocks.0.attn' (split): operand 0"
           : !torch.vtensor<[2,8,96],f32>
    ```
    Operand and result are the same GLOBAL tensor (one type), laid out as `source` and
    `target` say; `reason` says which op and rule needed the change. propagate-sharding
    writes these, and shape localisation turns each into a `par.reshard` on the local
    types, which `lower-reshard` lowers. It is a separate op, not a flag on `par.reshard`,
    so that no pass that reads local types (lower-reshard, code generation) can take one
    for the other: a cast left in the IR fails where it is not understood.
    """

    name = "par.layout_cast"

    T: ClassVar = VarConstraint("T", base(ValueTensorType))

    input = operand_def(T)
    result = result_def(T)
    mesh = prop_def(FlatSymbolRefAttr)
    source = prop_def(ShardingAttr)
    target = prop_def(ShardingAttr)
    reason = opt_prop_def(StringAttr)

    traits = traits_def(Pure())

    assembly_format = (
        "$input $mesh `from` qualified($source) `to` qualified($target) (`because` $reason^)? attr-dict "
        "`:` type($input)"
    )

    def __init__(self, input: SSAValue, mesh: str, source: ShardingAttr, target: ShardingAttr,
                 reason: str | None = None):
        super().__init__(
            operands=[input],
            result_types=[input.type],
            properties={"mesh": FlatSymbolRefAttr(mesh), "source": source, "target": target,
                        "reason": None if reason is None else StringAttr(reason)},
        )

    def describe(self) -> str:
        """`par.layout_cast of %v from <source> to <target>`, for messages."""
        return f"{self.name} of {value_name(self.input)} from {self.source} to {self.target}"

    def verify_(self) -> None:
        where = self.describe()
        shape = _shape_of(self, self.input)
        mesh = lookup_mesh(self, self.mesh)
        for role, layout in (("source", self.source), ("target", self.target)):
            if layout.rank() != len(shape):
                raise VerifyException(f"{where}: the {role} layout has {layout.rank()} dimensions, "
                                      f"the value {self.input.type} has {len(shape)}")
            for axis in layout._used_axes():
                if axis not in mesh.axis_names():
                    raise VerifyException(f"{where}: the {role} layout names axis '{axis}', which mesh "
                                          f"@{self.mesh.root_reference.data} does not have")
            for dim, size in enumerate(shape):
                parts = math.prod(mesh.axis_size(a) for a in layout.dim_axes(dim))
                if size >= 0 and size % parts:
                    raise VerifyException(f"{where}: dimension {dim} of size {size} does not split evenly "
                                          f"over the {parts} devices of the {role} layout")
        created = [a for a in self.target.partial_axes() if a not in self.source.partial_axes()]
        if created:
            raise VerifyException(f"{where}: the target holds a partial sum over '{created[0]}' that the "
                                  "source does not; a change of layout cannot create pending sums")


# ---------------------------------------------------------------- schedule


@irdl_op_definition
class ScheduleOp(IRDLOperation):
    """A pipeline schedule: per device along the pipeline axis, its actions in order.

    ```
    par.schedule @sched mesh @mesh axis "pp" {
      par.device 0 [0F0, 0F1, 0B0, 0B1]
      par.device 1 [1F0, 1B0, 1F1, 1B1] overlap [[1F1, 1B0]]
    }
    ```
    Devices are numbered 0..n-1 along `axis`, one `par.device` each; an
    action runs exactly once in the whole schedule.
    """

    name = "par.schedule"

    sym_name = prop_def(SymbolNameConstraint())
    mesh = prop_def(FlatSymbolRefAttr)
    axis = prop_def(StringAttr)
    body = region_def("single_block")

    traits = traits_def(SymbolOpInterface(), NoTerminator(), IsolatedFromAbove())

    assembly_format = "$sym_name `mesh` $mesh `axis` $axis attr-dict-with-keyword $body"

    def __init__(self, sym_name: str, mesh: str, axis: str, devices: Sequence[DeviceOp]):
        super().__init__(
            properties={
                "sym_name": StringAttr(sym_name),
                "mesh": FlatSymbolRefAttr(mesh),
                "axis": StringAttr(axis),
            },
            regions=[Region(Block(devices))],
        )

    def devices(self) -> list[DeviceOp]:
        """The `par.device` ops, in order."""
        return [op for op in self.body.block.ops if isinstance(op, DeviceOp)]

    def table(self) -> dict[int, list[ActionAttr]]:
        """Device index -> its actions in order, as torch.distributed.pipelining's table."""
        return {d.index.value.data: list(d.actions.data) for d in self.devices()}

    def verify_(self) -> None:
        where = f"{self.name} @{self.sym_name.data}"
        for op in self.body.block.ops:
            if not isinstance(op, DeviceOp):
                raise VerifyException(f"{where}: holds only par.device ops, found {op.name}")
        indices = [d.index.value.data for d in self.devices()]
        if sorted(indices) != list(range(len(indices))):
            raise VerifyException(
                f"{where}: device indices {indices} must be 0..{len(indices) - 1}, once each"
            )
        n = _mesh_axis_size(self, self.mesh, self.axis.data)
        if len(indices) != n:
            raise VerifyException(
                f"{where}: axis '{self.axis.data}' has {n} devices, the schedule lists {len(indices)}"
            )
        seen: dict[ActionAttr, int] = {}
        for device in self.devices():
            for action in device.actions.data:
                if action in seen:
                    raise VerifyException(
                        f"{where}: action {action.compact()} appears twice "
                        f"(devices {seen[action]} and {device.index.value.data})"
                    )
                seen[action] = device.index.value.data


@irdl_op_definition
class DeviceOp(IRDLOperation):
    """One device's row of a `par.schedule`.

    `par.device 1 [1F0, 1B0, 1F1, 1B1] overlap [[1F1, 1B0]]`: the actions in
    the order they start; each `overlap` group lists actions of this row that
    may run concurrently (on different streams).
    """

    name = "par.device"

    index = prop_def(IntegerAttr[I64])
    actions = prop_def(ArrayAttr[ActionAttr])
    overlap = opt_prop_def(ArrayAttr[ArrayAttr[ActionAttr]])

    traits = traits_def(HasParent(ScheduleOp))

    def __init__(
        self,
        index: int,
        actions: Sequence[ActionAttr],
        overlap: Sequence[Sequence[ActionAttr]] = (),
    ):
        super().__init__(
            properties={
                "index": IntegerAttr(index, 64),
                "actions": ArrayAttr(actions),
                "overlap": ArrayAttr(ArrayAttr(g) for g in overlap) if overlap else None,
            }
        )

    def overlap_groups(self) -> list[list[ActionAttr]]:
        """The overlap groups, empty when there are none."""
        if self.overlap is None:
            return []
        return [list(group.data) for group in self.overlap.data]

    @classmethod
    def parse(cls, parser: Parser) -> DeviceOp:
        index = parser.parse_integer(allow_boolean=False)
        actions = parser.parse_comma_separated_list(
            parser.Delimiter.SQUARE, lambda: _parse_action(parser)
        )
        overlap: list[list[ActionAttr]] = []
        if parser.parse_optional_keyword("overlap"):
            overlap = parser.parse_comma_separated_list(
                parser.Delimiter.SQUARE,
                lambda: parser.parse_comma_separated_list(
                    parser.Delimiter.SQUARE, lambda: _parse_action(parser)
                ),
            )
        op = cls(index, actions, overlap)
        op.attributes |= parser.parse_optional_attr_dict()
        return op

    def print(self, printer: Printer) -> None:
        printer.print_string(f" {self.index.value.data} ")
        _print_actions(printer, self.actions)
        if self.overlap is not None:
            printer.print_string(" overlap ")
            with printer.in_square_brackets():
                printer.print_list(self.overlap.data, lambda g: _print_actions(printer, g))
        printer.print_op_attributes(self.attributes)

    def verify_(self) -> None:
        where = f"{self.name} {self.index.value.data}"
        if self.index.value.data < 0:
            raise VerifyException(f"{where}: device index must be >= 0")
        for group in self.overlap_groups():
            for action in group:
                if action not in self.actions.data:
                    raise VerifyException(
                        f"{where}: overlap action {action.compact()} is not in the device's actions"
                    )


Par = Dialect(
    "par",
    [
        MeshOp,
        ShardOp,
        TaskOp,
        AccumulateOp,
        AllReduceBucketOp,
        ProgramOp,
        CarryOp,
        CarriedOp,
        StateOp,
        SetStateOp,
        InputOp,
        OutputOp,
        SliceIndexOp,
        SendOp,
        RecvOp,
        AllReduceOp,
        AllGatherOp,
        ReduceScatterOp,
        AllToAllOp,
        AllSliceOp,
        AllGatherBucketOp,
        ReduceScatterBucketOp,
        ReshardOp,
        LayoutCastOp,
        ScheduleOp,
        DeviceOp,
    ],
    [
        MeshAttr,
        ShardingAttr,
        PassKindAttr,
        OriginAttr,
        ActionAttr,
        ReduceKindAttr,
    ],
)
