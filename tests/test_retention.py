"""The retention probe (molf.lab.retention, data/retention/probe.jsonl): the shipped file's invariants,
scoring on models whose answers are known, and its place in the grid (experiments/grid.py) and report."""
import json
import re
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from scripts import ROOT, grid, load_script, report

from molf.lab import models, retention, tasks


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny")  # SmolLM2's tokenizer


@pytest.fixture(scope="module")
def probe():
    return retention.load()


# ------------------------------------------------------------------------------------- the probe file

def test_probe_rows_are_unique_well_formed_and_cover_many_kinds(probe):
    assert len(probe) >= 150
    ids = [r["id"] for r in probe]
    assert len(ids) == len(set(ids))
    assert len({r["kind"] for r in probe}) >= 10
    for row in probe:
        assert len(row["distractors"]) == 4 and row["target"] not in row["distractors"]
        assert all(a.startswith(" ") and a.strip() for a in [row["target"], *row["distractors"]])


def test_targets_and_distractors_start_with_different_smollm2_tokens(probe, tokenizer):
    for row in probe:
        first = retention.candidate_tokens(tokenizer, row)
        assert len(set(first)) == len(first), (row["id"], [tokenizer.decode([t]) for t in first])


def test_the_probe_touches_no_fact_mcq_or_mcq2_subject(probe):
    fact_names, mcq2_words = set(), set()
    for split in tasks.SPLITS:
        for r in tasks.load("fact", split):
            rewrite = r["requested_rewrite"]
            fact_names |= {rewrite["subject"], rewrite["target_true"]["str"], rewrite["target_new"]["str"]}
        for r in tasks.load("mcq2", split):
            mcq2_words |= {r[k].lower() for k in ("opa", "opb", "opc", "opd", "cue")}
    fact_names = {n.removeprefix("the ") for n in fact_names}
    assert len(fact_names) > 100 and len(mcq2_words) > 200
    for row in probe:
        for text in [row["prompt"], row["target"], *row["distractors"]]:
            hits = [n for n in fact_names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]
            assert not hits, (row["id"], text, hits)
            assert not re.search(r"\d", text) and "symbol" not in text.lower(), (row["id"], text)  # mcq's kinds
        for text in [row["target"], *row["distractors"]]:
            word = text.strip().lower()
            assert word not in mcq2_words and word.removesuffix("s") not in mcq2_words, (row["id"], text)


def test_the_probe_is_read_from_molf_data_and_bad_rows_name_their_line(tmp_path, monkeypatch, probe):
    monkeypatch.setenv("MOLF_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="retention probe .*probe.jsonl not found"):
        retention.load()
    path = tmp_path / "retention" / "probe.jsonl"
    path.parent.mkdir()
    good = {"id": "a", "prompt": "The opposite of hot is", "target": " cold", "distractors": [" up"]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "b"}) + "\n")
    assert [r["id"] for r in retention.load()] == ["a", "b"] and retention.probe_path() == path
    assert retention.load(limit=1) == [good]
    bad = [({**good, "id": "a"}, "id 'a' already used on " + str(path) + " line 1"),
           ({k: v for k, v in good.items() if k != "target"}, "missing field 'target'"),
           ({**good, "target": "cold"}, "starting with a space, got 'cold'"),
           ({**good, "distractors": []}, "at least one answer"),
           ({**good, "distractors": " up"}, "'distractors' must be a list"),
           ({**good, "distractors": [" cold"]}, "is also a distractor")]
    for row, message in bad:
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=f"probe.jsonl line 2: .*{re.escape(message)}"):
            retention.load()
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        retention.load()


# ------------------------------------------------------------------------------------------- scoring

class PreferringModel(torch.nn.Module):
    """Next-token logits that are ``score`` for chosen token ids and 0 elsewhere, at every position."""

    def __init__(self, vocab: int, scores: dict[int, float]):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            for token, score in scores.items():
                self.bias[token] = score

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def _first(tokenizer, text):
    return tasks._first_token(tokenizer, text)


def test_an_item_is_known_when_its_target_beats_every_distractor(tokenizer):
    model = PreferringModel(len(tokenizer), {_first(tokenizer, " cold"): 5.0, _first(tokenizer, " down"): 2.0})
    model.train()
    rows = [{"id": "hot", "prompt": "The opposite of hot is", "target": " cold", "distractors": [" down", " left"]},
            {"id": "big", "prompt": "The opposite of big is", "target": " small", "distractors": [" left", " down"]},
            {"id": "tie", "prompt": "The opposite of up is", "target": " right", "distractors": [" left"]}]
    metrics, items = retention.evaluate(model, tokenizer, rows, batch_size=2, return_items=True)
    assert metrics == {"retention": pytest.approx(1 / 3), "n": 3.0}
    assert [(i["id"], i["prediction"], i["correct"]) for i in items] == [
        ("hot", " cold", 1), ("big", " down", 0), ("tie", " left", 0)]  # a tie is not knowing
    assert [i["margin"] for i in items] == pytest.approx([3.0, -2.0, 0.0])
    assert model.training  # evaluation restores the mode
    assert retention.evaluate(model, tokenizer, rows) == metrics


