"""Run the real ServerApp main with the real ClientApp in-process: no SuperLink, no Ray.

What the tests and the runner's in-process backend (:mod:`simulations.inprocess_launcher`) use to
run whole federations fast on one machine; ``flwr run .`` remains the real thing.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import app as client_app
from resist_fl.flower.metering import MeteredGrid
from server_app.app import main as server_main
from simulations.inprocess_grid import InProcessGrid


def run_inprocess(run_config: dict, num_nodes: int = 3, client: ClientApp = client_app,
                  server: Callable[[InProcessGrid, Context], None] = server_main, **grid_kwargs) -> InProcessGrid:
    """Run one whole ServerApp main on an :class:`InProcessGrid` (the project's ServerApp and
    ClientApp unless ``server`` / ``client`` are given, e.g. another app's); return the grid."""
    grid = InProcessGrid(client, num_nodes=num_nodes, run_config=run_config, **grid_kwargs)
    server(MeteredGrid(grid, replies_ready_on_push=True),  # every node runs while it is pushed
           Context(run_id=grid.run.run_id, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    return grid


if __name__ == "__main__":  # python -m simulations.inprocess RUN-CONFIG.toml NUM_NODES (what the launcher writes)
    import sys
    import tomllib
    from pathlib import Path

    run_inprocess(tomllib.loads(Path(sys.argv[1]).read_text(encoding="utf-8")), num_nodes=int(sys.argv[2]))
