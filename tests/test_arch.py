"""Architecture registry: finding W_out, its orientation and sizes, and refusing unknown models."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import MODEL_TYPES
from torch import nn

import neuronpatch
from neuronpatch.arch import ARCHITECTURES, resolve
from neuronpatch.errors import NeuronpatchError, UnsupportedModelError


def test_every_registered_architecture_has_a_tiny_test_model():
    # The parametrized runtime tests only cover what conftest builds; a new ArchSpec
    # without a tiny config would silently go untested.
    assert sorted(ARCHITECTURES) == MODEL_TYPES
    assert neuronpatch.supported_model_types() == sorted(ARCHITECTURES)


def test_resolve_finds_sizes_and_every_layer(tiny_model):
    arch = resolve(tiny_model)
    assert arch.model_type == tiny_model.config.model_type
    assert arch.num_layers == 3
    assert arch.hidden_size == 32
    assert arch.intermediate_size == 64
    # one distinct W_out per decoder layer, each a submodule of the model
    assert len({id(m) for m in arch.w_out}) == 3
    submodules = {id(m) for m in tiny_model.modules()}
    assert all(id(m) in submodules for m in arch.w_out)


def test_resolve_orientation(tiny_model):
    arch = resolve(tiny_model)
    weight = arch.w_out[0].weight
    if arch.model_type == "gpt2":
        assert arch.spec.conv1d
        assert type(arch.w_out[0]).__name__ == "Conv1D"
        assert tuple(weight.shape) == (64, 32)  # Conv1D: [intermediate, hidden]
    else:
        assert not arch.spec.conv1d
        assert isinstance(arch.w_out[0], nn.Linear)
        assert tuple(weight.shape) == (32, 64)  # Linear: [hidden, intermediate]


def test_w_out_maps_intermediate_to_hidden(tiny_model):
    """W_out really is the FFN down projection: it eats [.., intermediate], yields [.., hidden]."""
    arch = resolve(tiny_model)
    q = torch.randn(2, 5, arch.intermediate_size)  # [batch, seq, intermediate]
    with torch.no_grad():
        out = arch.w_out[1](q)
    assert out.shape == (2, 5, arch.hidden_size)


def test_column_is_the_output_direction_of_a_neuron(tiny_model):
    """column(layer, [i]) is what neuron i adds to W_out's output: W(e_i) - W(0)."""
    arch = resolve(tiny_model)
    idx = torch.tensor([0, 7, 63])
    unit = torch.zeros(len(idx), arch.intermediate_size)  # [k, intermediate]
    unit[torch.arange(len(idx)), idx] = 1.0
    for layer in range(arch.num_layers):
        module = arch.w_out[layer]
        with torch.no_grad():
            bias = module(torch.zeros(1, arch.intermediate_size))  # [1, hidden]
            directions = module(unit) - bias  # [k, hidden]
        column = arch.column(layer, idx)
        assert column.shape == (len(idx), arch.hidden_size)
        torch.testing.assert_close(column, directions, atol=1e-6, rtol=1e-6)
        # a copy, not a view into the weight
        assert column.data_ptr() != module.weight.data_ptr()


@pytest.mark.slow
@pytest.mark.parametrize(
    "fixture, model_type, layers, hidden, intermediate",
    [("smollm2", "llama", 30, 576, 1536), ("gemma3", "gemma3_text", 18, 640, 2048)],
)
def test_resolve_real_models(request, fixture, model_type, layers, hidden, intermediate):
    model, _ = request.getfixturevalue(fixture)
    arch = resolve(model)
    assert (arch.model_type, arch.num_layers, arch.hidden_size, arch.intermediate_size) == (
        model_type,
        layers,
        hidden,
        intermediate,
    )
    assert tuple(arch.w_out[0].weight.shape) == (hidden, intermediate)
    assert arch.w_out[-1] is model.model.layers[-1].mlp.down_proj


def _tiny_bert():
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return transformers.BertForMaskedLM(config)


def _tiny_t5():
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4
    )
    return transformers.T5ForConditionalGeneration(config)


def _plain_module():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("make", [_tiny_bert, _tiny_t5, _plain_module], ids=["bert", "t5", "plain"])
def test_unsupported_model_lists_supported_types(make):
    model = make()
    with pytest.raises(UnsupportedModelError) as info:
        resolve(model)
    assert isinstance(info.value, NeuronpatchError)
    message = str(info.value)
    assert type(model).__name__ in message
    for model_type in neuronpatch.supported_model_types():
        assert model_type in message


def test_known_model_type_with_unexpected_layout_is_unsupported():
    """A config saying 'llama' is not enough: the layers must be where the spec says."""

    class FakeLlama(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64)
            self.blocks = nn.ModuleList([nn.Linear(64, 32)])

    with pytest.raises(UnsupportedModelError, match=r"layers\[i\]\.mlp\.down_proj"):
        resolve(FakeLlama())


def test_apply_to_unsupported_model_raises_and_leaves_it_alone():
    model = _tiny_bert().eval()
    patch = neuronpatch.Patch(
        {0: (torch.tensor([1]), torch.ones(1, 32))},
        neuronpatch.BaseModelInfo("tiny-llama", "llama", 3, 32, 64),
    )
    with pytest.raises(UnsupportedModelError):
        neuronpatch.apply(model, patch)
    assert neuronpatch.applied_patches(model) == []
    assert all(not m._forward_hooks for m in model.modules())
