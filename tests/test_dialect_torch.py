"""The `torch` dialect: every type and op round-trips from the generic text torch-mlir
writes to the text piperc prints, every verifier rejects what it should, and an op name
torch does not know is a parse error that points at its line and column."""

import io
import re
import textwrap

import pytest
from xdsl.dialects.builtin import ModuleOp, NoneAttr, bf16, f32
from xdsl.ir import Attribute
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.traits import Pure
from xdsl.utils.exceptions import ParseError, VerifyException

from piperc.dialects.torch import (
    BoolType,
    DeviceType,
    FloatType,
    IntType,
    ListType,
    NoneType,
    NumberType,
    OperatorOp,
    OptionalType,
    StrType,
    ValueTensorType,
    aten_op_class,
)
from piperc.ir import make_context, parse_module, print_ir
from piperc.passmanager import run_pipeline

BARE_VTENSOR = ValueTensorType.new((NoneAttr(), NoneAttr()))


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def parse(text: str) -> ModuleOp:
    module = parse_module(text)
    module.verify()
    return module


def generic(module: ModuleOp) -> str:
    out = io.StringIO()
    Printer(stream=out, print_generic_format=True).print_op(module)
    return out.getvalue() + "\n"


def check_roundtrip(torch_mlir: str, custom: str) -> None:
    """torch-mlir's generic text parses, verifies and prints as `custom`; printing then
    parsing changes nothing, in custom form and in generic form."""
    torch_mlir, custom = ir(torch_mlir), ir(custom)
    module = parse(torch_mlir)
    assert print_ir(module) == custom
    assert print_ir(parse(custom)) == custom
    generic_text = generic(module)
    assert generic(parse(generic_text)) == generic_text
    assert print_ir(parse(generic_text)) == custom


def parse_type(text: str) -> Attribute:
    return Parser(make_context(), text).parse_attribute()


def show_type(attr: Attribute) -> str:
    out = io.StringIO()
    Printer(stream=out).print_attribute(attr)
    return out.getvalue()


def verify_error(text: str, match: str) -> None:
    module = parse_module(ir(text))
    with pytest.raises(VerifyException, match=match):
        module.verify()


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    "text, expected",
    [
        ("!torch.vtensor<[4,16],f32>", ValueTensorType([4, 16], f32)),
        ("!torch.vtensor<[?,4],f32>", ValueTensorType([-1, 4], f32)),
        ("!torch.vtensor<[],bf16>", ValueTensorType([], bf16)),
        ("!torch.vtensor", BARE_VTENSOR),
        ("!torch.int", IntType()),
        ("!torch.float", FloatType()),
        ("!torch.bool", BoolType()),
        ("!torch.none", NoneType()),
        ("!torch.str", StrType()),
        ("!torch.Device", DeviceType()),
        ("!torch.number", NumberType()),
        ("!torch.list<int>", ListType(IntType())),
        ("!torch.list<vtensor>", ListType(BARE_VTENSOR)),
        ("!torch.list<vtensor<[2,?],f32>>", ListType(ValueTensorType([2, -1], f32))),
        ("!torch.list<optional<vtensor>>", ListType(OptionalType(BARE_VTENSOR))),
        ("!torch.list<list<int>>", ListType(ListType(IntType()))),
        ("!torch.optional<int>", OptionalType(IntType())),
        ("!torch.optional<vtensor<[8],f32>>", OptionalType(ValueTensorType([8], f32))),
    ],
)
def test_type_parses_to_its_model_and_prints_back(text: str, expected: Attribute):
    attr = parse_type(text)
    assert attr == expected
    assert show_type(attr) == text


def test_vtensor_shape_queries():
    assert parse_type("!torch.vtensor<[?,4],f32>").get_shape() == (-1, 4)
    assert parse_type("!torch.vtensor<[4,16],f32>").numel() == 64
    assert not BARE_VTENSOR.has_shape
    with pytest.raises(ValueError, match="dynamic dimension"):
        parse_type("!torch.vtensor<[?,4],f32>").numel()


