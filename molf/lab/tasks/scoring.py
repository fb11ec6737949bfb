"""Model plumbing every task's scoring shares: next-token and whole-target log-probabilities (right-padded
batches, so padding changes nothing) and greedy generation (left-padded, stopping at a newline or ";")."""
from __future__ import annotations

import torch


def ends_query(generated: str) -> bool:
    """Generation may stop: a newline or ";" after the first non-blank character."""
    text = generated.lstrip()
    return "\n" in text or ";" in text


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return ids[0]


def next_token_logprobs(model, tokenizer, prompts: list[str], candidates: list[list[int]],
                         batch_size: int) -> list[list[float]]:
    """Log-probabilities of each prompt's candidate tokens as the next token. Batches are right-padded
    and read at each prompt's last real position, so padding changes nothing."""
    device, pad, scores = model_device(model), pad_id(tokenizer), []
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


def target_logprobs(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int,
                     append_eos: bool = False) -> list[list[float]]:
    """For each (prompt, target) pair, the log-probability of every token of ``target`` given the prompt
    and the target tokens before it (prompt tokenized with special tokens, the target without: the
    split ``encode`` trains on). Batches are right-padded, so padding changes nothing."""
    device, pad, scores = model_device(model), pad_id(tokenizer), []
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


def stop_criterion(tokenizer, prompt_width: int):
    """A transformers StoppingCriteria that ends each sequence once its new text has a newline or ';'."""
    from transformers import StoppingCriteria

    class StopAtEndOfQuery(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor([ends_query(t) for t in texts], device=input_ids.device)

    return StopAtEndOfQuery()


def greedy_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens.

    Uses ``model.generate`` (with its KV cache) when the model has one; otherwise a plain loop that
    re-runs the whole sequence per token (slow; for small stand-in models)."""
    device, pad, eos = model_device(model), pad_id(tokenizer), tokenizer.eos_token_id
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
                                    stopping_criteria=StoppingCriteriaList([stop_criterion(tokenizer, width)]))
        else:
            output, finished = input_ids, torch.zeros(len(encoded), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                next_ids = model(input_ids=output, attention_mask=mask).logits[:, -1].argmax(-1)
                next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
                output = torch.cat([output, next_ids[:, None]], dim=1)
                mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
                new_text = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
                finished |= (next_ids == eos) | torch.tensor([ends_query(t) for t in new_text], device=device)
                if finished.all():
                    break
        texts += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return texts

