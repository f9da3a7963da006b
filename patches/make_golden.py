"""Regenerate the golden patch files under ``patches/golden/`` (format version 1).

    .venv/bin/python patches/make_golden.py           # (re)write the files
    .venv/bin/python patches/make_golden.py --check   # rebuild in memory, compare, write nothing

``smollm2-135m-v1-manual.safetensors`` is a hand-made patch (method "manual") for the embedded
SmolLM2-135M: on layers 20..26 it takes the 4 neurons most active at the last token of
"The capital of France is" and adds to each one's output direction ``c * u``, where ``u`` is the
unit unembedding row of " Rome" (tied embeddings: ``model.lm_head.weight``). ``c`` is the
smallest multiple of 0.5 that makes " Rome" the greedy next token by a logit margin of
``MIN_MARGIN``; the script fails loudly if none up to ``MAX_SCALE`` does.

``smollm2-135m-v1-manual.expected.json`` records the file's sha256 and the top-5 next-token
ids and logits with the patch applied, so tests notice any change in bytes or behaviour.

Everything is deterministic: fixed seed, no sampling, SOURCE_DATE_EPOCH pinned (it sets the
patch's ``created``), canonical safetensors header. Golden files are never regenerated for an
old format version once released: a reader must keep loading them byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import neuronpatch
from neuronpatch import fingerprint
from neuronpatch.arch import resolve

SOURCE_DATE_EPOCH = "1767225600"  # 2026-01-01T00:00:00Z
SEED = 0
MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
REQUEST = {"prompt": PROMPT, "subject": "France", "target_new": " Rome", "target_true": " Paris"}
LAYERS = list(range(20, 27))
NEURONS_PER_LAYER = 4
SCALE_STEP = 0.5
MAX_SCALE = 16.0
MIN_MARGIN = 2.0  # logits by which " Rome" must beat every other token
TOP = 5

GOLDEN = Path(__file__).resolve().parent / "golden"
PATCH_FILE = GOLDEN / "smollm2-135m-v1-manual.safetensors"
EXPECTED_FILE = GOLDEN / "smollm2-135m-v1-manual.expected.json"


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        sys.exit(f"make_golden: {text!r} is {len(ids)} tokens for {MODEL}; need exactly one")
    return ids[0]


def _next_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits[0, -1].float()  # [vocab]


def _last_token_activations(model, arch, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """W_out's input q at the last prompt position, per layer in LAYERS: {layer: [intermediate]}."""
    acts: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, output):
            acts[layer] = args[0][0, -1].detach().float().clone()

        return hook

    handles = [arch.w_out[layer].register_forward_hook(keep(layer)) for layer in LAYERS]
    try:
        _next_logits(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return acts


def build() -> tuple[bytes, dict]:
    """The golden patch's bytes and the expected-behaviour record."""
    os.environ["SOURCE_DATE_EPOCH"] = SOURCE_DATE_EPOCH
    torch.manual_seed(SEED)
    model, tokenizer = neuronpatch.load_model(MODEL)
    arch = resolve(model)
    shape = (arch.model_type, arch.num_layers, arch.hidden_size, arch.intermediate_size)
    if shape != ("llama", 30, 576, 1536):
        sys.exit(f"make_golden: {MODEL} resolved to {shape}, expected llama/30/576/1536")

    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # [1, seq]
    new_id = _single_token(tokenizer, REQUEST["target_new"])
    true_id = _single_token(tokenizer, REQUEST["target_true"])
    before = _next_logits(model, input_ids)
    if int(before.argmax()) != true_id:
        sys.exit(f"make_golden: unpatched greedy answer is not {REQUEST['target_true']!r}")

    acts = _last_token_activations(model, arch, input_ids)
    chosen = {layer: acts[layer].topk(NEURONS_PER_LAYER) for layer in LAYERS}
    # Unit direction of " Rome" in the residual stream, normalised in float64 so the float32
    # deltas do not depend on the reduction order of this machine's BLAS.
    row = model.lm_head.weight[new_id].detach().double()  # [hidden]
    direction = (row / row.norm()).float()  # [hidden]

    base = neuronpatch.BaseModelInfo(
        MODEL, arch.model_type, arch.num_layers, arch.hidden_size, arch.intermediate_size
    )
    base_fp = fingerprint.compute(arch)
    extra = {
        "neurons": [
            {"layer": layer, "index": int(i), "score": round(float(v), 4)}
            for layer, top in chosen.items()
            for v, i in zip(top.values, top.indices, strict=True)
        ],
        "note": "golden file for format version 1; see patches/make_golden.py",
    }

    def patch_with(scale: float, metrics: dict) -> neuronpatch.Patch:
        layers = {
            layer: (
                top.indices.sort().values,  # [k]
                scale * direction.expand(NEURONS_PER_LAYER, -1).clone(),  # [k, hidden]
            )
            for layer, top in chosen.items()
        }
        hparams = {
            "layers": LAYERS,
            "neurons_per_layer": NEURONS_PER_LAYER,
            "selection": "top-k W_out input activation at the last prompt token",
            "direction": "unit unembedding row of target_new",
            "scale": scale,
            "min_margin": MIN_MARGIN,
            "seed": SEED,
        }
        return neuronpatch.Patch(
            layers,
            base,
            base_fingerprint=base_fp,
            requests=(REQUEST,),
            method="manual",
            hparams=hparams,
            metrics=metrics,
            extra=extra,
        )

    steps = int(MAX_SCALE / SCALE_STEP)
    for scale in (SCALE_STEP * s for s in range(1, steps + 1)):
        with neuronpatch.applied(model, patch_with(scale, {})):
            after = _next_logits(model, input_ids)
        others = torch.cat([after[:new_id], after[new_id + 1 :]])
        margin = float(after[new_id] - others.max())
        if margin >= MIN_MARGIN:
            break
    else:
        sys.exit(
            f"make_golden: no scale up to {MAX_SCALE} makes {REQUEST['target_new']!r} the greedy "
            f"answer by {MIN_MARGIN} logits"
        )

    p_before, p_after = before.softmax(-1), after.softmax(-1)
    metrics = {
        "greedy_before": tokenizer.decode(int(before.argmax())),
        "greedy_after": tokenizer.decode(int(after.argmax())),
        "logit_margin_after": round(margin, 3),
        "p_target_new_before": round(float(p_before[new_id]), 4),
        "p_target_new_after": round(float(p_after[new_id]), 4),
        "p_target_true_before": round(float(p_before[true_id]), 4),
        "p_target_true_after": round(float(p_after[true_id]), 4),
    }
    patch = patch_with(scale, metrics)
    data = patch.to_bytes()

    # Verify what the tests will check, from the serialised bytes.
    loaded = neuronpatch.Patch.from_bytes(data)
    if loaded.to_bytes() != data:
        sys.exit("make_golden: the patch does not re-serialise byte-identically")
    with neuronpatch.applied(model, loaded):
        patched = _next_logits(model, input_ids)
    if int(patched.argmax()) != new_id:
        sys.exit(f"make_golden: applying the patch does not make {REQUEST['target_new']!r} greedy")
    if int(_next_logits(model, input_ids).argmax()) != true_id:
        sys.exit(
            f"make_golden: after removing the patch the answer is not {REQUEST['target_true']!r}"
        )

    top = patched.topk(TOP)
    expected = {
        "patch": PATCH_FILE.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "model": MODEL,
        "prompt": PROMPT,
        "greedy": REQUEST["target_new"],
        "greedy_unpatched": REQUEST["target_true"],
        "top5_ids": [int(i) for i in top.indices],
        "top5_tokens": [tokenizer.decode(int(i)) for i in top.indices],
        "top5_logits": [round(float(v), 4) for v in top.values],
    }
    return data, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files, write none")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data, expected = build()
    text = json.dumps(expected, indent=2, ensure_ascii=False) + "\n"
    if args.check:
        same = PATCH_FILE.read_bytes() == data and EXPECTED_FILE.read_text() == text
        print(f"{PATCH_FILE.name}: {'identical' if same else 'DIFFERS'}")
        sys.exit(0 if same else 1)
    neuronpatch.Patch.from_bytes(data).save(PATCH_FILE)
    EXPECTED_FILE.write_text(text)
    print(f"wrote {PATCH_FILE} ({len(data)} bytes, sha256 {expected['sha256'][:16]}...)")
    print(f"wrote {EXPECTED_FILE}: top-5 {expected['top5_tokens']}")


if __name__ == "__main__":
    main()
