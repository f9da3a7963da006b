"""Can a patch tell, from the residual stream, whether its subject is in the input?

A plain FiNE patch fires on every input. A gated patch would fire only where a key matches.
This measures, per layer, how well the residual of the subject's last token (the key, taken
from the edit prompt) separates inputs that should fire (CounterFact rephrase prompts, which
name the same subject) from inputs that must not (neighbourhood prompts: same relation,
another subject; and generic text). Score of an input = the best cosine over its positions
after centring on generic text; position 0 is dropped (its residual is an attention-sink
outlier that matches everything). Also reported: the same test with the key taken at the
*last prompt position* instead, which the relation template dominates.

    python benchmarks/gate_separability.py --data ../shared/data/easyedit_counterfact_counterfact-val.json --n 60
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import neuronpatch

HERE = Path(__file__).resolve().parent
GENERIC = [
    "The weather today is quite nice and",
    "In 1998, the company announced that",
    "She opened the door and saw",
    "The results of the experiment show that",
]


@torch.no_grad()
def residuals(model, tokenizer, text: str) -> torch.Tensor:
    """Residual stream after every layer, position 0 dropped: [layers + 1, seq - 1, hidden]."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    return torch.stack(model(ids, output_hidden_states=True).hidden_states)[:, 0, 1:]


def subject_position(tokenizer, prompt: str, subject: str) -> int:
    """Index (position 0 dropped) of the subject's last token in ``prompt``."""
    return len(tokenizer(prompt[: prompt.index(subject) + len(subject)]).input_ids) - 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=HERE.parent.parent
        / "shared"
        / "data"
        / "easyedit_counterfact_counterfact-val.json",
    )
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    model, tokenizer = neuronpatch.load_model(args.model)
    records = [
        r
        for r in neuronpatch.load_records(args.data, n=args.n)
        if r.request.subject in (r.rephrase[0] if r.rephrase else "")
    ]

    generic = torch.cat([residuals(model, tokenizer, g) for g in GENERIC], dim=1)
    centre = generic.mean(1, keepdim=True)  # [L+1, 1, hidden]

    def unit(h: torch.Tensor) -> torch.Tensor:
        h = h - centre
        return h / h.norm(dim=-1, keepdim=True)

    generic_u = unit(generic)
    scores = {
        kind: {"should_fire": [], "neighbour": [], "generic": []} for kind in ("subject", "last")
    }
    for record in records:
        req = record.request
        prompt = unit(residuals(model, tokenizer, req.prompt))  # [L+1, S, hidden]
        keys = {
            "subject": prompt[:, subject_position(tokenizer, req.prompt, req.subject)],
            "last": prompt[:, -1],
        }  # [L+1, hidden] each
        rephrase = unit(residuals(model, tokenizer, record.rephrase[0]))
        neighbour = unit(residuals(model, tokenizer, record.locality["Neighborhood"][0][0]))
        for kind, key in keys.items():
            for name, h in (
                ("should_fire", rephrase),
                ("neighbour", neighbour),
                ("generic", generic_u),
            ):
                best = torch.einsum("lsh,lh->ls", h, key).amax(1)  # [L+1]
                scores[kind][name].append(best)

    result = {"model": args.model, "n": len(records), "layers": {}}
    lines = [
        "| key | layer | should fire: min / median | neighbour: max / median | generic max | separable |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("subject", "last"):
        fire, neigh, gen = (
            torch.stack(scores[kind][k]) for k in ("should_fire", "neighbour", "generic")
        )
        for layer in range(fire.shape[1]):
            row = {
                "fire_min": float(fire[:, layer].min()),
                "fire_median": float(fire[:, layer].median()),
                "neighbour_max": float(neigh[:, layer].max()),
                "neighbour_median": float(neigh[:, layer].median()),
                "generic_max": float(gen[:, layer].max()),
            }
            row["separable"] = row["fire_min"] > max(row["neighbour_max"], row["generic_max"])
            result["layers"][f"{kind}/{layer}"] = row
            lines.append(
                f"| {kind} | {layer} | {row['fire_min']:.2f} / {row['fire_median']:.2f} | "
                f"{row['neighbour_max']:.2f} / {row['neighbour_median']:.2f} | "
                f"{row['generic_max']:.2f} | {'yes' if row['separable'] else 'no'} |"
            )
    out = HERE / "results"
    (out / "gate_separability.json").write_text(json.dumps(result, indent=1))
    (out / "gate_separability.md").write_text(
        "\n".join(
            [
                f"# Gate separability on {args.model} ({len(records)} CounterFact records)",
                "",
                "Best centred cosine between a key and any position (position 0 dropped) of: the rephrase",
                "prompt (same subject: a gate should fire), the neighbourhood prompt (same relation,",
                "other subject: must not fire) and generic text (must not fire). 'separable' = one",
                "threshold splits all records at that layer.",
                "",
                *lines,
                "",
            ]
        )
    )


if __name__ == "__main__":
    main()
