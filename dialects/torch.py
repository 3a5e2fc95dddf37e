"""The part of torch-mlir's `torch` dialect that piperc's IR carries.

Types are modelled one by one, so passes can read shapes and dtypes
(`!torch.vtensor<[4,16,64],f32>`). Constants and list construction are
modelled one by one. The ATen operators (`torch.aten.*`) are too many to
declare by hand: each one gets an op class on first use, built from the
operator's own schema in torch (`torch.ops.aten.<name>.<overload>`), whose
verifier checks the operand and result counts against that schema.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from xdsl.dialects.builtin import (
    AnyFloat,
    ArrayAttr,
    BoolAttr,
    FloatAttr,
    FloatData,
    IntAttr,
    IntegerAttr,
    IntegerType,
    NoneAttr,
    StringAttr,
    i1,
)
from xdsl.ir import Attribute, Dialect, Operation, ParametrizedAttribute, TypeAttribute
from xdsl.irdl import (
    IRDLOperation,
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    param_def,
    prop_def,
    result_def,
    traits_def,
    var_operand_def,
    var_result_def,
)
from xdsl.parser import AttrParser
from xdsl.printer import Printer
from xdsl.traits import ConstantLike, Pure
from xdsl.utils.exceptions import VerifyException

# ---------------------------------------------------------------- types


DTYPE_BYTES = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "si64": 8, "si32": 4, "si16": 2, "si8": 1, "ui8": 1,
               "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1}
"""Bytes per element of each dtype a value tensor type can name."""


@irdl_attr_definition
class ValueTensorType(ParametrizedAttribute, TypeAttribute):
    """An immutable tensor value with a shape and an element type.

    `!torch.vtensor<[4,16],f32>`; a dynamic dimension prints as `?` and is
    stored as -1. A bare `!torch.vtensor` (shape and dtype unknown) appears
    only as a list element type, as in `!torch.list<vtensor>`.
    """

    name = "torch.vtensor"

    shape: ArrayAttr[IntAttr] | NoneAttr = param_def()
    dtype: Attribute = param_def()

    def __init__(self, shape: Sequence[int], dtype: Attribute):
        super().__init__(ArrayAttr(IntAttr(d) for d in shape), dtype)

    @property
    def has_shape(self) -> bool:
        """False for the bare `!torch.vtensor`."""
        return isinstance(self.shape, ArrayAttr)

    def get_shape(self) -> tuple[int, ...]:
        """The dimensions, with -1 for a dynamic one."""
        if not isinstance(self.shape, ArrayAttr):
            raise ValueError("!torch.vtensor has no known shape")
        return tuple(d.data for d in self.shape.data)

    def numel(self) -> int:
        """Number of elements; raises if a dimension is dynamic."""
        n = 1
        for d in self.get_shape():
            if d < 0:
                raise ValueError(f"{self} has a dynamic dimension")
            n *= d
        return n

    def nbytes(self) -> int:
        """Bytes of the tensor; raises if a dimension is dynamic or the dtype's size is unknown."""
        dtype = str(self.dtype)
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{self}: no element size known for dtype {dtype}")
        return self.numel() * DTYPE_BYTES[dtype]

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        if not parser.parse_optional_punctuation("<"):
            return (NoneAttr(), NoneAttr())
        dims = parser.parse_comma_separated_list(
            parser.Delimiter.SQUARE, lambda: _parse_dim(parser)
        )
        parser.parse_punctuation(",")
        dtype = parser.parse_type()
        parser.parse_punctuation(">")
        return (ArrayAttr(IntAttr(d) for d in dims), dtype)

    def print_parameters(self, printer: Printer) -> None:
        if not self.has_shape:
            return
        dims = ",".join("?" if d < 0 else str(d) for d in self.get_shape())
        printer.print_string(f"<[{dims}],")
        printer.print_attribute(self.dtype)
        printer.print_string(">")

    def verify(self) -> None:
        if self.has_shape and any(d < -1 for d in self.get_shape()):
            raise VerifyException(f"{self.name}: negative dimension in {self.get_shape()}")


