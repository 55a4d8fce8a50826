"""The ConfigRecord keys a strategy stamps into every training message it sends: what a ClientApp
needs to answer that message, set by the strategy that knows it (one owner, one path).

A ServerApp's own ``train_config`` carries only its app's hyper-parameters; these keys are
written over it by :class:`~resist_fl.flower.resist.ResIST` and
:class:`~resist_fl.flower.fedavg.ScreenedFedAvg` and read by
:mod:`resist_fl.flower.client_side`.
"""

from __future__ import annotations

BLOCKS = "blocks"
"""The partitionable blocks the message's sub-network holds (absent: the full model)."""
TRANSPORT = "transport-dtype"
"""How the message's float arrays travel, and how the reply's must (the strategy's ``transport``)."""
RUN_ROUND = "run-round"
"""The round of the run (a resumed run's rounds continue from its checkpoint)."""
SERVER_ROUND = "server-round"
"""The round of this ``Strategy.start`` (Flower's own key)."""
DP_CLIP = "dp-clip"
"""Central DP: the L2 norm the node clips its update (trained minus received arrays) to."""
