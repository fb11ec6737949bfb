"""Run the notebook suite headlessly with papermill.

    python -m molf.lab.suite                                  # the main job: every notebook, SmolLM2-135M
    python -m molf.lab.suite --tiny                           # the regression mode: tiny model, tiny steps
    python -m molf.lab.suite --model Qwen/Qwen2.5-1.5B --steps 400 -p batch_size 8 -p device cuda
    python -m molf.lab.suite --only 02_routing_dynamics --only 04_router_explorer
    python -m molf.lab.suite --tiny --check                   # ... and compare with the golden numbers
    python -m molf.lab.suite --figures-dir figures            # refresh the committed figures (make figures)

Executed notebooks go to ``--runs-dir`` (default ``runs/``, with each notebook's numbers as
``<notebook>.json`` beside it), training runs to ``--train-dir`` (default ``<runs-dir>/train``),
figures to ``--figures-dir`` (default ``<runs-dir>/figures``: a plain run leaves the checkout as it
was; the figures committed under ``figures/`` change only when that folder is asked for). One progress
line per notebook; the exit status is 1 when a notebook fails (the failing cell's error is printed), 2
on bad arguments and 3 when every notebook ran but ``--check`` found numbers that moved from the golden
files (``<notebooks-dir>/golden/``; see ``molf.lab.regression``). ``--timeout`` bounds each cell
(default: none; 600 s in ``--tiny`` mode), so a hung kernel fails the run instead of stalling it.

Parameters (``-p key value``; values are Python literals, anything else is a string) go to every
selected notebook that declares them in its ``parameters`` cell; a key that no selected notebook
declares is an error. The suite sets each notebook's own parameters too
(``molf.lab.notebook.SUITE_PARAMETERS``: the three folders, ``progress False`` and ``headless True``).
Runs are shared between notebooks through their directory name, which is a function of the full
resolved training config (``molf.lab.notebook.run_config``): notebooks given equal settings reuse one
finished run instead of training it again. A run is keyed by its config, not by the code that computed
it, so ``--check`` and ``--update-golden`` never reuse one: they train every run afresh, in a new
temporary folder (removed at the end) or in a ``--train-dir`` that holds no runs yet.
"""
from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import paths

NOTEBOOKS = ("00_quickstart", "01_train", "02_routing_dynamics", "03_compare_methods", "04_router_explorer",
             "05_ablations", "06_why_an_expert_wins", "07_regime_map",
             "08_what_the_router_did")
KERNEL = "python3"
# The regression mode: the 2-layer random Llama and a handful of steps (the whole suite in ~1-2 min).
TINY = {"model": "tiny", "steps": 8, "batch_size": 2, "seq_len": 48, "eval_limit": 4, "live_steps": 4,
        "live_chunk": 2}
TINY_TIMEOUT = 600  # seconds per cell in --tiny mode: the longest cell takes ~30 s on 2 cores


# ---------------------------------------------------------------------------- the runner
def _kernel_manager_class():
    from jupyter_client.manager import AsyncKernelManager

    class Quiet(AsyncKernelManager):
        """A kernel manager that does not interrupt the kernel on the way to shutting it down.

        jupyter_client sends SIGINT before every graceful shutdown, to stop a running cell. The suite
        shuts a kernel down only after its last cell finished (or timed out, when the shutdown request
        and then a kill follow anyway), and a SIGINT that lands while the kernel is still finishing a
        message (common on a loaded machine) is logged by ipykernel as "KeyboardInterrupt caught in
        kernel" on the suite's stderr."""

        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    Quiet.__name__ = Quiet.__qualname__ = "QuietShutdownKernelManager"
    return Quiet


def notebook_file(name: str, notebooks_dir, into) -> Path:
    """Notebook ``name`` as a file papermill runs: ``<notebooks_dir>/<name>.py`` (a jupytext percent script,
    the form the notebooks are committed in) converted to ``<into>/<name>.ipynb``, else an
    ``<notebooks_dir>/<name>.ipynb`` of your own."""
    script, ipynb = Path(notebooks_dir) / f"{name}.py", Path(notebooks_dir) / f"{name}.ipynb"
    if script.is_file():
        import jupytext
        path = Path(into) / f"{name}.ipynb"
        jupytext.write(jupytext.read(script), path)
        return path
    if ipynb.is_file():
        return ipynb
    raise FileNotFoundError(f"notebook {name} not found: neither {script} nor {ipynb} exists")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _declared(notebook: Path) -> dict:
    import papermill
    return papermill.inspect_notebook(str(notebook))


