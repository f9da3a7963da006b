"""Stack calibration: each subject gate stays shut on the other stacked edits' prompts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny, make_patch
from test_fine import TinyTokenizer
from test_fine_real import greedy

import neuronpatch
from neuronpatch import fingerprint
from neuronpatch.arch import base_model_info, resolve
from neuronpatch.calibration import CALIBRATION_KEY, calibrate_stack, raised_thresholds
from neuronpatch.cli import main
from neuronpatch.errors import ArchitectureMismatchError, StackError
from neuronpatch.gates import GateBank
from neuronpatch.local import CALIBRATION_MARGIN, MAX_CALIBRATED, LocalHparams, make_gates
from neuronpatch.patch import Patch
from neuronpatch.request import EditRequest
from neuronpatch.stacking import stack, unstack

# subject gate at layer 0 of the tiny 3-layer models; their random residuals match far less
# than a real model's, so the fixed threshold is low enough for some prompts to pass it
THRESHOLD = 0.2
SUBJECT_HP = LocalHparams(
    gate_key="subject", gate_layer=0, frozen_layers=1, gate_threshold=THRESHOLD
)
TINY_REQUESTS = [
    {"prompt": "alpha beta gamma", "subject": "beta", "target_new": "delta"},
    {"prompt": "one two three four", "subject": "three", "target_new": "five"},
    {"prompt": "red green blue", "subject": "green", "target_new": "black"},
    {"prompt": "the beta of zeta", "subject": "beta", "target_new": "eta"},  # beta again
]


def gated(model, request: dict, seed: int, hp: LocalHparams = SUBJECT_HP) -> Patch:
    """A patch with the gates ``method="local"`` makes and two random rows behind them."""
    tok, arch = TinyTokenizer(), resolve(model)
    gates = make_gates(model, tok, EditRequest.coerce(request), hp)
    g = torch.Generator().manual_seed(seed)
    rows = (
        torch.randperm(arch.intermediate_size, generator=g)[:2],  # [2]
        torch.randn(2, arch.hidden_size, generator=g),  # [2, hidden]
        torch.zeros(2, dtype=torch.int64),  # both rows behind gate 0
    )
    return Patch(
        {gates[-1].layer + 1: rows},  # above the gate
        base_model_info(model),
        base_fingerprint=fingerprint.compute(arch),
        gates=gates,
        requests=(request,),
        method="local",
    )


def peak(model, gate, prompt: str) -> float:
    """The highest cosine ``gate`` reaches at any position of ``prompt`` (one prompt alone)."""
    ids = torch.tensor([TinyTokenizer()(prompt).input_ids])
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[gate.layer + 1]
    return GateBank([gate], torch.device("cpu")).cosine(h).max().item()


@pytest.fixture
def llama():
    return build_tiny("llama")


def test_each_subject_gate_is_raised_above_the_other_edits_prompts_and_no_further(llama):
    tok = TinyTokenizer()
    patches = [gated(llama, r, i) for i, r in enumerate(TINY_REQUESTS[:3])]
    calibrated = calibrate_stack(llama, tok, patches)
    assert len(calibrated) == 3
    raised = 0
    for i, (old, new) in enumerate(zip(patches, calibrated, strict=True)):
        before, after = old.gates[0].threshold, new.gates[0].threshold
        others = [peak(llama, old.gates[0], r["prompt"]) for j, r in enumerate(TINY_REQUESTS[:3])
                  if j != i]  # fmt: skip
        # exactly the highest other cosine plus the margin, or the old threshold if higher
        want = max(before, min(max(others) + CALIBRATION_MARGIN, MAX_CALIBRATED))
        assert after == pytest.approx(want, abs=1e-6)
        raised += after > before
        # shut on every other prompt, still open on its own
        assert all(p < after for p in others)
        assert peak(llama, new.gates[0], old.requests[0]["prompt"]) > after
        # only the threshold moved: rows, key, centre and identity of the edit are kept
        assert torch.equal(new.gates[0].key, old.gates[0].key)
        assert new.layers.keys() == old.layers.keys()
        assert torch.equal(new.layers[1].deltas, old.layers[1].deltas)
        assert new.requests == old.requests and new.method == old.method
        record = new.extra[CALIBRATION_KEY]
        assert record == {
            "edits": 3,
            "margin": CALIBRATION_MARGIN,
            "original_thresholds": [before],
            "thresholds": [after],
        }
    assert raised, "the tiny prompts should cross-match somewhere, or this test checks nothing"
    # the inputs are untouched (patches are immutable, but check the thresholds anyway)
    assert [p.gates[0].threshold for p in patches] == [THRESHOLD] * 3


def test_gates_reading_different_layers_are_each_calibrated_on_their_own_layer(llama):
    at_layer_1 = replace(SUBJECT_HP, gate_layer=1)
    patches = [
        gated(llama, TINY_REQUESTS[0], 0),
        gated(llama, TINY_REQUESTS[1], 1, at_layer_1),
        gated(llama, TINY_REQUESTS[2], 2, at_layer_1),
    ]
    assert [p.gates[0].layer for p in patches] == [0, 1, 1]
    calibrated = calibrate_stack(llama, TinyTokenizer(), patches)
    for i, (old, new) in enumerate(zip(patches, calibrated, strict=True)):
        others = [peak(llama, old.gates[0], r["prompt"]) for j, r in enumerate(TINY_REQUESTS[:3])
                  if j != i]  # fmt: skip
        want = max(THRESHOLD, min(max(others) + CALIBRATION_MARGIN, MAX_CALIBRATED))
        assert new.gates[0].threshold == pytest.approx(want, abs=1e-6)


def test_inspect_says_which_thresholds_stack_calibration_raised(llama, tmp_path, capsys):
    patches = [gated(llama, r, i) for i, r in enumerate(TINY_REQUESTS[:3])]
    calibrated = calibrate_stack(llama, TinyTokenizer(), patches)
    for old, new in zip(patches, calibrated, strict=True):
        path = new.save(tmp_path / "p.safetensors")
        assert main(["inspect", str(path), "--no-model"]) == 0
        text = capsys.readouterr().out
        raised = new.gates[0].threshold > old.gates[0].threshold
        assert (
            f"(raised from {THRESHOLD:.4f} by stack calibration against 3 edits)" in text
        ) == raised


def test_prompts_naming_the_gates_own_subject_do_not_raise_it(llama):
    tok = TinyTokenizer()
    same_subject = [gated(llama, TINY_REQUESTS[0], 0), gated(llama, TINY_REQUESTS[3], 3)]
    # the second prompt would raise the first gate, were it not about the same subject
    assert peak(llama, same_subject[0].gates[0], TINY_REQUESTS[3]["prompt"]) > THRESHOLD
    calibrated = calibrate_stack(llama, tok, same_subject)
    assert [p.gates[0].threshold for p in calibrated] == [THRESHOLD, THRESHOLD]


def test_calibrating_again_keeps_the_first_thresholds_and_a_stack_round_trips(llama, tmp_path):
    tok = TinyTokenizer()
    patches = [gated(llama, r, i) for i, r in enumerate(TINY_REQUESTS[:3])]
    once = calibrate_stack(llama, tok, patches)
    stacked = stack(once)
    # a stacked input is taken apart; calibrating a calibrated stack changes nothing more
    twice = calibrate_stack(llama, tok, [Patch.load(stacked.save(tmp_path / "s.safetensors"))])
    for a, b in zip(once, twice, strict=True):
        assert [g.threshold for g in a.gates] == [g.threshold for g in b.gates]
        assert b.extra[CALIBRATION_KEY]["original_thresholds"] == [THRESHOLD]
    assert [p.to_bytes() for p in unstack(stack(once))] == [p.to_bytes() for p in once]


def test_patches_without_subject_gates_come_back_as_they_are(llama):
    plain = [make_patch(llama, requests=(r,)) for r in TINY_REQUESTS[:2]]
    assert calibrate_stack(llama, TinyTokenizer(), plain) == plain


def test_bad_input_is_refused(llama):
    tok, patch = TinyTokenizer(), gated(llama, TINY_REQUESTS[0], 0)
    with pytest.raises(StackError, match="nothing to calibrate"):
        calibrate_stack(llama, tok, [])
    with pytest.raises(ValueError, match="margin must lie in"):
        calibrate_stack(llama, tok, [patch], margin=1.5)
    with pytest.raises(ArchitectureMismatchError, match="Load the patch's base model"):
        calibrate_stack(build_tiny("qwen2"), tok, [patch])
    with pytest.raises(ValueError, match="excluded must be"):
        raised_thresholds(llama, tok, patch.gates, ["a b"], torch.zeros(2, 1, dtype=torch.bool))


def test_a_gate_excluded_from_every_prompt_keeps_its_threshold(llama):
    gate = gated(llama, TINY_REQUESTS[0], 0).gates[0]
    prompts = ["alpha beta gamma", "one two three four"]
    excluded = torch.ones(2, 1, dtype=torch.bool)
    assert raised_thresholds(llama, TinyTokenizer(), [gate], prompts, excluded) == [THRESHOLD]
    highest = max(peak(llama, gate, p) for p in prompts)
    assert math.isclose(
        raised_thresholds(llama, TinyTokenizer(), [gate], prompts, ~excluded, margin=0.0)[0],
        max(THRESHOLD, min(highest, MAX_CALIBRATED)),
        abs_tol=1e-6,
    )


# Two edits of one relation: each default gate opens on the other's prompt, so stacked
# uncalibrated, the first edit's answer overwrites the second's (found on WikiData_cf).
GEPP = {"prompt": "The gender of Henry John Gepp is", "subject": "Henry John Gepp",
        "target_new": "bigender"}  # fmt: skip
HODSON = {"prompt": "The gender of Phillip Hodson is", "subject": "Phillip Hodson",
          "target_new": "intersex"}  # fmt: skip


@pytest.mark.slow
def test_a_calibrated_stack_answers_each_prompt_as_its_own_edit_alone(smollm2, tmp_path, capsys):
    model, tok = smollm2
    patches = neuronpatch.edit(model, tok, [GEPP, HODSON])
    assert all(p.metrics["success"] for p in patches)

    def logits(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return model(**tok(prompt, return_tensors="pt")).logits

    alone = {}
    for patch, request in zip(patches, (GEPP, HODSON), strict=True):
        with neuronpatch.applied(model, patch):
            alone[request["prompt"]] = logits(request["prompt"])
            assert greedy(model, tok, request["prompt"]).strip().startswith(request["target_new"])
    with neuronpatch.applied(model, stack(patches)):  # uncalibrated: Gepp's edit leaks
        assert greedy(model, tok, HODSON["prompt"]).strip().startswith("bigender")

    calibrated = calibrate_stack(model, tok, patches)
    assert all(new.gates[0].threshold > old.gates[0].threshold
               for old, new in zip(patches, calibrated, strict=True))  # fmt: skip
    with neuronpatch.applied(model, stack(calibrated)):
        for request in (GEPP, HODSON):
            assert torch.equal(logits(request["prompt"]), alone[request["prompt"]])

    # the command line does the same with --calibrate
    files = [p.save(tmp_path / f"{i}.safetensors") for i, p in enumerate(patches)]
    out = tmp_path / "stack.safetensors"
    assert main(["stack", *map(str, files), "-o", str(out), "--calibrate"]) == 0
    assert "2 of 2 subject gates raised" in capsys.readouterr().out
    written = unstack(Patch.load(out))
    assert all(a.equals(b) for p, q in zip(written, calibrated, strict=True)
               for a, b in zip(p.gates, q.gates, strict=True))  # fmt: skip


def test_cli_refuses_model_without_calibrate_and_hints_at_it(llama, tmp_path, capsys):
    file = gated(llama, TINY_REQUESTS[0], 0).save(tmp_path / "a.safetensors")
    assert main(["stack", str(file), "-o", str(tmp_path / "s.safetensors"), "--model", "x"]) == 2
    assert "add --calibrate" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()
    assert main(["stack", str(file), "-o", str(tmp_path / "s.safetensors")]) == 0
    assert "hint: these patches have subject gates" in capsys.readouterr().out
