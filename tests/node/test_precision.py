"""amp on any device: bf16 autocast trains and evaluates on the CPU, loss and argmax in fp32, the
logs name the precision, and GPU batches have one shape; ``amp='auto'`` (the default) decides per
device from its native bf16 support, each node reports what it trained in, and DP-SGD stays fp32."""

from __future__ import annotations

import math

import numpy as np
import torch

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.data import EvalBatches, TrainBatches, load_partition, load_test_set, normalization
from resist_fl.data.arrays import ImageArrays
from resist_fl.data.transforms import Normalization
import json
from pathlib import Path

import pytest

import client_app.app as client
import server_app.app as server
from resist_fl.core.validation import ReplyError
from resist_fl.flower.reply_screening import check_reply_metrics
from resist_fl.node import precision as precision_module
from resist_fl.node.precision import PRECISIONS, explain, native_bf16, precision, uses_bf16
from resist_fl.node.training import evaluate, train
from resist_fl.run.outputs import read_metrics
from resist_fl.run.settings import RunSettings, SettingsError
from simulations.inprocess import run_inprocess

CPU = torch.device("cpu")


def _digits_run(amp: bool) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = build_model(ModelSpec(depths=(1, 1, 2, 1), num_classes=10, in_channels=1, base_width=8))
    stats = normalization("digits")
    part = load_partition("digits", 0, 1, partitioner="iid", alpha=0.5, seed=0)
    loader = TrainBatches(part, 32, normalization=stats, seed=0)
    result = train(model, loader, steps=120, lr=0.05, momentum=0.9, weight_decay=5e-4, device=torch.device("cpu"),
                   amp=amp)
    loss, accuracy = evaluate(model, EvalBatches(load_test_set("digits"), 360, normalization=stats),
                              torch.device("cpu"), amp=amp)
    return result.loss, loss, accuracy


def test_bf16_autocast_on_the_cpu_trains_and_evaluates_close_to_fp32():
    fp32, bf16 = _digits_run(False), _digits_run(True)
    assert all(math.isfinite(v) for v in (*fp32, *bf16))
    assert fp32[2] > 0.85 and bf16[2] > 0.85
    assert abs(bf16[2] - fp32[2]) < 0.05  # real digits, 120 steps: the two precisions agree
    assert bf16[0] != fp32[0]  # the autocast branch really ran


def test_evaluation_takes_loss_and_argmax_in_fp32(monkeypatch):
    seen = []
    real = torch.Tensor.argmax

    def spy(self, *args, **kwargs):
        seen.append(self.dtype)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "argmax", spy)
    model = build_model(ModelSpec(depths=(1, 1, 1, 1), num_classes=10, in_channels=1, base_width=4))
    data = ImageArrays(np.zeros((6, 1, 8, 8), np.uint8), np.arange(6, dtype=np.int64) % 10)
    evaluate(model, EvalBatches(data, 3, normalization=Normalization((0.5,), (0.5,))), torch.device("cpu"), amp=True)
    assert seen == [torch.float32, torch.float32]


def test_the_start_up_logs_name_the_precision(tiny_config, caplog):
    tiny_config.update({"amp": True, "num-server-rounds": 1, "local-steps": 1})
    run_inprocess(tiny_config, num_nodes=2)
    assert precision(True) == "bf16 autocast" and precision(False) == "fp32"
    assert "nodes train in bf16 autocast (amp=true)" in caplog.text
    assert "resist-fl node: training on cpu in bf16 autocast (amp=true)" in caplog.text


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpus_native_bf16_and_true_or_false_force_it(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_bf16(CPU) is native
    assert uses_bf16("auto", CPU) is native
    assert uses_bf16(True, CPU) is True and uses_bf16(False, CPU) is False
    has = "has" if native else "has no"
    assert explain("auto", CPU) == (f"{precision(native)} (amp='auto': this CPU {has} native bf16; "
                                    "amp=true / amp=false to force)")
    assert explain(False, CPU) == "fp32 (amp=false)"


def test_amx_alone_counts_as_native_bf16_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bf16(CPU)


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_asks_for_native_bf16_not_emulation(monkeypatch, native):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    assert uses_bf16("auto", torch.device("cuda")) is native and asked == [False]


def test_amp_is_auto_by_default_and_takes_only_auto_true_or_false():
    assert RunSettings().amp == "auto"
    for value in ("auto", True, False):
        assert RunSettings.from_run_config({"amp": value}).amp == value
    for bad in (1, 0, 1.0, "true", "bf16"):
        with pytest.raises(SettingsError, match=f"amp = {bad!r}: expected one of auto, true, false"):
            RunSettings.from_run_config({"amp": bad})


def test_auto_means_fp32_under_local_dp_and_true_is_refused_there():
    local = {"dp": "local", "norm": "groupnorm"}
    assert RunSettings.from_run_config(local).amp_wanted() is False
    assert RunSettings.from_run_config({**local, "amp": False}).amp_wanted() is False
    assert RunSettings.from_run_config({"dp": "central", "weighting": "uniform"}).amp_wanted() == "auto"
    with pytest.raises(SettingsError, match="amp = true: dp='local'"):
        RunSettings.from_run_config({**local, "amp": True})


@pytest.mark.parametrize("native", [True, False])
def test_auto_run_trains_and_evaluates_in_what_each_device_supports_and_records_it(tiny_config, caplog,
                                                                                   monkeypatch, native):
    """The default (``auto``) end to end: the nodes and the server's evaluation follow the device's
    native bf16 (here the CPU probe, forced either way), the logs say so, every node row of
    ``nodes.jsonl`` names the precision its node reported, and ``run_config.json`` the server's."""
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
    client._announce_precision.cache_clear()  # it logs once per process and setting
    calls = []
    original = client.train

    def spy(*args, **kwargs):
        calls.append(kwargs["amp"])
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "train", spy)
    evaluated = []
    real_evaluate = server.evaluate_outputs

    def evaluate_spy(model, loader, device, amp=False, outputs=None):
        evaluated.append(amp)
        return real_evaluate(model, loader, device, amp, outputs)

    monkeypatch.setattr(server, "evaluate_outputs", evaluate_spy)
    tiny_config.update({"num-server-rounds": 1, "local-steps": 2})
    assert tiny_config["amp"] == "auto"  # the app's own default, from pyproject.toml
    run_inprocess(tiny_config, num_nodes=2)
    run = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    assert calls == [native, native]
    assert evaluated and set(evaluated) == {native}  # the server's evaluation, on its own device
    assert {row["precision"] for row in read_metrics(run, "nodes.jsonl")} == {precision(native)}
    central = json.loads((run / "run_config.json").read_text())["central-evaluation"]
    assert central == {"device": "cpu", "precision": precision(native)}
    assert "nodes train in bf16 autocast where their device has native bf16, else fp32 (amp='auto'" in caplog.text
    has = "has" if native else "has no"
    assert f"resist-fl node: training on cpu in {precision(native)} (amp='auto': this CPU {has} native bf16" \
        in caplog.text


