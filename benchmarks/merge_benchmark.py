"""Merge 8 ResNet-101 sub-network updates into the global state, on CPU.

Prints the merge time as a ratio to a plain NumPy copy of the same bytes (the
updates' arrays), both measured in this run (best of several alternating repeats).

    python benchmarks/merge_benchmark.py [--subnetworks 8] [--repeats 7] [--model preact_resnet101] [--width 64]
                                         [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds `benchmarks`
from resist_fl.core.aggregation import merge_partial
from resist_fl.core.decomposition import BlockLayout, round_rng, sample_subnetworks
from resist_fl.core.model import PRESET_DEPTHS, ModelSpec, build_model
from benchmarks.figures_json import write_figures


def best_interleaved(repeats: int, *fns) -> list[float]:
    """Best time of each function, measured alternately so that load spikes hit both."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subnetworks", type=int, default=8)
    parser.add_argument("--min-blocks", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default="preact_resnet101", choices=sorted(PRESET_DEPTHS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)

    spec = ModelSpec(depths=PRESET_DEPTHS[args.model], base_width=args.width, num_classes=10)
    layout = BlockLayout.from_spec(spec)
    global_state = {k: v.numpy() for k, v in build_model(spec).state_dict().items()
                    if k in set(layout.payload_keys())}
    groups = sample_subnetworks(layout.partitionable, args.subnetworks, args.min_blocks, round_rng(0, 1))
    rng = np.random.default_rng(0)
    updates = [{k: (global_state[k] + rng.standard_normal(global_state[k].shape).astype(np.float32))
                for k in layout.payload_keys(g)} for g in groups]
    weights = [float(n) for n in rng.integers(100, 1000, size=len(updates))]
    flat = [a for u in updates for a in u.values()]
    nbytes = sum(a.nbytes for a in flat)

    t_copy, t_merge = best_interleaved(args.repeats, lambda: [np.copy(a) for a in flat],
                                       lambda: merge_partial(global_state, updates, weights))
    setting = (f"model: {args.model} width {args.width}, {len(layout.partitionable)} partitionable blocks, "
               f"{args.subnetworks} sub-networks (blocks each: {[len(g) for g in groups]})")
    print(setting)
    print(f"update bytes: {nbytes / 2**20:.1f} MiB; torch threads: {torch.get_num_threads()}")
    print(f"numpy copy of the same bytes: {t_copy * 1e3:.4f} ms")
    print(f"merge_partial:                {t_merge * 1e3:.4f} ms")
    print(f"ratio merge / copy: {t_merge / t_copy:.3f} (target <= 2.0)")
    write_figures(args.json, setting, mib=nbytes / 2**20, copy_ms=t_copy * 1e3, merge_ms=t_merge * 1e3,
                  ratio=t_merge / t_copy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
