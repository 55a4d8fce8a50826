"""The error of a run setting that cannot be used (its own module, so that every layer that checks
a setting can raise it without importing the whole settings declaration)."""

from __future__ import annotations


class SettingsError(ValueError):
    """A run-config value that is unknown, of the wrong type or out of range."""