def _parse_dim(parser: AttrParser) -> int:
    if parser.parse_optional_punctuation("?"):
        return -1
    return parser.parse_integer(allow_boolean=False, allow_negative=False)


def _scalar_type(type_name: str, doc: str) -> type[ParametrizedAttribute]:
    cls = type(
        f"{type_name.split('.')[-1].capitalize()}Type",
        (ParametrizedAttribute, TypeAttribute),
        {"name": type_name, "__doc__": doc, "__module__": __name__},
    )
    return irdl_attr_definition(cls)


IntType = _scalar_type("torch.int", "A Python int (`!torch.int`).")
FloatType = _scalar_type("torch.float", "A Python float (`!torch.float`).")
BoolType = _scalar_type("torch.bool", "A Python bool (`!torch.bool`).")
NoneType = _scalar_type("torch.none", "Python None (`!torch.none`).")
StrType = _scalar_type("torch.str", "A Python str (`!torch.str`).")
DeviceType = _scalar_type("torch.Device", "A torch.device (`!torch.Device`).")
NumberType = _scalar_type("torch.number", "An int or a float (`!torch.number`).")


class _ContainerType(ParametrizedAttribute, TypeAttribute):
    """A type with one element type, written without its `!torch.` prefix: `<int>`, `<vtensor>`."""

    element: Attribute = param_def()

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        with parser.in_angle_brackets():
            return (_parse_torch_type_short(parser),)

    def print_parameters(self, printer: Printer) -> None:
        printer.print_string("<")
        _print_torch_type_short(printer, self.element)
        printer.print_string(">")


@irdl_attr_definition
class ListType(_ContainerType):
    """A Python list of one element type (`!torch.list<int>`)."""

    name = "torch.list"


@irdl_attr_definition
class OptionalType(_ContainerType):
    """A value that may be None (`!torch.optional<vtensor>`)."""

    name = "torch.optional"


_SHORT_TYPES: dict[str, type[ParametrizedAttribute]] = {
    "int": IntType,
    "float": FloatType,
    "bool": BoolType,
    "none": NoneType,
    "str": StrType,
    "Device": DeviceType,
    "number": NumberType,
}


def _parse_torch_type_short(parser: AttrParser) -> Attribute:
    """Element types inside `list<...>` are written without the `!torch.` prefix."""
    if parser.parse_optional_characters("vtensor"):
        shape, dtype = ValueTensorType.parse_parameters(parser)
        return ValueTensorType.new((shape, dtype))
    if parser.parse_optional_characters("list"):
        return ListType.new(tuple(ListType.parse_parameters(parser)))
    if parser.parse_optional_characters("optional"):
        return OptionalType.new(tuple(OptionalType.parse_parameters(parser)))
    pos = parser.pos
    word = parser.parse_identifier()
    if word not in _SHORT_TYPES:
        parser.raise_error(f"unknown torch type '{word}'", pos)
    return _SHORT_TYPES[word]()


def _print_torch_type_short(printer: Printer, t: Attribute) -> None:
    if not isinstance(t, ParametrizedAttribute) or not t.name.startswith("torch."):
        printer.print_attribute(t)
        return
    printer.print_string(t.name.removeprefix("torch."))
    t.print_parameters(printer)


TORCH_TYPES = (
    ValueTensorType,
    IntType,
    FloatType,
    BoolType,
    NoneType,
    StrType,
    DeviceType,
    NumberType,
    ListType,
    OptionalType,
)


# ---------------------------------------------------------------- constants


