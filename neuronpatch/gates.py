"""Gates: deciding per position whether a gated patch's rows are added.

A ``"subject"`` gate (``patch.Gate``) reads the residual stream ``h`` that decoder layer
``gate.layer`` outputs and matches each position against its key:

    match[b, t]  = cos(h[b, t] - centre, key) > threshold
    open[b, t]   = open_before[b] or any(match[b, :t + 1])      (causal: "subject seen")

``open_before`` carries the state across KV-cache steps of one generation, so the edit keeps
firing on tokens generated after the subject. Positions masked out by the attention mask
(padding) never match. The rows a gate guards live in layers above ``gate.layer``, so the
gate is known before they run.
"""

from __future__ import annotations

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

    def cosine(self, h: torch.Tensor) -> torch.Tensor:
        """cos(h - centre_g, key_g) for every position and gate: [B, T, H] -> [B, T, G]."""
        h = h.float()
        # expanded so gates with different centres share two matmuls
        num = h @ self.keys.T - self.key_dot_centre  # (h - c) . k: [B, T, G]
        sq = (h * h).sum(-1, keepdim=True) - 2 * (h @ self.centres.T) + self.centre_sq
        return num / sq.clamp_min(1e-12).sqrt()  # [B, T, G]

    def open(
        self,
        h: torch.Tensor,
        valid: torch.Tensor | None = None,
        before: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whether each gate is open at each position: [B, T, H] -> bool [B, T, G].

        ``valid`` bool [B, T] marks real (non-padding) positions; ``before`` bool [B, G] says
        which gates opened earlier in the sequence (previous KV-cache steps).
        """
        match = self.cosine(h) > self.thresholds  # [B, T, G]
        if valid is not None:
            match &= valid[..., None]
        opened = match.cumsum(dim=1) > 0  # [B, T, G]: matched at or before t
        if before is not None:
            opened |= before[:, None, :]
        return opened
