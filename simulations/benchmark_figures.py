"""The performance page's summary table, written from the figures the benchmarks wrote as JSON.

Each row reads the JSON a script in ``benchmarks/`` wrote with ``--json`` (see
``benchmarks/figures_json.py``), committed beside what it printed (``docs/performance/<script>.json``
or, for the bytes benchmark, ``docs/results/transport/bytes_benchmark.json``; the JSON of the runs
committed before ``--json`` existed was converted once from the printed output of the same run),
recomputes the ratio it quotes from the raw figures beside it, and refuses a file whose ratio
disagrees with them (so a hand edit of one number is caught). The setting column is the
benchmark's ``"setting"``, its own first printed line. :mod:`simulations.figures` places the table
in ``docs/performance.md``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.markdown import table

ROOT = Path(__file__).resolve().parents[1]
PERFORMANCE = ROOT / "docs" / "performance"
BYTES_OUTPUT = ROOT / "docs" / "results" / "transport" / "bytes_benchmark.json"


def _figures(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no committed benchmark figures (run the command in its row with "
                                f"`--json {path.name}` and commit what it writes there)")
    return json.loads(path.read_text(encoding="utf-8"))


def _agree(quoted: float, computed: float, tolerance: float, what: str) -> float:
    if abs(quoted - computed) > tolerance:
        raise ValueError(f"{what}: the quoted figure {quoted} disagrees with {computed:.4f} computed from the raw "
                         "figures beside it")
    return computed


def _link(path: Path) -> str:
    return f"[output]({path.relative_to(ROOT / 'docs').as_posix()})"


def bytes_row(path: Path) -> str:
    rows = _figures(path)["rows"]
    plain = [r for r in rows if r["transport"] == "float32"]
    sites = sorted({int(r["S"]) for r in plain})
    depth0 = {int(r["S"]): r for r in plain if r["min depth"] == "0"}
    deepest = max(plain, key=lambda r: (int(r["S"]), int(r["min depth"])))
    for r in rows:
        _agree(float(r["ResIST / FedAvg"]), float(r["ResIST MB"]) / float(r["FedAvg MB"]), 0.002,
               f"bytes_benchmark S={r['S']} {r['transport']}")
    deviation = max(abs(float(r["deviation"].rstrip(" %"))) for r in rows)
    compressed = {t: sorted({r["ResIST bytes / float32's"] for r in rows if r["transport"] == t})
                  for t in ("float16", "uint8")}
    return (f"S = {' / '.join(map(str, sites))}: {' / '.join(depth0[s]['ResIST / FedAvg'] for s in sites)}"
            f" (min depth {deepest['min depth']} at S = {deepest['S']}: {deepest['ResIST / FedAvg']}); largest "
            f"deviation from the analytic sub-network fraction {deviation:.2f} %; `float16` "
            f"{' - '.join(compressed['float16'])}x and `uint8` {' - '.join(compressed['uint8'])}x the float32 bytes")


def step_row(path: Path) -> str:
    rows = _figures(path)["rows"]
    full = float(rows[0]["step ms"])
    subs = rows[1:]
    ratios = [_agree(float(r["step time / full"]), float(r["step ms"]) / full, 0.002, f"step_benchmark {r['model']}")
              for r in subs]
    return (f"{' / '.join(r['model'] for r in subs)} ({' / '.join(r['partitioned blocks kept'] for r in subs)} "
            f"blocks): **{' / '.join(f'{v:.3f}' for v in ratios)}** of the full model's {full:.1f} ms; "
            f"FLOP share {' / '.join(r['FLOP share'] for r in subs)}")


def precision_row(path: Path) -> str:
    figures = _figures(path)
    parts = []
    for row, raw in zip(figures["rows"], figures["raw"]):
        fp32, bf16 = statistics.median(raw["fp32-seconds"]), statistics.median(raw["bf16-seconds"])
        ratio = _agree(float(row["bf16 / fp32 time"]), bf16 / fp32, 0.002, f"precision_benchmark width {raw['width']}")
        parts.append(f"width {raw['width']}: **{ratio:.3f}** ({1e3 * bf16:.1f} vs {1e3 * fp32:.1f} ms)")
    return "bf16 autocast step time / fp32's: " + "; ".join(parts)


def loader_row(path: Path) -> str:
    figures = _figures(path)
    old, new = figures["rates"]["per-sample (old)"], figures["rates"]["batched (new)"]
    ratio = _agree(figures["ratio"], new[0] / old[0], 0.06, "loader_benchmark")
    return (f"per-sample torchvision `DataLoader` {old[0]:,.0f} vs device-resident batched path {new[0]:,.0f} "
            f"images/s: **{ratio:.1f}x** ({new[1]:.2f} vs {old[1]:.2f} ms per batch)")


def server_row(path: Path) -> str:
    rows = _figures(path)["rows"]
    parts = []
    for r in rows:
        configure, aggregate, total = float(r["configure s"]), float(r["aggregate s"]), float(r["round s"])
        share = _agree(float(r["server share"].rstrip(" %")), 100 * (configure + aggregate) / total, 0.05,
                       f"server_benchmark {r['strategy']}")
        parts.append(f"{r['strategy']} **{share:.2f} %** ({configure:g} + {aggregate:g} s of {total:g} s)")
    return "; ".join(parts) + " of a round"


def round_time_row(path: Path) -> str:
    figures = _figures(path)
    median = {s: statistics.median(v[1:]) for s, v in figures["seconds"].items()}
    for strategy, value in median.items():
        _agree(figures["median"][strategy], value, 0.005, f"round_time_benchmark {strategy} median")
    ratio = _agree(figures["ratio"], median["resist"] / median["fedavg"], 0.002, "round_time_benchmark")
    return (f"median of rounds 2-{len(figures['seconds']['resist'])}: ResIST {median['resist']:.2f} s, FedAvg "
            f"{median['fedavg']:.2f} s: **{ratio:.3f}**")


def deploy_row(path: Path) -> str:
    figures = _figures(path)
    before, after = figures["before"], figures["after"]
    ratio = _agree(figures["ratio"], after["median"] / before["median"], 0.002, "deploy_overhead_benchmark")
    saved = _agree(figures["saved"], before["median"] - after["median"], 0.01, "deploy_overhead_benchmark saving")
    return (f"seconds per round outside training, before / after (median of rounds 2-{len(after['later']) + 1}): "
            f"{before['median']:.2f} / {after['median']:.2f}: **{ratio:.3f}** ({saved:.2f} s per round saved); "
            f"round 1: {before['round1']:.2f} / {after['round1']:.2f} s")


def merge_row(path: Path) -> str:
    figures = _figures(path)
    ratio = _agree(figures["ratio"], figures["merge_ms"] / figures["copy_ms"], 0.002, "merge_benchmark")
    return (f"merging {figures['mib']:.1f} MiB of updates: {figures['merge_ms']:.1f} ms against "
            f"{figures['copy_ms']:.1f} ms for a NumPy copy of the same bytes: **{ratio:.2f}x**")


def load_row(path: Path) -> str:
    parts = []
    for each in (path, path.with_name(f"{path.stem}_fedavg{path.suffix}")):  # ResIST's run, then FedAvg's
        figures = _figures(each)
        ratio = _agree(figures["ratio"], figures["rss_late"] / figures["rss_early"], 0.001,
                       f"load_benchmark ({each.name})")
        parts.append(f"{figures['strategy']}: {figures['rss_early']:.1f} → {figures['rss_late']:.1f} MiB, "
                     f"**{ratio:.3f}** ({figures['wall']:.0f} s)")
    return "ServerApp RSS after round 5 → after the last round: " + "; ".join(parts)


def startup_row(path: Path) -> str:
    return "; ".join(f"{name}: {w['round1']:.1f} s to round 1, {w['whole']:.1f} s in all ({w['status']})"
                     for name, w in _figures(path).items() if name != "setting")


ROWS: dict[str, tuple[str, Callable[[Path], str], Path, str, str]] = {
    "bytes": ("bytes of one round's training messages, ResIST / FedAvg", bytes_row, BYTES_OUTPUT,
              "0.529 at S = 4, within 0.5 %", "python benchmarks/bytes_benchmark.py"),
    "step": ("local step time, largest sub-network / full model", step_row, PERFORMANCE / "step_benchmark.json",
             "keep 0.66 / 0.53 / 0.45", "python benchmarks/step_benchmark.py"),
    "precision": ("local step time on this CPU, bf16 autocast / fp32", precision_row,
                  PERFORMANCE / "precision_benchmark.json", "below 1 where bf16 pays (issue 33)",
                  "python benchmarks/precision_benchmark.py"),
    "loader": ("training images per second, new / old loader", loader_row, PERFORMANCE / "loader_benchmark.json",
               "not slower on CPU", "python benchmarks/loader_benchmark.py"),
    "server": ("server time (`configure_train` + `aggregate_train`) as a share of a round", server_row,
               PERFORMANCE / "server_benchmark.json", "≤ 5 %", "python benchmarks/server_benchmark.py"),
    "round-time": ("simulated round time through `flwr run`, ResIST / FedAvg", round_time_row,
                   PERFORMANCE / "round_time_benchmark.json", "≤ 0.6", "python benchmarks/round_time_benchmark.py"),
    "deploy": ("deployed round overhead, after / before the lazy imports and the partition cache", deploy_row,
               PERFORMANCE / "deploy_overhead_benchmark.json", "cut what the project controls",
               "python benchmarks/deploy_overhead_benchmark.py"),
    "merge": ("merge of the round's sub-network updates / a copy of their bytes", merge_row,
              PERFORMANCE / "merge_benchmark.json", "≤ 2.0", "python benchmarks/merge_benchmark.py"),
    "load": ("100 SuperNodes, 10 sampled per round: server memory growth", load_row,
             PERFORMANCE / "load_benchmark.json", "within 10 %",
             "python benchmarks/load_benchmark.py [--strategy fedavg]"),
    "startup": ("`flwr run` to the end of round 1", startup_row, PERFORMANCE / "startup_benchmark.json",
                "context", "python benchmarks/startup_benchmark.py --no-install-only"),
}
"""Per row: what it measures, the row's reader, the committed JSON it reads (what the command wrote with
``--json``), the target, the command."""


FEDERATION_SPEED = PERFORMANCE / "federation_speed_benchmark.json"
"""What ``benchmarks/federation_speed_benchmark.py --json`` wrote (read as JSON, not parsed from print)."""


def federation_speed_block(path: Path = FEDERATION_SPEED) -> list[str]:
    """The 100-node Fashion-MNIST run's figures: start-up, round / training / evaluation seconds, and a
    node's step inside the simulation against the same steps outside Flower, with the ratios computed here."""
    figures = _figures(path)
    args, inside = figures["args"], figures["inside"]
    later = slice(1, None)  # round 1 carries the actors' start-up

    def median(values: list) -> float:
        return statistics.median(v for v in values[later] if v is not None)

    rows = [["start-up (launch to round 1's row)", f"{inside['startup-seconds']:.1f} s"],
            ["round (messages out to merged model), median of rounds 2..", f"{median(inside['round-seconds']):.2f} s"],
            ["sampled nodes' training seconds (sum), median", f"{median(inside['node-train-seconds']):.2f} s"],
            ["server evaluation of the global model, median", f"{median(inside['eval-seconds']):.2f} s"],
            ["a node's step inside the simulation", f"{inside['step-ms']:.1f} ms"],
            ["the same steps outside Flower, train(), 1 thread", f"{figures['outside-1-thread-ms']:.1f} ms"],
            [f"the same steps outside Flower, train(), {figures['threads']} threads",
             f"{figures['outside-all-threads-ms']:.1f} ms"],
            ["a bare PyTorch step, 1 thread", f"{figures['bare-ms']:.1f} ms"],
            ["inside / outside, 1 thread", f"**{inside['step-ms'] / figures['outside-1-thread-ms']:.3f}**"],
            [f"inside / outside, {figures['threads']} threads",
             f"**{inside['step-ms'] / figures['outside-all-threads-ms']:.3f}**"]]
    setting = (f"`flwr run`, {args['model']} width {args['width']}, {args['dataset']}, {args['supernodes']} "
               f"SuperNodes, {args['fraction']:g} of them per round, {args['local_steps']} local steps of "
               f"{args['batch_size']}, {args['rounds']} rounds; {_link(path)}")
    return [setting, "", *table(["figure", "value"], rows)]


def summary_block() -> list[str]:
    """The summary table: what, the benchmark's setting line, the figure, the target, command and output."""
    return table(["what", "setting (the benchmark's first line)", "figure", "target", "command"],
                 [[what, _figures(path)["setting"].replace("|", "/"), row(path), target, f"`{command}` ({_link(path)})"]
                  for what, row, path, target, command in ROWS.values()])
