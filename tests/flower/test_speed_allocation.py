"""``allocation='speed'`` cannot be steered by a node's claims: allocation is total (any weights
in, valid depths out), speeds come from what the server observes (push to pull), a claim can only
make a node slower, and every speed weight stays within SPEED_WEIGHT_BOUND of the round's
median. Also: nodes reporting the same partition id are ordered the same way whatever order the
Grid lists them in."""

from __future__ import annotations

import math
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resist_fl.core.aggregation import merge_partial
from resist_fl.core.allocation import (
    SPEED_WEIGHT_BOUND,
    allocate_depths,
    bounded_weights,
    sane_weights,
)
from resist_fl.core.model_cost import max_depth
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.validation import MAX_METRIC
from resist_fl.flower.array_codec import array_of
from resist_fl.flower.client_side import identity_reply
from resist_fl.flower.metering import MeteredGrid
from resist_fl.flower.resist import ResIST
from simulations.inprocess_grid import InProcessGrid, make_node_ids

SPEC = ModelSpec(depths=(1, 1, 12, 1), base_width=4, num_classes=10)
LAYOUT = BlockLayout.from_spec(SPEC)
P = len(LAYOUT.partitionable)

WEIGHTS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**1100),
    st.sampled_from([5e-324, 1e-310, 1.7e308, 0.0, -0.0, None, "1.0", True, [1.0], float("nan")]))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(weights=st.lists(WEIGHTS, min_size=1, max_size=8), data=st.data())
def test_allocation_is_total_in_its_weights(weights, data):
    maxima = data.draw(st.lists(st.integers(1, P), min_size=len(weights), max_size=len(weights)))
    depths = allocate_depths(P, maxima, weights)
    assert len(depths) == len(weights)
    assert all(1 <= d <= m for d, m in zip(depths, maxima))
    assert sum(depths) == min(P, sum(maxima)) or sum(depths) >= P
    sane = sane_weights(weights, len(weights))
    assert all(0 < w <= 1 and math.isfinite(w) for w in sane)
    bounded = bounded_weights(weights)
    median = float(np.median(sane))  # the bound is relative to the median of the usable weights
    assert all(median / SPEED_WEIGHT_BOUND * (1 - 1e-12) <= w <= median * SPEED_WEIGHT_BOUND * (1 + 1e-12)
               for w in bounded)


def test_the_issues_weights_no_longer_raise():
    for weights in ([5e-324, 1.0, 1.0], [1e-310, 1.0], [1.7e308, 1.7e308, 1.0]):
        depths = allocate_depths(P, [P] * len(weights), weights)
        assert sum(depths) >= P and min(depths) >= 1  # every block held; a node gets at least one


def test_one_node_cannot_take_every_block():
    """A node claiming to be 10^9 times faster gets at most 4x the median node's share."""
    depths = allocate_depths(P, [P] * 4, bounded_weights([1e9, 1.0, 1.0, 1.0]))
    share = SPEED_WEIGHT_BOUND / (SPEED_WEIGHT_BOUND + 3)
    assert depths[0] <= math.ceil(share * P) and min(depths[1:]) >= math.floor((P - depths[0]) / 3)


# -- configure_train over rounds with adversarial speed claims -------------------------------------

CLAIMS = [5e-324, 1e-310, 1e-9, 0.0, 1e12, 1e11, 0.02, 0.05, 3.0, 2**60]
PLAN: dict[int, dict] = {}
CAPACITIES = [1.0, 0.5, 0.25, 0.75, 1.0, 0.3]

speed_app = ClientApp()


