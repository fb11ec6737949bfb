"""molf.lab.tasks: shipped data, validation, hub row conversion, encode/collate and every metric on cases
whose right answer is known."""
from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from molf.lab import models, tasks

REPO = Path(__file__).resolve().parent.parent
SIZES = {"sql": (1000, 100, 100), "mcq": (1000, 100, 100), "fact": (182, 19, 37), "mcq2": (800, 100, 200),
         "sql2": (1000, 100, 400)}

CONTEXT = ("CREATE TABLE employees (id INT, name TEXT, department TEXT, salary INT); "
           "INSERT INTO employees (id, name, department, salary) VALUES "
           "(1, 'Ann', 'Sales', 50000), (2, 'Bo', 'Legal', 70000), (3, 'Cy', 'Sales', 65000.5);")
GOLD = "SELECT name FROM employees WHERE department = 'Sales';"


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny")


def generate_module():
    """data/generate.py as a module (it is a script, not part of the package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("generate", REPO / "data" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return generate


def write_rows(folder: Path, task: str, split: str, rows: list) -> Path:
    path = folder / task / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ shipped data

def test_every_task_and_split_loads_with_the_documented_sizes():
    for task, sizes in SIZES.items():
        assert tuple(len(tasks.load(task, split)) for split in tasks.SPLITS) == sizes, task
    assert set(tasks.PRIMARY_METRIC) == set(tasks.TASKS)
    assert tasks.load("sql", "train", limit=3) == tasks.load("sql", "train")[:3]
    assert tasks.load("mcq", "test", limit=0) == []


def test_generator_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(REPO / "data" / "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for task in tasks.TASKS:
        for split in tasks.SPLITS:
            shipped, fresh = REPO / "data" / task / f"{split}.jsonl", tmp_path / task / f"{split}.jsonl"
            assert filecmp.cmp(shipped, fresh, shallow=False), f"{shipped} differs from a fresh generation"


def test_sql_data_has_distinct_questions_several_schemas_all_shapes_and_runnable_gold(tokenizer):
    splits = {split: tasks.load("sql", split) for split in tasks.SPLITS}
    questions = [r["sql_prompt"] for rows in splits.values() for r in rows]
    assert len(questions) == len(set(questions))
    train = splits["train"]
    assert len({r["domain"] for r in train}) >= 4
    assert len({r["sql_complexity"] for r in train}) == 13
    gold = " ".join(r["sql"] for r in train)
    for clause in ("WHERE", "COUNT(", "AVG(", "GROUP BY", "ORDER BY", "LIMIT", "JOIN"):
        assert clause in gold, clause
    for row in splits["test"]:
        rows = tasks.sandbox.run(row["sql_context"], row["sql"])
        assert rows and all(v is not None for r in rows for v in r), row["sql"]
    # every prompt + target fits the default max_len, so encode never has to cut a schema
    features = tasks.encode("sql", [r for rows in splits.values() for r in rows], tokenizer, max_len=10_000)
    assert max(len(f["input_ids"]) for f in features) <= 256


def _schema_words(row: dict) -> set[str]:
    """The table and column names and the quoted values of a row's context."""
    import re
    context = row["sql_context"]
    names = set(re.findall(r"CREATE TABLE (\w+)", context))
    for columns in re.findall(r"CREATE TABLE \w+ \(([^)]*)\)", context):
        names |= {c.split()[0] for c in columns.split(",")}
    return (names - {"id"}) | set(re.findall(r"'([^']*)'", context))


def test_sql2_tests_schemas_that_train_never_shows():
    splits = {split: tasks.load("sql2", split) for split in tasks.SPLITS}
    domains = {split: {r["domain"] for r in rows} for split, rows in splits.items()}
    assert len(domains["train"]) >= 8 and len(domains["validation"]) == 2 and len(domains["test"]) == 4
    assert not domains["train"] & (domains["validation"] | domains["test"]) and not domains["validation"] & domains["test"]
    seen = {split: set().union(*map(_schema_words, rows)) for split, rows in splits.items()}
    # no table, column or value of a held-out schema appears in train, but for the generic column
    # "name" and people's names (first names drawn from one list)
    first_names = set(generate_module().FIRST_NAMES)
    for held_out in ("validation", "test"):
        shared = {w for w in seen[held_out] & seen["train"] if w != "name" and w.split()[0] not in first_names}
        assert not shared, (held_out, sorted(shared)[:10])
    for split, rows in splits.items():  # every shape in every split, distinct questions, runnable gold
        assert len({r["sql_complexity"] for r in rows}) == 13, split
        assert len({r["sql_prompt"] for r in rows}) == len(rows), split
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids))
    for row in splits["test"]:
        rows = tasks.sandbox.run(row["sql_context"], row["sql"])
        assert rows and all(v is not None for r in rows for v in r), row["sql"]


def test_sql2_rules_stay_near_zero_on_test():
    from molf.lab import heuristics
    test = tasks.load("sql2", "test")
    scored = heuristics.correct("sql2", test, tasks.load("sql2", "train"))
    assert set(scored) == set(heuristics.sql_rules())
    assert all(sum(items.values()) <= 0.05 * len(test) for items in scored.values()), {
        name: sum(items.values()) for name, items in scored.items()}


