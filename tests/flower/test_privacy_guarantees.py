"""Privacy guarantees as an adversary would test them (issue 31): the noise cannot be replayed
from anything public, epsilon is accounted for what is public, nothing leaves around the mechanism,
ledgers survive restarts, minimum holders hold at merge, adaptive clipping tracks its quantile."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import NeighboringRelation, dp_event, rdp

from client_app.app import app as client_app
from resist_fl import data
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.data.arrays import ImageArrays
from resist_fl.data.batches import TrainBatches
from resist_fl.flower import central_dp as central_dp_module
from resist_fl.flower.central_dp import CentralDP
from resist_fl.flower.node_sampling import NodeSampler
from resist_fl.flower.resist import ResIST
from resist_fl.flower.round_recorder import PRIVATE_DROPPED
from resist_fl.node import local_dp
from resist_fl.run.outputs import NODES_FILE, SUMMARY_FILE, read_metrics
from resist_fl.run.settings import RunSettings
from resist_fl.run.settings_error import SettingsError
from simulations.inprocess import run_inprocess

SIX_BLOCKS = {"stage-depths": "1,1,7,1", "capacity-measure": "blocks"}
DELTA = 1e-5


def _run(config: dict, num_nodes: int, **grid) -> tuple[Path, list[dict], list[dict]]:
    run_inprocess(config, num_nodes=num_nodes, **grid)
    run_dir = Path(config["output-dir"]) / config["run-name"]
    nodes = read_metrics(run_dir, NODES_FILE) if (run_dir / NODES_FILE).exists() else []
    return run_dir, read_metrics(run_dir), nodes


def _reference(z: float, rounds: int) -> float:
    """Independently of the project: ``rounds`` Gaussian releases of multiplier ``z``, no
    amplification, add/remove one node (dp-accounting's RDP accountant, one event per round)."""
    if rounds == 0:
        return 0.0
    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    for _ in range(rounds):
        accountant.compose(dp_event.GaussianDpEvent(z))
    return accountant.get_epsilon(DELTA)


# --------------------------------------------------------------------------- replaying the noise

ROUND_SEED = 0 * 100_003 + 1 * 1_009 + 0  # what the ClientApp derives for seed 0, round 1, partition 0


def _private_step(noise_multiplier: float) -> tuple[dict, dict, int]:
    """One DP-SGD step (lr 1, no momentum) on a tiny model over a batch of the whole partition
    (rate 1: the batch is known), the ClientApp's public seeding done first; (before, after, B)."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(depths=(1, 1, 1, 1), base_width=4, norm="groupnorm", num_classes=10))
    rng = np.random.default_rng(0)
    arrays = ImageArrays(rng.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8),
                         rng.integers(0, 10, 16).astype(np.int64))
    loader = TrainBatches(arrays, 16, normalization=data.Normalization((0.5,), (0.25,)), seed=ROUND_SEED)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.manual_seed(ROUND_SEED)  # as client_app.train_handler does before training (public values)
    local_dp.train_private(model, loader, steps=1, lr=1.0, momentum=0.0, weight_decay=0.0,
                           noise_multiplier=noise_multiplier, clip=1.0, delta=DELTA)
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    return before, after, 16


def _replays(shapes: dict, std: float) -> list[dict]:
    """Every noise an adversary can regenerate from public values: the global RNG and a fresh
    generator seeded with the round seed, plain and in Opacus' secure-mode pattern."""
    out = []
    for fresh in (False, True):
        for secure in (False, True):
            gen = torch.Generator().manual_seed(ROUND_SEED) if fresh else None
            if not fresh:
                torch.manual_seed(ROUND_SEED)
            noise = {}
            for key, shape in shapes.items():
                if secure:
                    torch.normal(0, std, size=(1, 1), generator=gen)
                    noise[key] = sum(torch.normal(0, std, size=shape, generator=gen) for _ in range(4)) / 2
                else:
                    noise[key] = torch.normal(0, std, size=shape, generator=gen)
            out.append(noise)
    return out


def _replay_errors(monkeypatch=None) -> tuple[float, float]:
    """(smallest error of a replayed gradient sum against the noiseless one, the noise's norm)."""
    before, clean, batch = _private_step(1e-12)
    noiseless = {k: (before[k] - clean[k]) * batch for k in before}
    before, after, batch = _private_step(2.0)
    noisy = {k: (before[k] - after[k]) * batch for k in before}
    noise_norm = math.sqrt(sum(float(((noisy[k] - noiseless[k]) ** 2).sum()) for k in noisy))
    errors = []
    for replay in _replays({k: v.shape for k, v in before.items()}, 2.0 * 1.0):
        recovered = {k: noisy[k] - replay[k] for k in noisy}
        errors.append(math.sqrt(sum(float(((recovered[k] - noiseless[k]) ** 2).sum()) for k in noisy)))
    return min(errors), noise_norm


def test_the_server_cannot_replay_local_dp_noise_from_public_values():
    error, noise = _replay_errors()
    assert noise > 1.0
    assert error > 0.5 * noise  # removing any replayed noise leaves about the noise itself (was 1e-6)


def test_the_replay_attack_works_when_the_noise_is_seeded_from_public_values(monkeypatch):
    """The attack is real: with the round seed behind the generators it recovers the gradient sum."""
    monkeypatch.setattr(local_dp, "secure_torch_generator",
                        lambda device="cpu": torch.Generator().manual_seed(ROUND_SEED))
    error, noise = _replay_errors()
    assert error < 1e-3 * noise


def _central_noise(dp: CentralDP) -> np.ndarray:
    current = {"w": np.zeros(5000)}
    return dp.merge(current, [], {"w": 1})["w"]


def test_the_server_side_noise_cannot_be_replayed_from_the_seed_or_round():
    np.random.seed(0)
    noise = _central_noise(CentralDP(dp_clip=1.0, dp_noise_multiplier=1.0))
    for seed in (0, 1):
        for replay in (np.random.default_rng([seed, 1]).normal(0, 1.0, 5000),
                       np.random.RandomState(seed).normal(0, 1.0, 5000),
                       np.random.default_rng(seed).normal(0, 1.0, 5000)):
            assert np.linalg.norm(noise - replay) > 0.5 * np.linalg.norm(noise)
    other = _central_noise(CentralDP(dp_clip=1.0, dp_noise_multiplier=1.0))
    assert np.linalg.norm(noise - other) > 0.5 * np.linalg.norm(noise)  # a second run draws other noise


def test_a_seeded_central_generator_would_be_replayed(monkeypatch):
    monkeypatch.setattr(central_dp_module, "secure_numpy_generator", lambda: np.random.default_rng(7))
    noise = _central_noise(CentralDP(dp_clip=1.0, dp_noise_multiplier=1.0))
    assert np.allclose(noise, np.random.default_rng(7).normal(0, 1.0, 5000))


# --------------------------------------------------------------------------- accounting

def _central(tiny_config, **changes):
    tiny_config.update(SIX_BLOCKS, **{"local-steps": 1, "dp": "central", "weighting": "uniform", "dp-clip": 0.5,
                                      "dp-noise-multiplier": 1.5, **changes})
    return tiny_config


def test_each_node_is_charged_the_rounds_it_was_sent_a_model_in(tiny_config):
    _central(tiny_config, **{"num-server-rounds": 3, "fraction-train": 0.5, "min-train-nodes": 2,
                             "min-available-nodes": 4})
    run_dir, rows, nodes = _run(tiny_config, num_nodes=4)
    counts: dict[int, int] = {}
    for run_round, row in enumerate(rows, start=1):
        for node in (n for n in nodes if n["round"] == run_round):
            counts[node["partition"]] = counts.get(node["partition"], 0) + 1
            assert node["epsilon"] == pytest.approx(_reference(1.5, counts[node["partition"]]), rel=1e-6)
        assert row["epsilon"] == pytest.approx(_reference(1.5, max(counts.values())), rel=1e-6)
        assert row["epsilon-every-round"] == pytest.approx(_reference(1.5, run_round), rel=1e-6)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["epsilon"] == rows[-1]["epsilon"]
    assert summary["epsilon-every-round"] == rows[-1]["epsilon-every-round"]


def test_secret_sampling_writes_no_participant_and_uses_the_amplified_accountant(tiny_config):
    _central(tiny_config, **{"num-server-rounds": 2, "fraction-train": 0.5, "min-train-nodes": 2,
                             "min-available-nodes": 4, "dp-sampling": "secret"})
    run_dir, rows, nodes = _run(tiny_config, num_nodes=4)
    assert nodes == []
    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_event.SampledWithoutReplacementDpEvent(4, 2, dp_event.GaussianDpEvent(1.5 / 2)), 2)
    assert rows[-1]["epsilon"] == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-6)
    assert "participations" not in json.dumps(rows[-1]["dp-state"]) or rows[-1]["dp-state"]["participations"] == {}
    text = "".join(p.read_text() for p in run_dir.glob("*.json*"))
    assert not re.search(r"(partition|node)-\d", text) and '"node":' not in text


