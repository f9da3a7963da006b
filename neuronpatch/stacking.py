"""Combining patches: stack several edits into one, take them apart again, compare two."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .patch import Patch


def stack(patches: Sequence[Patch]) -> Patch:
    """One patch holding every edit; per-edit provenance kept so ``unstack`` can undo it."""
    raise NotImplementedError


def unstack(patch: Patch) -> list[Patch]:
    """The single-edit patches a stacked patch was made from."""
    raise NotImplementedError


def diff(a: Patch, b: Patch) -> dict[str, Any]:
    """Edits only in a, only in b, in both; shared neurons; per-layer norms and cosines."""
    raise NotImplementedError


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The ``stack``, ``unstack`` and ``diff`` commands."""
