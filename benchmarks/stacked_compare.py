"""Stacked edits, method against method: the FiNE paper's Figure 5 with every curve on one plot.

Collates what ``stacked_edits.py`` measured (nothing is rerun): for each run, Edit Succ, SAA
and RSA (post-edit, 95 % CI bands) against the number of edits stacked into one patch. Runs
whose JSON is missing are skipped. Writes ``results/stacked_edits_compare.{png,md,json}``.

    python benchmarks/stacked_compare.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = (  # (results file stem, label, colour)
    ("stacked_edits_calibrated", "default, stack-calibrated (batch --stack)", "tab:green"),
    ("stacked_edits_uncalibrated", "default, not stack-calibrated", "tab:olive"),
    ("stacked_edits_local", "earlier default (layer-1 subject gate, no span)", "tab:blue"),
    ("stacked_edits_fine", "plain FiNE (paper's method)", "black"),
)
METRICS = (
    ("edit_succ", "Edit Succ", 90.0),
    ("portability.Subject_Aliasing", "SAA", None),
    ("locality.Relation_Specificity", "RSA", 85.0),
)  # (key, label, target at 800 stacked edits)


def curves() -> list[dict]:
    """One entry per run found: its label, model, data and per-size post-edit stats."""
    out = []
    for stem, label, colour in RUNS:
        path = RESULTS / f"{stem}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        points = [
            {
                "size": p["size"],
                **{key: (p["metrics"].get(key) or {}).get("post") for key, _, _ in METRICS},
            }
            for p in result["points"]
        ]
        out.append(
            dict(
                stem=stem,
                label=label,
                colour=colour,
                model=result["config"]["model"],
                data=result["config"]["data"],
                points=points,
            )
        )
    return out


def write_markdown(runs: list[dict], path: Path) -> None:
    lines = [
        "# Stacked edits: methods compared",
        "",
        "Post-edit means x100 over every stacked fact (95 % CIs in each run's own file); "
        "size 1 = each edit applied alone. Collated from the `stacked_edits_*.json` files by "
        "`benchmarks/stacked_compare.py`. Targets at 800 stacked edits: Edit >= 90, RSA >= 85.",
        "",
        "| run | model, data | edits | " + " | ".join(label for _, label, _ in METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for run in runs:
        for p in run["points"]:
            cells = [f"{p[k]['mean']:.1f}" if p[k] else "—" for k, _, _ in METRICS]
            lines.append(
                f"| [{run['label']}]({run['stem']}.md) | {run['model']}, {run['data']} | "
                f"{p['size']} | " + " | ".join(cells) + " |"
            )
    lines += ["", "![stacked edits compared](stacked_edits_compare.png)", ""]
    path.write_text("\n".join(lines))


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.0 * len(METRICS), 4.4), sharey=True)
    sizes = sorted({p["size"] for run in runs for p in run["points"]})
    for ax, (key, label, target) in zip(axes, METRICS, strict=True):
        for run in runs:
            pts = [p for p in run["points"] if p[key]]
            xs = [p["size"] for p in pts]
            ax.plot(
                xs, [p[key]["mean"] for p in pts], "-o", color=run["colour"], label=run["label"]
            )
            ax.fill_between(
                xs,
                [p[key]["low"] for p in pts],
                [p[key]["high"] for p in pts],
                color=run["colour"],
                alpha=0.12,
            )
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--", linewidth=0.8)
            ax.annotate(
                f"target at 800: {target:g}", (sizes[0], target), fontsize=7, color="tab:red",
                xytext=(2, 3), textcoords="offset points",
            )  # fmt: skip
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_ylim(0, 103)
        ax.set_title(label)
        ax.set_xlabel("edits stacked into one patch (1 = each alone)")
    axes[0].set_ylabel("post-edit x100 (95 % CI)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    first = runs[0]
    fig.suptitle(f"Stacked edits on {first['model']}, {first['data']}")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    runs = curves()
    if not runs:
        raise SystemExit(f"no stacked_edits_*.json under {RESULTS}: run stacked_edits.py first")
    (RESULTS / "stacked_edits_compare.json").write_text(json.dumps(runs, indent=1) + "\n")
    write_markdown(runs, RESULTS / "stacked_edits_compare.md")
    plot(runs, RESULTS / "stacked_edits_compare.png")
    print(f"{len(runs)} runs: {', '.join(run['stem'] for run in runs)}")


if __name__ == "__main__":
    main()
