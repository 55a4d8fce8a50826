"""Durations as people read them, for progress lines (the ServerApp's round line, the runner)."""

from __future__ import annotations

from collections.abc import Sequence


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 5 s`` or ``2 h 4 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def eta(durations: Sequence[float], left: int) -> str:
    """Time for ``left`` more items at the mean of ``durations`` so far (``0 s`` when none are left
    or nothing was timed yet)."""
    if left <= 0 or not durations:
        return "0 s"
    return format_seconds(sum(durations) / len(durations) * left)
