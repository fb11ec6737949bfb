"""The three task families of the MoLF paper: load rows, encode them for training, score a model.

A task is a ``base.Task`` (load, validate a row, build the prompt and target, evaluate, convert a hub
row, primary metric) in a module of its family (``sql``, ``mcq``, ``fact``), registered by one line
below. Adding a task means one new module and one ``register(...)`` line. The tables ``TASKS``,
``SQL_TASKS``, ``PRIMARY_METRIC``, ``REFERENCE_PRIMARY_METRIC`` and ``HUB_SPLITS`` are read from the
registry. ``sandbox`` runs every SQL statement (docs/sandbox.md); ``scoring`` holds the model plumbing
(log-probabilities, greedy generation), ``encoding`` the training tensors, ``cli`` the command line.

The paper's finding is that the better of FFT and LoRA flips with the task: FFT wins knowledge
injection (CounterFact), LoRA wins tasks that need little new knowledge (MedMCQA, text-to-SQL).

    name   local data (data/<name>/<split>.jsonl)        hub data (source="hub")             metric
    sql    7 schemas, 13 query shapes (1000/100/100)    gretelai/synthetic_text_to_sql       execution_accuracy
    sql2   sql on unseen schemas: 10 train schemas,      (local only)                        execution_accuracy
           2 validation, 4 test (1000/100/400)
    fact   182 counterfactual rewrites of known facts   CounterFact (rome.baulab.info JSON)  efficacy
    mcq    computed 4-option questions (1000/100/100)   openlifescienceai/medmcqa            accuracy
    mcq2   category questions, cloze (800/100/200)      (local only)                        accuracy

``data/generate.py`` writes the local files (see its docstring); ``docs/tasks.md`` documents the tasks.

Prompts (plain text, no chat template, so base and instruct models see the same thing):

    sql   "Context: {sql_context}\\nQuestion: {sql_prompt}\\nSQL:"          target " {sql}"   (sql2 alike)
    fact  the rewrite prompt with the subject filled in, e.g.
          "The official language of Iraq is"                                target " {target_new}"
    mcq   "Question: {question}\\nA. {opa}\\nB. {opb}\\nC. {opc}\\nD. {opd}\\nAnswer:"   target " A" .. " D"

Metrics (every value a float in [0, 1], plus ``n``, the number of rows scored):

    sql   execution_accuracy  predicted and gold query each run in a fresh read-only sandbox (an
                              in-memory sqlite database built from ``sql_context``, see ``sandbox``);
                              1 when the result rows agree (as multisets, or in order when the gold
                              query has ORDER BY; floats rounded to 6 places).
                              A prediction that fails to parse or run scores 0.
          exact_match         ``normalize_sql(pred) == normalize_sql(gold)``
          error_rate          share of predictions that failed to parse or run
          The prediction is greedy decoding up to EOS or to a newline or ";" that follows the first
          non-blank character (at most ``max_new_tokens``), with leading blanks stripped.
    fact  efficacy                  share of records with P(new) > P(true) for the first token of
                                    " target" after the rewrite prompt
          paraphrase_efficacy       the same on the paraphrase prompts (mean per record, then over records)
          neighborhood_specificity  share of neighbour prompts (other subjects whose true answer is this
                                    record's target_true) that keep P(true) > P(new) (per record, then mean)
    mcq   accuracy            the option letter with the highest next-token log-probability after
                              "Answer:" among " A", " B", " C", " D" is the correct one

Metric variants: ``evaluate(..., variant="ours")`` (the default, above) or ``variant="reference"``, the
way the paper's reference implementation (and, for fact, ROME's evaluation) measures. The reference
variant reports its own metrics and, beside them, ours on the same rows (``primary_metric(task, variant)``
names the headline one; every table says which variant it used):

    sql   execution_accuracy_set  predicted and gold statement each run in a fresh sandbox (writes
                                  allowed); a query gold: 1 when the result rows agree as *sets*; a gold that
                                  changes the database (INSERT, UPDATE, DELETE, CREATE, ...): 1 when every
                                  table and view holds the same rows afterwards (as multisets, with the same
                                  names and columns)
          valid_sql_rate          share of predictions that parse and run
          exact_match             as in ours
          execution_accuracy      ours (multiset, read-only) on the rows whose gold is a query, if any
          n_write_gold            rows whose gold changes the database (kept by ``load(variant="reference")``)
    mcq   accuracy_generate       greedy generation after "Answer:" (up to MCQ_MAX_NEW_TOKENS tokens, to a
                                  newline), parsed by ``parse_answer``; an unparseable answer counts as wrong
          invalid_answers         how many generations gave no parseable answer (a count), invalid_rate its share
          accuracy                ours (letter log-probabilities)
    fact  efficacy_full           share of records whose mean log-probability per token of the whole
                                  " target_new" beats that of the whole " target_true" after the rewrite
                                  prompt (ROME: mean negative log-likelihood over the target's tokens)
          paraphrase_efficacy_full, neighborhood_specificity_full   the same comparison on those prompts
          efficacy, paraphrase_efficacy, neighborhood_specificity   ours (first token), on the records whose
                                  two targets start with different tokens (``n_first_token`` of them)

Knowledge injection (fact) trains on the facts it tests: ``train`` holds every record, ``test``
(``case_id % 5 == 0``) and ``validation`` (``case_id % 10 == 1``) are subsets of it. Evaluate
``test`` after training on ``train``. The hub path applies the same rule by position.

CLI: ``python -m molf.lab.tasks evaluate --task sql --model smollm2-135m --split test [--variant reference]``
prints the metrics.
"""
from __future__ import annotations

