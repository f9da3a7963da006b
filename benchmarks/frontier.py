"""The edit/locality frontier: Edit Succ against RSA and against neighbourhood locality.

Collates what the other benchmarks measured (nothing is rerun): plain FiNE across the
learning-rate sweep (``results/fine_lr_sweep.json``) and every row of the quality table
(``results/quality.json``: FiNE, its ablations, the gated / locality-aware variants, both
models). Writes ``results/frontier.{png,md,json}``; the target corner (Edit >= 99 and
locality >= 90) is shaded.

    python benchmarks/frontier.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PANELS = (  # (dataset in quality.json, dataset in fine_lr_sweep.json, locality metric, label)
    ("wiki_cf", "WikiData_counterfact", "locality.Relation_Specificity", "RSA (WikiData_cf)"),
    ("counterfact", "CounterFact", "locality.Neighborhood", "Neighbourhood (CounterFact)"),
)
EDIT_TARGET, LOCALITY_TARGET = 99.0, 90.0


def _stat(metrics: dict, key: str) -> dict | None:
    value = metrics.get(key)
    if value is None:
        return None
    return value.get("post", value)  # quality.json nests pre/post; the sweep stores post only


def points() -> list[dict]:
    """One point per (panel, run): model, label, edit and locality means with CIs."""
    out = []
    sweep = json.loads((RESULTS / "fine_lr_sweep.json").read_text())
    quality = json.loads((RESULTS / "quality.json").read_text())
    for dataset, sweep_name, locality, panel in PANELS:
        for run in sweep:
            edit, loc = _stat(run["metrics"], "edit_succ"), _stat(run["metrics"], locality)
            if run["dataset"] == sweep_name and edit and loc:
                out.append(
                    dict(
                        panel=panel,
                        model=run["model"],
                        series="FiNE lr sweep",
                        label=f"lr {run['lr']:g}",
                        n=run["n"],
                        edit=edit,
                        locality=loc,
                    )
                )
        for row in quality:
            if row.get("dataset") != dataset or not row.get("metrics"):
                continue
            edit, loc = _stat(row["metrics"], "edit_succ"), _stat(row["metrics"], locality)
            if edit and loc:
                out.append(
                    dict(
                        panel=panel,
                        model=row["model"],
                        series=row["row"],
                        label=row["row"],
                        n=row["n"],
                        edit=edit,
                        locality=loc,
                    )
                )
    return out


def meets(point: dict) -> bool:
    return point["edit"]["mean"] >= EDIT_TARGET and point["locality"]["mean"] >= LOCALITY_TARGET


def write_markdown(pts: list[dict], path: Path) -> None:
    lines = [
        "# Edit / locality frontier",
        "",
        "Post-edit means x100 with 95 % CIs, collated from `fine_lr_sweep.json` and "
        f"`quality.json`. Target: Edit >= {EDIT_TARGET:g} and locality >= {LOCALITY_TARGET:g}.",
        "",
        "| locality | model | run | n | Edit | locality | target met |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in pts:
        e, loc = p["edit"], p["locality"]
        lines.append(
            f"| {p['panel']} | {p['model']} | {p['label']} | {p['n']} | "
            f"{e['mean']:.1f} [{e['low']:.1f}, {e['high']:.1f}] | "
            f"{loc['mean']:.1f} [{loc['low']:.1f}, {loc['high']:.1f}] | "
            f"{'yes' if meets(p) else 'no'} |"
        )
    lines += ["", "![frontier](frontier.png)", ""]
    path.write_text("\n".join(lines))


def plot(pts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the plots above, each panel's legend (one entry per row of quality.md) below it
    fig, axes = plt.subplots(1, len(PANELS), figsize=(7.5 * len(PANELS), 11))
    series = sorted({p["series"] for p in pts if p["series"] != "FiNE lr sweep"})
    shapes = "osD^v<>pPX*h8"
    markers = {
        name: shapes[i % len(shapes)] for i, name in enumerate(series)
    }  # more rows than shapes
    colours = {"smollm2-135m": "tab:blue", "gemma3-270m": "tab:orange"}
    for ax, (_, _, _, panel) in zip(axes, PANELS, strict=True):
        here = [p for p in pts if p["panel"] == panel]
        ax.axvspan(LOCALITY_TARGET, 101, ymin=0, ymax=1, color="tab:green", alpha=0.06)
        ax.axhline(EDIT_TARGET, color="tab:green", linewidth=0.8, linestyle="--")
        ax.axvline(LOCALITY_TARGET, color="tab:green", linewidth=0.8, linestyle="--")
        for model, colour in colours.items():
            sweep = sorted(
                (p for p in here if p["model"] == model and p["series"] == "FiNE lr sweep"),
                key=lambda p: p["label"],
            )
            if sweep:
                xs = [p["locality"]["mean"] for p in sweep]
                ys = [p["edit"]["mean"] for p in sweep]
                ax.plot(xs, ys, "-", color=colour, alpha=0.5, label=f"{model}: FiNE lr sweep")
                for p, x, y in zip(sweep, xs, ys, strict=True):
                    ax.annotate(
                        p["label"], (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points"
                    )
            for p in here:
                if p["model"] != model or p["series"] == "FiNE lr sweep":
                    continue
                x, y = p["locality"], p["edit"]
                ax.errorbar(
                    x["mean"],
                    y["mean"],
                    xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                    yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]],
                    fmt=markers[p["series"]],
                    color=colour,
                    alpha=0.8,
                    capsize=2,
                    label=f"{model}: {p['series']}",
                )
        ax.set_xlabel(f"{panel} (post-edit, %)")
        ax.set_ylabel("Edit Succ (%)")
        ax.set_xlim(0, 101)
        ax.set_ylim(0, 101)
        ax.set_title(panel)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1)
    fig.suptitle("Edit success against locality (target: above and right of the dashed lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    pts = points()
    (RESULTS / "frontier.json").write_text(json.dumps(pts, indent=1) + "\n")
    write_markdown(pts, RESULTS / "frontier.md")
    plot(pts, RESULTS / "frontier.png")
    print(f"{len(pts)} points, {sum(map(meets, pts))} meet the target")


if __name__ == "__main__":
    main()
