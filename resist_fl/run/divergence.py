"""Is a run diverging? A round's mean training loss against the rounds before it.

Pure Python: the ServerApp asks after every round and, when the answer is yes,
logs a WARNING and flags the round (``diverging`` in ``metrics.jsonl``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

DIVERGENCE_FACTOR = 5.0
"""A round's mean train loss this many times the best earlier round's counts as a divergence."""

DIVERGENCE_MARGIN = 0.5
"""... and at least this much above it (in nats): late in a run the best loss is near 0, and a
move from 0.004 to 0.02 is noise, not a divergence (seen as false alarms in 50-step runs)."""

DIVERGENCE_HINT = (
    "Likely causes: one node's local training blew up (many local steps at a high learning rate, "
    "often under label skew with BatchNorm) and the merge spread it through the shared layers, or "
    "a learning rate too high for the data. Try clip-grad-norm > 0 (default 1.0), a lower lr, fewer "
    "local-steps, or norm='groupnorm'."
)


def divergence_reason(earlier: Iterable[float | None], loss: float | None, non_finite_replies: int = 0,
                      factor: float = DIVERGENCE_FACTOR, margin: float = DIVERGENCE_MARGIN) -> str | None:
    """Why the round with mean train loss ``loss`` looks diverging, or None if it does not.

    ``earlier`` holds the mean train losses of the rounds before (None for a round
    without accepted replies). A round diverges when any node's reply held NaN or
    Inf (``non_finite_replies``: such replies are rejected, so their loss is not in
    ``loss``), when ``loss`` is non-finite, or when it is above ``factor`` times the
    best earlier loss and more than ``margin`` above it. A round without a loss (None) otherwise says nothing.
    """
    if non_finite_replies:
        return f"{non_finite_replies} node(s) sent a non-finite training loss or parameters"
    if loss is None:
        return None
    if not math.isfinite(loss):
        return f"the mean train loss is {loss}"
    best = min((x for x in earlier if x is not None and math.isfinite(x)), default=None)
    if best is not None and best > 0 and loss > factor * best and loss > best + margin:
        return f"the mean train loss {loss:.4g} is {loss / best:.1f}x the best earlier round's ({best:.4g})"
    return None
