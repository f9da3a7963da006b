"""Several edits optimised in one batch: each equals its edit alone up to rounding."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import MODEL_TYPES, build_tiny
from test_fine import TinyTokenizer
from test_fine_real import FACTS, greedy

import neuronpatch
from neuronpatch.arch import resolve
from neuronpatch.editor import edit_each, make_hparams
from neuronpatch.errors import InvalidHparamsError
from neuronpatch.request import EditRequest

# prompts of different lengths, so rows are padded; one-, two- and three-token targets
REQUESTS = [
    {"prompt": "alpha beta gamma", "subject": "beta", "target_new": "delta epsilon"},
    {"prompt": "one two three four five", "subject": "three", "target_new": "six"},
    {"prompt": "red green", "subject": "red", "target_new": "blue sky ocean"},
]
HPARAMS = {
    "fine": {"max_steps": 6, "lr": 0.05, "frozen_layers": 1},
    # a subject gate at layer 0 (the tiny models have 3 layers): rows open from the subject
    # on, so the batch caches the positions before it
    "local": {
        "max_steps": 6,
        "lr": 0.05,
        "frozen_layers": 1,
        "gate_layer": 0,
        "gate_key": "subject",
    },
}


def _edit(model, requests, method, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random models may not reach p > 0.9 in 6 steps
        return neuronpatch.edit(
            model, TinyTokenizer(), requests, method=method, **{**HPARAMS[method], **kwargs}
        )


def _assert_close(batched, alone, atol):
    assert sorted(batched.layers) == sorted(alone.layers)
    assert batched.metrics["steps"] == alone.metrics["steps"]
    assert batched.metrics["target_prob"] == pytest.approx(alone.metrics["target_prob"], abs=1e-4)
    assert len(batched.gates) == len(alone.gates)
    for g, h in zip(batched.gates, alone.gates, strict=True):  # made before optimising: equal
        assert torch.equal(g.key, h.key) and torch.equal(g.centre, h.centre)
        assert (g.layer, g.threshold, g.kind, g.span) == (h.layer, h.threshold, h.kind, h.span)
    for layer, ld in alone.layers.items():
        assert torch.equal(batched.layers[layer].neuron_indices, ld.neuron_indices)
        torch.testing.assert_close(batched.layers[layer].deltas, ld.deltas, atol=atol, rtol=1e-3)


@pytest.mark.parametrize("method", sorted(HPARAMS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batched_edits_equal_single_edits_up_to_rounding(model_type, method):
    model = build_tiny(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alone = [_edit(model, r, method) for r in REQUESTS]
    # two rows at a time: the third edit takes the first free row
    batched = _edit(model, REQUESTS, method, batch_size=2)
    assert [p.requests for p in batched] == [p.requests for p in alone]
    for b, a in zip(batched, alone, strict=True):
        _assert_close(b, a, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert neuronpatch.applied_patches(model) == []
    # the replayed blocks are themselves again
    assert not any("forward" in vars(block) for block in resolve(model).decoder_layers)


def test_batched_edits_behind_a_chain_of_three_gates_equal_single_edits():
    # subject and wording keys at layer 0 (the wording gate requires the subject gate of its
    # own layer), the query key at 1, rows at 2: the batch opens where the whole chain opens
    model = build_tiny("llama")
    chain = {
        "frozen_layers": 0,
        "gate_key": "both",
        "gate_layer": 1,
        "subject_layer": 0,
        "subject_threshold": -0.5,
        "wording_layer": 0,
        "wording_threshold": 0.5,
    }
    alone = [_edit(model, r, "local", **chain) for r in REQUESTS]
    assert all(
        [(g.layer, g.requires) for g in p.gates] == [(0, None), (0, 0), (1, 1)] for p in alone
    )
    batched = _edit(model, REQUESTS, "local", batch_size=2, **chain)
    for b, a in zip(batched, alone, strict=True):
        _assert_close(b, a, atol=1e-5)


def test_the_after_answer_term_is_optimised_alike_alone_and_in_a_batch():
    # a query gate with a span (open on the answer only): the KL after the answer reaches the
    # deltas only through the positions before it, in both optimisation paths
    model = build_tiny("llama")
    spanned = {"gate_key": "query", "gate_layer": 0, "gate_threshold": 0.5, "query_span": "target"}
    plain = [_edit(model, r, "local", **spanned) for r in REQUESTS]
    kept = {**spanned, "after_answer_kl": 5.0}
    alone = [_edit(model, r, "local", **kept) for r in REQUESTS]
    assert alone[0].hparams["after_answer_kl"] == 5.0
    changed = [
        not torch.allclose(a.layers[layer].deltas, p.layers[layer].deltas)
        for a, p in zip(alone, plain, strict=True)
        for layer in p.layers
    ]
    assert any(changed)  # the term is in the loss
    batched = _edit(model, REQUESTS, "local", batch_size=2, **kept)
    for b, a in zip(batched, alone, strict=True):
        _assert_close(b, a, atol=1e-5)


def test_the_after_answer_term_can_cover_a_continuation():
    # KL over 6 positions after the answer (its last and a 5-token unedited continuation):
    # other deltas than the one-position term's, each edit optimised on its own even in a
    # batch (what it does to a real model's continuation: test_fine_real)
    model = build_tiny("llama")
    spanned = {"gate_key": "query", "gate_layer": 0, "gate_threshold": 0.5, "query_span": "target"}
    one = {**spanned, "after_answer_kl": 20.0}
    six = {**one, "after_answer_tokens": 6}
    short = [_edit(model, r, "local", **one) for r in REQUESTS]
    long = [_edit(model, r, "local", **six) for r in REQUESTS]
    assert long[0].hparams["after_answer_tokens"] == 6
    assert any(
        not torch.equal(a.layers[layer].deltas, b.layers[layer].deltas)
        for a, b in zip(long, short, strict=True)
        for layer in a.layers
    )
    batched = _edit(model, REQUESTS, "local", batch_size=3, **six)
    for b, a in zip(batched, long, strict=True):
        for layer in a.layers:
            assert torch.equal(b.layers[layer].deltas, a.layers[layer].deltas)
    for bad in (0, 1.5, -2):
        with pytest.raises(InvalidHparamsError, match="after_answer_tokens"):
            make_hparams("local", None, after_answer_tokens=bad)
    with pytest.raises(InvalidHparamsError, match="after_answer_kl"):
        make_hparams("local", None, after_answer_kl=-1.0)


def test_batched_edits_of_a_bf16_model_are_close_to_single_ones():
    model = build_tiny("llama", dtype=torch.bfloat16)
    alone = [_edit(model, r, "local") for r in REQUESTS]
    batched = _edit(model, REQUESTS, "local", batch_size=3)
    for b, a in zip(batched, alone, strict=True):
        assert b.metrics["steps"] == a.metrics["steps"]
        for layer, ld in a.layers.items():
            assert b.layers[layer].deltas.dtype == torch.float32
            torch.testing.assert_close(b.layers[layer].deltas, ld.deltas, atol=2e-2, rtol=0.1)


def test_batch_size_one_gives_exactly_the_single_edits(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    model = build_tiny("llama")
    for method in HPARAMS:
        listed = _edit(model, REQUESTS, method)
        alone = [_edit(model, r, method) for r in REQUESTS]
        assert [p.to_bytes() for p in listed] == [p.to_bytes() for p in alone]


def test_progress_reports_every_batched_step():
    model = build_tiny("llama")
    seen = []
    patches = _edit(model, REQUESTS, "local", batch_size=3, progress=lambda s, p: seen.append(s))
    # one call per forward pass, the last one after the longest edit's last update
    assert seen == list(range(max(p.metrics["steps"] for p in patches) + 1))


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2"])
def test_bad_batch_size_is_refused(size):
    with pytest.raises(InvalidHparamsError, match="batch_size"):
        _edit(build_tiny("llama"), REQUESTS, "local", batch_size=size)


@pytest.mark.slow
def test_batched_default_edits_land_on_the_real_model_like_single_ones(smollm2):
    model, tok = smollm2
    alone = neuronpatch.edit(model, tok, FACTS)
    batched = neuronpatch.edit(model, tok, FACTS, batch_size=3)
    for fact, b, a in zip(FACTS, batched, alone, strict=True):
        _assert_close(b, a, atol=5e-3)
        assert b.metrics["success"], b.metrics
        with neuronpatch.applied(model, b):
            assert greedy(model, tok, fact["prompt"]).strip().startswith(fact["target_new"])


@pytest.mark.slow
def test_batched_edits_on_gemma3_match_single_ones(gemma3):
    # gemma3's sliding-window layers get their own cache layers in the batched replay
    model, tok = gemma3
    facts = [
        {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower",
         "target_new": "Rome"},
        {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "English"},
        {"prompt": "Toyota was founded in the country of", "subject": "Toyota",
         "target_new": "Italy"},
    ]  # fmt: skip
    alone = neuronpatch.edit(model, tok, facts)
    # gemma3's default chain: word gates at layer 0 (Eiffel, Tower; Danielle, Darrieux;
    # Toyota), subject, strict and wording keys at layer 4, the query key at 9
    for p, words in zip(alone, (2, 2, 1), strict=True):
        chain = [(g.layer, g.requires, g.any_of) for g in p.gates]
        w = tuple(range(words))
        assert chain == [(0, None, ())] * words + [
            (4, None, ()), (4, words, w), (4, words + 1, ()), (9, words + 2, ())
        ]  # fmt: skip
    batched = neuronpatch.edit(model, tok, facts, batch_size=2)
    for b, a in zip(batched, alone, strict=True):
        _assert_close(b, a, atol=1e-3)


def test_edit_each_reports_every_request_once_as_soon_as_it_is_known():
    model = build_tiny("llama")
    bad = {**REQUESTS[0], "subject": "zeta"}  # not in its prompt: refused while preparing
    requests = [EditRequest.coerce(REQUESTS[0]), bad, *map(EditRequest.coerce, REQUESTS[1:])]
    seen = []
    hp = make_hparams("local", **HPARAMS["local"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = edit_each(
            model, TinyTokenizer(), requests, "local", hp, batch_size=2,
            each=lambda i, outcome: seen.append((i, outcome)),
        )  # fmt: skip
    assert seen[0][0] == 1 and "does not occur" in str(seen[0][1].error)  # before any optimising
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
    assert all(outcome is outcomes[i] for i, outcome in seen)
    assert [o.patch is None for o in outcomes] == [False, True, False, False]
    assert all(o.seconds > 0 for o in outcomes if o.patch is not None)


def test_blocks_returning_tuples_run_for_real_instead_of_being_replayed():
    # GPT-J's blocks return (hidden, ...) tuples under some transformers versions (5.17)
    from types import SimpleNamespace

    from neuronpatch.fine import _Prefix

    calls = []

    class Block(torch.nn.Module):
        def forward(self, h):
            calls.append(h.shape)
            return (h + 1, None)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, input_ids, use_cache=False):
            h = self.block(input_ids.float()[..., None])[0]
            return SimpleNamespace(logits=h)

    model = Model()
    prefix = _Prefix([model.block])
    with prefix.installed():
        out, blocks = prefix.record(model, torch.ones(1, 3, dtype=torch.long))
        assert (prefix.replays, blocks) == (False, [])
        prefix.assemble([blocks], 3)
        prefix.on = True
        again = model(torch.ones(2, 3, dtype=torch.long)).logits  # computed, not replayed
    assert again.shape == (2, 3, 1) and torch.equal(again, torch.full((2, 3, 1), 2.0))
    assert len(calls) == 2
    assert "forward" not in vars(model.block)


def test_edits_with_negatives_are_optimised_alone_even_in_a_batch(monkeypatch):
    # their own batch already holds the negative prompts: they run the single-edit path
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    model = build_tiny("llama")
    negatives = {"negatives_weight": 1.0, "negative_templates": ("{subject} is",)}
    alone = [_edit(model, r, "local", **negatives) for r in REQUESTS]
    batched = _edit(model, REQUESTS, "local", batch_size=3, **negatives)
    assert [p.to_bytes() for p in batched] == [p.to_bytes() for p in alone]
