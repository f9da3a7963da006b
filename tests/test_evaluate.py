"""The evaluation harness: summaries by hand, outputs, resuming, the eval command."""

from __future__ import annotations

import argparse
import importlib
import json
import math

import pytest
import torch
from conftest import CharTokenizer, build_tiny

import neuronpatch.cli
from neuronpatch.datasets import EditRecord, load_records
from neuronpatch.editor import Outcome
from neuronpatch.errors import InvalidRequestError
from neuronpatch.evaluate import (
    EvaluationError,
    add_eval_subparser,
    evaluate,
    pre_samples_from,
    summarize,
    summary_markdown,
)
from neuronpatch.metrics import ngram_entropy
from neuronpatch.request import EditRequest
from neuronpatch.runtime import applied_patches

# the module itself, even if the package ever exports a function of the same name
evaluate_module = importlib.import_module("neuronpatch.evaluate")

OUTPUTS = ["records.jsonl", "summary.json", "summary.md", "layers.png", "metrics.png"]
FAST = {"max_steps": 3, "frozen_layers": 1}  # the tiny models have 3 layers

RECORDS = [
    {
        "subject": "France",
        "prompt": "The capital of France is",
        "target_new": "Rome",
        "ground_truth": "Paris",
        "rephrase_prompt": "France's capital city is",
        "portability": {
            "Subject_Aliasing": [{"prompt": "The capital of the French Republic is", "ground_truth": "Rome"}],
            "Reasoning": [],
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "The currency of France is", "ground_truth": "the euro"}]
        },
    },
    {
        "subject": "Danube",
        "prompt": "The Danube flows into the",
        "target_new": "Baltic Sea",
        "ground_truth": ["Black Sea"],
        "locality": {
            "Forgetfulness": [
                {"prompt": "The Danube, which flows into the Black Sea, passes", "ground_truth": [["Vienna"]]}
            ]
        },
    },
    {
        "subject": "Mozart",
        "prompt": "Mozart was born in",
        "target_new": "Prague",
        "portability": {
            "Logical_Generalization": [{"prompt": "Mozart's birthplace is in", "ground_truth": "Bohemia"}]
        },
    },
]  # fmt: skip


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "knowedit.json"
    path.write_text(json.dumps(RECORDS))
    return load_records(path)


@pytest.fixture
def tiny():
    return build_tiny("llama"), CharTokenizer()


@pytest.fixture
def count_edits(monkeypatch):
    """Count the requests the harness edits; optionally interrupt before the n-th one."""
    calls = {"n": 0, "interrupt_at": None}
    real = evaluate_module.edit_each

    def counting(model, tokenizer, requests, *args, **kwargs):
        for _ in requests:
            calls["n"] += 1
            if calls["n"] == calls["interrupt_at"]:
                raise KeyboardInterrupt
        return real(model, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "edit_each", counting)
    return calls


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- summary by hand -------------------------------------------------------------------


def _result(record_id, pre, post, **extra):
    base = {
        "seconds": 1.0,
        "steps": 10,
        "success": True,
        "num_neurons": 2,
        "num_params": 100,
        "patch_bytes": 1000,
        "layers": [0, 2],
    }
    return {"record_id": record_id, "pre": pre, "post": post, **base, **extra}


