"""The SQL sandbox (molf.lab.tasks.sandbox): every statement, whatever its source (a data row's
sql_context, a gold query, a model's prediction, under either metric variant), is refused or cut short
when it would touch a file, change the connection, load code, run without end, or grow memory; a hostile
prediction scores 0. Nothing here relies on wall-clock asserts: the step budget ends every query."""
from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from molf.lab import tasks
from molf.lab.tasks import sandbox

REPO = Path(__file__).resolve().parent.parent
CONTEXT = ("CREATE TABLE employees (id INT, name TEXT, department TEXT, salary INT); "
           "INSERT INTO employees (id, name, department, salary) VALUES "
           "(1, 'Ann', 'Sales', 50000), (2, 'Bo', 'Legal', 70000), (3, 'Cy', 'Sales', 65000.5);")
GOLD = "SELECT name FROM employees WHERE department = 'Sales'"
DENIED = "not authorized|authorization denied"
RECURSE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c{limit}) "

# name -> (statement, what its error says where writes are allowed, what it says in a context
# (None: a context may run it harmlessly, its rows never reach Python)); {tmp} is the test's folder.
ATTACKS = {
    "attach": ("ATTACH DATABASE '{tmp}/attached.db' AS x", DENIED, DENIED),
    "vacuum into": ("VACUUM INTO '{tmp}/vacuumed.db'", DENIED, DENIED),
    "pragma write": ("PRAGMA user_version = 3", DENIED, DENIED),
    "pragma journal to a file": ("PRAGMA temp_store_directory = '{tmp}'", DENIED, DENIED),
    "pragma table function": ("SELECT * FROM pragma_table_info('employees')", DENIED, DENIED),
    "load_extension": ("SELECT load_extension('{tmp}/evil.so')", DENIED, DENIED),
    "fts3_tokenizer": ("SELECT fts3_tokenizer('simple')", DENIED, DENIED),
    "virtual table": ("CREATE VIRTUAL TABLE v USING fts5(x)", DENIED, DENIED),
    "zeroblob": ("SELECT hex(zeroblob(300000000))", "too big", "too big"),
    "long string": ("SELECT length(hex(zeroblob(60000)))", "too big", "too big"),
    "recursive cte": (RECURSE.format(limit="") + "SELECT COUNT(*) FROM c", "interrupted", "interrupted"),
    "recursive union": ("WITH RECURSIVE c(x) AS (SELECT 1 UNION SELECT x + 1 FROM c) SELECT MAX(x) FROM c",
                        "interrupted", "interrupted"),
    "cross join": ("SELECT COUNT(*) FROM " + ", ".join(f"employees e{i}" for i in range(14)), "interrupted",
                   "interrupted"),
    "many rows": (RECURSE.format(limit=" LIMIT 50000") + "SELECT x FROM c", "more than 10000 rows", None),
    "many bytes": (RECURSE.format(limit=" LIMIT 1000") + "SELECT printf('%.*c', 50000, 'x') FROM c",
                   "bytes", None),
    "compound select": (" UNION ALL ".join(["SELECT 1"] * 30), "too many terms", "too many terms"),
    "table growth": ("CREATE TABLE big AS " + RECURSE.format(limit=" LIMIT 2000")
                     + "SELECT printf('%.*c', 90000, 'x') AS b FROM c", "full|interrupted", "full|interrupted"),
    "temp table growth": ("CREATE TEMP TABLE big AS " + RECURSE.format(limit=" LIMIT 2000")
                          + "SELECT printf('%.*c', 90000, 'x') AS b FROM c", "full|interrupted", "full|interrupted"),
    "recursive trigger": ("CREATE TRIGGER t AFTER INSERT ON employees BEGIN INSERT INTO employees "
                          "SELECT * FROM employees; END", None, None),  # harmless alone: see the test below
}
ENTRIES = ("context", "gold ours", "gold reference", "prediction ours", "prediction reference")


@pytest.fixture
def small_budget(monkeypatch):
    """A tenth of the step budget, so that the sweep stays quick (the real one: test_the_real_budget_...)."""
    monkeypatch.setattr(sandbox, "MAX_PROGRESS_CALLS", 2000)


