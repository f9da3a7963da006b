"""Gated patches: format v2 round trips and refusals, and the runtime's gate semantics."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import MODEL_TYPES, build_tiny, make_patch

import neuronpatch
from neuronpatch.errors import CorruptPatchError, FormatVersionError, GatedPatchError, GateError
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


def full_and_stepped(model, patch: Patch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of IDS with ``patch`` applied: one full pass, and one token per KV-cache step
    (each [1, T, vocab])."""
    with neuronpatch.applied(model, patch), torch.no_grad():
        full = model(input_ids=IDS).logits
        cache, steps = None, []
        for t in range(IDS.shape[1]):
            out = model(input_ids=IDS[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    return full, torch.stack(steps, dim=1)


def open_reference(model, patch: Patch, ids: torch.Tensor, open_at: list[int]) -> torch.Tensor:
    """Logits with ``patch``'s rows added only at the positions ``open_at``, by plain hooks."""
    arch = neuronpatch.arch.resolve(model)
    open_ = torch.zeros(ids.shape[1])
    open_[open_at] = 1.0

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


def masked_reference(model, patch: Patch, ids: torch.Tensor, first_open: int) -> torch.Tensor:
    """Logits with ``patch``'s rows added only at positions >= first_open, by plain hooks."""
    return open_reference(model, patch, ids, list(range(first_open, ids.shape[1])))


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
    ("requires", "layer", "first_layer", "message"),
    [
        (1, 1, 0, "must name an earlier gate"),
        (-1, 1, 0, "must name an earlier gate"),
        (0, 0, 1, "must read the same or a lower layer"),
    ],
)
def test_bad_required_gates_are_refused(requires, layer, first_layer, message):
    model = build_tiny("llama")
    patch = conjunction(model, 2, 6)
    first, second = patch.gates
    first = Gate(first_layer, first.key, first.centre, first.threshold)
    bad = Gate(layer, second.key, second.centre, 0.5, "query", requires)
    with pytest.raises(GateError, match=message):
        Patch(patch.layers, patch.base, gates=(first, bad))


# --- a gate requiring a gate of its own layer (format v4) ---------------------------------


def three_gates(model, subject_at: int, wording_at: int, query_at: int, span=None) -> Patch:
    """Rows at layer 2 behind query (layer 1) <- wording (layer 0) <- subject (layer 0): the
    default gates with a wording gate, in miniature; keys at the given positions of IDS."""
    h0, h1 = residual(model, IDS, 0)[0], residual(model, IDS, 1)[0]
    c0, c1 = h0.mean(0), h1.mean(0)
    subject = Gate(0, h0[subject_at] - c0, c0, 0.999)
    wording = Gate(0, h0[wording_at] - c0, c0, 0.999, "query", requires=0, span=span)
    query = Gate(1, h1[query_at] - c1, c1, 0.999, "query", requires=1, span=span)
    ld = make_patch(model, layers=[2], scale=2.0).layers[2]
    rows = {2: LayerDelta(ld.neuron_indices, ld.deltas, torch.full_like(ld.neuron_indices, 2))}
    return Patch(rows, make_patch(model).base, gates=(subject, wording, query), method="test")


def test_a_gate_may_require_a_gate_of_its_own_layer():
    model = build_tiny("llama")
    base = logits(model, IDS)
    patch = three_gates(model, subject_at=2, wording_at=6, query_at=6)
    ld = patch.layers[2]
    plain = Patch({2: LayerDelta(ld.neuron_indices, ld.deltas)}, patch.base, method="test")
    with neuronpatch.applied(model, patch):
        out = logits(model, IDS)
    assert torch.allclose(out, masked_reference(model, plain, IDS, first_open=6), atol=1e-5)
    # the chain is a conjunction: the same-layer wording gate opening late holds all back
    late = three_gates(model, subject_at=2, wording_at=8, query_at=6)
    with neuronpatch.applied(model, late):
        out = logits(model, IDS)
    assert torch.allclose(out, masked_reference(model, plain, IDS, first_open=8), atol=1e-5)
    # a wording gate that never opens keeps the rows out: bitwise the base logits
    subject, wording, query = patch.gates
    never = Gate(0, torch.randn(wording.key.shape), wording.centre, 0.999, "query", 0)
    shut = Patch(patch.layers, patch.base, gates=(subject, never, query), method="test")
    with neuronpatch.applied(model, shut):
        assert torch.equal(logits(model, IDS), base)
    # so does a subject gate that never opens, though the gates that require it match
    nobody = Gate(0, torch.randn(subject.key.shape), subject.centre, 0.999)
    shut = Patch(patch.layers, patch.base, gates=(nobody, wording, query), method="test")
    with neuronpatch.applied(model, shut):
        assert torch.equal(logits(model, IDS), base)


@pytest.mark.parametrize("span", [None, 3])
def test_same_layer_conjunctions_step_through_a_kv_cache_as_one_pass(span):
    model = build_tiny("llama")
    patch = three_gates(model, subject_at=2, wording_at=6, query_at=6, span=span)
    full, stepped = full_and_stepped(model, patch)
    assert torch.allclose(stepped, full, atol=1e-4)
    assert not torch.allclose(full, logits(model, IDS), atol=1e-4)


def test_same_layer_conjunctions_are_format_version_4_and_round_trip(tmp_path, monkeypatch):
    from neuronpatch.errors import CorruptPatchError
    from neuronpatch.stacking import stack, unstack

    model = build_tiny("llama")
    patch = three_gates(model, subject_at=2, wording_at=6, query_at=6)
    path = patch.save(tmp_path / "w.safetensors")
    raw = path.read_bytes()
    assert b'"format_version":"4"' in raw[:4096]
    loaded = Patch.load(path)
    assert loaded.to_bytes() == raw
    assert [(g.layer, g.requires) for g in loaded.gates] == [(0, None), (0, 0), (1, 1)]
    other = conjunction(model, 3, 8, seed=2)  # v2 beside v4 in one stack
    stacked = stack([patch, other])
    assert [g.requires for g in stacked.gates] == [None, 0, 1, None, 3]
    assert b'"format_version":"4"' in stacked.to_bytes()[:4096]
    assert [p.to_bytes() for p in unstack(stacked)] == [raw, other.to_bytes()]
    # a same-layer requirement in a file that says version 3 is corrupt, not reinterpreted
    forged = raw.replace(b'"format_version":"4"', b'"format_version":"3"')
    with pytest.raises(CorruptPatchError, match="version 3 does not define"):
        Patch.from_bytes(forged)
    # a reader that knows versions 1-3 refuses the file instead of misreading its chain
    monkeypatch.setattr(neuronpatch.patch, "SUPPORTED_FORMAT_VERSIONS", (1, 2, 3))
    with pytest.raises(FormatVersionError, match="Upgrade neuronpatch"):
        Patch.load(path)


def test_a_deeper_same_layer_chain_is_version_5_and_a_version_4_file_may_not_hold_one():
    from neuronpatch.errors import CorruptPatchError

    model = build_tiny("llama")
    subject, wording, query = three_gates(model, 2, 6, 6).gates
    # a third gate of layer 0 requiring the wording gate, which requires the subject gate
    chained = Gate(0, wording.key, wording.centre, 0.999, "query", 1)
    patch = three_gates(model, 2, 6, 6)
    rows = {
        2: LayerDelta(
            *[getattr(patch.layers[2], f) for f in ("neuron_indices", "deltas")],
            torch.full_like(patch.layers[2].neuron_indices, 2),
        )
    }
    deep = Patch(rows, patch.base, gates=(subject, wording, chained), method="test")
    raw = deep.to_bytes()
    assert b'"format_version":"5"' in raw[:4096]
    plain = Patch({2: LayerDelta(rows[2].neuron_indices, rows[2].deltas)}, patch.base)
    with neuronpatch.applied(model, deep):
        out = logits(model, IDS)
    assert torch.allclose(out, masked_reference(model, plain, IDS, first_open=6), atol=1e-5)
    with pytest.raises(CorruptPatchError, match="version 4 does not define"):
        Patch.from_bytes(raw.replace(b'"format_version":"5"', b'"format_version":"4"'))


def test_a_same_layer_required_gate_that_requires_a_lower_one_is_version_5_too():
    # version 4 settled a layer's requirements in one step: a required gate of the same layer
    # had to require nothing, even a gate of a lower layer
    model = build_tiny("llama")
    word, lenient, strict = escape(model, 3, 5, 7).gates
    chain = (word, replace(lenient, requires=0), replace(strict, any_of=()))  # 1@1 <- 0@0
    patch = Patch(escape(model, 3, 5, 7).layers, make_patch(model).base, gates=chain)
    raw = patch.to_bytes()
    assert b'"format_version":"5"' in raw[:4096]
    ld = patch.layers[2]
    plain = Patch({2: LayerDelta(ld.neuron_indices, ld.deltas)}, patch.base, method="test")
    with neuronpatch.applied(model, patch):
        out = logits(model, IDS)
    assert torch.allclose(out, masked_reference(model, plain, IDS, first_open=7), atol=1e-5)
    with pytest.raises(CorruptPatchError, match="version 4 does not define"):
        Patch.from_bytes(raw.replace(b'"format_version":"5"', b'"format_version":"4"'))


# --- alternatives (format v5): a gate also open wherever one of `any_of` is ---------------

NEVER = torch.Generator().manual_seed(7)


def escape(model, word_at, lenient_at, strict_at, query_at=None) -> Patch:
    """The word escape of ``strict_margin`` in miniature: rows of layer 2 behind
    ``lenient AND (strict OR word)``, then a same-layer query gate (a chain two deep):
    word (layer 0) | lenient (1) | strict (1, any_of word, requires lenient) | query (1,
    requires strict). Each gate keyed at the given position of IDS; None: a key that never
    matches."""
    h0, h1 = residual(model, IDS, 0)[0], residual(model, IDS, 1)[0]
    c0, c1 = h0.mean(0), h1.mean(0)

    def key(h, c, at):
        return h[at] - c if at is not None else torch.randn(h.shape[-1], generator=NEVER)

    word = Gate(0, key(h0, c0, word_at), c0, 0.999)
    lenient = Gate(1, key(h1, c1, lenient_at), c1, 0.999)
    strict = Gate(1, key(h1, c1, strict_at), c1, 0.999, requires=1, any_of=(0,))
    query = Gate(1, key(h1, c1, query_at), c1, 0.999, "query", requires=2)
    gates = (word, lenient, strict) if query_at is None else (word, lenient, strict, query)
    ld = make_patch(model, layers=[2], scale=2.0).layers[2]
    ids = torch.full_like(ld.neuron_indices, len(gates) - 1)
    rows = {2: LayerDelta(ld.neuron_indices, ld.deltas, ids)}
    return Patch(rows, make_patch(model).base, gates=gates, method="test")


@pytest.mark.parametrize(
    ("word_at", "lenient_at", "strict_at", "query_at", "first_open"),
    [
        (3, 5, None, None, 5),  # a word matched: lenient alone opens it
        (None, 5, 7, None, 7),  # no word: the strict gate must match
        (7, 5, 3, None, 5),  # strict matched first: lenient still required
        (3, 5, None, 8, 8),  # the two-deep same-layer chain: the query gate too
        (None, 5, None, None, None),  # neither strict nor a word: shut
        (3, None, 3, None, None),  # no lenient match: shut, whatever else matched
    ],
)
def test_a_gate_is_open_where_its_own_match_or_an_alternative_is(
    word_at, lenient_at, strict_at, query_at, first_open
):
    model = build_tiny("llama")
    base = logits(model, IDS)
    patch = escape(model, word_at, lenient_at, strict_at, query_at)
    ld = patch.layers[2]
    plain = Patch({2: LayerDelta(ld.neuron_indices, ld.deltas)}, patch.base, method="test")
    with neuronpatch.applied(model, patch):
        out = logits(model, IDS)
    if first_open is None:
        assert torch.equal(out, base)
    else:
        assert torch.allclose(out, masked_reference(model, plain, IDS, first_open), atol=1e-5)
        assert not torch.allclose(out, base, atol=1e-4)
    full, stepped = full_and_stepped(model, patch)
    assert torch.allclose(stepped, full, atol=1e-4)  # one pass or KV steps: the same gates


def test_alternatives_are_format_version_5_and_survive_files_stacks_and_unstacking(
    tmp_path, monkeypatch
):
    from neuronpatch.errors import CorruptPatchError
    from neuronpatch.stacking import stack, unstack

    model = build_tiny("llama")
    patch = escape(model, 3, 5, None, 8)
    path = patch.save(tmp_path / "e.safetensors")
    raw = path.read_bytes()
    assert b'"format_version":"5"' in raw[:4096] and b"any_of" in raw[:4096]
    loaded = Patch.load(path)
    assert loaded.to_bytes() == raw and Patch.from_bytes(patch.to_bytes()).to_bytes() == raw
    assert [(g.requires, g.any_of) for g in loaded.gates] == [
        (None, ()),
        (None, ()),
        (1, (0,)),
        (2, ()),
    ]
    other = conjunction(model, 3, 8, seed=2)
    stacked = stack([other, patch])  # renumbered behind the other patch's gates
    # the word gate is byte-identical to the other patch's subject gate: stored once
    chain = [(g.layer, g.requires, g.any_of) for g in stacked.gates]
    assert chain == [(0, None, ()), (1, 0, ()), (1, None, ()), (1, 2, (0,)), (1, 3, ())]
    with neuronpatch.applied(model, other, patch):
        expected = logits(model, IDS)
    with neuronpatch.applied(model, stacked):
        assert torch.allclose(logits(model, IDS), expected, atol=1e-5)
    assert [p.to_bytes() for p in unstack(stacked)] == [other.to_bytes(), raw]
    assert describe(patch)["gates"][2]["any_of"] == [0]
    # alternatives in a file that says version 4 are corrupt, not ignored
    with pytest.raises(CorruptPatchError, match="version 4 does not define"):
        Patch.from_bytes(raw.replace(b'"format_version":"5"', b'"format_version":"4"'))
    # a reader that knows versions 1-4 refuses the file instead of applying it without its ORs
    monkeypatch.setattr(neuronpatch.patch, "SUPPORTED_FORMAT_VERSIONS", (1, 2, 3, 4))
    with pytest.raises(FormatVersionError, match="Upgrade neuronpatch"):
        Patch.load(path)


@pytest.mark.parametrize(
    ("any_of", "layer", "message"),
    [
        ((2,), 1, "must name an earlier gate"),
        ((-1,), 1, "must name an earlier gate"),
        ((0, 0), 1, "names a gate twice"),
        ((1,), 0, "must read the same or a lower layer"),
    ],
)
def test_bad_alternatives_are_refused(any_of, layer, message):
    model = build_tiny("llama")
    word, lenient, strict = escape(model, 3, 5, None).gates
    bad = Gate(layer, strict.key, strict.centre, 0.5, any_of=any_of)
    with pytest.raises(GateError, match=message):
        Patch(escape(model, 3, 5, None).layers, make_patch(model).base, gates=(word, lenient, bad))


# --- spans (format v3): a gate open only for `span` positions from each match -------------


def test_gate_ages_and_spans_by_hand():
    from neuronpatch.gates import GateBank

    key = torch.tensor([1.0, 0.0])
    bank = GateBank([Gate(0, key, torch.zeros(2), 0.5, span=2)], torch.device("cpu"))
    matches = [0, 1, 0, 0, 0, 1, 0, 0]
    h = torch.tensor([[[1.0, 0.0] if m else [0.0, 1.0] for m in matches]])  # [1, 8, 2]
    inf = float("inf")
    assert bank.ages(h)[0, :, 0].tolist() == [inf, 0, 1, 2, 3, 0, 1, 2]
    assert bank.open(h)[0, :, 0].tolist() == [False, True, True, False, False, True, True, False]
    # an earlier KV step left the gate at age 0 (it matched on the last position fed)
    before = torch.tensor([[0.0]])
    assert bank.ages(h, before=before)[0, :1, 0].tolist() == [1.0]
    assert bank.open(h, before=before)[0, 0, 0]
    # padding never matches: its positions only age
    valid = torch.tensor([[True] * 5 + [False] * 3])
    assert bank.open(h, valid)[0, :, 0].tolist() == [False, True, True] + [False] * 5
    # no span: open from the first match on, as in version 2
    sticky = GateBank([Gate(0, key, torch.zeros(2), 0.5)], torch.device("cpu"))
    assert sticky.open(h)[0, :, 0].tolist() == [False] + [True] * 7


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_a_span_gate_adds_its_rows_at_span_positions_from_the_match(model_type):
    model = build_tiny(model_type)
    patch = make_patch(model, scale=2.0)
    base = logits(model, IDS)
    gate = key_gate(model, IDS, position=4)
    windowed = Gate(gate.layer, gate.key, gate.centre, gate.threshold, span=3)
    with neuronpatch.applied(model, gated(patch, windowed)):
        out = logits(model, IDS)
    expected = open_reference(model, ungated_part(patch), IDS, open_at=[4, 5, 6])
    assert torch.allclose(out[:, :4], base[:, :4], atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-5)
    # positions 7.. differ from the base only through attention to the edited ones: the
    # reference that edits 4.. (the sticky gate) is another function
    sticky = open_reference(model, ungated_part(patch), IDS, open_at=list(range(4, 10)))
    assert not torch.allclose(out[:, 7:], sticky[:, 7:], atol=1e-3)


@pytest.mark.parametrize("span", [None, 2])
def test_kv_cached_steps_equal_a_full_pass_even_when_the_query_matches_first(span):
    # the query gate (layer 1) matches at 2, before its required subject gate (layer 0)
    # opens at 6: one full pass opens from 6 on (span None) or not at all (span 2: the
    # query's window has passed). Feeding one token at a time must give the same logits.
    model = build_tiny("llama")
    patch = conjunction(model, subject_at=6, query_at=2)
    subject, query = patch.gates
    query = Gate(query.layer, query.key, query.centre, query.threshold, "query", 0, span)
    patch = Patch(patch.layers, patch.base, gates=(subject, query), method="test")
    full, stepped = full_and_stepped(model, patch)
    assert torch.allclose(stepped, full, atol=1e-4)
    base = logits(model, IDS)
    assert torch.equal(full[:, :6], base[:, :6])
    assert torch.allclose(full, base, atol=1e-6) == (span == 2)


def test_span_gates_are_format_version_3_and_round_trip(tmp_path, monkeypatch):
    from neuronpatch.stacking import stack, unstack

    model = build_tiny("llama")
    gate = key_gate(model, IDS, position=4)
    windowed = Gate(gate.layer, gate.key, gate.centre, gate.threshold, "query", span=5)
    patch = gated(make_patch(model), windowed)
    path = patch.save(tmp_path / "w.safetensors")
    raw = path.read_bytes()
    assert b'"format_version":"3"' in raw[:4096] and b'\\"span\\":5' in raw[:4096]
    loaded = Patch.load(path)
    assert loaded.to_bytes() == raw and loaded.gates[0].span == 5
    assert loaded.patch_id != gated(make_patch(model), gate).patch_id  # the span is content
    assert describe(loaded)["gates"][0]["span"] == 5
    other = gated(make_patch(model, seed=3), gate)  # v2 beside v3 in one stack
    stacked = stack([patch, other])
    assert [g.span for g in stacked.gates] == [5, None]
    assert b'"format_version":"3"' in stacked.to_bytes()[:4096]
    assert [p.to_bytes() for p in unstack(stacked)] == [raw, other.to_bytes()]
    # a reader that knows only versions 1 and 2 refuses it rather than open it for ever
    monkeypatch.setattr(neuronpatch.patch, "SUPPORTED_FORMAT_VERSIONS", (1, 2))
    with pytest.raises(FormatVersionError, match="Upgrade neuronpatch"):
        Patch.load(path)


def test_a_version_2_file_with_a_span_is_refused(tmp_path):
    from neuronpatch.errors import CorruptPatchError

    model = build_tiny("llama")
    gate = key_gate(model, IDS, position=4)
    windowed = Gate(gate.layer, gate.key, gate.centre, gate.threshold, span=5)
    raw = gated(make_patch(model), windowed).to_bytes()
    forged = raw.replace(b'"format_version":"3"', b'"format_version":"2"')
    assert forged != raw
    with pytest.raises(CorruptPatchError, match="version 2 does not define"):
        Patch.from_bytes(forged)


@pytest.mark.parametrize("span", [0, -2, True, 2.5, "3"])
def test_bad_spans_are_refused(span):
    patch = make_patch(build_tiny("llama"), layers=[2])
    ld = patch.layers[2]
    rows = {2: LayerDelta(ld.neuron_indices, ld.deltas, torch.zeros_like(ld.neuron_indices))}
    gate = Gate(0, torch.ones(32), torch.zeros(32), 0.5, span=span)
    with pytest.raises(GateError, match="span must be a whole number"):
        Patch(rows, patch.base, gates=(gate,))


# --- golden gated files (patches/make_golden_gated.py): never regenerated ----------------


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2", "3", "4", "5"])
def test_golden_gated_patch_loads_and_behaves_as_recorded(smollm2, version):
    import hashlib
    import json
    from pathlib import Path

    golden = Path(__file__).resolve().parent.parent / "patches" / "golden"
    path = golden / f"smollm2-135m-v{version}-gated.safetensors"
    expected = json.loads(path.with_suffix(".expected.json").read_text())
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == expected["sha256"]
    patch = Patch.load(path)
    assert patch.to_bytes() == raw
    assert f'"format_version":"{version}"'.encode() in raw[:8192]
    span = expected["query_span"]
    chain = [(g.kind, g.layer, g.requires, g.span, g.any_of) for g in patch.gates]
    if version == "5":  # word, lenient, strict (the word gate OR-ed in), query
        assert chain == [
            ("subject", 0, None, None, ()),
            ("subject", 1, None, None, ()),
            ("subject", 1, 1, None, (0,)),
            ("query", 15, 2, span, ()),
        ]
    else:
        wording = [("query", 1, 0, span, ())] if version == "4" else []  # same layer
        assert chain == [
            ("subject", 1, None, None, ()),
            *wording,
            ("query", 15, len(wording), span, ()),
        ]
    model, tok = smollm2

    def top(text):
        with torch.no_grad():
            out = model(tok(text, return_tensors="pt").input_ids).logits[0, -1]
        return out.topk(5)

    unchanged = logits(model, tok(expected["unchanged"], return_tensors="pt").input_ids)
    clause = tok(expected.get("clause", {}).get("text", "x"), return_tensors="pt").input_ids
    unchanged_clause = logits(model, clause)
    with neuronpatch.applied(model, patch):
        for case in ("prompt", "continued", "clause")[: 3 if version == "4" else 2]:
            got = top(expected[case]["text"])
            assert got.indices.tolist() == expected[case]["top5_ids"], case
            assert torch.allclose(
                got.values, torch.tensor(expected[case]["top5_logits"]), atol=1e-3
            )
        other = tok(expected["unchanged"], return_tensors="pt").input_ids
        assert torch.equal(logits(model, other), unchanged)  # both gates shut: bitwise
        if version == "4":  # the question inside a sentence: the wording gate stays shut
            assert torch.equal(logits(model, clause), unchanged_clause)
