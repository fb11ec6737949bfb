"""Where the lab finds its shipped files: the task data and the notebooks.

Each comes from, in order: an explicit argument, an environment variable (``MOLF_DATA``,
``MOLF_NOTEBOOKS``), or the molf checkout the package was imported from (``data/``, ``notebooks/``
beside the ``molf`` package, as with ``pip install -e .``). An installed package used outside a
checkout needs the variable (``python data/generate.py --out DIR`` in a checkout writes the data).
"""
from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent.parent


def _resolve(given, variable: str, folder: str, what: str) -> Path:
    if given is not None:
        path = Path(given)
        source = "the argument"
    elif os.environ.get(variable):
        path = Path(os.environ[variable])
        source = f"${variable}"
    else:
        path = CHECKOUT / folder
        source = "the molf checkout"
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} (from {source}) does not exist; set {variable} to the "
                                f"folder holding the {what}, or run from a molf checkout")
    return path


def data_dir(given: str | Path | None = None) -> Path:
    """The task data folder (``<task>/<split>.jsonl``)."""
    return _resolve(given, "MOLF_DATA", "data", "task data")


def notebooks_dir(given: str | Path | None = None) -> Path:
    """The notebook folder (``NN_name.ipynb`` and their ``.py`` sources)."""
    return _resolve(given, "MOLF_NOTEBOOKS", "notebooks", "notebooks")
