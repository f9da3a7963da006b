"""method="local": the subject-gated, locality-aware edit (tiny models and the embedded one)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny
from test_fine import TinyTokenizer
from test_fine_real import greedy

import neuronpatch
from neuronpatch.errors import InvalidHparamsError
from neuronpatch.fine import locate
from neuronpatch.gates import GateBank
from neuronpatch.local import (
    CALIBRATION_FLOOR,
    CALIBRATION_MARGIN,
    MAX_CALIBRATED,
    OTHER_SUBJECTS,
    QUERY_CAP,
    LocalHparams,
    _gate_fn,
    _residual,
    generic_centre,
    locate_specific,
    make_gates,
    negative_prompts,
    subject_end,
    vocabulary_neighbours,
)
from neuronpatch.patch import Patch
from neuronpatch.request import EditRequest
from neuronpatch.tokens import teacher_forced

TINY = {"prompt": "alpha beta gamma", "subject": "beta", "target_new": "delta epsilon"}
# the tiny models have 3 layers: room for one gate below the edited layer, not two
TINY_HP = {"max_steps": 20, "lr": 0.05, "frozen_layers": 1, "gate_layer": 0, "gate_key": "subject"}


def tiny_edit(model, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model may not reach p > 0.9 in 20 steps
        return neuronpatch.edit(
            model, TinyTokenizer(), TINY, method="local", **{**TINY_HP, **overrides}
        )


def logits(model, text: str, tok=None) -> torch.Tensor:
    tok = tok or TinyTokenizer()
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_local_patch_is_gated_above_its_gate_and_deterministic(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model = build_tiny("llama")
    patch = tiny_edit(model)
    assert patch.method == "local" and patch.is_gated
    assert [g.layer for g in patch.gates] == [0]
    assert set(patch.layers) == {1}  # above the gate, below the frozen last layer
    assert tiny_edit(model).to_bytes() == patch.to_bytes()
    assert Patch.from_bytes(patch.to_bytes()).to_bytes() == patch.to_bytes()


def test_local_edit_leaves_inputs_without_the_subject_bitwise_unchanged():
    model = build_tiny("llama")
    patch = tiny_edit(model)
    without = "alpha omega gamma zeta"  # no "beta": the gate stays closed
    base, base_prompt = logits(model, without), logits(model, TINY["prompt"])
    with neuronpatch.applied(model, patch):
        assert torch.equal(logits(model, without), base)
        assert not torch.allclose(logits(model, TINY["prompt"])[0, 1:], base_prompt[0, 1:])


def test_without_gate_the_patch_is_plain():
    patch = tiny_edit(build_tiny("llama"), gate=False, gate_layer=0)
    assert not patch.is_gated and patch.gates == ()
    assert b'"format_version":"1"' in patch.to_bytes()[:4096]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gate_threshold": 1.0}, "strictly between -1 and 1"),
        ({"gate_layer": -1}, "gate_layer must be >= 0"),
        ({"negatives_weight": -1.0}, "negatives_weight"),
        ({"negative_templates": ("no subject here",)}, "must contain"),
        ({"gate_key": "relation"}, "gate_key must be one of 'subject', 'query'"),
        ({"subject_threshold": "auto"}, "must be a number or 'calibrated'"),
        ({"subject_layer": -1}, "subject_layer must be >= 0"),
        ({"query_span": 0}, "query_span must be 'target', a whole number >= 1 or None"),
        ({"calibration_neighbours": -1}, "calibration_neighbours must be an integer >= 0"),
        ({"calibration_neighbours": True}, "calibration_neighbours must be an integer >= 0"),
        ({"query_span": "answer"}, "query_span must be 'target'"),
        ({"query_span": True}, "query_span must be 'target'"),
        ({"wording_layer": -1}, "wording_layer must be 'auto', None or an integer >= 0"),
        ({"wording_layer": True}, "wording_layer must be 'auto', None or an integer >= 0"),
        ({"wording_layer": "four"}, "wording_layer must be 'auto', None or an integer >= 0"),
        ({"gate_threshold": "fixed"}, "gate_threshold must be a number or 'calibrated'"),
        (
            {"gate_key": "subject", "gate_threshold": "calibrated"},
            "gate_key='subject' has none",
        ),
        ({"wording_threshold": 1.0}, "wording_threshold must lie strictly between"),
        ({"query_cap": 0.8}, r"query_cap must be a number in \[0.85, 1\)"),
        ({"query_cap": 1.0}, r"query_cap must be a number in \[0.85, 1\)"),
        ({"query_cap": "auto"}, r"query_cap must be a number in \[0.85, 1\)"),
        ({"query_floor": 0.0}, r"query_floor must be a number in \(0, 1\)"),
        ({"query_floor": "auto"}, r"query_floor must be a number in \(0, 1\)"),
        ({"query_floor": 0.92}, r"query_cap must be a number in \[0.92, 1\)"),
        ({"subject_margin": -1.0}, r"subject_margin must be a number in \(-1, 1\)"),
        ({"subject_margin": True}, r"subject_margin must be a number in \(-1, 1\)"),
        ({"subject_margin": "auto"}, r"subject_margin must be a number in \(-1, 1\)"),
        (
            {"subject_margin": -0.01, "strict_margin": None},
            r"subject_margin=-0.01 .* needs a word escape .* set strict_margin",
        ),
        ({"strict_margin": 0.02}, r"strict_margin must lie between subject_margin \(0.02\)"),
        ({"strict_margin": 1.0}, r"strict_margin must lie between subject_margin"),
        ({"strict_margin": "0.1"}, "strict_margin must be a number, 'auto' or None"),
        ({"strict_margin": 0.1, "gate_key": "query"}, "needs gate_key='both'"),
        ({"strict_margin": 0.1, "subject_threshold": 0.6}, "subject_threshold='calibrated'"),
    ],
)
def test_bad_hyperparameters_are_refused(overrides, message):
    with pytest.raises(InvalidHparamsError, match=message):
        LocalHparams(**overrides)


def test_gate_defaults_follow_the_key():
    subject, query = LocalHparams(gate_key="subject"), LocalHparams(gate_key="query")
    default = LocalHparams()
    assert default.gate_key == "both" and default.lr == 0.01 and default.query_span == "target"
    # the subject gate of "both": layer 4, calibrated per edit on other entities and the
    # subject's 8 nearest vocabulary words
    assert (default.subject_layer, default.subject_threshold) == (4, "calibrated")
    assert default.calibration_neighbours == 8
    assert (subject.layer_of_gate(30), subject.threshold()) == (1, 0.75)
    assert (query.layer_of_gate(30), query.threshold()) == (15, 0.9)  # the middle layer
    assert LocalHparams(gate_key="query", gate_layer=3, gate_threshold=0.5).threshold() == 0.5
    assert LocalHparams(gate_key="query", gate_layer=3).layer_of_gate(30) == 3


def test_query_gate_keys_the_prompts_last_token(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model, tok = build_tiny("llama"), TinyTokenizer()
    patch = tiny_edit(model, gate_key="query")
    (gate,) = patch.gates
    assert (gate.kind, gate.layer, gate.threshold) == ("query", 0, 0.9)
    ids = torch.tensor([tok(TINY["prompt"]).input_ids])
    expected = _residual(model, ids, 0)[0, -1] - generic_centre(model, tok, 0)
    assert torch.equal(gate.key, expected) and torch.equal(
        gate.centre, generic_centre(model, tok, 0)
    )
    subject_gate = tiny_edit(model).gates[0]
    assert not torch.equal(subject_gate.key, gate.key)  # "beta" is not the last token
    # the kind survives the file, byte for byte
    assert Patch.from_bytes(patch.to_bytes()).gates[0].kind == "query"
    assert Patch.from_bytes(patch.to_bytes()).to_bytes() == patch.to_bytes()
    # the prompt itself opens it at its last position: the edit is there
    base = logits(model, TINY["prompt"])
    with neuronpatch.applied(model, patch):
        assert not torch.equal(logits(model, TINY["prompt"])[0, -1], base[0, -1])


def test_query_span_target_opens_the_query_gate_on_the_answer_positions_only():
    model, tok = build_tiny("llama"), TinyTokenizer()
    hp = {
        "gate_key": "both",
        "subject_layer": 0,
        "subject_threshold": 0.75,
        "gate_layer": 1,
        "frozen_layers": 0,
    }
    patch = tiny_edit(model, query_span="target", **hp)
    answer = teacher_forced(tok, TINY["prompt"], TINY["target_new"])
    subject, query = patch.gates
    assert (subject.span, query.span) == (None, len(answer.answer_ids))
    assert tiny_edit(model, query_span=None, **hp).gates[1].span is None
    assert tiny_edit(model, query_span=3, **hp).gates[1].span == 3
    # as the edit trains it: open from the prompt's last token through the target's
    # next-to-last, where the teacher-forced loss reads; a sticky gate stays open beyond
    run_on = torch.cat([answer.input_ids, torch.tensor([tok(" zeta eta").input_ids[1:]])], 1)
    opened = _gate_fn(model, patch.gates)(run_on, None)[0]  # [S]
    start = answer.prompt_len - 1
    expected = torch.zeros_like(opened)
    expected[start : start + len(answer.answer_ids)] = True
    assert torch.equal(opened, expected)
    sticky = tiny_edit(model, query_span=None, **hp).gates
    assert _gate_fn(model, sticky)(run_on, None)[0, start:].all()


def test_gate_layer_must_leave_layers_to_edit():
    with pytest.raises(InvalidHparamsError, match="use a lower gate_layer"):
        tiny_edit(build_tiny("llama"), gate_layer=1)


def test_negative_prompts_skip_the_edited_relation():
    request = EditRequest("The occupation of Ada Lovelace is", "Ada Lovelace", "chef")
    prompts = negative_prompts(request, ("The occupation of {subject} is", "{subject} was born in"))
    assert prompts == ["Ada Lovelace was born in"]


def test_specific_neurons_without_other_relations_is_fines_choice():
    model = build_tiny("llama")
    request = EditRequest(**TINY)
    # the only template asks the edited relation itself, so there is nothing to be specific against
    hp = LocalHparams(**TINY_HP, k=6, negative_templates=("alpha {subject} gamma",))
    assert negative_prompts(request, hp.negative_templates) == []
    layers = [1]
    assert locate_specific(model, TinyTokenizer(), request, hp, layers) == locate(
        model, TinyTokenizer(), request, k=6, layers=layers
    )


def test_specific_neurons_score_zero_for_neurons_firing_as_much_elsewhere():
    model = build_tiny("llama")
    # one target token, so the only target position is the prompt's last; the "other
    # relation" starts with the whole prompt, so a causal model's neurons fire exactly as
    # much there: no neuron is specific to the edit
    request = EditRequest("alpha beta gamma", "beta", "delta")
    hp = LocalHparams(**TINY_HP, k=6, negative_templates=("alpha {subject} gamma zeta",))
    assert negative_prompts(request, hp.negative_templates) == ["alpha beta gamma zeta"]
    plain = locate(model, TinyTokenizer(), request, k=6, layers=[1])
    top = max(n.score for n in plain)
    assert top > 0
    specific = locate_specific(model, TinyTokenizer(), request, hp, [1])
    # zero up to float noise: the longer sequence may round its matmuls differently
    assert len(specific) == 6 and all(abs(n.score) < 1e-4 * top for n in specific)


def test_subject_end_without_offsets_falls_back_to_the_prefix():
    assert subject_end(TinyTokenizer(), "alpha beta gamma", "beta") == 2  # [bos, alpha, beta]


# --- the embedded model ------------------------------------------------------------------

FACTS = [
    # (request, paraphrase, same relation with other subjects)
    (
        {"prompt": "The currency of Japan is the", "subject": "Japan", "target_new": "euro"},
        "In Japan, people pay with the",
        ["The currency of China is the", "The currency of the United Kingdom is the"],
    ),
    (
        {"prompt": "The chemical symbol for gold is", "subject": "gold", "target_new": "Ag"},
        "Chemists write gold with the symbol",
        ["The chemical symbol for silver is", "The chemical symbol for iron is"],
    ),
    (
        {
            "prompt": "The mother tongue of Danielle Darrieux is",
            "subject": "Danielle Darrieux",
            "target_new": "English",
        },
        "Danielle Darrieux grew up speaking",
        ["The mother tongue of Pablo Picasso is", "The mother tongue of Angela Merkel is"],
    ),
]
UNRELATED = [
    "The Eiffel Tower is located in the city of",
    "Mount Everest is located in",
    "The capital of Spain is",
]


def target_prob(model, tok, prompt: str, target: str) -> float:
    ids = tok(prompt, return_tensors="pt").input_ids
    first = tok(" " + target, add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, -1].softmax(-1)[first])


@pytest.fixture(scope="module")
def local_patches(smollm2):
    model, tok = smollm2
    requests = [f[0] for f in FACTS]
    return neuronpatch.edit(model, tok, requests, method="local", gate_key="subject", lr=0.005)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(FACTS)))
def test_gated_edit_fires_on_the_prompt_and_paraphrase_only(smollm2, local_patches, i):
    model, tok = smollm2
    request, paraphrase, neighbours = FACTS[i]
    patch = local_patches[i]
    assert patch.is_gated and patch.metrics["success"], patch.metrics
    prompt, target = request["prompt"], request["target_new"]
    before = {p: greedy(model, tok, p) for p in [prompt, *neighbours, *UNRELATED]}
    base_logits = {p: logits(model, p, tok) for p in neighbours + UNRELATED}
    p_paraphrase = target_prob(model, tok, paraphrase, target)
    with neuronpatch.applied(model, patch):
        assert greedy(model, tok, prompt).strip().startswith(target)
        # the subject opens the gate on a paraphrase, and the target gains probability there
        assert target_prob(model, tok, paraphrase, target) > p_paraphrase
        assert bool(model.__dict__["_neuronpatch_state"].gates.open[0, -1].all())
        # other subjects never open it: same relation, bitwise the unedited logits
        for other in neighbours + UNRELATED:
            assert torch.equal(logits(model, other, tok), base_logits[other]), other
            assert greedy(model, tok, other) == before[other]
    assert greedy(model, tok, prompt) == before[prompt]


# (request, a rewording that must carry the edit, same subject in other relations, and the
# same relation of other subjects): both must keep their unedited completion
QUERY_FACTS = [
    (
        FACTS[0][0],
        "The official currency of Japan is the",
        ["The capital of Japan is", "Japan is located in"],
        ["The currency of China is the", "The currency of the United Kingdom is the"],
    ),
    (
        FACTS[1][0],
        "The chemical symbol of gold is",
        ["The atomic number of gold is", "The colour of gold is"],
        ["The chemical symbol for silver is", "The chemical symbol for iron is"],
    ),
    (
        FACTS[2][0],
        "The native language of Danielle Darrieux is",
        ["Danielle Darrieux was born in", "The occupation of Danielle Darrieux is"],
        ["The mother tongue of Pablo Picasso is", "The mother tongue of Angela Merkel is"],
    ),
]


@pytest.fixture(scope="module")
def both_patches(smollm2):
    model, tok = smollm2
    requests = [f[0] for f in QUERY_FACTS]
    return neuronpatch.edit(model, tok, requests, method="local", gate_key="both", lr=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(QUERY_FACTS)))
def test_subject_and_query_gate_edits_this_question_only(smollm2, both_patches, i):
    model, tok = smollm2
    request, rewording, other_relations, other_subjects = QUERY_FACTS[i]
    patch = both_patches[i]
    assert patch.metrics["success"], patch.metrics
    assert [(g.kind, g.requires) for g in patch.gates] == [("subject", None), ("query", 0)]
    # smollm2's query threshold is calibrated per edit, within [0.85, 0.9]
    assert (
        0.85 <= patch.gates[1].threshold <= 0.9 and patch.hparams["gate_threshold"] == "calibrated"
    )
    prompt, target = request["prompt"], request["target_new"]
    untouched = other_relations + other_subjects + UNRELATED
    before = {p: greedy(model, tok, p) for p in [prompt, rewording, *untouched]}
    base_logits = {p: logits(model, p, tok) for p in untouched}
    assert not before[rewording].strip().startswith(target)
    with neuronpatch.applied(model, patch):
        assert greedy(model, tok, prompt).strip().startswith(target)
        assert greedy(model, tok, rewording).strip().startswith(target)
        # the subject's other relations shut the query gate; other subjects the subject gate
        for other in untouched:
            assert torch.equal(logits(model, other, tok), base_logits[other]), other
            assert greedy(model, tok, other) == before[other], other
    assert greedy(model, tok, prompt) == before[prompt]


@pytest.mark.slow
def test_gemma3_default_calibrates_its_query_gate_and_answers_a_reworded_question(gemma3):
    # ZsRE record 179: the rewording reaches 0.859 at the middle query gate, which a fixed
    # 0.9 threshold would shut; calibrated on the subject's other relations, it is 0.85
    model, tok = gemma3
    request = {
        "prompt": "What is the name of university that educated Lucinda Bruce-Gardyne?",
        "subject": "Lucinda Bruce-Gardyne",
        "target_new": "University of Wisconsin-Madison",
    }
    rewording = "The college that Lucinda Bruce-Gardyne attended, what was that?"
    other_relation = "The occupation of Lucinda Bruce-Gardyne is"
    patch = neuronpatch.edit(model, tok, request)
    assert patch.metrics["success"] and patch.hparams["gate_threshold"] == "calibrated"
    chain = [(g.kind, g.layer, g.requires, g.any_of) for g in patch.gates]
    # word gates (Lucinda, Bruce, Gardyne), the subject gate and its strict copy (the word
    # escape, strict_margin 0.1), the wording gate, the calibrated query gate
    assert chain == [
        *[("subject", 0, None, ())] * 3,
        ("subject", 4, None, ()),
        ("subject", 4, 3, (0, 1, 2)),
        ("query", 4, 4, ()),
        ("query", 9, 5, ()),
    ]
    assert patch.hparams["strict_margin"] == 0.1
    query = patch.gates[-1]
    assert 0.85 <= query.threshold < 0.86
    ids = torch.tensor([tok(rewording).input_ids])
    with torch.no_grad():
        residual = model(input_ids=ids, output_hidden_states=True).hidden_states[10]
    reach = GateBank([query], torch.device("cpu")).cosine(residual)[0, -1, 0].item()
    assert query.threshold < reach < 0.9
    before = greedy(model, tok, rewording, n=6)
    base = logits(model, other_relation, tok)
    assert "Wisconsin" not in before
    with neuronpatch.applied(model, patch):
        assert greedy(model, tok, rewording, n=6).strip().startswith("University of Wisconsin")
        assert torch.equal(logits(model, other_relation, tok), base)  # its gate stays shut


def test_a_wording_gate_joins_the_chain_of_gates_below_the_query_gate(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model, tok = build_tiny("llama"), TinyTokenizer()
    # 3 layers: subject and wording keys at layer 0, the query key at 1, rows at 2
    hp = {"frozen_layers": 0, "gate_layer": 1, "subject_layer": 0, "wording_layer": 0}
    hp["subject_threshold"] = 0.5  # fixed: calibration needs a real tokenizer
    patch = tiny_edit(model, gate_key="both", **hp)
    chain = [(g.kind, g.layer, g.requires) for g in patch.gates]
    assert chain == [("subject", 0, None), ("query", 0, 0), ("query", 1, 1)]
    assert set(patch.layers) == {2}
    assert b'"format_version":"4"' in patch.to_bytes()[:4096]
    ids = torch.tensor([tok(TINY["prompt"]).input_ids])
    expected = _residual(model, ids, 0)[0, -1] - generic_centre(model, tok, 0)
    assert torch.equal(patch.gates[1].key, expected)  # the prompt's last token, low down
    assert patch.gates[1].threshold == LocalHparams().wording_threshold
    # below the subject key, the wording gate comes first and the subject gate requires it
    query_only = tiny_edit(model, gate_key="query", **hp)
    assert [(g.layer, g.requires) for g in query_only.gates] == [(0, None), (1, 0)]
    assert b'"format_version":"3"' in query_only.to_bytes()[:4096]


def test_auto_wording_layer_is_the_one_measured_for_the_model():
    from types import SimpleNamespace

    gemma = SimpleNamespace(model_type="gemma3_text", num_layers=18, hidden_size=640)
    smollm2 = SimpleNamespace(model_type="llama", num_layers=30, hidden_size=576)
    other = SimpleNamespace(model_type="llama", num_layers=16, hidden_size=2048)
    default = LocalHparams()
    assert (default.wording_layer, default.gate_threshold) == ("auto", "auto")
    resolved = {
        name: (hp.wording_layer, hp.gate_threshold)
        for name, hp in [(n, default.for_model(a)) for n, a in [("g", gemma), ("s", smollm2)]]
    }
    assert resolved == {"g": (4, "calibrated"), "s": (None, "calibrated")}
    assert default.for_model(other).wording_layer is None
    assert default.for_model(other).threshold() == 0.9
    assert LocalHparams(gate_key="query").for_model(gemma).wording_layer == 4
    # where it would not fit (no query gate; a query gate at or below it): none
    assert LocalHparams(gate_key="subject").for_model(gemma).wording_layer is None
    assert LocalHparams(gate_key="subject").for_model(smollm2).threshold() == 0.75
    assert LocalHparams(gate_layer=4, subject_layer=2).for_model(gemma).wording_layer is None
    # a number or None is kept as given
    assert LocalHparams(wording_layer=2).for_model(smollm2).wording_layer == 2
    assert LocalHparams(wording_layer=None).for_model(gemma).wording_layer is None
    assert LocalHparams(gate_threshold=0.8).for_model(smollm2).threshold() == 0.8
    # the word escape: gemma3's calibrated subject gate of a both key, nowhere else
    assert default.strict_margin == "auto"
    assert default.for_model(gemma).strict_margin == 0.1
    assert default.for_model(smollm2).strict_margin is None
    assert LocalHparams(gate_key="query").for_model(gemma).strict_margin is None
    assert LocalHparams(subject_threshold=0.6).for_model(gemma).strict_margin is None
    assert LocalHparams(subject_margin=0.2).for_model(gemma).strict_margin is None
    assert LocalHparams(strict_margin=None).for_model(gemma).strict_margin is None
    assert LocalHparams(strict_margin=0.05).for_model(smollm2).strict_margin == 0.05
    # a lenient gate below its calibration only behind a word escape (the strict gate)
    lenient = LocalHparams(subject_margin=-0.02, strict_margin=0.05).for_model(smollm2)
    assert (lenient.subject_margin, lenient.strict_margin) == (-0.02, 0.05)
    unknown = SimpleNamespace(model_type="mistral", num_layers=32, hidden_size=4096)
    with pytest.raises(InvalidHparamsError, match="strict_margin='auto' gives none for this"):
        LocalHparams(subject_margin=-0.02).for_model(unknown)
    # the patch records what was used, not "auto"
    patch = tiny_edit(build_tiny("llama"), gate_key="query", frozen_layers=0, gate_layer=1)
    assert patch.hparams["wording_layer"] is None and len(patch.gates) == 1
    assert patch.hparams["gate_threshold"] is None and patch.gates[0].threshold == 0.9
    assert patch.hparams["subject_margin"] == CALIBRATION_MARGIN


@pytest.mark.parametrize("floor, cap", [(0.85, QUERY_CAP), (0.85, 0.99), (0.1, QUERY_CAP)])
def test_calibrated_query_threshold_sits_above_the_subjects_other_relations(
    monkeypatch, floor, cap
):
    from neuronpatch.local import QUERY_THRESHOLD, peak_cosines

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model, tok = build_tiny("llama"), TinyTokenizer()
    templates = ("{subject} one", "two {subject} three", "four five {subject}")
    hp = {"frozen_layers": 0, "gate_layer": 1, "negative_templates": templates}
    hp.update(query_cap=cap, query_floor=floor)
    patch = tiny_edit(model, gate_key="query", gate_threshold="calibrated", **hp)
    (gate,) = patch.gates
    others = [t.format(subject=TINY["subject"]) for t in templates]
    highest = peak_cosines(model, tok, [gate], others).max().item()
    expected = min(max(highest + CALIBRATION_MARGIN, floor), cap)
    assert gate.threshold == pytest.approx(expected, abs=1e-6)
    assert floor <= gate.threshold <= cap
    assert (patch.hparams["query_cap"], patch.hparams["query_floor"]) == (cap, floor)
    if highest + CALIBRATION_MARGIN <= cap:  # then shut on every one of them
        assert bool((peak_cosines(model, tok, [gate], others) < gate.threshold).all())
    # every template asking the edited relation: nothing to calibrate on, the fixed threshold
    alone = tiny_edit(
        model,
        gate_key="query",
        gate_threshold="calibrated",
        **{**hp, "negative_templates": ("alpha {subject} gamma",)},
    )
    assert alone.gates[0].threshold == QUERY_THRESHOLD


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gate_key": "subject", "wording_layer": 0}, "gate_key='subject' has no query gate"),
        ({"gate_key": "query", "wording_layer": 1, "gate_layer": 1}, "must be below the query"),
    ],
)
def test_a_wording_gate_needs_a_query_gate_above_it(overrides, message):
    model = build_tiny("llama")
    with pytest.raises(InvalidHparamsError, match=message):
        tiny_edit(model, **{"frozen_layers": 0, **overrides})
    # building the gates alone refuses them too (before, make_gates dropped the wording gate)
    with pytest.raises(InvalidHparamsError, match=message):
        make_gates(model, TinyTokenizer(), EditRequest.coerce(TINY), LocalHparams(**overrides))


@pytest.mark.slow
def test_wording_gate_keeps_the_question_inside_a_longer_sentence_unedited(smollm2):
    # KnowEdit's Forgetfulness prompts ask the edited question with a clause naming the new
    # answer as wrong; the query key alone opens there, the wording key (layer 2) does not
    model, tok = smollm2
    request, rewording, other_relations, other_subjects = QUERY_FACTS[0]
    patch = neuronpatch.edit(
        model, tok, request, method="local", wording_layer=2, wording_threshold=0.95
    )
    assert patch.metrics["success"] and [g.layer for g in patch.gates] == [2, 4, 15]
    clause = "The currency of Japan, which is not euro, is the"
    untouched = [clause, *other_relations, *other_subjects]
    before = {p: logits(model, p, tok) for p in untouched}
    assert "yen" in greedy(model, tok, clause)
    with neuronpatch.applied(model, patch):
        assert greedy(model, tok, request["prompt"]).strip().startswith("euro")
        assert greedy(model, tok, rewording).strip().startswith("euro")
        for other in untouched:
            assert torch.equal(logits(model, other, tok), before[other]), other
    without = neuronpatch.edit(model, tok, request, method="local")
    with neuronpatch.applied(model, without):  # what the wording gate prevents
        assert "euro" in greedy(model, tok, clause)


def test_both_gates_need_a_query_layer_above_the_subject_key():
    with pytest.raises(InvalidHparamsError, match="must read a higher layer"):
        tiny_edit(build_tiny("llama"), gate_key="both")


@pytest.mark.parametrize("margin", [CALIBRATION_MARGIN, 0.005, 0.1])
def test_calibrated_subject_threshold_shuts_the_gate_on_other_subjects(monkeypatch, margin):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model, tok = build_tiny("llama"), TinyTokenizer()
    hp = {"gate_key": "both", "subject_layer": 0, "gate_layer": 1, "frozen_layers": 0}
    patch = tiny_edit(
        model,
        subject_threshold="calibrated",
        calibration_neighbours=0,
        subject_margin=margin,
        **hp,
    )
    subject, query = patch.gates
    assert (subject.kind, subject.layer, query.requires) == ("subject", 0, 0)

    def cosines(text: str) -> torch.Tensor:  # cos(h - centre, key) at every position: [S]
        h = _residual(model, torch.tensor([tok(text).input_ids]), 0)[0] - subject.centre
        return h @ subject.key / (h.norm(dim=-1) * subject.key.norm()).clamp_min(1e-12)

    others = [TINY["prompt"].replace("beta", other) for other in OTHER_SUBJECTS]
    highest = max(cosines(text).max().item() for text in others)
    # just above the highest (the calibration prompts ran as one padded batch)
    expected = min(max(highest + margin, CALIBRATION_FLOOR), MAX_CALIBRATED)
    assert subject.threshold == pytest.approx(expected, abs=1e-6)
    assert patch.hparams["subject_margin"] == margin
    bank = GateBank([subject], torch.device("cpu"))
    for text in others:  # every calibration prompt keeps the subject gate shut
        h = _residual(model, torch.tensor([tok(text).input_ids]), 0)
        assert not bank.open(h).any(), text
    h = _residual(model, torch.tensor([tok(TINY["prompt"]).input_ids]), 0)
    assert bank.open(h)[0, -1, 0]  # the prompt itself opens it
    # a fixed threshold is stored as given; the calibrated one is data like any other
    assert tiny_edit(model, subject_threshold=0.5, **hp).gates[0].threshold == 0.5
    assert Patch.from_bytes(patch.to_bytes()).to_bytes() == patch.to_bytes()


def test_inspect_shows_the_gate(tmp_path, capsys):
    from neuronpatch.cli import main

    path = tiny_edit(build_tiny("llama")).save(tmp_path / "g.safetensors")
    assert main(["inspect", str(path), "--no-model"]) == 0
    text = capsys.readouterr().out
    assert "gate 0   subject: open from the first position" in text
    assert "has cosine > 0.7500 with the key" in text  # thresholds to 4 places (exact: --json)
    assert main(["inspect", str(path), "--no-model", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gates"] == [{"kind": "subject", "layer": 0, "threshold": 0.75}]
    assert all(n["gate"] == 0 for n in info["neurons"])


@pytest.mark.slow
def test_vocabulary_neighbours_are_entities_of_the_subjects_kind(smollm2):
    model, tok = smollm2
    japan = vocabulary_neighbours(model, tok, EditRequest.coerce(FACTS[0][0]), 8)
    gold = vocabulary_neighbours(model, tok, EditRequest.coerce(FACTS[1][0]), 8)
    assert len(japan) == len(gold) == 8
    assert "China" in japan and "Korea" in japan and "silver" in gold
    assert not any("japan" in w.lower() for w in japan) and "gold" not in [w.lower() for w in gold]
    assert vocabulary_neighbours(model, tok, EditRequest.coerce(FACTS[0][0]), 0) == []


@pytest.mark.slow
def test_vocabulary_neighbours_only_of_a_whole_word_and_not_its_inflections(smollm2):
    model, tok = smollm2

    def near(prompt: str, subject: str) -> list[str]:
        return vocabulary_neighbours(model, tok, EditRequest(prompt, subject, "x"), 8)

    # " Casariego" is several tokens: the last one's neighbours (" goes", " went") are no kin
    # of the subject, and calibrating on them shut the gate on its alias "Nicolás Méndez"
    assert (
        near("The place of birth of Nicolás Méndez Casariego is", "Nicolás Méndez Casariego") == []
    )
    # " Assembly" is one token; " assemblies", " assemble" share its stem and are left out
    assembly = near(
        "The name of the country which 81st Missouri General Assembly is associated with is",
        "81st Missouri General Assembly",
    )
    assert len(assembly) == 8 and not any(w.lower().startswith("assem") for w in assembly)


@pytest.mark.slow
def test_gemma3_word_escape_shuts_a_same_kind_stranger_and_keeps_an_alias_sharing_a_word(gemma3):
    # strict_margin: the subject gate needs 0.08 more than its calibrated threshold unless a
    # word of the subject is in the input (benchmarks/results/subject_key_gemma3_*.md)
    model, tok = gemma3
    hp = LocalHparams(strict_margin=0.1).for_model(neuronpatch.arch.resolve(model))
    default = LocalHparams(strict_margin=None).for_model(neuronpatch.arch.resolve(model))

    def opens(gates, text):
        ids = torch.tensor([tok(text).input_ids])
        with torch.no_grad():
            return bool(_gate_fn(model, gates)(ids, None)[0, -1])

    # CounterFact record: "Edwin Morris" passes the default's calibrated subject gate
    camus = EditRequest.coerce(
        {
            "prompt": "Carlos Camus holds the title of",
            "subject": "Carlos Camus",
            "target_new": "cardinal",
        }
    )
    stranger = "Edwin Morris holds the title of"
    with torch.no_grad():
        plain, gates = make_gates(model, tok, camus, default), make_gates(model, tok, camus, hp)
    chain = [(g.layer, g.requires, g.any_of) for g in gates]
    # two word gates (" Carlos", " Camus"), lenient, strict (either word), wording, query
    assert chain == [
        (0, None, ()),
        (0, None, ()),
        (4, None, ()),
        (4, 2, (0, 1)),
        (4, 3, ()),
        (9, 4, ()),
    ]
    assert gates[3].threshold == pytest.approx(gates[2].threshold + 0.08)
    assert opens(plain, stranger) and not opens(gates, stranger)
    assert opens(gates, camus.prompt)
    # WikiData_cf record: the alias keeps "Thomas" and "Ahern", so the lenient gate decides
    ahern = {
        "prompt": "The name of the position held by Thomas L. Ahern, Jr. is",
        "subject": "Thomas L. Ahern, Jr.",
        "target_new": "Austrian Internuncio in Istanbul",
    }
    alias = "The name of the position held by Thomas Ahern is"
    patch = neuronpatch.edit(model, tok, ahern)  # gemma3's default: strict_margin 0.1
    assert patch.metrics["success"] and b'"format_version":"5"' in patch.to_bytes()[:4096]
    words, (lenient, strict) = patch.gates[:2], patch.gates[2:4]
    assert [g.layer for g in words] == [0, 0] and strict.any_of == (0, 1)
    assert not opens((lenient, replace(strict, any_of=(), requires=None)), alias)  # strict alone
    before = greedy(model, tok, alias, n=4)
    other = "The gender of Thomas L. Ahern, Jr. is"
    base = logits(model, other, tok)
    with neuronpatch.applied(model, patch):
        assert greedy(model, tok, alias, n=4).strip().startswith("Austrian")
        assert torch.equal(logits(model, other, tok), base)  # another relation: shut
    assert not before.strip().startswith("Austrian")


@pytest.mark.slow
def test_smollm2_lenient_escape_opens_an_alias_sharing_a_word_and_shuts_a_stranger(smollm2):
    # the word escape the other way round: the subject gate at margin 0 where a word of the
    # subject is in the input, 0.05 elsewhere (benchmarks/results/subject_key_smollm2_*.md)
    model, tok = smollm2
    arch = neuronpatch.arch.resolve(model)
    escape = LocalHparams(subject_margin=0.0, strict_margin=0.05).for_model(arch)
    plain = LocalHparams(subject_margin=0.02, strict_margin=None).for_model(arch)

    def opens(gates, text):
        ids = torch.tensor([tok(text).input_ids])
        with torch.no_grad():
            return bool(_gate_fn(model, gates)(ids, None)[0, -1])

    def gates(request, hp):
        with torch.no_grad():
            return make_gates(model, tok, EditRequest.coerce(request), hp)

    # CounterFact record 68: "Lanciano" passes the plain calibrated gate for Gazzola's edit
    gazzola = {
        "prompt": "Gazzola is located in the country of",
        "subject": "Gazzola",
        "target_new": "Liberia",
    }
    stranger = "Lanciano is located in the country of"
    plain_g, escape_g = gates(gazzola, plain), gates(gazzola, escape)
    assert [(g.layer, g.requires, g.any_of) for g in escape_g] == [
        (0, None, ()),  # the word gate (" Gazzola")
        (4, None, ()),  # lenient: margin 0
        (4, 1, (0,)),  # strict: 0.05, or the word
        (15, 2, ()),  # the calibrated query gate
    ]
    assert escape_g[2].threshold == pytest.approx(escape_g[1].threshold + 0.05)
    assert escape_g[1].threshold == pytest.approx(plain_g[0].threshold - 0.02)
    assert opens(plain_g, stranger) and not opens(escape_g, stranger)
    assert opens(escape_g, gazzola["prompt"])
    # WikiData_cf record 116: the alias keeps "Thomas" and "Ahern"; the plain gate shuts it
    ahern = {
        "prompt": "The name of the position held by Thomas L. Ahern, Jr. is",
        "subject": "Thomas L. Ahern, Jr.",
        "target_new": "Austrian Internuncio in Istanbul",
    }
    alias = "The name of the position held by Thomas Ahern is"
    assert not opens(gates(ahern, plain), alias) and opens(gates(ahern, escape), alias)


@pytest.mark.slow
def test_after_answer_kl_over_a_continuation_keeps_what_follows_the_answer(smollm2):
    # one of the ZsRE benchmark's worst fluency cases ("Noctuidae / Noctuidae: noctuidae ..."):
    # the positions after the answer read the edited ones through attention; the KL over the
    # answer's last position and 7 more greedy tokens of the unedited model keeps them closer
    # (0.027 -> 0.012 nats here, the edit still succeeding)
    model, tok = smollm2
    request = {
        "prompt": "Which family does Hume's whitethroat belong to?",
        "subject": "Hume's whitethroat",
        "target_new": "Noctuidae",
    }
    ids = tok(f"{request['prompt']} {request['target_new']}", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(7):  # the unedited model's continuation, as the loss builds it
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        base = model(ids).logits[0, -8:].log_softmax(-1)  # [8, vocab]

    def leak(**hparams) -> float:
        patch = neuronpatch.edit(model, tok, request, **hparams)
        assert patch.metrics["success"]
        with torch.no_grad(), neuronpatch.applied(model, patch):
            edited = model(ids).logits[0, -8:].log_softmax(-1)
        return float((base.exp() * (base - edited)).sum(-1).mean())

    plain = leak()
    kept = leak(after_answer_kl=10.0, after_answer_tokens=8)
    assert kept < plain / 2