def test_summarize_by_hand():
    results = [
        _result("a", {"edit_succ": 0.0}, {"edit_succ": 1.0, "locality.Forgetfulness": 0.5}),
        _result("b", {"edit_succ": 0.5}, {"edit_succ": 1.0}, seconds=3.0, layers=[2]),
        _result(
            "c",
            {"edit_succ": 1.0, "portability.Reasoning": 0.25},
            {"edit_succ": 0.5, "portability.Reasoning": 0.75, "fluency": 5.5},
            seconds=2.0,
            num_params=400,
        ),
        {"record_id": "d", "error": "InvalidRequestError: target tokenises to nothing"},
    ]
    summary = summarize(results, num_layers=4)
    assert summary["n"] == 3 and summary["failed"] == 1
    assert list(summary["metrics"]) == [
        "edit_succ",
        "portability.Reasoning",
        "locality.Forgetfulness",
        "fluency",
    ]
    edit = summary["metrics"]["edit_succ"]
    assert edit["label"] == "Edit Succ"
    assert edit["pre"]["mean"] == pytest.approx(50.0)  # (0 + 50 + 100) / 3
    half = 4.3027 * 50.0 / math.sqrt(3)  # sd of (0, 50, 100) is 50
    assert edit["pre"]["low"] == 0.0  # 50 - 124.2, clipped to the score's range
    assert edit["pre"]["high"] == 100.0
    post = edit["post"]  # (100, 100, 50): mean 83.33, sd 28.87
    assert post["mean"] == pytest.approx(250 / 3)
    assert post["low"] == pytest.approx(250 / 3 - half * 28.8675 / 50, abs=1e-2)
    # a metric counts only the records that have it
    reasoning = summary["metrics"]["portability.Reasoning"]
    assert (reasoning["label"], reasoning["post"]["n"], reasoning["post"]["mean"]) == (
        "RA",
        1,
        75.0,
    )
    assert reasoning["post"]["low"] is None  # no interval from one value
    assert summary["metrics"]["locality.Forgetfulness"]["pre"] is None
    assert summary["metrics"]["fluency"]["post"]["mean"] == pytest.approx(550.0)
    assert summary["seconds_per_edit_median"] == 2.0
    assert summary["params_per_edit_mean"] == 200.0
    assert summary["neurons_per_layer"] == [2, 0, 3, 0]  # layers [0, 2], [2], [0, 2]
    assert summary["peak_rss_mib"] > 0
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN
    table = summary_markdown({**summary, "method": "fine", "model": "m"})
    assert "| metric | pre-edit | post-edit |" in table
    assert "| RA | 25.0 (n=1) | 75.0 (n=1) |" in table
    assert "| FA | — | 50.0 (n=1) |" in table


# --- end to end on a tiny model --------------------------------------------------------


def test_evaluate_writes_every_output(tiny, records, tmp_path):
    model, tok = tiny
    with torch.no_grad():
        probe = torch.tensor([[1, 5, 9, 14, 20]])
        before = model(input_ids=probe).logits
    out = tmp_path / "run"
    summary = evaluate(
        model,
        tok,
        records,
        method="fine",
        hparams=FAST,
        out_dir=out,
        progress=False,
        fluency_length=40,
    )
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, before)  # no edit left behind
    assert applied_patches(model) == []

    assert summary["n"] == 3 and summary["failed"] == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    metrics = summary["metrics"]
    assert list(metrics) == [
        "edit_succ",
        "rephrase",
        "portability.Subject_Aliasing",
        "portability.Logical_Generalization",
        "locality.Relation_Specificity",
        "locality.Forgetfulness",
        "fluency",
    ]
    assert metrics["edit_succ"]["post"]["n"] == 3
    assert metrics["rephrase"]["post"]["n"] == 1
    assert metrics["locality.Relation_Specificity"]["pre"] is None
    assert 0.0 <= metrics["locality.Forgetfulness"]["post"]["mean"] <= 100.0

    lines = _lines(out / "records.jsonl")
    assert [line["record_id"] for line in lines] == ["0", "1", "2"]
    first = lines[0]
    assert first["request"] == records[0].request.to_dict()
    assert first["method"] == "fine" and first["hparams"]["max_steps"] == 3
    assert set(first["pre"]) == {"edit_succ", "rephrase", "portability.Subject_Aliasing", "fluency"}
    assert "locality.Relation_Specificity" in first["post"]
    assert first["steps"] <= 3 and first["num_params"] == first["num_neurons"] * 32
    assert first["patch_bytes"] > first["num_params"] * 4
    assert all(0 <= layer < 2 for layer in first["layers"])  # the last layer is frozen
    # every edited row, as (layer, index), matching the layer list and the neuron count
    assert len(first["neurons"]) == first["num_neurons"]
    assert sorted(layer for layer, _ in first["neurons"]) == first["layers"]
    assert set(first["texts"]) == {"pre", "post"}
    assert "| Edit Succ |" in (out / "summary.md").read_text()


def test_resume_skips_finished_records(tiny, records, tmp_path, count_edits):
    model, tok = tiny
    out = tmp_path / "run"
    kwargs = dict(method="fine", hparams=FAST, out_dir=out, progress=False, fluency=False)
    evaluate(model, tok, records[:2], **kwargs)
    assert count_edits["n"] == 2
    summary = evaluate(model, tok, records, **kwargs)
    assert count_edits["n"] == 3  # only the third record was edited
    assert summary["n"] == 3
    assert [line["record_id"] for line in _lines(out / "records.jsonl")] == ["0", "1", "2"]
    again = evaluate(model, tok, records, **kwargs)
    assert count_edits["n"] == 3
    assert again["metrics"] == summary["metrics"]


