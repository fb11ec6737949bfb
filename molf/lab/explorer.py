"""Router explorer: an ipywidgets app for JupyterLab over MoLF runs, plus a live training view.

    from molf.lab.explorer import RouterExplorer, explore, live
    RouterExplorer("runs/train/<run>")      # one run: step slider, layer / module-type pickers
    explore("runs")                         # pick any routed run found under a folder
    live(TrainConfig(...))                  # train in this kernel, redraw the routing map every step
    LiveRun(TrainConfig(...)).widget()      # the same with Stop / Resume (training in a background thread)

Every view is also a plain function that returns a matplotlib Figure (``frame``, ``render_final_frame``,
``live_frame``), so a headless run (papermill, CI) still produces the pictures.

A frame has three panels:
1. the routing map at the chosen step: every wrapped module (layer x module type) coloured by the expert
   it updated at that step, or by the share of steps up to it that ``expert`` won (mode "cumulative");
   the selected module is outlined;
2. the selected module's routing scores over training (log10), with the chosen step marked;
3. the scores of every module type of the selected layer at the chosen step (the winner is filled).
"""
from __future__ import annotations

import csv
import dataclasses
import html
import io
import math
import os
import threading
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .. import routing_log
from . import analysis, plots, runs
from .engine import Callback

MODES = ("decision at step", "cumulative win share")


