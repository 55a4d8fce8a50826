"""End to end through the real ``flwr run .``: the launcher, every registered method, clean-up.

The launches run four at a time, which also checks that launches are isolated from each other
(FLWR_HOME, ports). A failed run through the real engine: ``test_offline.py`` (a hub data set offline).
ResIST's own accuracy through the real engine: ``test_offline.py``'s default job; here ResIST runs
under central DP.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from resist_fl.flower.round_recorder import PRIVATE_DROPPED
from resist_fl.run.cli_config import render_config, toml_value
from resist_fl.run.methods import METHODS
from resist_fl.run.outputs import SUMMARY_FILE, read_metrics
from resist_fl.data.idx import IDX_DATASETS
from simulations.launcher import LaunchResult, marked_pids, run_flwr
from simulations.presets import load_preset, to_dict

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 2
NUM_CLASSES = 10  # synthetic data: chance accuracy is 0.1
# local-steps 20 (not 5) and a constant learning rate: 2 rounds then clear chance reliably
TINY = {"dataset": "synthetic", "stage-depths": "1,1,4,1", "base-width": 8, "local-steps": 20,
        "lr-schedule": "constant", "batch-size": 32, "num-server-rounds": ROUNDS, "eval-batch-size": 250,
        "min-train-nodes": 3, "min-available-nodes": 3}
HETERO = {"capacity-profile": "1.0,0.5,0.25"}
METHOD_NAMES = list(METHODS)  # every method of the registry runs through the real engine
CASES = {name: {"strategy": name, **({} if name in ("resist", "fedavg") else HETERO)} for name in METHOD_NAMES}
# features ride on a method's own launch (each launch costs about 45 CPU-seconds of start-up)
CASES["resist"].update({"dp": "central", "weighting": "uniform", "dp-clip": 0.5, "dp-noise-multiplier": 0.5,
                        "privacy-min-holders": 2, "dp-clip-quantile": 0.5, "dp-clip-count-noise": 5.0})
CASES["depthfl"]["feddyn-alpha"] = 0.1  # FedDyn, DepthFL's server optimiser
CASES["heterofl"]["validation-size"] = 200  # evaluated on 200 held-out training images, not the test set
CASES["fjord-kd"].update({"dp": "central", "weighting": "uniform", "dp-clip": 0.5, "dp-noise-multiplier": 0.5,
                          "dp-sampling": "secret",  # a width method under the central-DP wrapper, secret sample
                          "capacity-profile": "0.5"})  # (a secret sample needs one capacity for every node)
CASES["fedavg-small"].update({"dp": "local", "norm": "groupnorm", "local-steps": 4})  # Opacus DP-SGD
CASES["depth-prefix"].update({"over-budget": "skip",  # the node of capacity 0.05 cannot afford one block:
                              "capacity-profile": "1.0,1.0,0.05"})  # it is sent nothing, every round
TRAINED = {"depth-prefix": 2}  # nodes sent a training message per round (else all 3)
FMNIST = Path(IDX_DATASETS["fashion-mnist"].debian_dir).is_dir()  # .ci/run installs it (as root)
if FMNIST:  # the Fashion-MNIST preset's federation (100 SuperNodes, 10 per round), a few small rounds
    CASES["fmnist-preset-100"] = {**to_dict(load_preset("fmnist-dirichlet05"))["run-config"], "strategy": "resist",
                                  "num-server-rounds": ROUNDS, "local-steps": 2,
                                  "base-width": 4, "eval-subset": 500}
NODES = {"fmnist-preset-100": 100}
RUN_NAMES = {"fedavg": "fedavg it's \"quoted\""}  # both quote kinds: the launcher's TOML file carries them

pytestmark = pytest.mark.slow  # the real flwr run engine (about 45 s)


def launch(case: str, out: Path) -> LaunchResult:
    config = {**TINY, **CASES[case], "output-dir": str(out / "runs dir"), "run-name": RUN_NAMES.get(case, case)}
    return run_flwr(ROOT, config, num_supernodes=NODES.get(case, 3), timeout_s=420, workdir=out / "logs")


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, LaunchResult]:
    out = tmp_path_factory.mktemp("flwr-run")
    with ThreadPoolExecutor(max_workers=4) as pool:  # 2 cores: more at once only slows each down
        futures = {case: pool.submit(launch, case, out) for case in CASES}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("strategy", METHOD_NAMES)
def test_run_finishes_with_every_round(launches, strategy):
    result = launches[strategy]
    assert result.success, f"{result.reason}\n{result.log_path.read_text()[-3000:]}"
    assert result.status == "finished:completed"
    assert (result.run_dir / SUMMARY_FILE).exists()
    assert result.run_dir.name == RUN_NAMES.get(strategy, strategy) and result.run_dir.parent.name == "runs dir"
    rows = read_metrics(result.run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["strategy"] == strategy and r["nodes"] == TRAINED.get(strategy, 3) for r in rows)
    assert all(r.get("skipped-over-budget") == (3 - TRAINED[strategy] if strategy in TRAINED else None) for r in rows)


# (not fedavg-small: on this tiny setting it trains a width-2 model, near chance by design; not resist, which runs
# under central DP here: test_offline.py's default job checks its accuracy through the real engine)
@pytest.mark.parametrize("strategy", ["fedavg", "heterofl", "depth-prefix", "fedrolex", "fjord", "depthfl"])
def test_accuracy_beats_chance(launches, strategy):
    final = read_metrics(launches[strategy].run_dir)[-1]["accuracy"]
    assert final > 1 / NUM_CLASSES


def test_resist_sends_fewer_bytes_per_round_than_fedavg(launches):
    resist, fedavg = (read_metrics(launches[s].run_dir) for s in ("resist", "fedavg"))
    for r, f in zip(resist, fedavg, strict=True):
        assert 0 < r["bytes-down"] + r["bytes-up"] < f["bytes-down"] + f["bytes-up"]


@pytest.mark.skipif(not FMNIST, reason="apt-get install dataset-fashion-mnist (.ci/run does)")
def test_the_fashion_mnist_preset_runs_100_supernodes_with_per_client_accuracy(launches):
    result = launches["fmnist-preset-100"]
    assert result.success, f"{result.reason}\n{result.log_path.read_text()[-3000:]}"
    rows = read_metrics(result.run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)) and all(r["nodes"] == 10 for r in rows)
    assert [r["eval-images"] for r in rows] == [500] * (ROUNDS - 1) + [10_000]  # a subset, then the test set
    last = rows[-1]
    assert 0 <= last["client-accuracy-min"] <= last["client-accuracy-worst10"] <= last["client-accuracy-mean"] <= 1
    nodes = read_metrics(result.run_dir, "nodes.jsonl")
    assert all(sum(n["round"] == r for n in nodes) == 10 for r in range(1, ROUNDS + 1))  # 10 % per round
    assert all(n["budget-used"] <= 1 and n["over-capacity"] == 0 for n in nodes)  # the floor fits 0.25


def test_a_hold_out_is_what_the_run_evaluates_on(launches):
    rows = read_metrics(launches["heterofl"].run_dir)
    assert [r["eval-images"] for r in rows] == [200] * ROUNDS  # the held-out images (the test set has 500)
    assert [r["eval-images"] for r in read_metrics(launches["fedrolex"].run_dir)] == [500] * ROUNDS


@pytest.mark.parametrize("strategy", ["resist", "fedavg"])
def test_launch_is_timed(launches, strategy):
    result = launches[strategy]
    assert result.run_id is not None
    assert 0 < result.seconds_to_round1 < result.wall_seconds
    assert result.log_path.exists() and "Successfully started run" in result.log_path.read_text()


def test_no_flower_process_is_left_running(launches):
    # every process of a launch carries its launch id; the detached SuperLink outlives `flwr run`,
    # so the clean-up must have found it (and SuperExec) and stopped it
    for result in launches.values():
        assert len(result.stopped_pids) >= 2
        assert result.leftover_pids == []
        assert marked_pids(result.launch_id) == []


def test_run_config_is_rendered_as_toml_that_flwr_parses_back():
    config = {"strategy": "resist", "stage-depths": "1,1,4,1", "resume": False, "amp": True,
              "num-server-rounds": 3, "lr": 0.05, "weight-decay": 5e-4, "output-dir": "/tmp/a b",
              "run-name": "it's"}
    rendered = render_config(config)
    assert "resume=false" in rendered and "amp=true" in rendered and "strategy='resist'" in rendered
    assert parse_config_args([rendered]) == config


def test_unrenderable_values_are_refused():
    with pytest.raises(ValueError, match="both"):
        toml_value("run-name", "it's \"quoted\"")
    with pytest.raises(ValueError, match="expected a bool"):
        toml_value("stage-depths", [1, 1, 4, 1])


def test_the_sub_model_baselines_respect_every_nodes_budget(launches):
    """Through the real engine: HeteroFL's widths (by default its per-layer rule, the largest width within
    each budget), FedRolex's the same, FjORD's levels at or below them, and the depth prefix follows the
    capacities."""
    heterofl = read_metrics(launches["heterofl"].run_dir, "nodes.jsonl")
    widths = sorted({(n["partition"], n["width-rate"]) for n in heterofl})
    assert [p for p, _ in widths] == [0, 1, 2] and widths[0][1] == 1.0 > widths[1][1] > widths[2][1]
    assert all(n["over-capacity"] == 0 and n["flops-per-sample"] > 0 and n["budget-used"] <= 1 for n in heterofl)
    tiers = read_metrics(launches["depth-prefix"].run_dir, "nodes.jsonl")
    assert {n["strategy"] for n in tiers} == {"depth-prefix"} and all(n["status"] == "accepted" for n in tiers)
    rolex = read_metrics(launches["fedrolex"].run_dir, "nodes.jsonl")
    assert sorted({(n["partition"], n["width-rate"]) for n in rolex}) == widths
    levels = sorted({(n["partition"], n["width-rate"]) for n in read_metrics(launches["fjord"].run_dir, "nodes.jsonl")})
    assert [p for p, _ in levels] == [0, 1, 2] and levels[0][1] == 1.0 > levels[1][1] > levels[2][1]
    assert all(level <= width for (_, level), (_, width) in zip(levels, widths))  # whole channels: never wider
    depthfl = read_metrics(launches["depthfl"].run_dir, "nodes.jsonl")  # the most stages (with exits) that fit
    flops = {n["partition"]: n["flops-per-sample"] for n in depthfl}
    assert flops[0] > flops[1] >= flops[2] > 0 and all(n["budget-used"] <= 1 for n in depthfl if n["partition"] < 2)
    small = read_metrics(launches["fedavg-small"].run_dir, "nodes.jsonl")  # the weakest node's width, for all
    (rate,) = {n["width-rate"] for n in small}  # HeteroFL's width for the weakest budget, on every node
    assert rate == widths[2][1] and all(n["over-capacity"] == 0 for n in small)
    assert max(n["budget-used"] for n in small) <= 1
    spec = json.loads((launches["fedavg-small"].run_dir / "run_config.json").read_text())["model_spec"]
    assert len(spec["stage_widths"]) == 4 and spec["stage_widths"][-1] == round(rate * 64)  # off the 1:2:4:8 ratios


def test_central_and_local_dp_through_the_real_engine(launches):
    """Central DP with two holders per block and adaptive clipping (ResIST), a width method with a secret
    sample (FjORD with distillation, through the same wrapper), and Opacus DP-SGD (FedAvg-small) under flwr
    run: epsilon accounted, nothing unnoised written."""
    for case in ("resist", "fjord-kd", "fedavg-small"):
        assert launches[case].success, f"{launches[case].reason}\n{launches[case].log_path.read_text()[-3000:]}"
    rows = read_metrics(launches["resist"].run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    # 3 of 3 nodes every round: the worst node is in every round
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] == rows[1]["epsilon-every-round"]
    assert all(r["min-holders"] >= 2 for r in rows) and rows[1]["dp-clip"] != rows[0]["dp-clip"] == 0.5
    assert all(r["exposed-fraction"] == 0 and r["replies-accepted"] == 3 for r in rows)
    nodes = read_metrics(launches["resist"].run_dir, "nodes.jsonl")
    assert [n["epsilon"] for n in nodes if n["round"] == ROUNDS] == [rows[1]["epsilon"]] * 3
    secret = launches["fjord-kd"].run_dir
    assert read_metrics(secret, "nodes.jsonl") == [] if (secret / "nodes.jsonl").exists() else True
    assert read_metrics(secret)[-1]["epsilon"] > 0
    local = read_metrics(launches["fedavg-small"].run_dir, "nodes.jsonl")
    assert len(local) == 3 * ROUNDS and all(n["status"] == "accepted" and n["dp-epsilon"] > 0 for n in local)
    assert [r["round"] for r in read_metrics(secret)] == list(range(1, ROUNDS + 1))
    for case in ("resist", "fjord-kd", "fedavg-small"):
        for row in read_metrics(launches[case].run_dir):
            assert not set(PRIVATE_DROPPED) & set(row), case
