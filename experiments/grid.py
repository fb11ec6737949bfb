"""Run one results table and write its CSVs.

    python -m experiments.grid experiments/main.json            # train what is missing, then report
    python -m experiments.grid experiments/main.json --tasks fact --budget-min 60
    python -m experiments.grid experiments/main.json --report   # only aggregate what exists
    python -m experiments.grid experiments/paper_table2.json --plan   # every cell and its estimated cost
    python -m experiments.grid experiments/main_v2.json --picks --select-metric fact=edit_score   # lr picks only
(from the repository root: ``-m`` imports this checkout's molf, whatever copy is installed.)

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

Parallel: several processes may run the same command at once, e.g. two of one thread each on a 2-core
machine (``OMP_NUM_THREADS=1``). A cell that another process is training or testing holds its run
directory's lock (molf.lab.train.RunLock); a process that reaches it says so and goes on to the next, so
the processes split the cells. A process does not wait: the extra seeds start only once a sweep is
complete, and each process's CSVs hold what had finished when it wrote them. When all have stopped, run
the command again (or --report) for the whole table.

Spec keys: "model" (one) or "models" (a list: every model is its own set of cells, the CSVs get a
"model" column and runs go to runs/<table>/<model>/...), "tasks", "methods" ({label: {"lrs": [...],
"method": ..., other TrainConfig options}}), "seeds", "select_seeds", "batch_size", "seq_len", "eval_limit",
"test_limit", and either "steps" or "epochs"; optional TrainConfig fields "grad_accum", "schedule",
"warmup_ratio", "source", "metric_variant", "dtype", "autocast", "gradient_checkpointing", "device",
"train_limit", "eval_batch_size", "save_every", "progress". Every CSV has a "metric_variant" column (ours
or the reference implementation's, molf.lab.tasks) and names its primary metric.
Further keys: "results" (the folder the CSVs and runs/ go to, relative to the repository; --results
wins), "test_split" ({task: split}: the split a task's test evaluation reads, e.g. {"fact": "train"} to
score every trained edit), "test_limit" (an int, or {task: int}), "cell_order" ("seed" or "method": cell_order()), "extend_sweep" (the edge rule: a
complete sweep whose picked lr is its largest or smallest gets one more lr a step further, the step
being the ratio of its two nearest lrs, at most this many times per (task, method); default 0), and per
method "alpha_rule": "match_lora_scale" (adalora: the lora_alpha that gives peft's AdaLoRA, which scales
by alpha / its initial rank, the initial scale alpha / sqrt(r) of LoRA here) and "runs_of":
"<table>/<label>" (the cells of this method are that table's runs of that label, trained once for
both: an ablation's baseline that is the main table's method at its picked lr), and "select_metric"
({task: metric}: the validation metric the lr is picked on, e.g. {"fact": "edit_score"}; default the
task's primary metric, which on fact saturates at 1.0). When a task's scored (test) split holds some of
its validation items (fact with "test_split" "train"), the lr picks are not held out: the grid says so
before it trains (scored_validation_items).
Every test evaluation writes test_predictions.jsonl (one record per item: id, prediction, correct, task
fields; molf.lab.tasks.evaluate(..., return_items=True)) beside test_metrics.json; the CSVs carry each
run's trainable_params, last_quarter_drop (how much the training loss still fell in the last quarter, relative
to its level there) and last_quarter_share (the share of the run's whole loss decrease made in that quarter).
It also scores the retention probe (molf.lab.retention: what the pretrained model knew that no task
trains): "retention" / "retention_n" in test_metrics.json (test_retention in the CSV, a retention mean
and std in the summary), one record per probe item in retention_predictions.jsonl.

--plan prints every cell, its number of steps and estimated time, and the total, training nothing; the
finished runs settle what they can (the picked lrs, the lrs the edge rule has added, the cells done).
A cell's step time is, in order of preference: "recorded" (the median step time of a run of the same
model, task and method in this table's results), "scaled from <task>" (that of the same model and method
on another task of the table, times the ratio of tokens per row: on main_v2 sql, the mcq2 step times
scaled so came out 15% (FFT) and 19% (LoRA) above the recorded ones), "measured" (a few training steps of the model and
method, timed on this machine, on random tokens of the expected length), or "flops" (parameters x
tokens per step x 6 for methods that train the base weights, x 4 for those that freeze them, divided by
a matrix-multiply rate measured on this machine, or --assume-tflops, times --utilisation). Training
time only: evaluation is not included.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from molf.lab import analysis, models, retention, runs, tasks
from molf.lab.train import RunDirectoryInUse, RunLock, TrainConfig, build, check_reusable, run

ROOT = Path(__file__).resolve().parent.parent

LR_FIELD = {"fft": "lr", "lora": "lr", "dora": "lr", "adalora": "lr"}  # molf/molf_e sweep lr_fft & lr_lora
# TrainConfig fields a spec may set for every cell (beside the required ones config_for reads).
OPTIONAL_FIELDS = {"grad_accum": 1, "schedule": "cosine", "warmup_ratio": 0.1, "save_every": 20, "progress": True,
                   "device": "cpu", "dtype": "float32", "source": "local", "metric_variant": "ours",
                   "autocast": False, "gradient_checkpointing": False, "train_limit": None, "eval_batch_size": 16}
# Training rows of the paper's datasets under our split rule (molf.lab.tasks.HUB_SPLITS), for --plan
# without a download: gretel 100,000 train rows less every 100th (before rows sqlite cannot run are
# skipped), MedMCQA 182,822 less every 100th, CounterFact's 21,919 records. A spec's "train_rows" wins.
HUB_TRAIN_ROWS = {"sql": 99_000, "mcq": 180_993, "fact": 21_919}
# Parameter counts of the paper's models (and a few of their class), for --plan when the model cannot
# be loaded here. A spec's "params" ({model: count}) wins.
KNOWN_PARAMS = {"google/gemma-3-1b-pt": 1.00e9, "Qwen/Qwen2.5-1.5B": 1.54e9, "Qwen/Qwen2.5-3B": 3.09e9,
                "meta-llama/Llama-3.2-1B": 1.24e9, "Qwen/Qwen2.5-0.5B": 0.49e9}
CELL_ORDERS = ("seed", "method")
FROZEN_BASE = ("lora", "dora", "adalora", "molf_e")  # no weight gradients of the base: ~4 N FLOPs per token


def spec_models(spec: dict) -> list[str]:
    """The spec's models: "models" (a list) or the one "model"."""
    if "models" in spec:
        if not spec["models"] or not all(isinstance(m, str) and m for m in spec["models"]):
            raise ValueError(f"spec 'models' must be a non-empty list of model names, got {spec['models']!r}")
        return list(spec["models"])
    return [spec["model"]]