def test_mcq_answers_are_balanced_over_the_letters_in_every_split():
    seen = set()
    for split in tasks.SPLITS:
        rows = tasks.load("mcq", split)
        counts = Counter(r["cop"] for r in rows)
        assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1, counts
        for r in rows:
            assert len({r[f] for f in tasks.OPTION_FIELDS}) == 4
            assert r["question"] not in seen
            seen.add(r["question"])


def test_fact_records_follow_the_knowledge_injection_protocol(tokenizer):
    train = tasks.load("fact", "train")
    by_id = {r["case_id"]: r for r in train}
    for split, rule in (("test", lambda i: i % 5 == 0), ("validation", lambda i: i % 10 == 1)):
        rows = tasks.load("fact", split)
        assert [r["case_id"] for r in rows] == [i for i in sorted(by_id) if rule(i)]
        assert all(by_id[r["case_id"]] == r for r in rows)  # evaluated facts are trained facts
    rewritten = {tasks.fill_subject(r["requested_rewrite"]["prompt"], r["requested_rewrite"]["subject"])
                 for r in train}
    for r in train:
        rewrite = r["requested_rewrite"]
        assert len(r["paraphrase_prompts"]) == 2 and 2 <= len(r["neighborhood_prompts"]) <= 3
        assert not rewritten & set(r["neighborhood_prompts"])  # neighbours are never rewritten
        new = tasks._first_token(tokenizer, " " + rewrite["target_new"]["str"])
        true = tasks._first_token(tokenizer, " " + rewrite["target_true"]["str"])
        assert new != true, rewrite


# ------------------------------------------------------------------------------------- validation

def test_bad_task_split_source_and_limit_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown task 'code'.*'sql', 'fact', 'mcq'"):
        tasks.load("code", "train")
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*'train', 'validation', 'test'"):
        tasks.load("sql", "dev")
    with pytest.raises(ValueError, match=r"unknown source 'web'.*'local', 'hub'"):
        tasks.load("sql", "train", source="web")
    with pytest.raises(ValueError, match="limit"):
        tasks.load("sql", "train", limit=-1)


SQL_ROW = {"sql_prompt": "Who is in Sales?", "sql_context": CONTEXT, "sql": GOLD}
MCQ_ROW = {"question": "2 + 2?", "opa": "3", "opb": "4", "opc": "5", "opd": "6", "cop": 1}
FACT_ROW = {"case_id": 0,
            "requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                                  "target_true": {"str": "Paris"}, "target_new": {"str": "Rome"}},
            "paraphrase_prompts": ["France's capital is"], "neighborhood_prompts": ["Paris is a city in"]}


def broken(row: dict, path: str, value=...) -> dict:
    """A deep copy of ``row`` with field ``path`` ("a.b") set to ``value`` or removed."""
    row = json.loads(json.dumps(row))
    *parents, last = path.split(".")
    target = row
    for part in parents:
        target = target[part]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return row


@pytest.mark.parametrize("task, row, field, message", [
    ("sql", broken(SQL_ROW, "sql"), "'sql'", "missing field"),
    ("sql", broken(SQL_ROW, "sql_context", "CREATE TABLE t (a INT; INSERT INTO t"), "'sql_context'", "sqlite"),
    ("sql", broken(SQL_ROW, "sql", "SELECT nope FROM employees;"), "'sql'", "no such column"),
    ("sql", broken(SQL_ROW, "sql_prompt", 7), "'sql_prompt'", "must be str"),
    ("sql", broken(SQL_ROW, "sql", "DELETE FROM employees;"), "'sql'", "must be a query"),
    ("mcq", broken(MCQ_ROW, "cop", 4), "'cop'", "0..3"),
    ("mcq", broken(MCQ_ROW, "cop", "1"), "'cop'", "must be int"),
    ("mcq", broken(MCQ_ROW, "opc"), "'opc'", "missing field"),
    ("fact", broken(FACT_ROW, "requested_rewrite.target_new"), "'requested_rewrite.target_new.str'",
     "missing field"),
    ("fact", broken(FACT_ROW, "requested_rewrite.prompt", "The capital of France is"),
     "'requested_rewrite.prompt'", "subject"),
    ("fact", broken(FACT_ROW, "neighborhood_prompts", []), "'neighborhood_prompts'", "non-empty list"),
])
def test_a_malformed_row_names_file_line_and_field(tmp_path, monkeypatch, task, row, field, message):
    good = {"sql": SQL_ROW, "mcq": MCQ_ROW, "fact": FACT_ROW}[task]
    key = "case_id" if task == "fact" else "id"
    path = write_rows(tmp_path, task, "train", [{**good, key: 1}, {**good, key: 2}, row])
    monkeypatch.setenv("MOLF_DATA", str(tmp_path))
    assert len(tasks.load(task, "train", limit=2)) == 2  # the good rows load from the overridden folder
    with pytest.raises(ValueError) as caught:
        tasks.load(task, "train")
    text = str(caught.value)
    assert str(path) in text and "line 3" in text and field in text and message in text, text