def _lean_op_definition(generic_checks_pass: Callable[[Operation], bool]):
    """`irdl_op_definition`, but IRDL's generic checks run only when `generic_checks_pass(op)`
    cannot vouch for them.

    The generic checks (operand, result, region and property counts and types) cost about
    30 µs an op, and every pass verifies the tens of thousands of constants and lists a
    model has. `generic_checks_pass` accepts, in a few microseconds, only what those checks
    accept; anything else goes through them and fails with their usual message. The op's
    own `verify_` runs after them either way.
    """

    def define(cls: type[IRDLOperation]) -> type[IRDLOperation]:
        own_verify = cls.__dict__.get("verify_")
        cls = irdl_op_definition(cls)
        generic_checks = cls.get_irdl_definition().verify

        def verify_(op: IRDLOperation) -> None:
            if not generic_checks_pass(op):
                generic_checks(op)
            if own_verify is not None:
                own_verify(op)

        cls.verify_ = verify_
        return cls

    return define


def _constant_definition(result_type: type[Attribute], value_ok: Callable[[Attribute], bool] | None):
    """`_lean_op_definition` for a `torch.constant.*` op: no operands, regions or successors;
    one result of `result_type`; a `value` property that `value_ok` accepts, and no other
    property (no property at all when `value_ok` is None). Its traits check nothing."""

    def generic_checks_pass(op: Operation) -> bool:
        if op.operands or op.regions or op.successors or len(op.results) != 1:
            return False
        if not isinstance(op.results[0].type, result_type):
            return False
        if value_ok is None:
            return not op.properties
        return len(op.properties) == 1 and value_ok(op.properties.get("value"))

    return _lean_op_definition(generic_checks_pass)


def _is_integer_attr(value: Attribute | None) -> bool:
    return isinstance(value, IntegerAttr) and isinstance(value.value, IntAttr) and isinstance(value.type, IntegerType)


def _is_float_attr(value: Attribute | None) -> bool:
    return isinstance(value, FloatAttr) and isinstance(value.value, FloatData) and isinstance(value.type, AnyFloat)


def _is_bool_attr(value: Attribute | None) -> bool:
    return _is_integer_attr(value) and value.type == i1


def _is_string_attr(value: Attribute | None) -> bool:
    return isinstance(value, StringAttr)


@_constant_definition(IntType, _is_integer_attr)
class ConstantIntOp(IRDLOperation):
    """A Python int literal used as an operator argument."""

    name = "torch.constant.int"
    value = prop_def(IntegerAttr[IntegerType])
    result = result_def(IntType)
    traits = traits_def(ConstantLike(), Pure())

    def __init__(self, value: int):
        super().__init__(
            properties={"value": IntegerAttr(value, 64)}, result_types=[IntType()]
        )


@_constant_definition(FloatType, _is_float_attr)
class ConstantFloatOp(IRDLOperation):
    """A Python float literal used as an operator argument."""

    name = "torch.constant.float"
    value = prop_def(FloatAttr[AnyFloat])
    result = result_def(FloatType)
    traits = traits_def(ConstantLike(), Pure())


@_constant_definition(BoolType, _is_bool_attr)
class ConstantBoolOp(IRDLOperation):
    """A Python bool literal used as an operator argument."""

    name = "torch.constant.bool"
    value = prop_def(BoolAttr)
    result = result_def(BoolType)
    traits = traits_def(ConstantLike(), Pure())


@_constant_definition(NoneType, None)
class ConstantNoneOp(IRDLOperation):
    """Python None used as an operator argument."""

    name = "torch.constant.none"
    result = result_def(NoneType)
    traits = traits_def(ConstantLike(), Pure())

    def __init__(self):
        super().__init__(result_types=[NoneType()])


@_constant_definition(StrType, _is_string_attr)
class ConstantStrOp(IRDLOperation):
    """A Python str literal used as an operator argument."""

    name = "torch.constant.str"
    value = prop_def(StringAttr)
    result = result_def(StrType)
    traits = traits_def(ConstantLike(), Pure())


@_constant_definition(DeviceType, _is_string_attr)
class ConstantDeviceOp(IRDLOperation):
    """A device literal (`"cpu"`) used as an operator argument."""

    name = "torch.constant.device"
    value = prop_def(StringAttr)
    result = result_def(DeviceType)
    traits = traits_def(ConstantLike(), Pure())


def _list_construct_generic_checks_pass(op: Operation) -> bool:
    """Any operands; one `!torch.list` result; no property, region or successor."""
    return (not op.properties and not op.regions and not op.successors and len(op.results) == 1
            and isinstance(op.results[0].type, ListType))