def test_vtensor_rejects_a_negative_dimension():
    with pytest.raises(VerifyException, match=r"negative dimension in \(-2, 4\)"):
        ValueTensorType([-2, 4], f32)


def test_every_type_as_a_function_signature():
    check_roundtrip(
        """
        "builtin.module"() ({
          "func.func"() <{function_type = (!torch.vtensor<[?,4],f32>, !torch.int, !torch.float, !torch.bool, !torch.none, !torch.str, !torch.Device, !torch.number, !torch.list<vtensor>, !torch.optional<int>) -> !torch.vtensor<[?,4],f32>, sym_name = "main"}> ({
          ^bb0(%arg0: !torch.vtensor<[?,4],f32>, %arg1: !torch.int, %arg2: !torch.float, %arg3: !torch.bool, %arg4: !torch.none, %arg5: !torch.str, %arg6: !torch.Device, %arg7: !torch.number, %arg8: !torch.list<vtensor>, %arg9: !torch.optional<int>):
            "func.return"(%arg0) : (!torch.vtensor<[?,4],f32>) -> ()
          }) : () -> ()
        }) : () -> ()
        """,
        """
        builtin.module {
          func.func @main(%arg0: !torch.vtensor<[?,4],f32>, %arg1: !torch.int, %arg2: !torch.float, %arg3: !torch.bool, %arg4: !torch.none, %arg5: !torch.str, %arg6: !torch.Device, %arg7: !torch.number, %arg8: !torch.list<vtensor>, %arg9: !torch.optional<int>) -> !torch.vtensor<[?,4],f32> {
            func.return %arg0 : !torch.vtensor<[?,4],f32>
          }
        }
        """,
    )


def test_unknown_element_type_is_a_parse_error_at_its_position():
    with pytest.raises(ParseError, match=r"unknown torch type 'tensor'") as e:
        parse_module(
            ir(
                """
                func.func @main(%arg0: !torch.list<tensor>) {
                  func.return
                }
                """
            ),
            name="types.mlir",
        )
    assert "types.mlir:1:36" in str(e.value)


# ---------------------------------------------------------------- constants and lists


def test_constants():
    check_roundtrip(
        """
        "builtin.module"() ({
          "func.func"() <{function_type = () -> (), sym_name = "main"}> ({
            %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
            %1 = "torch.constant.int"() <{value = -1 : i64}> : () -> !torch.int
            %2 = "torch.constant.float"() <{value = 1.000000e-05 : f64}> : () -> !torch.float
            %3 = "torch.constant.bool"() <{value = true}> : () -> !torch.bool
            %4 = "torch.constant.bool"() <{value = false}> : () -> !torch.bool
            %5 = "torch.constant.none"() : () -> !torch.none
            %6 = "torch.constant.str"() <{value = "tanh"}> : () -> !torch.str
            %7 = "torch.constant.device"() <{value = "cpu"}> : () -> !torch.Device
            "func.return"() : () -> ()
          }) : () -> ()
        }) : () -> ()
        """,
        """
        builtin.module {
          func.func @main() {
            %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
            %1 = "torch.constant.int"() <{value = -1 : i64}> : () -> !torch.int
            %2 = "torch.constant.float"() <{value = 1.000000e-05 : f64}> : () -> !torch.float
            %3 = "torch.constant.bool"() <{value = true}> : () -> !torch.bool
            %4 = "torch.constant.bool"() <{value = false}> : () -> !torch.bool
            %5 = "torch.constant.none"() : () -> !torch.none
            %6 = "torch.constant.str"() <{value = "tanh"}> : () -> !torch.str
            %7 = "torch.constant.device"() <{value = "cpu"}> : () -> !torch.Device
            func.return
          }
        }
        """,
    )


