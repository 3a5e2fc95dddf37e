"""The `exec` dialect: what one rank runs, in order.

A module holds the process groups of the job (`exec.process_group`) and one
`exec.program` per rank. A program is a straight-line list of steps on CUDA
streams (on CPU, gloo work handles stand in for streams): launching a stage's
task for a microbatch, issuing collectives and point-to-point transfers on a
process group, waiting for their work handles, freeing buffers, and the
interface to the runtime (inputs, parameters, gradients, outputs). Code
generation writes one Python file per program, one statement per op.

Buffers are torch values (`!torch.vtensor<[4,16],f32>`). Collectives and
transfers are asynchronous: each returns a `!exec.work` handle, and its result
buffer may be read only after an `exec.wait` on that handle.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from enum import auto
from typing import ClassVar

from xdsl.dialects.builtin import (
    I64,
    DenseArrayBase,
    FlatSymbolRefAttr,
    IntegerAttr,
    StringAttr,
    SymbolNameConstraint,
    SymbolRefAttr,
    UnitAttr,
    i64,
)
from xdsl.dialects.utils import EnumAttribute
from xdsl.ir import (
    Attribute,
    Block,
    Dialect,
    Operation,
    ParametrizedAttribute,
    Region,
    SpacedOpaqueSyntaxAttribute,
    SSAValue,
    TypeAttribute,
)
from xdsl.irdl import (
    IRDLOperation,
    MessageConstraint,
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
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.traits import (
    IsolatedFromAbove,
    NoTerminator,
    SymbolOpInterface,
    SymbolTable,
    SymbolUserOpInterface,
)
from xdsl.utils.exceptions import VerifyException
from xdsl.utils.str_enum import StrEnum

from piperc.dialects.par import ShardingAttr
from piperc.dialects.torch import ValueTensorType

# ---------------------------------------------------------------- types and attributes


@irdl_attr_definition
class StreamType(ParametrizedAttribute, TypeAttribute):
    """An ordered queue of work on one device (`!exec.stream`): a CUDA stream."""

    name = "exec.stream"


@irdl_attr_definition
class EventType(ParametrizedAttribute, TypeAttribute):
    """A point in a stream's queue that another stream can wait for (`!exec.event`)."""

    name = "exec.event"


@irdl_attr_definition
class WorkType(ParametrizedAttribute, TypeAttribute):
    """The handle of an asynchronous collective or transfer (`!exec.work`).

    Its result buffer may be read only after an `exec.wait` on the handle.
    """

    name = "exec.work"


class ReductionKind(StrEnum):
    """How a collective combines the ranks' values."""

    SUM = auto()
    AVG = auto()
    MAX = auto()


@irdl_attr_definition
class ReductionAttr(EnumAttribute[ReductionKind], SpacedOpaqueSyntaxAttribute):
    """The reduction of an all-reduce or reduce-scatter (`#exec<reduction sum>`).

    Inside an op it prints as the bare word: `sum`, `avg` or `max`.
    """

    name = "exec.reduction"


PASS_KINDS = ("F", "B", "W", "update")
"""The kinds of `exec.launch`, in the schedule vocabulary of torch.distributed.pipelining:
forward, backward (input gradients), weight gradients, optimizer update."""

# ---------------------------------------------------------------- traits and helpers


class ProcessGroupUser(SymbolUserOpInterface):
    """`group` names an `exec.process_group`, and the issuing program's rank is a member."""

    def verify(self, op: Operation) -> None:
        assert isinstance(op, CommunicationOp)
        group = op.process_group()
        program = op.program()
        if program is not None and program.rank.value.data not in group.rank_list():
            raise VerifyException(
                f"{op.name}: rank {program.rank.value.data} (program @{program.sym_name.data}) "
                f"is not a member of process group {op.group} with ranks {list(group.rank_list())}"
            )


def _shape_of(op: IRDLOperation, value: SSAValue) -> tuple[int, ...]:
    """The shape of a tensor value, for ops whose checks need one."""
    assert isinstance(value.type, ValueTensorType)
    if not value.type.has_shape:
        raise VerifyException(f"{op.name}: {value.type} has no shape; a shaped tensor is needed")
    return value.type.get_shape()


def _verify_dim(op: IRDLOperation, what: str, dim: int, shape: tuple[int, ...]) -> None:
    if not 0 <= dim < len(shape):
        raise VerifyException(
            f"{op.name}: {what} {dim} is out of range for a tensor of rank {len(shape)}"
        )


def _divide(op: IRDLOperation, size: int, parts: int, dim: int) -> int:
    """Size of one of `parts` equal pieces of dimension `dim`; -1 stays dynamic."""
    if size < 0:
        return -1
    if size % parts:
        raise VerifyException(
            f"{op.name}: dimension {dim} of size {size} does not split evenly across {parts} ranks"
        )
    return size // parts


def _verify_result_type(
    op: IRDLOperation, source: Attribute, result: Attribute, expected_shape: Sequence[int]
) -> None:
    """The result has the source's dtype and `expected_shape` (-1 matches any size)."""
    assert isinstance(source, ValueTensorType) and isinstance(result, ValueTensorType)
    if result.dtype != source.dtype:
        raise VerifyException(
            f"{op.name}: result dtype {result.dtype} differs from operand dtype {source.dtype}"
        )
    actual = result.get_shape() if result.has_shape else ()
    matches = len(actual) == len(expected_shape) and all(
        a == e or a < 0 or e < 0 for a, e in zip(actual, expected_shape, strict=True)
    )
    if not matches:
        raise VerifyException(
            f"{op.name}: result shape {list(actual)} should be {list(expected_shape)}"
        )


def _verify_nonnegative(op: IRDLOperation, what: str, attr: IntegerAttr | None) -> None:
    if attr is not None and attr.value.data < 0:
        raise VerifyException(f"{op.name}: {what} must be >= 0, got {attr.value.data}")


def _verify_nonempty(op: IRDLOperation, what: str, attr: StringAttr) -> None:
    if not attr.data:
        raise VerifyException(f"{op.name}: {what} must not be empty")


# ---------------------------------------------------------------- programs and groups


