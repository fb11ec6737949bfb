"""Routing statistics as TensorBoard scalars and histograms, for users who already live there (opt-in).

Per step, under the run's log directory:

    train/loss, train/lr, train/grad_norm                 the step's numbers
    routing/win_share/<module_type>/<expert>              share of that type's modules the expert won
    routing/switch_rate                                   share of modules whose winners changed
    routing/skipped                                       share of modules with no winner (no gradient, NaN)
    routing/log10_score/<expert>   (histogram)            log10 of the expert's score over all modules

As a training callback (``molf.lab.engine``), or after the fact from a run directory::

    callbacks=[tensorboard.TensorBoardCallback("runs/tb/my_run")]
    python -m molf.lab.tensorboard runs/train/<run> runs/tb/<run>     # then: tensorboard --logdir runs/tb

Needs the ``tensorboard`` package (in requirements.txt; ``pip install tensorboard`` elsewhere).
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import runs


def _writer(logdir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        raise ImportError("TensorBoard export needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(log_dir=str(logdir))


class _RoutingStats:
    """Turns one step's decisions and scores into the scalars and histograms above."""

    def __init__(self, writer):
        self.writer = writer
        self.previous: dict[str, tuple] | None = None

    def add(self, step: int, decisions: dict, scores: dict) -> None:
        won = defaultdict(lambda: defaultdict(int))
        per_type = defaultdict(int)
        for module, experts in scores.items():
            kind = runs.module_type(module)
            per_type[kind] += 1
            for expert in experts:
                won[kind][expert] += expert in decisions.get(module, ())
        for kind, experts in won.items():
            for expert, n in experts.items():
                self.writer.add_scalar(f"routing/win_share/{kind}/{expert}", n / per_type[kind], step)
        n_modules = max(1, len(scores))
        skipped = sum(not decisions.get(m) for m in scores)
        self.writer.add_scalar("routing/skipped", skipped / n_modules, step)
        if self.previous is not None:
            switched = sum(tuple(decisions.get(m, ())) != self.previous.get(m, ()) for m in scores)
            self.writer.add_scalar("routing/switch_rate", switched / n_modules, step)
        self.previous = {m: tuple(decisions.get(m, ())) for m in scores}
        by_expert = defaultdict(list)
        for experts in scores.values():
            for expert, value in experts.items():
                if value is not None and math.isfinite(value) and value > 0:
                    by_expert[expert].append(math.log10(value))
        for expert, values in by_expert.items():
            self.writer.add_histogram(f"routing/log10_score/{expert}", np.asarray(values), step)


def _scalars(writer, step, **values) -> None:
    for name, value in values.items():
        if value is not None and math.isfinite(value):
            writer.add_scalar(f"train/{name}", value, step)


class TensorBoardCallback:
    """A training callback writing the step's loss, lr and gradient norm and, for MoLF, its routing."""

    def __init__(self, logdir):
        self.writer = _writer(logdir)
        self.routing = _RoutingStats(self.writer)

    def on_step(self, loop) -> None:
        _scalars(self.writer, loop.step, loss=loop.loss, lr=loop.lr, grad_norm=float(loop.grad_norm))
        decisions = getattr(loop.optimizer, "last_decisions", None)
        if decisions is not None:
            self.routing.add(loop.step, decisions, loop.optimizer.last_scores)

    def on_end(self, loop) -> None:
        self.writer.close()


def export_run(run_dir, logdir) -> Path:
    """Write a run directory's steps and routing (``routing.jsonl``, else the winners file) to ``logdir``."""
    data = runs.load(run_dir)
    writer = _writer(logdir)
    try:
        for row in data.steps.itertuples(index=False):
            _scalars(writer, int(row.step), loss=float(row.loss), lr=float(row.lr), grad_norm=float(row.grad_norm))
        if data.routing is not None:
            stats = _RoutingStats(writer)
            for step, rows in data.routing.groupby("step", sort=True):
                decisions = {m: tuple(g.loc[g["won"], "expert"]) for m, g in rows.groupby("module", sort=False)}
                scores = {m: dict(zip(g["expert"], g["score"])) for m, g in rows.groupby("module", sort=False)}
                stats.add(int(step), decisions, scores)
    finally:
        writer.close()
    return Path(logdir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m molf.lab.tensorboard",
                                     description="Write a run directory's losses and routing as TensorBoard events.")
    parser.add_argument("run_dir")
    parser.add_argument("logdir")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {export_run(args.run_dir, args.logdir)}; view with: tensorboard --logdir {args.logdir}")
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
