"""Stack calibration: subject gates that stay shut on the other edits of a stack.

A gated edit's subject-gate threshold is calibrated when the edit is made
(``local.calibrated_threshold``): it sits above the cosine the gate reaches on the edit's own
prompt with other subjects put in. That keeps the gate shut on other subjects asked *the
same question*, but not on other questions: the peak cosine is often on the template's words
before the subject, which every calibration prompt shares, and other templates can sit
higher. Measured gate-only on a stack of 200 WikiData_counterfact edits of smollm2-135m
(``benchmarks/results/stack_gates.md``): on 93.4 % of relation-specificity prompts some other
patch of the stack opens (16.7 of them per prompt), each adding its edit there.

``calibrate_stack`` closes that hole with what a stack knows: the other edits' prompts. Each
subject gate's threshold is raised to the highest cosine it reaches at any position of the
other edits' prompts, plus ``CALIBRATION_MARGIN``, capped at ``MAX_CALIBRATED``; it is never
lowered. Prompts that name the gate's own subject are left out (another relation of the same
subject is the subject gate's to open; the query gate tells relations apart). In the same
measurement this cuts other patches opening to 0.14 per relation-specificity prompt (6.6 %),
forgetfulness 0, and the price is aliases: a record's own gates open on 74.0 % of its
subject-alias prompts instead of 91.0 %.

End to end, 800 stacked WikiData_counterfact edits of smollm2-135m keep Edit 97.6, RSA 88.5,
FA 87.1, at SAA 74.7 (90.5 alone): ``benchmarks/results/stacked_edits_calibrated.md``.

The patches' deltas, neurons and query gates are untouched; only subject thresholds rise,
and each calibrated patch records what was raised in ``extra["stack_calibration"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import fingerprint
from .arch import resolve
from .errors import StackError
from .local import CALIBRATION_MARGIN, MAX_CALIBRATED, peak_cosines
from .patch import Gate, Patch
from .runtime import check_compatible
from .stacking import flatten

CALIBRATION_KEY = "stack_calibration"  # extra[CALIBRATION_KEY]: what calibrate_stack raised


def raised_thresholds(
    model: nn.Module,
    tokenizer,
    gates: Sequence[Gate],
    prompts: Sequence[str],
    excluded: torch.Tensor,
    margin: float = CALIBRATION_MARGIN,
) -> list[float]:
    """Each gate's threshold raised to its highest cosine on ``prompts`` (any position) plus
    ``margin``, capped at ``MAX_CALIBRATED``, never lowered. ``excluded`` bool
    [len(prompts), len(gates)] marks the prompts a gate is not calibrated on."""
    if excluded.shape != (len(prompts), len(gates)):
        raise ValueError(f"excluded must be [{len(prompts)}, {len(gates)}], got {excluded.shape}")
    out = [float(g.threshold) for g in gates]
    if not prompts:
        return out
    for layer in sorted({g.layer for g in gates}):
        columns = [j for j, g in enumerate(gates) if g.layer == layer]
        peaks = peak_cosines(model, tokenizer, [gates[j] for j in columns], prompts)  # [P, G']
        peaks = peaks.cpu().masked_fill(excluded[:, columns], -math.inf)
        for column, j in enumerate(columns):
            highest = peaks[:, column].max().item()
            if highest > -math.inf:
                out[j] = max(out[j], min(highest + margin, MAX_CALIBRATED))
    return out


def calibrate_stack(
    model: nn.Module,
    tokenizer,
    patches: Sequence[Patch],
    margin: float = CALIBRATION_MARGIN,
) -> list[Patch]:
    """The single edits of ``patches`` (stacked inputs taken apart), each subject gate's
    threshold raised so that it stays shut on every other edit's prompt; see the module
    docstring. Stack or apply the result as usual.

    ``model`` must be the patches' base model (checked as ``apply`` checks it). Patches
    without subject gates come back unchanged. Raises StackError for an empty list.
    """
    parts = flatten(list(patches))
    if not parts:
        raise StackError("nothing to calibrate: give at least one patch")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")
    arch = resolve(model)
    needs_fp = any(p.base_fingerprint is not None for p in parts)
    model_fp = fingerprint.compute(arch) if needs_fp else None
    for part in parts:
        check_compatible(part, arch, model_fp, force=False)

    # every edit's prompts, with the part each belongs to: P prompts
    asked = [(i, r["prompt"]) for i, p in enumerate(parts) for r in p.requests if r.get("prompt")]
    prompts = [prompt for _, prompt in asked]
    folded = [prompt.casefold() for prompt in prompts]
    # the subject gates of every part, as (part, gate index): G gates
    where = [
        (i, g)
        for i, p in enumerate(parts)
        for g, gate in enumerate(p.gates)
        if gate.kind == "subject"
    ]
    if not where:
        return parts
    subjects = [_subjects(parts[i]) for i, _ in where]
    # a gate is not calibrated on its own edit's prompts, nor on any naming its subject
    excluded = torch.tensor(
        [
            [owner == i or any(s in prompt for s in subjects[j]) for j, (i, _) in enumerate(where)]
            for (owner, _), prompt in zip(asked, folded, strict=True)
        ],
        dtype=torch.bool,
    ).reshape(len(prompts), len(where))  # [P, G]
    with torch.no_grad():
        thresholds = raised_thresholds(
            model, tokenizer, [parts[i].gates[g] for i, g in where], prompts, excluded, margin
        )
    raised: dict[int, dict[int, float]] = {}
    for (i, g), threshold in zip(where, thresholds, strict=True):
        raised.setdefault(i, {})[g] = threshold
    return [
        _calibrated(part, raised[i], len(parts), margin) if i in raised else part
        for i, part in enumerate(parts)
    ]


def _subjects(patch: Patch) -> list[str]:
    return [r["subject"].casefold() for r in patch.requests if r.get("subject")]


def _calibrated(patch: Patch, thresholds: dict[int, float], edits: int, margin: float) -> Patch:
    gates = tuple(
        replace(gate, threshold=thresholds.get(g, gate.threshold))
        for g, gate in enumerate(patch.gates)
    )
    previous: dict[str, Any] = patch.extra.get(CALIBRATION_KEY) or {}
    record = {
        "edits": edits,
        "margin": margin,
        # before any stack calibration, per gate (calibrating again keeps the first record's)
        "original_thresholds": previous.get(
            "original_thresholds", [g.threshold for g in patch.gates]
        ),
        "thresholds": [g.threshold for g in gates],
    }
    return replace(patch, gates=gates, extra={**patch.extra, CALIBRATION_KEY: record}, source=None)


def calibrate_verbosely(model, tokenizer, parts: list[Patch]) -> list[Patch]:
    """``calibrate_stack``, printing a summary of what it raised."""
    calibrated = calibrate_stack(model, tokenizer, parts)
    pairs = [
        (before.threshold, after.threshold)
        for old, new in zip(parts, calibrated, strict=True)
        for before, after in zip(old.gates, new.gates, strict=True)
        if before.kind == "subject"
    ]
    if not pairs:
        print("no subject gates to calibrate: the patches are stacked as they are")
        return calibrated
    raised = [(a, b) for a, b in pairs if b > a]
    print(
        f"stack calibration: {len(raised)} of {len(pairs)} subject gates raised to stay shut on "
        "the other edits' prompts"
        + (f" (by {sum(b - a for a, b in raised) / len(raised):.3f} on average)" if raised else "")
    )
    capped = sum(1 for _, b in pairs if b >= MAX_CALIBRATED)
    if capped:
        print(
            f"  {capped} reached the cap {MAX_CALIBRATED}: another edit's prompt looks like its "
            "subject to the gate, so it opens only on near-verbatim mentions of its own subject"
        )
    return calibrated
