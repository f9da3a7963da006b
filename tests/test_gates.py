"""Gated patches: format v2 round trips and refusals, and the runtime's gate semantics."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_TYPES, build_tiny, make_patch

import neuronpatch
from neuronpatch.errors import FormatVersionError, GatedPatchError, GateError
from neuronpatch.inspect import describe
from neuronpatch.patch import Gate, LayerDelta, Patch

GATE_LAYER = 0


def residual(model, ids: torch.Tensor, layer: int = GATE_LAYER) -> torch.Tensor:
    """The residual stream decoder layer ``layer`` outputs: [B, T, hidden]."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


def gated(patch: Patch, gate: Gate) -> Patch:
    """``patch`` with every row above the gate's layer guarded by ``gate``."""
    layers = {
        layer: LayerDelta(ld.neuron_indices, ld.deltas, torch.zeros_like(ld.neuron_indices))
        for layer, ld in patch.layers.items()
        if layer > gate.layer
    }
    return Patch(layers, patch.base, patch.base_fingerprint, gates=(gate,), method="test")


def ungated_part(patch: Patch, gate_layer: int = GATE_LAYER) -> Patch:
    layers = {layer: ld for layer, ld in patch.layers.items() if layer > gate_layer}
    return Patch(layers, patch.base, patch.base_fingerprint, method="test")


def key_gate(model, ids: torch.Tensor, position: int, threshold: float = 0.999) -> Gate:
    """A gate keyed on ``ids[0, position]``'s residual, centred on the sequence mean."""
    h = residual(model, ids)[0]  # [T, hidden]
    centre = h.mean(0)
    return Gate(GATE_LAYER, h[position] - centre, centre, threshold)


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


IDS = torch.tensor([[5, 17, 33, 8, 91, 44, 12, 70, 3, 27]])


def masked_reference(model, patch: Patch, ids: torch.Tensor, first_open: int) -> torch.Tensor:
    """Logits with ``patch``'s rows added only at positions >= first_open, by plain hooks."""
    arch = neuronpatch.arch.resolve(model)
    open_ = (torch.arange(ids.shape[1]) >= first_open).float()[:, None]  # [T, 1]

    def add(ld):
        def hook(module, args, output):
            q = args[0]
            rows = q[..., ld.neuron_indices] * open_.reshape(*([1] * (q.dim() - 2)), -1, 1)
            return output + rows @ ld.deltas

        return hook

    handles = [
        arch.w_out[layer].register_forward_hook(add(ld)) for layer, ld in patch.layers.items()
    ]
    try:
        return logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gate_opens_from_the_matching_position_on(model_type):
    model = build_tiny(model_type)
    patch = make_patch(model, scale=2.0)
    base = logits(model, IDS)
    gate = key_gate(model, IDS, position=4)
    with neuronpatch.applied(model, gated(patch, gate)):
        out = logits(model, IDS)
    expected = masked_reference(model, ungated_part(patch), IDS, first_open=4)
    assert torch.allclose(out[:, :4], base[:, :4], atol=1e-6)  # untouched before the key
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out[:, 4:], base[:, 4:], atol=1e-3)  # the edit does something


def test_closed_gate_leaves_logits_bitwise_and_open_gate_equals_ungated():
    model = build_tiny("llama")
    patch = make_patch(model, scale=2.0)
    base = logits(model, IDS)
    h = residual(model, IDS)[0]
    never = Gate(GATE_LAYER, torch.randn(h.shape[-1]), h.mean(0), 0.999)
    always = Gate(GATE_LAYER, torch.randn(h.shape[-1]), h.mean(0), -0.999)
    with neuronpatch.applied(model, gated(patch, never)):
        assert torch.equal(logits(model, IDS), base)
    with neuronpatch.applied(model, ungated_part(patch)):
        expected = logits(model, IDS)
    with neuronpatch.applied(model, gated(patch, always)):
        assert torch.allclose(logits(model, IDS), expected, atol=1e-5)
    assert torch.equal(logits(model, IDS), base)  # removed: bitwise the original


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_gate_state_carries_across_kv_cache_steps(model_type):
    model = build_tiny(model_type)
    patch = make_patch(model, scale=2.0)
    prompt = IDS[:, :6]
    neuronpatch.apply(model, gated(patch, key_gate(model, IDS, position=4)))
    with torch.no_grad():
        cached = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
        )
        uncached = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            use_cache=False,
        )
        # step by step: the last position's logits with a cache == a full recomputation
        full = model(input_ids=cached).logits[0, -1]
        out = model(input_ids=cached[:, :-1], use_cache=True)
        step = model(input_ids=cached[:, -1:], past_key_values=out.past_key_values).logits[0, -1]
    assert torch.equal(cached, uncached)
    assert torch.allclose(step, full, atol=1e-4)
    # a new prompt without the key starts closed again (state reset per sequence)
    other = torch.tensor([[9, 9, 9, 9]])
    gated_out = logits(model, other)
    neuronpatch.remove(model)
    assert torch.equal(gated_out, logits(model, other))


