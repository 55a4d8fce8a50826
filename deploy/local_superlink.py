"""Stop (or list) the local SuperLink that ``flwr run .`` starts in the background.

``flwr run .`` starts a local SuperLink the first time and leaves it running; it keeps the
environment it was started with (e.g. ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``), and no
``flwr`` command stops it. This finds it by PID: the ``flower-superlink`` processes of this user
whose ``FLWR_HOME`` is the given one (``~/.flwr`` when unset), and stops them with SIGTERM
(SIGKILL after a grace period), as the experiment launcher stops its own.

    python -m deploy.local_superlink status
    python -m deploy.local_superlink stop
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from resist_fl.run.processes import find_processes, serves_flwr_home, stop

SUPERLINK = "flower-superlink"
DEFAULT_FLWR_HOME = Path("~/.flwr").expanduser()


def superlink_pids(flwr_home: Path = DEFAULT_FLWR_HOME) -> list[int]:
    """PIDs of this user's live ``flower-superlink`` processes serving ``flwr_home``."""
    return [p.pid for p in find_processes(serves_flwr_home(SUPERLINK, flwr_home, DEFAULT_FLWR_HOME))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local_superlink", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("status", "stop"))
    parser.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", DEFAULT_FLWR_HOME)),
                        help="the FLWR_HOME the SuperLink serves (default: $FLWR_HOME or ~/.flwr)")
    args = parser.parse_args(argv)
    pids = superlink_pids(args.flwr_home)
    if args.action == "status" or not pids:
        print(f"local SuperLink for {args.flwr_home}: " + (f"running, PID {', '.join(map(str, pids))}" if pids
                                                             else "not running"))
        return 0
    stopped, left = stop(find_processes(serves_flwr_home(SUPERLINK, args.flwr_home, DEFAULT_FLWR_HOME)))
    print(f"stopped the local SuperLink for {args.flwr_home} (PID {', '.join(map(str, stopped))})"
          + (f"; still alive: {left}" if left else ""))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
