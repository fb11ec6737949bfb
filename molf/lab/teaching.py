"""Why an expert wins: every routing score broken into its factors, and a classroom app.

EPD (the default score) and PFN are products of a few visible numbers per expert ``e`` of a module::

    EPD  S_e = lr_e  x  1/N_e  x  sum m^2/(sqrt(v)+eps)        (= lr_e * sum_mu / N_e)
    PFN  S_e = sqrt(sum u^2)  x  1/sqrt(N_e)                    (u = m/(sqrt(v)+eps))

with ``lr_e`` the expert's scheduled learning rate, ``N_e`` its number of scalar parameters and ``m``,
``v`` its raw Adam moments after this step's update. ``score_factors(optimizer)`` computes every factor
from the optimizer's state (so it must agree with ``optimizer.last_scores``, which ``score_mismatch``
measures), and the winner each score would pick.

    lesson = teaching.train(teaching.Settings(lr_ratio=3.0, rank=8))   # the tiny model, a few steps, seconds
    lesson.at(step=0, module="model.layers.0.self_attn.q_proj")        # the factor table of one module
    teaching.explain(lesson, step=0, module=...)                        # bars per factor + routing maps
    teaching.Classroom().widget()                                       # sliders retrain and redraw

``train`` takes the runner's steps (``molf.lab.engine.fit``, with ``molf.lab.train.run``'s data order, seed,
schedule, clipping and optimizer), without files or evaluation; results are cached by their settings, so
moving a slider back redraws at once.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

import molf

from ..model import DEFAULT_ALPHA
from ..optim import DEFAULT_BETAS, DEFAULT_EPS
from ..router import top_k_flags
from . import analysis, models, plots, runs, tasks
from . import train as runner
from .engine import Callback, fit

LR_RATIOS = (0.1, 0.3, 1.0, 3.0, 10.0)
RANKS = (4, 8, 16, 32, 64, 128)
ALPHAS = (4.0, 8.0, 16.0, 32.0, 64.0)
SCORE_NAMES = ("epd", "pfn")
# Labels of the factor bars, per score: (column of the factor table, label).
EPD_FACTORS = (("lr", "lr_e (scheduled)"), ("inv_n", "1 / N_e (N_e: parameters)"), ("sum_mu", "Σ m²/(√v+ε)"), ("epd", "S_e (EPD)"))
PFN_FACTORS = (("root_sum_uu", "√(Σ u²)"), ("inv_root_n", "1 / √N_e"), ("pfn", "S_e (PFN)"))


# ---------------------------------------------------------------------------- factors from optimizer state
def score_factors(optimizer, module: str | None = None, topk: int | None = None) -> pd.DataFrame:
    """Every expert's score factors, from ``optimizer``'s state, one row per (module, expert).

    Call it after ``optimizer.step()`` and before the scheduler's step (the learning rate in the table is
    the one the router used). Columns: ``module, layer, module_type, expert, lr`` (the expert's scheduled
    lr), ``n_params`` (N_e), ``sum_mu`` (Σ m²/(√v+ε)), ``sum_uu`` (Σ u²), ``inv_n``, ``inv_root_n``,
    ``root_sum_uu``, ``epd``, ``pfn`` (both scores recomputed, in float64), ``optimizer_score`` (what
    the optimizer reported for the score it uses), ``param_numels`` (size of each parameter of the
    expert: (N_A, N_B) for a LoRA expert), ``n_moving`` (entries whose first moment is non-zero: the
    ones that ever had a gradient), ``won`` (updated this step), ``epd_winner`` and
    ``pfn_winner`` (the top-k each score picks). ``module`` limits the table to one module.
    """
    scores, decisions = optimizer.last_scores, optimizer.last_decisions
    rows = []
    for group in optimizer.param_groups:
        name = group.get("molf_module")
        if name is None or (module is not None and name != module):
            continue
        k = topk if topk is not None else int(group.get("topk", 1))
        eps = float(group["eps"])
        block = []
        for index, expert in enumerate(group["experts"]):
            params = [p for p, e in zip(group["params"], group["param_expert"]) if e == index]
            n = sum(p.numel() for p in params)
            sum_mu = sum_uu = 0.0
            moving = 0
            for p in params:
                state = optimizer.state.get(p, {})
                if "exp_avg" not in state:
                    continue
                m = state["exp_avg"].detach().double()
                u = m / (state["exp_avg_sq"].detach().double().sqrt() + eps)
                sum_mu += float((m * u).sum())
                sum_uu += float((u * u).sum())
                moving += int(torch.count_nonzero(m))
            lr = float(group["lr"]) * float(group["expert_lr_scale"][index])
            block.append({
                "module": name, "layer": runs.module_layer(name), "module_type": runs.module_type(name),
                "expert": expert, "lr": lr, "n_params": n, "param_numels": tuple(p.numel() for p in params),
                "n_moving": moving, "sum_mu": sum_mu, "sum_uu": sum_uu,
                "inv_n": 1.0 / n, "inv_root_n": 1.0 / math.sqrt(n), "root_sum_uu": math.sqrt(sum_uu),
                "epd": lr * sum_mu / n, "pfn": math.sqrt(sum_uu / n),
                "optimizer_score": scores.get(name, {}).get(expert, math.nan),
                "won": expert in decisions.get(name, ()),
            })
        for score in SCORE_NAMES:
            for row, flag in zip(block, top_k_flags([r[score] for r in block], k)):
                row[f"{score}_winner"] = flag
        rows.extend(block)
    if module is not None and not rows:
        raise ValueError(f"module {module!r} is not routed by this optimizer")
    return pd.DataFrame(rows)


def score_mismatch(table: pd.DataFrame, score: str) -> float:
    """Largest relative difference between the recomputed ``score`` column and the optimizer's own."""
    if score not in SCORE_NAMES:
        raise ValueError(f"score must be one of {SCORE_NAMES}, got {score!r}")
    ours, theirs = table[score].to_numpy(float), table["optimizer_score"].to_numpy(float)
    scale = np.maximum(np.abs(ours), np.abs(theirs))
    diff = np.where(scale > 0, np.abs(ours - theirs) / np.where(scale > 0, scale, 1.0), 0.0)
    return float(diff.max())


