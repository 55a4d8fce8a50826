"""Experiment presets: omegaconf YAML files composed from a base plus overrides.

A preset file names its parent with ``extends:`` (default ``_base``); the parent chain is merged root first,
then the command line's dotlist overrides (``run-config.num-server-rounds=3 federation.num-supernodes=4``).
Files whose name starts with ``_`` are building blocks, not runnable presets. A path to a YAML file outside
``presets/`` works as well.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resist_fl.run.settings import STRATEGIES  # the one list of strategies

PRESET_DIR = Path(__file__).parent / "presets"
BASE_PRESET = "_base"
RUNNER_KEYS = ("strategy", "seed", "run-name", "output-dir")
"""Run-config keys the runner sets for every run; presets must leave them alone."""
GRID_KEYS = ("norm", "partitioner", "dirichlet-alpha")
"""Run-config keys a ``grid`` sets per cell; its preset's run-config must leave them alone."""


class PresetError(ValueError):
    """A preset that cannot be found, parsed or used."""


def list_presets() -> list[str]:
    """Names of the runnable presets shipped in ``simulations/presets``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def preset_path(name: str) -> Path:
    """The YAML file of a preset name (or a path to a YAML file)."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return path


def _load_chain(name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """A preset merged over its ``extends`` chain (root first)."""
    if name in seen:
        raise PresetError(f"preset inheritance loop: {' -> '.join((*seen, name))}")
    path = preset_path(name)
    node = OmegaConf.load(path)
    parent = node.pop("extends", None if name == BASE_PRESET else BASE_PRESET)
    if parent is None:
        return node
    return OmegaConf.merge(_load_chain(str(parent), (*seen, name)), node)


def app_config_keys(project_dir: Path) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` defaults from ``pyproject.toml``."""
    with open(Path(project_dir) / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def load_preset(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The preset ``name`` (``quick-cpu``, or a path to a YAML file) with the dotlist ``overrides`` applied
    (``key.sub=value`` items, e.g. ``run-config.num-server-rounds=3``), resolved, with ``name`` set."""
    config = _load_chain(name)
    try:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(config)
    except OmegaConfBaseException as err:
        raise PresetError(f"preset {name!r}: {err}") from err
    config.name = Path(name).stem if Path(name).suffix else name
    return config


def validate_preset(config: DictConfig, project_dir: Path) -> None:
    """Check a preset against the app before anything runs: :class:`PresetError` for unknown preset or
    run-config keys (typos would otherwise be ignored or only fail inside the ServerApp), keys the runner
    owns, unknown strategies."""
    allowed = set(_load_chain(BASE_PRESET)) | {"name"}
    if unknown_top := sorted(set(config) - allowed):
        raise PresetError(f"unknown preset key(s) {unknown_top}; expected some of {', '.join(sorted(allowed))} "
                          "(app keys go under run-config.)")
    known = app_config_keys(project_dir)
    variants = {"main": config.get("run-config", {})}
    own = config.get("strategy-config") or {}
    if bad := sorted(set(own) - set(STRATEGIES)):
        raise PresetError(f"strategy-config names unknown strategies {bad}; expected some of {', '.join(STRATEGIES)}")
    variants.update({f"strategy-config.{name}": keys for name, keys in own.items()})
    variants.update({k: v.get("run-config", {}) for k, v in config.get("ablation-variants", {}).items()})
    for variant, run_config in variants.items():
        if unknown := sorted(set(run_config) - set(known)):
            raise PresetError(f"{variant}: unknown run-config key(s) {unknown}; the app knows: "
                              f"{', '.join(known)}")
        if owned := sorted(set(run_config) & set(RUNNER_KEYS)):
            raise PresetError(f"{variant}: run-config key(s) {owned} are set by the runner")
    if bad := sorted(set(config.strategies) - set(STRATEGIES)):
        raise PresetError(f"unknown strategies {bad}; expected some of {', '.join(STRATEGIES)}")
    for variant in config.get("ablation-variants", {}).values():
        if bad := sorted(set(variant.get("strategies", ["resist"])) - set(STRATEGIES)):
            raise PresetError(f"unknown strategies {bad} in ablation-variants")
    grid_cells(config)


def grid_cells(config: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    """A ``grid`` preset's cells, ``(variant, run-config changes)`` for every alpha x norm, alphas outermost;
    [] without a grid. An alpha ``"iid"`` is ``partitioner='iid'``, a number the Dirichlet partitioner with
    that ``dirichlet-alpha``; the variant is :func:`cell_name`'s (``batchnorm-0.3``, ``groupnorm-iid``).
    :class:`PresetError` for a malformed grid, one whose keys the preset sets too, or one with a ``tuning``
    section (its tuning runs would belong to no cell)."""
    grid = config.get("grid")
    if grid is None:
        return []
    from resist_fl.core.norms import NORMS

    if not isinstance(grid, DictConfig) or set(grid) != {"alphas", "norms"} or not all(
            OmegaConf.is_list(grid[k]) and len(grid[k]) for k in ("alphas", "norms")):
        raise PresetError(f"grid: expected non-empty lists alphas and norms and nothing else, got {to_dict(grid)!r} "
                          "(the data set is run-config.dataset)")
    sets = {"run-config": config.get("run-config", {}),
            **{f"strategy-config.{k}": v for k, v in (config.get("strategy-config") or {}).items()}}
    for where, keys in sets.items():
        if owned := sorted(set(keys) & set(GRID_KEYS)):
            raise PresetError(f"preset {config.name!r}: {where} sets {owned}, which the grid sets per cell "
                              "(use grid.norms / grid.alphas)")
    if config.get("tuning") is not None:
        raise PresetError(f"preset {config.name!r}: a grid has no learning-rate tuning (its tuning runs would "
                          "belong to no cell); drop tuning or grid")
    if bad := sorted(set(map(str, grid.norms)) - set(NORMS)):
        raise PresetError(f"grid.norms: unknown {bad}; expected some of {', '.join(NORMS)}")
    cells = []
    for alpha in grid.alphas:
        label = alpha_label(alpha)
        skew = {"partitioner": "iid"} if label == "iid" else {"partitioner": "dirichlet",
                                                             "dirichlet-alpha": float(label)}
        cells += [(cell_name(norm, alpha), {"norm": str(norm), **skew}) for norm in grid.norms]
    if len({name for name, _ in cells}) != len(cells):
        raise PresetError(f"grid: a cell twice (alphas {list(grid.alphas)}, norms {list(grid.norms)})")
    return cells


def alpha_label(alpha: Any) -> str:
    """A grid alpha as cells and tables name it: ``"iid"``, or the Dirichlet alpha as a float (``1`` ->
    ``"1.0"``); :class:`PresetError` for neither ``"iid"`` nor a positive finite number."""
    if str(alpha) == "iid":
        return "iid"
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < math.inf:
        raise PresetError(f"grid.alphas: {alpha!r} is neither 'iid' nor a positive number")
    return str(value)


def cell_name(norm: Any, alpha: Any) -> str:
    """The variant of a grid cell: ``<norm>-<alpha>`` (:func:`alpha_label`)."""
    return f"{norm}-{alpha_label(alpha)}"


def cell_names(grid: Mapping[str, Any] | None) -> list[str]:
    """The variants of a ``grid`` section (as a manifest stores it), in :func:`grid_cells`' order."""
    return [cell_name(norm, alpha) for alpha in grid["alphas"] for norm in grid["norms"]] if grid else []


def coerce_run_config(run_config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Give dotlist-parsed values the type of the app's default: ``run-config.partitioned-stages=3`` parses as
    the integer 3, but the key is a string; ``lr=1`` parses as an integer for a float key. Bools are never
    converted (``true``/``false`` parse as bools already)."""
    coerced = {}
    for key, value in run_config.items():
        default = defaults.get(key)
        if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        coerced[key] = value
    return coerced


def to_dict(config: DictConfig) -> dict[str, Any]:
    """Plain, resolved Python containers."""
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
