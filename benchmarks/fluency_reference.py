"""How fluent can an edit be? The unedited model made to give the new answer first.

KnowEdit's fluency is the n-gram entropy of a seeded sample from the edited prompt; an edit
that changes nothing but the answer still changes that sample. This takes the records of one
or more ``neuronpatch eval`` runs on the same records and adds, per record, the fluency of the
*unedited* model sampling (same seed, same length) from the prompt followed by the new answer:
the fluency a perfectly local edit would have. It also counts how often each sample names
the new answer (an edit that fires again later makes it repeat).

    neuronpatch eval --data ZsRE.json --method fine --n 40 -o runs/flu40/fine
    neuronpatch eval --data ZsRE.json --n 40 -o runs/flu40/local
    python benchmarks/fluency_reference.py runs/flu40/fine runs/flu40/local --out NAME

Without runs, ``--data PATH --n N [--model M]`` gives the two reference rows alone (pre-edit
and the new answer given) for the first N records, the same prompts and seed as ``eval``:
the floor for a quality row whose per-record samples are not at hand. Samples are drawn 16 at
a time (``metrics.sample_texts``: each equal to its sample alone up to rounding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import neuronpatch
from neuronpatch.metrics import mean_ci, ngram_entropy, sample_texts

BATCH = 16  # samples drawn together (sample_texts: equal to one at a time up to rounding)

HERE = Path(__file__).resolve().parent


def _batched(model, tokenizer, prompts: list[str], seed: int, length: int, desc: str) -> list[str]:
    from tqdm import tqdm

    texts: list[str] = []
    for start in tqdm(range(0, len(prompts), BATCH), desc, unit="batch"):
        texts += sample_texts(model, tokenizer, prompts[start : start + BATCH], seed, length)
    return texts


def _unedited_rows(args: argparse.Namespace) -> list[dict]:
    """Pre-edit samples of the first ``args.n`` records, shaped like ``eval``'s records."""
    from neuronpatch.evaluate import FLUENCY_LENGTH

    model, tokenizer = neuronpatch.load_model(args.model)
    model.eval()
    records = neuronpatch.load_records(args.data)[: args.n]
    prompts = [r.request.prompt for r in records]
    texts = _batched(model, tokenizer, prompts, args.seed, FLUENCY_LENGTH, "pre-edit")
    rows = []
    for record, text in zip(records, texts, strict=True):
        rows.append(
            {
                "record_id": record.record_id,
                "model": args.model,
                "seed": args.seed,
                "fluency_length": FLUENCY_LENGTH,
                "request": {
                    "prompt": record.request.prompt,
                    "target_new": record.request.target_new,
                },
                "pre": {"fluency": ngram_entropy(text)},
                "texts": {"pre": text},
            }
        )
    return rows


