"""Router explorer: an ipywidgets app for JupyterLab over MoLF runs, plus a live training view.

    from molf.lab.explorer import RouterExplorer, explore, live
    RouterExplorer("runs/train/<run>")      # one run: step slider, layer / module-type pickers
    explore("runs")                         # pick any routed run found under a folder
    live(TrainConfig(...), chunk=4)         # train in resumable chunks, redraw the routing map each time

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

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from . import analysis, plots, runs

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
        routing = analysis.routing_of(self.data)
        self.expert = expert or analysis.default_expert(self.data)
        self.experts = analysis.experts_of(self.data)
        self.steps = np.sort(routing["step"].unique())
        self.layers = sorted(int(l) for l in routing["layer"].unique())
        self.types = analysis.type_order(routing["module_type"])
        self.modules = (routing[["module", "layer", "module_type"]].drop_duplicates("module")
                        .set_index(["layer", "module_type"])["module"].to_dict())
        # [step, layer, type] arrays: index of the (first) winning expert, and the tracked expert's wins.
        shape = (len(self.steps), len(self.layers), len(self.types))
        self.winner = np.full(shape, -1, dtype=int)
        self.won = np.zeros(shape, dtype=float)
        self.score = np.full(shape + (len(self.experts),), np.nan)
        step_index = {s: i for i, s in enumerate(self.steps)}
        layer_index = {l: i for i, l in enumerate(self.layers)}
        type_index = {t: i for i, t in enumerate(self.types)}
        expert_index = {e: i for i, e in enumerate(self.experts)}
        s = routing["step"].map(step_index).to_numpy()
        l = routing["layer"].map(layer_index).to_numpy()
        t = routing["module_type"].map(type_index).to_numpy()
        e = routing["expert"].map(expert_index).to_numpy()
        self.score[s, l, t, e] = routing["score"].to_numpy(dtype=float)
        won = routing["won"].to_numpy(dtype=bool)
        # lowest-index winner per cell (the FFT expert first, as the router breaks ties)
        order = np.argsort(-e[won], kind="stable")
        self.winner[s[won][order], l[won][order], t[won][order]] = e[won][order]
        tracked = won & (e == expert_index[self.expert])
        self.won[s[tracked], l[tracked], t[tracked]] = 1.0
        self.cumulative = np.cumsum(self.won, axis=0) / np.arange(1, len(self.steps) + 1)[:, None, None]
        self._widgets = None

    # ------------------------------------------------------------------ pictures
    def frame(self, step: int | None = None, layer: int | None = None, module_type: str | None = None,
              mode: str = MODES[0]):
        """The three-panel picture at ``step`` (default: the last) for the selected module."""
        step = int(self.steps[-1] if step is None else step)
        si = int(np.searchsorted(self.steps, step))
        if si >= len(self.steps) or self.steps[si] != step:
            raise ValueError(f"step {step} is not in this run's routing log (steps {self.steps[0]}..{self.steps[-1]})")
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
            colors = [self._expert_color(e) for e in self.experts]
            cmap = ListedColormap(["#dddddd"] + colors)
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
        ax_map.set_xticks(range(len(self.types)), [plots.short_type(t) for t in self.types])
        ax_map.set_yticks(range(len(self.layers)), self.layers, fontsize=7 if len(self.layers) > 12 else 9)
        ax_map.set_xlabel("module type (projection)")
        ax_map.set_ylabel("decoder layer (index)")
        ax_map.add_patch(Rectangle((ti - 0.5, li - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.5))

        # 2. score trace of the selected module
        module = self.modules.get((layer, module_type), f"layer {layer} {module_type}")
        for ei, expert in enumerate(self.experts):
            with np.errstate(divide="ignore", invalid="ignore"):
                trace = np.log10(self.score[:, li, ti, ei])
            color = self._expert_color(expert)
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
            color = self._expert_color(expert)
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
            busiest = analysis.switch_table(self.data).sort_values("switches", ascending=False, kind="stable").iloc[0]
            layer, module_type = int(busiest["layer"]), busiest["module_type"]
        return self.frame(int(self.steps[-1]), layer, module_type, mode)

    def _expert_color(self, expert: str):
        if expert == "fft":
            return "#d62728"
        palette = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b"]
        lora = [e for e in self.experts if e != "fft"]
        return palette[lora.index(expert) % len(palette)]

    # ------------------------------------------------------------------ widgets
    def widget(self):
        """The interactive app: step slider (with play button), layer and module-type pickers, mode."""
        import ipywidgets as w
        if self._widgets is not None:
            return self._widgets["box"]
        step = w.IntSlider(value=int(self.steps[-1]), min=int(self.steps[0]), max=int(self.steps[-1]), step=1,
                           description="step", continuous_update=False, layout=w.Layout(width="420px"))
        play = w.Play(value=int(self.steps[-1]), min=int(self.steps[0]), max=int(self.steps[-1]), step=1,
                      interval=400)
        w.jslink((play, "value"), (step, "value"))
        default = self.render_defaults()
        layer = w.Dropdown(options=self.layers, value=default[0], description="layer",
                           layout=w.Layout(width="160px"))
        module_type = w.Dropdown(options=self.types, value=default[1], description="module",
                                 layout=w.Layout(width="200px"))
        # wide enough for the longer label ("cumulative win share"), which the default width cuts off
        mode = w.ToggleButtons(options=MODES, value=MODES[0], style={"button_width": "190px"})
        out = w.Output()
        info = w.HTML()

        def redraw(*_):
            fig = self.frame(step.value, layer.value, module_type.value, mode.value)
            si = int(np.searchsorted(self.steps, step.value))
            li, ti = self.layers.index(layer.value), self.types.index(module_type.value)
            scores = ", ".join(f"{e}: {self.score[si, li, ti, k]:.3e}" for k, e in enumerate(self.experts))
            winner = self.winner[si, li, ti]
            info.value = (f"<b>{self.modules.get((layer.value, module_type.value), '')}</b> at step {step.value}: "
                          f"winner <b>{self.experts[winner] if winner >= 0 else 'none (skipped)'}</b>; "
                          f"scores {scores}; {self.expert} won {self.cumulative[si, li, ti]:.0%} of steps so far")
            with out:
                out.clear_output(wait=True)
                _show(fig)

        for control in (step, layer, module_type, mode):
            control.observe(redraw, names="value")
        redraw()
        box = w.VBox([w.HTML(f"<b>{plots.run_title(self.data)}</b> &mdash; {self.run_dir}"),
                      w.HBox([play, step, layer, module_type]), mode, info, out])
        self._widgets = {"box": box, "step": step, "layer": layer, "module_type": module_type, "mode": mode,
                         "out": out, "info": info}
        return box

    def render_defaults(self) -> tuple[int, str]:
        busiest = analysis.switch_table(self.data).sort_values("switches", ascending=False, kind="stable").iloc[0]
        return int(busiest["layer"]), busiest["module_type"]

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget())


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
    """Routing map (cumulative win share so far) and the loss so far of a run in progress."""
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


def live(config, chunk: int = 4, display: bool = True, on_frame=None):
    """Train ``config`` (a ``molf.lab.train.TrainConfig``) in chunks of ``chunk`` steps, redrawing the routing
    map after each chunk (resumable: each chunk is ``train.run(config, stop_after=chunk)``).

    In a notebook the picture updates in place (one display handle); ``on_frame(fig, data)`` is called
    for every frame if given. Returns ``(run, last_figure)``; a finished run draws once.
    """
    from . import train
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    if config.method not in train.MOLF_METHODS:
        raise ValueError(f"live routing needs a routed method {train.MOLF_METHODS}, got {config.method!r}")
    handle = None
    fig = None
    while True:
        result = train.run(config, stop_after=chunk)
        data = runs.load(result.out_dir)
        if fig is not None:
            plt.close(fig)
        fig = live_frame(data)
        if on_frame is not None:
            on_frame(fig, data)
        if display:
            from IPython.display import display as show
            if handle is None:
                handle = show(fig, display_id=True)
            else:
                handle.update(fig)
        if "completed_steps" not in result.metrics:
            if display:
                plt.close(fig)
            return result, fig
