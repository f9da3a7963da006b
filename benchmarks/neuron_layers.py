"""Where the located neurons sit: the FiNE paper's Figure 4 for both models and all datasets.

Collates the per-layer neuron counts ``neuronpatch eval`` stores in each quality row's
summary (``results/quality/*.json``: ``neurons_per_layer``, nothing is rerun) for plain FiNE
and for the default method, as a share of all neurons the row's edits located. Writes
``results/neuron_layers.{png,md,json}``.

    python benchmarks/neuron_layers.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("smollm2-135m", "gemma3-270m")
DATASETS = (("zsre", "ZsRE"), ("wiki_cf", "WikiData_cf"), ("counterfact", "CounterFact"))
METHODS = (("FiNE", "plain FiNE (paper's method)"), ("default, with fluency", "default (gated)"))


def rows() -> list[dict]:
    """One entry per (model, method, dataset) found in quality.json: per-layer shares."""
    quality = json.loads((RESULTS / "quality.json").read_text())
    by_key = {(r["model"], r["dataset"], r["row"]): r for r in quality}
    out = []
    for model in MODELS:
        for row, method in METHODS:
            for dataset, data_label in DATASETS:
                r = by_key.get((model, dataset, row))
                counts = (r or {}).get("neurons_per_layer")
                if not counts:
                    continue
                total = sum(counts)
                out.append(
                    dict(
                        model=model,
                        method=method,
                        dataset=data_label,
                        n=r["n"],
                        frozen_layers=r["hparams"].get("frozen_layers", 3),
                        neurons=total,
                        share=[100 * c / total for c in counts],  # % of located neurons
                    )
                )
    return out


def _top(share: list[float], k: int = 3) -> str:
    ranked = sorted(range(len(share)), key=lambda i: -share[i])[:k]
    return ", ".join(f"{i} ({share[i]:.0f} %)" for i in ranked)


def write_markdown(entries: list[dict], path: Path) -> None:
    lines = [
        "# Located neurons per layer",
        "",
        "Share of all neurons located by a quality row's edits, per layer (the FiNE paper's "
        "Figure 4), collated from `quality.json` by `benchmarks/neuron_layers.py`. The default "
        "locates above its gates' layers; both freeze the last 3 layers.",
        "",
        "| model | method | data | edits | neurons | layers holding most (share) |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['model']} | {e['method']} | {e['dataset']} | {e['n']} | "
            f"{e['neurons']:,} | {_top(e['share'])} |"
        )
    lines += ["", "![located neurons per layer](neuron_layers.png)", ""]
    path.write_text("\n".join(lines))


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(e["model"] == m for e in entries)]
    fig, axes = plt.subplots(
        len(models), len(METHODS), figsize=(7.0 * len(METHODS), 3.6 * len(models)),
        squeeze=False, sharey=True,
    )  # fmt: skip
    colours = {"ZsRE": "tab:blue", "WikiData_cf": "tab:orange", "CounterFact": "tab:green"}
    width = 0.8 / len(DATASETS)
    for r, model in enumerate(models):
        for c, (_, method) in enumerate(METHODS):
            ax = axes[r][c]
            here = [e for e in entries if e["model"] == model and e["method"] == method]
            for i, e in enumerate(here):
                layers = range(len(e["share"]))
                ax.bar(
                    [x + (i - (len(here) - 1) / 2) * width for x in layers],
                    e["share"],
                    width=width,
                    color=colours[e["dataset"]],
                    label=f"{e['dataset']} ({e['n']} edits)",
                )
            if here:
                layers = len(here[0]["share"])
                frozen = here[0]["frozen_layers"]
                if frozen:
                    ax.axvspan(layers - frozen - 0.5, layers - 0.5, color="0.9", zorder=0)
                    ax.annotate(
                        "frozen", (layers - frozen / 2 - 0.5, 1), ha="center", fontsize=7,
                        color="0.4", xycoords=("data", "axes fraction"), xytext=(0, -10),
                        textcoords="offset points",
                    )  # fmt: skip
                ax.set_xticks(range(0, layers, 2 if layers > 20 else 1))
                ax.set_xlim(-0.7, layers - 0.3)
                ax.legend(fontsize=7, loc="upper left")
            ax.set_title(f"{model}: {method}", fontsize=10)
            ax.set_xlabel("layer")
        axes[r][0].set_ylabel("located neurons (%)")
    fig.suptitle("Where the edited neurons sit (share of all located neurons, per layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    entries = rows()
    if not entries:
        raise SystemExit(f"no quality rows with neurons_per_layer in {RESULTS / 'quality.json'}")
    (RESULTS / "neuron_layers.json").write_text(json.dumps(entries, indent=1) + "\n")
    write_markdown(entries, RESULTS / "neuron_layers.md")
    plot(entries, RESULTS / "neuron_layers.png")
    print(f"{len(entries)} rows")


if __name__ == "__main__":
    main()
