"""What the router did, on one page: the figures and per-method numbers of ``notebooks/08_what_the_router_did``.

Shadow routers (``molf.lab.shadow``) and the update audit come from one routed run; the weight views
(``molf.lab.weights``) from every method's merged model, beside the retention probe::

    from molf.lab import router_report, shadow
    result = shadow.train_with_shadows(config)
    router_report.agreement_heatmap(result.shadows)
    table, summary = router_report.method_weights(base, {"fft": (model, tokenizer), ...})
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from torch import nn

from . import plots, retention, runs, shadow, weights

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _type_order(types) -> list[str]:
    return sorted(set(types), key=lambda t: (TYPES.index(t) if t in TYPES else len(TYPES), t))


# ---------------------------------------------------------------------------- shadow routers
def agreement_grid(table: pd.DataFrame) -> pd.DataFrame:
    """rule x module type: share of decisions (all layers and steps) where the rule picked the real experts."""
    agree = shadow.agreement(table, by=("rule", "module_type"))
    grid = agree.pivot(index="rule", columns="module_type", values="agreement")
    return grid[_type_order(grid.columns)]


def agreement_heatmap(table: pd.DataFrame, title: str | None = None):
    grid = agreement_grid(table)
    fig, ax = plt.subplots(figsize=(1.1 * grid.shape[1] + 2.5, 0.55 * grid.shape[0] + 1.5))
    image = ax.imshow(grid.values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(grid.values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                    fontsize=8)
    ax.set_xticks(range(grid.shape[1]), [plots.short_type(t) for t in grid.columns])
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("module type")
    ax.set_ylabel("shadow rule")
    fig.colorbar(image, ax=ax, label="agreement with the real router")
    ax.set_title(title or "Would another rule have chosen the same expert?")
    return fig


def agreement_over_time_plot(table: pd.DataFrame, window: int, title: str | None = None):
    frame = shadow.over_time(table, window=window)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (rule, part) in enumerate(frame.groupby("rule", sort=False)):
        ax.plot(part["step_start"], part["agreement"], marker="o", label=rule,
                color=plots.LINE_COLORS[i % len(plots.LINE_COLORS)])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"first step of the window ({window} steps each)")
    ax.set_ylabel("agreement with the real router")
    ax.legend(fontsize=8, ncol=3)
    ax.set_title(title or "Agreement per rule over training")
    return fig


def choice_cost_plot(costs: pd.DataFrame, title: str | None = None):
    """Grouped bars: per probe step, what the real rule's choice gained over each rule (loss units)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if costs.empty:
        ax.text(0.5, 0.5, "no probe steps (the run is too short for the horizon)", ha="center", va="center")
        ax.set_axis_off()
        return fig
    rules = list(dict.fromkeys(costs["rule"]))
    steps = sorted(set(costs["step"]))
    width = 0.8 / len(rules)
    for i, rule in enumerate(rules):
        part = costs[costs["rule"] == rule].set_index("step").reindex(steps)
        ax.bar(np.arange(len(steps)) + i * width, part["cost"], width, label=rule,
               color=plots.LINE_COLORS[i % len(plots.LINE_COLORS)])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(steps)) + 0.4 - width / 2, [f"step {s}" for s in steps])
    ax.set_ylabel("loss(shadow) - loss(real)\n> 0: the real choice was better")
    ax.legend(fontsize=8, ncol=3)
    horizon = int(costs["horizon"].iloc[0])
    ax.set_title(title or f"What the real rule's choice gained, {horizon} steps later")
    return fig


def audit_summary(audit: pd.DataFrame) -> pd.DataFrame:
    """Per step: the smallest and median move of the winners, the largest move of a loser."""
    winners = audit[audit["won"]].groupby("step")["moved"].agg(winner_min="min", winner_median="median")
    losers = audit[~audit["won"]].groupby("step")["moved"].agg(loser_max="max")
    return winners.join(losers, how="outer").fillna(0.0).reset_index()


def update_audit_plot(audit: pd.DataFrame, title: str | None = None):
    summary = audit_summary(audit)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(summary["step"], summary["winner_median"], marker="o", color=plots.METHOD_COLORS["molf"],
            label="winners: median move")
    ax.plot(summary["step"], summary["winner_min"], ls="--", color=plots.METHOD_COLORS["molf"],
            label="winners: smallest move")
    ax.plot(summary["step"], summary["loser_max"], marker="x", color="black", label="losers: largest move")
    ax.set_xlabel("step")
    ax.set_ylabel("‖Δ parameters‖ over the step")
    ax.legend(fontsize=8)
    ax.set_title(title or "Who moved: each expert's parameter change per step")
    return fig


