"""Routing-dynamics figures and table of the small-scale reproduction (claim 4: early routing), from the grid's runs.

    python -m experiments.figures                 # after: python -m experiments.grid experiments/main.json

Reads results/main.csv (the runs picked on validation) and the routing records of its molf and molf_e runs
(routing.jsonl where the run was trained, else the committed routing_winners.csv.gz):
    figures/evidence_routing_<task>_<method>.png  win fraction per module type and per layer over training
                                                  (seed 0)
    figures/evidence_routing_<task>_<method>_layers.png  layer x module type heatmaps, one per quarter
                                                  of training (seed 0)
    figures/evidence_routing_heatmaps.png         layer x module type share of steps the FFT expert won,
                                                  one panel per task (MoLF, seed 0)
    figures/evidence_routing_agreement.png        share of modules already routed as at the end, per step,
                                                  every task, method and seed
    results/routing_dynamics.csv                  per run: win share of the default expert (overall and per
                                                  module type), agreement with the final routing at 10/25/50%
                                                  of training, settling step
"final routing" = each module's most frequent winner over the last half of training; "settling step" =
the first step from which the 3-step mean agreement stays >= 0.9 (molf.lab.analysis.settling_step).
Two nulls stand beside the agreement at 10% (claim 4 is judged against them, experiments/report.py):
    null_time_10pct   the same agreement after shuffling each module's winners in time (mean of 20
                      shuffles): a router whose winners keep their shares but have no order in time;
                      routing that specialises early must beat it
    null_type_10pct   the agreement at 10% when each module's winner there is drawn from those of the
                      modules of its type (q, k, v, ...) at that step (mean of 20 draws): what the module
                      type alone predicts
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from molf.lab import analysis, plots, runs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

ROUTED = ("molf", "molf_e")


def dynamics_row(data, table: pd.DataFrame, task: str, method: str, seed: int) -> dict:
    """One row of results/routing_dynamics.csv; ``table`` is ``analysis.agreement_with_final(data)``."""
    steps = table["step"].to_numpy()
    expert = analysis.default_expert(data)

    def at(fraction: float) -> float:
        return float(table["agreement"].iloc[min(len(steps) - 1, int(round(fraction * (len(steps) - 1))))])

    per_type = analysis.win_table(data, expert).groupby("module_type")["win_fraction"].mean()
    time_null, type_null = null_agreements(data)
    return {"task": task, "method": method, "seed": seed, "steps": len(steps), "expert": expert,
            "win_share": analysis.overall_win_share(data)[expert],
            **{f"win_share_{t}": float(v) for t, v in per_type.items()},
            "agreement_10pct": at(0.10), "agreement_25pct": at(0.25), "agreement_50pct": at(0.50),
            "null_time_10pct": time_null, "null_type_10pct": type_null,
            "settling_step": analysis.settling_step(table, threshold=0.9, window=3),
            "mean_switch_rate": float(analysis.switch_table(data)["switch_rate"].mean())}


def _winners(data) -> pd.DataFrame:
    """One row per (module, step): its winner set as one string ("fft", "fft,lora0")."""
    routing = analysis.routing_of(data)
    won = routing[routing["won"]].sort_values(["module", "step", "expert"])
    return won.groupby(["module", "step"])["expert"].agg(",".join).reset_index()


def _final_winners(winners: pd.DataFrame) -> pd.Series:
    """Each module's final routing as molf.lab.analysis.agreement_with_final defines it: its most frequent
    winner set over the last half of the steps, ties to the one seen last."""
    steps = np.sort(winners["step"].unique())
    late = winners[winners["step"] >= steps[len(steps) // 2]]
    return late.groupby("module")["expert"].agg(lambda x: x.iloc[::-1].value_counts(sort=True).index[0])


def null_agreements(data, fraction: float = 0.10, shuffles: int = 20, seed: int = 0) -> tuple[float, float]:
    """(time-shuffled null, module-type null) of the agreement with the final routing at ``fraction`` of
    training, each the mean over ``shuffles`` draws from a fixed ``seed``:
    - time: each module's winners permuted over its steps (their shares kept, their order in time lost),
      the agreement then computed as for the run (molf.lab.analysis.agreement_with_final);
    - module type: at that step, each module's winner drawn (without replacement) from the winners of
      the modules of its type (q, k, v, ...), against the run's own final routing: what the module type
      alone predicts."""
    winners = _winners(data)
    generator = np.random.default_rng(seed)
    time_null = []
    for _ in range(shuffles):
        sets = winners.assign(won=True)
        sets["expert"] = sets.groupby("module")["expert"].transform(lambda x: generator.permutation(x.to_numpy()))
        agreement = analysis.agreement_with_final(sets)
        time_null.append(float(agreement["agreement"].iloc[min(len(agreement) - 1,
                                                               int(round(fraction * (len(agreement) - 1))))]))
    steps = np.sort(winners["step"].unique())
    early = winners[winners["step"] == steps[min(len(steps) - 1, int(round(fraction * (len(steps) - 1))))]]
    early = early.assign(type=[runs.module_type(m) for m in early["module"]])
    final = _final_winners(winners)
    n_modules = winners["module"].nunique()
    type_null = []
    for _ in range(shuffles):
        drawn = early.groupby("type")["expert"].transform(lambda x: generator.permutation(x.to_numpy()))
        type_null.append(float((drawn.to_numpy() == early["module"].map(final).to_numpy()).sum()) / n_modules)
    return float(np.mean(time_null)), float(np.mean(type_null))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--figures", type=Path, default=ROOT / "figures")
    parser.add_argument("--table", default="main", help="which grid table's picked runs (default: main)")
    args = parser.parse_args(argv)
    picked_csv = args.results / f"{args.table}.csv"
    if not picked_csv.is_file():
        raise FileNotFoundError(f"{picked_csv} does not exist: run experiments/grid.py experiments/"
                                f"{args.table}.json first")
    picked = pd.read_csv(picked_csv)
    if "dir" not in picked:  # a test CSV written before it named each run's folder
        validation = pd.read_csv(args.results / f"{args.table}_validation.csv")
        picked = picked.merge(validation[["task", "method", "lr", "seed", "dir"]], on=["task", "method", "lr", "seed"])
    picked = picked[picked["method"].isin(ROUTED)].sort_values(["task", "method", "seed"])
    if picked.empty:
        raise ValueError(f"{picked_csv} has no molf or molf_e runs yet")

    missing = [d for d in picked["dir"] if not runs.has_routing(args.results / d)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} picked run(s) have no routing record (neither routing.jsonl, which stays on the "
            f"machine that trained the run, nor the committed {runs.WINNERS_FILE}): {', '.join(missing)}. "
            f"Delete those run directories and rerun experiments/grid.py to retrain them, then this script.")
    rows, curves, heatmaps, drawn = [], {}, {}, set()
    for _, r in picked.iterrows():  # sorted by seed: the first run of each (task, method) is drawn
        data = runs.load(args.results / r["dir"])
        agreement = analysis.agreement_with_final(data)
        rows.append(dynamics_row(data, agreement, r["task"], r["method"], int(r["seed"])))
        curves[f"{r['task']} {plots.method_label(r['method'])} s{int(r['seed'])}"] = agreement
        if (r["task"], r["method"]) not in drawn:
            drawn.add((r["task"], r["method"]))
            fig = plots.win_fraction_over_time(data)
            plots.save(fig, args.figures / f"evidence_routing_{r['task']}_{r['method']}.png")
            plt.close(fig)
            fig = plots.routing_heatmaps_over_time(data, windows=4)
            plots.save(fig, args.figures / f"evidence_routing_{r['task']}_{r['method']}_layers.png")
            plt.close(fig)
            if r["method"] == "molf":
                heatmaps[r["task"]] = data

    table = pd.DataFrame(rows)
    table.to_csv(args.results / "routing_dynamics.csv", index=False)
    print(table.to_string(index=False))

    fig = plots.agreement_plot(curves, title="How early does routing settle? (picked runs of the main table)")
    fig.set_size_inches(9, 4.8)
    plots.save(fig, args.figures / "evidence_routing_agreement.png")
    plt.close(fig)
    if heatmaps:
        fig, axes = plt.subplots(1, len(heatmaps), figsize=(6.5 * len(heatmaps), 6), layout="constrained",
                                 squeeze=False)
        for ax, (task, data) in zip(axes[0], heatmaps.items()):
            plots.routing_heatmap(data, "fft", ax=ax, title=f"{task}: share of steps the FFT expert won",
                                  annotate=False, colorbar=ax is axes[0][-1])
        fig.suptitle("MoLF (SmolLM2-135M, EPD, top-1): where the dense weight was trained, per layer and module")
        plots.save(fig, args.figures / "evidence_routing_heatmaps.png")
        plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
