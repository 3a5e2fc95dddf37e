"""Building `torch` dialect IR from Python, for passes that write new computation.

    b = TorchBuilder(block)
    y = b.aten("torch.aten.mul.Scalar", [x, b.float(0.9)])   # result type from x

Element-wise ops get the type of their first tensor operand unless a result
type is given. Literal operands are `torch.constant.*` ops made on the spot.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdsl.dialects.builtin import FloatAttr, IntegerAttr, StringAttr, f32, f64, i1
from xdsl.ir import Attribute, Block, Operation, SSAValue

from piperc.dialects import torch as t


class TorchBuilder:
    """Appends torch-dialect ops to the end of a block (or before an op)."""

    def __init__(self, block: Block, before: Operation | None = None):
        self.block = block
        self.before = before

    def _add(self, op: Operation) -> Operation:
        if self.before is not None:
            self.block.insert_op_before(op, self.before)
        else:
            self.block.add_op(op)
        return op

    def int(self, value: int) -> SSAValue:
        """A `torch.constant.int`."""
        return self._add(t.ConstantIntOp(value)).results[0]

    def float(self, value: float) -> SSAValue:
        """A `torch.constant.float`."""
        op = t.ConstantFloatOp.create(
            properties={"value": FloatAttr(float(value), f64)}, result_types=[t.FloatType()]
        )
        return self._add(op).results[0]

    def bool(self, value: bool) -> SSAValue:
        """A `torch.constant.bool`."""
        op = t.ConstantBoolOp.create(properties={"value": IntegerAttr(int(value), i1)}, result_types=[t.BoolType()])
        return self._add(op).results[0]

    def none(self) -> SSAValue:
        """A `torch.constant.none`."""
        return self._add(t.ConstantNoneOp()).results[0]

    def device(self, value: str = "cpu") -> SSAValue:
        """A `torch.constant.device` (code generation maps it to the rank's device)."""
        op = t.ConstantDeviceOp.create(properties={"value": StringAttr(value)}, result_types=[t.DeviceType()])
        return self._add(op).results[0]

    def int_list(self, values: Sequence[int]) -> SSAValue:
        """A `torch.prim.ListConstruct` of int constants."""
        items = [self.int(v) for v in values]
        op = t.ListConstructOp.create(operands=items, result_types=[t.ListType(t.IntType())])
        return self._add(op).results[0]

    def one(self, type_: Attribute) -> SSAValue:
        """The constant 1 as a scalar operand (`alpha` of `add.Tensor`) for tensors of `type_`:
        a `torch.constant.int` for integer and boolean dtypes (torch refuses a float
        alpha for them), else a `torch.constant.float`."""
        dtype = str(type_.dtype) if isinstance(type_, t.ValueTensorType) else "f32"
        return self.int(1) if dtype.startswith(("si", "ui", "i")) else self.float(1.0)

    def insert(self, op: Operation) -> Operation:
        """Adds `op` (of any dialect) where this builder adds ops; returns it."""
        return self._add(op)

    def aten(
        self,
        name: str,
        operands: Sequence[SSAValue],
        result_types: Sequence[Attribute] | None = None,
    ) -> SSAValue:
        """Appends `name` (a `torch.aten.*` op) and returns its first result.

        Without `result_types`, the single result has the type of the first
        tensor operand (right for element-wise ops).
        """
        cls = t.aten_op_class(name)
        if cls is None:
            raise ValueError(f"{name} is not an ATen operator")
        if result_types is None:
            first = next(v for v in operands if isinstance(v.type, t.ValueTensorType))
            result_types = [first.type]
        op = cls.create(operands=list(operands), result_types=list(result_types))
        return self._add(op).results[0]


def scalar_type(dtype: str = "f64") -> t.ValueTensorType:
    """A 0-dim tensor type: `!torch.vtensor<[],f64>`."""
    return t.ValueTensorType([], {"f64": f64, "f32": f32}[dtype])
