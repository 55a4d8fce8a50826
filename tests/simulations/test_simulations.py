"""simulations/: presets, the compare runner (through the real `flwr run`) and the report builder."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from resist_fl.run.outputs import CONFIG_FILE, SUMMARY_FILE, append_metrics, read_metrics, write_json
from resist_fl.run.settings import RunSettings
from tests.conftest import default_run_config
from simulations import compare, report
from simulations.launcher import LaunchResult
from simulations.presets import PresetError, list_presets, load_preset, validate_preset

ROOT = Path(__file__).resolve().parents[2]
PLOT_FILES = ("accuracy_vs_round.png", "accuracy_vs_gb.png", "accuracy_vs_seconds.png")


# --------------------------------------------------------------------------- presets


def test_presets_compose_base_and_overrides():
    config = load_preset("quick-cpu", ["federation.num-supernodes=5", "run-config.lr=0.2"])
    assert config["run-config"]["dataset"] == "synthetic"  # from _quick
    assert config.strategies == ["resist", "fedavg"]  # from _base
    assert config["run-config"]["lr"] == 0.2
    assert config["run-config"]["min-train-nodes"] == 5  # interpolated from the federation
    validate_preset(config, ROOT)


@pytest.mark.parametrize("name", [n for n in list_presets() if n.startswith("paper-")])
def test_paper_presets(name):
    config = load_preset(name)
    validate_preset(config, ROOT)
    rc = config["run-config"]
    assert (rc.model, rc["base-width"], rc["local-steps"], rc["batch-size"]) == ("preact_resnet101", 64, 50, 128)
    assert rc.lr == 0.03  # the official run script's --lr 3e-2 (0.1 is only its argparse default)
    assert rc["eval-batch-size"] == 100  # the official test loader's batch (BatchNorm uses batch statistics)
    assert rc.partitioner == "iid" and rc["lr-schedule"] == "step" and rc.momentum == 0.9
    assert rc.augment == "crop-flip" and rc.weighting == "uniform"
    assert rc["min-train-nodes"] == config.federation["num-supernodes"]
    assert set(config.paper) == {"resist", "fedavg"}
    # 160 passes over each client's IID shard of the 50,000 training images
    clients = config.federation["num-supernodes"]
    assert rc["num-server-rounds"] == math.ceil(160 * math.ceil(50_000 / clients / 128) / 50)


def test_the_documented_paper_commands_write_and_run_the_paper_preset(tmp_path, capsys, monkeypatch):
    """run-config.md's two lines, run as written: the first writes the preset's run config, the second is
    the flwr run line the runner prints for it."""
    import shlex
    import tomllib

    text = (ROOT / "docs" / "run-config.md").read_text()
    block = text.split("The paper's CIFAR-10 setting with 4 clients", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    write, run = [" ".join(shlex.split(line)) for line in block.replace("\\\n", " ").strip().splitlines()]
    monkeypatch.chdir(tmp_path)
    assert compare.main(shlex.split(write)[3:]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("flwr run")]
    written = tomllib.loads((tmp_path / "paper-cifar10-4.toml").read_text())
    assert [" ".join(shlex.split(printed[0].replace(str(tmp_path / "paper-cifar10-4.toml"), "paper-cifar10-4.toml")))] \
        == [run]
    preset = load_preset("paper-cifar10-4")["run-config"]
    assert {k: written[k] for k in preset} == dict(preset) and written["strategy"] == "resist"


def test_every_preset_is_valid():
    assert {"quick-cpu", "quick-dirichlet", "quick-partial", "cifar10-dirichlet", "cifar10-partial"} <= set(
        list_presets())
    for name in list_presets():
        validate_preset(load_preset(name), ROOT)


def test_bad_overrides_are_refused_before_running(capsys):
    assert compare.main(["quick-cpu", "run-config.no-such-key=1", "--dry-run"]) == 2
    assert "no-such-key" in capsys.readouterr().err
    assert compare.main(["quick-cpu", "--ablations", "no-such-ablation", "--dry-run"]) == 2
    with pytest.raises(PresetError):
        load_preset("no-such-preset")


def test_plan_has_variants_strategies_and_seeds(tmp_path):
    args = compare.parse_args(["quick-cpu", "num-server-rounds=3", "--seeds", "0", "1", "--ablations",
                               "no-scaling", "local-steps=7", "--out", str(tmp_path)])
    _, plan, out_dir = compare.resolve(args)
    assert out_dir == tmp_path.resolve()
    assert [r.name for r in plan[:5]] == ["main-resist-seed0", "main-fedavg-seed0", "no-scaling-resist-seed0",
                                          "local-steps_7-resist-seed0", "local-steps_7-fedavg-seed0"]
    assert len(plan) == 10
    by_name = {r.name: r.run_config for r in plan}
    assert by_name["no-scaling-resist-seed1"]["inference-scaling"] is False
    assert by_name["local-steps_7-fedavg-seed0"]["local-steps"] == 7
    assert all(c["num-server-rounds"] == 3 and c["output-dir"] == str(tmp_path.resolve()) for c in by_name.values())


def test_the_baselines_preset_plans_every_method_on_the_real_digits(tmp_path):
    """hetero-baselines: seven strategies x three seeds, one FLOP budget per node, the built-in real
    digits (``dataset='digits'``)."""
    _, plan, out_dir = compare.resolve(compare.parse_args(["hetero-baselines", "--out", str(tmp_path)]))
    assert len(plan) == 21 and {r.strategy for r in plan} == {"resist", "depth-prefix", "heterofl", "fedrolex",
                                                             "fjord", "fedavg-small", "fedavg"}
    for run in plan:
        assert (run.run_config["dataset"], run.run_config.get("data-path", "")) == ("digits", "")
        assert run.run_config["capacity-measure"] == "flops"
        assert run.run_config["capacity-profile"] == "1.0,0.5,0.25,0.25"


# --------------------------------------------------------------------------- report on fixture metrics

# accuracy per round (None: not evaluated), MB per round (down + up), round-seconds
FIXTURE = {
    ("resist", 0): ([0.3, None, 0.85, 0.88], 40, [20, 5, 5, 5]),
    ("resist", 1): ([0.5, 0.82, 0.86, 0.9], 40, [20, 5, 5, 5]),
    ("fedavg", 0): ([0.4, 0.6, 0.8, 0.9], 100, [10, 10, 10, 10]),
    ("fedavg", 1): ([0.5, 0.7, 0.9, 0.9], 100, [10, 10, 10, 10]),
}


def write_fixture_run(runs_dir: Path, strategy: str, seed: int, accuracy, megabytes, seconds) -> str:
    name = f"main-{strategy}-seed{seed}"
    cumulative = 0
    for i, (acc, sec) in enumerate(zip(accuracy, seconds), start=1):
        cumulative += megabytes * 10**6
        append_metrics(runs_dir / name, {"round": i, "strategy": strategy, "accuracy": acc, "loss": None,
                                         "bytes-down": megabytes * 10**6 // 2, "bytes-up": megabytes * 10**6 // 2,
                                         "cumulative-bytes": cumulative, "round-seconds": sec,
                                         "diverging": int(acc is None)})  # ResIST seed 0 flags round 2
    write_json(runs_dir / name / CONFIG_FILE, {"run_config": {"strategy": strategy, "seed": seed}})
    write_json(runs_dir / name / SUMMARY_FILE, {"final-accuracy": accuracy[-1]})
    return name


@pytest.fixture
def fixture_runs(tmp_path) -> Path:
    runs = []
    for (strategy, seed), (accuracy, megabytes, seconds) in FIXTURE.items():
        name = write_fixture_run(tmp_path, strategy, seed, accuracy, megabytes, seconds)
        runs.append({"name": name, "variant": "main", "strategy": strategy, "seed": seed, "status": "ok",
                     "reason": "", "wall-seconds": 60.0, "seconds-to-round1": 30.0})
    runs.append({"name": "no-scaling-resist-seed0", "variant": "no-scaling", "strategy": "resist", "seed": 0,
                 "status": "failed", "reason": "timed out after 10 s"})
    write_json(tmp_path / report.MANIFEST_FILE, {
        "preset": "fixture", "data-label": "hand-made", "command": "python -m simulations.compare fixture",
        "paper": {"resist": 91.95, "fedavg": 92.36}, "target": {"accuracy": None, "fraction-of-fedavg": 0.9},
        "runs": runs})
    return tmp_path


def group(result: dict, strategy: str) -> dict:
    return next(g for g in result["groups"] if g["strategy"] == strategy and g["variant"] == "main")


def test_report_computes_time_to_target_and_ratios(fixture_runs):
    path = report.build_report(fixture_runs)
    result = json.loads((fixture_runs / report.REPORT_JSON).read_text())
    # target: 0.9 x FedAvg's mean final accuracy (0.9 + 0.9) / 2
    assert result["target"] == pytest.approx(0.81)
    fedavg, resist = group(result, "fedavg"), group(result, "resist")
    # FedAvg reaches 0.81 at round 4 (seed 0) and 3 (seed 1): 0.4 / 0.3 GB, 40 / 30 s
    assert fedavg["reached"] == 2
    assert fedavg["rounds"] == pytest.approx([3.5, math.sqrt(0.5)])
    assert fedavg["gb"][0] == pytest.approx(0.35) and fedavg["seconds"][0] == pytest.approx(35.0)
    # ResIST reaches it at round 3 (seed 0; round 2 not evaluated, its time still counts) and 2 (seed 1)
    assert resist["rounds"][0] == pytest.approx(2.5)
    assert resist["gb"][0] == pytest.approx(0.10) and resist["seconds"][0] == pytest.approx((30 + 25) / 2)
    assert resist["final"][0] == pytest.approx(0.89) and fedavg["final"] == pytest.approx([0.9, 0.0])
    assert resist["bytes_per_round"] == pytest.approx(40e6)
    assert (resist["diverged"], fedavg["diverged"]) == (1, 0)
    (ratios,) = result["ratios"]
    assert ratios["final-accuracy"] == pytest.approx(0.89 / 0.9)
    assert ratios["bytes-per-round"] == pytest.approx(0.4)
    assert ratios["rounds"] == pytest.approx(2.5 / 3.5)
    assert ratios["gb"] == pytest.approx(0.10 / 0.35)
    assert ratios["seconds"] == pytest.approx(27.5 / 35)
    text = path.read_text()
    assert "0.8100" in text and "python -m simulations.compare fixture" in text
    assert "| ResIST | 91.95 | 89.00 ± 1.41 | -2.95 |" in text  # paper beside measured, in %
    assert "no-scaling-resist-seed0`: timed out after 10 s" in text
    assert "runs diverging" in text and "| 1/2 |" in text
    assert all((fixture_runs / name).stat().st_size > 0 for name in PLOT_FILES)


def test_report_with_a_fixed_target_and_refused_without_a_manifest(fixture_runs, capsys):
    assert report.main([str(fixture_runs), "--target-accuracy", "0.5"]) == 0
    result = json.loads((fixture_runs / report.REPORT_JSON).read_text())
    assert result["target"] == 0.5
    assert group(result, "fedavg")["rounds"][0] == pytest.approx((2 + 1) / 2)
    assert group(result, "resist")["rounds"][0] == pytest.approx((3 + 1) / 2)
    (fixture_runs / report.MANIFEST_FILE).unlink()  # what ran, and as which variant, is the manifest's to say
    assert report.main([str(fixture_runs)]) == 2
    assert "compare.json: not found (a report reads the manifest" in capsys.readouterr().err


def test_curve_never_reaching_the_target():
    curve = report.Curve.from_rows([{"round": 1, "accuracy": 0.2, "bytes-down": 1, "bytes-up": 1,
                                     "cumulative-bytes": 2, "round-seconds": 1.0}])
    assert curve.to_target(0.5) is None and curve.to_target(0.2) == {"rounds": 1, "gb": 2e-9, "seconds": 1.0}


# --------------------------------------------------------------------------- the runner


@pytest.mark.slow  # a real flwr run launch of a preset (about 40 s)
def test_runner_on_a_tiny_preset_produces_runs_plots_and_report(tmp_path, capsys, monkeypatch):
    """The flwr backend, one method (both methods, and the report's comparison: the in-process test below)."""
    argv = ["quick-cpu", "num-server-rounds=1", "stage-depths=1,1,4,1", "strategies=[resist]", "--seeds", "0",
            "--out", str(tmp_path)]
    assert compare.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / compare.MANIFEST_FILE).read_text())
    assert [(r["name"], r["status"]) for r in manifest["runs"]] == [("main-resist-seed0", "ok")]
    for run in manifest["runs"]:
        assert len(read_metrics(tmp_path / run["name"])) == 1
        assert run["seconds-to-round1"] > 0 and (tmp_path / run["log"]).exists()  # relative to the output
        assert str(tmp_path) not in json.dumps(run)  # no machine-local path in what is committed
    assert all((tmp_path / name).exists() for name in PLOT_FILES)
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert "| main | ResIST | 1 |" in text
    assert all((tmp_path / run["name"] / "label_distribution.png").is_file() for run in manifest["runs"])
    assert "python -m simulations.compare " + shlex.join(argv).replace(str(tmp_path), "<this directory>") in text
    assert "[done 1/1]" in printed and "ETA" in printed and text in printed

    # a second call reuses the finished runs instead of launching again
    def no_launch(*args, **kwargs):
        raise AssertionError("a finished run was launched again")

    assert compare.main(argv, launch=no_launch) == 0
    manifest = json.loads((tmp_path / compare.MANIFEST_FILE).read_text())
    assert {r["status"] for r in manifest["runs"]} == {"reused"}
    assert all(r["seconds-to-round1"] > 0 for r in manifest["runs"])  # kept from the first call


