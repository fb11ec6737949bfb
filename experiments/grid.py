"""Run one results table of the small-scale reproduction (issue 7) and write its CSVs.

    python experiments/grid.py experiments/main.json            # train what is missing, then report
    python experiments/grid.py experiments/main.json --tasks fact --budget-min 60
    python experiments/grid.py experiments/main.json --report   # only aggregate what exists

Protocol (the paper's, scaled down): every (task, method, lr, seed) cell trains with the same data,
schedule and batch and is evaluated on the task's *validation* split; per (task, method) the lr with
the best mean validation score is picked, and only those runs are evaluated on the *test* split.
Runs live in results/runs/<table>/...; each is resumable (molf.lab.train.run), so a table can be filled
across sessions: rerun the same command. Outputs:
    results/<table>_validation.csv   every finished cell, validation metrics
    results/<table>.csv              test metrics of the selected lr per (task, method, seed)
    results/<table>_summary.csv      mean and std over seeds per (task, method), test
Routed runs (molf, molf_e) also get updated_<expert> columns: the share of (module, step) decisions in
which that expert was updated (from the win counts in metrics.json; the summary averages the seeds).

Seeds: the lr sweep runs on the spec's "select_seeds" (default: its first seed); once a (task, method)
sweep is complete, the other "seeds" run at the picked lr only (the paper's protocol at a third of the
cost). Merged models are deleted once their test score is cached or they can no longer be picked
(--keep-models keeps them).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from molf.lab import analysis, tasks  # noqa: E402
from molf.lab.train import TrainConfig, run  # noqa: E402

LR_FIELD = {"fft": "lr", "lora": "lr", "dora": "lr", "adalora": "lr"}  # molf/molf_e sweep lr_fft & lr_lora


def _cell(task, label, m, lr, seed):
    kw = {k: v for k, v in m.items() if k not in ("lrs", "method")}
    method = m.get("method", label)
    if method in LR_FIELD:
        kw["lr"] = lr
    else:
        kw["lr_fft"] = lr * m.get("fft_lr_ratio", 1.0)
        kw["lr_lora"] = lr
    kw.pop("fft_lr_ratio", None)
    for key in ("ranks", "alphas"):
        if key in kw:
            kw[key] = tuple(kw[key])
    return task, label, method, lr, seed, kw


def select_seeds(spec: dict) -> list:
    """The seeds the lr sweep runs on (default: the first seed); the other seeds run the picked lr only."""
    chosen = spec.get("select_seeds", spec["seeds"][:1])
    bad = [s for s in chosen if s not in spec["seeds"]]
    if bad:
        raise ValueError(f"select_seeds {bad} are not in seeds {spec['seeds']}")
    return chosen


def sweep_cells(spec: dict):
    """The lr-sweep cells: every (task, method label, lr, selection seed, TrainConfig kwargs)."""
    # Order: every method's first lr, then every method's second lr, ..., so a partly filled table
    # already compares all methods (each at its first-listed, paper-default lr).
    n_lrs = max(len(m["lrs"]) for m in spec["methods"].values())
    for task in spec["tasks"]:
        for seed in select_seeds(spec):
            for lr_index in range(n_lrs):
                for label, m in spec["methods"].items():
                    if lr_index < len(m["lrs"]):
                        yield _cell(task, label, m, m["lrs"][lr_index], seed)


def seed_cells(spec: dict, picked: dict):
    """The extra-seed cells: each (task, method) at its picked lr, for the seeds not used to pick it."""
    extra = [s for s in spec["seeds"] if s not in select_seeds(spec)]
    for task in spec["tasks"]:
        for seed in extra:
            for label, m in spec["methods"].items():
                if (task, label) in picked:
                    yield _cell(task, label, m, picked[task, label], seed)


def config_for(spec, table, task, label, method, lr, seed, kw, results: Path) -> TrainConfig:
    return TrainConfig(
        model=spec["model"], task=task, method=method, steps=spec["steps"], batch_size=spec["batch_size"],
        grad_accum=spec.get("grad_accum", 1), seq_len=spec["seq_len"], schedule=spec.get("schedule", "cosine"),
        warmup_ratio=spec.get("warmup_ratio", 0.1), seed=seed, eval_split="validation",
        eval_limit=spec["eval_limit"], out_dir=str(results / "runs" / table / task / label / f"lr{lr:g}_s{seed}"),
        save_every=spec.get("save_every", 20), save_model=True, progress=spec.get("progress", True),
        device=spec.get("device", "cpu"), dtype=spec.get("dtype", "float32"), **kw)


def test_metrics(run_dir: Path, task: str, limit) -> dict:
    """Evaluate a finished run's saved (merged) model on the test split, cached in test_metrics.json."""
    cache = run_dir / "test_metrics.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"{run_dir} has no saved model to test (pruned?): delete {run_dir} and rerun "
                                f"the grid to train it again")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    metrics = tasks.evaluate(task, model, tokenizer, tasks.load(task, "test", limit=limit))
    cache.write_text(json.dumps(metrics, indent=2))
    return metrics


def update_shares(metrics: dict, topk: int | None) -> dict:
    """For a routed run: ``{"updated_<expert>": share}``, the share of (module, step) routing decisions
    in which the expert was updated (top-1: won), from metrics.json's win counts; ``{}`` otherwise.
    Each module's decisions are its wins divided by the top-k, so top-k = all experts gives 1.0."""
    wins = (metrics.get("routing") or {}).get("win_counts") or {}
    if not wins:
        return {}
    decisions = sum(sum(counts.values()) for counts in wins.values()) / (topk or 1)
    experts = sorted({e for counts in wins.values() for e in counts})
    return {f"updated_{e}": sum(counts.get(e, 0) for counts in wins.values()) / decisions for e in experts}


