"""The paper-scale switches of the runner, offline on the tiny model: hub data through the same
``datasets`` API (a local ``Dataset`` in place of the download), epochs, the reference metric variant,
bf16 autocast, gradient checkpointing, gradient accumulation, tokens per second and peak memory,
device="auto". The ``test_cuda_*`` tests need a GPU (benchmarks/gpu_check.sh runs them)."""
from __future__ import annotations

import json
import math

import datasets
import pandas as pd
import pytest
import torch
from test_tasks import COUNTERFACT_ROW, GRETEL_ROW, MEDMCQA_ROW

from molf.lab import models, tasks
from molf.lab import train as train_module
from molf.lab.train import TrainConfig, example_order, run

TINY = dict(model="tiny", batch_size=2, seq_len=48, eval_limit=4, progress=False, save_model=False)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh)")


def hub_rows():
    """Rows of the paper's datasets in their real schemas, per (dataset, upstream split)."""
    mysql_only = {**GRETEL_ROW, "sql_context": "CREATE TABLE t (a INT) ENGINE=InnoDB;"}
    update = {**GRETEL_ROW, "sql": "UPDATE salesperson SET region = 'East' WHERE salesperson_id = 1;"}
    facts = [json.loads(json.dumps({**COUNTERFACT_ROW, "case_id": i})) for i in range(12)]
    return {(tasks.HUB_SQL, "train"): [GRETEL_ROW] * 5 + [mysql_only, update] + [GRETEL_ROW] * 3,
            (tasks.HUB_SQL, "test"): [GRETEL_ROW, update, mysql_only],
            (tasks.HUB_MCQ, "train"): [MEDMCQA_ROW] * 6, (tasks.HUB_MCQ, "validation"): [MEDMCQA_ROW] * 3,
            (tasks.HUB_FACT_URL, "train"): facts}


