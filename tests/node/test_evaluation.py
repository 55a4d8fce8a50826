"""One evaluation pass scores several named outputs exactly as separate passes would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resist_fl.node.training import evaluate_by_class, evaluate_outputs

CPU = torch.device("cpu")


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)) for n in (5, 7)]


def test_named_outputs_of_one_pass_equal_separate_evaluations():
    torch.manual_seed(0)
    trunk, head = nn.Linear(6, 3), nn.Linear(3, 3)
    model = nn.Sequential(trunk, head)
    loader = batches()
    together = evaluate_outputs(model, loader, CPU, outputs=lambda x: {"": model(x), "trunk": trunk(x)})
    assert list(together) == ["", "trunk"]
    for name, alone in (("", model), ("trunk", trunk)):
        expected = evaluate_by_class(alone, loader, CPU)
        assert together[name].loss == pytest.approx(expected.loss, rel=1e-12)
        assert np.array_equal(together[name].correct, expected.correct)
        assert np.array_equal(together[name].count, expected.count)
    assert together[""].count.sum() == 12 and not model.training  # the model is put in eval mode


def test_an_empty_evaluation_set_is_refused():
    with pytest.raises(ValueError, match="empty"):
        evaluate_outputs(nn.Linear(6, 3), [], CPU)