@irdl_op_definition
class ProgramOp(IRDLOperation):
    """The program of one rank, in execution order.

    `exec.program @rank0 rank 0 world 4 { ... }`. The body holds only values
    made inside it (buffers come from `exec.load_input` and `exec.param`);
    process groups are referenced by symbol. Stream names are unique within a
    program, since the generated file uses them to say where a step runs.
    """

    name = "exec.program"

    sym_name = prop_def(SymbolNameConstraint())
    rank = prop_def(IntegerAttr[I64])
    world_size = prop_def(IntegerAttr[I64])
    phase = opt_prop_def(StringAttr)
    body = region_def("single_block")

    traits = traits_def(SymbolOpInterface(), NoTerminator(), IsolatedFromAbove())

    assembly_format = "$sym_name `rank` $rank `world` $world_size (`phase` $phase^)? attr-dict-with-keyword $body"

    def __init__(self, sym_name: str, rank: int, world_size: int, body: Region | None = None,
                 phase: str | None = None):
        super().__init__(
            properties={
                "sym_name": StringAttr(sym_name),
                "rank": IntegerAttr(rank, i64),
                "world_size": IntegerAttr(world_size, i64),
                "phase": None if phase is None else StringAttr(phase),
            },
            regions=[body if body is not None else Region(Block())],
        )

    def phase_name(self) -> str:
        """Which steps run the program: `step` (every step, the default), `first` or `drain`
        (`par.program`'s phases: a program that carries values between steps)."""
        return "step" if self.phase is None else self.phase.data

    def verify_(self) -> None:
        rank, world = self.rank.value.data, self.world_size.value.data
        if not 0 <= rank < world:
            raise VerifyException(
                f"{self.name} @{self.sym_name.data}: rank {rank} is outside world size {world}"
            )
        seen: set[str] = set()
        for op in self.body.block.ops:
            if not isinstance(op, StreamOp):
                continue
            if op.stream_name.data in seen:
                raise VerifyException(
                    f"{self.name} @{self.sym_name.data}: stream "
                    f'"{op.stream_name.data}" is created twice'
                )
            seen.add(op.stream_name.data)
        _verify_program_order(self)


@irdl_op_definition
class ProcessGroupOp(IRDLOperation):
    """A named set of global ranks that run collectives together.

    `exec.process_group @dp_0 ranks [0, 2]`. Declared at module level, next to
    the programs, and referenced by symbol from communication ops. Ranks are
    unique and non-negative; their order is the group's rank order.
    `exec.process_group @dp_0 ranks [0, 1] axis "dp"` is, in addition, the group
    of its ranks along a mesh axis, in axis order: the group that a collective
    over that axis inside a stage function uses on those ranks.
    """

    name = "exec.process_group"

    sym_name = prop_def(SymbolNameConstraint())
    ranks = prop_def(DenseArrayBase[I64])
    axis = opt_prop_def(StringAttr)

    traits = traits_def(SymbolOpInterface())

    assembly_format = "$sym_name `ranks` $ranks (`axis` $axis^)? attr-dict"

    def __init__(self, sym_name: str, ranks: Sequence[int], axis: str | None = None):
        super().__init__(
            properties={
                "sym_name": StringAttr(sym_name),
                "ranks": DenseArrayBase.from_list(i64, ranks),
                "axis": None if axis is None else StringAttr(axis),
            }
        )

    def rank_list(self) -> tuple[int, ...]:
        """The member ranks, in group order."""
        return self.ranks.get_values()

    def verify_(self) -> None:
        ranks = self.rank_list()
        if not ranks:
            raise VerifyException(f"{self.name} @{self.sym_name.data}: a group needs a rank")
        if len(set(ranks)) != len(ranks):
            raise VerifyException(
                f"{self.name} @{self.sym_name.data}: ranks {list(ranks)} repeat a rank"
            )
        if min(ranks) < 0:
            raise VerifyException(
                f"{self.name} @{self.sym_name.data}: ranks {list(ranks)} hold a negative rank"
            )


# ---------------------------------------------------------------- streams and events


@irdl_op_definition
class StreamOp(IRDLOperation):
    """Creates a stream: `%s = exec.stream "compute" priority 0`.

    The name labels the stream in the generated code. The optional priority
    follows CUDA: 0 is the default, -1 runs ahead of it.
    """

    name = "exec.stream"

    stream_name = prop_def(StringAttr, prop_name="name")
    priority = opt_prop_def(IntegerAttr[I64])
    stream = result_def(StreamType)

    assembly_format = "$name (`priority` $priority^)? attr-dict"

    def __init__(self, stream_name: str, priority: int | None = None):
        super().__init__(
            properties={
                "name": StringAttr(stream_name),
                "priority": None if priority is None else IntegerAttr(priority, i64),
            },
            result_types=[StreamType()],
        )

    def verify_(self) -> None:
        _verify_nonempty(self, "the stream name", self.stream_name)
        if self.priority is not None and self.priority.value.data < -1:
            raise VerifyException(
                f'{self.name} "{self.stream_name.data}": priority '
                f"{self.priority.value.data} is below -1, the highest priority"
            )


@irdl_op_definition
class EventRecordOp(IRDLOperation):
    """Records an event at the current end of a stream: `%e = exec.event_record %s`."""

    name = "exec.event_record"

    stream = operand_def(StreamType)
    event = result_def(EventType)

    assembly_format = "$stream attr-dict"

    def __init__(self, stream: SSAValue):
        super().__init__(operands=[stream], result_types=[EventType()])


@irdl_op_definition
class EventWaitOp(IRDLOperation):
    """Makes a stream wait for an event before its later work: `exec.event_wait %s, %e`."""

    name = "exec.event_wait"

    stream = operand_def(StreamType)
    event = operand_def(EventType)

    assembly_format = "$stream `,` $event attr-dict"

    def __init__(self, stream: SSAValue, event: SSAValue):
        super().__init__(operands=[stream, event])


# ---------------------------------------------------------------- compute


