"""`piperc.nn.MoE`: the layer equals a token-by-token loop, captures with its contract's ops
and shapes, and the MoE example trains under piperc.compile like its one-device run."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import piperc
from piperc.dialects.par import PassKind
from piperc.examples import moe
from piperc.frontend import result_roles
from piperc.interpreter import run_module
from piperc.nn import MoE
from piperc.reference import compare, train_eager
from tests.test_capture import eager_step


def loop_reference(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """(y, aux_loss, dropped (token, choice) pairs) of `layer` on `x`, one token at a time:
    all first choices in token order, then all second choices, each kept while its expert
    has taken fewer than the capacity's tokens."""
    tokens = x.reshape(-1, layer.d_model)
    n_tokens, k, n_experts = tokens.shape[0], layer.top_k, layer.n_experts
    capacity = layer.capacity(n_tokens)
    probs = (tokens @ layer.router.weight.t()).softmax(dim=-1)
    y = [torch.zeros(layer.d_model) for _ in range(n_tokens)]
    taken = [0] * n_experts
    assigned = [0] * n_experts
    dropped = []
    for choice in range(k):
        for t in range(n_tokens):
            gates, experts = probs[t].topk(k)
            if k > 1:
                gates = gates / gates.sum()
            e = int(experts[choice])
            assigned[e] += 1
            if taken[e] == capacity:
                dropped.append((t, choice))
                continue
            taken[e] += 1
            h = tokens[t]
            y[t] = y[t] + gates[choice] * ((F.silu(h @ layer.w1[e]) * (h @ layer.w3[e])) @ layer.w2[e])
    balance = sum(assigned[e] / (k * n_tokens) * probs[:, e].mean() for e in range(n_experts))
    return torch.stack(y).view(x.shape), layer.aux_loss_coef * n_experts * balance, dropped


def outputs_and_grads(layer, forward, x, weight):
    """forward(layer, x)'s y and aux loss, and the gradients of (y * weight).sum() + aux
    with respect to x and every parameter."""
    layer.zero_grad()
    x = x.detach().requires_grad_()
    y, aux_loss, *_ = forward(layer, x)
    ((y * weight).sum() + aux_loss).backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return y.detach(), aux_loss.detach(), {"x": x.grad, **grads}


