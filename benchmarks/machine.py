"""The line every benchmark table starts with: which CPU measured it (these machines change
between sessions: AMX, AVX2-only, AVX512-BF16) - and the table itself."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")


def cpu_line() -> str:
    """`lscpu`'s model name, the core count and the flags that decide bf16 speed."""
    model, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    shown = [f for f in FLAGS if f in flags] or ["none of " + ", ".join(FLAGS)]
    return f"CPU: {model}, {os.cpu_count()} cores; flags: {', '.join(shown)}"


def print_row(row: Sequence[str]) -> None:
    """A table row as it is measured (long benchmarks show progress)."""
    print("  " + " | ".join(row), flush=True)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The rows again as a markdown table, for benchmarks/README.md."""
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join("| " + " | ".join(row) + " |" for row in rows))


def spread(values: np.ndarray) -> str:
    """Repeats of one measurement as "mean (min-max)"."""
    return f"{values.mean():.3f} ({values.min():.2f}-{values.max():.2f})"


def paired(diff: np.ndarray) -> str:
    """Seed-by-seed differences (b - a on the same partition) as "mean (ahead/level/behind)":
    how many repeats b wins, ties and loses."""
    return (f"{diff.mean():+.3f} ({(diff > 1e-9).sum()}/{(abs(diff) <= 1e-9).sum()}/"
            f"{(diff < -1e-9).sum()})")
