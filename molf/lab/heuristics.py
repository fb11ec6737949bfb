"""Model-free rules that answer a task's items: the bar a trained method has to clear.

A task on which no method beats its best rule (paired over the same items, p < 0.05) tells nothing
about the methods yet; ``experiments/report.py`` prints that check per task. ``rules(task, train)``
gives the rules, ``correct(task, rows, train)`` their 0/1 per item, keyed by ``tasks.item_id`` like the
``test_predictions.jsonl`` of a run.

- mcq, mcq2: rules that read the options (a fixed letter, the longest or shortest option, the
  alphabetically first, the option right most often in train, the lower-median number, ...) and, for
  mcq2, the row's category and cue (the category's commonest letter in train, the option sharing the
  longest substring with the category's name or with the cue, the one closest to the cue in length). ``tests/test_tasks.py`` checks that they stay at chance on mcq2.
- sql, sql2: fixed queries on the context's tables (every row of the first or last table, its row count).
- fact: none. Efficacy compares the model's own probabilities of two answers; no rule has any.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from . import tasks

Rule = Callable[[dict], object]  # a row -> an option index (mcq, mcq2) or a query (sql)


def _options(row: dict) -> list[str]:
    return [row[f] for f in tasks.OPTION_FIELDS]


def _first_number(text: str) -> float:
    found = re.search(r"-?\d+(?:\.\d+)?", text)
    return float(found.group()) if found else float("inf")


def _longest_common_substring(a: str, b: str) -> int:
    return max((k for i in range(len(a)) for k in range(1, len(a) - i + 1) if a[i:i + k] in b), default=0)


def _pick(key, best=max) -> Rule:
    """The option whose ``key`` is largest (``best=min``: smallest); ties go to the earlier letter."""
    return lambda row: best(range(4), key=lambda i: key(_options(row)[i]))


def option_rules(train: list[dict]) -> dict[str, Rule]:
    """Rules for the four-option tasks; ``train``: the train split's rows (for the learned ones)."""
    right_in_train = Counter(r[tasks.OPTION_FIELDS[r["cop"]]] for r in train)
    shown_in_train = Counter(o for r in train for o in _options(r))
    rules: dict[str, Rule] = {f"always {letter}": (lambda row, i=i: i)
                              for i, letter in enumerate(tasks.OPTION_LETTERS)}
    rules |= {
        "longest": _pick(len), "shortest": _pick(len, min),
        "median length": lambda row: sorted(range(4), key=lambda i: len(_options(row)[i]))[1],
        "alphabetically first": _pick(str.lower, min), "alphabetically last": _pick(str.lower),
        "capitalised": _pick(lambda o: o[:1].isupper()),
        "most often right in train": _pick(lambda o: right_in_train[o]),
        "least often shown in train": _pick(lambda o: shown_in_train[o], min),
        "lower-median number": lambda row: sorted(range(4), key=lambda i: _first_number(_options(row)[i]))[1],
        "largest number": _pick(_first_number),
    }
    if train and all("category" in r for r in train):
        letters = {c: Counter(r["cop"] for r in train if r["category"] == c).most_common(1)[0][0]
                   for c in {r["category"] for r in train}}
        rules |= {
            "category's commonest letter in train": lambda row: letters.get(row["category"], 0),
            "longest common substring with the category": lambda row: max(
                range(4), key=lambda i: _longest_common_substring(_options(row)[i].lower(), row["category"])),
            "length closest to the category's": lambda row: min(
                range(4), key=lambda i: abs(len(_options(row)[i]) - len(row["category"]))),
        }
    if train and all("cue" in r for r in train):
        rules |= {
            "longest common substring with the cue": lambda row: max(
                range(4), key=lambda i: _longest_common_substring(_options(row)[i].lower(), row["cue"].lower())),
            "length closest to the cue's": lambda row: min(
                range(4), key=lambda i: abs(len(_options(row)[i]) - len(row["cue"]))),
            "same first letter as the cue": lambda row: max(
                range(4), key=lambda i: _options(row)[i][:1].lower() == row["cue"][:1].lower()),
        }
    return rules


def _tables(row: dict) -> list[str]:
    return re.findall(r"CREATE TABLE\s+(\w+)", row["sql_context"], flags=re.IGNORECASE)


def sql_rules() -> dict[str, Rule]:
    return {"every row of the first table": lambda row: f"SELECT * FROM {_tables(row)[0]};",
            "every row of the last table": lambda row: f"SELECT * FROM {_tables(row)[-1]};",
            "row count of the first table": lambda row: f"SELECT COUNT(*) FROM {_tables(row)[0]};"}


def rules(task: str, train: list[dict]) -> dict[str, Rule]:
    """The rules of ``task`` (empty for fact: see the module's docstring)."""
    if task in ("mcq", "mcq2"):
        return option_rules(train)
    if task in tasks.SQL_TASKS:
        return sql_rules()
    if task == "fact":
        return {}
    raise ValueError(f"task must be one of {', '.join(tasks.TASKS)}, got {task!r}")


def correct(task: str, rows: list[dict], train: list[dict]) -> dict[str, dict]:
    """``{rule: {item id: 0 or 1}}`` for every rule of ``task`` on ``rows``."""
    out = {}
    for name, rule in rules(task, train).items():
        scores = {}
        for position, row in enumerate(rows):
            guess = rule(row)
            if task in tasks.SQL_TASKS:
                right = tasks.sql_execution_match(guess, row["sql"], row["sql_context"])[0]
            else:
                right = guess == row["cop"]
            scores[tasks.item_id(row, position)] = int(right)
        out[name] = scores
    return out


def best(task: str, rows: list[dict], train: list[dict]) -> tuple[str, dict] | None:
    """The rule with the most items right on ``rows`` (ties: the first listed) and its per-item 0/1, or
    None for a task without rules."""
    scored = correct(task, rows, train)
    if not scored:
        return None
    name = max(scored, key=lambda n: sum(scored[n].values()))
    return name, scored[name]
