"""Can a query gate open on paraphrases? The prompt's key against a relation key (gate-only).

The default's query gate keys on the residual of the edited prompt's last token (centred on
generic text) at the middle layer, and its threshold sits above the subject's other
relations (``local.negative_prompts``). CounterFact's paraphrases ("Arun Nehru is known for"
for "The profession of Arun Nehru is") keep it shut (``gate_chain.py``: 292 of 300 on
smollm2). This checks whether any threshold on either of two keys would open it there while
keeping relation-specificity and forgetfulness prompts out:

- ``prompt``: today's key;
- ``relation``: the mean of the unit keys of the prompt with each of ``OTHER_SUBJECTS`` in the
  subject's place: the relation's wording without the subject (the subject gate says whose).

Per record, the default's gates are built (``make_gates``); each evaluation prompt's cosine
with both keys at its last position (the query gate's span honoured) and whether the chain's
other gates are open there are stored; a setting is a calibration rule
``threshold = clamp(highest cosine on the negatives + margin, floor, cap)`` (the default's
own: margin 0.02 within [0.85, 0.9]). Reported: % of prompts where the chain does what it
should, per key and setting, and the quartiles of the paraphrases' cosine against those of
the negatives' highest.

    python benchmarks/paraphrase_gate.py --model smollm2-135m --stop 100
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from gate_chain import DATA, FILES, GROUPS, _last_cosines, measured_rows, prompt_sections

import neuronpatch
from neuronpatch.arch import resolve
from neuronpatch.local import (
    OTHER_SUBJECTS,
    LocalHparams,
    _residual,
    make_gates,
    negative_prompts,
    peak_cosines,
)

HERE = Path(__file__).resolve().parent
KEYS = ("prompt", "relation")
# (margin, floor, cap): the default's rule first, then lower floors and a higher cap
SETTINGS = (
    (0.02, 0.85, 0.9),
    (0.02, 0.7, 0.9),
    (0.02, 0.6, 0.9),
    (0.0, 0.5, 0.9),
    (0.02, 0.5, 0.95),
    (0.05, 0.5, 0.95),
)


@torch.no_grad()
def measure(model, tokenizer, record, hp: LocalHparams) -> dict:
    request = record.request
    gates = list(make_gates(model, tokenizer, request, hp))
    q = max(range(len(gates)), key=lambda i: gates[i].layer)  # the middle-layer query gate
    query = gates[q]
    keys = []
    for other in OTHER_SUBJECTS:
        if other.lower() == request.subject.lower():
            continue
        ids = torch.tensor([tokenizer(request.prompt.replace(request.subject, other)).input_ids])
        k = _residual(model, ids, query.layer)[0, -1] - query.centre  # [hidden]
        keys.append(k / k.norm())
    relation = replace(query, key=torch.stack(keys).mean(0))  # [hidden]
    negatives = negative_prompts(request, hp.negative_templates)
    row: dict = {
        "negatives": peak_cosines(model, tokenizer, [query, relation], negatives).tolist()
        if negatives
        else [],  # [n, 2]
        "groups": {},
    }
    sections = prompt_sections(record)
    chain = [*gates, relation]
    for group, section, _ in GROUPS:
        cells = []
        for prompt in sections.get(section, []):
            cos = _last_cosines(model, tokenizer, chain, prompt)
            others = all(
                c > g.threshold
                for i, (c, g) in enumerate(zip(cos[:-1], gates, strict=True))
                if i != q
            )
            cells.append({"others_open": others, "prompt": cos[q], "relation": cos[-1]})
        row["groups"][group] = cells
    return row


def threshold(row: dict, key: int, margin: float, floor: float, cap: float) -> float:
    if not row["negatives"]:
        return cap
    highest = max(n[key] for n in row["negatives"])
    return min(max(highest + margin, floor), cap)


def summarise(rows: list[dict]) -> dict:
    table = []
    for k, key in enumerate(KEYS):
        for margin, floor, cap in SETTINGS:
            cells = {}
            for group, _, should_open in GROUPS:
                outcomes = [
                    c["others_open"] and c[key] > threshold(r, k, margin, floor, cap)
                    for r in rows
                    for c in r["groups"][group]
                ]
                if outcomes:
                    share = sum(outcomes) / len(outcomes)
                    cells[group] = 100 * (share if should_open else 1 - share)
            table.append({"key": key, "margin": margin, "floor": floor, "cap": cap, **cells})
    quartiles = {}
    for k, key in enumerate(KEYS):
        paraphrase = [c[key] for r in rows for c in r["groups"]["rephrase"]]
        highest = [max(n[k] for n in r["negatives"]) for r in rows if r["negatives"]]
        for name, values in (("rephrase", paraphrase), ("highest negative", highest)):
            if len(values) >= 4:
                quartiles[f"{key}: {name}"] = [round(v, 3) for v in statistics.quantiles(values)]
    return {"table": table, "quartiles": quartiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=100)
    parser.add_argument(
        "--datasets", nargs="+", choices=list(FILES), default=["counterfact", "wiki_cf"]
    )
    parser.add_argument("--work", type=Path, default=Path("runs/paraphrase_gate"))
    args = parser.parse_args()
    model, tokenizer = neuronpatch.load_model(args.model)
    model.eval()
    hp = LocalHparams().for_model(resolve(model))
    tag = f"{args.model.split('-')[0]}_{args.start}-{args.stop}"
    summary: dict = {"model": args.model, "records": [args.start, args.stop], "datasets": {}}
    for dataset in args.datasets:
        records = neuronpatch.load_records(DATA / FILES[dataset], n=args.stop)[args.start :]
        rows = measured_rows(
            args.work / f"{tag}_{dataset}.jsonl",
            records,
            lambda r: measure(model, tokenizer, r, hp),
        )
        summary["datasets"][dataset] = summarise(rows)
    write(summary, HERE / "results" / f"paraphrase_gate_{tag}")


def write(summary: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    start, stop = summary["records"]
    lines = [
        f"# Query gate keys and paraphrases, {summary['model']}, records {start}-{stop - 1}"
        " (gate-only)",
        "",
        "% of prompts where the chain does what it should (**open** on alias and paraphrase "
        "prompts, **shut** on RSA, FA and neighbourhood prompts) with the middle-layer query "
        "gate keyed on the prompt (today) or on the relation (the prompt's key averaged over "
        "other subjects), its threshold = clamp(highest cosine on the subject's other relations "
        "+ margin, floor, cap); the chain's other gates as the default builds them. The first "
        "`prompt` row is the default. `benchmarks/paraphrase_gate.py` says how.",
        "",
        "| data | key | margin | floor | cap | SAA open | paraphrase open | RSA shut | FA shut "
        "| neighbour shut |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, result in summary["datasets"].items():
        for row in result["table"]:
            cells = [f"{row[g]:.1f}" if g in row else "" for g, _, _ in GROUPS]
            lines.append(
                f"| {dataset} | {row['key']} | {row['margin']} | {row['floor']} | {row['cap']} | "
                + " | ".join(cells)
                + " |"
            )
    lines += ["", "Quartiles of the query gate's cosine (last position):", ""]
    for dataset, result in summary["datasets"].items():
        for name, q in result["quartiles"].items():
            lines.append(f"- {dataset}, {name}: {q}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
