"""Figures of MoLF runs (the notebooks call these; every function returns its Figure).

The tables behind them come from ``molf.lab.analysis``; this module only draws.

Inputs are ``molf.lab.runs.RunData`` objects (``molf.lab.runs.load(out_dir)``) or their DataFrames. Every figure
has a title and axis labels with units; ``save(fig, path)`` writes it as a PNG.

Routing vocabulary used throughout:
- *win fraction* of an expert in a module: the share of optimizer steps in which that expert was among
  the winners (was updated). For MoLF the default expert is ``fft`` (1 = the module always trained its
  dense weight, 0 = always its LoRA expert); for MoLF-E (no FFT expert) it is the last LoRA expert
  (the largest rank with the default ranks (16, 128)).
- *switch rate* of a module: the share of consecutive step pairs whose winner sets differ.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .analysis import (
    default_expert,
    experts_of,
    heatmap_grid,
    module_grad_norms,
    overall_win_share,
    pick_trace_modules,
    primary_score,
    routing_of,
    score_table,
    spike_mask,
    switch_table,
    type_order,
    win_table,
    windowed_win_fraction,
)

WIN_CMAP = "coolwarm"
# The expert palette, one for every figure of the lab: the FFT expert red, the LoRA experts shades of blue
# (lora0, lora1, ... cycling through LORA_BLUES), a skipped module (no winner that step) grey, and a
# module-step won by several experts at once (top-k > 1) purple. Red and blue mean experts and nothing
# else: module types and labelled runs are drawn in MODULE_TYPE_COLORS / LINE_COLORS, which avoid them
# (the ordered settings of an ablation in viridis).
LORA_BLUES = ("#1f77b4", "#6baed6", "#08306b", "#9ecae1")
EXPERT_COLORS = {"fft": "#d62728", **{f"lora{i}": c for i, c in enumerate(LORA_BLUES)},
                 "skipped": "#c7c7c7", "several": "#7f3f98"}
MODULE_TYPE_COLORS = {"q_proj": "#ff7f0e", "k_proj": "#bcbd22", "v_proj": "#2ca02c", "o_proj": "#1b9e77",
                      "gate_proj": "#9467bd", "up_proj": "#e377c2", "down_proj": "#8c6d31"}
LINE_COLORS = tuple(MODULE_TYPE_COLORS.values())  # labelled lines that are neither experts nor methods
METHOD_COLORS = {"fft": EXPERT_COLORS["fft"], "lora": EXPERT_COLORS["lora0"], "dora": "#17becf",
                 "adalora": "#9467bd", "molf": "#2ca02c", "molf_e": "#ff7f0e"}
METHOD_LABELS = {"fft": "FFT", "lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "molf": "MoLF",
                 "molf_e": "MoLF-E"}


# ---------------------------------------------------------------------------- small helpers
def save(fig, path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created), tight bounding box; return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are saved as PNG; got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


def show_in(out, fig) -> None:
    """Replace what the ipywidgets ``Output`` ``out`` shows with ``fig``, then close ``fig`` (so pyplot
    does not draw it a second time below the cell): the redraw of every live widget view."""
    from IPython.display import display
    with out:
        out.clear_output(wait=True)
        display(fig)
    plt.close(fig)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_color(method: str, index: int = 0):
    return METHOD_COLORS.get(method, LINE_COLORS[index % len(LINE_COLORS)])


def expert_color(expert: str) -> str:
    """The colour of an expert in every figure: ``fft`` red, ``lora<i>`` a blue (``LORA_BLUES[i % 4]``),
    ``skipped`` (no winner) grey, ``several`` (more than one winner) purple."""
    if expert in EXPERT_COLORS:
        return EXPERT_COLORS[expert]
    if expert.startswith("lora") and expert[4:].isdigit():
        return LORA_BLUES[int(expert[4:]) % len(LORA_BLUES)]
    raise ValueError(f"no colour for {expert!r}: experts are 'fft' and 'lora<i>' (plus 'skipped', 'several')")


def module_type_color(module_type: str, index: int = 0) -> str:
    """The colour of a module type's line (never an expert's red or blue); unknown types by ``index``."""
    return MODULE_TYPE_COLORS.get(module_type, LINE_COLORS[index % len(LINE_COLORS)])


def expert_label(expert: str, config: dict | None = None) -> str:
    """``fft`` -> "FFT expert", ``lora1`` -> "LoRA expert 1 (r=128)" (rank from the run config)."""
    if expert == "fft":
        return "FFT expert"
    if expert.startswith("lora"):
        index = int(expert[4:])
        ranks = (config or {}).get("ranks") or ()
        rank = f" (r={ranks[index]})" if index < len(ranks) else ""
        return f"LoRA expert {index}{rank}"
    return expert




def layer_ticks(ax, layers, types=None, every: int | None = None, offset: float = 0.0) -> None:
    """Readable ticks on a layer x module-type map: each type on x (short names), and on y every layer when
    there are at most 12 rows, else every 5th (``every``) plus the last, so 30 rows stay legible.
    ``offset``: 0.5 for seaborn heatmaps (cell centres at i + 0.5), 0 for imshow."""
    layers = list(layers)
    if types is not None:
        ax.set_xticks([i + offset for i in range(len(types))], [short_type(t) for t in types])
    every = every or (1 if len(layers) <= 12 else 5)
    shown = sorted(set(range(0, len(layers), every)) | {len(layers) - 1})
    ax.set_yticks([i + offset for i in shown], [layers[i] for i in shown], fontsize=9, rotation=0)
    ax.set_yticks([i + offset for i in range(len(layers))], minor=True)
    ax.tick_params(axis="y", which="minor", length=2)


def short_type(t: str) -> str:
    return t.removesuffix("_proj")


def run_title(data) -> str:
    c = getattr(data, "config", None) or {}
    if not c:
        return ""
    return f"{method_label(c.get('method', '?'))}, {c.get('model', '?')}, {c.get('task', '?')}, {c.get('steps')} steps"


# ---------------------------------------------------------------------------- routing tables




















def agreement_plot(curves: dict, title: str | None = None, ax=None):
    """Agreement-with-final-routing curves (``agreement_with_final`` tables), one line per label."""
    fig, ax = _fig_ax(ax, figsize=(7.5, 4.2))
    for i, (label, table) in enumerate(curves.items()):
        ax.plot(table["step"], table["agreement"], lw=1.6, label=label, color=method_color(label, i))
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training step")
    ax.set_ylabel("modules routed as at the end (fraction)")
    ax.set_title(title or "How early does routing settle?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig






# ---------------------------------------------------------------------------- routing figures
def _draw_grid(ax, grid: pd.DataFrame, cmap, vmin, vmax, annotate: bool | None, fmt: str = ".2f",
               label: str = "", colorbar: bool = True):
    import seaborn as sns
    if annotate is None:
        annotate = len(grid.index) <= 12
    sns.heatmap(grid, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, annot=annotate, fmt=fmt,
                annot_kws={"fontsize": 7}, linewidths=0.3, linecolor="white", cbar=colorbar,
                cbar_kws={"label": label} if colorbar else None,
                xticklabels=[short_type(t) for t in grid.columns], yticklabels=list(grid.index))
    ax.set_xlabel("module type (projection)")
    ax.set_ylabel("decoder layer (index)")
    layer_ticks(ax, grid.index, offset=0.5)
    return ax


def routing_heatmap(data, expert: str | None = None, ax=None, title: str | None = None,
                    annotate: bool | None = None, colorbar: bool = True):
    """Layer x module-type heatmap of the share of steps ``expert`` won; one cell per wrapped module."""
    expert = expert or default_expert(data)
    grid = heatmap_grid(win_table(data, expert))
    fig, ax = _fig_ax(ax, figsize=(6.5, 1.2 + 0.28 * len(grid.index) if len(grid.index) > 4 else 3.6))
    config = getattr(data, "config", None)
    _draw_grid(ax, grid, WIN_CMAP, 0.0, 1.0, annotate,
               label=f"share of steps won by {expert_label(expert, config)} (fraction)", colorbar=colorbar)
    ax.set_title(title or f"Where the {expert_label(expert, config)} won\n{run_title(data)}")
    return fig


def routing_heatmaps_over_time(data, expert: str | None = None, windows: int = 4):
    """Layer x module-type heatmaps of ``expert``'s win fraction, one panel per window of consecutive
    steps: where each module was routed, and how that changed over training."""
    expert = expert or default_expert(data)
    table = windowed_win_fraction(data, expert, windows)
    n = int(table["window"].max()) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.2, 6), layout="constrained", sharey=True, squeeze=False)
    config = getattr(data, "config", None)
    label = f"share of steps won by {expert_label(expert, config)} (fraction)"
    for w, ax in enumerate(axes[0]):
        part = table[table["window"] == w]
        _draw_grid(ax, heatmap_grid(part), WIN_CMAP, 0.0, 1.0, False, label=label, colorbar=w == n - 1)
        ax.set_title(f"steps {int(part.step_start.iloc[0])}-{int(part.step_end.iloc[0])}")
        if w:
            ax.set_ylabel("")
    fig.suptitle(f"Routing per layer and module type over training\n{run_title(data)}")
    return fig


def _fig_ax(ax, figsize):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    return ax.figure, ax


def win_fraction_over_time(data, expert: str | None = None, windows: int = 8):
    """Left: win fraction per module type (mean over layers) per window of steps. Right: layer x window
    heatmap (mean over module types). Flat lines from the first window = early specialisation."""
    expert = expert or default_expert(data)
    table = windowed_win_fraction(data, expert, windows)
    config = getattr(data, "config", None)
    label = f"share of steps won by {expert_label(expert, config)}"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.1, 1]})
    mid = table.groupby("window")[["step_start", "step_end"]].first()
    centers = (mid["step_start"] + mid["step_end"]) / 2
    per_type = table.groupby(["window", "module_type"])["win_fraction"].mean().unstack()
    ordered = type_order(per_type.columns)
    # equal shares (often all 0 or all 1) would hide each other: each type's line is drawn a little apart
    spread = 0.012
    for i, t in enumerate(ordered):
        offset = (i - (len(ordered) - 1) / 2) * spread
        left.plot(centers.loc[per_type.index], per_type[t] + offset, marker="o", ms=3, label=short_type(t),
                  color=module_type_color(t, i))
    overall = table.groupby("window")["win_fraction"].mean()
    left.plot(centers.loc[overall.index], overall, color="black", lw=2.5, ls="--", label="all modules")
    left.set_ylim(-0.06, 1.06)
    left.set_xlabel("training step (window centre)")
    left.set_ylabel(f"{label} (fraction)")
    left.set_title(f"By module type (mean over layers; lines {spread:g} apart so that equal ones show)",
                   fontsize=9)
    left.legend(fontsize=8, title="module type", title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    left.grid(alpha=0.3)

    grid = table.groupby(["layer", "window"])["win_fraction"].mean().unstack().sort_index()
    import seaborn as sns
    sns.heatmap(grid, ax=right, cmap=WIN_CMAP, vmin=0, vmax=1, cbar_kws={"label": f"{label} (fraction)"},
                xticklabels=[f"{int(mid.loc[w, 'step_start'])}-{int(mid.loc[w, 'step_end'])}" for w in grid.columns],
                yticklabels=list(grid.index))
    right.set_xlabel("training steps (window, inclusive)")
    right.set_ylabel("decoder layer (index)")
    layer_ticks(right, grid.index, offset=0.5)
    right.tick_params(axis="x", rotation=45, labelsize=8)
    right.set_title("By layer (mean over module types)")
    fig.suptitle(f"Routing over training time: does each module specialise early?\n{run_title(data)}")
    return fig


def switch_frequency_plot(data, ax=None):
    """Layer x module-type heatmap of how often each module's winner changed between steps."""
    table = switch_table(data)
    grid = heatmap_grid(table, "switch_rate")
    fig, ax = _fig_ax(ax, figsize=(6.5, 1.2 + 0.28 * len(grid.index) if len(grid.index) > 4 else 3.6))
    vmax = max(0.05, float(np.nanmax(grid.to_numpy())) if grid.size else 1.0)
    _draw_grid(ax, grid, "rocket_r", 0.0, vmax, None,
               label="switch rate (winner changes per step transition)")
    ax.set_title(f"How often each module switched expert\n{run_title(data)}")
    return fig