def find_runs(folder) -> list[Path]:
    """Run directories with a routing log under ``folder`` (recursively), newest first."""
    folder = Path(folder)
    found = [p.parent for p in folder.rglob("routing.jsonl") if (p.parent / "config.json").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


class RouterExplorer:
    """Scrub through one routed run's decisions and scores (see the module docstring)."""

    def __init__(self, run_dir, expert: str | None = None):
        self.run_dir = Path(run_dir)
        self.data = runs.load(self.run_dir)
        grid = analysis.routing_grid(self.data, expert)
        self.expert, self.experts, self.steps, self.layers, self.types, self.modules = (
            grid.expert, grid.experts, grid.steps, grid.layers, grid.types, grid.modules)
        # [step, layer, type] arrays: index of the (first) winning expert, and the tracked expert's wins.
        self.winner, self.score, self.won, self.cumulative = grid.winner, grid.score, grid.won, grid.cumulative
        self._widgets = None

    # ------------------------------------------------------------------ pictures
    def frame(self, step: int | None = None, layer: int | None = None, module_type: str | None = None,
              mode: str = MODES[0]):
        """The three-panel picture at ``step`` (default: the last) for the selected module."""
        step = int(self.steps[-1] if step is None else step)
        si = self._step_index(step)
        layer = self.layers[0] if layer is None else int(layer)
        module_type = module_type or self.types[0]
        if layer not in self.layers or module_type not in self.types:
            raise ValueError(f"no module at layer {layer}, type {module_type!r}")
        li, ti = self.layers.index(layer), self.types.index(module_type)
        config = self.data.config

        height = max(4.2, 1.4 + 0.2 * len(self.layers))
        fig = plt.figure(figsize=(14, height), layout="constrained")
        grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.35], height_ratios=[1, 1])
        ax_map = fig.add_subplot(grid[:, 0])
        ax_trace = fig.add_subplot(grid[0, 1])
        ax_layer = fig.add_subplot(grid[1, 1])

        # 1. routing map
        if mode == MODES[0]:
            colors = [plots.expert_color(e) for e in self.experts]
            cmap = ListedColormap([plots.expert_color("skipped")] + colors)
            image = ax_map.imshow(self.winner[si] + 1, cmap=cmap, vmin=-0.5, vmax=len(self.experts) + 0.5,
                                  aspect="auto", interpolation="nearest")
            # a discrete colour bar where the cumulative mode has its continuous one: switching modes keeps the
            # map in place, and nothing sits below the x label
            bar = fig.colorbar(image, ax=ax_map, ticks=range(len(self.experts) + 1),
                               label="expert updated at this step")
            bar.ax.set_yticklabels(["none (skipped)"] + [plots.expert_label(e, config) for e in self.experts],
                                   fontsize=8)
            bar.ax.tick_params(length=0)
            ax_map.set_title(f"Routing decisions at step {step}")
        else:
            image = ax_map.imshow(self.cumulative[si], cmap=plots.WIN_CMAP, vmin=0, vmax=1, aspect="auto",
                                  interpolation="nearest")
            bar = fig.colorbar(image, ax=ax_map, label=f"share of steps 0..{step} won by "
                                                       f"{plots.expert_label(self.expert, config)} (fraction)")
            ax_map.set_title(f"Cumulative win share up to step {step}")
        # the bar's label on the map's side, so it is not read as the y label of the panels to its right
        bar.ax.yaxis.set_label_position("left")
        plots.layer_ticks(ax_map, self.layers, self.types)
        ax_map.set_xlabel("module type (projection)")
        ax_map.set_ylabel("decoder layer (index)")
        ax_map.add_patch(Rectangle((ti - 0.5, li - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.5))

        # 2. score trace of the selected module
        module = self.modules.get((layer, module_type), f"layer {layer} {module_type}")
        for ei, expert in enumerate(self.experts):
            with np.errstate(divide="ignore", invalid="ignore"):
                trace = np.log10(self.score[:, li, ti, ei])
            color = plots.expert_color(expert)
            ax_trace.plot(self.steps, trace, color=color, lw=1.2, label=plots.expert_label(expert, config))
            won = self.winner[:, li, ti] == ei
            ax_trace.scatter(self.steps[won], trace[won], color=color, s=12, zorder=3)
        ax_trace.axvline(step, color="black", ls=":", lw=1)
        ax_trace.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_trace.set_xlabel("training step")
        ax_trace.set_ylabel("log10 routing score")
        ax_trace.set_title(f"Scores of {module.removeprefix('model.')} (dot: won)", fontsize=10)
        ax_trace.legend(fontsize=7, loc="best")
        ax_trace.grid(alpha=0.3)

        # 3. the selected layer at this step
        offset = 0.12
        for ei, expert in enumerate(self.experts):
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.log10(self.score[si, li, :, ei])
            x = np.arange(len(self.types)) + (ei - (len(self.experts) - 1) / 2) * offset
            won = self.winner[si, li, :] == ei
            color = plots.expert_color(expert)
            ax_layer.scatter(x[won], values[won], s=60, color=color, edgecolor=color,
                             label=f"{plots.expert_label(expert, config)} (filled: won)")
            ax_layer.scatter(x[~won], values[~won], s=60, facecolor="white", edgecolor=color, lw=1.5)
        ax_layer.axvspan(ti - 0.5, ti + 0.5, color="grey", alpha=0.15)
        ax_layer.set_xticks(range(len(self.types)), [plots.short_type(t) for t in self.types])
        ax_layer.set_xlim(-0.5, len(self.types) - 0.5)
        ax_layer.set_xlabel("module type (projection)")
        ax_layer.set_ylabel("log10 routing score")
        ax_layer.set_title(f"Every module of layer {layer} at step {step}", fontsize=10)
        ax_layer.legend(fontsize=7)
        ax_layer.grid(alpha=0.3)
        fig.suptitle(f"Router explorer: {plots.run_title(self.data)} ({str(config.get('score', '')).upper()})")
        return fig

    def render_final_frame(self, mode: str = MODES[1], layer: int | None = None, module_type: str | None = None):
        """The picture at the last logged step (for headless runs); default module: the most switching."""
        if layer is None or module_type is None:
            layer, module_type = self.render_defaults()
        return self.frame(int(self.steps[-1]), layer, module_type, mode)

    # ------------------------------------------------------------------ numbers of one frame
    def frame_table(self, step: int, layer: int | None = None, module_type: str | None = None):
        """The numbers behind the frame at ``step``: one row per (module, expert) with its score, whether it
        won at that step and the tracked expert's cumulative win share up to it (a pandas DataFrame)."""
        import pandas as pd
        si = self._step_index(step)
        rows = []
        for li, layer_ in enumerate(self.layers):
            for ti, kind in enumerate(self.types):
                for ei, expert in enumerate(self.experts):
                    score = self.score[si, li, ti, ei]
                    rows.append({"step": int(step), "module": self.modules.get((layer_, kind), ""), "layer": layer_,
                                 "module_type": kind, "expert": expert,
                                 "score": None if math.isnan(score) else float(score),
                                 "won": bool(self.winner[si, li, ti] == ei),
                                 f"{self.expert}_cumulative_win_share": float(self.cumulative[si, li, ti])})
        return pd.DataFrame(rows)

    def save_frame(self, folder, step: int | None = None, layer: int | None = None,
                   module_type: str | None = None, mode: str = MODES[0]) -> tuple[Path, Path]:
        """Write the frame as ``<folder>/<run>_step<step>_<module>.png`` and its numbers (``frame_table``)
        beside it as ``.csv``; returns both paths."""
        step = int(self.steps[-1] if step is None else step)
        layer = self.layers[0] if layer is None else int(layer)
        module_type = module_type or self.types[0]
        fig = self.frame(step, layer, module_type, mode)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return _write_frame(fig, self.frame_table(step), folder / f"{self.run_dir.name}_step{step}_layer{layer}_{module_type}")

    def _step_index(self, step: int) -> int:
        si = int(np.searchsorted(self.steps, step))
        if si >= len(self.steps) or self.steps[si] != step:
            raise ValueError(f"step {step} is not in this run's routing log (steps {self.steps[0]}..{self.steps[-1]})")
        return si

    # ------------------------------------------------------------------ widgets
    def widget(self, save_dir="explorer_frames", interval: float = 0.3):
        """The interactive app: step slider with Play, layer and module-type pickers, mode, and "save this
        frame" (PNG and CSV into ``save_dir``). Play draws every logged step: the next step is set only
        ``interval`` seconds after the last frame has been drawn, so a slow redraw slows Play down instead of
        skipping frames."""
        if self._widgets is not None:
            return self._widgets["box"]
        self._widgets = _StepControls(self, [self], save_dir, interval).widgets
        return self._widgets["box"]

    def _info(self, step: int, layer: int, module_type: str) -> str:
        si = self._step_index(step)
        li, ti = self.layers.index(layer), self.types.index(module_type)
        scores = ", ".join(f"{e}: {self.score[si, li, ti, k]:.3e}" for k, e in enumerate(self.experts))
        winner = self.winner[si, li, ti]
        return (f"<b>{self.modules.get((layer, module_type), '')}</b> at step {step}: "
                f"winner <b>{self.experts[winner] if winner >= 0 else 'none (skipped)'}</b>; "
                f"scores {scores}; {self.expert} won {self.cumulative[si, li, ti]:.0%} of steps so far")

    def render_defaults(self) -> tuple[int, str]:
        """(layer, module type) of the module whose winner changed most often (``analysis.busiest_module``)."""
        busiest = analysis.busiest_module(self.data)
        return runs.module_layer(busiest), runs.module_type(busiest)

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget())