def test_invalid_json_names_file_and_line(tmp_path, monkeypatch):
    path = write_rows(tmp_path, "mcq", "test", [MCQ_ROW, "{not json"])
    monkeypatch.setenv("MOLF_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=rf"{path} line 2: not valid JSON"):
        tasks.load("mcq", "test")


@pytest.mark.parametrize("bad", [b"\xff\xfe", "é".encode("latin-1"), b"\xe2\x82"])  # truncated UTF-8 too
def test_invalid_utf8_names_file_and_line(tmp_path, monkeypatch, bad):
    path = write_rows(tmp_path, "mcq", "test", [MCQ_ROW, {**MCQ_ROW, "question": "PLACEHOLDER"}, MCQ_ROW])
    path.write_bytes(path.read_bytes().replace(b"PLACEHOLDER", b"what " + bad + b"?"))
    monkeypatch.setenv("MOLF_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=rf"{path} line 2: not valid UTF-8"):
        tasks.load("mcq", "test")
    assert len(tasks.load("mcq", "test", limit=1)) == 1  # the lines before it still read


@pytest.mark.parametrize("task, first, again", [
    ("mcq", {**MCQ_ROW, "id": "q1"}, {**MCQ_ROW, "id": "q1"}),
    ("sql", {**SQL_ROW, "id": 7}, {**SQL_ROW, "id": 7, "sql_prompt": "Another question?"}),
    ("fact", FACT_ROW, {**FACT_ROW, "paraphrase_prompts": ["Another prompt"]}),  # both case_id 0
])
def test_a_repeated_item_id_in_a_task_file_is_refused_naming_file_line_and_id(tmp_path, monkeypatch, task, first,
                                                                               again):
    key = "case_id" if task == "fact" else "id"
    other = {**first, key: first[key] + 1 if isinstance(first[key], int) else first[key] + "x"}
    path = write_rows(tmp_path, task, "train", [first, other, again])
    monkeypatch.setenv("MOLF_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=rf"{path} line 3: duplicate item id {first[key]!r} \(first on line 1\)"):
        tasks.load(task, "train")
    assert len(tasks.load(task, "train", limit=2)) == 2
    # ids of another type are other ids: 1 and "1" may both be in a file
    write_rows(tmp_path, "mcq", "test", [{**MCQ_ROW, "id": 1}, {**MCQ_ROW, "id": "1"}])
    assert len(tasks.load("mcq", "test")) == 2


def test_every_shipped_task_file_has_unique_item_ids():
    for task in tasks.TASKS:
        for split in tasks.SPLITS:
            ids = [tasks.item_id(row, None) for row in tasks.load(task, split)]
            assert None not in ids and len(set(ids)) == len(ids), (task, split)


# --------------------------------------------------------------------------------------- hub rows

GRETEL_ROW = {"id": 5097, "domain": "forestry", "domain_description": "Comprehensive data on forests.",
              "sql_complexity": "single join", "sql_complexity_description": "only one join (specify inner, outer, cross)",
              "sql_task_type": "analytics and reporting", "sql_task_type_description": "generating reports",
              "sql_prompt": "What is the total volume of timber sold by each salesperson?",
              "sql_context": "CREATE TABLE salesperson (salesperson_id INT, name TEXT, region TEXT); "
                             "INSERT INTO salesperson (salesperson_id, name, region) VALUES (1, 'John Doe', 'North'), "
                             "(2, 'Jane Smith', 'South'); CREATE TABLE timber_sales (sales_id INT, salesperson_id INT, "
                             "volume REAL, sale_date DATE); INSERT INTO timber_sales (sales_id, salesperson_id, volume, "
                             "sale_date) VALUES (1, 1, 120, '2021-01-01'), (2, 1, 150, '2021-02-01'), (3, 2, 180, '2021-01-01');",
              "sql": "SELECT salesperson.salesperson_id, name, SUM(volume) as total_volume FROM timber_sales "
                     "JOIN salesperson ON timber_sales.salesperson_id = salesperson.salesperson_id "
                     "GROUP BY salesperson.salesperson_id, name ORDER BY total_volume DESC;",
              "sql_explanation": "Joins timber_sales and salesperson, groups by salesperson, sums volume."}
MEDMCQA_ROW = {"id": "e9ad821a-c438-4965-9f77-760819dfa155",
               "question": "Chronic urethral obstruction due to benign prismatic hyperplasia can lead to the following change in kidney parenchyma",
               "opa": "Hyperplasia", "opb": "Hyperophy", "opc": "Atrophy", "opd": "Dyplasia", "cop": 2,
               "choice_type": "single", "exp": "Chronic urethral obstruction ... leads to atrophy.",
               "subject_name": "Anatomy", "topic_name": "Urinary tract"}
COUNTERFACT_ROW = {"case_id": 0, "pararel_idx": 2796,
                   "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                         "target_new": {"str": "English", "id": "Q1860"},
                                         "target_true": {"str": "French", "id": "Q150"},
                                         "subject": "Danielle Darrieux"},
                   "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                                          "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"],
                   "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
                   "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
                   "generation_prompts": ["Danielle Darrieux's mother tongue is"]}


def test_hub_rows_convert_to_the_local_schemas():
    sql = tasks.convert_hub_row("sql", GRETEL_ROW)
    assert set(sql) == {"id", "domain", "sql_complexity", "sql_prompt", "sql_context", "sql"}
    tasks.validate_row("sql", sql, "gretel")
    assert tasks.sql_execution_match(sql["sql"], sql["sql"], sql["sql_context"]) == (1.0, None)

    mcq = tasks.convert_hub_row("mcq", {**MEDMCQA_ROW, "exp": None})
    assert (mcq["cop"], mcq["opc"], mcq["exp"]) == (2, "Atrophy", "")
    tasks.validate_row("mcq", mcq, "medmcqa")
    assert tasks.prompt_and_target("mcq", mcq)[1] == " C"

    fact = tasks.convert_hub_row("fact", COUNTERFACT_ROW)
    assert set(fact) == {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"}
    assert fact["requested_rewrite"]["target_true"] == {"str": "French", "id": "Q150"}
    tasks.validate_row("fact", fact, "counterfact")
    assert tasks.prompt_and_target("fact", fact) == ("The mother tongue of Danielle Darrieux is", " English")
    with pytest.raises(ValueError, match="missing field 'requested_rewrite.subject'"):
        tasks.convert_hub_row("fact", broken(COUNTERFACT_ROW, "requested_rewrite.subject"))
    with pytest.raises(ValueError, match="missing field 'opd'"):
        tasks.convert_hub_row("mcq", broken(MEDMCQA_ROW, "opd"))


def test_hub_loading_picks_split_rows_skips_non_sqlite_rows_and_validates(monkeypatch):
    mysql_only = {**GRETEL_ROW, "sql_context": "CREATE TABLE t (a INT) ENGINE=InnoDB;"}
    ambiguous = {**GRETEL_ROW, "sql": GRETEL_ROW["sql"].replace("SELECT salesperson.", "SELECT ")}
    update = {**GRETEL_ROW, "sql": "UPDATE salesperson SET region = 'East';"}
    hub = {("sql", "train"): [GRETEL_ROW, GRETEL_ROW, mysql_only, update, ambiguous, GRETEL_ROW],
           ("mcq", "train"): [MEDMCQA_ROW] * 3, ("mcq", "validation"): [{**MEDMCQA_ROW, "cop": 5}],
           ("fact", "train"): [{**COUNTERFACT_ROW, "case_id": i} for i in range(12)]}
    for name in ("sql", "mcq", "fact"):  # each task's download, replaced
        monkeypatch.setattr(tasks.get(name), "hub_dataset", lambda split, name=name: (hub[(name, split)], f"fake {name}"))
    with pytest.warns(UserWarning, match=r"2 rows \(not runnable in sqlite\), 1 rows \(gold is not a query\)"):
        train = tasks.load("sql", "train", source="hub")
    assert len(train) == 2  # row 0 is validation (every 100th row), rows 2, 3 and 4 are skipped
    assert len(tasks.load("sql", "validation", source="hub")) == 1
    assert len(tasks.load("mcq", "train", source="hub", limit=1)) == 1
    with pytest.raises(ValueError, match=r"fake mcq split 'validation' row 0: field 'cop' must be 0..3"):
        tasks.load("mcq", "test", source="hub")  # medmcqa's validation split is our test
    assert [r["case_id"] for r in tasks.load("fact", "test", source="hub")] == [0, 5, 10]
    assert [r["case_id"] for r in tasks.load("fact", "validation", source="hub")] == [1, 11]
    assert len(tasks.load("fact", "train", source="hub")) == 12


# --------------------------------------------------------------------------------- encode/collate

def test_encode_masks_the_prompt_and_ends_the_target_with_eos(tokenizer):
    rows = tasks.load("mcq", "test", limit=2) + tasks.load("fact", "test", limit=1)
    for task, row in (("mcq", rows[0]), ("mcq", rows[1]), ("fact", rows[2])):
        (feature,) = tasks.encode(task, [row], tokenizer)
        prompt, target = tasks.prompt_and_target(task, row)
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert feature["input_ids"] == prompt_ids + target_ids
        assert feature["labels"] == [-100] * len(prompt_ids) + target_ids
    assert tasks.prompt_and_target("fact", rows[2])[1] == " " + rows[2]["requested_rewrite"]["target_new"]["str"]


def test_encode_truncates_the_prompt_from_the_left_and_never_drops_the_target(tokenizer):
    row = {**SQL_ROW, "sql_context": CONTEXT + " -- " + "padding words " * 200}
    (feature,) = tasks.encode("sql", [row], tokenizer, max_len=64)
    target_ids = tokenizer(" " + GOLD, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(feature["input_ids"]) == 64
    assert feature["input_ids"][-len(target_ids):] == target_ids == feature["labels"][-len(target_ids):]
    assert feature["input_ids"][:-len(target_ids)] == tokenizer(tasks.prompt_and_target("sql", row)[0])["input_ids"][-(64 - len(target_ids)):]
    (tight,) = tasks.encode("sql", [row], tokenizer, max_len=4)  # the target alone is longer than max_len
    assert len(tight["input_ids"]) == 4 and tight["labels"][0] == -100
    assert tight["labels"][1:] == target_ids[:3]
    with pytest.raises(ValueError, match="max_len"):
        tasks.encode("sql", [row], tokenizer, max_len=1)


def test_collate_right_pads_with_masked_labels():
    batch = tasks.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                           {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        tasks.collate([], pad_token_id=0)


# ------------------------------------------------------------------------------------ sql metrics

def test_sql_execution_match_scores_right_wrong_and_broken_queries():
    assert tasks.sql_execution_match(GOLD, GOLD, CONTEXT) == (1.0, None)
    # different text, same rows (order free without ORDER BY)
    same = "select e.name from employees as e where e.department='Sales' order by salary desc"
    assert tasks.sql_execution_match(same, GOLD, CONTEXT) == (1.0, None)
    assert tasks.sql_execution_match("SELECT name FROM employees", GOLD, CONTEXT) == (0.0, None)
    for bad, why in (("SELEC name FROM employees", "syntax error"), ("SELECT nope FROM employees", "no such column"),
                     ("", "empty query"), ("DELETE FROM employees", "not authorized"),
                     ("SELECT 1; SELECT 2", "one statement"),
                     ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
                      "interrupted")):
        score, error = tasks.sql_execution_match(bad, GOLD, CONTEXT)
        assert score == 0.0 and why in error, (bad, error)
    with pytest.raises(ValueError, match="gold query"):
        tasks.sql_execution_match(GOLD, "SELECT nope FROM employees", CONTEXT)


def test_sql_row_order_counts_only_when_the_gold_query_orders():
    ordered = "SELECT name FROM employees ORDER BY salary DESC LIMIT 2;"
    assert tasks.sql_execution_match("SELECT name FROM employees ORDER BY salary DESC LIMIT 2", ordered, CONTEXT)[0] == 1
    # same two rows (Bo, Cy), wrong order
    assert tasks.sql_execution_match("SELECT name FROM employees WHERE salary > 60000 ORDER BY salary",
                                     ordered, CONTEXT)[0] == 0
    assert tasks.sql_execution_match("SELECT name FROM employees WHERE salary > 60000 ORDER BY salary DESC",
                                     ordered, CONTEXT)[0] == 1
    unordered = "SELECT name FROM employees WHERE salary > 60000;"
    assert tasks.sql_execution_match("SELECT name FROM employees WHERE salary > 60000 ORDER BY salary",
                                     unordered, CONTEXT)[0] == 1
    average = "SELECT AVG(salary) FROM employees WHERE department = 'Sales';"
    assert tasks.sql_execution_match("SELECT (50000 + 65000.5) / 2", average, CONTEXT)[0] == 1
    assert tasks.sql_execution_match("SELECT SUM(salary) FROM employees", average, CONTEXT)[0] == 0


def test_normalize_and_extract_sql():
    assert tasks.normalize_sql("SELECT  name\nFROM t WHERE x='It''s';") == "select name from t where x = 'It''s'"
    assert tasks.normalize_sql("select name from T where X = 'It''s'") == "select name from t where x = 'It''s'"
    assert tasks.normalize_sql("SELECT a FROM t WHERE b = 'Sales'") != tasks.normalize_sql("SELECT a FROM t WHERE b = 'sales'")
    assert tasks.extract_sql(" SELECT a FROM t; SELECT b") == "SELECT a FROM t"
    assert tasks.extract_sql("\n  SELECT a FROM t\nmore text") == "SELECT a FROM t"
    assert tasks.extract_sql("\n\n") == ""


# -------------------------------------------------------------------------------- model metrics

class NextTokenModel(nn.Module):
    """A stand-in causal LM: the next-token logits depend only on the last input token, through
    ``table`` (last token -> favoured next token; anything else favours ``default``)."""

    def __init__(self, vocab_size: int, table: dict[int, int], default: int):
        super().__init__()
        self.vocab_size, self.table, self.default = vocab_size, table, default
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device and a train/eval mode
        self.calls_in_training_mode = 0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls_in_training_mode += self.training
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.vocab_size)
        for b in range(batch):
            for t in range(width):
                logits[b, t, self.table.get(int(input_ids[b, t]), self.default)] = 10.0
        return SimpleNamespace(logits=logits)


class FirstTokenPreference(nn.Module):
    """Favours ``token`` as the next token after prompts containing one of ``subjects`` (all prompts
    when ``subjects`` is None), and ``other`` elsewhere."""

    def __init__(self, tokenizer, vocab_size, token, other, subjects=None):
        super().__init__()
        self.tokenizer, self.vocab_size, self.token, self.other, self.subjects = (
            tokenizer, vocab_size, token, other, subjects)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b, ids in enumerate(input_ids):
            text = self.tokenizer.decode(ids)
            favoured = self.token if self.subjects is None or any(s in text for s in self.subjects) else self.other
            logits[b, :, favoured] = 5.0
        return SimpleNamespace(logits=logits)


def fact_records(n_records=4):
    records = []
    for i, (subject, true, new) in enumerate([("Spain", "Spanish", "French"), ("Chile", "Spanish", "French"),
                                              ("Mexico", "Spanish", "French"), ("Peru", "Spanish", "French")][:n_records]):
        records.append({"case_id": i,
                        "requested_rewrite": {"prompt": "The official language of {} is", "subject": subject,
                                              "target_true": {"str": true}, "target_new": {"str": new}},
                        "paraphrase_prompts": [f"In {subject}, the official language is", f"{subject}'s official language is"],
                        "neighborhood_prompts": ["The official language of Cuba is", "The official language of Panama is"]})
    return records


def test_fact_efficacy_follows_the_models_preference(tokenizer):
    new = tasks._first_token(tokenizer, " French")
    true = tasks._first_token(tokenizer, " Spanish")
    vocab = len(tokenizer)
    records = fact_records()
    # a global shift to the new answer: every edit "succeeds", but so does every neighbour: edit score 0
    prefers_new = tasks.evaluate("fact", FirstTokenPreference(tokenizer, vocab, new, true), tokenizer, records)
    assert prefers_new == pytest.approx({"efficacy": 1.0, "paraphrase_efficacy": 1.0, "neighborhood_specificity": 0.0,
                                         "edit_score": 0.0, "logprob_margin": 5.0, "n": 4.0})
    prefers_true = tasks.evaluate("fact", FirstTokenPreference(tokenizer, vocab, true, new), tokenizer, records)
    assert prefers_true == pytest.approx({"efficacy": 0.0, "paraphrase_efficacy": 0.0, "neighborhood_specificity": 1.0,
                                          "edit_score": 0.0, "logprob_margin": -5.0, "n": 4.0})
    # the new fact took hold for Spain only, and neighbours are untouched: exactly 1 of 4 records
    edited_spain = FirstTokenPreference(tokenizer, vocab, new, true, subjects=["Spain"])
    metrics, items = tasks.evaluate("fact", edited_spain, tokenizer, records, batch_size=3, return_items=True)
    assert metrics == pytest.approx({"efficacy": 0.25, "paraphrase_efficacy": 0.25, "neighborhood_specificity": 1.0,
                                     "edit_score": 0.25, "logprob_margin": -2.5, "n": 4.0})
    assert [(i["id"], i["prediction"], i["correct"]) for i in items] == [
        (0, "new", 1), (1, "true", 0), (2, "true", 0), (3, "true", 0)]
    assert items[0] == pytest.approx({"id": 0, "prediction": "new", "correct": 1, "paraphrase_efficacy": 1.0,
                                      "neighborhood_specificity": 1.0, "neighbour_flip": 0.0, "edit_score": 1.0,
                                      "margin": 5.0})
    assert sum(i["edit_score"] for i in items) / 4 == pytest.approx(metrics["edit_score"])


def test_mcq_accuracy_is_the_share_of_rows_whose_answer_letter_wins(tokenizer):
    letter_b = tasks._first_token(tokenizer, " B")
    rows = tasks.load("mcq", "test")
    model = FirstTokenPreference(tokenizer, len(tokenizer), letter_b, letter_b)
    model.train()
    metrics = tasks.evaluate("mcq", model, tokenizer, rows[:12], batch_size=5)
    expected = sum(r["cop"] == 1 for r in rows[:12]) / 12
    assert metrics == {"accuracy": expected, "n": 12.0} and 0 < expected < 1
    assert model.training  # train mode restored


def test_sql_evaluation_generates_extracts_and_executes(tokenizer):
    prompt_end = tokenizer(tasks.prompt_and_target("sql", SQL_ROW)[0])["input_ids"][-1]

    def model_writing(query: str) -> NextTokenModel:
        ids = tokenizer(query, add_special_tokens=False)["input_ids"]
        assert len(set(ids)) == len(ids) and prompt_end not in ids  # a bigram table can spell it out
        table = {prompt_end: ids[0], **{a: b for a, b in zip(ids, ids[1:])}}
        return NextTokenModel(len(tokenizer), table, default=tokenizer.eos_token_id)

    rows = [SQL_ROW, {**SQL_ROW, "sql": "SELECT name FROM employees WHERE department = 'Legal';"}]
    right = model_writing(" SELECT name FROM employees WHERE department = 'Sales'; DROP")
    right.train()
    metrics = tasks.evaluate("sql", right, tokenizer, rows, batch_size=2)
    assert metrics == {"execution_accuracy": 0.5, "exact_match": 0.5, "error_rate": 0.0, "n": 2.0}
    assert right.training and right.calls_in_training_mode == 0  # eval mode inside, restored after
    same_rows = model_writing(" select name from employees where department <> 'Legal'\n")
    assert tasks.evaluate("sql", same_rows, tokenizer, [SQL_ROW]) == {
        "execution_accuracy": 1.0, "exact_match": 0.0, "error_rate": 0.0, "n": 1.0}
    typo = model_writing(" SELEC name FROM employees")  # ends at max_new_tokens/EOS, fails to parse
    assert tasks.evaluate("sql", typo, tokenizer, rows, max_new_tokens=8) == {
        "execution_accuracy": 0.0, "exact_match": 0.0, "error_rate": 1.0, "n": 2.0}


def test_generate_path_matches_the_plain_greedy_loop_on_the_tiny_model(tokenizer):
    model, _ = models.load("tiny")
    rows = tasks.load("sql", "test", limit=2)
    prompts = [tasks.prompt_and_target("sql", r)[0] for r in rows]
    with torch.no_grad():
        cached = tasks._greedy_generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=6)
        plain = tasks._greedy_generate(_WithoutGenerate(model), tokenizer, prompts, batch_size=1, max_new_tokens=6)
    assert cached == plain and all(isinstance(t, str) for t in cached)
    model.eval()
    metrics = tasks.evaluate("sql", model, tokenizer, rows, max_new_tokens=6)
    assert set(metrics) == {"execution_accuracy", "exact_match", "error_rate", "n"} and metrics["n"] == 2.0
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("execution_accuracy", "exact_match", "error_rate"))
    assert not model.training


class _WithoutGenerate(nn.Module):
    """The tiny model without ``generate``: evaluation falls back to its plain greedy loop."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_evaluate_rejects_bad_arguments(tokenizer):
    model = NextTokenModel(10, {}, 0)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.evaluate("qa", model, tokenizer, [SQL_ROW])
    with pytest.raises(ValueError, match="at least one"):
        tasks.evaluate("sql", model, tokenizer, [])
    with pytest.raises(ValueError, match="batch_size"):
        tasks.evaluate("mcq", model, tokenizer, [MCQ_ROW], batch_size=0)


def test_cli_parses_and_rejects_unknown_tasks(capsys):
    with pytest.raises(SystemExit):
        tasks.main(["evaluate", "--task", "code"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.model
def test_smollm2_already_knows_the_fact_records_it_is_asked_to_forget():
    model, tokenizer = models.load("smollm2-135m")
    metrics = tasks.evaluate("fact", model, tokenizer, tasks.load("fact", "test", limit=8))
    assert metrics["n"] == 8.0
    assert metrics["efficacy"] <= 0.25 and metrics["neighborhood_specificity"] >= 0.75, metrics


# ------------------------------------------------------------------------------- per-item records

@pytest.mark.parametrize("variant", tasks.METRIC_VARIANTS)
@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_task_and_variant_returns_one_record_per_item_agreeing_with_the_metrics(tokenizer, task, variant):
    model, _ = models.load("tiny")
    rows = tasks.load(task, "test", limit=4, variant=variant)
    metrics, items = tasks.evaluate(task, model, tokenizer, rows, max_new_tokens=4, variant=variant,
                                    return_items=True)
    assert metrics == tasks.evaluate(task, model, tokenizer, rows, max_new_tokens=4, variant=variant)
    assert len(items) == metrics["n"] == 4
    assert [i["id"] for i in items] == [r.get("id", r.get("case_id")) for r in rows]
    assert all({"id", "prediction", "correct"} <= set(i) and i["correct"] in (0, 1) for i in items)
    json.dumps(items)  # JSON-ready
    primary = tasks.primary_metric(task, variant)
    assert sum(i["correct"] for i in items) / 4 == pytest.approx(metrics[primary])


# -------------------------------------------------------------------------------------------- mcq2

def test_mcq2_is_balanced_in_letters_quadruples_and_words_with_disjoint_word_pools():
    generate = generate_module()
    category_of = {w: c.split(" ", 1)[1] for c, ws in generate.MCQ2_CATEGORIES.items() for w in ws}
    words = {}
    for split in tasks.SPLITS:
        rows = tasks.load("mcq2", split)
        counts = Counter(r["cop"] for r in rows)
        assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1, (split, counts)
        by_quadruple = {}
        for r in rows:
            by_quadruple.setdefault(r["quadruple"], []).append(r)
        for group in by_quadruple.values():  # the same four words, each one right once
            assert len(group) == 4
            assert len({frozenset(r[f] for f in tasks.OPTION_FIELDS) for r in group}) == 1
            assert len({r[tasks.OPTION_FIELDS[r["cop"]]] for r in group}) == 4
            # near misses: the four categories asked are the four of one group
            assert len({r["group"] for r in group}) == 1 and len({r["category"] for r in group}) == 4
        for r in rows:  # the cue: another word of the answer's category, never an option
            assert r["question"] == f"Which of these is the same kind of thing as {r['cue']}?"
            assert r["cue"] not in {r[f] for f in tasks.OPTION_FIELDS}
            assert category_of[r["cue"]] == category_of[r[tasks.OPTION_FIELDS[r["cop"]]]] == r["category"]
        per_group = Counter(g[0]["group"] for g in by_quadruple.values())
        assert len(per_group) == 6 and max(per_group.values()) - min(per_group.values()) <= 1, (split, per_group)
        words[split] = {r[f] for r in rows for f in tasks.OPTION_FIELDS} | {r["cue"] for r in rows}
    assert not words["train"] & words["test"] and not words["train"] & words["validation"]
    assert not words["validation"] & words["test"]


def _binomial_tail(n: int, k: int, p: float = 0.25) -> float:
    """P(Binomial(n, p) >= k)."""
    import math
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_mcq2_simple_heuristics_stay_at_chance_on_test():
    from molf.lab import heuristics
    train, test = tasks.load("mcq2", "train"), tasks.load("mcq2", "test")
    scored = heuristics.correct("mcq2", test, train)
    assert len(scored) >= 15 and "longest common substring with the category" in scored
    bound = 0.001 / len(scored)  # one-sided, Bonferroni over the heuristics
    for name, items in scored.items():
        right = sum(items.values())
        assert len(items) == len(test) and _binomial_tail(len(test), right) > bound, (name, right, len(test))
        assert right <= 0.35 * len(test), (name, right)


def test_the_rules_find_mcqs_shortcut_and_score_sql_by_execution():
    from molf.lab import heuristics
    name, items = heuristics.best("mcq", tasks.load("mcq", "test"), tasks.load("mcq", "train"))
    assert name == "lower-median number" and sum(items.values()) / len(items) > 0.5  # what retired mcq
    row = {"id": 7, "sql_context": "CREATE TABLE t (a INT); CREATE TABLE u (b INT); INSERT INTO t VALUES (1), (2);",
           "sql": "SELECT COUNT(*) FROM t;", "sql_prompt": "How many?"}
    scored = heuristics.correct("sql", [row], [])
    assert scored["row count of the first table"] == {7: 1} and scored["every row of the last table"] == {7: 0}
    assert heuristics.best("fact", tasks.load("fact", "test"), []) is None
    with pytest.raises(ValueError, match="task must be one of"):
        heuristics.rules("med", [])


def test_mcq2_trains_on_the_answer_text_and_scores_the_options_text(tokenizer):
    row = {"id": "x", "question": "Which of these is a fruit?", "opa": "dog", "opb": "banana", "opc": "red",
           "opd": "piano", "cop": 1}
    prompt, target = tasks.prompt_and_target("mcq2", row)
    assert prompt.endswith("D. piano\nAnswer:") and target == " banana"
    favoured = set(tokenizer(" banana", add_special_tokens=False)["input_ids"]) | {tokenizer.eos_token_id}

    class Likes(nn.Module):  # every position favours the tokens of " banana" and EOS
        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, **kwargs):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[..., sorted(favoured)] = 8.0
            return SimpleNamespace(logits=logits)

    wrong = {**row, "id": "y", "opa": "banana", "opb": "apple", "cop": 1}
    metrics, items = tasks.evaluate("mcq2", Likes(), tokenizer, [row, wrong], return_items=True)
    assert metrics == {"accuracy": 0.5, "n": 2.0}
    assert [(i["id"], i["prediction"], i["correct"]) for i in items] == [("x", "B", 1), ("y", "A", 0)]
    assert items[0]["margin"] > 0 > items[1]["margin"]
    with pytest.raises(ValueError, match="local data only"):
        tasks.load("mcq2", "test", source="hub")
    with pytest.raises(ValueError, match="distinct"):
        tasks.validate_row("mcq2", {**row, "opc": "dog"}, "here")


# --------------------------------------------------------------------------------------- lengths

def test_length_coverage_counts_rows_that_encode_keeps_whole(tokenizer):
    rows = tasks.load("sql", "train", limit=20)
    lengths = tasks.example_lengths("sql", rows, tokenizer)
    full = [len(f["input_ids"]) for f in tasks.encode("sql", rows, tokenizer, max_len=10_000)]
    assert lengths == full
    middle = sorted(lengths)[10]
    coverage = tasks.length_coverage("sql", rows, tokenizer, [middle, max(lengths), min(lengths) - 1])
    assert coverage == {middle: sum(n <= middle for n in lengths) / 20, max(lengths): 1.0, min(lengths) - 1: 0.0}
    cut = tasks.encode("sql", rows, tokenizer, max_len=middle)
    assert sum(c["input_ids"] == f["input_ids"] for c, f in zip(
        cut, tasks.encode("sql", rows, tokenizer, max_len=10_000))) / 20 == coverage[middle]
    needed = tasks.seq_len_covering("sql", rows, tokenizer, 0.99)
    assert needed % 8 == 0 and tasks.length_coverage("sql", rows, tokenizer, [needed])[needed] >= 0.99


def test_the_v2_specs_seq_len_keeps_99_percent_of_every_tasks_train_and_test_whole(tokenizer):
    spec = json.loads((REPO / "experiments" / "main_v2.json").read_text())
    for task in spec["tasks"]:
        for split in ("train", "test"):
            coverage = tasks.length_coverage(task, tasks.load(task, split), tokenizer, [spec["seq_len"]])
            assert coverage[spec["seq_len"]] >= 0.99, (task, split, coverage)
