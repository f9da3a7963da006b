"""The quality benchmark: edit each record of a KnowEdit/CounterFact file, measure, summarise.

Per record, on the unedited model: Edit Succ, rephrase and portability accuracy, fluency, and
the argmax tokens of every locality prompt. Then the edit, and the same figures with the patch
applied, locality now as agreement with the pre-edit argmax (see ``metrics``). Removing the
patch restores the model bitwise, so records never see each other's edits.

Each record's result is appended to ``records.jsonl`` as soon as it is done; a rerun into the
same folder skips the records already there, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import device_of, resolve
from .datasets import FORMATS, EditRecord, load_records
from .editor import (
    DEFAULT_METHOD,
    Outcome,
    check_batch_size,
    chunk_size,
    edit_each,
    make_hparams,
)
from .errors import InvalidRequestError, NeuronpatchError
from .metrics import (
    agreement,
    argmax_at_answers,
    mean_ci,
    ngram_entropy,
    pad_token_id,
    sample_text,
    sample_texts,
    token_accuracy,
)
from .patch import Patch
from .runtime import applied, applied_patches, applied_per_row
from .tokens import TeacherForced, teacher_forced

FLUENCY_LENGTH = 100  # tokens in all, prompt included, as EasyEdit generates for fluency
# Display names, in display order; other portability/locality keys follow under their own.
LABELS = {
    "edit_succ": "Edit Succ",
    "rephrase": "Rephrase",
    "portability.Subject_Aliasing": "SAA",
    "portability.Logical_Generalization": "LGA",
    "portability.Reasoning": "RA",
    "locality.Relation_Specificity": "RSA",
    "locality.Forgetfulness": "FA",
    "locality.Neighborhood": "Neighborhood",
    "fluency": "Fluency",
}
RECORDS_FILE = "records.jsonl"


class EvaluationError(NeuronpatchError):
    """An evaluation cannot go on: e.g. its output folder holds another run's results."""


