"""Issue 33 item 3: every width method at its full budget (the largest channel count that fits), the
budget each node used in nodes.jsonl, and dynamic capacities (HeteroFL's / FedRolex's setting)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.core.model_cost import CostModel
from resist_fl.run.outputs import read_metrics
from resist_fl.run.settings import RunSettings, SettingsError
from simulations.inprocess import run_inprocess

SPEC = ModelSpec(depths=(1, 1, 2, 1), base_width=8, num_classes=10, in_channels=1)
COSTS = CostModel(SPEC, BlockLayout.from_spec(SPEC), 8)
CHANNELS = RunSettings(strategy="heterofl", width_rates="channels", base_width=8).rates()


@settings(max_examples=40, deadline=None)
@given(capacity=st.floats(0.001, 1.0), measure=st.sampled_from(["flops", "params", "blocks"]))
def test_the_width_chosen_for_a_budget_is_the_largest_channel_count_that_fits(capacity, measure):
    """Against a brute-force search over every channel count of the first stage (1 .. 8)."""
    assert CHANNELS == tuple(w / 8 for w in range(8, 0, -1))
    chosen = COSTS.max_rate(capacity, measure, CHANNELS)
    if measure == "blocks":
        fitting = [r for r in CHANNELS if r <= capacity + 1e-9]
    else:
        budget = capacity * COSTS.full.of(measure) * (1 + 1e-9)
        fitting = [r for r in CHANNELS if COSTS.width_cost(r).of(measure) <= budget]
    assert chosen == (max(fitting) if fitting else min(CHANNELS))


def test_width_rates_channels_and_its_errors():
    assert RunSettings(strategy="heterofl", width_rates="1,0.5").rates() == (1.0, 0.5)
    # a listed rate is rounded to whole first-stage channels (base width 8: 0.0625 keeps one, 0.3 two)
    assert RunSettings(strategy="heterofl", width_rates="1,0.3,0.0625", base_width=8).rates() == (1.0, 0.25, 0.125)
    with pytest.raises(SettingsError, match="width-rates = 'all': expected 'channels', 'layers' or numbers"):
        RunSettings.from_run_config({"strategy": "heterofl", "width-rates": "all"})


LAYERS = RunSettings(strategy="heterofl", width_rates="layers", base_width=8).rates()


def test_the_per_layer_rule_keeps_ceil_r_c_of_every_stage_as_heterofls_code_does():
    """HeteroFL's code: every stage keeps int(np.ceil(model_rate * C)) of its C channels."""
    import math

    from resist_fl.core.width_slicing import sliced_spec, widths

    assert LAYERS == tuple(k / 64 for k in range(64, 0, -1))  # the widest stage has 8 x 8 channels
    for rate in (*LAYERS, 0.3, 0.0625):
        small = sliced_spec(SPEC, rate)
        assert widths(small) == tuple(math.ceil(rate * c - 1e-9) for c in widths(SPEC))
        assert ModelSpec.from_dict(small.to_dict()) == small
    assert sliced_spec(SPEC, 31 / 64).stage_widths == (4, 8, 16, 31)
    assert sliced_spec(SPEC, 0.5) == ModelSpec(depths=(1, 1, 2, 1), base_width=4, num_classes=10, in_channels=1)
    assert "stage_widths" not in sliced_spec(SPEC, 0.5).to_dict()  # the form every earlier run recorded
    with pytest.raises(ValueError, match="stage_widths must be"):
        ModelSpec(base_width=4, stage_widths=(5, 8, 16, 32))


@settings(max_examples=30, deadline=None)
@given(capacity=st.floats(0.01, 1.0))
def test_per_layer_widths_use_at_least_the_budget_whole_channels_do(capacity):
    """Every width of ``channels`` is one of ``layers``, so the largest that fits is never smaller (where no
    whole-channel width fits, ``channels`` falls back to its smallest, over budget); the one chosen fits
    and the next wider does not."""
    by_layers, by_channels = (COSTS.max_rate(capacity, "flops", rates) for rates in (LAYERS, CHANNELS))
    budget = capacity * COSTS.full.flops * (1 + 1e-9)
    assert set(CHANNELS) <= set(LAYERS)
    assert by_layers >= by_channels or COSTS.width_cost(by_channels).flops > budget
    if by_layers > min(LAYERS):
        assert COSTS.width_cost(by_layers).flops <= budget
    wider = [r for r in LAYERS if r > by_layers]
    if wider:
        assert COSTS.width_cost(min(wider)).flops > budget