@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` answering from local ``Dataset`` objects; records every call."""
    rows, calls = hub_rows(), []

    def load_dataset(path, name=None, split=None, data_files=None, **kwargs):
        key = data_files if path == "json" else path
        calls.append((key, split))
        return datasets.Dataset.from_list(rows[key, split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def metrics_of(result):
    return json.loads((result.out_dir / "metrics.json").read_text())


# ------------------------------------------------------------------------------------- data source

def test_hub_source_trains_and_evaluates_on_the_hub_rows_for_epochs(tmp_path, fake_hub):
    config = TrainConfig(task="fact", method="lora", source="hub", steps=None, epochs=2, grad_accum=2,
                         eval_split="test", out_dir=str(tmp_path / "fact"), **TINY)
    result = run(config)
    m = metrics_of(result)
    # 12 CounterFact records, 2 epochs, effective batch 2 x 2: ceil(2 * 12 / 4) steps
    assert m["steps"] == 6 and m["source"] == "hub" and m["metric_variant"] == "ours"
    assert len(pd.read_csv(result.out_dir / "steps.csv")) == 6
    assert m["metrics"]["n"] == 3.0  # our test rows of CounterFact: records 0, 5, 10 (eval_limit 4)
    assert fake_hub == [(tasks.HUB_FACT_URL, "train"), (tasks.HUB_FACT_URL, "train")]  # train, then test rows
    assert json.loads((result.out_dir / "config.json").read_text())["source"] == "hub"


def test_hub_sql_warns_about_the_rows_it_skips_and_the_reference_variant_keeps_writes(tmp_path, fake_hub):
    base = dict(task="sql", method="lora", source="hub", steps=2, eval_split="test", **TINY)
    with pytest.warns(UserWarning, match=r"synthetic_text_to_sql split 'train': skipped 1 rows \(not runnable in "
                                         r"sqlite\), 1 rows \(gold is not a query\)"):
        ours = run(TrainConfig(out_dir=str(tmp_path / "ours"), **base))
    assert metrics_of(ours)["metrics"]["n"] == 1.0  # the test split's one runnable query
    with pytest.warns(UserWarning, match=r"skipped 1 rows \(not runnable in sqlite\)$"):
        reference = run(TrainConfig(out_dir=str(tmp_path / "ref"), metric_variant="reference", **base))
    m = metrics_of(reference)
    assert m["primary_metric"] == "execution_accuracy_set" and m["metric_variant"] == "reference"
    assert (m["metrics"]["n"], m["metrics"]["n_write_gold"]) == (2.0, 1.0)  # the UPDATE row is scored too
    assert set(m["metrics"]) >= {"execution_accuracy_set", "valid_sql_rate", "exact_match", "execution_accuracy"}


def test_hub_mcq_with_the_reference_variant(tmp_path, fake_hub):
    result = run(TrainConfig(task="mcq", method="fft", source="hub", metric_variant="reference", steps=1,
                             eval_split="test", out_dir=str(tmp_path / "mcq"), **TINY))
    m = metrics_of(result)["metrics"]
    assert m["n"] == 3.0 and 0 <= m["invalid_answers"] <= 3 and {"accuracy_generate", "accuracy"} <= set(m)


def test_source_and_variant_are_validated_and_old_configs_still_match(tmp_path):
    for bad, message in ((dict(source="web"), "unknown source 'web'"),
                         (dict(metric_variant="paper"), "unknown metric_variant 'paper'"),
                         (dict(autocast="yes"), "autocast must be True or False"),
                         (dict(steps=10, epochs=2), "exactly one of steps and epochs")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(task="fact", out_dir=str(tmp_path / "x"), **{**TINY, **bad}).resolved()
    # a run written before these fields existed is the same run as the default config
    config = TrainConfig(task="fact", method="lora", steps=1, out_dir=str(tmp_path / "old"), **TINY)
    run(config)
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("source", "metric_variant", "autocast", "gradient_checkpointing"):
        saved.pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    assert run(config).model is None  # returned as finished, not retrained
    with pytest.raises(ValueError, match="source"):
        run(TrainConfig(**{**vars(config), "source": "hub"}))


def test_cli_takes_the_new_flags(tmp_path, fake_hub, capsys):
    out = tmp_path / "cli"
    code = train_module.main(["--model", "tiny", "--task", "fact", "--method", "lora", "--source", "hub",
                              "--steps", "none", "--epochs", "0.5", "--batch-size", "2", "--seq-len", "48",
                              "--eval-limit", "2", "--metric-variant", "reference", "--autocast", "true",
                              "--gradient-checkpointing", "true", "--progress", "false", "--save-model", "false",
                              "--out-dir", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["primary_metric"] == "efficacy_full"
    config = json.loads((out / "config.json").read_text())
    assert (config["source"], config["autocast"], config["gradient_checkpointing"]) == ("hub", True, True)
    assert train_module.main(["--model", "tiny", "--source", "web", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "unknown source 'web'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- scale switches

def test_bf16_autocast_trains_in_bfloat16_on_the_cpu(tmp_path):
    base = dict(task="fact", method="molf", steps=2, **TINY)
    plain = pd.read_csv(run(TrainConfig(out_dir=str(tmp_path / "fp32"), **base)).out_dir / "steps.csv")
    auto = pd.read_csv(run(TrainConfig(out_dir=str(tmp_path / "amp"), autocast=True, **base)).out_dir / "steps.csv")
    # the same first batch: bf16 matmuls move the loss a little, not a lot
    assert auto.loss[0] != plain.loss[0] and auto.loss[0] == pytest.approx(plain.loss[0], rel=2e-2)
    weights = run(TrainConfig(out_dir=str(tmp_path / "bf16"), dtype="bfloat16", autocast=True, **base))
    assert math.isfinite(metrics_of(weights)["final_loss"])


def test_gradient_checkpointing_gives_the_same_run(tmp_path, monkeypatch):
    enabled = []
    cls = type(models.load("tiny")[0])
    name = "activation_checkpointing_enable" if hasattr(cls, "activation_checkpointing_enable") else \
        "gradient_checkpointing_enable"
    original = getattr(cls, name)

    def spy(self, *args, **kwargs):
        enabled.append(list(kwargs.values()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, spy)
    for method in ("lora", "molf"):  # lora has dropout: the recomputation must replay the same masks
        base = dict(task="fact", method=method, steps=3, **TINY)
        plain = run(TrainConfig(out_dir=str(tmp_path / method / "plain"), **base))
        ckpt = run(TrainConfig(out_dir=str(tmp_path / method / "ckpt"), gradient_checkpointing=True, **base))
        a, b = (pd.read_csv(r.out_dir / "steps.csv") for r in (plain, ckpt))
        assert a.loss.tolist() == pytest.approx(b.loss.tolist(), abs=1e-6)
        assert a.grad_norm.tolist() == pytest.approx(b.grad_norm.tolist(), rel=1e-5)
    assert enabled == [[{"use_reentrant": False}]] * 2
    # memory and time only: the finished run is the same run without the switch
    assert run(TrainConfig(out_dir=str(tmp_path / "molf" / "ckpt"), task="fact", method="molf", steps=3,
                           **TINY)).model is None


def test_gradient_accumulation_tokens_per_second_and_memory_in_metrics(tmp_path, capsys):
    config = TrainConfig(task="fact", method="lora", steps=3, grad_accum=4, out_dir=str(tmp_path / "acc"),
                         **{**TINY, "progress": True})
    m = metrics_of(run(config))
    # 3 steps x 4 micro-batches x 2 rows: the tokens of exactly those 24 examples
    tokenizer = models.load_tokenizer("tiny")
    features = tasks.encode("fact", tasks.load("fact", "train"), tokenizer, max_len=48)
    order = example_order(len(features), 3 * 4 * 2, 0)
    assert m["train_tokens"] == sum(len(features[i]["input_ids"]) for i in order)
    assert m["tokens_per_s"] == pytest.approx(m["train_tokens"] / m["train_time_s"])
    assert m["peak_memory_bytes"] > 0 and m["peak_memory_kind"] == "process_max_rss" and m["device"] == "cpu"
    bar = capsys.readouterr().err
    assert "tok_s=" in bar and "mem=" in bar and "GiB" in bar


def test_device_auto_picks_the_cpu_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    m = metrics_of(run(TrainConfig(task="fact", method="fft", steps=1, device="auto", out_dir=str(tmp_path / "a"),
                                   **TINY)))
    assert m["device"] == "cpu"


# ------------------------------------------------------------------------------------- CUDA only

@cuda
def test_cuda_auto_device_bf16_autocast_and_peak_memory(tmp_path):
    m = metrics_of(run(TrainConfig(task="fact", method="molf", steps=4, grad_accum=2, device="auto", autocast=True,
                                   out_dir=str(tmp_path / "gpu"), **TINY)))
    assert m["device"].startswith("cuda") and m["peak_memory_kind"] == "cuda_max_allocated"
    assert 0 < m["peak_memory_bytes"] < torch.cuda.get_device_properties(0).total_memory
    assert m["tokens_per_s"] > 0 and math.isfinite(m["final_loss"])


@cuda
def test_cuda_bf16_weights_with_autocast_and_checkpointing_match_the_plain_run(tmp_path):
    base = dict(task="fact", method="molf", steps=3, device="cuda", dtype="bfloat16", autocast=True, **TINY)
    plain = run(TrainConfig(out_dir=str(tmp_path / "plain"), **base))
    ckpt = run(TrainConfig(out_dir=str(tmp_path / "ckpt"), gradient_checkpointing=True, **base))
    a, b = (pd.read_csv(r.out_dir / "steps.csv") for r in (plain, ckpt))
    assert a.loss.tolist() == pytest.approx(b.loss.tolist(), rel=1e-2)


@cuda
@pytest.mark.model
def test_cuda_gradient_checkpointing_saves_memory_on_smollm2(tmp_path):
    base = dict(model="smollm2-135m", task="sql", method="fft", steps=2, batch_size=8, seq_len=256, device="cuda",
                autocast=True, eval_limit=0, progress=False, save_model=False)
    plain = metrics_of(run(TrainConfig(out_dir=str(tmp_path / "plain"), **base)))
    ckpt = metrics_of(run(TrainConfig(out_dir=str(tmp_path / "ckpt"), gradient_checkpointing=True, **base)))
    print(f"peak memory: plain {plain['peak_memory_bytes'] / 2**30:.2f} GiB, checkpointed "
          f"{ckpt['peak_memory_bytes'] / 2**30:.2f} GiB; tokens/s {plain['tokens_per_s']:.0f} vs "
          f"{ckpt['tokens_per_s']:.0f}")
    assert ckpt["peak_memory_bytes"] < plain["peak_memory_bytes"]