@irdl_op_definition
class LaunchOp(IRDLOperation):
    """Runs a task on a stream.

    `%y = exec.launch @s0_F_mb1(%x, %w) on %s stage 0 pass "F" microbatch 1 : (t, t) -> t`

    The callee names the task (a stage's forward, backward, weight-gradient or
    update function); lowering guarantees it exists, this dialect does not
    resolve it. `stage`, `pass` (F, B, W or update) and `microbatch` say which
    schedule action this is; an update has no microbatch, the others do.
    """

    name = "exec.launch"

    callee = prop_def(SymbolRefAttr)
    args = var_operand_def(ValueTensorType)
    stream = operand_def(StreamType)
    stage = prop_def(IntegerAttr[I64])
    pass_kind = prop_def(StringAttr)
    microbatch = opt_prop_def(IntegerAttr[I64])
    outs = var_result_def(ValueTensorType)

    assembly_format = (
        "$callee `(` $args `)` `on` $stream `stage` $stage `pass` $pass_kind "
        "(`microbatch` $microbatch^)? attr-dict `:` functional-type($args, $outs)"
    )

    def __init__(
        self,
        callee: str | SymbolRefAttr,
        args: Sequence[SSAValue],
        stream: SSAValue,
        result_types: Sequence[Attribute],
        *,
        stage: int,
        pass_kind: str,
        microbatch: int | None = None,
    ):
        super().__init__(
            operands=[args, stream],
            result_types=[result_types],
            properties={
                "callee": SymbolRefAttr(callee) if isinstance(callee, str) else callee,
                "stage": IntegerAttr(stage, i64),
                "pass_kind": StringAttr(pass_kind),
                "microbatch": None if microbatch is None else IntegerAttr(microbatch, i64),
            },
        )

    def verify_(self) -> None:
        kind = self.pass_kind.data
        if kind not in PASS_KINDS:
            raise VerifyException(
                f'{self.name} {self.callee}: pass "{kind}" is not one of {", ".join(PASS_KINDS)}'
            )
        _verify_nonnegative(self, "stage", self.stage)
        _verify_nonnegative(self, "microbatch", self.microbatch)
        if kind == "update" and self.microbatch is not None:
            raise VerifyException(
                f"{self.name} {self.callee}: an update covers all microbatches; drop `microbatch`"
            )
        if kind != "update" and self.microbatch is None:
            raise VerifyException(f'{self.name} {self.callee}: pass "{kind}" needs a microbatch')


# ---------------------------------------------------------------- collectives


class CommunicationOp(IRDLOperation, ABC):
    """An asynchronous collective or transfer over a process group, issued on a stream."""

    group = prop_def(FlatSymbolRefAttr)

    traits = traits_def(ProcessGroupUser())

    def process_group(self) -> ProcessGroupOp:
        """The `exec.process_group` that `group` names."""
        table = self.parent_op()
        while table is not None and not table.has_trait(SymbolTable):
            table = table.parent_op()
        if table is None:
            raise VerifyException(
                f"{self.name}: process group {self.group} cannot be resolved outside a module"
            )
        found = SymbolTable.lookup_symbol(table, self.group)
        if not isinstance(found, ProcessGroupOp):
            raise VerifyException(f"{self.name}: {self.group} does not name an exec.process_group")
        return found

    def program(self) -> ProgramOp | None:
        """The `exec.program` this op belongs to, if any."""
        op = self.parent_op()
        while op is not None and not isinstance(op, ProgramOp):
            op = op.parent_op()
        return op

    def group_size(self) -> int:
        """Number of ranks in the process group."""
        return len(self.process_group().rank_list())

    def _verify_member(self, what: str, rank: int, ranks: Sequence[int]) -> None:
        """`rank` is among `ranks`, the members of the process group."""
        if rank not in ranks:
            raise VerifyException(
                f"{self.name}: {what} rank {rank} is not in process group "
                f"{self.group} with ranks {list(ranks)}"
            )


@irdl_op_definition
class AllReduceOp(CommunicationOp):
    """Reduces tensors across a group; every rank gets the reduced values.

    `%w, %ra, %rb = exec.all_reduce %a, %b group @dp_0 sum on %s : t1, t2`

    Several operands form one bucket: they are flattened, reduced together
    and split back, one result per operand with the operand's type.
    """

    name = "exec.all_reduce"

    inputs = var_operand_def(ValueTensorType)
    stream = operand_def(StreamType)
    reduction = prop_def(ReductionAttr)
    work = result_def(WorkType)
    outputs = var_result_def(ValueTensorType)

    def __init__(
        self,
        inputs: Sequence[SSAValue],
        group: str,
        stream: SSAValue,
        reduction: ReductionKind = ReductionKind.SUM,
    ):
        super().__init__(
            operands=[inputs, stream],
            result_types=[WorkType(), [v.type for v in inputs]],
            properties={
                "group": SymbolRefAttr(group),
                "reduction": ReductionAttr(reduction),
            },
        )

    # Custom syntax because the results repeat the operand types, and a
    # declarative format could only infer them through a range variable whose
    # failure message names neither the op nor the bucket entry.
    @classmethod
    def parse(cls, parser: Parser) -> AllReduceOp:
        pos = parser.pos
        inputs = parser.parse_comma_separated_list(
            parser.Delimiter.NONE, parser.parse_unresolved_operand
        )
        parser.parse_keyword("group")
        group = parser.parse_attribute()
        reduction = ReductionAttr(parser.parse_str_enum(ReductionKind))
        parser.parse_keyword("on")
        stream = parser.parse_operand(StreamType())
        attributes = parser.parse_optional_attr_dict()
        parser.parse_punctuation(":")
        types = parser.parse_comma_separated_list(parser.Delimiter.NONE, parser.parse_type)
        return cls.build(
            operands=[parser.resolve_operands(inputs, types, pos), stream],
            result_types=[WorkType(), types],
            properties={"group": group, "reduction": reduction},
            attributes=attributes,
        )

    def print(self, printer: Printer) -> None:
        printer.print_string(" ")
        printer.print_list(self.inputs, printer.print_ssa_value)
        printer.print_string(" group ")
        printer.print_attribute(self.group)
        printer.print_string(f" {self.reduction.data.value} on ")
        printer.print_ssa_value(self.stream)
        printer.print_op_attributes(self.attributes)
        printer.print_string(" : ")
        printer.print_list(self.inputs.types, printer.print_attribute)

    def verify_(self) -> None:
        if not self.inputs:
            raise VerifyException(f"{self.name}: a bucket needs at least one tensor")
        if len(self.outputs) != len(self.inputs):
            raise VerifyException(
                f"{self.name}: {len(self.inputs)} tensors in but {len(self.outputs)} out; "
                "a bucket returns one result per operand"
            )
        for i, (source, result) in enumerate(zip(self.inputs, self.outputs, strict=True)):
            if source.type != result.type:
                raise VerifyException(
                    f"{self.name}: bucket entry {i} is {source.type} in but {result.type} out"
                )


