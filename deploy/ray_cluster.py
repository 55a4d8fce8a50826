"""A Ray cluster on one machine for a ``flwr run`` simulation to join: a head and worker nodes.

Flower's simulation engine is Ray: the SuperLink's simulation process calls ``ray.init()``,
which joins the cluster ``RAY_ADDRESS`` names (``run_flwr(..., ray_address=cluster.address)`` sets it
for the SuperLink it starts). On real machines the same cluster is::

    ray start --head --port 6379 --num-cpus 8 --num-gpus 1       # on the head
    ray start --address HEAD:6379 --num-cpus 8 --num-gpus 1       # on every other machine
    RAY_ADDRESS=HEAD:6379 flwr run . --stream \
        --federation-config "num-supernodes=64 client-resources-num-cpus=2 client-resources-num-gpus=0.25"

(each ClientApp actor takes the per-client resources the federation config names, wherever Ray
places it). Here :class:`LocalRayCluster` starts a head and worker nodes on loopback, each with its
own resource label (``node-0``, ``node-1``, ...), in a temp dir of its own, and stops every process
it started by PID; :func:`actor_nodes` reads from Ray's own records (the GCS actor table) which
node each ClientApp actor ran on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

from resist_fl.run.processes import find_processes, stop, tree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayUnavailable(RuntimeError):
    """``ray start`` cannot run on this machine (the reason is the message)."""


class LocalRayCluster:
    """``with LocalRayCluster(nodes=2, cpus_per_node=1) as cluster:`` a head and ``nodes - 1``
    workers on 127.0.0.1; ``cluster.address`` is what ``RAY_ADDRESS`` takes."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, timeout_s: float = 120.0) -> None:
        if nodes < 1:
            raise ValueError(f"nodes = {nodes}: expected at least 1")
        self.nodes, self.cpus_per_node, self.timeout_s = nodes, cpus_per_node, timeout_s
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.pids: list[int] = []

    def _ray(self, *args: str) -> None:
        ray = shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        if ray is None:
            raise RayUnavailable("the `ray` command is not installed (flwr[simulation] brings it)")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run([ray, "start", *args, "--disable-usage-stats", "--temp-dir", str(self.temp_dir)],
                                capture_output=True, text=True, timeout=self.timeout_s, env=env)
        if result.returncode != 0:
            raise RayUnavailable(f"ray start {' '.join(args)} failed: {(result.stderr or result.stdout)[-1500:]}")

    def _own_processes(self) -> list[psutil.Process]:
        """The processes of this cluster (their command lines name its temp dir or GCS address) and
        their descendants."""
        def ours(process: psutil.Process) -> bool:
            cmdline = " ".join(process.cmdline())
            return str(self.temp_dir) in cmdline or self.address in cmdline
        return tree(find_processes(ours))

    def __enter__(self) -> "LocalRayCluster":
        try:
            self._ray("--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port), "--num-cpus",
                      str(self.cpus_per_node), "--num-gpus", "0", "--resources", json.dumps({"node-0": 1}),
                      "--include-dashboard", "false", "--dashboard-agent-listen-port", str(_free_port()),
                      "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()))
            for index in range(1, self.nodes):
                self._ray("--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus",
                          str(self.cpus_per_node), "--num-gpus", "0", "--resources", json.dumps({f"node-{index}": 1}),
                          "--dashboard-agent-listen-port", str(_free_port()), "--runtime-env-agent-port",
                          str(_free_port()), "--metrics-export-port", str(_free_port()),
                          "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()))
            self.wait_for_nodes()
        except BaseException:
            self.stop()
            raise
        self.pids = sorted(p.pid for p in self._own_processes())
        return self

    def wait_for_nodes(self) -> list[dict]:
        """The alive nodes of the cluster (by Ray's GCS), once all ``nodes`` have joined."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            nodes = [n for n in self.ray_nodes() if n.get("Alive")]
            if len(nodes) >= self.nodes or time.monotonic() > deadline:
                return nodes
            time.sleep(1.0)

    def ray_nodes(self) -> list[dict]:
        """``ray.nodes()`` of the cluster, read by a short-lived driver in a subprocess."""
        return json.loads(self._driver("import ray, json; ray.init(address=ADDRESS, log_to_driver=False); "
                                       "print(json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources')} "
                                       "for n in ray.nodes()]))"))

    def actor_placement(self, class_name: str = "ClientAppActor") -> list[tuple[str, int]]:
        """``(node label, pid)`` of every ``class_name`` actor in Ray's GCS actor table."""
        return [tuple(x) for x in json.loads(self._driver(
            "import ray, json; from ray._private import state; ray.init(address=ADDRESS, log_to_driver=False); "
            "labels = {n['NodeID']: next(k for k in n['Resources'] if k.startswith('node-')) for n in ray.nodes()}; "
            "print(json.dumps([[labels.get(a['Address']['NodeID'], '?'), a.get('Pid', 0)] "
            "for a in state.actors().values() "
            f"if a.get('ActorClassName', '').endswith({class_name!r})]))"))]

    def actor_nodes(self, class_name: str = "ClientAppActor") -> Counter:
        """How many ``class_name`` actors Ray's GCS recorded on each node (by its ``node-<i>`` label)."""
        return Counter(label for label, _ in self.actor_placement(class_name))

    def _driver(self, code: str) -> str:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run([sys.executable, "-c", f"ADDRESS = {self.address!r}\n{code}"], capture_output=True,
                                text=True, timeout=self.timeout_s, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"Ray driver failed: {result.stderr[-1500:]}")
        return result.stdout.strip().splitlines()[-1]

    def stop(self) -> tuple[list[int], list[int]]:
        """Stop every process of this cluster by PID (``ray stop`` would stop every Ray on the
        machine); return the PIDs signalled and those still alive (empty when all are gone)."""
        signalled, alive = stop(self._own_processes())
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return signalled, alive

    def __exit__(self, *exc_info) -> None:
        self.stop()
