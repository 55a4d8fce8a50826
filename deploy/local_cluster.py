"""A real Flower deployment on loopback: TLS, SuperNode authentication, N SuperNodes.

:class:`LocalCluster` creates certificates and keys (:mod:`deploy.make_certs`),
starts ``flower-superlink`` with TLS and ``--enable-supernode-auth``, registers
each SuperNode's public key with ``flwr supernode register``, starts one
``flower-supernode`` per partition and runs the app with
``flwr run APP NAME --stream``. Everything it starts — including the
``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` processes that
Flower spawns, some in sessions of their own — is stopped on exit (SIGTERM,
then SIGKILL), also when a step fails.

Layout of the working directory::

    certs/       ca.crt, server.crt/.key, supernode-<i>, supernode-<i>.pub
    flwr-home/   FLWR_HOME of every process (config.toml with the connection)
    logs/        flower-superlink.log, supernode-<i>.log, flwr-run-<run-name>.log
    runs/        the app's output-dir unless the run config names another

Usage::

    python -m deploy.local_cluster --supernodes 2 \\
        --run-config "num-server-rounds=2 dataset='synthetic' model='preact_resnet18'"
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import psutil

from deploy.make_certs import DeploymentFiles, make_certs, public_key_path, write_supernode_key
from resist_fl.run.cli_config import free_port, render_config, toml_value, write_run_config
from resist_fl.run.outputs import METRICS_FILE, SUMMARY_FILE
from resist_fl.run.processes import is_live, stop, tree

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink
CONNECTION = "local-cluster"
SUPERLINK = "flower-superlink"
SUPERNODE = "flower-supernode"
FLWR = "flwr"

logger = logging.getLogger("deploy.local_cluster")


class ClusterError(RuntimeError):
    """A cluster process failed, or a run did not finish; the message quotes its log."""


# ------------------------------------------------------------------ helpers


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Parameters
    ----------
    host, port
        The address to probe.
    timeout : float
        Seconds before :class:`TimeoutError`.
    alive : callable
        Returns False when the process that should open the port has died;
        then :class:`ClusterError` is raised at once.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise ClusterError(f"the process that should listen on {host}:{port} exited")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def find_executable(name: str) -> str | None:
    """``name`` from this interpreter's bin directory, else from PATH (None if absent)."""
    return shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))


def child_environment(flwr_home: Path, threads: int | None = None) -> dict[str, str]:
    """The environment of every cluster process.

    This interpreter's bin directory comes first on PATH (``flower-superlink``
    and ``flower-supernode`` start ``flower-superexec`` from PATH), and
    ``FLWR_HOME`` isolates Flower's config and app cache from ``~/.flwr``.

    Parameters
    ----------
    flwr_home : Path
        The ``FLWR_HOME`` of the cluster.
    threads : int, optional
        ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for processes on a shared
        host, unless already set in this environment.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, str(threads))
    return env


def parse_config_string(text: str) -> dict[str, Any]:
    """Parse Flower's ``'k1=v1 k2=v2'`` syntax exactly as ``flwr run --run-config`` does."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text])) if text.strip() else {}


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# --------------------------------------------------------- process handling


class ProcessSupervisor:
    """Starts processes, logs each to a file, and stops them with all their descendants.

    Flower's binaries start helpers in sessions of their own
    (``flower-superlink`` starts ``flower-superexec`` detached), so a process
    group signal is not enough: the supervisor records every descendant it sees
    (``psutil.Process``, which remembers its creation time, so a reused PID is never
    signalled) and stops each (:mod:`resist_fl.run.processes`).
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.log_dir, self.env, self.cwd = log_dir, dict(env), cwd
        self.processes: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}  # every process of the trees (psutil guards PID reuse)
        self._lock = threading.Lock()
        log_dir.mkdir(parents=True, exist_ok=True)

    def log_path(self, name: str) -> Path:
        """The log file of the process called ``name``."""
        return self.log_dir / f"{name}.log"

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen:
        """Start ``args`` in a new session with stdout and stderr going to ``logs/<name>.log``."""
        if name in self.processes and self.processes[name].poll() is None:
            raise ValueError(f"a process called {name!r} is already running")
        with open(self.log_path(name), "wb") as log:
            log.write(f"$ {subprocess.list2cmdline(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.cwd, start_new_session=True)
        logger.info("started %s (pid %d)", name, proc.pid)
        self.processes[name] = proc
        self.refresh()
        return proc

    def refresh(self) -> list[psutil.Process]:
        """Record the current descendants of the started processes; return the live ones."""
        with self._lock:
            roots = []
            for proc in self.processes.values():
                if proc.poll() is None:
                    try:
                        roots.append(psutil.Process(proc.pid))
                    except psutil.NoSuchProcess:
                        continue
            for member in tree([*roots, *self.seen.values()]):
                self.seen.setdefault(member.pid, member)
            return [p for p in self.seen.values() if is_live(p)]

    def alive(self) -> list[int]:
        """PIDs of recorded processes that are still running (zombies count as ended)."""
        return sorted(p.pid for p in self.refresh())

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every recorded process and its descendants, SIGKILL what is left after ``grace``."""
        stop(self.refresh(), grace)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=1.0)  # reap our direct children
            except subprocess.TimeoutExpired:
                pass
        if left := self.alive():
            logger.warning("processes still alive after SIGKILL: %s", left)