def test_padding_never_opens_the_gate_and_rows_are_independent():
    model = build_tiny("llama")
    patch = make_patch(model, scale=2.0)
    neuronpatch.apply(model, gated(patch, key_gate(model, IDS, position=4)))
    short = torch.tensor([[40, 41, 42]])
    batch = torch.tensor([[0] * 7 + [40, 41, 42], IDS[0].tolist()])
    mask = torch.tensor([[0] * 7 + [1] * 3, [1] * 10])
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone = [logits(model, short), logits(model, IDS)]
    assert torch.allclose(together[0, 7:], alone[0][0], atol=1e-4)
    assert torch.allclose(together[1], alone[1][0], atol=1e-4)


def test_gated_patch_round_trips_byte_identically(tmp_path):
    model = build_tiny("llama")
    patch = gated(make_patch(model), key_gate(model, IDS, position=4))
    path = patch.save(tmp_path / "g.safetensors")
    loaded = Patch.load(path)
    assert loaded.to_bytes() == patch.to_bytes() == path.read_bytes()
    assert loaded.patch_id == patch.patch_id and loaded.is_gated
    assert loaded.gates[0].equals(patch.gates[0])
    assert b'"format_version":"2"' in path.read_bytes()[:4096]
    plain = ungated_part(make_patch(model))
    assert b'"format_version":"1"' in plain.to_bytes()[:4096]
    assert plain.patch_id != patch.patch_id
    neuronpatch.apply(model, path)
    with pytest.raises(GatedPatchError, match="gated"):
        neuronpatch.merge(model)
    assert not neuronpatch.is_merged(model)


def test_code_that_predates_gates_refuses_a_gated_file(tmp_path, monkeypatch):
    model = build_tiny("llama")
    path = gated(make_patch(model), key_gate(model, IDS, 4)).save(tmp_path / "g.safetensors")
    monkeypatch.setattr(neuronpatch.patch, "SUPPORTED_FORMAT_VERSIONS", (1,))
    with pytest.raises(FormatVersionError, match="Upgrade neuronpatch"):
        Patch.load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key": torch.full((32,), float("nan"))}, "NaN or Inf"),
        ({"centre": torch.full((32,), float("inf"))}, "NaN or Inf"),
        ({"threshold": 1.5}, "strictly between -1 and 1"),
        ({"threshold": float("nan")}, "strictly between -1 and 1"),
        ({"key": torch.ones(16)}, r"expected \[32\]"),
        ({"key": torch.zeros(32)}, "all zeros"),
        ({"layer": 2}, "must read a layer below"),
        ({"layer": 7}, "out of range"),
        ({"kind": "regex"}, "unknown kind"),
    ],
)
def test_bad_gates_are_refused_and_nothing_is_applied(change, message):
    model = build_tiny("llama")
    base = logits(model, IDS)
    fields = {"layer": 0, "key": torch.ones(32), "centre": torch.zeros(32), "threshold": 0.5}
    fields.update(change)
    patch = make_patch(model, layers=[2])
    ld = patch.layers[2]
    rows = {2: LayerDelta(ld.neuron_indices, ld.deltas, torch.zeros_like(ld.neuron_indices))}
    with pytest.raises(GateError, match=message):
        neuronpatch.apply(model, Patch(rows, patch.base, gates=(Gate(**fields),)))
    assert neuronpatch.applied_patches(model) == []
    assert torch.equal(logits(model, IDS), base)


def test_gate_ids_must_name_an_existing_gate():
    model = build_tiny("llama")
    patch = make_patch(model, layers=[2])
    ld = patch.layers[2]
    gate = Gate(0, torch.ones(32), torch.zeros(32), 0.5)
    with pytest.raises(GateError, match="outside -1..0"):
        Patch(
            {2: LayerDelta(ld.neuron_indices, ld.deltas, torch.full_like(ld.neuron_indices, 3))},
            patch.base,
            gates=(gate,),
        )


def test_gated_and_ungated_patches_stack_and_remove_independently():
    model = build_tiny("llama")
    base = logits(model, IDS)
    plain = make_patch(model, layers=[1, 2], seed=1)  # leaves the gate layer alone
    gate_patch = gated(make_patch(model, seed=2, scale=2.0), key_gate(model, IDS, position=4))
    with neuronpatch.applied(model, plain):
        plain_only = logits(model, IDS)
    neuronpatch.apply(model, plain, gate_patch)
    both = logits(model, IDS)
    assert torch.allclose(both[:, :4], plain_only[:, :4], atol=1e-5)
    assert not torch.allclose(both[:, 4:], plain_only[:, 4:], atol=1e-3)
    neuronpatch.remove(model, gate_patch)
    assert torch.equal(logits(model, IDS), plain_only)
    neuronpatch.remove(model, plain)
    assert torch.equal(logits(model, IDS), base)