def _png(fig) -> bytes:
    """A figure as PNG bytes (as the inline backend shows it), closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


class _StepControls:
    """The controls shared by ``RouterExplorer.widget`` and ``CompareExplorer.widget``: one step slider over
    the steps every app has, Play (each frame drawn before the next is asked for), layer, module type, mode
    and "save this frame". ``apps``: the RouterExplorers whose ``_info`` lines are shown; ``owner``: what
    draws (``frame(step, layer, module_type, mode)``) and saves (``save_frame(folder, ...)``)."""

    def __init__(self, owner, apps, save_dir, interval: float):
        import ipywidgets as w
        if not (isinstance(interval, (int, float)) and interval >= 0):
            raise ValueError(f"interval must be a number of seconds >= 0, got {interval!r}")
        self.owner, self.apps, self.save_dir, self.interval = owner, apps, Path(save_dir), float(interval)
        self.steps = [int(x) for x in owner.steps]
        self.drawn: list[int] = []    # the steps drawn, in order (Play's record: none skipped)
        self._lock = threading.RLock()
        self._playing = False
        default = apps[0].render_defaults()
        self.step = w.SelectionSlider(options=self.steps, value=self.steps[-1], description="step",
                                      continuous_update=False, layout=w.Layout(width="420px"))
        self.play = w.Button(description="Play", icon="play", layout=w.Layout(width="90px"))
        self.layer = w.Dropdown(options=apps[0].layers, value=default[0], description="layer",
                                layout=w.Layout(width="160px"))
        self.module_type = w.Dropdown(options=apps[0].types, value=default[1], description="module",
                                      layout=w.Layout(width="200px"))
        # wide enough for the longer label ("cumulative win share"), which the default width cuts off
        self.mode = w.ToggleButtons(options=MODES, value=MODES[0], style={"button_width": "190px"})
        self.save = w.Button(description="save this frame", icon="download", layout=w.Layout(width="150px"))
        self.saved = w.HTML()
        self.info = w.HTML()
        self.image = w.Image(format="png")
        self.out = w.Output()
        with self.out:
            from IPython.display import display
            display(self.image)
        for control in (self.step, self.layer, self.module_type, self.mode):
            control.observe(self.redraw, names="value")
        self.play.on_click(self.toggle_play)
        self.save.on_click(self.save_frame)
        self.redraw()
        title = " | ".join(f"<b>{plots.run_title(a.data)}</b> ({str(a.data.config.get('score', '')).upper()})"
                           for a in apps)
        box = w.VBox([w.HTML(title), w.HBox([self.play, self.step, self.layer, self.module_type]),
                      w.HBox([self.mode, self.save]), self.saved, self.info, self.out])
        self.widgets = {"box": box, "step": self.step, "play": self.play, "layer": self.layer,
                        "module_type": self.module_type, "mode": self.mode, "save": self.save, "saved": self.saved,
                        "info": self.info, "out": self.out, "image": self.image, "controls": self}

    def redraw(self, *_):
        with self._lock:
            step, layer, kind = self.step.value, self.layer.value, self.module_type.value
            self.image.value = _png(self.owner.frame(step, layer, kind, self.mode.value))
            self.info.value = "<br>".join(a._info(step, layer, kind) for a in self.apps)
            self.drawn.append(step)

    # Play: a timer sets the next step only after the frame of this one has been drawn
    def toggle_play(self, *_):
        if self._playing:
            self.pause()
            return
        self._playing = True
        self.play.description, self.play.icon = "Pause", "pause"
        if self.step.value == self.steps[-1]:
            self.step.value = self.steps[0]   # drawn here, before the timer asks for the next
        self._schedule()

    def pause(self):
        self._playing = False
        self.play.description, self.play.icon = "Play", "play"

    @property
    def playing(self) -> bool:
        return self._playing

    def _schedule(self):
        timer = threading.Timer(self.interval, self._advance)
        timer.daemon = True
        timer.start()

    def _advance(self):
        with self._lock:
            if not self._playing:
                return
            i = self.steps.index(self.step.value)
            if i + 1 >= len(self.steps):
                self.pause()
                return
            self.step.value = self.steps[i + 1]   # redraws (in this thread) before returning
            if i + 2 >= len(self.steps):
                self.pause()
                return
        self._schedule()

    def save_frame(self, *_) -> tuple[Path, Path]:
        png, table = self.owner.save_frame(self.save_dir, self.step.value, self.layer.value,
                                           self.module_type.value, self.mode.value)
        self.saved.value = f"saved {html.escape(str(png.resolve()))} and {html.escape(table.name)}"
        print(f"saved {png} and {table}")
        return png, table


class CompareExplorer:
    """Two routed runs side by side under one set of controls (step, Play, layer, module type, mode, save):
    each run's routing map at the step, and their difference (run A minus run B) of the tracked expert's
    cumulative win share up to that step. The runs must route the same modules (same model); the steps
    are those both logged.

        CompareExplorer("runs/train/<epd run>", "runs/train/<pfn run>").widget()
    """

    def __init__(self, run_a, run_b, expert: str | None = None):
        self.a = run_a if isinstance(run_a, RouterExplorer) else RouterExplorer(run_a, expert)
        self.b = run_b if isinstance(run_b, RouterExplorer) else RouterExplorer(run_b, expert or self.a.expert)
        if (self.a.layers, self.a.types) != (self.b.layers, self.b.types):
            raise ValueError(f"the runs route different modules: {self.a.run_dir} has layers {self.a.layers} "
                             f"x {self.a.types}, {self.b.run_dir} has {self.b.layers} x {self.b.types}")
        if self.a.expert != self.b.expert:
            raise ValueError(f"the runs track different experts ({self.a.expert!r}, {self.b.expert!r}); "
                             "pass expert=")
        self.expert = self.a.expert
        self.steps = np.array(sorted(set(self.a.steps.tolist()) & set(self.b.steps.tolist())))
        if not len(self.steps):
            raise ValueError("the two runs have no logged step in common")
        self.run_dir = Path(f"{self.a.run_dir.name}_vs_{self.b.run_dir.name}")
        self._widgets = None

    def difference(self, step: int) -> np.ndarray:
        """[layer, module type] array: run A's cumulative win share of the tracked expert up to ``step``
        minus run B's."""
        return self.a.cumulative[self.a._step_index(step)] - self.b.cumulative[self.b._step_index(step)]

    def frame(self, step: int | None = None, layer: int | None = None, module_type: str | None = None,
              mode: str = MODES[0]):
        """Three maps at ``step``: run A, run B (decisions or cumulative share, as ``mode``) and A - B."""
        step = int(self.steps[-1] if step is None else step)
        layer = self.a.layers[0] if layer is None else int(layer)
        module_type = module_type or self.a.types[0]
        li, ti = self.a.layers.index(layer), self.a.types.index(module_type)
        height = max(4.0, 1.6 + 0.2 * len(self.a.layers))
        fig, axes = plt.subplots(1, 3, figsize=(15, height), layout="constrained")
        for ax, app, name in ((axes[0], self.a, "A"), (axes[1], self.b, "B")):
            si = app._step_index(step)
            config = app.data.config
            label = f"{name}: {plots.run_title(app.data)} ({str(config.get('score', '')).upper()})"
            if mode == MODES[0]:
                cmap = ListedColormap([plots.expert_color("skipped")] + [plots.expert_color(e) for e in app.experts])
                image = ax.imshow(app.winner[si] + 1, cmap=cmap, vmin=-0.5, vmax=len(app.experts) + 0.5,
                                  aspect="auto", interpolation="nearest")
                bar = fig.colorbar(image, ax=ax, ticks=range(len(app.experts) + 1), shrink=0.8)
                bar.ax.set_yticklabels(["none"] + [plots.expert_label(e, config) for e in app.experts], fontsize=8)
            else:
                image = ax.imshow(app.cumulative[si], cmap=plots.WIN_CMAP, vmin=0, vmax=1, aspect="auto",
                                  interpolation="nearest")
                fig.colorbar(image, ax=ax, shrink=0.8, label=f"{self.expert} win share so far (fraction)")
            ax.set_title(label, fontsize=9)
        diff = self.difference(step)
        image = axes[2].imshow(diff, cmap="PuOr_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=axes[2], shrink=0.8, label=f"A - B: {self.expert} win share so far (fraction)")
        axes[2].set_title(f"difference A - B up to step {step} (mean |A-B| {np.abs(diff).mean():.2f})", fontsize=9)
        for ax in axes:
            plots.layer_ticks(ax, self.a.layers, list(self.a.types))
            ax.set_xlabel("module type (projection)")
            ax.add_patch(Rectangle((ti - 0.5, li - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.5))
        axes[0].set_ylabel("decoder layer (index)")
        fig.suptitle(f"Two runs at step {step}" + (" (decisions)" if mode == MODES[0] else " (cumulative)"))
        return fig

    def frame_table(self, step: int, *_):
        """Both runs' numbers at ``step`` (``RouterExplorer.frame_table``), a ``run`` column naming A and B."""
        import pandas as pd
        return pd.concat([self.a.frame_table(step).assign(run="A: " + self.a.run_dir.name),
                          self.b.frame_table(step).assign(run="B: " + self.b.run_dir.name)], ignore_index=True)

    def save_frame(self, folder, step: int | None = None, layer: int | None = None,
                   module_type: str | None = None, mode: str = MODES[0]) -> tuple[Path, Path]:
        """Write the three maps as a PNG and both runs' numbers as a CSV into ``folder``."""
        step = int(self.steps[-1] if step is None else step)
        fig = self.frame(step, layer, module_type, mode)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return _write_frame(fig, self.frame_table(step), folder / f"compare_{self.run_dir.name}_step{step}")

    def render_defaults(self) -> tuple[int, str]:
        return self.a.render_defaults()

    def widget(self, save_dir="explorer_frames", interval: float = 0.3):
        """The app: the step slider with Play, pickers, mode and "save this frame", driving both runs."""
        if self._widgets is not None:
            return self._widgets["box"]
        self._widgets = _StepControls(self, [self.a, self.b], save_dir, interval).widgets
        return self._widgets["box"]

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget())


def _write_frame(fig, table, stem: Path) -> tuple[Path, Path]:
    """``fig`` as ``<stem>.png`` and ``table`` as ``<stem>.csv`` (the "save this frame" button's files)."""
    png, csv = stem.with_suffix(".png"), stem.with_suffix(".csv")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    table.to_csv(csv, index=False)
    return png, csv


def _show(fig):
    from IPython.display import display
    display(fig)
    plt.close(fig)


def explore(folder):
    """A run picker over every routed run under ``folder`` with a ``RouterExplorer`` below it."""
    import ipywidgets as w
    found = find_runs(folder)
    if not found:
        raise ValueError(f"no routed runs (routing.jsonl) under {folder}; train a molf or molf_e run first")
    picker = w.Dropdown(options=[(f"{label}  [{p.name}]", p) for label, p in zip(run_labels(found), found)],
                        description="run", layout=w.Layout(width="820px"))
    holder = w.VBox()

    def load(*_):
        holder.children = [RouterExplorer(picker.value).widget()]

    picker.observe(load, names="value")
    load()
    return w.VBox([picker, holder])


# what every run picker label shows; the other fields appear only where the listed runs differ in them
_ALWAYS = ("method", "model", "task", "steps")


def run_labels(paths) -> list[str]:
    """One label per run directory: method, model, task and steps, then every other field that defines
    a run (``train.run_identity``) in which the listed runs differ, e.g. ``lr_lora=0.0005``; "(unfinished)"
    for a run without metrics.json."""
    import json

    from .train import run_identity
    configs = [run_identity(json.loads((Path(p) / "config.json").read_text())) for p in paths]
    keys = sorted({k for c in configs for k in c} - set(_ALWAYS))
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    labels = []
    for path, c in zip(paths, configs):
        extra = "".join(f" {k}={_value(c.get(k))}" for k in differ)
        done = "" if (Path(path) / "metrics.json").is_file() else " (unfinished)"
        labels.append(f"{plots.method_label(c['method'])} {c['model']} {c['task']} {c['steps']} steps{extra}{done}")
    return labels


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------- live training
def live_frame(data, expert: str | None = None):
    """Routing map (cumulative win share so far) and the loss so far of a run on disk (``runs.load``)."""
    expert = expert or analysis.default_expert(data)
    n_layers = data.routing["layer"].nunique()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3.8, 1.2 + 0.22 * n_layers)), layout="constrained",
                                      gridspec_kw={"width_ratios": [1, 1.2]})
    steps_done = int(data.steps["step"].max()) + 1
    total = data.config.get("steps")
    plots.routing_heatmap(data, expert, ax=left, title=f"Win share so far (steps 0..{steps_done - 1})")
    right.plot(data.steps["step"], data.steps["loss"], color="black", marker="o", ms=3)
    right.set_xlim(-0.5, max(total or steps_done, steps_done) - 0.5)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("training step")
    right.set_ylabel("training loss (nats/token)")
    right.set_title("Loss so far")
    right.grid(alpha=0.3)
    fig.suptitle(f"Live: {plots.run_title(data)}, {steps_done}/{total} steps done")
    return fig