CAPACITIES = {"drops": 0.5, "no-drops": None}  # None: n_experts / top_k, so capacity = tokens


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity", sorted(CAPACITIES))
def test_layer_equals_the_token_by_token_loop(top_k, capacity):
    torch.manual_seed(0)
    n_experts = 4
    factor = CAPACITIES[capacity] or n_experts / top_k
    layer = MoE(d_model=8, d_hidden=16, n_experts=n_experts, top_k=top_k, capacity_factor=factor,
                aux_loss_coef=0.1)
    x, weight = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    _, _, dropped = loop_reference(layer, x)
    assert bool(dropped) == (capacity == "drops")

    y, aux_loss, grads = outputs_and_grads(layer, MoE.forward, x, weight)
    ref_y, ref_aux_loss, ref_grads = outputs_and_grads(layer, loop_reference, x, weight)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(aux_loss, ref_aux_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_first_choices_are_kept_before_any_second_choice():
    """Tokens 0, 1 prefer expert 0, tokens 2, 3 expert 1; capacity 2. Choice-major order
    fills both experts with first choices and drops every second choice; token-major order
    would give tokens 0 and 1 both experts and leave tokens 2 and 3 with none."""
    layer = MoE(d_model=2, d_hidden=4, n_experts=2, top_k=2, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    assert layer.capacity(4) == 2
    y, _ = layer(x)
    gates, experts = layer.router(x).softmax(dim=-1).topk(2)
    gates = gates / gates.sum(dim=-1, keepdim=True)
    first = torch.stack([
        gates[t, 0] * ((F.silu(h @ layer.w1[e]) * (h @ layer.w3[e])) @ layer.w2[e])
        for t, (h, e) in enumerate(zip(x, experts[:, 0].tolist(), strict=True))
    ])
    assert experts[:, 0].tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(y, first)


def test_balanced_routing_gives_the_coefficient_as_aux_loss():
    """A zero router gives every expert probability 1/E, so sum_e f_e * P_e = 1/E whatever
    topk picks, and the aux loss is exactly aux_loss_coef."""
    layer = MoE(d_model=8, d_hidden=16, n_experts=4, top_k=2, aux_loss_coef=0.01)
    with torch.no_grad():
        layer.router.weight.zero_()
    _, aux_loss = layer(torch.randn(3, 8))
    torch.testing.assert_close(aux_loss, torch.tensor(0.01))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"top_k must be an int in 1..n_experts=4, got 5"):
        MoE(8, 16, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor must be > 0, got 0"):
        MoE(8, 16, n_experts=4, capacity_factor=0)
    with pytest.raises(ValueError, match=r"expected \[..., 8\] input, got \[3, 4\]"):
        MoE(8, 16, n_experts=4)(torch.randn(3, 4))


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)
        self.moe = MoE(d_model=8, d_hidden=16, n_experts=4, top_k=2, capacity_factor=0.5)

    def forward(self, x, target):
        y, aux_loss = self.moe(self.embed(x))
        return (y - target).square().mean() + aux_loss


@pytest.fixture(scope="module")
def one_layer():
    """One MoE layer on 2 x 5 tokens: T = 10, E = 4, k = 2, C = ceil(0.5 * 10 * 2 / 4) = 3."""
    torch.manual_seed(0)
    model, inputs = OneLayer(), (torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    assert model.moe.capacity(10) == 3
    return model, inputs, piperc.capture(model, inputs)


def test_captured_step_equals_eager(one_layer):
    model, inputs, captured = one_layer
    results = run_module(captured.module, captured.arguments(inputs=inputs))
    got = dict(zip(result_roles(captured.main), results, strict=True))
    loss, grads = eager_step(model, inputs)
    torch.testing.assert_close(got[("loss", 0)], loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(got[("grad", name)], grad, rtol=1e-6, atol=1e-7, msg=name)


ROUTING_OPS = ("torch.aten.topk", "torch.aten.scatter_add", "torch.aten.bmm", "torch.aten.gather")


def test_captured_forward_has_the_contract_ops_in_the_moe_region(one_layer):
    """What the expert-parallel pass reads: topk [T, E] -> [T, k]; the [E*C, d] buffer filled
    by scatter_add from [k*T, d] rows; the experts' bmm on [E, C, d]; the gather of [k*T, d]
    rows from [E*C, d] with the scatter_add's index (the rank's gather is integer)."""
    _, _, captured = one_layer
    ops = [op for op in captured.main.body.block.ops if op.name in ROUTING_OPS]
    forward = [op for op in ops if op.attributes["piperc.origin"].pass_kind == PassKind.F]
    assert {(o.attributes["piperc.origin"].path, o.attributes["piperc.origin"].region) for o in ops} == {
        ("moe", "moe")}
    assert [f"{op.name} : {', '.join(map(str, op.operand_types))} -> {', '.join(map(str, op.result_types))}"
            for op in forward] == [
        "torch.aten.topk : !torch.vtensor<[10,4],f32>, !torch.int, !torch.int, !torch.bool, !torch.bool"
        " -> !torch.vtensor<[10,2],f32>, !torch.vtensor<[10,2],si64>",
        "torch.aten.gather : !torch.vtensor<[20,4],si64>, !torch.int, !torch.vtensor<[20,1],si64>, !torch.bool"
        " -> !torch.vtensor<[20,1],si64>",
        "torch.aten.scatter_add : !torch.vtensor<[12,8],f32>, !torch.int, !torch.vtensor<[20,8],si64>,"
        " !torch.vtensor<[20,8],f32> -> !torch.vtensor<[12,8],f32>",
        "torch.aten.bmm : !torch.vtensor<[4,3,8],f32>, !torch.vtensor<[4,8,16],f32> -> !torch.vtensor<[4,3,16],f32>",
        "torch.aten.bmm : !torch.vtensor<[4,3,8],f32>, !torch.vtensor<[4,8,16],f32> -> !torch.vtensor<[4,3,16],f32>",
        "torch.aten.bmm : !torch.vtensor<[4,3,16],f32>, !torch.vtensor<[4,16,8],f32> -> !torch.vtensor<[4,3,8],f32>",
        "torch.aten.gather : !torch.vtensor<[12,8],f32>, !torch.int, !torch.vtensor<[20,8],si64>, !torch.bool"
        " -> !torch.vtensor<[20,8],f32>",
    ]
    scatter_add, combine = forward[2], forward[-1]
    assert scatter_add.operands[2] is combine.operands[2]


def test_the_layer_and_the_example_import_no_compiler():
    code = ("import sys, piperc.nn, piperc.examples.moe; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('xdsl', 'torch_mlir')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_example_loss_adds_every_block_aux_loss():
    model, inputs = moe.make(n_layers=2)
    without = copy.deepcopy(model)
    for block in without.blocks:
        block.moe.aux_loss_coef = 0.0
    aux_losses = []
    for block in model.blocks:
        block.moe.register_forward_hook(lambda module, args, out: aux_losses.append(out[1]))
    with torch.no_grad():
        loss, loss_without = model(*inputs), without(*inputs)
    assert len(aux_losses) == 2 and all(a > 0 for a in aux_losses)
    torch.testing.assert_close(loss - loss_without, sum(aux_losses))


STRATEGIES = {
    # mesh, directives, and the one-device run's slices and groups (see train_eager)
    "dp2": (piperc.Mesh(dp=2), [piperc.data_parallel(axis="dp")], 2, 2),
    "pp2": (piperc.Mesh(pp=2), [piperc.pipeline(axis="pp", stages=2, microbatches=4, schedule="1f1b")], 4, 1),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_example_trains_like_one_device_on_the_same_slices(strategy):
    """Capacity and the aux loss are per call, i.e. per (microbatch, data rank) slice, so the
    one-device run that matches accumulates each batch over the same slices."""
    mesh, directives, slices, groups = STRATEGIES[strategy]
    model, inputs = moe.make(n_layers=2)
    batches = [moe.make(n_layers=2, seed=100 + s)[1] for s in range(3)]
    optimizer = piperc.optim.AdamW(lr=1e-4, weight_decay=0.1)
    compiled = piperc.compile(model, inputs, mesh=mesh, strategy=directives, optimizer=optimizer, keep_ir=False)
    result = piperc.launch(compiled, batches, timeout=240)
    losses, state = train_eager(model, batches, optimizer, slices=slices, groups=groups)
    loss_err, param_err = compare(result.losses, result.state_dict, losses, state)
    assert loss_err <= 1e-5, f"loss relative error {loss_err:.2e}"
    assert param_err <= 1e-5, f"parameter relative error {param_err:.2e}"
