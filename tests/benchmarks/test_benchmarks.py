"""Smoke tests: the benchmark scripts keep working (on tiny settings; speed is not asserted), and
each figure a script computes agrees with an independent computation from the raw timings or
bytes it printed (an inverted or mislabelled ratio fails).

The scripts that launch ``flwr run`` or a deployed cluster run here on the in-process grid
instead (the same run configs, validated and trained by the real ServerApp and ClientApp):
``simulations.launcher.run_flwr`` and ``deploy.local_cluster.LocalCluster`` themselves are
tested end to end by ``test_flwr_run.py`` and ``test_deploy.py``, and each real launch costs
~25-50 s of start-up that would only repeat those tests.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy.local_cluster import RunResult
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inprocess_flwr_run(project_dir, run_config, *, num_supernodes, workdir, **_):
    """Stands in for ``run_flwr``: the run on the in-process grid, with ``num_supernodes`` nodes."""
    start = time.perf_counter()
    run_inprocess(dict(run_config), num_nodes=num_supernodes)
    seconds = time.perf_counter() - start
    return SimpleNamespace(success=True, reason="", run_dir=Path(run_config["output-dir"]) / run_config["run-name"],
                           log_path=Path(workdir) / "no.log", wall_seconds=seconds, seconds_to_round1=seconds)


class InProcessCluster:
    """Stands in for ``LocalCluster``: ``run`` trains on the in-process grid."""

    def __init__(self, workdir, num_supernodes, app_dir=None):
        self.workdir, self.num_supernodes = Path(workdir), num_supernodes

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def run(self, config, timeout):
        config = {"output-dir": str(self.workdir / "runs"), "run-name": "run", **config}
        start = time.perf_counter()
        run_inprocess(config, num_nodes=self.num_supernodes)
        run_dir = Path(config["output-dir"]) / config["run-name"]
        return RunResult(run_dir, json.loads((run_dir / "summary.json").read_text()), read_metrics(run_dir),
                         time.perf_counter() - start, self.workdir / "no.log")


@pytest.fixture(name="launch")
def fixture_launch():
    """``launch(name)`` loads a benchmark script with flwr run and the cluster in-process."""
    def launch(name: str):
        module = load(name)
        if hasattr(module, "run_flwr"):
            module.run_flwr = inprocess_flwr_run
        if hasattr(module, "LocalCluster"):
            module.LocalCluster = InProcessCluster
        return module
    return launch


def test_bytes_benchmark_matches_the_analytic_fraction(capsys):
    assert load("bytes_benchmark").main(["--model", "preact_resnet34", "--width", "4", "--sites", "2", "4",
                                         "--min-blocks", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert len(rows) == 2 * 2 * 3  # sites x min depth x transport
    for row in rows:
        ratio, analytic, compressed = float(row[5]), float(row[6]), float(row[8])
        assert abs(ratio / analytic - 1) < 0.005
        if row[0].strip() == "4" and row[1].strip() == "0":
            assert ratio < 0.8  # four sub-networks of a five-block stage: far below four full models
        assert {"float32": 1.0, "float16": 0.5, "uint8": 0.25}[row[2].strip()] <= compressed < 1.01 * {
            "float32": 1.0, "float16": 0.53, "uint8": 0.29}[row[2].strip()]


def _table(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| model") and not line.startswith("| strategy")]


def test_loader_benchmark_compares_both_paths(capsys):
    import torch

    threads = torch.get_num_threads()
    assert load("loader_benchmark").main(["--images", "300", "--batch-size", "32", "--batches", "12"]) == 0
    assert torch.get_num_threads() == threads  # a changed thread count would change later tests' numerics
    out = capsys.readouterr().out
    rates = {name: (float(rate.replace(",", "")), float(ms)) for name, rate, ms in
             re.findall(r"(per-sample \(old\)|batched \(new\))\s+([\d,]+) images/s\s+\(\s*([\d.]+) ms per batch", out)}
    assert set(rates) == {"per-sample (old)", "batched (new)"}
    for rate, ms in rates.values():  # the two figures of a path are one measurement: 32 images a batch
        assert ms == pytest.approx(1000 * 32 / rate, rel=0.01)
    ratio = float(re.search(r"ratio new / old: ([\d.]+)x", out).group(1))
    assert ratio == pytest.approx(rates["batched (new)"][0] / rates["per-sample (old)"][0], abs=0.06)


def test_step_benchmark_times_the_full_model_and_each_subnetwork(capsys):
    assert load("step_benchmark").main(["--model", "preact_resnet34", "--width", "4", "--batch-size", "4",
                                        "--sites", "2", "4", "--steps", "1", "--repeats", "1"]) == 0
    rows = _table(capsys.readouterr().out)
    assert [row[0] for row in rows] == ["full", "S=2", "S=4"]
    assert [row[1] for row in rows] == ["5/5", "3/5", "2/5"]  # the largest sub-network of each round
    flop_shares = [float(row[2]) for row in rows]
    assert flop_shares[0] == 1.0 and flop_shares[0] > flop_shares[1] > flop_shares[2] > 0


def test_server_benchmark_times_both_strategies(capsys):
    assert load("server_benchmark").main(["--model", "preact_resnet34", "--width", "4", "--nodes", "3",
                                          "--local-steps", "2", "--batch-size", "4", "--timed-steps", "1",
                                          "--repeats", "1"]) == 0
    rows = _table(capsys.readouterr().out)
    assert [row[0] for row in rows] == ["resist", "fedavg"]
    for row in rows:
        assert 0 < float(row[5].rstrip(" %")) < 100


def test_round_time_benchmark_runs_both_strategies(capsys, launch):
    assert launch("round_time_benchmark").main(["--model", "preact_resnet18", "--width", "4", "--supernodes", "2",
                                              "--rounds", "2", "--local-steps", "1", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    medians = {}
    for strategy, values, median in re.findall(r"(resist|fedavg)\s+round seconds ([\d. ]+); median of rounds 2\.\.2: "
                                               r"([\d.]+) s", out):
        seconds = [float(v) for v in values.split()]
        assert len(seconds) == 2 and float(median) == pytest.approx(statistics.median(seconds[1:]), abs=1e-4)
        medians[strategy] = float(median)
    assert set(medians) == {"resist", "fedavg"}
    ratio = float(re.search(r"round time ResIST / FedAvg: ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(medians["resist"] / medians["fedavg"], rel=0.01, abs=0.001)


def test_deploy_overhead_benchmark_measures_a_cluster(capsys, launch):
    assert launch("deploy_overhead_benchmark").main(["--only-after", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"after \(working tree\)\s+round 1:\s+([\d.]+) s; rounds 2\.\.3: ([\d. -]+); median ([-\d.]+) s", out)
    assert found, out
    later = [float(v) for v in found.group(2).split()]
    assert len(later) == 2 and float(found.group(3)) == pytest.approx(statistics.median(later), abs=1e-4)


def test_gpu_benchmark_runs_on_the_cpu(capsys):
    assert load("gpu_benchmark").main(["--device", "cpu", "--model", "preact_resnet18", "--width", "4",
                                       "--batch-size", "8", "--steps", "1", "--images", "64"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert len(rows) == 2 and "data share" in out
    for row in rows:  # bf16 / fp32 = the bf16 images per second over the true-fp32 ones beside it
        fp32, fast, ratio = (float(row[i].replace(",", "")) for i in (1, 3, 5))
        assert ratio == pytest.approx(fast / fp32, rel=0.01, abs=0.002), row
        assert row[2] == "n/a (CPU)" and row[4] == "n/a"  # no TF32 figure is claimed on a CPU


def test_merge_benchmark_compares_the_merge_with_a_copy(capsys):
    assert load("merge_benchmark").main(["--model", "preact_resnet34", "--width", "4", "--subnetworks", "3",
                                         "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    copy = float(re.search(r"numpy copy of the same bytes: ([\d.]+) ms", out).group(1))
    merge = float(re.search(r"merge_partial:\s+([\d.]+) ms", out).group(1))
    ratio = float(re.search(r"ratio merge / copy: ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(merge / copy, rel=0.01)


def test_load_benchmark_reads_the_servers_memory_from_the_metrics(capsys, launch):
    assert launch("load_benchmark").main(["--nodes", "3", "--sampled", "2", "--rounds", "5"]) == 0
    out = capsys.readouterr().out
    assert "server RSS after round 5" in out and "nodes per round: [2]" in out


def test_startup_benchmark_times_a_run_to_round_1(capsys, launch):
    assert launch("startup_benchmark").main(["--no-install-only", "--quick"]) == 0
    assert "no-runtime-install" in (out := capsys.readouterr().out) and "(ok)" in out


def test_every_benchmark_script_has_a_smoke_test():
    scripts = sorted(path.stem for path in BENCHMARKS.glob("*_benchmark.py"))
    source = Path(__file__).read_text()
    assert len(scripts) >= 10
    assert [s for s in scripts if f'load("{s}")' not in source and f'launch("{s}")' not in source] == []


def test_the_gpu_check_lists_its_four_steps_without_running_them(tmp_path):
    import subprocess

    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    steps = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["install", "gpu-tests", "gpu-benchmark", "flwr-run-resnet101"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_the_gpu_flwr_run_step_on_the_cpu(capsys, launch, tmp_path):
    assert launch("gpu_flwr_run").main([str(tmp_path), "--device", "cpu", "--model", "preact_resnet18", "--width", "4",
                                        "--clients", "2", "--rounds", "2", "--local-steps", "1", "--batch-size",
                                        "8"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"round seconds ([\d. ]+); final accuracy ([\d.]+)", out)
    assert found and len(found.group(1).split()) == 2 and 0 <= float(found.group(2)) <= 1
