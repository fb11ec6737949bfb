"""Analysis of run data: the tables behind the figures (routing, switching, settling, stability, metrics).

Every function takes a ``molf.lab.runs.RunData`` (or the DataFrame it names) and returns a DataFrame,
dict or number; nothing here draws (``molf.lab.plots`` draws them). A routing table has one row per
(step, module, expert), as ``molf.lab.runs.read_routing`` returns it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def routing_of(data) -> pd.DataFrame:
    """The routing table of ``data`` (a RunData or the table itself); a clear error when it has none."""
    routing = getattr(data, "routing", data)
    if routing is None or not isinstance(routing, pd.DataFrame) or routing.empty:
        path = getattr(data, "path", "this run")
        raise ValueError(f"{path} has no routing log: only molf and molf_e runs route")
    return routing


def experts_of(data) -> list[str]:
    """Expert names of a routed run, in order (``fft`` first, then ``lora0``, ``lora1``, ...)."""
    names = list(dict.fromkeys(routing_of(data)["expert"]))
    return sorted(names, key=lambda e: (e != "fft", len(e), e))


def default_expert(data) -> str:
    """The expert whose win fraction the routing plots show: ``fft`` if the run has one, else the last
    LoRA expert (MoLF-E)."""
    names = experts_of(data)
    return "fft" if "fft" in names else names[-1]


def type_order(types) -> list[str]:
    """Module types in the decoder's order (q, k, v, o, gate, up, down), unknown ones after, sorted."""
    present = list(dict.fromkeys(types))
    return [t for t in MODULE_TYPES if t in present] + sorted(t for t in present if t not in MODULE_TYPES)


def win_table(data, expert: str | None = None) -> pd.DataFrame:
    """One row per wrapped module: module, layer, module_type, steps, win_fraction of ``expert``."""
    routing = routing_of(data)
    expert = expert or default_expert(data)
    rows = routing[routing["expert"] == expert]
    if rows.empty:
        raise ValueError(f"expert {expert!r} is not in this run; it has {experts_of(data)}")
    table = (rows.groupby(["module", "layer", "module_type"], sort=False)["won"]
             .agg(["mean", "size"]).reset_index().rename(columns={"mean": "win_fraction", "size": "steps"}))
    return table.sort_values(["layer", "module_type"], key=module_sort_key).reset_index(drop=True)


def module_sort_key(column: pd.Series) -> pd.Series:
    """Sort key for ``sort_values(key=...)``: module types in decoder order, other columns as they are."""
    if column.name == "module_type":
        order = {t: i for i, t in enumerate(MODULE_TYPES)}
        return column.map(lambda t: order.get(t, len(order)))
    return column


def heatmap_grid(table: pd.DataFrame, value: str = "win_fraction") -> pd.DataFrame:
    """``table`` (one row per module) as a layer x module-type grid (rows: layers, columns: types)."""
    grid = table.pivot_table(index="layer", columns="module_type", values=value, aggfunc="mean")
    return grid.reindex(columns=type_order(table["module_type"])).sort_index()


def heatmap_cells(data, expert: str | None = None) -> list[dict]:
    """The routing heatmap's data as JSON-ready cells: one per wrapped module
    (``module``, ``layer``, ``module_type``, ``expert``, ``win_fraction``, ``steps``)."""
    expert = expert or default_expert(data)
    table = win_table(data, expert)
    return [{"module": r.module, "layer": int(r.layer), "module_type": r.module_type, "expert": expert,
             "win_fraction": float(r.win_fraction), "steps": int(r.steps)} for r in table.itertuples()]


def overall_win_share(data) -> dict[str, float]:
    """Expert -> share of all (module, step) decisions it won."""
    routing = routing_of(data)
    per = routing.groupby("expert")["won"].mean()
    return {e: float(per[e]) for e in experts_of(data)}


def windowed_win_fraction(data, expert: str | None = None, windows: int = 8) -> pd.DataFrame:
    """Win fraction of ``expert`` per window of consecutive steps, per module.

    Columns: window, step_start, step_end (inclusive), module, layer, module_type, win_fraction.
    ``windows`` is capped at the number of logged steps.
    """
    routing = routing_of(data)
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
    routing = routing_of(data)
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
    return table.sort_values(["layer", "module_type"], key=module_sort_key).reset_index(drop=True)


