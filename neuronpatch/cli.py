"""The ``neuronpatch`` command line: edit, generate, inspect, demo, eval."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from . import batch, hub, peft_export, runtime, stacking
from .calibration import CALIBRATION_KEY
from .editor import DEFAULT_METHOD, METHODS, edit, make_hparams
from .errors import NeuronpatchError
from .evaluate import add_eval_subparser
from .models import DEFAULT_MODEL, load_model
from .patch import Patch


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


def _load(name: str, device: str | None = None):
    started = time.perf_counter()
    print(f"loading {name} ...", file=sys.stderr)
    model, tokenizer = load_model(name, device=device)
    where = f" on {device}" if device else ""
    print(f"loaded {name}{where} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return model, tokenizer


def _parse_hparams(pairs: Sequence[str]) -> dict:
    """``k=v`` strings to a dict, values parsed as JSON where they parse (numbers, bools, lists)."""
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--hparam expects key=value, got {pair!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def _run_edit(model, tokenizer, request: dict, method: str, hparams: dict):
    """Edit with a progress bar over optimisation steps; returns the patch."""
    hp = make_hparams(method, **hparams)
    bar = tqdm(total=hp.max_steps, desc="optimising", unit="step", leave=True)

    def progress(step: int, prob: float) -> None:
        bar.n = step
        bar.set_postfix_str(f"p(target)={prob:.3f}")

    try:
        patch = edit(model, tokenizer, request, method, hparams=hp, progress=progress)
    finally:
        bar.close()
    return patch


def _print_neurons(patch: Patch) -> None:
    neurons = patch.extra.get("neurons", [])
    print(f"located {len(neurons)} neurons (layer#index: score):")
    print("  " + ", ".join(f"L{n['layer']}#{n['index']}: {n['score']:.2f}" for n in neurons))


def _print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _short(text: str, width: int = 34) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


# --- commands --------------------------------------------------------------------------


def cmd_edit(args: argparse.Namespace) -> int:
    request = {"prompt": args.prompt, "subject": args.subject, "target_new": args.target}
    if args.target_true:
        request["target_true"] = args.target_true
    model, tokenizer = _load(args.model, args.device)
    before = _greedy(model, tokenizer, args.prompt)
    patch = _run_edit(model, tokenizer, request, args.method, _parse_hparams(args.hparam))
    _print_neurons(patch)
    with runtime.applied(model, patch):
        after = _greedy(model, tokenizer, args.prompt)
    path = patch.save(args.output)
    m = patch.metrics
    print(
        f"steps {m['steps']}, p(target) {m['target_prob']:.3f}, "
        f"{patch.num_params:,} parameters, {path.stat().st_size:,} bytes -> {path}"
    )
    print(f"before: {args.prompt}{before!r}")
    print(f"after:  {args.prompt}{after!r}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model)
    runtime.apply(model, *args.patch, force=args.force)
    print(args.prompt + _greedy(model, tokenizer, args.prompt, args.max_new_tokens))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import describe

    patch = Patch.load(args.patch)
    model = tokenizer = None
    if not args.no_model:
        name = args.model or patch.base.name_or_path
        try:
            model, tokenizer = _load(name)
        except NeuronpatchError as exc:
            print(f"(no token columns: {exc})", file=sys.stderr)
    info = describe(patch, model, tokenizer)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    base = patch.base
    print(f"patch {info['source']}  id {info['patch_id']}")
    print(f"  base     {base.describe()}")
    print(
        f"  method   {patch.method}  created {patch.created}  neuronpatch {patch.library_version}"
    )
    for r in patch.requests:
        true = f" (was {r['target_true']!r})" if r.get("target_true") else ""
        print(f"  edit     {r['prompt']!r} -> {r['target_new']!r}{true}")
    print(
        f"  size     {info['file_bytes']:,} bytes, {patch.num_params:,} parameters, "
        f"{patch.num_neurons} neurons in layers {info['layers']}"
    )
    calibration = patch.extra.get(CALIBRATION_KEY) or {}
    original = calibration.get("original_thresholds") or []
    for g, gate in enumerate(patch.gates):
        raised = g < len(original) and original[g] != gate.threshold
        print(
            f"  gate {g}   {gate.kind}: open "
            + (
                "from the first"
                if gate.span is None
                else f"for {gate.span} position{'s' * (gate.span != 1)} from each"
            )
            + f" position whose residual after layer {gate.layer} has cosine > {gate.threshold:.4f}"
            + " with the key"
            + (f", or wherever gate {' or '.join(map(str, gate.any_of))} is" if gate.any_of else "")
            + ("" if gate.requires is None else f", where gate {gate.requires} is open too")
            + (
                f" (raised from {original[g]:.4f} by stack calibration against "
                f"{calibration.get('edits')} edits)"
                if raised
                else ""
            )
        )
    if patch.metrics:
        print(f"  metrics  {json.dumps(patch.metrics)}")
    rows = []
    for n in info["neurons"]:
        score = "" if n["score"] is None else f"{n['score']:.3f}"
        rows.append(
            (
                f"{n['layer']}",
                f"{n['index']}",
                score,
                f"{n['delta_norm']:.4f}",
                " ".join(repr(t) for t in n.get("promotes", [])),
                " ".join(repr(t) for t in n.get("delta_promotes", [])),
            )
        )
    _print_table(rows, ("layer", "neuron", "score", "|delta|", "neuron promotes", "delta promotes"))
    return 0


DEMO_REQUEST = {
    "prompt": "The capital of France is",
    "subject": "France",
    "target_new": "Rome",
    "target_true": "Paris",
}
DEMO_PROMPTS = [
    ("edited prompt", "The capital of France is"),
    ("paraphrase", "France's capital city is"),
    ("neighbour (same relation)", "The capital of Germany is"),
    ("related subject", "The Eiffel Tower is located in the city of"),
    ("unrelated", "The currency of Japan is the"),
    ("unrelated", "The largest planet in the solar system is"),
]


def cmd_demo(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model, args.device)
    r = DEMO_REQUEST
    print(f"\nedit: {r['prompt']!r} -> {r['target_new']!r} (was {r['target_true']!r})")
    before = {p: _greedy(model, tokenizer, p) for _, p in DEMO_PROMPTS}
    patch = _run_edit(model, tokenizer, r, args.method, {})
    _print_neurons(patch)
    path = patch.save(args.output)
    print(
        f"saved {path}: {path.stat().st_size:,} bytes, {patch.num_params:,} parameters, "
        f"{patch.metrics['steps']} steps, {patch.metrics.get('wall_time_s', 0):.1f}s\n"
    )
    runtime.apply(model, path)
    during = {p: _greedy(model, tokenizer, p) for _, p in DEMO_PROMPTS}
    runtime.remove(model, path)
    after = {p: _greedy(model, tokenizer, p) for _, p in DEMO_PROMPTS}
    rows = [
        (kind, _short(p, 44), _short(before[p]), _short(during[p]), _short(after[p]))
        for kind, p in DEMO_PROMPTS
    ]
    _print_table(rows, ("", "prompt", "before", "with patch", "after remove"))
    restored = all(before[p] == after[p] for _, p in DEMO_PROMPTS)
    print(f"\nafter remove, every completion is the original again: {restored}")
    return 0 if restored else 1


# --- parser ----------------------------------------------------------------------------


def _add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", help="where the model runs: cpu, cuda, cuda:1, mps ... (default: cpu)"
    )


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --method and --hparam: shared by every command that edits (edit, eval, batch)."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded name, folder or Hub id (default {DEFAULT_MODEL})",
    )
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
    _add_device_argument(p)
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="K=V",
        help="override a hyperparameter, e.g. --hparam lr=0.002 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronpatch",
        description="Edit one fact of a language model at a time, as a small reversible patch.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "edit",
        help="edit a fact and save the patch",
        description="Locate the neurons for a fact, learn their deltas, save a patch.",
    )
    p.add_argument("--prompt", required=True, help="prompt that should continue with the target")
    p.add_argument("--subject", required=True, help="the subject, verbatim inside the prompt")
    p.add_argument("--target", required=True, help="the new continuation (target_new)")
    p.add_argument("--target-true", help="the current continuation, if known (recorded only)")
    add_edit_arguments(p)
    p.add_argument("-o", "--output", required=True, help="where to write the .safetensors patch")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("generate", help="greedy completion with patches applied")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--patch", action="append", default=[], help="patch file (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument(
        "--force", action="store_true", help="apply even if the base fingerprint differs"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="show what a patch holds")
    p.add_argument("patch", help="patch file")
    p.add_argument("--model", help="model for the token columns (default: the patch's base)")
    p.add_argument(
        "--no-model", action="store_true", help="skip loading a model (no token columns)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="edit a fact on the embedded model and show before/after")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
    _add_device_argument(p)
    p.add_argument("-o", "--output", default="edits/demo.safetensors")
    p.set_defaults(func=cmd_demo)

    add_eval_subparser(sub)
    hub.add_subparsers(sub)
    peft_export.add_subparsers(sub)
    stacking.add_subparsers(sub)
    batch.add_subparsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NeuronpatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
