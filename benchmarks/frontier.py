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


def category(series: str) -> str:
    """Which family a run belongs to, for the plot: what it is drawn as and whether labelled."""
    if series == "FiNE lr sweep":
        return "sweep"
    if series == "FiNE":
        return "fine"
    if series.startswith("FiNE,"):
        return "ablation"
    if series.startswith("KNE"):
        return "kne"
    if series == "default, with fluency":
        return "default"
    return "other"


# category -> (marker, colour, size, legend label); "other" rows are drawn small and unlabelled
STYLE = {
    "fine": ("s", "black", 7, "plain FiNE (paper's method), n = 300"),
    "ablation": ("^", "tab:gray", 6, "FiNE ablations (random neurons, no freezing, k)"),
    "kne": ("D", "tab:purple", 6, "KNE"),
    "default": ("*", "tab:green", 14, "default (gated), n = 300"),
    "other": ("o", "tab:blue", 4, "other gated variants (docs/local.md)"),
}


def _short(series: str) -> str:
    return series.removeprefix("FiNE, ").removeprefix("default, with fluency").strip() or "default"


def plot(pts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models = [m for m in ("smollm2-135m", "gemma3-270m") if any(p["model"] == m for p in pts)]
    fig, axes = plt.subplots(
        len(models), len(PANELS), figsize=(6.5 * len(PANELS), 5.2 * len(models)), squeeze=False
    )
    for row, model in enumerate(models):
        for ax, (_, _, _, panel) in zip(axes[row], PANELS, strict=True):
            here = [p for p in pts if p["panel"] == panel and p["model"] == model]
            ax.axvspan(LOCALITY_TARGET, 101, color="tab:green", alpha=0.07)
            ax.axhline(EDIT_TARGET, color="tab:green", linewidth=0.8, linestyle="--")
            ax.axvline(LOCALITY_TARGET, color="tab:green", linewidth=0.8, linestyle="--")
            sweep = sorted(
                (p for p in here if category(p["series"]) == "sweep"), key=lambda p: p["label"]
            )
            if sweep:
                xs = [p["locality"]["mean"] for p in sweep]
                ys = [p["edit"]["mean"] for p in sweep]
                ax.plot(xs, ys, "-o", color="tab:red", markersize=3, alpha=0.7)
                for p, x, y in zip(sweep, xs, ys, strict=True):
                    ax.annotate(
                        p["label"], (x, y), fontsize=7, xytext=(4, -9), textcoords="offset points"
                    )
            # "other" first, so the named runs are drawn on top
            labelled = []
            for p in sorted(here, key=lambda p: category(p["series"]) != "other"):
                cat = category(p["series"])
                if cat == "sweep":
                    continue
                marker, colour, size, _ = STYLE[cat]
                x, y = p["locality"], p["edit"]
                ax.errorbar(
                    x["mean"],
                    y["mean"],
                    xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                    yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]],
                    fmt=marker,
                    color=colour,
                    markersize=size,
                    alpha=0.35 if cat == "other" else 0.9,
                    elinewidth=0.6 if cat == "other" else 1.0,
                    capsize=0 if cat == "other" else 2,
                )
                if cat in ("ablation", "kne", "default"):
                    labelled.append((x["mean"], y["mean"], _short(p["series"]), cat))
            # many runs sit at Edit 100: stagger their labels above and below, left to right
            offsets = ((4, 6), (4, -12), (4, 16), (4, -22))
            for i, (x, y, text, cat) in enumerate(sorted(labelled)):
                ax.annotate(
                    text,
                    (x, y),
                    fontsize=7,
                    xytext=offsets[i % len(offsets)],
                    textcoords="offset points",
                    color={"ablation": "dimgray"}.get(cat, STYLE[cat][1]),
                    arrowprops=dict(arrowstyle="-", color="lightgray", linewidth=0.5),
                )
            ax.set_xlim(0, 101)
            ax.set_ylim(0, 110)
            ax.set_yticks(range(0, 101, 20))
            ax.set_xlabel(f"{panel}, post-edit (%)")
            ax.set_ylabel("Edit Succ (%)")
            ax.set_title(f"{model}: {panel}", fontsize=10)
    handles = [
        Line2D(
            [], [], color="tab:red", marker="o", markersize=3, label="plain FiNE, lr sweep (n = 30)"
        )
    ] + [
        Line2D([], [], linestyle="", marker=m, color=c, markersize=min(s, 9), label=label)
        for m, c, s, label in STYLE.values()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(
        "Edit success against locality, 95 % CIs (target: the shaded corner, "
        f"Edit >= {EDIT_TARGET:g} and locality >= {LOCALITY_TARGET:g})"
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=120)


def main() -> None:
    pts = points()
    (RESULTS / "frontier.json").write_text(json.dumps(pts, indent=1) + "\n")
    write_markdown(pts, RESULTS / "frontier.md")
    plot(pts, RESULTS / "frontier.png")
    print(f"{len(pts)} points, {sum(map(meets, pts))} meet the target")


if __name__ == "__main__":
    main()
