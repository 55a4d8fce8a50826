"""Differential privacy with partial updates: holders and exposure, the minimum-holders dealing,
client-level central DP (clipping, holder-calibrated noise, accounting, resume) and local DP-SGD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import NeighboringRelation, dp_event, rdp
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from hypothesis import given, settings
from hypothesis import strategies as st

from client_app.app import app as client_app
from resist_fl.core.allocation import allocate_depths, deal_blocks
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.holders import exposure, holder_counts, whole
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.validation import ReplyError
from resist_fl.flower.central_dp_strategy import CentrallyPrivate
from resist_fl.flower.central_dp import CentralDP, clip_update, get_norm
from resist_fl.flower.resist import ResIST
from resist_fl.run.outputs import NODES_FILE, SUMMARY_FILE, read_metrics
from resist_fl.run.settings import RunSettings
from resist_fl.run.settings_error import SettingsError
from simulations.inprocess_grid import InProcessGrid
from simulations.inprocess import run_inprocess

SIX_BLOCKS = {"stage-depths": "1,1,7,1", "capacity-measure": "blocks"}  # 6 partitionable blocks in stage 3


def _run(config: dict, num_nodes: int, **grid) -> tuple[Path, list[dict], list[dict]]:
    run_inprocess(config, num_nodes=num_nodes, **grid)
    run_dir = Path(config["output-dir"]) / config["run-name"]
    return run_dir, read_metrics(run_dir), read_metrics(run_dir, NODES_FILE)


# --------------------------------------------------------------------------- holders and exposure

def test_holder_counts_and_exposure_of_whole_and_sliced_holdings():
    shapes = {"a": (4,), "b": (2, 2)}
    holdings = {1: whole(["a", "b"]), 2: {"a": None}, 3: {"b": np.ix_([0], [0, 1])}}
    counts = holder_counts(shapes, holdings)
    assert int(counts["a"]) == 2 and counts["b"].tolist() == [[2, 2], [1, 1]]
    found = exposure(shapes, holdings, 2)
    assert found.min_holders == 1
    # node 1 holds 8 elements, 2 of them (b's second row) merged over 1 node; node 2: 4, none; node 3: 2, none
    assert found.nodes == {1: (1, 2 / 8), 2: (2, 0.0), 3: (2, 0.0)}
    assert found.exposed_fraction == pytest.approx(2 / 14)
    with pytest.raises(ValueError, match="k = 0"):
        exposure(shapes, holdings, 0)


# --------------------------------------------------------------------------- minimum holders

@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 12), st.lists(st.integers(1, 12), min_size=1, max_size=8), st.integers(1, 4),
       st.integers(0, 2**31 - 1))
def test_every_block_has_at_least_k_holders_or_the_capacities_cannot_allow_it(num_blocks, maxima, k, seed):
    blocks = [f"b{i}" for i in range(num_blocks)]
    depths = allocate_depths(num_blocks, maxima, None, 0, copies=k)
    assert all(1 <= d <= min(m, num_blocks) for d, m in zip(depths, maxima))
    groups = deal_blocks(blocks, depths, np.random.default_rng(seed)).groups
    assert all(len(set(g)) == len(g) for g in groups)
    fewest = min(sum(b in g for g in groups) for b in blocks)
    if sum(min(m, num_blocks) for m in maxima) >= k * num_blocks:
        assert fewest >= k
    else:  # every node already trains its most: the round is reported as unable
        assert depths == [min(m, num_blocks) for m in maxima]


def test_plain_resist_exposes_its_blocks_and_two_holders_expose_nothing(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "eval-every": 1, "local-steps": 2})
    _, plain, plain_nodes = _run(dict(tiny_config, **{"run-name": "plain"}), num_nodes=4)
    assert plain[0]["min-holders"] == 1 and 0 < plain[0]["exposed-fraction"] < 1
    assert all(r["min-holders"] == 1 and r["exposed-fraction"] > 0 for r in plain_nodes)
    _, two, two_nodes = _run(dict(tiny_config, **{"run-name": "two", "privacy-min-holders": 2}), num_nodes=4)
    assert two[0]["min-holders"] == 2 and two[0]["exposed-fraction"] == 0
    assert sum(r["blocks"] for r in two_nodes) == 2 * 6  # each block dealt twice
    assert two[0]["bytes-down"] > plain[0]["bytes-down"]


def test_an_unmet_minimum_is_announced_and_under_strict_not_sent(tiny_config, caplog):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "local-steps": 2, "privacy-min-holders": 3,
                                      "capacity-profile": "0.5,0.5", "privacy-strict": True})
    _, rows, nodes = _run(tiny_config, num_nodes=2)
    assert "privacy-min-holders = 3 cannot be met" in caplog.text and "not sent" in caplog.text
    assert rows[0]["privacy-unmet"] == 1 and rows[0]["bytes-down"] == 0 and nodes == []


# --------------------------------------------------------------------------- central DP: clipping and noise

def test_clipping_bounds_the_update_and_the_server_rejects_an_unclipped_one():
    rng = np.random.default_rng(0)
    received = {"w": rng.normal(size=(8, 8)).astype(np.float32), "n": np.array(3, dtype=np.int64)}
    trained = {"w": received["w"] + 5 * rng.normal(size=(8, 8)).astype(np.float32), "n": np.array(7, dtype=np.int64)}
    clipped = clip_update(trained, received, 1.0)
    norm = get_norm([clipped["w"].astype(np.float64) - received["w"]])
    assert norm == pytest.approx(1.0, rel=1e-5) and clipped["n"] == 7
    dp = CentralDP(dp_clip=1.0, dp_noise_multiplier=1.0)
    assert dp.check(clipped, received) <= 1.0 + 1e-4
    with pytest.raises(ReplyError, match="above dp-clip = 1"):
        dp.check(trained, received)
    with pytest.raises(TypeError, match=r"CentralDP\(1.0\): expected CentralDP\(settings\)"):
        CentralDP(1.0)  # the former positional (clip, noise multiplier) call
    with pytest.raises(SettingsError, match="dp-clip = -1"):
        CentralDP(dp_clip=-1)  # bounds are RunSettings'


@pytest.mark.parametrize("holders", [1, 2, 4])
def test_noise_per_parameter_is_z_c_over_h(holders):
    dp = CentralDP(dp_clip=0.5, dp_noise_multiplier=2.0)
    current = {"w": np.zeros(20_000, dtype=np.float32)}
    value = 0.5 / math.sqrt(20_000) * 0.999  # an update of norm just under C: merged as sent
    update = {"w": np.full(20_000, value, dtype=np.float32)}
    merged = dp.merge(current, [update] * holders, {"w": holders})["w"].astype(np.float64)
    expected = 2.0 * 0.5 / holders
    assert merged.mean() == pytest.approx(value, abs=4 * expected / math.sqrt(20_000))
    assert merged.std() == pytest.approx(expected, rel=0.03)  # 20k samples: std error ~0.5 %


def test_the_server_clips_an_update_within_the_tolerance_to_exactly_c():
    """A reply up to C(1 + 1e-4) passes the check (float32 rounding), but the sum the noise covers
    holds it at exactly C: the sensitivity the accountant assumes."""
    dp = CentralDP(dp_clip=1.0, dp_noise_multiplier=1e-12)
    current = {"w": np.zeros(100, dtype=np.float64)}
    update = {"w": np.full(100, 1.00005 / 10, dtype=np.float64)}  # norm 1.00005
    dp.check(update, current)
    merged = dp.merge(current, [update], {"w": 1})["w"]
    assert np.linalg.norm(merged) == pytest.approx(1.0, abs=1e-9)


def test_flowers_server_side_dp_wrapper_raises_on_a_resist_round_and_ours_does_not(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"local-steps": 1, "weighting": "uniform"})
    grid = InProcessGrid(client_app, num_nodes=2, run_config=tiny_config)
    spec = RunSettings.from_run_config(tiny_config).model_spec(num_classes=10, in_channels=3)
    layout = BlockLayout.from_spec(spec, (3,))
    initial = ArrayRecord({k: v for k, v in build_model(spec).state_dict().items() if k in layout.payload_keys()})
    settings = RunSettings.from_run_config(tiny_config)
    wrapped = DifferentialPrivacyServerSideFixedClipping(ResIST(layout, settings, capacity_measure="blocks"), 1.0,
                                                         1.0, 2)
    config = {"num-classes": 10, "in-channels": 3}
    # its clipping pairs reply and global arrays by list position (zip strict=True): a partial reply misaligns
    with pytest.raises(ValueError, match="broadcast|shorter|longer"):
        wrapped.start(grid=grid, initial_arrays=initial, num_rounds=1, train_config=ConfigRecord(config))
    inner = ResIST(layout, settings, capacity_measure="blocks", dp="central")
    ours = CentrallyPrivate(inner, CentralDP(dp_clip=1.0, dp_noise_multiplier=1.0))
    result = ours.start(grid=grid, initial_arrays=initial, num_rounds=1, train_config=ConfigRecord(config))
    assert inner.last_round_metrics["replies-accepted"] == 2 and result.arrays is not None


# --------------------------------------------------------------------------- central DP end to end

def _reference_epsilon(z: float, rounds: int, delta: float) -> float:
    """Independently: ``rounds`` Gaussian releases of multiplier z, no amplification (the sample is
    public), add/remove one node."""
    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_event.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def test_central_dp_clips_accounts_every_round_and_resumes_the_accountant(tiny_config, crash_at_round):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 3, "local-steps": 2, "dp": "central",
                                      "weighting": "uniform", "dp-clip": 0.5, "dp-noise-multiplier": 1.5,
                                      "fraction-train": 0.5, "min-train-nodes": 2, "min-available-nodes": 4})
    crash_at_round(tiny_config, 4, 3)
    run_dir = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    rows = read_metrics(run_dir)
    epsilons = [r["epsilon-every-round"] for r in rows]
    assert epsilons == pytest.approx([_reference_epsilon(1.5, t, 1e-5) for t in (1, 2)], rel=1e-6)
    assert epsilons[0] < epsilons[1]
    assert all(r["replies-accepted"] == 2 for r in rows)  # every node clipped: no reply rejected
    _, rows, _ = _run(dict(tiny_config, resume=True), num_nodes=4)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[2]["epsilon-every-round"] == pytest.approx(_reference_epsilon(1.5, 3, 1e-5), rel=1e-6)  # continues
    nodes = read_metrics(run_dir, NODES_FILE)
    worst = max(sum(1 for n in nodes if n["partition"] == p) for p in range(4))  # the rounds of the most-sampled node
    assert rows[2]["epsilon"] == pytest.approx(_reference_epsilon(1.5, worst, 1e-5), rel=1e-6)
    assert json.loads((run_dir / SUMMARY_FILE).read_text())["epsilon"] == rows[2]["epsilon"]


class _Unclipped:
    """A ClientApp whose node 0 ignores dp-clip (sends its raw update)."""

    def __init__(self):
        self.app = client_app

    def __call__(self, message, context):
        if message.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 0:
            message.content["config"]["dp-clip"] = 1e9
        return self.app(message=message, context=context)


def test_a_node_that_does_not_clip_is_rejected_and_counts_as_a_zero_update(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "local-steps": 4, "dp": "central", "lr": 0.5,
                                      "weighting": "uniform", "dp-clip": 1e-3, "dp-noise-multiplier": 1.0})
    _, rows, nodes = _run(tiny_config, num_nodes=2, client=_Unclipped())
    assert rows[0]["replies-rejected"] == 1 and rows[0]["replies-accepted"] == 1
    assert [r["status"] for r in nodes] == ["no-valid-reply", "accepted"]
    assert rows[0]["min-holders"] >= 1 and "epsilon" in rows[0]  # holders are the nodes sent to


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize("changes, message", [
    ({"dp": "central"}, "weighting = 'examples': dp='central' needs 'uniform'"),
    ({"dp": "local"}, "norm = 'batchnorm': dp='local'"),
    ({"dp": "local", "norm": "groupnorm", "amp": True}, "amp = true: dp='local' trains with Opacus' per-sample "
                                                        "gradients in fp32"),  # it would be dropped in training
    ({"dp": "local", "norm": "groupnorm", "strategy": "fjord", "model": "preact_resnet18"},
     "dp = 'local': supported with strategy"),
    ({"dp": "central", "weighting": "uniform", "transport-dtype": "uint8"}, "transport-dtype = 'uint8'"),
    ({"dp": "central", "weighting": "uniform", "allocation": "speed"}, "allocation = 'speed'"),
    ({"dp-target-epsilon": 4.0}, "dp-target-epsilon = 4.0: read only with dp='central'"),
    ({"privacy-min-holders": 2, "strategy": "fedavg"},
     "privacy-min-holders = 2: strategy 'fedavg' does not use it (only resist do)"),
])
def test_privacy_settings_errors_name_the_value_and_the_fix(tiny_config, changes, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunSettings.from_run_config({**tiny_config, **changes})


# --------------------------------------------------------------------------- local DP-SGD

def test_local_dp_reports_every_nodes_cumulative_epsilon(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 2, "local-steps": 3, "dp": "local", "norm": "groupnorm",
                                      "dp-noise-multiplier": 1.1, "dp-clip": 1.0})
    _, rows, nodes = _run(tiny_config, num_nodes=2)
    assert all(r["status"] == "accepted" and r["dp-epsilon"] > 0 for r in nodes)
    first = {r["partition"]: r["dp-epsilon"] for r in nodes if r["round"] == 1}
    second = {r["partition"]: r["dp-epsilon"] for r in nodes if r["round"] == 2}
    assert all(second[p] > first[p] for p in first)  # the node's accountant continues across rounds
    assert all("train-loss" not in r for r in rows)  # a node's raw loss is not released under DP


def test_local_dp_refuses_batchnorm_with_the_fix():
    from resist_fl.node.local_dp import check_private_model
    with pytest.raises(ValueError, match="norm='groupnorm'"):
        check_private_model(build_model(ModelSpec(depths=(1, 1, 2, 1), base_width=4, norm="batchnorm")))
    check_private_model(build_model(ModelSpec(depths=(1, 1, 2, 1), base_width=4, norm="groupnorm")))
    assert torch.is_grad_enabled()


def test_the_client_app_loads_opacus_only_for_local_dp():
    """Importing the ClientApp leaves Opacus (and the torch.distributed it pulls in) unloaded."""
    import subprocess
    import sys

    code = ("import sys, client_app.app; "
            "print(sorted(m for m in ('opacus', 'torch.distributed._tensor') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
