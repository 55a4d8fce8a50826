"""Stop (or list) the local SuperLink that ``flwr run .`` starts in the background.

``flwr run .`` starts a local SuperLink the first time and leaves it running; it keeps the
environment it was started with (e.g. ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``), and no
``flwr`` command stops it. This finds it by PID: the ``flower-superlink`` processes of this user
whose ``FLWR_HOME`` is the given one (``~/.flwr`` when unset), and stops them with SIGTERM
(SIGKILL after a grace period), as the experiment launcher stops its own.

    python -m simulations.local_superlink status
    python -m simulations.local_superlink stop
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from simulations.launcher import stop_processes

SUPERLINK = "flower-superlink"
DEFAULT_FLWR_HOME = Path("~/.flwr").expanduser()


def _flwr_home_of(environ: bytes) -> Path:
    for item in environ.split(b"\0"):
        if item.startswith(b"FLWR_HOME="):
            return Path(os.fsdecode(item[len(b"FLWR_HOME="):])).expanduser().resolve()
    return DEFAULT_FLWR_HOME.resolve()


def superlink_pids(flwr_home: Path = DEFAULT_FLWR_HOME) -> list[int]:
    """PIDs of this user's live ``flower-superlink`` processes serving ``flwr_home`` (Linux /proc)."""
    wanted, pids = Path(flwr_home).expanduser().resolve(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not any(Path(os.fsdecode(arg)).name == SUPERLINK for arg in argv[:3] if arg):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if _flwr_home_of((entry / "environ").read_bytes()) == wanted:
                pids.append(int(entry.name))
        except (OSError, IndexError):  # gone, or not readable
            continue
    return sorted(pids)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.local_superlink", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("status", "stop"))
    parser.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", DEFAULT_FLWR_HOME)),
                        help="the FLWR_HOME the SuperLink serves (default: $FLWR_HOME or ~/.flwr)")
    args = parser.parse_args(argv)
    pids = superlink_pids(args.flwr_home)
    if args.action == "status" or not pids:
        print(f"local SuperLink for {args.flwr_home}: " + (f"running, PID {', '.join(map(str, pids))}" if pids
                                                             else "not running"))
        return 0
    stopped, left = stop_processes(lambda: superlink_pids(args.flwr_home))
    print(f"stopped the local SuperLink for {args.flwr_home} (PID {', '.join(map(str, stopped))})"
          + (f"; still alive: {left}" if left else ""))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
