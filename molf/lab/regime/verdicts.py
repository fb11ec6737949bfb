"""Reading the map: the picked runs, the per-cell winners, the claim lines (claim 4: does routing settle early?)."""
import math

import numpy as np
import pandas as pd

from .. import stats
from .setting import LABELS, SINGLE_METHODS


# ---------------------------------------------------------------------------- routing settles early? (claim 4)
def agreement_at(decisions: np.ndarray, fraction: float = 0.1, final_fraction: float = 0.5) -> np.ndarray:
    """``decisions``: ``[steps, members, modules]`` (first expert won). Per member: the share of its
    modules whose winner at ``fraction`` of training equals their most frequent winner over the last
    ``final_fraction`` of training (ties: the winner of the last step), as
    ``molf.lab.analysis.agreement_with_final`` defines it."""
    steps = decisions.shape[0]
    if steps < 2:
        raise ValueError(f"need at least 2 steps of decisions, got {steps}")
    at = min(steps - 1, int(round(fraction * (steps - 1))))
    tail = decisions[int(math.floor(steps * (1.0 - final_fraction))):]
    won = tail.mean(axis=0)
    final = np.where(won == 0.5, tail[-1], won > 0.5)
    return (decisions[at] == final).mean(axis=-1)


def shuffled_agreement(decisions: np.ndarray, fraction: float = 0.1, shuffles: int = 50,
                       seed: int = 0) -> np.ndarray:
    """The same agreement when each module's decisions are shuffled in time (the null of no early
    settling: the same win counts, no order); mean over ``shuffles`` shuffles, per member."""
    rng = np.random.default_rng(seed)
    steps, members, modules = decisions.shape
    total = np.zeros(members)
    for _ in range(shuffles):
        order = np.argsort(rng.random((steps, members, modules)), axis=0)
        total += agreement_at(np.take_along_axis(decisions, order, axis=0), fraction)
    return total / shuffles


# ---------------------------------------------------------------------------- reading the map
CELL = ["shift_rank", "examples", "noise"]
ROWS = ("fft", "lora", "dora", "molf", "molf_fixed", "molf_dense", "molf_e")


def load(paths) -> pd.DataFrame:
    """The runs of a map from one or more CSV files written by ``run_map``."""
    paths = [paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "open") else list(paths)
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def fixed_pair(runs: pd.DataFrame) -> tuple[float, float]:
    """MoLF's one learning-rate pair for the whole map: the pair whose mean validation loss is, on
    average over cells, closest to the best pair of each cell (mean of log(loss / cell's best))."""
    molf_runs = runs[runs["method"] == "molf"]
    if molf_runs.empty:
        raise ValueError("no MoLF runs in the map: the fixed pair is picked among them")
    means = molf_runs.groupby(CELL + ["lr_fft", "lr_lora"])["val"].mean().rename("val").reset_index()
    means["log_ratio"] = np.log(means["val"] / means.groupby(CELL)["val"].transform("min"))
    pairs = means.groupby(["lr_fft", "lr_lora"])
    complete = pairs["log_ratio"].count() == means.groupby(CELL).ngroups   # a pair run in every cell
    score = pairs["log_ratio"].mean()[complete]
    if score.empty:
        raise ValueError("no MoLF learning-rate pair was run in every cell")
    return tuple(float(v) for v in score.idxmin())


