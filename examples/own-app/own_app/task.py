"""The app's own model, data and training: nothing here knows about ResIST.

Replace ``OwnResNet`` with your network (any ResNet whose stages are ``nn.Sequential`` modules of
blocks keeping their input's shape after the first) and ``load_data`` with your data.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from resist_fl.data.synthetic import synthetic_splits

STAGES = ["stage2"]
"""The stages ResIST decomposes (module paths): every block of ``stage2`` after the first."""


class Block(nn.Module):
    """A post-activation residual block: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class OwnResNet(nn.Module):
    """Three stages of :class:`Block`; the middle one is deep (six blocks)."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(Block(width, width))
        self.stage2 = nn.Sequential(Block(width, 2 * width, 2), *[Block(2 * width, 2 * width) for _ in range(5)])
        self.stage3 = nn.Sequential(Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def example_batch() -> torch.Tensor:
    """An input batch of the model's shape (the layout checks the blocks' shapes on it)."""
    return torch.zeros(2, 3, 32, 32)


def _dataset(images, labels) -> TensorDataset:
    return TensorDataset(torch.from_numpy(images).float().div(255.0).sub(0.5).div(0.25), torch.from_numpy(labels))


def load_data(partition_id: int, num_partitions: int) -> TensorDataset:
    """This node's training share. Here: every ``num_partitions``-th image of resist-fl's synthetic
    set (generated in code, no download); use your own files instead."""
    train, _ = synthetic_splits()
    return _dataset(train.images[partition_id::num_partitions], train.labels[partition_id::num_partitions])


def load_test_data() -> TensorDataset:
    """The server's test set."""
    _, test = synthetic_splits()
    return _dataset(test.images, test.labels)


def train(model: nn.Module, data: TensorDataset, *, steps: int, batch_size: int, lr: float,
          seed: int) -> tuple[float, float]:
    """``steps`` SGD steps; returns the mean loss and the seconds taken."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    started, losses, done = time.perf_counter(), [], 0
    while done < steps:
        for images, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            done += 1
            if done == steps:
                break
    return sum(losses) / len(losses), time.perf_counter() - started


@torch.no_grad()
def test(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    """Mean loss and accuracy."""
    model.eval()
    loss, correct = 0.0, 0
    for images, labels in DataLoader(data, batch_size=250):
        logits = model(images)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
    return loss / len(data), correct / len(data)