@irdl_op_definition
class AllGatherOp(CommunicationOp):
    """Concatenates every rank's tensor along `dim`, in group order.

    `%w, %r = exec.all_gather %x group @tp_0 dim 0 on %s : !torch.vtensor<[2,8],f32>
    -> !torch.vtensor<[4,8],f32>` (a group of 2).
    """

    name = "exec.all_gather"

    input = operand_def(ValueTensorType)
    stream = operand_def(StreamType)
    dim = prop_def(IntegerAttr[I64])
    work = result_def(WorkType)
    output = result_def(ValueTensorType)

    assembly_format = (
        "$input `group` $group `dim` $dim `on` $stream attr-dict "
        "`:` type($input) `->` type($output)"
    )

    def __init__(
        self, input: SSAValue, group: str, dim: int, stream: SSAValue, result_type: Attribute
    ):
        super().__init__(
            operands=[input, stream],
            result_types=[WorkType(), result_type],
            properties={"group": SymbolRefAttr(group), "dim": IntegerAttr(dim, i64)},
        )

    def verify_(self) -> None:
        shape = _shape_of(self, self.input)
        dim = self.dim.value.data
        _verify_dim(self, "dim", dim, shape)
        expected = list(shape)
        if shape[dim] >= 0:
            expected[dim] = shape[dim] * self.group_size()
        _verify_result_type(self, self.input.type, self.output.type, expected)


@irdl_op_definition
class ReduceScatterOp(CommunicationOp):
    """Reduces tensors across a group; each rank keeps its piece along `dim`.

    `%w, %r = exec.reduce_scatter %g group @dp_0 dim 0 sum on %s
    : !torch.vtensor<[4,8],f32> -> !torch.vtensor<[2,8],f32>` (a group of 2).
    """

    name = "exec.reduce_scatter"

    input = operand_def(ValueTensorType)
    stream = operand_def(StreamType)
    dim = prop_def(IntegerAttr[I64])
    reduction = prop_def(ReductionAttr)
    work = result_def(WorkType)
    output = result_def(ValueTensorType)

    assembly_format = (
        "$input `group` $group `dim` $dim $reduction `on` $stream attr-dict "
        "`:` type($input) `->` type($output)"
    )

    def __init__(
        self,
        input: SSAValue,
        group: str,
        dim: int,
        stream: SSAValue,
        result_type: Attribute,
        reduction: ReductionKind = ReductionKind.SUM,
    ):
        super().__init__(
            operands=[input, stream],
            result_types=[WorkType(), result_type],
            properties={
                "group": SymbolRefAttr(group),
                "dim": IntegerAttr(dim, i64),
                "reduction": ReductionAttr(reduction),
            },
        )

    def verify_(self) -> None:
        shape = _shape_of(self, self.input)
        dim = self.dim.value.data
        _verify_dim(self, "dim", dim, shape)
        expected = list(shape)
        expected[dim] = _divide(self, shape[dim], self.group_size(), dim)
        _verify_result_type(self, self.input.type, self.output.type, expected)


@irdl_op_definition
class AllToAllOp(CommunicationOp):
    """Splits a tensor along `split` into one piece per rank, sends piece i to
    the i-th rank of the group, and concatenates what arrives along `concat`.

    `%w, %r = exec.all_to_all %x group @ep_0 split 0 concat 1 on %s
    : !torch.vtensor<[4,8],f32> -> !torch.vtensor<[2,16],f32>` (a group of 2).
    """

    name = "exec.all_to_all"

    input = operand_def(ValueTensorType)
    stream = operand_def(StreamType)
    split_dim = prop_def(IntegerAttr[I64])
    concat_dim = prop_def(IntegerAttr[I64])
    work = result_def(WorkType)
    output = result_def(ValueTensorType)

    assembly_format = (
        "$input `group` $group `split` $split_dim `concat` $concat_dim `on` $stream "
        "attr-dict `:` type($input) `->` type($output)"
    )

    def __init__(
        self,
        input: SSAValue,
        group: str,
        split_dim: int,
        concat_dim: int,
        stream: SSAValue,
        result_type: Attribute,
    ):
        super().__init__(
            operands=[input, stream],
            result_types=[WorkType(), result_type],
            properties={
                "group": SymbolRefAttr(group),
                "split_dim": IntegerAttr(split_dim, i64),
                "concat_dim": IntegerAttr(concat_dim, i64),
            },
        )

    def verify_(self) -> None:
        shape = _shape_of(self, self.input)
        split, concat = self.split_dim.value.data, self.concat_dim.value.data
        _verify_dim(self, "split dim", split, shape)
        _verify_dim(self, "concat dim", concat, shape)
        n = self.group_size()
        expected = list(shape)
        expected[split] = _divide(self, shape[split], n, split)
        if expected[concat] >= 0:
            expected[concat] *= n
        _verify_result_type(self, self.input.type, self.output.type, expected)


@irdl_op_definition
class BroadcastOp(CommunicationOp):
    """Every rank of the group gets the tensor of global rank `src`.

    `%w, %r = exec.broadcast %x group @dp_0 src 0 on %s : t`. On `src` the result
    is the operand; elsewhere the operand is the buffer that receives it.
    """

    name = "exec.broadcast"

    T: ClassVar = VarConstraint("T", base(ValueTensorType))

    input = operand_def(T)
    stream = operand_def(StreamType)
    src = prop_def(IntegerAttr[I64])
    work = result_def(WorkType)
    output = result_def(
        MessageConstraint(T, "exec.broadcast: the result must have the operand's type")
    )

    assembly_format = "$input `group` $group `src` $src `on` $stream attr-dict `:` type($input)"

    def __init__(self, input: SSAValue, group: str, src: int, stream: SSAValue):
        super().__init__(
            operands=[input, stream],
            result_types=[WorkType(), input.type],
            properties={"group": SymbolRefAttr(group), "src": IntegerAttr(src, i64)},
        )

    def verify_(self) -> None:
        self._verify_member("source", self.src.value.data, self.process_group().rank_list())