def test_resume_after_interruption(tiny, records, tmp_path, count_edits):
    model, tok = tiny
    out = tmp_path / "run"
    kwargs = dict(method="fine", hparams=FAST, out_dir=out, progress=False, fluency=False)
    count_edits["interrupt_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, records, **kwargs)
    assert [line["record_id"] for line in _lines(out / "records.jsonl")] == ["0"]
    with open(out / "records.jsonl", "a") as f:  # a line cut short by a kill mid-write
        f.write('{"record_id": "1", "pre": {"edit_')
    count_edits["n"], count_edits["interrupt_at"] = 0, None
    summary = evaluate(model, tok, records, **kwargs)
    assert count_edits["n"] == 2
    assert summary["n"] == 3
    assert [line["record_id"] for line in _lines(out / "records.jsonl")] == ["0", "1", "2"]


def test_resume_refuses_another_run(tiny, records, tmp_path):
    model, tok = tiny
    out = tmp_path / "run"
    evaluate(
        model,
        tok,
        records[:1],
        method="fine",
        hparams=FAST,
        out_dir=out,
        progress=False,
        fluency=False,
    )
    with pytest.raises(EvaluationError, match="max_steps.*another run's results"):
        evaluate(
            model,
            tok,
            records,
            method="fine",
            hparams={"max_steps": 4},
            out_dir=out,
            progress=False,
            fluency=False,
        )
    other = [
        EditRecord(
            EditRequest("The Moon orbits the", "Moon", "Sun"), record_id=records[0].record_id
        )
    ]
    with pytest.raises(EvaluationError, match="another data file"):
        evaluate(
            model,
            tok,
            other,
            method="fine",
            hparams=FAST,
            out_dir=out,
            progress=False,
            fluency=False,
        )


def test_failed_edit_is_recorded_and_skipped(tiny, records, tmp_path, monkeypatch):
    model, tok = tiny
    real = evaluate_module.edit_each

    def picky(model, tokenizer, requests, *args, **kwargs):
        (request,) = requests
        if request.subject == "Danube":
            error = InvalidRequestError("target_new 'Baltic Sea' tokenises to nothing")
            return [Outcome(error=error)]
        return real(model, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "edit_each", picky)
    summary = evaluate(
        model,
        tok,
        records,
        method="fine",
        hparams=FAST,
        out_dir=tmp_path,
        progress=False,
        fluency=False,
    )
    assert (summary["n"], summary["failed"]) == (2, 1)
    assert summary["errors"] == {
        "1": "InvalidRequestError: target_new 'Baltic Sea' tokenises to nothing"
    }
    assert "locality.Forgetfulness" not in summary["metrics"]  # only record 1 had it
    assert "(1 failed)" in (tmp_path / "summary.md").read_text()


def test_batched_edits_score_like_single_ones(tiny, records, tmp_path):
    model, tok = tiny
    kwargs = dict(method="fine", hparams=FAST, progress=False, fluency=False)
    alone = evaluate(model, tok, records, out_dir=tmp_path / "a", **kwargs)
    together = evaluate(model, tok, records, out_dir=tmp_path / "b", edit_batch_size=2, **kwargs)
    assert together["n"] == alone["n"] == len(records)
    for key, metric in alone["metrics"].items():
        assert together["metrics"][key]["post"]["mean"] == pytest.approx(metric["post"]["mean"])
    a, b = _lines(tmp_path / "a" / "records.jsonl"), _lines(tmp_path / "b" / "records.jsonl")
    assert [r["record_id"] for r in b] == [r["record_id"] for r in a]
    assert [r["steps"] for r in b] == [r["steps"] for r in a]
    assert [r["neurons"] for r in b] == [r["neurons"] for r in a]
    assert {r["edit_batch_size"] for r in b} == {2}
    with pytest.raises(EvaluationError, match="edit_batch_size"):
        evaluate(model, tok, records, edit_batch_size=0, **kwargs)


def test_batched_fluency_samples_equal_single_ones(tiny, records, tmp_path):
    # a chunk's samples are drawn as one batch, after the edits each under its own patch
    model, tok = tiny
    strong = {**FAST, "lr": 0.5, "max_steps": 10}  # edits that show in the samples
    kwargs = dict(method="fine", hparams=strong, progress=False, fluency_length=24)
    evaluate(model, tok, records, out_dir=tmp_path / "a", **kwargs)
    evaluate(model, tok, records, out_dir=tmp_path / "b", edit_batch_size=2, **kwargs)
    a, b = _lines(tmp_path / "a" / "records.jsonl"), _lines(tmp_path / "b" / "records.jsonl")
    assert [r["texts"] for r in b] == [r["texts"] for r in a]
    assert [r["post"]["fluency"] for r in b] == [r["post"]["fluency"] for r in a]
    assert [r["pre"]["fluency"] for r in b] == [r["pre"]["fluency"] for r in a]
    assert any(r["texts"]["post"] != r["texts"]["pre"] for r in a)  # the edits show in them


@pytest.fixture
def count_samples(monkeypatch):
    """Count the fluency samples the harness draws (prompts, one at a time or batched)."""
    calls = {"n": 0}
    one, many = evaluate_module.sample_text, evaluate_module.sample_texts

    def counting_one(model, tokenizer, prompt, *args, **kwargs):
        calls["n"] += 1
        return one(model, tokenizer, prompt, *args, **kwargs)

    def counting_many(model, tokenizer, prompts, *args, **kwargs):
        calls["n"] += len(prompts)
        return many(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "sample_text", counting_one)
    monkeypatch.setattr(evaluate_module, "sample_texts", counting_many)
    return calls


@pytest.mark.parametrize("edit_batch_size", [1, 2])
def test_pre_edit_samples_taken_from_an_earlier_run(
    tiny, records, tmp_path, count_samples, edit_batch_size
):
    # another method's run on the same records draws only its post-edit samples
    model, tok = tiny
    kwargs = dict(progress=False, fluency_length=24, edit_batch_size=edit_batch_size)
    first = dict(method="fine", hparams=FAST, **kwargs)
    evaluate(model, tok, records[:2], out_dir=tmp_path / "a", **first)
    source = _lines(tmp_path / "a" / "records.jsonl")
    # the first record's sample marked, to see that it is taken and not drawn again
    source[0]["texts"]["pre"] = "marked marked marked"
    (tmp_path / "a" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in source))
    pre = pre_samples_from(tmp_path / "a", model, records, fluency_length=24)
    assert set(pre) == {r.record_id for r in records[:2]}

    count_samples["n"] = 0
    strong = {**FAST, "lr": 0.5, "max_steps": 10}
    summary = evaluate(
        model, tok, records, out_dir=tmp_path / "b", method="fine", hparams=strong,
        pre_texts=pre, **kwargs,
    )  # fmt: skip
    # 2 post-edit samples per record, and one pre-edit for the record the source lacks
    assert count_samples["n"] == len(records) + 1
    assert summary["pre_samples_reused"] == 2
    b = _lines(tmp_path / "b" / "records.jsonl")
    assert b[0]["texts"]["pre"] == "marked marked marked"
    assert b[0]["pre"]["fluency"] == pytest.approx(ngram_entropy("marked marked marked"))
    assert b[1]["texts"]["pre"] == source[1]["texts"]["pre"]
    # the rest as a fresh run of the same method draws them
    evaluate(model, tok, records, out_dir=tmp_path / "c", method="fine", hparams=strong, **kwargs)
    c = _lines(tmp_path / "c" / "records.jsonl")
    assert [r["texts"]["post"] for r in b] == [r["texts"]["post"] for r in c]
    assert [r["texts"]["pre"] for r in b[1:]] == [r["texts"]["pre"] for r in c[1:]]


