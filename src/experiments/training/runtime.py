"""The machine a training runs on: CPU threads and the precision policy (bf16 where the CPU has
native bf16 instructions).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import tensorflow as tf

BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy for `trainer.precision` ("auto" picks by hardware)."""
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get(
            "compute_capability", (0, 0))
        if capability >= (8, 0):
            return "mixed_bfloat16"
        return "mixed_float16" if capability >= (7, 0) else "float32"
    return "mixed_bfloat16" if BF16_CPU_FLAGS & cpu_flags() else "float32"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS keeps one (Linux: what
    taskset, a container or a SLURM allocation allows), else every core (macOS and Windows
    have no `os.sched_getaffinity`)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """Use `threads` intra-op threads (and one inter-op thread per two of them) in this process;
    returns the number in force. TensorFlow fixes them at its first operation: a process that
    runs a second job (a reused launcher worker) keeps what the first set."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))
    except RuntimeError:  # already initialised
        pass
    return tf.config.threading.get_intra_op_parallelism_threads() or threads


def set_precision(policy: str) -> None:
    """Set the global dtype policy for models built from now on (always set, so one job's
    policy never leaks into the next job of a multirun)."""
    keras.config.set_dtype_policy(policy)
