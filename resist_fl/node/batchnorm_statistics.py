"""Static BatchNorm's test-time statistics, re-estimated on training data (HeteroFL's ``stats`` pass).

HeteroFL trains every BatchNorm on batch statistics and keeps no running buffers
(``track_running_stats=False``, ``src/models/resnet.py`` lines 16-17 and 161 of dem123456789's code at
ea528c3); before every test, it builds the global model with running statistics (``momentum=None``: a
cumulative average), loads the trained weights, and passes the whole training set through it in
training mode without gradients (``src/train_classifier_fed.py`` lines 79 and 129-140).
:func:`with_training_statistics` does the same for any model of the project built with
``norm='batchnorm'``: evaluation then uses those statistics instead of each test batch's own.

Where this differs from HeteroFL's pass: the images are not augmented (HeteroFL's loader applies the
training transform, a crop and flip on CIFAR, none on MNIST), they come in one fixed seeded order in
batches of ``batch-size`` (HeteroFL reshuffles each pass, batches of 10 in its federated settings), and
only the full global model (and DepthFL's exits) get these statistics: the width, depth and client-tier
accuracies keep each batch's own. FedRolex's federated code (AIoT-MLSys-Lab/FedRolex at 8135109) has
no such pass: ``main_resnet.py`` line 154 tests the merged model as it is (built with
``track_running_stats=False``, ``models/resnet.py`` line 164), on each test batch's own statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import nn

from resist_fl.core.model import ModelSpec, build_model


@torch.no_grad()
def with_training_statistics(spec: ModelSpec, state: Mapping[str, torch.Tensor],
                             batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                             device: torch.device) -> nn.Module:
    """The model ``spec`` with the weights of ``state`` and BatchNorm running statistics averaged over
    ``batches`` (``momentum=None``: the average of the batches' statistics, each batch weighing the same),
    in evaluation mode.

    Raises
    ------
    ValueError
        ``spec.norm`` is not ``'batchnorm'`` (batch statistics in training), or ``batches`` is empty.
    """
    if spec.norm != "batchnorm":
        raise ValueError(f"norm = {spec.norm!r}: re-estimating BatchNorm statistics is for norm='batchnorm' "
                         "(batch statistics while training)")
    model = build_model(replace(spec, norm="batchnorm-running"))
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if unexpected or any(not k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing):
        raise ValueError(f"state does not fit the model: unexpected {unexpected[:3]}, missing {missing[:3]}")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over every batch
            module.reset_running_stats()
    model.to(device).train()
    seen = 0
    for images, _ in batches:
        model(images.to(device))
        seen += len(images)
    if not seen:
        raise ValueError("no training images to estimate the BatchNorm statistics on")
    return model.eval()
