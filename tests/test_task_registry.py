"""Adding a task is one module and one registry line: this module is the new task (``CountTask``), the
fixture's ``tasks.register(...)`` the line. Every part of the public API then serves it: load and
validation, prompt and target, encode and collate, evaluate, primary metric, the command line."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from molf.lab import models, tasks
from molf.lab.tasks.base import Task, field, item_id
from molf.lab.tasks.scoring import first_token, next_token_logprobs

NUMBERS = ("one", "two", "three", "four", "five")


class CountTask(Task):
    """"How many letters in 'abc'?" -> " three": scored by the number words' next-token log-probabilities."""

    name, family = "count", "count"
    primary_metric, reference_primary_metric = "accuracy", "accuracy"

    def validate_row(self, row, where, allow_writes=False):
        word = field(row, "word", str, where)
        if not 1 <= len(word) <= len(NUMBERS):
            raise ValueError(f"{where}: field 'word' must have 1 to {len(NUMBERS)} letters, got {word!r}")

    def prompt_and_target(self, row):
        return f"How many letters in '{row['word']}'? Answer:", " " + NUMBERS[len(row["word"]) - 1]

    def evaluate(self, model, tokenizer, rows, batch_size, max_new_tokens, variant):
        numbers = [first_token(tokenizer, " " + word) for word in NUMBERS]
        prompts = [self.prompt_and_target(row)[0] for row in rows]
        scores = next_token_logprobs(model, tokenizer, prompts, [numbers] * len(rows), batch_size)
        items = []
        for position, (row, score) in enumerate(zip(rows, scores)):
            pick = max(range(len(NUMBERS)), key=score.__getitem__)
            items.append({"id": item_id(row, position), "prediction": NUMBERS[pick],
                          "correct": int(pick == len(row["word"]) - 1)})
        return {"accuracy": sum(i["correct"] for i in items) / len(rows), "n": float(len(rows))}, items


@pytest.fixture
def count_task(tmp_path, monkeypatch):
    """The registry line, with data in a folder of its own; unregistered afterwards."""
    folder = tmp_path / "count"
    folder.mkdir()
    for split, words in (("train", ["ab", "abc", "abcd", "a"]), ("validation", ["xyz"]), ("test", ["cat", "at"])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"id": f"{split}{i}", "word": w}) + "\n"
                                                       for i, w in enumerate(words)))
    monkeypatch.setenv("MOLF_DATA", str(tmp_path))
    tasks.register(CountTask())
    yield
    tasks.unregister("count")


class Says(nn.Module):
    """A stand-in model whose next token after any prompt is ``token``."""

    def __init__(self, vocab_size, token):
        super().__init__()
        self.vocab_size, self.token = vocab_size, token
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.token] = 5.0
        return SimpleNamespace(logits=logits)


def test_a_registered_task_is_served_by_the_whole_public_api(count_task, capsys):
    assert tasks.TASKS == ("sql", "fact", "mcq", "mcq2", "sql2", "count")
    assert tasks.PRIMARY_METRIC["count"] == tasks.primary_metric("count", "reference") == "accuracy"
    assert "count" not in tasks.SQL_TASKS and "count" not in tasks.HUB_SPLITS
    rows = tasks.load("count", "train")
    assert [r["word"] for r in rows] == ["ab", "abc", "abcd", "a"]
    assert tasks.prompt_and_target("count", rows[1]) == ("How many letters in 'abc'? Answer:", " three")
    tokenizer = models.load_tokenizer("tiny")
    features = tasks.encode("count", rows, tokenizer, max_len=64)
    batch = tasks.collate(features, tokenizer.eos_token_id)
    assert batch["input_ids"].shape[0] == 4 and (batch["labels"] != -100).sum(1).tolist() == [2, 2, 2, 2]  # a word + EOS
    three = first_token(tokenizer, " three")
    metrics, items = tasks.evaluate("count", Says(len(tokenizer), three), tokenizer, tasks.load("count", "test"),
                                    return_items=True)
    assert metrics == {"accuracy": 0.5, "n": 2.0}  # "cat" has 3 letters, "at" 2
    assert [(i["id"], i["prediction"], i["correct"]) for i in items] == [("test0", "three", 1), ("test1", "three", 0)]
    with pytest.raises(ValueError, match="local data only"):
        tasks.load("count", "train", source="hub")
    with pytest.raises(ValueError, match="no hub dataset"):
        tasks.convert_hub_row("count", {"word": "ab"})
    tasks.main(["evaluate", "--task", "count", "--model", "tiny", "--split", "validation"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "count" and printed["n"] == 1.0 and 0.0 <= printed["accuracy"] <= 1.0


def test_a_registered_tasks_rows_are_validated_on_load(count_task, tmp_path):
    (tmp_path / "count" / "test.jsonl").write_text(json.dumps({"id": "t", "word": "abcdefgh"}) + "\n")
    with pytest.raises(ValueError, match=r"count/test.jsonl line 1: field 'word' must have 1 to 5 letters"):
        tasks.load("count", "test")
    with pytest.raises(ValueError, match="must be a JSON object"):
        tasks.validate_row("count", ["not", "a", "dict"], "here")


def test_the_registry_refuses_a_repeated_name_and_an_incomplete_task(count_task):
    with pytest.raises(ValueError, match="'count' is already registered"):
        tasks.register(CountTask())

    class Nameless(CountTask):
        name = ""

    with pytest.raises(ValueError, match="non-empty string 'name'"):
        tasks.register(Nameless())
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*'count'"):
        tasks.get("nope")


def test_unregistering_restores_the_shipped_tables():
    shipped = tasks.TASKS
    tasks.register(CountTask())
    tasks.unregister("count")
    assert tasks.TASKS == shipped == ("sql", "fact", "mcq", "mcq2", "sql2")
    with pytest.raises(ValueError, match="unknown task 'count'"):
        tasks.load("count", "train")
