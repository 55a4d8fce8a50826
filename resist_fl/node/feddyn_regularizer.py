"""FedDyn's node side (Acar et al., ICLR 2021), as DepthFL's authors run it.

The authors' code (Flower's ``baselines/depthfl/depthfl/models.py``, adap/flower at fdef7af): every
local step adds, for each trainable parameter ``w`` of the node's model with ``w0`` its value as
received and ``h`` the node's own state,

    - <w, h> + alpha / 2 * ||w - w0||^2                       (lines 165-178)

to the loss, and after the round's training the node updates ``h <- h - alpha (w - w0)`` (lines
94-101). ``h`` starts at zero (their ``strategy.py`` lines 40-43) and is kept by the node across
rounds: theirs in a file per client, here in the node's memory (the ClientApp keeps it in Flower's
``context.state`` under :data:`STATE_KEY`), one array per parameter name (a node whose sub-model
changes keeps the state of the parameters it no longer holds). That state lives in the SuperNode's
memory: a restarted SuperNode starts again from zero, which is why a FedDyn run cannot be resumed
(its settings refuse it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from resist_fl.node.training import Loss

STATE_KEY = "feddyn-h"
"""The name of a node's FedDyn state in its memory."""



class FedDynRegularizer:
    """The dynamic regulariser of one round's training of ``model`` (loaded with what the node received)."""

    def __init__(self, model: torch.nn.Module, alpha: float, stored: Mapping[str, np.ndarray]) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha = {alpha!r}: expected a number > 0")
        self.alpha, self.stored = float(alpha), dict(stored)
        self.params = dict(model.named_parameters())
        self.received = {k: p.detach().clone().float() for k, p in self.params.items()}
        self.h = {k: (torch.as_tensor(np.asarray(stored[k], dtype=np.float32), device=p.device) if k in stored
                      else torch.zeros_like(self.received[k])) for k, p in self.params.items()}
        for key, p in self.params.items():
            if self.h[key].shape != p.shape:
                raise ValueError(f"{STATE_KEY}[{key!r}] has shape {tuple(self.h[key].shape)}; the parameter has "
                                 f"{tuple(p.shape)}")

    def _beside(self, key: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` and ``w0`` of ``key`` on ``w``'s device: the regulariser is built before training moves the
        model to its device (a GPU), so they follow the parameter there once (the authors move theirs too,
        ``models.py`` lines 72-73)."""
        if self.h[key].device != w.device:
            self.h[key], self.received[key] = self.h[key].to(w.device), self.received[key].to(w.device)
        return self.h[key], self.received[key]

    def penalty(self) -> torch.Tensor:
        """``sum over parameters of -<w, h> + alpha / 2 ||w - w0||^2`` (in fp32)."""
        total = torch.zeros((), device=next(iter(self.params.values())).device)
        for key, w in self.params.items():
            h, received = self._beside(key, w)
            w = w.float()
            total = total - (w * h).sum() + self.alpha / 2 * (w - received).square().sum()
        return total

    def loss(self, inner: Loss) -> Loss:
        """``inner``'s step loss plus :meth:`penalty`."""
        def loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return inner(model, images, labels) + self.penalty()

        return loss

    def updated_state(self) -> dict[str, np.ndarray]:
        """After training: the state to keep, ``h <- h - alpha (w - w0)`` for every parameter of this
        round's model, and the stored entries of the parameters it did not hold unchanged."""
        kept = dict(self.stored)
        with torch.no_grad():
            for key, w in self.params.items():
                h, received = self._beside(key, w)
                kept[key] = (h - self.alpha * (w.detach().float() - received)).cpu().numpy()
        return kept
