"""Finding and stopping the processes a launch started, with psutil (one helper for the study
launcher, the local-SuperLink tool and the local deployment cluster).

Flower's binaries start helpers detached in sessions of their own (``flower-superlink`` starts
``flower-superexec``), and a ``flwr run`` simulation leaves a SuperLink behind, so neither a
process group nor a parent PID finds everything. :func:`find_processes` selects live processes by
a predicate (an environment marker, a command name, the FLWR_HOME they serve);
``psutil.Process`` objects remember their creation time, so a PID reused by another program is
never signalled. :func:`stop` terminates, waits, and kills what is left.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

STOP_GRACE_SECONDS = 10.0
"""Seconds between SIGTERM and SIGKILL."""


def is_live(process: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has ended; only its exit status is left)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def find_processes(match: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    """Live processes of this machine (this one excepted) for which ``match`` is true, by PID;
    processes that end or deny access while being looked at are skipped."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if is_live(process) and match(process):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(found, key=lambda p: p.pid)


def has_environment(key: str, value: str) -> Callable[[psutil.Process], bool]:
    """A predicate: the process's environment holds ``key=value``."""
    return lambda process: process.environ().get(key) == value


def serves_flwr_home(name: str, flwr_home: Path, default_home: Path) -> Callable[[psutil.Process], bool]:
    """A predicate: one of this user's processes whose program is ``name`` (e.g. ``flower-superlink``)
    and whose FLWR_HOME (``default_home`` when unset) is ``flwr_home``."""
    wanted = Path(flwr_home).expanduser().resolve()

    def match(process: psutil.Process) -> bool:
        if process.uids().real != os.getuid():
            return False
        if not any(Path(arg).name == name for arg in process.cmdline()[:3] if arg):
            return False
        home = process.environ().get("FLWR_HOME")
        return (Path(home).expanduser().resolve() if home else Path(default_home).expanduser().resolve()) == wanted

    return match


def tree(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """``processes`` and all their live descendants (``children(recursive=True)``), once each."""
    seen: dict[tuple[int, float], psutil.Process] = {}
    for process in processes:
        try:
            family = [process, *process.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            family = [process]
        for member in family:
            try:
                seen.setdefault((member.pid, member.create_time()), member)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return [p for p in seen.values() if is_live(p)]


def stop(processes: Iterable[psutil.Process], grace_s: float = STOP_GRACE_SECONDS) -> tuple[list[int], list[int]]:
    """SIGTERM ``processes``, SIGKILL those left after ``grace_s`` (``wait_procs``).

    Returns
    -------
    (list of int, list of int)
        PIDs signalled, and PIDs still alive afterwards (empty when all are gone).
    """
    live = [p for p in processes if is_live(p)]
    for process in live:
        try:
            process.terminate()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    _, alive = psutil.wait_procs(live, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    _, alive = psutil.wait_procs(alive, timeout=5.0)
    return sorted(p.pid for p in live), sorted(p.pid for p in alive if is_live(p))
