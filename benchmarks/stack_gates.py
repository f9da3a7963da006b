"""Why stacked gated edits lose locality: whose gates open on whose prompts (gate only).

For the first ``--n`` distinct WikiData_counterfact requests, make each edit's gates (no
optimisation: the gates alone decide where a patch's rows are added) and run the runtime's
gate arithmetic (``gates.GateBank``, spans included) over every record's edit prompt,
relation-specificity (RSA), forgetfulness (FA) and subject-alias (SAA) prompts, each followed
by its answer. For each prompt it counts the *other* patches of the stack whose gates open
from the prompt's last token on (any of them adds its edit there), and whether the record's
own gates open (wanted on the edit prompt and SAA, not on RSA / FA). Variants:

- ``layer-1 subject gate (0.75), no span``: the gates of the patches in
  ``stacked_edits_local.md``;
- ``default``: ``LocalHparams()`` (calibrated layer-4 subject gate, query gate with span);
- ``default + stack calibration``: each subject gate's threshold also raised above the
  highest cosine it reaches on the other stacked edits' prompts (plus the margin), as
  ``neuronpatch.calibrate_stack`` raises it.

    python benchmarks/stack_gates.py --n 200

Writes ``--out``.json / .md (default ``benchmarks/results/stack_gates``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from stacked_edits import DATA, _distinct

import neuronpatch
from neuronpatch.arch import base_model_info
from neuronpatch.calibration import calibrate_stack
from neuronpatch.datasets import load_records
from neuronpatch.gates import GateBank
from neuronpatch.local import LocalHparams, _residuals, make_gates
from neuronpatch.patch import Gate, Patch

HERE = Path(__file__).resolve().parent
KINDS = {
    "prompt": None,
    "RSA": ("locality", "Relation_Specificity"),
    "FA": ("locality", "Forgetfulness"),
    "SAA": ("portability", "Subject_Aliasing"),
}
LAYER1 = {"subject_layer": 1, "subject_threshold": 0.75, "query_span": None}


def stack_calibrated(model, tokenizer, requests, gates: list[tuple[Gate, ...]]):
    """The gates as ``neuronpatch.calibrate_stack`` leaves them, on gate-only patches."""
    base = base_model_info(model)
    patches = [
        Patch({}, base, gates=g, requests=(r.to_dict(),))
        for r, g in zip(requests, gates, strict=True)
    ]
    return [p.gates for p in calibrate_stack(model, tokenizer, patches)]


def count(model, tokenizer, records, gates) -> dict[str, dict[str, float]]:
    subject = GateBank([g[0] for g in gates], torch.device("cpu"))
    query = GateBank([g[1] for g in gates], torch.device("cpu"))
    layers = (gates[0][0].layer, gates[0][1].layer)
    tally = {k: {"prompts": 0, "others": 0, "any_other": 0, "own": 0} for k in KINDS}
    for i, record in enumerate(records):
        for kind, where in KINDS.items():
            if where is None:
                pairs = [(record.request.prompt, record.request.target_new)]
            else:
                pairs = getattr(record, where[0]).get(where[1], [])
            for prompt, answer in pairs:
                while isinstance(answer, list):
                    answer = answer[0]
                start = len(tokenizer(prompt).input_ids) - 1
                ids = torch.tensor([tokenizer(f"{prompt} {answer}").input_ids])
                h = _residuals(model, ids, layers)
                open_ = subject.open(h[layers[0]])[0] & query.open(h[layers[1]])[0]  # [S, G]
                opened = open_[start:].any(0)  # [G]
                own = bool(opened[i])
                opened[i] = False
                t = tally[kind]
                t["prompts"] += 1
                t["others"] += int(opened.sum())
                t["any_other"] += int(opened.any())
                t["own"] += own
    return {
        kind: {
            "prompts": t["prompts"],
            "others_per_prompt": round(t["others"] / max(t["prompts"], 1), 2),
            "any_other_pct": round(100 * t["any_other"] / max(t["prompts"], 1), 1),
            "own_open_pct": round(100 * t["own"] / max(t["prompts"], 1), 1),
        }
        for kind, t in tally.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "stack_gates")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = neuronpatch.load_model(args.model)
    model.eval()
    records = _distinct(load_records(DATA), args.n)
    requests = [r.request for r in records]
    default = [make_gates(model, tokenizer, r, LocalHparams()) for r in requests]
    variants = {
        "layer-1 subject gate (0.75), no span": [
            make_gates(model, tokenizer, r, LocalHparams(**LAYER1)) for r in requests
        ],
        "default": default,
        "default + stack calibration": stack_calibrated(model, tokenizer, requests, default),
    }
    rows = {name: count(model, tokenizer, records, g) for name, g in variants.items()}
    result = {"model": args.model, "data": DATA.name, "n": len(records), "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Gates in a stack of {len(records)} edits ({args.model}, {DATA.name})",
        "",
        "Gate only (no edits): per prompt kind, how many *other* patches' gates open from the "
        "prompt's last token on (each adds its edit there), the share of prompts where any "
        "does, and how often the record's own gates open (wanted on the edit prompt and SAA).",
        "",
        "| gates | prompts | others open per prompt | any other open % | own open % |",
        "|---|---|---|---|---|",
    ]
    for name, kinds in rows.items():
        for kind, r in kinds.items():
            lines.append(
                f"| {name}: {kind} | {r['prompts']} | {r['others_per_prompt']} | "
                f"{r['any_other_pct']} | {r['own_open_pct']} |"
            )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