def is_write(statement: str) -> bool:
    return not statement.lstrip().upper().startswith(("SELECT", "WITH"))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("attack", [a for a in ATTACKS if ATTACKS[a][1]])
def test_every_attack_fails_through_every_entry_and_touches_no_file(tmp_path, small_budget, attack, entry):
    template, message, in_context = ATTACKS[attack]
    statement = template.format(tmp=tmp_path)
    if entry.endswith("ours") and is_write(statement):
        message = DENIED  # ours runs read-only
    if entry == "context":
        row = {"sql_prompt": "Who is in Sales?", "sql_context": f"{CONTEXT} {statement};", "sql": GOLD}
        if in_context is None:
            tasks.validate_row("sql", row, "row 1", allow_writes=True)
        else:
            with pytest.raises(ValueError, match=rf"row 1: field 'sql_context': sql_context fails in sqlite: .*({in_context})"):
                tasks.validate_row("sql", row, "row 1", allow_writes=True)
    elif entry.startswith("gold"):
        match = tasks.sql_execution_match if entry == "gold ours" else tasks.sql_execution_match_reference
        with pytest.raises(ValueError, match=rf"gold (query|statement) .* fails on its context: .*({message})"):
            match(GOLD, statement, CONTEXT)
    else:
        match = tasks.sql_execution_match if entry == "prediction ours" else tasks.sql_execution_match_reference
        score, error = match(statement, GOLD, CONTEXT)
        assert score == 0.0 and error is not None, (score, error)
        assert any(part in error for part in message.split("|")), error
    assert list(tmp_path.iterdir()) == []  # no file created: attached.db, vacuumed.db, ...


def test_a_trigger_does_not_recurse_and_cannot_be_made_to(small_budget):
    trigger = ATTACKS["recursive trigger"][0]
    with sandbox.Sandbox(CONTEXT + trigger + ";", writes=True) as box:
        with pytest.raises(sqlite3.Error, match="not authorized"):
            box.run("PRAGMA recursive_triggers = ON")
        box.run("INSERT INTO employees VALUES (4, 'Di', 'Legal', 1)")
        assert box.run("SELECT COUNT(*) FROM employees") == [(8,)]  # 3 + 1, then the trigger's copy once


def test_the_real_budget_ends_a_recursive_view_read_after_a_prediction(tmp_path):
    """The reference variant reads every table and view after a prediction ran: a view that recurses
    without end is cut by the budget (with the real limits) instead of hanging, and scores 0."""
    view = "CREATE VIEW v AS " + RECURSE.format(limit="") + "SELECT COUNT(*) AS n FROM c"
    gold = "UPDATE employees SET salary = 0 WHERE department = 'Legal'"
    score, error = tasks.sql_execution_match_reference(view, gold, CONTEXT)
    assert score == 0.0 and "interrupted" in error, error
    rows = "CREATE VIEW v AS " + RECURSE.format(limit="") + "SELECT x FROM c"  # endless rows: the row cap
    score, error = tasks.sql_execution_match_reference(rows, gold, CONTEXT)
    assert score == 0.0 and "more than 10000 rows" in error, error
    # the same view in a data row's context: the row loads (the view is never read there), and the
    # reference variant's gold run then stops with a clear error rather than hanging
    row = {"id": 1, "sql_prompt": "Zero Legal pay", "sql_context": f"{CONTEXT} {view};", "sql": gold}
    path = tmp_path / "sql" / "test.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(row) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOLF_DATA", str(tmp_path))
        (loaded,) = tasks.load("sql", "test", variant="reference")
    with pytest.raises(ValueError, match="gold statement .* interrupted"):
        tasks.sql_execution_match_reference(gold, loaded["sql"], loaded["sql_context"])