def _model_slug(model: str) -> str:
    return model.replace("/", "--")


def lora_scale(rank: int, alpha: float | None = None) -> float:
    """The rsLoRA scale ``alpha / sqrt(r)`` of a LoRA expert of rank ``rank`` (alpha: molf.lab.train's LoRA
    default round(2 sqrt(r)) when None)."""
    alpha = float(round(2 * math.sqrt(rank))) if alpha is None else float(alpha)
    return alpha / math.sqrt(rank)


def adalora_alpha_matching_lora(rank: int) -> float:
    """The ``lora_alpha`` that gives peft's AdaLoRA (target rank ``rank``) LoRA's initial scale.

    peft's AdaLoRA ignores rsLoRA: it scales by ``lora_alpha / ranknum``, ranknum being its initial rank
    (molf.lab.train.build starts it at round(1.5 r)); LoRA of rank r here scales by ``alpha / sqrt(r)``."""
    return lora_scale(rank) * max(1, round(1.5 * rank))


ALPHA_RULES = ("match_lora_scale",)


def _cell(model, task, label, m, lr, seed):
    kw = {k: v for k, v in m.items() if k not in ("lrs", "method", "alpha_rule", "runs_of")}
    method = m.get("method", label)
    rule = m.get("alpha_rule")
    if rule is not None:
        if rule not in ALPHA_RULES or method != "adalora" or "alphas" in m:
            raise ValueError(f"method {label!r}: alpha_rule {rule!r} is for adalora without 'alphas' "
                             f"(rules: {ALPHA_RULES})")
        kw["alphas"] = [adalora_alpha_matching_lora(int(m.get("ranks", [32])[0]))]
    if method in LR_FIELD:
        kw["lr"] = lr
    else:
        kw["lr_fft"] = lr * m.get("fft_lr_ratio", 1.0)
        kw["lr_lora"] = lr
    kw.pop("fft_lr_ratio", None)
    for key in ("ranks", "alphas"):
        if key in kw:
            kw[key] = tuple(kw[key])
    return model, task, label, method, lr, seed, kw


def select_seeds(spec: dict) -> list:
    """The seeds the lr sweep runs on (default: the first seed); the other seeds run the picked lr only."""
    chosen = spec.get("select_seeds", spec["seeds"][:1])
    bad = [s for s in chosen if s not in spec["seeds"]]
    if bad:
        raise ValueError(f"select_seeds {bad} are not in seeds {spec['seeds']}")
    return chosen


def sweep_lrs(spec: dict, model: str, task: str, label: str, extended: dict | None = None) -> list[float]:
    """The lrs swept for (model, task, method): the spec's, then any the edge rule added (``extended``)."""
    return list(spec["methods"][label]["lrs"]) + list((extended or {}).get((model, task, label), []))


def sweep_cells(spec: dict, extended: dict | None = None):
    """The lr-sweep cells: every (model, task, method label, method, lr, selection seed, TrainConfig kwargs);
    ``extended``: (model, task, label) -> lrs the edge rule added (``extend_sweeps``)."""
    # Order: every method's first lr, then every method's second lr, ..., so a partly filled table
    # already compares all methods (each at its first-listed, paper-default lr); "cell_order": "method":
    # every cell of a method (seed by seed, lr by lr) before the next method's.
    by_method = cell_order(spec) == "method"
    for model in spec_models(spec):
        for task in spec["tasks"]:
            lrs = {label: sweep_lrs(spec, model, task, label, extended) for label in spec["methods"]}
            if by_method:
                for label, m in spec["methods"].items():
                    for seed in select_seeds(spec):
                        for lr in lrs[label]:
                            yield _cell(model, task, label, m, lr, seed)
                continue
            n_lrs = max(map(len, lrs.values()))
            for seed in select_seeds(spec):
                for lr_index in range(n_lrs):
                    for label, m in spec["methods"].items():
                        if lr_index < len(lrs[label]):
                            yield _cell(model, task, label, m, lrs[label][lr_index], seed)


def cell_order(spec: dict) -> str:
    """The spec's "cell_order": "seed" (default: each seed's cells of every method, then the next seed's)
    or "method" (every cell of one method before the next: a table whose comparisons should complete
    one after another, e.g. a confirmation on fresh seeds stopped by its budget). The order holds within
    the sweep (the selection seeds) and within the extra seeds, which follow the sweep: a table of one lr
    per method that lists every seed as a selection seed runs method by method throughout."""
    order = spec.get("cell_order", "seed")
    if order not in CELL_ORDERS:
        raise ValueError(f"cell_order {order!r} is not one of {CELL_ORDERS}")
    return order


def picked_for_sure(spec: dict, model: str, task: str, label: str, extended: dict | None = None) -> bool:
    """Whether a sweep cell of (model, task, label) is its pick whatever the other cells score: the
    sweep has one lr and the edge rule cannot add another. Such a cell is tested as soon as it trains."""
    return len(sweep_lrs(spec, model, task, label, extended)) == 1 and int(spec.get("extend_sweep", 0)) == 0