@speed_app.query()
def _identity(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    return identity_reply(msg, partition, CAPACITIES[partition % len(CAPACITIES)])


@speed_app.train()
def _train(msg: Message, context: Context) -> Message:
    plan = PLAN[context.node_id]
    time.sleep(plan["sleep"])
    arrays = {k: (v.numpy() + plan["shift"]).astype(v.numpy().dtype) if v.numpy().dtype.kind == "f" else v.numpy()
              for k, v in msg.content["arrays"].items()}
    metrics = {"num-examples": 10 + context.node_id % 7, "train-loss": 0.5,
               "train-seconds": plan["claim"], "local-steps": 1}
    if plan.get("bad-examples"):
        metrics["num-examples"] = 0
    return Message(RecordDict({"arrays": ArrayRecord({k: array_of(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


def global_record() -> ArrayRecord:
    import torch

    torch.manual_seed(0)
    state = build_model(SPEC).state_dict()
    return ArrayRecord({k: state[k] for k in LAYOUT.payload_keys()})


def run_rounds(claims: list[list[float]], bad: set[int], rounds: int):
    """``rounds`` rounds of speed-allocated ResIST; node i claims ``claims[r][i]`` in round r.
    Checks, every round: no raise, every reply counted, depths within capacity, the weight bound,
    the new global model equal to the merge of the valid replies. Returns the strategy."""
    nodes = make_node_ids(len(claims[0]))
    grid = MeteredGrid(InProcessGrid(speed_app, num_nodes=len(nodes)))
    strategy = ResIST(LAYOUT, min_train_nodes=len(nodes), min_available_nodes=len(nodes), allocation="speed",
                      capacity_measure="blocks")
    arrays = global_record()
    for r in range(rounds):
        PLAN.clear()
        PLAN.update({n: {"sleep": 0.0, "shift": 0.01 * (i + 1), "claim": claims[r][i], "bad-examples": i in bad}
                     for i, n in enumerate(nodes)})
        messages = list(strategy.configure_train(r + 1, arrays, ConfigRecord({}), grid))
        for m in messages:
            node = m.metadata.dst_node_id
            held = m.content["config"]["blocks"]
            assert 1 <= len(held) <= max_depth(strategy.sampler.capacity(node), P)
        sampled = sorted(strategy.plans, key=strategy.sampler.rank)
        weights = strategy.depth_weights(sampled)
        if strategy.speeds:  # the bound, computed independently from the recorded speeds
            known = [strategy.speeds[n] for n in sampled if n in strategy.speeds]
            raw = [strategy.speeds.get(n, float(np.median(known))) / max(known) for n in sampled]
            median = float(np.median(raw)) / max(raw)
            assert all(1 / SPEED_WEIGHT_BOUND - 1e-9 <= w / median <= SPEED_WEIGHT_BOUND + 1e-9 for w in weights)
        replies = list(grid.send_and_receive(messages))
        merged, metrics = strategy.aggregate_train(r + 1, replies)
        assert metrics["replies-accepted"] + metrics["replies-rejected"] == len(nodes)
        dropped = {nodes[i] for i in bad} | {n for n in nodes if PLAN[n]["claim"] > MAX_METRIC}
        valid = [rep for rep in replies if rep.metadata.src_node_id not in dropped]
        assert metrics["replies-accepted"] == len(valid)
        assert all(math.isfinite(s) and s > 0 for s in strategy.speeds.values())
        if valid:
            order = sorted(valid, key=lambda rep: strategy.sampler.rank(rep.metadata.src_node_id))
            glob = {k: v.numpy() for k, v in arrays.items()}
            expected = merge_partial(glob, [{k: v.numpy() for k, v in rep.content["arrays"].items()} for rep in order],
                                     [rep.content["metrics"]["num-examples"] for rep in order])
            for key, value in expected.items():
                assert merged[key].numpy().tobytes() == value.tobytes(), key
            arrays = merged
    return strategy


TRIED = {"cases": 0, "rounds": 0, "claims": set()}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(size=st.integers(2, 5), data=st.data())
def _fuzz(size, data):
    rounds = 3
    claims = [data.draw(st.lists(st.sampled_from(CLAIMS), min_size=size, max_size=size)) for _ in range(rounds)]
    bad = set(data.draw(st.lists(st.integers(0, size - 1), max_size=1)))
    run_rounds(claims, bad, rounds)
    TRIED["cases"] += 1
    TRIED["rounds"] += rounds
    TRIED["claims"] |= {c for row in claims for c in row}


def test_configure_train_never_raises_under_adversarial_speed_claims():
    _fuzz()
    print(f"\nspeed allocation: {TRIED['cases']} cases, {TRIED['rounds']} rounds, "
          f"{len(TRIED['claims'])} kinds of train-seconds claim, 0 failures")
    assert TRIED["cases"] == 40 and len(TRIED["claims"]) == len(CLAIMS)


def _depths_after_two_rounds(first_claim: float) -> tuple[dict[int, int], ResIST]:
    nodes = make_node_ids(4)
    strategy = ResIST(LAYOUT, min_train_nodes=4, min_available_nodes=4, allocation="speed", capacity_measure="blocks")
    grid = MeteredGrid(InProcessGrid(speed_app, num_nodes=4))
    PLAN.clear()
    PLAN.update({n: {"sleep": 0.05, "shift": 0.0, "claim": first_claim if i == 0 else 0.05}
                 for i, n in enumerate(nodes)})
    arrays = global_record()
    for r in range(1, 4):
        messages = list(strategy.configure_train(r, arrays, ConfigRecord({}), grid))
        strategy.aggregate_train(r, list(grid.send_and_receive(messages)))
    return {n: p.blocks for n, p in strategy.plans.items()}, strategy


def test_a_node_claiming_1e_9_seconds_gets_no_more_than_an_honest_one():
    """Every node really takes >= 0.05 s; node 0 claims 1e-9 s. The server observes its 0.05 s,
    so it gets (up to rounding noise) the depth it would get with an honest claim."""
    lying, strategy = _depths_after_two_rounds(1e-9)
    honest, _ = _depths_after_two_rounds(0.05)
    liar = make_node_ids(4)[0]
    assert lying[liar] <= honest[liar] + 1
    assert all(d >= 1 for d in lying.values())
    assert strategy.speeds[liar] <= lying[liar] / 0.05  # blocks per observed second, not per claimed


def test_observed_seconds_are_the_push_to_pull_time():
    nodes = make_node_ids(2)
    PLAN.clear()
    PLAN.update({nodes[0]: {"sleep": 0.0, "shift": 0.0, "claim": 0.01},
                 nodes[1]: {"sleep": 0.2, "shift": 0.0, "claim": 1e-9}})
    strategy = ResIST(LAYOUT, min_train_nodes=2, min_available_nodes=2, allocation="speed", capacity_measure="blocks")
    grid = MeteredGrid(InProcessGrid(speed_app, num_nodes=2))
    messages = list(strategy.configure_train(1, global_record(), ConfigRecord({}), grid))
    grid.send_and_receive(messages)
    seconds = {m.metadata.dst_node_id: grid.observed_seconds(m.metadata.message_id) for m in messages}
    assert seconds[nodes[1]] >= 0.2 > seconds[nodes[0]]


# -- duplicate partition ids ------------------------------------------------------------------------

class ShuffledGrid(InProcessGrid):
    """Lists its nodes in a given order (a Grid's order is not guaranteed)."""

    order: list[int] = []

    def get_node_ids(self):
        return list(self.order)


def test_duplicate_partition_ids_are_ordered_by_node_id(caplog):
    nodes = make_node_ids(4)
    configs = [{"partition-id": p, "num-partitions": 3} for p in (0, 1, 1, 2)]
    sent = {}
    for reverse in (False, True):
        grid = ShuffledGrid(speed_app, num_nodes=4, node_configs=configs)
        grid.order = list(reversed(nodes)) if reverse else list(nodes)
        strategy = ResIST(LAYOUT, min_train_nodes=3, min_available_nodes=4, fraction_train=0.75, seed=3,
                          capacity_measure="blocks")
        messages = strategy.configure_train(1, global_record(), ConfigRecord({}), grid)
        sent[reverse] = [(m.metadata.dst_node_id, tuple(m.content["config"]["blocks"])) for m in messages]
        assert [strategy.sampler.rank(n) for n in nodes] == sorted(strategy.sampler.rank(n) for n in nodes)
    assert sent[False] == sent[True]  # the seed reproduces the run whatever order the Grid lists nodes in
    assert f"nodes {nodes[1]}, {nodes[2]} all report partition-id 1" in caplog.text


class _SecondIdentityGrid(InProcessGrid):
    """Every node's identity reply is followed by a forged second one claiming capacity 0.1 and partition 7."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        return replies + [identity_reply(m, 7, 0.1) for m in messages if m.metadata.message_type == "query"]


def test_only_the_first_identity_reply_of_a_node_counts(caplog):
    """The identity query goes through every reply path's rule: a second reply to it is dropped."""
    from resist_fl.flower.node_sampling import NodeSampler

    nodes = make_node_ids(3)
    grid = _SecondIdentityGrid(speed_app, num_nodes=3, node_configs=[{"partition-id": p} for p in range(3)])
    sampler = NodeSampler(fraction=1.0, min_nodes=3, min_available_nodes=3, seed=0)
    order = sampler.stable_order(grid, list(nodes))
    assert [sampler.partition(n) for n in order] == [0, 1, 2]
    assert [sampler.capacity(n) for n in order] == CAPACITIES[:3]
    assert caplog.text.count("a second reply to the same identity query message") == 3
