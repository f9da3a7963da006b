"""Sharing patches through the HuggingFace Hub: push with a model card, pull, ``hf://`` addresses."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .patch import Patch


def push_to_hub(
    patch: Patch,
    repo_id: str,
    filename: str | None = None,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``patch`` and refresh the repo's model card; returns the file's URL."""
    raise NotImplementedError


def from_hub(
    repo_id: str,
    filename: str | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
) -> Patch:
    """Download (through the huggingface_hub cache) and validate a patch."""
    raise NotImplementedError


def load_hf(address: str) -> Patch:
    """A Patch from ``hf://user/repo`` or ``hf://user/repo/file.safetensors``."""
    raise NotImplementedError


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The ``push`` and ``pull`` commands."""