def test_a_secret_sample_is_not_the_seeded_one():
    draws = set()
    for _ in range(6):
        sampler = NodeSampler(fraction=0.2, min_nodes=10, min_available_nodes=50, seed=0, secret=True)
        draws.add(tuple(int(i) for i in np.sort(sampler._secret_rng.choice(50, 10, replace=False))))
    assert len(draws) > 1  # the same seed, other samples


def test_a_secret_sample_over_nodes_of_different_capacities_is_refused():
    """What a node is sent follows its capacity and each round's bytes and sub-models are released: with two
    capacities among the connected nodes they would tell which were sampled, so a secret sample is refused."""
    from types import SimpleNamespace

    sampler = NodeSampler(fraction=0.5, min_nodes=2, min_available_nodes=4, seed=0, secret=True)
    grid = SimpleNamespace(get_node_ids=lambda: [10, 11, 12, 13])
    for node in range(10, 14):  # identified (no identity query needed), two capacities
        sampler._rank_key[node] = (0, node - 10, node)
        sampler._capacity[node] = 1.0 if node < 12 else 0.5
    with pytest.raises(RuntimeError, match=r"declare capacities \[0.5, 1.0\]"):
        sampler.sample(grid, 1)
    sampler._capacity.update({node: 0.5 for node in range(10, 14)})  # one capacity: the sample stays secret
    sampled, connected, _ = sampler.sample(grid, 1)
    assert connected == 4 and len(sampled) == 2


