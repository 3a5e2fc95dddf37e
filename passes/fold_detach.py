"""fold-detach: removes `torch.aten.detach` ops.

In a captured joint graph every value is immutable and gradients are already
explicit, so `detach` is the identity: its uses can read its input directly.
This is the worked example of docs/writing-a-pass.md.
"""

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import (
    GreedyRewritePatternApplier,
    PatternRewriter,
    PatternRewriteWalker,
    RewritePattern,
)

from piperc.dialects.torch import AtenOp


class FoldDetach(RewritePattern):
    """`%1 = torch.aten.detach(%0)` -> uses of %1 read %0."""

    def match_and_rewrite(self, op, rewriter: PatternRewriter) -> None:
        if not isinstance(op, AtenOp) or op.name != "torch.aten.detach":
            return
        rewriter.replace(op, [], [op.operands[0]])


@dataclass(frozen=True)
class FoldDetachPass(ModulePass):
    """Removes every `torch.aten.detach`, forwarding its operand to its uses.

    Options: none. Requires: value-semantics torch IR (`!torch.vtensor`).
    """

    name = "fold-detach"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        PatternRewriteWalker(GreedyRewritePatternApplier([FoldDetach()])).rewrite_module(op)