# ---------------------------------------------------------------- point to point


class PointToPointOp(CommunicationOp, ABC):
    """A transfer between this rank and one peer (a global rank) of a process group."""

    peer = prop_def(IntegerAttr[I64])
    tag = prop_def(IntegerAttr[I64])

    def verify_(self) -> None:
        self._verify_member("peer", self.peer.value.data, self.process_group().rank_list())
        _verify_nonnegative(self, "tag", self.tag)
        program = self.program()
        if program is not None and program.rank.value.data == self.peer.value.data:
            raise VerifyException(
                f"{self.name}: rank {self.peer.value.data} cannot transfer to itself"
            )


@irdl_op_definition
class SendOp(PointToPointOp):
    """Sends a tensor to a peer: `%w = exec.send %x to 1 group @pp_0 tag 3 on %s : t`."""

    name = "exec.send"

    input = operand_def(ValueTensorType)
    stream = operand_def(StreamType)
    work = result_def(WorkType)

    assembly_format = (
        "$input `to` $peer `group` $group `tag` $tag `on` $stream attr-dict `:` type($input)"
    )

    def __init__(self, input: SSAValue, peer: int, group: str, tag: int, stream: SSAValue):
        super().__init__(
            operands=[input, stream],
            result_types=[WorkType()],
            properties={
                "group": SymbolRefAttr(group),
                "peer": IntegerAttr(peer, i64),
                "tag": IntegerAttr(tag, i64),
            },
        )

    def send_list(self) -> list[tuple[SSAValue, int]]:
        """(tensor, peer) of the send, as `exec.batch_p2p` lists its sends."""
        return [(self.input, self.peer.value.data)]

    def recv_list(self) -> list[tuple[SSAValue, int]]:
        """No receive: `exec.batch_p2p`'s interface."""
        return []


@irdl_op_definition
class RecvOp(PointToPointOp):
    """Receives a tensor from a peer: `%w, %r = exec.recv from 0 group @pp_0 tag 3 on %s : t`."""

    name = "exec.recv"

    stream = operand_def(StreamType)
    work = result_def(WorkType)
    output = result_def(ValueTensorType)

    assembly_format = (
        "`from` $peer `group` $group `tag` $tag `on` $stream attr-dict `:` type($output)"
    )

    def __init__(self, peer: int, group: str, tag: int, stream: SSAValue, result_type: Attribute):
        super().__init__(
            operands=[stream],
            result_types=[WorkType(), result_type],
            properties={
                "group": SymbolRefAttr(group),
                "peer": IntegerAttr(peer, i64),
                "tag": IntegerAttr(tag, i64),
            },
        )

    def send_list(self) -> list[tuple[SSAValue, int]]:
        """No send: `exec.batch_p2p`'s interface."""
        return []

    def recv_list(self) -> list[tuple[SSAValue, int]]:
        """(received tensor, peer) of the receive, as `exec.batch_p2p` lists its receives."""
        return [(self.output, self.peer.value.data)]


@irdl_op_definition
class BatchP2POp(CommunicationOp):
    """Sends and receives issued together, completing as one work handle.

    `%w, %g = exec.batch_p2p group @pp_0 on %s [send %y to 0 : t1, recv from 0 : t2]`

    The transfers start at once (torch's `batch_isend_irecv`), so a send
    that waits for its receiver cannot hold back a receive of the same
    batch: a forward send and a backward receive that two pipeline stages
    issue in opposite orders go in one batch each. Sends are listed before
    receives; the sends to one peer keep their order, as do the receives
    from one peer (point-to-point transfers match in issue order).
    """

    name = "exec.batch_p2p"

    sends = var_operand_def(ValueTensorType)
    stream = operand_def(StreamType)
    send_peers = prop_def(DenseArrayBase[I64])
    recv_peers = prop_def(DenseArrayBase[I64])
    work = result_def(WorkType)
    recvs = var_result_def(ValueTensorType)

    def __init__(
        self,
        sends: Sequence[tuple[SSAValue, int]],
        recvs: Sequence[tuple[int, Attribute]],
        group: str,
        stream: SSAValue,
    ):
        super().__init__(
            operands=[[value for value, _ in sends], stream],
            result_types=[WorkType(), [type_ for _, type_ in recvs]],
            properties={
                "group": SymbolRefAttr(group),
                "send_peers": DenseArrayBase.from_list(i64, [peer for _, peer in sends]),
                "recv_peers": DenseArrayBase.from_list(i64, [peer for peer, _ in recvs]),
            },
        )

    def send_list(self) -> list[tuple[SSAValue, int]]:
        """(tensor, peer) of every send, in issue order."""
        return list(zip(self.sends, self.send_peers.get_values(), strict=True))

    def recv_list(self) -> list[tuple[SSAValue, int]]:
        """(received tensor, peer) of every receive, in issue order."""
        return list(zip(self.recvs, self.recv_peers.get_values(), strict=True))

    # Custom syntax: each transfer reads as a unit (`send %y to 0 : t`), which
    # the declarative format cannot zip from three separate lists.
    @classmethod
    def parse(cls, parser: Parser) -> BatchP2POp:
        parser.parse_keyword("group")
        group = parser.parse_attribute()
        parser.parse_keyword("on")
        stream = parser.parse_operand(StreamType())
        sends: list[tuple[SSAValue, int]] = []
        recvs: list[tuple[int, Attribute]] = []

        def parse_transfer() -> None:
            if parser.parse_optional_keyword("send") is not None:
                if recvs:
                    parser.raise_error("exec.batch_p2p: list the sends before the receives")
                pos = parser.pos
                value = parser.parse_unresolved_operand()
                parser.parse_keyword("to")
                peer = parser.parse_integer()
                parser.parse_punctuation(":")
                type_ = parser.parse_type()
                sends.append((parser.resolve_operands([value], [type_], pos)[0], peer))
                return
            parser.parse_keyword("recv")
            parser.parse_keyword("from")
            peer = parser.parse_integer()
            parser.parse_punctuation(":")
            recvs.append((peer, parser.parse_type()))

        parser.parse_comma_separated_list(parser.Delimiter.SQUARE, parse_transfer)
        attributes = parser.parse_optional_attr_dict()
        return cls.build(
            operands=[[value for value, _ in sends], stream],
            result_types=[WorkType(), [type_ for _, type_ in recvs]],
            properties={
                "group": group,
                "send_peers": DenseArrayBase.from_list(i64, [peer for _, peer in sends]),
                "recv_peers": DenseArrayBase.from_list(i64, [peer for peer, _ in recvs]),
            },
            attributes=attributes,
        )

    def print(self, printer: Printer) -> None:
        printer.print_string(" group ")
        printer.print_attribute(self.group)
        printer.print_string(" on ")
        printer.print_ssa_value(self.stream)
        printer.print_string(" [")
        parts = [(v, peer, v.type) for v, peer in self.send_list()]
        parts += [(None, peer, v.type) for v, peer in self.recv_list()]
        for i, (value, peer, type_) in enumerate(parts):
            if i:
                printer.print_string(", ")
            if value is not None:
                printer.print_string("send ")
                printer.print_ssa_value(value)
                printer.print_string(f" to {peer} : ")
            else:
                printer.print_string(f"recv from {peer} : ")
            printer.print_attribute(type_)
        printer.print_string("]")
        printer.print_op_attributes(self.attributes)

    def verify_(self) -> None:
        if len(self.send_peers.get_values()) != len(self.sends):
            raise VerifyException(
                f"{self.name}: {len(self.sends)} tensors to send but "
                f"{len(self.send_peers.get_values())} send peers"
            )
        if len(self.recv_peers.get_values()) != len(self.recvs):
            raise VerifyException(
                f"{self.name}: {len(self.recvs)} tensors received but "
                f"{len(self.recv_peers.get_values())} receive peers"
            )
        if not self.sends and not self.recvs:
            raise VerifyException(f"{self.name}: a batch needs at least one send or receive")
        program = self.program()
        ranks = self.process_group().rank_list()
        for peer in (*self.send_peers.get_values(), *self.recv_peers.get_values()):
            self._verify_member("peer", peer, ranks)
            if program is not None and program.rank.value.data == peer:
                raise VerifyException(f"{self.name}: rank {peer} cannot transfer to itself")


