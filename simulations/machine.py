"""A short description of the machine, software and code a comparison ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import psutil


def code_version(project_dir: Path, outputs: Path | None = None) -> str | None:
    """The git commit of the Flower app at ``project_dir`` (with " and uncommitted changes" when a tracked
    file under it differs from that commit; the ``outputs`` directory, where the runs are written, does not
    count); ``None`` where it is no git checkout."""
    project_dir = Path(project_dir).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(project_dir), *args], capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()
    scope = ["--", "."]
    if outputs is not None and Path(outputs).resolve().is_relative_to(project_dir):
        scope.append(f":(exclude){Path(outputs).resolve().relative_to(project_dir).as_posix()}")
    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", *scope)
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" and uncommitted changes" if changed else "")


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a ``/proc`` file (None: no such line or file)."""
    try:
        return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                     if line.startswith(key)), None)
    except OSError:
        return None


def _gpus() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a description must never fail
        return []


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict[str, object]:
    """CPU, cores, memory, GPUs, OS and the versions that matter for the numbers."""
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory-gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "flwr": _version("flwr"),
        "ray": _version("ray"),
    }


def machine_line(machine: dict[str, object]) -> str:
    """One line for a report: ``8 x Intel ..., 31.2 GiB RAM, no GPU; Linux ...; torch ...``."""
    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"  # type: ignore[arg-type]
    memory = machine.get("memory-gib")
    ram = f"{memory} GiB RAM" if memory is not None else "RAM unknown"
    return (f"{machine.get('cores')} x {machine.get('cpu')}, {ram}, {gpus}; {machine.get('os')}; "
            f"Python {machine.get('python')}, torch {machine.get('torch')}, flwr {machine.get('flwr')}, "
            f"ray {machine.get('ray')}")
