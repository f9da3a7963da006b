"""Which gate of the default chain shuts which prompts, and what two of its settings change.

Gate-only, on the unedited model: for each record, the default method's gates are built as an
edit builds them (``local.make_gates`` with ``LocalHparams()`` resolved for the model, so the
calibrated thresholds are the ones a patch would store), and each evaluation prompt is checked
at its last position with the runtime's arithmetic (``gates.GateBank``): a subject gate is
open there if any position matched, a query gate if one of the last ``span`` positions did.
Reported per setting: % of prompts where the chain is **open** on subject-alias (SAA), ZsRE
rephrase / CounterFact paraphrase prompts, and **shut** on relation-specificity (RSA),
forgetfulness (FA), ZsRE locality and CounterFact neighbourhood prompts; and for the default,
which gate shuts the alias and paraphrase prompts that stay shut. Settings: the default; the
calibrated subject threshold's margin (``subject_margin``) at 0 and 0.02 (``--margins`` for
others); the calibrated query threshold's cap (``query_cap``) at 0.92 and its floor
(``query_floor``) at 0.75 (models whose default calibrates the query threshold).

    python benchmarks/gate_chain.py --model smollm2-135m --start 0 --stop 300
    python benchmarks/gate_chain.py --model smollm2-135m --start 300 --stop 500 --datasets wiki_cf
    python benchmarks/gate_chain.py --model gemma3-270m --hparam subject_layer=6   # a variant

Per-record cosines go to ``--work`` (JSONL per dataset, resumable); the summary to ``--out``
.json / .md (default ``benchmarks/results/gate_chain_MODEL_START-STOP``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

import neuronpatch
from neuronpatch.arch import resolve
from neuronpatch.cli import _parse_hparams
from neuronpatch.gates import GateBank
from neuronpatch.local import (
    CALIBRATED,
    CALIBRATION_MARGIN,
    LocalHparams,
    calibrated_threshold,
    make_gates,
    negative_prompts,
    peak_cosines,
    shared_centres,
    vocabulary_neighbours,
)

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
FILES = {
    "wiki_cf": "knowedit_wiki_counterfact_train_cf.json",
    "zsre": "knowedit_zsre_ZsRE-test-all.json",
    "counterfact": "easyedit_counterfact_counterfact-val.json",
}
# (group, KnowEdit section, should the chain open?)
GROUPS = (
    ("SAA", "Subject_Aliasing", True),
    ("rephrase", "rephrase", True),
    ("RSA", "Relation_Specificity", False),
    ("FA", "Forgetfulness", False),
    ("neighbour", "Neighborhood", False),
)
MARGINS = (0.0, 0.02)
# the settings whose "auto" value depends on the model (``local.MEASURED``)
RESOLVED = ("gate_threshold", "gate_layer", "wording_layer", "strict_margin")


@torch.no_grad()
def measure(
    model, tokenizer, record, hp: LocalHparams, margins: tuple[float, ...] = MARGINS
) -> dict:
    """The chain's thresholds (and the alternatives) and each prompt's cosine per gate."""
    request = record.request
    gates = make_gates(model, tokenizer, request, hp)
    row: dict = {
        "kinds": [g.kind for g in gates],
        "layers": [g.layer for g in gates],
        "thresholds": [g.threshold for g in gates],
        "requires": [g.requires for g in gates],
        "any_of": [list(g.any_of) for g in gates],
    }
    subject = next(
        (i for i, g in enumerate(gates) if g.kind == "subject" and g.layer == hp.subject_layer),
        None,
    )
    if subject is not None and hp.subject_threshold == CALIBRATED:
        near = vocabulary_neighbours(model, tokenizer, request, hp.calibration_neighbours)
        row["subject_thresholds"] = {
            str(m): calibrated_threshold(model, tokenizer, request, gates[subject], near, m)
            for m in margins
        }
    query = max(range(len(gates)), key=lambda i: gates[i].layer)  # the middle-layer gate
    negatives = negative_prompts(request, hp.negative_templates)
    if hp.gate_threshold == CALIBRATED and negatives:
        row["query_highest"] = (
            peak_cosines(model, tokenizer, [gates[query]], negatives).max().item()
        )
    sections = prompt_sections(record)
    row["cosines"] = {}
    for group, section, _ in GROUPS:
        prompts = sections.get(section, [])
        row["cosines"][group] = [_last_cosines(model, tokenizer, gates, p) for p in prompts]
    return row


def prompt_sections(record) -> dict[str, list[str]]:
    """The record's evaluation prompts by KnowEdit section (``rephrase`` and each portability
    and locality key)."""
    sections = {"rephrase": list(record.rephrase)}
    for key, pairs in {**record.portability, **record.locality}.items():
        sections[key] = [p for p, _ in pairs]
    return sections


def _last_cosines(model, tokenizer, gates, prompt: str) -> list[float]:
    """Per gate, the highest cosine among the positions that keep it open at the last one."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    out = []
    for gate in gates:
        cos = GateBank([gate], torch.device("cpu")).cosine(states[gate.layer + 1].float())
        reach = cos.shape[1] if gate.span is None else int(gate.span)
        out.append(cos[0, -reach:, 0].max().item())
    return out