# ---------------------------------------------------------------- completion and memory


@irdl_op_definition
class WaitOp(IRDLOperation):
    """Makes a stream wait for work handles: `exec.wait %w1, %w2 on %s`.

    Work results may be read on `%s` after it (on CUDA the stream waits for the
    work, on CPU the host blocks). A handle is waited once: code generation
    releases it right after the wait.
    """

    name = "exec.wait"

    works = var_operand_def(WorkType)
    stream = operand_def(StreamType)

    assembly_format = "$works `on` $stream attr-dict"

    def __init__(self, works: Sequence[SSAValue], stream: SSAValue):
        super().__init__(operands=[works, stream])

    def verify_(self) -> None:
        if not self.works:
            raise VerifyException(f"{self.name}: needs at least one work handle")


@irdl_op_definition
class RecordStreamOp(IRDLOperation):
    """Marks a tensor as used by another stream than the one that made it:
    `exec.record_stream %x, %comm : !torch.vtensor<[4,16],f32>`.

    On CUDA its memory is not reused until the work queued on `%comm` so far
    completed (`Tensor.record_stream`); on CPU it does nothing.
    """

    name = "exec.record_stream"

    tensor = operand_def(ValueTensorType)
    stream = operand_def(StreamType)

    assembly_format = "$tensor `,` $stream attr-dict `:` type($tensor)"

    def __init__(self, tensor: SSAValue, stream: SSAValue):
        super().__init__(operands=[tensor, stream])


@irdl_op_definition
class FreeOp(IRDLOperation):
    """Releases buffers after their last use: `exec.free %a, %b : t1, t2`."""

    name = "exec.free"

    buffers = var_operand_def(ValueTensorType)

    assembly_format = "$buffers attr-dict `:` type($buffers)"

    def __init__(self, buffers: Sequence[SSAValue]):
        super().__init__(operands=[buffers])

    def verify_(self) -> None:
        if not self.buffers:
            raise VerifyException(f"{self.name}: needs at least one buffer")


# ---------------------------------------------------------------- runtime interface


@irdl_op_definition
class LoadInputOp(IRDLOperation):
    """This rank's slice of one microbatch of a named input.

    `%x = exec.load_input "0" microbatch 2 layout #par.sharding<[["dp"], []]> : !torch.vtensor<[2,128],si64>`

    The optional layout says which mesh axes split each dimension of the global
    input: the runtime cuts the rank's rows by its coordinates along them, then
    takes microbatch `microbatch` of those rows along dim 0. An input holds no
    pending sum, so the layout has no `partial` axes.
    """

    name = "exec.load_input"

    input_name = prop_def(StringAttr, prop_name="name")
    microbatch = prop_def(IntegerAttr[I64])
    layout = opt_prop_def(ShardingAttr)
    output = result_def(ValueTensorType)

    assembly_format = (
        "$name `microbatch` $microbatch (`layout` qualified($layout)^)? attr-dict `:` type($output)"
    )

    def __init__(
        self,
        input_name: str,
        microbatch: int,
        result_type: Attribute,
        layout: ShardingAttr | None = None,
    ):
        super().__init__(
            properties={
                "name": StringAttr(input_name),
                "microbatch": IntegerAttr(microbatch, i64),
                "layout": layout,
            },
            result_types=[result_type],
        )

    def verify_(self) -> None:
        _verify_nonempty(self, "the input name", self.input_name)
        _verify_nonnegative(self, "microbatch", self.microbatch)
        if self.layout is not None and self.layout.partial_axes():
            raise VerifyException(
                f'{self.name} "{self.input_name.data}": layout {self.layout} has partial axes; '
                "an input is never a pending sum"
            )


@irdl_op_definition
class StateOp(IRDLOperation):
    """Reads named state this rank owns: a parameter, a buffer or optimizer state.

    `%w = exec.state "blocks.0.attn.qkv.weight" : !torch.vtensor<[192,64],f32>`, or, for
    state held as shards, `%m = exec.state "w.exp_avg" layout #par.sharding<[["dp"], []]>
    : !torch.vtensor<[96,64],f32>`: the rank holds its part of the global tensor as the
    layout cuts it (manifest `layout`; the runtime cuts `state.pt`'s tensors the same way).
    """

    name = "exec.state"

    state_name = prop_def(StringAttr, prop_name="name")
    layout = opt_prop_def(ShardingAttr)
    output = result_def(ValueTensorType)

    assembly_format = "$name (`layout` qualified($layout)^)? attr-dict `:` type($output)"

    def __init__(self, state_name: str, result_type: Attribute, layout: ShardingAttr | None = None):
        super().__init__(properties={"name": StringAttr(state_name), "layout": layout}, result_types=[result_type])

    def verify_(self) -> None:
        _verify_nonempty(self, "the state name", self.state_name)