def finished_row(out: Path, results: Path, task, label, lr, seed, topk: int | None) -> dict | None:
    if not (out / "metrics.json").is_file():
        return None
    m = json.loads((out / "metrics.json").read_text())
    return {"task": task, "method": label, "lr": lr, "seed": seed, "dir": str(out.relative_to(results)),
            "val_score": analysis.primary_score(m), "primary_metric": m["primary_metric"],
            "final_loss": m["final_loss"], "train_time_s": m["train_time_s"],
            "trainable_params": m["trainable_params"], **update_shares(m, topk)}


def pick_lrs(sweep: pd.DataFrame, spec: dict) -> tuple[dict, set]:
    """(task, method) -> the lr with the best mean validation score over the selection seeds (ties go to
    the smaller lr), and the set of (task, method) whose sweep is complete (every lr x selection seed)."""
    picked, complete = {}, set()
    if sweep.empty:
        return picked, complete
    means = sweep.groupby(["task", "method", "lr"])["val_score"].agg(["mean", "count"]).reset_index()
    for (task, label), g in means.groupby(["task", "method"]):
        best = g.sort_values(["mean", "lr"], ascending=[False, True]).iloc[0]
        picked[task, label] = float(best.lr)
        lrs = spec["methods"][label]["lrs"]
        if len(g) == len(lrs) and (g["count"] == len(select_seeds(spec))).all():
            complete.add((task, label))
    return picked, complete


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--tasks", nargs="+", help="train only these tasks' cells (the CSVs still cover every "
                                                    "task's finished runs)")
    parser.add_argument("--budget-min", type=float, default=None, help="stop starting new cells after this")
    parser.add_argument("--report", action="store_true", help="aggregate only, train nothing")
    parser.add_argument("--sweep-only", action="store_true", help="run the lr sweep, not the extra seeds")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep every run's merged model (default: delete it once it cannot be picked or "
                             "its test score is cached; a SmolLM2 model is ~540 MB)")
    parser.add_argument("--results", type=Path, default=ROOT / "results",
                        help="where the CSVs and runs/ go (default: results/ of the repository)")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    results = args.results.resolve()
    table = args.spec.stem
    if args.tasks and set(args.tasks) - set(spec["tasks"]):
        raise ValueError(f"--tasks {sorted(set(args.tasks) - set(spec['tasks']))} not in {args.spec}'s tasks "
                         f"{spec['tasks']}")
    train_tasks = set(args.tasks or spec["tasks"])
    started = time.time()
    stopped = False  # the budget ran out: start no more cells, still collect the finished ones

    def visit(cell_list) -> list[dict]:
        nonlocal stopped
        rows = []
        for task, label, method, lr, seed, kw in cell_list:
            config = config_for(spec, table, task, label, method, lr, seed, kw, results)
            out = Path(config.out_dir)
            if not args.report and not stopped and task in train_tasks and not (out / "metrics.json").is_file():
                if args.budget_min is not None and time.time() - started >= 60 * args.budget_min:
                    print("budget reached; rerun the same command to continue", flush=True)
                    stopped = True
                else:
                    print(f"[{table}] {task} {label} lr={lr:g} seed={seed}", flush=True)
                    run(config)
            row = finished_row(out, results, task, label, lr, seed, config.topk)
            if row:
                rows.append(row)
        return rows

    sweep = pd.DataFrame(visit(list(sweep_cells(spec))))
    picked, complete = pick_lrs(sweep, spec)
    # extra seeds only where the sweep is complete, so the picked lr can no longer change
    ready = {} if args.sweep_only else {k: v for k, v in picked.items() if k in complete}
    extra = pd.DataFrame(visit(list(seed_cells(spec, ready))))
    if sweep.empty:
        print("no finished cells yet")
        return 0
    results.mkdir(parents=True, exist_ok=True)
    val = pd.concat([sweep, extra], ignore_index=True)
    val.to_csv(results / f"{table}_validation.csv", index=False)

    shares = [c for c in val.columns if c.startswith("updated_")]
    test_rows = []
    for (task, label), lr in sorted(picked.items()):
        for _, r in val[(val.task == task) & (val.method == label) & (val.lr == lr)].iterrows():
            metrics = test_metrics(results / r.dir, r.task, spec.get("test_limit"))
            test_rows.append({"task": r.task, "method": r.method, "lr": r.lr, "seed": r.seed,
                              "test_score": metrics[r.primary_metric], "val_score": r.val_score,
                              "sweep_complete": (task, label) in complete,
                              **{f"test_{k}": v for k, v in metrics.items() if k != r.primary_metric},
                              **{k: r[k] for k in shares if pd.notna(r[k])}})
    if not args.keep_models:
        for _, r in val.iterrows():
            run_dir = results / r.dir
            tested = (run_dir / "test_metrics.json").is_file()
            dropped = (r.task, r.method) in complete and r.lr != picked[r.task, r.method]
            if (tested or dropped) and (run_dir / "model").is_dir():
                shutil.rmtree(run_dir / "model")
    test = pd.DataFrame(test_rows)
    test.to_csv(results / f"{table}.csv", index=False)
    summary = (test.groupby(["task", "method"])
               .agg(lr=("lr", "first"), mean=("test_score", "mean"),
                    std=("test_score", lambda s: s.std(ddof=1) if len(s) > 1 else float("nan")),
                    seeds=("test_score", "count"), sweep_complete=("sweep_complete", "all"),
                    **{c: (c, "mean") for c in shares if c in test})
               .reset_index())
    summary.to_csv(results / f"{table}_summary.csv", index=False)
    print(summary.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
