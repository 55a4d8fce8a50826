"""GPU: training images/s with fp32 vs bf16 + channels_last, the share of step time spent on data,
and several simulated clients sharing one GPU through ``flwr run``. Side by side in one run.

1. Images/s of the full PreActResNet-101 (width 64, CIFAR-10, batch 128) and of the largest
   sub-network at S = 4, each in true fp32 (IEEE convolutions and matmuls: this torch runs cuDNN
   convolutions in TF32 by default, ``torch.backends.cudnn.conv.fp32_precision == 'tf32'``), in
   TF32 (CUDA only) and in the fast path (bf16 autocast, channels_last), each labelled; the ratios
   to true fp32.
2. Data share: the fast path's step loop fed by the device-resident batches (random crop,
   flip, normalisation on the GPU) vs the same loop on one fixed batch; share = 1 - fixed / fed.
3. With ``--clients 1 2 4 8``: one ``flwr run`` per count k, k SuperNodes with
   ``client-resources-num-gpus = 1/k`` (k clients on the GPU at once), the paper's model, bf16;
   prints the round time and the images/s of all clients together.

Runs on the CPU too (``--device cpu``, for the smoke test; bf16 autocast on CPU then), but the
figures mean something on a GPU only.

    python benchmarks/gpu_benchmark.py [--device cuda] [--batch-size 128] [--steps 20] [--clients 1 2 4 8]
                                       [--json PATH]

``--json PATH`` also writes the raw figures (unrounded images/s per model and precision, the data
share's two rates, the card and torch's version) for :mod:`simulations.benchmark_figures`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds `benchmarks`
from benchmarks.figures_json import write_figures  # noqa: E402
from benchmarks.step_benchmark import step_seconds  # noqa: E402
from resist_fl.core.decomposition import BlockLayout, round_rng, sample_subnetworks
from resist_fl.core.model import PRESET_DEPTHS, ModelSpec, build_model
from resist_fl.data import ImageArrays, Normalization
from resist_fl.data.batches import TrainBatches
from resist_fl.run.outputs import read_metrics
from resist_fl.node.training import on_device, train

ROOT = Path(__file__).resolve().parents[1]
STATS = Normalization((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def images_per_second(model: nn.Module, batches, steps: int, device: torch.device, amp: bool) -> float:
    """Images/s of the training loop (:func:`resist_fl.node.training.train`) over ``batches``."""
    run = lambda n: train(model, batches, steps=n, lr=0.01, momentum=0.9, weight_decay=5e-4,  # noqa: E731
                          device=device, amp=amp)
    run(3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = run(steps).seconds  # train() reads the loss once at the end: the device is done by then
    return steps * batches.batch_size / seconds


class FixedBatch:
    """One batch, yielded forever: a step loop with no data cost."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels, self.batch_size = images, labels, len(labels)

    def __iter__(self):
        while True:
            yield self.images, self.labels