def extend_sweeps(spec: dict, picked: dict, complete: set, extended: dict) -> bool:
    """The edge rule: a complete sweep whose picked lr is its largest (smallest) lr gets one more lr, a
    step further up (down), the step being the ratio of the two nearest lrs of the spec's list; at most
    the spec's "extend_sweep" times per (model, task, method) (default 0: off). Updates ``extended``;
    returns whether it added an lr."""
    limit = int(spec.get("extend_sweep", 0))
    added = False
    for key, lr in picked.items():
        if key not in complete or len(extended.get(key, [])) >= limit:
            continue
        lrs = sorted(sweep_lrs(spec, *key, extended))
        if len(lrs) < 2 or lr not in (lrs[0], lrs[-1]):
            continue
        if lr == lrs[-1]:
            new = lrs[-1] * lrs[-1] / lrs[-2]
        else:
            new = lrs[0] * lrs[0] / lrs[1]
        extended.setdefault(key, []).append(float(f"{new:.6g}"))
        added = True
    return added


def seed_cells(spec: dict, picked: dict):
    """The extra-seed cells: each (model, task, method) at its picked lr (``picked``: (model, task, label)
    -> lr), for the seeds not used to pick it."""
    extra = [s for s in spec["seeds"] if s not in select_seeds(spec)]
    labels = list(spec["methods"])
    order = ([(label, seed) for label in labels for seed in extra] if cell_order(spec) == "method"
             else [(label, seed) for seed in extra for label in labels])
    for model in spec_models(spec):
        for task in spec["tasks"]:
            for label, seed in order:
                if (model, task, label) in picked:
                    yield _cell(model, task, label, spec["methods"][label], picked[model, task, label], seed)


def run_dir(spec, table, model, task, label, lr, seed, results: Path) -> Path:
    """runs/<table>/[<model>/]<task>/<label>/lr<lr>_s<seed>; a method with "runs_of": "<table>/<label>"
    shares that table's runs of that label (the runner refuses them unless their config is the same)."""
    shared = spec["methods"].get(label, {}).get("runs_of")
    if shared is not None:
        if not isinstance(shared, str) or shared.count("/") != 1 or not all(shared.split("/")):
            raise ValueError(f"method {label!r}: runs_of must be '<table>/<label>', got {shared!r}")
        table, label = shared.split("/")
    folder = results / "runs" / table
    if "models" in spec:
        folder = folder / _model_slug(model)
    return folder / task / label / f"lr{lr:g}_s{seed}"


def config_for(spec, table, model, task, label, method, lr, seed, kw, results: Path) -> TrainConfig:
    if ("steps" in spec) == ("epochs" in spec):
        raise ValueError("a spec gives exactly one of 'steps' and 'epochs'")
    optional = {k: spec.get(k, default) for k, default in OPTIONAL_FIELDS.items()}
    return TrainConfig(
        model=model, task=task, method=method, steps=spec.get("steps"), epochs=spec.get("epochs"),
        batch_size=spec["batch_size"], seq_len=spec["seq_len"], seed=seed, eval_split="validation",
        eval_limit=spec["eval_limit"], out_dir=str(run_dir(spec, table, model, task, label, lr, seed, results)),
        save_model=True, **optional, **kw)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# "train-validation": the trained rows less the validation ones (fact: every trained edit that the lr
# pick does not look at, so the picks are held out and the score keeps 163 of the 182 edits)
TEST_SPLITS = (*tasks.SPLITS, "train-validation")


def test_split(spec: dict, task: str) -> str:
    """The split a task's test evaluation reads: the spec's "test_split" ({task: split}), else "test"."""
    split = (spec or {}).get("test_split", {}).get(task, "test")
    if split not in TEST_SPLITS:
        raise ValueError(f"test_split {split!r} of task {task!r} is not one of {TEST_SPLITS}")
    return split


def _item_ids(rows) -> set[str]:
    return {str(tasks.item_id(r, i)) for i, r in enumerate(rows)}


def test_rows(spec: dict, task: str, limit=None) -> list[dict]:
    """The rows a task's test evaluation scores: its ``test_split``, the first ``limit`` of them."""
    spec = spec or {}
    split = test_split(spec, task)
    load = lambda name, n=None: tasks.load(task, name, source=spec.get("source", "local"), limit=n,
                                           variant=spec.get("metric_variant", "ours"))
    if split != "train-validation":
        return load(split, limit)
    held = _item_ids(load("validation"))
    rows = [r for i, r in enumerate(load("train")) if str(tasks.item_id(r, i)) not in held]
    return rows[:limit] if limit else rows


def test_limit(spec: dict, task: str, limit):
    """A test row limit: an int (every task) or {task: int}; None: every row."""
    return limit.get(task) if isinstance(limit, dict) else limit


def test_metrics(run_dir: Path, task: str, limit, spec: dict | None = None) -> dict:
    """Evaluate a finished run's saved (merged) model on the test split (the spec's "test_split" of the
    task), cached in test_metrics.json, with one record per item in test_predictions.jsonl beside it
    (on the spec's device, with its data source and metric variant). A cached score without predictions
    (an older run) is evaluated again when its model is still there, else returned as it is.
    The same model is also scored on the retention probe (molf.lab.retention): "retention" and
    "retention_n" in test_metrics.json, one record per probe item in retention_predictions.jsonl. A
    cached score without "retention" gets it added when its model is still there (the task metrics are
    not recomputed), else is returned as it is."""
    if (metrics := _cached_test_metrics(run_dir)) is not None:
        return metrics
    with RunLock(run_dir):  # one tester at a time: another grid process gets RunDirectoryInUse
        return _evaluate_test(run_dir, task, limit, spec)


def _cached_test_metrics(run_dir: Path) -> dict | None:
    """The cached test score when nothing is left to evaluate for it, else None."""
    cache, predictions = run_dir / "test_metrics.json", run_dir / "test_predictions.jsonl"
    has_model = (run_dir / "model").is_dir()
    if cache.is_file() and (predictions.is_file() or not has_model):
        metrics = json.loads(cache.read_text())
        if "retention" in metrics or not has_model:
            return metrics
    return None


