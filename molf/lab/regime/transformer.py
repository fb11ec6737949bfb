"""The same question in a transformer: FFT against LoRA on the tiny causal LM, shift rank low and high."""
import copy
import time

import pandas as pd
import torch
from torch import nn

from .. import engine, stats
from .setting import seeded_generator

# ---------------------------------------------------------------------------- the same question in a transformer
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def transformer_check(shift_ranks=(1, 32), seeds: int = 5, steps: int = 150, examples: int = 256, vocab: int = 256,
                      seq_len: int = 16, batch_size: int = 16, noise: float = 0.1,
                      lrs=None, log=None) -> pd.DataFrame:
    """The map's experiment in the shipped tiny causal LM (``molf.lab.models.load("tiny")``: a 2-layer
    random Llama, hidden 64), as a regression on its logits.

    The base: the tiny model with its head cut to the first ``vocab`` tokens. The target: each of its
    block linears (``BLOCK_LINEARS``) shifted by a rank-k Gaussian ``U @ V`` of half the weight's norm.
    Data: ``examples`` random token sequences (tokens < ``vocab``) with the target's logits plus noise of
    ``noise`` x the RMS of the shift's effect (target - base logits). FFT trains the block linears only
    (embeddings, norms and head frozen, as for LoRA); LoRA (peft, r=4, alpha 8, rsLoRA) adapts the same
    linears. Each method's lr is picked on validation sequences; the test loss is the MSE to the clean
    target logits over the base's (1: nothing learned). Rows: shift_rank, seed, method, lr, val, test."""
    from peft import LoraConfig, get_peft_model

    from . import models

    lrs = lrs or {"fft": (3e-4, 1e-3, 3e-3), "lora": (3e-3, 1e-2, 3e-2)}
    full, _ = models.load("tiny")
    base = copy.deepcopy(full)
    head = nn.Linear(full.config.hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(full.get_output_embeddings().weight[:vocab])
    base.lm_head = head
    base.config.tie_word_embeddings = False
    rows = []
    for k in shift_ranks:
        for seed in range(seeds):
            target = copy.deepcopy(base)
            g = seeded_generator("lm-shift", seed, k)
            with torch.no_grad():
                for name, module in target.named_modules():
                    if isinstance(module, nn.Linear) and name.endswith(BLOCK_LINEARS):
                        out_f, in_f = module.weight.shape
                        delta = torch.randn(out_f, k, generator=g) @ torch.randn(k, in_f, generator=g)
                        module.weight += delta * (0.5 * module.weight.norm() / delta.norm())
            data = {}
            with torch.no_grad():
                for split, n in (("train", examples), ("val", 64), ("test", 64)):
                    x = torch.randint(0, vocab, (n, seq_len), generator=seeded_generator("lm-data", seed, split))
                    y, y0 = target(input_ids=x).logits, base(input_ids=x).logits
                    data[split] = (x, y, float((y0 - y).pow(2).mean()))
                x, y, _ = data["train"]
                effect = (y - base(input_ids=x).logits).pow(2).mean().sqrt()
                y_noisy = y + noise * effect * torch.randn(y.shape, generator=seeded_generator("lm-noise", seed, k))
            order = torch.randint(0, examples, (steps, batch_size), generator=seeded_generator("lm-batches", seed))
            for method, grid in lrs.items():
                for lr in grid:
                    model = copy.deepcopy(base)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        if method == "lora":
                            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                     target_modules=list(BLOCK_LINEARS)))
                        else:
                            for name, p in model.named_parameters():
                                p.requires_grad_(any(f"{t}." in name for t in BLOCK_LINEARS))
                    params = [p for p in model.parameters() if p.requires_grad]
                    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
                    began = time.perf_counter()
                    engine.fit(model, optimizer, lambda step, x=x, y=y_noisy, order=order: [(x[order[step]], y[order[step]])],
                               steps=steps, loss_fn=lambda m, b: (m(input_ids=b[0]).logits - b[1]).pow(2).mean())
                    model.eval()
                    with torch.no_grad():
                        scores = {split: float((model(input_ids=data[split][0]).logits - data[split][1]).pow(2).mean())
                                  / data[split][2] for split in ("val", "test")}
                    rows.append({"shift_rank": k, "seed": seed, "method": method, "lr": lr, **scores})
                    if log:
                        log(f"k={k} seed {seed} {method} lr {lr:g}: test {scores['test']:.3f} "
                            f"({time.perf_counter() - began:.1f} s)")
    return pd.DataFrame(rows)


def transformer_lines(rows: pd.DataFrame) -> list[str]:
    """Per shift rank: FFT and LoRA at their lr picked on validation, paired over seeds."""
    lines = []
    for k, part in rows.groupby("shift_rank"):
        best = {}
        for method, m in part.groupby("method"):
            lr = m.groupby("lr")["val"].mean().idxmin()
            best[method] = m[m["lr"] == lr].sort_values("seed")
        fft, lora = (best[m]["test"].to_numpy(dtype=float, copy=True) for m in ("fft", "lora"))
        c = stats.compare(fft, lora)
        lines.append(f"tiny LM, shift rank {k}: LoRA beats FFT: {stats.verdict(c)} — "
                     f"{c.line('FFT', 'LoRA')} seeds (test MSE / the base's, lr FFT "
                     f"{best['fft']['lr'].iloc[0]:g}, LoRA {best['lora']['lr'].iloc[0]:g})")
    return lines
