"""FjORD's ordered dropout: the widths drawn are nested and never above the node's own; a batch
at width p trains exactly the nested width-p sub-model (BatchNorm); end to end, a node returns its
largest sub-model and the run learns the real digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.width_slicing import key_groups, prefix_indices, slice_state, sliced_spec
from resist_fl.flower.width_sliced import FJORD_RATES, WIDTH_RATE
from resist_fl.node.ordered_dropout import OrderedDropout
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

SPEC = ModelSpec(depths=(1, 2, 1, 1), base_width=8, num_classes=4)
RATES = (1.0, 0.5, 0.25)


def test_widths_drawn_are_within_the_nodes_own_and_cover_the_set():
    model = build_model(sliced_spec(SPEC, 0.5))
    od = OrderedDropout(model, SPEC, 0.5, RATES, seed=3)
    drawn = {od.sample(step) for step in range(200)}
    assert drawn == {0.5, 0.25}
    with pytest.raises(ValueError, match="includes the node's width 0.5"):
        OrderedDropout(model, SPEC, 0.5, (0.25,), seed=0)


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_a_batch_at_width_p_is_the_nested_sub_model(rate):
    """Training mode, BatchNorm with batch statistics: the masked width-1 model computes exactly
    what the width-p sub-model holding the first p x C channels computes."""
    torch.manual_seed(0)
    full = build_model(SPEC).train()
    od = OrderedDropout(full, SPEC, 1.0, RATES, seed=0)
    od.rate = rate
    state = {k: v.numpy() for k, v in full.state_dict().items()}
    nested = build_model(sliced_spec(SPEC, rate)).train()
    nested.load_state_dict({k: torch.from_numpy(v) for k, v in
                            slice_state(state, key_groups(SPEC, list(state)), prefix_indices(SPEC, rate)).items()})
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(full(x), nested(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # six rounds of 20 steps on three nodes
def test_fjord_end_to_end_on_real_digits(tiny_config, digits_npz):
    tiny_config.update({"strategy": "fjord", "capacity-profile": "1.0,0.5,0.25", "min-train-nodes": 3,
                        "width-rates": "1,0.5,0.25,0.125,0.0625",  # HeteroFL's grid: the widths below
                        "min-available-nodes": 3, "dataset": "npz", "data-path": digits_npz, "local-steps": 20,
                        "batch-size": 32, "num-server-rounds": 6, "eval-batch-size": 360})
    grid = run_inprocess(tiny_config, num_nodes=3)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    for message in sent:  # each node gets its largest sub-model and the widths at or below it
        rate = message.content["config"][WIDTH_RATE]
        # width 8: 1/16 rounds to the same 1-channel stem as 1/8, so 0.125 is the smallest real width
        assert list(message.content["config"][FJORD_RATES]) == [r for r in (0.125, 0.25, 0.5, 1.0) if r <= rate]
    rows = read_metrics(Path(tiny_config["output-dir"]) / tiny_config["run-name"])
    print(f"\ndigits fjord: accuracy {[round(r['accuracy'], 3) for r in rows]}, width 50 % "
          f"{rows[-1]['accuracy-width-50']:.3f}, 25 % {rows[-1]['accuracy-width-25']:.3f}")
    assert rows[-1]["accuracy"] >= 0.8 and rows[-1]["accuracy-width-25"] >= 0.5  # nested widths all learn
    assert all(r["strategy"] == "fjord" and r["replies-accepted"] == 3 for r in rows)
    assert np.isfinite([r["train-loss"] for r in rows]).all()
