"""Batch editing: one patch per request, resumable, failures reported, optionally stacked."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import build_tiny

import neuronpatch
from neuronpatch import batch
from neuronpatch.batch import BatchError, edit_batch, patch_path, read_requests, run_batch
from neuronpatch.cli import main
from neuronpatch.patch import Patch
from neuronpatch.stacking import unstack

# lr 0.5 on a model with a sharpened unembedding reaches p > 0.9 in a few steps
HPARAMS = {"lr": 0.5, "max_steps": 20, "frozen_layers": 1, "k": 3}
REQUESTS = [
    {"prompt": "alpha beta gamma", "subject": "beta", "target_new": "delta"},
    {"prompt": "one two three", "subject": "two", "target_new": "four five"},
    {"prompt": "red green", "subject": "red", "target_new": "blue", "target_true": "green"},
]
BAD = {"prompt": "red green", "subject": "yellow", "target_new": "blue"}


class TinyTokenizer:
    """A whitespace tokenizer over the tiny models' 128-token vocabulary."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [
            3 + sum(map(ord, w)) % 120 for w in text.split()
        ]
        return type("Enc", (), {"input_ids": ids})()


@pytest.fixture(scope="module")
def model():
    """A tiny llama whose logits are sharp enough for an edit to reach p > 0.9."""
    tiny = build_tiny("llama")
    with torch.no_grad():
        tiny.lm_head.weight.mul_(50)
    return tiny