def pick(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, row, seed): each method at the learning rate(s) with the lowest mean
    validation loss in the cell ("molf" tuned per cell), and "molf_fixed": MoLF at ``fixed_pair``."""
    missing = {"method", "lr_fft", "lr_lora", "seed", "val", "test"} - set(runs.columns)
    if missing:
        raise ValueError(f"map runs lack the columns {sorted(missing)}")
    frames = []
    for keys, group in runs.groupby(CELL + ["method"], sort=True):
        method = keys[-1]
        means = group.groupby(["lr_fft", "lr_lora"])["val"].mean()
        lr_fft, lr_lora = means.idxmin()
        frames.append(group[(group["lr_fft"] == lr_fft) & (group["lr_lora"] == lr_lora)].assign(row=method))
    if (runs["method"] == "molf").any():
        lr_fft, lr_lora = fixed_pair(runs)
        fixed = runs[(runs["method"] == "molf") & (runs["lr_fft"] == lr_fft) & (runs["lr_lora"] == lr_lora)]
        frames.append(fixed.assign(row="molf_fixed"))
    return pd.concat(frames, ignore_index=True).sort_values(CELL + ["row", "seed"]).reset_index(drop=True)


def _per_seed(cell_rows: pd.DataFrame, row: str, column: str = "test") -> np.ndarray | None:
    part = cell_rows[cell_rows["row"] == row].sort_values("seed")
    return part[column].to_numpy(dtype=float, copy=True) if len(part) else None


def _beats(winner: np.ndarray, loser: np.ndarray, margin: float = 0.0) -> stats.Comparison:
    """Paired over seeds: loser's loss minus winner's (> 0: the first has the lower loss)."""
    return stats.compare(loser * (1.0 + margin), winner)


def summarize(picked: pd.DataFrame, margin: float = 0.25) -> pd.DataFrame:
    """One row per cell: mean test loss of every row; the winner among FFT, LoRA and DoRA and whether it
    beats the runner-up significantly (paired bootstrap over seeds); LoRA - FFT; MoLF's gap to the
    winner (ratio of mean losses - 1) and whether it is within ``margin`` (paired non-inferiority,
    ``verdict`` of "MoLF's loss < (1 + margin) x the winner's"), tuned and fixed; FFT shares; top-1
    against dense top-2."""
    records = []
    for cell, rows in picked.groupby(CELL, sort=True):
        rec = dict(zip(CELL, cell))
        losses = {row: _per_seed(rows, row) for row in ROWS}
        for row, loss in losses.items():
            rec[row] = float(loss.mean()) if loss is not None else math.nan
        singles = [m for m in SINGLE_METHODS if losses[m] is not None]
        if singles:
            ranked = sorted(singles, key=lambda m: losses[m].mean())
            winner = ranked[0]
            rec["winner"] = winner
            rec["winner_verdict"] = "only one method" if len(ranked) == 1 else \
                stats.verdict(_beats(losses[winner], losses[ranked[1]]))
            rec["runner_up"] = ranked[1] if len(ranked) > 1 else ""
            best = losses[winner]
            for row in ("molf", "molf_fixed"):
                if losses[row] is not None:
                    rec[f"{row}_gap"] = float(losses[row].mean() / best.mean() - 1.0)
                    rec[f"{row}_within"] = stats.verdict(_beats(losses[row], best, margin))
        if losses["fft"] is not None and losses["lora"] is not None:
            c = _beats(losses["lora"], losses["fft"])
            rec["lora_minus_fft"], rec["lora_vs_fft_low"], rec["lora_vs_fft_high"] = -c.diff, -c.high, -c.low
            rec["lora_beats_fft"] = stats.verdict(c)
            rec["fft_beats_lora"] = stats.verdict(_beats(losses["fft"], losses["lora"]))
        for row in ("molf", "molf_fixed", "molf_e"):
            share = _per_seed(rows, row, "fft_share")
            if share is not None:
                rec[f"{row}_share"] = float(np.nanmean(share))
        if losses["molf"] is not None and losses["molf_dense"] is not None:
            rec["top1_beats_dense"] = stats.verdict(_beats(losses["molf"], losses["molf_dense"]))
            rec["dense_beats_top1"] = stats.verdict(_beats(losses["molf_dense"], losses["molf"]))
        tuned = rows[rows["row"] == "molf"]
        if len(tuned):
            rec["molf_pair"] = f"{tuned['lr_fft'].iloc[0]:g}/{tuned['lr_lora'].iloc[0]:g}"
        records.append(rec)
    return pd.DataFrame(records)


def _cells(table: pd.DataFrame, mask) -> str:
    part = table[mask]
    return ", ".join(f"k={r.shift_rank} n={r.examples}" + (f" noise={r.noise:g}" if r.noise != 0.1 else "")
                     for r in part.itertuples()) or "none"


def claim_winner_flips(summary: pd.DataFrame) -> str:
    """Claim 1: LoRA beats FFT (significantly) in some cells and FFT beats LoRA in others."""
    lora = summary["lora_beats_fft"] == "reproduced"
    fft = summary["fft_beats_lora"] == "reproduced"
    if lora.any() and fft.any():
        verdict = "reproduced"
    elif (summary["lora_beats_fft"] == "not reproduced").all() or (summary["fft_beats_lora"] == "not reproduced").all():
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return (f"claim 1 (the winner flips with the regime): {verdict} — LoRA beats FFT in {int(lora.sum())} of "
            f"{len(summary)} cells ({_cells(summary, lora)}); FFT beats LoRA in {int(fft.sum())} "
            f"({_cells(summary, fft)}); paired bootstrap over seeds, 95% CI of the loss difference excludes 0")


def claim_molf_near_best(summary: pd.DataFrame, margin: float, fixed: tuple | None = None) -> str:
    """Claim 2: MoLF's loss within (1 + margin) x the best single method's, in every cell, tuned and
    fixed. Per row: reproduced when every cell's interval says so, not reproduced when one cell's
    interval lies beyond the margin, else inconclusive."""
    parts, verdicts = [], []
    for row in ("molf", "molf_fixed"):
        column = f"{row}_within"
        if column not in summary:
            continue
        v = summary[column]
        verdict = "reproduced" if (v == "reproduced").all() else (
            "not reproduced" if (v == "not reproduced").any() else "inconclusive")
        verdicts.append(verdict)
        worst = summary.loc[summary[f"{row}_gap"].idxmax()]
        name = "tuned per cell" if row == "molf" else (
            f"fixed {fixed[0]:g}/{fixed[1]:g}" if fixed else "fixed")
        parts.append(f"{name}: {verdict}, within in {int((v == 'reproduced').sum())}/{len(v)} cells, beyond "
                     f"in {int((v == 'not reproduced').sum())}, worst {worst[f'{row}_gap']:+.0%} at "
                     f"k={worst['shift_rank']} n={worst['examples']} noise={worst['noise']:g}")
    overall = "reproduced" if verdicts and all(v == "reproduced" for v in verdicts) else (
        "not reproduced" if "not reproduced" in verdicts else "inconclusive")
    return (f"claim 2 (MoLF within {margin:.0%} of the best of FFT/LoRA/DoRA): {overall} — " + "; ".join(parts))


def claim_early_routing(picked: pd.DataFrame, row: str = "molf_fixed") -> str:
    """Claim 4: routing at 10% of training agrees with the final routing more often than when each
    module's decisions are shuffled in time (paired over runs: every cell and seed)."""
    part = picked[picked["row"] == row].dropna(subset=["agree10", "agree10_null"])
    if part.empty:
        return "claim 4 (routing at 10% agrees with the final routing): inconclusive — no routing recorded"
    c = stats.compare(part["agree10"].to_numpy(dtype=float, copy=True),
                      part["agree10_null"].to_numpy(dtype=float, copy=True))
    mixed = part[(part["fft_share"] > 0.02) & (part["fft_share"] < 0.98)]
    mixed_line = ""
    if len(mixed) >= 2:
        m = stats.compare(mixed["agree10"].to_numpy(dtype=float, copy=True),
                          mixed["agree10_null"].to_numpy(dtype=float, copy=True))
        mixed_line = (f"; in the {len(mixed)} runs with mixed routing (FFT share 2-98%): {m.mean_a:.2f} vs "
                      f"{m.mean_b:.2f}, {stats.verdict(m)}")
    return (f"claim 4 (routing at 10% of training agrees with the final routing, MoLF {row.replace('molf_', '')}): "
            f"{stats.verdict(c)} — {c.line('observed', 'time-shuffled null')} runs{mixed_line}")


