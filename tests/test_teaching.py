"""molf.lab.teaching: score factors from optimizer state, the mechanisms the teaching notebook states, the
classroom retrain, and the notebook itself under papermill on the tiny model."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from molf.lab import runs, teaching  # noqa: E402
from molf.lab import train as runner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "06_why_an_expert_wins"
TINY = teaching.Settings(steps=4, rank=8)


@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_recomputed_factors_equal_the_optimizers_scores(score):
    lesson = teaching.train(TINY, score=score, lr_ratio=3.0)
    table = lesson.factors
    assert set(table["step"]) == set(range(TINY.steps))
    assert len(table) == TINY.steps * 14 * 2               # 14 wrapped modules, fft + lora0
    assert teaching.score_mismatch(table, score) < 1e-5
    # the factors multiply to the scores
    assert (table["epd"] - table["lr"] * table["inv_n"] * table["sum_mu"]).abs().max() < 1e-20
    assert (table["pfn"] - table["root_sum_uu"] * table["inv_root_n"]).abs().max() < 1e-12
    # lr is the scheduled one: the LoRA expert's is 3x the FFT expert's, and both follow the schedule
    first = lesson.at(0)
    lr = first.set_index(["module", "expert"])["lr"]
    assert lr.xs("lora0", level="expert").to_numpy() == pytest.approx(3 * lr.xs("fft", level="expert").to_numpy())
    assert lr.xs("fft", level="expert").iloc[0] == pytest.approx(lesson.lrs[0])
    # the winner the optimizer updated is the one the recomputed score picks
    assert (table["won"] == table[f"{score}_winner"]).all()
    # N_e: the dense weight, and A + B of the LoRA expert
    q = lesson.at(0, lesson.module(0, "q_proj")).set_index("expert")
    assert q.loc["fft", "n_params"] == 64 * 64 and q.loc["lora0", "param_numels"] == (8 * 64, 64 * 8)


@pytest.mark.parametrize("changes", [{}, {"score": "pfn", "lr_ratio": 10.0, "max_grad_norm": None}])
def test_the_classroom_takes_the_runners_steps(tmp_path, changes):
    """Same losses, learning rates, scores and decisions, to the bit, from one engine."""
    settings = teaching.Settings(steps=3, rank=8, **changes)
    config = runner.TrainConfig(model="tiny", task="fact", method="molf", steps=3, batch_size=2, seq_len=48,
                                eval_limit=0, ranks=(8,), save_model=False, progress=False, out_dir=str(tmp_path),
                                score=settings.score, lr_lora=settings.lr_lora, max_grad_norm=settings.max_grad_norm)
    runner.run(config)
    data = runs.load(tmp_path)
    lesson = teaching.train(settings)
    assert list(data.steps["loss"]) == lesson.losses and list(data.steps["lr"]) == lesson.lrs
    theirs, ours = data.routing, lesson.routing
    merged = theirs.merge(ours, on=["step", "module", "expert"], suffixes=("_runner", "_teaching"))
    assert len(merged) == len(theirs) == len(ours) == 3 * 14 * 2
    assert (merged["won_runner"] == merged["won_teaching"]).all()
    assert (merged["score_runner"] == merged["score_teaching"]).all()


def test_a_fresh_lora_expert_loses_under_pfn_at_step_one():
    lesson = teaching.train(TINY, score="pfn")
    table = teaching.step_one_pfn(lesson)
    assert len(table) == 14
    assert (table["lora_moving"] == table["n_b"]).all()      # A has no gradient while B = 0
    assert (table["fft_moving"] > 0).all()
    assert (table["pfn_winner"] == "fft").all() and lesson.win_share("fft", step=0) == 1.0
    assert table["rel_dev"].max() < 0.1                       # sqrt(N_B / (N_A + N_B)), up to eps
    assert table["rel_dev"].median() < 0.01
    # the prediction depends only on the shapes: 1/2 for square, 1/3 and 2/3 for the 2:1 projections
    predicted = table.set_index("module_type")["predicted"]
    assert predicted["q_proj"].iloc[0] == pytest.approx(math.sqrt(1 / 2))
    assert predicted["down_proj"].iloc[0] == pytest.approx(math.sqrt(1 / 3))
    assert predicted["up_proj"].iloc[0] == pytest.approx(math.sqrt(2 / 3))


def test_the_lr_ratio_tilts_epd():
    table = teaching.lr_tilt(TINY, ratios=(0.1, 1.0, 10.0))
    assert (table["lora_epd_scaling"] - 1).abs().max() < 1e-5
    assert (table["lora_epd_scaling_min"] - 1).abs().max() < 1e-5
    assert (table["fft_epd_change"] - 1).abs().max() < 1e-5
    shares = list(table["lora_share_step0"])
    assert shares == sorted(shares) and shares[-1] > shares[0]


def test_alpha_moves_epd_not_pfn():
    table = teaching.alpha_tilt(TINY, low=32.0, high=64.0)
    assert len(table) == 14
    assert table["epd_change"].between(1.95, 2.05).all()
    assert (table["pfn_change"] - 1).abs().max() < 0.1


def test_why_names_the_factors_and_formulas_fill_in_numbers():
    lesson = teaching.train(TINY)
    table = lesson.at(0, lesson.modules[0])
    text = teaching.why(table, "epd")
    assert text.startswith("EPD: ") and "lr ×" in text and "1/N ×" in text and "largest factor" in text
    ratio = float(text.split(" by ×")[1].split(" ")[0])
    epd = table.set_index("expert")["epd"]
    assert ratio == pytest.approx(epd.max() / epd.min(), rel=1e-2)
    lines = teaching.formula_lines(table, "pfn")
    assert len(lines) == 2 and lines[0].startswith("PFN(fft) = √(")
    dense = teaching.train(TINY, topk=2).at(0, lesson.modules[0])
    assert "every expert updates" in teaching.why(dense, "epd")


def test_retrain_is_deterministic_short_and_cached():
    a = teaching.train(TINY, lr_ratio=0.3, alpha=16.0)
    assert not a.cached and a.seconds > 0
    assert a.steps == list(range(TINY.steps)) and len(a.losses) == TINY.steps
    b = teaching.train(TINY, lr_ratio=0.3, alpha=16.0)
    assert b.cached and b.seconds == 0 and b.routing.equals(a.routing)
    teaching.clear_cache()
    c = teaching.train(TINY, lr_ratio=0.3, alpha=16.0)
    assert not c.cached and c.routing.equals(a.routing) and c.losses == a.losses
    assert c.factors[["epd", "pfn"]].equals(a.factors[["epd", "pfn"]])
    with pytest.raises(ValueError, match="score"):
        teaching.Settings(score="sgd")
    with pytest.raises(ValueError, match="step 99"):
        a.at(99)


def test_figures_have_titles_and_labels():
    import matplotlib.pyplot as plt
    lesson = teaching.train(TINY)
    fig = teaching.explain(lesson, 1, lesson.module(1, "down_proj"))
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) >= 5 and fig._suptitle is not None and "at step 1" in fig._suptitle.get_text()
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "log"
    assert all(ax.get_ylabel() for ax in fig.axes[:5])
    plt.close(fig)
    for fig in (teaching.pfn_step_one_figure(teaching.step_one_pfn(teaching.train(TINY, score="pfn"))),
                teaching.lr_tilt_figure(teaching.lr_tilt(TINY, ratios=(0.1, 1.0))),
                teaching.alpha_tilt_figure(teaching.alpha_tilt(TINY))):
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        plt.close(fig)


def test_classroom_widgets_retrain_and_redraw():
    app = teaching.Classroom(TINY)
    box = app.widget()
    controls = app._widgets
    assert box is app.widget()
    first = controls["info"].value
    assert "from the cache" in first or "retrained" in first
    controls["score"].value = "pfn"
    assert app.settings.score == "pfn" and app.lesson.settings.score == "pfn"
    controls["step"].value = 0
    assert "step 0" in controls["info"].value and "PFN: fft beats lora0" in controls["info"].value
    controls["lr_ratio"].value = 10.0
    controls["score"].value = "epd"
    assert app.lesson.settings.lr_ratio == 10.0 and app.lesson.win_share("lora0", step=0) == 1.0
    controls["layer"].value = 1
    controls["module_type"].value = "k_proj"
    assert "layers.1.self_attn.k_proj" in controls["info"].value
    # a rank or alpha off the slider's stops joins its options
    assert 12 in teaching.Classroom(teaching.Settings(steps=2, rank=12)).ranks


def test_notebook_runs_under_papermill_with_its_asserts(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    runs_dir, figures_dir = tmp_path / "runs", tmp_path / "figures"
    runs_dir.mkdir()
    from molf.lab import suite

    source = suite.notebook_file(NOTEBOOK, ROOT / "notebooks", tmp_path)  # the committed .py, converted
    command = [sys.executable, "-m", "papermill", str(source),
               str(runs_dir / f"{NOTEBOOK}.ipynb"), "-k", "python3", "--cwd", str(ROOT / "notebooks"),
               "--log-level", "ERROR"]
    for key, value in (("model", "tiny"), ("steps", 6), ("batch_size", 2), ("seq_len", 48), ("eval_limit", 4),
                       ("classroom_steps", 4), ("runs_dir", runs_dir), ("figures_dir", figures_dir)):
        command += ["-p", key, str(value)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((runs_dir / f"{NOTEBOOK}.json").read_text())
    assert results["notebook"] == NOTEBOOK and results["steps"] == 6 and results["step"] == 5
    assert results["pfn_first_step"]["fft_win_share"] == 1.0
    assert results["pfn_first_step"]["max_rel_dev"] < 0.1
    assert results["lr_tilt"]["max_scaling_error"] < 1e-5
    shares = results["lr_tilt"]["lora_share_step0"]
    assert shares == sorted(shares) and shares[-1] > shares[0]
    assert 1.95 < results["alpha_tilt"]["epd_change_min"] <= results["alpha_tilt"]["epd_change_max"] < 2.05
    assert max(results["score_mismatch"].values()) < 1e-5
    assert sum(results["win_share"].values()) == pytest.approx(1.0)
    made = sorted(p.name for p in figures_dir.glob("*.png"))
    assert made == sorted(f"{NOTEBOOK}_{n}.png" for n in ("factors", "factors_step0", "pfn_first_step", "lr_tilt",
                                                           "alpha_tilt", "classroom"))


def test_the_classroom_cache_exports_as_one_page_per_setting(tmp_path):
    from molf.lab import html_app, notebook
    teaching.clear_cache()
    epd = teaching.train(TINY)
    pfn = teaching.train(TINY, score="pfn")
    assert [l.settings for l in teaching.cached_lessons()] == [epd.settings, pfn.settings]
    nb = notebook.setup("06_x", {"runs_dir": str(tmp_path), "figures_dir": str(tmp_path)})
    path = nb.export_html({l.settings.label(): l.routing for l in teaching.cached_lessons()}, "classroom")
    assert path == tmp_path / "06_x_classroom.html"
    data = json.loads(re.search(r"const RUNS = (.*);\n", path.read_text()).group(1).replace("<\\/", "</"))
    assert list(data) == [epd.settings.label(), pfn.settings.label()]
    last = data[pfn.settings.label()]
    assert last["steps"] == pfn.steps and len(last["winner"]) == len(pfn.steps)
    assert html_app.frames(pfn.routing)["winner"] == last["winner"]