def test_list_construct_of_ints_and_cat_of_a_tensor_list():
    check_roundtrip(
        """
        "builtin.module"() ({
          "func.func"() <{function_type = (!torch.vtensor<[2,3],f32>, !torch.vtensor<[2,5],f32>) -> !torch.vtensor<[8,2],f32>, sym_name = "main"}> ({
          ^bb0(%arg0: !torch.vtensor<[2,3],f32>, %arg1: !torch.vtensor<[2,5],f32>):
            %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
            %1 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
            %2 = "torch.prim.ListConstruct"(%arg0, %arg1) : (!torch.vtensor<[2,3],f32>, !torch.vtensor<[2,5],f32>) -> !torch.list<vtensor>
            %3 = "torch.aten.cat"(%2, %0) : (!torch.list<vtensor>, !torch.int) -> !torch.vtensor<[2,8],f32>
            %4 = "torch.prim.ListConstruct"(%0, %1) : (!torch.int, !torch.int) -> !torch.list<int>
            %5 = "torch.aten.permute"(%3, %4) : (!torch.vtensor<[2,8],f32>, !torch.list<int>) -> !torch.vtensor<[8,2],f32>
            "func.return"(%5) : (!torch.vtensor<[8,2],f32>) -> ()
          }) : () -> ()
        }) : () -> ()
        """,
        """
        builtin.module {
          func.func @main(%arg0: !torch.vtensor<[2,3],f32>, %arg1: !torch.vtensor<[2,5],f32>) -> !torch.vtensor<[8,2],f32> {
            %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
            %1 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
            %2 = "torch.prim.ListConstruct"(%arg0, %arg1) : (!torch.vtensor<[2,3],f32>, !torch.vtensor<[2,5],f32>) -> !torch.list<vtensor>
            %3 = "torch.aten.cat"(%2, %0) : (!torch.list<vtensor>, !torch.int) -> !torch.vtensor<[2,8],f32>
            %4 = "torch.prim.ListConstruct"(%0, %1) : (!torch.int, !torch.int) -> !torch.list<int>
            %5 = "torch.aten.permute"(%3, %4) : (!torch.vtensor<[2,8],f32>, !torch.list<int>) -> !torch.vtensor<[8,2],f32>
            func.return %5 : !torch.vtensor<[8,2],f32>
          }
        }
        """,
    )


def test_list_of_optional_tensors_holds_none():
    check_roundtrip(
        """
        "builtin.module"() ({
          "func.func"() <{function_type = (!torch.vtensor<[4,8],f32>, !torch.vtensor<[2],si64>) -> !torch.vtensor<[4,2],f32>, sym_name = "main"}> ({
          ^bb0(%arg0: !torch.vtensor<[4,8],f32>, %arg1: !torch.vtensor<[2],si64>):
            %0 = "torch.constant.none"() : () -> !torch.none
            %1 = "torch.prim.ListConstruct"(%0, %arg1) : (!torch.none, !torch.vtensor<[2],si64>) -> !torch.list<optional<vtensor>>
            %2 = "torch.aten.index.Tensor"(%arg0, %1) : (!torch.vtensor<[4,8],f32>, !torch.list<optional<vtensor>>) -> !torch.vtensor<[4,2],f32>
            "func.return"(%2) : (!torch.vtensor<[4,2],f32>) -> ()
          }) : () -> ()
        }) : () -> ()
        """,
        """
        builtin.module {
          func.func @main(%arg0: !torch.vtensor<[4,8],f32>, %arg1: !torch.vtensor<[2],si64>) -> !torch.vtensor<[4,2],f32> {
            %0 = "torch.constant.none"() : () -> !torch.none
            %1 = "torch.prim.ListConstruct"(%0, %arg1) : (!torch.none, !torch.vtensor<[2],si64>) -> !torch.list<optional<vtensor>>
            %2 = "torch.aten.index.Tensor"(%arg0, %1) : (!torch.vtensor<[4,8],f32>, !torch.list<optional<vtensor>>) -> !torch.vtensor<[4,2],f32>
            func.return %2 : !torch.vtensor<[4,2],f32>
          }
        }
        """,
    )


