"""Routing statistics exported as TensorBoard events, read back with TensorBoard's own reader."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toy import batch, loss_fn, toy

import molf
from molf.lab import importer, tensorboard


def _events(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("topk", [1, 2])
def test_the_callback_writes_win_shares_that_match_the_decisions(tmp_path, topk):
    model = toy()
    molf.wrap(model, ranks=(2,), exclude=())
    opt = molf.MoLFAdamW(molf.param_groups(model, lr_fft=1e-3, lr_lora=1e-3), topk=topk)
    callback = tensorboard.TensorBoardCallback(tmp_path / "tb")
    expected = []
    for step in range(3):
        opt.zero_grad()
        loss = loss_fn(model, batch(step))
        loss.backward()
        opt.step()
        won = [e for m, w in opt.last_decisions.items() if m.endswith("q_proj") for e in w]
        expected.append(won.count("fft") / 2)  # two q_proj modules
        callback.on_step(SimpleNamespace(step=step, loss=float(loss.detach()), lr=1e-3, grad_norm=1.0, optimizer=opt))
    callback.on_end(None)
    acc = _events(tmp_path / "tb")
    assert [e.value for e in acc.Scalars("routing/win_share/q_proj/fft")] == pytest.approx(expected)
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2]
    assert len(acc.Scalars("routing/switch_rate")) == 2  # from the second step on
    if topk == 2:
        assert all(e.value == 1.0 for e in acc.Scalars("routing/win_share/q_proj/lora0"))
    assert "routing/log10_score/fft" in acc.Tags()["histograms"]


def test_a_run_directory_exports_every_step_and_decision(tmp_path):
    log = tmp_path / "ref.jsonl"
    log.write_text('{"step": 0, "selections": {"model.layers.0.mlp.up_proj": {"winners": ["fft"], '
                   '"scores": {"fft": 0.5, "lora": 0.25}}, "model.layers.1.mlp.up_proj": {"winners": ["lora"], '
                   '"scores": {"fft": 0.1, "lora": 0.2}}}}\n'
                   '{"step": 1, "selections": {"model.layers.0.mlp.up_proj": {"winners": ["lora"], '
                   '"scores": {"fft": 0.1, "lora": 0.25}}, "model.layers.1.mlp.up_proj": {"winners": ["lora"], '
                   '"scores": {"fft": 0.1, "lora": 0.2}}}}\n')
    importer.import_reference_log(log, tmp_path / "run")
    assert tensorboard.main([str(tmp_path / "run"), str(tmp_path / "tb")]) == 0
    acc = _events(tmp_path / "tb")
    assert [e.value for e in acc.Scalars("routing/win_share/up_proj/fft")] == [0.5, 0.0]
    assert [e.value for e in acc.Scalars("routing/switch_rate")] == [0.5]
    assert "train/loss" not in acc.Tags()["scalars"]  # the import has no losses: nothing made up


def test_a_missing_run_directory_is_a_clear_error(tmp_path, capsys):
    assert tensorboard.main([str(tmp_path / "nothing"), str(tmp_path / "tb")]) == 2
    assert "not a run directory" in capsys.readouterr().out


def test_the_runner_writes_tensorboard_events_when_asked_and_it_does_not_change_the_run(tmp_path):
    from molf.lab import train

    config = train.TrainConfig(model="tiny", task="fact", method="molf", steps=3, batch_size=2, seq_len=32,
                               eval_limit=0, save_model=False, progress=False, out_dir=str(tmp_path / "run"),
                               log_tensorboard=True)
    train.run(config)
    acc = _events(tmp_path / "run" / "tensorboard")
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2]
    assert any(tag.startswith("routing/win_share/") for tag in acc.Tags()["scalars"])
    again = train.run(train.TrainConfig(**{**config.__dict__, "log_tensorboard": False}))
    assert again.model is None  # the finished run is reused: TensorBoard is how a run is shown, not what it is
    with pytest.raises(ValueError, match="log_tensorboard must be True or False"):
        train.TrainConfig(**{**config.__dict__, "log_tensorboard": "yes"}).resolved()
