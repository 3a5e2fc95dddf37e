"""The verification after every pass skips the checks of ops a pass left unchanged, and
still rejects every change that makes the IR invalid, with the error `module.verify()`
gives.

Each test runs a pipeline on STEP: a pass that changes nothing (so every op has been
accepted twice), then a pass that breaks one op in one way.
"""

import dataclasses
import textwrap
from collections.abc import Callable

import pytest
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.passes import ModulePass
from xdsl.rewriter import Rewriter
from xdsl.utils.exceptions import VerifyException

from piperc.dialects.torch import ConstantIntOp, FloatType, ListConstructOp
from piperc.errors import PassError
from piperc.ir import make_context, parse_module
from piperc.passmanager import run_pipeline


def ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


STEP = ir(
    """
    builtin.module {
      func.func @main(%x: !torch.vtensor<[2,4],f32>, %n: !torch.int) -> !torch.vtensor<[4,2],f32> {
        %one = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
        %zero = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
        %dims = "torch.prim.ListConstruct"(%one, %zero, %n) : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
        %y = "torch.aten.permute"(%x, %dims) : (!torch.vtensor<[2,4],f32>, !torch.list<int>) -> !torch.vtensor<[4,2],f32>
        %z = "torch.aten.relu"(%y) : (!torch.vtensor<[4,2],f32>) -> !torch.vtensor<[4,2],f32>
        func.return %z : !torch.vtensor<[4,2],f32>
      }
    }
    """
)


@dataclasses.dataclass(frozen=True)
class ChangesNothing(ModulePass):
    name = "changes-nothing"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Breaks(ModulePass):
    """Runs `edit` on the module: one change that leaves an invalid module."""

    name = "breaks"
    edit: Callable[[ModuleOp], None] = lambda module: None

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        self.edit(op)


def first(module: ModuleOp, cls: type):
    return next(op for op in module.walk() if isinstance(op, cls))


def main_body(module: ModuleOp):
    return first(module, ConstantIntOp).parent


def set_bad_value(module: ModuleOp) -> None:
    first(module, ConstantIntOp).properties["value"] = StringAttr("one")


def retype_list_element(module: ModuleOp) -> None:
    Rewriter.replace_value_with_new_type(main_body(module).args[1], FloatType())


def move_constant_out_of_main(module: ModuleOp) -> None:
    constant = first(module, ConstantIntOp)
    constant.detach()
    module.body.block.add_op(constant)


def use_a_value_from_outside_main(module: ModuleOp) -> None:
    outside = ConstantIntOp(1)
    module.body.block.add_op(outside)
    first(module, ListConstructOp).operands[0] = outside.result


def drop_return(module: ModuleOp) -> None:
    main_body(module).last_op.detach()


def report(error: Exception) -> str:
    """An error as a user reads it: the message, then the module with the failing op marked."""
    return "\n".join([str(error), *getattr(error, "__notes__", [])])


@pytest.mark.parametrize(
    "edit, names",
    [
        (set_bad_value, '%one = "torch.constant.int"() <{value = "one"}> : () -> !torch.int\n    ^^^^^'),
        (retype_list_element, "torch.prim.ListConstruct: element 2 has type !torch.float, the list holds !torch.int"),
        (move_constant_out_of_main, "Operation using value defined out of its IsolatedFromAbove parent"),
        (use_a_value_from_outside_main, "IsolatedFromAbove parent: ListConstructOp(%dims = "),
        (drop_return, "Operation torch.aten.relu terminates block in single-block region but is not a terminator"),
    ],
)
def test_a_pass_that_breaks_an_unchanged_op_is_rejected_with_the_full_verifiers_error(edit, names):
    ctx = make_context()
    module = parse_module(STEP, ctx)
    with pytest.raises(PassError) as caught:
        run_pipeline(module, ctx, [ChangesNothing(), Breaks(edit)])
    with pytest.raises(VerifyException) as full:
        module.verify()
    assert str(caught.value) == f"IR after pass 'breaks' does not verify: {full.value}"
    assert report(caught.value.__cause__) == report(full.value)
    assert names in report(full.value)


def test_ops_a_pass_left_unchanged_are_not_checked_again(monkeypatch):
    ctx = make_context()
    module = parse_module(STEP, ctx)
    checked = []
    original = ListConstructOp.verify_
    monkeypatch.setattr(ListConstructOp, "verify_", lambda op: checked.append(op) or original(op))
    run_pipeline(module, ctx, [ChangesNothing(), ChangesNothing()])
    assert len(checked) == 1