FAKE_FLWR = """#!/usr/bin/env python3
import json, os, pathlib, sys
if sys.argv[1] == "ls":
    print(json.dumps({"runs": [{"run-id": 7, "status": "finished:completed"}]}))
    sys.exit(0)
count = pathlib.Path(os.environ["FAKE_FLWR_COUNT"])
attempt = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(attempt))
print("Starting local SuperLink on 127.0.0.1:1234...")
if attempt < int(os.environ["FAKE_FLWR_STARTS_ON"]):
    print("Failed to start local SuperLink within 15s. See logs at x.")
    sys.exit(1)
print("Successfully started run 7")
run_dir = pathlib.Path(os.environ["FAKE_FLWR_RUN_DIR"])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "summary.json").write_text("{}")
"""


@pytest.mark.parametrize("starts_on, attempts, success", [(2, 2, True), (3, 3, True), (9, 3, False)])
def test_a_launch_whose_local_superlink_missed_flowers_startup_timeout_is_launched_again(
        tmp_path, monkeypatch, starts_on, attempts, success):
    """Flower gives its local SuperLink 15 s; under load it can miss them before anything ran (seen in CI
    beside a study). The launcher starts again, up to three times, and the log says which attempt it is."""
    from simulations import launcher

    fake = tmp_path / "flwr"
    fake.write_text(FAKE_FLWR)
    fake.chmod(0o755)
    monkeypatch.setattr(launcher, "flwr_executable", lambda: str(fake))
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_FLWR_COUNT", str(tmp_path / "count"))
    monkeypatch.setenv("FAKE_FLWR_STARTS_ON", str(starts_on))
    monkeypatch.setenv("FAKE_FLWR_RUN_DIR", str(out / "r"))
    result = launcher.run_flwr(tmp_path, {"output-dir": str(out), "run-name": "r"}, num_supernodes=1,
                               timeout_s=60, workdir=tmp_path / "logs")
    assert int((tmp_path / "count").read_text()) == attempts
    assert result.success is success and (result.run_id == "7") is success
    log = result.log_path.read_text()
    assert (f"# launcher: attempt {attempts} of 3" in log) and ("Failed to start" in log) is not success


