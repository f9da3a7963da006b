"""Editing many facts: one patch per request, resumable, optionally stacked."""

from __future__ import annotations

import argparse


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The ``batch`` command."""