def test_at_a_quarter_of_the_flops_per_layer_widths_fill_the_budget_whole_channels_leave_half():
    """The study's case: the half-width model costs a little over 1/4 of the FLOPs (the stem and the
    classifier shrink linearly), so whole first-stage channels drop to 3/8 of the width."""
    by_channels, by_layers = (COSTS.max_rate(0.25, "flops", rates) for rates in (CHANNELS, LAYERS))
    used = {r: COSTS.width_cost(r).flops / (0.25 * COSTS.full.flops) for r in (by_channels, by_layers)}
    assert COSTS.width_cost(0.5).flops > 0.25 * COSTS.full.flops and by_channels == 3 / 8
    assert used[by_layers] > 0.9 > 0.6 > used[by_channels]


def _nodes(config: dict, num_nodes: int) -> list[dict]:
    run_inprocess(config, num_nodes=num_nodes)
    return read_metrics(Path(config["output-dir"]) / config["run-name"], "nodes.jsonl")


def test_budget_used_in_nodes_jsonl_is_the_flops_sent_over_the_nodes_budget(tiny_config):
    tiny_config.update({"strategy": "heterofl", "model": "preact_resnet18", "capacity-profile": "1.0,0.5,0.3",
                        "capacity-measure": "flops", "width-rates": "channels", "num-server-rounds": 1,
                        "local-steps": 1})
    rows = _nodes(tiny_config, 3)
    run_dir = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    recorded = json.loads((run_dir / "run_config.json").read_text())
    spec = ModelSpec.from_dict(recorded["model_spec"])
    costs = CostModel(spec, BlockLayout.from_spec(spec, (3,)), tuple(recorded["data"]["image-shape"][1:]))
    assert len(rows) == 3
    for row in rows:
        assert row["budget-used"] == pytest.approx(row["flops-per-sample"] / (row["capacity"] * costs.full.flops))
        assert row["budget-used"] <= 1 + 1e-9 and row["over-capacity"] == 0
        wider = round(row["width-rate"] * spec.base_width) + 1  # one more channel would not fit
        if wider <= spec.base_width:
            assert costs.width_cost(wider / spec.base_width).flops > row["capacity"] * costs.full.flops


def test_dynamic_capacities_change_per_round_and_follow_the_seed(tiny_config):
    tiny_config.update({"strategy": "resist", "capacity-profile": "1.0,0.5,0.25", "capacity-mode": "dynamic",
                        "capacity-measure": "blocks", "num-server-rounds": 4, "local-steps": 1, "eval-every": 4})
    first = [(r["round"], r["partition"], r["capacity"]) for r in _nodes(tiny_config, 3)]
    again = [(r["round"], r["partition"], r["capacity"]) for r in _nodes({**tiny_config, "run-name": "again"}, 3)]
    other = [(r["round"], r["partition"], r["capacity"]) for r in _nodes({**tiny_config, "run-name": "other",
                                                                          "seed": 5}, 3)]
    assert first == again and first != other
    by_partition = {}
    for _, partition, capacity in first:
        by_partition.setdefault(partition, set()).add(capacity)
    assert any(len(c) > 1 for c in by_partition.values())  # redrawn across rounds
    assert {c for _, _, c in first} <= {1.0, 0.5, 0.25}
    with pytest.raises(SettingsError, match="capacity-mode = 'dynamic'"):
        RunSettings.from_run_config({"capacity-mode": "dynamic"})


