"""The live explorer: one loaded model trained in the kernel, a frame every N steps with no reload and no
checkpoint between frames, Stop and Resume of the same in-memory run, one progress line."""
from __future__ import annotations

import pandas as pd
import pytest

from molf.lab import explorer, models, runs
from molf.lab import train as train_module
from molf.lab.train import TrainConfig, run

TINY = dict(model="tiny", task="fact", method="molf", steps=5, batch_size=2, seq_len=48, eval_limit=2,
            progress=False, save_model=False, ranks=(4,))


def cfg(tmp_path, name="live", **kw):
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **kw})


@pytest.fixture
def counted(monkeypatch):
    """How often a model is loaded and a checkpoint written or read."""
    calls = {"load": 0, "save": [], "torch.load": 0}
    real_load, real_save = models.load, train_module._atomic_torch_save
    real_read = train_module._load_checkpoint

    def load(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    def save(obj, path):
        calls["save"].append(obj["step"])
        real_save(obj, path)

    def read(*a, **k):
        calls["torch.load"] += 1
        return real_read(*a, **k)

    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(train_module, "_atomic_torch_save", save)
    monkeypatch.setattr(train_module, "_load_checkpoint", read)
    return calls


def test_every_step_is_a_frame_of_one_loaded_model_and_the_run_is_the_runners(tmp_path, counted):
    frames = []
    result, fig = explorer.live(cfg(tmp_path), display=False,
                                on_frame=lambda f, app: frames.append((app.record.steps_done, counted["save"][:])))
    assert [steps for steps, _ in frames] == [1, 2, 3, 4, 5]
    assert all(saved == [] for _, saved in frames)          # no checkpoint between frames ...
    assert counted == {"load": 1, "save": [5], "torch.load": 0}   # ... one model, the final checkpoint only
    assert result.metrics["steps"] == 5 and fig.axes
    ours = runs.load(result.out_dir)
    theirs = runs.load(run(cfg(tmp_path, "runner")).out_dir)
    pd.testing.assert_frame_equal(ours.steps.drop(columns="step_time_s"), theirs.steps.drop(columns="step_time_s"))
    pd.testing.assert_frame_equal(ours.routing, theirs.routing)
    again, fig_again = explorer.live(cfg(tmp_path), display=False)   # finished: drawn from its directory
    assert again.model is None and again.metrics == result.metrics and fig_again.axes


def test_every_n_steps_redraws_and_the_record_matches_the_log(tmp_path):
    frames = []
    app = explorer.LiveRun(cfg(tmp_path), every=2, on_frame=lambda f, a: frames.append(a.record.steps_done))
    app.run()
    assert frames == [2, 4, 5]                                 # every 2 steps, and the last one
    routing = runs.load(tmp_path / "live").routing
    fft = routing[routing["expert"] == "fft"].groupby(["layer", "module_type"])["won"].mean().unstack()
    grid = pd.DataFrame(app.record.share("fft"), index=app.record.layers, columns=app.record.types)
    pd.testing.assert_frame_equal(grid, fft[app.record.types].astype(float), check_names=False)
    assert app.record.losses == list(runs.load(tmp_path / "live").steps["loss"])


def test_stop_and_resume_continue_the_same_in_memory_run(tmp_path, counted):
    def stop_at_two(fig, app):
        if app.record.steps_done == 2:
            app.stop()

    app = explorer.LiveRun(cfg(tmp_path), on_frame=stop_at_two)
    app.widget()
    assert app.run() is None and app.status == "stopped" and "Stop pressed" in app.message
    assert "stopped at 2/5" in app._widgets["line"].value and not app._widgets["resume"].disabled
    assert counted["save"] == [] and app.session.step == 2
    app.resume()                                               # in the background, same objects
    result = app.wait(timeout=600)
    assert result is not None and app.status == "done"
    assert counted == {"load": 1, "save": [5], "torch.load": 0}
    line = app._widgets["line"].value
    assert "#2ca02c" in line and "done: 5/5 steps" in line and app._widgets["stop"].disabled
    uninterrupted = runs.load(run(cfg(tmp_path, "runner")).out_dir)
    pd.testing.assert_frame_equal(runs.load(tmp_path / "live").routing, uninterrupted.routing)
    assert list(runs.load(tmp_path / "live").steps["loss"]) == list(uninterrupted.steps["loss"])


def test_a_failure_ends_the_progress_line_in_red_naming_it(tmp_path, monkeypatch):
    from molf.lab import tasks

    def broken(*a, **k):
        raise RuntimeError("evaluation crashed (simulated)")

    monkeypatch.setattr(tasks, "evaluate", broken)
    app = explorer.LiveRun(cfg(tmp_path))
    app.widget()
    app.start()
    assert app.wait(timeout=600) is None and app.status == "failed"
    line = app._widgets["line"].value
    assert "#d62728" in line and "evaluation crashed" in line
    app.close()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        explorer.LiveRun(cfg(tmp_path), every=0)
    with pytest.raises(ValueError, match="routed method"):
        explorer.LiveRun(cfg(tmp_path, method="fft", ranks=None))


def test_a_new_live_run_of_the_same_directory_replaces_the_old_one_and_resumes_it(tmp_path):
    def stop_at_two(fig, app):
        if app.record.steps_done == 2:
            app.stop()

    old = explorer.LiveRun(cfg(tmp_path), on_frame=stop_at_two)
    old.run()
    new = explorer.LiveRun(cfg(tmp_path))                     # e.g. the notebook cell run again
    assert old.status == "stopped" and "closed at 2/5" in old.message
    assert new.session.step == 2 and new.record.steps_done == 2 and len(new.record.losses) == 2
    assert new.run() is not None and new.record.steps_done == 5
    uninterrupted = runs.load(run(cfg(tmp_path, "runner")).out_dir)
    assert new.record.losses == list(uninterrupted.steps["loss"])
    pd.testing.assert_frame_equal(runs.load(tmp_path / "live").routing, uninterrupted.routing)


def test_a_finished_live_run_lets_go_of_its_model_and_optimizer(tmp_path):
    import gc
    import weakref
    from pathlib import Path

    app = explorer.LiveRun(cfg(tmp_path))
    model, optimizer = weakref.ref(app.session.model), weakref.ref(app.session.optimizer)
    result = app.run()
    gc.collect()
    assert model() is None and optimizer() is None, "the notebook's kernel still holds the trained model"
    assert result.model is None and result.metrics["steps"] == TINY["steps"]
    assert Path(app.session.config.out_dir).resolve() not in explorer._LIVE_RUNS
    assert app.figure.fig.axes  # the picture and the numbers stay


def test_a_stopped_live_run_keeps_its_model_for_resume(tmp_path):
    app = explorer.LiveRun(cfg(tmp_path))
    app.run(steps=2)
    assert explorer.release_finished() == 0 and app.session.model is not None
    app.run()
    assert app.session.model is None