# ---------------------------------------------------------------------------- weights per method
def pick_layers(n_layers: int, layers) -> list[int]:
    """The decoder layers the weight views cover: ``None`` every one, an int ``n`` that many spread evenly
    (first and last included), a list those layers."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, bool):
        raise ValueError(f"layers must be None, an integer >= 1 or a list of layer indices, got {layers!r}")
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"layers must be None, an integer >= 1 or a list of layer indices, got {layers!r}")
        if layers >= n_layers:
            return list(range(n_layers))
        if layers == 1:
            return [n_layers // 2]
        return sorted({round(i * (n_layers - 1) / (layers - 1)) for i in range(layers)})
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad or not chosen:
        raise ValueError(f"layers {list(layers)!r}: the model has layers 0..{n_layers - 1}")
    return chosen


def linear_subset(model: nn.Module, layers) -> nn.Module:
    """A module tree holding only ``model``'s linear modules of the given decoder ``layers`` (shared, not
    copied), under their own names: ``weights.weight_table`` on two of them compares just those."""
    keep = set(layers)
    root = nn.Module()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or runs.module_layer(name) not in keep:
            continue
        parent, parts = root, name.split(".")
        for part in parts[:-1]:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(parts[-1], module)
    return root


def method_weights(base, tuned: dict, probe_rows=None, layers=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``tuned``: method -> (merged model, tokenizer). Returns the per-module ``weights.weight_table`` of
    every method (a ``method`` column added) over the decoder ``layers`` (``pick_layers``: each module's
    singular value decompositions are the cost) and one row per method: mean effective rank, mean
    rank_99, mean relative delta, intruder count (those modules) and retention (``molf.lab.retention``,
    the whole model)."""
    probe_rows = retention.load() if probe_rows is None else probe_rows
    n_layers = 1 + max(runs.module_layer(name) for name, m in base.named_modules() if isinstance(m, nn.Linear))
    chosen = pick_layers(n_layers, layers)
    base_part = linear_subset(base, chosen)
    tables, rows = [], []
    for method, (model, tokenizer) in tuned.items():
        table = weights.weight_table(base_part, linear_subset(model, chosen)).assign(method=method)
        tables.append(table)
        rows.append({"method": method, "effective_rank": float(table["effective_rank"].mean()),
                     "rank_99": float(table["rank_99"].mean()), "relative_delta": float(table["relative_delta"].mean()),
                     "intruders": int(table["intruders"].sum()), "modules": len(table),
                     "retention": float(retention.evaluate(model, tokenizer, probe_rows)["retention"])})
    return pd.concat(tables, ignore_index=True), pd.DataFrame(rows)


def spectra_plot(table: pd.DataFrame, title: str | None = None):
    """Effective rank, rank_99 and relative delta by module type (mean over layers), one colour per method."""
    panels = (("effective_rank", "effective rank of ΔW"), ("rank_99", "rank holding 99% of ‖ΔW‖²"),
              ("relative_delta", "‖ΔW‖ / ‖W_base‖"))
    types = _type_order(table["module_type"])
    methods = list(dict.fromkeys(table["method"]))
    means = table.groupby(["method", "module_type"])[[p for p, _ in panels]].mean()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    width = 0.8 / len(methods)
    for ax, (column, label) in zip(axes, panels):
        for i, method in enumerate(methods):
            values = [means.loc[(method, t), column] for t in types]
            ax.bar(np.arange(len(types)) + i * width, values, width, label=plots.method_label(method),
                   color=plots.method_color(method, i))
        ax.set_xticks(np.arange(len(types)) + 0.4 - width / 2, [plots.short_type(t) for t in types])
        ax.set_title(label, fontsize=10)
        if column == "relative_delta":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(methods), fontsize=8)
    fig.suptitle(title or "What each method's update did to the weights (mean over layers)", x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def intruders_vs_retention_plot(summary: pd.DataFrame, base_retention: float | None = None, title: str | None = None):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, row in enumerate(summary.itertuples()):
        ax.scatter(row.intruders, row.retention, s=80, color=plots.method_color(row.method, i), zorder=3)
        ax.annotate(plots.method_label(row.method), (row.intruders, row.retention), textcoords="offset points",
                    xytext=(6, 4), fontsize=9)
    if base_retention is not None:
        ax.axhline(base_retention, color="grey", ls=":", label=f"base model {base_retention:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("intruder dimensions (all modules)")
    ax.set_ylabel("retention probe (share kept)")
    ax.set_title(title or f"Intruders against retention ({len(summary)} runs)")
    return fig


def own_folder(config, folder):
    """``config`` moved into ``folder`` (same run name), saving its merged model: a run of this page's own,
    so that its model is on disk when the notebook runs again (the suite's other runs do not keep theirs)."""
    import dataclasses
    from pathlib import Path
    return dataclasses.replace(config, out_dir=str(Path(folder) / Path(config.out_dir).name), save_model=True)


def merged_model(config):
    """Train (or reuse) ``config`` with ``molf.lab.train.run``; return ``(run, model, tokenizer)``, the model
    merged into a plain one: ``Run.model`` when it trained now, else read from the run's ``model/``."""
    from pathlib import Path

    from . import models, train
    with shadow.quiet_transformers(not config.progress):
        run = train.run(config)
    if run.model is not None:
        return run, run.model, run.tokenizer
    saved = Path(run.out_dir) / "model"
    if not saved.is_dir():
        raise ValueError(f"{run.out_dir} holds a finished run without its model/ folder: train it with "
                         f"save_model=True (own_folder) or delete the folder")
    with shadow.quiet_transformers(not config.progress):
        model, tokenizer = models.load(str(saved))
    return run, model, tokenizer
