"""The runner and its run directory: one writer at a time (a lock), checkpoints that cannot run code,
every setting checked before the first step, an evaluation that can fail and be rerun alone, and a
resume that cuts every log back to its checkpoint (a torn last line included)."""
from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from molf.lab import runs, tasks
from molf.lab import train as train_module
from molf.lab.train import RunDirectoryInUse, RunLock, Session, TrainConfig, main, run

TINY = dict(model="tiny", task="fact", method="molf", steps=4, batch_size=2, seq_len=48, eval_limit=2,
            progress=False, save_model=False, ranks=(4,))


def cfg(tmp_path, name="run", **kw):
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **kw})


# ---------------------------------------------------------------------------- one writer
def test_a_second_runner_in_this_process_is_refused_while_the_first_holds_the_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        with pytest.raises(RunDirectoryInUse, match=f"{out} is in use by another runner"):
            run(cfg(tmp_path))
    assert not (out / "steps.csv").exists() and not (out / "config.json").exists()
    session = Session(cfg(tmp_path))                     # a live session holds it until it finishes
    with pytest.raises(RunDirectoryInUse):
        run(cfg(tmp_path))
    session.fit()
    session.finish()
    assert run(cfg(tmp_path)).model is None              # finished and released: reused, not refused


def test_a_runner_in_another_process_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from molf.lab.train import RunLock
        lock = RunLock({str(out)!r})
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryInUse, match=rf"pid {holder.pid}"):
            run(cfg(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert list(runs.load(run(cfg(tmp_path)).out_dir).steps["step"]) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- checkpoints hold data, not code
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_checkpoint_with_a_pickled_payload_is_refused_without_running_it(tmp_path):
    config = cfg(tmp_path, save_every=2)
    run(config, stop_after=2)
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)        # the real one holds only plain data
    marker = tmp_path / "pwned"
    checkpoint["optimizer"]["extra"] = Payload(marker)
    torch.save(checkpoint, path)
    assert pickle.loads(pickle.dumps(Payload(tmp_path / "probe"))) is None and (tmp_path / "probe").exists()
    with pytest.raises(ValueError, match=r"checkpoint.pt .*refus"):
        run(config)
    assert not marker.exists()


# ---------------------------------------------------------------------------- every setting, before the first step
@pytest.mark.parametrize("kw, stop_after, match", [
    (dict(eval_split="bogus"), None, "unknown eval_split 'bogus'"),
    (dict(eval_batch_size=0), None, "eval_batch_size must be an integer >= 1, got 0"),
    (dict(save_every=-1), None, "save_every must be an integer >= 0"),
    (dict(seed=-2), None, "seed must be an integer >= 0"),
    (dict(progress="yes"), None, "progress must be True or False"),
    (dict(log_routing=1), None, "log_routing must be True or False"),
    (dict(), -3, "stop_after must be an integer >= 1"),
    (dict(), 0, "stop_after must be an integer >= 1"),
    (dict(), True, "stop_after must be an integer >= 1"),
])
def test_a_bad_setting_fails_before_anything_is_written(tmp_path, kw, stop_after, match):
    with pytest.raises(ValueError, match=match):
        run(cfg(tmp_path, **kw), stop_after=stop_after)
    assert not [p.name for p in (tmp_path / "run").glob("*") if p.name != train_module.LOCK_FILE]


def test_the_command_line_refuses_a_negative_stop_after(tmp_path, capsys):
    code = main(["--model", "tiny", "--steps", "4", "--stop-after", "-3", "--out-dir", str(tmp_path / "r"),
                 "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "stop_after must be an integer >= 1" in err and "got -3" in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_missing_evaluation_split_fails_before_training(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "fact").mkdir(parents=True)
    (data / "fact" / "train.jsonl").write_bytes((tasks.data_dir() / "fact" / "train.jsonl").read_bytes())
    monkeypatch.setenv("MOLF_DATA", str(data))
    with pytest.raises((ValueError, FileNotFoundError), match="test"):
        run(cfg(tmp_path))
    assert not (tmp_path / "run" / "steps.csv").exists()


# ---------------------------------------------------------------------------- evaluation fails, training kept
def test_a_failed_evaluation_keeps_the_model_and_checkpoint_and_a_rerun_only_evaluates(tmp_path, monkeypatch):
    config = cfg(tmp_path, save_model=True)
    real = tasks.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation crashed (simulated)")

    monkeypatch.setattr(tasks, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run(config)
    out = tmp_path / "run"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert (out / "model" / "config.json").is_file() and not (out / "metrics.json").exists()
    logged = (out / "steps.csv").read_bytes()

    trained = []
    monkeypatch.setattr(tasks, "evaluate", real)
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: trained.append(k["start_step"]) or
                        train_module.Loop(None, None, None, k["start_step"], k["steps"]))
    result = run(config)
    assert trained == [4]                                   # nothing left to train: evaluation only
    assert (out / "steps.csv").read_bytes() == logged and (out / "metrics.json").is_file()
    assert result.metrics["steps"] == 4 and result.metrics["train_time_s"] > 0
    assert "efficacy" in result.metrics["metrics"] and not (out / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------- resume cuts the logs back
LOGS = ("steps.csv", "grad_norms.csv", "routing.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(TrainConfig(**{**TINY, "eval_limit": 0, "save_every": 2, "out_dir": str(out)}))
    return runs.load(out)


@pytest.mark.parametrize("log", LOGS)
@pytest.mark.parametrize("damage", ["torn last line", "records after the checkpoint"])
def test_resume_cuts_every_log_back_to_the_checkpoint(tmp_path, uninterrupted, log, damage):
    config = cfg(tmp_path, eval_limit=0, save_every=2)
    run(config, stop_after=2)
    path = tmp_path / "run" / log
    last = path.read_bytes().splitlines(keepends=True)[-1]
    later = last.replace(b"1,", b"2,", 1) if log.endswith(".csv") else last.replace(b'"step": 1', b'"step": 2')
    with open(path, "ab") as f:                             # what a crash after the checkpoint leaves
        f.write(later + later[: len(later) // 2] if damage == "torn last line" else later + later)
    run(config)
    data = runs.load(tmp_path / "run")
    pd.testing.assert_frame_equal(data.steps.drop(columns="step_time_s"),
                                  uninterrupted.steps.drop(columns="step_time_s"))
    pd.testing.assert_frame_equal(data.grad_norms, uninterrupted.grad_norms)
    pd.testing.assert_frame_equal(data.routing, uninterrupted.routing)


def test_an_unreadable_record_before_the_checkpoint_names_file_and_line(tmp_path):
    config = cfg(tmp_path, eval_limit=0, save_every=2)
    run(config, stop_after=2)
    path = tmp_path / "run" / "routing.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match=r"routing.jsonl, line 2"):
        run(config)


def test_each_step_is_on_disk_when_the_next_callback_runs(tmp_path):
    """A reader of the run directory (another process, a live view) sees every finished step: the logs are
    handed to the OS after each step, not only at checkpoints (save_every=0: there are none here)."""
    from molf.lab.engine import Callback

    seen = []

    class Reader(Callback):
        def on_step(self, loop):
            out = tmp_path / "run"
            rows = (out / "steps.csv").read_text().splitlines()[1:]
            routing = (out / "routing.jsonl").read_text().splitlines()
            seen.append((loop.step, len(rows), len(routing)))

    session = Session(cfg(tmp_path, save_every=0))
    try:
        session.fit(callbacks=[Reader()])
    finally:
        session.close()
    assert seen == [(step, step + 1, step + 1) for step in range(TINY["steps"])]
