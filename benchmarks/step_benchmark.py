"""Local step time: a sub-network's SGD step over the full model's, side by side in one run.

PreActResNet-101 (CIFAR-10, width 64: the paper's model), batch 32, on the CPU unless
``--device``. For S = 2, 4, 8 the round's sub-networks are dealt by the strategy's own sampler
(:func:`resist_fl.core.decomposition.sample_subnetworks`, no minimum depth) and the largest is
timed: it sets the round's time. Each model is timed over ``--steps`` steps after one warm-up
step, interleaved (full, S=2, S=4, S=8, full, ...) for ``--repeats`` repeats, and the median is
used, so machine noise hits every model alike. The ratio is printed beside the sub-network's share
of the full model's forward FLOPs (torch's FLOP counter).

    python benchmarks/step_benchmark.py [--model preact_resnet101] [--width 64] [--batch-size 32]
                                        [--sites 2 4 8] [--steps 3] [--repeats 3] [--device cpu] [--amp]
                                        [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds `benchmarks`
from resist_fl.core.decomposition import BlockLayout, round_rng, sample_subnetworks
from resist_fl.core.model import PRESET_DEPTHS, ModelSpec, build_model
from resist_fl.node.training import on_device
from benchmarks.figures_json import markdown_row, write_figures


def step_seconds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, amp: bool) -> float:
    """Mean seconds of one forward + backward + SGD step of ``model`` (after one warm-up step)."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    device = images.device

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def forward_flops(model: nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one forward pass (torch's FLOP counter: convolutions and matrix products)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return counter.get_total_flops()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preact_resnet101", choices=sorted(PRESET_DEPTHS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA or CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    spec = ModelSpec(depths=PRESET_DEPTHS[args.model], base_width=args.width, num_classes=10)
    layout = BlockLayout.from_spec(spec)
    torch.manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)

    models = {"full": (on_device(build_model(spec).train(), device), len(layout.partitionable))}
    for sites in args.sites:
        subnetworks = sample_subnetworks(layout.partitionable, sites, 0, round_rng(args.seed, 1))
        largest = max(subnetworks, key=len)
        models[f"S={sites}"] = (on_device(layout.build_subnetwork(spec, largest).train(), device), len(largest))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, (model, _) in models.items():
            times[name].append(step_seconds(model, images, labels, args.steps, args.amp))
    full = statistics.median(times["full"])
    flops = {name: forward_flops(model, images) for name, (model, _) in models.items()}
    blocks = len(layout.partitionable)
    setting = (f"{args.model} width {args.width}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
               f"device {device}{' bf16' if args.amp else ''}, {torch.get_num_threads()} thread(s); "
               f"median of {args.repeats} x {args.steps} steps")
    columns = ["model", "partitioned blocks kept", "FLOP share", "step ms", "step time / full"]
    print(setting)
    print(markdown_row(columns))
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name, (_, kept) in models.items():
        median = statistics.median(times[name])
        share = flops[name] / flops["full"]
        cells = [name, f"{kept}/{blocks}", f"{share:.3f}", f"{1e3 * median:.3f}", f"{median / full:.3f}"]
        print(markdown_row(cells))
        rows.append(dict(zip(columns, cells)))
    write_figures(args.json, setting, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