def test_items_a_tokenizer_cannot_tell_apart_are_skipped_with_a_warning_and_bad_input_named(tokenizer):
    model = PreferringModel(len(tokenizer), {_first(tokenizer, " cold"): 1.0})
    same = {"id": "same", "prompt": "Hot or", "target": " cold", "distractors": [" cold water", " up"]}
    good = {"id": "ok", "prompt": "Hot or", "target": " cold", "distractors": [" up"]}
    with pytest.warns(UserWarning, match="skipped 1 of 2 probe items"):
        metrics = retention.evaluate(model, tokenizer, [same, good])
    assert metrics == {"retention": 1.0, "n": 1.0}
    with warnings.catch_warnings(), pytest.raises(ValueError, match="no probe item"):
        warnings.simplefilter("ignore")
        retention.evaluate(model, tokenizer, [same])
    with pytest.raises(ValueError, match="at least one probe row"):
        retention.evaluate(model, tokenizer, [])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        retention.evaluate(model, tokenizer, [good], batch_size=0)
    with pytest.raises(ValueError, match="probe row 0: missing field 'distractors'"):
        retention.evaluate(model, tokenizer, [{"id": "x", "prompt": "p", "target": " t"}])


def test_the_tiny_model_scores_the_same_at_any_batch_size(probe, tokenizer):
    model, _ = models.load("tiny")
    rows = probe[:40]
    metrics, items = retention.evaluate(model, tokenizer, rows, batch_size=16, return_items=True)
    _, one_by_one = retention.evaluate(model, tokenizer, rows, batch_size=1, return_items=True)
    assert [i["id"] for i in items] == [r["id"] for r in rows] and metrics["n"] == 40
    assert sum(i["correct"] for i in items) / 40 == pytest.approx(metrics["retention"])
    assert [i["correct"] for i in items] == [i["correct"] for i in one_by_one]
    assert [i["margin"] for i in items] == pytest.approx([i["margin"] for i in one_by_one], abs=1e-3)
    assert metrics["retention"] < 0.6  # a random model is no oracle (chance is 1 in 5)


def _pretrained_scores(rows):
    model, tokenizer = models.load("smollm2-135m")
    metrics, items = retention.evaluate(model, tokenizer, rows, return_items=True)
    assert metrics == {"retention": 1.0, "n": float(len(rows))}
    assert min(i["margin"] for i in items) >= 0.9  # kept by a margin of 1 nat: stable against rounding


@pytest.mark.model
def test_the_pretrained_smollm2_knows_every_fourth_probe_item(probe):
    _pretrained_scores(probe[::4])  # the whole probe: the slow test below (about a minute on a busy CPU)


@pytest.mark.slow
def test_the_pretrained_smollm2_knows_every_probe_item(probe):
    _pretrained_scores(probe)


# ------------------------------------------------------------------------------------------ the grid

def _saved_tiny_run(folder: Path) -> Path:
    model, tokenizer = models.load("tiny")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder


def test_grid_adds_retention_to_a_cached_score_with_a_model_and_leaves_one_without_alone(tmp_path):
    spec = {"eval_batch_size": 16}
    run = _saved_tiny_run(tmp_path / "with_model")
    cached = {"efficacy": 0.123, "n": 4.0}  # not what the tiny model scores: recomputing would change it
    (run / "test_metrics.json").write_text(json.dumps(cached))
    (run / "test_predictions.jsonl").write_text('{"id": 0, "prediction": "x", "correct": 0}\n')
    metrics = grid.test_metrics(run, "fact", 4, spec)
    n_probe = len(retention.load())
    assert metrics["efficacy"] == 0.123 and metrics["n"] == 4.0 and metrics["retention_n"] == n_probe
    assert json.loads((run / "test_metrics.json").read_text()) == metrics
    records = [json.loads(line) for line in (run / "retention_predictions.jsonl").read_text().splitlines()]
    assert len(records) == n_probe and sum(r["correct"] for r in records) / n_probe == pytest.approx(metrics["retention"])
    assert (run / "test_predictions.jsonl").read_text().count("\n") == 1  # task predictions untouched
    assert (run / "retention_predictions.jsonl").stat().st_size < 100 * n_probe  # a small record
    assert grid.test_metrics(run, "fact", 4, spec) == metrics  # complete now: read as it is

    bare = tmp_path / "without_model"
    bare.mkdir()
    (bare / "test_metrics.json").write_text(json.dumps(cached))
    assert grid.test_metrics(bare, "fact", 4, spec) == cached
    assert not (bare / "retention_predictions.jsonl").exists()


