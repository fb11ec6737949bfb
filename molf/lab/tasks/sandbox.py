"""The one place where SQL runs: a sandbox for statements nobody vouches for.

Every statement the tasks execute goes through here, whatever its source: a data row's ``sql_context``
(local files or a hub), a gold query, a model's prediction. A sandbox is one fresh in-memory sqlite
database with

- an authorizer: never ATTACH or DETACH (nor ``VACUUM INTO``, which attaches), no PRAGMA (nor the
  ``pragma_*`` table functions), no virtual tables, no ``load_extension`` or ``fts3_tokenizer``; in
  read-only mode (``writes=False``) only SELECT, reads, functions and recursive CTEs;
- sqlite's own limits (``Connection.setlimit``, ``LIMITS``): a value or row at most 100 kB, a
  statement at most 1 MB, 100 columns, 20 compound SELECT terms, no attached database, ...;
- a database of at most ``MAX_PAGES`` pages, temporary tables and sorts in memory (never a file), and
  the process's SQLite heap capped at ``HEAP_LIMIT_BYTES`` (``PRAGMA hard_heap_limit``: process-wide,
  and SQLite can only lower it, so it stays for the life of the process);
- a step budget per phase (building the context, running one statement and reading its result,
  reading the database's contents): the progress handler aborts the phase after
  ``MAX_PROGRESS_CALLS`` callbacks of ``PROGRESS_STEP`` virtual-machine instructions each, or once
  ``MAX_SECONDS`` have passed (a backstop for the few instructions whose cost is not proportional to
  their count, such as ``instr`` on two long strings);
- a cap on what a result brings into Python: at most ``MAX_ROWS`` rows and ``MAX_RESULT_BYTES`` bytes.

Anything that breaks a rule raises ``sqlite3.Error`` (``SandboxLimitError`` for the row and byte caps,
an ``OperationalError`` "interrupted" for the budget, "not authorized" for the authorizer, a
``MemoryError`` from the heap cap becomes ``SandboxLimitError`` too), so callers score it as a failed
statement. docs/sandbox.md lists the guarantees and the tests that check them.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

PROGRESS_STEP = 1000          # virtual-machine instructions between two progress callbacks
MAX_PROGRESS_CALLS = 20_000   # callbacks per phase: about 20 million instructions
MAX_SECONDS = 30.0            # wall-clock backstop per phase
MAX_ROWS = 10_000             # rows one result may bring into Python
MAX_RESULT_BYTES = 10_000_000  # bytes of text, blobs and numbers (8 each) one result may bring into Python
MAX_PAGES = 4096              # pages of the database (and of its temporary one): 16 MiB at 4 kiB a page
HEAP_LIMIT_BYTES = 256 * 2**20
LIMITS = {
    sqlite3.SQLITE_LIMIT_LENGTH: 100_000,            # bytes in one string, blob or row
    sqlite3.SQLITE_LIMIT_SQL_LENGTH: 1_000_000,      # bytes in one statement (executescript: the whole script)
    sqlite3.SQLITE_LIMIT_COLUMN: 100,                # columns of a table, a result, an index, a GROUP BY
    sqlite3.SQLITE_LIMIT_EXPR_DEPTH: 200,
    sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: 20,        # terms of a UNION / INTERSECT / EXCEPT chain
    sqlite3.SQLITE_LIMIT_VDBE_OP: 100_000,           # instructions of one compiled statement
    sqlite3.SQLITE_LIMIT_FUNCTION_ARG: 32,
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
    sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: 1000,
    sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER: 100,
    sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH: 10,
    sqlite3.SQLITE_LIMIT_WORKER_THREADS: 0,
}
READ_ONLY_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                     getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
# Denied even where writes are allowed: touching files, changing the connection, foreign code.
ALWAYS_DENIED_ACTIONS = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA,
                         sqlite3.SQLITE_CREATE_VTABLE, sqlite3.SQLITE_DROP_VTABLE}
DENIED_FUNCTIONS = {"load_extension", "fts3_tokenizer"}


class SandboxLimitError(sqlite3.OperationalError):
    """A statement went over one of the sandbox's caps (rows, bytes, memory)."""


