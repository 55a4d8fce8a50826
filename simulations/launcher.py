"""Run one ``flwr run . --stream`` in isolation and report how it went.

Each launch gets its own ``FLWR_HOME`` and free ports, runs the app in this Python environment and marks every
process it starts with an environment variable, by which they are found and stopped afterwards
(:mod:`resist_fl.run.processes`). ``flwr run --stream`` exits 0 even when the ServerApp fails, so success means
``summary.json`` exists and ``flwr ls`` does not report ``finished:failed``. Which ports, why, and the clean-up:
simulations/README.md, "Launcher".
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resist_fl.run.cli_config import free_port, render_config, write_run_config
from resist_fl.run.outputs import METRICS_FILE, SUMMARY_FILE, run_directory
from resist_fl.run.processes import find_processes, has_environment, stop

MARKER_ENV = "RESIST_FL_LAUNCH_ID"
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 5.0
LS_TIMEOUT_SECONDS = 30.0
RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")
LOCAL_SUPERLINK_STARTED = "Starting local SuperLink"
SUPERLINK_START_TIMED_OUT = "Failed to start local SuperLink within"
"""What ``flwr run`` prints when its local SuperLink did not answer within Flower's fixed startup timeout
(``LOCAL_SUPERLINK_STARTUP_TIMEOUT``, 15 s, ``flwr/cli/local_superlink.py`` lines 151-172 in flwr 1.42): on a
loaded machine (several launches at once beside other work) it can happen before anything ran."""
SUPERLINK_START_ATTEMPTS = 3
"""Launches of one run when the local SuperLink did not start in time (each with a fresh FLWR_HOME and ports)."""
ERROR_LINE = re.compile(r"^\s*(?:[\w.]*(?:Error|Exception|Exit)\b[^:]*): (.+)$")


@dataclass(frozen=True)
class LaunchResult:
    """What one ``flwr run`` did."""

    success: bool  # the ServerApp finished: summary.json exists and Flower does not report the run failed
    reason: str  # why the launch failed ("" on success)
    run_dir: Path  # output-dir/run-name
    log_path: Path  # stdout and stderr of flwr run (the streamed ServerApp log)
    wall_seconds: float  # from starting flwr run until it exited (or was killed)
    seconds_to_round1: float | None  # until round 1's metrics row: SuperLink, FAB install, Ray and one round
    run_id: str | None = None  # Flower's run id, from the output
    status: str | None = None  # flwr ls's status, e.g. finished:completed
    command: list[str] = field(default_factory=list)  # the exact flwr run command line
    launch_id: str = ""  # RESIST_FL_LAUNCH_ID in the environment of every process of this launch
    stopped_pids: list[int] = field(default_factory=list)  # alive after flwr run exited (SuperLink, ...), stopped
    leftover_pids: list[int] = field(default_factory=list)  # still alive after clean-up (should be empty)


def federation_config(num_supernodes: int, num_cpus_per_client: int, num_gpus_per_client: float) -> str:
    """The ``--federation-config`` string of a simulation with these resources."""
    if num_supernodes < 1 or num_cpus_per_client < 1 or num_gpus_per_client < 0:
        raise ValueError(f"invalid resources: {num_supernodes} supernodes, {num_cpus_per_client} CPUs and "
                         f"{num_gpus_per_client} GPUs per client")
    return render_config({"num-supernodes": int(num_supernodes),
                          "client-resources-num-cpus": int(num_cpus_per_client),
                          "client-resources-num-gpus": float(num_gpus_per_client)})


def flwr_executable() -> str:
    """``flwr`` of this Python environment (falls back to the one on PATH)."""
    local = Path(sys.executable).parent / "flwr"
    if local.exists():
        return str(local)
    found = shutil.which("flwr")
    if found is None:
        raise FileNotFoundError("the `flwr` command was not found (is flwr installed in this environment?)")
    return found


def launch_environment(flwr_home: Path, marker: str, *, runtime_dependency_installation: bool,
                       ray_address: str | None = None) -> dict[str, str]:
    """The environment of ``flwr run`` (and so of the SuperLink it starts); ``ray_address``: the
    Ray cluster its simulation joins (``RAY_ADDRESS``), else Ray starts its own."""
    bin_dir = str(Path(flwr_executable()).parent)  # flower-superlink / -superexec are found on PATH
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(flwr_home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_DISABLE_UPDATE_CHECK": "1", MARKER_ENV: marker}
    env.pop("RAY_ADDRESS", None)  # Ray starts its own cluster, unless told which to join
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
    if runtime_dependency_installation:
        env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    else:
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def marked_pids(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``MARKER_ENV=marker``."""
    return [p.pid for p in find_processes(has_environment(MARKER_ENV, marker))]


