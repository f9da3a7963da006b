"""Which subject gate should the default ("both") edit require? Gate-only, on real prompts.

``gate_key="both"`` opens a patch where its query gate (the prompt's last token at the middle
layer, threshold 0.9) *and* its subject gate are open. This measures subject gates that read
different layers with a fixed threshold or one calibrated per edit (``subject_threshold=
"calibrated"``: the highest cosine the prompt reaches with each of ``local.OTHER_SUBJECTS`` in
the subject's place, floored at ``local.CALIBRATION_FLOOR``, plus an optional margin), alone
and together with the query gate; and a query key centred on the subject's other relations
instead of generic text (to see whether it reaches reworded paraphrases). It uses the
runtime's gate arithmetic (``gates.GateBank``; a prompt opens a gate when any position up to
its last matches) on the unedited model, and reports how often each gate does what it should:

- open on WikiData_counterfact subject-alias prompts (SAA) and CounterFact paraphrases,
- shut on relation-specificity (RSA), forgetfulness (FA) and CounterFact neighbourhood prompts.

    python benchmarks/subject_gate.py --model smollm2-135m --n 60
    python benchmarks/subject_gate.py --model gemma3-270m --n 60

Writes ``--out``.json / .md (default ``benchmarks/results/subject_gate_MODEL``).
"""

from __future__ import annotations

import torch
from query_gate import KINDS, hidden, prompts_of, setup, write

from neuronpatch.gates import GateBank
from neuronpatch.local import (
    CALIBRATION_FLOOR,
    NEGATIVE_TEMPLATES,
    OTHER_SUBJECTS,
    LocalHparams,
    generic_centres,
    negative_prompts,
    subject_end,
)
from neuronpatch.patch import Gate

SUBJECT_LAYERS = (1, 2, 3, 4, 5, 6)
FIXED = (0.4, 0.5, 0.6, 0.75)
MARGINS = (0.0, 0.05, 0.1)  # added to a calibrated threshold
QUERY_THRESHOLD = 0.9


def cosine(gate: Gate, h: torch.Tensor) -> float:
    """Highest cos(h - centre, key) over a prompt's positions (its gate opens above it)."""
    return GateBank([gate], torch.device("cpu")).cosine(h[gate.layer][None]).max().item()


def measure(model, tokenizer, records, num_layers: int) -> list[dict]:
    """Per record: the cosines of its candidate gates on its evaluation prompts."""
    mid = num_layers // 2
    centres = generic_centres(model, tokenizer, [*SUBJECT_LAYERS, mid])
    items = []
    for record in records:
        req = record.request
        h = hidden(model, tokenizer, req.prompt)  # [layers, S, hidden]
        s = subject_end(tokenizer, req.prompt, req.subject)
        subject = {
            layer: Gate(layer, h[layer, s] - centres[layer], centres[layer], 0.0)
            for layer in SUBJECT_LAYERS
        }
        others = [
            hidden(model, tokenizer, req.prompt.replace(req.subject, other))
            for other in OTHER_SUBJECTS
            if other.lower() != req.subject.lower()
        ]
        negatives = [hidden(model, tokenizer, p) for p in negative_prompts(req, NEGATIVE_TEMPLATES)]
        relation_centre = torch.stack([n[mid, -1] for n in negatives]).mean(0)  # [hidden]
        query = {
            "generic": Gate(mid, h[mid, -1] - centres[mid], centres[mid], 0.0, "query"),
            "other relations": Gate(mid, h[mid, -1] - relation_centre, relation_centre, 0.0),
        }
        tests = []
        for kind, texts in prompts_of(record).items():
            for text in texts:
                ht = hidden(model, tokenizer, text)
                tests.append(
                    {
                        "kind": kind,
                        "subject": {layer: cosine(g, ht) for layer, g in subject.items()},
                        "query": {name: cosine(g, ht) for name, g in query.items()},
                    }
                )
        calibration = {layer: max(cosine(g, o) for o in others) for layer, g in subject.items()}
        items.append({"calibration": calibration, "tests": tests})
    return items


