"""Shared fixtures: tiny random models of every registered architecture, the real models,
and a factory for hand-made patches."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import transformers

import neuronpatch
from neuronpatch import fingerprint
from neuronpatch.arch import base_model_info, resolve

# Keep the (2-core) CI machine's threads for the tests themselves.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_COMMON, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**_COMMON, pad_token_id=0),
    "olmo": lambda: transformers.OlmoConfig(**_COMMON),
    "olmo2": lambda: transformers.Olmo2Config(**_COMMON),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=128,
        n_embd=32,
        n_inner=64,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=128,
        n_embd=32,
        n_inner=64,
        n_layer=3,
        n_head=4,
        n_positions=64,
        rotary_dim=4,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=128,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
MODEL_TYPES = sorted(TINY_CONFIGS)


def build_tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny causal LM of ``model_type`` (no download)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]())
    model.config._name_or_path = f"tiny-{model_type}"
    return model.to(dtype).eval()


@pytest.fixture(params=MODEL_TYPES)
def tiny_model(request):
    """One tiny random model per registered architecture."""
    return build_tiny(request.param)


def make_patch(model, layers=None, k: int = 4, scale: float = 0.5, seed: int = 0, **meta):
    """A hand-made patch for ``model``: k random neurons with random deltas on ``layers``."""
    arch = resolve(model)
    layers = list(range(arch.num_layers)) if layers is None else layers
    g = torch.Generator().manual_seed(seed)
    content = {
        layer: (
            torch.randperm(arch.intermediate_size, generator=g)[:k],  # [k]
            torch.randn(k, arch.hidden_size, generator=g) * scale,  # [k, hidden]
        )
        for layer in layers
    }
    base = base_model_info(model)
    return neuronpatch.Patch(content, base, base_fingerprint=fingerprint.compute(arch), **meta)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (fp32) and its tokenizer, loaded once per session."""
    return neuronpatch.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270M and its tokenizer, loaded once per session."""
    return neuronpatch.load_model("gemma3-270m")


class CharTokenizer:
    """A byte-level stand-in tokenizer for the tiny random models (vocab 128, BOS 1)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([self.bos_token_id] if add_special_tokens else []) + [
            3 + b % 125 for b in text.encode()
        ]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=False):
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) == self.bos_token_id)]
        return "".join(" " if i % 5 == 0 else chr(ord("a") + i % 26) for i in ids)
