"""The notebook suite, executed headlessly with papermill on the tiny model (``python -m molf.lab.suite --tiny``).

Checks what the suite produced: every executed notebook, real PNG figures (under the runs folder, the
committed figures/ untouched), finite in-range numbers, the same key numbers as the golden files (the
suite's own ``--check``, on the same run), a routing heatmap with exactly one cell per wrapped module,
shared runs, clean output (no progress bars, no stray paths, no interrupted-kernel noise); and that a
bad parameter stops a notebook with the runner's own ValueError, shown by the suite.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pandas as pd
import pytest

from molf.lab import analysis, notebook, plots, suite
from molf.lab.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    "00_quickstart": ["loss", "routing_heatmap", "routing_by_type"],
    "01_train": ["loss", "lr", "grad_norms", "routing_heatmap"],
    "02_routing_dynamics": ["routing_heatmap", "routing_over_time", "switch_frequency", "score_traces",
                            "epd_vs_pfn"],
    "03_compare_methods": ["loss", "grad_norms", "metrics", "cost"],
    "04_router_explorer": ["final_frame", "live_final"],
    "05_ablations": ["score", "topk", "rank", "lr_ratio"],
    "06_why_an_expert_wins": ["factors", "factors_step0", "pfn_first_step", "lr_tilt", "alpha_tilt", "classroom"],
    "07_regime_map": ["winner", "gap", "fft_share", "routing", "classroom"],
    "08_what_the_router_did": ["shadow_agreement", "shadow_over_time", "choice_cost", "update_audit", "spectra",
                               "intruders_vs_retention"],
}
FRACTION_KEYS = ("win_fraction", "win_share", "fft_win_share", "switch_rate", "mean_switch_rate", "efficacy",
                 "paraphrase_efficacy", "neighborhood_specificity", "fft", "lora0", "lora1", "metric", "score")
POSITIVE_KEYS = ("final_loss", "min_loss", "mean_loss_last", "train_time_s", "step_time_s", "trainable_params",
                 "optimizer_state_bytes", "peak_memory_bytes", "optimizer_state_mb")


CELL_TIMEOUT = "300"  # seconds per cell: a hung kernel fails the run instead of stalling CI


def _suite(*args, cwd=ROOT, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # the tiny model needs no threads
    return subprocess.run([sys.executable, "-m", "molf.lab.suite", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    """Run the whole suite once on the tiny model, with the golden check; yield (runs_dir, figures_dir, stdout).

    No --figures-dir: the default must keep the figures under the runs folder. Exit status 3 (every
    notebook ran, the golden check found a difference) is left to ``test_golden_numbers_match``."""
    base = tmp_path_factory.mktemp("suite")
    runs_dir = base / "runs"
    committed = _committed_figures()
    # --check trains afresh: into a temporary folder, or (kept here for the tests below) a new --train-dir
    result = _suite("--tiny", "--check", "--timeout", CELL_TIMEOUT, "--runs-dir", str(runs_dir),
                    "--train-dir", str(runs_dir / "train"))
    assert result.returncode in (0, 3), f"suite failed:\n{result.stdout}\n{result.stderr}"
    (base / "stderr.txt").write_text(result.stderr)
    (base / "committed_figures.json").write_text(json.dumps({"before": committed, "after": _committed_figures()}))
    return runs_dir, runs_dir / "figures", result.stdout


def _committed_figures() -> dict:
    return {p.name: [p.stat().st_mtime_ns, p.stat().st_size] for p in sorted((ROOT / "figures").glob("*.png"))}


def _results(runs_dir, name) -> dict:
    return json.loads((runs_dir / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def tiny_modules() -> set[str]:
    import molf
    from molf.lab import models
    model, _ = models.load("tiny")
    molf.wrap(model, ranks=(4,))
    names = set(molf.wrapped_modules(model))
    assert len(names) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    return names


# ---------------------------------------------------------------------------- the committed notebooks
def _script(name):
    return jupytext.read(ROOT / "notebooks" / f"{name}.py")


def _parameters(name) -> dict:
    """The parameters cell of a notebook as {name: default value}."""
    code = [c for c in _script(name).cells if c.cell_type == "code"]
    tree = ast.parse(code[0].source)
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


@pytest.mark.parametrize("name", suite.NOTEBOOKS)
def test_committed_notebook_is_parameterised(name):
    nb = _script(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["language_info"]["name"] == "python"
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "exactly one parameters cell, the first code cell"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    declared = _parameters(name)
    language_model = name != "07_regime_map"  # 07 trains small MLPs (molf.lab.regime), no language model
    for key in ("model", "task", "steps", "batch_size", "seq_len", "eval_limit") if language_model else ():
        assert key in declared, f"{name}: parameter {key} missing"
    for key in notebook.SUITE_PARAMETERS:
        assert key in declared, f"{name}: parameter {key} missing"
    assert declared["progress"] is True and declared["headless"] is False and declared["train_dir"] is None
    if language_model and name != "06_why_an_expert_wins":  # 06 trains in memory (molf.lab.teaching)
        assert set(notebook.COMMON) <= set(declared), f"{name} lacks {set(notebook.COMMON) - set(declared)}"


def test_shared_settings_are_train_config_fields():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(notebook.COMMON) <= fields and set(notebook.MOLF_HP) <= fields
    assert set(notebook.NOT_PARAMETERS) <= fields


# 01_train's defaults that are smaller than TrainConfig's, as in every notebook (a short demo run), and the
# merged model, which no notebook writes
NOTEBOOK_SIZED = {"steps": 20, "batch_size": 4, "seq_len": 64, "eval_limit": 32, "save_model": False}


def test_every_train_config_field_is_a_parameter_of_01_with_its_default(tmp_path):
    """A new TrainConfig field, or a changed default, fails here until 01_train's parameters cell has it."""
    declared = _parameters("01_train")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in notebook.NOT_PARAMETERS}
    missing = sorted(fields.keys() - declared.keys())
    assert not missing, f"TrainConfig fields missing from 01_train's parameters cell: {missing}"
    for name, f in fields.items():
        expected = NOTEBOOK_SIZED.get(name, f.default)
        assert declared[name] == expected, f"01_train: {name} = {declared[name]!r}, TrainConfig's default {f.default!r}"
    # and the notebook hands every one of them to the runner
    settings = notebook.train_settings({**declared, "window": 5})
    assert set(settings) == set(fields) and "window" not in settings
    config = notebook.run_config(tmp_path / "train", **settings)
    assert {k: getattr(config, k) for k in ("autocast", "optimizer_impl", "eval_batch_size")} == {
        "autocast": False, "optimizer_impl": "auto", "eval_batch_size": 16}


