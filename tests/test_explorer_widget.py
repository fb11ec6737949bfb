"""The router explorer's habits: Play draws every step (never skipping one behind a slow redraw), "save
this frame" writes the picture and its numbers, and two runs side by side under one set of controls."""
from __future__ import annotations

import time

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

from molf.lab import explorer, runs  # noqa: E402
from molf.lab.train import TrainConfig, run  # noqa: E402

TINY = dict(model="tiny", task="fact", method="molf", steps=6, batch_size=2, seq_len=48, eval_limit=0,
            progress=False, save_model=False, ranks=(4,), save_every=0)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    epd = run(TrainConfig(**{**TINY, "out_dir": str(folder / "epd")})).out_dir
    pfn = run(TrainConfig(**{**TINY, "score": "pfn", "out_dir": str(folder / "pfn")})).out_dir
    return epd, pfn


def _wait(condition, seconds=60):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_play_draws_every_step_in_order_even_when_a_redraw_is_slow(two_runs, monkeypatch):
    app = explorer.RouterExplorer(two_runs[0])
    app.widget(interval=0.0)
    controls = app._widgets["controls"]
    real_frame = app.frame

    def slow_frame(*args, **kwargs):   # a redraw slower than the timer's interval
        time.sleep(0.15)
        return real_frame(*args, **kwargs)

    monkeypatch.setattr(app, "frame", slow_frame)
    before = len(controls.drawn)
    images = []
    app._widgets["image"].observe(lambda change: images.append(change["new"]), names="value")
    app._widgets["play"].click()                     # at the last step: Play starts again from the first
    assert controls.playing and app._widgets["play"].description == "Pause"
    _wait(lambda: not controls.playing)
    assert controls.drawn[before:] == [int(s) for s in app.steps]
    assert len(images) == len(app.steps) and len(set(images)) > 1
    assert app._widgets["play"].description == "Play" and app._widgets["step"].value == app.steps[-1]
    # Pause stops it where it is
    app._widgets["step"].value = int(app.steps[0])
    app._widgets["play"].click()
    app._widgets["play"].click()
    time.sleep(0.5)
    assert not controls.playing and app._widgets["step"].value < app.steps[-1]


def test_save_this_frame_writes_the_png_and_its_numbers(two_runs, tmp_path, capsys):
    app = explorer.RouterExplorer(two_runs[0])
    app.widget(save_dir=tmp_path / "frames")
    app._widgets["step"].value = 2
    app._widgets["layer"].value = 1
    app._widgets["module_type"].value = "k_proj"
    app._widgets["save"].click()
    png, = (tmp_path / "frames").glob("*.png")
    assert png.name.endswith("_step2_layer1_k_proj.png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(png.with_suffix(".csv"))
    assert str(png.resolve()) in app._widgets["saved"].value and str(png) in capsys.readouterr().out
    routing = runs.load(two_runs[0]).routing
    expected = routing[routing["step"] == 2].sort_values(["module", "expert"]).reset_index(drop=True)
    got = table.sort_values(["module", "expert"]).reset_index(drop=True)
    assert len(got) == len(expected) and (got["step"] == 2).all()
    assert got["won"].tolist() == expected["won"].astype(bool).tolist()
    assert got["score"].tolist() == pytest.approx(expected["score"].tolist(), rel=1e-9)


def test_two_runs_side_by_side_share_the_controls_and_show_their_difference(two_runs, tmp_path):
    epd, pfn = two_runs
    app = explorer.CompareExplorer(epd, pfn)
    app.widget(save_dir=tmp_path)
    a, b = explorer.RouterExplorer(epd), explorer.RouterExplorer(pfn)
    diff = app.difference(3)
    assert diff == pytest.approx(a.cumulative[3] - b.cumulative[3])
    assert abs(diff).max() > 0, "EPD and PFN routed the tiny model identically: no difference to show"
    app._widgets["step"].value = 3
    info = app._widgets["info"].value
    assert info.count("at step 3") == 2 and info.split("<br>")[0] == a._info(3, *app.render_defaults())
    fig = app.frame(3)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 3 and "A - B" in fig.axes[2].get_title()
    app._widgets["save"].click()
    table = pd.read_csv(next(tmp_path.glob("compare_*_step3.csv")))
    assert set(table["run"]) == {"A: epd", "B: pfn"}
    with pytest.raises(ValueError, match="not in this run"):
        app.frame(99)


def test_comparing_runs_of_different_models_is_refused(two_runs, tmp_path):
    other = run(TrainConfig(**{**TINY, "steps": 2, "out_dir": str(tmp_path / "short")})).out_dir
    app = explorer.CompareExplorer(two_runs[0], other)
    assert list(app.steps) == [0, 1]   # the steps both logged
    with pytest.raises(ValueError, match="route different modules"):
        explorer.CompareExplorer(two_runs[0], _one_layer(explorer.RouterExplorer(two_runs[1])))


def _one_layer(app):
    app.layers = app.layers[:1]
    return app