def test_attach_in_a_data_row_creates_no_file_when_the_task_loads(tmp_path, monkeypatch):
    target = tmp_path / "created.db"
    row = {"id": 1, "sql_prompt": "Who?", "sql_context": f"ATTACH DATABASE '{target}' AS x; {CONTEXT}", "sql": GOLD}
    path = tmp_path / "sql" / "train.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(row) + "\n")
    monkeypatch.setenv("MOLF_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=rf"{path} line 1: field 'sql_context': .*not authorized"):
        tasks.load("sql", "train")
    assert not target.exists()


def test_an_instruction_too_slow_for_the_step_count_is_cut_by_the_deadline(monkeypatch):
    """``instr`` on two long strings is one instruction costing millions of comparisons: the step
    count alone would let a query of them run for hours; the deadline ends it."""
    monkeypatch.setattr(sandbox, "MAX_SECONDS", 0.2)
    slow = (RECURSE.format(limit="") + "SELECT SUM(instr(printf('%.*c', 90000, 'a'), "
            "printf('%.*c', 45000, 'a') || 'b')) FROM c")
    score, error = tasks.sql_execution_match(slow, GOLD, CONTEXT)
    assert score == 0.0 and "interrupted" in error, error


def test_sandbox_caps_and_guards_are_in_place_and_legit_statements_still_run():
    with sandbox.Sandbox(CONTEXT) as box:
        limits = {limit: box.connection.getlimit(limit) for limit in sandbox.LIMITS}
        assert limits == sandbox.LIMITS
        assert box.run(GOLD) == [("Ann",), ("Cy",)]
        assert box.connection.in_transaction is False
    with sqlite3.connect(":memory:") as other:  # the process-wide heap cap is set
        assert 0 < other.execute("PRAGMA hard_heap_limit").fetchone()[0] <= sandbox.HEAP_LIMIT_BYTES
    with sandbox.Sandbox(CONTEXT, writes=True) as box:
        assert box.run("UPDATE employees SET salary = 1 WHERE id = 2") == []
        assert box.contents()["employees"][1][1] == (2, "Bo", "Legal", 1)
    with pytest.raises(sqlite3.Error, match="not authorized"), sandbox.Sandbox(CONTEXT) as box:
        box.run("DELETE FROM employees")
    # exactly at the caps is fine, one over is not
    with sandbox.Sandbox("") as box:
        assert len(box.run(RECURSE.format(limit=f" LIMIT {sandbox.MAX_ROWS}") + "SELECT x FROM c")) == sandbox.MAX_ROWS
        with pytest.raises(sandbox.SandboxLimitError, match="rows"):
            box.run(RECURSE.format(limit=f" LIMIT {sandbox.MAX_ROWS + 1}") + "SELECT x FROM c")


MEMORY_PROBE = """
import importlib.util, re, sqlite3, sys
def peak_kb():  # the high-water mark of this process's resident memory (Linux: VmHWM, reset by exec)
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
before = peak_kb()
errors = []
for query in sys.argv[2:]:
    try:
        sandbox.run("CREATE TABLE t (a INT);", query)
        errors.append(None)
    except sqlite3.Error as error:
        errors.append(str(error))
print(before, peak_kb(), errors)
"""


def test_memory_attacks_stay_under_the_caps_in_a_fresh_process():
    """In a process of its own (so the peak is the attacks'): 2.5 GB by a 38-character query before the
    sandbox, and a sort that keeps every row of an endless recursion; the peak grows by less than the
    heap cap plus a margin."""
    attacks = ["SELECT hex(zeroblob(300000000))",
               RECURSE.format(limit="") + "SELECT x, printf('%.*c', 90000, 'x') AS b FROM c ORDER BY b DESC, x "
               "LIMIT -1 OFFSET 10"]
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(Path(sandbox.__file__)), *attacks],
                          capture_output=True, text=True, check=True)
    before_kb, peak_kb, errors = done.stdout.split(" ", 2)
    assert "too big" in errors and "out of memory" in errors and "None" not in errors, errors
    assert (int(peak_kb) - int(before_kb)) * 1024 < sandbox.HEAP_LIMIT_BYTES + 64 * 2**20, (before_kb, peak_kb)


def test_the_sandbox_module_needs_nothing_but_the_standard_library():
    spec = importlib.util.spec_from_file_location("standalone_sandbox", Path(sandbox.__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.run(CONTEXT, GOLD) == [("Ann",), ("Cy",)]
