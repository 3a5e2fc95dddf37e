"""The example models run eagerly, train (every parameter gets a gradient) and export."""

import functools
import types

import pytest
import torch

from piperc.examples import gpt, llama, moe, tied

LLAMA_GQA = types.SimpleNamespace(make=functools.partial(llama.make, n_kv_heads=2))
EXAMPLES = {"gpt": gpt, "llama": llama, "llama-gqa": LLAMA_GQA, "moe": moe, "tied": tied}


@pytest.fixture(params=sorted(EXAMPLES))
def example(request):
    return EXAMPLES[request.param]


def test_make_is_deterministic(example):
    model_a, inputs_a = example.make()
    model_b, inputs_b = example.make()
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    for a, b in zip(inputs_a, inputs_b, strict=True):
        assert torch.equal(a, b)


def test_inputs_are_token_batches(example):
    _, (tokens, targets) = example.make(vocab=50, seq=12, batch=3)
    for t in (tokens, targets):
        assert t.dtype == torch.int64
        assert t.shape == (3, 12)
        assert 0 <= t.min() and t.max() < 50


def test_naming(example):
    model, _ = example.make(n_layers=2)
    names = dict(model.named_modules())
    for name in ("embed", "blocks.0.attn", "blocks.1", "norm", "head"):
        assert name in names, name
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert len(model.blocks) == 2


def test_loss_is_finite_scalar_and_every_parameter_gets_a_gradient(example):
    model, inputs = example.make()
    loss = model(*inputs)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_export_matches_eager(example):
    model, inputs = example.make(n_layers=2)
    program = torch.export.export(model, inputs, strict=False)
    torch.testing.assert_close(program.module()(*inputs), model(*inputs))


def test_tied_head_shares_the_embedding_parameter():
    model, inputs = tied.make()
    assert model.head.weight is model.embed.weight
    untied, _ = gpt.make()
    assert len(list(model.parameters())) == len(list(untied.parameters())) - 1
    model(*inputs).backward()
    assert model.embed.weight.grad is not None


def test_llama_rotary_tables_are_not_saved():
    model, _ = llama.make(n_layers=1)
    assert "blocks.0.attn.cos" in dict(model.named_buffers())
    assert not any(name.endswith((".cos", ".sin")) for name in model.state_dict())


def test_llama_grouped_query_attention_is_multi_head_attention_with_each_kv_head_repeated():
    """The fused kv rows are [k; v] by head; query heads 2j and 2j+1 share key/value head j."""
    torch.manual_seed(0)
    gqa = llama.GroupedQueryAttention(d_model=32, n_heads=4, n_kv_heads=2, seq=16)
    mha = llama.Attention(d_model=32, n_heads=4, seq=16)
    k, v = gqa.kv.weight.detach().view(2, 2, 8, 32).unbind(0)  # [k; v], each [kv head, head_dim, d_model]
    with torch.no_grad():
        mha.q.weight.copy_(gqa.q.weight)
        mha.o.weight.copy_(gqa.o.weight)
        mha.k.weight.copy_(k.repeat_interleave(2, dim=0).reshape(32, 32))
        mha.v.weight.copy_(v.repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randn(3, 16, 32)
    torch.testing.assert_close(gqa(x), mha(x))
