"""The legacy adapter's ``aggregate_fit`` screens every reply as the Message API does: no reply,
however malformed, raises; every reply is counted; the new global model is the merge of the valid
first replies alone. Fuzzed (hypothesis) over tampered ``FitRes`` values, plus one test per case
of issue 21 and a run of Flower's legacy ``ServerApp(server_fn=...)`` with two hostile clients."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.app import Context, RecordDict
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resist_fl.core.aggregation import merge_partial
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.flower.legacy import KEYS, LegacyResIST, named_arrays
from simulations.inprocess_grid import InProcessGrid

SPEC = ModelSpec(depths=(1, 1, 4, 1), base_width=4, num_classes=10)
LAYOUT = BlockLayout.from_spec(SPEC)
CAP = 1000


class FakeProxy(ClientProxy):
    """A client proxy that only has a ``cid`` (aggregate_fit reads nothing else)."""

    def get_properties(self, *a, **k): raise NotImplementedError
    def get_parameters(self, *a, **k): raise NotImplementedError
    def fit(self, *a, **k): raise NotImplementedError
    def evaluate(self, *a, **k): raise NotImplementedError
    def reconnect(self, *a, **k): raise NotImplementedError


def initial_state(seed: int = 0) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in build_model(SPEC).state_dict().items()}


def configured(num_clients: int, seed: int = 0):
    """A LegacyResIST that has sent round 1 to ``num_clients`` clients: (strategy, {cid: FitIns})."""
    strategy = LegacyResIST(LAYOUT, initial_state(seed), min_train_nodes=num_clients,
                            min_available_nodes=num_clients, seed=seed, max_num_examples=CAP, capacity_measure="blocks")
    manager = SimpleClientManager()
    for i in range(num_clients):
        manager.register(FakeProxy(str(100 + i)))
    sent = strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)
    return strategy, {proxy.cid: ins for proxy, ins in sent}


def npy_bytes(value) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=True)
    return buffer.getvalue()


def claiming_header(shape: tuple[int, ...]) -> bytes:
    """The bytes of a .npy whose header claims ``shape`` of float32, followed by 16 bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 16


