"""Loader: training images per second, the per-sample torchvision DataLoader (the old path)
vs the device-resident batched path, side by side in one run, same images, same augmentation.

CIFAR-shaped uint8 images (3x32x32, random pixels: the cost does not depend on the content),
``crop-flip`` augmentation, batch 128, one thread unless ``--threads``. On a CUDA device the
batched path keeps the images on the GPU; the per-sample path then also copies each batch there.

    python benchmarks/loader_benchmark.py [--images 10000] [--batch-size 128] [--batches 200]
                                          [--device cpu|cuda] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
from resist_fl.data import ImageArrays, Normalization
from resist_fl.data.batches import TrainBatches
from benchmarks.figures_json import write_figures
from benchmarks.per_sample_loader import make_per_sample_loader

STATS = Normalization((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def images_per_second(loader, batches: int, device: torch.device) -> float:
    """Images per second over ``batches`` batches (cycling the loader), on ``device``."""
    done = images = 0
    start = time.perf_counter()
    while done < batches:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            images += len(y)
            done += 1
            if done == batches:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--augment", default="crop-flip", choices=("none", "crop", "flip", "crop-flip"))
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        rng = np.random.default_rng(0)
        arrays = ImageArrays(rng.integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8),
                             rng.integers(0, 10, args.images))
        old = make_per_sample_loader(arrays, args.batch_size, normalization=STATS, augment=args.augment, seed=0)
        new = TrainBatches(arrays, args.batch_size, normalization=STATS, augment=args.augment, seed=0, device=device)
        images_per_second(new, 5, device)  # warm-up (CUDA context, kernels)
        rates = {"per-sample (old)": images_per_second(old, args.batches, device),
                 "batched (new)": images_per_second(new, args.batches, device)}
        setting = (f"loader, {args.images} images 3x32x32, batch {args.batch_size}, augment={args.augment}, "
                   f"{args.batches} batches, device {device}, {args.threads} thread(s)")
        ratio = rates["batched (new)"] / rates["per-sample (old)"]
        print(setting)
        for name, rate in rates.items():
            print(f"  {name:<18} {rate:12,.0f} images/s  ({1e3 * args.batch_size / rate:7.3f} ms per batch)")
        print(f"  ratio new / old: {ratio:.1f}x")
        write_figures(args.json, setting, rates={name: [rate, 1e3 * args.batch_size / rate]
                                                 for name, rate in rates.items()}, ratio=ratio)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (a test process) is left as it was
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