# ---------------------------------------------------------------------------- words and numbers
def formula_lines(table: pd.DataFrame, score: str) -> list[str]:
    """The score's formula with this module's numbers filled in, one line per expert."""
    lines = []
    for r in table.itertuples():
        if score == "epd":
            lines.append(f"EPD({r.expert}) = {r.lr:.2e} × (1/{r.n_params}) × {r.sum_mu:.3e} = {r.epd:.3e}")
        else:
            lines.append(f"PFN({r.expert}) = √({r.sum_uu:.3e} / {r.n_params}) = {r.pfn:.3e}")
    return lines


def why(table: pd.DataFrame, score: str) -> str:
    """One sentence: which expert ``score`` picks in this module and which factor decided it.

    The score ratio of the winner over the best loser is the product of the factor ratios."""
    winners = table[table[f"{score}_winner"]]
    losers = table[~table[f"{score}_winner"]]
    if losers.empty:
        return f"{score.upper()}: top-k covers every expert, so every expert updates (no routing)"
    w = winners.sort_values(score, ascending=False).iloc[-1]   # the weakest winner ...
    l = losers.sort_values(score, ascending=False).iloc[0]     # ... against the strongest loser
    ratio = w[score] / l[score] if l[score] > 0 else math.inf
    if score == "epd":
        parts = [("lr", w.lr / l.lr), ("1/N", l.n_params / w.n_params),
                 ("Σ m²/(√v+ε)", w.sum_mu / l.sum_mu if l.sum_mu > 0 else math.inf)]
    else:
        parts = [("√Σu²", w.root_sum_uu / l.root_sum_uu if l.root_sum_uu > 0 else math.inf),
                 ("1/√N", math.sqrt(l.n_params / w.n_params))]
    product = " · ".join(f"{name} ×{value:.3g}" for name, value in parts)
    decisive = max(parts, key=lambda p: abs(math.log(p[1])) if 0 < p[1] < math.inf else math.inf)[0]
    return (f"{score.upper()}: {w.expert} beats {l.expert} by ×{ratio:.3g} = {product} "
            f"(largest factor: {decisive})")


