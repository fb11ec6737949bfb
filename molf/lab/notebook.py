"""What the suite's notebooks share: one call right after the ``parameters`` cell, and its helpers.

    from molf.lab import analysis, notebook, plots

    nb = notebook.setup("02_routing_dynamics", globals())
    data = nb.train(method="molf", **nb.common, **nb.molf_hp)
    nb.save(plots.routing_heatmap(data), "routing_heatmap")
    nb.write_results({"notebook": nb.name, ...})

``setup`` reads the notebook's parameters from its namespace (the ``parameters`` cell, with the values
papermill injected) and returns a :class:`Notebook`. It also turns on inline figures. Nothing is put
into the namespace: every name a cell uses is visible in the notebook.

Every notebook declares the parameters that ``python -m molf.lab.suite`` sets (:data:`SUITE_PARAMETERS`):
where its outputs go (``runs_dir``, ``figures_dir``, ``train_dir``), ``progress`` (tqdm bars while
training: on when a person runs the notebook, off in the suite's executed notebooks) and ``headless``
(widget apps shown as pictures: nobody can move a control in a headless run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
from tqdm.auto import tqdm

from . import plots
from .engine import Callback

# The settings every training run of the suite's notebooks shares, read from the parameters cell.
COMMON = ("model", "task", "steps", "batch_size", "seq_len", "eval_limit", "seed", "device", "source",
          "metric_variant")
# MoLF's own hyper-parameters; a notebook that sets one to None leaves the paper's default.
MOLF_HP = ("lr_fft", "lr_lora", "ranks", "score", "topk")
# The parameters the suite gives every notebook (each notebook declares them with its defaults for a
# person running it by hand): where outputs go, progress bars, and widget apps as pictures.
SUITE_PARAMETERS = ("runs_dir", "figures_dir", "train_dir", "progress", "headless")
# TrainConfig fields that are not notebook parameters: the run directory is named after the config.
NOT_PARAMETERS = ("out_dir",)


# ---------------------------------------------------------------------------- runs, results, figures
def run_config(train_dir, **kwargs):
    """A ``TrainConfig`` whose ``out_dir`` is ``<train_dir>/<model>-<task>-<method>-<hash>``.

    The hash covers what the *resolved* config computes (defaults filled in; not where or how it is
    written or shown: ``train.run_identity``), so two notebooks asking for the same training (even one
    spelling out a default the other leaves as None) share one run directory, and a finished run is
    returned by ``train.run`` without training again. Bad values raise the runner's ``ValueError``
    here, before anything trains.
    """
    from .train import TrainConfig, run_identity
    train_dir = Path(train_dir)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("save_model", False)
    for key in ("ranks", "alphas"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    probe = TrainConfig(**{**kwargs, "out_dir": str(train_dir)}).resolved()
    identity = run_identity(probe)  # what the run computes: a progress bar or out_dir do not make a new run
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", f"{probe.model}-{probe.task}-{probe.method}").strip("_")
    train_dir.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(probe, out_dir=str(train_dir / f"{slug}-{digest}"))


# what makes one run's step time a fair guess for another's
_SAME_SHAPE = ("model", "method", "batch_size", "seq_len", "grad_accum", "device", "dtype", "ranks", "topk")


def expected_time(config, train_dir=None) -> tuple[float | None, str]:
    """How long training ``config`` will take, said before it starts: ``(seconds, how it was estimated)``.

    0 when its finished run exists (reused); else the median warm step time (steps after the first two)
    of the recorded runs under ``train_dir`` (default: the run's folder) with the same model, method, batch,
    sequence length, device, dtype, ranks and top-k, times ``steps``; else ``None`` (no recorded run of that
    shape: ``train`` then measures it on the first steps, ``MeasuredTime``)."""
    import csv
    out = Path(config.out_dir)
    if (out / "metrics.json").is_file():
        return 0.0, f"its finished run {out.name} is reused"
    want = dataclasses.asdict(config)
    times, used = [], []
    folder = Path(train_dir) if train_dir is not None else out.parent
    for cfg_path in sorted(folder.glob("*/config.json")) if folder.is_dir() else []:
        try:
            other = json.loads(cfg_path.read_text())
            with open(cfg_path.parent / "steps.csv", newline="") as f:
                rows = [float(r["step_time_s"]) for r in csv.DictReader(f) if r.get("step_time_s")]
        except (OSError, ValueError, KeyError):
            continue
        if any(_shape(other.get(k)) != _shape(want.get(k)) for k in _SAME_SHAPE) or not rows:
            continue
        times.extend(rows[2:] if len(rows) > 2 else rows)
        used.append(cfg_path.parent.name)
    if not times:
        return None, "no recorded run of this shape yet"
    per_step = statistics.median(times)
    return per_step * config.steps, (f"{config.steps} steps x {per_step:.2f} s, the median warm step of "
                                     f"{len(used)} recorded run(s) of this shape, plus loading and evaluation")


def _shape(value):
    return list(value) if isinstance(value, tuple) else value


def say_expected_time(config, train_dir=None, live: bool = False) -> float | None:
    """Print ``expected_time`` as one line, before a cell trains; return its seconds (None: unknown, then
    measured: by ``MeasuredTime``, or for a ``live`` run by the live explorer's progress line)."""
    seconds, how = expected_time(config, train_dir)
    if seconds == 0:
        print(f"expected: a few seconds ({how})", flush=True)
    elif seconds is None and live:
        print(f"expected: the time left shows in the progress line after the first frame ({how})", flush=True)
    elif seconds is None:
        print(f"expected: measured after the first {1 + MeasuredTime.timed_steps} steps ({how})", flush=True)
    else:
        print(f"expected: about {_duration(seconds)} of training ({how})", flush=True)
    return seconds


class MeasuredTime(Callback):
    """The expected time of a run with no recorded run of its shape, measured: after the first steps of
    training (the first is a warm-up and not timed; then ``timed_steps`` are), one line says how long the
    rest will take, ``steps left x their median time``. It prints above the progress bar, where the
    reader is looking, and only once."""

    timed_steps = 2

    def __init__(self, say=None):
        self.say = say or tqdm.write
        self.times: list[float] = []

    def on_step(self, loop) -> None:
        if loop.steps_done == 1 or len(self.times) >= self.timed_steps:
            return
        self.times.append(loop.seconds)
        if len(self.times) == self.timed_steps:
            per_step = statistics.median(self.times)
            left = loop.steps - loop.step - 1
            first = loop.step + 2 - self.timed_steps  # 1-based number of the first timed step
            self.say(f"expected: about {_duration(left * per_step)} more training ({left} steps x "
                     f"{per_step:.2f} s, measured on steps {first}-{loop.step + 1})")


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def train(train_dir, live_every: int | None = None, **kwargs):
    """``train.run(run_config(train_dir, **kwargs))`` with its expected time said first and one printed line
    at the end; returns ``molf.lab.runs.RunData``. ``live_every``: a routed run is trained by the live
    explorer (``explorer.live``: its routing map drawn every ``live_every`` steps as it trains, one progress
    line with the time left); the run is the same."""
    from . import analysis, runs
    from .train import MOLF_METHODS, run
    config = run_config(train_dir, **kwargs)
    finished = (Path(config.out_dir) / "metrics.json").is_file()
    live = bool(live_every and not finished and config.method in MOLF_METHODS)
    expected = say_expected_time(config, train_dir, live=live)
    began = time.perf_counter()
    if live:
        from . import explorer
        result, fig = explorer.live(config, every=live_every)
        plt.close(fig)
        if result is None:
            raise KeyboardInterrupt(f"training of {config.out_dir} was interrupted; run the cell again to resume")
    else:
        result = run(config, callbacks=[MeasuredTime()] if expected is None else [])
    data = runs.load(result.out_dir)
    m = data.metrics
    score = analysis.primary_score(m)
    print(f"{config.method:8s} {'reused' if finished else 'trained'} {Path(config.out_dir).name}: "
          f"{m['steps']} steps, final loss {m['final_loss']:.4f}, {m['primary_metric']} "
          f"{score if score is None else round(score, 4)}, {time.perf_counter() - began:.1f} s")
    return data


def train_settings(namespace: dict) -> dict:
    """Every ``TrainConfig`` field that ``namespace`` (a notebook's ``globals()``) sets, by name: the
    settings of a notebook whose parameters are the runner's (``01_train``)."""
    from .train import TrainConfig
    return {f.name: namespace[f.name] for f in dataclasses.fields(TrainConfig)
            if f.name in namespace and f.name not in NOT_PARAMETERS}


def finite_json(obj) -> object:
    """``obj`` with numpy/pandas scalars converted; raises ``ValueError`` on NaN or inf anywhere."""
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"refusing to write a non-finite number ({obj}) to the results JSON")
    return obj


def write_results(runs_dir, notebook: str, results: dict) -> Path:
    """Write a notebook's key numbers to ``<runs_dir>/<notebook>.json`` (finite numbers only)."""
    path = Path(runs_dir) / f"{notebook}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_json(results), indent=2, allow_nan=False))
    return path


def memory_mb() -> float:
    """This process's resident memory (RSS) in MB (Linux: /proc/self/status; elsewhere the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def figure_path(figures_dir, notebook: str, name: str) -> Path:
    return Path(figures_dir) / f"{notebook}_{name}.png"


# ---------------------------------------------------------------------------- one notebook
@dataclass
class Notebook:
    """One notebook's shared settings and helpers (made by :func:`setup`)."""

    name: str                      # "02_routing_dynamics": the prefix of its figures and results
    runs_dir: Path                 # <name>.json
    figures_dir: Path              # <name>_<figure>.png
    train_dir: Path                # the training runs, one directory each (named by run_config)
    common: dict = field(default_factory=dict)   # model, task, steps, ... for every training run
    molf_hp: dict = field(default_factory=dict)  # the MoLF hyper-parameters given (None ones left out)
    progress: bool = True          # tqdm bars while training
    headless: bool = False         # run by the suite: show apps as pictures (see ``app``)

    def run_config(self, **settings):
        """The validated ``TrainConfig`` of one run (see :func:`run_config`); a bad value raises here."""
        return run_config(self.train_dir, **{"progress": self.progress, **settings})

    def train(self, live_every: int | None = None, **settings):
        """Train (or reuse) one run and return its ``molf.lab.runs.RunData`` (see :func:`train`): its
        expected time is printed first; ``live_every`` (ignored when ``headless``) draws a routed run's
        routing map every that many steps while it trains."""
        return train(self.train_dir, live_every=None if self.headless else live_every,
                     **{"progress": self.progress, **settings})

    def app(self, widget, picture):
        """Show an ipywidgets app: ``widget()`` when a person runs the notebook; when ``headless`` (the
        suite, where no one can move a control) ``picture()``, a figure of its current state, so the
        executed notebook still shows what the app shows."""
        from IPython.display import display

        if not self.headless:
            display(widget())
            return
        fig = picture()
        display(fig)
        plt.close(fig)

    def takeaway(self, text: str) -> None:
        """Show ``text`` (Markdown whose numbers the notebook computed) as a paragraph below the cell."""
        try:
            from IPython import get_ipython
            from IPython.display import Markdown, display
        except ImportError:
            print(text)
            return
        if get_ipython() is None:
            print(text)
        else:
            display(Markdown(text))

    def save(self, fig, name: str) -> None:
        """Save ``fig`` as ``<figures_dir>/<notebook>_<name>.png``; it is also shown below the cell."""
        plots.save(fig, figure_path(self.figures_dir, self.name, name))

    def export_html(self, sources, name: str, every: int | str = "auto", max_mb: float | None = None) -> Path:
        """Write ``sources`` (a run directory, a routing table or a dict of them by label) as one
        self-contained HTML router explorer, ``<runs_dir>/<notebook>_<name>.html`` (``molf.lab.html_app``),
        and print its path and size: a page to share with people who have no kernel. ``every="auto"``
        keeps every step unless the page would pass ``max_mb`` (default ``html_app.MAX_MB``), then thins."""
        from . import html_app

        path = Path(self.runs_dir) / f"{self.name}_{name}.html"
        html_app.export(sources, path, every=every, max_mb=html_app.MAX_MB if max_mb is None else max_mb)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): open it in any browser, no kernel needed")
        return path

    def free(self) -> float:
        """Free what the notebook's runs no longer need (finished live runs' models and optimizers, loaded
        models other than the classroom's tiny one), collect garbage, and return (and print) this kernel's
        resident memory in MB."""
        import gc
        import sys
        if "molf.lab.teaching" in sys.modules:
            sys.modules["molf.lab.teaching"].free_models()
        if "molf.lab.explorer" in sys.modules:
            sys.modules["molf.lab.explorer"].release_finished()
        gc.collect()
        try:  # hand freed heap pages back to the system (glibc), so the resident size shows the freeing
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        rss = memory_mb()
        print(f"kernel memory after freeing the runs: {rss:.0f} MB resident")
        return rss

    def write_results(self, results: dict) -> None:
        """Write the notebook's key numbers to ``<runs_dir>/<notebook>.json`` (finite numbers only). Its runs
        are done by then: first ``free`` what they left in memory (it prints the kernel's resident memory
        after that; not written to the JSON, whose numbers are compared with the golden ones)."""
        self.free()
        write_results(self.runs_dir, self.name, results)