def test_list_unpack_after_split():
    check_roundtrip(
        """
        "builtin.module"() ({
          "func.func"() <{function_type = (!torch.vtensor<[4,8],f32>) -> (!torch.vtensor<[2,8],f32>, !torch.vtensor<[2,8],f32>), sym_name = "main"}> ({
          ^bb0(%arg0: !torch.vtensor<[4,8],f32>):
            %0 = "torch.constant.int"() <{value = 2 : i64}> : () -> !torch.int
            %1 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
            %2 = "torch.aten.split.Tensor"(%arg0, %0, %1) : (!torch.vtensor<[4,8],f32>, !torch.int, !torch.int) -> !torch.list<vtensor>
            %3:2 = "torch.prim.ListUnpack"(%2) : (!torch.list<vtensor>) -> (!torch.vtensor<[2,8],f32>, !torch.vtensor<[2,8],f32>)
            "func.return"(%3#0, %3#1) : (!torch.vtensor<[2,8],f32>, !torch.vtensor<[2,8],f32>) -> ()
          }) : () -> ()
        }) : () -> ()
        """,
        """
        builtin.module {
          func.func @main(%arg0: !torch.vtensor<[4,8],f32>) -> (!torch.vtensor<[2,8],f32>, !torch.vtensor<[2,8],f32>) {
            %0 = "torch.constant.int"() <{value = 2 : i64}> : () -> !torch.int
            %1 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
            %2 = "torch.aten.split.Tensor"(%arg0, %0, %1) : (!torch.vtensor<[4,8],f32>, !torch.int, !torch.int) -> !torch.list<vtensor>
            %3, %4 = "torch.prim.ListUnpack"(%2) : (!torch.list<vtensor>) -> (!torch.vtensor<[2,8],f32>, !torch.vtensor<[2,8],f32>)
            func.return %3, %4 : !torch.vtensor<[2,8],f32>, !torch.vtensor<[2,8],f32>
          }
        }
        """,
    )


# ---------------------------------------------------------------- ATen operators


def test_aten_op_with_three_results():
    check_roundtrip(
        """
        "builtin.module"() ({
          "func.func"() <{function_type = (!torch.vtensor<[2,?,8],f32>, !torch.vtensor<[8],f32>, !torch.vtensor<[8],f32>) -> (!torch.vtensor<[2,?,8],f32>, !torch.vtensor<[2,?,1],f32>), sym_name = "main"}> ({
          ^bb0(%arg0: !torch.vtensor<[2,?,8],f32>, %arg1: !torch.vtensor<[8],f32>, %arg2: !torch.vtensor<[8],f32>):
            %0 = "torch.constant.int"() <{value = 8 : i64}> : () -> !torch.int
            %1 = "torch.prim.ListConstruct"(%0) : (!torch.int) -> !torch.list<int>
            %2 = "torch.constant.float"() <{value = 1.000000e-05 : f64}> : () -> !torch.float
            %3:3 = "torch.aten.native_layer_norm"(%arg0, %1, %arg1, %arg2, %2) : (!torch.vtensor<[2,?,8],f32>, !torch.list<int>, !torch.vtensor<[8],f32>, !torch.vtensor<[8],f32>, !torch.float) -> (!torch.vtensor<[2,?,8],f32>, !torch.vtensor<[2,?,1],f32>, !torch.vtensor<[2,?,1],f32>)
            "func.return"(%3#0, %3#2) : (!torch.vtensor<[2,?,8],f32>, !torch.vtensor<[2,?,1],f32>) -> ()
          }) : () -> ()
        }) : () -> ()
        """,
        """
        builtin.module {
          func.func @main(%arg0: !torch.vtensor<[2,?,8],f32>, %arg1: !torch.vtensor<[8],f32>, %arg2: !torch.vtensor<[8],f32>) -> (!torch.vtensor<[2,?,8],f32>, !torch.vtensor<[2,?,1],f32>) {
            %0 = "torch.constant.int"() <{value = 8 : i64}> : () -> !torch.int
            %1 = "torch.prim.ListConstruct"(%0) : (!torch.int) -> !torch.list<int>
            %2 = "torch.constant.float"() <{value = 1.000000e-05 : f64}> : () -> !torch.float
            %3, %4, %5 = "torch.aten.native_layer_norm"(%arg0, %1, %arg1, %arg2, %2) : (!torch.vtensor<[2,?,8],f32>, !torch.list<int>, !torch.vtensor<[8],f32>, !torch.vtensor<[8],f32>, !torch.float) -> (!torch.vtensor<[2,?,8],f32>, !torch.vtensor<[2,?,1],f32>, !torch.vtensor<[2,?,1],f32>)
            func.return %3, %5 : !torch.vtensor<[2,?,8],f32>, !torch.vtensor<[2,?,1],f32>
          }
        }
        """,
    )