# ---------------------------------------------------------------------------- training in-process
@dataclass(frozen=True)
class Settings:
    """One classroom run: the knobs on the sliders and the runner's usual settings (MoLF defaults)."""

    lr_ratio: float = 1.0        # lr_lora / lr_fft
    rank: int = 128
    alpha: float = DEFAULT_ALPHA
    score: str = "epd"
    topk: int = 1
    lr_fft: float = 5e-5
    model: str = "tiny"
    task: str = "fact"
    steps: int = 8
    batch_size: int = 2
    seq_len: int = 48
    seed: int = 0
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    wd_fft: float = 0.1
    wd_lora: float = 0.01
    device: str = "cpu"

    def __post_init__(self):
        if self.score not in SCORE_NAMES:
            raise ValueError(f"score must be one of {SCORE_NAMES}, got {self.score!r}")
        if not (isinstance(self.topk, int) and 1 <= self.topk <= 2):
            raise ValueError(f"topk must be 1 or 2 (one FFT and one LoRA expert), got {self.topk!r}")
        for name in ("lr_ratio", "lr_fft", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        for name in ("rank", "steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def lr_lora(self) -> float:
        return self.lr_fft * self.lr_ratio

    def label(self) -> str:
        return (f"lr_lora/lr_fft={self.lr_ratio:g}, r={self.rank}, alpha={self.alpha:g}, "
                f"{self.score.upper()}, top-{self.topk}")


@dataclass
class Lesson:
    """What ``train`` returns: per-step factor tables, the routing log and the loss of one run."""

    settings: Settings
    factors: pd.DataFrame          # score_factors rows with a ``step`` column (the steps asked for)
    routing: pd.DataFrame          # step, module, layer, module_type, expert, score, won (every step)
    losses: list[float]
    lrs: list[float]               # the FFT expert's scheduled lr at each step
    seconds: float                 # wall time of the training (0 when it came from the cache)
    cached: bool = False
    n_modules: int = field(default=0)

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.routing["step"].unique())

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(self.routing["module"]))

    def module(self, layer: int, module_type: str) -> str:
        hits = [m for m in self.modules if runs.module_layer(m) == layer and runs.module_type(m) == module_type]
        if not hits:
            raise ValueError(f"no routed module at layer {layer}, type {module_type!r}")
        return hits[0]

    def at(self, step: int | None = None, module: str | None = None) -> pd.DataFrame:
        """The factor table at ``step`` (default: the last one recorded), optionally of one module."""
        recorded = sorted(self.factors["step"].unique())
        step = int(recorded[-1]) if step is None else int(step)
        if step not in recorded:
            raise ValueError(f"step {step} has no factor table; recorded steps: {recorded}")
        table = self.factors[self.factors["step"] == step]
        if module is not None:
            table = table[table["module"] == module]
            if table.empty:
                raise ValueError(f"module {module!r} is not routed in this run")
        return table.reset_index(drop=True)

    def win_share(self, expert: str = "lora0", step: int | None = None) -> float:
        """Share of module decisions (at ``step``, or over the whole run) that updated ``expert``."""
        rows = self.routing[self.routing["expert"] == expert]
        if step is not None:
            rows = rows[rows["step"] == step]
        return float(rows["won"].mean())


_BASES: dict = {}
_FEATURES: dict = {}
_LESSONS: dict = {}


def _base(name: str, device: str):
    key = (name, device)
    if key not in _BASES:
        _BASES[key] = models.load(name, device=device)
    return _BASES[key]


def _features(settings: Settings, tokenizer):
    key = (settings.model, settings.task, settings.seq_len)
    if key not in _FEATURES:
        rows = tasks.load(settings.task, "train")
        _FEATURES[key] = tasks.encode(settings.task, rows, tokenizer, max_len=settings.seq_len)
    return _FEATURES[key]


def cached_lessons() -> list[Lesson]:
    """Every run trained so far in this process (the classroom's cache), in training order."""
    return list(_LESSONS.values())


def free_models(keep=("tiny",)) -> list:
    """Forget the loaded base models except ``keep`` (the classroom's tiny one): the lessons (tables)
    stay, a later ``train`` of a forgotten model loads it again. Returns the (model, device) keys dropped."""
    dropped = [key for key in _BASES if key[0] not in keep]
    for key in dropped:
        del _BASES[key]
    for key in [k for k in _FEATURES if k[0] not in keep]:
        del _FEATURES[key]
    return dropped


def clear_cache() -> None:
    """Forget cached runs, models and encoded data."""
    _LESSONS.clear()
    _BASES.clear()
    _FEATURES.clear()