def _stop_process_group(proc: subprocess.Popen) -> None:
    """Stop ``flwr run`` (started in its own session) and its direct children."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


def _round1_seconds(run_dir: Path, started_epoch: float) -> float | None:
    """Seconds from launch until round 1's row was written (``None`` before that)."""
    path = run_dir / METRICS_FILE
    try:
        stat = path.stat()
        if stat.st_size == 0:
            return None
        with open(path, encoding="utf-8") as f:
            rows = sum(1 for line in f if line.strip())
    except OSError:
        return None
    # one row: the file was last written by round 1; otherwise we noticed it late
    return (stat.st_mtime if rows == 1 else time.time()) - started_epoch


def wait_for_exit(proc: subprocess.Popen, run_dir: Path, started_epoch: float,
                  timeout_s: float) -> tuple[bool, float | None]:
    """Wait until ``flwr run`` exits or ``timeout_s`` passes, watching for round 1: whether it timed out, and
    the seconds to round 1 if seen."""
    deadline = time.monotonic() + timeout_s
    round1 = None
    while proc.poll() is None:
        if round1 is None:
            round1 = _round1_seconds(run_dir, started_epoch)
        if time.monotonic() >= deadline:
            return True, round1
        time.sleep(POLL_SECONDS)
    return False, round1 if round1 is not None else _round1_seconds(run_dir, started_epoch)