def test_aten_op_with_an_overload_name():
    check_roundtrip(
        """
        "builtin.module"() ({
          "func.func"() <{function_type = (!torch.vtensor<[?,4],f32>) -> !torch.vtensor<[4],f32>, sym_name = "main"}> ({
          ^bb0(%arg0: !torch.vtensor<[?,4],f32>):
            %0 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
            %1 = "torch.prim.ListConstruct"(%0) : (!torch.int) -> !torch.list<int>
            %2 = "torch.constant.bool"() <{value = false}> : () -> !torch.bool
            %3 = "torch.constant.none"() : () -> !torch.none
            %4 = "torch.aten.sum.dim_IntList"(%arg0, %1, %2, %3) : (!torch.vtensor<[?,4],f32>, !torch.list<int>, !torch.bool, !torch.none) -> !torch.vtensor<[4],f32>
            "func.return"(%4) : (!torch.vtensor<[4],f32>) -> ()
          }) : () -> ()
        }) : () -> ()
        """,
        """
        builtin.module {
          func.func @main(%arg0: !torch.vtensor<[?,4],f32>) -> !torch.vtensor<[4],f32> {
            %0 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
            %1 = "torch.prim.ListConstruct"(%0) : (!torch.int) -> !torch.list<int>
            %2 = "torch.constant.bool"() <{value = false}> : () -> !torch.bool
            %3 = "torch.constant.none"() : () -> !torch.none
            %4 = "torch.aten.sum.dim_IntList"(%arg0, %1, %2, %3) : (!torch.vtensor<[?,4],f32>, !torch.list<int>, !torch.bool, !torch.none) -> !torch.vtensor<[4],f32>
            func.return %4 : !torch.vtensor<[4],f32>
          }
        }
        """,
    )


def test_torch_operator_and_its_aten_equivalent():
    torch_mlir = """
        "builtin.module"() ({
          "func.func"() <{function_type = (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>, sym_name = "main"}> ({
          ^bb0(%arg0: !torch.vtensor<[4],f32>, %arg1: !torch.vtensor<[4],f32>):
            %0 = "torch.operator"(%arg0, %arg1) <{name = "torch.aten.silu_backward"}> : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
            "func.return"(%0) : (!torch.vtensor<[4],f32>) -> ()
          }) : () -> ()
        }) : () -> ()
        """
    check_roundtrip(
        torch_mlir,
        """
        builtin.module {
          func.func @main(%arg0: !torch.vtensor<[4],f32>, %arg1: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
            %0 = "torch.operator"(%arg0, %arg1) <{name = "torch.aten.silu_backward"}> : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
            func.return %0 : !torch.vtensor<[4],f32>
          }
        }
        """,
    )
    operator = next(op for op in parse(ir(torch_mlir)).walk() if isinstance(op, OperatorOp))
    aten = operator.as_aten_op()
    assert aten.name == "torch.aten.silu_backward"
    assert list(aten.operands) == list(operator.operands)
    assert [r.type for r in aten.results] == [ValueTensorType([4], f32)]
    aten.verify()


