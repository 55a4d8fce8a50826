"""Compressed transport (``transport-dtype``): round trips, bad encodings, bytes and whole runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resist_fl.core.transport import TransportError, decode_array, decode_state, encode_array
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (7,), (), (0,)])
def test_round_trips_stay_within_their_quantisation_error(shape):
    x = np.asarray(RNG.standard_normal(shape) * 3, dtype=np.float32)
    assert decode_array(encode_array(x, "float32"), shape, np.float32, "float32") is x
    half = decode_array(encode_array(x, "float16"), shape, np.float32, "float16")
    assert half.dtype == np.float32 and half.shape == x.shape
    np.testing.assert_allclose(half, x, rtol=2**-11, atol=2**-24)
    wire = encode_array(x, "uint8")
    assert wire.dtype == np.uint8 and wire.shape == (8 + x.size,)
    byte = decode_array(wire, shape, np.float32, "uint8")
    assert byte.dtype == np.float32 and byte.shape == x.shape
    if x.size:
        step = (x.max() - x.min()) / 255
        assert np.abs(byte - x).max() <= step / 2 + 1e-6 * np.abs(x).max()
        assert byte.min() == pytest.approx(x.min()) and byte.max() == pytest.approx(x.max(), rel=1e-6)


def test_constants_integers_and_out_of_range_values():
    const = np.full((4, 4), 0.7, np.float32)
    np.testing.assert_array_equal(decode_array(encode_array(const, "uint8"), (4, 4), np.float32, "uint8"), const)
    steps = np.array([3, 2**40], np.int64)  # num_batches_tracked travels as it is
    for transport in ("float16", "uint8"):
        assert encode_array(steps, transport) is steps
    big = np.array([1e6, -1e6, 1.0], np.float32)  # beyond float16: saturates, never Inf
    half = encode_array(big, "float16")
    assert np.isfinite(half).all() and half[0] == np.float16(65504)


def test_non_finite_values_never_decode_to_finite_garbage():
    x = np.array([1.0, np.nan, 2.0], np.float32)
    for transport in ("float16", "uint8"):
        assert not np.isfinite(decode_array(encode_array(x, transport), (3,), np.float32, transport)).all()


@pytest.mark.parametrize("transport, value, match", [
    ("float16", np.zeros((2, 3), np.float32), "float16"),
    ("float16", np.zeros((3, 2), np.float16), "shape"),
    ("uint8", np.zeros(6, np.uint8), r"shape \(14,\)"),
    ("uint8", np.zeros(14, np.int8), "uint8"),
    ("uint8", [1, 2], "list"),
])
def test_bad_encodings_are_named(transport, value, match):
    with pytest.raises(TransportError, match=match):
        decode_state({"w": value}, {"w": ((2, 3), np.dtype(np.float32))}, transport)
    with pytest.raises(TransportError, match="^w "):
        decode_state({"w": value}, {"w": ((2, 3), np.dtype(np.float32))}, transport)


def test_bytes_shrink_by_the_dtype_ratio():
    state = {f"w{i}": RNG.standard_normal((64, 64, 3, 3)).astype(np.float32) for i in range(3)}
    size = {t: sum(encode_array(v, t).nbytes for v in state.values()) for t in ("float32", "float16", "uint8")}
    assert size["float16"] * 2 == size["float32"]
    assert size["uint8"] == size["float32"] / 4 + 8 * len(state)
    with pytest.raises(ValueError, match="bfloat8"):
        encode_array(np.zeros(2, np.float32), "bfloat8")


@pytest.mark.parametrize("strategy", ["resist", "fedavg"])
def test_runs_with_compressed_transport_learn_and_meter_fewer_bytes(tiny_config, strategy):
    """The real apps in-process: every transport trains, keeps a float32 global model, and its bytes shrink."""
    rows = {}
    for transport in ("float32", "float16", "uint8"):
        name = f"{strategy}-{transport}"
        run_inprocess({**tiny_config, "strategy": strategy, "transport-dtype": transport, "run-name": name},
                      num_nodes=2)
        rows[transport] = read_metrics(Path(tiny_config["output-dir"]) / name)
        last = rows[transport][-1]
        assert last["replies-accepted"] == 2 and last["replies-rejected"] == 0, last
        assert np.isfinite(last["train-loss"]) and last["accuracy"] > 0.2, last  # chance: 0.1
    down = {t: rows[t][0]["bytes-down"] for t in rows}
    up = {t: rows[t][0]["bytes-up"] for t in rows}
    assert 0.49 < down["float16"] / down["float32"] < 0.51 and 0.49 < up["float16"] / up["float32"] < 0.51
    assert 0.24 < down["uint8"] / down["float32"] < 0.27 and 0.24 < up["uint8"] / up["float32"] < 0.27


@pytest.mark.parametrize("kind", ["resist", "fedavg"])
def test_screening_decodes_replies_and_rejects_bad_encodings(kind, caplog):
    """Encoded replies are decoded to float32 before any check; a reply in the wrong encoding or
    with NaN inside is rejected (counted), never merged, never raised."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from client_app.app import identity_handler
    from resist_fl.core.decomposition import BlockLayout
    from resist_fl.core.model import ModelSpec, build_model
    from resist_fl.flower.fedavg import ScreenedFedAvg
    from resist_fl.flower.resist import ResIST
    from simulations.inprocess_grid import InProcessGrid

    spec = ModelSpec(depths=(1, 1, 4, 1), base_width=4)
    layout = BlockLayout.from_spec(spec)
    state = build_model(spec).state_dict()
    global_arrays = ArrayRecord({k: state[k] for k in layout.payload_keys()})
    if kind == "resist":
        strategy = ResIST(layout, min_train_nodes=3, min_available_nodes=3, transport_dtype="uint8",
                          capacity_measure="blocks")
    else:
        strategy = ScreenedFedAvg(min_train_nodes=3, min_available_nodes=3, transport_dtype="uint8",
                                  capacity_measure="blocks")
    silent = ClientApp()  # answers the partition query; its train replies are not used here
    silent.query()(identity_handler)
    silent.train()(lambda msg, context: Message(RecordDict({}), reply_to=msg))
    grid = InProcessGrid(silent, num_nodes=3)
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord({}), grid))
    grid.push_messages(messages)
    sent = messages[0].content["arrays"]
    assert all(a.dtype == "uint8" for k, a in sent.items() if global_arrays[k].dtype == "float32")

    def reply(msg, transform):
        arrays = {k: transform(a.numpy()) for k, a in msg.content["arrays"].items()}
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5,
                                                       "train-seconds": 1.0, "local-steps": 2})})
        out = Message(content, reply_to=msg)
        out.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return out

    def with_nan(wire):
        if wire.dtype != np.uint8:
            return wire
        out = wire.copy()
        out[:4] = np.array([np.nan], np.float32).view(np.uint8)  # the header's low: NaN
        return out

    replies = [reply(messages[0], lambda wire: wire),                                    # valid
               reply(messages[1], lambda wire: wire[8:] if wire.dtype == np.uint8 else wire),  # no header
               reply(messages[2], with_nan)]
    merged, metrics = strategy.aggregate_train(1, replies)
    assert metrics["replies-accepted"] == 1 and metrics["replies-rejected"] == 2, dict(metrics)
    assert metrics["replies-non-finite"] == 1
    assert "expected uint8 of shape" in caplog.text
    for key, array in merged.items():
        assert array.dtype == global_arrays[key].dtype  # the global model stays float32
        assert np.isfinite(array.numpy()).all()
    key = "conv1.weight"
    step = (state[key].max() - state[key].min()).item() / 255
    assert np.abs(merged[key].numpy() - state[key].numpy()).max() <= step / 2 + 1e-6