def _evaluate_test(run_dir: Path, task: str, limit, spec: dict | None) -> dict:
    """``test_metrics``' evaluation, under the run directory's lock."""
    if (metrics := _cached_test_metrics(run_dir)) is not None:  # tested meanwhile by another process
        return metrics
    cache, predictions = run_dir / "test_metrics.json", run_dir / "test_predictions.jsonl"
    if cache.is_file() and predictions.is_file():  # a score without retention, its model still there: add it
        metrics = json.loads(cache.read_text())
        model, tokenizer = _load_tested_model(run_dir, spec or {})
        metrics.update(_retention(run_dir, model, tokenizer, spec or {}))
        cache.write_text(json.dumps(metrics, indent=2))
        return metrics
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"{run_dir} has no saved model to test (pruned?): delete {run_dir} and rerun "
                                f"the grid to train it again")
    spec = spec or {}
    variant = spec.get("metric_variant", "ours")
    model, tokenizer = _load_tested_model(run_dir, spec)
    split = test_split(spec, task)
    rows = test_rows(spec, task, test_limit(spec, task, limit))
    metrics, items = tasks.evaluate(task, model, tokenizer, rows, batch_size=spec.get("eval_batch_size", 16),
                                    variant=variant, return_items=True)
    predictions.write_text("".join(json.dumps(item) + "\n" for item in items))
    if split != "test":
        metrics["split"] = split
    metrics.update(_retention(run_dir, model, tokenizer, spec))
    cache.write_text(json.dumps(metrics, indent=2))  # written last: a cached score has its predictions
    return metrics