def setup(name: str, namespace: dict) -> Notebook:
    """The :class:`Notebook` for ``name``, from the parameters in ``namespace`` (pass ``globals()``).

    ``runs_dir`` and ``figures_dir`` must be set; ``train_dir`` (None: ``<runs_dir>/train``),
    ``progress`` (default on) and ``headless`` (default off) may be; the :data:`COMMON` settings and
    :data:`MOLF_HP` are taken from whichever of them the notebook defines."""
    missing = [k for k in ("runs_dir", "figures_dir") if k not in namespace]
    if missing:
        raise ValueError(f"notebook {name}: the parameters cell must set {missing}")
    for key in ("progress", "headless"):
        if not isinstance(namespace.get(key, False), bool):
            raise ValueError(f"notebook {name}: parameter {key} must be True or False, got {namespace[key]!r}")
    _inline_figures()
    runs_dir = Path(namespace["runs_dir"])
    train_dir = namespace.get("train_dir")
    return Notebook(
        name=name,
        runs_dir=runs_dir,
        figures_dir=Path(namespace["figures_dir"]),
        train_dir=runs_dir / "train" if train_dir is None else Path(train_dir),
        common={k: namespace[k] for k in COMMON if k in namespace},
        molf_hp={k: namespace[k] for k in MOLF_HP if namespace.get(k) is not None},
        progress=namespace.get("progress", True),
        headless=namespace.get("headless", False),
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
