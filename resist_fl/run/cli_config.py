"""Flower's ``key=value`` config syntax (``--run-config``, ``--node-config``,
``--federation-config``) and free local ports: shared by the experiment
launcher and the deployment scripts."""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Mapping
from typing import Any


def toml_value(key: str, value: Any) -> str:
    """One config value as TOML, the way Flower's ``key=value`` parser reads it.

    Parameters
    ----------
    key : str
        The key (for error messages).
    value : bool, int, float, str or path
        The value.

    Returns
    -------
    str
        ``true``/``false``, a number, or a quoted string.

    Raises
    ------
    ValueError
        For types Flower's config cannot hold, or strings that contain both
        quote characters (Flower's parser takes a quoted value up to the next
        quote of its kind, without escapes).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if "'" not in text and "\n" not in text:
            return f"'{text}'"  # TOML literal string: no escapes
        if '"' not in text:
            return json.dumps(text)
        raise ValueError(f"{key} = {text!r}: a config string cannot hold both ' and \"")
    raise ValueError(f"{key} = {value!r}: expected a bool, int, float or str, not {type(value).__name__}")


def render_config(config: Mapping[str, Any]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``a=1 b='x'``: pairs separated by spaces, values in TOML."""
    return " ".join(f"{key}={toml_value(key, value)}" for key, value in config.items())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