@pytest.fixture(autouse=True)
def pinned_clock(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")  # byte-identical patches


def test_batch_makes_one_patch_per_request_against_the_unedited_model(model, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    paths = edit_batch(
        model, TinyTokenizer(), REQUESTS, tmp_path, method="fine", hparams=HPARAMS, progress=False
    )
    assert [p.name for p in paths] == [
        "00000-beta-delta.safetensors",
        "00001-two-four-five.safetensors",
        "00002-red-blue.safetensors",
    ]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = neuronpatch.edit(model, TinyTokenizer(), REQUESTS[2], method="fine", **HPARAMS)
    assert paths[2].read_bytes() == alone.to_bytes()  # as if edited on its own
    assert Patch.load(paths[2]).requests == (REQUESTS[2],)
    assert not (tmp_path / batch.FAILURES_FILE).exists()


def test_rerun_resumes_and_skips_finished_requests(model, tmp_path, monkeypatch):
    tok = TinyTokenizer()
    first = edit_batch(
        model, tok, REQUESTS, tmp_path, method="fine", hparams=HPARAMS, progress=False
    )
    mtimes = {p: p.stat().st_mtime_ns for p in first}
    first[1].unlink()  # as if interrupted before request 1 was saved
    calls = []
    real_edit_each = batch.edit_each

    def counting_edit_each(*args, **kwargs):
        calls.extend(args[2])
        return real_edit_each(*args, **kwargs)

    monkeypatch.setattr(batch, "edit_each", counting_edit_each)
    result = run_batch(
        model, tok, REQUESTS, tmp_path, method="fine", hparams=HPARAMS, progress=False
    )
    assert [r.to_dict() for r in calls] == [REQUESTS[1]]
    assert [i.resumed for i in result.items] == [True, False, True]
    assert result.paths() == first
    assert first[0].stat().st_mtime_ns == mtimes[first[0]]
    assert "1 edited, 2 already done, 0 refused" in result.summary()


def test_resume_refuses_a_folder_of_another_batch_or_other_hparams(model, tmp_path):
    tok = TinyTokenizer()
    edit_batch(model, tok, REQUESTS[:1], tmp_path, method="fine", hparams=HPARAMS, progress=False)
    other = [{**REQUESTS[0], "prompt": "zeta beta gamma"}]  # same file name, other request
    with pytest.raises(BatchError, match="another batch"):
        edit_batch(model, tok, other, tmp_path, method="fine", hparams=HPARAMS, progress=False)
    with pytest.raises(BatchError, match=r"other settings: lr=0\.5 \(this run 0\.1\)"):
        edit_batch(
            model, tok, REQUESTS[:1], tmp_path, method="fine", hparams={**HPARAMS, "lr": 0.1}
        )


def test_a_failing_request_is_reported_and_the_others_still_run(model, tmp_path):
    requests = [REQUESTS[0], BAD, REQUESTS[2]]
    result = run_batch(
        model, TinyTokenizer(), requests, tmp_path, method="fine", hparams=HPARAMS, progress=False
    )
    assert [i.status for i in result.items] == ["ok", "error", "ok"]
    assert [p.name for p in result.paths()] == [
        "00000-beta-delta.safetensors",
        "00002-red-blue.safetensors",
    ]
    assert not patch_path(tmp_path, 1, BAD).exists()
    lines = (tmp_path / batch.FAILURES_FILE).read_text().splitlines()
    assert len(lines) == 1
    failure = json.loads(lines[0])
    assert failure["index"] == 1 and failure["status"] == "error" and failure["file"] is None
    assert failure["request"] == BAD and "does not occur in prompt" in failure["message"]
    assert "1 refused" in result.summary() and "failures.jsonl" in result.summary()


def test_an_edit_that_misses_its_target_is_saved_but_not_counted(model, tmp_path):
    weak = {**HPARAMS, "lr": 1e-6, "max_steps": 1}
    result = run_batch(
        model, TinyTokenizer(), REQUESTS[:1], tmp_path, method="fine", hparams=weak, progress=False
    )
    assert result.items[0].status == "unsuccessful"
    assert result.paths() == [] and result.paths(include_unsuccessful=True)[0].exists()
    failure = json.loads((tmp_path / batch.FAILURES_FILE).read_text())
    assert failure["status"] == "unsuccessful" and "target probability" in failure["message"]
    again = run_batch(
        model, TinyTokenizer(), REQUESTS[:1], tmp_path, method="fine", hparams=weak, progress=False
    )
    assert again.items[0].resumed and again.items[0].status == "unsuccessful"
    assert json.loads((tmp_path / batch.FAILURES_FILE).read_text()) == failure


def test_batched_editing_reports_each_request_like_single_editing(model, tmp_path):
    requests = [REQUESTS[0], BAD, REQUESTS[1], REQUESTS[2]]
    kwargs = {"method": "local", "hparams": {**HPARAMS, "gate_key": "subject", "gate_layer": 0}}
    tok = TinyTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = run_batch(model, tok, requests, tmp_path / "a", progress=False, **kwargs)
        together = run_batch(
            model, tok, requests, tmp_path / "b", progress=False, batch_size=2, **kwargs
        )
    assert [i.status for i in together.items] == [i.status for i in alone.items]
    assert together.items[1].status == "error" and "does not occur" in together.items[1].message
    for a, b in zip(alone.paths(True), together.paths(True), strict=True):
        pa, pb = Patch.load(a), Patch.load(b)
        assert pb.requests == pa.requests and pb.metrics["steps"] == pa.metrics["steps"]
        for layer, ld in pa.layers.items():
            torch.testing.assert_close(pb.layers[layer].deltas, ld.deltas, atol=1e-5, rtol=1e-3)
    with pytest.raises(BatchError, match="batch_size"):
        run_batch(model, tok, requests, tmp_path / "c", progress=False, batch_size=0, **kwargs)


def test_read_requests_plain_jsonl_and_knowedit(tmp_path):
    plain = tmp_path / "requests.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in [*REQUESTS, BAD]))
    assert read_requests(plain) == [*REQUESTS, BAD]  # checked one by one when edited
    assert read_requests(plain, n=2) == REQUESTS[:2]
    knowedit = tmp_path / "wiki.json"
    record = {
        "prompt": "The capital of X is",
        "subject": "X",
        "target_new": "Y",
        "ground_truth": ["Z", "Zed"],
        "locality": {},
    }
    knowedit.write_text(json.dumps([record, {**record, "subject": "capital"}]))
    assert read_requests(knowedit) == [
        {"prompt": "The capital of X is", "subject": "X", "target_new": "Y", "target_true": "Z"},
        {"prompt": "The capital of X is", "subject": "capital", "target_new": "Y",
         "target_true": "Z"},
    ]  # fmt: skip
    with pytest.raises(BatchError, match="unknown format"):
        read_requests(plain, fmt="csv")


def test_cli_batch_reports_failures_and_stacks_the_successes(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("neuronpatch.cli._load", lambda name, device=None: (model, TinyTokenizer()))
    data = tmp_path / "requests.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [REQUESTS[0], BAD, REQUESTS[1]]))
    out, stacked = tmp_path / "patches", tmp_path / "stack.safetensors"
    hparams = ["--method", "fine", *(f"--hparam={k}={v}" for k, v in HPARAMS.items())]
    args = ["batch", str(data), "--model", "tiny", "-o", str(out), *hparams]
    assert main([*args, "--stack", str(stacked)]) == 1  # one request failed
    text = capsys.readouterr().out
    assert "batch: 3 requests: 2 edited, 0 already done, 1 refused" in text
    assert "stacked 2 edits into" in text
    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == [
        "00000-beta-delta.safetensors",
        "00002-two-four-five.safetensors",
    ]
    parts = unstack(Patch.load(stacked))
    assert [p.to_bytes() for p in parts] == [f.read_bytes() for f in files]

    assert main([*args, "--n", "1"]) == 0  # the first request alone: done, nothing fails
    assert "0 edited, 1 already done" in capsys.readouterr().out
    assert not (out / batch.FAILURES_FILE).exists()


def test_cli_batch_stack_calibrates_gated_edits_unless_told_not_to(
    model, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("neuronpatch.cli._load", lambda name, device=None: (model, TinyTokenizer()))
    data = tmp_path / "requests.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    out = tmp_path / "patches"
    # a subject gate at layer 0, its threshold low enough for the tiny prompts to cross-match
    gated = {**HPARAMS, "gate_key": "subject", "gate_layer": 0, "gate_threshold": 0.2}
    hparams = ["--method", "local", *(f"--hparam={k}={v}" for k, v in gated.items())]
    args = ["batch", str(data), "--model", "tiny", "-o", str(out), *hparams, "--stack-unsuccessful"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny model may not reach its targets
        assert main([*args, "--stack", str(tmp_path / "c.safetensors")]) == 0
        assert "subject gates raised" in capsys.readouterr().out
        assert main([*args, "--stack", str(tmp_path / "p.safetensors"), "--no-calibrate"]) == 0
    files = sorted(out.glob("*.safetensors"))
    plain = unstack(Patch.load(tmp_path / "p.safetensors"))
    assert [p.to_bytes() for p in plain] == [f.read_bytes() for f in files]
    calibrated = unstack(Patch.load(tmp_path / "c.safetensors"))
    assert all("stack_calibration" in p.extra for p in calibrated)
    before = [g.threshold for p in plain for g in p.gates]
    after = [g.threshold for p in calibrated for g in p.gates]
    assert all(a >= b for a, b in zip(after, before, strict=True)) and after != before


def test_batch_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["batch", "--help"])
    assert exit_.value.code == 0
    assert "usage: neuronpatch batch" in capsys.readouterr().out