@_lean_op_definition(_list_construct_generic_checks_pass)
class ListConstructOp(IRDLOperation):
    """Builds a Python list from its operands (`torch.prim.ListConstruct`)."""

    name = "torch.prim.ListConstruct"
    elements = var_operand_def()
    result = result_def(ListType)
    traits = traits_def(Pure())

    def verify_(self) -> None:
        assert isinstance(self.result.type, ListType)
        expected = self.result.type.element
        for i, e in enumerate(self.elements):
            if not _element_matches(e.type, expected):
                raise VerifyException(
                    f"{self.name}: element {i} has type {e.type}, the list holds {expected}"
                )


def _list_unpack_generic_checks_pass(op: Operation) -> bool:
    """One `!torch.list` operand; any results; no property, region or successor."""
    return (not op.properties and not op.regions and not op.successors and len(op.operands) == 1
            and isinstance(op.operands[0].type, ListType))


@_lean_op_definition(_list_unpack_generic_checks_pass)
class ListUnpackOp(IRDLOperation):
    """Splits a list into its elements (`torch.prim.ListUnpack`), e.g. after `aten.split`."""

    name = "torch.prim.ListUnpack"
    list_ = operand_def(ListType)
    elements = var_result_def()
    traits = traits_def(Pure())

    def verify_(self) -> None:
        assert isinstance(self.list_.type, ListType)
        expected = self.list_.type.element
        for i, e in enumerate(self.elements):
            if not _element_matches(e.type, expected):
                raise VerifyException(
                    f"{self.name}: result {i} has type {e.type}, the list holds {expected}"
                )


def _element_matches(actual: Attribute, expected: Attribute) -> bool:
    if isinstance(expected, OptionalType):
        return isinstance(actual, NoneType) or _element_matches(actual, expected.element)
    if isinstance(expected, ValueTensorType):
        return isinstance(actual, ValueTensorType)
    if isinstance(expected, NumberType):
        return isinstance(actual, IntType | FloatType | NumberType)
    return type(actual) is type(expected)


# ---------------------------------------------------------------- ATen operators


class AtenOp(IRDLOperation):
    """An ATen operator (`torch.aten.<name>[.<overload>]`).

    One subclass per operator name is made on first use (see `aten_op_class`).
    Operands are the operator's arguments in schema order (literals come from
    `torch.constant.*` ops); results are its returns. The verifier checks both
    counts and that every value has a torch type. Operators that only compute are
    `Pure` (see `aten_is_pure`).
    """

    name = "torch.aten"
    operands_ = var_operand_def()
    results_ = var_result_def()

    @property
    def aten(self) -> torch._ops.OpOverload:
        """The torch operator this op stands for."""
        overload = aten_overload(self.name)
        assert overload is not None
        return overload

    def verify_(self) -> None:
        if self.properties or self.regions or self.successors:
            raise VerifyException(f"{self.name} has no properties, regions or successors")
        num_operands, num_results = _arity(self.name)
        if len(self.operands) != num_operands:
            raise VerifyException(
                f"{self.name} takes {num_operands} operands ({self.aten._schema}), "
                f"got {len(self.operands)}"
            )
        if len(self.results) != num_results:
            raise VerifyException(
                f"{self.name} returns {num_results} results ({self.aten._schema}), "
                f"got {len(self.results)}"
            )
        for v in (*self.operands, *self.results):
            if not isinstance(v.type, TORCH_TYPES):
                raise VerifyException(f"{self.name}: {v.type} is not a torch type")


@functools.cache
def _arity(op_name: str) -> tuple[int, int]:
    """How many arguments and returns the operator's schema has."""
    schema = aten_overload(op_name)._schema
    return len(schema.arguments), len(schema.returns)


