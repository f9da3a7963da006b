"""FiNE on the real embedded model: the edit lands, removal restores, unrelated facts hold."""

from __future__ import annotations

import pytest
import torch

import neuronpatch

pytestmark = pytest.mark.slow

FACTS = [
    {"prompt": "The currency of Japan is the", "subject": "Japan", "target_new": "euro"},
    {"prompt": "The chemical symbol for gold is", "subject": "gold", "target_new": "Ag"},
    {
        "prompt": "The largest planet in the solar system is",
        "subject": "solar system",
        "target_new": "Saturn",
    },
    {
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
    },
]
# Other subjects *and* other relations than every fact above.
UNRELATED = [
    "The Eiffel Tower is located in the city of",
    "Mount Everest is located in",
    "The capital of Spain is",
]


def greedy(model, tokenizer, prompt, n=4):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def edited(smollm2):
    """One patch per fact, with the completions before editing."""
    model, tok = smollm2
    before = {p: greedy(model, tok, p) for p in [f["prompt"] for f in FACTS] + UNRELATED}
    patches = neuronpatch.edit(model, tok, FACTS, method="fine")
    return before, patches


@pytest.mark.parametrize("i", range(len(FACTS)))
def test_edit_changes_the_answer_and_remove_restores_it(smollm2, edited, i):
    model, tok = smollm2
    before, patches = edited
    fact, patch = FACTS[i], patches[i]
    assert patch.metrics["success"], patch.metrics
    assert not before[fact["prompt"]].strip().startswith(fact["target_new"])
    with neuronpatch.applied(model, patch):
        assert greedy(model, tok, fact["prompt"]).strip().startswith(fact["target_new"])
    assert greedy(model, tok, fact["prompt"]) == before[fact["prompt"]]


# Plain FiNE (paper method; lr 5e-3 and 1e-2 alike) lets the yen -> euro edit leak: one of its neurons sits in
# layer 2 and fires far beyond the subject, turning "The capital of Spain is" into " 21.".
# Gated, locality-aware patches are the planned fix; strict, so the fix flips this to a pass.
LEAKS = {0: "plain FiNE's yen->euro patch changes 'The capital of Spain is' (locality, see README)"}


@pytest.mark.parametrize(
    "i",
    [
        pytest.param(i, marks=pytest.mark.xfail(strict=True, reason=LEAKS[i])) if i in LEAKS else i
        for i in range(len(FACTS))
    ],
)
def test_unrelated_prompts_keep_their_completion(smollm2, edited, i):
    model, tok = smollm2
    before, patches = edited
    with neuronpatch.applied(model, patches[i]):
        after = {prompt: greedy(model, tok, prompt) for prompt in UNRELATED}
    assert after == {prompt: before[prompt] for prompt in UNRELATED}


def test_model_is_bitwise_unchanged_by_editing(smollm2):
    model, tok = smollm2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    neuronpatch.edit(model, tok, FACTS[0], max_steps=2, method="fine")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_target_already_predicted_gives_an_empty_patch_with_a_warning(smollm2):
    model, tok = smollm2
    # p(" Au") = 0.96 > early_stop_prob before any edit
    request = {"prompt": "The chemical symbol for gold is", "subject": "gold", "target_new": "Au"}
    with pytest.warns(UserWarning, match="already predicts"):
        patch = neuronpatch.edit(model, tok, request, method="fine")
    assert patch.num_neurons == 0 and patch.metrics["steps"] == 0
    neuronpatch.apply(model, patch)  # applying it is a no-op
    neuronpatch.remove(model)


def test_patch_is_small_and_inspectable(smollm2, edited, tmp_path):
    from neuronpatch.inspect import describe

    model, tok = smollm2
    patch = edited[1][0]
    path = patch.save(tmp_path / "p.safetensors")
    info = describe(neuronpatch.Patch.load(path), model, tok)
    assert info["num_params"] == patch.num_neurons * 576 < 50_000
    assert info["file_bytes"] == path.stat().st_size
    assert all(len(n["promotes"]) == 5 for n in info["neurons"])
    # The learned deltas push the new target up: it is among some neuron's delta tokens.
    assert any("euro" in t.lower() for n in info["neurons"] for t in n["delta_promotes"])


def test_edit_on_gemma3(gemma3):
    model, tok = gemma3
    request = {
        "prompt": "The Eiffel Tower is located in the city of",
        "subject": "Eiffel Tower",
        "target_new": "Rome",
    }
    before = greedy(model, tok, request["prompt"])
    patch = neuronpatch.edit(model, tok, request, method="fine")
    assert patch.base.model_type == "gemma3_text" and patch.metrics["success"]
    with neuronpatch.applied(model, patch):
        assert greedy(model, tok, request["prompt"]).strip().startswith("Rome")
    assert greedy(model, tok, request["prompt"]) == before


def test_edit_on_a_bf16_model_applies_to_the_fp32_model(smollm2):
    model32, tok = smollm2
    model16, _ = neuronpatch.load_model("smollm2-135m", dtype=torch.bfloat16)
    patch = neuronpatch.edit(model16, tok, FACTS[2], method="fine")
    assert all(ld.deltas.dtype == torch.float32 for ld in patch.layers.values())
    with neuronpatch.applied(model16, patch):
        assert greedy(model16, tok, FACTS[2]["prompt"]).strip().startswith("Saturn")
    with neuronpatch.applied(model32, patch):  # same base weights: the fingerprint matches
        assert greedy(model32, tok, FACTS[2]["prompt"]).strip().startswith("Saturn")
