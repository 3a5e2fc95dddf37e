"""Capture is exact: the interpreter reproduces eager autograd on every example,
and each op says where in the model it came from."""

import pytest
import torch
import torch.nn as nn
from torch_mlir.ir import WalkOrder, WalkResult
from xdsl.dialects.builtin import ModuleOp
from xdsl.rewriter import Rewriter

import piperc
from piperc import frontend
from piperc.dialects.par import OriginAttr, PassKind
from piperc.dialects.torch import OperatorOp
from piperc.errors import CaptureError
from piperc.examples import gpt, llama, moe, tied
from piperc.frontend import ORIGIN, argument_roles, result_roles
from piperc.interpreter import run_module
from piperc.ir import parse_module, print_ir

EXAMPLES = {"gpt": gpt, "llama": llama, "moe": moe, "tied": tied}


def eager_step(model, inputs):
    model.zero_grad()
    out = model(*inputs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def example(request):
    model, inputs = EXAMPLES[request.param].make(n_layers=2)
    return request.param, model, inputs, piperc.capture(model, inputs)


def test_interpreter_matches_eager_autograd(example):
    _, model, inputs, captured = example
    results = run_module(captured.module, captured.arguments(inputs=inputs))
    loss, grads = eager_step(model, inputs)
    got = dict(zip(result_roles(captured.main), results, strict=True))
    torch.testing.assert_close(got[("loss", 0)], loss, rtol=1e-6, atol=0)
    names = [key for role, key in result_roles(captured.main) if role == "grad"]
    assert sorted(names) == sorted(captured.params)
    for name in names:
        torch.testing.assert_close(got[("grad", name)], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_signature_names_every_parameter_and_input(example):
    _, model, inputs, captured = example
    roles = argument_roles(captured.main)
    params = [k for r, k in roles if r == "param"]
    assert params == list(captured.params)
    assert [k for r, k in roles if r == "input"] == list(range(len(inputs)))
    assert [k for r, k in roles if r == "tangent"] == [0]
    assert "dense_resource" not in str(captured), "weights must not be embedded in the IR"


def test_every_aten_op_has_an_origin(example):
    _, _, _, captured = example
    aten = [op for op in captured.module.walk() if op.name.startswith("torch.aten.")]
    assert aten and all(isinstance(op.attributes.get("piperc.origin"), OriginAttr) for op in aten)


def test_backward_ops_inherit_the_module_path_of_their_forward_op(example):
    _, model, _, captured = example
    origins = [op.attributes["piperc.origin"] for op in captured.module.walk() if "piperc.origin" in op.attributes]
    backward_paths = {o.path for o in origins if o.pass_kind == PassKind.B}
    owners = {name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners - backward_paths == set(), "modules with parameters but no backward op marked with their path"


def test_tied_weights_are_one_argument_with_a_summed_gradient():
    model, inputs = tied.make(n_layers=1)
    captured = piperc.capture(model, inputs)
    roles = argument_roles(captured.main)
    assert ("param", "embed.weight") in roles and ("param", "head.weight") not in roles
    text = str(captured)
    assert 'piperc.aliases = ["head.weight"]' in text


class Annotated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        with piperc.annotate("stage", 0):
            h = torch.tanh(self.a(x))
        with piperc.annotate("stage", 1):
            h = self.b(h)
        return h.square().mean()


def test_annotate_marks_forward_and_backward_ops():
    captured = piperc.capture(Annotated(), (torch.randn(2, 4),))
    seen = set()
    for op in captured.module.walk():
        origin = op.attributes.get("piperc.origin")
        if origin is None or not origin.path:
            continue
        seen.add((origin.path, origin.pass_kind, origin.region, origin.region_index))
    assert ("a", PassKind.F, "stage", 0) in seen
    assert ("a", PassKind.B, "stage", 0) in seen
    assert ("b", PassKind.F, "stage", 1) in seen
    assert ("b", PassKind.B, "stage", 1) in seen


def test_annotate_outside_capture_runs_eagerly():
    model = Annotated()
    x = torch.randn(2, 4)
    assert torch.isfinite(model(x))


def test_annotate_rejects_a_bad_name():
    with pytest.raises(ValueError, match="non-empty str"):
        with piperc.annotate(""):
            pass


def test_captured_ir_prints_with_typed_tensors():
    model, inputs = gpt.make(n_layers=1)
    text = str(piperc.capture(model, inputs))
    assert "!torch.vtensor<[8,16,32],f32>" in text
    assert 'piperc.param = "blocks.0.attn.qkv.weight"' in text
    assert '#par.origin<"blocks.0.attn.qkv", F>' in text


def parsed_from_text(mlir_module, marks) -> ModuleOp:
    """The capture path before the direct build, kept here as the oracle: torch-mlir's
    generic text parsed by xDSL, `torch.operator` rewritten to its ATen op, and origins
    attached in walk order."""
    text = mlir_module.operation.get_asm(print_generic_op_form=True, large_resource_limit=0)
    module = parse_module(text)
    for op in list(module.walk()):
        if isinstance(op, OperatorOp):
            Rewriter.replace_op(op, op.as_aten_op())
    nodes = []

    def record(op):
        nodes.append(frontend._node_name(op.location))
        return WalkResult.ADVANCE

    mlir_module.operation.walk(record, WalkOrder.PRE_ORDER)
    for op, node in zip(module.walk(), nodes, strict=True):
        mark = marks.get(node)
        if mark is not None:
            op.attributes[ORIGIN] = OriginAttr(mark.path, mark.pass_kind, mark.region, mark.region_index)
    return module


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_ir_built_from_torch_mlir_equals_its_text_parsed(name):
    model, inputs = EXAMPLES[name].make(n_layers=1)
    gm = frontend._trace(model, inputs)
    frontend._fold_tied_parameters(model, gm)
    frontend._drop_none_outputs(gm)
    marks = frontend._node_marks(gm)
    mlir_module = frontend._import(gm)
    built, _ = frontend._build(mlir_module, marks)
    built.verify()
    expected = print_ir(parsed_from_text(mlir_module, marks))
    assert ORIGIN in expected and "torch.operator" not in expected
    assert print_ir(built) == expected
    # Every use of a value is by an op of the module: a torch.operator replaced by its aten op
    # leaves none behind (a pass walking uses would see it; outline-stages' weight split did).
    ops = set(built.walk())
    assert all(u.operation in ops for op in ops for r in op.results for u in r.uses)


def test_strategies_with_one_microbatch_shape_share_one_capture():
    model, inputs = llama.make(n_layers=2)
    captures = piperc.Captures(model)
    opt = piperc.optim.AdamW(lr=1e-4)

    def compile_(strategy, mesh=None, **kw):
        return piperc.compile(model, inputs, mesh=mesh or piperc.Mesh(pp=2), strategy=strategy, optimizer=opt,
                              keep_ir=False, **kw)

    # 4 microbatches of 2 rows under 1F1B and ZB-H1, 2 replicas x 2 microbatches of 2 rows
    shared = [compile_([piperc.pipeline(stages=2, microbatches=4, schedule=s)], captures=captures)
              for s in ("1f1b", "zb-h1")]
    shared.append(compile_([piperc.pipeline(stages=2, microbatches=2), piperc.data_parallel()],
                           mesh=piperc.Mesh(pp=2, dp=2), captures=captures))
    assert len(captures) == 1
    # each compile rewrote its own copy: the same programs as compiling from a fresh capture
    assert shared[1].files == compile_([piperc.pipeline(stages=2, microbatches=4, schedule="zb-h1")]).files
    compile_([piperc.pipeline(stages=2, microbatches=2)], captures=captures)  # 4 rows
    assert len(captures) == 2
    model.blocks[0].attn.q.weight.requires_grad_(False)  # a frozen weight is a new step
    compile_([piperc.pipeline(stages=2, microbatches=2)], captures=captures)
    assert len(captures) == 3
    with pytest.raises(CaptureError, match="these captures belong to a Llama object, not to this Llama"):
        piperc.compile(llama.make(n_layers=2)[0], inputs, mesh=piperc.Mesh(pp=2), optimizer=opt,
                       strategy=[piperc.pipeline(stages=2)], captures=captures)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_one_trace_gives_the_ir_of_export_then_aot(name):
    """capture's one AOTAutograd trace and its fallback (torch.export, then AOTAutograd on the
    exported module) give the same IR: ops, module paths, regions, tied-weight gradient sums."""
    model, inputs = EXAMPLES[name].make(n_layers=2)
    one = frontend._captured(model, inputs, frontend._trace(model, inputs))
    two = frontend._captured(model, inputs, frontend._joint_graph(model, frontend._export(model, inputs), inputs))
    assert str(one) == str(two)


def test_one_trace_records_annotate_regions_as_export_does():
    torch.manual_seed(0)
    model, inputs = Annotated(), (torch.randn(2, 4),)
    one = frontend._captured(model, inputs, frontend._trace(model, inputs))
    two = frontend._captured(model, inputs, frontend._joint_graph(model, frontend._export(model, inputs), inputs))
    assert 'region "stage"' in str(one) and str(one) == str(two)


def test_a_model_the_one_trace_cannot_take_is_reported_by_torch_export():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x.mean() if x.sum() > 0 else -x.mean()

    assert frontend._trace(DataDependent(), (torch.randn(3),)) is None
    with pytest.raises(CaptureError, match="torch.export cannot trace DataDependent"):
        piperc.capture(DataDependent(), (torch.randn(3),))
