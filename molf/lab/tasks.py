"""The three task families of the MoLF paper: load rows, encode them for training, score a model.

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

    sql   execution_accuracy  predicted and gold query each run in a fresh in-memory sqlite database
                              built from ``sql_context``; 1 when the result rows agree (as multisets, or
                              in order when the gold query has ORDER BY; floats rounded to 6 places).
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

    sql   execution_accuracy_set  predicted and gold statement each run in a fresh in-memory database (writes
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

import argparse
import json
import math
import re
import sqlite3
import warnings
from collections import Counter
from pathlib import Path

import torch

from . import paths

TASKS = ("sql", "fact", "mcq", "mcq2", "sql2")
SQL_TASKS = ("sql", "sql2")  # the same rows, prompt and metrics; sql2 tests on schemas it never trained on
SPLITS = ("train", "validation", "test")
SOURCES = ("local", "hub")
PRIMARY_METRIC = {"sql": "execution_accuracy", "fact": "efficacy", "mcq": "accuracy", "mcq2": "accuracy",
                  "sql2": "execution_accuracy"}
METRIC_VARIANTS = ("ours", "reference")
REFERENCE_PRIMARY_METRIC = {"sql": "execution_accuracy_set", "fact": "efficacy_full", "mcq": "accuracy_generate",
                            "mcq2": "accuracy_generate", "sql2": "execution_accuracy_set"}
MCQ_MAX_NEW_TOKENS = 16
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
OPTION_LETTERS = ("A", "B", "C", "D")
IGNORE_INDEX = -100

# sqlite guards for model-written queries: abort a query after this many progress callbacks (each one
# every SQLITE_PROGRESS_STEP virtual-machine instructions), and allow reading only.
SQLITE_PROGRESS_STEP = 1000
SQLITE_MAX_PROGRESS_CALLS = 20_000
READ_ONLY_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                     getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
# The reference variant lets statements write to their throwaway in-memory database, but never touch
# files (ATTACH opens or creates one) or change the connection's settings.
WRITE_DENIED_ACTIONS = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA}

# The paper's datasets. For each of our splits: (hub split, which rows by position i).
HUB_SQL = "gretelai/synthetic_text_to_sql"
HUB_MCQ = "openlifescienceai/medmcqa"
HUB_FACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
HUB_SPLITS = {
    # gretel has train/test; every 100th train row is our validation.
    "sql": {"train": ("train", lambda i: i % 100 != 0), "validation": ("train", lambda i: i % 100 == 0),
            "test": ("test", lambda i: True)},
    # medmcqa's test split has no answers: its validation split is our test.
    "mcq": {"train": ("train", lambda i: i % 100 != 0), "validation": ("train", lambda i: i % 100 == 0),
            "test": ("validation", lambda i: True)},
    # CounterFact is one file; knowledge injection tests a subset of the trained facts.
    "fact": {"train": ("train", lambda i: True), "validation": ("train", lambda i: i % 10 == 1),
             "test": ("train", lambda i: i % 5 == 0)},
}


def _check_choice(kind: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def primary_metric(name: str, variant: str = "ours") -> str:
    """The headline metric of task ``name`` under metric ``variant`` ("ours" or "reference")."""
    _check_choice("task", name, TASKS)
    _check_choice("metric variant", variant, METRIC_VARIANTS)
    return (PRIMARY_METRIC if variant == "ours" else REFERENCE_PRIMARY_METRIC)[name]


def data_dir() -> Path:
    """The shipped data folder (``molf.lab.paths.data_dir``: ``$MOLF_DATA``, else the checkout's ``data/``)."""
    return paths.data_dir()


# ------------------------------------------------------------------------------------ validation

def _field(row: dict, path: str, kind: type, where: str):
    """``row[a][b]...`` for ``path = "a.b"``, checked to be of ``kind``; ValueError naming ``where``."""
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where}: missing field {path!r}")
        value = value[part]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}: field {path!r} must be {kind.__name__}, got "
                         f"{type(value).__name__} {value!r:.80}")
    if kind is str and path not in OPTION_FIELDS and not value.strip():
        raise ValueError(f"{where}: field {path!r} is empty")
    return value


def _sqlite_error(sql_context: str, gold_sql: str | None = None) -> str | None:
    """Why ``sql_context`` (and ``gold_sql`` on it) fails in a fresh sqlite database, or None."""
    try:
        connection = _fresh_database(sql_context)
    except sqlite3.Error as error:
        return f"sql_context fails in sqlite: {error}"
    try:
        if gold_sql is not None:
            connection.execute(gold_sql).fetchall()
    except (sqlite3.Error, sqlite3.Warning) as error:  # Warning: more than one statement
        return f"sql fails in sqlite on its sql_context: {error}"
    finally:
        connection.close()
    return None


