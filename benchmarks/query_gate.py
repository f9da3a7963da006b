"""Where does a query gate open? Per layer and threshold, on real evaluation prompts.

A ``gate_key="query"`` patch keys its gate on the residual of the prompt's last token at one
layer; ``"both"`` also requires the subject gate (layer 1, threshold 0.75). This runs the
runtime's own gate arithmetic (``gates.GateBank`` on the unedited residual stream: a prompt
opens the gate when any of its positions matches) over the prompts KnowEdit scores an edit
on, and reports how often the gate does what it should:

- open on WikiData_counterfact subject-alias prompts (SAA) and CounterFact paraphrases,
- shut on relation-specificity (RSA) and forgetfulness (FA) prompts and CounterFact
  neighbourhood prompts.

A shut gate leaves those prompts' logits bitwise unedited; an open one on SAA / paraphrase
prompts is what lets the edit reach them. No editing happens here: it is the gate alone.

    python benchmarks/query_gate.py --model smollm2-135m --n 60
    python benchmarks/query_gate.py --model gemma3-270m --n 60

Writes ``--out``.json / .md (default ``benchmarks/results/query_gate_MODEL``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import neuronpatch
from neuronpatch.gates import GateBank
from neuronpatch.local import SUBJECT_GATE_LAYER, generic_centres, subject_end
from neuronpatch.patch import Gate

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
WIKI = DATA / "knowedit_wiki_counterfact_train_cf.json"
COUNTERFACT = DATA / "easyedit_counterfact_counterfact-val.json"
THRESHOLDS = (0.8, 0.85, 0.9, 0.93)
SUBJECT_THRESHOLDS = (0.4, 0.5, 0.6, 0.75)  # the subject gate of "both", at the default query
# (name, should the gate open?)
KINDS = (("SAA", True), ("rephrase", True), ("RSA", False), ("FA", False), ("neighbour", False))


@torch.no_grad()
def hidden(model, tokenizer, text: str) -> torch.Tensor:
    """Residual stream after every decoder layer: [layers, S, hidden]."""
    ids = torch.tensor([tokenizer(text).input_ids])
    states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    return torch.stack(states[1:])[:, 0].float()


def opens(gate: Gate, h: torch.Tensor) -> bool:
    """Whether ``gate`` is open at the last position of a prompt with residuals ``h``."""
    return bool(GateBank([gate], torch.device("cpu")).open(h[gate.layer][None])[0, -1, 0])


def prompts_of(record) -> dict[str, list[str]]:
    loc, port = record.locality, record.portability
    return {
        "SAA": [p for p, _ in port.get("Subject_Aliasing", [])],
        "rephrase": list(record.rephrase),
        "RSA": [p for p, _ in loc.get("Relation_Specificity", [])],
        "FA": [p for p, _ in loc.get("Forgetfulness", [])],
        "neighbour": [p for p, _ in loc.get("Neighborhood", [])],
    }


def write(args, name: str, rows: list[dict], lines: list[str]) -> None:
    """``rows`` to ``--out``.json and the table ``lines`` to ``--out``.md (default
    ``results/NAME_MODEL``)."""
    out = args.out or HERE / "results" / f"{name}_{args.model.split('-')[0]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"model": args.model, "n": args.n, "rows": rows}, indent=1)
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def setup(description: str) -> tuple[argparse.Namespace, Any, Any, list]:
    """The gate benchmarks' command line (--model, --n, --out), the model in eval mode and
    the first --n records of each dataset."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=60, help="records of each dataset")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = neuronpatch.load_model(args.model)
    model.eval()
    records = neuronpatch.load_records(WIKI, n=args.n) + neuronpatch.load_records(
        COUNTERFACT, n=args.n
    )
    return args, model, tokenizer, records


def main() -> None:
    args, model, tokenizer, records = setup(__doc__.splitlines()[0])
    num_layers = model.config.num_hidden_layers
    layers = list(range(2, num_layers - 2))
    centres = generic_centres(model, tokenizer, [1, *layers])
    subject_threshold = 0.75  # the fixed layer-1 subject gate measured here
    # counts[(layer, threshold, mode)][kind] = [gate did the right thing, prompts]
    counts: dict[tuple[int, float, str], dict[str, list[int]]] = {}
    for record in records:
        req = record.request
        h = hidden(model, tokenizer, req.prompt)
        s = subject_end(tokenizer, req.prompt, req.subject)
        layer1 = SUBJECT_GATE_LAYER
        subject = {
            t: Gate(layer1, h[layer1, s] - centres[layer1], centres[layer1], t, "subject")
            for t in {subject_threshold, *SUBJECT_THRESHOLDS}
        }
        for kind, texts in prompts_of(record).items():
            for text in texts:
                hp = hidden(model, tokenizer, text)
                subject_open = {t: opens(gate, hp) for t, gate in subject.items()}
                for layer in layers:
                    key = h[layer, -1] - centres[layer]
                    for threshold in THRESHOLDS:
                        query = opens(Gate(layer, key, centres[layer], threshold, "query"), hp)
                        modes = [
                            ("query", query),
                            ("both", query and subject_open[subject_threshold]),
                        ]
                        if (layer, threshold) == (num_layers // 2, 0.9):
                            modes += [
                                (f"both, subject > {t}", query and subject_open[t])
                                for t in SUBJECT_THRESHOLDS
                                if t != subject_threshold
                            ]
                        for mode, is_open in modes:
                            tally = counts.setdefault((layer, threshold, mode), {})
                            right = is_open == dict(KINDS)[kind]
                            cell = tally.setdefault(kind, [0, 0])
                            cell[0] += right
                            cell[1] += 1

    rows = []
    for (layer, threshold, mode), tally in sorted(counts.items()):
        rows.append(
            {
                "mode": mode,
                "layer": layer,
                "threshold": threshold,
                **{k: round(100 * c[0] / c[1], 1) for k, c in tally.items()},
                "prompts": {k: c[1] for k, c in tally.items()},
            }
        )
    default_layer = num_layers // 2
    lines = [
        f"# Query gate on {args.model}: {args.n} WikiData_counterfact + {args.n} CounterFact "
        "records",
        "",
        "% of prompts where the gate does what it should: **open** on subject-alias (SAA) and",
        "paraphrase prompts, **shut** on relation-specificity (RSA), forgetfulness (FA) and",
        "neighbourhood prompts. `query`: the prompt's last-token key alone; `both`: it and the",
        f"subject gate (layer {SUBJECT_GATE_LAYER}, threshold {subject_threshold}). "
        f"Library default: layer {default_layer} (the middle), threshold 0.9.",
        "",
        "| gate | layer | threshold | SAA open | rephrase open | RSA shut | FA shut | "
        "neighbour shut |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mark = "**" if (row["layer"], row["threshold"]) == (default_layer, 0.9) else ""
        cells = " | ".join(str(row.get(k, "—")) for k, _ in KINDS)
        lines.append(
            f"| {mark}{row['mode']}{mark} | {row['layer']} | {row['threshold']} | {cells} |"
        )
    write(args, "query_gate", rows, lines)


if __name__ == "__main__":
    main()