class FactorRecorder(Callback):
    """Keeps, after every optimizer step (before the scheduler moves the learning rates): the loss, the FFT
    expert's lr, every module's scores and decisions, and the full factor table at the ``steps`` asked for."""

    def __init__(self, steps, topk: int):
        self.steps, self.topk = set(steps), topk
        self.losses, self.lrs, self.routing, self.tables = [], [], [], []

    def on_optimizer_step(self, loop):
        optimizer = loop.optimizer
        self.losses.append(loop.loss)
        self.lrs.append(loop.lr)
        decisions, scores = optimizer.last_decisions, optimizer.last_scores
        for name, experts in scores.items():
            for expert, value in experts.items():
                self.routing.append({"step": loop.step, "module": name, "expert": expert, "score": value,
                                     "won": expert in decisions.get(name, ())})
        if loop.step in self.steps:
            self.tables.append(score_factors(optimizer, topk=self.topk).assign(step=loop.step))


def train(settings: Settings | None = None, factor_steps=None, **changes) -> Lesson:
    """Train ``settings`` (``Settings()`` with ``changes`` applied) in-process; return a ``Lesson``.

    The runner's steps (``molf.lab.engine.fit``, as ``molf.lab.train.run`` takes them): its data order
    (``train.example_order``, ``train.micro_batches``), ``torch.manual_seed(seed)`` before wrapping (so the
    LoRA A init is the runner's), its clipping (none for a non-finite norm), its scheduler and MoLFAdamW
    with Adam's default betas and eps. ``factor_steps``: the steps whose full factor table is kept
    (default: every step; the routing log always covers every step). Cached by its arguments.
    """
    settings = dataclasses.replace(settings or Settings(), **changes)
    steps = tuple(range(settings.steps)) if factor_steps is None else tuple(sorted({int(s) for s in factor_steps}))
    key = (settings, steps)
    if key in _LESSONS:
        return dataclasses.replace(_LESSONS[key], cached=True, seconds=0.0)
    base, tokenizer = _base(settings.model, settings.device)
    features = _features(settings, tokenizer)
    order = runner.example_order(len(features), settings.steps * settings.batch_size, settings.seed)
    batches = runner.micro_batches(features, order, settings.batch_size, 1, tokenizer.pad_token_id)

    began = time.perf_counter()
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    model = copy.deepcopy(base)
    molf.wrap(model, ranks=(settings.rank,), alphas=(float(settings.alpha),), rslora=True, dropout=0.0)
    groups = molf.param_groups(model, lr_fft=settings.lr_fft, lr_lora=settings.lr_lora,
                               wd_fft=settings.wd_fft, wd_lora=settings.wd_lora)
    optimizer = molf.MoLFAdamW(groups, score=settings.score, topk=settings.topk, betas=DEFAULT_BETAS,
                               eps=DEFAULT_EPS)
    scheduler = runner.make_scheduler(optimizer, settings.schedule, settings.steps, settings.warmup_ratio)
    recorder = FactorRecorder(steps, settings.topk)
    fit(model, optimizer, batches, steps=settings.steps, scheduler=scheduler, max_grad_norm=settings.max_grad_norm,
        callbacks=[recorder], device=settings.device)
    seconds = time.perf_counter() - began
    routing = pd.DataFrame(recorder.routing)
    routing.insert(2, "layer", routing["module"].map(runs.module_layer))
    routing.insert(3, "module_type", routing["module"].map(runs.module_type))
    factors = pd.concat(recorder.tables, ignore_index=True) if recorder.tables else pd.DataFrame()
    lesson = Lesson(settings, factors, routing, recorder.losses, recorder.lrs, seconds,
                    n_modules=routing["module"].nunique())
    _LESSONS[key] = lesson
    return lesson


# ---------------------------------------------------------------------------- the mechanisms, as numbers
def step_one_pfn(lesson: Lesson) -> pd.DataFrame:
    """At the first step (B = 0, so LoRA's A has no gradient), per module: the measured PFN ratio
    LoRA / FFT, the prediction sqrt(N_B / (N_A + N_B)) and who won under PFN.

    After one step every parameter with a gradient has |m / (sqrt(v) + eps)| = (1-b1) / sqrt(1-b2)
    (up to eps), so PFN only counts which parameters had a gradient: all of W, only B of LoRA."""
    table = lesson.at(0)
    rows = []
    for name, block in table.groupby("module", sort=False):
        fft = block[block["expert"] == "fft"].iloc[0]
        lora = block[block["expert"] == "lora0"].iloc[0]
        n_a, n_b = lora.param_numels
        rows.append({"module": name, "layer": fft.layer, "module_type": fft.module_type, "n_a": n_a, "n_b": n_b,
                     "lora_moving": lora.n_moving, "fft_moving": fft.n_moving, "measured": lora.pfn / fft.pfn,
                     "predicted": math.sqrt(n_b / (n_a + n_b)),
                     "pfn_winner": "fft" if fft.pfn_winner and not lora.pfn_winner else "lora0"})
    out = pd.DataFrame(rows)
    out["rel_dev"] = (out["measured"] / out["predicted"] - 1).abs()
    return out