def score_traces(data, modules=None, n: int = 3):
    """log10 score of every expert over training for a few modules; filled markers: the step's winner."""
    modules = list(modules) if modules else pick_trace_modules(data, n)
    table = score_table(data, modules)
    experts = experts_of(data)
    config = getattr(data, "config", None)
    fig, axes = plt.subplots(1, len(modules), figsize=(4.6 * len(modules), 3.8), layout="constrained",
                             squeeze=False, sharey=True)
    for ax, module in zip(axes[0], modules):
        rows = table[table["module"] == module]
        for expert in experts:
            e = rows[rows["expert"] == expert].sort_values("step")
            color = expert_color(expert)
            ax.plot(e["step"], e["log10_score"], color=color, lw=1.3, label=expert_label(expert, config))
            w = e[e["won"]]
            ax.scatter(w["step"], w["log10_score"], color=color, s=14, zorder=3)
        ax.set_title(module.removeprefix("model."), fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("log10 EPD score (expected loss decrease\nper parameter per step, nats)"
                          if (config or {}).get("score", "epd") == "epd" else "log10 PFN score (unitless)")
    axes[0][0].legend(fontsize=8, title="expert (dot = won that step)", title_fontsize=8)
    fig.suptitle(f"Routing scores of selected modules ({(config or {}).get('score', 'epd').upper()})\n{run_title(data)}")
    return fig


def compare_heatmaps(runs: dict, expert: str | None = None, title: str | None = None):
    """Routing heatmaps of several runs side by side on one colour scale (e.g. EPD vs PFN)."""
    labels = list(runs)
    first = runs[labels[0]]
    expert = expert or default_expert(first)
    n_layers = len(heatmap_grid(win_table(first, expert)).index)
    height = 1.4 + 0.28 * n_layers if n_layers > 4 else 3.8
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels) + 1, height), layout="constrained",
                             squeeze=False)
    for i, (ax, label) in enumerate(zip(axes[0], labels)):
        data = runs[label]
        share = overall_win_share(data).get(expert, float("nan"))
        routing_heatmap(data, expert, ax=ax, colorbar=i == len(labels) - 1,
                        title=f"{label}\n{expert_label(expert, getattr(data, 'config', None))} won "
                              f"{share:.0%} of decisions")
        if i:
            ax.set_ylabel("")
    fig.suptitle(title or f"Share of steps won by the {expert_label(expert)}: {' vs '.join(labels)}")
    return fig