def run(pipeline: str, text: str) -> str:
    """Parses `text`, runs `pipeline` on it, prints the result."""
    ctx = make_context()
    module = parse_module(ir(text), ctx)
    run_pipeline(module, ctx, pipeline)
    return print_ir(module)


def test_dce_removes_dead_pure_aten_ops_and_keeps_mutating_and_random_ones():
    assert run(
        "dce",
        """
        func.func @main(%x: !torch.vtensor<[4],f32>, %y: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
          %dead = "torch.aten.mul.Tensor"(%x, %y) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
          %dead_view = "torch.aten.t"(%x) : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
          %false = "torch.constant.bool"() <{value = false}> : () -> !torch.bool
          %copied = "torch.aten.copy_"(%x, %y, %false) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>, !torch.bool) -> !torch.vtensor<[4],f32>
          %none = "torch.constant.none"() : () -> !torch.none
          %coin = "torch.aten.bernoulli"(%x, %none) : (!torch.vtensor<[4],f32>, !torch.none) -> !torch.vtensor<[4],f32>
          %p = "torch.constant.float"() <{value = 5.000000e-01 : f64}> : () -> !torch.float
          %true = "torch.constant.bool"() <{value = true}> : () -> !torch.bool
          %kept, %mask = "torch.aten.native_dropout"(%x, %p, %true) : (!torch.vtensor<[4],f32>, !torch.float, !torch.bool) -> (!torch.vtensor<[4],f32>, !torch.vtensor<[4],i1>)
          %sum = "torch.aten.add.Tensor"(%x, %y, %p) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>, !torch.float) -> !torch.vtensor<[4],f32>
          func.return %sum : !torch.vtensor<[4],f32>
        }
        """,
    ) == ir(
        """
        builtin.module {
          func.func @main(%x: !torch.vtensor<[4],f32>, %y: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
            %false = "torch.constant.bool"() <{value = false}> : () -> !torch.bool
            %copied = "torch.aten.copy_"(%x, %y, %false) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>, !torch.bool) -> !torch.vtensor<[4],f32>
            %none = "torch.constant.none"() : () -> !torch.none
            %coin = "torch.aten.bernoulli"(%x, %none) : (!torch.vtensor<[4],f32>, !torch.none) -> !torch.vtensor<[4],f32>
            %p = "torch.constant.float"() <{value = 5.000000e-01 : f64}> : () -> !torch.float
            %true = "torch.constant.bool"() <{value = true}> : () -> !torch.bool
            %kept, %mask = "torch.aten.native_dropout"(%x, %p, %true) : (!torch.vtensor<[4],f32>, !torch.float, !torch.bool) -> (!torch.vtensor<[4],f32>, !torch.vtensor<[4],i1>)
            %sum = "torch.aten.add.Tensor"(%x, %y, %p) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>, !torch.float) -> !torch.vtensor<[4],f32>
            func.return %sum : !torch.vtensor<[4],f32>
          }
        }
        """
    )


@pytest.mark.parametrize(
    ("name", "pure"),
    [
        ("torch.aten.mul.Tensor", True),
        ("torch.aten.view", True),  # an alias (`Tensor(a)`) but no write: a value in value semantics
        ("torch.aten.add_.Tensor", False),  # in place: `Tensor(a!) self`
        ("torch.aten.add.out", False),  # writes `out`
        ("torch.aten.copy_", False),
        ("torch.aten.dropout", False),
        ("torch.aten.native_dropout", False),
        ("torch.aten.rand", False),
        ("torch.aten.bernoulli", False),
        ("torch.aten._assert_async", False),  # returns nothing: it exists for its effect
    ],
)
def test_aten_ops_are_pure_unless_they_mutate_draw_random_numbers_or_return_nothing(name, pure):
    assert aten_op_class(name).has_trait(Pure) is pure