@contextlib.contextmanager
def fp32_precision(mode: str):
    """cuDNN convolutions and CUDA matmuls in ``ieee`` (true fp32) or ``tf32`` inside the block."""
    knobs = [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in knobs if hasattr(obj, name)]
    try:
        for obj, name, _ in saved:
            setattr(obj, name, mode)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def shared_gpu(clients: Sequence[int], args: argparse.Namespace) -> list[dict]:
    """Per client count k: one ``flwr run`` with k clients on the GPU at once (``1 / k`` of it each); its median
    round seconds after round 1 and the images/s of all clients together, or why it failed."""
    from simulations.launcher import run_flwr

    results = []
    work = Path(tempfile.mkdtemp(prefix="resist-gpu-"))
    try:
        for k in clients:
            config = {"dataset": "synthetic", "model": "preact_resnet101", "base-width": 64, "batch-size":
                      args.batch_size, "local-steps": args.steps, "num-server-rounds": 3, "eval-every": 3,
                      "amp": True, "min-available-nodes": k, "min-train-nodes": k, "output-dir": str(work / "runs"),
                      "run-name": f"clients-{k}", "partition-cache": str(work / "cache")}
            result = run_flwr(ROOT, config, num_supernodes=k, num_gpus_per_client=1 / k, timeout_s=1800,
                              workdir=work)
            if not result.success:
                results.append({"clients": k, "failed": f"{result.reason}; log {result.log_path}"})
                continue
            seconds = statistics.median(row["round-seconds"] for row in read_metrics(result.run_dir)[1:])
            results.append({"clients": k, "round-seconds": seconds,
                            "images-per-second": k * args.steps * args.batch_size / seconds})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def shared_line(result: dict) -> str:
    if "failed" in result:
        return f"  {result['clients']} client(s) per GPU: FAILED ({result['failed']})"
    return (f"  {result['clients']} client(s) per GPU: round {result['round-seconds']:.2f} s, "
            f"{result['images-per-second']:,.0f} images/s in all")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="preact_resnet101", choices=sorted(PRESET_DEPTHS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=10_000, help="images in the device-resident partition")
    parser.add_argument("--clients", type=int, nargs="*", default=[], help="clients per GPU to run via flwr run")
    parser.add_argument("--json", type=Path, help="also write the raw figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    spec = ModelSpec(depths=PRESET_DEPTHS[args.model], base_width=args.width, num_classes=10)
    layout = BlockLayout.from_spec(spec)
    largest = max(sample_subnetworks(layout.partitionable, 4, 0, round_rng(0, 1)), key=len)
    rng = np.random.default_rng(0)
    arrays = ImageArrays(rng.integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8),
                         rng.integers(0, 10, args.images))
    batches = TrainBatches(arrays, args.batch_size, normalization=STATS, augment="crop-flip", device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setting = f"{args.model} width {args.width}, batch {args.batch_size}, {args.steps} steps, on {name}"
    print(setting)
    print("| model | fp32 (IEEE) images/s | TF32 images/s | bf16 + channels_last images/s | TF32 / fp32 "
          "| bf16 / fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    images, labels = next(iter(batches))
    models = []
    for label, make in (("full", lambda: build_model(spec)),
                        (f"S=4 sub-network ({len(largest)} blocks)", lambda: layout.build_subnetwork(spec, largest))):
        with fp32_precision("ieee"):  # NCHW, true fp32
            fp32 = args.batch_size / step_seconds(make().to(device).train(), images.contiguous(), labels, args.steps,
                                                  amp=False)
        tf32 = None
        if device.type == "cuda":  # TF32 exists on CUDA only
            with fp32_precision("tf32"):
                tf32 = args.batch_size / step_seconds(make().to(device).train(), images.contiguous(), labels,
                                                      args.steps, amp=False)
        fast_model = on_device(make(), device).train()  # channels_last on CUDA
        fast = args.batch_size / step_seconds(fast_model, images.contiguous(memory_format=torch.channels_last),
                                              labels, args.steps, amp=True)
        tf32_cells = ("n/a (CPU)", "n/a") if tf32 is None else (f"{tf32:,.1f}", f"{tf32 / fp32:.3f}")
        print(f"| {label} | {fp32:,.1f} | {tf32_cells[0]} | {fast:,.1f} | {tf32_cells[1]} | {fast / fp32:.3f} |")
        models.append({"model": label, "fp32-ieee": fp32, "tf32": tf32, "bf16-channels-last": fast})
    model = on_device(build_model(spec), device)
    fixed = images_per_second(model, FixedBatch(images, labels), args.steps, device, amp=True)
    fed = images_per_second(model, batches, args.steps, device, amp=True)
    print(f"data share of the fast path's step time (full model): {max(0.0, 1 - fed / fixed):.1%} "
          f"(fixed batch {fixed:,.0f} images/s, device-resident batches {fed:,.0f} images/s)")
    shared = shared_gpu(args.clients, args) if args.clients else []
    for result in shared:
        print(shared_line(result))
    write_figures(args.json, setting, device=name, torch=torch.__version__, models=models,
                  data_share={"fixed-batch": fixed, "device-resident": fed}, shared_gpu=shared)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