def _load_tested_model(run_dir: Path, spec: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
    model.to(_device(spec.get("device", "cpu")))
    return model, AutoTokenizer.from_pretrained(run_dir / "model")


def _retention(run_dir: Path, model, tokenizer, spec: dict) -> dict:
    """Score the model on the retention probe; write retention_predictions.jsonl; return the two keys."""
    metrics, items = retention.evaluate(model, tokenizer, retention.load(),
                                        batch_size=spec.get("eval_batch_size", 16), return_items=True)
    (run_dir / "retention_predictions.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return {"retention": metrics["retention"], "retention_n": metrics["n"]}


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


def smoothed_losses(losses) -> tuple[float, float, float] | None:
    """The training loss at the start, at 3/4 and at the end of a run, each the mean of a window of
    max(1, steps // 10) steps (the first window; the one ending at 3/4; the last). None under 4 steps."""
    losses = [float(x) for x in losses]
    if len(losses) < 4:
        return None
    window = max(1, len(losses) // 10)
    three_quarters = (3 * len(losses)) // 4
    return (statistics.fmean(losses[:window]),
            statistics.fmean(losses[max(0, three_quarters - window):three_quarters]),
            statistics.fmean(losses[-window:]))


def last_quarter_drop(losses) -> float | None:
    """How much the training loss still fell in the last quarter of training, relative to where the
    quarter began: ``(L(3/4) - L(1)) / L(3/4)`` (smoothed, ``smoothed_losses``). Near 0: the loss has
    flattened. Unstable once the loss is near 0 (a memorised training set): see last_quarter_share."""
    windows = smoothed_losses(losses)
    if windows is None:
        return None
    _, start, end = windows
    return (start - end) / start if start else None


def last_quarter_share(losses) -> float | None:
    """The share of the run's whole loss decrease that came in its last quarter:
    ``(L(3/4) - L(1)) / (L(0) - L(1))`` (smoothed, ``smoothed_losses``); scale-free, so it stays
    meaningful when the loss ends near 0. Near 0: flattened. None when the loss did not decrease."""
    windows = smoothed_losses(losses)
    if windows is None:
        return None
    first, start, end = windows
    return (start - end) / (first - end) if first > end else None


TIEBREAK_METRIC = "logprob_margin"  # breaks ties of the validation score when picking an lr (pick_lrs)


def select_metric(spec: dict, task: str) -> str | None:
    """The validation metric ``task``'s lr is picked on: the spec's "select_metric" ({task: metric}), else
    None (the run's primary metric)."""
    chosen = (spec or {}).get("select_metric", {})
    if not isinstance(chosen, dict):
        raise ValueError(f"select_metric must map a task to a metric name, e.g. {{\"fact\": \"edit_score\"}}; "
                         f"got {chosen!r}")
    if set(chosen) - set(spec.get("tasks", ())):
        raise ValueError(f"select_metric names tasks {sorted(set(chosen) - set(spec.get('tasks', ())))} that are "
                         f"not in the spec's tasks {spec.get('tasks')}")
    metric = chosen.get(task)
    if metric is not None and not isinstance(metric, str):
        raise ValueError(f"select_metric of task {task!r} must be a metric name (a string), got {metric!r}")
    return metric


def validation_score(metrics: dict, metric: str | None, where: Path) -> float:
    """A finished run's score to pick its lr on: ``metric`` from its validation metrics, else its primary."""
    if metric is None:
        return analysis.primary_score(metrics)
    if metric not in metrics["metrics"]:
        raise ValueError(f"{where}: select_metric {metric!r} is not one of this run's validation metrics "
                         f"{sorted(metrics['metrics'])}")
    return float(metrics["metrics"][metric])


def scored_validation_items(spec: dict, task: str) -> int:
    """How many of ``task``'s validation items its test evaluation also scores (ids in both the validation
    split and the spec's test split): more than 0 means the lr picks are not held out from the score."""
    if spec.get("source", "local") != "local":
        return 0  # the hub rules: fact's validation is a subset of "train" as well; not counted offline
    validation = tasks.load(task, "validation", variant=spec.get("metric_variant", "ours"))
    return len(_item_ids(validation) & _item_ids(test_rows(spec, task)))


def finished_row(out: Path, results: Path, model, task, label, lr, seed, topk: int | None,
                 metric: str | None = None) -> dict | None:
    if not (out / "metrics.json").is_file():
        return None
    m = json.loads((out / "metrics.json").read_text())
    return {"model": model, "task": task, "method": label, "lr": lr, "seed": seed,
            "dir": str(out.relative_to(results)), "val_score": validation_score(m, metric, out),
            "val_metric": metric or m["primary_metric"],
            "val_tiebreak": m["metrics"].get(TIEBREAK_METRIC, float("nan")),
            "primary_metric": m["primary_metric"], "metric_variant": m.get("metric_variant", "ours"),
            "final_loss": m["final_loss"], "train_time_s": m["train_time_s"],
            "trainable_params": m["trainable_params"], **_loss_flattening(out), **update_shares(m, topk)}


def _loss_flattening(out: Path) -> dict:
    steps = out / "steps.csv"
    losses = pd.read_csv(steps)["loss"].tolist() if steps.is_file() else []
    return {"last_quarter_drop": last_quarter_drop(losses), "last_quarter_share": last_quarter_share(losses)}


def _sample_std(values: pd.Series) -> float:
    """The sample standard deviation over seeds (NaN for a single seed)."""
    return values.std(ddof=1) if len(values) > 1 else float("nan")


def pick_lrs(sweep: pd.DataFrame, spec: dict, extended: dict | None = None) -> tuple[dict, set]:
    """(model, task, method) -> the lr with the best mean validation score over the selection seeds, and
    the set of (model, task, method) whose sweep is complete (every lr x selection seed).

    Ties on the score go to the larger mean ``TIEBREAK_METRIC`` where the task records it (fact's
    efficacy on a few validation edits is often 1.0 at every lr; the log-prob margin still says which lr
    learned the edits more firmly), then to the smaller lr."""
    picked, complete = {}, set()
    if sweep.empty:
        return picked, complete
    means = (sweep.groupby(["model", "task", "method", "lr"])
             .agg(mean=("val_score", "mean"), count=("val_score", "count"), tiebreak=("val_tiebreak", "mean"))
             .reset_index())
    for (model, task, label), g in means.groupby(["model", "task", "method"]):
        lrs = sweep_lrs(spec, model, task, label, extended)
        g = g[g.lr.isin(lrs)]
        best = g.sort_values(["mean", "tiebreak", "lr"], ascending=[False, False, True], na_position="last").iloc[0]
        picked[model, task, label] = float(best.lr)
        if len(g) == len(lrs) and (g["count"] == len(select_seeds(spec))).all():
            complete.add((model, task, label))
    return picked, complete


# ------------------------------------------------------------------------------------------- --plan

def _train_rows(spec: dict, task: str) -> tuple[int, str]:
    """How many rows a cell of ``task`` trains on, and where the number comes from."""
    if task in spec.get("train_rows", {}):
        rows, basis = int(spec["train_rows"][task]), "spec train_rows"
    elif spec.get("source", "local") == "local":
        rows, basis = len(tasks.load(task, "train", variant=spec.get("metric_variant", "ours"))), "local rows"
    else:
        rows, basis = HUB_TRAIN_ROWS[task], "upstream size"
    limit = spec.get("train_limit")
    return (min(rows, limit) if limit else rows), basis


def cell_steps(spec: dict, rows: int) -> int:
    """Optimizer steps of a cell: the spec's steps, or epochs x rows / effective batch (as the runner)."""
    if "steps" in spec:
        return int(spec["steps"])
    per_step = spec["batch_size"] * spec.get("grad_accum", 1)
    return max(1, math.ceil(spec["epochs"] * rows / per_step))


def _loadable_here(model: str) -> bool:
    """Whether ``model`` loads without a network: an alias of molf.lab.models, a folder, or in the hub cache."""
    if model.lower() in models.ALIASES or Path(model).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # any failure means: not here
        return False


def _tokens_per_row(spec: dict, model: str, task: str, cache: dict) -> tuple[float, str]:
    """Mean tokens of one training row (capped at seq_len) and how it was obtained."""
    if task in spec.get("tokens_per_row", {}):
        return float(spec["tokens_per_row"][task]), "spec"
    if spec.get("source", "local") != "local":
        return float(spec["seq_len"]), "seq_len cap"
    key = (model if _loadable_here(model) else "smollm2-135m", task)
    if key not in cache:
        tokenizer = models.load_tokenizer(key[0])
        rows = tasks.load(task, "train", limit=2000, variant=spec.get("metric_variant", "ours"))
        features = tasks.encode(task, rows, tokenizer, max_len=spec["seq_len"])
        cache[key] = sum(len(f["input_ids"]) for f in features) / len(features)
    return cache[key], "local rows" + ("" if key[0] == model else " (SmolLM2 tokenizer)")


def param_count(spec: dict, model: str) -> float | None:
    """Parameters of ``model``: the spec's "params", KNOWN_PARAMS, or counted from its config (no weights)."""
    if model in spec.get("params", {}):
        return float(spec["params"][model])
    if model in KNOWN_PARAMS:
        return KNOWN_PARAMS[model]
    if not _loadable_here(model):
        return None
    from transformers import AutoConfig, AutoModelForCausalLM
    key = models.ALIASES.get(model.lower())
    if key == "tiny":
        config = models.tiny_config(len(models.load_tokenizer("tiny")))
    else:
        config = AutoConfig.from_pretrained(models.smollm2_path() if key else model)
    with torch.device("meta"):
        return float(sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()))


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """A square matrix multiply's rate on ``device`` in ``dtype``, TFLOP/s (the best of a few)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = math.inf
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - began)
    return 2 * n ** 3 / best / 1e12


def measure_step(spec: dict, model_name: str, method: str, kw: dict, tokens: int, device: torch.device,
                 n_steps: int) -> float:
    """Median seconds of ``n_steps`` optimizer steps (after one warm-up step) of ``method`` on
    ``model_name``: the spec's batch, accumulation, dtype, autocast and checkpointing, random tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(model=model_name, method=method, steps=100, batch_size=spec["batch_size"],
                             grad_accum=spec.get("grad_accum", 1), seq_len=spec["seq_len"], out_dir=tmp,
                             dtype=spec.get("dtype", "float32"), **kw).resolved()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    model, _ = models.load(model_name, dtype=dtype, device=device)
    if spec.get("gradient_checkpointing"):
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, optimizer = build(config, model, 100)
    model.to(device).train()
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(n_steps + 1):
        began = time.perf_counter()
        for _ in range(config.grad_accum):
            ids = torch.randint(0, model.config.vocab_size, (config.batch_size, tokens), generator=generator)
            ids = ids.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(spec.get("autocast"))):
                loss = model(input_ids=ids, labels=ids).loss / config.grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    del model, optimizer
    return statistics.median(times[1:])


