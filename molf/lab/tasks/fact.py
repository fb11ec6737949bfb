"""Counterfactual knowledge injection (CounterFact's schema): rows, prompt and the edit metrics.

Knowledge injection trains on the facts it tests: ``train`` holds every record, ``test``
(``case_id % 5 == 0``) and ``validation`` (``case_id % 10 == 1``) are subsets of it; the hub path applies
the same rule by position."""
from __future__ import annotations

import warnings

from .base import Task, field, hub_field, item_id
from .scoring import first_token, next_token_logprobs, target_logprobs

HUB_FACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
# CounterFact is one file; knowledge injection tests a subset of the trained facts.
HUB_FACT_SPLITS = {"train": ("train", lambda i: True), "validation": ("train", lambda i: i % 10 == 1),
                   "test": ("train", lambda i: i % 5 == 0)}


def fill_subject(template: str, subject: str) -> str:
    """A CounterFact prompt with its subject: "{} is a city in" -> "Lyon is a city in" (first letter
    capitalised, so "the Netherlands" starts a sentence as "The Netherlands")."""
    text = template.replace("{}", subject)
    return text[:1].upper() + text[1:]


def full_target_wins(first: list[float], second: list[float]) -> bool:
    """ROME's comparison of two whole targets: ``first`` (its tokens' log-probabilities) beats
    ``second`` when its mean log-probability per token is higher (mean NLL lower)."""
    return sum(first) / len(first) > sum(second) / len(second)


def _copy(value):
    return dict(value) if isinstance(value, dict) else value  # validate_row reports a non-dict


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



class FactTask(Task):
    """CounterFact records (``case_id``, ``requested_rewrite`` {``prompt`` with ``{}``, ``subject``,
    ``target_true``/``target_new`` {``str``}}, ``paraphrase_prompts``, ``neighborhood_prompts``); trained
    on ``" " + target_new`` after the rewrite prompt."""

    family = "fact"
    primary_metric = "efficacy"
    reference_primary_metric = "efficacy_full"

    def __init__(self, name: str = "fact", hub_splits: dict | None = HUB_FACT_SPLITS):
        self.name, self.hub_splits = name, hub_splits

    def validate_row(self, row: dict, where: str, allow_writes: bool = False) -> None:
        prompt = field(row, "requested_rewrite.prompt", str, where)
        if "{}" not in prompt:
            raise ValueError(f"{where}: field 'requested_rewrite.prompt' needs a '{{}}' for the subject, "
                             f"got {prompt!r}")
        field(row, "requested_rewrite.subject", str, where)
        true = field(row, "requested_rewrite.target_true.str", str, where)
        new = field(row, "requested_rewrite.target_new.str", str, where)
        if true.strip() == new.strip():
            raise ValueError(f"{where}: field 'requested_rewrite.target_new.str' equals target_true ({new!r})")
        for name in ("paraphrase_prompts", "neighborhood_prompts"):
            prompts = field(row, name, list, where)
            if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"{where}: field {name!r} must be a non-empty list of non-empty strings")

    def prompt_and_target(self, row: dict) -> tuple[str, str]:
        rewrite = row["requested_rewrite"]
        return fill_subject(rewrite["prompt"], rewrite["subject"]), " " + rewrite["target_new"]["str"]

    def convert_hub_row(self, row: dict) -> dict:
        """CounterFact records keep ``case_id``, ``requested_rewrite`` (``prompt``, ``relation_id``,
        ``subject``, ``target_true``/``target_new`` as {"str", "id"}), ``paraphrase_prompts`` and
        ``neighborhood_prompts``; attribute and generation prompts are dropped."""
        rewrite = hub_field(self.name, row, "requested_rewrite")
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
            "paraphrase_prompts": list(hub_field(self.name, row, "paraphrase_prompts")),
            "neighborhood_prompts": list(hub_field(self.name, row, "neighborhood_prompts")),
        }

    def hub_dataset(self, hub_split: str):
        from datasets import load_dataset  # imported here: only the hub path needs it

        return load_dataset("json", data_files=HUB_FACT_URL, split=hub_split), HUB_FACT_URL

    def evaluate(self, model, tokenizer, rows, batch_size, max_new_tokens, variant):
        if variant == "reference":
            return self._evaluate_reference(model, tokenizer, rows, batch_size)
        return self._evaluate_ours(model, tokenizer, rows, batch_size)

    def _evaluate_ours(self, model, tokenizer, rows, batch_size):
        prompts, candidates, owners, kinds = [], [], [], []
        kept = []
        for index, row in enumerate(rows):
            rewrite = row["requested_rewrite"]
            pair = [first_token(tokenizer, " " + rewrite["target_new"]["str"]),
                    first_token(tokenizer, " " + rewrite["target_true"]["str"])]
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
                          f"target_true start with the same token", stacklevel=4)
        if not prompts:
            raise ValueError("fact: no record has target_new and target_true with different first tokens")
        scores = next_token_logprobs(model, tokenizer, prompts, candidates, batch_size)
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



    def _evaluate_reference(self, model, tokenizer, rows, batch_size):
        prompts, targets, owners, kinds = [], [], [], []
        for index, row in enumerate(rows):
            rewrite = row["requested_rewrite"]
            for kind, text in _fact_prompts(row):
                for target in (rewrite["target_new"]["str"], rewrite["target_true"]["str"]):
                    prompts.append(text)
                    targets.append(" " + target)
                owners.append(index)
                kinds.append(kind)
        scores = target_logprobs(model, tokenizer, prompts, targets, batch_size)
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
        distinct = [r for r in rows if first_token(tokenizer, " " + r["requested_rewrite"]["target_new"]["str"])
                    != first_token(tokenizer, " " + r["requested_rewrite"]["target_true"]["str"])]
        if distinct:  # ours, on the records the first token can tell apart (no warning: counted here)
            first, first_items = self._evaluate_ours(model, tokenizer, distinct, batch_size)
            metrics.update({k: first[k] for k in ("efficacy", "paraphrase_efficacy", "neighborhood_specificity")})
            ours = {it["id"]: it for it in first_items}
            for it in items:
                if it["id"] in ours:
                    it.update({"correct_ours": ours[it["id"]]["correct"], "edit_score": ours[it["id"]]["edit_score"],
                               "margin": ours[it["id"]]["margin"]})
        metrics["n_first_token"] = float(len(distinct))
        return metrics, items
