"""The set-up the suite's notebooks share: one call right after the ``parameters`` cell.

    from molf.lab import analysis, notebook, plots

    nb = notebook.setup("02_routing_dynamics", globals())
    data = nb.train(method="molf", **nb.common, **nb.molf_hp)
    nb.save(plots.routing_heatmap(data), "routing_heatmap")
    nb.write_results({"notebook": nb.name, ...})

``setup`` reads the notebook's parameters from its namespace (the ``parameters`` cell, with the values
papermill injected) and returns a :class:`Notebook`. It also turns on inline figures. Nothing is put
into the namespace: every name a cell uses is visible in the notebook.

Progress bars: ``nb.train`` shows tqdm's bar when the notebook is run by hand (JupyterLab, VS Code) and
not when ``python -m molf.lab.suite`` runs it, where a bar would only clutter the saved output (the
suite sets ``MOLF_PROGRESS=0`` for its kernels; set ``MOLF_PROGRESS=1`` to see bars there too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt

from . import plots, suite

# The settings every training run of the suite's notebooks shares, read from the parameters cell.
COMMON = ("model", "task", "steps", "batch_size", "seq_len", "eval_limit", "seed", "device", "source",
          "metric_variant")
# MoLF's own hyper-parameters; a notebook that sets one to None leaves the paper's default.
MOLF_HP = ("lr_fft", "lr_lora", "ranks", "score", "topk")
PROGRESS_VARIABLE = "MOLF_PROGRESS"
HEADLESS_VARIABLE = "MOLF_HEADLESS"


def progress_default() -> bool:
    """Show training progress bars? ``$MOLF_PROGRESS`` if set ("0"/"1"), else yes."""
    value = os.environ.get(PROGRESS_VARIABLE, "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"${PROGRESS_VARIABLE} must be 0 or 1, got {value!r}")


@dataclass
class Notebook:
    """One notebook's shared settings and helpers (made by :func:`setup`)."""

    name: str                      # "02_routing_dynamics": the prefix of its figures and results
    runs_dir: Path                 # training runs, <name>.json
    figures_dir: Path              # <name>_<figure>.png
    common: dict = field(default_factory=dict)   # model, task, steps, ... for every training run
    molf_hp: dict = field(default_factory=dict)  # the MoLF hyper-parameters given (None ones left out)
    progress: bool = True          # tqdm bars while training
    headless: bool = False         # run by the suite: show apps as pictures (see ``app``)

    def run_config(self, **settings):
        """The validated ``TrainConfig`` of one run (see ``suite.run_config``); a bad value raises here."""
        return suite.run_config(self.runs_dir, **{"progress": self.progress, **settings})

    def train(self, **settings):
        """Train (or reuse) one run and return its ``molf.lab.runs.RunData`` (see ``suite.train``)."""
        return suite.train(self.runs_dir, **{"progress": self.progress, **settings})

    def app(self, widget, picture):
        """Show an ipywidgets app: ``widget()`` when a person runs the notebook; under the headless suite
        (``$MOLF_HEADLESS=1``, where no one can move a control) ``picture()``, a figure of its current
        state, so the executed notebook still shows what the app shows."""
        from IPython.display import display

        if not self.headless:
            display(widget())
            return
        fig = picture()
        display(fig)
        plt.close(fig)

    def save(self, fig, name: str) -> None:
        """Save ``fig`` as ``<figures_dir>/<notebook>_<name>.png``; it is also shown below the cell."""
        plots.save(fig, suite.figure_path(self.figures_dir, self.name, name))

    def write_results(self, results: dict) -> None:
        """Write the notebook's key numbers to ``<runs_dir>/<notebook>.json`` (finite numbers only)."""
        suite.write_results(self.runs_dir, self.name, results)


def setup(name: str, namespace: dict) -> Notebook:
    """The :class:`Notebook` for ``name``, from the parameters in ``namespace`` (pass ``globals()``).

    ``runs_dir`` and ``figures_dir`` must be set; the :data:`COMMON` settings and :data:`MOLF_HP` are
    taken from whichever of them the notebook defines."""
    missing = [k for k in ("runs_dir", "figures_dir") if k not in namespace]
    if missing:
        raise ValueError(f"notebook {name}: the parameters cell must set {missing}")
    _inline_figures()
    return Notebook(
        name=name,
        runs_dir=Path(namespace["runs_dir"]),
        figures_dir=Path(namespace["figures_dir"]),
        common={k: namespace[k] for k in COMMON if k in namespace},
        molf_hp={k: namespace[k] for k in MOLF_HP if namespace.get(k) is not None},
        progress=progress_default(),
        headless=os.environ.get(HEADLESS_VARIABLE, "").strip() == "1",
    )


def _inline_figures() -> None:
    """``%matplotlib inline`` when running in IPython (a kernel); nothing elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.run_line_magic("matplotlib", "inline")