def _edited_given(model, tokenizer, rows: list[dict], given: list[str]) -> list[str]:
    """Each record edited again as its run did, sampling from its prompt and new answer.

    Separates what an edit's own answer costs from what it leaves behind: the edited model is
    handed the same text as the reference, so any loss beside the reference comes from the
    patch's effect on the positions after the answer (through its rows there, or the changed
    residuals at the answer that later positions attend to)."""
    from tqdm import tqdm

    from neuronpatch.editor import edit_each, make_hparams
    from neuronpatch.request import EditRequest
    from neuronpatch.runtime import applied_per_row

    method = rows[0]["method"]
    hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in rows[0]["hparams"].items()}
    hp = make_hparams(method, None, **hparams)
    seed, length = rows[0]["seed"], rows[0]["fluency_length"]
    texts, same = [], 0
    for start in tqdm(range(0, len(rows), BATCH), "edited, answer given", unit="batch"):
        part = rows[start : start + BATCH]
        requests = [EditRequest.coerce(r["request"]) for r in part]
        patches = [o.patch for o in edit_each(model, tokenizer, requests, method, hp, batch_size=8)]
        with applied_per_row(model, patches):
            free = sample_texts(model, tokenizer, [r.prompt for r in requests], seed, length)
            texts += sample_texts(model, tokenizer, given[start : start + BATCH], seed, length)
        same += sum(f == r["texts"]["post"] for f, r in zip(free, part, strict=True))
    print(f"edited again: {same} of {len(rows)} free samples equal the run's")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="eval output folders, same records")
    parser.add_argument("--data", type=Path, help="without runs: a benchmark file")
    parser.add_argument("--n", type=int, default=300, help="without runs: its first N records")
    parser.add_argument("--model", default="smollm2-135m", help="without runs: the model")
    parser.add_argument("--seed", type=int, default=0, help="without runs: the sample seed")
    parser.add_argument("--out", default="fluency_reference", help="results/NAME.json/.md")
    parser.add_argument(
        "--show", type=int, default=0, help="print the K records each run loses most on"
    )
    parser.add_argument(
        "--edit",
        action="store_true",
        help="with runs: edit the first run's records again (its method and hparams) and add "
        "the edited model sampling after the new answer given, as the reference does",
    )
    args = parser.parse_args()
    if not args.runs and args.data is None:
        parser.error("give eval output folders, or --data PATH for the reference rows alone")
    runs = {
        path.name: [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]
        for path in args.runs
    }
    first = next(iter(runs.values())) if runs else _unedited_rows(args)
    ids = [r["record_id"] for r in first]
    for name, rows in runs.items():
        if [r["record_id"] for r in rows] != ids or "texts" not in rows[0]:
            raise SystemExit(f"{name}: not the same records as the first run, or no fluency")
    model, tokenizer = neuronpatch.load_model(first[0]["model"])
    model.eval()
    seed, length = first[0]["seed"], first[0]["fluency_length"]
    given = [f"{r['request']['prompt']} {r['request']['target_new'].strip()}" for r in first]
    texts = _batched(model, tokenizer, given, seed, length, "new answer given")
    forced = [100 * ngram_entropy(text) for text in texts]

    edited_given = _edited_given(model, tokenizer, first, given) if args.edit else None

    def mentions(text: str, row: dict) -> int:
        return text.count(row["request"]["target_new"].strip())

    table = {
        "pre-edit": (
            [100 * r["pre"]["fluency"] for r in first],
            [mentions(r["texts"]["pre"], r) for r in first],
        ),
        "unedited model, new answer given": (
            forced,
            [mentions(t, r) for t, r in zip(texts, first, strict=True)],
        ),
    }
    if edited_given is not None:
        table["edited model, new answer given"] = (
            [100 * ngram_entropy(t) for t in edited_given],
            [mentions(t, r) for t, r in zip(edited_given, first, strict=True)],
        )
    for name, rows in runs.items():
        method = rows[0]["method"]
        table[method if name == method else f"{method} ({name})"] = (
            [100 * r["post"]["fluency"] for r in rows],
            [mentions(r["texts"]["post"], r) for r in rows],
        )
    pre = sum(table["pre-edit"][0]) / len(first)
    answered = {  # the sample gives the new answer right after the prompt, as the reference does
        name: sum(
            r["texts"]["post"].startswith(
                f"{r['request']['prompt']} {r['request']['target_new'].strip()}"
            )
            for r in rows
        )
        for name, rows in runs.items()
    }
    for name, rows in runs.items():
        gap = [100 * r["post"]["fluency"] - f for r, f in zip(rows, forced, strict=True)]
        worst = sorted(range(len(rows)), key=lambda i: gap[i])[: args.show]
        for i in worst:
            print(f"\n--- {name}, record {rows[i]['record_id']}: {gap[i]:+.1f} vs reference")
            print("edited:   ", rows[i]["texts"]["post"].replace("\n", " | "))
            print("reference:", texts[i].replace("\n", " | "))
    summary = {
        "model": first[0]["model"],
        "n": len(first),
        "records": ids,
        "rows": {
            name: {
                "fluency": mean_ci(values),
                "vs_pre_percent": 100 * (sum(values) / len(values) / pre - 1),
                "answer_mentions_mean": sum(counts) / len(counts),
                "records_with_3_or_more": sum(c >= 3 for c in counts),
            }
            for name, (values, counts) in table.items()
        },
    }
    for name, rows in runs.items():
        method = rows[0]["method"]
        row = summary["rows"][method if name == method else f"{method} ({name})"]
        row["vs_reference"] = mean_ci(
            [100 * r["post"]["fluency"] - f for r, f in zip(rows, forced, strict=True)]
        )
        row["answered_at_once"] = answered[name]
    out = HERE / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# Fluency against a perfectly local edit, {summary['model']}, n = {summary['n']}",
        "",
        "Fluency: n-gram entropy x100 of a seeded top-5 sample of "
        f"{length} tokens (prompt included). 'unedited model, new answer given': the unedited "
        "model sampling from the prompt followed by the new answer. Mentions: how often the "
        "sample names the new answer. `benchmarks/fluency_reference.py` says how.",
        "",
        "| row | fluency (95 % CI) | vs pre-edit | minus the reference, paired (95 % CI) "
        "| new answer right after the prompt | answer mentions | samples naming it 3+ times |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["rows"].items():
        mean, low, high = row["fluency"]
        paired = row.get("vs_reference")
        lines.append(
            f"| {name} | {mean:.1f} [{low:.1f}, {high:.1f}] | {row['vs_pre_percent']:+.1f} % | "
            + (f"{paired[0]:+.1f} [{paired[1]:+.1f}, {paired[2]:+.1f}]" if paired else "")
            + f" | {row.get('answered_at_once', '')} | {row['answer_mentions_mean']:.2f} "
            f"| {row['records_with_3_or_more']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
