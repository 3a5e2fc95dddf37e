"""The captured step's conventions: where ops came from, and the roles of `@main`'s values.

Capture writes them; passes read them. They are attribute names on
`func.func @main`'s arguments and results, and on every captured op.
"""

from __future__ import annotations

from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, IntAttr, ModuleOp, StringAttr

from piperc.errors import CaptureError

ORIGIN = "piperc.origin"
"""The attribute on every captured op that says where in the model it came from."""

# Argument and result attributes of the captured function.
ARG_PARAM = "piperc.param"  # the parameter's name in model.state_dict()
ARG_BUFFER = "piperc.buffer"
ARG_INPUT = "piperc.input"  # index into example_inputs
ARG_TANGENT = "piperc.tangent"  # index of the output it is the tangent of
ARG_STATE = "piperc.state"  # optimizer state, added by the optimizer pass
ARG_ALIASES = "piperc.aliases"  # other names of a tied parameter
RES_LOSS = "piperc.loss"
RES_OUTPUT = "piperc.output"
RES_GRAD = "piperc.grad"
RES_INCREMENT = "piperc.increment"
"""A buffer the forward updates (its name): the result is its increment `u`, and after the step
the buffer is `decay * buffer + u` (`RES_DECAY`). BatchNorm's running statistics have decay
`1 - momentum`, its `num_batches_tracked` decay 1 and increment 1."""
RES_DECAY = "piperc.decay"
"""The decay of a buffer's update (a float): see `RES_INCREMENT`."""


def main_function(module: ModuleOp) -> func.FuncOp:
    """The `@main` function of a captured module."""
    for op in module.ops:
        if isinstance(op, func.FuncOp) and op.sym_name.data == "main":
            return op
    raise CaptureError("the module has no func.func @main")


def parameter_names(attrs: DictionaryAttr | None) -> list[str]:
    """The names of the parameter an argument of `@main` holds: its `piperc.param` name, then
    the other names of a tied parameter (`piperc.aliases`); none for other arguments."""
    if attrs is None or not isinstance(attrs.data.get(ARG_PARAM), StringAttr):
        return []
    aliases = attrs.data.get(ARG_ALIASES)
    others = [a.data for a in aliases.data] if isinstance(aliases, ArrayAttr) else []
    return [attrs.data[ARG_PARAM].data, *others]


def argument_roles(fn: func.FuncOp) -> list[tuple[str, object]]:
    """For each argument of a captured function, (role, key): role is one of
    param, buffer, input, tangent; key is the name or index."""
    roles = []
    for i, attrs in enumerate(fn.arg_attrs.data if fn.arg_attrs else ()):
        for role, key in ((ARG_PARAM, "param"), (ARG_BUFFER, "buffer"), (ARG_INPUT, "input"), (ARG_TANGENT, "tangent"),
                          (ARG_STATE, "state")):
            if role in attrs.data:
                value = attrs.data[role]
                roles.append((key, value.data if isinstance(value, StringAttr | IntAttr) else value))
                break
        else:
            raise CaptureError(f"argument {i} of @main has no piperc role attribute")
    return roles


def result_roles(fn: func.FuncOp) -> list[tuple[str, object]]:
    """For each result of a captured function, (role, key): loss, output (index), grad (name),
    increment (a buffer's name, see `RES_INCREMENT`), or, once the passes have made them, the
    new param, state or buffer (name)."""
    roles = []
    for i, attrs in enumerate(fn.res_attrs.data if fn.res_attrs else ()):
        if RES_LOSS in attrs.data:
            roles.append(("loss", 0))
        elif RES_OUTPUT in attrs.data:
            roles.append(("output", attrs.data[RES_OUTPUT].data))
        elif RES_GRAD in attrs.data:
            roles.append(("grad", attrs.data[RES_GRAD].data))
        elif RES_INCREMENT in attrs.data:
            roles.append(("increment", attrs.data[RES_INCREMENT].data))
        elif ARG_PARAM in attrs.data:  # the updated parameter, once the optimizer has run
            roles.append(("param", attrs.data[ARG_PARAM].data))
        elif ARG_STATE in attrs.data:
            roles.append(("state", attrs.data[ARG_STATE].data))
        elif ARG_BUFFER in attrs.data:  # the updated buffer (running-buffers)
            roles.append(("buffer", attrs.data[ARG_BUFFER].data))
        else:
            raise CaptureError(f"result {i} of @main has no piperc role attribute")
    return roles
