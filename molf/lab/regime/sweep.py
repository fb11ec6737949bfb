"""Running the map: cells x seeds x methods x learning rates, resumable from its CSV; routing over training."""
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .methods import DEFAULT_GRID, Config, configs, train
from .setting import METHODS, Cell, Setting, make_task
from .verdicts import agreement_at, shuffled_agreement


# ---------------------------------------------------------------------------- the map
@dataclass
class MapSpec:
    """The grid of a map: cells, seeds, the learning-rate grid and the methods."""

    cells: tuple
    seeds: int = 20
    setting: Setting = field(default_factory=Setting)
    grid: dict = field(default_factory=lambda: dict(DEFAULT_GRID))
    methods: tuple = METHODS


def default_cells(ranks=(1, 8, 64), examples=(32, 512, 4096), noise=0.1,
                  noise_slice=((1, 512), (64, 512)), noise_levels=(1.0,)) -> tuple:
    """The map's cells: ``ranks x examples`` at ``noise``, plus the noise slice (``noise_levels`` at
    each (rank, examples) of ``noise_slice``)."""
    cells = [Cell(k, n, noise) for k in ranks for n in examples]
    cells += [Cell(k, n, level) for k, n in noise_slice for level in noise_levels]
    return tuple(dict.fromkeys(cells))


MAP = MapSpec(cells=default_cells(), setting=Setting(steps=150, check_every=15, impl="compiled"),
              grid={**DEFAULT_GRID, "dora": (1e-3, 3e-3, 1e-2), "molf_e": (3e-3, 1e-2)})
SLICE = MapSpec(cells=(Cell(1, 64), Cell(32, 64)), seeds=4,
                setting=Setting(steps=120, check_every=20, n_val=128, n_test=128, impl="compiled"),
                grid={"fft": (1e-3, 3e-3), "lora": (3e-3, 1e-2), "dora": (3e-3, 1e-2), "molf_e": (3e-3,),
                      "molf_fft": (3e-4, 3e-3), "molf_lora": (1e-3, 1e-2)})


def run_cell(cell: Cell, spec: MapSpec, methods=None, log=None) -> pd.DataFrame:
    """Every method at every learning rate on ``spec.seeds`` tasks of ``cell``: one row per run
    (cell, seed, method, lr_fft, lr_lora, val, test, best_step, fft_share, base_loss, and for MoLF
    top-1 runs agree10 / agree10_null: routing at 10% of training against the time-shuffled null).
    Dense top-2 runs at the cell's tuned MoLF pair (picked on validation), when MoLF is among
    ``methods``; otherwise at every pair of the grid."""
    methods = tuple(methods or spec.methods)
    setting = spec.setting
    tasks = [make_task(cell, seed, setting) for seed in range(spec.seeds)]
    frames = []
    for method in [m for m in methods if m != "molf_dense"] + (["molf_dense"] if "molf_dense" in methods else []):
        if method == "molf_dense":
            done = pd.concat(frames) if frames else pd.DataFrame()
            mine = done[done["method"] == "molf"] if len(done) else done
            if len(mine):
                best = mine.groupby(["lr_fft", "lr_lora"])["val"].mean().idxmin()
                cfgs = [Config(*best)]
            else:
                cfgs = configs(method, spec.grid)
        else:
            cfgs = configs(method, spec.grid)
        runs = [(t, c) for c in cfgs for t in range(len(tasks))]
        trained = train(method, tasks, runs, setting, record_routing=method == "molf")
        frame = pd.DataFrame({
            "shift_rank": cell.shift_rank, "examples": cell.examples, "noise": cell.noise,
            "seed": [tasks[t].seed for t, _ in runs], "method": method,
            "lr_fft": [c.lr_fft for _, c in runs], "lr_lora": [c.lr_lora for _, c in runs],
            "val": trained.val, "test": trained.test, "best_step": trained.best_step,
            "fft_share": trained.fft_share, "base_loss": [tasks[t].base_test_loss for t, _ in runs]})
        if trained.decisions is not None:
            frame["agree10"] = agreement_at(trained.decisions)
            frame["agree10_null"] = shuffled_agreement(trained.decisions)
        frames.append(frame)
        if log:
            log(f"{cell.label}: {method} {len(runs)} runs in {trained.seconds:.1f} s")
    return pd.concat(frames, ignore_index=True)


def run_map(spec: MapSpec, methods=None, out=None, log=None) -> pd.DataFrame:
    """``run_cell`` for every cell; with ``out`` (a CSV path), rows are appended cell by cell and cells
    already there are not run again (so an interrupted map resumes)."""
    done = pd.read_csv(out) if out is not None and _exists(out) else pd.DataFrame()
    frames = [done] if len(done) else []
    for cell in spec.cells:
        if len(done) and ((done["shift_rank"] == cell.shift_rank) & (done["examples"] == cell.examples)
                          & np.isclose(done["noise"], cell.noise)).any():
            continue
        frame = run_cell(cell, spec, methods, log)
        frames.append(frame)
        if out is not None:
            frame.to_csv(out, mode="a", header=not _exists(out), index=False, float_format="%.6g")
    return pd.concat(frames, ignore_index=True)


def _exists(path) -> bool:
    from pathlib import Path
    return Path(path).exists()



# ---------------------------------------------------------------------------- routing over training
def routing_curves(cells: Sequence[Cell], pair: tuple[float, float], seeds: int = 4,
                   setting: Setting = Setting(steps=150, check_every=15)) -> pd.DataFrame:
    """MoLF at one lr pair in each of ``cells``: the share of FFT decisions per step (mean over modules
    and seeds), with the held-out loss. Columns: cell, step, fft_share, test."""
    frames = []
    for cell in cells:
        tasks = [make_task(cell, seed, setting) for seed in range(seeds)]
        trained = train("molf", tasks, [(t, Config(*pair)) for t in range(seeds)], setting, record_routing=True)
        share = trained.decisions.mean(axis=(1, 2))
        frames.append(pd.DataFrame({"cell": cell.label, "step": np.arange(1, len(share) + 1), "fft_share": share,
                                    "test": float(trained.test.mean())}))
    return pd.concat(frames, ignore_index=True)
