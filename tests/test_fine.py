"""FiNE: locating, editing, determinism, and the edit's effect on the real embedded model."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import MODEL_TYPES, build_tiny

import neuronpatch
from neuronpatch.errors import InvalidHparamsError, InvalidRequestError, UnsupportedModelError
from neuronpatch.fine import FineHparams


def fine_edit(*args, **kwargs):
    """neuronpatch.edit with method="fine" named (the library default is "local")."""
    return neuronpatch.edit(*args, method="fine", **kwargs)


class TinyTokenizer:
    """A whitespace tokenizer over the tiny models' 128-token vocabulary."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [
            3 + sum(map(ord, w)) % 120 for w in text.split()
        ]
        return type("Enc", (), {"input_ids": ids})()


TINY_REQUEST = {"prompt": "alpha beta gamma", "subject": "beta", "target_new": "delta epsilon"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_edit_runs_on_every_architecture_and_leaves_model_unchanged(model_type):
    model = build_tiny(model_type)
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model may not reach p > 0.9 in 20 steps
        patch = fine_edit(
            model, TinyTokenizer(), TINY_REQUEST, max_steps=20, lr=0.05, frozen_layers=1
        )
    assert patch.method == "fine"
    assert patch.num_neurons > 0 and patch.metrics["steps"] > 0
    assert all(layer < 2 for layer in patch.layers)  # the last layer is frozen
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert neuronpatch.applied_patches(model) == []


def test_edit_raises_target_probability_on_tiny_model():
    model = build_tiny("llama")
    tok = TinyTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = fine_edit(model, tok, TINY_REQUEST, max_steps=30, lr=0.05, frozen_layers=1)
    ids = torch.tensor([tok("alpha beta gamma delta epsilon").input_ids])

    def target_logprob():
        with torch.no_grad():
            logp = model(ids).logits[0].log_softmax(-1)
        return logp[3, ids[0, 4]] + logp[4, ids[0, 5]]

    base = target_logprob()
    with neuronpatch.applied(model, patch):
        assert target_logprob() > base + 1.0


def test_locate_returns_top_k_per_target_position_jointly_across_layers():
    model = build_tiny("llama")
    neurons = neuronpatch.locate(model, TinyTokenizer(), TINY_REQUEST, k=4, frozen_layers=1)
    # 2 target tokens x k=4, union may merge duplicates
    assert 4 <= len(neurons) <= 8
    assert all(n.layer in (0, 1) for n in neurons)  # last layer frozen
    scores = [n.score for n in neurons]
    assert scores == sorted(scores, reverse=True)
    only_layer = neuronpatch.locate(model, TinyTokenizer(), TINY_REQUEST, k=4, layers=[2])
    assert {n.layer for n in only_layer} == {2}


def test_locate_matches_brute_force_contribution_scores():
    """c(l, i) = q_i * (W_U[t] . W_out[:, i]) at the position predicting the target token."""
    model = build_tiny("gpt2")  # Conv1D orientation
    tok = TinyTokenizer()
    request = {"prompt": "alpha beta", "subject": "beta", "target_new": "gamma"}
    ids = torch.tensor([tok("alpha beta gamma").input_ids])
    acts = {}
    hooks = [
        block.mlp.c_proj.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, a[0][0, 2]))
        for i, block in enumerate(model.transformer.h)
    ]
    with torch.no_grad():
        predicted = model(ids).logits[0, 2].argmax()
        for h in hooks:
            h.remove()
    unembed = model.lm_head.weight[predicted]
    brute = []
    for layer in range(3):
        w = model.transformer.h[layer].mlp.c_proj.weight  # [inter, hidden]
        brute += [(float(acts[layer][i] * (w[i] @ unembed).detach()), layer, i) for i in range(64)]
    expected = sorted(brute, reverse=True)[:5]
    got = neuronpatch.locate(model, tok, request, k=5, frozen_layers=0)
    assert [(n.layer, n.index) for n in got] == [(layer, i) for _, layer, i in expected]
    assert [n.score for n in got] == pytest.approx([s for s, _, _ in expected], rel=1e-4)