def test_the_target_plans_against_a_node_in_every_round(tiny_config, caplog):
    one, two = _reference(1.0, 1), _reference(1.0, 2)
    _central(tiny_config, **{"num-server-rounds": 5, "strategy": "fedavg", "dp-noise-multiplier": 1.0,
                             "dp-target-epsilon": (one + two) / 2})
    run_dir, rows, _ = _run(tiny_config, num_nodes=2)
    assert [r["round"] for r in rows] == [1] and rows[0]["epsilon-every-round"] == pytest.approx(one, rel=1e-6)
    assert "would be exceeded by round 2" in caplog.text


def test_under_central_dp_a_rejected_reply_does_not_show_in_which_blocks_move(tiny_config):
    """With privacy-min-holders = 2, a co-holder's rejected reply must not leave its blocks exactly as they
    were: which parameters the release moves is a fact of the dealing, whatever the replies were."""
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "local-steps": 2, "privacy-min-holders": 2,
                                      "dp": "central", "weighting": "uniform", "dp-noise-multiplier": 1.0})
    run_dir, rows, _ = _run(tiny_config, num_nodes=3, client=_RejectedNode())
    assert rows[0]["replies-rejected"] == 1 and rows[0]["withheld-blocks"] == 0
    assert _unmoved_blocks(run_dir) == []


def test_a_round_not_sent_under_privacy_strict_is_not_charged(tiny_config):
    _central(tiny_config, **{"num-server-rounds": 1, "privacy-min-holders": 3, "capacity-profile": "0.5,0.5",
                             "privacy-strict": True})
    _, rows, nodes = _run(tiny_config, num_nodes=2)
    assert rows[0]["privacy-unmet"] == 1 and nodes == []
    assert rows[0]["epsilon"] == 0.0 and rows[0]["dp-state"]["releases"] == 0  # the standing figures, uncharged


def test_a_run_resumed_after_a_round_sent_to_nobody_continues_its_epsilon():
    """The accountant's state is in every row, a round sent to nobody's too, so a resume from it does not restart
    epsilon at zero."""
    from resist_fl.flower.central_dp import CentralDP

    dp = CentralDP(dp_clip=1.0, dp_noise_multiplier=1.0)
    dp.release_row(["a", "b"], connected=4)
    dp.release_row(["a", "c"], connected=4)
    unsent = dp.release_row([], connected=4)
    assert unsent["epsilon"] == dp.epsilon() > 0 and unsent["dp-state"]["releases"] == 2
    resumed = CentralDP(dp_clip=1.0, dp_noise_multiplier=1.0)
    resumed.restore(unsent["dp-state"])
    assert resumed.epsilon() == dp.epsilon() and resumed.every_round_epsilon() == dp.every_round_epsilon()


