"""``conf/<preset>.toml``: every preset as a run-config file for plain ``flwr run``.

The presets (``simulations/presets/*.yaml``) are the one source; these files are derived from
them and committed so that ``flwr run . --run-config conf/quick-cpu.toml`` works without the
runner. A test checks that every file equals its preset. After changing a preset:

    python -m simulations.conf_files          # rewrite conf/*.toml
    python -m simulations.conf_files --check  # exit 1 if a file is stale or missing
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resist_fl.run.cli_config import write_run_config
from simulations.launcher import federation_config
from simulations.presets import app_config_keys, coerce_run_config, list_presets, load_preset, to_dict

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"


def preset_run_config(name: str, project_dir: Path = PROJECT_DIR) -> tuple[dict[str, Any], str]:
    """The main ResIST run of preset ``name`` as a flat run config, and the file's header: what
    it is and the ``flwr run`` command with the preset's federation."""
    config = load_preset(name)
    run_config = {**coerce_run_config(to_dict(config["run-config"]), app_config_keys(project_dir)),
                  "strategy": "resist", "seed": int(config.seeds[0])}
    federation = config.federation
    resources = federation_config(federation["num-supernodes"], federation["num-cpus-per-client"],
                                  federation["num-gpus-per-client"])
    command = f"flwr run . --stream --run-config conf/{name}.toml --federation-config \"{resources}\""
    header = "\n".join([
        f"Preset {name}: {config.get('description') or ''}".rstrip(),
        f"Generated from simulations/presets/{name}.yaml by python -m simulations.conf_files; do not edit.",
        "The main ResIST run; FedAvg and the ablations: python -m simulations.compare " + name,
        "(or a copy of this file with strategy = \"fedavg\"). Run it with:",
        f"  {command}",
    ])
    return run_config, header


def stale_files(conf_dir: Path = CONF_DIR) -> list[str]:
    """Presets whose ``conf/<name>.toml`` is missing or differs from the preset."""
    stale = []
    for name in list_presets():
        path = conf_dir / f"{name}.toml"
        if not path.is_file() or tomllib.loads(path.read_text(encoding="utf-8")) != preset_run_config(name)[0]:
            stale.append(name)
    return stale


def write_all(conf_dir: Path = CONF_DIR) -> list[Path]:
    """Write ``conf/<name>.toml`` for every preset (and remove files of presets that are gone)."""
    names = set(list_presets())
    for old in conf_dir.glob("*.toml"):
        if old.stem not in names:
            old.unlink()
    written = []
    for name in sorted(names):
        run_config, header = preset_run_config(name)
        written.append(write_run_config(run_config, conf_dir / f"{name}.toml", header=header))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.conf_files", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file is stale or missing")
    parser.add_argument("--dir", type=Path, default=CONF_DIR, help="where the files are (default: conf/)")
    args = parser.parse_args(argv)
    if args.check:
        if stale := stale_files(args.dir):
            print(f"stale or missing in {args.dir}: {', '.join(stale)}; run python -m simulations.conf_files",
                  file=sys.stderr)
            return 1
        return 0
    for path in write_all(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
