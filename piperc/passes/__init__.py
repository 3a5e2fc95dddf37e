"""piperc's rewrite passes, one per file, and the registry that names them.

A pipeline written as text (`fold-detach,cse`) looks passes up here. Each
entry imports its module only when the pass is used.
"""

from __future__ import annotations

from collections.abc import Callable

from xdsl.passes import ModulePass


def _fold_detach():
    from piperc.passes.fold_detach import FoldDetachPass

    return FoldDetachPass


def _cse():
    from xdsl.transforms.common_subexpression_elimination import (
        CommonSubexpressionElimination,
    )

    return CommonSubexpressionElimination


def _dce():
    from xdsl.transforms.dead_code_elimination import DeadCodeElimination

    return DeadCodeElimination


PASSES: dict[str, Callable[[], type[ModulePass]]] = {
    "fold-detach": _fold_detach,
    "cse": _cse,
    "dce": _dce,
}
"""Every pass a textual pipeline may name, by its registered name."""


def register_pass(pass_class: type[ModulePass]) -> type[ModulePass]:
    """Adds a user's pass to the registry (usable as a decorator).

    Its `name` must not clash with an existing pass.
    """
    if pass_class.name in PASSES and PASSES[pass_class.name]() is not pass_class:
        raise ValueError(f"a pass named '{pass_class.name}' is already registered")
    PASSES[pass_class.name] = lambda: pass_class
    return pass_class