# ---------------------------------------------------------------- verifiers


def test_aten_op_with_the_wrong_operand_count():
    verify_error(
        """
        func.func @main(%arg0: !torch.vtensor<[4],f32>) {
          %0 = "torch.aten.relu"(%arg0, %arg0) : (!torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
          func.return
        }
        """,
        re.escape("torch.aten.relu takes 1 operands (aten::relu(Tensor self) -> Tensor), got 2"),
    )


def test_aten_op_with_a_property():
    verify_error(
        """
        func.func @main(%arg0: !torch.vtensor<[4],f32>) {
          %0 = "torch.aten.relu"(%arg0) <{alpha = 1 : i64}> : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
          func.return
        }
        """,
        "torch.aten.relu has no properties, regions or successors",
    )


def test_aten_op_with_the_wrong_result_count():
    verify_error(
        """
        func.func @main(%arg0: !torch.vtensor<[2,8],f32>, %arg1: !torch.list<int>, %arg2: !torch.vtensor<[8],f32>, %arg3: !torch.float) {
          %0 = "torch.aten.native_layer_norm"(%arg0, %arg1, %arg2, %arg2, %arg3) : (!torch.vtensor<[2,8],f32>, !torch.list<int>, !torch.vtensor<[8],f32>, !torch.vtensor<[8],f32>, !torch.float) -> !torch.vtensor<[2,8],f32>
          func.return
        }
        """,
        r"torch\.aten\.native_layer_norm returns 3 results \(aten::native_layer_norm\(.*\) -> "
        r"\(Tensor, Tensor, Tensor\)\), got 1",
    )


def test_aten_op_on_a_value_without_a_torch_type():
    verify_error(
        """
        func.func @main(%arg0: tensor<4xf32>) {
          %0 = "torch.aten.relu"(%arg0) : (tensor<4xf32>) -> !torch.vtensor<[4],f32>
          func.return
        }
        """,
        re.escape("torch.aten.relu: tensor<4xf32> is not a torch type"),
    )


def test_list_construct_whose_element_type_mismatches():
    verify_error(
        """
        func.func @main(%arg0: !torch.int, %arg1: !torch.float) {
          %0 = "torch.prim.ListConstruct"(%arg0, %arg1) : (!torch.int, !torch.float) -> !torch.list<int>
          func.return
        }
        """,
        re.escape("torch.prim.ListConstruct: element 1 has type !torch.float, the list holds !torch.int"),
    )


def test_list_unpack_whose_result_type_mismatches():
    verify_error(
        """
        func.func @main(%arg0: !torch.list<vtensor>) {
          %0, %1 = "torch.prim.ListUnpack"(%arg0) : (!torch.list<vtensor>) -> (!torch.vtensor<[2],f32>, !torch.int)
          func.return
        }
        """,
        re.escape("torch.prim.ListUnpack: result 1 has type !torch.int, the list holds !torch.vtensor"),
    )


def test_constant_with_the_wrong_result_type():
    verify_error(
        """
        func.func @main() {
          %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.float
          func.return
        }
        """,
        "!torch.float should be of base attribute torch.int",
    )