def lr_tilt(base: Settings, ratios=LR_RATIOS) -> pd.DataFrame:
    """One run per lr ratio: LoRA's win share at the first step and over the run, and the first-step
    EPD of every LoRA expert relative to the ratio-1 run divided by the ratio (1 = exact scaling)."""
    lessons = {r: train(base, lr_ratio=float(r), score="epd") for r in ratios}
    reference = train(base, lr_ratio=1.0, score="epd").at(0)
    ref = reference[reference["expert"] == "lora0"].set_index("module")["epd"]
    ref_fft = reference[reference["expert"] == "fft"].set_index("module")["epd"]
    rows = []
    for r, lesson in lessons.items():
        first = lesson.at(0)
        lora = first[first["expert"] == "lora0"].set_index("module")["epd"]
        fft = first[first["expert"] == "fft"].set_index("module")["epd"]
        rows.append({"lr_ratio": float(r), "lora_share_step0": lesson.win_share("lora0", step=0),
                     "lora_share_run": lesson.win_share("lora0"),
                     "lora_epd_scaling": float((lora / ref / r).max()),
                     "lora_epd_scaling_min": float((lora / ref / r).min()),
                     "fft_epd_change": float((fft / ref_fft).max()),
                     "final_loss": lesson.losses[-1], "seconds": lesson.seconds})
    return pd.DataFrame(rows)


def alpha_tilt(base: Settings, low: float = 32.0, high: float = 64.0) -> pd.DataFrame:
    """Per module, how the first-step LoRA/FFT score ratio changes from alpha ``low`` to ``high`` under EPD
    and under PFN (each from its own run). At the first step B = 0, so LoRA's gradient is proportional to
    its scale alpha/sqrt(r): EPD (not scale-invariant) moves by high/low, PFN (scale-invariant) does not."""
    def ratios(alpha, score):
        first = train(base, alpha=float(alpha), score=score).at(0)
        by = {e: first[first["expert"] == e].set_index("module")[score] for e in ("fft", "lora0")}
        return by["lora0"] / by["fft"]
    out = pd.DataFrame({"epd_change": ratios(high, "epd") / ratios(low, "epd"),
                        "pfn_change": ratios(high, "pfn") / ratios(low, "pfn")}).reset_index()
    out.insert(1, "layer", out["module"].map(runs.module_layer))
    out.insert(2, "module_type", out["module"].map(runs.module_type))
    out.attrs.update(low=float(low), high=float(high))
    return out


# ---------------------------------------------------------------------------- figures
def _bars(ax, table: pd.DataFrame, factors, score: str, in_use: bool):
    experts = list(table["expert"])
    width = 0.8 / len(experts)
    x = np.arange(len(factors))
    for i, row in enumerate(table.itertuples()):
        values = [getattr(row, column) for column, _ in factors]
        won = bool(getattr(row, f"{score}_winner"))
        color = plots.expert_color(row.expert)
        bars = ax.bar(x + (i - (len(experts) - 1) / 2) * width, values, width * 0.95, color=color,
                      alpha=1.0 if won else 0.45, edgecolor="black" if won else color, lw=1.2,
                      label=f"{plots.expert_label(row.expert)}{' (wins)' if won else ''}")
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2g}", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    values = table[[column for column, _ in factors]].to_numpy(float)
    positive = values[values > 0]
    if positive.size:  # room above the bars for their labels and the legend
        ax.set_ylim(positive.min() / 3, positive.max() * 300)
    ax.set_xticks(x, [label for _, label in factors])
    ax.set_ylabel("factor value (log scale)")
    ax.grid(axis="y", alpha=0.3, which="major")
    ax.legend(fontsize=7, loc="upper left", ncol=len(experts))
    used = "the score in use" if in_use else "what it would pick"
    ax.set_title(f"{score.upper()} factors ({used})", fontsize=10)
    ax.text(0.0, -0.13, "\n".join(formula_lines(table, score) + [why(table, score)]), transform=ax.transAxes,
            ha="left", va="top", fontsize=7.5, family="monospace")


