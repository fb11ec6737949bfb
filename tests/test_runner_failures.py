"""The runner and the Trainer path under failure: empty data, crashes while finishing, resumes, reruns of
the same run, a non-finite gradient; and the single-run command line."""

import json
import shutil
import signal
from contextlib import contextmanager

import pytest
import torch

import molf
from molf import routing_log
from molf.lab import models, runs, tasks
from molf.lab import train as train_module
from molf.lab.train import TrainConfig, example_order, main, run

TINY = dict(model="tiny", task="fact", steps=3, batch_size=2, seq_len=48, eval_limit=2, progress=False,
            save_model=False, log_grad_norms=False)


def cfg(tmp_path, **kw):
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / "run"), **kw})


@contextmanager
def deadline(seconds):
    """Turn a hang into a test failure."""
    def fail(*_):
        raise TimeoutError(f"did not return within {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------- empty data: an error, not a hang
def test_train_limit_zero_is_refused_before_anything_loads(tmp_path):
    with deadline(60), pytest.raises(ValueError, match="train_limit must be an integer >= 1"):
        run(cfg(tmp_path, train_limit=0))


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_an_empty_training_file_is_a_clear_error(tmp_path, monkeypatch, content):
    data = tmp_path / "data"
    shutil.copytree(tasks.data_dir(), data)
    (data / "fact" / "train.jsonl").write_text(content)
    monkeypatch.setenv("MOLF_DATA", str(data))
    with deadline(60), pytest.raises(ValueError, match="'fact' training split .* has no rows"):
        run(cfg(tmp_path))


def test_example_order_of_nothing_raises():
    with deadline(10), pytest.raises(ValueError, match="training set is empty"):
        example_order(0, 4, seed=0)
    assert example_order(0, 0, seed=0) == []


# ---------------------------------------------------------------------------- finishing atomically
def test_a_crash_while_saving_the_model_leaves_an_unfinished_run_that_a_rerun_completes(tmp_path, monkeypatch):
    config = cfg(tmp_path, save_model=True, keep_checkpoint=False)
    real = train_module._save_model_atomically

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(train_module, "_save_model_atomically", crash)
    with pytest.raises(OSError, match="disk full"):
        run(config)
    out = tmp_path / "run"
    assert not (out / "metrics.json").exists(), "the run was marked finished without its model"
    assert not (out / "model").exists()

    monkeypatch.setattr(train_module, "_save_model_atomically", real)
    result = run(config)
    assert result.model is not None, "the rerun must train/finish, not report a finished run"
    assert (out / "metrics.json").is_file() and (out / "model" / "config.json").is_file()
    assert not (out / "model.partial").exists() and not (out / "checkpoint.pt").exists()
    assert list(runs.load(out).steps["step"]) == [0, 1, 2]


def test_metrics_without_the_asked_for_model_is_not_a_finished_run(tmp_path):
    config = cfg(tmp_path, save_model=True)
    run(config)
    out = tmp_path / "run"
    shutil.rmtree(out / "model")  # e.g. a run left by an older version, or a deleted model
    result = run(config)
    assert result.model is not None and (out / "model" / "config.json").is_file()


def test_the_checkpoint_goes_last(tmp_path, monkeypatch):
    """metrics.json is written while the checkpoint still exists; the checkpoint is removed after it."""
    config = cfg(tmp_path, steps=4, save_every=2, save_model=True)
    seen = {}
    real_write = train_module._atomic_write_text

    def spy(path, text):
        seen["checkpoint_at_mark"] = (path.parent / "checkpoint.pt").exists()
        seen["model_at_mark"] = (path.parent / "model").is_dir()
        real_write(path, text)

    monkeypatch.setattr(train_module, "_atomic_write_text", spy)
    run(config)
    assert seen == {"checkpoint_at_mark": True, "model_at_mark": True}
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------- the same run, reached another way
def test_the_same_run_is_recognised_through_another_spelling_of_its_settings(tmp_path, monkeypatch):
    first = run(cfg(tmp_path))
    assert first.model is not None
    monkeypatch.chdir(tmp_path)
    for other in (dict(out_dir="run"), dict(out_dir=str(tmp_path / "run") + "/"), dict(progress=True),
                  dict(save_every=7)):
        again = run(cfg(tmp_path, **other))
        assert again.model is None, f"{other} retrained a finished run"
        assert again.metrics == first.metrics


def test_a_different_config_is_refused_naming_the_fields(tmp_path):
    run(cfg(tmp_path))
    with pytest.raises(ValueError, match=r"lr_fft \(there: 5e-05, asked: 0.001\)") as error:
        run(cfg(tmp_path, lr_fft=1e-3))
    assert "seed" not in str(error.value)
    with pytest.raises(ValueError, match=r"seed \(there: 0, asked: 1\)"):
        run(cfg(tmp_path, seed=1))


def test_a_checkpoint_of_a_different_config_is_refused_naming_the_fields(tmp_path):
    run(cfg(tmp_path, steps=4, save_every=2), stop_after=2)
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match=r"holds a checkpoint of a different config: batch_size"):
        run(cfg(tmp_path, steps=4, save_every=2, batch_size=1))