def validate_row(name: str, row, where: str, allow_writes: bool = False) -> None:
    """Raise ValueError (naming ``where``, e.g. "data/sql/train.jsonl line 3", and the field) if
    ``row`` does not have the schema of task ``name``. ``allow_writes``: an sql gold may be a statement
    that changes the database (the reference metric variant scores those); else it must be a query."""
    _check_choice("task", name, TASKS)
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if name in SQL_TASKS:
        for field in ("sql_prompt", "sql_context", "sql"):
            _field(row, field, str, where)
        if not allow_writes and not _is_query(row["sql"]):
            raise ValueError(f"{where}: field 'sql' must be a query (SELECT or WITH), got {row['sql']!r:.80}")
        problem = _sqlite_error(row["sql_context"], row["sql"])
        if problem:
            field = "sql_context" if problem.startswith("sql_context") else "sql"
            raise ValueError(f"{where}: field {field!r}: {problem}")
    elif name in ("mcq", "mcq2"):
        _field(row, "question", str, where)
        for field in OPTION_FIELDS:
            _field(row, field, str, where)
        cop = _field(row, "cop", int, where)
        if cop not in range(4):
            raise ValueError(f"{where}: field 'cop' must be 0..3 (the index of the correct option), got {cop}")
        if name == "mcq2":
            options = [row[field].strip() for field in OPTION_FIELDS]
            if not all(options) or len(set(options)) != 4:
                raise ValueError(f"{where}: mcq2 options must be four distinct non-empty texts, got {options}")
    else:
        prompt = _field(row, "requested_rewrite.prompt", str, where)
        if "{}" not in prompt:
            raise ValueError(f"{where}: field 'requested_rewrite.prompt' needs a '{{}}' for the subject, "
                             f"got {prompt!r}")
        _field(row, "requested_rewrite.subject", str, where)
        true = _field(row, "requested_rewrite.target_true.str", str, where)
        new = _field(row, "requested_rewrite.target_new.str", str, where)
        if true.strip() == new.strip():
            raise ValueError(f"{where}: field 'requested_rewrite.target_new.str' equals target_true ({new!r})")
        for field in ("paraphrase_prompts", "neighborhood_prompts"):
            prompts = _field(row, field, list, where)
            if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"{where}: field {field!r} must be a non-empty list of non-empty strings")


# ------------------------------------------------------------------------------------------ load

def load(name: str, split: str, source: str = "local", limit: int | None = None,
         variant: str = "ours") -> list[dict]:
    """The rows of task ``name`` (sql, fact, mcq) and ``split`` (train, validation, test).

    ``source="local"`` reads ``data/<name>/<split>.jsonl`` (see ``data_dir``); ``source="hub"`` loads
    the paper's dataset with ``datasets`` and converts its rows with ``convert_hub_row``. ``limit``
    keeps the first ``limit`` rows. Every row is validated; a malformed local row raises ValueError
    naming file, line and field. Hub sql rows whose context or gold query sqlite cannot run, or whose
    gold is not a query, are skipped with a warning (the upstream data mixes SQL dialects).
    ``variant="reference"`` keeps sql rows whose gold changes the database (INSERT, UPDATE, CREATE, ...):
    the reference metric variant scores them by the tables' contents (see ``evaluate``).
    """
    _check_choice("task", name, TASKS)
    _check_choice("split", split, SPLITS)
    _check_choice("source", source, SOURCES)
    _check_choice("metric variant", variant, METRIC_VARIANTS)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    writes = variant == "reference"
    if source == "hub" and name not in HUB_SPLITS:
        raise ValueError(f"task {name!r} has local data only (source='local'); hub data: {', '.join(HUB_SPLITS)}")
    return _load_local(name, split, limit, writes) if source == "local" else _load_hub(name, split, limit, writes)