def tally(items: list[dict], subject_open, query_open) -> dict[str, float]:
    """% of prompts of each kind where (subject gate and query gate) does the right thing."""
    counts = {k: [0, 0] for k, _ in KINDS}
    should_open = dict(KINDS)
    for item in items:
        for test in item["tests"]:
            is_open = subject_open(item, test) and query_open(test)
            counts[test["kind"]][0] += is_open == should_open[test["kind"]]
            counts[test["kind"]][1] += 1
    return {k: round(100 * a / b, 1) for k, (a, b) in counts.items() if b}


def rows_of(items: list[dict]) -> list[dict]:
    rows = []
    queries = {
        "none": lambda t: True,
        "query": lambda t: t["query"]["generic"] > QUERY_THRESHOLD,
    }
    for query_name, query_open in queries.items():
        for layer in SUBJECT_LAYERS:
            for threshold in FIXED:
                rule = lambda it, t, at=layer, th=threshold: t["subject"][at] > th  # noqa: E731
                rows.append(
                    {"query": query_name, "layer": layer, "subject threshold": str(threshold)}
                    | tally(items, rule, query_open)
                )
            for margin in MARGINS:

                def rule(it, t, at=layer, m=margin):
                    return t["subject"][at] > max(CALIBRATION_FLOOR, it["calibration"][at]) + m

                label = "calibrated" + (f" + {margin}" if margin else "")
                rows.append(
                    {"query": query_name, "layer": layer, "subject threshold": label}
                    | tally(items, rule, query_open)
                )
    for threshold in (0.5, 0.6, 0.7, 0.8, 0.9):
        for centre in ("generic", "other relations"):
            rows.append(
                {"query": f"query alone, centre: {centre}", "layer": "—"}
                | {"subject threshold": f"query > {threshold}"}
                | tally(
                    items, lambda it, t: True, lambda t, c=centre, th=threshold: t["query"][c] > th
                )
            )
    return rows


def main() -> None:
    torch.set_grad_enabled(False)
    args, model, tokenizer, records = setup(__doc__.splitlines()[0])
    num_layers = model.config.num_hidden_layers
    rows = rows_of(measure(model, tokenizer, records, num_layers))
    hp = LocalHparams()
    default = ("query", hp.subject_layer, str(hp.subject_threshold))
    lines = [
        f"# Subject gates on {args.model}: {args.n} WikiData_counterfact + {args.n} CounterFact "
        "records",
        "",
        "% of prompts where the gate does what it should: **open** on subject-alias (SAA) and",
        "paraphrase prompts, **shut** on relation-specificity (RSA), forgetfulness (FA) and",
        f"neighbourhood prompts. `query`: with the query gate (layer {num_layers // 2}, "
        f'> {QUERY_THRESHOLD}), as `gate_key="both"` uses them; `none`: the subject gate alone. '
        f"`calibrated`: per edit, the highest cosine with {len(OTHER_SUBJECTS)} other entities in "
        f"the subject's place (at least {CALIBRATION_FLOOR}). The last rows are query gates "
        "alone, centred on generic text (the library's) or on the subject's other relations. "
        f"Library default in bold (subject layer {hp.subject_layer}, {hp.subject_threshold}).",
        "",
        "| with | subject layer | subject threshold | SAA open | rephrase open | RSA shut | "
        "FA shut | neighbour shut |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mark = "**" if (row["query"], row["layer"], row["subject threshold"]) == default else ""
        cells = " | ".join(str(row.get(k, "—")) for k, _ in KINDS)
        lines.append(
            f"| {mark}{row['query']}{mark} | {row['layer']} | {row['subject threshold']} | "
            f"{cells} |"
        )
    write(args, "subject_gate", rows, lines)


if __name__ == "__main__":
    main()
