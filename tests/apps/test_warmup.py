"""warmup-rounds: ResIST's first k rounds run as FedAvg (the full model), then sub-ResNets, in one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.flower.resist import ResIST
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

ROUNDS, WARMUP = 4, 2


@pytest.fixture
def warmup_config(tiny_config):
    return {**tiny_config, "num-server-rounds": ROUNDS, "warmup-rounds": WARMUP, "lr-schedule": "constant",
            "local-steps": 4}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """One uninterrupted warm-up run (its config and grid), shared by the tests below."""
    from tests.conftest import TINY_OVERRIDES, default_run_config

    config = {**default_run_config(), **TINY_OVERRIDES, "output-dir": str(tmp_path_factory.mktemp("runs")),
              "num-server-rounds": ROUNDS, "warmup-rounds": WARMUP, "lr-schedule": "constant", "local-steps": 4,
              "run-name": "whole"}
    return config, run_inprocess(config, num_nodes=3)


def state_of(config) -> dict[str, np.ndarray]:
    saved = torch.load(Path(config["output-dir"]) / config["run-name"] / "model.pt", weights_only=True)
    return {k: v.numpy() for k, v in saved["state_dict"].items()}


def test_warmup_sends_the_full_model_then_switches_at_round_k_plus_1(whole_run):
    warmup_config, grid = whole_run
    spec = ModelSpec(depths=(1, 1, 4, 1), num_classes=10, in_channels=3, base_width=8)
    layout = BlockLayout.from_spec(spec)
    full = set(layout.payload_keys())
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 3 * ROUNDS
    for index, message in enumerate(train):
        run_round = index // 3 + 1
        config = message.content["config"]
        if run_round <= WARMUP:
            assert "blocks" not in config and set(message.content["arrays"]) == full
        else:
            assert len(config["blocks"]) >= 1 and set(message.content["arrays"]) < full

    rows = read_metrics(Path(warmup_config["output-dir"]) / "whole")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert [r["phase"] for r in rows] == ["warmup"] * WARMUP + ["resist"] * (ROUNDS - WARMUP)
    full_bytes = rows[0]["bytes-down"]  # 3 full models (equal to FedAvg's: test_warmup_rounds_are_fedavg)
    assert full_bytes > 3 * sum(v.nbytes for k, v in state_of(warmup_config).items() if k in full)
    for row in rows:  # bytes as they really were: the full model to and from every node in warm-up
        if row["phase"] == "warmup":
            assert row["bytes-down"] == row["bytes-up"] == full_bytes
            assert row["held-fraction"] == row["inference-scale"] == 1.0
        else:
            assert row["bytes-down"] < 0.8 * full_bytes and row["inference-scale"] == pytest.approx(1 / 3)
    assert rows[-1]["cumulative-bytes"] == sum(r["bytes-down"] + r["bytes-up"] for r in rows)
    nodes = read_metrics(Path(warmup_config["output-dir"]) / "whole", "nodes.jsonl")
    assert [n["blocks"] for n in nodes if n["round"] <= WARMUP] == [len(layout.partitionable)] * 3 * WARMUP


def test_warmup_rounds_are_fedavg(warmup_config):
    """After the warm-up, the global model equals FedAvg's after as many rounds (weighted mean of
    full models; float sums in another order, hence the tolerance: the difference of round 1's
    merges, ~1e-7, is trained on in round 2 and reaches ~6e-5 on this machine's CPU kernels)."""
    resist = {**warmup_config, "num-server-rounds": WARMUP, "run-name": "resist"}
    fedavg = {**warmup_config, "num-server-rounds": WARMUP, "run-name": "fedavg", "strategy": "fedavg",
              "warmup-rounds": 0}  # FedAvg refuses a setting it does not read
    run_inprocess(resist, num_nodes=3)
    run_inprocess(fedavg, num_nodes=3)
    rows = read_metrics(Path(resist["output-dir"]) / "resist"), read_metrics(Path(fedavg["output-dir"]) / "fedavg")
    assert [(r["bytes-down"], r["bytes-up"]) for r in rows[0]] == [(r["bytes-down"], r["bytes-up"]) for r in rows[1]]
    ours, theirs = state_of(resist), state_of(fedavg)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-3, atol=2e-4, err_msg=key)


@pytest.mark.parametrize("stop_after", [1, 3], ids=["in-warmup", "after-switch"])
def test_resume_in_either_phase_is_bit_identical(whole_run, warmup_config, crash_at_round, stop_after):
    whole = whole_run[0]
    stopped = {**warmup_config, "run-name": "stopped"}
    crash_at_round(stopped, 3, stop_after + 1)
    run_dir = Path(stopped["output-dir"]) / "stopped"
    assert [r["round"] for r in read_metrics(run_dir)] == list(range(1, stop_after + 1))
    run_inprocess({**stopped, "resume": True}, num_nodes=3)

    a, b = state_of(whole), state_of(stopped)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    drop = ("round-seconds", "client-seconds", "server-rss-mb", "eval-seconds")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(Path(whole["output-dir"]) / "whole")]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run_dir)]


def test_warmup_strategy_arguments_are_checked():  # the warmup-rounds setting: tests/run/test_settings.py
    layout = BlockLayout.from_spec(ModelSpec(depths=(1, 1, 3, 1), num_classes=10, in_channels=3, base_width=4))
    with pytest.raises(ValueError, match="warmup-rounds = 1.5"):
        ResIST(layout, warmup_rounds=1.5, capacity_measure="blocks")
    strategy = ResIST(layout, warmup_rounds=2, capacity_measure="blocks")
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    dealt = [strategy.dealing.deal(layout.partitionable, [1, 1], None, rng, r) for r in (1, 2)]
    assert rng.bit_generator.state == before  # a warm-up round draws nothing: the dealing after it is unchanged
    dealt.append(strategy.dealing.deal(layout.partitionable, [1, 1], None, rng, 3))
    assert [d.whole for d in dealt] == [True, True, False]  # the whole model twice, then ResIST's dealing
    assert dealt[0].groups == [tuple(layout.partitionable)] * 2 and [len(g) for g in dealt[2].groups] == [1, 1]