@irdl_op_definition
class SetStateOp(IRDLOperation):
    """Replaces named state this rank owns (an updated parameter or optimizer state).

    `exec.set_state "blocks.0.attn.qkv.weight", %w : !torch.vtensor<[192,64],f32>`
    """

    name = "exec.set_state"

    state_name = prop_def(StringAttr, prop_name="name")
    value = operand_def(ValueTensorType)

    assembly_format = "$name `,` $value attr-dict `:` type($value)"

    def __init__(self, state_name: str, value: SSAValue):
        super().__init__(properties={"name": StringAttr(state_name)}, operands=[value])

    def verify_(self) -> None:
        _verify_nonempty(self, "the state name", self.state_name)


@irdl_op_definition
class CarryOp(IRDLOperation):
    """Hands a tensor to this rank's next step: `exec.carry "h0 mb-1", %h : t` (the runtime
    keeps it by name until the next step's `exec.carried` takes it; it is not freed)."""

    name = "exec.carry"

    carry_name = prop_def(StringAttr, prop_name="name")
    value = operand_def(ValueTensorType)

    assembly_format = "$name `,` $value attr-dict `:` type($value)"

    def __init__(self, carry_name: str, value: SSAValue):
        super().__init__(properties={"name": StringAttr(carry_name)}, operands=[value])

    def verify_(self) -> None:
        _verify_nonempty(self, "the carried value's name", self.carry_name)


@irdl_op_definition
class CarriedOp(IRDLOperation):
    """Takes the tensor the previous step handed on: `%h = exec.carried "h0 mb-1" : t`
    (`stash`: a stashed weight version, counted as such in memory)."""

    name = "exec.carried"

    carry_name = prop_def(StringAttr, prop_name="name")
    stash = opt_prop_def(UnitAttr)
    output = result_def(ValueTensorType)

    assembly_format = "$name (`stash` $stash^)? attr-dict `:` type($output)"

    def __init__(self, carry_name: str, result_type: Attribute, stash: bool = False):
        super().__init__(properties={"name": StringAttr(carry_name), "stash": UnitAttr() if stash else None},
                         result_types=[result_type])

    def verify_(self) -> None:
        _verify_nonempty(self, "the carried value's name", self.carry_name)


@irdl_op_definition
class OutputOp(IRDLOperation):
    """Reports a value to the host under a name: `exec.output "loss", %l : t`."""

    name = "exec.output"

    output_name = prop_def(StringAttr, prop_name="name")
    value = operand_def(ValueTensorType)

    assembly_format = "$name `,` $value attr-dict `:` type($value)"

    def __init__(self, output_name: str, value: SSAValue):
        super().__init__(properties={"name": StringAttr(output_name)}, operands=[value])

    def verify_(self) -> None:
        _verify_nonempty(self, "the output name", self.output_name)


def stashed_operands(launch: LaunchOp, keys: Sequence[str]) -> list[SSAValue]:
    """The weights an update `launch` replaces that a later op of its program still reads (a
    backward of a microbatch whose forward read them, or a `exec.carry` handing them to the
    next step): an asynchronous pipeline's weight stash. `keys` are the callee's argument
    keys (`param:w`). Empty for any other launch, and for a synchronous schedule's update."""
    if launch.pass_kind.data != "update":
        return []
    later, op = set(), launch.next_op  # one walk to the end of the program, whatever the parameters
    while op is not None:
        later.add(op)
        op = op.next_op
    return [v for v, key in zip(launch.args, keys, strict=True) if key.startswith("param:")
            and any(u.operation in later and not isinstance(u.operation, FreeOp | RecordStreamOp) for u in v.uses)]


# ---------------------------------------------------------------- ordering rules of a program


class _ValueNames:
    """Names values as the printer does inside one program: `%hint`, or `%<n>` in order.

    The names are worked out on the first lookup: only a failing check needs them.
    """

    def __init__(self, program: ProgramOp):
        self.program = program
        self.names: dict[SSAValue, str] | None = None

    def _name_all(self) -> dict[SSAValue, str]:
        names: dict[SSAValue, str] = {}
        hints: dict[str, int] = {}
        counter = 0
        for op in self.program.body.block.ops:
            for value in op.results:
                hint = value.name_hint
                if hint is None:
                    names[value] = f"%{counter}"
                    counter += 1
                elif hint in hints:
                    hints[hint] += 1
                    names[value] = f"%{hint}_{hints[hint]}"
                else:
                    hints[hint] = 0
                    names[value] = f"%{hint}"
        return names

    def __getitem__(self, value: SSAValue) -> str:
        if self.names is None:
            self.names = self._name_all()
        return self.names.get(value, "%?")


def _stream_reads(op: Operation) -> tuple[SSAValue | None, Sequence[SSAValue]]:
    """The stream an op runs on and the tensors it reads there (none for host ops)."""
    if isinstance(op, LaunchOp):
        return op.stream, op.args
    if isinstance(op, CommunicationOp):
        return op.stream, [v for v in op.operands if isinstance(v.type, ValueTensorType)]
    return None, ()


