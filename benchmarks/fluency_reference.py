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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import neuronpatch
from neuronpatch.metrics import mean_ci, ngram_entropy, sample_text

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="eval output folders, same records")
    parser.add_argument("--out", default="fluency_reference", help="results/NAME.json/.md")
    args = parser.parse_args()
    runs = {
        path.name: [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]
        for path in args.runs
    }
    first = next(iter(runs.values()))
    ids = [r["record_id"] for r in first]
    for name, rows in runs.items():
        if [r["record_id"] for r in rows] != ids or "texts" not in rows[0]:
            raise SystemExit(f"{name}: not the same records as the first run, or no fluency")
    model, tokenizer = neuronpatch.load_model(first[0]["model"])
    model.eval()
    seed, length = first[0]["seed"], first[0]["fluency_length"]
    forced, texts = [], []
    for row in first:
        request = row["request"]
        text = sample_text(
            model, tokenizer, f"{request['prompt']} {request['target_new'].strip()}", seed, length
        )
        texts.append(text)
        forced.append(100 * ngram_entropy(text))

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
    for name, rows in runs.items():
        method = rows[0]["method"]
        table[method if name == method else f"{method} ({name})"] = (
            [100 * r["post"]["fluency"] for r in rows],
            [mentions(r["texts"]["post"], r) for r in rows],
        )
    pre = sum(table["pre-edit"][0]) / len(first)
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
        "| row | fluency (95 % CI) | vs pre-edit | answer mentions | samples naming it 3+ times |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary["rows"].items():
        mean, low, high = row["fluency"]
        lines.append(
            f"| {name} | {mean:.1f} [{low:.1f}, {high:.1f}] | {row['vs_pre_percent']:+.1f} % "
            f"| {row['answer_mentions_mean']:.2f} | {row['records_with_3_or_more']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