import torch

from . import base, sandbox, scoring
from .base import (
    METRIC_VARIANTS,
    SOURCES,
    SPLITS,
    Task,
    check_choice,
    data_dir,
    get,
    item_id,
    read_jsonl,
    register,
    registered,
    unregister,
)
from .cli import main
from .encoding import IGNORE_INDEX, collate, encode, example_lengths, length_coverage, seq_len_covering
from .fact import HUB_FACT_URL, FactTask, fill_subject, full_target_wins
from .mcq import (
    HUB_MCQ,
    MCQ_MAX_NEW_TOKENS,
    OPTION_FIELDS,
    OPTION_LETTERS,
    ClozeChoiceTask,
    LetterChoiceTask,
    parse_answer,
)
from .sql import (
    HUB_SQL,
    SqlTask,
    database_contents,
    extract_sql,
    normalize_sql,
    results_match,
    sql_execution_match,
    sql_execution_match_reference,
)

# The registry: one line per task, in the order TASKS lists them.
register(SqlTask("sql"))
register(FactTask("fact"))
register(LetterChoiceTask("mcq"))
register(ClozeChoiceTask("mcq2"))
register(SqlTask("sql2", hub_splits=None))  # sql on schemas it never trained on; local data only

# Model plumbing under its old names (molf.lab.retention and tests use them).
_first_token = scoring.first_token
_next_token_logprobs = scoring.next_token_logprobs
_target_logprobs = scoring.target_logprobs
_greedy_generate = scoring.greedy_generate


def __getattr__(name: str):
    """The tables read from the registry, so that they always list the registered tasks."""
    tasks = registered()
    if name == "TASKS":
        return tuple(t.name for t in tasks)
    if name == "SQL_TASKS":  # the same rows, prompt and metrics; sql2 tests on schemas it never trained on
        return tuple(t.name for t in tasks if t.family == "sql")
    if name == "PRIMARY_METRIC":
        return {t.name: t.primary_metric for t in tasks}
    if name == "REFERENCE_PRIMARY_METRIC":
        return {t.name: t.reference_primary_metric for t in tasks}
    if name == "HUB_SPLITS":  # for each of our splits: (hub split, which rows by position i)
        return {t.name: t.hub_splits for t in tasks if t.hub_splits is not None}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def primary_metric(name: str, variant: str = "ours") -> str:
    """The headline metric of task ``name`` under metric ``variant`` ("ours" or "reference")."""
    task = get(name)
    check_choice("metric variant", variant, METRIC_VARIANTS)
    return task.primary_metric if variant == "ours" else task.reference_primary_metric


def validate_row(name: str, row, where: str, allow_writes: bool = False) -> None:
    """Raise ValueError (naming ``where``, e.g. "data/sql/train.jsonl line 3", and the field) if
    ``row`` does not have the schema of task ``name``. ``allow_writes``: an sql gold may be a statement
    that changes the database (the reference metric variant scores those); else it must be a query."""
    base.validate_row(get(name), row, where, allow_writes)


def prompt_and_target(name: str, row: dict) -> tuple[str, str]:
    """The prompt text and the target text (with its leading space) of one row of task ``name``."""
    return get(name).prompt_and_target(row)