# --------------------------------------------------------------------------- nothing around the mechanism

class _Recording:
    """The project's ClientApp, keeping every training reply's metric keys."""

    def __init__(self):
        self.keys: list[set[str]] = []

    def __call__(self, message, context):
        reply = client_app(message=message, context=context)
        if message.metadata.message_type == "train":
            self.keys.append(set(next(iter(reply.content.metric_records.values())).keys()))
        return reply


@pytest.mark.parametrize("mode", ["central", "local"])
def test_under_dp_no_unnoised_figure_leaves_a_node_or_the_server(tiny_config, mode):
    changes = {"num-server-rounds": 2, "local-steps": 2, "dp": mode, "weighting": "uniform", "norm": "groupnorm"}
    tiny_config.update(SIX_BLOCKS, **changes)
    client = _Recording()
    run_dir, rows, nodes = _run(tiny_config, num_nodes=2, client=client)
    allowed = {"blocks", *(["dp-epsilon"] if mode == "local" else [])}  # fixed clipping: no below-clip bit either
    assert client.keys and all(keys <= allowed for keys in client.keys), client.keys  # no loss, times, memory, size
    for row in rows + nodes:
        assert not set(PRIVATE_DROPPED) & set(row), set(PRIVATE_DROPPED) & set(row)
    assert all(r["accuracy"] is not None for r in rows)  # the released model is still evaluated centrally


def test_under_adaptive_clipping_a_node_sends_its_below_clip_bit(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "local-steps": 1, "dp": "central", "weighting": "uniform",
                                      "dp-clip-quantile": 0.5})
    client = _Recording()
    _run(tiny_config, num_nodes=2, client=client)
    assert client.keys == [{"blocks", "dp-below-clip"}] * 2


@pytest.mark.parametrize("mode", ["central", "local"])
def test_under_dp_a_node_whose_training_diverges_is_not_told_apart(tiny_config, mode, monkeypatch):
    """Node 0's training ends with a NaN weight: under DP it replies with the arrays it received (a zero update),
    so no count, status or byte figure shows whose training diverged."""
    import client_app.app as node_app

    training, read_partition = {}, node_app._partition  # the in-process grid runs one node at a time

    def partition(*args, **kwargs):  # (dataset, data path, partitioner, alpha, seed, partition id, ...)
        training["partition"] = int(args[5])
        return read_partition(*args, **kwargs)

    def diverging(trainer):
        def run(model, *args, **kwargs):
            result = trainer(model, *args, **kwargs)
            if training["partition"] == 0:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = math.nan
            return result
        return run

    monkeypatch.setattr(node_app, "_partition", partition)
    monkeypatch.setattr(node_app, "train", diverging(node_app.train))
    monkeypatch.setattr(node_app, "train_private", diverging(node_app.train_private))
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "local-steps": 2, "dp": mode, "weighting": "uniform",
                                      "norm": "groupnorm"})
    run_dir, rows, nodes = _run(tiny_config, num_nodes=2)
    assert (rows[0]["replies-accepted"], rows[0]["replies-rejected"], rows[0]["replies-non-finite"]) == (2, 0, 0)
    assert {n["status"] for n in nodes} == {"accepted"} and not rows[0]["merge-refused"]
    assert rows[0]["accuracy"] is not None


