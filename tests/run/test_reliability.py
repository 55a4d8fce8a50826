"""Reliability: failed and missing nodes, kill-and-resume, checkpoints.

Malformed and hostile replies are tested in ``test_reply_screening.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.run.checkpoint import CHECKPOINT_FILE, CheckpointError
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess
from simulations.inprocess_grid import make_node_ids

ROOT = Path(__file__).resolve().parents[2]


# -- failures with the real ClientApp ---------------------------------------------------------------

def initial_state(config) -> dict:
    torch.manual_seed(config["seed"])
    spec = ModelSpec(depths=(1, 1, 4, 1), base_width=config["base-width"], norm=config["norm"])
    return build_model(spec).state_dict()


def final_state(config) -> dict:
    path = Path(config["output-dir"]) / config["run-name"] / "model.pt"
    return torch.load(path, weights_only=True)["state_dict"]


def test_failed_and_missing_nodes_keep_their_blocks_and_are_counted(tiny_config):
    tiny_config["num-server-rounds"] = 1
    nodes = make_node_ids(3)
    grid = run_inprocess(tiny_config, num_nodes=3, fail_nodes={nodes[0]}, drop_nodes={nodes[1]})
    row = read_metrics(Path(tiny_config["output-dir"]) / "test")[0]
    assert (row["replies-accepted"], row["replies-failed"], row["replies-missing"]) == (1, 1, 1)
    before, after = initial_state(tiny_config), final_state(tiny_config)
    layout = BlockLayout.from_spec(ModelSpec(depths=(1, 1, 4, 1), base_width=8))
    sent = {m.metadata.dst_node_id: list(m.content["config"]["blocks"]) for m in grid.sent
            if m.metadata.message_type == "train"}
    lost = {b for node in nodes[:2] for b in sent[node]} - set(sent[nodes[2]])
    assert lost
    for block in lost:
        for key in layout.payload_keys([block]):
            if layout.key_block[key] == block:
                assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["linear.weight"], after["linear.weight"])  # shared: merged


def test_too_few_replies_leave_the_model_unchanged(tiny_config):
    tiny_config.update({"num-server-rounds": 1, "min-train-replies": 2})
    nodes = make_node_ids(3)
    run_inprocess(tiny_config, num_nodes=3, fail_nodes={nodes[0], nodes[1]})
    before, after = initial_state(tiny_config), final_state(tiny_config)
    assert all(torch.equal(before[k], after[k]) for k in before if "residual_scale" not in k)


# -- checkpoint and resume ---------------------------------------------------------------------------

def _start_driver(config: dict, path: Path) -> subprocess.Popen:
    path.write_text(tomli_w.dumps(config))  # what the launchers write
    # the driver computes with this process's torch threads (a thread count changes a conv's sums: the
    # resumed half runs here, and must continue the killed half's numbers bit for bit)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "simulations.inprocess", str(path), "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return max(r["round"] for r in read_metrics(run_dir)) if (run_dir / CHECKPOINT_FILE).exists() else 0
    except (FileNotFoundError, ValueError):
        return 0


def test_killed_and_resumed_run_ends_bit_identical(tiny_config, tmp_path):
    tiny_config.update({"num-server-rounds": 4, "local-steps": 3, "eval-every": 4})
    whole = dict(tiny_config, **{"run-name": "whole"})
    run_inprocess(whole, num_nodes=2)

    killed = dict(tiny_config, **{"run-name": "killed"})
    proc = _start_driver(killed, tmp_path / "killed.run-config.toml")
    run_dir = Path(killed["output-dir"]) / "killed"
    deadline = time.time() + 300
    while _checkpoint_round(run_dir) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model.pt").exists()
    stopped_after = _checkpoint_round(run_dir)
    assert 2 <= stopped_after < 4

    run_inprocess(dict(killed, resume=True), num_nodes=2)
    a, b = final_state(whole), final_state(killed)
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["accuracy"] == read_metrics(Path(whole["output-dir"]) / "whole")[-1]["accuracy"]


class Stop(Exception):
    """A stop between two of a round's writes."""


@pytest.mark.parametrize("between, stop_round", [("nodes-and-checkpoint", 2), ("checkpoint-and-metrics", 2),
                                                 ("nodes-and-checkpoint", 1)])
def test_a_stop_between_a_rounds_writes_leaves_every_round_recorded_once(tiny_config, monkeypatch, between,
                                                                         stop_round):
    """A round's three writes are nodes.jsonl, the checkpoint, metrics.jsonl; a stop between any two restarts
    (a resume, or a new start when round 1 left no checkpoint) into files with every round's node rows (the
    evaluation's widths come from them) and metrics row once."""
    import resist_fl.flower.round_recorder as recorder

    tiny_config.update({"num-server-rounds": 3, "local-steps": 2})
    save, append = recorder.Checkpoint.save, recorder.append_metrics

    def save_or_stop(checkpoint, run_dir):
        if between == "nodes-and-checkpoint" and checkpoint.server_round == stop_round:
            raise Stop
        return save(checkpoint, run_dir)

    def append_or_stop(run_dir, *rows, **kwargs):
        if between == "checkpoint-and-metrics" and not kwargs and rows[0]["round"] == stop_round:
            raise Stop
        return append(run_dir, *rows, **kwargs)

    monkeypatch.setattr(recorder.Checkpoint, "save", save_or_stop)
    monkeypatch.setattr(recorder, "append_metrics", append_or_stop)
    with pytest.raises(Stop):
        run_inprocess(tiny_config, num_nodes=2)
    monkeypatch.undo()
    run_dir = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    assert (run_dir / "nodes.jsonl").exists()
    run_inprocess(dict(tiny_config, resume=stop_round > 1), num_nodes=2)
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert sorted(r["round"] for r in read_metrics(run_dir, "nodes.jsonl")) == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_corrupt_checkpoint_is_refused_and_left_untouched(tiny_config, damage):
    tiny_config["num-server-rounds"] = 1
    run_inprocess(tiny_config, num_nodes=2)
    path = Path(tiny_config["output-dir"]) / "test" / CHECKPOINT_FILE
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 10,
               "foreign": _torch_bytes({"weights": torch.zeros(2)})}[damage]
    path.write_bytes(damaged)
    tiny_config.update({"resume": True, "num-server-rounds": 2})
    with pytest.raises(CheckpointError, match="checkpoint|resist-fl"):
        run_inprocess(tiny_config, num_nodes=2)
    assert path.read_bytes() == damaged


def test_new_run_refuses_to_overwrite_an_existing_one(tiny_config):
    tiny_config["num-server-rounds"] = 1
    run_inprocess(tiny_config, num_nodes=2)
    with pytest.raises(FileExistsError, match="resume"):
        run_inprocess(tiny_config, num_nodes=2)


def test_resume_refuses_a_different_run_config(tiny_config):
    tiny_config["num-server-rounds"] = 1
    run_inprocess(tiny_config, num_nodes=2)
    tiny_config.update({"resume": True, "lr": 0.5})
    with pytest.raises(CheckpointError, match="lr"):
        run_inprocess(tiny_config, num_nodes=2)


def _torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_saved_model_loads_from_a_path_under_home(tmp_path, monkeypatch):
    """The docs load ``~/resist-fl-runs/RUN/model.pt``: the ``~`` is the user's home."""
    from resist_fl.run.outputs import load_model, save_model

    spec = ModelSpec(depths=(1, 1, 2, 1), base_width=4)
    model = build_model(spec)
    save_model(tmp_path / "model.pt", model.state_dict(), spec.to_dict())
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = load_model("~/model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