def test_ablations_random_neurons_and_no_freezing():
    model = build_tiny("llama")
    tok = TinyTokenizer()
    located = neuronpatch.locate(model, tok, TINY_REQUEST, k=3, frozen_layers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rand = fine_edit(
            model, tok, TINY_REQUEST, k=3, frozen_layers=0, random_neurons=True, max_steps=2
        )
    picked = {(n["layer"], n["index"]) for n in rand.extra["neurons"]}
    assert len(picked) == len(located)
    assert picked != {(n.layer, n.index) for n in located}
    assert rand.hparams["random_neurons"] is True


def test_patch_records_request_hparams_neurons_and_metrics():
    model = build_tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = fine_edit(model, TinyTokenizer(), TINY_REQUEST, max_steps=3, frozen_layers=1)
    assert patch.requests == (
        {"prompt": "alpha beta gamma", "subject": "beta", "target_new": "delta epsilon"},
    )
    assert patch.hparams == {**FineHparams().__dict__, "max_steps": 3, "frozen_layers": 1}
    assert {"steps", "target_prob", "success", "wall_time_s"} <= set(patch.metrics)
    recorded = {(n["layer"], n["index"]) for n in patch.extra["neurons"]}
    in_patch = {
        (layer, i) for layer, ld in patch.layers.items() for i in ld.neuron_indices.tolist()
    }
    assert recorded == in_patch
    assert all(isinstance(n["score"], float) for n in patch.extra["neurons"])


def test_same_request_gives_byte_identical_patch(monkeypatch, tmp_path):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    model = build_tiny("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fine_edit(model, TinyTokenizer(), TINY_REQUEST, max_steps=5, frozen_layers=1)
        b = fine_edit(model, TinyTokenizer(), TINY_REQUEST, max_steps=5, frozen_layers=1)
    assert (
        a.save(tmp_path / "a.safetensors").read_bytes()
        == b.save(tmp_path / "b.safetensors").read_bytes()
    )
    assert "wall_time_s" not in a.metrics  # a pinned clock records no clock readings


def test_list_of_requests_gives_one_patch_each_against_the_unedited_model():
    model = build_tiny("llama")
    other = {"prompt": "one two three", "subject": "two", "target_new": "four"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = fine_edit(
            model, TinyTokenizer(), [TINY_REQUEST, other], max_steps=3, frozen_layers=1
        )
        alone = fine_edit(model, TinyTokenizer(), other, max_steps=3, frozen_layers=1)
    assert len(both) == 2
    assert both[1].patch_id == alone.patch_id


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"prompt": "alpha beta", "subject": "zeta", "target_new": "x"}, "does not occur"),
        ({"prompt": "alpha beta", "subject": "beta", "target_new": "  "}, "target_new"),
        ({"prompt": "alpha beta", "subject": "beta"}, "missing target_new"),
        ({"prompt": "alpha beta", "subject": "beta", "target_new": "x", "tgt": 1}, "unknown"),
    ],
)
def test_bad_requests_are_refused_clearly(request_, message):
    with pytest.raises(InvalidRequestError, match=message):
        fine_edit(build_tiny("llama"), TinyTokenizer(), request_, frozen_layers=1)


def test_bad_hparams_and_unsupported_models_are_refused_clearly():
    model = build_tiny("llama")
    with pytest.raises(InvalidHparamsError, match="unknown hyperparameter"):
        fine_edit(model, TinyTokenizer(), TINY_REQUEST, learning_rate=1)
    with pytest.raises(InvalidHparamsError, match="k must be"):
        fine_edit(model, TinyTokenizer(), TINY_REQUEST, k=0)
    with pytest.raises(InvalidHparamsError, match="freezes all 3 layers"):
        fine_edit(model, TinyTokenizer(), TINY_REQUEST, frozen_layers=3)
    with pytest.raises(InvalidHparamsError, match="unknown method"):
        neuronpatch.edit(model, TinyTokenizer(), TINY_REQUEST, method="rome")
    with pytest.raises(UnsupportedModelError, match="Supported model types"):
        fine_edit(torch.nn.Linear(2, 2), TinyTokenizer(), TINY_REQUEST, frozen_layers=1)
