"""optimizer: writes each stage's parameter update as IR (`@s<i>_update`).

    func.func @s0_update(%p: T {piperc.key = "param:w"}, %g: T {piperc.key = "grad:w"},
                         %m: T {piperc.key = "state:w.momentum"}, ...)
        -> (T {piperc.key = "param:w"}, T {piperc.key = "state:w.momentum"}, ...)

The update is plain `torch.aten` arithmetic, op for op what torch.optim's
single-tensor implementations do, so a step in piperc equals a step of
`torch.optim.SGD` / `torch.optim.AdamW` up to float rounding:

  sgd:   d = g + wd*p;  m = momentum*m + d;  p = p - lr*m   (m starts at zero)
  adamw: p = p*(1 - lr*wd);  m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g;
         t = t + 1;  p = p - (lr / (1-beta1^t)) * m / (sqrt(v) / sqrt(1-beta2^t) + eps)

Optimizer state (`state:<param>.<slot>`, zeros at the start) and the AdamW
step count (`state:step`, a 0-dim f64) are arguments and results too, so the
runtime only stores named tensors. Requires: outline-stages has run.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, IntegerAttr, ModuleOp, StringAttr
from xdsl.ir import Block, Region, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects.par import PassKind, PassKindAttr
from piperc.dialects.torch_builder import TorchBuilder, scalar_type
from piperc.errors import StrategyError
from piperc.passes.outline_stages import KEY, PASS, arg_keys, function_name, stage_functions
from piperc.passes.pipeline_split import NUM_STAGES, STAGE, module_count

STEP_KEY = "state:step"


def optimizer_state(module: ModuleOp) -> dict[str, dict]:
    """How the runtime creates each optimizer state tensor the update functions read.

    `w.exp_avg` -> `{"kind": "zeros", "like": "w"}`; `step` -> `{"kind": "scalar", "value": 0.0}`.
    """
    state: dict[str, dict] = {}
    for stage in range(module_count(module, NUM_STAGES, "optimizer", "pipeline-split")):
        for fn in stage_functions(module, stage, PassKind.UPDATE):
            for key in arg_keys(fn):
                if key == STEP_KEY:
                    state["step"] = {"kind": "scalar", "value": 0.0}
                elif key.startswith("state:"):
                    name = key.removeprefix("state:")
                    state[name] = {"kind": "zeros", "like": name.rsplit(".", 1)[0]}
    return state


def stage_parameters(module: ModuleOp, stage: int) -> dict[str, SSAValue]:
    """The parameters a stage reads (`param:` arguments of its F and B), name -> an argument."""
    params: dict[str, SSAValue] = {}
    for fn in stage_functions(module, stage, PassKind.F) + stage_functions(module, stage, PassKind.B):
        for key, arg in zip(arg_keys(fn), fn.args, strict=True):
            if key.startswith("param:"):
                params.setdefault(key.removeprefix("param:"), arg)
    return params


@dataclass(frozen=True)
class OptimizerPass(ModulePass):
    """Adds `@s<i>_update` for every stage.

    Options: kind (sgd | adamw), lr, momentum (sgd), weight-decay,
    beta1, beta2, eps (adamw), directive (quoted in errors).
    """

    name = "optimizer"

    kind: str = "sgd"
    lr: int | float = 1e-3
    momentum: int | float = 0.0
    weight_decay: int | float = 0.0
    beta1: int | float = 0.9
    beta2: int | float = 0.999
    eps: int | float = 1e-8
    directive: str = "optimizer"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if self.kind not in ("sgd", "adamw"):
            raise StrategyError(f"{self.directive}: unknown optimizer '{self.kind}' (known: sgd, adamw)")
        if self.lr <= 0:
            raise StrategyError(f"{self.directive}: lr must be > 0, got {self.lr}")
        stages = module_count(op, NUM_STAGES, self.directive, "pipeline-split")
        if not stage_functions(op, 0, PassKind.F):
            raise StrategyError(f"{self.directive}: run outline-stages first (the module has no stage functions)")
        for stage in range(stages):
            params = stage_parameters(op, stage)
            op.body.block.add_op(self._update(stage, params))

    def _update(self, stage: int, params: dict[str, SSAValue]) -> func.FuncOp:
        arg_keys_: list[str] = []
        arg_types = []
        for name, p in params.items():
            for key in (f"param:{name}", f"grad:{name}", *(f"state:{name}.{s}" for s in self._slots())):
                arg_keys_.append(key)
                arg_types.append(p.type)
        if self.kind == "adamw":
            arg_keys_.append(STEP_KEY)
            arg_types.append(scalar_type("f64"))
        block = Block(arg_types=arg_types)
        env = dict(zip(arg_keys_, block.args, strict=True))
        b = TorchBuilder(block)
        out: dict[str, SSAValue] = {}
        if self.kind == "adamw":
            step = b.aten("torch.aten.add.Scalar", [env[STEP_KEY], b.float(1.0), b.float(1.0)])
            bc1 = b.aten("torch.aten.rsub.Scalar",
                         [b.aten("torch.aten.pow.Scalar", [b.float(self.beta1), step]), b.float(1.0), b.float(1.0)])
            step_size = b.aten("torch.aten.mul.Scalar", [b.aten("torch.aten.reciprocal", [bc1]), b.float(self.lr)])
            bc2 = b.aten("torch.aten.rsub.Scalar",
                         [b.aten("torch.aten.pow.Scalar", [b.float(self.beta2), step]), b.float(1.0), b.float(1.0)])
            bc2_sqrt = b.aten("torch.aten.sqrt", [bc2])
            out[STEP_KEY] = step
        for name in params:
            p, g = env[f"param:{name}"], env[f"grad:{name}"]
            if self.kind == "sgd":
                d = g
                if self.weight_decay:
                    d = b.aten("torch.aten.add.Tensor", [g, p, b.float(self.weight_decay)])
                if self.momentum:
                    m = env[f"state:{name}.momentum"]
                    m = b.aten("torch.aten.add.Tensor",
                               [b.aten("torch.aten.mul.Scalar", [m, b.float(self.momentum)]), d, b.float(1.0)])
                    out[f"state:{name}.momentum"] = m
                    d = m
                out[f"param:{name}"] = b.aten("torch.aten.add.Tensor", [p, d, b.float(-self.lr)])
                continue
            m, v = env[f"state:{name}.exp_avg"], env[f"state:{name}.exp_avg_sq"]
            if self.weight_decay:
                p = b.aten("torch.aten.mul.Scalar", [p, b.float(1 - self.lr * self.weight_decay)])
            m = b.aten("torch.aten.lerp.Scalar", [m, g, b.float(1 - self.beta1)])
            v = b.aten("torch.aten.addcmul",
                       [b.aten("torch.aten.mul.Scalar", [v, b.float(self.beta2)]), g, g, b.float(1 - self.beta2)])
            denom = b.aten("torch.aten.add.Scalar", [
                b.aten("torch.aten.div.Tensor", [b.aten("torch.aten.sqrt", [v]), bc2_sqrt]),
                b.float(self.eps), b.float(1.0)])
            update = b.aten("torch.aten.mul.Tensor", [b.aten("torch.aten.div.Tensor", [m, denom]), step_size])
            out[f"param:{name}"] = b.aten("torch.aten.sub.Tensor", [p, update, b.float(1.0)])
            out[f"state:{name}.exp_avg"] = m
            out[f"state:{name}.exp_avg_sq"] = v
        result_keys = sorted(out, key=lambda k: (k != STEP_KEY, arg_keys_.index(k)))
        block.add_op(func.ReturnOp(*[out[k] for k in result_keys]))
        fn = func.FuncOp(
            function_name(stage, PassKind.UPDATE),
            (arg_types, [out[k].type for k in result_keys]),
            Region(block),
            arg_attrs=ArrayAttr(DictionaryAttr({KEY: StringAttr(k)}) for k in arg_keys_),
            res_attrs=ArrayAttr(DictionaryAttr({KEY: StringAttr(k)}) for k in result_keys),
        )
        fn.attributes[STAGE] = IntegerAttr(stage, 64)
        fn.attributes[PASS] = PassKindAttr(PassKind.UPDATE)
        return fn

    def _slots(self) -> tuple[str, ...]:
        if self.kind == "adamw":
            return ("exp_avg", "exp_avg_sq")
        return ("momentum",) if self.momentum else ()
