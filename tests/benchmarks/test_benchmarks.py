"""Smoke tests: the benchmark scripts keep working (on tiny settings; speed is not asserted), and
each figure a script computes agrees with an independent computation from the raw timings or
bytes it wrote beside it (``--json``; an inverted or mislabelled ratio fails).

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
import torch

from deploy.local_cluster import RunResult
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_json(module, argv: list[str], tmp_path: Path) -> dict:
    """``module.main(argv + ["--json", ...])`` must succeed; the figures it wrote (with its first printed line)."""
    out = tmp_path / "figures.json"
    assert module.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


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


def test_bytes_benchmark_matches_the_analytic_fraction(capsys, tmp_path):
    figures = run_json(load("bytes_benchmark"), ["--model", "preact_resnet34", "--width", "4", "--sites", "2", "4",
                                                 "--min-blocks", "1"], tmp_path)
    out, rows = capsys.readouterr().out, figures["rows"]
    assert out.splitlines()[0] == figures["setting"] and all(" | ".join(r.values()) in out for r in rows)
    assert len(rows) == 2 * 2 * 3  # sites x min depth x transport
    float32 = {(r["S"], r["min depth"]): float(r["ResIST MB"]) for r in rows if r["transport"] == "float32"}
    for row in rows:
        ratio, analytic = float(row["ResIST / FedAvg"]), float(row["analytic"])
        compressed = float(row["ResIST bytes / float32's"])
        assert ratio == pytest.approx(float(row["ResIST MB"]) / float(row["FedAvg MB"]), abs=0.002)
        assert compressed == pytest.approx(float(row["ResIST MB"]) / float32[row["S"], row["min depth"]], abs=0.02)
        assert abs(ratio / analytic - 1) < 0.005
        if row["S"] == "4" and row["min depth"] == "0":
            assert ratio < 0.8  # four sub-networks of a five-block stage: far below four full models
        assert {"float32": 1.0, "float16": 0.5, "uint8": 0.25}[row["transport"]] <= compressed < 1.01 * {
            "float32": 1.0, "float16": 0.53, "uint8": 0.29}[row["transport"]]


def test_loader_benchmark_compares_both_paths(capsys, tmp_path):
    threads = torch.get_num_threads()
    figures = run_json(load("loader_benchmark"), ["--images", "300", "--batch-size", "32", "--batches", "12"],
                       tmp_path)
    assert torch.get_num_threads() == threads  # a changed thread count would change later tests' numerics
    assert f"ratio new / old: {figures['ratio']:.1f}x" in capsys.readouterr().out
    for rate, ms in figures["rates"].values():  # the two figures of a path are one measurement: 32 images a batch
        assert ms == pytest.approx(1000 * 32 / rate, rel=0.01)
    rates = {name: rate for name, (rate, _) in figures["rates"].items()}
    assert figures["ratio"] == pytest.approx(rates["batched (new)"] / rates["per-sample (old)"], abs=0.06)


def test_step_benchmark_times_the_full_model_and_each_subnetwork(tmp_path):
    rows = run_json(load("step_benchmark"), ["--model", "preact_resnet34", "--width", "4", "--batch-size", "4",
                                             "--sites", "2", "4", "--steps", "1", "--repeats", "1"], tmp_path)["rows"]
    assert [row["model"] for row in rows] == ["full", "S=2", "S=4"]
    assert [row["partitioned blocks kept"] for row in rows] == ["5/5", "3/5", "2/5"]  # each round's largest
    flop_shares = [float(row["FLOP share"]) for row in rows]
    assert flop_shares[0] == 1.0 and flop_shares[0] > flop_shares[1] > flop_shares[2] > 0
    full = float(rows[0]["step ms"])
    for row in rows:  # the ratio is this row's step time over the full model's, both printed
        assert float(row["step time / full"]) == pytest.approx(float(row["step ms"]) / full, abs=0.002)


def test_server_benchmark_times_both_strategies(tmp_path):
    rows = run_json(load("server_benchmark"), ["--model", "preact_resnet34", "--width", "4", "--nodes", "3",
                                               "--local-steps", "2", "--batch-size", "4", "--timed-steps", "1",
                                               "--repeats", "1"], tmp_path)["rows"]
    assert [row["strategy"] for row in rows] == ["resist", "fedavg"]
    for row in rows:  # the share is the server's two calls over the round, all three printed
        share = float(row["server share"].rstrip(" %"))
        server = float(row["configure s"]) + float(row["aggregate s"])
        assert 0 < share < 100 and share == pytest.approx(100 * server / float(row["round s"]), rel=0.05, abs=0.1)


def test_round_time_benchmark_runs_both_strategies(launch, tmp_path):
    figures = run_json(launch("round_time_benchmark"), ["--model", "preact_resnet18", "--width", "4", "--supernodes",
                                                        "2", "--rounds", "2", "--local-steps", "1", "--batch-size",
                                                        "8"], tmp_path)
    for strategy, seconds in figures["seconds"].items():
        assert len(seconds) == 2 and figures["median"][strategy] == pytest.approx(statistics.median(seconds[1:]),
                                                                                 abs=1e-4)
    assert figures["ratio"] == pytest.approx(figures["median"]["resist"] / figures["median"]["fedavg"],
                                             rel=0.01, abs=0.001)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist (.ci/run)")
def test_federation_speed_benchmark_computes_its_ratios_from_its_own_figures(capsys, launch, tmp_path):
    out, threads = tmp_path / "speed.json", torch.get_num_threads()
    assert launch("federation_speed_benchmark").main(["--supernodes", "10", "--fraction", "0.2", "--rounds", "2",
                                                      "--width", "4", "--local-steps", "2", "--repeats", "1",
                                                      "--json", str(out)]) == 0
    printed, figures = capsys.readouterr().out, json.loads(out.read_text())
    inside = figures["inside"]
    assert len(inside["round-seconds"]) == 2 and inside["nodes-per-round"] == 2  # 20 % of 10
    assert all(s > 0 for s in inside["node-train-seconds"]) and all(s > 0 for s in inside["eval-seconds"])
    ratio = inside["step-ms"] / figures["outside-1-thread-ms"]
    assert f"inside / outside (1 thread): {ratio:.3f}" in printed
    assert f"a node's step inside the simulation: {inside['step-ms']:.1f} ms" in printed
    assert torch.get_num_threads() == threads  # the test process keeps its threads (later runs compare bits)


def test_deploy_overhead_benchmark_measures_a_cluster(launch, tmp_path):
    figures = run_json(launch("deploy_overhead_benchmark"), ["--only-after", "--rounds", "3"], tmp_path)
    after = figures["after"]
    assert "before" not in figures and "ratio" not in figures
    assert len(after["later"]) == 2 and after["median"] == pytest.approx(statistics.median(after["later"]), abs=1e-4)


def test_gpu_benchmark_runs_on_the_cpu(capsys, tmp_path):
    figures = run_json(load("gpu_benchmark"), ["--device", "cpu", "--model", "preact_resnet18", "--width", "4",
                                               "--batch-size", "8", "--steps", "1", "--images", "64"], tmp_path)
    out = capsys.readouterr().out
    table = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in row] for row in table[2:]]  # below the header and the rule
    assert len(rows) == 2 and "data share" in out
    for row in rows:  # bf16 / fp32 = the bf16 images per second over the true-fp32 ones beside it
        fp32, fast, ratio = (float(row[i].replace(",", "")) for i in (1, 3, 5))
        assert ratio == pytest.approx(fast / fp32, rel=0.01, abs=0.002), row
        assert row[2] == "n/a (CPU)" and row[4] == "n/a"  # no TF32 figure is claimed on a CPU
    # the JSON holds the unrounded rates the table printed, and the card / torch they ran on
    assert out.splitlines()[0] == figures["setting"] and figures["device"] == "cpu"
    assert figures["torch"] == torch.__version__ and [m["model"] for m in figures["models"]] == [r[0] for r in rows]
    for model, row in zip(figures["models"], rows):
        assert f"{model['fp32-ieee']:,.1f}" == row[1] and f"{model['bf16-channels-last']:,.1f}" == row[3]
        assert model["tf32"] is None
    share = figures["data_share"]
    assert f"{max(0.0, 1 - share['device-resident'] / share['fixed-batch']):.1%}" in out


def test_precision_benchmark_times_bf16_against_fp32_side_by_side(capsys, tmp_path):
    from simulations import benchmark_figures

    figures = run_json(load("precision_benchmark"), ["--widths", "2", "4", "--depths", "1,1,2,1", "--steps", "1",
                                                     "--repeats", "3", "--image-size", "8"], tmp_path)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == figures["setting"] and "median of 3 x 1 steps" in figures["setting"]
    assert [r["width"] for r in figures["raw"]] == [2, 4]
    for row, raw in zip(figures["rows"], figures["raw"]):  # the ratio is bf16's median over fp32's, not inverted
        assert len(raw["fp32-seconds"]) == len(raw["bf16-seconds"]) == 3
        ratio = statistics.median(raw["bf16-seconds"]) / statistics.median(raw["fp32-seconds"])
        assert float(row["bf16 / fp32 time"]) == pytest.approx(ratio, abs=0.0006)
        assert float(row["speed-up"].rstrip("x")) == pytest.approx(1 / ratio, abs=0.006)
    path = tmp_path / "figures.json"
    assert f"width 4: **{float(figures['rows'][1]['bf16 / fp32 time']):.3f}**" in benchmark_figures.precision_row(path)
    edited = json.loads(path.read_text())
    edited["rows"][0]["bf16 / fp32 time"] = f"{float(edited['rows'][0]['bf16 / fp32 time']) + 0.1:.3f}"
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="precision_benchmark width 2"):
        benchmark_figures.precision_row(path)


def test_merge_benchmark_compares_the_merge_with_a_copy(tmp_path):
    figures = run_json(load("merge_benchmark"), ["--model", "preact_resnet34", "--width", "4", "--subnetworks", "3",
                                                 "--repeats", "1"], tmp_path)
    assert figures["mib"] > 0
    assert figures["ratio"] == pytest.approx(figures["merge_ms"] / figures["copy_ms"], rel=0.01)


def test_load_benchmark_reads_the_servers_memory_from_the_metrics(capsys, launch, monkeypatch, tmp_path):
    runs = []
    module = launch("load_benchmark")
    monkeypatch.setattr(module, "run_flwr", lambda *a, **k: runs.append(inprocess_flwr_run(*a, **k)) or runs[-1])
    figures = run_json(module, ["--nodes", "3", "--sampled", "2", "--rounds", "6"], tmp_path)
    assert "nodes per round: [2]" in capsys.readouterr().out
    rows = {r["round"]: r for r in read_metrics(runs[0].run_dir)}  # what the ServerApp itself recorded
    assert (figures["nodes"], figures["sampled"], figures["rounds"]) == (3, 2, 6)
    assert figures["rss_early"] == pytest.approx(rows[5]["server-rss-mb"], abs=0.05)
    assert figures["rss_late"] == pytest.approx(rows[6]["server-rss-mb"], abs=0.05)
    assert figures["ratio"] == pytest.approx(rows[6]["server-rss-mb"] / rows[5]["server-rss-mb"], abs=0.001)


def test_startup_benchmark_times_a_run_to_round_1(launch, monkeypatch, tmp_path):
    runs = []
    module = launch("startup_benchmark")
    monkeypatch.setattr(module, "run_flwr", lambda *a, **k: runs.append(inprocess_flwr_run(*a, **k)) or runs[-1])
    ways = run_json(module, ["--no-install-only", "--quick"], tmp_path)
    assert ways.pop("setting").startswith("flwr run . to the end of round 1")
    assert list(ways) == ["no-runtime-install"] and ways["no-runtime-install"]["status"] == "ok"
    assert ways["no-runtime-install"]["round1"] == pytest.approx(runs[0].seconds_to_round1, abs=0.05)
    assert ways["no-runtime-install"]["whole"] == pytest.approx(runs[0].wall_seconds, abs=0.05)


def test_every_benchmark_script_has_a_smoke_test():
    scripts = sorted(path.stem for path in BENCHMARKS.glob("*_benchmark.py"))
    source = Path(__file__).read_text()
    assert len(scripts) >= 10
    assert [s for s in scripts if f'load("{s}")' not in source and f'launch("{s}")' not in source] == []


def gpu_check_dry_run(*args: str):
    import subprocess

    return subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", *args], capture_output=True,
                          text=True, timeout=60)


def test_the_gpu_check_lists_its_steps_without_running_them(tmp_path):
    result = gpu_check_dry_run(str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    steps = {line.split()[2]: line for line in result.stdout.splitlines() if line.startswith("step ")}
    assert list(steps) == ["install", "gpu-tests", "gpu-benchmark", "run-resnet101-resist", "run-resnet101-fedavg"]
    assert "pip install --quiet -e '.[dev]'" in steps["install"] and "--clients 1 2 4 8" in steps["gpu-benchmark"]
    assert "--backend flwr --timeout 240 --strategy fedavg" in steps["run-resnet101-fedavg"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_the_offline_gpu_check_installs_carried_wheels_and_runs_without_ray(tmp_path):
    wheels = tmp_path / "my wheels"
    wheels.mkdir()
    refused = gpu_check_dry_run("--offline", str(wheels), str(tmp_path / "out"))
    assert refused.returncode == 1 and f"no wheels in {wheels}" in refused.stderr
    (wheels / "flwr-1.42.0-py3-none-any.whl").write_bytes(b"")
    result = gpu_check_dry_run("--offline", str(wheels), str(tmp_path / "out dir"))
    assert result.returncode == 0, result.stderr
    steps = {line.split()[2]: line for line in result.stdout.splitlines() if line.startswith("step ")}
    site = str(tmp_path / "out dir" / "site").replace(" ", "\\ ")
    assert f"pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {site}" in \
        steps["install"] and ".venv-gpu" not in result.stdout
    assert "import torch, flwr, pydantic, omegaconf, tomli_w, resist_fl" in steps["install"]  # fails fast there
    assert all(f"PYTHONPATH={site}:" in steps[name] for name in list(steps)[1:])  # the wheels and the checkout
    assert "--clients" not in steps["gpu-benchmark"]  # clients sharing the GPU need Ray, which is not carried
    assert "--backend inprocess --timeout 240 --strategy resist" in steps["run-resnet101-resist"]


@pytest.mark.parametrize("argv, message", [
    (["--offline", "--dry-run", "out"], "--offline needs a folder of wheels"),  # not taken as the folder
    (["--offline"], "--offline needs a folder of wheels"),
    (["out", "--offline", "wheels", "more"], "one results folder, got 'out' and 'more'"),
    (["--fast"], "unknown option --fast"),
])
def test_the_gpu_check_refuses_a_malformed_command_line_before_running_anything(argv, message):
    result = gpu_check_dry_run(*argv)
    assert result.returncode == 2 and message in result.stderr and "step " not in result.stdout


def test_the_offline_wheel_list_pins_what_the_project_pins():
    """benchmarks/gpu_offline_wheels.txt carries flwr at the project's own pin (one version of each)."""
    import tomllib

    pins = [line.strip() for line in (BENCHMARKS / "gpu_offline_wheels.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    names = [pin.split("==")[0] for pin in pins]
    assert len(names) == len(set(names)) and all("==" in pin for pin in pins)
    project = tomllib.loads((BENCHMARKS.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "flwr==1.42.0" in pins and any(dep.startswith("flwr[simulation]==1.42.0") for dep in project)


def test_the_gpu_flwr_run_step_on_the_cpu(capsys, launch, tmp_path):
    assert launch("gpu_flwr_run").main([str(tmp_path), "--device", "cpu", "--model", "preact_resnet18", "--width", "4",
                                        "--clients", "2", "--rounds", "2", "--local-steps", "1", "--batch-size",
                                        "8"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"round seconds ([\d. ]+); final accuracy ([\d.]+)", out)
    assert found and len(found.group(1).split()) == 2 and 0 <= float(found.group(2)) <= 1


def test_the_gpu_run_step_in_process_writes_its_figures(capsys, tmp_path):
    """``--backend inprocess`` (the GPU check's offline mode): a child process, no flwr run, no Ray."""
    args = [str(tmp_path), "--device", "cpu", "--model", "preact_resnet18", "--width", "4", "--clients", "2",
            "--rounds", "2", "--local-steps", "1", "--batch-size", "8", "--backend", "inprocess",
            "--strategy", "fedavg"]
    figures = run_json(load("gpu_flwr_run"), args, tmp_path)
    out = capsys.readouterr().out
    assert figures["setting"].startswith("preact_resnet18 width 4, fedavg, 2 clients on one cpu (inprocess)")
    assert (figures["backend"], figures["strategy"], figures["torch"]) == ("inprocess", "fedavg", torch.__version__)
    rows = read_metrics(tmp_path / "runs" / "preact_resnet18-fedavg-2-clients-inprocess")
    assert figures["round_seconds"] == [r["round-seconds"] for r in rows] and len(rows) == 2
    assert figures["accuracy"] == rows[-1]["accuracy"] and f"final accuracy {figures['accuracy']}" in out


def test_every_benchmark_runs_as_the_script_its_docs_name():
    """``python benchmarks/NAME.py`` (how the docs run them) imports: ``sys.path[0]`` is then benchmarks/ itself,
    and the project is not assumed installed (the offline GPU check runs them from a bare checkout), so the
    editable install's path entry is dropped before the script runs."""
    import subprocess
    import sys

    root = BENCHMARKS.parent.resolve()
    bare = ("import runpy, sys; from pathlib import Path; root = Path(sys.argv[1]); script = sys.argv[2]; "
            "sys.path[:] = [p for p in sys.path[1:] if p and Path(p).resolve() != root]; "
            "sys.path.insert(0, str(Path(script).parent)); sys.argv = [script, '--help']; "
            "runpy.run_path(script, run_name='__main__')")
    scripts = sorted(BENCHMARKS.glob("*_benchmark.py")) + [BENCHMARKS / "gpu_flwr_run.py"]
    failed = {}
    for script in scripts:
        done = subprocess.run([sys.executable, "-c", bare, str(root), str(script)], cwd=BENCHMARKS, capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            failed[script.name] = done.stderr.strip().splitlines()[-1:]
    assert failed == {}