def test_the_inprocess_backend_runs_a_preset_as_flwr_run_would_and_reports_it(tmp_path, capsys):
    argv = ["quick-cpu", "num-server-rounds=2", "stage-depths=1,1,4,1", "local-steps=2", "--seeds", "0",
            "--backend", "inprocess", "--jobs", "2", "--out", str(tmp_path)]
    assert compare.main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / compare.MANIFEST_FILE).read_text())
    assert manifest["backend"] == "inprocess"
    assert [(r["name"], r["status"]) for r in manifest["runs"]] == [("main-resist-seed0", "ok"),
                                                                     ("main-fedavg-seed0", "ok")]
    for run in manifest["runs"]:
        rows = read_metrics(tmp_path / run["name"])
        assert [r["round"] for r in rows] == [1, 2] and run["command"].split()[1:3] == ["-m", "simulations.inprocess"]
        assert str(tmp_path) not in json.dumps(run)
        saved = json.loads((tmp_path / run["name"] / "run_config.json").read_text())["run_config"]
        assert saved["local-steps"] == 2 and saved["lr-schedule"] == "step"  # the app's defaults merged under it
    resist, fedavg = (read_metrics(tmp_path / f"main-{s}-seed0") for s in ("resist", "fedavg"))
    assert resist[-1]["bytes-down"] < fedavg[-1]["bytes-down"]  # sub-networks travel, not the whole model
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert "| main | ResIST | 1 |" in text and "| main | FedAvg | 1 |" in text
    assert text.count("label_distribution.png") == 1  # one plot per distinct partitioning (both runs share it)
    (tmp_path / report.REPORT_FILE).unlink()
    assert compare.main(["quick-cpu", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / report.REPORT_FILE).exists()
    assert compare.main(["quick-cpu", "--backend", "inprocess", "federation.num-gpus-per-client=1", "--seeds", "0",
                         "--out", str(tmp_path / "gpu")]) == 2
    assert "does not reserve GPUs" in capsys.readouterr().err


def test_the_inprocess_child_keeps_the_callers_pythonpath_behind_the_project(tmp_path, monkeypatch):
    """A machine whose extra packages sit on PYTHONPATH (e.g. wheels installed with --target) keeps them."""
    from simulations import inprocess

    seen = {}

    def no_child(command, cwd, env, log_path, preamble, run_dir, started_epoch, timeout_s):
        seen.update(env)
        Path(log_path).write_text("no child\n")
        return type("Done", (), {"returncode": 1})(), False, None

    monkeypatch.setattr(inprocess, "run_logged", no_child)
    monkeypatch.setenv("PYTHONPATH", "/opt/extra-site")
    app = Path(inprocess.__file__).resolve().parents[1]
    result = inprocess.run_inprocess_launch(
        app, {"output-dir": str(tmp_path / "runs"), "run-name": "r"}, num_supernodes=2, timeout_s=5,
        workdir=tmp_path / "work")
    assert seen["PYTHONPATH"].split(":") == [str(app), "/opt/extra-site"]
    assert not result.success and "exit status 1" in result.reason


def fake_launch(project_dir, run_config, **kwargs) -> LaunchResult:
    """ResIST 'finishes' (fixture metrics); FedAvg fails like a ServerApp error would."""
    run_dir = Path(run_config["output-dir"]) / run_config["run-name"]
    log = Path(kwargs["workdir"]) / f"{run_config['run-name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("fake\n")
    if run_config["strategy"] == "fedavg":
        return LaunchResult(False, "run status finished:failed: SettingsError: lr = -1.0: boom", run_dir, log,
                            5.0, None, status="finished:failed")
    write_fixture_run(run_dir.parent, "resist", run_config["seed"], [0.5], 1, [1.0])
    return LaunchResult(True, "", run_dir, log, 5.0, 2.0, status="finished:completed")


def test_a_failed_run_makes_the_runner_exit_nonzero_with_the_reason(tmp_path, capsys):
    argv = ["quick-cpu", "--seeds", "0", "--out", str(tmp_path)]
    assert compare.main(argv, launch=fake_launch) == 1
    err = capsys.readouterr().err
    assert "1 of 2 runs FAILED" in err and "main-fedavg-seed0: run status finished:failed: SettingsError" in err
    manifest = json.loads((tmp_path / compare.MANIFEST_FILE).read_text())
    failed = [r for r in manifest["runs"] if r["status"] == "failed"]
    assert [r["name"] for r in failed] == ["main-fedavg-seed0"] and "boom" in failed[0]["reason"]
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert "## Failed runs" in text and "boom" in text


# --------------------------------------------------------------------------- privacy


def test_the_privacy_preset_plans_central_local_and_holder_variants(tmp_path):
    """privacy-digits: 50 nodes, 10 per round, central DP at three epsilons and a weak noise, the
    minimum-holders rule, local DP-SGD; 2 seeds; every variant keeps uniform weights."""
    _, plan, _ = compare.resolve(compare.parse_args(["privacy-digits", "--out", str(tmp_path)]))
    assert len(plan) == 54 and {r.seed for r in plan} == {0, 1}
    by_name = {r.name: r.run_config for r in plan}
    assert by_name["eps4-fedavg-seed0"]["dp"] == "central" and by_name["local-resist-seed1"]["dp"] == "local"
    assert by_name["holders4-resist-seed0"]["privacy-min-holders"] == 4 and "holders4-fedavg-seed0" not in by_name
    assert by_name["eps8-secret-fedavg-seed1"]["dp-sampling"] == "secret"
    assert by_name["eps8-adaptive-resist-seed0"]["dp-clip-quantile"] == 0.5
    for config in by_name.values():
        assert config["weighting"] == "uniform" and config["norm"] == "groupnorm"
        assert (config["fraction-train"], config["min-train-nodes"], config["min-available-nodes"]) == (0.2, 10, 50)
        RunSettings.from_run_config({**default_run_config(), **config})  # every variant is a valid run config


def test_the_privacy_section_reports_epsilon_holders_and_exposure(tmp_path):
    rows = {"eps4-resist-seed0": ("resist", [(1, 0.2, 1.5, 1, 0.4), (2, 0.3, 2.0, 1, 0.5)], {}),
            "eps4-fedavg-seed0": ("fedavg", [(1, 0.4, 1.5, 10, 0.0), (2, 0.5, 2.0, 10, 0.0)], {}),
            "local-resist-seed0": ("resist", [(1, 0.6, None, 1, 0.4), (2, 0.7, None, 1, 0.4)],
                                   {"dp": "local", "dp-noise-multiplier": 1.8})}
    runs = []
    for name, (strategy, curve, config) in rows.items():
        for rnd, acc, eps, holders, exposed in curve:
            row = {"round": rnd, "strategy": strategy, "accuracy": acc, "bytes-down": 10**6, "bytes-up": 10**6,
                   "cumulative-bytes": rnd * 2 * 10**6, "round-seconds": 1.0, "min-holders": holders,
                   "exposed-fraction": exposed}
            if eps is not None:
                row["epsilon"], row["epsilon-every-round"] = eps, 2 * eps
            append_metrics(tmp_path / name, row)
            if config:
                for node, eps_node in ((5, 0.5 * rnd), (6, 0.7 * rnd)):
                    append_metrics(tmp_path / name, {
                        "round": rnd, "node": node, "partition": node, "capacity": 1.0, "blocks": 1, "max-blocks": 10,
                        "over-capacity": 0, "bytes-down": 10**5, "bytes-up": 10**5, "status": "accepted",
                        "train-seconds": 0.1, "simulated-seconds": 0.0, "peak-memory-mb": 1.0,
                        "memory-measure": "rss-peak-over-start", "dp-epsilon": eps_node}, name="nodes.jsonl")
        write_json(tmp_path / name / CONFIG_FILE, {"run_config": {"strategy": strategy, "seed": 0,
                                                                  **(config or {"dp": "central",
                                                                                "dp-noise-multiplier": 4.48})}})
        write_json(tmp_path / name / SUMMARY_FILE, {"final-accuracy": curve[-1][1]})
        runs.append({"name": name, "variant": name.split("-")[0], "strategy": strategy, "seed": 0, "status": "ok"})
    write_json(tmp_path / report.MANIFEST_FILE, {"preset": "privacy-fixture", "runs": runs})
    text = report.build_report(tmp_path).read_text()
    result = json.loads((tmp_path / report.REPORT_JSON).read_text())
    assert "## Privacy" in text
    assert "| ResIST (eps4) | 1 | central | 4.48 | 0.3000 ± 0.0000 | 2.00 | 4.00 | - | 1 | 0.450 | 2.000 |" in text
    assert "| FedAvg (eps4) | 1 | central | 4.48 | 0.5000 ± 0.0000 | 2.00 | 4.00 | - | 10 | 0.000 | 2.000 |" in text
    assert "| ResIST (local) | 1 | local | 1.8 | 0.7000 ± 0.0000 | - | - | 1.40 | 1 | 0.400 | 2.000 |" in text
    assert result["privacy"]["ResIST (eps4)"][0]["curve"] == [[1, 0.2, 1.5], [2, 0.3, 2.0]]
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 0


# --------------------------------------------------------------------------- the learning-rate grid

TUNED = {("resist", 0.01): 0.6, ("resist", 0.1): 0.8, ("fedavg", 0.01): 0.9, ("fedavg", 0.1): 0.9}


def tuned_launch(project_dir, run_config, **kwargs) -> LaunchResult:
    """A run whose final accuracy depends on its strategy and learning rate (TUNED; main runs: 0.5)."""
    name = run_config["run-name"]
    run_dir = Path(run_config["output-dir"]) / name
    accuracy = TUNED.get((run_config["strategy"], run_config["lr"]), 0.5) if name.startswith("tune-") else 0.5
    append_metrics(run_dir, {"round": 1, "strategy": run_config["strategy"], "accuracy": accuracy, "loss": None,
                             "bytes-down": 1, "bytes-up": 1, "cumulative-bytes": 2, "round-seconds": 1.0})
    write_json(run_dir / CONFIG_FILE, {"run_config": run_config})
    write_json(run_dir / SUMMARY_FILE, {"final-accuracy": accuracy})
    log = Path(kwargs["workdir"]) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("fake\n")
    return LaunchResult(True, "", run_dir, log, 1.0, 0.5, status="finished:completed")


def test_every_method_runs_its_seeds_at_its_best_rate_of_one_grid(tmp_path):
    argv = ["quick-cpu", "tuning.lr=[0.1,0.01]", "tuning.seed=100", "tuning.num-server-rounds=1", "--seeds", "0",
            "1", "--out", str(tmp_path)]
    calls = []

    def launch(project_dir, run_config, **kwargs):
        calls.append(run_config["run-name"])
        return tuned_launch(project_dir, run_config, **kwargs)

    assert compare.main(argv, launch=launch) == 0
    assert sorted(calls[:4]) == sorted(f"tune-lr{r:g}-{s}-seed100" for r in (0.01, 0.1) for s in ("resist", "fedavg"))
    manifest = json.loads((tmp_path / compare.MANIFEST_FILE).read_text())
    assert {r["status"] for r in manifest["runs"]} == {"ok"}  # the grid ran in this invocation: none reused
    assert "earlier invocations" not in (tmp_path / report.REPORT_FILE).read_text()
    assert "\n- Machine: " in (tmp_path / report.REPORT_FILE).read_text()  # every run on this machine
    lr = {r["name"]: r["run-config"]["lr"] for r in manifest["runs"]}
    assert lr["main-resist-seed0"] == lr["main-resist-seed1"] == 0.1  # its best
    assert lr["main-fedavg-seed0"] == 0.01  # a tie: the smaller rate
    assert all(r["run-config"]["num-server-rounds"] == 1 for r in manifest["runs"] if r["variant"].startswith("tune"))
    text = (tmp_path / report.REPORT_FILE).read_text()
    grid = text[text.index("## Learning-rate grid"):]
    assert "| ResIST | 0.6000 | **0.8000** | 0.1 |" in grid and "| FedAvg | **0.9000** | 0.9000 | 0.01 |" in grid
    results = text[text.index("## Results"):text.index("## Learning-rate grid")]
    assert "tune-" not in results
    calls.clear()
    assert compare.main(argv, launch=launch) == 0 and calls == []  # a rerun reuses the grid and the seeds
    assert "8 of its 8 runs had finished in earlier invocations" in (tmp_path / report.REPORT_FILE).read_text()
    assert "\n- Machine of its last invocation (the runs it reused may have run on another): " in \
        (tmp_path / report.REPORT_FILE).read_text()  # runs were reused: the header's machine is the last invocation's
    rerun = json.loads((tmp_path / compare.MANIFEST_FILE).read_text())["runs"]
    assert all(r["wall-seconds"] == 1.0 for r in rerun)  # a reused seed keeps what its launch recorded

    # an ablation, planned before seed 1's finished runs: while it trains, the manifest already lists every
    # finished run (a snapshot of the directory taken then loses none)
    listed = []

    def snapshot_launch(project_dir, run_config, **kwargs):
        listed.append({r["name"] for r in json.loads((tmp_path / compare.MANIFEST_FILE).read_text())["runs"]})
        return tuned_launch(project_dir, run_config, **kwargs)

    assert compare.main([*argv, "--ablations", "local-steps=2"], launch=snapshot_launch) == 0
    assert len(listed) == 4 and listed[0] == {r["name"] for r in rerun}


def test_a_comparison_can_run_at_another_comparisons_picks(tmp_path, capsys):
    reference = tmp_path / "reference"
    assert compare.main(["quick-cpu", "tuning.lr=[0.1,0.01]", "tuning.seed=100", "tuning.num-server-rounds=1",
                         "--seeds", "0", "--out", str(reference)], launch=tuned_launch) == 0
    calls = []

    def launch(project_dir, run_config, **kwargs):
        calls.append((run_config["run-name"], run_config["lr"]))
        return tuned_launch(project_dir, run_config, **kwargs)

    out = tmp_path / "variant"
    argv = ["quick-cpu", f"tuning.picks-from={reference}", "--seeds", "0", "1", "--out", str(out)]
    assert compare.main(argv, launch=launch) == 0
    assert sorted(calls) == [("main-fedavg-seed0", 0.01), ("main-fedavg-seed1", 0.01), ("main-resist-seed0", 0.1),
                             ("main-resist-seed1", 0.1)]  # no tuning runs; the reference's picks
    text = (out / report.REPORT_FILE).read_text()
    grid = text[text.index("## Learning-rate grid"):]
    assert f"every method runs at its pick in the grid of `{reference}`" in grid
    assert "| ResIST | 0.6000 | **0.8000** | 0.1 |" in grid
    for bad, message in (([f"tuning.picks-from={tmp_path / 'none'}"], "no compare.json there"),
                         ([f"tuning.picks-from={reference}", "tuning.lr=[0.1]"], "stands alone")):
        assert compare.main(["quick-cpu", *bad, "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    assert compare.main(["quick-cpu", f"tuning.picks-from={reference}", "strategies=[resist,heterofl]",
                         "--dry-run"]) == 2
    assert "its learning-rate grid has no finished run of 'heterofl'" in capsys.readouterr().err


def test_a_malformed_grid_is_refused_before_anything_runs(tmp_path, capsys):
    assert compare.main(["quick-cpu", "tuning.lr=[0.1,-1]", "tuning.seed=1", "tuning.num-server-rounds=1",
                         "--out", str(tmp_path)], launch=tuned_launch) == 2
    assert "tuning.lr = [0.1, -1]: expected distinct positive learning rates" in capsys.readouterr().err


def test_a_grid_picked_on_held_out_images_holds_them_out_of_its_tuning_runs_only(tmp_path, capsys):
    """``tuning.validation-size``: the tuning runs hold that many training images out and are evaluated on them
    (the report says so); the reported seeds train on the whole training set and are evaluated on the test set."""
    argv = ["quick-cpu", "tuning.lr=[0.1,0.01]", "tuning.seed=100", "tuning.num-server-rounds=1",
            "tuning.validation-size=200", "--seeds", "0", "--out", str(tmp_path)]
    assert compare.main(argv, launch=tuned_launch) == 0
    runs = json.loads((tmp_path / compare.MANIFEST_FILE).read_text())["runs"]
    held = {r["name"]: r["run-config"].get("validation-size") for r in runs}
    assert {v for n, v in held.items() if n.startswith("tune-")} == {200}
    assert {v for n, v in held.items() if n.startswith("main-")} == {None}
    grid = (tmp_path / report.REPORT_FILE).read_text().split("## Learning-rate grid")[1]
    assert ("its accuracy is measured on 200 training images held out of the tuning runs' partitions "
            "(`validation-size`), never on the test set") in grid
    alone = tmp_path / "grid-alone"  # seeds: [] runs the grid alone, and the report says so
    assert compare.main([*argv[:5], "seeds=[]", "--out", str(alone)], launch=tuned_launch) == 0
    text = (alone / report.REPORT_FILE).read_text()
    assert "No reported seeds: this comparison ran its learning-rate grid alone" in text and "## Plots" not in text
    assert "| FedAvg | **0.9000** | 0.9000 | 0.01 |" in text and "its pick is the rate with the highest" in text
    assert "## Setup" in text and "validation-size=200" in text  # a tuning run's config (its lr: the grid's)
    assert compare.main([*argv[:5], "seeds=[]", "--write-run-config", str(tmp_path / "grid.toml")]) == 0
    assert 'run-name = "tune-lr0.01-resist-seed100"' in (tmp_path / "grid.toml").read_text()
    capsys.readouterr()
    # a finished tuning run held out other images than the grid wants: refused, not reused
    assert compare.main([*argv[:4], "--seeds", "0", "--out", str(tmp_path)], launch=tuned_launch) == 2
    assert "'validation-size': (200, 0)" in capsys.readouterr().err
    for bad, message in ((["tuning.validation-size=-5"], "tuning.validation-size = -5: expected a whole number"),
                         (["seeds=[]"], "quick-cpu: no runs planned (seeds [] and no learning-rate grid)")):
        assert compare.main([*(argv[:4] if "tuning" in bad[0] else ["quick-cpu"]), *bad, "--dry-run"]) == 2
        assert message in capsys.readouterr().err


GRID = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


@pytest.mark.parametrize("preset, methods, seeds, grid", [
    ("fmnist-study", 9, 5, GRID), ("fmnist-study-resnet18", 6, 3, (0.01, *GRID)), ("fmnist-study-iid", 7, 3, ()),
    ("fmnist-study-dynamic", 7, 3, ()), ("fmnist-study-within-budget", 5, 5, ()), ("fmnist-study-long", 7, 5, ()),
    ("fmnist-study-validation", 9, 0, GRID)])
def test_the_study_presets_plan_one_lr_grid_then_every_method_at_every_seed(tmp_path, preset, methods, seeds,
                                                                            grid):
    """Issue 34's study: the lr grid (on seed 100, 30 rounds) for every method, then each method's seeds at
    80 rounds; 100 nodes, 10 per round, capacities 1 .. 1/16; every run config is valid. The IID, dynamic
    and within-budget variants (same model) run each method at its pick in the committed study's grid."""
    from simulations.tuning import reference_picks

    _, plan, _ = compare.resolve(compare.parse_args([preset, "--out", str(tmp_path)]))
    tuning = [r for r in plan if r.variant.startswith("tune-lr")]
    main = [r for r in plan if r.variant == "main"]
    assert len(tuning) == len(grid) * methods and {r.seed for r in tuning} <= {100}
    assert len(main) == methods * seeds and len(plan) == len(tuning) + len(main)
    if grid:
        assert {r.run_config["lr"] for r in tuning} == set(grid)
        assert {r.run_config["num-server-rounds"] for r in tuning} == {30}
        held = 5000 if preset == "fmnist-study-validation" else None  # picks made on held-out training images
        assert {r.run_config.get("validation-size") for r in tuning} == {held}
    else:
        study = reference_picks(ROOT / "docs" / "results" / "fmnist-study", [r.strategy for r in main])
        assert {r.strategy: r.run_config["lr"] for r in main} == study
    assert {r.run_config["num-server-rounds"] for r in main} <= {160 if preset == "fmnist-study-long" else 80}
    for run in plan:
        config = run.run_config
        assert (config["fraction-train"], config["min-train-nodes"], config["min-available-nodes"]) == (0.1, 10, 100)
        assert config["capacity-profile"] == "1.0,0.5,0.25,0.125,0.0625" and config["head-norm"] is True
        assert config.get("allocation") == ("capacity" if run.strategy == "resist" else None)  # strategy-config
        RunSettings.from_run_config({**default_run_config(), **config})


def test_a_strategy_config_key_reaches_only_its_strategy_and_an_unknown_strategy_is_refused(tmp_path, capsys):
    _, plan, _ = compare.resolve(compare.parse_args(["quick-warmup", "--out", str(tmp_path)]))
    by_name = {r.name: r.run_config for r in plan}
    assert by_name["main-resist-seed0"]["warmup-rounds"] == 2 and "warmup-rounds" not in by_name["main-fedavg-seed0"]
    assert by_name["no-warmup-resist-seed0"]["warmup-rounds"] == 0  # a variant's change wins over strategy-config
    assert compare.main(["quick-cpu", "strategy-config.fedprox.lr=0.1", "--dry-run", "--out", str(tmp_path)]) == 2
    assert "strategy-config names unknown strategies ['fedprox']" in capsys.readouterr().err


def test_a_learning_rate_is_picked_by_its_late_accuracy_not_its_last_evaluation(tmp_path):
    """Rate 0.2 ends on a lucky evaluation (0.70 after 0.60, 0.61); rate 0.1 is steadily at 0.66: 0.1 is picked."""
    from simulations.tuning import picks, tuning_results

    runs = []
    for rate, curve in ((0.1, [0.40, 0.66, 0.66, 0.66]), (0.2, [0.40, 0.60, 0.61, 0.70])):
        name = f"tune-lr{rate:g}-resist-seed100"
        for i, accuracy in enumerate(curve):  # rounds 5, 10, 15, 20: the last fifth is rounds 17-20 (one evaluation)
            append_metrics(tmp_path / name, {"round": 5 * (i + 1), "accuracy": accuracy})
        write_json(tmp_path / name / SUMMARY_FILE, {"final-accuracy": curve[-1]})
        runs.append({"name": name, "variant": f"tune-lr{rate:g}", "strategy": "resist", "run-config": {"lr": rate}})
    assert picks(tuning_results(runs, tmp_path)) == {"resist": 0.2}  # one late evaluation: the last decides
    for run in runs:  # with rounds 17, 18, 19 evaluated too, the late mean decides
        rate = run["run-config"]["lr"]
        for r in (17, 18, 19):
            append_metrics(tmp_path / run["name"], {"round": r, "accuracy": 0.66 if rate == 0.1 else 0.60})
    assert picks(tuning_results(runs, tmp_path)) == {"resist": 0.1}


def test_each_run_records_the_commit_of_the_app_that_ran_it(tmp_path, monkeypatch):
    import subprocess

    from simulations.machine import code_version

    app = tmp_path / "app"
    app.mkdir()
    git = lambda *args: subprocess.run(["git", "-C", str(app), *args], check=True, capture_output=True,  # noqa: E731
                                       text=True).stdout.strip()
    git("init", "-q")
    (app / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    first = git("rev-parse", "HEAD")
    assert code_version(app) == first
    (app / "untracked.txt").write_text("ignored\n")  # outputs beside the app do not count
    assert code_version(app) == first
    (app / "out").mkdir()
    (app / "out" / "compare.json").write_text("{}\n")
    git("add", "out/compare.json")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results committed inside the app")
    first = git("rev-parse", "HEAD")
    (app / "out" / "compare.json").write_text('{"runs": []}\n')  # the runner rewrites its manifest
    assert code_version(app, app / "out") == first  # the outputs are not the app's code
    (app / "a.txt").write_text("two\n")
    assert code_version(app, app / "out") == f"{first} and uncommitted changes"
    assert code_version(tmp_path / "no-git") is None

    versions = iter([f"{first} and uncommitted changes", "c0ffee"])
    monkeypatch.setattr(compare, "code_version", lambda project_dir, outputs: next(versions))
    host = {"cores": 2, "cpu": "AMD EPYC"}
    monkeypatch.setattr(compare, "describe_machine", lambda: dict(host))
    argv = ["quick-cpu", "--seeds", "0", "--out", str(tmp_path / "out")]
    assert compare.main(argv, launch=tuned_launch) == 0
    assert "Machine per run" not in (tmp_path / "out" / report.REPORT_FILE).read_text()  # nothing reused
    host["cpu"] = "Intel Xeon"  # the next session's machine
    assert compare.main([*argv[:-2], "1", "--out", str(tmp_path / "out")], launch=tuned_launch) == 0  # seeds 0, 1
    runs = {r["name"]: r for r in json.loads((tmp_path / "out" / compare.MANIFEST_FILE).read_text())["runs"]}
    assert runs["main-resist-seed0"]["code"] == f"{first} and uncommitted changes"  # reused: its own commit
    assert runs["main-resist-seed1"]["code"] == "c0ffee"
    assert runs["main-resist-seed0"]["machine"].startswith("2 x AMD EPYC, ")  # reused: its own machine
    assert runs["main-resist-seed1"]["machine"].startswith("2 x Intel Xeon, ")
    text = (tmp_path / "out" / report.REPORT_FILE).read_text()
    assert (f"- Code, the app's git commit per run: `{first} and uncommitted changes` (2 runs); `c0ffee` (2 runs)"
            in text)
    assert "\n- Machine of its last invocation (the runs it reused may have run on another): 2 x Intel Xeon, " in text
    assert re.search(r"\n- Machine per run: 2 x AMD EPYC, [^\n]* \(2 runs\); 2 x Intel Xeon, [^\n]* \(2 runs\)\n", text)