def _authorizer(writes: bool):
    def authorize(action, argument1, argument2, *_):
        if action in ALWAYS_DENIED_ACTIONS:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and (argument2 or "").lower() in DENIED_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        if not writes and action not in READ_ONLY_ACTIONS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK
    return authorize


class Sandbox:
    """One fresh in-memory database built from ``sql_context``; ``writes=False``: the statements run on it
    may only read. Use as a context manager (``with Sandbox(context) as box: box.run(query)``)."""

    def __init__(self, sql_context: str, writes: bool = False):
        self.connection = sqlite3.connect(":memory:")
        try:
            for pragma in (f"hard_heap_limit = {HEAP_LIMIT_BYTES}", "temp_store = MEMORY",
                           f"main.max_page_count = {MAX_PAGES}", f"temp.max_page_count = {MAX_PAGES}"):
                self.connection.execute(f"PRAGMA {pragma}")  # ours, before the authorizer forbids them
            for limit, value in LIMITS.items():
                self.connection.setlimit(limit, value)
            self.connection.set_authorizer(_authorizer(writes=True))  # the context creates and inserts
            with self._budget():
                self.connection.executescript(sql_context)
            self.connection.set_authorizer(_authorizer(writes))
        except BaseException:
            self.connection.close()
            raise

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def _budget(self) -> Iterator[None]:
        """One phase's step budget and deadline; a MemoryError (the heap cap) becomes a sandbox error."""
        calls, deadline = 0, time.monotonic() + MAX_SECONDS

        def progress():
            nonlocal calls
            calls += 1
            return calls > MAX_PROGRESS_CALLS or time.monotonic() > deadline  # non-zero aborts

        self.connection.set_progress_handler(progress, PROGRESS_STEP)
        try:
            yield
        except MemoryError:
            raise SandboxLimitError(f"out of memory (the SQLite heap is capped at {HEAP_LIMIT_BYTES} bytes)") from None
        finally:
            self.connection.set_progress_handler(None, 0)

    def _fetch(self, cursor: sqlite3.Cursor, taken: list[int] | None = None) -> list[tuple]:
        """All rows of ``cursor``, counting them and their bytes into ``taken`` ([rows, bytes] so far)
        against the caps."""
        taken = [0, 0] if taken is None else taken
        rows = []
        while batch := cursor.fetchmany(256):
            rows += batch
            taken[0] += len(batch)
            taken[1] += sum(len(v) if isinstance(v, (str, bytes)) else 8 for row in batch for v in row)
            if taken[0] > MAX_ROWS:
                raise SandboxLimitError(f"the result has more than {MAX_ROWS} rows")
            if taken[1] > MAX_RESULT_BYTES:
                raise SandboxLimitError(f"the result holds more than {MAX_RESULT_BYTES} bytes")
        return rows

    def run(self, statement: str) -> list[tuple]:
        """The result rows of one statement ([] when it returns none), within one step budget."""
        with self._budget():
            return self._fetch(self.connection.execute(statement))

    def contents(self) -> dict[str, tuple[tuple[str, ...], list[tuple]]]:
        """Every table and view (sqlite's own left out), by name: (column names, rows of ``SELECT *``),
        all read within one step budget and one row and byte cap."""
        taken = [0, 0]
        with self._budget():
            names = [r[0] for r in self.connection.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' "
                "ORDER BY name")]
            tables = {}
            for name in names:
                quoted = name.replace('"', '""')
                cursor = self.connection.execute(f'SELECT * FROM "{quoted}"')
                tables[name] = (tuple(d[0] for d in cursor.description), self._fetch(cursor, taken))
            return tables


def run(sql_context: str, statement: str) -> list[tuple]:
    """Rows of ``statement`` in a fresh read-only sandbox built from ``sql_context``."""
    with Sandbox(sql_context) as box:
        return box.run(statement)