# ---------------------------------------------------------------------------- what the suite produced
def test_golden_numbers_match(produced):
    _, _, stdout = produced
    assert "golden check passed" in stdout, f"the key numbers moved from notebooks/golden/:\n{stdout}"


def test_a_plain_run_leaves_the_committed_figures_alone(produced):
    runs_dir, figures_dir, _ = produced
    assert figures_dir == runs_dir / "figures" and list(figures_dir.glob("*.png"))
    seen = json.loads((runs_dir.parent / "committed_figures.json").read_text())
    assert seen["before"] == seen["after"], "the suite rewrote figures/ without --figures-dir figures"


def test_output_is_clean(produced):
    runs_dir, _, _ = produced
    stderr = (runs_dir.parent / "stderr.txt").read_text()
    assert "KeyboardInterrupt" not in stderr, stderr
    for name in suite.NOTEBOOKS:
        nb = nbformat.read(runs_dir / f"{name}.ipynb", as_version=4)
        for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
            for out in cell.outputs:
                text = out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
                assert "PosixPath(" not in text, f"{name} code cell {i} shows a path: {text[:200]}"
                assert "it/s]" not in text and "s/it]" not in text, f"{name} code cell {i} shows a progress bar"


def test_every_notebook_ran_with_a_progress_line(produced):
    runs_dir, _, stdout = produced
    for i, name in enumerate(suite.NOTEBOOKS, 1):
        executed = runs_dir / f"{name}.ipynb"
        assert executed.is_file() and (runs_dir / f"{name}.json").is_file()
        nb = nbformat.read(executed, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert outputs and not [o for o in outputs if o.output_type == "error"]
        injected = next(c.source for c in nb.cells if c.metadata.get("tags") == ["injected-parameters"])
        given = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(injected).body}
        assert {k: given.get(k) for k in notebook.SUITE_PARAMETERS} == {
            "runs_dir": str(runs_dir.resolve()), "figures_dir": str(runs_dir.resolve() / "figures"),
            "train_dir": str(runs_dir.resolve() / "train"), "progress": False, "headless": True}, injected
        line = next(l for l in stdout.splitlines() if l.startswith(f"[{i}/{len(suite.NOTEBOOKS)}] {name}") and " ok " in l)
        assert float(line.split()[-2]) > 0  # "[i/n] name ok  12.3 s"