def routing_summary_bars(data, ax=None):
    """Share of all decisions each expert won, per module type (stacked bars)."""
    routing = routing_of(data)
    config = getattr(data, "config", None)
    share = routing.groupby(["module_type", "expert"])["won"].mean().unstack().reindex(type_order(routing["module_type"]))
    fig, ax = _fig_ax(ax, figsize=(8, 3.6))
    bottom = np.zeros(len(share))
    for expert in experts_of(data):
        ax.bar([short_type(t) for t in share.index], share[expert], bottom=bottom, color=expert_color(expert),
               label=expert_label(expert, config))
        bottom += share[expert].to_numpy()
    ax.set_xlabel("module type (projection)")
    ax.set_ylabel("share of (layer, step) decisions won (fraction)")
    ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.02)
    # beside the bars, not over them (the stacked bars fill the axes to 1)
    ax.legend(fontsize=8, title="expert", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)
    ax.set_title(f"Which expert won, by module type\n{run_title(data)}")
    return fig


# ---------------------------------------------------------------------------- loss and stability




def loss_curves(runs: dict, window: int = 5, k: float = 3.0, title: str | None = None):
    """Top: training loss per run (thin: raw, thick: rolling mean, x: spikes). Bottom: rolling std.

    ``runs`` maps a label to a RunData or a steps DataFrame; labels that are method names get the
    method's colour.
    """
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, layout="constrained",
                                      gridspec_kw={"height_ratios": [2, 1]})
    for i, (label, data) in enumerate(runs.items()):
        steps = getattr(data, "steps", data).sort_values("step")
        method = (getattr(data, "config", None) or {}).get("method", label)
        color = method_color(method, i)
        name = method_label(label) if label in METHOD_LABELS else label
        loss = steps["loss"].astype(float)
        top.plot(steps["step"], loss, color=color, lw=0.8, alpha=0.45)
        top.plot(steps["step"], loss.rolling(window, min_periods=1).mean(), color=color, lw=2, label=name)
        spikes = spike_mask(loss.reset_index(drop=True), window, k).to_numpy()
        if spikes.any():
            top.scatter(steps["step"].to_numpy()[spikes], loss.to_numpy()[spikes], marker="x", s=50,
                        color=color, zorder=4)
        bottom.plot(steps["step"], loss.rolling(window, min_periods=2).std(), color=color, lw=1.5, label=name)
    top.set_ylabel("training loss (nats/token)")
    top.set_title(title or "Training loss")
    top.legend(fontsize=8, ncol=2, title=f"thick: {window}-step rolling mean; x: spike (> mean + {k:g} std)",
               title_fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_xlabel("training step")
    bottom.set_ylabel(f"{window}-step rolling std\nof loss (nats/token)")
    bottom.grid(alpha=0.3)
    return fig


def lr_curve(data, ax=None):
    steps = data.steps
    fig, ax = _fig_ax(ax, figsize=(6, 3))
    ax.plot(steps["step"], steps["lr"], color="black")
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate (group 0)")
    ax.set_title(f"Learning-rate schedule\n{run_title(data)}")
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------- gradient norms


def grad_norm_plot(data):
    """One run. Left: total gradient norm (before clipping) per step. Right: mean gradient norm per
    layer, one line per expert (MoLF: FFT vs LoRA experts) or per module type."""
    config = getattr(data, "config", None) or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    steps = data.steps
    left.plot(steps["step"], steps["grad_norm"], color="black", lw=1.2)
    if config.get("max_grad_norm"):
        left.axhline(config["max_grad_norm"], color="grey", ls="--", lw=1, label="clipping threshold")
        left.legend(fontsize=8)
    left.set_yscale("log")
    left.set_xlabel("training step")
    left.set_ylabel("gradient L2 norm, all trainable params (before clipping)")
    left.set_title("Global gradient norm")
    left.grid(alpha=0.3, which="both")

    grads = data.grad_norms
    experts = list(dict.fromkeys(grads["expert"]))
    if len(experts) > 1:
        per = grads.groupby(["layer", "expert"])["grad_norm"].mean().unstack()
        for expert in sorted(experts, key=lambda e: (e != "fft", len(e), e)):
            right.plot(per.index, per[expert], marker="o", ms=3, label=expert_label(expert, config),
                       color=expert_color(expert))
        right.legend(fontsize=8, title="expert")
    else:
        per = grads.groupby(["layer", "module_type"])["grad_norm"].mean().unstack()
        for i, t in enumerate(type_order(per.columns)):
            right.plot(per.index, per[t], marker="o", ms=3, label=short_type(t), color=module_type_color(t, i))
        right.legend(fontsize=8, ncol=2, title="module type")
    right.set_yscale("log")
    right.set_xlabel("decoder layer (index)")
    right.set_ylabel("mean per-module gradient L2 norm (over steps)")
    right.set_title("Gradient norm by layer")
    right.grid(alpha=0.3, which="both")
    fig.suptitle(f"Gradient norms\n{run_title(data)}")
    return fig


def grad_norms_per_layer(runs: dict, title: str | None = None):
    """Several runs: mean per-module gradient norm (all experts of a module together) per layer, for
    attention (q, k, v, o) and MLP (gate, up, down) modules."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained", sharey=True)
    groups = {"attention (q, k, v, o)": {"q_proj", "k_proj", "v_proj", "o_proj"},
              "MLP (gate, up, down)": {"gate_proj", "up_proj", "down_proj"}}
    for i, (label, data) in enumerate(runs.items()):
        per_module = module_grad_norms(data)
        method = (getattr(data, "config", None) or {}).get("method", label)
        for ax, (_group, types) in zip(axes, groups.items()):
            rows = per_module[per_module["module_type"].isin(types)]
            if rows.empty:
                continue
            per_layer = rows.groupby("layer")["grad_norm"].mean()
            ax.plot(per_layer.index, per_layer.values, marker="o", ms=3, color=method_color(method, i),
                    label=method_label(label) if label in METHOD_LABELS else label)
    for ax, group in zip(axes, groups):
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer (index)")
        ax.set_title(group)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean gradient L2 norm per module (over steps)")
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(title or "Per-layer gradient norms (trainable parameters of each adapted module)")
    return fig


# ---------------------------------------------------------------------------- tables of runs
def bar_panel(ax, labels, values, ylabel: str, title: str, colors=None, fmt: str = "{:.3g}", log: bool = False):
    """Bars with their values written on top."""
    values = [float(v) if v is not None else float("nan") for v in values]
    bars = ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    for bar, v in zip(bars, values):
        if math.isfinite(v):
            ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return ax




def metrics_overview(table: pd.DataFrame, title: str | None = None):
    """Final metric, final loss and loss stability per run (from ``metrics_table``)."""
    labels = [method_label(r) for r in table["run"]]
    colors = [method_color(m, i) for i, m in enumerate(table["method"])]
    metric = table["primary_metric"].dropna().iloc[0] if table["primary_metric"].notna().any() else "metric"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    bar_panel(axes[0], labels, table["score"], f"{metric} (fraction, higher is better)",
              f"Task metric after training: {metric}", colors, "{:.2f}")
    bar_panel(axes[1], labels, table["final_loss"], "final training loss (nats/token)", "Final training loss",
              colors, "{:.2f}")
    bar_panel(axes[2], labels, table["rolling_std_mean"], "mean rolling std of loss (nats/token)",
              "Loss instability (lower is steadier)", colors, "{:.3f}")
    fig.suptitle(title or "Final metrics")
    return fig


def cost_overview(table: pd.DataFrame, title: str | None = None):
    """Trainable parameters, optimizer state and median step time per run (from ``metrics_table``)."""
    labels = [method_label(r) for r in table["run"]]
    colors = [method_color(m, i) for i, m in enumerate(table["method"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    bar_panel(axes[0], labels, table["trainable_params"] / 1e6, "trainable parameters (millions)",
              "Trainable parameters", colors, "{:.2f}", log=True)
    bar_panel(axes[1], labels, table["optimizer_state_mb"], "optimizer state (MiB)",
              "Optimizer memory (Adam moments)", colors, "{:.0f}", log=True)
    bar_panel(axes[2], labels, table["step_time_s"], "median step time (s)", "Time per optimizer step",
              colors, "{:.2f}")
    fig.suptitle(title or "Cost of each method")
    return fig


def ablation_plot(runs: dict, axis_name: str, expert: str = "fft"):
    """One ablation axis. Left: win fraction of ``expert`` per module type for each setting. Right: the
    task metric and final loss per setting."""
    labels = list(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.5, 1]})
    width = 0.8 / max(1, len(labels))
    types = None
    for i, label in enumerate(labels):
        data = runs[label]
        routing = routing_of(data)
        types = types or type_order(routing["module_type"])
        share = routing[routing["expert"] == expert].groupby("module_type")["won"].mean().reindex(types)
        x = np.arange(len(types)) + (i - (len(labels) - 1) / 2) * width
        left.bar(x, share.values, width=width, label=label, color=plt.cm.viridis(i / max(1, len(labels) - 1)))
    left.set_xticks(np.arange(len(types)), [short_type(t) for t in types])
    left.set_ylim(0, 1.05)
    left.set_xlabel("module type (projection)")
    left.set_ylabel(f"share of steps won by {expert_label(expert)} (fraction)")
    left.set_title("Routing")
    # beside the bars, not over them (a legend inside the axes hid the tallest ones)
    left.legend(fontsize=8, title=axis_name, title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    left.grid(alpha=0.3, axis="y")

    scores = [primary_score(runs[l].metrics) for l in labels]
    losses = [(runs[l].metrics or {}).get("final_loss") for l in labels]
    metric = next((runs[l].metrics or {}).get("primary_metric") for l in labels) or "metric"
    x = np.arange(len(labels))
    colors = [plt.cm.viridis(i / max(1, len(labels) - 1)) for i in range(len(labels))]
    right.bar(x, [s if s is not None else np.nan for s in scores], color=colors, width=0.6)
    right.set_xticks(x, labels, rotation=20, ha="right")
    right.set_ylim(0, 1.05)
    right.set_ylabel(f"{metric} (fraction, higher is better)")
    right.set_xlabel(axis_name)
    twin = right.twinx()
    twin.plot(x, losses, color="black", marker="D", lw=1.5, label="final loss")
    twin.set_ylabel("final training loss (nats/token)")
    # no legend: the title and the right-hand label name the line, and a legend box hid bar tops or points
    right.set_title(f"Result: {metric} (bars), final loss (line)")
    fig.suptitle(f"Ablation: {axis_name}")
    return fig


matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.titlesize": 11})
