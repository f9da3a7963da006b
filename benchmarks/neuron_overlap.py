"""Which neurons do FiNE and KNE pick for the same fact, and how far apart are they?

Location only (no optimisation): for the first ``--n`` records of each dataset, both methods
locate with their defaults; reported per dataset are the mean ensemble sizes, how many
layers each spans, the share of KNE's neurons that FiNE also picks (and of FiNE's that KNE
picks), and the per-layer histogram of each (PNG). Writes ``results/neuron_overlap.{json,md,png}``.

    python benchmarks/neuron_overlap.py --model smollm2-135m --n 100
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import neuronpatch
from neuronpatch.datasets import load_records
from neuronpatch.models import load_model

HERE = Path(__file__).resolve().parent
DATA = {
    "counterfact": "easyedit_counterfact_counterfact-val.json",
    "wiki_cf": "knowedit_wiki_counterfact_train_cf.json",
    "zsre": "knowedit_zsre_ZsRE-test-all.json",
}


def compare(model, tokenizer, records) -> dict:
    rows, layers = [], {"fine": Counter(), "kne": Counter()}
    for record in records:
        picked = {}
        for method in ("fine", "kne"):
            neurons = neuronpatch.locate(model, tokenizer, record.request, method=method)
            picked[method] = {(n.layer, n.index) for n in neurons}
            layers[method].update(layer for layer, _ in picked[method])
        shared = picked["fine"] & picked["kne"]
        rows.append(
            {
                "id": record.record_id,
                "fine": len(picked["fine"]),
                "kne": len(picked["kne"]),
                "shared": len(shared),
                "fine_layers": len({layer for layer, _ in picked["fine"]}),
                "kne_layers": len({layer for layer, _ in picked["kne"]}),
            }
        )
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    return {
        "n": len(rows),
        "fine_neurons": mean("fine"),
        "kne_neurons": mean("kne"),
        "fine_layers_spanned": mean("fine_layers"),
        "kne_layers_spanned": mean("kne_layers"),
        "share_of_kne_in_fine": statistics.fmean(r["shared"] / r["kne"] for r in rows),
        "share_of_fine_in_kne": statistics.fmean(r["shared"] / r["fine"] for r in rows),
        "no_overlap": sum(r["shared"] == 0 for r in rows),
        "per_layer": {m: dict(sorted(c.items())) for m, c in layers.items()},
        "records": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "neuron_overlap")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    results = {"model": args.model, "datasets": {}}
    for name, file in DATA.items():
        results["datasets"][name] = compare(
            model, tokenizer, load_records(args.data_dir / file, n=args.n)
        )
        print(name, {k: v for k, v in results["datasets"][name].items() if k != "records"})
    write(results, args.out, model.config.num_hidden_layers)


def write(results: dict, out: Path, num_layers: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"# FiNE vs KNE: the neurons each picks ({results['model']}, default hyperparameters)",
        "",
        "Location only. FiNE keeps the top 5 per target token (union); KNE the top 20 "
        "by |activation x gradient| across layers. Both skip the last 3 layers.",
        "",
        "| data | n | FiNE neurons | KNE neurons | FiNE layers | KNE layers | "
        "KNE's in FiNE's | FiNE's in KNE's | no overlap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in results["datasets"].items():
        lines.append(
            f"| {name} | {d['n']} | {d['fine_neurons']:.1f} | {d['kne_neurons']:.1f} | "
            f"{d['fine_layers_spanned']:.1f} | {d['kne_layers_spanned']:.1f} | "
            f"{100 * d['share_of_kne_in_fine']:.1f} % | {100 * d['share_of_fine_in_kne']:.1f} % | "
            f"{d['no_overlap']} |"
        )
    lines += ["", f"![neurons per layer]({out.name}.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), sharey=True)
    for ax, name in zip(axes, names, strict=True):
        d = results["datasets"][name]
        for offset, method in ((-0.2, "fine"), (0.2, "kne")):
            counts = d["per_layer"][method]
            total = sum(counts.values())
            xs = list(range(num_layers))
            ys = [100 * counts.get(x, 0) / total for x in xs]
            ax.bar([x + offset for x in xs], ys, width=0.4, label=method.upper())
        ax.set_title(f"{name} (n={d['n']})")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("% of located neurons")
    axes[0].legend()
    fig.suptitle(f"Where FiNE and KNE locate ({results['model']})")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