class LiveRecord(Callback):
    """What a live frame shows, kept as the run trains: every step's loss and, per module, how many steps
    each expert won (counts, so memory does not grow with the routing of every step)."""

    def __init__(self, optimizer, start_step: int = 0):
        groups = [g for g in optimizer.param_groups if "molf_module" in g]
        self.modules = [g["molf_module"] for g in groups]
        self.experts = list(dict.fromkeys(e for g in groups for e in g["experts"]))
        self.layers = sorted({runs.module_layer(m) for m in self.modules})
        self.types = analysis.type_order(runs.module_type(m) for m in self.modules)
        self.cell = {m: (self.layers.index(runs.module_layer(m)), self.types.index(runs.module_type(m)))
                     for m in self.modules}
        self.wins = np.zeros((len(self.layers), len(self.types), len(self.experts)))
        self.losses: list[float] = []
        self.start_step = self.steps_done = start_step

    def add(self, step: int, loss: float, winners: dict) -> None:
        for module, experts in winners.items():
            layer, kind = self.cell[module]
            for expert in experts:
                self.wins[layer, kind, self.experts.index(expert)] += 1
        self.losses.append(float(loss))
        self.steps_done = step + 1

    def on_step(self, loop):
        self.add(loop.step, loop.loss, loop.optimizer.last_decisions)

    def share(self, expert: str) -> np.ndarray:
        """[layer, module type] share of the steps so far that ``expert`` won (NaN where no module is)."""
        counted = max(1, self.steps_done - self.start_step)
        grid = self.wins[:, :, self.experts.index(expert)] / counted
        present = np.zeros(grid.shape, dtype=bool)
        for layer, kind in self.cell.values():
            present[layer, kind] = True
        return np.where(present, grid, np.nan)