def _error_summary(error) -> str:
    ename = getattr(error, "ename", type(error).__name__)
    evalue = getattr(error, "evalue", str(error))
    return f"{ename}: {evalue}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m molf.lab.suite", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model for every notebook (default: the embedded smollm2-135m)")
    parser.add_argument("--steps", type=int, help="optimizer steps of every training run")
    parser.add_argument("--tiny", action="store_true", help=f"regression mode: {TINY}")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a notebook parameter (Python literal or string); repeatable")
    parser.add_argument("--only", action="append", choices=NOTEBOOKS, help="run only this notebook (repeatable)")
    parser.add_argument("--runs-dir", default="runs", help="executed notebooks and their numbers")
    parser.add_argument("--train-dir", default=None,
                        help="training runs (default: <runs-dir>/train; with --check or --update-golden a new "
                             "temporary folder, or this one if it holds nothing yet)")
    parser.add_argument("--figures-dir", default=None,
                        help="PNG figures (default: <runs-dir>/figures; 'figures' refreshes the committed ones)")
    parser.add_argument("--notebooks-dir", default=None,
                        help="folder of the notebooks (default: $MOLF_NOTEBOOKS, else the checkout's notebooks/)")
    parser.add_argument("--timeout", type=int, default=None,
                        help=f"per-cell timeout in seconds (default: none; {TINY_TIMEOUT} with --tiny)")
    golden = parser.add_mutually_exclusive_group()
    golden.add_argument("--check", action="store_true",
                        help="train afresh, then compare every notebook's key numbers with its golden file")
    golden.add_argument("--update-golden", action="store_true",
                        help="train afresh, then rewrite the golden files from the run (on purpose)")
    parser.add_argument("--golden-dir", default=None, help="golden files (default: <notebooks-dir>/golden)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    runs_dir = Path(args.runs_dir).resolve()
    fresh = args.check or args.update_golden
    if args.train_dir is None:
        train_dir = None if fresh else runs_dir / "train"
    else:
        train_dir = Path(args.train_dir).resolve()
        if fresh and train_dir.exists() and (not train_dir.is_dir() or any(train_dir.iterdir())):
            print(f"error: --check and --update-golden train every run afresh, and --train-dir {train_dir} "
                  f"already holds something; give a new or empty folder (or leave --train-dir out: a "
                  f"temporary one)", file=sys.stderr)
            return 2
    scratch = Path(tempfile.mkdtemp(prefix="molf-suite-"))  # the notebooks as papermill runs them, fresh runs
    try:
        if train_dir is None:
            train_dir = scratch / "train"
            print(f"training afresh in {train_dir} (removed at the end; --train-dir DIR keeps the runs)", flush=True)
        return _run(args, runs_dir, train_dir, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args, runs_dir: Path, train_dir: Path, scratch: Path) -> int:
    figures_dir = Path(args.figures_dir).resolve() if args.figures_dir else runs_dir / "figures"
    timeout = args.timeout if args.timeout is not None else (TINY_TIMEOUT if args.tiny else None)
    notebooks_dir = paths.notebooks_dir(args.notebooks_dir).resolve()
    golden_dir = Path(args.golden_dir).resolve() if args.golden_dir else notebooks_dir / "golden"
    params: dict = dict(TINY) if args.tiny else {}
    if args.model:
        params["model"] = args.model
    if args.steps is not None:
        params["steps"] = args.steps
    user_keys = {k for k in ("model", "steps") if k in params and (args.model or args.steps is not None)}
    # The notebooks' own parameters (molf.lab.notebook.SUITE_PARAMETERS): where outputs go, no progress
    # bars in the saved outputs, and widget apps as pictures (nobody can move a control here, and nbclient
    # was seen to stall for its whole cell timeout on a cell that displays the explorer).
    own = {"runs_dir": str(runs_dir), "figures_dir": str(figures_dir), "train_dir": str(train_dir),
           "progress": False, "headless": True}
    for key, value in args.parameter:
        if key in ("runs_dir", "figures_dir", "train_dir"):
            print(f"error: set {key} with --{key.replace('_', '-')}, not -p", file=sys.stderr)
            return 2
        params[key] = _literal(value)
        user_keys.add(key)
    shown = dict(params)
    params = {**own, **params}

    selected = list(dict.fromkeys(args.only)) if args.only else list(NOTEBOOKS)
    sources = {}
    for name in selected:
        try:
            sources[name] = notebook_file(name, notebooks_dir, scratch)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    declared = {name: _declared(sources[name]) for name in selected}
    unknown = sorted(k for k in user_keys if not any(k in d for d in declared.values()))
    if unknown:
        known = sorted(set().union(*declared.values()))
        print(f"error: no selected notebook takes parameter(s) {unknown}; they take {known}", file=sys.stderr)
        return 2

    import logging

    import papermill
    QuietShutdownKernelManager = _kernel_manager_class()
    from papermill.exceptions import PapermillExecutionError
    logging.getLogger("papermill").setLevel(logging.ERROR)
    # The kernel spec may launch a bare "python": make it this interpreter (the virtualenv's).
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    runs_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)

    print(f"molf suite: {len(selected)} notebook(s) -> {runs_dir} (figures: {figures_dir}; training runs: "
          f"{train_dir}); parameters {shown or 'as in the notebooks'}", flush=True)
    began = time.perf_counter()
    for i, name in enumerate(selected, 1):
        source = sources[name]
        target = runs_dir / f"{name}.ipynb"
        given = {k: v for k, v in params.items() if k in declared[name]}
        started = time.perf_counter()
        print(f"[{i}/{len(selected)}] {name:22s} running ...", flush=True)
        try:
            papermill.execute_notebook(str(source), str(target), parameters=given, kernel_name=KERNEL,
                                       cwd=str(notebooks_dir), progress_bar=False, log_output=False,
                                       execution_timeout=timeout, kernel_manager_class=QuietShutdownKernelManager,
                                       extra_arguments=["--IPKernelApp.log_level=ERROR"])
        except PapermillExecutionError as error:
            seconds = time.perf_counter() - started
            print(f"[{i}/{len(selected)}] {name:22s} FAILED {seconds:7.1f} s", flush=True)
            print(f"error in {name} (cell {error.exec_count}): {_error_summary(error)}", file=sys.stderr)
            print(f"the executed notebook with the full traceback: {target}", file=sys.stderr)
            return 1
        except Exception as error:  # kernel died, a cell timed out, notebook unreadable, ...
            seconds = time.perf_counter() - started
            print(f"[{i}/{len(selected)}] {name:22s} FAILED {seconds:7.1f} s", flush=True)
            print(f"error in {name}: {_error_summary(error)}", file=sys.stderr)
            if type(error).__name__ == "CellTimeoutError":
                print(f"a cell ran longer than --timeout {timeout} s; the notebook as far as it got: {target}",
                      file=sys.stderr)
            return 1
        seconds = time.perf_counter() - started
        print(f"[{i}/{len(selected)}] {name:22s} ok     {seconds:7.1f} s", flush=True)
    print(f"done: {len(selected)} notebook(s) in {time.perf_counter() - began:.1f} s", flush=True)
    # what the golden files record and compare: the settings of the run, not where it was written or shown
    parameters = {k: v for k, v in shown.items() if k not in own}
    if args.update_golden:
        from . import regression
        for path in regression.write_golden(golden_dir, runs_dir, selected, parameters):
            print(f"golden numbers written: {path}")
    if args.check:
        from . import regression
        differences = regression.check(runs_dir, golden_dir, selected, parameters)
        if differences:
            print(f"golden check FAILED: {len(differences)} difference(s) from {golden_dir}", flush=True)
            for line in differences:
                print(f"  {line}", flush=True)
            print("if the change is meant, rewrite the golden files: python -m molf.lab.suite --tiny "
                  "--update-golden", flush=True)
            return 3
        print(f"golden check passed: {len(selected)} notebook(s) match {golden_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