def claim_top1_vs_dense(summary: pd.DataFrame) -> str:
    """Claim 5: top-1 routing beats a dense top-2 update (both at the cell's tuned MoLF pair)."""
    if "top1_beats_dense" not in summary:
        return "claim 5 (top-1 beats dense top-2): inconclusive — no dense runs"
    top1 = summary["top1_beats_dense"] == "reproduced"
    dense = summary["dense_beats_top1"] == "reproduced"
    n = len(summary)
    verdict = "reproduced" if top1.sum() > n / 2 and not dense.any() else (
        "not reproduced" if (summary["top1_beats_dense"] == "not reproduced").sum() > n / 2 else "inconclusive")
    return (f"claim 5 (top-1 beats dense top-2, at the tuned pair): {verdict} — top-1 better in {int(top1.sum())} "
            f"of {n} cells ({_cells(summary, top1)}), dense better in {int(dense.sum())} ({_cells(summary, dense)})")


def map_table(summary: pd.DataFrame) -> str:
    """The map as text: mean test MSE x 1e3 per row, the winner (* significant), MoLF's gaps and FFT shares."""
    lines = ["  k     n noise |    FFT   LoRA   DoRA |  MoLF-t  MoLF-f  dense  MoLF-E | winner  | gap-t  gap-f | "
             "share-t share-f | tuned pair"]
    for r in summary.itertuples():
        mark = "*" if getattr(r, "winner_verdict", "") == "reproduced" else " "
        cells = [f"{getattr(r, m, math.nan) * 1e3:6.2f}" for m in ("fft", "lora", "dora")]
        molfs = [f"{getattr(r, m, math.nan) * 1e3:7.2f}" for m in ("molf", "molf_fixed", "molf_dense", "molf_e")]
        lines.append(f"{r.shift_rank:3d} {r.examples:5d} {r.noise:5g} | {' '.join(cells)} | {' '.join(molfs)} | "
                     f"{LABELS.get(getattr(r, 'winner', ''), '?'):5s}{mark} | "
                     f"{getattr(r, 'molf_gap', math.nan):+5.0%} {getattr(r, 'molf_fixed_gap', math.nan):+5.0%} | "
                     f"{getattr(r, 'molf_share', math.nan):7.2f} {getattr(r, 'molf_fixed_share', math.nan):7.2f} | "
                     f"{getattr(r, 'molf_pair', '')}")
    return "\n".join(lines)


def claims(runs: pd.DataFrame, margin: float = 0.25) -> list[str]:
    """The claim lines of a map (its runs as ``run_map`` returns them)."""
    picked = pick(runs)
    summary = summarize(picked, margin)
    fixed = fixed_pair(runs) if (runs["method"] == "molf").any() else None
    return [claim_winner_flips(summary), claim_molf_near_best(summary, margin, fixed),
            claim_early_routing(picked), claim_top1_vs_dense(summary)]
