"""pipeline-split: assigns every op of the captured step to a pipeline stage.

The model is read as a sequence of units: the children of its repeated
container (`blocks.0`, `blocks.1`, ...), in the order the forward runs them.
Stages are contiguous runs of units, chosen by split points (`split-at`:
module paths where a new stage begins), by `piperc.annotate` regions
(`region`: the region's index is the stage), or by balancing the estimated
cost of each unit (`stages` alone).

Ops outside any unit (embeddings before the blocks, the head and the loss
after them, residual adds between them) join the stage of the unit that ran
last before them in program order; forward ops before the first unit go to
stage 0 and backward ops before the first backward unit op (the loss
gradient) go to the last stage. Backward ops thus follow their forward op.
Constants take the stage of their first user.

The result: every op in `@main` carries `par.stage`, and the module carries
`par.num_stages`. Requires: a captured module (`#par.origin` on ops).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerAttr, ModuleOp
from xdsl.ir import Operation
from xdsl.passes import ModulePass
from xdsl.traits import ConstantLike, IsTerminator

from piperc.dialects.par import OriginAttr, PassKind
from piperc.dialects.roles import ORIGIN, main_function
from piperc.dialects.torch import ValueTensorType
from piperc.errors import StrategyError

STAGE = "par.stage"
"""The stage an op of the captured step runs in (i64)."""

NUM_STAGES = "par.num_stages"

_UNIT = re.compile(r"^(.*?\.\d+)(\.|$)")


def unit_of(path: str) -> str | None:
    """The repeated unit a module path belongs to: `blocks.3.attn.qkv` -> `blocks.3`."""
    m = _UNIT.match(path)
    return m.group(1) if m else None


def module_count(module: ModuleOp, key: str, reader: str, producer: str) -> int:
    """The int attribute `key` of `module`, which pass `producer` writes.

    A pass (`reader`) that runs before its prerequisite gets a StrategyError
    naming the pass to run first, not a KeyError.
    """
    attr = module.attributes.get(key)
    if not isinstance(attr, IntegerAttr):
        raise StrategyError(f"{reader}: run {producer} first (the module has no {key})")
    return attr.value.data


def stage_of(op: Operation) -> int:
    """The stage assigned to `op` by pipeline-split."""
    attr = op.attributes.get(STAGE)
    if not isinstance(attr, IntegerAttr):
        raise StrategyError(f"{op.name} has no pipeline stage; run pipeline-split first")
    return attr.value.data


def op_cost(op: Operation) -> int:
    """Estimated work of an op: 2*M*N*K for matrix products, else its output size."""
    if not op.results or not isinstance(op.results[0].type, ValueTensorType):
        return 0
    out = op.results[0].type
    if not out.has_shape:
        return 0
    numel = max(out.numel(), 1) if all(d >= 0 for d in out.get_shape()) else 1
    if op.name in ("torch.aten.mm", "torch.aten.bmm", "torch.aten.addmm", "torch.aten.matmul"):
        lhs = op.operands[1 if op.name == "torch.aten.addmm" else 0].type
        if isinstance(lhs, ValueTensorType) and lhs.has_shape:
            return 2 * numel * lhs.get_shape()[-1]
    return numel


def balance(costs: list[int], parts: int) -> list[int]:
    """Contiguous partition of `costs` into `parts` groups minimising the largest
    group; returns the index of the first unit of each group after the first."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-cost splitting the first i units into k groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return sorted(starts)[1:]