class LiveFigure:
    """The live picture, built once and updated in place: the tracked expert's win share per layer and
    module type so far, and the loss so far. ``png()`` renders it (no pyplot: safe from a thread)."""

    def __init__(self, record: LiveRecord, total_steps: int, title: str, config: dict):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        self.record, self.total_steps, self.title = record, total_steps, title
        self.expert = "fft" if "fft" in record.experts else record.experts[-1]  # as analysis.default_expert
        self.fig = Figure(figsize=(11, max(3.6, 1.2 + 0.22 * len(record.layers))), dpi=80, layout="constrained")
        self.canvas = FigureCanvasAgg(self.fig)
        left, self.right = self.fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
        self.image = left.imshow(record.share(self.expert), cmap=plots.WIN_CMAP, vmin=0, vmax=1, aspect="auto",
                                 interpolation="nearest")
        self.fig.colorbar(self.image, ax=left, label=f"share of steps won by "
                                                     f"{plots.expert_label(self.expert, config)} (fraction)")
        left.set_xticks(range(len(record.types)), [plots.short_type(t) for t in record.types])
        plots.layer_ticks(left, record.layers)
        left.set_xlabel("module type (projection)")
        left.set_ylabel("decoder layer (index)")
        self.map_title = left.set_title("Win share so far")
        (self.line,) = self.right.plot([], [], color="black", marker="o", ms=3)
        self.right.set_xlim(-0.5, max(total_steps, 1) - 0.5)
        self.right.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.right.set_xlabel("training step")
        self.right.set_ylabel("training loss (nats/token)")
        self.right.set_title("Loss so far")
        self.right.grid(alpha=0.3)
        self.suptitle = self.fig.suptitle(title)
        self.update()

    def update(self) -> None:
        r = self.record
        self.image.set_data(r.share(self.expert))
        first = r.steps_done - len(r.losses)
        self.line.set_data(range(first, r.steps_done), r.losses)
        if r.losses:
            low, high = min(r.losses), max(r.losses)
            pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
            self.right.set_ylim(low - pad, high + pad)
        steps = f"steps {r.start_step}..{r.steps_done - 1}" if r.steps_done > r.start_step else "no steps yet"
        self.map_title.set_text(f"Win share so far ({steps})")
        self.suptitle.set_text(f"Live: {self.title}, {r.steps_done}/{self.total_steps} steps done")

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.canvas.print_png(buffer)  # one draw (savefig draws twice under a layout engine)
        # laid out once: later frames keep the axes where they are (a layout pass per frame doubled its cost)
        self.fig.set_layout_engine("none")
        return buffer.getvalue()


