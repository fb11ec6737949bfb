"""The reference metric variant of molf.lab.tasks beside ours, on hand-made cases with a known answer:
sql set comparison and write statements compared by table contents, mcq answers by generation and
parsing, CounterFact efficacy over the whole target string (ROME)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from molf.lab import models, tasks

CONTEXT = ("CREATE TABLE employees (id INT, name TEXT, department TEXT, salary INT); "
           "INSERT INTO employees (id, name, department, salary) VALUES "
           "(1, 'Ann', 'Sales', 50000), (2, 'Bo', 'Legal', 70000), (3, 'Cy', 'Sales', 65000.5);")
SALES = "SELECT department FROM employees WHERE department = 'Sales'"  # two equal rows
OPTIONS = ["Hyperplasia", "Hypertrophy", "Atrophy", "Dysplasia"]


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny")


class Bigram(nn.Module):
    """A stand-in causal LM whose next-token logits depend only on the last token: ``table[last]`` is a
    dict token -> logit (every other token gets 0); a last token not in the table favours ``default``."""

    def __init__(self, vocab_size: int, table: dict[int, dict[int, float]], default: int):
        super().__init__()
        self.vocab_size, self.table, self.default = vocab_size, table, default
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b, row in enumerate(input_ids):
            for t, token in enumerate(row.tolist()):
                for favoured, value in self.table.get(token, {self.default: 10.0}).items():
                    logits[b, t, favoured] = value
        return SimpleNamespace(logits=logits)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ sql

def test_reference_sql_compares_query_results_as_sets():
    ref, ours = tasks.sql_execution_match_reference, tasks.sql_execution_match
    distinct = "SELECT DISTINCT department FROM employees WHERE id <> 2"
    assert ref(distinct, SALES, CONTEXT) == (1.0, None)  # {Sales} == {Sales, Sales} as sets
    assert ours(distinct, SALES, CONTEXT) == (0.0, None)  # but not as multisets
    ordered = "SELECT name FROM employees ORDER BY salary DESC"
    assert ref("SELECT name FROM employees", ordered, CONTEXT) == (1.0, None)  # order ignored
    assert ours("SELECT name FROM employees", ordered, CONTEXT) == (0.0, None)
    assert ref("SELECT name FROM employees WHERE id = 1", ordered, CONTEXT) == (0.0, None)
    assert ref("SELECT (50000 + 65000.5) / 2", "SELECT AVG(salary) FROM employees WHERE department = 'Sales'",
               CONTEXT) == (1.0, None)


def test_reference_sql_compares_write_statements_by_the_tables_afterwards():
    ref = tasks.sql_execution_match_reference
    gold = "UPDATE employees SET salary = salary + 1 WHERE department = 'Sales'"
    assert ref("UPDATE employees SET salary = salary + 1 WHERE name IN ('Ann', 'Cy')", gold, CONTEXT) == (1.0, None)
    assert ref("UPDATE employees SET salary = salary + 1", gold, CONTEXT) == (0.0, None)  # Bo changed too
    assert ref("SELECT * FROM employees", gold, CONTEXT) == (0.0, None)  # runs (valid), changes nothing
    insert = "INSERT INTO employees (id, name, department, salary) VALUES (4, 'Di', 'Legal', 1)"
    assert ref("INSERT INTO employees VALUES (4, 'Di', 'Legal', 1)", insert, CONTEXT) == (1.0, None)
    assert ref(insert + ", (4, 'Di', 'Legal', 1)", insert, CONTEXT) == (0.0, None)  # a duplicate row counts
    assert ref("DELETE FROM employees WHERE salary > 60000",
               "DELETE FROM employees WHERE name <> 'Ann'", CONTEXT) == (1.0, None)
    view = "CREATE VIEW sales AS SELECT name FROM employees WHERE department = 'Sales'"
    assert ref("CREATE VIEW sales AS SELECT name FROM employees WHERE id IN (1, 3)", view, CONTEXT) == (1.0, None)
    assert ref("CREATE VIEW other AS SELECT name FROM employees WHERE id IN (1, 3)", view, CONTEXT) == (0.0, None)
    for bad, why in (("UPDATE nope SET a = 1", "no such table"), ("", "empty query"),
                     ("ATTACH DATABASE 'x.db' AS x", "not authorized"), ("PRAGMA user_version = 3", "not authorized")):
        score, error = ref(bad, gold, CONTEXT)
        assert score == 0.0 and why in error, (bad, error)
    with pytest.raises(ValueError, match="gold statement"):
        ref(gold, "UPDATE nope SET a = 1", CONTEXT)


def test_reference_sql_evaluation_reports_set_accuracy_valid_rate_and_ours_beside(tokenizer):
    rows = [{"sql_prompt": "Departments of Sales?", "sql_context": CONTEXT, "sql": SALES},
            {"sql_prompt": "Zero Legal pay", "sql_context": CONTEXT,
             "sql": "UPDATE employees SET salary = 0 WHERE department = 'Legal'"}]
    prompt_ends = {tokenizer(tasks.prompt_and_target("sql", r)[0])["input_ids"][-1] for r in rows}
    written = ids(tokenizer, " SELECT DISTINCT department FROM employees WHERE id <> 2\n")
    assert len(set(written)) == len(written) and not prompt_ends & set(written)
    table = {**{end: {written[0]: 10.0} for end in prompt_ends},
             **{a: {b: 10.0} for a, b in zip(written, written[1:])}}
    model = Bigram(len(tokenizer), table, default=tokenizer.eos_token_id)
    with pytest.raises(ValueError, match="gold query"):  # ours cannot score a write statement
        tasks.evaluate("sql", model, tokenizer, rows)
    metrics = tasks.evaluate("sql", model, tokenizer, rows, variant="reference")
    assert metrics == {"execution_accuracy_set": 0.5, "valid_sql_rate": 1.0, "exact_match": 0.0,
                       "execution_accuracy": 0.0, "n": 2.0, "n_write_gold": 1.0}
    assert tasks.primary_metric("sql", "reference") == "execution_accuracy_set"
    assert tasks.primary_metric("sql") == "execution_accuracy"
    with pytest.raises(ValueError, match="unknown metric variant 'paper'"):
        tasks.evaluate("sql", model, tokenizer, rows, variant="paper")


# ------------------------------------------------------------------------------------------------ mcq

@pytest.mark.parametrize("text, answer", [
    (" B", 1), ("(C)", 2), ("B. Atrophy", 1), ("D)", 3), ("A", 0), (" C\nD", 2), ("B Atrophy", 1),
    ("The answer is C.", 2), ("Answer: (B)", 1), ("answer: option D", 3),
    ("Atrophy of the parenchyma", 2), ("  hypertrophy", 1),  # the option's text
    (" A patient with", None), ("the answer is a tumour", None), ("", None), ("xyz", None), (" E", None),
])
def test_parse_answer_reads_a_letter_or_an_option_text(text, answer):
    assert tasks.parse_answer(text, OPTIONS) == answer


def test_reference_mcq_generates_parses_and_counts_invalid_answers(tokenizer):
    rows = tasks.load("mcq", "test", limit=12)
    end = tokenizer(tasks.prompt_and_target("mcq", rows[0])[0])["input_ids"][-1]
    assert all(tokenizer(tasks.prompt_and_target("mcq", r)[0])["input_ids"][-1] == end for r in rows)
    letter_b, the = ids(tokenizer, " B")[0], ids(tokenizer, " the")[0]
    says_b = Bigram(len(tokenizer), {end: {letter_b: 10.0}}, default=tokenizer.eos_token_id)
    share_b = sum(r["cop"] == 1 for r in rows) / 12
    assert 0 < share_b < 1
    assert tasks.evaluate("mcq", says_b, tokenizer, rows, batch_size=5, variant="reference") == {
        "accuracy_generate": share_b, "invalid_answers": 0.0, "invalid_rate": 0.0, "accuracy": share_b, "n": 12.0}
    # rambles " the the the ...": every answer invalid, so 0 by generation; ours still picks a letter
    rambles = Bigram(len(tokenizer), {end: {the: 10.0}, the: {the: 10.0}}, default=tokenizer.eos_token_id)
    metrics = tasks.evaluate("mcq", rambles, tokenizer, rows, variant="reference")
    assert (metrics["accuracy_generate"], metrics["invalid_answers"], metrics["invalid_rate"]) == (0.0, 12.0, 1.0)
    assert metrics["accuracy"] == sum(r["cop"] == 0 for r in rows) / 12  # all letters tie: the first, A
    assert tasks.primary_metric("mcq", "reference") == "accuracy_generate"


# ----------------------------------------------------------------------------------------------- fact

def test_full_target_comparison_is_the_mean_log_probability_per_token():
    assert tasks.full_target_wins([-1.0, -1.0], [-1.5])  # mean -1 > -1.5 (a sum would say -2 < -1.5)
    assert not tasks.full_target_wins([-1.5], [-1.0, -1.0])
    assert not tasks.full_target_wins([-1.0], [-1.0])  # a tie is no win


def test_reference_fact_scores_the_whole_target_beside_the_first_token(tokenizer):
    def record(i, prompt, new, true):
        return {"case_id": i, "requested_rewrite": {"prompt": prompt, "subject": "X",
                                                    "target_new": {"str": new}, "target_true": {"str": true}},
                "paraphrase_prompts": [prompt.replace("{}", "Y")], "neighborhood_prompts": [prompt.replace("{}", "Z")]}

    records = [record(0, "The largest city of {} is", "New York", "New Jersey"),  # same first token
               record(1, "{} speaks", "French", "Spanish"),
               record(2, "{} lies in", "New Delhi", "Rome")]
    ends = [tokenizer(tasks.fill_subject(r["requested_rewrite"]["prompt"], "X"))["input_ids"][-1] for r in records]
    assert len(set(ends)) == 3
    new_ = lambda text: ids(tokenizer, " " + text)  # noqa: E731
    york, jersey = new_("New York"), new_("New Jersey")
    assert york[0] == jersey[0] and len(york) == len(jersey) == 2
    delhi, rome = new_("New Delhi"), new_("Rome")
    table = {
        ends[0]: {york[0]: 10.0},                        # " New", then " York": the whole new target wins
        york[0]: {york[1]: 10.0},
        ends[1]: {new_("French")[0]: 10.0, new_("Spanish")[0]: 5.0},  # new wins on one token
        ends[2]: {delhi[0]: 10.0, rome[0]: 9.0},         # first token: " New" wins; " New Delhi" as a whole loses
    }
    model = Bigram(len(tokenizer), table, default=tokenizer.eos_token_id)
    metrics = tasks.evaluate("fact", model, tokenizer, records, batch_size=4, variant="reference")
    assert metrics == pytest.approx({
        "efficacy_full": 2 / 3, "paraphrase_efficacy_full": 2 / 3, "neighborhood_specificity_full": 1 / 3,
        "n": 3.0, "n_first_token": 2.0,
        "efficacy": 1.0, "paraphrase_efficacy": 1.0, "neighborhood_specificity": 0.0})
    # ours alone skips the record whose targets share their first token, with a warning
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        assert tasks.evaluate("fact", model, tokenizer, records)["efficacy"] == 1.0
    # only same-first-token records: the reference variant still scores them, ours cannot
    only = tasks.evaluate("fact", model, tokenizer, records[:1], variant="reference")
    assert only == {"efficacy_full": 1.0, "paraphrase_efficacy_full": 1.0, "neighborhood_specificity_full": 0.0,
                    "n": 1.0, "n_first_token": 0.0}
    assert tasks.primary_metric("fact", "reference") == "efficacy_full"


def test_target_logprobs_do_not_depend_on_padding(tokenizer):
    model, _ = models.load("tiny")
    prompts = ["The capital of France is", "A much longer prompt about the capital city of Italy is"]
    targets = [" Paris", " New York City"]
    with torch.no_grad():
        together = tasks._target_logprobs(model, tokenizer, prompts, targets, batch_size=2)
        alone = [tasks._target_logprobs(model, tokenizer, [p], [t], batch_size=1)[0] for p, t in zip(prompts, targets)]
    assert [len(s) for s in together] == [len(ids(tokenizer, t)) for t in targets]
    for a, b in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-5)