def _recorded_step_time(folder: Path) -> float | None:
    """The median step time of the runs under ``folder`` (one model, task and method; any lr or seed)."""
    found = []
    for metrics in folder.glob("*/metrics.json"):
        value = json.loads(metrics.read_text()).get("step_time_s")
        if value:
            found.append(float(value))
    if not found:
        for steps in folder.glob("*/steps.csv"):
            if not steps.stat().st_size:  # a run that has just started has not written its header yet
                continue
            times = pd.read_csv(steps)["step_time_s"].tolist()[1:]  # the first step warms up
            if times:
                found.append(statistics.median(times))
    return statistics.median(found) if found else None


def _scaled_step_time(spec: dict, table: str, results: Path, model: str, task: str, label: str,
                      tokens_row: float, token_cache: dict) -> tuple[float | None, str]:
    """The recorded step time of the same model and method on another task of the table, times the
    ratio of tokens per row (step time grows about linearly with tokens at these lengths); of several
    such tasks, the one nearest in tokens per row, where a step's fixed overhead distorts the ratio
    least. (None, "") when no other task has finished runs of this method."""
    best = None
    for other in spec["tasks"]:
        if other == task:
            continue
        recorded = _recorded_step_time(run_dir(spec, table, model, other, label, 1.0, 0, results).parent)
        if recorded is None:
            continue
        other_tokens, _ = _tokens_per_row(spec, model, other, token_cache)
        gap = abs(math.log(tokens_row / other_tokens))
        if best is None or gap < best[0]:
            best = (gap, recorded * tokens_row / other_tokens, other)
    return (None, "") if best is None else (best[1], f"scaled from {best[2]}")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours < 48 else f"{hours / 24:.1f} days"


def finished_picks(spec: dict, table: str, results: Path) -> tuple[dict, set, dict]:
    """(picked, complete, extended) as the grid finds them from the finished runs alone: the lr picks,
    the complete sweeps, the lrs the edge rule has added so far (the same loop as a run, training nothing)."""
    extended: dict = {}
    while True:
        rows = [finished_row(run_dir(spec, table, model, task, label, lr, seed, results), results, model, task,
                             label, lr, seed, kw.get("topk"), select_metric(spec, task))
                for model, task, label, _, lr, seed, kw in sweep_cells(spec, extended)]
        picked, complete = pick_lrs(pd.DataFrame([r for r in rows if r]), spec, extended)
        if not extend_sweeps(spec, picked, complete, extended):
            return picked, complete, extended


def print_picks(spec: dict, table: str, results: Path, only_tasks=None) -> None:
    """Print each (task, method)'s lr pick from the finished sweep runs alone, and on which metric
    (``only_tasks``: these tasks' picks only, as --tasks)."""
    picked, complete, extended = finished_picks(spec, table, results)
    picked = {k: v for k, v in picked.items() if only_tasks is None or k[1] in only_tasks}
    if not picked:
        print(f"no finished sweep runs of {table} under {results}")
        return
    for (model, task, label), lr in sorted(picked.items()):
        metric = select_metric(spec, task) or tasks.primary_metric(task, spec.get("metric_variant", "ours"))
        added = extended.get((model, task, label), [])
        state = ("complete" if (model, task, label) in complete
                 else "not complete" + (f" (the edge rule adds {', '.join(f'{x:g}' for x in added)})" if added else ""))
        where = f"{model} {task}" if "models" in spec else task
        print(f"{where:6s} {label:18s} lr {lr:<8g} picked on validation {metric}; sweep {state}")


def plan(spec: dict, table: str, results: Path, train_tasks: set, measure_steps: int = 2,
         assume_tflops: float | None = None, utilisation: float = 0.4) -> tuple[pd.DataFrame, dict]:
    """Every cell of the table (the sweep cells with the lrs the edge rule has added so far, then the
    extra seeds at the picked lr, or at "picked" while their sweep is open) with its steps, tokens per
    step, estimated seconds per step and where that comes from, and estimated time; and a dict
    describing the estimate. Trains nothing."""
    device = _device(spec.get("device", "cpu"))
    bf16 = spec.get("autocast") or spec.get("dtype") == "bfloat16"
    if assume_tflops:
        rate, rate_basis = assume_tflops, f"{assume_tflops:g} TFLOP/s assumed (--assume-tflops)"
    else:
        rate = matmul_tflops(device, torch.bfloat16 if bf16 else torch.float32)
        rate_basis = f"{rate:.3g} TFLOP/s measured ({'bf16' if bf16 else 'fp32'} matmul on {device})"
    picked, complete, extended = finished_picks(spec, table, results)
    # a seed cell's lr is known once its sweep is complete; until then it stands at the first lr, "picked"
    seed_lrs = {(m, t, label): picked[m, t, label] if (m, t, label) in complete else spec["methods"][label]["lrs"][0]
                for m in spec_models(spec) for t in spec["tasks"] for label in spec["methods"]}
    cells = [(c, False) for c in sweep_cells(spec, extended)]
    cells += [(c, c[:3] not in complete) for c in seed_cells(spec, seed_lrs)]
    rows, token_cache, measured, train_rows = [], {}, {}, {}
    for (model, task, label, method, lr, seed, kw), picked_later in cells:
        if task not in train_tasks:
            continue
        if task not in train_rows:
            train_rows[task] = _train_rows(spec, task)
        steps = cell_steps(spec, train_rows[task][0])
        tokens_row, tokens_basis = _tokens_per_row(spec, model, task, token_cache)
        tokens_step = tokens_row * spec["batch_size"] * spec.get("grad_accum", 1)
        folder = run_dir(spec, table, model, task, label, lr, seed, results)
        done = (folder / "metrics.json").is_file() and not picked_later
        step_s, basis = _recorded_step_time(folder.parent), "recorded"
        if step_s is None:
            step_s, basis = _scaled_step_time(spec, table, results, model, task, label, tokens_row, token_cache)
        if step_s is None and measure_steps > 0 and _loadable_here(model):
            key = (model, label, round(tokens_row))
            if key not in measured:
                measured[key] = measure_step(spec, model, method, kw, max(2, round(tokens_row)), device, measure_steps)
            step_s, basis = measured[key], f"measured on {device}"
        if step_s is None:
            n = param_count(spec, model)
            factor = (4 if method in FROZEN_BASE else 6) + (2 if spec.get("gradient_checkpointing") else 0)
            step_s = None if n is None else factor * n * tokens_step / (rate * 1e12 * utilisation)
            basis = "flops" if n is not None else "unknown model size"
        rows.append({"model": model, "task": task, "method": label, "lr": "picked" if picked_later else f"{lr:g}",
                     "seed": seed, "steps": steps, "tokens_per_step": round(tokens_step),
                     "s_per_step": step_s, "basis": basis,
                     "est_s": None if step_s is None else steps * step_s, "status": "done" if done else "to train",
                     "tokens_basis": tokens_basis})
    where = f"a device of {assume_tflops:g} TFLOP/s" if assume_tflops else str(device)
    info = {"device": where, "rate": rate_basis, "utilisation": utilisation, "train_rows": train_rows,
            "measured_device": str(device)}
    return pd.DataFrame(rows), info