def busiest_module(data) -> str:
    """The module whose winner changed most often (most ``switches`` in ``switch_table``); among equals,
    the first in decoder order (layer, then module type). The explorer and the score traces open on it."""
    table = switch_table(data)
    return str(table.loc[table["switches"].idxmax(), "module"])


def agreement_with_final(data, final_fraction: float = 0.5) -> pd.DataFrame:
    """How early routing settles: per step, the share of modules whose winner set equals that module's
    most frequent winner set over the last ``final_fraction`` of training (its "final" routing).

    Columns: step, agreement (fraction of modules). A curve that reaches ~1 early and stays there means
    early specialisation (paper claim 4); a curve near the chance level means routing keeps changing.
    Ties for the most frequent winner set go to the set seen last.
    """
    if not 0.0 < final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction!r}")
    routing = routing_of(data)
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


def score_table(data, modules) -> pd.DataFrame:
    """Scores of every expert of ``modules`` over steps: step, module, expert, score, log10_score, won."""
    routing = routing_of(data)
    rows = routing[routing["module"].isin(list(modules))].copy()
    with np.errstate(divide="ignore"):
        rows["log10_score"] = np.log10(rows["score"].where(rows["score"] > 0))
    return rows[["step", "module", "layer", "module_type", "expert", "score", "log10_score", "won"]]


def pick_trace_modules(data, n: int = 3, expert: str | None = None) -> list[str]:
    """Modules worth tracing: the one that switched most, the most ``expert``-dominated, the least, then
    spread over layers. Deterministic."""
    wins = win_table(data, expert).set_index("module")
    picked: list[str] = []

    def add(module):
        if module not in picked and len(picked) < n:
            picked.append(module)

    add(busiest_module(data))
    add(wins["win_fraction"].sort_values(ascending=False, kind="stable").index[0])
    add(wins["win_fraction"].sort_values(ascending=True, kind="stable").index[0])
    for module in wins.index[np.linspace(0, len(wins) - 1, num=max(n, 1)).round().astype(int)]:
        add(module)
    return picked


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
    spikes = spike_mask(loss, window, k)
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


def spike_mask(loss: pd.Series, window: int, k: float) -> pd.Series:
    previous = loss.shift(1)
    mean = previous.rolling(window, min_periods=window).mean()
    std = previous.rolling(window, min_periods=window).std()
    return (loss > mean + k * std.clip(lower=1e-12)).fillna(False).astype(bool)


def module_grad_norms(data) -> pd.DataFrame:
    """Per (step, module): the L2 norm of the module's whole gradient (all its experts together)."""
    grads = data.grad_norms if hasattr(data, "grad_norms") else data
    if grads is None or grads.empty:
        raise ValueError("this run has no grad_norms.csv (log_grad_norms was off)")
    squared = grads.assign(sq=grads["grad_norm"].astype(float) ** 2)
    out = squared.groupby(["step", "module", "layer", "module_type"], sort=False)["sq"].sum().reset_index()
    out["grad_norm"] = np.sqrt(out.pop("sq"))
    return out


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
            "primary_metric": primary, "score": primary_score(m),
            "final_loss": m.get("final_loss"), "min_loss": stab["min_loss"],
            "rolling_std_mean": stab["rolling_std_mean"], "n_spikes": stab["n_spikes"],
            "trainable_params": m.get("trainable_params"),
            "optimizer_state_mb": (m.get("optimizer_state_bytes") or 0) / 2**20,
            "step_time_s": m.get("step_time_s"), "peak_memory_mb": (m.get("peak_memory_bytes") or 0) / 2**20,
        })
    return pd.DataFrame(records)


def primary_score(metrics: dict | None) -> float | None:
    """The value of a run's primary metric from its ``metrics.json`` (None when it has none)."""
    metrics = metrics or {}
    return (metrics.get("metrics") or {}).get(metrics.get("primary_metric"))


