"""Text-to-SQL (the family of ``sql`` and ``sql2``): rows, prompt, and execution-based metrics.

Every statement (the row's ``sql_context``, the gold query, the prediction) runs in a fresh
``sandbox.Sandbox``: an in-memory database, an authorizer, sqlite limits, a step budget, capped results.
"""
from __future__ import annotations

import re
import sqlite3
from collections import Counter

from . import sandbox
from .base import Task, field, hub_field, item_id
from .scoring import greedy_generate

HUB_SQL = "gretelai/synthetic_text_to_sql"
# gretel has train/test; every 100th train row is our validation.
HUB_SQL_SPLITS = {"train": ("train", lambda i: i % 100 != 0), "validation": ("train", lambda i: i % 100 == 0),
                  "test": ("test", lambda i: True)}
SQL_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\w+(?:\.\w+)*|<=|>=|<>|!=|==|\|\||\S")


def normalize_sql(sql: str) -> str:
    """Canonical text for exact match: tokens joined by single spaces, keywords and identifiers
    lower-cased (string literals kept as written), trailing semicolons dropped."""
    tokens = [t if t[0] in "'\"" else t.lower() for t in SQL_TOKEN.findall(sql)]
    while tokens and tokens[-1] == ";":
        tokens.pop()
    return " ".join(tokens)


def extract_sql(generated: str) -> str:
    """The predicted query in generated text: leading blanks and newlines skipped, then everything
    before the next newline or ";", stripped."""
    return re.split(r"[\n;]", generated.lstrip(), maxsplit=1)[0].strip()


def is_query(sql: str) -> bool:
    return normalize_sql(sql).split(" ", 1)[0] in ("select", "with")


def sqlite_error(sql_context: str, gold_sql: str | None = None) -> str | None:
    """Why ``sql_context`` (and ``gold_sql`` on it) fails in a fresh sandbox (writes allowed), or None."""
    try:
        box = sandbox.Sandbox(sql_context, writes=True)
    except sqlite3.Error as error:
        return f"sql_context fails in sqlite: {error}"
    try:
        if gold_sql is not None:
            box.run(gold_sql)
    except (sqlite3.Error, sqlite3.Warning) as error:  # Warning: more than one statement
        return f"sql fails in sqlite on its sql_context: {error}"
    finally:
        box.close()
    return None


def _canonical_value(value):
    return round(value, 6) if isinstance(value, float) else value


def results_match(predicted: list[tuple], gold: list[tuple], ordered: bool) -> bool:
    """Same rows: in order when ``ordered``, else as multisets; floats compared to 6 decimal places."""
    predicted = [tuple(map(_canonical_value, row)) for row in predicted]
    gold = [tuple(map(_canonical_value, row)) for row in gold]
    return predicted == gold if ordered else Counter(predicted) == Counter(gold)


def sql_execution_match(pred_sql: str, gold_sql: str, sql_context: str) -> tuple[float, str | None]:
    """``(1.0, None)`` when ``pred_sql`` returns the gold query's rows on ``sql_context``, ``(0.0, None)``
    when it runs but returns other rows, ``(0.0, error message)`` when it fails to parse or run (an empty
    query, a syntax error, an unknown column, a write, anything the sandbox refuses or cuts short).

    Each query runs in its own fresh read-only sandbox built from ``sql_context``. Row order counts
    only when the gold query has ORDER BY. A gold query that does not run is bad data: ValueError.
    """
    try:
        gold_rows = sandbox.run(sql_context, gold_sql)
    except sqlite3.Error as error:
        raise ValueError(f"the gold query {gold_sql!r} fails on its context: {error}") from None
    if not pred_sql or not pred_sql.strip():
        return 0.0, "empty query"
    try:
        predicted_rows = sandbox.run(sql_context, pred_sql)
    except (sqlite3.Error, sqlite3.Warning) as error:  # Warning: more than one statement
        return 0.0, f"{type(error).__name__}: {error}"
    ordered = " order by " in f" {normalize_sql(gold_sql)} "
    return float(results_match(predicted_rows, gold_rows, ordered)), None


def database_contents(box: sandbox.Sandbox) -> dict[str, tuple]:
    """Every table and view of a sandbox's database: lower-cased name -> (lower-cased column names,
    multiset of rows as a Counter, floats rounded to 6 places)."""
    return {name.lower(): (tuple(c.lower() for c in columns), Counter(tuple(map(_canonical_value, r)) for r in rows))
            for name, (columns, rows) in box.contents().items()}


def sql_execution_match_reference(pred_sql: str, gold_sql: str, sql_context: str) -> tuple[float, str | None]:
    """The reference variant of ``sql_execution_match``: ``(score, error or None)``.

    Predicted and gold statement each run in their own fresh sandbox built from ``sql_context``, writes
    allowed. When the gold is a query, 1 when the two result row *sets* agree (duplicates and order
    ignored, floats rounded to 6 places). When the gold changes the database (INSERT, UPDATE, DELETE,
    CREATE, DROP, ...), 1 when afterwards both databases hold the same tables and views with the same
    columns and rows (``database_contents``, read within the sandbox's budget too). A prediction that
    fails to parse or run scores 0 with its error. A gold statement that does not run is bad data:
    ValueError.
    """
    def execute(statement):
        with sandbox.Sandbox(sql_context, writes=True) as box:
            rows = box.run(statement)
            return rows, database_contents(box)

    try:
        gold_rows, gold_tables = execute(gold_sql)
    except (sqlite3.Error, sqlite3.Warning) as error:
        raise ValueError(f"the gold statement {gold_sql!r} fails on its context: {error}") from None
    if not pred_sql or not pred_sql.strip():
        return 0.0, "empty query"
    try:
        pred_rows, pred_tables = execute(pred_sql)
    except (sqlite3.Error, sqlite3.Warning) as error:
        return 0.0, f"{type(error).__name__}: {error}"
    if is_query(gold_sql):
        return float({tuple(map(_canonical_value, r)) for r in pred_rows}
                     == {tuple(map(_canonical_value, r)) for r in gold_rows}), None
    return float(pred_tables == gold_tables), None


