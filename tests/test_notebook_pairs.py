"""The notebooks are committed as jupytext percent scripts (``notebooks/NN_name.py``) and nothing else.

Each script is paired with a local ``NN_name.ipynb`` (``make notebooks`` writes it; JupyterLab saves the
outputs into it) that git ignores. Opening a notebook in JupyterLab, running it and saving it leaves
``git status`` clean: the ``.ipynb`` is ignored, and the script's metadata filter keeps what a kernel or a
jupytext version adds (``language_info.version``, ``jupytext_version``) out of the ``.py``. The test of that
saves through jupytext's contents manager, the code JupyterLab's server runs on every save.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from molf.lab import suite

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
FORMATS = "ipynb,py:percent"
METADATA_FILTER = "language_info,-language_info.version,-jupytext.text_representation.jupytext_version"


def _git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_notebooks_are_committed_as_scripts_only():
    tracked = _git("ls-files", "notebooks").split()
    assert not [p for p in tracked if p.endswith(".ipynb")], "commit the .py of a notebook, not its .ipynb"
    assert {Path(p).name for p in tracked if p.endswith(".py")} >= {p.name for p in SCRIPTS}
    assert [p.stem for p in SCRIPTS] == list(suite.NOTEBOOKS), "every notebook script is in the suite, and only those"
    ignored = _git("check-ignore", "--no-index", *(f"notebooks/{p.stem}.ipynb" for p in SCRIPTS)).split()
    assert ignored == [f"notebooks/{p.stem}.ipynb" for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_is_paired_filtered_and_as_jupytext_writes_it(script):
    """A save from JupyterLab rewrites the .py from the notebook: it must come out byte for byte the same."""
    nb = jupytext.read(script)
    assert nb.metadata["jupytext"]["formats"] == FORMATS, f"pair it: jupytext --set-formats {FORMATS} {script}"
    assert nb.metadata["jupytext"]["notebook_metadata_filter"] == METADATA_FILTER
    assert jupytext.writes(nb, fmt="py:percent") == script.read_text(), (
        f"{script.name} is not in the form jupytext writes: run `make notebooks` (jupytext --sync)")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert '# %% tags=["parameters"]' in script.read_text()
    assert code and code[0].metadata.get("tags") == ["parameters"], "the parameters cell is the first code cell"


@pytest.fixture
def checkout(tmp_path):
    """A git repository holding a copy of the committed notebooks, as a fresh clone has them."""
    repo = tmp_path / "repo"
    shutil.copytree(NOTEBOOKS, repo / "notebooks", ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))
    _git("init", "-q", cwd=repo)
    _git("add", ".", cwd=repo)
    _git("-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "notebooks", cwd=repo)
    # make notebooks: the local .ipynb of each script
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", "--quiet",
                    *(str(p) for p in sorted((repo / "notebooks").glob("[0-9][0-9]_*.py")))], check=True)
    return repo


def _run_in_jupyterlab(model: dict, python_version: str = "3.11.9") -> dict:
    """The notebook as JupyterLab saves it after running every cell: outputs, execution counts, the kernel's
    language_info with its version, timing metadata and a scrolled output."""
    nb = model["content"]
    nb.metadata["language_info"] = {**nb.metadata.get("language_info", {}), "version": python_version}
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            cell.outputs = [{"output_type": "stream", "name": "stdout", "text": f"output of cell {count}\n"}]
            cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00.000000Z"}
            cell.metadata["scrolled"] = True
    return {"type": "notebook", "format": "json", "content": nb}


@pytest.mark.parametrize("opened", ["ipynb", "py"])
def test_running_and_saving_in_jupyterlab_leaves_git_status_clean(checkout, opened):
    from jupytext.sync_contentsmanager import TextFileContentsManager

    assert _git("status", "--porcelain", "--untracked-files=all", cwd=checkout) == ""  # make notebooks: clean
    manager = TextFileContentsManager(root_dir=str(checkout))
    for script in sorted((checkout / "notebooks").glob("[0-9][0-9]_*.py")):
        path = f"notebooks/{script.stem}.{opened}"
        manager.save(_run_in_jupyterlab(manager.get(path)), path)
        saved = jupytext.read(script.with_suffix(".ipynb"))
        assert saved.cells[1].outputs or any(c.get("outputs") for c in saved.cells), "the outputs were not kept"
        assert "version: 3.11.9" not in script.read_text()
    status = _git("status", "--porcelain", "--untracked-files=all", cwd=checkout)
    assert status == "", f"running and saving the notebooks dirtied the checkout:\n{status}{_git('diff', cwd=checkout)}"
