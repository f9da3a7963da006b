"""A base-model fingerprint that survives dtype and device changes but not other weights.

Eight fixed W_out entries per layer, sampled at seeded positions, stored as float32
[num_layers, 8]. Two models match when the relative L2 distance of their samples is below
1e-2: bf16 or fp16 rounding moves the samples by < 0.5 %, while a different checkpoint of
the same architecture moves them by tens of percent.
"""

from __future__ import annotations

import torch

from .arch import ModelArch

SAMPLES_PER_LAYER = 8
TOLERANCE = 1e-2


def compute(arch: ModelArch) -> torch.Tensor | None:
    """The fingerprint of a model, or None when its weights are not materialised (meta device)."""
    generator = torch.Generator().manual_seed(0)
    flat = torch.randint(
        0, arch.hidden_size * arch.intermediate_size, (SAMPLES_PER_LAYER,), generator=generator
    )
    neuron, out = flat // arch.hidden_size, flat % arch.hidden_size
    rows = []
    for module in arch.w_out:
        weight = module.weight
        if weight.device.type == "meta":
            return None
        sample = (
            weight[neuron.to(weight.device), out.to(weight.device)]
            if arch.spec.conv1d
            else (weight[out.to(weight.device), neuron.to(weight.device)])
        )
        rows.append(sample.detach().to("cpu", torch.float32))
    return torch.stack(rows)  # [num_layers, SAMPLES_PER_LAYER]


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance between two fingerprints (inf if their shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def matches(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two fingerprints come from the same base weights."""
    return distance(a, b) < TOLERANCE