class _Redraw(Callback):
    def __init__(self, live: LiveRun):
        self.live = live

    def on_step(self, loop):
        if (loop.step + 1 - loop.start_step) % self.live.every == 0 or loop.step + 1 == loop.steps:
            self.live.redraw()


class _StopButton(Callback):
    def __init__(self, signal: threading.Event):
        self.signal = signal

    def on_step(self, loop):
        if self.signal.is_set():
            loop.request_stop("Stop pressed")


_LIVE_RUNS: dict = {}  # run directory -> the LiveRun of this process that holds it


class LiveRun:
    """A routed run trained in this kernel on one loaded model, redrawn every ``every`` steps: no reload
    and no checkpoint between frames (``molf.lab.train.Session`` plus callbacks of the one engine).

        app = LiveRun(TrainConfig(method="molf", model="tiny", steps=100, out_dir="runs/live"))
        app.widget()       # progress line, Stop / Resume, the picture (shown in a notebook)
        app.start()        # trains in a background thread: the kernel stays free, Stop works
        app.run()          # or: trains here, to the end (or until interrupted)

    The run directory is written as ``train.run`` writes it (logs as it goes; at the end the merged
    model, the evaluation and metrics.json), so the finished run is an ordinary run. Stop ends after the
    current step; Resume continues the same in-memory run. ``status`` is "ready", "training",
    "stopped", "done" or "failed"; ``message`` says why.
    """

    def __init__(self, config, every: int = 1, model=None, tokenizer=None, on_frame=None):
        from . import train
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (steps between frames), got {every!r}")
        if config.method not in train.MOLF_METHODS:
            raise ValueError(f"live routing needs a routed method {train.MOLF_METHODS}, got {config.method!r}")
        self.every, self.on_frame = every, on_frame
        # A notebook cell run again makes a new LiveRun of the same directory while the old one (kept alive
        # by its buttons) still holds the directory: the new one replaces it.
        key = Path(config.out_dir).resolve()
        if key in _LIVE_RUNS:
            _LIVE_RUNS.pop(key).close()
        self.session = train.Session(dataclasses.replace(config, progress=False), model, tokenizer)
        _LIVE_RUNS[key] = self
        s = self.session
        self.record = LiveRecord(s.optimizer, start_step=0)
        if s.step:  # resumed from a checkpoint: the frames start from what the logs hold
            self._read_back(s.out, s.step)
        title = f"{plots.method_label(s.config.method)} on {s.config.model}, {s.config.task}"
        self.figure = LiveFigure(self.record, s.total_steps, title, dataclasses.asdict(s.config))
        self.result = None                         # the finished Run
        self.status, self.message = "ready", f"ready: {s.step}/{s.total_steps} steps done"
        self.frame_seconds: list[float] = []       # wall time between consecutive frames
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_frame = None
        self._frame_times: list[tuple[float, int]] = []   # (time, steps done) at the start and each frame
        self._widgets = None

    def _read_back(self, out: Path, step: int) -> None:
        with open(out / "steps.csv", newline="") as f:
            losses = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
        for record in routing_log.read(out / "routing.jsonl"):
            if record.step < step:
                self.record.add(record.step, losses[record.step], record.winners)

    # ------------------------------------------------------------------ training
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self, steps: int | None = None):
        """Train here: to the end (then finish: merge, save, evaluate), a Stop, or ``steps`` more steps.
        Returns the finished ``train.Run`` (None while the run is not finished)."""
        if self.result is not None:
            return self.result
        s = self.session
        self._stop.clear()
        self._set("training", f"training: {s.step}/{s.total_steps} steps done")
        self._last_frame = time.perf_counter()
        self._frame_times = [(self._last_frame, s.step)]
        try:
            loop = s.fit(steps, callbacks=[self.record, _Redraw(self), _StopButton(self._stop)])
            if s.finished_training:
                self._set("training", f"evaluating: {s.total_steps}/{s.total_steps} steps done")
                self.result = s.finish()
                self._release()
                self._set("done", self._done_message())
            elif loop.stop_reason == "Stop pressed":
                self._set("stopped", f"stopped at {s.step}/{s.total_steps} steps (Stop pressed); Resume continues")
            else:
                self._set("stopped", f"paused at {s.step}/{s.total_steps} steps; Resume continues")
        except KeyboardInterrupt:
            self._set("stopped", f"interrupted at {s.step}/{s.total_steps} steps (the step in flight may be "
                                 f"partly applied); Resume continues")
        except Exception as error:  # shown on the progress line; the run directory keeps its checkpoint
            self.error = error
            self._set("failed", f"failed at {s.step}/{s.total_steps} steps: {type(error).__name__}: {error}")
            if self._thread is None or threading.current_thread() is not self._thread:
                raise
        return self.result

    def _release(self) -> None:
        """Drop the finished run's model, optimizer and batches (the kernel keeps only the figure and the
        numbers: a notebook must not hold a trained model it no longer needs)."""
        self.result = dataclasses.replace(self.result, model=None)
        for name in ("model", "optimizer", "scheduler", "batches"):
            if hasattr(self.session, name):
                setattr(self.session, name, None)
        _LIVE_RUNS.pop(Path(self.session.config.out_dir).resolve(), None)

    def start(self) -> None:
        """Train in a background thread (the kernel stays free, so Stop can be pressed)."""
        if self.running or self.result is not None or self.status == "failed":
            return
        self._thread = threading.Thread(target=self.run, name="molf-live", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End training after the current step."""
        self._stop.set()

    def resume(self) -> None:
        """Continue the same in-memory run (in the background)."""
        self.start()

    def wait(self, timeout: float | None = None):
        """Wait for the background training to end; returns the finished Run (or None)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def close(self) -> None:
        """Stop after the current step and release the run directory (a finished run releases it itself);
        the run stays resumable from its last checkpoint (``train.run`` or a new ``LiveRun``)."""
        self.stop()
        self.wait()
        if self.result is None and self.status != "failed" and self.session.step > 0:
            self.session.save_checkpoint()
        self.session.close()
        if self.status in ("ready", "training", "stopped"):
            self._set("stopped", f"closed at {self.session.step}/{self.session.total_steps} steps")

    # ------------------------------------------------------------------ drawing
    def redraw(self) -> None:
        now = time.perf_counter()
        self.figure.update()
        if self._widgets is not None:
            self._widgets["image"].value = self.figure.png()
        self.frame_seconds.append(now - self._last_frame)
        self._last_frame = now
        if self.on_frame is not None:
            self.on_frame(self.figure.fig, self)
        s = self.session
        loss = self.record.losses[-1] if self.record.losses else math.nan
        hint = "" if self.running else " (Kernel ▸ Interrupt stops it)"
        self._set(self.status, f"training: {s.step}/{s.total_steps} steps, loss {loss:.4f}, "
                               f"{self.frame_seconds[-1]:.2f} s/frame{self._time_left(now)}{hint}")

    def _time_left(self, now: float) -> str:
        """", about N s left": the steps still to go times the time per step since the first frame (the first
        steps, slower while everything warms up, are left out once there are later ones)."""
        self._frame_times.append((now, self.session.step))
        if len(self._frame_times) < 2:
            return ""
        (t0, s0), (t1, s1) = self._frame_times[1 if len(self._frame_times) > 2 else 0], self._frame_times[-1]
        if s1 <= s0:
            return ""
        left = (self.session.total_steps - s1) * (t1 - t0) / (s1 - s0)
        return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.1f} min left"

    def _done_message(self) -> str:
        metrics = self.result.metrics
        primary = metrics.get("primary_metric")
        value = metrics.get("metrics", {}).get(primary)
        scored = f", {primary} {value:.3f}" if isinstance(value, (int, float)) else ""
        return f"done: {metrics['steps']}/{metrics['steps']} steps, final loss {metrics['final_loss']:.4f}{scored}"

    def _set(self, status: str, message: str) -> None:
        self.status, self.message = status, message
        if self._widgets is None:
            return
        color = {"done": "#2ca02c", "failed": "#d62728", "stopped": "#b35900"}.get(status, "black")
        mark = {"done": "✓ ", "failed": "✗ ", "stopped": "■ "}.get(status, "")
        self._widgets["line"].value = f"<span style='color:{color}'><b>{mark}</b>{html.escape(message)}</span>"
        # Stop works while training runs in the background; a cell training in the foreground keeps the kernel
        # busy (the click would be handled after it ends): there, interrupting the kernel stops it
        self._widgets["stop"].disabled = status != "training" or not self.running
        self._widgets["resume"].disabled = status not in ("ready", "stopped")
        self._widgets["resume"].description = "Start" if status == "ready" else "Resume"

    def widget(self):
        """One progress line, Stop and Resume buttons, and the picture (updated in place)."""
        import ipywidgets as w
        if self._widgets is not None:
            return self._widgets["box"]
        line = w.HTML()
        stop = w.Button(description="Stop", icon="stop", layout=w.Layout(width="100px"))
        resume = w.Button(description="Resume", icon="play", layout=w.Layout(width="100px"))
        image = w.Image(value=self.figure.png(), format="png")
        stop.on_click(lambda _: self.stop())
        resume.on_click(lambda _: self.resume())
        box = w.VBox([w.HBox([stop, resume, line]), image])
        self._widgets = {"box": box, "line": line, "stop": stop, "resume": resume, "image": image}
        self._set(self.status, self.message)
        return box

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget())