@pytest.mark.parametrize("changes, message", [
    ({"dp": "central", "weighting": "uniform", "strategy": "fedavg", "fraction-evaluate": 0.5},
     "fraction-evaluate = 0.5: federated evaluation releases node data"),
    ({"dp": "local", "norm": "groupnorm", "strategy": "fedavg", "fraction-evaluate": 1.0}, "set fraction-evaluate = 0"),
    ({"dp": "central", "weighting": "uniform", "norm": "batchnorm-running"}, "norm = 'batchnorm-running'"),
    ({"dp-sampling": "secret"}, "dp-sampling = 'secret': read only with dp='central'"),
    ({"dp-clip-quantile": 0.5, "dp": "local", "norm": "groupnorm"},
     "dp-clip-quantile = 0.5: read only with dp='central'"),
    ({"dp": "central", "weighting": "uniform", "dp-sampling": "secret", "capacity-profile": "1.0,0.5"},
     "the sample would not stay secret"),
    ({"dp": "central", "weighting": "uniform", "dp-sampling": "secret", "capacity-profile": "0.5",
      "capacity-mode": "dynamic"}, "capacity-mode = 'dynamic': what a node is sent depends on its capacity"),
])
def test_settings_refuse_what_would_bypass_the_mechanism(tiny_config, changes, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunSettings.from_run_config({**tiny_config, **changes})


def test_the_resist_constructor_refuses_speed_allocation_under_dp():
    layout = BlockLayout.from_spec(ModelSpec(depths=(1, 1, 4, 1), base_width=4))
    with pytest.raises(ValueError, match="allocation = 'speed'"):
        ResIST(layout, weighting="uniform", allocation="speed", dp="central", capacity_measure="blocks")


# --------------------------------------------------------------------------- local-DP ledger

def test_local_dp_epsilon_continues_after_a_stop_and_a_resume(tiny_config, crash_at_round):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 3, "local-steps": 2, "dp": "local", "norm": "groupnorm",
                                      "dp-noise-multiplier": 1.1, "dp-clip": 1.0})
    crash_at_round(tiny_config, 2, 3)
    _, rows, nodes = _run(dict(tiny_config, resume=True), num_nodes=2)
    eps = {(r["round"], r["partition"]): r["dp-epsilon"] for r in nodes}
    assert all(eps[(3, p)] > eps[(2, p)] > eps[(1, p)] > 0 for p in (0, 1))
    # round 3 was trained twice (before the stop and after the resume): both updates left the node
    from opacus.accountants import RDPAccountant
    ledgers = Path(tiny_config["output-dir"]).parent / "node-state" / "resist-fl" / "dp-ledger"
    ledger = json.loads(next(ledgers.glob("*partition-0.json")).read_text())
    assert sum(steps for _, _, steps in ledger["history"]) == 4 * 2
    reference = RDPAccountant()
    reference.history = [tuple(h) for h in ledger["history"]]
    assert eps[(3, 0)] == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)


# --------------------------------------------------------------------------- minimum holders at merge

class _RejectedNode:
    """Node 0's replies carry a non-finite array: the server rejects them."""

    def __call__(self, message, context):
        reply = client_app(message=message, context=context)
        if message.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 0:
            arrays = next(iter(reply.content.array_records.values()))
            key = next(iter(arrays.keys()))
            broken = arrays[key].numpy().copy()
            broken.flat[0] = np.nan
            from flwr.app import Array
            arrays[key] = Array(broken)
        return reply


def test_a_block_whose_co_holder_is_rejected_keeps_its_value(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "local-steps": 2, "privacy-min-holders": 2})
    run_dir, rows, nodes = _run(tiny_config, num_nodes=3, client=_RejectedNode())
    assert rows[0]["replies-rejected"] == 1 and rows[0]["withheld-blocks"] >= 1
    assert rows[0]["min-holders"] >= 2  # the exposure follows what was merged
    assert len(_unmoved_blocks(run_dir)) == rows[0]["withheld-blocks"]


def _unmoved_blocks(run_dir: Path) -> list[int]:
    """The partitionable blocks of a one-round SIX_BLOCKS run whose every parameter is bit-identical to the
    initial model's."""
    spec = ModelSpec(depths=(1, 1, 7, 1), base_width=8, num_classes=10)
    torch.manual_seed(0)
    initial = build_model(spec).state_dict()
    final = torch.load(run_dir / "model.pt", weights_only=False)
    final = final.get("state_dict", final)
    layout = BlockLayout.from_spec(spec)
    return [b for b in layout.partitionable
            if all(torch.equal(final[k], initial[k]) for k in layout.block_keys(b) if "scale" not in k)]


# --------------------------------------------------------------------------- adaptive clipping

@pytest.mark.parametrize("quantile", [0.3, 0.7])
def test_adaptive_clipping_tracks_the_target_quantile(quantile):
    rng = np.random.default_rng(1)
    dp = CentralDP(dp_clip=0.05, dp_noise_multiplier=1.0, dp_clip_quantile=quantile, dp_clip_lr=0.2,
                   dp_clip_count_noise=0.5)
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=100)
        dp.release_row([f"node-{i}" for i in range(100)], 100, [int(n <= dp.clip) for n in norms])
    target = float(np.exp(0.5 * _normal_quantile(quantile)))
    assert dp.clip == pytest.approx(target, rel=0.15)
    # its cost is accounted: the count's noise composes with the update's
    assert dp.accounted_multiplier() == pytest.approx((1.0 ** -2 + 0.5 ** -2) ** -0.5)


def _normal_quantile(q: float) -> float:
    from statistics import NormalDist
    return NormalDist().inv_cdf(q)
