"""Can another subject key shut same-kind neighbours without shutting the subject's aliases?

Gate-only, on the unedited model, on top of the default chain as ``gate_chain.py`` measures it
(its per-record rows are reused from its cache, or measured): the default's query gates stay as
they are, and its layer-4 subject gate (key: the subject's last token, threshold calibrated per
edit on other subjects in the subject's place) is replaced or joined by:

- **margin m**: the same gate with ``subject_margin`` = m (offline, from the stored threshold
  at margin 0);
- **entity-centred**: the same key and calibration, centred on the mean residual of the
  calibration subjects' last tokens instead of generic text (so what every name of that kind
  shares drops out of the cosine), threshold margin 0 / 0.05 / 0.1;
- **first token AND**: a second subject gate, same layer and calibration, keyed on the subject's
  *first* token (a neighbour that differs in its first word is shut);
- **word escape**: "lenient AND (strict OR word)": the default gate (margin 0.02) must open, and
  either its cosine clears a stricter margin (0.08 / 0.1) or a *word gate* opens: one key per
  subject word of 3+ letters (its last token, ``local.subject_words``) at layer 0, calibrated
  on the other subjects (highest cosine + 0.02), open when any word key matches. Aliases that
  share a word with the subject keep the lenient threshold; strangers must clear the strict
  one. This is what ``LocalHparams.strict_margin`` builds (``any_of``: ``patches/FORMAT.md``
  v5); here it is computed offline from the stored cosines. Also the other way round: a
  lenient margin *below* the default's (0 / -0.02: more aliases open) with a strict margin near
  the default's (0.02 / 0.05 / 0.08) for words the subject does not share.

Per setting, % of prompts where the chain does what it should: open on subject-alias (SAA),
ZsRE rephrase and CounterFact paraphrase prompts, shut on RSA, FA and CounterFact neighbourhood
prompts.

    python benchmarks/subject_key.py --model gemma3-270m --start 0 --stop 300

Per-record cosines go to ``--work`` (JSONL per dataset, resumable); the summary to
``benchmarks/results/subject_key_MODEL_START-STOP`` .json / .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gate_chain import DATA, FILES, GROUPS, cache_path, measure, measured_rows, prompt_sections

import neuronpatch
from neuronpatch.arch import resolve
from neuronpatch.local import (
    CALIBRATION_FLOOR,
    MAX_CALIBRATED,
    OTHER_SUBJECTS,
    LocalHparams,
    _residuals,
    generic_centres,
    other_subject_prompts,
    peak_cosines,
    right_padded,
    subject_end,
    subject_words,
    vocabulary_neighbours,
)
from neuronpatch.patch import Gate

HERE = Path(__file__).resolve().parent
WORD_LAYER = 0
MARGINS = (0.02, 0.04, 0.06, 0.08, 0.1)
STRICT = (0.08, 0.1)
# the escape the other way round: a lenient gate *below* the default's margin (more aliases
# open) that strangers can pass only at about the default's margin or a little above it
LENIENT_STRICT = (
    (0.0, 0.02),
    (0.0, 0.05),
    (-0.02, 0.02),
    (-0.02, 0.05),
    (-0.02, 0.08),
    (-0.02, 0.1),
)


def subject_start(tokenizer, prompt: str, subject: str) -> int:
    """The subject's first token, as an index into ``tokenizer(prompt).input_ids``."""
    base = prompt.index(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return next(i for i, (a, b) in enumerate(offsets) if b > base and b > a)


def _peaks(model, tokenizer, gates, texts) -> list[list[float]]:
    return peak_cosines(model, tokenizer, gates, texts).tolist() if texts else []  # [n, G]


@torch.no_grad()
def measure_keys(model, tokenizer, record, hp: LocalHparams) -> dict:
    """Thresholds and per-prompt peak cosines of the alternative subject keys."""
    request, layer = record.request, hp.subject_layer
    centres = generic_centres(model, tokenizer, (WORD_LAYER, layer))
    ids = torch.tensor([tokenizer(request.prompt).input_ids])
    states = _residuals(model, ids, (WORD_LAYER, layer))  # {layer: [1, S, hidden]}
    last = subject_end(tokenizer, request.prompt, request.subject)
    first = subject_start(tokenizer, request.prompt, request.subject)
    words = subject_words(tokenizer, request.prompt, request.subject)
    near = vocabulary_neighbours(model, tokenizer, request, hp.calibration_neighbours)
    others = [o for o in (*OTHER_SUBJECTS, *near) if o.lower() != request.subject.lower()]
    texts = [request.prompt.replace(request.subject, o) for o in others]
    # the calibration subjects' last tokens: the entity-centred key's centre
    cal_ids, mask = right_padded([tokenizer(t).input_ids for t in texts])
    h = _residuals(model, cal_ids, (layer,), mask)[layer]  # [n, S, hidden]
    ends = [subject_end(tokenizer, t, o) for t, o in zip(texts, others, strict=True)]
    entity = torch.stack([h[i, e] for i, e in enumerate(ends)]).mean(0)  # [hidden]
    own = states[layer][0]  # [S, hidden]
    keyed = {
        "entity": Gate(layer, own[last] - entity, entity, 0.0),
        "first": Gate(layer, own[first] - centres[layer], centres[layer], 0.0),
    }
    word_gates = [
        Gate(WORD_LAYER, states[WORD_LAYER][0, w] - centres[WORD_LAYER], centres[WORD_LAYER], 0.0)
        for w in words
    ]
    sections = prompt_sections(record)
    row: dict = {"highest": {}, "cosines": {}}
    for name, gate in keyed.items():
        row["highest"][name] = max(c[0] for c in _peaks(model, tokenizer, [gate], texts))
    # words: calibrated on OTHER_SUBJECTS only (a neighbour word is no stranger to the subject)
    plain = other_subject_prompts(request)
    if word_gates:
        peaks = torch.tensor(_peaks(model, tokenizer, word_gates, plain))  # [n, W]
        row["highest"]["words"] = peaks.amax(0).tolist()  # [W]
    for group, section, _ in GROUPS:
        prompts = sections.get(section, [])
        row["cosines"][group] = {
            name: [c[0] for c in _peaks(model, tokenizer, [gate], prompts)]
            for name, gate in keyed.items()
        }
        row["cosines"][group]["words"] = (
            _peaks(model, tokenizer, word_gates, prompts) if word_gates else [[] for _ in prompts]
        )
    return row


def _clamp(value: float) -> float:
    return min(max(value, CALIBRATION_FLOOR), MAX_CALIBRATED)


def settings() -> dict:
    """Per setting, whether the chain is open on one prompt: f(base row, key row, i, group)."""

    def margin(m):
        def opened(base, keys, group, i):
            cos, th = base["cosines"][group][i], list(base["thresholds"])
            th[0] = _clamp(base["subject_thresholds"]["0.0"] + m)
            return all(c > t for c, t in zip(cos, th, strict=True))

        return opened

    def rest(base, group, i):  # the query gates of the default chain
        cos, th = base["cosines"][group][i], base["thresholds"]
        return all(c > t for c, t in zip(cos[1:], th[1:], strict=True))

    def entity(m):
        return lambda b, k, g, i: (
            rest(b, g, i) and (k["cosines"][g]["entity"][i] > _clamp(k["highest"]["entity"] + m))
        )

    def first(b, k, g, i):
        return margin(0.02)(b, k, g, i) and k["cosines"][g]["first"][i] > _clamp(
            k["highest"]["first"] + 0.02
        )

    def escape(strict, lenient=0.02):
        def opened(b, k, g, i):
            if not margin(lenient)(b, k, g, i):  # the lenient gate (the default's at 0.02)
                return False
            if b["cosines"][g][i][0] > _clamp(b["subject_thresholds"]["0.0"] + strict):
                return True
            words = k["cosines"][g]["words"][i]
            return any(
                c > t + 0.02 for c, t in zip(words, k["highest"].get("words", []), strict=True)
            )

        return opened

    out = {"default (margin 0.02)": margin(0.02)}
    out.update({f"margin {m}": margin(m) for m in MARGINS if m != 0.02})
    out.update({f"entity-centred, margin {m}": entity(m) for m in (0.0, 0.05, 0.1)})
    out["first token AND"] = first
    out.update({f"word escape, strict margin {s}": escape(s) for s in STRICT})
    out.update(
        {
            f"word escape, lenient margin {m}, strict margin {s}": escape(s, m)
            for m, s in LENIENT_STRICT
        }
    )
    return out


def summarise(base_rows: dict, key_rows: dict) -> dict:
    out: dict = {}
    for name, opened in settings().items():
        cells = {}
        for dataset in base_rows:
            for group, _, should_open in GROUPS:
                flags = [
                    opened(b, k, group, i)
                    for b, k in zip(base_rows[dataset], key_rows[dataset], strict=True)
                    for i in range(len(b["cosines"][group]))
                ]
                if flags:
                    share = sum(flags) / len(flags)
                    cells[f"{dataset} {group}"] = {
                        "percent": 100 * (share if should_open else 1 - share),
                        "n": len(flags),
                    }
        out[name] = cells
    return out


COLUMNS = (
    ("wiki_cf SAA", "WikiData_cf SAA open"),
    ("wiki_cf RSA", "RSA shut"),
    ("wiki_cf FA", "FA shut"),
    ("zsre SAA", "ZsRE SAA open"),
    ("zsre rephrase", "ZsRE rephrase open"),
    ("counterfact neighbour", "CF neighbourhood shut"),
    ("counterfact rephrase", "CF paraphrase open"),
)


def write(summary: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=1))
    first = next(iter(summary["settings"].values()))
    cols = [(k, label) for k, label in COLUMNS if k in first]
    lines = [
        f"# Other subject keys on {summary['model']}, records "
        f"{summary['records'][0]}-{summary['records'][1] - 1} (gate-only)",
        "",
        "% of prompts where the chain does what it should (the default's query gates "
        "unchanged; `benchmarks/subject_key.py` says how each setting is built).",
        "",
        "| setting | " + " | ".join(label for _, label in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, cells in summary["settings"].items():
        row = [f"{cells[k]['percent']:.1f}" if k in cells else "" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "n: " + ", ".join(f"{k} {first[k]['n']}" for k, _ in cols), ""]
    out.with_name(out.name + ".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=300)
    parser.add_argument("--datasets", nargs="+", choices=list(FILES), default=list(FILES))
    parser.add_argument("--work", type=Path, default=Path("runs"))
    args = parser.parse_args()
    model, tokenizer = neuronpatch.load_model(args.model)
    model.eval()
    # the chain without the escape (whatever the model's default): the escape is computed here,
    # offline, and the rows keep the subject gate first (gemma3-270m's default now has words)
    hp = LocalHparams(strict_margin=None).for_model(resolve(model))
    tag = f"{args.model.split('-')[0]}_{args.start}-{args.stop}"
    base_rows, key_rows = {}, {}
    for dataset in args.datasets:
        records = neuronpatch.load_records(DATA / FILES[dataset], n=args.stop)[args.start :]
        base_rows[dataset] = measured_rows(
            cache_path(args.work / "gate_chain", tag, dataset, hp),
            records,
            lambda r: measure(model, tokenizer, r, hp),
        )
        key_rows[dataset] = measured_rows(
            cache_path(args.work / "subject_key", tag, dataset, hp),
            records,
            lambda r: measure_keys(model, tokenizer, r, hp),
        )
    summary = {
        "model": args.model,
        "records": [args.start, args.stop],
        "settings": summarise(base_rows, key_rows),
    }
    write(summary, HERE / "results" / f"subject_key_{tag}")


if __name__ == "__main__":
    main()