@pytest.mark.parametrize("name", suite.NOTEBOOKS)
def test_figures_are_real_pngs(produced, name):
    import matplotlib.image as mpimg
    _, figures_dir, _ = produced
    for figure in FIGURES[name]:
        path = figures_dir / f"{name}_{figure}.png"
        assert path.is_file(), f"missing figure {path.name}"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
        assert len(data) > 8_000, f"{path.name} is suspiciously small ({len(data)} bytes)"
        image = mpimg.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        rgb = image[..., :3]
        assert rgb.std() > 0.05, f"{path.name} is (nearly) a single colour"
        assert (rgb.min(axis=-1) < 0.9).mean() > 0.02, f"{path.name} is (nearly) blank"
    made = {p.name for p in figures_dir.glob(f"{name}_*.png")}
    assert made == {f"{name}_{f}.png" for f in FIGURES[name]}


def _walk(obj, key=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)
    else:
        yield key, obj


@pytest.mark.parametrize("name", suite.NOTEBOOKS)
def test_numbers_are_finite_and_in_range(produced, name):
    runs_dir, _, _ = produced
    results = _results(runs_dir, name)
    assert results["notebook"] == name
    numbers = [(k, v) for k, v in _walk(results) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert numbers
    checked = 0
    for key, value in numbers:
        assert math.isfinite(value), f"{key} = {value}"
        if key in FRACTION_KEYS:
            assert 0.0 <= value <= 1.0, f"{key} = {value} is not a fraction"
            checked += 1
        if key in POSITIVE_KEYS:
            assert value > 0, f"{key} = {value} should be > 0"
            checked += 1
    assert checked >= 3
    losses = [v for k, v in numbers if k == "final_loss"]
    assert all(0 < v < 20 for v in losses)  # nats/token; ln(vocab) ~ 10.8 for the random tiny model


def test_win_shares_add_up_and_steps_match(produced):
    runs_dir, _, _ = produced
    steps = suite.TINY["steps"]
    quick = _results(runs_dir, "00_quickstart")
    assert quick["steps"] == steps and set(quick["win_share"]) == {"fft", "lora0"}
    assert sum(quick["win_share"].values()) == pytest.approx(1.0)  # top-1 of two experts
    assert quick["wrap_max_abs_diff"] == 0.0                      # B = 0: wrapping changes nothing
    ablations = pd.DataFrame(_results(runs_dir, "05_ablations")["ablations"])
    assert set(ablations["axis"]) == {"score function", "top-k", "LoRA rank", "lr_lora / lr_fft"}
    dense = ablations[(ablations["axis"] == "top-k") & (ablations["setting"] == "k=2")]
    assert dense["fft_win_share"].item() == 1.0                     # top-2 of 2 experts: both always update
    live = _results(runs_dir, "04_router_explorer")["live"]
    assert live["steps"] == suite.TINY["live_steps"]


def _check_cells(cells, modules, steps):
    table = pd.DataFrame(cells)
    assert sorted(table["module"]) == sorted(modules), "heatmap must have one cell per wrapped module"
    assert table["module"].is_unique
    assert (table["layer"] == table["module"].str.extract(r"layers\.(\d+)\.")[0].astype(int)).all()
    assert (table["module_type"] == table["module"].str.rsplit(".", n=1).str[-1]).all()
    assert ((table["win_fraction"] >= 0) & (table["win_fraction"] <= 1)).all()
    assert (table["steps"] == steps).all()


def test_routing_heatmaps_cover_every_wrapped_module(produced, tiny_modules):
    runs_dir, _, _ = produced
    steps = suite.TINY["steps"]
    heatmaps = [
        _results(runs_dir, "00_quickstart")["routing_heatmap"],
        _results(runs_dir, "01_train")["routing_heatmap"],
        _results(runs_dir, "02_routing_dynamics")["routing_heatmap"],
        _results(runs_dir, "02_routing_dynamics")["contrast"]["routing_heatmap"],
        _results(runs_dir, "04_router_explorer")["routing_heatmap"],
        *_results(runs_dir, "03_compare_methods")["routing_heatmap"].values(),
        *_results(runs_dir, "05_ablations")["routing_heatmap"].values(),
    ]
    assert len(heatmaps) == 5 + 2 + 9  # molf and molf_e in 03; 9 ablation settings
    for cells in heatmaps:
        _check_cells(cells, tiny_modules, steps)
    e = _results(runs_dir, "03_compare_methods")["routing_heatmap"]["molf_e"]
    assert {c["expert"] for c in e} == {"lora1"}  # MoLF-E has no FFT expert: the larger LoRA expert is shown


def test_notebooks_share_runs_of_equal_config(produced):
    runs_dir, _, _ = produced
    default = _results(runs_dir, "00_quickstart")["run_dir"]
    assert _results(runs_dir, "01_train")["run_dir"] == default
    assert _results(runs_dir, "02_routing_dynamics")["run_dir"] == default
    assert _results(runs_dir, "04_router_explorer")["run_dir"] == default
    assert _results(runs_dir, "03_compare_methods")["run_dirs"]["molf"] == default
    ablations = pd.DataFrame(_results(runs_dir, "05_ablations")["ablations"])
    assert (ablations["run_dir"] == default).sum() == 4  # EPD, k=1, r=128, 1x are the default run
    pfn = ablations[ablations["setting"] == "PFN"]["run_dir"].item()
    assert pfn == _results(runs_dir, "02_routing_dynamics")["contrast"]["run_dir"]
    trained = [p for p in (runs_dir / "train").iterdir() if (p / "metrics.json").is_file()]
    # molf, pfn, fft, lora, dora, adalora, molf_e, k=2, r=16, 0.1x, 10x, live
    assert len(trained) == 12


def test_explorer_widget_redraws_on_the_slider(produced):
    from molf.lab import explorer
    runs_dir, _, _ = produced
    app = explorer.RouterExplorer(_results(runs_dir, "00_quickstart")["run_dir"])
    box = app.widget()
    controls = app._widgets
    assert list(app.steps) == list(range(suite.TINY["steps"]))
    controls["step"].value = 0
    first = controls["info"].value
    assert "at step 0" in first
    controls["layer"].value = 1
    controls["module_type"].value = "k_proj"
    assert "layers.1.self_attn.k_proj" in controls["info"].value
    fig = app.frame(0, 1, "k_proj", explorer.MODES[1])
    assert len(fig.axes) >= 3
    with pytest.raises(ValueError, match="not in this run"):
        app.frame(999)
    assert box is app.widget()
    assert [p.name for p in explorer.find_runs(runs_dir)]


# ---------------------------------------------------------------------------- failures
@pytest.mark.parametrize("key, value, message", [
    ("method", "sgd", "ValueError: unknown method 'sgd'"),
    ("lr_fft", "-1", "ValueError: lr_fft must be a finite number > 0, got -1"),
])
def test_bad_parameter_fails_with_the_runners_error(tmp_path, key, value, message):
    result = _suite("--tiny", "--only", "01_train", "-p", key, value, "--runs-dir", str(tmp_path / "runs"),
                    "--figures-dir", str(tmp_path / "figures"))
    assert result.returncode == 1
    assert "01_train" in result.stdout and "FAILED" in result.stdout
    assert message in result.stderr, result.stderr
    assert not list((tmp_path / "figures").glob("*.png"))  # it stopped before training or plotting


def test_unknown_parameter_is_refused_before_running(tmp_path):
    result = _suite("--tiny", "--only", "00_quickstart", "-p", "learning_rate", "1e-3",
                    "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "no selected notebook takes parameter(s) ['learning_rate']" in result.stderr
    assert not (tmp_path / "runs" / "00_quickstart.ipynb").exists()


# ---------------------------------------------------------------------------- plot helpers
def test_stability_summary_finds_a_spike_and_only_it():
    loss = [3.0, 2.9, 3.05, 2.95, 3.0, 2.98, 3.02, 9.0, 2.97, 3.01, 2.99]
    steps = pd.DataFrame({"step": range(len(loss)), "loss": loss})
    summary = analysis.stability_summary(steps, window=5, k=3.0)
    assert summary["n_spikes"] == 1 and summary["spike_steps"] == [7]
    assert summary["final_loss"] == 2.99 and summary["rolling_std_max"] > 2
    flat = analysis.stability_summary(pd.DataFrame({"step": range(20), "loss": np.linspace(3, 2, 20)}))
    assert flat["n_spikes"] == 0
    with pytest.raises(ValueError, match="window"):
        analysis.stability_summary(steps, window=1)


def test_switch_table_counts_winner_changes():
    rows = []
    for step, winner in enumerate(["fft", "fft", "lora0", "fft", "fft"]):
        for expert in ("fft", "lora0"):
            rows.append({"step": step, "module": "model.layers.0.mlp.up_proj", "layer": 0, "module_type": "up_proj",
                         "expert": expert, "score": 1.0, "won": expert == winner, "lr": 1e-4})
            rows.append({"step": step, "module": "model.layers.0.mlp.down_proj", "layer": 0,
                         "module_type": "down_proj", "expert": expert, "score": 1.0, "won": expert == "fft",
                         "lr": 1e-4})
    table = analysis.switch_table(pd.DataFrame(rows)).set_index("module")
    assert table.loc["model.layers.0.mlp.up_proj", "switches"] == 2
    assert table.loc["model.layers.0.mlp.up_proj", "switch_rate"] == pytest.approx(0.5)
    assert table.loc["model.layers.0.mlp.down_proj", "switch_rate"] == 0.0
    wins = analysis.win_table(pd.DataFrame(rows), "fft").set_index("module")["win_fraction"]
    assert wins["model.layers.0.mlp.up_proj"] == pytest.approx(0.8)


def _routing_rows(winners_by_module):
    rows = []
    for module, winners in winners_by_module.items():
        for step, winner in enumerate(winners):
            for expert in ("fft", "lora0"):
                rows.append({"step": step, "module": module, "layer": 0, "module_type": module.rsplit(".", 1)[-1],
                             "expert": expert, "score": 1.0, "won": expert == winner, "lr": 1e-4})
    return pd.DataFrame(rows)


def test_agreement_with_final_and_settling_step():
    routing = _routing_rows({
        "model.layers.0.mlp.up_proj": ["lora0", "fft", "fft", "fft", "fft", "fft", "fft", "fft"],
        "model.layers.0.mlp.down_proj": ["fft", "fft", "lora0", "lora0", "lora0", "lora0", "lora0", "fft"],
    })
    table = analysis.agreement_with_final(routing, final_fraction=0.5)
    # final routing (steps 4-7): up_proj -> fft (4 of 4); down_proj -> lora0 (3 of 4)
    assert list(table["step"]) == list(range(8))
    assert list(table["agreement"]) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert analysis.settling_step(table, threshold=0.8, window=3) == 3   # 3-step means from step 3 on: .83, 1, 1, 1, .83
    assert analysis.settling_step(table, threshold=1.0, window=1) is None  # the last step disagrees
    with pytest.raises(ValueError, match="final_fraction"):
        analysis.agreement_with_final(routing, final_fraction=0.0)
    fig = plots.agreement_plot({"toy": table})
    assert fig.axes[0].get_ylabel().endswith("(fraction)")
    fig = plots.routing_heatmaps_over_time(routing, "fft", windows=2)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["steps 0-3", "steps 4-7"]


def test_save_refuses_other_formats(tmp_path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="PNG"):
        plots.save(fig, tmp_path / "x.svg")
    assert plots.save(fig, tmp_path / "sub" / "x.png").is_file()
    plt.close(fig)