def test_resuming_where_the_evaluation_precision_differs_warns(tiny_config, caplog, monkeypatch):
    """amp='auto' resumed on a device with other bf16 support: not bit-identical, and the log says so."""
    import resist_fl.flower.round_recorder as recorder

    class Stop(Exception):
        pass

    stop_at, save = [2], recorder.Checkpoint.save

    def save_or_stop(checkpoint, run_dir):
        if stop_at and checkpoint.server_round == stop_at[0]:
            raise Stop
        return save(checkpoint, run_dir)

    monkeypatch.setattr(recorder.Checkpoint, "save", save_or_stop)
    tiny_config.update({"num-server-rounds": 3, "local-steps": 1})
    run = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: True)
    with pytest.raises(Stop):
        run_inprocess(tiny_config, num_nodes=2)  # stops after round 1's checkpoint
    tiny_config["resume"] = True
    stop_at[0] = 3
    with pytest.raises(Stop):
        run_inprocess(tiny_config, num_nodes=2)  # the same device: no warning
    assert "resuming with the central evaluation" not in caplog.text
    stop_at.clear()
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: False)
    run_inprocess(tiny_config, num_nodes=2)
    assert ("resuming with the central evaluation in fp32 where the run started in bf16 autocast "
            "(amp='auto' on another device)") in caplog.text
    assert json.loads((run / "run_config.json").read_text())["central-evaluation"]["precision"] == "fp32"
    assert [r["round"] for r in read_metrics(run)] == [1, 2, 3]


def test_under_local_dp_the_logs_say_fp32_because_of_opacus_not_amp(monkeypatch):
    assert explain("auto", CPU, local_dp=True) == "fp32 (dp='local': Opacus' per-sample steps run in fp32)"
    assert server.nodes_precision("auto", local_dp=True).startswith("fp32 (dp='local'")
    assert server.nodes_precision(True, local_dp=False) == "bf16 autocast (amp=true)"


def test_a_reply_says_its_precision_as_a_bounded_number_and_an_odd_value_names_none():
    base = {"num-examples": 5, "train-loss": 0.1, "train-seconds": 1.0, "local-steps": 1}
    assert check_reply_metrics({**base, "bf16": 1}, 100)["bf16"] == 1
    for bad in (-1, float("nan"), True, "yes"):
        with pytest.raises(ReplyError, match="bf16"):
            check_reply_metrics({**base, "bf16": bad}, 100)
    assert PRECISIONS.get(1) == "bf16 autocast" and PRECISIONS.get(0.0) == "fp32" and PRECISIONS.get(7) is None


def test_gpu_batches_have_one_shape():
    data = ImageArrays(np.zeros((70, 1, 8, 8), np.uint8), np.zeros(70, np.int64))
    stats = Normalization((0.5,), (0.5,))
    assert [len(b[1]) for b in TrainBatches(data, 32, normalization=stats, drop_last=True)] == [32, 32]
    assert [len(b[1]) for b in TrainBatches(data, 32, normalization=stats)] == [32, 32, 6]
    small = ImageArrays(np.zeros((20, 1, 8, 8), np.uint8), np.zeros(20, np.int64))
    assert [len(b[1]) for b in TrainBatches(small, 32, normalization=stats, drop_last=True)] == [20]
