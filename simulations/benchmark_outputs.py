"""Read the figures back out of what a benchmark script printed.

The scripts in ``benchmarks/`` print their raw measurements (times, bytes, rates) beside the ratio
they compute. Their printed output is what gets committed (``docs/performance/*.txt``,
``docs/results/transport/bytes_benchmark.txt``); these readers turn it back into numbers, for
:mod:`simulations.figures` (which writes the performance page from the committed files) and for the
benchmarks' smoke tests (which check each printed ratio against the raw figures printed beside it).
One reader per script, named after it; a text a reader cannot parse raises ``ValueError`` naming
the script and what was expected.
"""

from __future__ import annotations

import re
from typing import Any


def _need(pattern: str, text: str, script: str, flags: int = 0) -> re.Match:
    found = re.search(pattern, text, flags)
    if not found:
        raise ValueError(f"{script} output: expected a line matching {pattern!r}, found none in:\n{text}")
    return found


def _floats(values: str) -> list[float]:
    return [float(v) for v in values.split()]


def header(text: str) -> str:
    """The first line: the setting the script measured (model, nodes, machine)."""
    return text.strip().splitlines()[0].strip()


def table(text: str, script: str = "benchmark") -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text``, as {column: cell}."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 3:
        raise ValueError(f"{script} output: expected a markdown table (header, rule, rows), found:\n{text}")
    columns = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != len(columns):
            raise ValueError(f"{script} output: a table row has {len(cells)} cells, the header {len(columns)}: {line}")
        rows.append(dict(zip(columns, cells)))
    return rows


def loader(text: str) -> dict[str, Any]:
    """``rates`` {path: (images/s, ms per batch)} and the printed ``ratio`` new / old."""
    rates = {name: (float(rate.replace(",", "")), float(ms)) for name, rate, ms in
             re.findall(r"(per-sample \(old\)|batched \(new\))\s+([\d,]+) images/s\s+\(\s*([\d.]+) ms per batch", text)}
    if set(rates) != {"per-sample (old)", "batched (new)"}:
        raise ValueError("loader_benchmark output: expected a rate for 'per-sample (old)' and 'batched (new)':\n"
                         f"{text}")
    return {"rates": rates, "ratio": float(_need(r"ratio new / old: ([\d.]+)x", text, "loader_benchmark")[1])}


def round_time(text: str) -> dict[str, Any]:
    """``seconds`` {strategy: every round's seconds}, ``median`` {strategy: median of rounds 2..} and ``ratio``."""
    seconds, median = {}, {}
    for strategy, values, steady in re.findall(r"(resist|fedavg)\s+round seconds ([\d. ]+); median of rounds "
                                               r"2\.\.\d+: ([\d.]+) s", text):
        seconds[strategy], median[strategy] = _floats(values), float(steady)
    if set(seconds) != {"resist", "fedavg"}:
        raise ValueError(f"round_time_benchmark output: expected round seconds for resist and fedavg:\n{text}")
    ratio = float(_need(r"round time ResIST / FedAvg: ([\d.]+)", text, "round_time_benchmark")[1])
    return {"seconds": seconds, "median": median, "ratio": ratio}


def deploy_overhead(text: str) -> dict[str, Any]:
    """{"before"/"after": {"round1", "later", "median"}}, plus the printed ``ratio`` and ``saved`` when both ran."""
    apps = {}
    for name, first, later, steady in re.findall(r"(before|after) \([^)]*\)\s+round 1:\s+([-\d.]+) s; rounds "
                                                 r"2\.\.\d+: ([-\d. ]+); median ([-\d.]+) s", text):
        apps[name] = {"round1": float(first), "later": _floats(later), "median": float(steady)}
    if "after" not in apps:
        raise ValueError(f"deploy_overhead_benchmark output: expected the 'after (working tree)' line:\n{text}")
    found = re.search(r"overhead after / before: ([\d.]+) \(([-+\d.]+) s per round saved\)", text)
    if found:
        apps.update(ratio=float(found[1]), saved=float(found[2]))
    return apps


def merge(text: str) -> dict[str, float]:
    """``mib`` (the updates' bytes), ``copy_ms``, ``merge_ms`` and the printed ``ratio`` merge / copy."""
    return {"mib": float(_need(r"update bytes: ([\d.]+) MiB", text, "merge_benchmark")[1]),
            "copy_ms": float(_need(r"numpy copy of the same bytes: ([\d.]+) ms", text, "merge_benchmark")[1]),
            "merge_ms": float(_need(r"merge_partial:\s+([\d.]+) ms", text, "merge_benchmark")[1]),
            "ratio": float(_need(r"ratio merge / copy: ([\d.]+)", text, "merge_benchmark")[1])}


def load(text: str) -> dict[str, Any]:
    """The run (``nodes``, ``sampled``, ``rounds``, ``strategy``, ``wall``), ``rss_early`` / ``rss_late`` (MiB)
    and the printed ``ratio``."""
    run = _need(r"(\d+) supernodes, (\d+) sampled per round, (\d+) rounds, (\w+): finished in ([\d.]+) s", text,
                "load_benchmark")
    rss = _need(r"server RSS after round 5: ([\d.]+) MiB; after round \d+: ([\d.]+) MiB; ratio ([\d.]+)", text,
                "load_benchmark")
    return {"nodes": int(run[1]), "sampled": int(run[2]), "rounds": int(run[3]), "strategy": run[4],
            "wall": float(run[5]), "rss_early": float(rss[1]), "rss_late": float(rss[2]), "ratio": float(rss[3])}


def startup(text: str) -> dict[str, dict[str, Any]]:
    """{way: {"round1": seconds to round 1, "whole": seconds of the run, "status": "ok" or the failure}}."""
    ways = {name: {"round1": float(first), "whole": float(whole), "status": status} for name, first, whole, status in
            re.findall(r"([\w-]+)\s+to round 1:\s+([\d.]+|nan) s, whole run:\s+([\d.]+) s \((.*)\)", text)}
    if "no-runtime-install" not in ways:
        raise ValueError(f"startup_benchmark output: expected the 'no-runtime-install' line:\n{text}")
    return ways