@irdl_op_definition
class OperatorOp(IRDLOperation):
    """An operator torch-mlir has no named op for: `torch.operator "torch.aten.silu_backward"`.

    Capture rewrites each one into the `torch.aten.*` op it names (see
    `as_aten_op`); one that names no ATen operator cannot be represented.
    """

    name = "torch.operator"
    op_name = prop_def(StringAttr, prop_name="name")
    operands_ = var_operand_def()
    results_ = var_result_def()

    def verify_(self) -> None:
        if aten_overload(self.op_name.data) is None:
            raise VerifyException(
                f"torch.operator {self.op_name.data!r} names no ATen operator torch knows"
            )

    def as_aten_op(self) -> AtenOp:
        """The equivalent `torch.aten.*` op (same operands, result types and attributes)."""
        cls = aten_op_class(self.op_name.data)
        assert cls is not None
        return cls.create(
            operands=list(self.operands),
            result_types=[r.type for r in self.results],
            attributes=dict(self.attributes),
        )


@functools.cache
def aten_overload(op_name: str) -> torch._ops.OpOverload | None:
    """The torch operator for a torch-mlir op name, or None if there is none.

    `torch.aten.addmm` is `aten::addmm` (default overload);
    `torch.aten.sum.dim_IntList` is `aten::sum.dim_IntList`.
    """
    if not op_name.startswith("torch.aten."):
        return None
    parts = op_name.removeprefix("torch.aten.").split(".")
    if len(parts) > 2:
        return None
    packet = getattr(torch.ops.aten, parts[0], None)
    if packet is None:
        return None
    overload_name = parts[1] if len(parts) == 2 else "default"
    if overload_name not in packet.overloads():
        return None
    return getattr(packet, overload_name)


def aten_is_pure(overload: torch._ops.OpOverload) -> bool:
    """True if the operator only computes its results from its operands, so an op whose
    results are unused can be removed (`dce`) and two equal ones merged (`cse`).

    Not pure: operators that write to an argument (an in-place `add_`, `copy_`, an `out=`
    overload: `Tensor(a!)` in the schema), random ones (dropout, rand, bernoulli: torch
    tags them `nondeterministic_seeded`), and ones that return nothing (`_assert_async`),
    which exist only for their effect.
    """
    schema = overload._schema
    return not (
        schema.is_mutable
        or schema.name.endswith("_")
        or not schema.returns
        or aten_is_random(overload)
    )


RANDOM_INDEX = "piperc.random"
"""Attribute of a random ATen op (`aten_is_random`): its index among the captured forward's
random ops, in execution order. The runtime seeds each one from (seed, step, microbatch
slice, index), so its draws do not depend on where the strategy places it."""


def aten_is_random(overload: torch._ops.OpOverload) -> bool:
    """True if the operator draws from torch's random generator (dropout, rand, bernoulli:
    torch tags them `nondeterministic_seeded`)."""
    return torch.Tag.nondeterministic_seeded in overload.tags


@functools.cache
def aten_op_class(op_name: str) -> type[AtenOp] | None:
    """The op class for `torch.aten.*` name, made once from torch's schema; `Pure` when
    the operator is (see `aten_is_pure`)."""
    overload = aten_overload(op_name)
    if overload is None:
        return None
    cls_name = "Aten_" + op_name.removeprefix("torch.aten.").replace(".", "_") + "Op"
    fields = {"name": op_name, "__module__": __name__}
    if aten_is_pure(overload):
        fields["traits"] = traits_def(Pure())
    cls = irdl_op_definition(type(cls_name, (AtenOp,), fields))
    # IRDL's generic checks say nothing for an ATen op (any number of operands and results,
    # of any type) yet cost most of its verification time, and every pass verifies every
    # op; AtenOp.verify_ checks what matters against the schema, itself included.
    cls.verify_ = AtenOp.verify_
    return cls


Torch = Dialect(
    "torch",
    [
        ConstantIntOp,
        ConstantFloatOp,
        ConstantBoolOp,
        ConstantNoneOp,
        ConstantStrOp,
        ConstantDeviceOp,
        ListConstructOp,
        ListUnpackOp,
        OperatorOp,
    ],
    list(TORCH_TYPES),
)
