"""Hugging Face transformers models (`piperc.examples.hf`), built from config with random
weights, train under pp=2 x dp=2 as they train on one device."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="transformers is not installed; install the extra: pip install -e .[hf]")

import piperc  # noqa: E402
from piperc.examples import hf  # noqa: E402


@pytest.mark.parametrize("name", sorted(hf.MODELS))
def test_make_builds_the_transformers_model_with_transformers_own_causal_mask(name):
    model, (tokens, targets) = hf.make(name, n_layers=3, seed=1)
    layers = model.get_submodule(hf.layers_path(name))
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 3
    assert type(model.model).__module__.startswith("transformers.models.")
    logits = model.model(input_ids=tokens).logits  # transformers makes the mask itself
    assert model(tokens, targets).item() == pytest.approx(
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item(), rel=1e-6)
    again, (tokens_again, _) = hf.make(name, n_layers=3, seed=1)
    assert torch.equal(tokens, tokens_again)
    for (key, value), (key_again, value_again) in zip(model.state_dict().items(), again.state_dict().items(),
                                                      strict=True):
        assert key == key_again and torch.equal(value, value_again), key


def test_an_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'gpt3'; known: gpt2, llama, qwen2, mistral, qwen2_moe, mixtral"):
        hf.make("gpt3")


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "qwen2_moe"])
def test_trains_under_a_pipeline_and_data_parallelism_as_on_one_device(name):
    model, batch = hf.make(name)
    compiled = piperc.compile(model, batch, mesh=piperc.Mesh(pp=2, dp=2),
                              strategy=[piperc.pipeline(stages=2, microbatches=2, split_at=[f"{hf.layers_path(name)}.1"]),
                                        piperc.data_parallel()],
                              optimizer=piperc.optim.AdamW(lr=1e-3), keep_ir=False)
    report = piperc.verify(model, batch, compiled, [batch] * 3)
    assert report.ok, str(report)
    assert report.loss_error <= 1e-5, str(report)