def test_pre_edit_samples_of_another_run_are_refused(tiny, records, tmp_path):
    model, tok = tiny
    kwargs = dict(method="fine", hparams=FAST, progress=False, fluency_length=24)
    evaluate(model, tok, records[:1], out_dir=tmp_path / "a", **kwargs)
    with pytest.raises(EvaluationError, match="records.jsonl"):
        pre_samples_from(tmp_path / "nowhere", model, records)
    with pytest.raises(EvaluationError, match="seed=0, this run 1"):
        pre_samples_from(tmp_path / "a", model, records, seed=1, fluency_length=24)
    with pytest.raises(EvaluationError, match="fluency_length"):
        pre_samples_from(tmp_path / "a", model, records)  # the default length, not 24
    other = [EditRecord(records[1].request, record_id=records[0].record_id)]
    with pytest.raises(EvaluationError, match="another data file"):
        pre_samples_from(tmp_path / "a", model, other, fluency_length=24)
    evaluate(model, tok, records[:1], out_dir=tmp_path / "n", fluency=False, **kwargs)
    with pytest.raises(EvaluationError, match="fluency=False"):
        pre_samples_from(tmp_path / "n", model, records, fluency_length=24)
    # the bare model's samples do not describe a patched model
    pre = pre_samples_from(tmp_path / "a", model, records, fluency_length=24)
    patch = neuronpatch.edit(model, tok, records[1].request, method="fine", **FAST)
    with neuronpatch.applied(model, patch), pytest.raises(EvaluationError, match="patches applied"):
        evaluate(model, tok, records, pre_texts=pre, out_dir=tmp_path / "p", **kwargs)
    assert not (tmp_path / "p" / "records.jsonl").exists()