def _routing_grids(lesson: Lesson, step: int):
    """(decision code at ``step`` per layer x type: 0 fft, 1 lora0, 2 both, -1 none; FFT win share over the run)."""
    at = lesson.routing[lesson.routing["step"] == step]
    won = at[at["won"]].groupby(["layer", "module_type"])["expert"].agg(lambda e: ",".join(sorted(e)))
    code = won.map(lambda s: 2 if "," in s else (0 if s == "fft" else 1))
    types = analysis.type_order(lesson.routing["module_type"])
    layers = sorted(lesson.routing["layer"].unique())
    decision = code.unstack().reindex(index=layers, columns=types).fillna(-1)
    fft = lesson.routing[lesson.routing["expert"] == "fft"]
    share = fft.groupby(["layer", "module_type"])["won"].mean().unstack().reindex(index=layers, columns=types)
    return decision, share


def _map_axes(ax, grid, layer, module_type):
    types, layers = list(grid.columns), list(grid.index)
    ax.set_xticks(range(len(types)), [plots.short_type(t) for t in types])
    plots.layer_ticks(ax, layers)
    ax.set_xlabel("module type (projection)")
    ax.set_ylabel("decoder layer (index)")
    if layer in layers and module_type in types:
        ax.add_patch(Rectangle((types.index(module_type) - 0.5, layers.index(layer) - 0.5), 1, 1, fill=False,
                               edgecolor="black", lw=2.5))


def explain(lesson: Lesson, step: int | None = None, module: str | None = None):
    """The factor picture of ``module`` at ``step``: EPD and PFN factor bars per expert (log scale, the
    formulas with the numbers filled in, why the winner won), the routing map at that step and the FFT
    expert's win share over the run (layer x module type, the module outlined). Returns the Figure."""
    table = lesson.at(step, module or lesson.modules[0])
    step = int(table["step"].iloc[0])
    name = table["module"].iloc[0]
    layer, module_type = int(table["layer"].iloc[0]), table["module_type"].iloc[0]
    s = lesson.settings
    decision, share = _routing_grids(lesson, step)
    n_layers = len(decision.index)
    fig = plt.figure(figsize=(15, 7.6 + 0.12 * max(0, n_layers - 8)), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1.25, 1], width_ratios=[1.2, 1, 1])
    ax_epd, ax_pfn = fig.add_subplot(grid[0, 0:2]), fig.add_subplot(grid[0, 2])
    ax_loss, ax_map, ax_share = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1]), fig.add_subplot(grid[1, 2])
    _bars(ax_epd, table, EPD_FACTORS, "epd", s.score == "epd")
    _bars(ax_pfn, table, PFN_FACTORS, "pfn", s.score == "pfn")

    # relative to step 0 with a 3-step mean: on a short run of a random model the raw loss is batch noise,
    # and the title says how large the change is against that noise
    change = np.asarray(lesson.losses, dtype=float) - lesson.losses[0]
    smooth = pd.Series(change).rolling(3, min_periods=1).mean()
    noise = float(np.std(np.diff(change))) if len(change) > 2 else 0.0
    ax_loss.plot(range(len(change)), change, color="grey", marker="o", ms=3, lw=0.8, label="per step")
    ax_loss.plot(range(len(change)), smooth, color="black", lw=2, label="3-step mean")
    ax_loss.axhline(0, color="black", lw=0.6)
    ax_loss.axvline(step, color="grey", ls=":", lw=1)
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("loss - loss at step 0 (nats/token)")
    verdict = "a real drop" if smooth.iloc[-1] < -2 * noise else "within batch noise: routing is the lesson here"
    ax_loss.set_title(f"Loss change {smooth.iloc[-1]:+.3f} (step-to-step noise ±{noise:.3f}):\n{verdict}",
                      fontsize=9)
    ax_loss.legend(fontsize=7, loc="lower left")
    ax_loss.grid(alpha=0.3)

    colors = [plots.expert_color(e) for e in ("skipped", "fft", "lora0", "several")]
    ax_map.imshow(decision.to_numpy() + 1, cmap=ListedColormap(colors), vmin=-0.5, vmax=3.5, aspect="auto",
                  interpolation="nearest")
    _map_axes(ax_map, decision, layer, module_type)
    ax_map.legend(handles=[Patch(color=c, label=t) for c, t in zip(colors[1:], ("FFT", "LoRA", "both"))],
                  fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, title_fontsize=7,
                  title="expert updated at this step")
    ax_map.set_title(f"Routing at step {step}", fontsize=10)

    image = ax_share.imshow(share.to_numpy(), cmap=plots.WIN_CMAP, vmin=0, vmax=1, aspect="auto",
                            interpolation="nearest")
    _map_axes(ax_share, share, layer, module_type)
    fig.colorbar(image, ax=ax_share, label="share of steps the FFT expert won (fraction)")
    ax_share.set_title(f"FFT win share over steps 0-{lesson.steps[-1]}", fontsize=10)
    fig.suptitle(f"Why an expert wins: {name.removeprefix('model.')} at step {step} "
                 f"({s.model}, {s.task}; {s.label()})")
    return fig


