"""Plots and tables for MoLF runs (the notebooks call these; every function returns its Figure).

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

MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WIN_CMAP = "coolwarm"
METHOD_COLORS = {"fft": "#d62728", "lora": "#1f77b4", "dora": "#17becf", "adalora": "#9467bd",
                 "molf": "#2ca02c", "molf_e": "#ff7f0e"}
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


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_color(method: str, index: int = 0):
    return METHOD_COLORS.get(method, plt.cm.tab10(index % 10))


def _routing(data) -> pd.DataFrame:
    routing = getattr(data, "routing", data)
    if routing is None or not isinstance(routing, pd.DataFrame) or routing.empty:
        path = getattr(data, "path", "this run")
        raise ValueError(f"{path} has no routing log: only molf and molf_e runs route")
    return routing


def experts_of(data) -> list[str]:
    """Expert names of a routed run, in order (``fft`` first, then ``lora0``, ``lora1``, ...)."""
    names = list(dict.fromkeys(_routing(data)["expert"]))
    return sorted(names, key=lambda e: (e != "fft", len(e), e))


def default_expert(data) -> str:
    """The expert whose win fraction the routing plots show: ``fft`` if the run has one, else the last
    LoRA expert (MoLF-E)."""
    names = experts_of(data)
    return "fft" if "fft" in names else names[-1]


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


def _type_order(types) -> list[str]:
    present = list(dict.fromkeys(types))
    return [t for t in MODULE_TYPES if t in present] + sorted(t for t in present if t not in MODULE_TYPES)


def _short_type(t: str) -> str:
    return t.removesuffix("_proj")


def run_title(data) -> str:
    c = getattr(data, "config", None) or {}
    if not c:
        return ""
    return f"{method_label(c.get('method', '?'))}, {c.get('model', '?')}, {c.get('task', '?')}, {c.get('steps')} steps"


# ---------------------------------------------------------------------------- routing tables
def win_table(data, expert: str | None = None) -> pd.DataFrame:
    """One row per wrapped module: module, layer, module_type, steps, win_fraction of ``expert``."""
    routing = _routing(data)
    expert = expert or default_expert(data)
    rows = routing[routing["expert"] == expert]
    if rows.empty:
        raise ValueError(f"expert {expert!r} is not in this run; it has {experts_of(data)}")
    table = (rows.groupby(["module", "layer", "module_type"], sort=False)["won"]
             .agg(["mean", "size"]).reset_index().rename(columns={"mean": "win_fraction", "size": "steps"}))
    return table.sort_values(["layer", "module_type"], key=_sort_key).reset_index(drop=True)


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name == "module_type":
        order = {t: i for i, t in enumerate(MODULE_TYPES)}
        return column.map(lambda t: order.get(t, len(order)))
    return column


def heatmap_grid(table: pd.DataFrame, value: str = "win_fraction") -> pd.DataFrame:
    """``table`` (one row per module) as a layer x module-type grid (rows: layers, columns: types)."""
    grid = table.pivot_table(index="layer", columns="module_type", values=value, aggfunc="mean")
    return grid.reindex(columns=_type_order(table["module_type"])).sort_index()


def heatmap_cells(data, expert: str | None = None) -> list[dict]:
    """The routing heatmap's data as JSON-ready cells: one per wrapped module
    (``module``, ``layer``, ``module_type``, ``expert``, ``win_fraction``, ``steps``)."""
    expert = expert or default_expert(data)
    table = win_table(data, expert)
    return [{"module": r.module, "layer": int(r.layer), "module_type": r.module_type, "expert": expert,
             "win_fraction": float(r.win_fraction), "steps": int(r.steps)} for r in table.itertuples()]


def overall_win_share(data) -> dict[str, float]:
    """Expert -> share of all (module, step) decisions it won."""
    routing = _routing(data)
    per = routing.groupby("expert")["won"].mean()
    return {e: float(per[e]) for e in experts_of(data)}


def windowed_win_fraction(data, expert: str | None = None, windows: int = 8) -> pd.DataFrame:
    """Win fraction of ``expert`` per window of consecutive steps, per module.

    Columns: window, step_start, step_end (inclusive), module, layer, module_type, win_fraction.
    ``windows`` is capped at the number of logged steps.
    """
    routing = _routing(data)
    expert = expert or default_expert(data)
    rows = routing[routing["expert"] == expert].copy()
    steps = np.sort(rows["step"].unique())
    n = max(1, min(int(windows), len(steps)))
    edges = np.array_split(steps, n)
    window_of = {s: i for i, chunk in enumerate(edges) for s in chunk}
    rows["window"] = rows["step"].map(window_of)
    out = (rows.groupby(["window", "module", "layer", "module_type"], sort=False)["won"].mean()
           .rename("win_fraction").reset_index())
    out["step_start"] = out["window"].map(lambda w: int(edges[w][0]))
    out["step_end"] = out["window"].map(lambda w: int(edges[w][-1]))
    return out[["window", "step_start", "step_end", "module", "layer", "module_type", "win_fraction"]]


def _winner_sets(routing: pd.DataFrame) -> pd.DataFrame:
    """One row per (module, step) with a winner: its winner set as one string (``"fft"``, ``"fft,lora0"``)."""
    won = routing[routing["won"]].sort_values(["module", "step", "expert"])
    return won.groupby(["module", "step"])["expert"].agg(",".join).reset_index()


def switch_table(data) -> pd.DataFrame:
    """Per module: switches (steps whose winner set differs from the previous step's), transitions
    (consecutive step pairs) and switch_rate = switches / transitions (0 when only one step)."""
    routing = _routing(data)
    winners = _winner_sets(routing)
    all_steps = routing[["module", "layer", "module_type"]].drop_duplicates("module")
    records = []
    for module, group in winners.groupby("module", sort=False):
        seq = group.sort_values("step")["expert"].tolist()
        switches = sum(a != b for a, b in zip(seq, seq[1:]))
        records.append((module, switches, max(0, len(seq) - 1)))
    table = pd.DataFrame(records, columns=["module", "switches", "transitions"])
    table = all_steps.merge(table, on="module", how="left").fillna({"switches": 0, "transitions": 0})
    table["switches"] = table["switches"].astype(int)
    table["transitions"] = table["transitions"].astype(int)
    table["switch_rate"] = np.where(table["transitions"] > 0,
                                    table["switches"] / table["transitions"].clip(lower=1), 0.0)
    return table.sort_values(["layer", "module_type"], key=_sort_key).reset_index(drop=True)


def agreement_with_final(data, final_fraction: float = 0.5) -> pd.DataFrame:
    """How early routing settles: per step, the share of modules whose winner set equals that module's
    most frequent winner set over the last ``final_fraction`` of training (its "final" routing).

    Columns: step, agreement (fraction of modules). A curve that reaches ~1 early and stays there means
    early specialisation (paper claim 4); a curve near the chance level means routing keeps changing.
    Ties for the most frequent winner set go to the set seen last.
    """
    if not 0.0 < final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction!r}")
    routing = _routing(data)
    winners = _winner_sets(routing)
    steps = np.sort(routing["step"].unique())
    cut = steps[int(math.floor(len(steps) * (1.0 - final_fraction)))] if len(steps) else 0
    final = {}
    for module, group in winners[winners["step"] >= cut].groupby("module"):
        counts = group["expert"].iloc[::-1].value_counts(sort=True)  # stable: ties keep the later-seen
        final[module] = counts.index[0]
    winners["agrees"] = [final.get(m) == w for m, w in zip(winners["module"], winners["expert"])]
    n_modules = routing["module"].nunique()
    out = winners.groupby("step")["agrees"].sum().reindex(steps, fill_value=0) / max(1, n_modules)
    return out.rename("agreement").rename_axis("step").reset_index()


def settling_step(agreement: pd.DataFrame, threshold: float = 0.9, window: int = 3) -> int | None:
    """The step by which routing has settled: the first step at which the mean agreement over the last
    ``window`` steps (that step included) is >= ``threshold`` and stays so until the end of training;
    None if it never does."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    rolling = agreement["agreement"].rolling(window, min_periods=1).mean().to_numpy()
    ok = rolling >= threshold
    if not ok[-1]:
        return None
    first = len(ok) - 1
    while first > 0 and ok[first - 1]:
        first -= 1
    return int(agreement["step"].iloc[first])


def agreement_plot(curves: dict, title: str | None = None, ax=None):
    """Agreement-with-final-routing curves (``agreement_with_final`` tables), one line per label."""
    fig, ax = _fig_ax(ax, figsize=(7.5, 4.2))
    for i, (label, table) in enumerate(curves.items()):
        ax.plot(table["step"], table["agreement"], lw=1.6, label=label, color=plt.cm.tab10(i % 10))
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training step")
    ax.set_ylabel("modules routed as at the end (fraction)")
    ax.set_title(title or "How early does routing settle?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def score_table(data, modules) -> pd.DataFrame:
    """Scores of every expert of ``modules`` over steps: step, module, expert, score, log10_score, won."""
    routing = _routing(data)
    rows = routing[routing["module"].isin(list(modules))].copy()
    with np.errstate(divide="ignore"):
        rows["log10_score"] = np.log10(rows["score"].where(rows["score"] > 0))
    return rows[["step", "module", "layer", "module_type", "expert", "score", "log10_score", "won"]]


def pick_trace_modules(data, n: int = 3, expert: str | None = None) -> list[str]:
    """Modules worth tracing: the one that switched most, the most ``expert``-dominated, the least, then
    spread over layers. Deterministic."""
    wins = win_table(data, expert).set_index("module")
    switches = switch_table(data).set_index("module")["switches"]
    picked: list[str] = []

    def add(module):
        if module not in picked and len(picked) < n:
            picked.append(module)

    add(switches.sort_values(ascending=False, kind="stable").index[0])
    add(wins["win_fraction"].sort_values(ascending=False, kind="stable").index[0])
    add(wins["win_fraction"].sort_values(ascending=True, kind="stable").index[0])
    for module in wins.index[np.linspace(0, len(wins) - 1, num=max(n, 1)).round().astype(int)]:
        add(module)
    return picked


# ---------------------------------------------------------------------------- routing figures
def _draw_grid(ax, grid: pd.DataFrame, cmap, vmin, vmax, annotate: bool | None, fmt: str = ".2f",
               label: str = "", colorbar: bool = True):
    import seaborn as sns
    if annotate is None:
        annotate = len(grid.index) <= 12
    sns.heatmap(grid, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, annot=annotate, fmt=fmt,
                annot_kws={"fontsize": 7}, linewidths=0.3, linecolor="white", cbar=colorbar,
                cbar_kws={"label": label} if colorbar else None,
                xticklabels=[_short_type(t) for t in grid.columns], yticklabels=list(grid.index))
    ax.set_xlabel("module type (projection)")
    ax.set_ylabel("decoder layer (index)")
    ax.tick_params(axis="y", labelsize=7 if len(grid.index) > 12 else 9, rotation=0)
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
    for i, t in enumerate(_type_order(per_type.columns)):
        left.plot(centers.loc[per_type.index], per_type[t], marker="o", ms=3, label=_short_type(t),
                  color=plt.cm.tab10(i))
    overall = table.groupby("window")["win_fraction"].mean()
    left.plot(centers.loc[overall.index], overall, color="black", lw=2.5, ls="--", label="all modules")
    left.set_ylim(-0.03, 1.03)
    left.set_xlabel("training step (window centre)")
    left.set_ylabel(f"{label} (fraction)")
    left.set_title("By module type (mean over layers)")
    left.legend(fontsize=8, title="module type", title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    left.grid(alpha=0.3)

    grid = table.groupby(["layer", "window"])["win_fraction"].mean().unstack().sort_index()
    import seaborn as sns
    sns.heatmap(grid, ax=right, cmap=WIN_CMAP, vmin=0, vmax=1, cbar_kws={"label": f"{label} (fraction)"},
                xticklabels=[f"{int(mid.loc[w, 'step_start'])}-{int(mid.loc[w, 'step_end'])}" for w in grid.columns],
                yticklabels=list(grid.index))
    right.set_xlabel("training steps (window, inclusive)")
    right.set_ylabel("decoder layer (index)")
    right.tick_params(axis="y", rotation=0, labelsize=7 if len(grid.index) > 12 else 9)
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
        for i, expert in enumerate(experts):
            e = rows[rows["expert"] == expert].sort_values("step")
            color = "#d62728" if expert == "fft" else plt.cm.tab10((i + 0) % 10 if i else 0)
            if expert != "fft":
                color = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b"][(i - ("fft" in experts)) % 4]
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
    routing = _routing(data)
    config = getattr(data, "config", None)
    share = routing.groupby(["module_type", "expert"])["won"].mean().unstack().reindex(_type_order(routing["module_type"]))
    fig, ax = _fig_ax(ax, figsize=(6.5, 3.6))
    bottom = np.zeros(len(share))
    for i, expert in enumerate(experts_of(data)):
        color = "#d62728" if expert == "fft" else ["#1f77b4", "#ff7f0e", "#9467bd"][(i - ("fft" in share.columns)) % 3]
        ax.bar([_short_type(t) for t in share.index], share[expert], bottom=bottom, color=color,
               label=expert_label(expert, config))
        bottom += share[expert].to_numpy()
    ax.set_xlabel("module type (projection)")
    ax.set_ylabel("share of (layer, step) decisions won (fraction)")
    ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"Which expert won, by module type\n{run_title(data)}")
    return fig


# ---------------------------------------------------------------------------- loss and stability
def stability_summary(steps: pd.DataFrame, window: int = 5, k: float = 3.0) -> dict:
    """Loss-stability numbers of one run's ``steps`` table.

    rolling std: std of the loss over a trailing window of ``window`` steps (mean and max reported);
    spike: a step whose loss exceeds the mean of the *previous* ``window`` steps by more than ``k`` of
    their std (the spike itself does not inflate the reference). Returns final_loss, min_loss,
    mean_loss_last (last window), rolling_std_mean, rolling_std_max, n_spikes, spike_steps, window, k.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    loss = steps.sort_values("step")["loss"].astype(float).reset_index(drop=True)
    step = steps.sort_values("step")["step"].reset_index(drop=True)
    rolling_std = loss.rolling(window, min_periods=2).std()
    spikes = _spike_mask(loss, window, k)
    return {
        "final_loss": float(loss.iloc[-1]),
        "min_loss": float(loss.min()),
        "mean_loss_last": float(loss.iloc[-window:].mean()),
        "rolling_std_mean": float(rolling_std.mean()) if rolling_std.notna().any() else 0.0,
        "rolling_std_max": float(rolling_std.max()) if rolling_std.notna().any() else 0.0,
        "n_spikes": int(spikes.sum()),
        "spike_steps": [int(s) for s in step[spikes]],
        "window": int(window),
        "k": float(k),
    }


def _spike_mask(loss: pd.Series, window: int, k: float) -> pd.Series:
    previous = loss.shift(1)
    mean = previous.rolling(window, min_periods=window).mean()
    std = previous.rolling(window, min_periods=window).std()
    return (loss > mean + k * std.clip(lower=1e-12)).fillna(False).astype(bool)


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
        spikes = _spike_mask(loss.reset_index(drop=True), window, k).to_numpy()
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
def module_grad_norms(data) -> pd.DataFrame:
    """Per (step, module): the L2 norm of the module's whole gradient (all its experts together)."""
    grads = data.grad_norms if hasattr(data, "grad_norms") else data
    if grads is None or grads.empty:
        raise ValueError("this run has no grad_norms.csv (log_grad_norms was off)")
    squared = grads.assign(sq=grads["grad_norm"].astype(float) ** 2)
    out = squared.groupby(["step", "module", "layer", "module_type"], sort=False)["sq"].sum().reset_index()
    out["grad_norm"] = np.sqrt(out.pop("sq"))
    return out


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
        for i, expert in enumerate(sorted(experts, key=lambda e: (e != "fft", e))):
            right.plot(per.index, per[expert], marker="o", ms=3, label=expert_label(expert, config),
                       color="#d62728" if expert == "fft" else plt.cm.tab10(i))
        right.legend(fontsize=8, title="expert")
    else:
        per = grads.groupby(["layer", "module_type"])["grad_norm"].mean().unstack()
        for i, t in enumerate(_type_order(per.columns)):
            right.plot(per.index, per[t], marker="o", ms=3, label=_short_type(t), color=plt.cm.tab10(i))
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


def metrics_table(runs: dict) -> pd.DataFrame:
    """One row per run: method, primary metric name and value, final loss, stability numbers,
    trainable parameters, optimizer state (MB), median step time (s), peak memory (MB)."""
    records = []
    for label, data in runs.items():
        m = data.metrics or {}
        stab = stability_summary(data.steps)
        primary = m.get("primary_metric")
        records.append({
            "run": label, "method": (data.config or {}).get("method"),
            "primary_metric": primary, "score": (m.get("metrics") or {}).get(primary),
            "final_loss": m.get("final_loss"), "min_loss": stab["min_loss"],
            "rolling_std_mean": stab["rolling_std_mean"], "n_spikes": stab["n_spikes"],
            "trainable_params": m.get("trainable_params"),
            "optimizer_state_mb": (m.get("optimizer_state_bytes") or 0) / 2**20,
            "step_time_s": m.get("step_time_s"), "peak_memory_mb": (m.get("peak_memory_bytes") or 0) / 2**20,
        })
    return pd.DataFrame(records)


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
        routing = _routing(data)
        types = types or _type_order(routing["module_type"])
        share = routing[routing["expert"] == expert].groupby("module_type")["won"].mean().reindex(types)
        x = np.arange(len(types)) + (i - (len(labels) - 1) / 2) * width
        left.bar(x, share.values, width=width, label=label, color=plt.cm.viridis(i / max(1, len(labels) - 1)))
    left.set_xticks(np.arange(len(types)), [_short_type(t) for t in types])
    left.set_ylim(0, 1.05)
    left.set_xlabel("module type (projection)")
    left.set_ylabel(f"share of steps won by {expert_label(expert)} (fraction)")
    left.set_title("Routing")
    left.legend(fontsize=8, title=axis_name, title_fontsize=8)
    left.grid(alpha=0.3, axis="y")

    scores = [((runs[l].metrics or {}).get("metrics") or {}).get((runs[l].metrics or {}).get("primary_metric"))
              for l in labels]
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
    twin.legend(fontsize=8, loc="upper right")
    right.set_title(f"Result: {metric} (bars), final loss (line)")
    fig.suptitle(f"Ablation: {axis_name}")
    return fig


matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.titlesize": 11})
