"""The golden check of the regression mode (``python -m molf.lab.suite --tiny --check``).

The check that the suite's numbers match the committed golden files runs on the tiny suite run that
``test_notebooks.py`` makes anyway. Here: the check's arithmetic and wording on hand-made results, the
golden files themselves, and a real deliberate change (EPD without its learning rate, registered in
the kernels through an IPython start-up file) that the check must catch and name.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from molf.lab import regression, suite

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "notebooks" / "golden"


def _results_02(k_proj_fft=1.0):
    types = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    cells = [{"module": f"model.layers.{layer}.x.{t}", "layer": layer, "module_type": t, "expert": "fft",
              "win_fraction": k_proj_fft if t == "k_proj" else 1.0, "steps": 8} for layer in (0, 1) for t in types]
    return {"notebook": "02_routing_dynamics", "win_share": {"fft": 0.9, "lora0": 0.1}, "routing_heatmap": cells,
            "routing_over_time": [{"window": 0, "step_start": 0, "step_end": 7, "fft_win_fraction": 0.9}],
            "switch_rate": {c["module"]: 0.0 for c in cells}, "mean_switch_rate": 0.0,
            "contrast": {"score": "pfn", "win_share": {"fft": 1.0}, "routing_heatmap": cells}}


def test_a_moved_share_is_named_with_both_values_and_its_tolerance():
    golden = regression.golden_entry(_results_02(k_proj_fft=0.9375), dict(suite.TINY))
    assert regression.compare("02_routing_dynamics", _results_02(k_proj_fft=0.9375), golden) == []
    tolerance = regression.TOLERANCES["part share"][0]
    within = _results_02(k_proj_fft=0.9375 - tolerance + 0.01)
    assert regression.compare("02_routing_dynamics", within, golden) == []
    lines = regression.compare("02_routing_dynamics", _results_02(k_proj_fft=0.4062), golden)
    assert f"02_routing_dynamics: fft win share of k_proj 0.9375 → 0.4062, tolerance {tolerance:g}" in lines
    assert any("(PFN)" in line for line in lines)  # the contrast run's map moved too


def test_missing_new_and_reparameterised_keys_are_reported():
    golden = regression.golden_entry(_results_02(), dict(suite.TINY))
    fewer = copy.deepcopy(_results_02())
    fewer["routing_over_time"] = []
    more = copy.deepcopy(_results_02())
    more["routing_over_time"].append({"window": 1, "step_start": 8, "step_end": 9, "fft_win_fraction": 0.5})
    assert regression.compare("02_routing_dynamics", fewer, golden) == [
        "02_routing_dynamics: fft win share in steps 0-7 0.9 → <absent>"]
    assert regression.compare("02_routing_dynamics", more, golden) == [
        "02_routing_dynamics: fft win share in steps 8-9 is new (0.5); not in the golden file"]
    other = regression.compare("02_routing_dynamics", _results_02(), golden, {**suite.TINY, "steps": 9})
    assert other == ["02_routing_dynamics: run with other parameters than the golden numbers: steps 9 (golden: 8)"]
    assert regression.compare("02_routing_dynamics", None, golden)[-1].endswith("02_routing_dynamics.json missing)")


@pytest.mark.parametrize("name", suite.NOTEBOOKS)
def test_golden_files_are_committed_for_every_notebook(name):
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    assert golden["notebook"] == name and golden["parameters"] == json.loads(json.dumps(suite.TINY))
    assert golden["numbers"], "no key numbers"
    for key, entry in golden["numbers"].items():
        assert entry["tolerance"] == regression.TOLERANCES[regression._kind(key)][0], key


def _startup(tmp_path, name: str, code: str) -> Path:
    """An IPython directory whose start-up file runs ``code`` in every kernel the suite starts."""
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / name).write_text(textwrap.dedent(code))
    return tmp_path / "ipython"


def _suite(*args, ipython_dir=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if ipython_dir is not None:
        env["IPYTHONDIR"] = str(ipython_dir)
    return subprocess.run([sys.executable, "-m", "molf.lab.suite", "--tiny", "--timeout", "300", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _finished(train_dir: Path) -> dict:
    return {p.name: (p / "metrics.json").stat().st_mtime_ns for p in train_dir.iterdir() if (p / "metrics.json").is_file()}


def test_check_trains_afresh_over_a_runs_directory_that_holds_the_old_runs(tmp_path):
    """A finished run is keyed by its config, not by the code: --check must not reuse one. Here the runs
    directory holds 00_quickstart's run from the unchanged code; EPD then divides by sqrt(N) instead of N,
    and --check over the same runs directory must see it."""
    runs = tmp_path / "runs"
    plain = _suite("--only", "00_quickstart", "--runs-dir", runs)
    assert plain.returncode == 0, f"{plain.stdout}\n{plain.stderr}"
    before = _finished(runs / "train")
    assert len(before) == 1
    sqrt_n = _startup(tmp_path, "00_epd_over_sqrt_n.py", """
        # EPD divided by sqrt(N_e) instead of N_e
        from molf import router
        epd = router.SCORES["epd"]
        router.register_score("epd", router.Score("epd", term=epd.term, finish=lambda sums, lr, numel: lr * sums / numel.sqrt()))
    """)
    changed = _suite("--check", "--only", "00_quickstart", "--runs-dir", runs, ipython_dir=sqrt_n)
    assert changed.returncode == 3, f"{changed.stdout}\n{changed.stderr}"
    assert "golden check FAILED" in changed.stdout and "00_quickstart: fft win share" in changed.stdout, changed.stdout
    assert "training afresh in " in changed.stdout
    assert _finished(runs / "train") == before  # the old run neither reused nor touched
    # a --train-dir that already holds runs is refused before anything runs
    refused = _suite("--check", "--only", "00_quickstart", "--runs-dir", runs, "--train-dir", runs / "train")
    assert refused.returncode == 2 and "already holds something" in refused.stderr, refused.stderr
    assert "running" not in refused.stdout
    rewrite = _suite("--update-golden", "--only", "00_quickstart", "--runs-dir", runs, "--train-dir", runs / "train",
                     "--golden-dir", tmp_path / "golden")
    assert rewrite.returncode == 2 and "already holds something" in rewrite.stderr, rewrite.stderr
    assert not (tmp_path / "golden").exists()


def test_dropping_the_lr_from_epd_fails_the_check_and_names_the_key(tmp_path):
    """A real change to the score, trained for real on one notebook (not the whole suite)."""
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00_epd_without_lr.py").write_text(textwrap.dedent("""
        # EPD with the learning rate dropped: sum m^2 / (sqrt(v) + eps) / N_e
        from molf import router
        epd = router.SCORES["epd"]
        router.register_score("epd", router.Score("epd", term=epd.term, finish=lambda sums, lr, numel: sums / numel))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "IPYTHONDIR": str(tmp_path / "ipython")}
    result = subprocess.run([sys.executable, "-m", "molf.lab.suite", "--tiny", "--check", "--only", "05_ablations",
                             "--timeout", "300", "--runs-dir", str(tmp_path / "runs")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 3, f"{result.stdout}\n{result.stderr}"
    assert "golden check FAILED" in result.stdout
    # with lr_lora = 10 lr_fft, EPD hands every module to LoRA; without the lr the ratio does nothing
    assert "05_ablations: fft win share (lr_lora / lr_fft 10x) 0 → " in result.stdout, result.stdout
    assert ", tolerance 0.05" in result.stdout
    # and the settings with equal learning rates are not reported: the diff names what changed
    assert "(score function EPD)" not in result.stdout, result.stdout