def pfn_step_one_figure(table: pd.DataFrame):
    """Measured PFN(LoRA)/PFN(FFT) at the first step per module against sqrt(N_B/(N_A+N_B))."""
    fig, ax = plt.subplots(figsize=(9.5, 4.4), layout="constrained")
    labels = [f"{int(r.layer)}.{plots.short_type(r.module_type)}" for r in table.itertuples()]
    x = np.arange(len(table))
    ax.bar(x, table["measured"], 0.6, color=plots.expert_color("lora0"), alpha=0.7, label="measured PFN(LoRA) / PFN(FFT)")
    ax.scatter(x, table["predicted"], color="black", marker="_", s=400, lw=2, label="√(N_B / (N_A + N_B))", zorder=3)
    ax.axhline(1.0, color=plots.expert_color("fft"), ls="--", lw=1, label="1: above it LoRA would win")
    ax.set_xticks(x, labels, rotation=60, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("module (layer.type)")
    ax.set_ylabel("PFN score ratio LoRA / FFT (unitless)")
    ax.set_title("First step under PFN: a fresh LoRA expert scores below the dense weight everywhere")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the bars, never over them
    ax.grid(axis="y", alpha=0.3)
    return fig


def lr_tilt_figure(table: pd.DataFrame):
    """LoRA's win share (first step and whole run) against the lr ratio, log x."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    ax.plot(table["lr_ratio"], table["lora_share_step0"], marker="o", color=plots.expert_color("lora0"), label="first step")
    ax.plot(table["lr_ratio"], table["lora_share_run"], marker="s", color="grey", ls="--", label="whole run")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("lr_lora / lr_fft (ratio, log scale)")
    ax.set_ylabel("module decisions won by LoRA (fraction)")
    ax.set_title("EPD: the learning-rate ratio tilts the router towards LoRA")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def alpha_tilt_figure(table: pd.DataFrame):
    """Per module: the factor by which doubling (say) alpha moved the first-step LoRA/FFT score ratio."""
    low, high = table.attrs.get("low", 32.0), table.attrs.get("high", 64.0)
    fig, ax = plt.subplots(figsize=(9.5, 4.4), layout="constrained")
    labels = [f"{int(r.layer)}.{plots.short_type(r.module_type)}" for r in table.itertuples()]
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["epd_change"], 0.4, color=plots.expert_color("lora0"), label="EPD")
    ax.bar(x + 0.2, table["pfn_change"], 0.4, color="grey", label="PFN")
    ax.axhline(high / low, color=plots.expert_color("lora0"), ls="--", lw=1, label=f"alpha ratio {high / low:g}")
    ax.axhline(1.0, color="black", ls=":", lw=1, label="1: unchanged")
    ax.set_xticks(x, labels, rotation=60, fontsize=8)
    ax.set_xlabel("module (layer.type)")
    ax.set_ylabel("change of LoRA/FFT score ratio (factor)")
    ax.set_title(f"First step, alpha {low:g} → {high:g}: EPD follows LoRA's scale, PFN ignores it")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the bars, never over them
    ax.grid(axis="y", alpha=0.3)
    return fig


# ---------------------------------------------------------------------------- the classroom app
class Classroom:
    """Sliders for lr ratio, LoRA rank, alpha, score and top-k retrain the tiny model (seconds, cached);
    step, layer and module pickers choose what the factor bars show. ``frame()`` is the same picture as
    a plain Figure, for headless runs."""

    def __init__(self, settings: Settings | None = None, ratios=LR_RATIOS, ranks=RANKS, alphas=ALPHAS):
        self.settings = settings or Settings()
        # the run's own values join the sliders' options, so any setting can start the app
        self.ratios = tuple(sorted({*map(float, ratios), float(self.settings.lr_ratio)}))
        self.ranks = tuple(sorted({*map(int, ranks), self.settings.rank}))
        self.alphas = tuple(sorted({*map(float, alphas), float(self.settings.alpha)}))
        self.settings = dataclasses.replace(self.settings, lr_ratio=float(self.settings.lr_ratio),
                                            alpha=float(self.settings.alpha))
        self.lesson = train(self.settings)
        self.step = 0
        self.layer = runs.module_layer(self.lesson.modules[0])
        self.module_type = runs.module_type(self.lesson.modules[0])
        self._widgets = None

    def retrain(self, **changes) -> Lesson:
        self.settings = dataclasses.replace(self.settings, **changes)
        self.lesson = train(self.settings)
        return self.lesson

    def frame(self, step: int | None = None, layer: int | None = None, module_type: str | None = None):
        step = self.step if step is None else step
        module = self.lesson.module(self.layer if layer is None else layer, module_type or self.module_type)
        return explain(self.lesson, step, module)

    def summary(self) -> str:
        lesson = self.lesson
        table = lesson.at(self.step, lesson.module(self.layer, self.module_type))
        how = "from the cache" if lesson.cached else f"retrained in {lesson.seconds:.1f} s"
        return (f"<b>{self.settings.label()}</b> ({how}): LoRA won {lesson.win_share('lora0'):.0%} of module "
                f"decisions, final loss {lesson.losses[-1]:.3f}<br>step {self.step}, "
                f"{table['module'].iloc[0]}: {why(table, 'epd')}<br>{why(table, 'pfn')}")

    def widget(self):
        """The app: training sliders (retrain on release) and view pickers (redraw only)."""
        import ipywidgets as w
        if self._widgets is not None:
            return self._widgets["box"]
        s = self.settings
        wide = w.Layout(width="340px")
        controls = {
            "lr_ratio": w.SelectionSlider(options=list(self.ratios), value=s.lr_ratio, description="lr_lora/lr_fft",
                                          continuous_update=False, layout=wide, style={"description_width": "initial"}),
            "rank": w.SelectionSlider(options=list(self.ranks), value=s.rank, description="LoRA rank",
                                      continuous_update=False, layout=wide),
            "alpha": w.SelectionSlider(options=list(self.alphas), value=float(s.alpha), description="alpha",
                                       continuous_update=False, layout=wide),
            "score": w.ToggleButtons(options=list(SCORE_NAMES), value=s.score, description="score"),
            "topk": w.ToggleButtons(options=[1, 2], value=s.topk, description="top-k"),
        }
        view = {
            "step": w.IntSlider(value=self.step, min=0, max=s.steps - 1, description="step", continuous_update=False),
            "layer": w.Dropdown(options=sorted({runs.module_layer(m) for m in self.lesson.modules}), value=self.layer,
                                description="layer", layout=w.Layout(width="160px")),
            "module_type": w.Dropdown(options=analysis.type_order(runs.module_type(m) for m in self.lesson.modules),
                                      value=self.module_type, description="module", layout=w.Layout(width="200px")),
        }
        info, out = w.HTML(), w.Output()

        def redraw(*_):
            self.step, self.layer, self.module_type = view["step"].value, view["layer"].value, view["module_type"].value
            info.value = self.summary()
            plots.show_in(out, self.frame())

        def retrain(*_):
            self.retrain(**{k: c.value for k, c in controls.items()})
            redraw()

        for control in controls.values():
            control.observe(retrain, names="value")
        for control in view.values():
            control.observe(redraw, names="value")
        redraw()
        box = w.VBox([w.HTML("<b>Classroom</b>: move a slider, the tiny model retrains and the picture redraws"),
                      w.HBox([controls["lr_ratio"], controls["rank"], controls["alpha"]]),
                      w.HBox([controls["score"], controls["topk"]]),
                      w.HBox([view["step"], view["layer"], view["module_type"]]), info, out])
        self._widgets = {"box": box, "info": info, "out": out, **controls, **view}
        return box

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget())
