"""What a patch holds, in numbers a person can read: per neuron, its score, delta norm, and
the tokens it (and its delta) push up, by the logit lens W_U . W_out[:, i] (FiNE Table 6)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .arch import resolve
from .patch import Patch


def _top_tokens(tokenizer, unembed: torch.Tensor, direction: torch.Tensor, n: int) -> list[str]:
    logits = unembed @ direction.to(unembed.dtype)  # [vocab]
    return [tokenizer.decode([int(t)]) for t in logits.topk(n).indices]


@torch.no_grad()
def describe(
    patch: Patch, model: nn.Module | None = None, tokenizer=None, top: int = 5
) -> dict[str, Any]:
    """A JSON-ready description of ``patch``; token columns need ``model`` and ``tokenizer``."""
    scores = {(n["layer"], n["index"]): n.get("score") for n in patch.extra.get("neurons", [])}
    arch = resolve(model) if model is not None else None
    unembed = model.get_output_embeddings().weight.float() if model is not None else None
    neurons = []
    for layer, ld in patch.layers.items():
        gate_ids = ld.gate_ids.tolist() if ld.gate_ids is not None else [-1] * len(ld.deltas)
        for index, delta, gate in zip(
            ld.neuron_indices.tolist(), ld.deltas.float(), gate_ids, strict=True
        ):
            row: dict[str, Any] = {
                "layer": layer,
                "index": index,
                "score": scores.get((layer, index)),
                "delta_norm": round(float(delta.norm()), 6),
            }
            if gate >= 0:
                row["gate"] = gate
            if arch is not None and tokenizer is not None:
                column = arch.column(layer, torch.tensor([index]))[0].float()  # [hidden]
                row["promotes"] = _top_tokens(tokenizer, unembed, column, top)
                row["delta_promotes"] = _top_tokens(tokenizer, unembed, delta, top)
            neurons.append(row)
    size = os.path.getsize(patch.source) if patch.source and os.path.exists(patch.source) else None
    return {
        "source": patch.source,
        "patch_id": patch.patch_id,
        "method": patch.method,
        "base_model": patch.base.__dict__,
        "requests": list(patch.requests),
        "hparams": dict(patch.hparams),
        "metrics": dict(patch.metrics),
        "created": patch.created,
        "library_version": patch.library_version,
        "layers": list(patch.layers),
        "num_neurons": patch.num_neurons,
        "num_params": patch.num_params,
        "file_bytes": size if size is not None else len(patch.to_bytes()),
        "neurons": neurons,
        "gates": [
            {"kind": g.kind, "layer": g.layer, "threshold": g.threshold}
            | ({} if g.requires is None else {"requires": g.requires})
            | ({} if g.span is None else {"span": g.span})
            | ({"any_of": list(g.any_of)} if g.any_of else {})
            for g in patch.gates
        ],
    }