# ---------------------------------------------------------------- the cluster


@dataclass
class RunResult:
    """The outcome of :meth:`LocalCluster.run`.

    Attributes
    ----------
    run_dir : Path
        The app's run directory (``output-dir/run-name``).
    summary : dict
        The parsed ``summary.json``.
    metrics : list of dict
        The rows of ``metrics.jsonl``, one per round.
    seconds : float
        Wall time of ``flwr run``.
    log : Path
        The captured output of ``flwr run --stream``.
    """

    run_dir: Path
    summary: dict
    metrics: list[dict]
    seconds: float
    log: Path


@dataclass
class LocalCluster:
    """A SuperLink and N SuperNodes on loopback with TLS and SuperNode authentication.

    Use it as a context manager (or call :meth:`start` and :meth:`stop`)::

        with LocalCluster(workdir, num_supernodes=2) as cluster:
            result = cluster.run({"num-server-rounds": 2, "dataset": "synthetic"})

    Parameters
    ----------
    workdir : Path
        Receives certificates, keys, ``FLWR_HOME``, logs and (by default) run
        outputs. Should lie outside the app directory: ``flwr run`` packs the
        app directory's ``*.json``/``*.toml``/``*.md`` files (except those
        ``.gitignore`` excludes) into the app bundle.
    num_supernodes : int
        SuperNodes to start; node ``i`` gets ``partition-id=i num-partitions=N``.
    app_dir : Path
        The Flower app to run (default: this project).
    node_config : mapping, optional
        Extra ``--node-config`` entries for every SuperNode (e.g. ``data-path``).
    threads : int, optional
        ``OMP_NUM_THREADS`` of the cluster's processes (default: CPUs / nodes).
    host : str
        Loopback address to bind and connect to.
    """

    workdir: Path
    num_supernodes: int = 2
    app_dir: Path = PROJECT_ROOT
    node_config: Mapping[str, Any] = field(default_factory=dict)
    threads: int | None = None
    host: str = "127.0.0.1"
    files: DeploymentFiles | None = field(default=None, init=False)
    port: int | None = field(default=None, init=False)
    supervisor: ProcessSupervisor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).expanduser().resolve()
        self.app_dir = Path(self.app_dir).expanduser().resolve()
        if self.num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {self.num_supernodes}")
        if self.workdir.is_relative_to(self.app_dir):
            logger.warning("%s lies inside the app directory: its json/toml/md files may end up in the app "
                           "bundle unless .gitignore excludes them", self.workdir)
        if self.threads is None:
            self.threads = max(1, (os.cpu_count() or 1) // self.num_supernodes)

    # -- paths ---------------------------------------------------------------
    @property
    def flwr_home(self) -> Path:
        """``FLWR_HOME`` of all cluster processes and of ``flwr`` calls."""
        return self.workdir / "flwr-home"

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime API share one port)."""
        if self.port is None:
            raise ClusterError("the cluster is not started")
        return f"{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> LocalCluster:
        """Create keys, start the SuperLink, register the keys and start the SuperNodes.

        On any failure everything started so far is stopped before the error propagates.
        """
        for binary in (SUPERLINK, SUPERNODE, FLWR):
            if find_executable(binary) is None:
                raise ClusterError(f"{binary} not found in {VENV_BIN} or on PATH")
        self.supervisor = ProcessSupervisor(self.workdir / "logs", child_environment(self.flwr_home, self.threads),
                                            cwd=self.workdir)
        atexit.register(self.stop)
        try:
            self.files = make_certs(self.workdir / "certs", self.num_supernodes)
            self.start_superlink(timeout)
            self.write_connection()
            for key in self.files.supernode_keys:
                self.register(public_key_path(key))
            for i, key in enumerate(self.files.supernode_keys):
                self.start_supernode(key, {"partition-id": i, "num-partitions": self.num_supernodes,
                                           **self.node_config}, name=f"supernode-{i}")
            self.wait_until_online(self.num_supernodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process the cluster started, with all their descendants (idempotent)."""
        if self.supervisor is not None:
            self.supervisor.stop()
        atexit.unregister(self.stop)

    # -- steps -----------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> subprocess.Popen:
        """Start ``flower-superlink`` with TLS and SuperNode authentication on a free port."""
        self.port = free_port(self.host)
        proc = self.supervisor.start(SUPERLINK, [
            find_executable(SUPERLINK),
            "--ssl-ca-certfile", str(self.files.ca_cert),
            "--ssl-certfile", str(self.files.server_cert),
            "--ssl-keyfile", str(self.files.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", self.host, "--port", str(self.port),
        ])
        try:
            wait_for_port(self.host, self.port, timeout, alive=lambda: proc.poll() is None)
        except (ClusterError, TimeoutError) as error:
            raise ClusterError(f"{SUPERLINK} did not start: {error}\n"
                               f"{log_tail(self.supervisor.log_path(SUPERLINK))}") from error
        return proc

    def write_connection(self) -> Path:
        """Write ``FLWR_HOME/config.toml`` with the TLS connection ``[superlink.local-cluster]``."""
        path = self.flwr_home / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(connection_toml(CONNECTION, self.address, self.files.ca_cert, default=True))
        return path

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against the cluster's ``FLWR_HOME``; raise on failure."""
        cmd = [find_executable(FLWR), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.supervisor.env, cwd=self.app_dir,
                              timeout=timeout)
        if done.returncode != 0:
            raise ClusterError(f"{subprocess.list2cmdline(cmd)} exited {done.returncode}:\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def register(self, public_key: Path) -> int:
        """Register a SuperNode public key (``flwr supernode register``); return the node id."""
        done = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        return int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])

    def nodes(self) -> list[dict]:
        """The SuperLink's node list (``flwr supernode list --format json``)."""
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        return json.loads(done.stdout[done.stdout.index("{"):])["nodes"]

    def start_supernode(self, private_key: Path, node_config: Mapping[str, Any],
                        name: str) -> subprocess.Popen:
        """Start a ``flower-supernode`` that authenticates with ``private_key``.

        Parameters
        ----------
        private_key : Path
            The node's OpenSSH EC private key (its public key must be registered
            for the SuperLink to accept the node).
        node_config : mapping
            The node's ``--node-config`` (e.g. ``partition-id``, ``num-partitions``).
        name : str
            Name of the process and of its log file.
        """
        return self.supervisor.start(name, [
            find_executable(SUPERNODE),
            "--root-certificates", str(self.files.ca_cert),
            "--auth-supernode-private-key", str(private_key),
            "--superlink", self.address,
            "--port", str(free_port(self.host)),  # each SuperNode's own Runtime API port
            "--node-config", render_config(node_config),
        ])

    def new_unregistered_key(self, name: str = "unregistered") -> Path:
        """A fresh SuperNode key pair that is NOT registered at the SuperLink."""
        return write_supernode_key(self.workdir / "certs" / name)

    def wait_until_online(self, count: int, timeout: float = 60.0) -> list[dict]:
        """Wait until ``count`` registered nodes are online; fail early if a SuperNode exits."""
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.supervisor.processes.items():
                if name.startswith("supernode-") and proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode}:\n"
                                       f"{log_tail(self.supervisor.log_path(name))}")
            online = [n for n in self.nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise ClusterError(f"{len(online)} of {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(0.5)

    def run(self, run_config: Mapping[str, Any] | None = None, timeout: float = 1800.0,
            echo: TextIO | None = None) -> RunResult:
        """Run the app with ``flwr run APP local-cluster --stream`` and check that it finished.

        ``flwr run --stream`` exits 0 even when the ServerApp fails, so success
        means: the run directory holds a ``summary.json`` written by this run.

        Parameters
        ----------
        run_config : mapping, optional
            ``--run-config`` overrides. ``output-dir`` defaults to
            ``WORKDIR/runs`` and ``run-name`` to a fresh time stamp, so the run
            directory is known.
        timeout : float
            Seconds before ``flwr run`` is killed and :class:`ClusterError` raised.
        echo : text stream, optional
            Also copy the streamed log there (e.g. ``sys.stdout``).

        Returns
        -------
        RunResult
        """
        config = dict(run_config or {})
        config.setdefault("output-dir", str(self.workdir / "runs"))
        config.setdefault("run-name", f"local-cluster-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
        output_dir = Path(os.path.expanduser(str(config["output-dir"])))
        if not output_dir.is_absolute():
            raise ValueError(f"output-dir must be absolute, got {config['output-dir']!r}")
        run_dir = output_dir / str(config["run-name"])
        summary_path = run_dir / SUMMARY_FILE
        log_path = self.supervisor.log_path(f"flwr-run-{run_dir.name}")
        config_path = write_run_config(config, log_path.with_suffix(".run-config.toml"))
        cmd = [find_executable(FLWR), "run", str(self.app_dir), CONNECTION, "--stream",
               "--run-config", str(config_path)]
        started_at, started = time.time(), time.monotonic()
        with open(log_path, "w") as log:
            log.write(f"$ {subprocess.list2cmdline(cmd)}\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=self.supervisor.env, cwd=self.app_dir, start_new_session=True)
            tee = threading.Thread(target=_tee, args=(proc.stdout, [log] + ([echo] if echo else [])), daemon=True)
            tee.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ClusterError(f"flwr run did not end within {timeout:.0f} s:\n{log_tail(log_path)}") from None
            finally:
                if proc.poll() is None:  # timed out, or interrupted (KeyboardInterrupt, SIGTERM)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                tee.join(timeout=5.0)
        seconds = time.monotonic() - started
        if not summary_path.exists() or summary_path.stat().st_mtime < started_at - 1.0:
            raise ClusterError(f"the run did not finish ({summary_path} missing); flwr run exited "
                               f"{proc.returncode}:\n{log_tail(log_path)}\n--- superlink ---\n"
                               f"{log_tail(self.supervisor.log_path(SUPERLINK))}")
        metrics_path = run_dir / METRICS_FILE
        metrics = ([json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
                   if metrics_path.exists() else [])
        return RunResult(run_dir, json.loads(summary_path.read_text()), metrics, seconds, log_path)


def connection_toml(name: str, address: str, root_certificates: Path | None, default: bool = False) -> str:
    """A Flower ``config.toml`` with the connection ``[superlink.<name>]``.

    Parameters
    ----------
    name : str
        The connection's name (``flwr run . NAME``).
    address : str
        ``host:port`` of the SuperLink.
    root_certificates : Path or None
        The CA certificate that signed the SuperLink's; None for an insecure link.
    default : bool
        Also make it the default connection.
    """
    lines = ["[superlink]", f"default = {toml_value('default', name)}", ""] if default else []
    lines += [f"[superlink.{name}]", f"address = {toml_value('address', address)}"]
    lines.append(f"root-certificates = {toml_value('root-certificates', str(root_certificates))}" if root_certificates
                 else "insecure = true")
    return "\n".join(lines) + "\n"


def _tee(source: TextIO, sinks: Iterable[TextIO]) -> None:
    sinks = list(sinks)
    for line in source:
        for sink in sinks:
            sink.write(line)
            sink.flush()


# ----------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: start the cluster, run the app once, stop everything; exit 0 on success."""
    parser = argparse.ArgumentParser(prog="python -m deploy.local_cluster",
                                     description="Run the app on a local TLS + SuperNode-auth Flower cluster.")
    parser.add_argument("--supernodes", type=int, default=2, help="number of SuperNodes (default 2)")
    parser.add_argument("--run-config", default="", help="flwr run --run-config overrides, 'k1=v1 k2=v2'")
    parser.add_argument("--node-config", default="",
                        help="extra --node-config for every SuperNode, e.g. \"data-path='/abs/data.npz'\"")
    parser.add_argument("--workdir", default=None,
                        help="certs, FLWR_HOME, logs and runs go here (default: a new temporary directory, kept)")
    parser.add_argument("--app", default=str(PROJECT_ROOT), help="Flower app directory (default: this project)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so `finally` stops the cluster

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="resist-fl-cluster-"))
    cluster = LocalCluster(workdir, args.supernodes, app_dir=Path(args.app),
                           node_config=parse_config_string(args.node_config))
    started = time.monotonic()
    try:
        cluster.start()
        logger.info("SuperLink %s with %d SuperNodes online after %.1f s; working directory %s",
                    cluster.address, args.supernodes, time.monotonic() - started, workdir)
        result = cluster.run(parse_config_string(args.run_config), timeout=args.timeout, echo=sys.stdout)
    except ClusterError as error:
        logger.error("%s", error)
        return 1
    finally:
        cluster.stop()
    logger.info("run finished in %.1f s (%d rounds); results in %s; logs in %s", result.seconds,
                len(result.metrics), result.run_dir, cluster.supervisor.log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