def test_gates_of_different_layers_keep_their_rows_whatever_the_apply_order():
    # gate numbering is by gate layer; refolding a layer for a later ungated patch must
    # use the same numbering as the gate hooks, or rows would read another gate's state
    model = build_tiny("llama")
    h0, h1 = residual(model, IDS, 0)[0], residual(model, IDS, 1)[0]
    high = Gate(1, h1[6] - h1.mean(0), h1.mean(0), 0.999)  # opens at 6, reads layer 1
    low = Gate(0, h0[2] - h0.mean(0), h0.mean(0), 0.999)  # opens at 2, reads layer 0
    a = gated(make_patch(model, layers=[2], seed=1, scale=2.0), high)
    b = gated(make_patch(model, layers=[2], seed=2, scale=2.0), low)
    plain = make_patch(model, layers=[2], seed=3)
    neuronpatch.apply(model, plain, a, b)  # last refold: gated
    expected = logits(model, IDS)
    neuronpatch.remove(model)
    neuronpatch.apply(model, a, b)
    neuronpatch.apply(model, plain)  # an ungated apply refolds layer 2 with the gated rows
    assert torch.allclose(logits(model, IDS), expected, atol=1e-6)


def conjunction(model, subject_at: int, query_at: int, seed: int = 1) -> Patch:
    """Rows of layer 2 behind gate 1 (layer 1, keyed at ``query_at``), which requires gate 0
    (layer 0, keyed at ``subject_at``): a ``gate_key="both"`` patch in miniature."""
    h0, h1 = residual(model, IDS, 0)[0], residual(model, IDS, 1)[0]
    subject = Gate(0, h0[subject_at] - h0.mean(0), h0.mean(0), 0.999)
    query = Gate(1, h1[query_at] - h1.mean(0), h1.mean(0), 0.999, kind="query", requires=0)
    ld = make_patch(model, layers=[2], seed=seed, scale=2.0).layers[2]
    rows = {2: LayerDelta(ld.neuron_indices, ld.deltas, torch.ones_like(ld.neuron_indices))}
    return Patch(rows, make_patch(model).base, gates=(subject, query), method="test")


def test_a_gate_that_requires_another_opens_only_where_both_are_open():
    model = build_tiny("llama")
    base = logits(model, IDS)
    patch = conjunction(model, subject_at=2, query_at=6)
    ld = patch.layers[2]
    plain = Patch({2: LayerDelta(ld.neuron_indices, ld.deltas)}, patch.base, method="test")
    with neuronpatch.applied(model, patch):
        out = logits(model, IDS)
    assert torch.allclose(out, masked_reference(model, plain, IDS, first_open=6), atol=1e-5)
    # the query matches from 2 on, but the required gate only from 6 on
    late = conjunction(model, subject_at=6, query_at=2)
    with neuronpatch.applied(model, late):
        out = logits(model, IDS)
    assert torch.allclose(out, masked_reference(model, plain, IDS, first_open=6), atol=1e-5)
    # a required gate that never opens keeps the query gate shut: bitwise the base logits
    h0 = residual(model, IDS, 0)[0]
    never = Gate(0, torch.randn(h0.shape[-1]), h0.mean(0), 0.999)
    shut = Patch(patch.layers, patch.base, gates=(never, patch.gates[1]), method="test")
    with neuronpatch.applied(model, shut):
        assert torch.equal(logits(model, IDS), base)
    assert torch.equal(logits(model, IDS), base)


def test_required_gates_survive_files_stacks_and_unstacking():
    from neuronpatch.stacking import stack, unstack

    model = build_tiny("llama")
    a, b = conjunction(model, 2, 6, seed=1), conjunction(model, 3, 8, seed=2)
    assert Patch.from_bytes(a.to_bytes()).gates[1].requires == 0
    assert Patch.from_bytes(a.to_bytes()).to_bytes() == a.to_bytes()
    stacked = stack([a, b])
    assert [g.requires for g in stacked.gates] == [None, 0, None, 2]  # renumbered
    with neuronpatch.applied(model, a, b):
        expected = logits(model, IDS)
    with neuronpatch.applied(model, stacked):
        assert torch.allclose(logits(model, IDS), expected, atol=1e-5)
    assert [p.to_bytes() for p in unstack(stacked)] == [a.to_bytes(), b.to_bytes()]
    info = describe(a)
    assert [g.get("requires") for g in info["gates"]] == [None, 0]


@pytest.mark.parametrize(
    ("requires", "layer", "message"),
    [
        (1, 1, "must name an earlier gate"),
        (-1, 1, "must name an earlier gate"),
        (0, 0, "must read a lower layer"),
    ],
)
def test_bad_required_gates_are_refused(requires, layer, message):
    model = build_tiny("llama")
    patch = conjunction(model, 2, 6)
    first, second = patch.gates
    bad = Gate(layer, second.key, second.centre, 0.5, "query", requires)
    with pytest.raises(GateError, match=message):
        Patch(patch.layers, patch.base, gates=(first, bad))
