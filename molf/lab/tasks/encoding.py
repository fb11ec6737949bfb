"""Rows to training tensors, for every task alike: ``encode`` (prompt + target + EOS, the prompt's labels
masked), ``collate`` (right padding), and how much of a task ``encode`` keeps whole at a given length."""
from __future__ import annotations

import math

import torch

from .base import get

IGNORE_INDEX = -100


def encode(name: str, rows: list[dict], tokenizer, max_len: int = 256) -> list[dict]:
    """Token ids for training: ``{"input_ids": prompt + target + [eos], "labels": [-100]*len(prompt) +
    target + [eos]}``.

    Prompt and target are tokenized separately (the target without special tokens), the same split
    ``evaluate`` scores. Over ``max_len``, the prompt loses tokens from its left; a target that alone
    reaches ``max_len`` is cut from its right, keeping one prompt token so the first target token is
    still predicted. For fact rows the target is ``" " + target_new``: training injects the new fact.
    """
    task = get(name)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (one prompt and one target token), got {max_len!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; encode appends EOS to every target")
    features = []
    for row in rows:
        prompt, target = task.prompt_and_target(row)
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = (tokenizer(target, add_special_tokens=False)["input_ids"] + [eos])[:max_len - 1]
        prompt_ids = prompt_ids[-(max_len - len(target_ids)):]
        features.append({"input_ids": prompt_ids + target_ids,
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids})
    return features


def example_lengths(name: str, rows: list[dict], tokenizer) -> list[int]:
    """Tokens of each row as ``encode`` would train it uncut: prompt + target + EOS."""
    task, lengths = get(name), []
    for row in rows:
        prompt, target = task.prompt_and_target(row)
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