def settings(rows: list[dict], hp: LocalHparams) -> dict[str, list[list[float]]]:
    """Per setting, each record's thresholds (``hp``: the run's, for the bound not varied)."""
    out: dict[str, list[list[float]]] = {"default": [r["thresholds"] for r in rows]}
    escaped = any(any(alts) for r in rows for alts in r.get("any_of", []))
    if all("subject_thresholds" in r for r in rows) and not escaped:
        common = set.intersection(*(set(r["subject_thresholds"]) for r in rows))
        for m in sorted(common, key=float):  # the margins every record was measured at
            out[f"subject_margin={float(m)}"] = [
                [
                    r["subject_thresholds"][m] if k == "subject" else t
                    for k, t in zip(r["kinds"], r["thresholds"], strict=True)
                ]
                for r in rows
            ]
    if any("query_highest" in r for r in rows):
        out["query_cap=0.92"] = [_calibrated(r, hp.query_floor, 0.92) for r in rows]
        out["query_floor=0.75"] = [_calibrated(r, 0.75, hp.query_cap) for r in rows]
    return out


def chain_open(row: dict, cosines: list[float], thresholds: list[float]) -> bool:
    """Whether the patch's last gate is open at a prompt's last position, each gate open where
    its own cosine clears its threshold or one of its ``any_of`` is open, and its ``requires``
    is open (rows measured before alternatives existed: a plain chain, each gate requiring the
    one before)."""
    n = len(thresholds)
    requires = row.get("requires", [None, *range(n - 1)])
    alternatives = row.get("any_of", [[] for _ in range(n)])
    opened: list[bool] = []
    for c, t, r, alts in zip(cosines, thresholds, requires, alternatives, strict=True):
        now = c > t or any(opened[a] for a in alts)
        opened.append(now and (r is None or opened[r]))
    return opened[-1]


def _calibrated(row: dict, floor: float, cap: float) -> list[float]:
    """The chain's thresholds with the calibrated query threshold kept within [floor, cap]."""
    thresholds = list(row["thresholds"])
    if "query_highest" in row:  # the middle-layer query gate is the chain's last
        highest = row["query_highest"] + CALIBRATION_MARGIN
        thresholds[-1] = min(max(highest, floor), cap)
    return thresholds


def summarise(rows: list[dict], hp: LocalHparams) -> dict:
    out = {}
    for name, per_record in settings(rows, hp).items():
        cells = {}
        for group, _, should_open in GROUPS:
            opened = [
                chain_open(row, cos, thresholds)
                for row, thresholds in zip(rows, per_record, strict=True)
                for cos in row["cosines"][group]
            ]
            if opened:
                share = sum(opened) / len(opened) if should_open else 1 - sum(opened) / len(opened)
                cells[group] = {"percent": 100 * share, "n": len(opened)}
        out[name] = cells
    for group in ("SAA", "rephrase"):
        blocked: dict[str, int] = {}
        for row in rows:
            names = [f"{k}@{n}" for k, n in zip(row["kinds"], row["layers"], strict=True)]
            alternatives = row.get("any_of", [[] for _ in names])
            escapes = {a for alts in alternatives for a in alts}  # word gates: never the cause
            for cos in row["cosines"][group]:
                passed = [c > t for c, t in zip(cos, row["thresholds"], strict=True)]
                shut = [
                    name
                    for i, name in enumerate(names)
                    if i not in escapes
                    and not (passed[i] or any(passed[a] for a in alternatives[i]))
                ]
                if shut:
                    key = " + ".join(shut)
                    blocked[key] = blocked.get(key, 0) + 1
        out["default"][f"{group} shut by"] = blocked
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=300)
    parser.add_argument("--datasets", nargs="+", choices=list(FILES), default=list(FILES))
    parser.add_argument(
        "--margins",
        type=float,
        nargs="+",
        default=list(MARGINS),
        help="subject margins to compare with the default (default: 0 0.02)",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/gate_chain"))
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--hparam", action="append", default=[], metavar="K=V", help="LocalHparams override"
    )
    args = parser.parse_args()
    overrides = _parse_hparams(args.hparam)
    model, tokenizer = neuronpatch.load_model(args.model)
    model.eval()
    hp = LocalHparams(**overrides).for_model(resolve(model))
    tag = f"{args.model.split('-')[0]}_{args.start}-{args.stop}"
    tag += "".join(f"_{k}{v}" for k, v in overrides.items())
    summary: dict = {
        "model": args.model,
        "records": [args.start, args.stop],
        "hparams": overrides,
        # what the model's "auto" settings meant when these rows were measured
        "resolved": {k: getattr(hp, k) for k in RESOLVED},
        "datasets": {},
    }
    for dataset in args.datasets:
        records = neuronpatch.load_records(DATA / FILES[dataset], n=args.stop)[args.start :]
        rows = measured_rows(
            cache_path(args.work, tag, dataset, hp),
            records,
            lambda r: measure(model, tokenizer, r, hp, tuple(args.margins)),
        )
        summary["datasets"][dataset] = summarise(rows, hp)
    out = args.out or HERE / "results" / f"gate_chain_{tag}"
    write(keep_other_datasets(summary, _with(out, ".json")), out)