def print_plan(spec: dict, table: str, results: Path, train_tasks: set, args) -> None:
    frame, info = plan(spec, table, results, train_tasks, args.measure_steps, args.assume_tflops, args.utilisation)
    if frame.empty:
        print(f"[plan] {table}: no cells")
        return
    shown = frame.drop(columns=["tokens_basis"] + ([] if "models" in spec else ["model"]))
    shown["s_per_step"] = shown["s_per_step"].map(lambda v: "unknown" if pd.isna(v) else f"{v:.3g}")
    shown["est_time"] = frame["est_s"].map(lambda v: _duration(None if pd.isna(v) else v))
    print(f"[plan] {table}: {len(frame)} cells on {info['device']}, trains nothing")
    print(shown.drop(columns=["est_s"]).to_string(index=False))
    todo = frame[frame.status == "to train"]
    total = 0.0 if todo.empty else (todo["est_s"].sum() if todo["est_s"].notna().all() else None)
    if "models" in spec:
        for model, g in todo.groupby("model", sort=False):
            print(f"  {model}: {len(g)} cells to train, {_duration(g['est_s'].sum(min_count=1))}")
    print(f"\ntotal: {len(frame)} cells, {len(frame) - len(todo)} done, {len(todo)} to train; "
          f"estimated training time of the cells to train: {_duration(total)} on {info['device']} "
          f"(evaluation not included)")
    for task, (rows, basis) in info["train_rows"].items():
        tokens = sorted(set(frame[frame.task == task]["tokens_basis"]))
        print(f"  {task}: {rows} training rows ({basis}); tokens per row from {', '.join(tokens)}")
    print("  s_per_step basis: recorded = median step time of finished runs of the same model/task/method; "
          "scaled from <task> = that of the same model/method on <task>, times the ratio of tokens per row; "
          "measured = timed training steps on random tokens here; flops = parameters x tokens per step x "
          f"(6 training the base, 4 frozen base, +2 with checkpointing) / ({info['rate']} x "
          f"{info['utilisation']:g} utilisation)")
    if info["measured_device"] == "cpu" and not args.assume_tflops and (frame.basis == "flops").any():
        print("  (measured on a CPU: for a GPU estimate pass --assume-tflops with its dense bf16 rate, e.g. 989 "
              "for an H100/H200, 312 for an A100)")


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
    parser.add_argument("--results", type=Path, default=None,
                        help="where the CSVs and runs/ go (default: the spec's \"results\" folder, relative to "
                             "the repository, else results/)")
    parser.add_argument("--plan", action="store_true",
                        help="train nothing: print every cell, its steps and estimated time, and the total")
    parser.add_argument("--measure-steps", type=int, default=2,
                        help="--plan: time this many training steps of each (model, method) that loads here "
                             "(after one warm-up step); 0: never load a model, estimate from FLOPs")
    parser.add_argument("--assume-tflops", type=float, default=None,
                        help="--plan: a FLOP estimate uses this device rate (TFLOP/s, e.g. a GPU's dense bf16 "
                             "peak) instead of a matrix multiply measured here")
    parser.add_argument("--utilisation", type=float, default=0.4,
                        help="--plan: the share of the FLOP rate a training step achieves (default 0.4)")
    parser.add_argument("--picks", action="store_true",
                        help="train nothing: print each (task, method)'s lr pick from the finished sweep runs")
    parser.add_argument("--select-metric", action="append", default=[], metavar="TASK=METRIC",
                        help="pick that task's lr on this validation metric (overrides the spec's "
                             "\"select_metric\"; e.g. fact=edit_score)")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    for item in args.select_metric:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise ValueError(f"--select-metric {item!r}: expected TASK=METRIC, e.g. fact=edit_score")
        spec["select_metric"] = {**spec.get("select_metric", {}), task: metric}
    results = (args.results or ROOT / spec.get("results", "results")).resolve()
    table = args.spec.stem
    if args.tasks and set(args.tasks) - set(spec["tasks"]):
        raise ValueError(f"--tasks {sorted(set(args.tasks) - set(spec['tasks']))} not in {args.spec}'s tasks "
                         f"{spec['tasks']}")
    train_tasks = set(args.tasks or spec["tasks"])
    if args.plan:
        print_plan(spec, table, results, train_tasks, args)
        return 0
    if args.picks:
        print_picks(spec, table, results, train_tasks)
        return 0
    for task in spec["tasks"]:
        if shared := scored_validation_items(spec, task):
            print(f"note: {shared} of {task}'s validation items are also scored on its test split "
                  f"{test_split(spec, task)!r}: the lr picks are not held out", flush=True)
    started = time.time()
    stopped = False  # the budget ran out: start no more cells, still collect the finished ones
    multi = "models" in spec  # the CSVs get a model column

    def visit(cell_list, picked_cells: bool = False) -> list[dict]:
        """Train what is missing of ``cell_list`` (budget allowing) and return the finished rows. A cell
        that is its (model, task, method)'s pick for sure (``picked_cells``: the extra seeds; or a sweep of
        one lr without the edge rule) is tested as soon as it trains, so its records are complete at once."""
        nonlocal stopped
        rows = []
        for model, task, label, method, lr, seed, kw in cell_list:
            config = config_for(spec, table, model, task, label, method, lr, seed, kw, results)
            out = Path(config.out_dir)
            if not args.report and not stopped and task in train_tasks and not (out / "metrics.json").is_file():
                if args.budget_min is not None and time.time() - started >= 60 * args.budget_min:
                    print("budget reached; rerun the same command to continue", flush=True)
                    stopped = True
                else:
                    what = f"{model} {task}" if multi else task
                    print(f"[{table}] {what} {label} lr={lr:g} seed={seed}", flush=True)
                    try:
                        run(config)
                        if picked_cells or picked_for_sure(spec, model, task, label, extended):
                            test_metrics(out, task, spec.get("test_limit"), spec)
                            if not args.keep_models and (out / "model").is_dir():
                                shutil.rmtree(out / "model")
                            print(f"[{table}] tested {out.relative_to(results)}", flush=True)
                    except RunDirectoryInUse:
                        print(f"[{table}] skipped {out.relative_to(results)}: another process holds it", flush=True)
                        continue
            if (out / "metrics.json").is_file():
                check_reusable(config, out)  # same config and data, else an error naming what differs
                if (out / "routing.jsonl").is_file() and not (out / runs.WINNERS_FILE).is_file():
                    runs.write_winners(out)  # a run trained before the runner wrote this record
            row = finished_row(out, results, model, task, label, lr, seed, config.topk, select_metric(spec, task))
            if row:
                rows.append(row)
        return rows

    extended: dict = {}  # (model, task, method) -> lrs the edge rule added
    while True:
        sweep = pd.DataFrame(visit(list(sweep_cells(spec, extended))))
        picked, complete = pick_lrs(sweep, spec, extended)
        if not extend_sweeps(spec, picked, complete, extended):
            break
    if extended:
        print("sweeps extended at their edge: " + "; ".join(
            f"{'/'.join(map(str, k))} +{', '.join(f'{lr:g}' for lr in v)}" for k, v in sorted(extended.items())))
    # extra seeds only where the sweep is complete, so the picked lr can no longer change
    ready = {} if args.sweep_only else {k: v for k, v in picked.items() if k in complete}
    extra = pd.DataFrame(visit(list(seed_cells(spec, ready)), picked_cells=True))
    if sweep.empty:
        print("no finished cells yet")
        return 0
    results.mkdir(parents=True, exist_ok=True)
    val = pd.concat([sweep, extra], ignore_index=True)
    keys = ["model", "task", "method"] if multi else ["task", "method"]
    drop = [] if multi else ["model"]
    val.drop(columns=drop).to_csv(results / f"{table}_validation.csv", index=False)

    shares = [c for c in val.columns if c.startswith("updated_")]
    test_rows = []
    for (model, task, label), lr in sorted(picked.items()):
        chosen = val[(val.model == model) & (val.task == task) & (val.method == label) & (val.lr == lr)]
        for _, r in chosen.iterrows():
            try:
                metrics = test_metrics(results / r.dir, r.task, spec.get("test_limit"), spec)
            except RunDirectoryInUse:
                print(f"[{table}] left out {r.dir}: another process is testing it; rerun --report when it is done",
                      flush=True)
                continue
            test_rows.append({"model": r.model, "task": r.task, "method": r.method, "lr": r.lr, "seed": r.seed,
                              "dir": r.dir, "test_score": metrics[r.primary_metric], "val_score": r.val_score,
                              "primary_metric": r.primary_metric, "metric_variant": r.metric_variant,
                              "sweep_complete": (model, task, label) in complete,
                              "seeds_planned": len(spec["seeds"]), "tasks_planned": " ".join(spec["tasks"]),
                              "trainable_params": r.trainable_params, "last_quarter_drop": r.last_quarter_drop,
                              "last_quarter_share": r.last_quarter_share,
                              **{f"test_{k}": v for k, v in metrics.items() if k != r.primary_metric},
                              **{k: r[k] for k in shares if pd.notna(r[k])}})
    if not args.keep_models:
        for _, r in val.iterrows():
            folder = results / r.dir
            tested = (folder / "test_metrics.json").is_file()
            key = (r.model, r.task, r.method)
            dropped = key in complete and r.lr != picked[key]
            if (tested or dropped) and (folder / "model").is_dir():
                shutil.rmtree(folder / "model")
    if not test_rows:  # every pick is being tested by another process
        print("no test scores yet; rerun --report when the other processes are done", flush=True)
        return 0
    test = pd.DataFrame(test_rows)
    test.drop(columns=drop).to_csv(results / f"{table}.csv", index=False)
    summary = (test.groupby(keys)
               .agg(lr=("lr", "first"), mean=("test_score", "mean"),
                    std=("test_score", _sample_std),
                    seeds=("test_score", "count"), sweep_complete=("sweep_complete", "all"),
                    primary_metric=("primary_metric", "first"), metric_variant=("metric_variant", "first"),
                    trainable_params=("trainable_params", "first"),
                    last_quarter_drop=("last_quarter_drop", "max"),
                    last_quarter_share=("last_quarter_share", "max"),
                    **{c: (c, "mean") for c in shares if c in test},
                    **({"retention": ("test_retention", "mean"),
                        "retention_std": ("test_retention", _sample_std)}
                       if "test_retention" in test else {}))
               .reset_index())
    summary.to_csv(results / f"{table}_summary.csv", index=False)
    print(summary.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
