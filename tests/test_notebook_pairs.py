"""Each notebook is a jupytext pair: ``notebooks/NN_name.py`` (percent script) and ``NN_name.ipynb``.

The pair must say the same thing (cells, their order, types, sources and tags; the pairing metadata),
and the committed ``.ipynb`` carries no outputs. Fails with the command that re-syncs.
"""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
FORMATS = "ipynb,py:percent"
RESYNC = ("edit either file, then run `make notebooks` (`jupytext --sync notebooks/[0-9]*.py`: the newer file "
          "of each pair wins; then outputs are cleared)")


def _cells(nb) -> list[tuple]:
    return [(c.cell_type, c.source.strip("\n"), tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def test_every_notebook_has_its_script():
    names = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    scripts = {p.stem for p in SCRIPTS}
    assert names, "no notebooks found"
    assert names == scripts, (f"unpaired: notebooks without a .py {sorted(names - scripts)}, scripts without an "
                              f".ipynb {sorted(scripts - names)}; pair one with `jupytext --set-formats {FORMATS} "
                              f"notebooks/NAME.ipynb`")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_pair_is_in_sync(script):
    ipynb = script.with_suffix(".ipynb")
    from_script = jupytext.read(script)
    committed = nbformat.read(ipynb, as_version=4)
    for nb, where in ((from_script, script.name), (committed, ipynb.name)):
        assert nb.metadata.get("jupytext", {}).get("formats") == FORMATS, (
            f"{where} is not paired as {FORMATS}: run `jupytext --set-formats {FORMATS} notebooks/{ipynb.name}`")
    ours, theirs = _cells(from_script), _cells(committed)
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        detail = (f"cell {first}: {ours[first][:2] if first < len(ours) else '<none>'!r} in the .py vs "
                  f"{theirs[first][:2] if first < len(theirs) else '<none>'!r} in the .ipynb")
        pytest.fail(f"notebooks/{script.name} and {ipynb.name} are out of sync ({len(ours)} vs {len(theirs)} cells; "
                    f"first difference at {detail[:600]}); {RESYNC}")
    for key in ("kernelspec", "language_info"):
        assert committed.metadata.get(key, {}).get("name") == from_script.metadata.get(key, {}).get("name"), (
            f"{ipynb.name}: notebook metadata {key} differs from the script's header; {RESYNC}")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(script):
    committed = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    dirty = [i for i, c in enumerate(committed.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{script.stem}.ipynb is committed with outputs in cells {dirty}: run `make notebooks`"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_parameters_cell_survives_the_round_trip(script):
    text = script.read_text()
    assert '# %% tags=["parameters"]' in text, f"{script.name}: no parameters cell (papermill needs the tag)"
    nb = jupytext.read(script)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and code[0].metadata.get("tags") == ["parameters"], "the parameters cell is the first code cell"