# ---------------------------------------------------------------------------- a non-finite gradient
def test_one_infinite_gradient_skips_that_module_without_zeroing_every_other_gradient(tmp_path):
    """Clipping by an inf norm would multiply every gradient by 0 (and the inf one into NaN); the runner
    counts the step and leaves the gradients to the optimizer, which skips the bad module only. So every
    other weight moves exactly as in a run without the bad element and without clipping."""
    bad = "model.layers.0.mlp.down_proj"

    def trained(poisoned: bool, **kw):
        model, tokenizer = models.load("tiny")
        if poisoned:
            def poison(grad):
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
                return grad
            model.get_submodule(bad).weight.register_hook(poison)
        out = tmp_path / ("poisoned" if poisoned else "clean")
        return run(cfg(tmp_path, steps=1, eval_limit=0, out_dir=str(out), **kw), model=model, tokenizer=tokenizer)

    poisoned = trained(True)                         # default clipping (max_grad_norm=1.0)
    clean = trained(False, max_grad_norm=None)
    assert poisoned.metrics["nonfinite_grad_steps"] == 1 and clean.metrics["nonfinite_grad_steps"] == 0
    before = models.load("tiny")[0].state_dict()
    p, c = poisoned.model.state_dict(), clean.model.state_dict()
    for name in c:
        if name.startswith(bad + "."):
            assert torch.equal(p[name], before[name]), f"{name}: the module with the bad gradient moved"
            assert torch.isfinite(p[name]).all()
        else:
            assert torch.equal(p[name], c[name]), f"{name} did not train as without the bad gradient"
    assert not torch.equal(c[bad + ".weight"], before[bad + ".weight"])


# ---------------------------------------------------------------------------- the Trainer path, resumed
def test_trainer_resumed_from_a_checkpoint_logs_every_step_once(tmp_path):
    from transformers import TrainingArguments

    from molf.hf import MoLFTrainer

    features = None
    log = tmp_path / "hf" / "routing.jsonl"

    def trainer(max_steps):
        nonlocal features
        model, tokenizer = models.load("tiny")
        molf.wrap(model, ranks=(4,))
        if features is None:
            features = tasks.encode("fact", tasks.load("fact", "train", limit=8), tokenizer, max_len=48)
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2,
                                 max_steps=max_steps, learning_rate=1e-3, report_to=[], save_strategy="steps",
                                 save_steps=2, logging_strategy="no", use_cpu=True)
        return MoLFTrainer(model=model, args=args, train_dataset=features, routing_log=log,
                           data_collator=lambda f: tasks.collate(f, tokenizer.pad_token_id))

    trainer(4).train()                     # steps 0..3, checkpoints at 2 and 4
    assert [r.step for r in routing_log.read(log)] == [0, 1, 2, 3]
    with log.open("a") as f:               # a crash cut the next record off mid-write
        f.write('{"step": 4, "lr": 0.001, "winn')
    trainer(4).train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))  # redoes steps 2, 3
    assert [r.step for r in routing_log.read(log)] == [0, 1, 2, 3]
    table = runs.read_routing(log)
    assert table.groupby(["step", "module"])["won"].sum().eq(1).all()


def test_the_core_routing_log_reader_names_the_bad_line_and_drops_a_torn_tail_only_when_asked(tmp_path):
    log = tmp_path / "routing.jsonl"
    good = '{"step": 0, "lr": 0.1, "winners": {"m": ["fft"]}, "scores": {"m": {"fft": 1.0, "lora0": 0.5}}}\n'
    log.write_text(good + '{"step": 1, "lr": 0.1, "winners": {"m": ["fft"]}, "sco')
    with pytest.raises(ValueError, match=r"routing.jsonl, line 2: the last line has no newline"):
        routing_log.read(log)
    assert [r.step for r in routing_log.read(log, drop_torn_tail=True)] == [0]
    for bad, why in [("not json\n", "not a routing-log record"), ('{"step": 1}\n', "missing"),
                     ('{"step": -1, "winners": {}, "scores": {}}\n', "step must be an integer >= 0"),
                     ('[1, 2]\n', "not a routing-log record")]:
        log.write_text(good + bad)
        with pytest.raises(ValueError, match=rf"routing.jsonl, line 2: .*{why}"):
            routing_log.read(log, drop_torn_tail=True)   # a whole bad line is never dropped


# ---------------------------------------------------------------------------- the single-run command line
def test_command_line_trains_one_run_from_flags(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["--model", "tiny", "--task", "fact", "--method", "molf_e", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "48", "--eval-limit", "2", "--ranks", "4,8", "--alphas", "8,11.5",
                 "--freeze-non-linear", "true", "--save-model", "false", "--progress", "false",
                 "--out-dir", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "molf_e" and printed["steps"] == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["ranks"] == [4, 8] and saved["alphas"] == [8.0, 11.5] and saved["freeze_non_linear"] is True


def test_command_line_names_a_bad_flag_value(capsys):
    with pytest.raises(SystemExit):
        main(["--steps", "many"])
    assert "--steps takes a int or none, got 'many'" in capsys.readouterr().err


def test_command_line_reports_a_bad_config_as_an_error(tmp_path, capsys):
    assert main(["--model", "tiny", "--method", "fft", "--topk", "2", "--out-dir", str(tmp_path / "x")]) == 2
    assert "method 'fft' does not take ['topk']" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("wd_fft", float("inf"), "wd_fft must be a finite number >= 0, got inf"),
    ("lr_lora", float("nan"), "lr_lora must be a finite number > 0, got nan"),
    ("max_grad_norm", float("inf"), "max_grad_norm must be a finite number > 0, got inf"),
    ("epochs", float("inf"), "epochs must be a finite number > 0, got inf"),
])
def test_non_finite_settings_are_refused_by_name(tmp_path, field, value, message):
    extra = {"steps": None} if field == "epochs" else {}
    with pytest.raises(ValueError, match=message):
        cfg(tmp_path, **{field: value}, **extra).resolved()
