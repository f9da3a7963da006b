"""What an edit leaves behind after its answer: KL to the unedited model on what follows.

The default's query gate shuts after the answer (its span), yet the positions after it attend
to the edited ones. A perfectly local edit would continue the new answer as the unedited model
does, given it. Per record: the unedited model's seeded continuation of the prompt and the
new answer (the fluency reference's text), then, teacher-forced on that text, the KL from the
unedited to the edited model's next-token distribution at the answer's last position (where
the token after the answer is chosen) and averaged over the continuation. Unlike fluency, which
a single sample decides, this is a low-noise measure of the same leak, for choosing
``after_answer_kl``.

    python benchmarks/answer_leak.py --data ../shared/data/knowedit_zsre_ZsRE-test-all.json \\
        --n 96 --variant default= --variant "kl 10=after_answer_kl=10"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import neuronpatch
from neuronpatch.editor import edit_each, make_hparams
from neuronpatch.evaluate import FLUENCY_LENGTH
from neuronpatch.metrics import mean_ci, ngram_entropy, sample_texts

HERE = Path(__file__).resolve().parent
BATCH = 16


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _variant(spec: str) -> tuple[str, dict]:
    """'label=k=v,k=v' -> (label, {k: v})."""
    label, _, rest = spec.partition("=")
    pairs = [p for p in rest.split(",") if p]
    return label, {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}


@torch.no_grad()
def _kl(model, ids: torch.Tensor, start: int, base: torch.Tensor) -> list[float]:
    """KL(unedited || edited) at positions start.. of ``ids`` [1, S]; ``base`` unedited logp."""
    logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)  # [S, vocab]
    terms = (base.exp() * (base - logp)).sum(-1)  # [S]
    return terms[start:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="local")
    parser.add_argument(
        "--variant", action="append", required=True, help="'label=k=v,k=v' (hparams)"
    )
    parser.add_argument("--length", type=int, default=FLUENCY_LENGTH, help="tokens in all")
    parser.add_argument("--out", default="answer_leak")
    args = parser.parse_args()

    model, tok = neuronpatch.load_model(args.model)
    model.eval()
    records = neuronpatch.load_records(args.data)[: args.n]
    requests = [r.request for r in records]
    given = [f"{q.prompt} {q.target_new.strip()}" for q in requests]
    texts: list[str] = []
    for start in tqdm(range(0, len(given), BATCH), "reference", unit="batch"):
        texts += sample_texts(model, tok, given[start : start + BATCH], 0, args.length)
    cases = []  # (ids [1, S], first position after the answer - 1, unedited logp [S, vocab])
    for text, head in zip(texts, given, strict=True):
        ids = tok(text, return_tensors="pt").input_ids
        answer = tok(head, return_tensors="pt").input_ids
        if not torch.equal(ids[0, : answer.shape[1]], answer[0]):
            cases.append(None)  # the text tokenises the answer's end differently: skip
            continue
        with torch.no_grad():
            base = F.log_softmax(model(ids).logits[0].float(), dim=-1)
        cases.append((ids, answer.shape[1] - 1, base))

    rows = {}
    for spec in args.variant:
        label, overrides = _variant(spec)
        hp = make_hparams(args.method, None, **overrides)
        first, rest, success, forced = [], [], [], []
        for start in tqdm(range(0, len(requests), BATCH), label, unit="batch"):
            part = requests[start : start + BATCH]
            outcomes = edit_each(model, tok, part, args.method, hp, batch_size=8)
            patches = [o.patch for o in outcomes]
            for i, patch in enumerate(patches):
                case = cases[start + i]
                success.append(bool(patch.metrics.get("success")))
                if case is None:
                    continue
                ids, at, base = case
                with neuronpatch.applied(model, patch):
                    kl = _kl(model, ids, at, base)
                first.append(kl[0])
                rest.append(statistics.mean(kl[1:]) if len(kl) > 1 else 0.0)
            with neuronpatch.applied_per_row(model, patches):
                samples = sample_texts(
                    model, tok, given[start : start + BATCH], 0, args.length
                )  # the edited model given the new answer, as the reference is
            forced += [100 * ngram_entropy(s) for s in samples]
        rows[label] = {
            "hparams": overrides,
            "success": 100 * sum(success) / len(success),
            "kl_after_answer": mean_ci(first),
            "kl_continuation": mean_ci(rest),
            "fluency_given_answer": mean_ci(forced),
        }
    reference = [100 * ngram_entropy(t) for t in texts]
    summary = {
        "model": args.model,
        "data": args.data.name,
        "n": len(requests),
        "scored": sum(c is not None for c in cases),
        "reference_fluency": mean_ci(reference),
        "rows": rows,
    }
    out = HERE / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# What an edit leaves after its answer, {args.model}, {args.data.name}, "
        f"n = {summary['n']} ({summary['scored']} scored)",
        "",
        "KL (nats) from the unedited to the edited model, teacher-forced on the unedited "
        "model's seeded continuation of the prompt and the new answer: at the answer's last "
        "position (the token after the answer) and averaged over the continuation; fluency of "
        "the edited model sampling from that same prompt and answer (reference: the unedited "
        f"model, {summary['reference_fluency'][0]:.1f}). `benchmarks/answer_leak.py` says how.",
        "",
        "| variant | hparams | success % | KL after the answer | KL on the continuation | "
        "fluency given the answer |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        cells = [
            f"{row[k][0]:.3f} [{row[k][1]:.3f}, {row[k][2]:.3f}]"
            for k in ("kl_after_answer", "kl_continuation")
        ]
        fl = row["fluency_given_answer"]
        lines.append(
            f"| {label} | {row['hparams'] or 'defaults'} | {row['success']:.1f} | "
            + " | ".join(cells)
            + f" | {fl[0]:.1f} [{fl[1]:.1f}, {fl[2]:.1f}] |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
