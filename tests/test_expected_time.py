"""Each training cell says how long it will take before it starts: from the recorded step times of a run of
the same shape, 0 for a finished run; the live progress line says the time left."""
from __future__ import annotations

import csv

import pytest

from molf.lab import notebook

TINY = dict(model="tiny", task="fact", method="molf", steps=4, batch_size=2, seq_len=48, eval_limit=0,
            ranks=(4,))


def test_expected_time_comes_from_recorded_runs_of_the_same_shape(tmp_path, capsys):
    config = notebook.run_config(tmp_path, **TINY)
    assert notebook.expected_time(config)[0] is None          # nothing recorded yet
    notebook.train(tmp_path, **TINY)
    out = capsys.readouterr().out
    # nothing recorded: said before training that it is measured, then measured on steps 2-3 (step 1 warms up)
    assert out.index("expected: measured after the first 3 steps") < out.index("expected: about") < out.index("trained")
    with open(next(tmp_path.glob("*/steps.csv")), newline="") as f:
        timed = [float(r["step_time_s"]) for r in list(csv.DictReader(f))[1:3]]
    assert f"(1 steps x {sum(timed) / 2:.2f} s, measured on steps 2-3)" in out
    seconds, how = notebook.expected_time(config)
    assert seconds == 0 and "reused" in how
    longer = notebook.run_config(tmp_path, **{**TINY, "steps": 40, "seed": 3})
    seconds, how = notebook.expected_time(longer)
    with open(next(tmp_path.glob("*/steps.csv")), newline="") as f:
        warm = sorted(float(r["step_time_s"]) for r in list(csv.DictReader(f))[2:])   # steps 2 and 3
    assert seconds == pytest.approx(40 * (warm[0] + warm[1]) / 2) and "1 recorded run" in how
    # another shape (method, batch) is not used
    assert notebook.expected_time(notebook.run_config(tmp_path, **{**TINY, "method": "lora"}))[0] is None
    assert notebook.expected_time(notebook.run_config(tmp_path, **{**TINY, "batch_size": 3}))[0] is None


def test_a_live_trained_run_is_the_runners_and_says_the_time_left(tmp_path, monkeypatch):
    from molf.lab import explorer
    lines = []
    real_set = explorer.LiveRun._set

    def record(self, status, message):
        lines.append(message)
        real_set(self, status, message)

    monkeypatch.setattr(explorer.LiveRun, "_set", record)
    live = notebook.train(tmp_path / "live", live_every=1, **TINY)
    plain = notebook.train(tmp_path / "plain", **TINY)
    assert live.steps["loss"].tolist() == pytest.approx(plain.steps["loss"].tolist(), rel=1e-6)
    assert live.path.name == plain.path.name
    assert any("s left" in line for line in lines), lines


class _Loop:
    def __init__(self, step, steps, seconds):
        self.step, self.steps, self.seconds, self.start_step = step, steps, seconds, 0

    @property
    def steps_done(self):
        return self.step + 1 - self.start_step


def test_measured_time_skips_the_warm_up_step_and_says_the_rest_once():
    said = []
    timer = notebook.MeasuredTime(say=said.append)
    for step, seconds in enumerate([30.0, 2.0, 4.0, 99.0, 99.0]):   # a slow first step, then 2 s and 4 s
        timer.on_step(_Loop(step, 100, seconds))
    # 97 steps left after step 3, at the median 3.0 s of steps 2-3: 291 s, said once
    assert said == ["expected: about 4.8 min more training (97 steps x 3.00 s, measured on steps 2-3)"]
