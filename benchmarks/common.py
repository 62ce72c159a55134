"""Helpers every bitllm benchmark shares (BENCH.md): the machine line, the read-bandwidth roofline
measured in the same run, robust timing (median/min after warm-up), DRAM-honest cycling through
copies of the weights, and JSON/PNG output under benchmarks/results/ (git-ignored).

Benchmarks are scripts, never imported by the package.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
L3_BYTES = 32 << 20  # this machine kind; cycle through >= 4x this so weights come from DRAM
DRAM_BYTES = 4 * L3_BYTES


def l3_bytes() -> int:
    """L3 size from sysfs when readable, else the project machine's 32 MiB."""
    for idx in range(6):
        p = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}")
        try:
            if (p / "level").read_text().strip() == "3":
                s = (p / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
                return int(s.rstrip("KM")) * mult
        except OSError:
            continue
    return L3_BYTES


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line(isa: str, threads: int, roofline_gbs: float | None = None) -> str:
    """'CPU model | ISA | threads | roofline' — printed at the top of every benchmark."""
    from bitllm import kernels as bk

    parts = [
        f"cpu: {bk.cpu_model()} ({os.cpu_count()} logical, {platform.machine()})",
        f"kernel isa: {isa}",
        f"threads: {threads}",
    ]
    if roofline_gbs is not None:
        parts.append(f"read roofline: {roofline_gbs:.1f} GB/s (best of 5, 1 GiB, same run)")
    parts.append(f"load avg: {loadavg()}")
    return " | ".join(parts)


def roofline_gbs(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Read-only streaming bandwidth in GB/s with `threads` threads (C++; best of `reps`)."""
    from bitllm import kernels as bk

    return bk.stream_read_bandwidth(nbytes, threads, reps) / 1e9


@dataclass
class Timing:
    median_s: float
    min_s: float
    reps: int

    def as_dict(self) -> dict:
        return {"median_us": self.median_s * 1e6, "min_us": self.min_s * 1e6, "reps": self.reps}


def n_copies(nbytes_per_copy: int, total: int = DRAM_BYTES) -> int:
    """How many copies of a weight set make `total` bytes (so a pass cannot live in cache)."""
    return max(1, -(-total // max(1, nbytes_per_copy)))


def time_cycled(calls: Sequence[Callable[[], object]], reps: int = 7, warmup: int = 1,
                min_batch_s: float = 0.02) -> Timing:
    """Time one call, cycling through `calls` (one per weight copy) so each call sees cold weights.

    A rep times a batch of consecutive calls (about `min_batch_s` worth, at least one) and
    divides; the copy index keeps cycling across reps. Returns median and min over `reps` reps.
    """
    n = len(calls)
    for i in range(warmup):
        calls[i % n]()
    t0 = time.perf_counter()
    calls[0]()
    one = max(time.perf_counter() - t0, 1e-7)
    batch = max(1, int(min_batch_s / one))
    samples, i = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(batch):
            calls[i % n]()
            i += 1
        samples.append((time.perf_counter() - t0) / batch)
    return Timing(statistics.median(samples), min(samples), reps)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def bar_chart(name: str, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> Path | None:
    """Grouped bar chart (one group per label, one bar per series) saved as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels) * max(1, len(series)) / 2), 4.5))
    width = 0.8 / max(1, len(series))
    for j, (sname, vals) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, vals, width, label=sname)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fmt_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])