def prepare_launch(run_config: Mapping[str, Any], workdir: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The run directory ``output-dir/run-name`` of ``run_config`` (refused when it already holds a run and
    ``resume`` is off), the created ``workdir`` and the log path of one launch."""
    if not run_config.get("output-dir") or not run_config.get("run-name"):
        raise ValueError("run_config needs 'output-dir' (absolute) and 'run-name' so that the launcher "
                         "knows where the ServerApp writes its results")
    run_dir = run_directory(str(run_config["output-dir"]), str(run_config["run-name"]), "")
    if (run_dir / METRICS_FILE).exists() and not run_config.get("resume"):
        raise FileExistsError(f"{run_dir} already holds a run (the ServerApp would refuse it); "
                              "choose another run-name or remove it")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return run_dir, workdir, workdir / f"{run_config['run-name']}.log"


def run_logged(command: list[str], cwd: Path, env: Mapping[str, str], log_path: Path, preamble: str, run_dir: Path,
               started_epoch: float, timeout_s: float) -> tuple[subprocess.Popen, bool, float | None]:
    """Run ``command`` in its own session, its output (after ``preamble`` and the command line) in
    ``log_path``, until it exits or ``timeout_s`` passes (then it is stopped); the process, whether
    it timed out, and the seconds to round 1's row (:func:`wait_for_exit`)."""
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"{preamble}$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            timed_out, round1 = wait_for_exit(proc, run_dir, started_epoch, timeout_s)
        finally:
            _stop_process_group(proc)
    return proc, timed_out, round1


def error_lines(log_text: str, limit: int = 3) -> list[str]:
    """The last distinct ``SomeError: message`` lines of a log (the ServerApp's failure)."""
    found: list[str] = []
    for line in log_text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if ERROR_LINE.match(line) and line not in found:
            found.append(line)
    return found[-limit:]


def query_status(run_id: str, project_dir: Path, env: Mapping[str, str]) -> tuple[str | None, str]:
    """``flwr ls --run-id ID --format json``: the run's status and status details (``None`` if unavailable)."""
    try:
        out = subprocess.run([flwr_executable(), "ls", "--run-id", run_id, "--format", "json"],
                             cwd=project_dir, env=dict(env), capture_output=True, text=True,
                             timeout=LS_TIMEOUT_SECONDS, check=False).stdout
        runs = json.loads(out[out.index("{"):]).get("runs", [])
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return None, ""
    run = next((r for r in runs if str(r.get("run-id")) == run_id), {})
    return run.get("status"), str(run.get("status-details") or "")


def judge(run_dir: Path, log_text: str, status: str | None, details: str, timed_out: bool,
          timeout_s: float) -> str:
    """Why a launch failed, or "" if it succeeded."""
    errors = "; ".join(([details] if details else []) + error_lines(log_text))
    if timed_out:
        return f"timed out after {timeout_s:.0f} s" + (f"; {errors}" if errors else "")
    if LOCAL_SUPERLINK_STARTED not in log_text:
        return "flwr run did not start its own local SuperLink (port taken?); " + (errors or log_text[-500:])
    if status is not None and status.endswith(":failed"):
        return f"run status {status}: " + (errors or "see the log")
    if not (run_dir / SUMMARY_FILE).exists():
        return f"no {SUMMARY_FILE} in {run_dir} (status {status}): " + (errors or "see the log")
    return ""


def run_flwr(project_dir: str | os.PathLike, run_config: Mapping[str, Any], *, num_supernodes: int,
             num_gpus_per_client: float = 0.0, num_cpus_per_client: int = 1, timeout_s: float,
             workdir: str | os.PathLike, runtime_dependency_installation: bool = False,
             ray_address: str | None = None) -> LaunchResult:
    """Run one Flower simulation with ``flwr run --stream``, isolated, and clean up after it.

    ``run_config``: run-config overrides (kebab-case keys) that must hold ``output-dir`` (absolute) and
    ``run-name``: the results land in ``output-dir/run-name``; ``num_supernodes`` SuperNodes with Ray resources
    ``num_gpus_per_client`` and ``num_cpus_per_client`` per ClientApp; stopped and reported failed after
    ``timeout_s``; ``workdir``: where the log and the run config (TOML) are written;
    ``runtime_dependency_installation``: let the SuperLink ``uv sync`` the app's dependencies (Flower's default;
    off: this environment); ``ray_address``: an existing Ray cluster to join (``RAY_ADDRESS``;
    :class:`deploy.ray_cluster.LocalRayCluster`; None: Ray starts its own).

    Returns the :class:`LaunchResult` of the last attempt: a run whose local SuperLink did not start in time
    (:data:`SUPERLINK_START_TIMED_OUT`, nothing ran) is launched again, up to :data:`SUPERLINK_START_ATTEMPTS`
    times; the log says which attempt it is.
    """
    project_dir = Path(project_dir).resolve()
    run_dir, workdir, log_path = prepare_launch(run_config, workdir)
    config_path = write_run_config(run_config, workdir / f"{run_config['run-name']}.run-config.toml",
                                   header=f"run config of {run_config['run-name']}, written by the launcher")
    command = [flwr_executable(), "run", ".", "--stream", "--run-config", str(config_path),
               "--federation-config", federation_config(num_supernodes, num_cpus_per_client, num_gpus_per_client)]
    for attempt in range(1, SUPERLINK_START_ATTEMPTS + 1):  # a fresh FLWR_HOME and ports each
        result = _launch_once(command, project_dir, run_dir, log_path, timeout_s, attempt,
                              runtime_dependency_installation=runtime_dependency_installation, ray_address=ray_address)
        if result.run_id is not None or SUPERLINK_START_TIMED_OUT not in log_path.read_text(encoding="utf-8",
                                                                                             errors="replace"):
            break  # it ran (or failed for another reason): no second launch
    return result


def _launch_once(command: list[str], project_dir: Path, run_dir: Path, log_path: Path, timeout_s: float,
                 attempt: int, *, runtime_dependency_installation: bool, ray_address: str | None) -> LaunchResult:
    """One ``flwr run`` of :func:`run_flwr` with its own FLWR_HOME, ports and marker, cleaned up after."""
    marker = uuid.uuid4().hex
    flwr_home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
    env = launch_environment(flwr_home, marker, runtime_dependency_installation=runtime_dependency_installation,
                             ray_address=ray_address)
    started, started_epoch = time.monotonic(), time.time()
    status, details, stopped, leftovers = None, "", [], []
    try:
        isolation = {k: env[k] for k in ("FLWR_HOME", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT",
                                          "FLWR_LOCAL_CONTROL_API_PORT", MARKER_ENV)}
        again = (f"# launcher: attempt {attempt} of {SUPERLINK_START_ATTEMPTS}: the local SuperLink of the attempt "
                 "before did not start in time\n") if attempt > 1 else ""
        _, timed_out, round1 = run_logged(command, project_dir, env, log_path, f"{again}# launcher: {isolation}\n",
                                          run_dir, started_epoch, timeout_s)
        wall = time.monotonic() - started
        log_text = log_path.read_text(encoding="utf-8", errors="replace")
        run_id = match.group(1) if (match := RUN_ID_PATTERN.search(log_text)) else None  # "Successfully started run"
        if run_id is not None and not timed_out:
            status, details = query_status(run_id, project_dir, env)
    finally:
        stopped, leftovers = stop(find_processes(has_environment(MARKER_ENV, marker)), STOP_GRACE_SECONDS)
        shutil.rmtree(flwr_home, ignore_errors=True)
    reason = judge(run_dir, log_text, status, details, timed_out, timeout_s)
    if leftovers and not reason:
        reason = f"processes {leftovers} of this launch survived SIGKILL"
    return LaunchResult(success=not reason, reason=reason, run_dir=run_dir, log_path=log_path,
                        wall_seconds=wall, seconds_to_round1=round1, run_id=run_id, status=status,
                        command=command, launch_id=marker, stopped_pids=stopped, leftover_pids=leftovers)

