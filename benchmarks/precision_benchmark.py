"""Local step time in bf16 autocast over fp32, side by side in one run, on this machine's CPU.

The question (issue 33): this machine's CPU has bf16 instructions (``avx512_bf16`` in
``/proc/cpuinfo``); does ``amp=true`` train a node's step faster here, and by how much, for the
study's model and for wider ones? Each width builds the same pre-activation ResNet (stage depths
``--depths``, ``--in-channels`` x ``--image-size``², HeteroFL's head norm as the study sets it) and
times one SGD step (forward, backward, update; :func:`benchmarks.step_benchmark.step_seconds`, one
warm-up step first) in fp32 and under bf16 autocast, interleaved (fp32, bf16, fp32, ...) for
``--repeats`` repeats of ``--steps`` steps; the medians and their ratio are printed. The accuracy
side of the question is the study's ``amp`` ablation (``python -m simulations.compare fmnist-study
--ablations amp``), not this script.

    python benchmarks/precision_benchmark.py [--widths 8 16 64] [--depths 1,1,17,1] [--batch-size 32]
                                             [--in-channels 1] [--image-size 28] [--steps 5] [--repeats 5]
                                             [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds `benchmarks`
from resist_fl.core.model import ModelSpec, build_model
from benchmarks.figures_json import markdown_row, write_figures  # noqa: E402
from benchmarks.step_benchmark import step_seconds  # noqa: E402


def cpu_flags() -> list[str]:
    """The bf16-related flags of this CPU (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return []
    words = set(text.split())
    return sorted(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in words)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--depths", default="1,1,17,1")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    depths = tuple(int(d) for d in args.depths.split(","))
    torch.manual_seed(args.seed)
    images = torch.randn(args.batch_size, args.in_channels, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    flags = cpu_flags()
    setting = (f"preact depths {args.depths}, batch {args.batch_size}, {args.in_channels}x{args.image_size}x"
               f"{args.image_size}, cpu ({', '.join(flags) or 'no bf16 flags'}), {torch.get_num_threads()} "
               f"thread(s); median of {args.repeats} x {args.steps} steps")
    columns = ["base width", "fp32 step ms", "bf16 autocast step ms", "bf16 / fp32 time", "speed-up"]
    print(setting)
    print(markdown_row(columns))
    print("|---:|---:|---:|---:|---:|")
    rows, raw = [], []
    for width in args.widths:
        spec = ModelSpec(depths=depths, base_width=width, in_channels=args.in_channels, head_norm=True)
        model = build_model(spec).train()
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for amp in (False, True):
                times[amp].append(step_seconds(model, images, labels, args.steps, amp))
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        cells = [str(width), f"{1e3 * fp32:.2f}", f"{1e3 * bf16:.2f}", f"{bf16 / fp32:.3f}", f"{fp32 / bf16:.2f}x"]
        print(markdown_row(cells))
        rows.append(dict(zip(columns, cells)))
        raw.append({"width": width, "fp32-seconds": times[False], "bf16-seconds": times[True]})
    write_figures(args.json, setting, rows=rows, raw=raw, cpu_flags=flags)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
