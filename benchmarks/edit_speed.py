"""Seconds per edit on this machine: locate + optimise, steps, parameters, peak memory.

Runs the first ``--n`` records of CounterFact and WikiData_counterfact through
``neuronpatch.edit`` (each against the unedited model), alone on the machine with every core
torch sees, and writes ``results/edit_speed.{json,md,png}``. Batch size 1 edits one request
per call; a larger one edits the whole list in one call with that many optimised together
(``edit(..., batch_size=B)``), and an edit's seconds are then its own preparation plus its
share of each batched step it took part in.

    python benchmarks/edit_speed.py --n 30 --methods local fine --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import neuronpatch
from neuronpatch.datasets import load_records
from neuronpatch.editor import edit_each, make_hparams
from neuronpatch.models import load_model

HERE = Path(__file__).resolve().parent
DATA = {
    "counterfact": "easyedit_counterfact_counterfact-val.json",
    "wiki_cf": "knowedit_wiki_counterfact_train_cf.json",
}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(model, tokenizer, records, method: str) -> list[dict]:
    rows = []
    for record in records:
        started = time.perf_counter()
        patch = neuronpatch.edit(model, tokenizer, record.request, method=method)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "id": record.record_id,
                "seconds": seconds,
                "steps": patch.metrics["steps"],
                "success": bool(patch.metrics["success"]),
                "params": patch.num_params,
                "layers": sorted(patch.layers),
            }
        )
    return rows


def measure_batched(model, tokenizer, records, method: str, batch_size: int) -> list[dict]:
    hp = make_hparams(method)
    outcomes = edit_each(
        model, tokenizer, [r.request for r in records], method, hp, batch_size=batch_size
    )
    rows = []
    for record, outcome in zip(records, outcomes, strict=True):
        patch = outcome.patch
        rows.append(
            {
                "id": record.record_id,
                "seconds": outcome.seconds,
                "steps": patch.metrics["steps"],
                "success": bool(patch.metrics["success"]),
                "params": patch.num_params,
                "layers": sorted(patch.layers),
            }
        )
    return rows


def summarise(rows: list[dict], wall: float) -> dict:
    seconds = [r["seconds"] for r in rows]
    return {
        "n": len(rows),
        "wall_s_per_edit": wall / len(rows),
        "median_s": statistics.median(seconds),
        "p90_s": sorted(seconds)[int(0.9 * (len(seconds) - 1))],
        "mean_steps": statistics.fmean(r["steps"] for r in rows),
        "success": 100 * statistics.fmean(r["success"] for r in rows),
        "median_params": statistics.median(r["params"] for r in rows),
        "s_per_step": sum(seconds) / max(1, sum(r["steps"] for r in rows)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=["local"])
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, default=[1], help="edits optimised together"
    )
    parser.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "edit_speed")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    warm = load_records(args.data_dir / DATA["counterfact"], n=1)
    neuronpatch.edit(model, tokenizer, warm[0].request)  # first-call allocations off the clock
    results = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": {},
    }
    for method in args.methods:
        for name, file in DATA.items():
            records = load_records(args.data_dir / file, n=args.n)
            for size in args.batch_sizes:
                started = time.perf_counter()
                if size == 1:
                    rows = measure(model, tokenizer, records, method)
                else:
                    rows = measure_batched(model, tokenizer, records, method, size)
                wall = time.perf_counter() - started
                key = f"{method}/{name}/{size}"
                results["runs"][key] = {"summary": summarise(rows, wall), "edits": rows}
                print(key, json.dumps(results["runs"][key]["summary"]), flush=True)
    results["peak_mib"] = _peak_mib()
    write(results, args.out)


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"# Seconds per edit ({results['model']}, CPU, {results['threads']} threads, alone)",
        "",
        "Each edit is locate + optimise against the unedited model, default hyperparameters; "
        f"peak resident memory of the whole process (model included): "
        f"{results['peak_mib']:.0f} MiB. Target: median <= 2 s per edit. Batch: edits "
        "optimised together (`edit(requests, batch_size=B)`); an edit's seconds are then its "
        "own preparation plus its share of each batched step; wall s/edit is the whole "
        "list's time over its length. s/step: seconds per edit over its steps.",
        "",
        "| method | data | batch | n | median s | wall s/edit | p90 s | s/step | mean steps "
        "| success % | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, run in results["runs"].items():
        s = run["summary"]
        method, data, size = (key.split("/") + ["1"])[:3]  # keys before batching had no size
        wall = s.get("wall_s_per_edit")
        lines.append(
            f"| {method} | {data} | {size} | {s['n']} | {s['median_s']:.2f} | "
            f"{'—' if wall is None else f'{wall:.2f}'} | {s['p90_s']:.2f} | "
            f"{s['s_per_step']:.3f} | {s['mean_steps']:.1f} | {s['success']:.1f} | "
            f"{s['median_params']:,.0f} |"
        )
    lines += ["", f"![seconds against steps]({out.name}.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, run in results["runs"].items():
        edits = run["edits"]
        ax.scatter([e["steps"] for e in edits], [e["seconds"] for e in edits], label=key, s=14)
    ax.axhline(2.0, color="grey", linestyle="--", linewidth=1, label="2 s target")
    ax.set_xlabel("optimisation steps")
    ax.set_ylabel("seconds per edit")
    ax.set_title(f"Edit time on {results['model']} ({results['threads']} CPU threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
