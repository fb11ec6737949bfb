"""What a task is (``Task``, the protocol every task module implements), the registry of tasks, and the
pieces every task shares: checking a choice or a field, item ids, reading JSON-lines files, loading
local and hub rows."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

from .. import paths

SPLITS = ("train", "validation", "test")
SOURCES = ("local", "hub")
METRIC_VARIANTS = ("ours", "reference")


def check_choice(kind: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(map(repr, allowed))}")


class Task:
    """One task: its rows, its prompt, its metrics. A task module subclasses this and fills in

    - ``name`` and ``family`` ("sql", "mcq", "fact", or a new one: tasks of one family share scoring);
    - ``primary_metric`` and ``reference_primary_metric``: the headline metric of each metric variant;
    - ``validate_row(row, where, allow_writes)``: raise ValueError naming ``where`` and the field when a
      row (already known to be a dict) does not have the task's schema;
    - ``prompt_and_target(row)``: the prompt text and the target text (with its leading space);
    - ``evaluate(model, tokenizer, rows, batch_size, max_new_tokens, variant)``: ``(metrics, items)``,
      one JSON-ready item per row with ``id``, ``prediction``, ``correct`` (1/0 on the variant's primary
      metric);
    - for a hub dataset: ``hub_splits`` (our split -> (hub split, keep(position))), ``hub_dataset(hub_split)``
      (the download: ``(rows, where they come from)``), ``convert_hub_row(row)`` (a hub row in our schema)
      and, optionally, ``hub_skip_reason(row, writes)`` (why a converted row is left out, or None).

    ``load`` (local ``data/<name>/<split>.jsonl`` or the hub) is shared. Register an instance with
    ``molf.lab.tasks.register`` (``molf/lab/tasks/__init__.py`` registers the shipped ones).
    """

    name: str
    family: str
    primary_metric: str
    reference_primary_metric: str
    hub_splits: dict | None = None  # None: local data only

    def validate_row(self, row: dict, where: str, allow_writes: bool = False) -> None:
        raise NotImplementedError

    def prompt_and_target(self, row: dict) -> tuple[str, str]:
        raise NotImplementedError

    def evaluate(self, model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int,
                 variant: str) -> tuple[dict, list[dict]]:
        raise NotImplementedError

    def convert_hub_row(self, row: dict) -> dict:
        raise ValueError(f"task {self.name!r} has no hub dataset (local data only)")

    def hub_dataset(self, hub_split: str):
        raise ValueError(f"task {self.name!r} has no hub dataset (local data only)")

    def hub_skip_reason(self, row: dict, writes: bool) -> str | None:
        return None

    def load(self, split: str, source: str, limit: int | None, writes: bool) -> list[dict]:
        """Rows of ``split`` from ``source`` ("local" or "hub"), at most ``limit``, each validated;
        ``writes``: keep rows whose gold may change a database (the reference metric variant)."""
        if source == "local":
            return load_local(self, split, limit, writes)
        return load_hub(self, split, limit, writes)


# --------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to the registry (``tasks.TASKS`` and every table derived from it follow)."""
    for attribute in ("name", "family", "primary_metric", "reference_primary_metric"):
        if not isinstance(getattr(task, attribute, None), str) or not getattr(task, attribute):
            raise ValueError(f"a task needs a non-empty string {attribute!r}; {task!r} has "
                             f"{getattr(task, attribute, None)!r}")
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove task ``name`` from the registry."""
    check_choice("task", name, tuple(_REGISTRY))
    del _REGISTRY[name]


def get(name: str) -> Task:
    """The registered task ``name``; ValueError naming the registered ones otherwise."""
    check_choice("task", name, tuple(_REGISTRY))
    return _REGISTRY[name]


def registered() -> tuple[Task, ...]:
    """Every registered task, in registration order."""
    return tuple(_REGISTRY.values())


# ------------------------------------------------------------------------------------- rows, ids

def field(row: dict, path: str, kind: type, where: str, allow_empty: bool = False):
    """``row[a][b]...`` for ``path = "a.b"``, checked to be of ``kind`` (a str non-blank unless
    ``allow_empty``); ValueError naming ``where`` and the field."""
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where}: missing field {path!r}")
        value = value[part]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}: field {path!r} must be {kind.__name__}, got "
                         f"{type(value).__name__} {value!r:.80}")
    if kind is str and not allow_empty and not value.strip():
        raise ValueError(f"{where}: field {path!r} is empty")
    return value


def hub_field(task: str, row: dict, key: str):
    """``row[key]`` of a hub row of ``task``; ValueError naming the missing field otherwise."""
    if key not in row:
        raise ValueError(f"{task} hub row is missing field {key!r}; it has {sorted(row)}")
    return row[key]


def item_id(row: dict, position: int):
    """The id a per-item record carries: the row's ``id``, else its ``case_id``, else its position."""
    for key in ("id", "case_id"):
        if row.get(key) is not None:
            return row[key]
    return position


def data_dir() -> Path:
    """The shipped data folder (``molf.lab.paths.data_dir``: ``$MOLF_DATA``, else the checkout's ``data/``)."""
    return paths.data_dir()


def read_jsonl(path: Path, validate, limit: int | None = None) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped, at most ``limit``), each passed to
    ``validate(row, where)`` first, ``where`` being "<path> line <n>" for its error messages. A line
    that is not UTF-8 or not JSON raises ValueError naming the file and the line."""
    rows = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            where = f"{path} line {line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not valid UTF-8 ({error})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            validate(row, where)
            rows.append(row)
    return rows


def validate_row(task: Task, row, where: str, allow_writes: bool = False) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    task.validate_row(row, where, allow_writes)


def load_local(task: Task, split: str, limit: int | None, writes: bool) -> list[dict]:
    """``data/<task>/<split>.jsonl``: every row validated; a repeated item id (``id`` or ``case_id``)
    raises ValueError naming the file, the line and the id."""
    path = data_dir() / task.name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python data/generate.py` or set MOLF_DATA")
    first_seen: dict = {}

    def validate(row, where):
        validate_row(task, row, where, allow_writes=writes)
        identifier = item_id(row, None)
        if identifier is not None:
            key = (type(identifier).__name__, json.dumps(identifier, sort_keys=True))
            if key in first_seen:
                raise ValueError(f"{where}: duplicate item id {identifier!r} (first on line {first_seen[key]}); "
                                 f"every row of a task file needs its own id")
            first_seen[key] = where.rsplit(" ", 1)[1]

    return read_jsonl(path, validate, limit)


def load_hub(task: Task, split: str, limit: int | None, writes: bool) -> list[dict]:
    """Hub rows of our ``split`` (see ``Task.hub_splits``), converted, filtered (``hub_skip_reason``)
    and validated; a skipped row is counted in one warning."""
    hub_split, keep = task.hub_splits[split]
    dataset, source = task.hub_dataset(hub_split)
    label = f"{source} split {hub_split!r}"
    rows, skipped = [], Counter()
    for index, hub_row in enumerate(dataset):
        if limit is not None and len(rows) >= limit:
            break
        if not keep(index):
            continue
        where = f"{label} row {index}"
        try:
            row = task.convert_hub_row(dict(hub_row))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        reason = task.hub_skip_reason(row, writes)
        if reason:
            skipped[reason] += 1
            continue
        validate_row(task, row, where, allow_writes=writes)
        rows.append(row)
    if skipped:
        warnings.warn(f"{label}: skipped " + ", ".join(f"{n} rows ({why})" for why, n in skipped.items()),
                      stacklevel=4)
    return rows
