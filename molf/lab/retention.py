"""Retention: how much of what the pretrained model knew a fine-tuned model still knows.

A fixed probe of general-knowledge facts (``data/retention/probe.jsonl``: opposites, irregular
plurals and past tenses, authors, inventors, landmarks, myths, idioms, nursery rhymes, ...) that no
shipped task trains, kept to the candidates the pretrained SmolLM2-135M-Instruct answers correctly
(``data/generate_retention.py``; docs/tasks.md). Each row: ``id``, ``kind``, ``prompt``, ``target`` and
``distractors`` (each with a leading space, first tokens all different from the target's).

Scoring: the model knows an item when the first token of ``target`` has a higher next-token
log-probability after the prompt than the first token of every distractor. ``retention`` is the share
of items known; on the shipped probe the pretrained model scores 1.0 by construction.

```python
from molf.lab import models, retention
model, tokenizer = models.load("smollm2-135m")
retention.evaluate(model, tokenizer, retention.load())     # {"retention": 1.0, "n": ...}
```
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from . import tasks

PROBE = Path("retention") / "probe.jsonl"  # under the task data folder (tasks.data_dir(): $MOLF_DATA or data/)
FIELDS = {"id": str, "prompt": str, "target": str, "distractors": list}


def probe_path() -> Path:
    """``<data folder>/retention/probe.jsonl`` (the data folder: ``tasks.data_dir()``, so ``$MOLF_DATA`` works)."""
    return tasks.data_dir() / PROBE


def validate_row(row, where: str) -> None:
    """Raise ValueError naming ``where`` and the field when ``row`` is not a probe row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a probe row must be a JSON object, got {type(row).__name__}")
    for field, kind in FIELDS.items():
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], kind):
            raise ValueError(f"{where}: field {field!r} must be a {kind.__name__}, got {row[field]!r}")
    if not row["id"] or not row["prompt"].strip():
        raise ValueError(f"{where}: 'id' and 'prompt' must not be empty")
    answers = [("target", row["target"])] + [("distractors", d) for d in row["distractors"]]
    if not row["distractors"]:
        raise ValueError(f"{where}: 'distractors' must hold at least one answer")
    for field, text in answers:
        if not isinstance(text, str) or not text.startswith(" ") or not text.strip():
            raise ValueError(f"{where}: every answer in {field!r} must be a non-blank string starting with a "
                             f"space, got {text!r}")
    if row["target"] in row["distractors"]:
        raise ValueError(f"{where}: the target {row['target']!r} is also a distractor")


def load(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The probe rows (default: ``probe_path()``), validated; ids must be unique."""
    path = Path(path) if path is not None else probe_path()
    if not path.is_file():
        raise FileNotFoundError(f"retention probe {path} not found: it ships in the checkout's data/retention/ "
                                f"(copy that folder into $MOLF_DATA when the data live elsewhere), or rebuild "
                                f"it with `python data/generate_retention.py`")
    seen = {}

    def check(row, where):
        validate_row(row, where)
        if row["id"] in seen:
            raise ValueError(f"{where}: id {row['id']!r} already used on {seen[row['id']]}")
        seen[row["id"]] = where

    return tasks.read_jsonl(path, check, limit)


def candidate_tokens(tokenizer, row: dict) -> list[int]:
    """First tokens of the row's target, then of each distractor (``tasks._first_token``)."""
    return [tasks._first_token(tokenizer, text) for text in [row["target"], *row["distractors"]]]


def evaluate(model, tokenizer, rows: list[dict], batch_size: int = 16, return_items: bool = False):
    """``{"retention": share of items known, "n": items scored}``; with ``return_items=True`` also one
    record per scored item, in row order: ``id``, ``prediction`` (the answer with the highest first-token
    log-probability), ``correct`` (1/0) and ``margin`` (the target's log-probability minus the best
    distractor's). An item whose distractor shares the target's first token under this tokenizer cannot
    be scored and is skipped with a warning (never on the shipped probe with SmolLM2's tokenizer).

    Runs under ``torch.no_grad()`` in eval mode on the model's device and restores the train/eval mode."""
    if not rows:
        raise ValueError("retention.evaluate needs at least one probe row")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for position, row in enumerate(rows):
        validate_row(row, f"probe row {position}")
    scored, candidates = [], []
    for row in rows:
        ids = candidate_tokens(tokenizer, row)
        if ids[0] in ids[1:]:
            continue
        scored.append(row)
        candidates.append(ids)
    if len(scored) < len(rows):
        warnings.warn(f"retention: skipped {len(rows) - len(scored)} of {len(rows)} probe items whose target "
                      f"shares its first token with a distractor under this tokenizer", stacklevel=2)
    if not scored:
        raise ValueError("retention: no probe item has a target whose first token differs from its distractors'")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = tasks._next_token_logprobs(model, tokenizer, [r["prompt"] for r in scored], candidates,
                                                batch_size)
    finally:
        model.train(was_training)
    items = []
    for row, logprobs in zip(scored, scores):
        answers = [row["target"], *row["distractors"]]
        margin = logprobs[0] - max(logprobs[1:])
        best = 0 if margin > 0 else 1 + max(range(len(answers) - 1), key=lambda i: logprobs[1 + i])
        items.append({"id": row["id"], "prediction": answers[best], "correct": int(margin > 0),
                      "margin": round(margin, 4)})
    metrics = {"retention": sum(i["correct"] for i in items) / len(items), "n": float(len(items))}
    return (metrics, items) if return_items else metrics
