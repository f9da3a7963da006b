"""Gates: deciding per position whether a gated patch's rows are added.

A ``"subject"`` gate (``patch.Gate``) reads the residual stream ``h`` that decoder layer
``gate.layer`` outputs and matches each position against its key:

    match[b, t]  = cos(h[b, t] - centre, key) > threshold
    age[b, t]    = t - (the last s <= t with match[b, s])       (inf before any match)
    open[b, t]   = age[b, t] < span                               (span None: inf, "seen")

A gate without a span stays open from its first match on ("subject seen"); a gate with span s
is open at the s positions from each match (a query gate: the answer's positions, after which
generated text runs unedited). The age of the last position is carried across KV-cache steps
of one generation, so both kinds behave alike with and without a cache. Positions masked out
by the attention mask (padding) never match. The rows a gate guards live in layers above
``gate.layer``, so the gate is known before they run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .patch import Gate


class GateBank:
    """The gates that read one layer, stacked for one batched cosine: G gates, hidden H."""

    def __init__(self, gates: Sequence[Gate], device: torch.device) -> None:
        keys = torch.stack([g.key for g in gates])  # [G, H]
        self.keys = (keys / keys.norm(dim=-1, keepdim=True)).to(device)  # unit keys [G, H]
        self.centres = torch.stack([g.centre for g in gates]).to(device)  # [G, H]
        self.key_dot_centre = (self.keys * self.centres).sum(-1)  # [G]
        self.centre_sq = (self.centres * self.centres).sum(-1)  # [G]
        self.thresholds = torch.tensor([float(g.threshold) for g in gates], device=device)  # [G]
        spans = [math.inf if g.span is None else float(g.span) for g in gates]
        self.spans = torch.tensor(spans, device=device)  # [G]

    def cosine(self, h: torch.Tensor) -> torch.Tensor:
        """cos(h - centre_g, key_g) for every position and gate: [B, T, H] -> [B, T, G]."""
        h = h.float()
        # expanded so gates with different centres share two matmuls
        num = h @ self.keys.T - self.key_dot_centre  # (h - c) . k: [B, T, G]
        sq = (h * h).sum(-1, keepdim=True) - 2 * (h @ self.centres.T) + self.centre_sq
        return num / sq.clamp_min(1e-12).sqrt()  # [B, T, G]

    def ages(
        self,
        h: torch.Tensor,
        valid: torch.Tensor | None = None,
        before: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Positions since each gate last matched: [B, T, H] -> float [B, T, G] (inf: never).

        ``valid`` bool [B, T] marks real (non-padding) positions; ``before`` float [B, G] is
        the age at the last position of the previous KV-cache steps of the sequence.
        """
        match = self.cosine(h) > self.thresholds  # [B, T, G]
        if valid is not None:
            match &= valid[..., None]
        t = torch.arange(h.shape[1], device=h.device, dtype=torch.float32)[None, :, None]
        last = torch.where(match, t, -math.inf).cummax(dim=1).values  # [B, T, G]
        age = t - last  # inf before the first match of this step
        if before is not None:
            age = torch.minimum(age, before[:, None, :] + t + 1)
        return age

    def open(
        self,
        h: torch.Tensor,
        valid: torch.Tensor | None = None,
        before: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whether each gate is open at each position: [B, T, H] -> bool [B, T, G]
        (arguments as for ``ages``)."""
        return self.ages(h, valid, before) < self.spans
