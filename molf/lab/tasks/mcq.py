"""Four-option multiple choice (the family of ``mcq`` and ``mcq2``): rows, prompt, answer parsing and metrics.

``mcq`` supervises and scores the answer's letter; ``mcq2`` (``ClozeChoiceTask``) its text."""
from __future__ import annotations

import re

from .base import Task, field, hub_field, item_id
from .scoring import first_token, greedy_generate, next_token_logprobs, target_logprobs

HUB_MCQ = "openlifescienceai/medmcqa"
# medmcqa's test split has no answers: its validation split is our test.
HUB_MCQ_SPLITS = {"train": ("train", lambda i: i % 100 != 0), "validation": ("train", lambda i: i % 100 == 0),
                  "test": ("validation", lambda i: True)}
MCQ_MAX_NEW_TOKENS = 16
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
OPTION_LETTERS = ("A", "B", "C", "D")

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


class LetterChoiceTask(Task):
    """MedMCQA-shaped rows (``question``, ``opa``..``opd``, ``cop`` 0..3); trained on the answer's letter,
    scored by the letters' next-token log-probabilities (ours) or by parsing a greedy generation
    (reference)."""

    family = "mcq"
    primary_metric = "accuracy"
    reference_primary_metric = "accuracy_generate"

    def __init__(self, name: str = "mcq", hub_splits: dict | None = HUB_MCQ_SPLITS):
        self.name, self.hub_splits = name, hub_splits

    def validate_row(self, row: dict, where: str, allow_writes: bool = False) -> None:
        field(row, "question", str, where)
        for name in OPTION_FIELDS:
            field(row, name, str, where, allow_empty=True)
        cop = field(row, "cop", int, where)
        if cop not in range(4):
            raise ValueError(f"{where}: field 'cop' must be 0..3 (the index of the correct option), got {cop}")

    def prompt(self, row: dict) -> str:
        options = "\n".join(f"{letter}. {row[name]}" for letter, name in zip(OPTION_LETTERS, OPTION_FIELDS))
        return f"Question: {row['question']}\n{options}\nAnswer:"

    def prompt_and_target(self, row: dict) -> tuple[str, str]:
        return self.prompt(row), " " + OPTION_LETTERS[row["cop"]]

    def convert_hub_row(self, row: dict) -> dict:
        """medmcqa rows keep ``id``, ``question``, ``opa``..``opd``, ``cop``, ``choice_type``, ``exp``,
        ``subject_name``, ``topic_name`` (``exp`` may be None upstream: it becomes "")."""
        out = {"id": row.get("id"), "question": hub_field(self.name, row, "question")}
        out.update({key: hub_field(self.name, row, key) for key in OPTION_FIELDS})
        out["cop"] = hub_field(self.name, row, "cop")
        out.update({key: row.get(key) or "" for key in ("choice_type", "exp", "subject_name", "topic_name")})
        return out

    def hub_dataset(self, hub_split: str):
        from datasets import load_dataset  # imported here: only the hub path needs it

        return load_dataset(HUB_MCQ, split=hub_split), HUB_MCQ

    def evaluate(self, model, tokenizer, rows, batch_size, max_new_tokens, variant):
        if variant == "reference":
            return self._evaluate_reference(model, tokenizer, rows, batch_size)
        return self._evaluate_ours(model, tokenizer, rows, batch_size)

    def _evaluate_ours(self, model, tokenizer, rows, batch_size):
        letters = [first_token(tokenizer, " " + letter) for letter in OPTION_LETTERS]
        if len(set(letters)) != 4:
            raise ValueError(f"the tokenizer gives the option letters overlapping first tokens {letters}")
        prompts = [self.prompt(row) for row in rows]
        scores = next_token_logprobs(model, tokenizer, prompts, [letters] * len(rows), batch_size)
        picks = [max(range(4), key=s.__getitem__) for s in scores]
        items = [{"id": item_id(row, position), "prediction": OPTION_LETTERS[pick], "correct": int(pick == row["cop"])}
                 for position, (pick, row) in enumerate(zip(picks, rows))]
        return {"accuracy": sum(i["correct"] for i in items) / len(rows), "n": float(len(rows))}, items

    def _evaluate_reference(self, model, tokenizer, rows, batch_size):
        """Greedy generation after "Answer:", parsed by ``parse_answer`` (a letter or an option's text),
        beside ours on the same rows."""
        prompts = [self.prompt(row) for row in rows]
        generations = greedy_generate(model, tokenizer, prompts, batch_size, MCQ_MAX_NEW_TOKENS)
        answers = [parse_answer(text, [row[f] for f in OPTION_FIELDS]) for text, row in zip(generations, rows)]
        ours, ours_items = self._evaluate_ours(model, tokenizer, rows, batch_size)
        items = [{"id": o["id"], "prediction": None if a is None else OPTION_LETTERS[a],
                  "correct": int(a == row["cop"]), "generation": text, "prediction_ours": o["prediction"],
                  "correct_ours": o["correct"]}
                 for a, text, row, o in zip(answers, generations, rows, ours_items)]
        n, invalid = len(rows), sum(a is None for a in answers)
        return ({"accuracy_generate": sum(i["correct"] for i in items) / n, "invalid_answers": float(invalid),
                 "invalid_rate": invalid / n, **ours}, items)


class ClozeChoiceTask(LetterChoiceTask):
    """mcq rows whose four options are distinct texts; trained on the answer's text, scored by cloze (the
    option whose text + EOS has the highest total log-probability after the prompt). Local data only."""

    def __init__(self, name: str = "mcq2"):
        super().__init__(name, hub_splits=None)

    def validate_row(self, row: dict, where: str, allow_writes: bool = False) -> None:
        super().validate_row(row, where, allow_writes)
        options = [row[name].strip() for name in OPTION_FIELDS]
        if not all(options) or len(set(options)) != 4:
            raise ValueError(f"{where}: mcq2 options must be four distinct non-empty texts, got {options}")

    def prompt_and_target(self, row: dict) -> tuple[str, str]:
        return self.prompt(row), " " + row[OPTION_FIELDS[row["cop"]]].strip()  # the answer's text, not its letter

    def _evaluate_ours(self, model, tokenizer, rows, batch_size):
        prompts, targets = [], []
        for row in rows:
            prompt = self.prompt(row)
            for name in OPTION_FIELDS:
                prompts.append(prompt)
                targets.append(" " + row[name].strip())
        scores = [sum(s) for s in target_logprobs(model, tokenizer, prompts, targets, batch_size, append_eos=True)]
        items = []
        for position, row in enumerate(rows):
            options = scores[4 * position:4 * position + 4]
            pick = max(range(4), key=options.__getitem__)
            items.append({"id": item_id(row, position), "prediction": OPTION_LETTERS[pick],
                          "correct": int(pick == row["cop"]),
                          "margin": options[row["cop"]] - max(s for i, s in enumerate(options) if i != row["cop"])})
        return {"accuracy": sum(i["correct"] for i in items) / len(rows), "n": float(len(rows))}, items
