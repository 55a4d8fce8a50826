"""FedDyn's server side (Acar et al., ICLR 2021) for sub-models, as DepthFL's authors run it.

The authors' ``aggregate`` (Flower's ``baselines/depthfl/depthfl/strategy.py``, adap/flower at
fdef7af, lines 95-136): for every tensor held by ``c`` of the round's nodes, with ``m`` the mean of
their values, ``x`` the value the round started from, ``N`` the number of clients and ``alpha``
FedDyn's coefficient,

    h <- h - alpha * (c / N) * (m - x)
    new = m - h / alpha          (trainable weights and biases; other tensors: new = m)

A tensor no node held keeps its value and its ``h``. ``h`` starts at zero (``strategy.py`` line 30).
The node side (the dynamic regulariser and each node's own ``h``) is
:mod:`resist_fl.node.feddyn_regularizer`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np


class FedDynServer:
    """The server's FedDyn state ``h`` (one array per trainable tensor) and its correction of a merge.

    Parameters
    ----------
    alpha : float
        FedDyn's coefficient (> 0; the authors' default 0.1, ``conf/config.yaml`` line 27).
    trainable : collection of str
        The keys of the trainable tensors (the model's parameters; the authors' ``is_weight``: keys
        naming a weight or a bias, ``strategy.py`` lines 33-38): only these are corrected.
    """

    def __init__(self, alpha: float, trainable: Collection[str]) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha = {alpha!r}: expected a number > 0")
        self.alpha, self.trainable = float(alpha), frozenset(trainable)
        self.h: dict[str, np.ndarray] = {}

    def correct(self, current: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray],
                holders: Mapping[str, int], num_clients: int) -> dict[str, np.ndarray]:
        """The new values of the keys of ``mean`` (each the mean over its ``holders[key]`` holders of
        this round), updating ``h``; ``current`` holds the values the round started from."""
        if num_clients < 1:
            raise ValueError(f"num_clients = {num_clients}: expected at least 1")
        new = {}
        for key, merged in mean.items():
            if key not in self.trainable:
                new[key] = merged
                continue
            start = np.asarray(current[key], dtype=np.float64)
            h = self.h.get(key, np.zeros(start.shape))
            h = h - self.alpha * holders[key] / num_clients * (np.asarray(merged, dtype=np.float64) - start)
            self.h[key] = h
            new[key] = (merged - h / self.alpha).astype(np.asarray(merged).dtype, copy=False)
        return new