def test_the_report_gives_the_budget_used_per_capacity_class_where_runs_recorded_it(tmp_path):
    from simulations.node_costs import node_cost_lines, node_summary

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"round": 1, "capacity": c, "blocks": 4, "bytes-down": 10, "bytes-up": 10, "budget-used": b,
             "over-capacity": int(b > 1)} for c, b in ((1.0, 0.98), (0.25, 0.9), (0.25, 0.7), (0.1, 2.25))]
    (run / "nodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = node_summary([run])
    assert summary["budget-by-capacity"] == pytest.approx({1.0: 0.98, 0.25: 0.8, 0.1: 2.25})
    lines = node_cost_lines({"heterofl": summary})
    assert "mean budget used by capacity" in lines[0] and "1: 0.98, 0.25: 0.80, 0.1: 2.25" in lines[2]
    for row in rows:
        del row["budget-used"]
    (run / "nodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "budget used" not in node_cost_lines({"heterofl": node_summary([run])})[0]  # older runs: as before


def test_eval_subset_evaluates_intermediate_rounds_on_a_fixed_subset_and_the_last_on_all(tiny_config):
    """Issue 33 item 6: per-round evaluation of a large test set costs; intermediate rounds use a fixed
    random subset, the last round the whole test set (each row says how many images)."""
    tiny_config.update({"eval-subset": 100, "num-server-rounds": 3, "local-steps": 1})
    run_inprocess(tiny_config, num_nodes=2)
    run_dir = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    rows = read_metrics(run_dir)
    test_size = json.loads((run_dir / "run_config.json").read_text())["data"]["test-size"]
    assert [r["eval-images"] for r in rows] == [100, 100, test_size] and test_size > 100


@pytest.mark.parametrize("strategy", ["resist", "fedavg"])
def test_over_budget_skip_sends_nothing_to_a_node_below_the_smallest_sub_model(tiny_config, strategy):
    """Under ``over-budget='train'`` the weakest node trains the smallest sub-model over its budget;
    under ``'skip'`` it is sent nothing, the others train within their budgets, and every round says
    how many were skipped."""
    tiny_config.update({"strategy": strategy, "model": "preact_resnet18", "capacity-profile": "1.0,1.0,0.05",
                        "capacity-measure": "flops", "num-server-rounds": 2, "local-steps": 1, "eval-every": 2})
    trained = _nodes(dict(tiny_config), 3)
    assert {(r["capacity"], r["over-capacity"]) for r in trained} == {(1.0, 0), (0.05, 1)}
    skipped = _nodes({**tiny_config, "run-name": "skip", "over-budget": "skip"}, 3)
    assert len(skipped) == 4 and {(r["capacity"], r["over-capacity"]) for r in skipped} == {(1.0, 0)}
    rows = read_metrics(Path(tiny_config["output-dir"]) / "skip")
    assert [r["skipped-over-budget"] for r in rows if "skipped-over-budget" in r] == [1, 1]
    assert all("skipped-over-budget" not in r for r in read_metrics(Path(tiny_config["output-dir"]) /
                                                                    tiny_config["run-name"]))


def test_over_budget_skip_is_decided_by_capacity_before_the_method_plans():
    """A round whose sampled nodes all fall below the floor sends nothing and leaves ResIST's round state
    (inference scale, untrained blocks) as it was; the nodes kept are exactly those whose capacity holds
    the shared layers and the heaviest block; warm-up (the full model) is refused with skip."""
    from flwr.app import ArrayRecord, ConfigRecord

    from client_app.app import app
    from resist_fl.core.model import build_model
    from resist_fl.flower.resist import ResIST
    from simulations.inprocess_grid import InProcessGrid

    layout = BlockLayout.from_spec(SPEC)
    floor = COSTS.floor_fraction()
    state = build_model(SPEC).state_dict()
    record = ArrayRecord({k: state[k] for k in layout.payload_keys()})
    for profile, kept in ((f"{floor / 2},{floor / 3}", 0), (f"1.0,{floor},{floor * 0.999}", 2)):
        nodes = len(profile.split(","))
        strategy = ResIST(layout, RunSettings(over_budget="skip", capacity_measure="flops", capacity_profile=profile,
                                              min_train_nodes=nodes, min_available_nodes=nodes), costs=COSTS)
        before = strategy.inference_scales()
        grid = InProcessGrid(app, num_nodes=nodes, run_config={"capacity-profile": profile})
        messages = list(strategy.configure_train(1, record, ConfigRecord({}), grid))
        assert len(messages) == kept and strategy.last_skipped == nodes - kept
        assert all(strategy.fits_budget(n, p) for n, p in strategy.plans.items())
        if not kept:
            assert strategy.inference_scales() == before and strategy.last_untrained == ()
    with pytest.raises(SettingsError, match="over-budget = 'skip' with warmup-rounds = 2"):
        RunSettings.from_run_config({"over-budget": "skip", "warmup-rounds": 2})


def test_a_node_between_the_cheapest_and_the_heaviest_blocks_floor_is_skipped_every_round():
    """With blocks of unequal cost (ResNet-18, stages 2-4 partitioned) skipping does not depend on the
    block a node would be dealt: its capacity against the heaviest block's floor decides, every round."""
    from flwr.app import ArrayRecord, ConfigRecord

    from client_app.app import app
    from resist_fl.core.model import build_model
    from resist_fl.flower.resist import ResIST
    from simulations.inprocess_grid import InProcessGrid

    spec = ModelSpec(depths=(2, 2, 2, 2), base_width=8, num_classes=10, in_channels=1)
    layout = BlockLayout.from_spec(spec, (2, 3, 4))
    costs = CostModel(spec, layout, 28)
    cheapest = min(costs.block.values(), key=lambda c: c.flops)
    low = (costs.shared.flops + cheapest.flops) / costs.full.flops
    assert low < costs.floor_fraction() - 0.01
    between = (low + costs.floor_fraction()) / 2
    profile = f"1.0,{between}"
    strategy = ResIST(layout, RunSettings(over_budget="skip", capacity_measure="flops", capacity_profile=profile,
                                          min_train_nodes=2, min_available_nodes=2), costs=costs)
    state = build_model(spec).state_dict()
    record = ArrayRecord({k: state[k] for k in layout.payload_keys()})
    grid = InProcessGrid(app, num_nodes=2, run_config={"capacity-profile": profile})
    for server_round in range(1, 7):
        assert len(list(strategy.configure_train(server_round, record, ConfigRecord({}), grid))) == 1
        assert strategy.last_skipped == 1