def test_repeated_record_ids_are_refused(tiny, records):
    model, tok = tiny
    with pytest.raises(EvaluationError, match="unique"):
        evaluate(model, tok, [records[0], records[0]], method="fine", hparams=FAST, progress=False)


@pytest.fixture
def eval_cli(tiny, records, tmp_path, monkeypatch):
    """``neuronpatch eval``'s parser with the tiny model loaded, and the records' data file."""
    model, tok = tiny
    monkeypatch.setattr(neuronpatch.cli, "_load", lambda name, device=None: (model, tok))
    parser = argparse.ArgumentParser()
    add_eval_subparser(parser.add_subparsers(dest="command"))
    return parser, tmp_path / "knowedit.json"  # written by the records fixture


def test_eval_command(eval_cli, tmp_path, capsys):
    parser, data = eval_cli
    args = parser.parse_args(
        [
            "eval",
            "--data",
            str(data),
            "--n",
            "2",
            "--method",
            "fine",
            "--hparam",
            "max_steps=2",
            "--hparam",
            "frozen_layers=1",
        ]
        + ["--no-fluency", "-o", str(tmp_path / "out")]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| Edit Succ |" in printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n"] == 2 and summary["hparams"]["max_steps"] == 2 and not summary["fluency"]


def test_eval_command_takes_pre_edit_samples(eval_cli, tmp_path, capsys):
    parser, data = eval_cli
    common = ["eval", "--data", str(data), "--n", "2", "--method", "fine"]
    common += ["--hparam", "max_steps=2", "--hparam", "frozen_layers=1"]
    args = parser.parse_args([*common, "-o", str(tmp_path / "a")])
    assert args.func(args) == 0
    args = parser.parse_args(
        [*common, "--hparam", "lr=0.5", "--pre-samples-from", str(tmp_path / "a")]
        + ["-o", str(tmp_path / "b")]
    )
    assert args.func(args) == 0
    assert "2 of 2 pre-edit samples from" in capsys.readouterr().err
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["pre_samples_reused"] == 2 and summary["hparams"]["lr"] == 0.5
    a, b = (_lines(tmp_path / d / "records.jsonl") for d in "ab")
    assert [r["texts"]["pre"] for r in b] == [r["texts"]["pre"] for r in a]


# --- end to end on the embedded model --------------------------------------------------


@pytest.mark.slow
def test_eval_on_the_embedded_model_resumes(smollm2, records, tmp_path, count_edits):
    model, tok = smollm2
    out = tmp_path / "run"
    kwargs = dict(
        method="fine", hparams={"max_steps": 3}, out_dir=out, progress=False, fluency=False
    )
    evaluate(model, tok, records[:2], **kwargs)
    summary = evaluate(model, tok, records, **kwargs)
    assert count_edits["n"] == 3
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert summary["n"] == 3 and summary["failed"] == 0
    assert summary["num_layers"] == 30 and sum(summary["neurons_per_layer"]) > 0
    edit_succ = summary["metrics"]["edit_succ"]
    assert edit_succ["post"]["mean"] >= edit_succ["pre"]["mean"]
    assert summary["params_per_edit_mean"] > 0 and summary["patch_bytes_mean"] > 0
