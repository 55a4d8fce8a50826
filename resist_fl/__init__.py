"""ResIST (layer-wise decomposition of ResNets) as a Flower strategy.

The public names are importable from here (``from resist_fl import ResIST``);
they are loaded on first use, so importing the pure core never imports Flower.

Sub-packages:

- :mod:`resist_fl.core`: model, decomposition, merge and reply checks (no Flower);
- :mod:`resist_fl.flower`: the strategies, node sampling, reply screening, metering;
- :mod:`resist_fl.run`: run settings, checkpoints, outputs;
- :mod:`resist_fl.data`: data sets, partitioning, transforms and loaders;
- :mod:`resist_fl.node.training`: local training and evaluation loops.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "ModelSpec": "resist_fl.core.model",
    "PreActResNet": "resist_fl.core.preact_resnet",
    "build_model": "resist_fl.core.model",
    "BlockLayout": "resist_fl.core.decomposition",
    "sample_subnetworks": "resist_fl.core.decomposition",
    "merge_partial": "resist_fl.core.aggregation",
    "ReplyError": "resist_fl.core.validation",
    "ResIST": "resist_fl.flower.resist",
    "ScreenedFedAvg": "resist_fl.flower.fedavg",
    "MeteredGrid": "resist_fl.flower.metering",
    "RoundRecorder": "resist_fl.flower.round_recorder",
    "screen_replies": "resist_fl.flower.reply_screening",
    "RunSettings": "resist_fl.run.settings",
    "load_model": "resist_fl.run.outputs",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resist_fl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