def test_grid_scores_task_and_retention_together_on_a_fresh_run(tmp_path):
    run = _saved_tiny_run(tmp_path / "fresh")
    metrics = grid.test_metrics(run, "fact", 4, {})
    assert metrics["n"] == 4.0 and 0 <= metrics["efficacy"] <= 1 and 0 <= metrics["retention"] <= 1
    assert (run / "test_predictions.jsonl").is_file() and (run / "retention_predictions.jsonl").is_file()
    assert json.loads((run / "test_metrics.json").read_text()) == metrics


def test_grid_csvs_summary_and_report_carry_retention(tmp_path, capsys):
    spec = {"model": "tiny", "tasks": ["fact"], "steps": 2, "batch_size": 2, "seq_len": 32, "eval_limit": 4,
            "test_limit": 4, "seeds": [0], "progress": False,
            "methods": {"fft": {"lrs": [1e-4]}, "lora": {"lrs": [1e-3], "ranks": [4]}}}
    path = tmp_path / "tbl.json"
    path.write_text(json.dumps(spec))
    results = tmp_path / "results"
    assert grid.main([str(path), "--results", str(results)]) == 0
    test = pd.read_csv(results / "tbl.csv").set_index("method")
    summary = pd.read_csv(results / "tbl_summary.csv").set_index("method")
    assert test["test_retention"].between(0, 1).all() and (test["test_retention_n"] == len(retention.load())).all()
    assert summary.loc["lora", "retention"] == pytest.approx(test.loc["lora", "test_retention"])
    capsys.readouterr()
    assert report.main(["--results", str(results), "--table", "tbl"]) == 0
    printed = capsys.readouterr().out
    assert f"fact: retention (n={len(retention.load())})" in printed
    assert f"| {100 * summary.loc['lora', 'retention']:.1f} |" in printed
    line = next(x for x in printed.splitlines() if x.startswith("retention: fact: lora"))
    fft, lora = test.loc["fft", "test_retention"], test.loc["lora", "test_retention"]
    assert f"lora {lora:.3f} vs fft {fft:.3f}: diff {lora - fft:+.3f}" in line and "95% CI" in line
    # a table without per-item retention records says so instead of comparing
    for folder in (results / "runs").rglob("retention_predictions.jsonl"):
        folder.unlink()
    assert "fact lora vs fft: no retention_predictions.jsonl" in report.retention_lines(results, "tbl")


def test_the_whitelist_keeps_retention_records_of_v1_and_v2_runs():
    kept = ["results/runs/main/fact/lora/lr1_s0/retention_predictions.jsonl",
            "results/v2/runs/main_v2/fact/lora/lr1_s0/retention_predictions.jsonl"]
    dropped = ["results/v2/runs/main_v2/fact/lora/lr1_s0/model/retention_predictions.jsonl"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *kept, *dropped], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert ignored == dropped


def test_generator_assertions_hold_for_the_candidates(tokenizer):
    generator = load_script("generate_retention", folder="data")
    rows = generator.build_candidates(tokenizer)
    generator.check_no_task_overlap(rows)
    shipped = {r["id"]: r for r in retention.load()}
    by_id = {r["id"]: r for r in rows}
    assert set(shipped) <= set(by_id) and len(rows) > len(shipped)
    assert all(by_id[i] == row for i, row in shipped.items())  # the shipped rows are the generator's
    kinds = pd.Series([r["kind"] for r in shipped.values()]).value_counts()
    assert kinds.max() <= generator.MAX_PER_KIND


def test_retention_lines_compare_any_pair_and_name_the_side_that_keeps_more(tmp_path):
    rows = []
    for method, known in (("molf_k1", 1), ("molf_dense_k2", 0)):
        for seed in (0, 1):
            folder = tmp_path / "runs" / "abl" / "fact" / method / f"lr0.001_s{seed}"
            folder.mkdir(parents=True)
            records = [{"id": i, "prediction": "x", "correct": known if i < 15 else 1} for i in range(20)]
            (folder / "retention_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            rows.append({"task": "fact", "method": method, "lr": 0.001, "seed": seed,
                         "dir": str(folder.relative_to(tmp_path)), "test_retention": 0.25 + 0.75 * known})
    pd.DataFrame(rows).to_csv(tmp_path / "abl.csv", index=False)
    line = report.retention_lines(tmp_path, "abl", [("molf_k1", "molf_dense_k2")])
    assert line.startswith("retention: fact: molf_k1 1.000 vs molf_dense_k2 0.250: diff +0.750")
    assert "n=40, 2 seeds" in line and line.endswith("molf_k1 retains more")
    swapped = report.retention_lines(tmp_path, "abl", [("molf_dense_k2", "molf_k1")])
    assert swapped.endswith("molf_k1 retains more")
    assert "no test runs of lora" in report.retention_lines(tmp_path, "abl")  # the default pair is absent