TENSOR_TAMPERS = {
    "garbage-bytes": lambda t: b"\x01garbage, not an array",
    "empty-bytes": lambda t: b"",
    "truncated-npy": lambda t: t[: len(t) // 2],
    "padded-npy": lambda t: t + b"\0\0\0\0",
    "object-array": lambda t: npy_bytes(np.array([object(), 1], dtype=object)),
    "header-1-tib": lambda t: claiming_header((2**38,)),
    "npz-bytes": lambda t: (lambda b: (np.savez(b, np.zeros(3)), b.getvalue())[1])(io.BytesIO()),
    "not-bytes": lambda t: 12345,
    "nan-values": lambda t: npy_bytes(np.full(np.load(io.BytesIO(t)).shape, np.nan, np.float32)),
    "wrong-shape": lambda t: npy_bytes(np.zeros((2, 3), np.float32)),
}
EXAMPLES_TAMPERS = {"zero-examples": 0, "negative-examples": -3, "huge-examples": CAP + 1,
                    "float-examples": 12.5, "list-examples": [10], "bool-examples": True,
                    "none-examples": None, "string-examples": "10"}
REPLY_TAMPERS = ["none-fitres", "none-parameters", "status-not-ok", "missing-tensor", "extra-tensor",
                 "tensor-type", "metrics-nan-loss", "metrics-not-a-dict", "dict-instead-of-fitres"]
KINDS = sorted(["valid"] * 6 + list(TENSOR_TAMPERS) + list(EXAMPLES_TAMPERS) + REPLY_TAMPERS)
VALID_KINDS = {"valid", "metrics-not-a-dict"}
"""Tampers that leave the reply valid (a legacy client's metrics are its own business)."""


def make_reply(ins, kind: str, shift: float, examples: int):
    """A client's FitRes for ``ins``, tampered as ``kind`` says."""
    named = named_arrays(ins.config, [np.load(io.BytesIO(t)) for t in ins.parameters.tensors])
    arrays = [(v + shift).astype(v.dtype) if v.dtype.kind == "f" else v for v in named.values()]
    tensors = list(ndarrays_to_parameters(arrays).tensors)
    num_examples, metrics = examples, {"train-loss": 0.5}
    if kind in TENSOR_TAMPERS:
        index = 0 if kind != "nan-values" else next(i for i, a in enumerate(arrays) if a.dtype.kind == "f")
        tensors[index] = TENSOR_TAMPERS[kind](tensors[index])
    elif kind in EXAMPLES_TAMPERS:
        num_examples = EXAMPLES_TAMPERS[kind]
    elif kind == "missing-tensor":
        tensors = tensors[1:]
    elif kind == "extra-tensor":
        tensors = tensors + tensors[:1]
    elif kind == "metrics-nan-loss":
        metrics = {"train-loss": float("nan")}
    elif kind == "metrics-not-a-dict":
        metrics = ["not", "a", "dict"]
    res = FitRes(status=Status(Code.OK, ""), parameters=Parameters(tensors, "numpy.ndarray"),
                 num_examples=num_examples, metrics=metrics)
    if kind == "tensor-type":
        res.parameters = Parameters(tensors, "pickle")
    elif kind == "none-parameters":
        res.parameters = None
    elif kind == "status-not-ok":
        res.status = Status(Code.FIT_NOT_IMPLEMENTED, "no fit")
    elif kind == "none-fitres":
        return None
    elif kind == "dict-instead-of-fitres":
        return {"parameters": res.parameters}
    return res, dict(zip(named, arrays))


def play(kinds: list[str], duplicates: list[int], foreign: int, exceptions: int, seed: int = 0):
    """One legacy round: client i replies as ``kinds[i]`` says; the clients at ``duplicates`` send a
    second (valid) reply after their first; ``foreign`` replies come from clients never sent
    anything (one with a non-numeric cid); ``exceptions`` failures are exceptions. Checks the
    counts and the merge; returns the metrics."""
    strategy, sent = configured(len(kinds), seed)
    before = {k: v.copy() for k, v in strategy.global_state.items()}
    results, valid = [], []
    for i, (cid, kind) in enumerate(zip(sorted(sent, key=int), kinds)):
        made = make_reply(sent[cid], kind, 0.1 * (i + 1), 10 * (i + 1))
        res, arrays = made if isinstance(made, tuple) else (made, None)
        results.append((FakeProxy(cid), res))
        if kind in VALID_KINDS:
            valid.append((arrays, 10 * (i + 1)))
        if i in duplicates:
            again, _ = make_reply(sent[cid], "valid", 5.0, 999)
            results.append((FakeProxy(cid), again))  # never counted: the first reply counts
    some_ins = next(iter(sent.values()))
    for j in range(foreign):
        res, _ = make_reply(some_ins, "valid", 1.0, 10)
        results.append((FakeProxy("intruder" if j == 0 else str(900 + j)), res))
    failures = [RuntimeError(f"client {j} timed out") for j in range(exceptions)]
    parameters, metrics = strategy.aggregate_fit(1, results, failures)

    assert metrics["replies-accepted"] == len(valid)
    assert metrics["replies-accepted"] + metrics["replies-rejected"] + metrics["replies-failed"] == \
        len(results) + len(failures)
    assert metrics["replies-missing"] == 0  # every client sent answered (its first reply counts)
    if not valid:
        assert parameters is None
        for key, value in before.items():
            np.testing.assert_array_equal(strategy.global_state[key], value)
        return metrics
    current = {k: before[k] for k in strategy.keys if any(k in a for a, _ in valid)}
    expected = merge_partial(current, [a for a, _ in valid], [n for _, n in valid])
    for key in strategy.keys:
        want = expected.get(key, before[key])
        assert strategy.global_state[key].tobytes() == want.tobytes(), key
        if want.dtype.kind == "f":
            assert np.isfinite(strategy.global_state[key]).all(), key
    got = named_arrays({KEYS: ",".join(strategy.keys)}, [np.load(io.BytesIO(t)) for t in parameters.tensors])
    assert all(np.array_equal(got[k], strategy.global_state[k]) for k in strategy.keys)
    return metrics


TRIED = {"cases": 0, "replies": 0, "valid": 0, "kinds": set()}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=5),
       duplicates=st.lists(st.integers(0, 4), max_size=2), foreign=st.integers(0, 2),
       exceptions=st.integers(0, 2), seed=st.integers(0, 2))
def _fuzz(kinds, duplicates, foreign, exceptions, seed):
    metrics = play(kinds, duplicates, foreign, exceptions, seed)
    TRIED["cases"] += 1
    TRIED["replies"] += metrics["replies-accepted"] + metrics["replies-rejected"] + metrics["replies-failed"]
    TRIED["valid"] += metrics["replies-accepted"]
    TRIED["kinds"] |= set(kinds) | ({"duplicate"} if duplicates else set()) | ({"foreign"} if foreign else set())


def test_no_legacy_reply_changes_the_global_model_except_by_the_valid_merge():
    _fuzz()
    print(f"\nlegacy aggregate_fit: {TRIED['cases']} rounds, {TRIED['replies']} replies "
          f"({TRIED['replies'] - TRIED['valid']} rejected or failed, {TRIED['valid']} accepted), "
          f"{len(TRIED['kinds'])} kinds, 0 failures")
    assert TRIED["cases"] == 150 and TRIED["valid"] >= 50 and TRIED["replies"] - TRIED["valid"] >= 300
    assert len(TRIED["kinds"]) >= len(set(KINDS)) - 2


