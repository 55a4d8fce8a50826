"""Reliability: malformed replies never reach the global model; failures; kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resist_fl.aggregation import merge_partial
from resist_fl.checkpoint import CHECKPOINT_FILE, CheckpointError
from resist_fl.decomposition import BlockLayout
from resist_fl.fedavg import ScreenedFedAvg
from resist_fl.model import ModelSpec, build_model
from resist_fl.outputs import read_metrics
from resist_fl.strategy import ResIST
from tests.appdriver import run_inprocess
from tests.inprocess_grid import InProcessGrid, make_node_ids

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(depths=(1, 1, 4, 1), base_width=4, norm="batchnorm-running")
LAYOUT = BlockLayout.from_spec(SPEC)
CAP = 1000
INT_KEY = "layer1.0.bn1.num_batches_tracked"

# -- an adversarial ClientApp: each node replies as PLAN says ------------------------------------

TAMPERS = {
    "valid": lambda u, m: (u, m),
    "missing-key": lambda u, m: ({k: v for k, v in list(u.items())[1:]}, m),
    "extra-key": lambda u, m: ({**u, "evil.weight": np.zeros(3, np.float32)}, m),
    "unassigned-block-key": None,  # needs the node's blocks: handled in the app
    "wrong-shape": lambda u, m: ({**u, "linear.weight": np.zeros((2, 2), np.float32)}, m),
    "wrong-dtype": lambda u, m: ({**u, "linear.weight": u["linear.weight"].astype(np.int32)}, m),
    "float-as-bool": lambda u, m: ({**u, "conv1.weight": u["conv1.weight"].astype(bool)}, m),
    "int-buffer-as-float": lambda u, m: ({**u, INT_KEY: u[INT_KEY].astype(np.float32)}, m),
    "train-seconds-list": "train-seconds-list",
    "renamed-records": "renamed-records",
    "nan": lambda u, m: ({**u, "linear.bias": np.full_like(u["linear.bias"], np.nan)}, m),
    "inf": lambda u, m: ({**u, "conv1.weight": np.full_like(u["conv1.weight"], np.inf)}, m),
    "zero-examples": lambda u, m: (u, {**m, "num-examples": 0}),
    "negative-examples": lambda u, m: (u, {**m, "num-examples": -5}),
    "fractional-examples": lambda u, m: (u, {**m, "num-examples": 12.5}),
    "huge-examples": lambda u, m: (u, {**m, "num-examples": 10**12}),
    "missing-examples": lambda u, m: (u, {k: v for k, v in m.items() if k != "num-examples"}),
    "nan-loss": lambda u, m: (u, {**m, "train-loss": float("nan")}),
    "no-metrics": "no-metrics",
    "two-array-records": "two-array-records",
    "raises": "raises",
}
PLAN: dict[int, tuple[str, float]] = {}
TRIED = {"malformed": 0, "valid": 0}

adversarial_app = ClientApp()


@adversarial_app.train()
def _adversarial_train(msg: Message, context: Context) -> Message:
    tamper, shift = PLAN[context.node_id]
    received = msg.content["arrays"]
    update = {k: v.numpy() + np.asarray(shift, dtype=v.numpy().dtype) for k, v in received.items()}
    metrics = {"num-examples": 10 + context.node_id % 97, "train-loss": 1.0, "train-seconds": 0.1, "local-steps": 1}
    if tamper == "raises":
        raise RuntimeError("client crashed")
    if tamper == "unassigned-block-key" and "blocks" in msg.content["config"]:
        other = next(b for b in LAYOUT.partitionable if b not in msg.content["config"]["blocks"])
        update = {**update, **{k: np.zeros(1, np.float32) for k in LAYOUT.payload_keys([other])
                               if k not in update}}
    elif callable(TAMPERS[tamper]):
        update, metrics = TAMPERS[tamper](update, metrics)
    arrays = ArrayRecord({k: torch.from_numpy(np.require(v, requirements="C")) for k, v in update.items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    if tamper == "no-metrics":
        content = RecordDict({"arrays": arrays})
    if tamper == "two-array-records":
        content["more"] = ArrayRecord({"x": torch.zeros(1)})
    if tamper == "train-seconds-list":
        content["metrics"]["train-seconds"] = [0.1, 0.2]
    if tamper == "renamed-records":
        content = RecordDict({"params": arrays, "stats": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


VALID = ("valid", "renamed-records")
"""Tampers that leave a reply valid (record names are free)."""


def _arrays(reply):
    return next(iter(reply.content.array_records.values()))


def _metrics(reply):
    return next(iter(reply.content.metric_records.values()))


def global_record(seed: int) -> ArrayRecord:
    torch.manual_seed(seed)
    state = build_model(SPEC).state_dict()
    return ArrayRecord({k: state[k] for k in LAYOUT.payload_keys()})


def fuzz_round(tampers: list[str], shifts: list[float], seed: int) -> None:
    nodes = make_node_ids(len(tampers))
    PLAN.clear()
    PLAN.update({n: (t, s) for n, t, s in zip(nodes, tampers, shifts)})
    grid = InProcessGrid(adversarial_app, num_nodes=len(nodes), raise_client_errors=False)
    strategy = ResIST(LAYOUT, min_train_nodes=len(nodes), min_available_nodes=len(nodes),
                      max_num_examples=CAP, seed=seed)
    initial = global_record(seed)
    messages = list(strategy.configure_train(1, initial, ConfigRecord({}), grid))
    replies = list(grid.send_and_receive(messages))
    merged, metrics = strategy.aggregate_train(1, replies)

    valid = [r for r in replies if PLAN[r.metadata.src_node_id][0] in VALID]
    TRIED["valid"] += len(valid)
    TRIED["malformed"] += len(replies) - len(valid)
    assert metrics["replies-accepted"] == len(valid)
    assert metrics["replies-rejected"] + metrics["replies-failed"] == len(replies) - len(valid)
    if not valid:
        assert merged is None  # global model unchanged
        return
    glob = {k: v.numpy() for k, v in initial.items()}
    expected = merge_partial(glob, [{k: v.numpy() for k, v in _arrays(r).items()} for r in valid],
                             [_metrics(r)["num-examples"] for r in valid])
    assert list(merged.keys()) == list(initial.keys())
    for key, value in expected.items():
        assert merged[key].numpy().tobytes() == value.tobytes(), key


@settings(max_examples=240, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(tampers=st.lists(st.sampled_from(sorted(TAMPERS) + ["valid"] * 6), min_size=2, max_size=6),
       shift=st.floats(-2, 2, allow_nan=False), seed=st.integers(0, 3))
def _fuzz(tampers, shift, seed):
    fuzz_round(tampers, [shift * (i + 1) for i in range(len(tampers))], seed)


def test_malformed_replies_never_change_the_global_model():
    TRIED.update(malformed=0, valid=0)
    _fuzz()
    print(f"\nmalformed replies tried: {TRIED['malformed']}, valid: {TRIED['valid']}")
    assert TRIED["malformed"] >= 500 and TRIED["valid"] >= 50


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_every_kind_of_malformed_reply_is_dropped(tamper):
    fuzz_round(["valid", tamper, "valid"], [0.5, 1.0, -0.25], seed=0)


@pytest.mark.parametrize("tamper", sorted(set(TAMPERS) - {"unassigned-block-key"}))
def test_fedavg_drops_malformed_replies_too(tamper):
    """Flower's FedAvg behind the same screening: the result is FedAvg of the valid replies."""
    nodes = make_node_ids(3)
    PLAN.clear()
    PLAN.update(zip(nodes, [("valid", 0.5), (tamper, 1.0), ("valid", -0.25)]))
    grid = InProcessGrid(adversarial_app, num_nodes=3, raise_client_errors=False)
    strategy = ScreenedFedAvg(min_train_nodes=3, min_available_nodes=3, max_num_examples=CAP)
    initial = global_record(0)
    replies = list(grid.send_and_receive(strategy.configure_train(1, initial, ConfigRecord({}), grid)))
    merged, metrics = strategy.aggregate_train(1, replies)
    valid = [r for r in replies if PLAN[r.metadata.src_node_id][0] in VALID]
    assert metrics["replies-accepted"] == len(valid) == (3 if tamper in VALID else 2)
    canonical = [Message(RecordDict({"arrays": _arrays(r), "metrics": _metrics(r)}), reply_to=m)
                 for r, m in zip(valid, [m for m in grid.sent if m.metadata.dst_node_id in
                                         {r.metadata.src_node_id for r in valid}])]
    expected, _ = FedAvg(min_train_nodes=3).aggregate_train(1, canonical)
    for key in initial:
        want = expected[key].numpy().astype(initial[key].numpy().dtype)
        np.testing.assert_array_equal(merged[key].numpy(), want, err_msg=key)
        assert merged[key].dtype == initial[key].dtype, key


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
    path.write_text(json.dumps(config))
    return subprocess.Popen([sys.executable, "-m", "tests.appdriver", str(path), "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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
    proc = _start_driver(killed, tmp_path / "killed.json")
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


class _IdsOnlyGrid:
    """Just enough Grid for configure_train: Flower's node ids are random 64-bit integers."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, messages, *, timeout=None):  # partition-id queries: no answer
        return []


def test_node_ids_above_2_63_survive_sampling():
    from tests.inprocess_grid import set_server_task_identity

    set_server_task_identity()
    ids = [2**64 - 1, 17, 2**63 + 5, 2**63 - 1]
    strategy = ResIST(LAYOUT, fraction_train=0.5, min_train_nodes=2, min_available_nodes=4)
    for rnd in range(1, 6):
        messages = list(strategy.configure_train(rnd, global_record(0), ConfigRecord({}), _IdsOnlyGrid(ids)))
        dst = [m.metadata.dst_node_id for m in messages]
        assert len(dst) == 2 and set(dst) <= set(ids) and all(type(d) is int for d in dst)


def test_superlink_errors_are_attributed_to_their_node(caplog):
    """Errors made by the SuperLink (node offline, message expired) come from node 1."""
    from flwr.app import Error

    from resist_fl.reply_screening import screen_replies

    nodes = make_node_ids(2)
    PLAN.clear()
    PLAN.update({n: ("valid", 0.0) for n in nodes})
    grid = InProcessGrid(adversarial_app, num_nodes=2, raise_client_errors=False)
    strategy = ResIST(LAYOUT, min_train_nodes=2, min_available_nodes=2)
    messages = list(strategy.configure_train(1, global_record(0), ConfigRecord({}), grid))
    grid.push_messages(messages)
    offline = Message(Error(code=5, reason="node offline"), reply_to=messages[0])
    offline.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink sends it (no public setter)
    screened = screen_replies(1, [offline], {}, global_record(0), CAP, messages=messages)
    assert screened.failed == 1
    assert f"node {messages[0].metadata.dst_node_id} failed" in caplog.text
