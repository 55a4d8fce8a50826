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
DP_COUNT_BELOW = "dp-count-below"
"""Central DP with adaptive clipping: the node says whether its update's norm was within ``dp-clip``
(``dp-below-clip``), a bit only the noised count reads; absent, the node sends no such bit."""
WIDTH_RATE = "width-rate"
"""The width rate of the sub-model the message carries (width-sliced methods, fedavg-small)."""
WIDTH_SCALER = "width-scaler"
"""Whether the node divides its convolutions' outputs by the rate while training (HeteroFL)."""
FJORD_RATES = "fjord-rates"
"""FjORD: the widths a node samples from for each local batch (those at or below its own)."""
LABEL_SPLIT = "label-split"
"""HeteroFL / FedRolex: mask the logits of labels the node lacks and report the labels it holds."""
FJORD_DISTILL = "fjord-distill"
"""FjORD with self-distillation: each batch also trains the node's largest width, whose output teaches
the sampled width."""
DEPTH_EXITS = "depth-exits"
"""DepthFL: how many stages (each with its exit) the message's model holds."""
DISTILL_WEIGHT = "distill-weight"
"""DepthFL: the weight of mutual self-distillation between the exits this round (0: none)."""
FEDDYN_ALPHA = "feddyn-alpha"
"""DepthFL with FedDyn: the dynamic regulariser's coefficient (absent or 0: plain local training)."""
