"""Scoring many edits in one batch: ``applied_per_row`` (patch i on batch row i) and the
batched fluency samples (``sample_texts``) that ``eval --edit-batch-size`` draws with it."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_TYPES, CharTokenizer, build_tiny, make_patch

import neuronpatch
from neuronpatch.arch import resolve
from neuronpatch.errors import PatchStateError
from neuronpatch.metrics import sample_text, sample_texts
from neuronpatch.patch import Gate, LayerDelta, Patch
from neuronpatch.runtime import applied_per_row

IDS = torch.tensor([[5, 17, 33, 8, 91, 44, 12, 70, 3, 27]])


def _residual(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]


def _gated(model, seed: int) -> Patch:
    """Rows of layer 2 behind a span-2 query gate (layer 1) that requires a subject gate (layer
    0), keyed at positions 2 and 6 of IDS: open on IDS at 6-7 only."""
    h0, h1 = _residual(model, IDS, 0), _residual(model, IDS, 1)
    subject = Gate(0, h0[2] - h0.mean(0), h0.mean(0), 0.999)
    query = Gate(1, h1[6] - h1.mean(0), h1.mean(0), 0.999, "query", requires=0, span=2)
    ld = make_patch(model, layers=[2], seed=seed, scale=2.0).layers[2]
    rows = {2: LayerDelta(ld.neuron_indices, ld.deltas, torch.ones_like(ld.neuron_indices))}
    return Patch(rows, make_patch(model).base, gates=(subject, query), method="test")


def _hooks(model) -> list[int]:
    """Hooks on W_out, the decoder layers and the decoder (transformers adds its own too)."""
    arch = resolve(model)
    modules = [*arch.w_out, *arch.decoder_layers, arch.decoder]
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules]


def _logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits  # [B, T, vocab]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_each_row_sees_its_own_patch_and_a_row_without_one_runs_unedited(model_type):
    model = build_tiny(model_type)
    patches = [make_patch(model, seed=1), _gated(model, seed=2), make_patch(model, seed=3)]
    ids = torch.cat([IDS, IDS, IDS.flip(1), IDS])  # [4, T]: row 3 has no patch
    base, hooks = _logits(model, ids), _hooks(model)
    with applied_per_row(model, patches):
        out = _logits(model, ids)
    for row, patch in enumerate(patches):
        with neuronpatch.applied(model, patch):
            alone = _logits(model, ids[row : row + 1])[0]
        assert not torch.allclose(alone, base[row], atol=1e-3)  # the patch does something here
        assert torch.allclose(out[row], alone, atol=1e-5), row
    assert torch.equal(out[3], base[3])  # no patch: bitwise the unedited model
    assert _hooks(model) == hooks  # every hook of the runtime detached
    assert torch.equal(_logits(model, ids), base)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_rows_keep_their_gates_through_kv_cache_steps(model_type):
    model = build_tiny(model_type)
    patches = [_gated(model, seed=2), make_patch(model, seed=1)]
    ids = torch.cat([IDS, IDS])
    with applied_per_row(model, patches), torch.no_grad():
        full = model(input_ids=ids).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, dim=1), full, atol=1e-5)
    with neuronpatch.applied(model, patches[0]):
        assert torch.allclose(full[0], _logits(model, IDS)[0], atol=1e-5)


def test_per_row_needs_a_bare_model_and_keeps_other_patches_out():
    model = build_tiny("llama")
    patch, other = make_patch(model, seed=1), make_patch(model, seed=2)
    base = _logits(model, IDS)
    with neuronpatch.applied(model, patch):
        with (
            pytest.raises(PatchStateError, match="without patches; remove"),
            applied_per_row(model, [other]),
        ):
            pass
        assert neuronpatch.applied_patches(model) == [patch]  # untouched by the refusal
    with applied_per_row(model, [patch]):
        with pytest.raises(PatchStateError, match="inside applied_per_row"):
            neuronpatch.apply(model, other)
        with pytest.raises(PatchStateError, match="inside applied_per_row"):
            neuronpatch.remove(model)
        with pytest.raises(PatchStateError, match="inside applied_per_row"):
            neuronpatch.merge(model)
    assert neuronpatch.applied_patches(model) == []
    assert torch.equal(_logits(model, IDS), base)


def test_a_failure_inside_leaves_the_model_bare():
    model = build_tiny("llama")
    base, hooks = _logits(model, IDS), _hooks(model)
    with pytest.raises(RuntimeError, match="boom"), applied_per_row(model, [make_patch(model)]):
        raise RuntimeError("boom")
    assert _hooks(model) == hooks
    assert torch.equal(_logits(model, IDS), base)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3"])
def test_batched_samples_equal_one_at_a_time(model_type):
    model, tok = build_tiny(model_type), CharTokenizer()
    prompts = ["ab", "a longer prompt", "xyz", "a prompt longer than the length"]
    texts = sample_texts(model, tok, prompts, seed=3, max_length=20)
    assert texts == [sample_text(model, tok, p, seed=3, max_length=20) for p in prompts]
    assert texts[3] == sample_text(model, tok, prompts[3], seed=3, max_length=5)  # prompt only
    assert sample_texts(model, tok, [], seed=3) == []
    # under applied_per_row, row i is sampled with patch i
    patches = [make_patch(model, seed=1, scale=2.0), make_patch(model, seed=2, scale=2.0)]
    with applied_per_row(model, patches):
        edited = sample_texts(model, tok, prompts[:3], seed=3, max_length=20)
    for row, patch in enumerate(patches):
        with neuronpatch.applied(model, patch):
            assert edited[row] == sample_text(model, tok, prompts[row], seed=3, max_length=20)
    assert edited[:2] != texts[:2]
    assert edited[2] == texts[2]


@pytest.mark.slow
def test_batched_samples_of_real_edits_equal_their_samples_alone(smollm2):
    model, tok = smollm2
    requests = [
        {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"},
        {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "English"},
    ]  # fmt: skip
    patches = [
        neuronpatch.edit(model, tok, requests[0]),
        neuronpatch.edit(model, tok, requests[1], method="fine"),
    ]
    prompts = [r["prompt"] for r in requests]
    with applied_per_row(model, patches):
        together = sample_texts(model, tok, [*prompts, "Paris is"], seed=0, max_length=40)
    for prompt, patch, text in zip(prompts, patches, together[:2], strict=True):
        with neuronpatch.applied(model, patch):
            assert text == sample_text(model, tok, prompt, seed=0, max_length=40)
    assert together[0].startswith("The capital of France is Rome")
    assert together[2] == sample_text(model, tok, "Paris is", seed=0, max_length=40)
