"""Figures quoted in the README and docs, written from the committed raw results between markers.

A block in a markdown file::

    <!-- figures: hetero-baselines -->
    ...generated table...
    <!-- end of figures: hetero-baselines -->

is regenerated from ``docs/results/<name>/`` — each run's ``metrics.jsonl`` / ``nodes.jsonl`` and the
comparison's ``compare.json`` (the same reading :mod:`simulations.report` does) — by::

    python -m simulations.figures --write    # README.md and the docs pages that quote results
    python -m simulations.figures --check    # exit 1 when a block is stale

so a quoted figure and its source cannot disagree (a test runs ``--check``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.core.model_cost import CostModel
from resist_fl.run.outputs import CONFIG_FILE
from simulations import report
from simulations.node_costs import node_summary
from simulations.privacy_report import run_privacy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DEFAULT_FILES = ("README.md", "docs/heterogeneous.md", "docs/privacy.md", "docs/experiments.md", "docs/performance.md")
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end of figures: (?P=name) -->)", re.S)


def _groups(name: str) -> tuple[Path, dict, dict]:
    runs_dir = RESULTS / name
    manifest_path = runs_dir / report.MANIFEST_FILE
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: no committed comparison named {name!r}")
    manifest = report.read_json(manifest_path)
    return runs_dir, manifest, report.group_runs(report.discover_runs(runs_dir, manifest))


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def baselines_block(name: str) -> list[str]:
    """Final accuracy, traffic, time to the preset's target and node-rounds over capacity per method."""
    runs_dir, manifest, groups = _groups(name)
    target, _ = report.target_accuracy(groups, (manifest.get("target") or {}).get("accuracy"),
                                       (manifest.get("target") or {}).get("fraction-of-fedavg") or 0.9)
    rows = []
    for (variant, strategy), runs in groups.items():
        stats = report.group_stats(variant, strategy, runs, target)
        costs = node_summary([runs_dir / r.name for r in runs]) or {}
        rows.append([report.group_label(variant, strategy), _pm(*stats.final),
                     f"{stats.reached}/{stats.seeds}", report.num(stats.rounds[0], 1),
                     report.num(stats.bytes_per_round / 1e6, 2),
                     f"{costs.get('over-capacity', 0)} / {costs.get('node-rounds', 0)}"])
    rows.sort(key=lambda r: -float(r[1].split(" ")[0]))
    first = report.read_json(runs_dir / next(iter(groups.values()))[0].name / CONFIG_FILE)
    seeds = len(next(iter(groups.values())))
    source = f"Target accuracy {target:.4f}; {seeds} seeds; from [docs/results/{name}](results/{name}/report.md)."
    profile = str(first["run_config"].get("capacity-profile") or "")
    if profile:  # a budget per node: say what ResIST's smallest sub-network costs
        spec = ModelSpec.from_dict({**first["model_spec"], "depths": tuple(first["model_spec"]["depths"])})
        stages = tuple(int(s) for s in str(first["run_config"]["partitioned-stages"]).split(","))
        costs = CostModel(spec, BlockLayout.from_spec(spec, stages), tuple(first["data"]["image-shape"][1:]))
        capacities = [float(c) for c in profile.split(",")]
        source = (f"Stage depths {'-'.join(map(str, spec.depths))}, partitioned stage(s) {','.join(map(str, stages))}: "
                  f"ResIST's smallest sub-network costs {100 * costs.floor_fraction():.1f} % of the full model's "
                  f"training FLOPs (the smallest budget is {100 * min(capacities):g} %). " + source)
    return [source, "",
            *report.table(["method", "final accuracy", "reached target", "rounds to target", "MB / round",
                           "node-rounds over capacity"], rows)]


def privacy_block(name: str) -> list[str]:
    """Final accuracy beside epsilon, fewest holders and exposed fraction per variant."""
    runs_dir, _, groups = _groups(name)
    rows = []
    for (variant, strategy), runs in groups.items():
        figures = [run_privacy(runs_dir / r.name) for r in runs]
        accuracy = [f["final-accuracy"] for f in figures]
        mean, std = report.mean_std(accuracy)
        central = [f["epsilon"] for f in figures if f["epsilon"] is not None]
        local = [f["node-epsilon"] for f in figures if f["node-epsilon"] is not None]
        eps = (f"{sum(central) / len(central):.2f}" if central else
               f"{sum(local) / len(local):.2f} (node, local)" if local else "-")
        exposed = [f["exposed-fraction"] for f in figures if f["exposed-fraction"] is not None]
        holders = [f["min-holders"] for f in figures if f["min-holders"] is not None]
        rows.append([report.group_label(variant, strategy), _pm(mean, std), eps,
                     str(min(holders)) if holders else "-",
                     f"{sum(exposed) / len(exposed):.3f}" if exposed else "-",
                     f"{sum(f['mb-per-round'] for f in figures) / len(figures):.3f}"])
    return [f"From [docs/results/{name}](results/{name}/report.md) ({len(next(iter(groups.values())))} "
            "seeds; epsilon at delta 1e-5).", "",
            *report.table(["variant", "final accuracy", "epsilon", "fewest holders", "exposed fraction",
                           "MB / round"], rows)]


BLOCKS: dict[str, Callable[[], list[str]]] = {
    "hetero-baselines": lambda: baselines_block("hetero-baselines"),
    "hetero-baselines-synthetic": lambda: baselines_block("hetero-baselines-synthetic"),
    "privacy-digits": lambda: privacy_block("privacy-digits"),
    "quick-cpu": lambda: baselines_block("quick-cpu"),
}


def render(text: str, blocks: dict[str, Callable[[], list[str]]] = BLOCKS) -> str:
    """``text`` with every figures block regenerated (an unknown block name is an error)."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in blocks:
            raise KeyError(f"figures block {name!r}: expected one of {', '.join(blocks)}")
        return match.group(1) + "\n".join(blocks[name]()) + "\n" + match.group(4)

    return BLOCK.sub(replace, text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.figures", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when a block differs from its source")
    parser.add_argument("files", nargs="*", default=list(DEFAULT_FILES))
    args = parser.parse_args(argv)
    stale = []
    for name in args.files:
        path = Path(name) if Path(name).is_absolute() else ROOT / name
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(name)
            if args.write:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"stale figures in {', '.join(stale)}: run python -m simulations.figures --write {' '.join(stale)}",
              file=sys.stderr)
        return 1
    print("\n".join(f"rewrote {n}" for n in stale) if args.write and stale else "figures up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
