"""KNE: attribution, ensemble selection, the edit on every architecture and on the real model."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import MODEL_TYPES, build_tiny
from test_fine import TINY_REQUEST, TinyTokenizer
from test_fine_real import FACTS as FINE_FACTS
from test_fine_real import UNRELATED, greedy

import neuronpatch
from neuronpatch import fine, kne
from neuronpatch.arch import resolve
from neuronpatch.errors import InvalidHparamsError
from neuronpatch.kne import KneHparams
from neuronpatch.tokens import teacher_forced

TINY_HP = {"k": 6, "max_steps": 3, "lr": 0.05, "frozen_layers": 1}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _pairs(neurons) -> set[tuple[int, int]]:
    return {(n.layer, n.index) for n in neurons}


def tiny_edit(model, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model does not reach p > 0.9 in 3 steps
        return neuronpatch.edit(
            model, TinyTokenizer(), TINY_REQUEST, method="kne", **{**TINY_HP, **overrides}
        )


# --- tiny random models -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_edit_runs_on_every_architecture_and_leaves_model_unchanged(model_type, dtype):
    model = build_tiny(model_type, dtype=dtype)
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    patch = tiny_edit(model)
    assert patch.method == "kne" and patch.metrics["steps"] > 0
    assert patch.num_neurons == 6 and all(layer < 2 for layer in patch.layers)
    assert all(ld.deltas.dtype == torch.float32 for ld in patch.layers.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert neuronpatch.applied_patches(model) == []


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_attribution_is_activation_times_gradient(model_type):
    """a(l, i) = dy/ds at s = 1, where s scales neuron i of layer l at the target positions."""
    model = build_tiny(model_type, dtype=torch.float64)
    arch = resolve(model)
    tf = teacher_forced(TinyTokenizer(), TINY_REQUEST["prompt"], TINY_REQUEST["target_new"])
    scores = kne.attribution(model, arch, tf, [0, 1, 2])  # [3, inter]
    positions = tf.answer_positions

    def target_logprob(layer: int, index: int, scale: float) -> float:
        def pre_hook(module, args):
            q = args[0].clone()  # [1, S, inter] or [S, inter]
            q.view(-1, q.shape[-1])[positions, index] *= scale
            return (q, *args[1:])

        handle = arch.w_out[layer].register_forward_pre_hook(pre_hook)
        with torch.no_grad():
            logp = model(input_ids=tf.input_ids).logits[0].log_softmax(-1)  # [S, vocab]
        handle.remove()
        return float(logp[positions, tf.answer_ids].sum())

    # Central differences on the strongest neurons; eps is not tiny because some norms
    # (LlamaRMSNorm) compute in fp32 even in a float64 model.
    eps = 1e-2
    for flat in scores.abs().flatten().topk(4).indices.tolist():
        layer, index = divmod(flat, arch.intermediate_size)
        up, down = target_logprob(layer, index, 1 + eps), target_logprob(layer, index, 1 - eps)
        assert float(scores[layer, index]) == pytest.approx((up - down) / (2 * eps), rel=2e-3)


def test_ensemble_changes_with_the_target():
    model = build_tiny("llama")
    tok = TinyTokenizer()
    other = {**TINY_REQUEST, "target_new": "omega"}
    a = neuronpatch.locate(model, tok, TINY_REQUEST, method="kne", frozen_layers=1)
    b = neuronpatch.locate(model, tok, other, method="kne", frozen_layers=1)
    assert len(a) == len(b) == 20
    assert _pairs(a) != _pairs(b)


def test_selection_topk_threshold_cap_and_rank():
    model = build_tiny("llama")
    tok = TinyTokenizer()

    def locate(**hp):
        return neuronpatch.locate(model, tok, TINY_REQUEST, method="kne", frozen_layers=0, **hp)

    absolute = locate(k=10)
    assert [abs(n.score) for n in absolute] == sorted(
        (abs(n.score) for n in absolute), reverse=True
    )
    signed = locate(k=10, rank="signed")
    assert [n.score for n in signed] == sorted((n.score for n in signed), reverse=True)
    everything = locate(k=10_000)  # capped at the 3 x 64 candidate neurons
    assert len(everything) == 192 and absolute == everything[:10]

    strongest = abs(absolute[0].score)
    kept = locate(selection="threshold", threshold=0.5)
    assert kept == [n for n in everything if abs(n.score) >= 0.5 * strongest]
    assert locate(selection="threshold", threshold=1.0) == absolute[:1]
    assert locate(selection="threshold", threshold=0.01, max_neurons=3) == absolute[:3]


def test_ensemble_respects_layers_and_frozen_layers():
    model = build_tiny("llama")
    tok = TinyTokenizer()
    unfrozen = neuronpatch.locate(model, tok, TINY_REQUEST, method="kne", frozen_layers=1)
    assert {n.layer for n in unfrozen} <= {0, 1}
    only = neuronpatch.locate(model, tok, TINY_REQUEST, method="kne", layers=[2])
    assert {n.layer for n in only} == {2}
    with pytest.raises(InvalidHparamsError, match="freezes all 3 layers"):
        neuronpatch.locate(model, tok, TINY_REQUEST, method="kne")  # 3 frozen of 3
    patch = tiny_edit(model, layers=[1])
    assert set(patch.layers) == {1}


def test_patch_records_method_hparams_and_its_ensemble():
    model = build_tiny("llama")
    patch = tiny_edit(model)
    assert patch.hparams == {**KneHparams().__dict__, **TINY_HP, "layers": None}
    recorded = {(n["layer"], n["index"]) for n in patch.extra["neurons"]}
    in_patch = {
        (layer, i) for layer, ld in patch.layers.items() for i in ld.neuron_indices.tolist()
    }
    located = neuronpatch.locate(model, TinyTokenizer(), TINY_REQUEST, method="kne", **TINY_HP)
    assert recorded == in_patch == _pairs(located)


def test_same_request_gives_byte_identical_patch(monkeypatch, tmp_path):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    model = build_tiny("qwen2")
    a, b = tiny_edit(model), tiny_edit(model)
    assert (
        a.save(tmp_path / "a.safetensors").read_bytes()
        == b.save(tmp_path / "b.safetensors").read_bytes()
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"selection": "best"}, "selection must be one of"),
        ({"rank": "loudest"}, "rank must be one of"),
        ({"threshold": 0.0}, r"threshold must lie in \(0, 1\]"),
        ({"threshold": 1.5}, r"threshold must lie in \(0, 1\]"),
        ({"max_neurons": 0}, "max_neurons must be >= 1"),
        ({"k": 0}, "k must be >= 1"),
    ],
)
def test_bad_hyperparameters_are_refused(overrides, message):
    with pytest.raises(InvalidHparamsError, match=message):
        KneHparams(**overrides)
    model = build_tiny("llama")
    with pytest.raises(InvalidHparamsError, match=message):
        neuronpatch.edit(model, TinyTokenizer(), TINY_REQUEST, method="kne", **overrides)


def test_locate_dispatches_by_method():
    model = build_tiny("llama")
    tok = TinyTokenizer()
    assert neuronpatch.locate(model, tok, TINY_REQUEST, k=4, frozen_layers=1) == fine.locate(
        model, tok, TINY_REQUEST, k=4, frozen_layers=1
    )
    with pytest.raises(InvalidHparamsError, match="unknown method 'rome'"):
        neuronpatch.locate(model, tok, TINY_REQUEST, frozen_layers=1, method="rome")
    with pytest.raises(InvalidHparamsError, match="locate supports the methods"):
        neuronpatch.locate(model, tok, TINY_REQUEST, frozen_layers=1, method="local")
    with pytest.raises(InvalidHparamsError, match="unknown hyperparameter"):
        neuronpatch.locate(model, tok, TINY_REQUEST, frozen_layers=1, method="fine", rank="signed")


# --- the real embedded model --------------------------------------------------------------

# The facts test_fine_real edits, but the yen -> euro one, which leaks with either method.
FACTS = FINE_FACTS[1:]


def prompt_logits(model, tokenizer, prompt):
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def kne_edited(smollm2):
    """One KNE patch per fact; the completions and logits before; whether editing changed
    the model or left gradients behind."""
    model, tok = smollm2
    prompts = [f["prompt"] for f in FACTS] + UNRELATED
    completions = {p: greedy(model, tok, p) for p in prompts}
    logits = {p: prompt_logits(model, tok, p) for p in prompts}
    state = _state(model)
    patches = neuronpatch.edit(model, tok, FACTS, method="kne")
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    no_grads = all(p.grad is None for p in model.parameters())
    return completions, logits, patches, unchanged and no_grads


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(FACTS)))
def test_real_edit_lands_and_remove_restores_the_logits(smollm2, kne_edited, i):
    model, tok = smollm2
    completions, logits, patches, _ = kne_edited
    fact, patch = FACTS[i], patches[i]
    assert patch.metrics["success"], patch.metrics
    assert not completions[fact["prompt"]].strip().startswith(fact["target_new"])
    neuronpatch.apply(model, patch)
    try:
        assert greedy(model, tok, fact["prompt"]).strip().startswith(fact["target_new"])
    finally:
        neuronpatch.remove(model)
    assert torch.equal(prompt_logits(model, tok, fact["prompt"]), logits[fact["prompt"]])


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(FACTS)))
def test_real_unrelated_prompts_keep_their_completion(smollm2, kne_edited, i):
    model, tok = smollm2
    completions, _, patches, _ = kne_edited
    with neuronpatch.applied(model, patches[i]):
        after = {prompt: greedy(model, tok, prompt) for prompt in UNRELATED}
    assert after == {prompt: completions[prompt] for prompt in UNRELATED}


@pytest.mark.slow
def test_real_model_is_bitwise_unchanged_and_has_no_grads(kne_edited):
    assert kne_edited[3]


@pytest.mark.slow
def test_real_ensemble_spans_layers_and_follows_the_target(smollm2):
    model, tok = smollm2
    num_layers = resolve(model).num_layers
    fact = FACTS[1]
    ensemble = neuronpatch.locate(model, tok, fact, method="kne")
    assert len(ensemble) == 20
    assert len({n.layer for n in ensemble}) > 1
    assert all(n.layer < num_layers - 3 for n in ensemble)
    other = neuronpatch.locate(model, tok, {**fact, "target_new": "Mars"}, method="kne")
    assert len(_pairs(ensemble) & _pairs(other)) < len(ensemble) // 2
    restricted = neuronpatch.locate(model, tok, fact, method="kne", layers=[10, 20])
    assert {n.layer for n in restricted} <= {10, 20}
