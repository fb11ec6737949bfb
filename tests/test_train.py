"""The training runner on the tiny model: every method, artifacts, resume, errors, Trainer path."""

import pandas as pd
import pytest
import torch

import molf
from molf.lab import runs, tasks
from molf.lab.train import METHODS, TrainConfig, TrainingDiverged, run

TINY = dict(model="tiny", task="fact", steps=3, batch_size=2, seq_len=48, eval_limit=4, progress=False,
            save_model=False)


def cfg(tmp_path, **kw):
    values = {**TINY, "out_dir": str(tmp_path / kw.get("method", "molf")), **kw}
    return TrainConfig(**values)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_writes_its_artifacts(tmp_path, method):
    result = run(cfg(tmp_path, method=method))
    data = runs.load(result.out_dir)
    assert data.config["method"] == method
    assert list(data.steps["step"]) == [0, 1, 2]
    assert data.steps["loss"].notna().all() and (data.steps["lr"] > 0).all()
    metrics = data.metrics
    assert metrics["primary_metric"] == tasks.PRIMARY_METRIC["fact"]
    assert 0.0 <= metrics["metrics"]["efficacy"] <= 1.0
    assert metrics["trainable_params"] > 0 and metrics["optimizer_state_bytes"] > 0
    assert metrics["step_time_s"] > 0 and metrics["peak_memory_bytes"] > 0

    # grad-norm rows: every adapted module, every expert, every step
    grads = data.grad_norms
    per_step = grads.groupby("step").size()
    assert list(per_step.index) == [0, 1, 2] and per_step.nunique() == 1
    modules = set(grads["module"])
    assert len(modules) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert {m.rsplit(".", 1)[-1] for m in modules} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}
    assert (grads["grad_norm"] >= 0).all() and grads["grad_norm"].notna().all()

    if method in ("molf", "molf_e"):
        routing = data.routing
        experts = {"molf": {"fft", "lora0"}, "molf_e": {"lora0", "lora1"}}[method]
        assert set(routing["expert"]) == experts
        assert set(grads["expert"]) == experts
        for _step, rows in routing.groupby("step"):
            assert set(rows["module"]) == modules                   # every module, every step
            assert (rows.groupby("module")["won"].sum() == 1).all()  # top-1
        assert routing["score"].gt(0).any()
        assert sum(sum(c.values()) for c in metrics["routing"]["win_counts"].values()) == 3 * len(modules)
        # the committed record (who won, no scores) reads back as the same routing, and is reproducible
        winners = runs.read_winners(result.out_dir / runs.WINNERS_FILE)
        keys = ["step", "module", "layer", "module_type", "expert", "won", "lr"]
        pd.testing.assert_frame_equal(winners[keys], routing[keys])
        assert winners["score"].isna().all()
        before = (result.out_dir / runs.WINNERS_FILE).read_bytes()
        assert runs.write_winners(result.out_dir).read_bytes() == before
    else:
        assert data.routing is None
        assert not (result.out_dir / runs.WINNERS_FILE).exists()


def test_run_is_deterministic_and_resume_is_identical(tmp_path):
    full = run(cfg(tmp_path, method="molf", steps=6, out_dir=str(tmp_path / "full"), save_every=2))
    first = run(cfg(tmp_path, method="molf", steps=6, out_dir=str(tmp_path / "resumed"), save_every=2),
                stop_after=3)
    assert first.metrics == {"completed_steps": 3, "total_steps": 6}
    resumed = run(cfg(tmp_path, method="molf", steps=6, out_dir=str(tmp_path / "resumed"), save_every=2))
    a, b = runs.load(full.out_dir), runs.load(resumed.out_dir)
    pd.testing.assert_frame_equal(a.steps.drop(columns="step_time_s"), b.steps.drop(columns="step_time_s"))
    pd.testing.assert_frame_equal(a.routing, b.routing)
    pd.testing.assert_frame_equal(a.grad_norms, b.grad_norms)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    assert a.metrics["metrics"] == b.metrics["metrics"]


def test_resume_refuses_a_different_config(tmp_path):
    run(cfg(tmp_path, method="molf", steps=4, out_dir=str(tmp_path / "r")), stop_after=2)
    with pytest.raises(ValueError, match="different config"):
        run(cfg(tmp_path, method="molf", steps=4, lr_fft=1e-3, out_dir=str(tmp_path / "r")))