def _verify_program_order(program: ProgramOp) -> None:
    """The ordering rules every rank program keeps, so it runs under NCCL as under gloo.

    - An async op's (send, recv, batch_p2p, collective) tensors are not freed
      before the `exec.wait` of its work, and its results are not read before it.
    - A work handle is waited once; nothing is read after its `exec.free`.
    - A tensor made on stream P and read on stream S != P is ordered after its
      producer on S (event_record on P after it and event_wait on S, or a
      wait of its work on S) and was given to `exec.record_stream` on S.

    One pass over the program, each step proportional to the op's own operands (every
    program is checked after every pass): a tensor is never un-ordered after a stream, so
    the tensors ordered after a stream form a list that only grows, an event stands for a
    prefix of that list, and an `exec.event_wait` takes the part of that prefix its stream
    has not taken yet.
    """
    names = _ValueNames(program)
    where = f"{program.name} @{program.sym_name.data}"
    ops = list(program.body.block.ops)
    index = {op: i for i, op in enumerate(ops)}
    home: dict[SSAValue, SSAValue] = {}  # tensor -> the stream that made it
    ready: dict[SSAValue, set[SSAValue]] = {}  # tensor -> streams ordered after its producer
    ready_on: dict[SSAValue, list[SSAValue]] = {}  # stream -> its tensors of `ready`, in order
    taken: dict[tuple[SSAValue, SSAValue], int] = {}  # (waiting, recording stream) -> prefix taken
    in_flight: dict[SSAValue, dict[CommunicationOp, str]] = {}  # tensor -> async ops on it, how
    touches: dict[CommunicationOp, list[SSAValue]] = {}  # async op -> its tensors in `in_flight`
    unwaited: dict[SSAValue, CommunicationOp] = {}  # result -> its async op, until waited
    waited: dict[SSAValue, int] = {}
    events: dict[SSAValue, tuple[SSAValue, int]] = {}  # event -> stream, length of its prefix
    recorded: set[tuple[SSAValue, SSAValue]] = set()
    freed: dict[SSAValue, int] = {}

    def stream_label(stream: SSAValue) -> str:
        owner = stream.owner
        return f'"{owner.stream_name.data}"' if isinstance(owner, StreamOp) else names[stream]

    def fail(message: str) -> None:
        raise VerifyException(f"{where}: {message}")

    def order_after(value: SSAValue, stream: SSAValue) -> None:
        streams = ready[value]
        if stream not in streams:
            streams.add(stream)
            ready_on.setdefault(stream, []).append(value)

    def made_new(value: SSAValue, stream: SSAValue) -> None:
        home[value] = stream
        ready[value] = set()

    def in_flight_on(value: SSAValue, async_op: CommunicationOp, how: str) -> None:
        on_value = in_flight.setdefault(value, {})
        if async_op not in on_value:
            on_value[async_op] = how
            touches.setdefault(async_op, []).append(value)

    for i, op in enumerate(ops):
        if freed and not isinstance(op, FreeOp):
            for value in op.operands:
                if value in freed:
                    fail(f"{op.name} at op #{i} reads {names[value]} after its exec.free at op #{freed[value]}")
        stream, reads = _stream_reads(op)
        host_reads = [op.value] if isinstance(op, SetStateOp | OutputOp) else []
        for value in [*reads, *host_reads]:
            if value in unwaited:
                producer = unwaited[value]
                fail(
                    f"{op.name} at op #{i} reads {names[value]} before the exec.wait of the "
                    f"{producer.name} at op #{index[producer]} that writes it"
                )
        for value in reads:
            if value not in home or home[value] == stream:
                continue
            if stream in ready[value] and (value, stream) in recorded:
                continue
            producer = value.owner
            made = f"made on stream {stream_label(home[value])} by the {producer.name} at op #{index[producer]}"
            if stream not in ready[value]:
                fail(
                    f"{op.name} at op #{i} reads {names[value]} on stream {stream_label(stream)}, but "
                    f"{names[value]} is {made} and nothing orders {stream_label(stream)} after it; add "
                    f"exec.event_record on {stream_label(home[value])} after it and exec.event_wait "
                    f"on {stream_label(stream)} before op #{i}"
                )
            fail(
                f"{op.name} at op #{i} reads {names[value]} on stream {stream_label(stream)}, but "
                f"{names[value]} is {made}; add exec.record_stream {names[value]}, "
                f"{names[stream]} before op #{i}"
            )
        if isinstance(op, LaunchOp):
            for value in op.outs:
                made_new(value, op.stream)
                order_after(value, op.stream)
        elif isinstance(op, CommunicationOp):
            for value in reads:
                in_flight_on(value, op, "reads")
            for value in op.results[1:]:
                made_new(value, op.stream)
                unwaited[value] = op
                in_flight_on(value, op, "writes")
        elif isinstance(op, WaitOp):
            for work in op.works:
                if work in waited:
                    fail(
                        f"exec.wait at op #{i} waits for {names[work]} again; it was waited at "
                        f"op #{waited[work]} (a handle is waited once)"
                    )
                waited[work] = i
                for value in work.owner.results[1:]:
                    unwaited.pop(value, None)
                    order_after(value, op.stream)
            for work in op.works:
                for value in touches.pop(work.owner, ()):
                    on_value = in_flight[value]
                    del on_value[work.owner]
                    if not on_value:
                        del in_flight[value]
        elif isinstance(op, EventRecordOp):
            events[op.event] = (op.stream, len(ready_on.get(op.stream, ())))
        elif isinstance(op, EventWaitOp):
            if op.event not in events:
                continue
            recording, length = events[op.event]
            start = taken.get((op.stream, recording), 0)
            if start < length:
                for value in ready_on[recording][start:length]:
                    order_after(value, op.stream)
                taken[(op.stream, recording)] = length
        elif isinstance(op, RecordStreamOp):
            recorded.add((op.tensor, op.stream))
        elif isinstance(op, FreeOp):
            for value in op.buffers:
                if value in freed:
                    fail(f"exec.free at op #{i} frees {names[value]} again; it was freed at op #{freed[value]}")
                if value in in_flight:
                    async_op, how = next(iter(in_flight[value].items()))
                    fail(
                        f"exec.free of {names[value]} at op #{i} comes before the exec.wait of the "
                        f"{async_op.name} at op #{index[async_op]} that {how} it"
                    )
                freed[value] = i


Exec = Dialect(
    "exec",
    [
        ProgramOp,
        ProcessGroupOp,
        StreamOp,
        EventRecordOp,
        EventWaitOp,
        LaunchOp,
        AllReduceOp,
        AllGatherOp,
        ReduceScatterOp,
        AllToAllOp,
        BroadcastOp,
        SendOp,
        RecvOp,
        BatchP2POp,
        WaitOp,
        RecordStreamOp,
        FreeOp,
        LoadInputOp,
        StateOp,
        SetStateOp,
        CarryOp,
        CarriedOp,
        OutputOp,
    ],
    [StreamType, EventType, WorkType, ReductionAttr],
)