def release_finished() -> int:
    """Drop the model, optimizer and batches of every finished live run of this process (a stopped one
    keeps them, so Resume still works). Returns how many were released."""
    dropped = 0
    for app in list(_LIVE_RUNS.values()):
        if app.result is not None and not app.running:
            app._release()
            dropped += 1
    return dropped


def live(config, every: int = 1, display: bool = True, on_frame=None, chunk: int | None = None,
         background: bool = False):
    """Train ``config`` (a routed ``molf.lab.train.TrainConfig``) in this kernel and redraw its routing map
    every ``every`` steps (``chunk`` is the old name of ``every``); see ``LiveRun``.

    ``background=False`` (default) trains here and returns ``(run, figure)`` once the run is finished
    (``run`` is None if it was interrupted); ``background=True`` returns the ``LiveRun`` at once, training
    in a thread, so its Stop and Resume buttons work. ``display`` shows the app (under the headless suite,
    ``$MOLF_HEADLESS=1``, the final picture instead). ``on_frame(figure, live_run)`` is called at every
    frame (``on_frame`` of ``LiveRun``). A finished run of the same config is drawn from its directory, once.
    """
    from . import train
    every = chunk if chunk is not None else every
    headless = os.environ.get("MOLF_HEADLESS") == "1"
    finished = train.finished_run(config)
    if finished is not None:
        fig = live_frame(runs.load(finished.out_dir))
        if display:
            _show_figure(fig)
        return finished, fig
    app = LiveRun(config, every=every, on_frame=on_frame)
    if display and not headless:
        from IPython.display import display as show
        show(app.widget())
    if background:
        app.start()
        return app
    result = app.run()
    if display and headless:
        _show_figure(app.figure.fig)
    return result, app.figure.fig


def _show_figure(fig):
    from IPython.display import display
    display(fig)
