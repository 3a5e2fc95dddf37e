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
runtime only stores named tensors. A parameter's gradient and state are laid out as the
parameter is (tensor parallelism shards them alike), and the update, elementwise, runs on
the pieces. Requires: outline-stages has run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp, StringAttr
from xdsl.ir import Block, BlockArgument, Region, SSAValue
from xdsl.passes import ModulePass

from piperc.dialects.par import PassKind, ShardingAttr, TaskOp, layout_of
from piperc.dialects.roles import argument_roles, main_function, result_roles
from piperc.dialects.torch_builder import TorchBuilder, scalar_type
from piperc.errors import StrategyError
from piperc.passes.data_parallel import reduce_gradients
from piperc.passes.outline_stages import (
    arg_keys,
    function_name,
    named,
    result_keys,
    stage_functions,
    step_tasks,
    with_layout,
)
from piperc.passes.pipeline_split import NUM_STAGES, module_count
from piperc.passes.propagate_sharding import value_layout

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


def stage_parameters(module: ModuleOp, stage: int) -> dict[str, BlockArgument]:
    """The parameters a stage's forward and backward tasks read: name -> `@main` argument."""
    main = main_function(module)
    roles = argument_roles(main)
    params: dict[str, BlockArgument] = {}
    for task in step_tasks(module):
        if task.stage.value.data != stage or task.pass_kind.data not in (PassKind.F, PassKind.B):
            continue
        for v in task.args:
            if isinstance(v, BlockArgument) and v.owner is main.body.block and roles[v.index][0] == "param":
                params.setdefault(roles[v.index][1], v)
    return params


def stage_gradients(module: ModuleOp, stage: int) -> dict[str, SSAValue]:
    """The gradients the step returns from a stage's backward tasks: parameter name -> value."""
    main = main_function(module)
    ret = main.body.block.last_op
    grads = {}
    for (role, name), v in zip(result_roles(main), ret.operands, strict=True):
        if role == "grad" and isinstance(v.owner, TaskOp) and v.owner.stage.value.data == stage:
            grads[name] = v
    return grads


@dataclass(frozen=True)
class OptimizerPass(ModulePass):
    """Adds `@s<i>_update` for every stage: it updates the stage's parameters that have a
    gradient. A frozen parameter (no `piperc.grad` result) gets no update and no state, and
    a stage whose parameters are all frozen gets no update function.

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
        main = main_function(op)
        trainable = {name for role, name in result_roles(main) if role == "grad"}
        if not trainable:
            raise StrategyError(f"{self.directive}: every parameter of the model is frozen (requires_grad=False), "
                                "so there is nothing to train; unfreeze the parameters to train")
        updates = []
        for stage in range(stages):
            # A frozen parameter (captured without a gradient) is read but never updated.
            params = {n: v for n, v in stage_parameters(op, stage).items() if n in trainable}
            if not params:  # a stage whose parameters are all frozen has nothing to update
                continue
            update = self._update(stage, params)
            op.body.block.insert_op_before(update, main)
            updates.append((stage, update, params))
        self._add_update_tasks(main, updates, stage_gradients_of={s: stage_gradients(op, s) for s in range(stages)})
        reduce_gradients(op, (), math.inf, shared_only=True)

    def _add_update_tasks(self, main: func.FuncOp, updates, stage_gradients_of) -> None:
        """Runs each stage's update in the step; the step then returns the new parameters and state."""
        block = main.body.block
        ret = block.last_op
        state_args: dict[str, BlockArgument] = {}
        # The loss and the buffers' increments (`running-buffers` turns them into updates) stay.
        kept = [i for i, (role, _) in enumerate(result_roles(main)) if i == 0 or role == "increment"]
        results, res_attrs = [ret.operands[i] for i in kept], [main.res_attrs.data[i] for i in kept]
        for stage, update, params in updates:
            args = []
            for key, type_ in zip(arg_keys(update), update.function_type.inputs.data, strict=True):
                role, _, name = key.partition(":")
                if role == "param":
                    args.append(params[name])
                elif role == "grad":
                    args.append(stage_gradients_of[stage][name])
                else:
                    if name not in state_args:
                        state_args[name] = _add_state_argument(main, name, type_, _layout(update, key))
                    args.append(state_args[name])
            task = TaskOp(update.sym_name.data, stage, PassKind.UPDATE, args,
                          list(update.function_type.outputs.data))
            block.insert_op_before(task, ret)
            for key, r in zip(result_keys(update), task.outs, strict=True):
                role, _, name = key.partition(":")
                results.append(r)
                res_attrs.append(with_layout(DictionaryAttr({f"piperc.{role}": StringAttr(name)}), r.type,
                                             _result_layout(update, key)))
        ret.operands = results
        main.function_type = func.FunctionType.from_lists(list(main.function_type.inputs.data),
                                                         [r.type for r in results])
        main.res_attrs = ArrayAttr(res_attrs)

    def _update(self, stage: int, params: dict[str, SSAValue]) -> func.FuncOp:
        arg_keys_: list[str] = []
        arg_types = []
        layouts: dict[str, ShardingAttr] = {}
        for name, p in params.items():
            for key in (f"param:{name}", f"grad:{name}", *(f"state:{name}.{s}" for s in self._slots())):
                arg_keys_.append(key)
                arg_types.append(p.type)
                layouts[key] = value_layout(p)
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
            arg_attrs=ArrayAttr(named(k, t, layouts.get(k)) for k, t in zip(arg_keys_, arg_types, strict=True)),
            res_attrs=ArrayAttr(named(k, out[k].type, layouts.get(k)) for k in result_keys),
        )
        return fn

    def _slots(self) -> tuple[str, ...]:
        if self.kind == "adamw":
            return ("exp_avg", "exp_avg_sq")
        return ("momentum",) if self.momentum else ()


def _layout(fn: func.FuncOp, key: str) -> ShardingAttr | None:
    """The layout of the argument of `fn` named `key`."""
    return layout_of(fn.arg_attrs.data[arg_keys(fn).index(key)])


def _result_layout(fn: func.FuncOp, key: str) -> ShardingAttr | None:
    """The layout of the result of `fn` named `key`."""
    return layout_of(fn.res_attrs.data[result_keys(fn).index(key)])


def _add_state_argument(main: func.FuncOp, name: str, type_, layout: ShardingAttr | None) -> BlockArgument:
    """Appends an optimizer-state argument (`piperc.state = name`, laid out as its parameter) to the step."""
    arg = main.body.block.insert_arg(type_, len(main.body.block.args))
    main.function_type = func.FunctionType.from_lists([*main.function_type.inputs.data, type_],
                                                     list(main.function_type.outputs.data))
    main.arg_attrs = ArrayAttr([*main.arg_attrs.data, with_layout(
        DictionaryAttr({"piperc.state": StringAttr(name)}), type_, layout)])
    return arg
