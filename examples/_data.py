"""A tiny, fixed language-modelling data set the examples share: every rank slices the same global batch."""

TEXT = (
    "MoLF routes each layer's update to the expert that promises the largest loss reduction. "
    "The dense base weight is the full fine-tuning expert; the low-rank adapters are the LoRA experts. "
    "Every expert receives its exact gradient at every step, but only the winners are updated. "
    "Under data parallelism every rank sees the same averaged gradients and so makes the same decision. "
    "Under sharded data parallelism the score sums are all-reduced before the decision is taken. "
)


def global_batches(tokenizer, steps, batch_size=8, seq_len=32):
    """``steps`` global batches of shape [batch_size, seq_len], cut from the repeated text (no padding,
    so every row has the same number of tokens and the mean over ranks equals the global mean)."""
    ids = tokenizer(TEXT * 8, return_tensors="pt").input_ids[0]
    need = steps * batch_size * seq_len
    ids = ids.repeat(need // len(ids) + 1)[:need]
    return list(ids.view(steps, batch_size, seq_len))


def shard_of(batch, rank, world):
    """This rank's rows of a global batch (the batch size must divide by the world size)."""
    if len(batch) % world:
        raise ValueError(f"global batch of {len(batch)} rows does not split over {world} ranks")
    per_rank = len(batch) // world
    return batch[rank * per_rank:(rank + 1) * per_rank]
