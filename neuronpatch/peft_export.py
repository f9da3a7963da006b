"""Exporting patches as standard PEFT LoRA adapters (rank k, one-hot A, B = deltas^T)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .patch import Patch


def to_peft(
    patches: Patch | Sequence[Patch],
    directory: str | os.PathLike[str],
    *,
    approximate: bool = False,
) -> Path:
    """Write one LoRA adapter equal to the given patches applied together; returns the folder."""
    raise NotImplementedError


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The ``export-peft`` command."""