@pytest.mark.parametrize(
    "op, match",
    [
        ('%0 = "torch.constant.int"(%i) <{value = 1 : i64}> : (!torch.int) -> !torch.int',
         "Expected 0 operands, but got 1"),
        ('%0, %1 = "torch.constant.int"() <{value = 1 : i64}> : () -> (!torch.int, !torch.int)',
         "Expected 1 result, but got 2"),
        ('%0 = "torch.constant.none"() ({}) : () -> !torch.none', "Expected 0 regions, but got 1"),
        ('%0 = "torch.constant.int"() : () -> !torch.int',
         "property 'value' expected in operation 'torch.constant.int'"),
        ('%0 = "torch.constant.int"() <{value = 1 : i64, extra = 2 : i64}> : () -> !torch.int',
         "property 'extra' is not defined by the operation 'torch.constant.int'"),
        ('%0 = "torch.constant.none"() <{value = 1 : i64}> : () -> !torch.none',
         "property 'value' is not defined by the operation 'torch.constant.none'"),
        ('%0 = "torch.constant.int"() <{value = 1.0 : f64}> : () -> !torch.int',
         "1.000000e.00 : f64 should be of base attribute integer"),
        ('%0 = "torch.constant.float"() <{value = 1 : i64}> : () -> !torch.float',
         "1 : i64 should be of base attribute float"),
        ('%0 = "torch.constant.bool"() <{value = 1 : i64}> : () -> !torch.bool', "Expected attribute i1 but got i64"),
        ('%0 = "torch.constant.str"() <{value = 1 : i64}> : () -> !torch.str',
         "1 : i64 should be of base attribute string"),
        ('%0 = "torch.constant.device"() <{value = 1 : i64}> : () -> !torch.Device',
         "1 : i64 should be of base attribute string"),
        ('%0 = "torch.prim.ListConstruct"(%i) : (!torch.int) -> !torch.int',
         "!torch.int should be of base attribute torch.list"),
        ('"torch.prim.ListConstruct"(%i) : (!torch.int) -> ()', "Expected 1 result, but got 0"),
        ('%0 = "torch.prim.ListConstruct"(%i) <{value = 1 : i64}> : (!torch.int) -> !torch.list<int>',
         "property 'value' is not defined by the operation 'torch.prim.ListConstruct'"),
        ('%0 = "torch.prim.ListUnpack"(%i) : (!torch.int) -> !torch.int',
         "!torch.int should be of base attribute torch.list"),
        ('%0 = "torch.prim.ListUnpack"(%l, %l) : (!torch.list<int>, !torch.list<int>) -> !torch.int',
         "Expected 1 operand, but got 2"),
        ('%0 = "torch.prim.ListUnpack"(%l) <{value = 1 : i64}> : (!torch.list<int>) -> !torch.int',
         "property 'value' is not defined by the operation 'torch.prim.ListUnpack'"),
    ],
)
def test_constant_and_list_ops_keep_the_generic_checks(op: str, match: str):
    """Constants and lists skip IRDL's generic checks when a quick look vouches for them;
    anything the quick look doubts still goes through those checks."""
    verify_error(
        f"""
        func.func @main(%i: !torch.int, %l: !torch.list<int>) {{
          {op}
          func.return
        }}
        """,
        match,
    )


@pytest.mark.parametrize("name", ["torch.aten.no_such_op", "torch.prim.Print", "aten::relu"])
def test_torch_operator_naming_no_aten_operator(name: str):
    verify_error(
        f"""
        func.func @main(%arg0: !torch.vtensor<[4],f32>) {{
          %0 = "torch.operator"(%arg0) <{{name = "{name}"}}> : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
          func.return
        }}
        """,
        re.escape(f"torch.operator '{name}' names no ATen operator torch knows"),
    )


# ---------------------------------------------------------------- unknown ops


@pytest.mark.parametrize(
    "name", ["torch.aten.no_such_op", "torch.aten.sum.no_such_overload", "torch.aten.sum.dim_IntList.x"]
)
def test_unknown_aten_op_is_a_parse_error_with_line_and_column(name: str):
    text = ir(
        f"""
        func.func @main(%arg0: !torch.vtensor<[4],f32>) {{
          %0 = "{name}"(%arg0) : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
          func.return
        }}
        """
    )
    column = text.splitlines()[1].index("(") + 1  # the error points just past the quoted name
    with pytest.raises(ParseError, match=f"Operation {re.escape(name)} is not registered") as e:
        parse_module(text, name="model.mlir")
    assert f"model.mlir:2:{column}" in str(e.value)
