"""Run the real ServerApp main with the real ClientApp in-process: no SuperLink, no Ray.

:func:`run_inprocess` runs one whole federation on :class:`simulations.inprocess_grid.InProcessGrid`: what the
tests use to run federations fast on one machine (``flwr run .`` remains the real thing). The runner's second
backend, :func:`run_inprocess_launch`, has the signature and the :class:`~simulations.launcher.LaunchResult` of
:func:`simulations.launcher.run_flwr`, so ``python -m simulations.compare PRESET --backend inprocess`` plans,
reuses, reports and resumes exactly as through ``flwr run``. It runs :func:`run_inprocess` in a child process
(``python -m simulations.inprocess CONFIG N``: its own memory, a timeout that holds, ``--jobs`` in parallel),
with the app's ``[tool.flwr.app.config]`` defaults under the run's keys, as Flower merges them. What it does not
exercise, and why one torch thread per run: simulations/README.md, "Runner".
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

from resist_fl.flower.metering import MeteredGrid
from resist_fl.run.cli_config import write_run_config
from resist_fl.run.outputs import SUMMARY_FILE
from simulations.inprocess_grid import InProcessGrid
from simulations.launcher import LaunchResult, error_lines, prepare_launch, run_logged
from simulations.presets import app_config_keys


def run_inprocess(run_config: dict, num_nodes: int = 3, client: ClientApp | None = None,
                  server: Callable[[InProcessGrid, Context], None] | None = None, **grid_kwargs) -> InProcessGrid:
    """Run one whole ServerApp main on an :class:`InProcessGrid` (the project's ServerApp and
    ClientApp unless ``server`` / ``client`` are given, e.g. another app's); return the grid."""
    from client_app.app import app as client_app  # the apps only where a federation runs (not in the runner)
    from server_app.app import main as server_main

    grid = InProcessGrid(client or client_app, num_nodes=num_nodes, run_config=run_config, **grid_kwargs)
    (server or server_main)(MeteredGrid(grid, replies_ready_on_push=True),  # every node runs while it is pushed
                            Context(run_id=grid.run.run_id, node_id=1, node_config={}, state=RecordDict(),
                                    run_config=run_config))
    return grid


def run_inprocess_launch(project_dir: str | os.PathLike, run_config: Mapping[str, Any], *, num_supernodes: int,
                         num_gpus_per_client: float = 0.0, num_cpus_per_client: int = 1, timeout_s: float,
                         workdir: str | os.PathLike) -> LaunchResult:
    """Run one federation in-process in a child process; the result as :func:`run_flwr` gives it.

    ``num_cpus_per_client`` becomes the child's torch threads (``OMP_NUM_THREADS``, as Ray sets it
    for an actor); a GPU request is refused (the in-process grid runs on this process's devices).
    """
    if num_gpus_per_client:
        raise ValueError(f"num-gpus-per-client = {num_gpus_per_client}: the in-process backend does not "
                         "reserve GPUs; use the flwr backend (--backend flwr)")
    project_dir = Path(project_dir).resolve()
    run_dir, workdir, log_path = prepare_launch(run_config, workdir)
    name = str(run_config["run-name"])
    config_path = write_run_config({**app_config_keys(project_dir), **run_config},
                                   workdir / f"{name}.run-config.toml",
                                   header=f"run config of {name} (the app's defaults merged), in-process backend")
    command = [sys.executable, "-m", "simulations.inprocess", str(config_path), str(int(num_supernodes))]
    path = os.pathsep.join(filter(None, (str(project_dir), os.environ.get("PYTHONPATH"))))  # the caller's kept
    env = {**os.environ, "OMP_NUM_THREADS": str(int(num_cpus_per_client)), "PYTHONPATH": path}
    started, started_epoch = time.monotonic(), time.time()
    proc, timed_out, round1 = run_logged(command, project_dir, env, log_path, "", run_dir, started_epoch, timeout_s)
    wall = time.monotonic() - started
    errors = "; ".join(error_lines(log_path.read_text(encoding="utf-8", errors="replace")))
    if timed_out:
        reason = f"timed out after {timeout_s:.0f} s" + (f"; {errors}" if errors else "")
    elif proc.returncode != 0 or not (run_dir / SUMMARY_FILE).exists():
        written = "written" if (run_dir / SUMMARY_FILE).exists() else "missing"
        reason = f"exit status {proc.returncode}, {SUMMARY_FILE} {written}: " + (errors or "see the log")
    else:
        reason = ""
    return LaunchResult(success=not reason, reason=reason, run_dir=run_dir, log_path=log_path, wall_seconds=wall,
                        seconds_to_round1=round1, status=f"exit {proc.returncode}", command=command)


if __name__ == "__main__":  # python -m simulations.inprocess RUN-CONFIG.toml NUM_NODES (the command above)
    import tomllib

    run_inprocess(tomllib.loads(Path(sys.argv[1]).read_text(encoding="utf-8")), num_nodes=int(sys.argv[2]))
