"""Print the evidence tables of docs/evidence.md as Markdown, from the CSVs under results/.

    python -m experiments.report        # after experiments/grid.py (main, ablations) and experiments/figures.py
    python -m experiments.report --results results/v2 --table main_v2 --ablations ablations_v3 \
        --confirm results/v3/confirm_v3.csv --brief --readme README.md
                                        # the README's evidence block: claims lines, the pre-registered
                                        # fact confirmation and the main table
(from the repository root: ``-m`` imports this checkout's molf, whatever copy is installed.)

Every number in docs/evidence.md is printed by this script; nothing is typed in by hand.
Scores are test scores of the lr picked on validation, mean ± sample std over the seeds that finished
(the "lr, seeds" column says how many; a single seed gets no ±).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from molf.lab import heuristics, stats, tasks
from molf.lab.analysis import MODULE_TYPES
from molf.lab.plots import method_label

ROOT = Path(__file__).resolve().parent.parent

METHOD_ORDER = ["fft", "lora", "molf", "molf_e", "adalora", "dora"]
METRIC = {"fact": "efficacy", "mcq": "accuracy", "mcq2": "accuracy (cloze)", "sql": "execution accuracy",
          "sql2": "execution accuracy (unseen schemas)"}


def cell(mean: float, std: float, seeds: int) -> str:
    text = f"{100 * mean:.1f}"
    if seeds > 1 and pd.notna(std):
        text += f" ± {100 * std:.1f}"
    return text


def main_table(summary: pd.DataFrame, test: pd.DataFrame) -> str:
    """One row per method: each task's test score, its lr and seeds, and, when the summary has a
    "retention" column (grid.py runs that scored the retention probe), the retention after training on
    that task."""
    shown = [t for t in ("fact", "mcq", "mcq2", "sql", "sql2") if t in set(summary["task"])]
    n_test = {t: int(test[test.task == t]["test_n"].iloc[0]) for t in shown if "test_n" in test}
    kept = "retention" in summary  # a column beside each task's score
    n_probe = (int(test["test_retention_n"].dropna().iloc[0])
               if kept and "test_retention_n" in test and test["test_retention_n"].notna().any() else "?")
    head = "| method | " + " | ".join(f"{t}: {METRIC[t]} (n={n_test.get(t, '?')}) | lr, seeds"
                                     + (f" | {t}: retention (n={n_probe})" if kept else "") for t in shown) + " |"
    lines = [head, "|---|" + ("---:|---|" + "---:|" * kept) * len(shown)]
    for method in METHOD_ORDER:
        rows = summary[summary.method == method].set_index("task")
        if rows.empty:
            continue
        parts = []
        for t in shown:
            if t in rows.index:
                r = rows.loc[t]
                flag = "" if r.sweep_complete else " (sweep unfinished)"
                params = (f", {r.trainable_params / 1e6:.1f}M params"
                          if "trainable_params" in r and pd.notna(r.trainable_params) else "")
                parts += [cell(r["mean"], r["std"], int(r.seeds)), f"{r.lr:g}, {int(r.seeds)}{flag}{params}"]
                if kept:
                    parts.append("–" if pd.isna(r["retention"]) else cell(
                        r["retention"], r.get("retention_std", float("nan")), int(r.seeds)))
            else:
                parts += ["not run", ""] + [""] * kept
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


# ------------------------------------------------------------------------------------------ claims

CLAIM_MARGIN = 0.015  # claim 2: "within 1.5 points of the better of FFT and LoRA"
CEILING = 0.99  # both methods right on >= 99% of the items: the comparison cannot separate them
ROUTED_VS_DENSE = {"ablations": [("molf_epd_k1", "molf_dense_k2"), ("molf_e_epd_k1", "molf_e_dense_k2")],
                   "ablations_v2": [("molf_k1", "molf_dense_k2"), ("molf_e_k1", "molf_e_dense_k2")],
                   "ablations_v3": [("molf_k1", "molf_dense_k2"), ("molf_e_k1", "molf_e_dense_k2")]}
# The per-item score claim 5 compares on, per ablation table (default: the task's primary "correct"):
# ablations_v3 tunes the dense variants and scores them on fact's pre-registered edit score.
ABLATION_FIELD = {"ablations_v3": "edit_score"}


class NoPredictions(Exception):
    """A run the comparison needs has no test_predictions.jsonl (older runs) or is missing."""


def _run_folder(results: Path, table: str, row: pd.Series) -> Path:
    if "dir" in row and isinstance(row["dir"], str):
        return results / row["dir"]
    folder = results / "runs" / table
    if "model" in row and isinstance(row.get("model"), str) and (folder / row["model"].replace("/", "--")).is_dir():
        folder = folder / row["model"].replace("/", "--")
    return folder / row["task"] / row["method"] / f"lr{row['lr']:g}_s{int(row['seed'])}"


def _predictions(folder: Path, file: str = "test_predictions.jsonl") -> dict:
    """The per-item records of a run, keyed by item id; ValueError naming the file and the item when an
    id appears twice (two records of one item cannot both be its score, and keeping either is a guess)."""
    path = folder / file
    if not path.is_file():
        raise NoPredictions(str(path))
    records = {}
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        item = json.loads(line)
        key = json.dumps(item["id"])
        if key in records:
            raise ValueError(f"{path}: item {item['id']!r} has a second record on line {line_number}; "
                             f"each item is scored once, so this file is not a run's predictions as written")
        records[key] = item
    return records


def paired_scores(test: pd.DataFrame, results: Path, table: str, task: str, a: str, b: str,
                  field: str = "correct", file: str = "test_predictions.jsonl") -> tuple[list, list, int]:
    """Per-item ``field`` of methods ``a`` and ``b`` on ``task`` as two seeds x items tables: a row per
    seed both have, a column per item every one of those runs scored (in ``a``'s first run's order), so
    row s pairs seed s's runs item by item (molf.lab.stats resamples seeds and items); and the number
    of seeds. ``file``: the per-item records to read (retention_predictions.jsonl: the retention probe).
    Raises NoPredictions when a run has no per-item records, KeyError when a method has no test runs or
    the runs share no item."""
    rows_a, rows_b = (test[(test.task == task) & (test.method == m)] for m in (a, b))
    if rows_a.empty or rows_b.empty:
        raise KeyError(f"{task}: no test runs of {a if rows_a.empty else b}")
    seeds = sorted(set(rows_a.seed) & set(rows_b.seed))
    if not seeds:
        raise KeyError(f"{task}: {a} and {b} share no seed")
    runs = [(_predictions(_run_folder(results, table, rows_a[rows_a.seed == seed].iloc[0]), file),
             _predictions(_run_folder(results, table, rows_b[rows_b.seed == seed].iloc[0]), file))
            for seed in seeds]
    keys = [key for key in runs[0][0] if all(key in pa and key in pb for pa, pb in runs)]
    if not keys:
        raise KeyError(f"{task}: {a} and {b} share no scored item")
    xs = [[float(pa[key][field]) for key in keys] for pa, _ in runs]
    ys = [[float(pb[key][field]) for key in keys] for _, pb in runs]
    return xs, ys, len(seeds)


def _compare(test, results, table, task, a, b, margin: float | None = None, field: str = "correct",
             provisional: bool = True) -> tuple[str, str]:
    """(verdict, text) for "a beats b on task" (``margin`` None), or for "a is no worse than b by more
    than margin" (non-inferiority: the 95% interval of a - b lies above -margin), on the per-item
    ``field``. Either way, when both methods average >= CEILING on a score bounded by 1 the verdict is
    "inconclusive (both at the ceiling)": neither side can show more there, so a superiority test cannot
    separate them and a non-inferiority test passes trivially. ``provisional``: an unfinished part (an open
    sweep, fewer seeds than planned: ``_unfinished``) gets no verdict yet."""
    try:
        xs, ys, seeds = paired_scores(test, results, table, task, a, b, field=field)
    except NoPredictions:
        return "missing", f"{task} {a} vs {b}: no per-item predictions"
    except KeyError as error:  # a method not run on this task: the claim is incomplete
        return "absent", str(error).strip("'\"")
    c = stats.compare(xs, ys)
    bounded = max(v for row in xs + ys for v in row) <= 1.0
    if margin is None:
        verdict = stats.verdict(c)
    else:
        verdict = ("reproduced" if c.low > -margin else "not reproduced" if c.high < -margin else "inconclusive")
    at_ceiling = bounded and min(c.mean_a, c.mean_b) >= CEILING
    if at_ceiling:  # neither side can show more: a harder test could still separate them
        verdict = "inconclusive"
    text = f"{task}: {c.line(a, b)}, {seeds} seeds → {verdict}" + (" (both at the ceiling)" if at_ceiling else "")
    so_far = _so_far(test, task, (a, b), seeds) if provisional else ""
    if so_far:  # the numbers so far, but no verdict yet; said even when they lean nowhere
        return "inconclusive", text + so_far
    return verdict, text


def _unfinished(test: pd.DataFrame, task: str, methods, seeds: int) -> str:
    """Why a comparison is not final yet, as the grid's CSV tells (empty when it is, or cannot tell):
    an lr sweep still running (the picked lr may change), or fewer seeds than the table plans."""
    rows = test[(test.task == task) & test.method.isin(methods)]
    reasons = []
    if "sweep_complete" in rows:
        open_sweeps = sorted(set(rows[~rows.sweep_complete.astype(bool)].method))
        if open_sweeps:
            reasons.append(f"lr sweep of {', '.join(open_sweeps)} unfinished")
    if "seeds_planned" in rows and seeds < int(rows.seeds_planned.max()):
        reasons.append(f"{seeds} of {int(rows.seeds_planned.max())} seeds")
    return "; ".join(reasons)


def _so_far(test: pd.DataFrame, task: str, methods, seeds: int) -> str:
    """" so far, preliminary (why)" when the comparison is not final yet (``_unfinished``), else ""."""
    unfinished = _unfinished(test, task, methods, seeds)
    return f" so far, preliminary ({unfinished})" if unfinished else ""


def _claim_line(number: int, parts: list[tuple[str, str]], note: str = "") -> str:
    """One claim's line from its parts' (verdict, text). A part planned but without runs ("absent") makes
    the claim "incomplete (what is missing)", whatever the other parts say: a claim over every task is
    not settled by some of them. Otherwise: every part reproduced: reproduced; any part not reproduced:
    not reproduced; else (a part inconclusive, or without per-item predictions) inconclusive."""
    verdicts = [v for v, _ in parts]
    absent = list(dict.fromkeys(t for v, t in parts if v == "absent"))
    shown = [t for v, t in parts if v != "absent"]
    if not parts:
        verdict = "inconclusive"
    elif absent:
        verdict = f"incomplete ({'; '.join(absent)})"
    elif all(v == "missing" for v in verdicts):
        verdict = "inconclusive (no per-item predictions)"
    elif all(v == "reproduced" for v in verdicts):
        verdict = "reproduced"
    elif "not reproduced" in verdicts:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    text = "; ".join(dict.fromkeys(shown)) or "no runs"  # a part said once, in order
    return f"claim {number}: {verdict} — {text}{note}"


# Tasks whose comparisons cannot decide a claim: mcq2's per-seed paired difference between methods has
# an SD of about 8 points against gaps of 1-4 (about 56 seeds a method for 80% power at 3 points:
# docs/evidence.md); mcq (v1) sat at chance. They stay tasks for the notebooks and the tables.
NO_VERDICT_TASKS = ("mcq", "mcq2")


def verdict_tasks(present: set, planned: set) -> list[str]:
    """The tasks the claims read: every task run or planned, less NO_VERDICT_TASKS, and less sql where
    the table has sql2 (its second version, on schemas never trained)."""
    tasks_ = (set(present) | set(planned)) - set(NO_VERDICT_TASKS)
    if "sql2" in tasks_:
        tasks_.discard("sql")
    return sorted(tasks_)


def claim4_line(dynamics: pd.DataFrame) -> str:
    """Claim 4 (routing specialises early) against two nulls (experiments/figures.py): MoLF's agreement
    with the final routing at 10% of training must beat, in every run, both the time-shuffled null (each
    module's winners shuffled in time) and the module-type null (each module's winner drawn from its
    type's). Reproduced then; not reproduced when most runs are at or below their time-shuffled null;
    inconclusive otherwise. Tasks in NO_VERDICT_TASKS are left out. MoLF-E is reported apart: its r = 16
    expert wins nearly every decision (the rsLoRA scales, docs/evidence.md), so its routing barely moves
    and says nothing about specialisation."""
    d = dynamics[~dynamics["task"].isin(NO_VERDICT_TASKS)]
    if not {"null_time_10pct", "null_type_10pct"} <= set(d.columns):
        return "claim 4: inconclusive — routing_dynamics.csv has no null columns (rerun experiments/figures.py)"
    molf, apart = d[d["method"] == "molf"], d[d["method"] == "molf_e"]
    if molf.empty:
        return "claim 4: inconclusive — no MoLF runs in routing_dynamics.csv"

    def span(column, rows):
        return f"{rows[column].min():.2f}–{rows[column].max():.2f}"

    above_time = int((molf["agreement_10pct"] > molf["null_time_10pct"]).sum())
    above_both = int(((molf["agreement_10pct"] > molf["null_time_10pct"])
                      & (molf["agreement_10pct"] > molf["null_type_10pct"])).sum())
    n = len(molf)
    verdict = ("reproduced" if above_both == n else "not reproduced" if n - above_time > n / 2 else "inconclusive")
    text = (f"MoLF ({n} runs: {', '.join(sorted(set(molf['task'])))}): agreement with the final routing at 10% of "
            f"training {span('agreement_10pct', molf)} vs the time-shuffled null {span('null_time_10pct', molf)} "
            f"and the module-type null {span('null_type_10pct', molf)}; above the time-shuffled null in "
            f"{above_time} of {n} runs, above both in {above_both} (rule: every run above both)")
    if not apart.empty:
        share = apart["win_share"]
        text += (f"; MoLF-E apart, not judged: its {apart['expert'].iloc[0]} expert wins "
                 f"{100 * share.min():.1f}–{100 * share.max():.1f}% of decisions (the r = 16 expert the rest: "
                 f"equal alphas give it the larger rsLoRA scale), agreement at 10% {span('agreement_10pct', apart)}")
    return f"claim 4: {verdict} — {text}"


def claims_section(results: Path, table: str, ablations: str | None = None) -> str:
    """One line per paper claim (docs/evidence.md), each computed from the per-item test predictions:
    paired over the same items and seeds (molf.lab.stats.compare: exact McNemar for one seed of 0/1
    scores, else a paired bootstrap that resamples seeds and items; 95% bootstrap intervals;
    molf.lab.stats.verdict). The claims read the tasks of ``verdict_tasks`` (mcq and mcq2 cannot decide
    them). A claim of several parts is incomplete when a planned part has no runs (``_claim_line``),
    else reproduced when every part is, not reproduced when any part is not, inconclusive otherwise.
    Claim 4 is judged against two nulls (``claim4_line``)."""
    test = pd.read_csv(results / f"{table}.csv")
    present = set(test.task)
    planned = set(" ".join(test["tasks_planned"].dropna()).split()) if "tasks_planned" in test else set()
    judged = verdict_tasks(present, planned)

    def part(task, a, b, margin=None):
        if task not in present:  # planned, no test runs yet: the claim cannot be settled
            return "absent", f"{task}: no test runs yet"
        return _compare(test, results, table, task, a, b, margin)

    lines = []
    # (1) the better of FFT and LoRA flips with the task: FFT wins knowledge injection, LoRA the others
    lines.append(_claim_line(1, [part(t, "fft", "lora") if t == "fact" else part(t, "lora", "fft") for t in judged]))
    # (2) MoLF is better than, or within 1.5 points of, the better of FFT and LoRA on every task
    parts = []
    for t in judged:
        means = test[test.task == t].groupby("method")["test_score"].mean()
        lacking = [m for m in ("fft", "lora") if m not in means.index]
        if t in present and lacking:
            parts.append(("absent", f"{t}: no test runs of {' and '.join(lacking)}"))
        else:
            parts.append(part(t, "molf", means[["fft", "lora"]].idxmax() if not lacking else "fft", CLAIM_MARGIN))
    lines.append(_claim_line(2, parts, f" (non-inferiority: the 95% interval of the difference above "
                                       f"-{100 * CLAIM_MARGIN:g} points)"))
    # (3) MoLF-Efficient beats the adaptive LoRA methods (AdaLoRA, DoRA)
    lines.append(_claim_line(3, [part(t, "molf_e", other) for t in judged for other in ("adalora", "dora")]))
    # (4) routing specialises early: against the time-shuffled and module-type nulls
    dynamics = results / "routing_dynamics.csv"
    if dynamics.is_file():
        lines.append(claim4_line(pd.read_csv(dynamics)))
    else:
        lines.append("claim 4: inconclusive — no routing_dynamics.csv (run experiments/figures.py)")
    # (5) dense updating (top-k = all experts) is worse than routing
    name = ablations or ""
    if name and (results / f"{name}.csv").is_file():
        abl = pd.read_csv(results / f"{name}.csv")
        pairs = ROUTED_VS_DENSE.get(name, [])
        field = ABLATION_FIELD.get(name, "correct")
        parts = [_compare(abl, results, name, t, routed, dense, field=field) for routed, dense in pairs
                 for t in sorted(set(abl.task)) if {routed, dense} <= set(abl[abl.task == t].method)]
        on = f" (on the per-item {field.replace('_', ' ')})" if field != "correct" else ""
        lines.append(_claim_line(5, parts, on))
    else:
        lines.append("claim 5: inconclusive — no ablation table")
    return "\n".join(lines)


# The pre-registered fact confirmation (docs/evidence.md, "v3: fact, confirmed on fresh seeds"): the
# edit score, per comparison (name, claim, a, b, margin); b None: the better of FFT and LoRA there.
CONFIRMATION_FIELD = "edit_score"
CONFIRMATION_SEEDS = 5  # seeds 5-9; a table that records "seeds_planned" says so itself
CONFIRMATIONS = [("C1", 1, "fft", "lora", None), ("C2", 2, "molf", None, CLAIM_MARGIN),
                 ("C3", 3, "molf_e", "adalora", None), ("C3", 3, "molf_e", "dora", None)]


def _confirmation_part(test: pd.DataFrame, results: Path, table: str, a: str, b: str | None,
                       margin: float | None, seeds_needed: int | None) -> tuple[str, str, str]:
    """(verdict, text, b) of one pre-registered comparison on fact's edit score. ``seeds_needed``: the
    seeds each method must have (the confirmation's five) before the comparison gets a verdict; until
    then it is "incomplete (k of n seeds)", its numbers so far shown."""
    fact = test[test.task == "fact"]
    if b is None:  # the better of FFT and LoRA on this table's own seeds
        means = {}
        for m in ("fft", "lora"):
            try:
                xs, _, _ = paired_scores(fact, results, table, "fact", m, m, field=CONFIRMATION_FIELD)
                means[m] = sum(map(sum, xs)) / sum(map(len, xs))
            except (KeyError, NoPredictions):
                pass
        if len(means) < 2:
            lacking = " and ".join(m for m in ("fft", "lora") if m not in means)
            return f"incomplete (no test runs of {lacking})", f"fact: no test runs of {lacking}", "fft or lora"
        b = max(means, key=means.get)
    counts = {m: int(fact[fact.method == m].seed.nunique()) for m in (a, b)}
    verdict, text = _compare(fact, results, table, "fact", a, b, margin, field=CONFIRMATION_FIELD, provisional=False)
    if seeds_needed and min(counts.values()) < seeds_needed:
        have = ", ".join(f"{m} {k} of {seeds_needed} seeds" for m, k in counts.items())
        verdict = f"incomplete ({have})"
        text = text.rsplit(" → ", 1)[0] + " (so far)" if "→" in text else text
    elif verdict == "absent":
        verdict = f"incomplete ({text})"
    return verdict, text, b


def confirmation_lines(confirm: Path, explore_results: Path, explore_table: str) -> str:
    """The pre-registered fact confirmation: each comparison (CONFIRMATIONS) on the edit score, on the
    confirmation table's seeds alone (``confirm``: its CSV, e.g. results/v3/confirm_v3.csv, which the grid
    writes once a cell is done; a verdict only once both methods have every planned seed), beside the same comparison on the exploratory
    table's seeds (``explore_table`` under ``explore_results``: main_v2's seeds 0-4). C3's two parts
    give one verdict: reproduced when both are, not reproduced when either is not."""
    conf = pd.read_csv(confirm) if confirm.is_file() else pd.DataFrame(columns=["task", "method", "seed"])
    needed = int(conf["seeds_planned"].max()) if "seeds_planned" in conf else CONFIRMATION_SEEDS
    explore = pd.read_csv(explore_results / f"{explore_table}.csv")
    seeds = lambda t: ", ".join(map(str, sorted(set(t[t.task == "fact"].seed))))  # noqa: E731
    lines = [f"Primary metric: fact's {CONFIRMATION_FIELD.replace('_', ' ')}; confirmation seeds "
             f"{seeds(conf) or 'none yet'} ({confirm.parent.name}/{confirm.name}); exploratory seeds "
             f"{seeds(explore)} ({explore_results.name}/{explore_table}.csv)"]
    c3 = {}
    for name, claim, a, b, margin in CONFIRMATIONS:
        verdict, text, other = _confirmation_part(conf, confirm.parent, confirm.stem, a, b, margin, needed)
        _, explored, _ = _confirmation_part(explore, explore_results, explore_table, a, b, margin, None)
        kind = f"non-inferiority, margin -{100 * margin:g} points" if margin else "superiority"
        lines.append(f"{name} (claim {claim}, {a} vs {other}, {kind}): {verdict} — confirmation {text}; "
                     f"exploratory {explored}")
        if name == "C3":
            c3[other] = verdict
    if c3:
        verdicts = list(c3.values())
        both = ("reproduced" if all(v == "reproduced" for v in verdicts) else
                "not reproduced" if "not reproduced" in verdicts else
                "incomplete" if any(v.startswith("incomplete") for v in verdicts) else "inconclusive")
        lines.append(f"C3 (claim 3 on fact, both parts): {both}")
    return "\n".join(lines)


def retention_lines(results: Path, table: str, pairs=(("lora", "fft"),)) -> str:
    """Per task and pair (a, b): the two methods' mean retention (the share of retention-probe items
    still known after training), paired over the same probe items and seeds, with a paired bootstrap 95%
    interval of the difference. Descriptive (beyond the paper; "LoRA learns less and forgets less" is the
    known result for the default pair)."""
    test = pd.read_csv(results / f"{table}.csv")
    lines = []
    for task in sorted(set(test.task)):
        for a, b in pairs:
            try:
                xs, ys, seeds = paired_scores(test, results, table, task, a, b,
                                              file="retention_predictions.jsonl")
            except NoPredictions:
                lines.append(f"retention: {task} {a} vs {b}: no retention_predictions.jsonl")
                continue
            except KeyError as error:
                lines.append(f"retention: {str(error).strip(chr(39) + chr(34))}")
                continue
            c = stats.compare(xs, ys)
            side = f"{a} retains more" if c.low > 0 else f"{b} retains more" if c.high < 0 else "no difference shown"
            lines.append(f"retention: {task}: {c.line(a, b)}, {seeds} seeds → {side}"
                         + _so_far(test, task, (a, b), seeds))
    return "\n".join(lines)


# Per-item scores beside the primary one, compared like the claims (descriptive): on fact, efficacy
# on the trained edits saturates once the loss has flattened, and these still tell methods apart.
SECONDARY = {"fact": [("edit_score", "edit score (efficacy minus the neighbours' flip rate)"),
                      ("margin", "log P(new) - log P(true)"),
                      ("paraphrase_efficacy", "paraphrase efficacy")]}
SECONDARY_PAIRS = [("fft", "lora"), ("molf", "fft"), ("molf", "lora"), ("molf_e", "adalora"), ("molf_e", "dora")]


def ablation_pairs(name: str) -> list[tuple[str, str]]:
    """The ablation table's comparisons: routed vs dense, then (ablations_v2) MoLF-E with its embeddings
    and norms frozen vs trained densely, or (ablations_v3) MoLF-E with both experts at one rsLoRA scale vs
    the default equal alphas."""
    extra = ({"ablations_v2": [("molf_e_k1", "molf_e_train_embeddings")],
              "ablations_v3": [("molf_e_equal_scale", "molf_e_k1")]}).get(name, [])
    return ROUTED_VS_DENSE.get(name, []) + extra


def secondary_lines(results: Path, table: str, pairs=SECONDARY_PAIRS) -> str:
    """Per task with SECONDARY scores: each of ``pairs`` that ran, paired over the same items and
    seeds, paired bootstrap 95% interval of the difference, and which side it shows."""
    test = pd.read_csv(results / f"{table}.csv")
    lines = []
    for task in sorted(set(test.task) & set(SECONDARY)):
        for field, what in SECONDARY[task]:
            for a, b in pairs:
                try:
                    xs, ys, seeds = paired_scores(test, results, table, task, a, b, field=field)
                except (NoPredictions, KeyError):
                    continue
                c = stats.compare(xs, ys)
                side = f"{a} higher" if c.low > 0 else f"{b} higher" if c.high < 0 else "no difference shown"
                lines.append(f"{task} {what}: {c.line(a, b)}, {seeds} seeds → {side}"
                             + _so_far(test, task, (a, b), seeds))
    return "\n".join(lines)


def task_lines(results: Path, table: str) -> str:
    """Per task: does the best method (by mean test score) beat the best model-free rule
    (molf.lab.heuristics) on the same items? Each seed's run of that method paired item by item with
    the rule's answers (molf.lab.stats.compare: McNemar for one seed, else the bootstrap over seeds and
    items). "a task" needs p < 0.05 in its favour; otherwise the task cannot tell methods apart yet."""
    test = pd.read_csv(results / f"{table}.csv")
    lines = []
    for task in sorted(set(test.task)):
        rows = test[test.task == task]
        split = rows["test_split"].dropna().iloc[0] if "test_split" in rows and rows["test_split"].notna().any() \
            else "test"
        found = heuristics.best(task, tasks.load(task, split), tasks.load(task, "train"))
        if found is None:
            lines.append(f"{task}: no model-free rule applies (see molf.lab.heuristics)")
            continue
        rule, by_id = found
        rule_items = {json.dumps(k): v for k, v in by_id.items()}  # keyed like _predictions
        method = rows.groupby("method")["test_score"].mean().idxmax()
        try:
            runs = [_predictions(_run_folder(results, table, r)) for _, r in rows[rows.method == method].iterrows()]
        except NoPredictions:
            lines.append(f"{task}: {method} vs the best rule ({rule}): no per-item predictions")
            continue
        keys = [key for key in runs[0] if key in rule_items and all(key in run for run in runs)]
        xs = [[float(run[key]["correct"]) for key in keys] for run in runs]
        ys = [[float(rule_items[key]) for key in keys]] * len(runs)
        c = stats.compare(xs, ys)
        verdict = "a task" if stats.verdict(c) == "reproduced" else "not a task yet"
        lines.append(f"{task}: best method {c.line(method, repr(rule))}, "
                     f"{int(rows[rows.method == method].seed.nunique())} seeds → {verdict}")
    return "\n".join(lines)


def runs_table(test: pd.DataFrame) -> str:
    """Every test run: score, trainable parameters and how much the loss still fell in the last quarter
    (relative to its level there, and as a share of the run's whole decrease)."""
    lines = ["| task | method | seed | lr | score (test) | trainable params | last-quarter loss drop | "
             "share of the whole decrease |", "|---|---|---:|---:|---:|---:|---:|---:|"]

    def percent(r, column):
        return f"{100 * r[column]:.1f}%" if column in r and pd.notna(r[column]) else "?"

    for _, r in test.sort_values(["task", "method", "seed"]).iterrows():
        params = f"{r.trainable_params / 1e6:.1f}M" if "trainable_params" in r and pd.notna(r.trainable_params) else "?"
        lines.append(f"| {r.task} | {method_label(r.method)} | {int(r.seed)} | {r.lr:g} | {100 * r.test_score:.1f} | "
                     f"{params} | {percent(r, 'last_quarter_drop')} | {percent(r, 'last_quarter_share')} |")
    return "\n".join(lines)


README_BEGIN = "<!-- begin: experiments/report.py --brief -->"
README_END = "<!-- end: experiments/report.py --brief -->"


def brief(results: Path, table: str, ablations: str | None, confirm: Path | None = None) -> str:
    """The README's evidence block: the claims lines, the pre-registered fact confirmation (``confirm``:
    its CSV) when given, then the main table."""
    summary, test = pd.read_csv(results / f"{table}_summary.csv"), pd.read_csv(results / f"{table}.csv")
    text = claims_section(results, table, ablations) + "\n\n"
    if confirm is not None:
        text += "fact, pre-registered confirmation:\n\n" + confirmation_lines(confirm, results, table) + "\n\n"
    return text + main_table(summary, test)


def readme_block(text: str, path: Path) -> str:
    """``text`` between README_BEGIN and README_END of the file at ``path``; ValueError without them."""
    readme = path.read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block to write the report into")
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    return readme[:start] + "\n" + text + "\n" + readme[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--table", default="main", help="the main grid table's name (default: main)")
    parser.add_argument("--ablations", default="ablations", help="the ablation table's name (default: ablations)")
    parser.add_argument("--confirm", type=Path, default=None,
                        help="the pre-registered fact confirmation's CSV (results/v3/confirm_v3.csv): its "
                             "verdicts beside the same comparisons on --table's seeds")
    parser.add_argument("--brief", action="store_true", help="print only the claims lines and the main table")
    parser.add_argument("--readme", type=Path, default=None,
                        help="with --brief: write them between the report markers of this file (README.md)")
    args = parser.parse_args(argv)
    r, table, ablations = args.results, args.table, args.ablations
    if args.readme and not args.brief:
        parser.error("--readme goes with --brief")
    if args.brief:
        text = brief(r, table, ablations, args.confirm)
        if args.readme:
            args.readme.write_text(readme_block(text, args.readme))
        print(text)
        return 0
    printed = False
    if (r / f"{table}_summary.csv").is_file():
        print(f"### Main table ({r.name}/{table}_summary.csv)\n")
        test = pd.read_csv(r / f"{table}.csv")
        print(main_table(pd.read_csv(r / f"{table}_summary.csv"), test), "\n")
        print(f"### Claims ({r.name}/{table}.csv: paired over the same items and seeds)\n")
        print(claims_section(r, table, ablations), "\n")
        if args.confirm is not None:
            print("### fact, confirmed on fresh seeds (pre-registered: docs/evidence.md)\n")
            print(confirmation_lines(args.confirm, r, table), "\n")
        print(f"### Tasks: the best method against the best model-free rule ({r.name}/{table}.csv)\n")
        print(task_lines(r, table), "\n")
        secondary = secondary_lines(r, table)
        if secondary:
            print(f"### Beyond the primary score ({r.name}/{table}.csv: paired over the same items and seeds)\n")
            print(secondary, "\n")
        if "test_retention" in test:
            print(f"### Retention ({r.name}/{table}.csv: the retention probe, paired over the same items and seeds)\n")
            print(retention_lines(r, table), "\n")
        if "last_quarter_drop" in test:
            print(f"### Every test run ({r.name}/{table}.csv)\n")
            print(runs_table(test), "\n")
        printed = True
    if (r / f"{ablations}_summary.csv").is_file():
        print(f"### Ablations ({r.name}/{ablations}_summary.csv)\n")
        print(ablation_table(pd.read_csv(r / f"{ablations}_summary.csv")), "\n")
        secondary = secondary_lines(r, ablations, ablation_pairs(ablations))
        if secondary:
            print(f"### Ablations beyond the primary score ({r.name}/{ablations}.csv: paired over the same items "
                  f"and seeds)\n")
            print(secondary, "\n")
        if "test_retention" in pd.read_csv(r / f"{ablations}.csv"):
            print(f"### Ablations' retention ({r.name}/{ablations}.csv: the retention probe, paired over the same "
                  f"items and seeds)\n")
            print(retention_lines(r, ablations, ablation_pairs(ablations)), "\n")
        printed = True
    if (r / "routing_dynamics.csv").is_file():
        print(f"### Routing dynamics ({r.name}/routing_dynamics.csv)\n")
        dynamics = pd.read_csv(r / "routing_dynamics.csv")
        print(dynamics_table(dynamics), "\n")
        print(f"### Win share per module type, % of steps, min–max over seeds ({r.name}/routing_dynamics.csv)\n")
        print(module_type_table(dynamics), "\n")
        printed = True
    if not printed:
        raise FileNotFoundError(f"no result CSVs under {r}: run experiments/grid.py first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
