"""Write the gated golden patches under ``patches/golden/`` (format versions 2 to 5).

    .venv/bin/python patches/make_golden_gated.py           # write the files
    .venv/bin/python patches/make_golden_gated.py --check   # rebuild in memory, compare (up to rounding)

Both are the version-1 golden patch (``smollm2-135m-v1-manual.safetensors``, read from disk)
with every row behind the ``"local"`` method's two gates for its request: a subject gate
(" France"'s residual after layer 1, threshold 0.75) and a query gate (the prompt's last
token after layer 15, threshold 0.9) that requires it. In ``-v2-gated`` the query gate stays
open to the end of the sequence; in ``-v3-gated`` it has a span of 1 (" Rome" is one token).
``-v4-gated`` adds a wording gate between them (the prompt's last token after layer 1,
threshold 0.88, span 1), which requires the subject gate of its own layer (version 4).
``-v5-gated`` puts the ``-v3-gated`` chain behind a word escape (``strict_margin=0.1``): a word
gate (" France" after layer 0), the subject gate calibrated on other subjects (lenient), a
strict copy of it 0.08 higher that is also open wherever the word gate is (``any_of``) and
requires the lenient one, then the query gate (version 5).

Each ``.expected.json`` records the file's sha256 and, with the patch applied, the top-5
next-token ids and logits after the prompt, after the prompt continued past the answer
(where the two versions differ: the v3 gate has closed), and the fact that another subject's
prompt keeps its unpatched logits; the v4 record also holds the top 5 after the question
asked inside a longer sentence (``CLAUSE``). Written once per format version, never
regenerated: a file that exists is only compared, never overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

import neuronpatch
from neuronpatch.local import LocalHparams, make_gates
from neuronpatch.patch import LayerDelta
from neuronpatch.request import EditRequest

GOLDEN = Path(__file__).resolve().parent / "golden"
SOURCE = GOLDEN / "smollm2-135m-v1-manual.safetensors"
CONTINUED = " Rome. It is known for"  # appended to the prompt: positions after the answer
OTHER = "The capital of Germany is"  # another subject: both gates stay shut
CLAUSE = "The capital of France, which is not Rome, is"  # the question inside a sentence
TOP = 5
KEY_TOL = 1e-4  # gate keys, centres and thresholds: float rounding across thread counts
LOGIT_TOL = 1e-3  # the recorded logits are rounded to 4 decimals


def _top(model, tokenizer, text: str) -> dict:
    ids = tokenizer(text, return_tensors="pt").input_ids  # [1, S]
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()  # [vocab]
    top = logits.topk(TOP)
    return {
        "text": text,
        "top5_ids": [int(i) for i in top.indices],
        "top5_tokens": [tokenizer.decode(int(i)) for i in top.indices],
        "top5_logits": [round(float(v), 4) for v in top.values],
    }


def build() -> dict[str, tuple[bytes, dict]]:
    """{file name: (bytes, expected record)} for the v2, v3 and v4 gated golden patches."""
    model, tokenizer = neuronpatch.load_model("smollm2-135m")
    source = neuronpatch.Patch.load(SOURCE)
    request = EditRequest.coerce(source.requests[0])
    out = {}
    for version, span, wording in (("2", None, None), ("3", 1, None), ("4", 1, 1), ("5", 1, None)):
        # the default gates when these files were made: subject gate at layer 1, 0.75
        hp = LocalHparams(
            subject_layer=1,
            subject_threshold=0.75,
            gate_threshold=0.9,
            query_span=span,
            wording_layer=wording,
        )
        if version == "5":  # calibrated, with the word escape
            hp = replace(hp, subject_threshold="calibrated", strict_margin=0.1)
        gates = make_gates(model, tokenizer, request, hp)
        layers = {
            layer: LayerDelta(
                ld.neuron_indices, ld.deltas, torch.full_like(ld.neuron_indices, len(gates) - 1)
            )
            for layer, ld in source.layers.items()
        }
        patch = replace(
            source,
            layers=layers,
            gates=gates,
            extra={**source.extra, "note": f"golden file for format version {version}"},
            source=None,
        )
        data = patch.to_bytes()
        if neuronpatch.Patch.from_bytes(data).to_bytes() != data:
            sys.exit(f"make_golden_gated: v{version} does not re-serialise byte-identically")
        if f'"format_version":"{version}"'.encode() not in data[:8192]:
            sys.exit(f"make_golden_gated: the file is not format version {version}")
        unpatched = _top(model, tokenizer, OTHER)
        with neuronpatch.applied(model, neuronpatch.Patch.from_bytes(data)):
            prompt = _top(model, tokenizer, request.prompt)
            continued = _top(model, tokenizer, request.prompt + CONTINUED)
            other = _top(model, tokenizer, OTHER)
            clause = _top(model, tokenizer, CLAUSE) if wording is not None else None
        if prompt["top5_tokens"][0] != request.target_new:
            sys.exit(f"make_golden_gated: v{version} does not make {request.target_new!r} greedy")
        if other != unpatched:
            sys.exit(f"make_golden_gated: v{version} changes {OTHER!r}")
        name = f"smollm2-135m-v{version}-gated.safetensors"
        expected = {
            "patch": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "model": "smollm2-135m",
            "format_version": version,
            "query_span": span,
            "prompt": prompt,
            "continued": continued,
            "unchanged": OTHER,
        }
        if clause is not None:
            expected["wording_layer"] = wording
            expected["clause"] = clause
        out[name] = (data, expected)
    a, b = (
        out[f"smollm2-135m-v{v}-gated.safetensors"][1]["continued"]["top5_logits"] for v in "23"
    )
    if a == b:
        sys.exit("make_golden_gated: the span does not change the continuation; pick another")
    return out


def _compare(path: Path, data: bytes, stored: dict, rebuilt: dict) -> str | None:
    """None when a rebuild matches a stored file up to float rounding, else what differs.

    Gate keys and centres are sums over the hidden width, so another thread count or BLAS
    path rounds them differently (~1e-5); everything discrete must match exactly.
    """
    old, new = neuronpatch.Patch.load(path), neuronpatch.Patch.from_bytes(data)
    if len(old.gates) != len(new.gates) or old.layers.keys() != new.layers.keys():
        return "DIFFERS: other gates or layers"
    for i, (a, b) in enumerate(zip(old.gates, new.gates, strict=True)):
        for field in a.__dataclass_fields__:
            x, y = getattr(a, field), getattr(b, field)
            if isinstance(x, torch.Tensor):
                close = x.shape == y.shape and torch.allclose(x.float(), y.float(), atol=KEY_TOL)
            elif isinstance(x, float):
                close = abs(x - y) <= KEY_TOL
            else:
                close = x == y
            if not close:
                return f"DIFFERS: gate {i} {field}"
    for layer, ld in old.layers.items():
        other = new.layers[layer]
        if not (
            torch.equal(ld.neuron_indices, other.neuron_indices)
            and torch.equal(ld.deltas, other.deltas)
        ):
            return f"DIFFERS: layer {layer} rows"
    for key in ("prompt", "continued", "clause"):
        if key not in stored:
            continue
        a, b = stored[key], rebuilt[key]
        if a["top5_ids"] != b["top5_ids"]:
            return f"DIFFERS: the top 5 after {key!r}"
        if (
            max(abs(x - y) for x, y in zip(a["top5_logits"], b["top5_logits"], strict=True))
            > LOGIT_TOL
        ):
            return f"DIFFERS: the logits after {key!r}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files, write none")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    same = True
    for name, (data, expected) in build().items():
        path = GOLDEN / name
        record = path.with_suffix(".expected.json")
        text = json.dumps(expected, indent=2, ensure_ascii=False) + "\n"
        if args.check or path.exists():  # released files are compared, never rewritten
            if path.read_bytes() == data and record.read_text() == text:
                print(f"{name}: identical")
                continue
            problem = _compare(path, data, json.loads(record.read_text()), expected)
            print(f"{name}: {problem or 'equal within float tolerance (not byte-identical)'}")
            same &= problem is None
            continue
        neuronpatch.Patch.from_bytes(data).save(path)
        record.write_text(text)
        print(f"wrote {path} ({len(data)} bytes) and {record.name}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