def evaluate(
    model: nn.Module,
    tokenizer,
    records: Sequence[EditRecord],
    method: str = DEFAULT_METHOD,
    hparams: Any = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    fluency: bool = True,
    *,
    seed: int = 0,
    fluency_length: int = FLUENCY_LENGTH,
    batch_size: int = 16,
    edit_batch_size: int = 1,
    pre_texts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Edit and score every record; returns the summary (and writes it to ``out_dir``).

    ``hparams`` is the method's hyperparameter dataclass or a dict of overrides. With
    ``out_dir``, records already in its ``records.jsonl`` are not redone. ``batch_size``
    sequences are scored per forward pass; ``edit_batch_size`` > 1 optimises that many edits
    together (``neuronpatch.edit``: each equal to its edit alone up to rounding) and draws the
    fluency samples of each chunk of records as one batch, before and after (each record's
    under its own patch: ``runtime.applied_per_row``), equal to one at a time up to rounding.
    ``pre_texts``: record id -> its pre-edit fluency sample from an earlier run with the same
    model, seed and length (``pre_samples_from``); those records are not sampled again before
    the edit (the unedited model's sample does not depend on the method).
    """
    hp = (
        make_hparams(method, None, **hparams)
        if isinstance(hparams, Mapping)
        else make_hparams(method, hparams)
    )
    check_batch_size(edit_batch_size, "edit_batch_size", EvaluationError)
    ids = [r.record_id for r in records]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise EvaluationError(f"record ids must be unique; repeated: {repeated[:10]}")
    config = _jsonable(
        {
            "model": getattr(model.config, "name_or_path", None),
            "method": method,
            "hparams": asdict(hp),
            "fluency": fluency,
            "fluency_length": fluency_length,
            "seed": seed,
        }
    )
    out = Path(out_dir) if out_dir is not None else None
    done: dict[str, dict[str, Any]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        done = _resume(out / RECORDS_FILE, config, {r.record_id: r for r in records})
    todo = [r for r in records if r.record_id not in done]
    pre_texts = dict(pre_texts or {})
    reused = sum(1 for r in todo if r.record_id in pre_texts) if fluency else 0
    if pre_texts and applied_patches(model):
        raise EvaluationError(
            "pre-edit samples from another run are the bare model's, and this model has "
            "patches applied: remove them, or sample afresh (no pre_texts)"
        )

    bar = tqdm(
        total=len(records),
        initial=len(records) - len(todo),
        desc="evaluating",
        unit="edit",
        disable=not progress,
        dynamic_ncols=True,
    )
    # each record is scored before and after on its own, however many are edited together
    chunk = chunk_size(edit_batch_size)
    with bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            # the chunk's fluency samples drawn as one batch (per-row patches need a bare model)
            together = fluency and len(part) > 1 and not applied_patches(model)
            befores = [
                _before(
                    model,
                    tokenizer,
                    r,
                    fluency and not together and r.record_id not in pre_texts,
                    seed,
                    fluency_length,
                    batch_size,
                )
                for r in part
            ]
            if fluency:
                fresh = [r for r in part if r.record_id not in pre_texts]
                if together and fresh:
                    prompts = [r.request.prompt for r in fresh]
                    texts = _samples(model, tokenizer, prompts, seed, fluency_length)
                    pre_texts.update(zip([r.record_id for r in fresh], texts, strict=True))
                for record, before in zip(part, befores, strict=True):
                    if "pre" not in before["texts"]:
                        before["texts"]["pre"] = text = pre_texts[record.record_id]
                        before["pre"]["fluency"] = ngram_entropy(text)
            outcomes = edit_each(
                model, tokenizer, [r.request for r in part], method, hp, batch_size=edit_batch_size
            )
            posts: dict[int, str] = {}
            if together:  # each edit's sample under its own patch, all in one batch
                ok = [i for i, o in enumerate(outcomes) if o.error is None]
                texts = _samples(
                    model,
                    tokenizer,
                    [part[i].request.prompt for i in ok],
                    seed,
                    fluency_length,
                    [outcomes[i].patch for i in ok],
                )
                posts = dict(zip(ok, texts, strict=True))
            for i, (record, before, outcome) in enumerate(
                zip(part, befores, outcomes, strict=True)
            ):
                result = {
                    "record_id": record.record_id,
                    "request": record.request.to_dict(),
                    **config,
                    "edit_batch_size": edit_batch_size,  # not part of the config: resumable
                }
                result.update(
                    _after(
                        model,
                        tokenizer,
                        record,
                        before,
                        outcome,
                        seed,
                        fluency_length,
                        batch_size,
                        posts.get(i),
                    )
                )
                done[record.record_id] = result
                if out is not None:  # one whole line per record, on disk before the next
                    with open(out / RECORDS_FILE, "a", encoding="utf-8") as sink:
                        sink.write(json.dumps(_jsonable(result), ensure_ascii=False) + "\n")
                bar.update(1)
            scored = [done[i]["post"]["edit_succ"] for i in ids if "post" in done.get(i, {})]
            if scored:
                bar.set_postfix_str(f"edit succ {100 * sum(scored) / len(scored):.1f}")

    results = [done[i] for i in ids]
    summary = summarize(results, num_layers=resolve(model).num_layers)
    summary.update(config)
    if reused:  # this call's records whose pre-edit sample came from an earlier run
        summary["pre_samples_reused"] = reused
    summary["device"] = _device_name(model)
    if out is not None:
        write_outputs(summary, out)
    return summary


def evaluate_record(
    model: nn.Module,
    tokenizer,
    record: EditRecord,
    method: str = DEFAULT_METHOD,
    hparams: Any = None,
    *,
    fluency: bool = True,
    seed: int = 0,
    fluency_length: int = FLUENCY_LENGTH,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Pre- and post-edit scores of one record, with the edit's cost; an ``error`` if it failed."""
    hp = make_hparams(method, hparams)
    before = _before(model, tokenizer, record, fluency, seed, fluency_length, batch_size)
    outcome = edit_each(model, tokenizer, [record.request], method, hp)[0]
    return _after(model, tokenizer, record, before, outcome, seed, fluency_length, batch_size)


def _before(
    model: nn.Module,
    tokenizer,
    record: EditRecord,
    fluency: bool,
    seed: int,
    fluency_length: int,
    batch_size: int,
) -> dict[str, Any]:
    """A record's scores on the unedited model, and what scoring it again needs."""
    groups = _sequences(tokenizer, record)  # metric key -> teacher-forced sequences
    flat = [tf for seqs in groups.values() for tf in seqs]
    pad = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        pre_ids = _split(argmax_at_answers(model, flat, batch_size, pad), groups)
        pre = _scores(groups, pre_ids)
        texts = {}
        if fluency:
            texts["pre"] = sample_text(
                model, tokenizer, record.request.prompt, seed, fluency_length
            )
            pre["fluency"] = ngram_entropy(texts["pre"])
    finally:
        model.train(was_training)
    return {"groups": groups, "flat": flat, "pre_ids": pre_ids, "pre": pre, "texts": texts}


def _after(
    model: nn.Module,
    tokenizer,
    record: EditRecord,
    before: Mapping[str, Any],
    outcome: Outcome,
    seed: int,
    fluency_length: int,
    batch_size: int,
    post_text: str | None = None,
) -> dict[str, Any]:
    """The record's result: its edit's scores with the patch applied (``_before``'s sequences),
    and the edit's cost; or an ``error`` if the request itself was at fault. ``post_text``: its
    fluency sample, already drawn with the patch (``_samples``)."""
    if outcome.error is not None:
        if not isinstance(outcome.error, InvalidRequestError):
            raise outcome.error
        return {"error": f"{type(outcome.error).__name__}: {outcome.error}"}
    patch, groups, texts = outcome.patch, before["groups"], dict(before["texts"])
    was_training = model.training
    model.eval()
    try:
        with applied(model, patch):
            post_ids = _split(
                argmax_at_answers(model, before["flat"], batch_size, pad_token_id(tokenizer)),
                groups,
            )
            post = _scores(groups, post_ids, before["pre_ids"])
            if texts:
                texts["post"] = (
                    post_text
                    if post_text is not None
                    else sample_text(model, tokenizer, record.request.prompt, seed, fluency_length)
                )
                post["fluency"] = ngram_entropy(texts["post"])
    finally:
        model.train(was_training)

    neurons = [
        (int(layer), int(index))
        for layer, ld in patch.layers.items()
        for index in ld.neuron_indices.tolist()
    ]
    result = {
        "pre": before["pre"],
        "post": post,
        "seconds": round(outcome.seconds, 4),
        "steps": patch.metrics.get("steps"),
        "success": patch.metrics.get("success"),
        "target_prob": patch.metrics.get("target_prob"),
        "num_neurons": len(neurons),
        "num_params": patch.num_params,
        "patch_bytes": len(patch.to_bytes()),
        "layers": sorted(layer for layer, _ in neurons),
        "neurons": sorted(neurons),  # (layer, index) of every edited row
        "warnings": outcome.warnings,
    }
    if texts:
        result["texts"] = texts
    return result


def _samples(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    seed: int,
    fluency_length: int,
    patches: list[Patch] | None = None,
) -> list[str]:
    """Fluency samples of ``prompts`` in one batch, row i under ``patches[i]`` if given."""
    was_training = model.training
    model.eval()
    try:
        if patches is None:
            return sample_texts(model, tokenizer, prompts, seed, fluency_length)
        with applied_per_row(model, patches):
            return sample_texts(model, tokenizer, prompts, seed, fluency_length)
    finally:
        model.train(was_training)


def _sequences(tokenizer, record: EditRecord) -> dict[str, list[TeacherForced]]:
    request = record.request
    pairs: dict[str, list[tuple[str, str]]] = {
        "edit_succ": [(request.prompt, request.target_new)],
        "rephrase": [(p, request.target_new) for p in record.rephrase],
    }
    for section, content in (("portability", record.portability), ("locality", record.locality)):
        for key, items in content.items():
            pairs[f"{section}.{key}"] = list(items)
    groups = {}
    for key, items in pairs.items():
        seqs = [teacher_forced(tokenizer, prompt, answer) for prompt, answer in items]
        seqs = [tf for tf in seqs if len(tf.answer_ids) > 0]  # nothing to score (EasyEdit: NaN)
        if seqs:
            groups[key] = seqs
    return groups


def _split(flat: list[list[int]], groups: dict[str, list[TeacherForced]]) -> dict[str, list]:
    out, start = {}, 0
    for key, seqs in groups.items():
        out[key] = flat[start : start + len(seqs)]
        start += len(seqs)
    return out


def _scores(
    groups: dict[str, list[TeacherForced]],
    predicted: dict[str, list[list[int]]],
    pre_predicted: dict[str, list[list[int]]] | None = None,
) -> dict[str, float]:
    """Per metric key, the mean over its sub-items: token accuracy, or for locality (only
    given the pre-edit argmax) agreement with it."""
    scores = {}
    for key, seqs in groups.items():
        if key.startswith("locality."):
            if pre_predicted is None:
                continue
            values = [
                agreement(before, after)
                for before, after in zip(pre_predicted[key], predicted[key], strict=True)
            ]
        else:
            values = [
                token_accuracy(ids, tf.answer_ids.tolist())
                for ids, tf in zip(predicted[key], seqs, strict=True)
            ]
        scores[key] = sum(values) / len(values)
    return scores


# --- resuming --------------------------------------------------------------------------


def _resume(
    path: Path, config: dict[str, Any], records: dict[str, EditRecord]
) -> dict[str, dict[str, Any]]:
    """The results already in ``path``, after checking they come from this very run."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # a write cut short by the interruption: drop it
        keep = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(keep)
        raw = keep
    hint = "holds another run's results; use another output folder (or delete it) to start afresh"
    return {
        result["record_id"]: result
        for result in _results(path, raw.decode("utf-8"), config, records, hint, lenient=False)
    }


def pre_samples_from(
    run_dir: str | Path,
    model: nn.Module,
    records: Sequence[EditRecord],
    *,
    seed: int = 0,
    fluency_length: int = FLUENCY_LENGTH,
) -> dict[str, str]:
    """The pre-edit fluency samples of ``records`` in an earlier run's ``records.jsonl``.

    The unedited model's sample depends on the model, the prompt, the seed and the length,
    not on the method: a second method's run on the same records can take them instead of
    drawing them again (equal up to floating-point rounding, the batch differing). Lines of
    the run must match on all four, and on the record's request; records it lacks are left
    out (they are sampled as usual)."""
    path = Path(run_dir)
    path = path / RECORDS_FILE if path.is_dir() else path
    if not path.is_file():
        raise EvaluationError(
            f"{run_dir}: no {RECORDS_FILE} there; give the output folder of an earlier "
            "`neuronpatch eval` run with fluency"
        )
    wanted = {
        "model": getattr(model.config, "name_or_path", None),
        "fluency": True,
        "fluency_length": fluency_length,
        "seed": seed,
    }
    hint = (
        "holds another run's pre-edit samples; give a run of the same model, seed and "
        "fluency length, with fluency"
    )
    by_id = {r.record_id: r for r in records}
    results = _results(path, path.read_text(encoding="utf-8"), wanted, by_id, hint, lenient=True)
    return {
        result["record_id"]: result["texts"]["pre"]
        for result in results
        if result["record_id"] in by_id and "pre" in result.get("texts", {})
    }


def _results(
    path: Path,
    text: str,
    expected: Mapping[str, Any],
    records: Mapping[str, EditRecord],
    hint: str,
    lenient: bool,
) -> Iterator[dict[str, Any]]:
    """The results in a ``records.jsonl`` text, each checked to have the ``expected`` values
    and, for a record of ``records``, its request. ``lenient``: skip lines that are no JSON."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError as exc:
            if lenient:  # a line cut short by an interruption: its record is done afresh
                continue
            raise EvaluationError(f"{path}: line {line_no} is not JSON ({exc})") from exc
        for key, value in expected.items():
            if result.get(key) != value:
                raise EvaluationError(
                    f"{path}: line {line_no} has {key}={result.get(key)!r}, this run "
                    f"{value!r}: the file {hint}."
                )
        record = records.get(result.get("record_id"))
        if record is not None and result.get("request") != record.request.to_dict():
            raise EvaluationError(
                f"{path}: line {line_no} is record {result['record_id']!r} of another data "
                f"file: request {result.get('request')!r}, here {record.request.to_dict()!r}. "
                "Use the results of this data file."
            )
        yield result


# --- summary ---------------------------------------------------------------------------


def summarize(results: Sequence[Mapping[str, Any]], num_layers: int | None = None) -> dict:
    """Mean over records x100 with a 95% CI per metric, before and after, and the edits' costs."""
    scored = [r for r in results if "error" not in r]
    keys = [k for k in LABELS if any(k in r["pre"] or k in r["post"] for r in scored)]
    extra = {k for r in scored for k in (*r["pre"], *r["post"])} - set(keys)
    keys += sorted(extra, key=lambda k: (not k.startswith("portability."), k))
    metrics = {}
    for key in keys:
        entry: dict[str, Any] = {"label": _label(key)}
        for phase in ("pre", "post"):
            values = [100 * r[phase][key] for r in scored if key in r[phase]]
            mean, low, high = mean_ci(values)
            # the interval of a bounded score stays within its bounds (small n overshoots)
            low, high = max(low, 0.0), high if key == "fluency" else min(high, 100.0)
            entry[phase] = (
                {"mean": mean, "low": low, "high": high, "n": len(values)} if values else None
            )
        metrics[key] = entry

    def column(name: str) -> list:
        return [r[name] for r in scored if r.get(name) is not None]

    layer_counts = Counter(layer for r in scored for layer in r["layers"])
    top = max([*layer_counts, (num_layers or 0) - 1], default=-1)
    summary: dict[str, Any] = {
        "n": len(scored),
        "failed": len(results) - len(scored),
        "errors": {r["record_id"]: r["error"] for r in results if "error" in r},
        "metrics": metrics,
        "seconds_per_edit_median": _median(column("seconds")),
        "seconds_per_edit_mean": _mean(column("seconds")),
        "steps_mean": _mean(column("steps")),
        "success_rate": _mean([100.0 * bool(s) for s in column("success")]),
        "params_per_edit_mean": _mean(column("num_params")),
        "params_per_edit_median": _median(column("num_params")),
        "neurons_per_edit_mean": _mean(column("num_neurons")),
        "patch_bytes_mean": _mean(column("patch_bytes")),
        "peak_rss_mib": _peak_rss_mib(),
        "num_layers": num_layers,
        "neurons_per_layer": [layer_counts.get(layer, 0) for layer in range(top + 1)],
    }
    if torch.cuda.is_available():
        summary["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 1024**2
    return _jsonable(summary)


def _device_name(model: nn.Module) -> str:
    """Where the edits ran, for the summary: "cpu", or e.g. "cuda (NVIDIA H200)"."""
    device = device_of(model)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _peak_rss_mib() -> float | None:
    """The process's peak resident memory so far (model loading included)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024**2 if sys.platform == "darwin" else 1024)


def _label(key: str) -> str:
    return LABELS.get(key, key.split(".", 1)[-1])


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list) -> float | None:
    return statistics.median(values) if values else None


def _jsonable(value: Any) -> Any:
    """Plain JSON: tuples to lists, NaN and infinities to None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- outputs ---------------------------------------------------------------------------


def write_outputs(summary: Mapping[str, Any], out_dir: str | Path) -> None:
    """summary.json, summary.md, layers.png and metrics.png in ``out_dir``."""
    out = Path(out_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: no layers.png / metrics.png "
            "(pip install 'neuronpatch[bench]')",
            stacklevel=2,
        )
        return
    _plot_layers(summary, out / "layers.png", Figure)
    _plot_metrics(summary, out / "metrics.png", Figure)


def _cell(stats: Mapping[str, Any] | None, n: int) -> str:
    if stats is None:
        return "—"
    text = f"{stats['mean']:.1f}"
    if stats["low"] is not None:
        text += f" [{stats['low']:.1f}, {stats['high']:.1f}]"
    if stats["n"] != n:
        text += f" (n={stats['n']})"
    return text


def _number(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as markdown: a metric table (pre vs post, 95% CI) and the edits' costs."""
    n = summary["n"]
    lines = [
        f"# {summary.get('method')} on {summary.get('model')}: {n} edits"
        + (f" ({summary['failed']} failed)" if summary.get("failed") else ""),
        "",
        "Mean over records, x100, with its 95% confidence interval; (n=...) where fewer records "
        "have the metric. Locality is post-edit agreement with the pre-edit argmax.",
        "",
        "| metric | pre-edit | post-edit |",
        "|---|---|---|",
    ]
    for entry in summary["metrics"].values():
        lines.append(f"| {entry['label']} | {_cell(entry['pre'], n)} | {_cell(entry['post'], n)} |")
    costs = [
        ("seconds per edit (median)", _number(summary.get("seconds_per_edit_median"), ".2f")),
        ("optimisation steps (mean)", _number(summary.get("steps_mean"), ".1f")),
        ("reached the target probability (%)", _number(summary.get("success_rate"), ".1f")),
        ("edited parameters per edit (mean)", _number(summary.get("params_per_edit_mean"), ",.0f")),
        ("neurons per edit (mean)", _number(summary.get("neurons_per_edit_mean"), ".1f")),
        ("patch bytes (mean)", _number(summary.get("patch_bytes_mean"), ",.0f")),
        ("peak memory, process RSS (MiB)", _number(summary.get("peak_rss_mib"), ",.0f")),
    ]
    if summary.get("peak_cuda_mib") is not None:
        costs.append(("peak CUDA memory (MiB)", _number(summary["peak_cuda_mib"], ",.0f")))
    lines += ["", "| cost | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in costs)]
    lines += ["", f"hparams: `{json.dumps(summary.get('hparams'))}`", ""]
    return "\n".join(lines)


def _plot_layers(summary: Mapping[str, Any], path: Path, Figure) -> None:
    counts = summary["neurons_per_layer"]
    total = sum(counts) or 1
    fig = Figure(figsize=(max(5.0, 0.28 * len(counts) + 2), 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(counts)), [100 * c / total for c in counts], color="tab:blue")
    hparams = summary.get("hparams") or {}
    frozen = hparams.get("frozen_layers")
    if frozen and hparams.get("layers") is None and summary.get("num_layers"):
        last = summary["num_layers"]
        ax.axvspan(last - frozen - 0.5, last - 0.5, color="0.9", zorder=0, label="frozen")
        ax.legend(loc="upper left", fontsize="small")
    ax.set_xlabel("layer")
    ax.set_ylabel("located neurons (%)")
    ax.set_title(f"Located neurons per layer ({summary.get('method')}, {summary['n']} edits)")
    ax.set_xticks(range(0, len(counts), max(1, len(counts) // 16)))
    fig.savefig(path, dpi=120)


def _plot_metrics(summary: Mapping[str, Any], path: Path, Figure) -> None:
    entries = [e for e in summary["metrics"].values() if e["post"] is not None]
    panels = [
        [e for e in entries if e["label"] != "Fluency"],
        [e for e in entries if e["label"] == "Fluency"],
    ]
    panels = [p for p in panels if p]
    if not panels:  # every edit failed: say so rather than leave a stale or missing plot
        fig = Figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no scored edits", ha="center", va="center")
        fig.savefig(path, dpi=120)
        return
    widths = [max(len(p), 1) for p in panels]
    fig = Figure(figsize=(1.0 * sum(widths) + 3, 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
    for ax, panel in zip(axes, panels, strict=True):
        xs = range(len(panel))
        for offset, phase, colour in ((-0.2, "pre", "tab:gray"), (0.2, "post", "tab:blue")):
            present = [(x, e[phase]) for x, e in zip(xs, panel, strict=True) if e[phase]]
            if not present:
                continue
            means = [s["mean"] for _, s in present]
            errors = [
                [s["mean"] - s["low"] if s["low"] is not None else 0 for _, s in present],
                [s["high"] - s["mean"] if s["high"] is not None else 0 for _, s in present],
            ]
            label = "pre-edit" if phase == "pre" else "post-edit"
            ax.bar(
                [x + offset for x, _ in present], means, 0.4, yerr=errors, capsize=3,
                color=colour, label=label,
            )  # fmt: skip
        ax.set_xticks(list(xs), [e["label"] for e in panel])
        if panel[0]["label"] != "Fluency":
            ax.set_ylim(0, 105)
        ax.set_ylabel("x100 (95% CI)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle(f"{summary.get('method')} on {summary.get('model')}: {summary['n']} edits")
    fig.savefig(path, dpi=120)


# --- command line ----------------------------------------------------------------------


def add_eval_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``neuronpatch eval`` on the CLI's subparsers."""
    from .cli import add_edit_arguments  # imported here: cli imports this module

    p = subparsers.add_parser(
        "eval",
        help="measure edit quality on a KnowEdit / CounterFact file",
        description=(
            "Edit every record of a benchmark file, one at a time, and score each edit "
            "(Edit Succ, rephrase, portability, locality, fluency) before and after. Results "
            "go to the output folder record by record; rerunning resumes."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        help="KnowEdit or EasyEdit CounterFact JSON file, or a Hub dataset file "
        "(owner/name/path/in/repo.json)",
    )
    p.add_argument("--format", choices=FORMATS, help="default: told from the first record")
    add_edit_arguments(p)
    p.add_argument("--n", type=int, help="only the first N records")
    p.add_argument("--no-fluency", action="store_true", help="skip the generation-based fluency")
    p.add_argument("--seed", type=int, default=0, help="seed of the fluency samples (default 0)")
    p.add_argument(
        "--edit-batch-size",
        type=int,
        default=1,
        metavar="B",
        help="optimise up to B records' edits together (default 1: one at a time), and draw "
        "their fluency samples as one batch: faster, each edit and sample equal to its own "
        "alone up to floating-point rounding",
    )
    p.add_argument(
        "--pre-samples-from",
        metavar="DIR",
        help="take the pre-edit fluency samples from an earlier run's output folder (same "
        "model, data, seed) instead of drawing them again: the unedited model's samples do "
        "not depend on the method",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="folder for records.jsonl, summary.json, summary.md, layers.png, metrics.png",
    )
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """``neuronpatch eval``: load the records (first, to fail fast), the model, and run."""
    from .cli import _load, _parse_hparams  # imported here: cli imports this module

    records = load_records(args.data, args.format, args.n)
    if not records:
        raise EvaluationError(f"{args.data}: no records to evaluate")
    hparams = _parse_hparams(args.hparam)
    model, tokenizer = _load(args.model, args.device)
    pre_texts = None
    if args.pre_samples_from and not args.no_fluency:
        pre_texts = pre_samples_from(args.pre_samples_from, model, records, seed=args.seed)
        print(
            f"{len(pre_texts)} of {len(records)} pre-edit samples from {args.pre_samples_from}",
            file=sys.stderr,
        )
    summary = evaluate(
        model,
        tokenizer,
        records,
        args.method,
        hparams,
        out_dir=args.output,
        fluency=not args.no_fluency,
        seed=args.seed,
        edit_batch_size=args.edit_batch_size,
        pre_texts=pre_texts,
    )
    print(summary_markdown(summary))
    print(f"wrote {Path(args.output).resolve()}", file=sys.stderr)
    return 0
