"""The regime map's cost: the regression slice, and the map (one cell measured, or the whole map).

    python benchmarks/bench_regime.py            # the slice, and one cell of the map x its cell count
    python benchmarks/bench_regime.py --full     # the slice, and the whole map (long on a busy machine)

Every run is one process on one thread (two busy threads on two shared cores run these small kernels
many times slower than one). Reported per part: wall seconds, CPU seconds of this process, and the
target's ratio. CPU seconds are what an idle core would take; the map's work splits into independent
parts (``python -m molf.lab.regime --run CSV --part i/n``), so on two idle cores its wall time is about
CPU / 2. Targets: the map within 600 s and the slice within 20 s on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MAP_TARGET_S, SLICE_TARGET_S = 600.0, 20.0


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="run the whole map, not one cell of it")
    args = parser.parse_args()
    C.setup_threads(1)
    from molf.lab import regime

    print(C.machine())
    regime.train("fft", [regime.make_task(regime.Cell(1, 32), 0)],            # imports and kernel build
                 [(0, regime.Config(1e-3, 1e-3))], replace(regime.SLICE.setting, steps=20, check_every=20))
    rows = []
    slice_runs, wall, cpu = timed(lambda: regime.run_map(regime.SLICE))
    rows.append(["regression slice", len(regime.SLICE.cells), len(slice_runs), wall, cpu, cpu / 2,
                 SLICE_TARGET_S, (cpu / 2) / SLICE_TARGET_S])
    spec = regime.MAP if args.full else replace(regime.MAP, cells=regime.MAP.cells[:1])
    map_runs, wall, cpu = timed(lambda: regime.run_map(spec))
    scale = len(regime.MAP.cells) / len(spec.cells)
    label = "map" if args.full else f"map (1 cell x {len(regime.MAP.cells)})"
    rows.append([label, len(regime.MAP.cells), int(len(map_runs) * scale), wall * scale, cpu * scale,
                 cpu * scale / 2, MAP_TARGET_S, (cpu * scale / 2) / MAP_TARGET_S])
    print(C.table(["part", "cells", "runs", "wall s", "CPU s", "2 idle cores s (CPU/2)", "target s",
                   "ratio to target"], rows))
    classroom = regime.Classroom(seeds=2, steps=80)          # notebook 07's app, at its defaults
    times = []
    for k in (32, 1, 64):
        _, wall, cpu = timed(lambda k=k: classroom.retrain(shift_rank=k))
        times.append((wall, cpu))
    print(f"classroom retrain (4 methods x 2 seeds x 80 steps, one thread): median wall "
          f"{sorted(t[0] for t in times)[1]:.2f} s, CPU {sorted(t[1] for t in times)[1]:.2f} s (target ~2 s)")


if __name__ == "__main__":
    main()