class SqlTask(Task):
    """Text-to-SQL rows (``id``, ``domain``, ``sql_complexity``, ``sql_prompt``, ``sql_context``, ``sql``);
    the prediction is greedy decoding, scored by execution (see the package docstring)."""

    family = "sql"
    primary_metric = "execution_accuracy"
    reference_primary_metric = "execution_accuracy_set"

    def __init__(self, name: str = "sql", hub_splits: dict | None = HUB_SQL_SPLITS):
        self.name, self.hub_splits = name, hub_splits

    def validate_row(self, row: dict, where: str, allow_writes: bool = False) -> None:
        for name in ("sql_prompt", "sql_context", "sql"):
            field(row, name, str, where)
        if not allow_writes and not is_query(row["sql"]):
            raise ValueError(f"{where}: field 'sql' must be a query (SELECT or WITH), got {row['sql']!r:.80}")
        problem = sqlite_error(row["sql_context"], row["sql"])
        if problem:
            name = "sql_context" if problem.startswith("sql_context") else "sql"
            raise ValueError(f"{where}: field {name!r}: {problem}")

    def prompt_and_target(self, row: dict) -> tuple[str, str]:
        return f"Context: {row['sql_context']}\nQuestion: {row['sql_prompt']}\nSQL:", " " + row["sql"]

    def convert_hub_row(self, row: dict) -> dict:
        """gretel rows keep ``id``, ``domain``, ``sql_complexity``, ``sql_prompt``, ``sql_context``, ``sql``."""
        out = {key: row[key] for key in ("id", "domain", "sql_complexity") if key in row}
        out.update({key: hub_field(self.name, row, key) for key in ("sql_prompt", "sql_context", "sql")})
        return out

    def hub_dataset(self, hub_split: str):
        from datasets import load_dataset  # imported here: only the hub path needs it

        return load_dataset(HUB_SQL, split=hub_split), HUB_SQL

    def hub_skip_reason(self, row: dict, writes: bool) -> str | None:
        """The upstream data mixes SQL dialects: rows sqlite cannot run are left out, and rows whose gold
        is not a query unless ``writes``."""
        if not (isinstance(row["sql"], str) and (writes or is_query(row["sql"]))):
            return "gold is not a query"
        if isinstance(row["sql_context"], str) and sqlite_error(row["sql_context"], row["sql"]):
            return "not runnable in sqlite"
        return None

    def predict(self, model, tokenizer, rows, batch_size, max_new_tokens) -> list[str]:
        prompts = [self.prompt_and_target(row)[0] for row in rows]
        return [extract_sql(t) for t in greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens)]

    def evaluate(self, model, tokenizer, rows, batch_size, max_new_tokens, variant):
        predictions = self.predict(model, tokenizer, rows, batch_size, max_new_tokens)
        if variant == "reference":
            return self._evaluate_reference(rows, predictions)
        correct = exact = errors = 0
        items = []
        for position, (row, predicted) in enumerate(zip(rows, predictions)):
            score, error = sql_execution_match(predicted, row["sql"], row["sql_context"])
            same = normalize_sql(predicted) == normalize_sql(row["sql"])
            correct += score
            errors += error is not None
            exact += same
            items.append({"id": item_id(row, position), "prediction": predicted, "correct": int(score),
                          "exact_match": int(same), "error": error})
        n = len(rows)
        return ({"execution_accuracy": correct / n, "exact_match": exact / n, "error_rate": errors / n,
                 "n": float(n)}, items)

    def _evaluate_reference(self, rows, predictions):
        correct = valid = exact = 0
        ours, n_query = 0.0, 0
        items = []
        for position, (row, predicted) in enumerate(zip(rows, predictions)):
            score, error = sql_execution_match_reference(predicted, row["sql"], row["sql_context"])
            same = normalize_sql(predicted) == normalize_sql(row["sql"])
            correct += score
            valid += error is None
            exact += same
            item = {"id": item_id(row, position), "prediction": predicted, "correct": int(score),
                    "exact_match": int(same), "error": error}
            if is_query(row["sql"]):
                n_query += 1
                item["correct_ours"] = int(sql_execution_match(predicted, row["sql"], row["sql_context"])[0])
                ours += item["correct_ours"]
            items.append(item)
        n = len(rows)
        metrics = {"execution_accuracy_set": correct / n, "valid_sql_rate": valid / n, "exact_match": exact / n}
        if n_query:
            metrics["execution_accuracy"] = ours / n_query
        return {**metrics, "n": float(n), "n_write_gold": float(n - n_query)}, items