def test_a_run_on_changed_data_is_refused_when_resumed_or_reused(tmp_path, monkeypatch):
    import json
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tasks.data_dir() / "fact", data / "fact")
    monkeypatch.setenv("MOLF_DATA", str(data))
    run(cfg(tmp_path, method="lora", steps=4, out_dir=str(tmp_path / "r")), stop_after=2)
    recorded = json.loads((tmp_path / "r" / "data.json").read_text())
    assert set(recorded) == {"train.jsonl", "validation.jsonl", "test.jsonl"}
    with open(data / "fact" / "test.jsonl", "a") as f:  # the data change under the checkpoint
        f.write((data / "fact" / "test.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"other fact data: test.jsonl changed"):
        run(cfg(tmp_path, method="lora", steps=4, out_dir=str(tmp_path / "r")))
    finished = run(cfg(tmp_path, method="lora", steps=2, out_dir=str(tmp_path / "f")))
    assert finished.metrics["steps"] == 2
    (data / "fact" / "train.jsonl").write_text((data / "fact" / "train.jsonl").read_text()[:-1] + " \n")
    with pytest.raises(ValueError, match=r"other fact data: train.jsonl changed"):
        run(cfg(tmp_path, method="lora", steps=2, out_dir=str(tmp_path / "f")))
    (tmp_path / "f" / "data.json").unlink()  # a run written before data.json: taken as it is
    assert run(cfg(tmp_path, method="lora", steps=2, out_dir=str(tmp_path / "f"))).metrics == finished.metrics


def test_optimizer_impl_compiled_trains_like_auto_and_is_part_of_the_run(tmp_path):
    import json

    from molf.lab.train import run_identity
    auto = run(cfg(tmp_path, method="molf", steps=4, out_dir=str(tmp_path / "auto")))
    compiled = run(cfg(tmp_path, method="molf", steps=4, optimizer_impl="compiled", out_dir=str(tmp_path / "c")))
    a, c = runs.load(auto.out_dir), runs.load(compiled.out_dir)
    pd.testing.assert_frame_equal(a.routing.drop(columns="score"), c.routing.drop(columns="score"))  # decisions
    for (n, p), (_, q) in zip(auto.model.named_parameters(), compiled.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="optimizer_impl"):  # another run: it rounds differently
        run(cfg(tmp_path, method="molf", steps=4, out_dir=str(tmp_path / "auto"), optimizer_impl="compiled"))
    saved = json.loads((auto.out_dir / "config.json").read_text())
    saved.pop("optimizer_impl")  # a run written before the field existed ran with "auto"
    assert run_identity(saved) == run_identity(auto.config)


def test_final_model_is_merged_and_reloads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    result = run(cfg(tmp_path, method="molf", save_model=True))
    saved = AutoModelForCausalLM.from_pretrained(result.out_dir / "model")
    assert not any("lora" in k for k in saved.state_dict())
    ids = torch.randint(0, 500, (1, 8))
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, result.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(method="sgd"), "unknown method 'sgd'"),
    (dict(task="poetry"), "unknown task 'poetry'"),
    (dict(method="fft", lr=0.0), "lr must be a finite number > 0, got 0.0"),
    (dict(method="molf", lr_fft=-1e-4), "lr_fft must be a finite number > 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(method="fft", score="epd"), "method 'fft' does not take \\['score'\\]"),
    (dict(method="fft", topk=1, lr_lora=1e-3), "does not take \\['lr_lora', 'topk'\\]"),
    (dict(method="lora", lr_fft=1e-3), "does not take"),
    (dict(method="molf", topk=3), "topk must be an integer in \\[1, 2\\]"),
    (dict(method="molf_e", ranks=(16,)), "two or more ranks"),
    (dict(steps=None), "exactly one of steps and epochs"),
    (dict(schedule="step"), "unknown schedule"),
    (dict(score="magic"), "unknown score 'magic'"),
    (dict(optimizer_impl="fast"), "unknown optimizer_impl 'fast'"),
    (dict(method="lora", optimizer_impl="compiled"), "method 'lora' trains with torch's AdamW"),
])
def test_bad_config_is_rejected_before_training(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run(cfg(tmp_path, **kw))


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not writable"):
        run(cfg(tmp_path, out_dir=str(blocker / "sub")))


def test_nan_loss_stops_with_clear_message_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    model, tokenizer = molf.lab.models.load("tiny")
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 2 else output  # steps 0, 1 fine; step 2 NaN

    model.lm_head.register_forward_hook(poison)
    config = cfg(tmp_path, method="molf", steps=5, save_every=2)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 2"):
        run(config, model=model, tokenizer=tokenizer)
    checkpoint = torch.load(tmp_path / "molf" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2
    assert not (tmp_path / "molf" / "metrics.json").exists()


def test_hf_trainer_path_trains_and_logs_routing_like_the_runner(tmp_path):
    from transformers import TrainingArguments

    from molf.hf import MoLFTrainer

    model, tokenizer = molf.lab.models.load("tiny")
    molf.wrap(model, ranks=(16,))
    features = tasks.encode("fact", tasks.load("fact", "train", limit=8), tokenizer, max_len=48)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-3, weight_decay=0.1, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, lr_scheduler_type="constant")
    trainer = MoLFTrainer(model=model, args=args, train_dataset=features, lr_lora=2e-3,
                          data_collator=lambda f: tasks.collate(f, tokenizer.pad_token_id),
                          routing_log=tmp_path / "hf" / "routing.jsonl")
    trainer.train()
    assert isinstance(trainer.molf_optimizer, molf.MoLFAdamW)
    group = next(g for g in trainer.molf_optimizer.param_groups if "molf_module" in g)
    assert group["lr"] == pytest.approx(1e-3) and group["expert_lr_scale"] == pytest.approx((1.0, 2.0))

    hf_routing = runs.read_routing(tmp_path / "hf" / "routing.jsonl")
    ours = runs.load(run(cfg(tmp_path, method="molf")).out_dir).routing
    assert list(hf_routing.columns) == list(ours.columns)
    assert sorted(hf_routing["step"].unique()) == [0, 1, 2]
    assert set(hf_routing["module"]) == set(ours["module"])
    assert (hf_routing.groupby(["step", "module"])["won"].sum() == 1).all()

    trainer.merge_and_save(tmp_path / "hf" / "model")
    assert not molf.wrapped_modules(model)
    assert (tmp_path / "hf" / "model" / "config.json").exists()
