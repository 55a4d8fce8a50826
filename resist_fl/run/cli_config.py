"""Flower's config syntaxes and free local ports, shared by the experiment launcher and the
deployment scripts: a run config as a TOML file (``flwr run --run-config FILE.toml``: any string
survives, written by a TOML library), and ``key=value`` strings where Flower takes nothing else
(``--node-config``, ``--federation-config``)."""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
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


def write_run_config(config: Mapping[str, Any], path: str | os.PathLike, header: str = "") -> Path:
    """Write ``config`` (flat kebab-case keys) as a TOML file Flower's ``--run-config`` reads;
    ``header`` becomes ``#`` comment lines on top. Returns the absolute path."""
    import tomli_w

    for key, value in config.items():
        if not isinstance(value, (bool, int, float, str, os.PathLike)):
            raise ValueError(f"{key} = {value!r}: expected a bool, int, float or str, not {type(value).__name__}")
    body = tomli_w.dumps({k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in config.items()})
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comments + body, encoding="utf-8")
    return path


def render_config(config: Mapping[str, Any]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``a=1 b='x'``: pairs separated by spaces, values in TOML."""
    return " ".join(f"{key}={toml_value(key, value)}" for key, value in config.items())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