@dataclass(frozen=True)
class PipelineSplitPass(ModulePass):
    """Assigns each op of `@main` to a pipeline stage (`par.stage`).

    Options:
      stages: number of stages (>= 1).
      split-at: module paths that begin stages 1..N-1, e.g. `blocks.2,blocks.4`.
      region: name of a `piperc.annotate` region whose index gives the stage.
      directive: how the user wrote this strategy, quoted in errors.
    """

    name = "pipeline-split"

    stages: int = 1
    split_at: tuple[str, ...] = ()
    region: str = ""
    directive: str = "pipeline-split"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        fn = main_function(op)
        ops = list(fn.body.block.ops)
        units = self._units(ops)
        unit_stage = self._unit_stages(ops, units)
        self._assign(ops, unit_stage)
        op.attributes[NUM_STAGES] = IntegerAttr(self.stages, 64)

    def _fail(self, message: str) -> StrategyError:
        return StrategyError(f"{self.directive}: {message}")

    def _units(self, ops: list[Operation]) -> list[str]:
        units: list[str] = []
        for o in ops:
            origin = o.attributes.get(ORIGIN)
            if isinstance(origin, OriginAttr) and origin.pass_kind == PassKind.F:
                u = self._unit_key(origin)
                if u is not None and u not in units:
                    units.append(u)
        return units

    def _unit_key(self, origin: OriginAttr) -> str | None:
        if self.region:
            if origin.region == self.region and origin.region_index is not None:
                return f"{self.region}:{origin.region_index}"
            return None
        return unit_of(origin.path)

    def _unit_stages(self, ops: list[Operation], units: list[str]) -> dict[str, int]:
        if self.stages < 1:
            raise self._fail(f"stages must be >= 1, got {self.stages}")
        if self.region:
            if not units:
                raise self._fail(f"no op is inside a piperc.annotate({self.region!r}, i) region")
            indices = sorted({int(u.split(":")[1]) for u in units})
            if indices != list(range(self.stages)):
                raise self._fail(
                    f"annotate regions {self.region!r} have indices {indices}; "
                    f"a {self.stages}-stage pipeline needs indices 0..{self.stages - 1}"
                )
            return {u: int(u.split(":")[1]) for u in units}
        if self.stages > 1 and len(units) < self.stages:
            raise self._fail(
                f"{self.stages} stages but the model has only {len(units)} blocks "
                f"({', '.join(units) or 'no repeated module list'}); use at most {max(len(units), 1)} "
                "stages, or mark stages in the model with piperc.annotate('stage', i) and pass region='stage'"
            )
        if self.split_at:
            starts = []
            for path in self.split_at:
                if path not in units:
                    raise self._fail(
                        f"split point '{path}' is not a block of the model; blocks are: {', '.join(units)}"
                    )
                starts.append(units.index(path))
            if len(starts) != self.stages - 1:
                raise self._fail(
                    f"{len(starts)} split points give {len(starts) + 1} stages, but stages={self.stages}"
                )
            if starts != sorted(set(starts)) or starts[0] == 0:
                raise self._fail(
                    "split points must be distinct, in model order, and after the first block: "
                    + ", ".join(self.split_at)
                )
        else:
            costs = {u: 0 for u in units}
            for o in ops:
                origin = o.attributes.get(ORIGIN)
                if isinstance(origin, OriginAttr) and origin.pass_kind == PassKind.F:
                    u = self._unit_key(origin)
                    if u is not None:
                        costs[u] += op_cost(o)
            starts = balance([costs[u] for u in units], self.stages) if self.stages > 1 else []
        stage_of_unit, stage = {}, 0
        for i, u in enumerate(units):
            if stage < len(starts) and i == starts[stage]:
                stage += 1
            stage_of_unit[u] = stage
        return stage_of_unit

    def _assign(self, ops: list[Operation], unit_stage: dict[str, int]) -> None:
        current = {PassKind.F: 0, PassKind.B: self.stages - 1}
        deferred: list[Operation] = []
        # One attribute per stage, shared: building an IntegerAttr costs more than the rest
        # of the loop, and attributes are immutable.
        stage_attrs = [IntegerAttr(s, 64) for s in range(self.stages)]
        for o in ops:
            if o.has_trait(IsTerminator):
                continue
            origin = o.attributes.get(ORIGIN)
            if o.has_trait(ConstantLike) or not isinstance(origin, OriginAttr):
                deferred.append(o)
                continue
            u = self._unit_key(origin)
            if u is not None:
                current[origin.pass_kind] = unit_stage[u]
            o.attributes[STAGE] = stage_attrs[current[origin.pass_kind]]
        # Constants are re-created in every stage that uses them; record the first.
        for o in reversed(deferred):
            users = [u.operation for r in o.results for u in r.uses]
            staged = [stage_of(u) for u in users if STAGE in u.attributes]
            o.attributes[STAGE] = stage_attrs[min(staged, default=0)]
