"""Shared by the benchmarks: interleaved timing, peak-memory measurement in a child process, tables.

Timing: every method runs one repetition in turn (interleaved, so load from other processes on the
machine hits all methods alike), after warm-up repetitions; we report the median and the minimum.
Peak memory: measured in a fresh child process per method, as the Linux peak resident set size
(``VmHWM``) reset with ``/proc/self/clear_refs`` once the model is loaded and set up, so it covers
exactly the measured steps: optimizer state, gradients, activations and temporaries on top of the
resident model. (tracemalloc does not see torch's allocations; RSS does, but it also counts pages the
allocator keeps, so small differences are noise.)
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def setup_threads(n: int = 2) -> None:
    torch.set_num_threads(n)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} logical CPUs, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at start")


def interleaved(fns: dict, warmup: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` measured rounds after ``warmup``, interleaved."""
    times = {name: [] for name in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def sync() -> None:
    """Wait for queued GPU work, so that a timing covers it (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------- peak memory in a child process
def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def child_memory(script: str, args: list[str]) -> dict:
    """Run ``script --memory-child ARGS`` in a fresh interpreter; it prints one JSON line at the end."""
    out = subprocess.run([sys.executable, str(HERE / script), "--memory-child", *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (moments and step counters)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------- tables
def table(header: list[str], rows: list[list]) -> str:
    """A markdown table (the tests parse it back)."""
    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


MiB = 1024 * 1024