def takeaway(data, expert: str | None = None) -> str:
    """The run's routing in one Markdown paragraph, every number computed from ``data``: the tracked
    expert's share of all decisions, the module types it won most and least, and how often modules switched.
    A notebook shows it below its figures (``notebook.Notebook.takeaway``), so its text states what this
    run did, not what some earlier run did."""
    from .plots import expert_label  # the figures' names for the experts
    expert = expert or default_expert(data)
    config = getattr(data, "config", None)
    name = expert_label(expert, config)
    table = win_table(data, expert)
    by_type = table.groupby("module_type")["win_fraction"].mean().reindex(type_order(table["module_type"]))
    top = ", ".join(f"`{t}`" for t in by_type.index if by_type[t] == by_type.max())   # ties named together
    low = ", ".join(f"`{t}`" for t in by_type.index if by_type[t] == by_type.min())
    share = overall_win_share(data)[expert]
    switches = switch_table(data)["switch_rate"].mean()
    routing = routing_of(data)
    steps = routing["step"].nunique()
    settled = "the winners barely move after the first steps" if switches < 0.1 else \
        "the winners still change often, so read the map as a running average"
    return (f"**In this run** ({steps} steps): the {name} won **{share:.0%}** of all module decisions; "
            f"most in {top} (**{by_type.max():.0%}** of their steps, mean over layers) and least in {low} "
            f"(**{by_type.min():.0%}**). The mean switch rate is {switches:.3f} per step: {settled}.")


@dataclass(frozen=True)
class RoutingGrid:
    """A routed run's decisions as [step, layer, module type] arrays (what the explorers draw).

    winner      index into ``experts`` of the cell's winner (the lowest index when several won, as the
                router breaks ties), -1 where no expert won
    score       [..., expert] every expert's score (NaN: not recorded)
    won         1 where ``expert`` (the tracked one) won, else 0
    cumulative  the tracked expert's share of steps won so far
    """

    steps: np.ndarray
    layers: list
    types: list
    experts: list
    expert: str
    modules: dict            # (layer, module type) -> module name
    winner: np.ndarray
    score: np.ndarray
    won: np.ndarray
    cumulative: np.ndarray


def routing_grid(data, expert: str | None = None) -> RoutingGrid:
    """``data``'s routing (a RunData or its routing table) as a ``RoutingGrid``; ``expert`` is the tracked
    expert (default: ``default_expert``)."""
    routing = routing_of(data)
    experts = experts_of(routing)
    expert = expert or default_expert(routing)
    steps = np.sort(routing["step"].unique())
    layers = sorted(int(x) for x in routing["layer"].unique())
    types = type_order(routing["module_type"])
    modules = (routing[["module", "layer", "module_type"]].drop_duplicates("module")
               .set_index(["layer", "module_type"])["module"].to_dict())
    shape = (len(steps), len(layers), len(types))
    s = routing["step"].map({x: i for i, x in enumerate(steps)}).to_numpy()
    l = routing["layer"].map({x: i for i, x in enumerate(layers)}).to_numpy()
    t = routing["module_type"].map({x: i for i, x in enumerate(types)}).to_numpy()
    e = routing["expert"].map({x: i for i, x in enumerate(experts)}).to_numpy()
    score = np.full(shape + (len(experts),), np.nan)
    score[s, l, t, e] = routing["score"].to_numpy(dtype=float)
    won_any = routing["won"].to_numpy(dtype=bool)
    winner = np.full(shape, -1, dtype=int)
    order = np.argsort(-e[won_any], kind="stable")  # the lowest winning index written last, so it stays
    winner[s[won_any][order], l[won_any][order], t[won_any][order]] = e[won_any][order]
    won = np.zeros(shape, dtype=float)
    tracked = won_any & (e == experts.index(expert))
    won[s[tracked], l[tracked], t[tracked]] = 1.0
    cumulative = np.cumsum(won, axis=0) / np.arange(1, len(steps) + 1)[:, None, None]
    return RoutingGrid(steps, layers, types, experts, expert, modules, winner, score, won, cumulative)
