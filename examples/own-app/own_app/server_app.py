"""The app's own ServerApp: its own model and evaluation, resist-fl's ResIST and RoundRecorder.

The recorder gives it what the project's ServerApp writes: a ``metrics.jsonl`` row per round
(metered bytes, the replies' figures, this app's evaluation), ``nodes.jsonl``, a checkpoint to
``resume`` from, ``model.pt`` and ``summary.json``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from own_app.task import STAGES, OwnResNet, example_batch, load_test_data, test
from resist_fl import BlockLayout, ResIST, ScreenedFedAvg
from resist_fl.flower.round_recorder import RoundRecorder

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    seed, min_nodes = int(config["seed"]), int(config["min-nodes"])
    torch.manual_seed(seed)
    model = OwnResNet()
    layout = BlockLayout.from_model(model, example_batch(), stages=STAGES)  # adds the residual scales
    # the strategies' values are RunSettings fields (their defaults live there); a node's budget is
    # a share of the blocks here, since this app measures no FLOPs
    settings = {"min_train_nodes": min_nodes, "min_available_nodes": min_nodes, "seed": seed,
                "capacity_measure": "blocks"}
    if config["strategy"] == "resist":
        strategy = ResIST(layout, **settings)
    else:  # the baseline: FedAvg behind the same reply checks and node sampling (central evaluation only)
        strategy = ScreenedFedAvg(**settings)

    test_data, evaluated = load_test_data(), copy.deepcopy(model)

    def evaluation(run_round: int, state: dict[str, torch.Tensor], widths: frozenset[float]) -> dict[str, float]:
        evaluated.load_state_dict(state)  # the global model, ResIST's inference scales included
        loss, accuracy = test(evaluated, test_data)
        return {"loss": loss, "accuracy": accuracy}

    run_dir = Path(str(config["output-dir"])).expanduser() / str(config["run-name"])
    recorder = RoundRecorder(strategy, layout, run_dir, run_config=dict(config),
                             num_rounds=int(config["num-server-rounds"]), evaluation=evaluation,
                             resume=bool(config["resume"]))  # the strategy column is strategy.label
    # only the app's own hyper-parameters: the strategy stamps blocks, transport and run round itself
    train_config = ConfigRecord({"local-steps": int(config["local-steps"]), "batch-size": int(config["batch-size"]),
                                 "lr": float(config["lr"]), "seed": seed})
    recorder.start(grid, model.state_dict(), train_config=train_config)
    recorder.finish()
