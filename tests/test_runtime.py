"""The hook runtime: apply / remove / stack / merge, atomicity, compatibility checks, generation."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build_tiny, make_patch

import neuronpatch
from neuronpatch import Patch
from neuronpatch.arch import resolve
from neuronpatch.errors import (
    ArchitectureMismatchError,
    FingerprintMismatchError,
    MergedStateError,
    PatchAlreadyAppliedError,
    PatchNotAppliedError,
    PatchNotFoundError,
)

# --- helpers ---------------------------------------------------------------------------


def _ids(model, batch: int = 2, seq: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)  # [batch, seq]


@torch.no_grad()
def _logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits  # [batch, seq, vocab]


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _assert_weights_equal(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(after[name], before[name])]
    assert changed == []


def _hooks(model) -> list[int]:
    """Number of forward hooks on each W_out."""
    return [len(m._forward_hooks) for m in resolve(model).w_out]


def _assert_pristine(model, base_logits: torch.Tensor, ids: torch.Tensor) -> None:
    assert neuronpatch.applied_patches(model) == []
    assert not neuronpatch.is_merged(model)
    assert _hooks(model) == [0] * len(_hooks(model))
    assert torch.equal(_logits(model, ids), base_logits)


def _manual_patch(model, layers: dict[int, tuple[list[int], torch.Tensor]], **base_overrides):
    arch = resolve(model)
    base = dict(
        name_or_path=model.config.name_or_path,
        model_type=arch.model_type,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
    )
    base.update(base_overrides)
    content = {layer: (torch.tensor(idx), deltas) for layer, (idx, deltas) in layers.items()}
    return Patch(content, neuronpatch.BaseModelInfo(**base))


# --- hook vs. merge, remove, unmerge on every architecture ---------------------------


def test_hook_equals_merged(tiny_model):
    ids = _ids(tiny_model, batch=2, seq=6)
    base = _logits(tiny_model, ids)
    patch = make_patch(tiny_model, k=4, scale=0.5)
    neuronpatch.apply(tiny_model, patch)
    hooked = _logits(tiny_model, ids)
    # the patch must actually do something, or hook == merged would hold trivially
    assert (hooked - base).abs().max() > 1e-3
    neuronpatch.merge(tiny_model)
    assert _hooks(tiny_model) == [0, 0, 0]  # merged: the weights carry the edit, no hooks
    merged = _logits(tiny_model, ids)
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)


def test_remove_restores_logits_bitwise(tiny_model):
    ids = _ids(tiny_model)
    base = _logits(tiny_model, ids)
    weights = _weights(tiny_model)
    neuronpatch.apply(tiny_model, make_patch(tiny_model))
    assert _hooks(tiny_model) == [1, 1, 1]
    assert not torch.equal(_logits(tiny_model, ids), base)
    neuronpatch.remove(tiny_model)
    _assert_pristine(tiny_model, base, ids)
    _assert_weights_equal(tiny_model, weights)


def test_unmerge_restores_weights_bitwise(tiny_model):
    ids = _ids(tiny_model)
    weights = _weights(tiny_model)
    patch = make_patch(tiny_model)
    neuronpatch.apply(tiny_model, patch)
    hooked = _logits(tiny_model, ids)
    neuronpatch.merge(tiny_model)
    assert neuronpatch.is_merged(tiny_model)
    w_out = resolve(tiny_model).w_out[0].weight
    name = next(n for n, p in tiny_model.named_parameters() if p is w_out)
    assert not torch.equal(w_out, weights[name])  # merge really wrote into W_out
    neuronpatch.unmerge(tiny_model)
    assert not neuronpatch.is_merged(tiny_model)
    _assert_weights_equal(tiny_model, weights)
    # back on hooks: same output as before merging, patch still applied
    assert _hooks(tiny_model) == [1, 1, 1]
    assert neuronpatch.applied_patches(tiny_model) == [patch]
    assert torch.equal(_logits(tiny_model, ids), hooked)


# --- stacking ------------------------------------------------------------------------


def _stack_patches(model):
    """A and B share layer 1 and neuron 3 there; ``both`` is their sum written by hand."""
    g = torch.Generator().manual_seed(0)

    def d(k):
        return torch.randn(k, 32, generator=g)  # [k, hidden]

    a0, a1, b1, b2 = d(3), d(2), d(2), d(1)
    a = _manual_patch(model, {0: ([1, 5, 9], a0), 1: ([2, 3], a1)})
    b = _manual_patch(model, {1: ([3, 7], b1), 2: ([4], b2)})
    both = _manual_patch(
        model,
        {
            0: ([1, 5, 9], a0),
            1: ([2, 3, 7], torch.stack([a1[0], a1[1] + b1[0], b1[1]])),  # neuron 3: A + B
            2: ([4], b2),
        },
    )
    return a, b, both


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_stacking_is_order_free_and_sums_shared_neurons(model_type):
    model = build_tiny(model_type)
    ids = _ids(model)
    a, b, both = _stack_patches(model)

    neuronpatch.apply(model, a)
    only_a = _logits(model, ids)
    neuronpatch.apply(model, b)
    a_then_b = _logits(model, ids)
    neuronpatch.remove(model)

    neuronpatch.apply(model, b)
    neuronpatch.apply(model, a)
    b_then_a = _logits(model, ids)
    neuronpatch.remove(model)

    neuronpatch.apply(model, both)
    combined = _logits(model, ids)
    neuronpatch.remove(model)

    assert (a_then_b - only_a).abs().max() > 1e-3  # B contributes
    torch.testing.assert_close(a_then_b, b_then_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a_then_b, combined, atol=1e-6, rtol=1e-6)

    # the shared neuron is summed, not overwritten: dropping B's share of neuron 3 differs
    a1, b1 = a.layers[1].deltas, b.layers[1].deltas
    overwritten = _manual_patch(
        model,
        {
            0: ([1, 5, 9], a.layers[0].deltas),
            1: ([2, 3, 7], torch.stack([a1[0], b1[0], b1[1]])),
            2: ([4], b.layers[2].deltas),
        },
    )
    neuronpatch.apply(model, overwritten)
    assert (_logits(model, ids) - combined).abs().max() > 1e-3


def test_stacked_merge_equals_hooks_and_unmerges_bitwise():
    model = build_tiny("llama")
    ids = _ids(model)
    weights = _weights(model)
    a, b, _ = _stack_patches(model)
    neuronpatch.apply(model, a, b)
    hooked = _logits(model, ids)
    neuronpatch.merge(model)
    torch.testing.assert_close(_logits(model, ids), hooked, atol=1e-5, rtol=1e-5)
    neuronpatch.unmerge(model)
    _assert_weights_equal(model, weights)


# --- atomic apply ----------------------------------------------------------------------


def _bad_patches(model, tmp_path):
    """(kind, patch-like, expected error) that are each invalid for ``model`` (a tiny llama)."""
    other_arch = make_patch(build_tiny("gpt2"), layers=[0])
    wider = _manual_patch(model, {0: ([1], torch.ones(1, 48))}, hidden_size=48)
    # index 100 is valid for the patch's claimed base (intermediate 128) but not this model
    out_of_range = _manual_patch(model, {0: ([100], torch.ones(1, 32))}, intermediate_size=128)
    other_weights = make_patch(build_tiny("llama", seed=1), layers=[0])
    return {
        "model_type": (other_arch, ArchitectureMismatchError),
        "hidden_size": (wider, ArchitectureMismatchError),
        "out_of_range": (out_of_range, ArchitectureMismatchError),
        "fingerprint": (other_weights, FingerprintMismatchError),
        "missing_file": (str(tmp_path / "nope.safetensors"), PatchNotFoundError),
    }


BAD_KINDS = ["model_type", "hidden_size", "out_of_range", "fingerprint", "missing_file"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_apply_is_atomic(kind, tmp_path):
    model = build_tiny("llama")
    ids = _ids(model)
    base = _logits(model, ids)
    good = make_patch(model, seed=1)
    bad, error = _bad_patches(model, tmp_path)[kind]
    with pytest.raises(error):
        neuronpatch.apply(model, good, bad)
    _assert_pristine(model, base, ids)
    with pytest.raises(error):
        neuronpatch.apply(model, [good, [bad]])  # nested lists too
    _assert_pristine(model, base, ids)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_failed_apply_keeps_earlier_patches(kind, tmp_path):
    model = build_tiny("llama")
    ids = _ids(model)
    first = make_patch(model, seed=1)
    neuronpatch.apply(model, first)
    patched = _logits(model, ids)
    bad, error = _bad_patches(model, tmp_path)[kind]
    with pytest.raises(error):
        neuronpatch.apply(model, make_patch(model, seed=2), bad)
    assert neuronpatch.applied_patches(model) == [first]
    assert _hooks(model) == [1, 1, 1]
    assert torch.equal(_logits(model, ids), patched)


# --- compatibility: architecture and fingerprint ----------------------------------------


def test_architecture_mismatch_names_patch_and_sizes(tmp_path):
    model = build_tiny("llama")
    wider = _manual_patch(model, {0: ([1], torch.ones(1, 48))}, hidden_size=48)
    with pytest.raises(ArchitectureMismatchError) as info:
        neuronpatch.apply(model, wider)
    message = str(info.value)
    assert wider.label in message
    assert "hidden 48" in message and "hidden 32" in message

    path = wider.save(tmp_path / "wider.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="wider.safetensors") as info:
        neuronpatch.apply(model, path)
    assert "hidden 48" in str(info.value) and "hidden 32" in str(info.value)
    assert neuronpatch.applied_patches(model) == []


def test_fingerprint_rejects_other_weights_unless_forced():
    patch = make_patch(build_tiny("llama", seed=0))
    other = build_tiny("llama", seed=1)
    ids = _ids(other)
    base = _logits(other, ids)
    with pytest.raises(FingerprintMismatchError, match="force=True"):
        neuronpatch.apply(other, patch)
    _assert_pristine(other, base, ids)

    with pytest.warns(UserWarning, match="fingerprint"):
        neuronpatch.apply(other, patch, force=True)
    assert neuronpatch.applied_patches(other) == [patch]
    assert not torch.equal(_logits(other, ids), base)


def test_fingerprint_accepts_same_base_in_bfloat16():
    patch = make_patch(build_tiny("llama", seed=0))
    model = build_tiny("llama", seed=0, dtype=torch.bfloat16)
    ids = _ids(model)
    base = _logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fingerprint warning either
        neuronpatch.apply(model, patch)
    assert neuronpatch.applied_patches(model) == [patch]
    patched = _logits(model, ids)
    assert patched.dtype == torch.bfloat16
    assert not torch.equal(patched, base)


def test_bfloat16_deltas_are_cast_to_the_weight_dtype():
    model = build_tiny("llama", dtype=torch.bfloat16)
    patch = make_patch(build_tiny("llama"), layers=[1])  # fp32 deltas
    assert patch.layers[1].deltas.dtype == torch.float32
    neuronpatch.apply(model, patch)
    w_out = resolve(model).w_out[1]
    q = torch.randn(2, 5, 64, dtype=torch.bfloat16)  # [batch, seq, intermediate]
    with torch.no_grad():
        hooked = w_out(q)  # a dtype mismatch in the fold would raise in the hook's matmul
        plain = torch.nn.functional.linear(q, w_out.weight, w_out.bias)
    assert hooked.dtype == torch.bfloat16
    ld = patch.layers[1]
    expected = plain + q[..., ld.neuron_indices] @ ld.deltas.to(torch.bfloat16)
    torch.testing.assert_close(hooked, expected)
    assert (hooked.float() - plain.float()).abs().max() > 1e-2


# --- applying twice ------------------------------------------------------------------


def test_same_patch_twice_is_refused(tmp_path):
    model = build_tiny("llama")
    ids = _ids(model)
    patch = make_patch(model)
    path = patch.save(tmp_path / "p.safetensors")
    neuronpatch.apply(model, patch)
    patched = _logits(model, ids)

    for again in (patch, path, str(path), Patch.load(path)):
        with pytest.raises(PatchAlreadyAppliedError, match="already applied"):
            neuronpatch.apply(model, again)
        assert neuronpatch.applied_patches(model) == [patch]
        assert _hooks(model) == [1, 1, 1]
        assert torch.equal(_logits(model, ids), patched)


def test_same_patch_twice_in_one_call_is_refused(tmp_path):
    model = build_tiny("llama")
    ids = _ids(model)
    base = _logits(model, ids)
    patch = make_patch(model)
    path = patch.save(tmp_path / "p.safetensors")
    for pair in ((patch, patch), (patch, path)):
        with pytest.raises(PatchAlreadyAppliedError):
            neuronpatch.apply(model, *pair)
        _assert_pristine(model, base, ids)


# --- remove ------------------------------------------------------------------------


def test_remove_one_keeps_the_other():
    model = build_tiny("llama")
    ids = _ids(model)
    a, b = make_patch(model, seed=1), make_patch(model, layers=[0, 2], seed=2)
    neuronpatch.apply(model, b)
    only_b = _logits(model, ids)
    neuronpatch.remove(model, b)

    neuronpatch.apply(model, a, b)
    assert not torch.equal(_logits(model, ids), only_b)
    neuronpatch.remove(model, a)
    assert neuronpatch.applied_patches(model) == [b]
    assert _hooks(model) == [1, 0, 1]  # layer 1 was only patched by A: its hook is gone
    assert torch.equal(_logits(model, ids), only_b)


def test_remove_not_applied_raises():
    model = build_tiny("llama")
    a, b = make_patch(model, seed=1), make_patch(model, seed=2)
    with pytest.raises(PatchNotAppliedError):
        neuronpatch.remove(model, a)  # nothing applied at all
    neuronpatch.apply(model, a)
    with pytest.raises(PatchNotAppliedError, match="not applied"):
        neuronpatch.remove(model, b)
    assert neuronpatch.applied_patches(model) == [a]
    neuronpatch.remove(model, a)
    with pytest.raises(PatchNotAppliedError):
        neuronpatch.remove(model, a)  # already removed


def test_remove_by_path(tmp_path):
    model = build_tiny("llama")
    ids = _ids(model)
    base = _logits(model, ids)
    a, b = make_patch(model, seed=1), make_patch(model, seed=2)
    path_a = a.save(tmp_path / "a.safetensors")
    path_b = b.save(tmp_path / "b.safetensors")

    # applied from a path, removed by the same path
    neuronpatch.apply(model, str(path_a))
    neuronpatch.remove(model, path_a)
    _assert_pristine(model, base, ids)

    # applied as an object, removed by the path of a file holding the same content
    neuronpatch.apply(model, b)
    neuronpatch.remove(model, str(path_b))
    _assert_pristine(model, base, ids)

    # a path that is not applied
    neuronpatch.apply(model, a)
    with pytest.raises(PatchNotAppliedError):
        neuronpatch.remove(model, path_b)
    with pytest.raises(PatchNotAppliedError):
        neuronpatch.remove(model, tmp_path / "missing.safetensors")
    assert neuronpatch.applied_patches(model) == [a]


def test_remove_by_path_next_to_patches_without_a_file(tmp_path):
    """Other applied patches may come from bytes, or from a file deleted since."""
    model = build_tiny("llama")
    ids = _ids(model)
    a, b, c = (make_patch(model, seed=s) for s in (1, 2, 3))
    from_bytes = Patch.from_bytes(a.to_bytes())  # source "<bytes>"
    gone = c.save(tmp_path / "c.safetensors")
    neuronpatch.apply(model, from_bytes, Patch.load(gone))
    gone.unlink()
    neuronpatch.apply(model, str(b.save(tmp_path / "b.safetensors")))
    neuronpatch.remove(model, tmp_path / "b.safetensors")
    assert [p.patch_id for p in neuronpatch.applied_patches(model)] == [a.patch_id, c.patch_id]
    neuronpatch.remove(model)
    assert neuronpatch.applied_patches(model) == []
    assert _hooks(model) == [0, 0, 0]
    assert torch.equal(_logits(model, ids), _logits(build_tiny("llama"), ids))


# --- context manager -------------------------------------------------------------------


def test_applied_context_manager():
    model = build_tiny("llama")
    ids = _ids(model)
    base = _logits(model, ids)
    patch = make_patch(model)
    neuronpatch.apply(model, patch)
    patched = _logits(model, ids)
    neuronpatch.remove(model)

    with neuronpatch.applied(model, patch) as inside:
        assert inside is model
        assert neuronpatch.applied_patches(model) == [patch]
        assert torch.equal(_logits(model, ids), patched)
    _assert_pristine(model, base, ids)

    with pytest.raises(KeyError), neuronpatch.applied(model, patch):
        assert torch.equal(_logits(model, ids), patched)
        raise KeyError("boom")
    _assert_pristine(model, base, ids)


def test_applied_context_manager_keeps_outer_patches():
    model = build_tiny("llama")
    ids = _ids(model)
    outer, inner = make_patch(model, seed=1), make_patch(model, seed=2)
    neuronpatch.apply(model, outer)
    only_outer = _logits(model, ids)
    with neuronpatch.applied(model, inner):
        assert neuronpatch.applied_patches(model) == [outer, inner]
        assert not torch.equal(_logits(model, ids), only_outer)
    assert neuronpatch.applied_patches(model) == [outer]
    assert torch.equal(_logits(model, ids), only_outer)
    # re-entering with an already applied patch fails up front and removes nothing
    with pytest.raises(PatchAlreadyAppliedError), neuronpatch.applied(model, outer):
        pass
    assert neuronpatch.applied_patches(model) == [outer]


# --- merge state ------------------------------------------------------------------------


def test_merged_state_refuses_apply_and_remove():
    model = build_tiny("llama")
    ids = _ids(model)
    a, b = make_patch(model, seed=1), make_patch(model, seed=2)
    neuronpatch.apply(model, a)
    assert not neuronpatch.is_merged(model)
    neuronpatch.merge(model)
    assert neuronpatch.is_merged(model)
    merged = _logits(model, ids)
    weights = _weights(model)

    with pytest.raises(MergedStateError, match="unmerge"):
        neuronpatch.apply(model, b)
    with pytest.raises(MergedStateError):
        neuronpatch.remove(model, a)
    with pytest.raises(MergedStateError):
        neuronpatch.remove(model)
    with pytest.raises(MergedStateError), neuronpatch.applied(model, b):
        pass
    assert neuronpatch.applied_patches(model) == [a]
    _assert_weights_equal(model, weights)
    assert torch.equal(_logits(model, ids), merged)

    neuronpatch.merge(model)  # merging twice is a no-op, not a double add
    _assert_weights_equal(model, weights)
    neuronpatch.unmerge(model)
    neuronpatch.apply(model, b)  # allowed again once unmerged
    assert neuronpatch.applied_patches(model) == [a, b]


def test_merge_unmerge_round_trips_repeatedly():
    model = build_tiny("gpt2")  # Conv1D orientation
    ids = _ids(model)
    weights = _weights(model)
    neuronpatch.apply(model, make_patch(model))
    hooked = _logits(model, ids)
    for _ in range(3):
        neuronpatch.merge(model)
        torch.testing.assert_close(_logits(model, ids), hooked, atol=1e-5, rtol=1e-5)
        neuronpatch.unmerge(model)
        _assert_weights_equal(model, weights)
        assert torch.equal(_logits(model, ids), hooked)
    neuronpatch.unmerge(model)  # unmerging an unmerged model is a no-op
    assert not neuronpatch.is_merged(model)
    _assert_weights_equal(model, weights)


# --- generation, padding -----------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_generate_with_kv_cache_hook_equals_merged(model_type):
    model = build_tiny(model_type)
    ids = _ids(model, batch=1, seq=5, seed=3)
    settings = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        neuronpatch.apply(model, make_patch(model, k=8, scale=2.0))
        hooked = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        neuronpatch.merge(model)
        merged = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    assert hooked.shape[1] > ids.shape[1]
    assert torch.equal(hooked, merged)
    assert not torch.equal(hooked, plain)  # the edit changes the greedy continuation


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_left_padded_batch_matches_rows_alone(model_type):
    model = build_tiny(model_type)
    neuronpatch.apply(model, make_patch(model, scale=1.0))
    long_row, short_row = _ids(model, batch=1, seq=7, seed=1), _ids(model, batch=1, seq=4, seed=2)
    pad = 3
    ids = torch.cat([long_row, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [batch, seq]
    batched = _logits(model, ids, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(batched[0], _logits(model, long_row)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, pad:], _logits(model, short_row)[0], atol=1e-5, rtol=1e-5)


# --- real models ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_real_model_hook_merge_remove(request, fixture):
    model, tokenizer = request.getfixturevalue(fixture)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # [1, seq]
    weights = _weights(model)
    base = _logits(model, ids)
    patch = make_patch(model, layers=[2, 5, 9], k=8, scale=0.5)
    try:
        neuronpatch.apply(model, patch)
        hooked = _logits(model, ids)
        assert (hooked - base).abs().max() > 1e-2
        neuronpatch.merge(model)
        merged = _logits(model, ids)
        neuronpatch.unmerge(model)
        _assert_weights_equal(model, weights)
        neuronpatch.remove(model)
        _assert_pristine(model, base, ids)
    finally:  # the model is shared by the session: never leave it patched
        neuronpatch.unmerge(model)
        neuronpatch.remove(model)
    # Looser than the tiny models' 1e-5: merged and hooked forms sum the same terms in a
    # different order, and the fp32 reassociation error grows through the real model's layers.
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_bfloat16_cpu_device_map_accepts_fp32_patch(smollm2):
    fp32_model, tokenizer = smollm2
    patch = make_patch(fp32_model, layers=[3, 10], k=8, scale=0.5)
    model, _ = neuronpatch.load_model("smollm2-135m", dtype=torch.bfloat16, device_map="cpu")
    assert resolve(model).w_out[3].weight.dtype == torch.bfloat16
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    base = _logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # fingerprint accepted without force
        neuronpatch.apply(model, patch)
    patched = _logits(model, ids)
    assert patched.dtype == torch.bfloat16
    assert torch.isfinite(patched).all()
    assert not torch.equal(patched, base)
    neuronpatch.remove(model)
    assert torch.equal(_logits(model, ids), base)