def cache_path(work: Path, tag: str, dataset: str, hp: LocalHparams) -> Path:
    """Where the rows of ``dataset`` go: named by the run's tag and a digest of the resolved
    hyperparameters, so rows measured under an earlier default are never reused as today's."""
    digest = hashlib.sha1(json.dumps(asdict(hp), sort_keys=True).encode()).hexdigest()[:8]
    return work / f"{tag}_{dataset}_{digest}.jsonl"


def keep_other_datasets(summary: dict, path: Path) -> dict:
    """``summary`` with the datasets an earlier run of the same setting wrote to ``path`` and
    this one did not measure (a run on one dataset does not erase the others')."""
    if not path.exists():
        return summary
    old = json.loads(path.read_text())
    same = all(old.get(k) == summary[k] for k in ("model", "records", "hparams", "resolved"))
    if not same:
        return summary
    return {**summary, "datasets": {**old["datasets"], **summary["datasets"]}}


def measured_rows(path: Path, records: list, measure_one: Callable[[object], dict]) -> list[dict]:
    """``measure_one`` of each record, appended to the JSONL file ``path`` as it goes (a rerun
    resumes after the rows already there), then every row of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = path.read_text().splitlines() if path.exists() else []
    with shared_centres(), path.open("a") as f:
        for record in records[len(done) :]:
            f.write(json.dumps(measure_one(record)) + "\n")
            f.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


def _with(out: Path, suffix: str) -> Path:
    """``out`` with ``suffix`` added (not replacing a "suffix" such as the ".9" of
    "gate_threshold0.9")."""
    return out.parent / (out.name + suffix)


def write(summary: dict, out: Path) -> None:
    _with(out, ".json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# The default gate chain on {summary['model']}, records "
        f"{summary['records'][0]}-{summary['records'][1] - 1} (gate-only)"
        + "".join(f", {k}={v}" for k, v in summary.get("hparams", {}).items()),
        "",
        "Resolved for the model: "
        + ", ".join(f"`{k}={v}`" for k, v in summary.get("resolved", {}).items())
        + ".",
        "",
        "% of prompts where the chain does what it should: **open** on SAA and rephrase/"
        "paraphrase prompts, **shut** on RSA, FA and neighbourhood prompts (ZsRE's locality "
        "prompts are its RSA). `benchmarks/gate_chain.py` says how.",
        "",
        "| data | setting | SAA open | rephrase open | RSA shut | FA shut | neighbour shut |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, by_setting in summary["datasets"].items():
        for name, cells in by_setting.items():
            row = [
                f"{cells[g]['percent']:.1f} (n={cells[g]['n']})" if g in cells else ""
                for g, _, _ in GROUPS
            ]
            lines.append(f"| {dataset} | {name} | " + " | ".join(row) + " |")
    for group, what in (("SAA", "Alias"), ("rephrase", "Rephrase / paraphrase")):
        lines += ["", f"{what} prompts the default keeps shut, by the gate(s) that shut them:", ""]
        for dataset, by_setting in summary["datasets"].items():
            blocked = by_setting["default"].get(f"{group} shut by")
            lines.append(f"- {dataset}: {blocked or 'none'}")
    _with(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