@pytest.mark.parametrize("kind", sorted(set(KINDS)))
def test_every_kind_of_legacy_reply_is_screened(kind):
    metrics = play(["valid", kind, "valid"], [], 0, 0)
    assert metrics["replies-accepted"] == (3 if kind in VALID_KINDS else 2)


def test_a_client_that_returns_zero_examples_costs_its_reply_only(caplog):
    """Issue 21: the update and weight lists had different lengths and merge_partial raised."""
    metrics = play(["valid", "zero-examples", "valid"], [], 0, 0)
    assert (metrics["replies-accepted"], metrics["replies-rejected"]) == (2, 1)
    assert "num-examples = 0 is outside [1, 1000]" in caplog.text
    assert "round 1: reply of node 101 dropped" in caplog.text  # the Message API's log line


def test_undecodable_tensors_are_rejected_without_allocating(caplog):
    for kind in ("garbage-bytes", "empty-bytes", "truncated-npy", "object-array", "header-1-tib"):
        metrics = play(["valid", kind], [], 0, 0)
        assert (metrics["replies-accepted"], metrics["replies-rejected"]) == (1, 1), kind
    assert "the header claims shape (274877906944,)" in caplog.text
    assert "holds Python objects" in caplog.text


def test_only_the_first_reply_of_a_client_counts(caplog):
    metrics = play(["valid", "valid"], [0, 1], 0, 0)
    assert (metrics["replies-accepted"], metrics["replies-rejected"]) == (2, 2)
    metrics = play(["zero-examples", "valid"], [0], 0, 0)  # a malformed first reply is not rescued
    assert (metrics["replies-accepted"], metrics["replies-rejected"]) == (1, 2)
    assert "a second reply to the same fit message (the first one counts)" in caplog.text


def test_foreign_and_non_numeric_clients_and_failures_are_counted():
    metrics = play(["valid", "valid"], [], 2, 2)
    assert (metrics["replies-accepted"], metrics["replies-rejected"], metrics["replies-failed"]) == (2, 2, 2)


# -- end to end: Flower's legacy ServerApp with two hostile NumPyClients ------------------------

class EmptyPartitionClient(NumPyClient):
    """An ordinary NumPyClient whose partition is empty: it returns 0 examples."""

    def fit(self, parameters, config):
        return parameters, 0, {}


class GarbageTensorClient(Client):
    """A client whose first tensor is not an array at all."""

    def fit(self, ins: FitIns) -> FitRes:
        tensors = list(ins.parameters.tensors)
        tensors[0] = b"\x93NUMPY garbage"
        return FitRes(Status(Code.OK, ""), Parameters(tensors, "numpy.ndarray"), 50, {})


class HonestClient(NumPyClient):
    def fit(self, parameters, config):
        named = named_arrays(config, parameters)
        return [(v + 0.01).astype(v.dtype) if v.dtype.kind == "f" else v for v in named.values()], 50, {}


def hostile_client(partition: int) -> Client:
    return [EmptyPartitionClient().to_client(), GarbageTensorClient(), HonestClient().to_client()][partition]


def test_a_legacy_run_survives_hostile_clients_every_round(caplog):
    rounds, nodes = 3, 3
    strategy = LegacyResIST(LAYOUT, initial_state(), min_train_nodes=nodes, min_available_nodes=nodes, seed=0,
                            capacity_measure="blocks")
    history = []
    real = strategy.aggregate_fit

    def recorded(server_round, results, failures):
        out = real(server_round, results, failures)
        history.append(out[1])
        return out

    strategy.aggregate_fit = recorded
    server = ServerApp(server_fn=lambda context: ServerAppComponents(strategy=strategy,
                                                                     config=ServerConfig(num_rounds=rounds)))
    client = ClientApp(client_fn=lambda context: hostile_client(int(context.node_config["partition-id"])))
    grid = InProcessGrid(client, num_nodes=nodes, raise_client_errors=False)
    before = {k: v.copy() for k, v in strategy.global_state.items()}
    server(grid, Context(run_id=grid.run.run_id, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert len(history) == rounds
    for metrics in history:
        assert (metrics["replies-accepted"], metrics["replies-rejected"], metrics["replies-failed"]) == (1, 2, 0)
        assert metrics["merge-refused"] == 0
    assert "num-examples = 0 is outside" in caplog.text
    assert "conv1.weight cannot be decoded" in caplog.text
    moved = [k for k in strategy.keys if not np.array_equal(strategy.global_state[k], before[k])]
    assert any(k.startswith("conv1") for k in moved)  # the honest client's update was merged
    assert all(np.isfinite(v).all() for v in strategy.global_state.values() if v.dtype.kind == "f")
