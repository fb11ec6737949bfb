"""Run one results table of the small-scale reproduction (issue 7) and write its CSVs.

    python experiments/grid.py experiments/main.json            # train what is missing, then report
    python experiments/grid.py experiments/main.json --tasks fact --budget-min 60
    python experiments/grid.py experiments/main.json --report   # only aggregate what exists

Protocol (the paper's, scaled down): every (task, method, lr, seed) cell trains with the same data,
schedule and batch and is evaluated on the task's *validation* split; per (task, method) the lr with
the best mean validation score is picked, and only those runs are evaluated on the *test* split.
Runs live in results/runs/<table>/...; each is resumable (molf.train.run), so a table can be filled
across sessions: rerun the same command. Outputs:
    results/<table>_validation.csv   every finished cell, validation metrics
    results/<table>.csv              test metrics of the selected lr per (task, method, seed)
    results/<table>_summary.csv      mean and std over seeds per (task, method), test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from molf import tasks  # noqa: E402
from molf.train import TrainConfig, run  # noqa: E402

LR_FIELD = {"fft": "lr", "lora": "lr", "dora": "lr", "adalora": "lr"}  # molf/molf_e sweep lr_fft & lr_lora


def cells(spec: dict, only_tasks=None):
    """Every (task, method label, lr, seed, TrainConfig kwargs) of a table spec."""
    # Order: every method's first lr, then every method's second lr, ..., so a partly filled table
    # already compares all methods (each at its first-listed, paper-default lr).
    n_lrs = max(len(m["lrs"]) for m in spec["methods"].values())
    for task in spec["tasks"]:
        if only_tasks and task not in only_tasks:
            continue
        for seed in spec["seeds"]:
            for lr_index in range(n_lrs):
                for label, m in spec["methods"].items():
                    if lr_index >= len(m["lrs"]):
                        continue
                    lr = m["lrs"][lr_index]
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
                    yield task, label, method, lr, seed, kw


def config_for(spec, table, task, label, method, lr, seed, kw) -> TrainConfig:
    return TrainConfig(
        model=spec["model"], task=task, method=method, steps=spec["steps"], batch_size=spec["batch_size"],
        grad_accum=spec.get("grad_accum", 1), seq_len=spec["seq_len"], schedule=spec.get("schedule", "cosine"),
        warmup_ratio=spec.get("warmup_ratio", 0.1), seed=seed, eval_split="validation",
        eval_limit=spec["eval_limit"], out_dir=str(ROOT / "results" / "runs" / table / task / label / f"lr{lr:g}_s{seed}"),
        save_every=spec.get("save_every", 20), save_model=True, progress=spec.get("progress", True),
        device=spec.get("device", "cpu"), dtype=spec.get("dtype", "float32"), **kw)


def test_metrics(run_dir: Path, task: str, limit) -> dict:
    """Evaluate a finished run's saved (merged) model on the test split, cached in test_metrics.json."""
    cache = run_dir / "test_metrics.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    metrics = tasks.evaluate(task, model, tokenizer, tasks.load(task, "test", limit=limit))
    cache.write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--tasks", nargs="*", help="only these tasks")
    parser.add_argument("--budget-min", type=float, default=None, help="stop starting new cells after this")
    parser.add_argument("--report", action="store_true", help="aggregate only, train nothing")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    table = args.spec.stem
    started = time.time()

    rows = []
    for task, label, method, lr, seed, kw in cells(spec, args.tasks):
        config = config_for(spec, table, task, label, method, lr, seed, kw)
        out = Path(config.out_dir)
        if not args.report and not (out / "metrics.json").is_file():
            if args.budget_min is not None and time.time() - started > 60 * args.budget_min:
                print(f"budget reached; rerun the same command to continue", flush=True)
                break
            print(f"[{table}] {task} {label} lr={lr:g} seed={seed}", flush=True)
            run(config)
        if (out / "metrics.json").is_file():
            m = json.loads((out / "metrics.json").read_text())
            rows.append({"task": task, "method": label, "lr": lr, "seed": seed, "dir": str(out.relative_to(ROOT)),
                         "val_score": m["metrics"][m["primary_metric"]], "primary_metric": m["primary_metric"],
                         "final_loss": m["final_loss"], "train_time_s": m["train_time_s"],
                         "trainable_params": m["trainable_params"]})
    if not rows:
        print("no finished cells yet")
        return 0
    (ROOT / "results").mkdir(exist_ok=True)
    val = pd.DataFrame(rows)
    val.to_csv(ROOT / "results" / f"{table}_validation.csv", index=False)

    # lr selection on validation (mean over the seeds that finished), then test for the chosen lr
    chosen = (val.groupby(["task", "method", "lr"])["val_score"].mean().reset_index()
              .sort_values(["task", "method", "val_score", "lr"], ascending=[True, True, False, True])
              .groupby(["task", "method"]).head(1))
    test_rows = []
    for _, c in chosen.iterrows():
        for _, r in val[(val.task == c.task) & (val.method == c.method) & (val.lr == c.lr)].iterrows():
            metrics = test_metrics(ROOT / r.dir, r.task, spec.get("test_limit"))
            test_rows.append({"task": r.task, "method": r.method, "lr": r.lr, "seed": r.seed,
                              "test_score": metrics[r.primary_metric], "val_score": r.val_score,
                              **{f"test_{k}": v for k, v in metrics.items() if k != r.primary_metric}})
    test = pd.DataFrame(test_rows)
    test.to_csv(ROOT / "results" / f"{table}.csv", index=False)
    summary = (test.groupby(["task", "method"])["test_score"]
               .agg(mean="mean", std=lambda s: s.std(ddof=1) if len(s) > 1 else float("nan"), seeds="count")
               .reset_index())
    summary.to_csv(ROOT / "results" / f"{table}_summary.csv", index=False)
    print(summary.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
