"""A preset as a Flower run-config TOML file, written when it is launched with plain ``flwr run``.

The presets (``simulations/presets/*.yaml``) are the one preset format; no TOML copy is committed.
This writes the main ResIST run of a preset as a flat run-config file and prints the ``flwr run``
command with the preset's federation (the runner does the same for every run it launches, into
``<out>/logs/<run>.run-config.toml``)::

    python -m simulations.conf_files quick-cpu                 # writes outputs/conf/quick-cpu.toml
    python -m simulations.conf_files quick-cpu --out my.toml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resist_fl.run.cli_config import write_run_config
from simulations.launcher import federation_config
from simulations.presets import PresetError, app_config_keys, coerce_run_config, load_preset, to_dict

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path("outputs") / "conf"


def preset_run_config(name: str, project_dir: Path = PROJECT_DIR) -> tuple[dict[str, Any], str]:
    """The main ResIST run of preset ``name`` as a flat run config, and its federation config."""
    config = load_preset(name)
    run_config = {**coerce_run_config(to_dict(config["run-config"]), app_config_keys(project_dir)),
                  "strategy": "resist", "seed": int(config.seeds[0])}
    federation = config.federation
    resources = federation_config(federation["num-supernodes"], federation["num-cpus-per-client"],
                                  federation["num-gpus-per-client"])
    return run_config, resources


def write_preset(name: str, path: Path) -> str:
    """Write preset ``name``'s main run to ``path``; return the ``flwr run`` command that runs it."""
    run_config, resources = preset_run_config(name)
    command = f"flwr run . --stream --run-config {path} --federation-config \"{resources}\""
    config = load_preset(name)
    header = "\n".join([f"Preset {name}: {config.get('description') or ''}".rstrip(),
                        f"Written from simulations/presets/{name}.yaml by python -m simulations.conf_files.",
                        f"FedAvg and the ablations: python -m simulations.compare {name}. Run it with:",
                        f"  {command}"])
    write_run_config(run_config, path, header=header)
    return command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.conf_files", description=__doc__.split("\n")[0])
    parser.add_argument("preset", help="a preset name (simulations/presets/NAME.yaml)")
    parser.add_argument("--out", type=Path, help=f"the file to write (default: {DEFAULT_DIR}/PRESET.toml)")
    args = parser.parse_args(argv)
    path = args.out or DEFAULT_DIR / f"{args.preset}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        print(write_preset(args.preset, path))
    except (PresetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