def _load_local(name: str, split: str, limit: int | None, writes: bool = False) -> list[dict]:
    path = data_dir() / name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python data/generate.py` or set MOLF_DATA")
    return read_jsonl(path, lambda row, where: validate_row(name, row, where, allow_writes=writes), limit)


def read_jsonl(path: Path, validate, limit: int | None = None) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped, at most ``limit``), each passed to
    ``validate(row, where)`` first, ``where`` being "<path> line <n>" for its error messages."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            validate(row, where)
            rows.append(row)
    return rows


def _copy(value):
    return dict(value) if isinstance(value, dict) else value  # validate_row reports a non-dict


def convert_hub_row(name: str, row: dict) -> dict:
    """One row of the paper's hub dataset in our row schema (pure; no network).

    sql   gretel rows keep ``id``, ``domain``, ``sql_complexity``, ``sql_prompt``, ``sql_context``, ``sql``.
    mcq   medmcqa rows keep ``id``, ``question``, ``opa``..``opd``, ``cop``, ``choice_type``, ``exp``,
          ``subject_name``, ``topic_name`` (``exp`` may be None upstream: it becomes "").
    fact  CounterFact records keep ``case_id``, ``requested_rewrite`` (``prompt``, ``relation_id``,
          ``subject``, ``target_true``/``target_new`` as {"str", "id"}), ``paraphrase_prompts`` and
          ``neighborhood_prompts``; attribute and generation prompts are dropped.
    A missing field raises ValueError naming it.
    """
    _check_choice("task", name, TASKS)
    if name not in HUB_SPLITS:
        raise ValueError(f"task {name!r} has no hub dataset (local data only)")
    if not isinstance(row, dict):
        raise ValueError(f"a {name} hub row must be a dict, got {type(row).__name__}")

    def need(key):
        if key not in row:
            raise ValueError(f"{name} hub row is missing field {key!r}; it has {sorted(row)}")
        return row[key]

    if name == "sql":
        out = {key: row[key] for key in ("id", "domain", "sql_complexity") if key in row}
        out.update({key: need(key) for key in ("sql_prompt", "sql_context", "sql")})
        return out
    if name == "mcq":
        out = {"id": row.get("id"), "question": need("question")}
        out.update({key: need(key) for key in OPTION_FIELDS})
        out["cop"] = need("cop")
        out.update({key: row.get(key) or "" for key in ("choice_type", "exp", "subject_name", "topic_name")})
        return out
    rewrite = need("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise ValueError(f"fact hub row field 'requested_rewrite' must be a dict, got {type(rewrite).__name__}")
    missing = [k for k in ("prompt", "subject", "target_true", "target_new") if k not in rewrite]
    if missing:
        raise ValueError(f"fact hub row is missing field 'requested_rewrite.{missing[0]}'")
    return {
        "case_id": row.get("case_id"),
        "requested_rewrite": {
            "prompt": rewrite["prompt"], "relation_id": rewrite.get("relation_id", ""),
            "subject": rewrite["subject"],
            "target_true": _copy(rewrite["target_true"]), "target_new": _copy(rewrite["target_new"])},
        "paraphrase_prompts": list(need("paraphrase_prompts")),
        "neighborhood_prompts": list(need("neighborhood_prompts")),
    }


def _hub_dataset(name: str, hub_split: str):
    """``(rows, where they come from)`` for one split of the paper's dataset (downloads; the tests
    replace this function)."""
    from datasets import load_dataset  # imported here: only the hub path needs it

    if name == "sql":
        return load_dataset(HUB_SQL, split=hub_split), HUB_SQL
    if name == "mcq":
        return load_dataset(HUB_MCQ, split=hub_split), HUB_MCQ
    return load_dataset("json", data_files=HUB_FACT_URL, split=hub_split), HUB_FACT_URL


def _is_query(sql: str) -> bool:
    return normalize_sql(sql).split(" ", 1)[0] in ("select", "with")


def _load_hub(name: str, split: str, limit: int | None, writes: bool = False) -> list[dict]:
    """Hub rows of our ``split`` (see HUB_SPLITS), converted, filtered (sql) and validated; ``writes``
    keeps sql rows whose gold changes the database."""
    hub_split, keep = HUB_SPLITS[name][split]
    dataset, source = _hub_dataset(name, hub_split)
    label = f"{source} split {hub_split!r}"
    rows, skipped = [], Counter()
    for index, hub_row in enumerate(dataset):
        if limit is not None and len(rows) >= limit:
            break
        if not keep(index):
            continue
        where = f"{label} row {index}"
        try:
            row = convert_hub_row(name, dict(hub_row))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if name == "sql":
            if not (isinstance(row["sql"], str) and (writes or _is_query(row["sql"]))):
                skipped["gold is not a query"] += 1
                continue
            if isinstance(row["sql_context"], str) and _sqlite_error(row["sql_context"], row["sql"]):
                skipped["not runnable in sqlite"] += 1
                continue
        validate_row(name, row, where, allow_writes=writes)
        rows.append(row)
    if skipped:
        warnings.warn(f"{label}: skipped " + ", ".join(f"{n} rows ({why})" for why, n in skipped.items()), stacklevel=2)
    return rows


# --------------------------------------------------------------------------------------- prompts

def fill_subject(template: str, subject: str) -> str:
    """A CounterFact prompt with its subject: "{} is a city in" -> "Lyon is a city in" (first letter
    capitalised, so "the Netherlands" starts a sentence as "The Netherlands")."""
    text = template.replace("{}", subject)
    return text[:1].upper() + text[1:]


def prompt_and_target(name: str, row: dict) -> tuple[str, str]:
    """The prompt text and the target text (with its leading space) of one row; the only place where
    the prompt formats are defined."""
    _check_choice("task", name, TASKS)
    if name in SQL_TASKS:
        return f"Context: {row['sql_context']}\nQuestion: {row['sql_prompt']}\nSQL:", " " + row["sql"]
    if name in ("mcq", "mcq2"):
        options = "\n".join(f"{letter}. {row[field]}" for letter, field in zip(OPTION_LETTERS, OPTION_FIELDS))
        prompt = f"Question: {row['question']}\n{options}\nAnswer:"
        if name == "mcq2":  # the answer's text, not its letter
            return prompt, " " + row[OPTION_FIELDS[row["cop"]]].strip()
        return prompt, " " + OPTION_LETTERS[row["cop"]]
    rewrite = row["requested_rewrite"]
    return fill_subject(rewrite["prompt"], rewrite["subject"]), " " + rewrite["target_new"]["str"]


# ---------------------------------------------------------------------------------------- encode

def encode(name: str, rows: list[dict], tokenizer, max_len: int = 256) -> list[dict]:
    """Token ids for training: ``{"input_ids": prompt + target + [eos], "labels": [-100]*len(prompt) +
    target + [eos]}``.

    Prompt and target are tokenized separately (the target without special tokens), the same split
    ``evaluate`` scores. Over ``max_len``, the prompt loses tokens from its left; a target that alone
    reaches ``max_len`` is cut from its right, keeping one prompt token so the first target token is
    still predicted. For fact rows the target is ``" " + target_new``: training injects the new fact.
    """
    _check_choice("task", name, TASKS)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (one prompt and one target token), got {max_len!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; encode appends EOS to every target")
    features = []
    for row in rows:
        prompt, target = prompt_and_target(name, row)
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = (tokenizer(target, add_special_tokens=False)["input_ids"] + [eos])[:max_len - 1]
        prompt_ids = prompt_ids[-(max_len - len(target_ids)):]
        features.append({"input_ids": prompt_ids + target_ids,
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids})
    return features


def example_lengths(name: str, rows: list[dict], tokenizer) -> list[int]:
    """Tokens of each row as ``encode`` would train it uncut: prompt + target + EOS."""
    lengths = []
    for row in rows:
        prompt, target = prompt_and_target(name, row)
        lengths.append(len(tokenizer(prompt)["input_ids"]) + len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 1)
    return lengths


def length_coverage(name: str, rows: list[dict], tokenizer, seq_lens) -> dict[int, float]:
    """For each ``seq_len``: the share of ``rows`` that ``encode(..., max_len=seq_len)`` keeps whole
    (prompt + target + EOS fit)."""
    lengths = example_lengths(name, rows, tokenizer)
    if not lengths:
        raise ValueError("length_coverage needs at least one row")
    return {int(n): sum(length <= n for length in lengths) / len(lengths) for n in seq_lens}


def seq_len_covering(name: str, rows: list[dict], tokenizer, share: float = 0.99, multiple: int = 8) -> int:
    """The smallest multiple of ``multiple`` that keeps at least ``share`` of ``rows`` whole."""
    lengths = sorted(example_lengths(name, rows, tokenizer))
    needed = lengths[max(0, math.ceil(share * len(lengths)) - 1)]
    return multiple * math.ceil(needed / multiple)


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``encode`` features into ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    if not features:
        raise ValueError("collate needs at least one feature")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    width = max(len(f["input_ids"]) for f in features)
    input_ids, attention_mask, labels = [], [], []
    for f in features:
        if len(f["labels"]) != len(f["input_ids"]):
            raise ValueError(f"a feature has {len(f['input_ids'])} input_ids but {len(f['labels'])} labels")
        pad = width - len(f["input_ids"])
        input_ids.append(list(f["input_ids"]) + [pad_token_id] * pad)
        attention_mask.append([1] * len(f["input_ids"]) + [0] * pad)
        labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


# ----------------------------------------------------------------------------------- sql metrics

SQL_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\w+(?:\.\w+)*|<=|>=|<>|!=|==|\|\||\S")


def normalize_sql(sql: str) -> str:
    """Canonical text for exact match: tokens joined by single spaces, keywords and identifiers
    lower-cased (string literals kept as written), trailing semicolons dropped."""
    tokens = [t if t[0] in "'\"" else t.lower() for t in SQL_TOKEN.findall(sql)]
    while tokens and tokens[-1] == ";":
        tokens.pop()
    return " ".join(tokens)


def _ends_query(generated: str) -> bool:
    """Generation may stop: a newline or ";" after the first non-blank character."""
    text = generated.lstrip()
    return "\n" in text or ";" in text


def extract_sql(generated: str) -> str:
    """The predicted query in generated text: leading blanks and newlines skipped, then everything
    before the next newline or ";", stripped."""
    return re.split(r"[\n;]", generated.lstrip(), maxsplit=1)[0].strip()


def _fresh_database(sql_context: str) -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(sql_context)
    except sqlite3.Error:
        connection.close()
        raise
    return connection


def _run_read_only(sql_context: str, query: str) -> list[tuple]:
    """Rows of ``query`` in a fresh database built from ``sql_context``; reading only, bounded time."""
    connection = _fresh_database(sql_context)
    calls = 0

    def progress():
        nonlocal calls
        calls += 1
        return calls > SQLITE_MAX_PROGRESS_CALLS  # non-zero aborts the query

    def authorize(action, *_):
        return sqlite3.SQLITE_OK if action in READ_ONLY_ACTIONS else sqlite3.SQLITE_DENY

    try:
        connection.set_progress_handler(progress, SQLITE_PROGRESS_STEP)
        connection.set_authorizer(authorize)
        return connection.execute(query).fetchall()
    finally:
        connection.close()


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
    query, a syntax error, an unknown column, a write, a query running too long).

    Each query runs in its own fresh in-memory database built from ``sql_context``. Row order counts
    only when the gold query has ORDER BY. A gold query that does not run is bad data: ValueError.
    """
    try:
        gold_rows = _run_read_only(sql_context, gold_sql)
    except sqlite3.Error as error:
        raise ValueError(f"the gold query {gold_sql!r} fails on its context: {error}") from None
    if not pred_sql or not pred_sql.strip():
        return 0.0, "empty query"
    try:
        predicted_rows = _run_read_only(sql_context, pred_sql)
    except (sqlite3.Error, sqlite3.Warning) as error:  # Warning: more than one statement
        return 0.0, f"{type(error).__name__}: {error}"
    ordered = " order by " in f" {normalize_sql(gold_sql)} "
    return float(results_match(predicted_rows, gold_rows, ordered)), None


def _execute_writable(connection: sqlite3.Connection, statement: str) -> list[tuple]:
    """Run one statement that may write to ``connection`` (an in-memory database); bounded time, no
    files, no pragmas. Returns its result rows ([] for a statement that returns none)."""
    calls = 0

    def progress():
        nonlocal calls
        calls += 1
        return calls > SQLITE_MAX_PROGRESS_CALLS

    def authorize(action, *_):
        return sqlite3.SQLITE_DENY if action in WRITE_DENIED_ACTIONS else sqlite3.SQLITE_OK

    connection.set_progress_handler(progress, SQLITE_PROGRESS_STEP)
    connection.set_authorizer(authorize)
    try:
        return connection.execute(statement).fetchall()
    finally:
        connection.set_authorizer(None)
        connection.set_progress_handler(None, 0)


def database_contents(connection: sqlite3.Connection) -> dict[str, tuple]:
    """Every table and view of ``connection``: name -> (column names, multiset of rows as a Counter)."""
    names = [r[0] for r in connection.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    contents = {}
    for name in names:
        quoted = name.replace('"', '""')
        cursor = connection.execute(f'SELECT * FROM "{quoted}"')
        columns = tuple(d[0].lower() for d in cursor.description)
        contents[name.lower()] = (columns, Counter(tuple(map(_canonical_value, row)) for row in cursor.fetchall()))
    return contents


def sql_execution_match_reference(pred_sql: str, gold_sql: str, sql_context: str) -> tuple[float, str | None]:
    """The reference variant of ``sql_execution_match``: ``(score, error or None)``.

    Predicted and gold statement each run in their own fresh in-memory database built from
    ``sql_context``, writes allowed. When the gold is a query, 1 when the two result row *sets* agree
    (duplicates and order ignored, floats rounded to 6 places). When the gold changes the database
    (INSERT, UPDATE, DELETE, CREATE, DROP, ...), 1 when afterwards both databases hold the same tables
    and views with the same columns and rows (``database_contents``). A prediction that fails to parse
    or run scores 0 with its error. A gold statement that does not run is bad data: ValueError.
    """
    def execute(statement):
        connection = _fresh_database(sql_context)
        try:
            rows = _execute_writable(connection, statement)
            return rows, database_contents(connection)
        finally:
            connection.close()

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
    if _is_query(gold_sql):
        return float({tuple(map(_canonical_value, r)) for r in pred_rows}
                     == {tuple(map(_canonical_value, r)) for r in gold_rows}), None
    return float(pred_tables == gold_tables), None


# ------------------------------------------------------------------------------ mcq answer parsing

# a letter alone, or before punctuation or an option text: not the article in "A patient ..."
_LEADING_LETTER = re.compile(r"^\W*([ABCD])(?=$|[.):,\]]|\s+[^a-z\s]|\s*\n)")
_STATED_LETTER = re.compile(r"\b(?i:answer)\s*(?:is|:)?\s*(?:(?i:option)\s*)?\(?([ABCD])(?![A-Za-z0-9])")


def parse_answer(generated: str, options: list[str] | None = None) -> int | None:
    """The option index (0..3) a generated answer names, or None (an invalid answer).

    In order: a leading option letter (" B", "(B)", "B. Atrophy", "B)"); an "answer is B" / "Answer: (B)"
    anywhere; else, with ``options`` given, the generation starting with an option's text (case and
    surrounding blanks ignored; the longest such option). Letters must be upper case: "a" is a word."""
    text = generated.strip()
    for pattern in (_LEADING_LETTER, _STATED_LETTER):
        found = pattern.search(text)
        if found:
            return OPTION_LETTERS.index(found.group(1).upper())
    if options:
        lowered = text.lower()
        matches = [(len(o.strip()), i) for i, o in enumerate(options) if o.strip() and lowered.startswith(o.strip().lower())]
        if matches:
            return max(matches)[1]
    return None


# ------------------------------------------------------------------------------- model plumbing

def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def _first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return ids[0]


def _next_token_logprobs(model, tokenizer, prompts: list[str], candidates: list[list[int]],
                         batch_size: int) -> list[list[float]]:
    """Log-probabilities of each prompt's candidate tokens as the next token. Batches are right-padded
    and read at each prompt's last real position, so padding changes nothing."""
    device, pad, scores = _model_device(model), _pad_id(tokenizer), []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(map(len, encoded))
        input_ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        last = torch.tensor([len(e) - 1 for e in encoded], device=device)
        logprobs = logits[torch.arange(len(encoded), device=device), last].float().log_softmax(-1)
        for row, ids in zip(logprobs, candidates[start:start + batch_size]):
            scores.append(row[torch.tensor(ids, device=device)].tolist())
    return scores


def _target_logprobs(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int,
                     append_eos: bool = False) -> list[list[float]]:
    """For each (prompt, target) pair, the log-probability of every token of ``target`` given the prompt
    and the target tokens before it (prompt tokenized with special tokens, the target without: the
    split ``encode`` trains on). Batches are right-padded, so padding changes nothing."""
    device, pad, scores = _model_device(model), _pad_id(tokenizer), []
    for start in range(0, len(prompts), batch_size):
        pairs = []
        for prompt, target in zip(prompts[start:start + batch_size], targets[start:start + batch_size]):
            target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
            if not target_ids:
                raise ValueError(f"{target!r} tokenizes to nothing")
            if append_eos:
                target_ids = target_ids + [tokenizer.eos_token_id]
            pairs.append((tokenizer(prompt)["input_ids"], target_ids))
        sequences = [p + t for p, t in pairs]
        width = max(map(len, sequences))
        input_ids = torch.tensor([q + [pad] * (width - len(q)) for q in sequences], device=device)
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in sequences], device=device)
        logprobs = model(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)
        for row, (prompt_ids, target_ids) in zip(logprobs, pairs):
            positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids), device=device)
            scores.append(row[positions, torch.tensor(target_ids, device=device)].tolist())
    return scores


def full_target_wins(first: list[float], second: list[float]) -> bool:
    """ROME's comparison of two whole targets: ``first`` (its tokens' log-probabilities) beats
    ``second`` when its mean log-probability per token is higher (mean NLL lower)."""
    return sum(first) / len(first) > sum(second) / len(second)


def _stop_criterion(tokenizer, prompt_width: int):
    """A transformers StoppingCriteria that ends each sequence once its new text has a newline or ';'."""
    from transformers import StoppingCriteria

    class StopAtEndOfQuery(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor([_ends_query(t) for t in texts], device=input_ids.device)

    return StopAtEndOfQuery()


def _greedy_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens.

    Uses ``model.generate`` (with its KV cache) when the model has one; otherwise a plain loop that
    re-runs the whole sequence per token (slow; for small stand-in models)."""
    device, pad, eos = _model_device(model), _pad_id(tokenizer), tokenizer.eos_token_id
    texts = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(map(len, encoded))
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        if hasattr(model, "generate"):
            from transformers import StoppingCriteriaList

            output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos,
                                    stopping_criteria=StoppingCriteriaList([_stop_criterion(tokenizer, width)]))
        else:
            output, finished = input_ids, torch.zeros(len(encoded), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                next_ids = model(input_ids=output, attention_mask=mask).logits[:, -1].argmax(-1)
                next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
                output = torch.cat([output, next_ids[:, None]], dim=1)
                mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
                new_text = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
                finished |= (next_ids == eos) | torch.tensor([_ends_query(t) for t in new_text], device=device)
                if finished.all():
                    break
        texts += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return texts


# -------------------------------------------------------------------------------------- evaluate

def evaluate(name: str, model, tokenizer, rows: list[dict], batch_size: int = 16,
             max_new_tokens: int = 64, variant: str = "ours", return_items: bool = False):
    """Score ``model`` on ``rows`` of task ``name`` (metrics and the two ``variant``s, "ours" and
    "reference", in the module docstring).

    ``return_items=True`` returns ``(metrics, items)``: one JSON-ready record per scored row, in row
    order, with ``id`` (the row's ``id``, or ``case_id`` for fact, else its position), ``prediction`` and
    ``correct`` (1/0 on the primary metric of ``variant``), plus task-specific fields (see
    ``ITEM_FIELDS``). Paired comparisons of two runs read these records item by item.

    Runs under ``torch.no_grad()`` in eval mode on the model's device and restores the model's
    train/eval mode afterwards."""
    _check_choice("task", name, TASKS)
    _check_choice("metric variant", variant, METRIC_VARIANTS)
    if not rows:
        raise ValueError(f"evaluate needs at least one {name} row")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scorer = _EVALUATORS[name, variant]
            extra = (max_new_tokens,) if name in SQL_TASKS else ()  # only sql generates
            metrics, items = scorer(model, tokenizer, rows, batch_size, *extra)
    finally:
        model.train(was_training)
    return (metrics, items) if return_items else metrics


def item_id(row: dict, position: int):
    """The id a per-item record carries: the row's ``id``, else its ``case_id``, else its position."""
    for key in ("id", "case_id"):
        if row.get(key) is not None:
            return row[key]
    return position


def _evaluate_sql(model, tokenizer, rows, batch_size, max_new_tokens) -> dict[str, float]:
    prompts = [prompt_and_target("sql", row)[0] for row in rows]
    predictions = [extract_sql(t) for t in _greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens)]
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
    return ({"execution_accuracy": correct / n, "exact_match": exact / n, "error_rate": errors / n, "n": float(n)},
            items)


def _evaluate_sql_reference(model, tokenizer, rows, batch_size, max_new_tokens) -> dict[str, float]:
    prompts = [prompt_and_target("sql", row)[0] for row in rows]
    predictions = [extract_sql(t) for t in _greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens)]
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
        if _is_query(row["sql"]):
            n_query += 1
            item["correct_ours"] = int(sql_execution_match(predicted, row["sql"], row["sql_context"])[0])
            ours += item["correct_ours"]
        items.append(item)
    n = len(rows)
    metrics = {"execution_accuracy_set": correct / n, "valid_sql_rate": valid / n, "exact_match": exact / n}
    if n_query:
        metrics["execution_accuracy"] = ours / n_query
    return {**metrics, "n": float(n), "n_write_gold": float(n - n_query)}, items


def _evaluate_mcq_reference(model, tokenizer, rows, batch_size) -> dict[str, float]:
    prompts = [prompt_and_target("mcq", row)[0] for row in rows]
    generations = _greedy_generate(model, tokenizer, prompts, batch_size, MCQ_MAX_NEW_TOKENS)
    answers = [parse_answer(text, [row[f] for f in OPTION_FIELDS]) for text, row in zip(generations, rows)]
    n = len(rows)
    invalid = sum(a is None for a in answers)
    correct = sum(a == row["cop"] for a, row in zip(answers, rows))
    ours, ours_items = _evaluate_mcq(model, tokenizer, rows, batch_size)
    items = [{"id": o["id"], "prediction": None if a is None else OPTION_LETTERS[a], "correct": int(a == row["cop"]),
              "generation": text, "prediction_ours": o["prediction"], "correct_ours": o["correct"]}
             for a, text, row, o in zip(answers, generations, rows, ours_items)]
    return ({"accuracy_generate": correct / n, "invalid_answers": float(invalid), "invalid_rate": invalid / n,
             **ours}, items)


def _fact_prompts(row: dict):
    """(kind, prompt) pairs of one fact record: its rewrite prompt, paraphrases and neighbour prompts."""
    rewrite = row["requested_rewrite"]
    for kind, texts in (("rewrite", [fill_subject(rewrite["prompt"], rewrite["subject"])]),
                        ("paraphrase", row["paraphrase_prompts"]),
                        ("neighborhood", row["neighborhood_prompts"])):
        for text in texts:
            yield kind, text


def _fact_record(identifier, outcomes: dict[str, list[tuple[bool, bool]]], margin: float, suffix: str = "") -> dict:
    """One fact record's per-item fields from its per-prompt outcomes (``outcomes[kind]``: for each
    prompt, whether the new target beat the true one and whether the true one beat the new) and its
    rewrite-prompt margin: efficacy, paraphrase efficacy, neighbourhood specificity (the true answer still
    wins on a never-edited neighbour), the neighbours' flip rate (the new target wins there too) and the
    edit score, efficacy minus that flip rate."""
    def share(kind, which):
        return sum(o[which] for o in outcomes[kind]) / len(outcomes[kind])

    efficacy = share("rewrite", 0)
    flip = share("neighborhood", 0)
    return {"id": identifier, "prediction": "new" if efficacy else "true", "correct": int(efficacy),
            f"paraphrase_efficacy{suffix}": share("paraphrase", 0),
            f"neighborhood_specificity{suffix}": share("neighborhood", 1),
            f"neighbour_flip{suffix}": flip, f"edit_score{suffix}": efficacy - flip, f"margin{suffix}": margin}


def _evaluate_fact_reference(model, tokenizer, rows, batch_size):
    prompts, targets, owners, kinds = [], [], [], []
    for index, row in enumerate(rows):
        rewrite = row["requested_rewrite"]
        for kind, text in _fact_prompts(row):
            for target in (rewrite["target_new"]["str"], rewrite["target_true"]["str"]):
                prompts.append(text)
                targets.append(" " + target)
            owners.append(index)
            kinds.append(kind)
    scores = _target_logprobs(model, tokenizer, prompts, targets, batch_size)
    per_record: dict[int, dict[str, list[tuple[bool, bool]]]] = {i: {"rewrite": [], "paraphrase": [], "neighborhood": []}
                                                     for i in range(len(rows))}
    margins = {}
    for i, (owner, kind) in enumerate(zip(owners, kinds)):
        new, true = scores[2 * i], scores[2 * i + 1]
        per_record[owner][kind].append((full_target_wins(new, true), full_target_wins(true, new)))
        if kind == "rewrite":  # mean log-probability per token, new minus true
            margins[owner] = sum(new) / len(new) - sum(true) / len(true)
    items = [_fact_record(item_id(row, i), per_record[i], margins[i], "_full") for i, row in enumerate(rows)]
    n = len(items)
    metrics = {"efficacy_full": sum(it["correct"] for it in items) / n,
               "paraphrase_efficacy_full": sum(it["paraphrase_efficacy_full"] for it in items) / n,
               "neighborhood_specificity_full": sum(it["neighborhood_specificity_full"] for it in items) / n,
               "n": float(n)}
    distinct = [r for r in rows if _first_token(tokenizer, " " + r["requested_rewrite"]["target_new"]["str"])
                != _first_token(tokenizer, " " + r["requested_rewrite"]["target_true"]["str"])]
    if distinct:  # ours, on the records the first token can tell apart (no warning: counted here)
        first, first_items = _evaluate_fact(model, tokenizer, distinct, batch_size)
        metrics.update({k: first[k] for k in ("efficacy", "paraphrase_efficacy", "neighborhood_specificity")})
        ours = {it["id"]: it for it in first_items}
        for it in items:
            if it["id"] in ours:
                it.update({"correct_ours": ours[it["id"]]["correct"], "edit_score": ours[it["id"]]["edit_score"],
                           "margin": ours[it["id"]]["margin"]})
    metrics["n_first_token"] = float(len(distinct))
    return metrics, items


def _evaluate_mcq(model, tokenizer, rows, batch_size) -> dict[str, float]:
    letters = [_first_token(tokenizer, " " + letter) for letter in OPTION_LETTERS]
    if len(set(letters)) != 4:
        raise ValueError(f"the tokenizer gives the option letters overlapping first tokens {letters}")
    prompts = [prompt_and_target("mcq", row)[0] for row in rows]
    scores = _next_token_logprobs(model, tokenizer, prompts, [letters] * len(rows), batch_size)
    picks = [max(range(4), key=s.__getitem__) for s in scores]
    items = [{"id": item_id(row, position), "prediction": OPTION_LETTERS[pick], "correct": int(pick == row["cop"])}
             for position, (pick, row) in enumerate(zip(picks, rows))]
    return {"accuracy": sum(i["correct"] for i in items) / len(rows), "n": float(len(rows))}, items


def _evaluate_mcq2(model, tokenizer, rows, batch_size):
    """Cloze scoring: the option whose text (then EOS: the whole answer, as trained) has the highest total
    log-probability after the prompt is the prediction."""
    prompts, targets = [], []
    for row in rows:
        prompt = prompt_and_target("mcq2", row)[0]
        for field in OPTION_FIELDS:
            prompts.append(prompt)
            targets.append(" " + row[field].strip())
    scores = [sum(s) for s in _target_logprobs(model, tokenizer, prompts, targets, batch_size, append_eos=True)]
    items = []
    for position, row in enumerate(rows):
        options = scores[4 * position:4 * position + 4]
        pick = max(range(4), key=options.__getitem__)
        items.append({"id": item_id(row, position), "prediction": OPTION_LETTERS[pick],
                      "correct": int(pick == row["cop"]),
                      "margin": options[row["cop"]] - max(s for i, s in enumerate(options) if i != row["cop"])})
    return {"accuracy": sum(i["correct"] for i in items) / len(rows), "n": float(len(rows))}, items


def _evaluate_mcq2_reference(model, tokenizer, rows, batch_size):
    """Greedy generation after "Answer:", parsed by ``parse_answer`` (a letter or an option's text)."""
    prompts = [prompt_and_target("mcq2", row)[0] for row in rows]
    generations = _greedy_generate(model, tokenizer, prompts, batch_size, MCQ_MAX_NEW_TOKENS)
    answers = [parse_answer(text, [row[f] for f in OPTION_FIELDS]) for text, row in zip(generations, rows)]
    ours, ours_items = _evaluate_mcq2(model, tokenizer, rows, batch_size)
    items = [{"id": o["id"], "prediction": None if a is None else OPTION_LETTERS[a], "correct": int(a == row["cop"]),
              "generation": text, "prediction_ours": o["prediction"], "correct_ours": o["correct"]}
             for a, text, row, o in zip(answers, generations, rows, ours_items)]
    n, invalid = len(rows), sum(a is None for a in answers)
    return ({"accuracy_generate": sum(i["correct"] for i in items) / n, "invalid_answers": float(invalid),
             "invalid_rate": invalid / n, **ours}, items)


def _evaluate_fact(model, tokenizer, rows, batch_size):
    prompts, candidates, owners, kinds = [], [], [], []
    kept = []
    for index, row in enumerate(rows):
        rewrite = row["requested_rewrite"]
        pair = [_first_token(tokenizer, " " + rewrite["target_new"]["str"]),
                _first_token(tokenizer, " " + rewrite["target_true"]["str"])]
        if pair[0] == pair[1]:  # the first-token comparison cannot tell them apart
            continue
        kept.append(index)
        for kind, text in _fact_prompts(row):
            prompts.append(text)
            candidates.append(pair)
            owners.append(index)
            kinds.append(kind)
    if len(kept) < len(rows):
        warnings.warn(f"fact: skipped {len(rows) - len(kept)} of {len(rows)} records whose target_new and "
                      f"target_true start with the same token", stacklevel=3)
    if not prompts:
        raise ValueError("fact: no record has target_new and target_true with different first tokens")
    scores = _next_token_logprobs(model, tokenizer, prompts, candidates, batch_size)
    per_record: dict[int, dict[str, list[tuple[bool, bool]]]] = {i: {"rewrite": [], "paraphrase": [], "neighborhood": []}
                                                     for i in kept}
    margins = {}
    for (new, true), owner, kind in zip(scores, owners, kinds):
        per_record[owner][kind].append((new > true, true > new))
        if kind == "rewrite":
            margins[owner] = new - true
    items = [_fact_record(item_id(rows[i], i), per_record[i], margins[i]) for i in kept]
    n = len(items)

    def mean(key):
        return sum(it[key] for it in items) / n

    return {"efficacy": mean("correct"), "paraphrase_efficacy": mean("paraphrase_efficacy"),
            "neighborhood_specificity": mean("neighborhood_specificity"), "edit_score": mean("edit_score"),
            "logprob_margin": mean("margin"), "n": float(n)}, items


# (task, metric variant) -> its scorer; every scorer returns (metrics, items)
_EVALUATORS = {
    ("sql", "ours"): _evaluate_sql, ("sql", "reference"): _evaluate_sql_reference,
    ("sql2", "ours"): _evaluate_sql, ("sql2", "reference"): _evaluate_sql_reference,
    ("fact", "ours"): _evaluate_fact, ("fact", "reference"): _evaluate_fact_reference,
    ("mcq", "ours"): _evaluate_mcq, ("mcq", "reference"): _evaluate_mcq_reference,
    ("mcq2", "ours"): _evaluate_mcq2, ("mcq2", "reference"): _evaluate_mcq2_reference,
}


# ------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molf.lab.tasks", description="MoLF task data and metrics")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evaluate", help="print a model's metrics on a task split as JSON")
    run.add_argument("--task", required=True, choices=TASKS)
    run.add_argument("--model", default="smollm2-135m", help="a name for molf.lab.models.load (default smollm2-135m)")
    run.add_argument("--split", default="test", choices=SPLITS)
    run.add_argument("--source", default="local", choices=SOURCES)
    run.add_argument("--limit", type=int, default=None)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--variant", default="ours", choices=METRIC_VARIANTS,
                     help="ours (default) or the reference implementation's metrics beside ours")
    args = parser.parse_args(argv)

    from . import models

    model, tokenizer = models.load(args.model)
    rows = load(args.task, args.split, source=args.source, limit=args.limit, variant=args.variant)
    metrics = evaluate(args.task, model, tokenizer, rows, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, variant=args.variant)
    print(json.dumps({"task": args.task, "split": args.split, "model": args.model, "variant": args.variant,
                      **metrics}, indent=2))


if __name__ == "__main__":
    main()