def convert_hub_row(name: str, row: dict) -> dict:
    """One row of the paper's hub dataset of task ``name`` in our row schema (pure; no network); see each
    task's ``convert_hub_row``. A missing field raises ValueError naming it."""
    task = get(name)
    if task.hub_splits is None:
        raise ValueError(f"task {name!r} has no hub dataset (local data only)")
    if not isinstance(row, dict):
        raise ValueError(f"a {name} hub row must be a dict, got {type(row).__name__}")
    return task.convert_hub_row(row)


def load(name: str, split: str, source: str = "local", limit: int | None = None,
         variant: str = "ours") -> list[dict]:
    """The rows of task ``name`` (see ``TASKS``) and ``split`` (train, validation, test).

    ``source="local"`` reads ``data/<name>/<split>.jsonl`` (see ``data_dir``); ``source="hub"`` loads
    the paper's dataset with ``datasets`` and converts its rows with ``convert_hub_row``. ``limit``
    keeps the first ``limit`` rows. Every row is validated; a malformed local row (bad JSON, bad UTF-8,
    a missing or wrong field, an id seen before in the file) raises ValueError naming file, line and
    field. Hub sql rows whose context or gold query sqlite cannot run, or whose gold is not a query, are
    skipped with a warning (the upstream data mixes SQL dialects). ``variant="reference"`` keeps sql
    rows whose gold changes the database (INSERT, UPDATE, CREATE, ...): the reference metric variant
    scores them by the tables' contents (see ``evaluate``).
    """
    task = get(name)
    check_choice("split", split, SPLITS)
    check_choice("source", source, SOURCES)
    check_choice("metric variant", variant, METRIC_VARIANTS)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    if source == "hub" and task.hub_splits is None:
        raise ValueError(f"task {name!r} has local data only (source='local'); hub data: "
                         f"{', '.join(t.name for t in registered() if t.hub_splits is not None)}")
    return task.load(split, source, limit, writes=variant == "reference")


def evaluate(name: str, model, tokenizer, rows: list[dict], batch_size: int = 16,
             max_new_tokens: int = 64, variant: str = "ours", return_items: bool = False):
    """Score ``model`` on ``rows`` of task ``name`` (metrics and the two ``variant``s, "ours" and
    "reference", in the module docstring).

    ``return_items=True`` returns ``(metrics, items)``: one JSON-ready record per scored row, in row
    order, with ``id`` (the row's ``id``, or ``case_id`` for fact, else its position), ``prediction`` and
    ``correct`` (1/0 on the primary metric of ``variant``), plus task-specific fields (sql:
    ``exact_match``, ``error``; fact: ``paraphrase_efficacy``, ``neighborhood_specificity``,
    ``neighbour_flip``, ``edit_score``, ``margin``; mcq2: ``margin``; the reference variant adds
    ``*_ours`` / ``*_full`` fields, and mcq's ``generation``). Paired comparisons of two runs read these
    records item by item.

    Runs under ``torch.no_grad()`` in eval mode on the model's device and restores the model's
    train/eval mode afterwards."""
    task = get(name)
    check_choice("metric variant", variant, METRIC_VARIANTS)
    if not rows:
        raise ValueError(f"evaluate needs at least one {name} row")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics, items = task.evaluate(model, tokenizer, rows, batch_size, max_new_tokens, variant)
    finally:
        model.train(was_training)
    return (metrics, items) if return_items else metrics


__all__ = [
    "FactTask", "ClozeChoiceTask", "HUB_FACT_URL", "HUB_MCQ", "HUB_SQL", "IGNORE_INDEX", "LetterChoiceTask",
    "MCQ_MAX_NEW_TOKENS", "METRIC_VARIANTS", "OPTION_FIELDS", "OPTION_LETTERS", "SOURCES", "SPLITS", "SqlTask",
    "Task", "collate", "convert_hub_row", "data_dir", "database_contents", "encode", "evaluate",
    "example_lengths", "extract_sql", "fill_subject", "full_target_wins", "get", "item_id", "length_coverage",
    "load", "main", "normalize_sql", "parse_answer", "primary_metric", "prompt_and_target", "read_jsonl",
    "register", "registered", "results_match", "sandbox", "seq_len_covering", "sql_execution_match",
    "sql_execution_match_reference", "unregister", "validate_row",
]
