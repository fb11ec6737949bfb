"""Print the evidence tables of docs/evidence.md as Markdown, from the CSVs under results/.

    python experiments/report.py        # after experiments/grid.py (main, ablations) and experiments/figures.py

Every number in docs/evidence.md is printed by this script; nothing is typed in by hand.
Scores are test scores of the lr picked on validation, mean ± sample std over the seeds that finished
(the "lr, seeds" column says how many; a single seed gets no ±).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from molf.lab.analysis import MODULE_TYPES  # noqa: E402
from molf.lab.plots import method_label  # noqa: E402

METHOD_ORDER = ["fft", "lora", "molf", "molf_e", "adalora", "dora"]
METRIC = {"fact": "efficacy", "mcq": "accuracy", "sql": "execution accuracy"}


def cell(mean: float, std: float, seeds: int) -> str:
    text = f"{100 * mean:.1f}"
    if seeds > 1 and pd.notna(std):
        text += f" ± {100 * std:.1f}"
    return text


def main_table(summary: pd.DataFrame, test: pd.DataFrame) -> str:
    tasks = [t for t in ("fact", "mcq", "sql") if t in set(summary["task"])]
    n_test = {t: int(test[test.task == t]["test_n"].iloc[0]) for t in tasks if "test_n" in test}
    head = "| method | " + " | ".join(f"{t}: {METRIC[t]} (n={n_test.get(t, '?')}) | lr, seeds" for t in tasks) + " |"
    lines = [head, "|---|" + "---:|---|" * len(tasks)]
    for method in METHOD_ORDER:
        rows = summary[summary.method == method].set_index("task")
        if rows.empty:
            continue
        parts = []
        for t in tasks:
            if t in rows.index:
                r = rows.loc[t]
                flag = "" if r.sweep_complete else " (sweep unfinished)"
                parts += [cell(r["mean"], r["std"], int(r.seeds)), f"{r.lr:g}, {int(r.seeds)}{flag}"]
            else:
                parts += ["not run", ""]
        lines.append(f"| {method_label(method)} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def shares(r: pd.Series) -> str:
    """"fft 0.39 · lora0 0.61": the share of routing decisions that updated each expert (grid.py)."""
    found = [(c[len("updated_"):], r[c]) for c in r.index if c.startswith("updated_") and pd.notna(r[c])]
    return " · ".join(f"{expert} {share:.2f}" for expert, share in found) or "–"


def ablation_table(summary: pd.DataFrame) -> str:
    lines = ["| variant | task | score (test) | lr, seeds | share of decisions updating each expert |",
             "|---|---|---:|---|---|"]
    for _, r in summary.sort_values(["task", "method"]).iterrows():
        lines.append(f"| {r.method} | {r.task} | {cell(r['mean'], r['std'], int(r.seeds))} | {r.lr:g}, "
                     f"{int(r.seeds)} | {shares(r)} |")
    return "\n".join(lines)


def dynamics_table(dynamics: pd.DataFrame) -> str:
    lines = ["| task | method | win share of the dense / larger expert | agreement with final routing at 10% / 25% / 50% of training | settling step (of steps) | mean switch rate | seeds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (task, method), g in dynamics.groupby(["task", "method"]):
        settle = [("never" if pd.isna(s) else str(int(s))) for s in g["settling_step"]]
        lines.append(
            f"| {task} | {method_label(method)} ({g.expert.iloc[0]}) | {g.win_share.mean():.2f} | "
            f"{g.agreement_10pct.mean():.2f} / {g.agreement_25pct.mean():.2f} / {g.agreement_50pct.mean():.2f} | "
            f"{', '.join(settle)} (of {int(g.steps.iloc[0])}) | {g.mean_switch_rate.mean():.3f} | {len(g)} |")
    return "\n".join(lines)


def module_type_table(dynamics: pd.DataFrame) -> str:
    """Per task (and over all tasks): the range over seeds of the dense / larger expert's win share per
    module type, MoLF and MoLF-E rows apart."""
    present = [c[len("win_share_"):] for c in dynamics.columns if c.startswith("win_share_")]
    types = [t for t in MODULE_TYPES if t in present] + sorted(set(present) - set(MODULE_TYPES))
    columns = [f"win_share_{t}" for t in types]
    lines = ["| task | method | " + " | ".join(t.removesuffix("_proj") for t in types) + " |",
             "|---|---|" + "---:|" * len(types)]
    groups = [(task, method, g) for (task, method), g in dynamics.groupby(["task", "method"])]
    groups += [("all", method, g) for method, g in dynamics.groupby("method")]
    for task, method, g in sorted(groups, key=lambda x: (x[1], x[0] == "all", x[0])):
        spans = [f"{100 * g[c].min():.0f}–{100 * g[c].max():.0f}" for c in columns]
        lines.append(f"| {task} | {method_label(method)} ({g.expert.iloc[0]}) | " + " | ".join(spans) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--table", default="main", help="the main grid table's name (default: main)")
    args = parser.parse_args(argv)
    r, table = args.results, args.table
    printed = False
    if (r / f"{table}_summary.csv").is_file():
        print(f"### Main table (results/{table}_summary.csv)\n")
        print(main_table(pd.read_csv(r / f"{table}_summary.csv"), pd.read_csv(r / f"{table}.csv")), "\n")
        printed = True
    if (r / "ablations_summary.csv").is_file():
        print("### Ablations (results/ablations_summary.csv)\n")
        print(ablation_table(pd.read_csv(r / "ablations_summary.csv")), "\n")
        printed = True
    if (r / "routing_dynamics.csv").is_file():
        print("### Routing dynamics (results/routing_dynamics.csv)\n")
        dynamics = pd.read_csv(r / "routing_dynamics.csv")
        print(dynamics_table(dynamics), "\n")
        print("### Win share per module type, % of steps, min–max over seeds (results/routing_dynamics.csv)\n")
        print(module_type_table(dynamics), "\n")
        printed = True
    if not printed:
        raise FileNotFoundError(f"no result CSVs under {r}: run experiments/grid.py first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
