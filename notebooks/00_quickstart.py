# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: language_info,-language_info.version,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   language_info:
#     codemirror_mode:
#       name: ipython
#       version: 3
#     file_extension: .py
#     mimetype: text/x-python
#     name: python
#     nbconvert_exporter: python
#     pygments_lexer: ipython3
# ---

# %% [markdown]
# # 00 · Quickstart: MoLF in five minutes
#
# **MoLF** (Mixture of LoRA and Full fine-tuning) turns every linear layer of a model into
#
# $$y = W x + \sum_i s_i\, B_i A_i x$$
#
# one **FFT expert** (the dense weight $W$) plus **LoRA experts** $B_i A_i$. The forward pass is dense:
# every expert gets its exact gradient at every step. The sparsity lives in the optimizer: a custom
# AdamW tracks Adam moments for *all* experts, scores each expert of each module (EPD: the expected loss
# decrease of one Adam step, per parameter) and updates only the **top-1 expert of each module**.
# So every `q_proj`, `up_proj`, ... decides on its own, at every step, whether full fine-tuning or LoRA is
# the better move.
#
# This notebook wraps SmolLM2-135M, trains a short run and shows which expert won where.

# %% tags=["parameters"]
model = "smollm2-135m"     # "tiny" for a 2-layer random Llama; a hub id / local path for a bigger model
task = "fact"               # "fact" (counterfactual knowledge injection), "sql", "sql2", "mcq" or "mcq2"
steps = 20                  # optimizer steps per training run
batch_size = 4
seq_len = 64                # tokens per example (longer ones are truncated)
eval_limit = 32             # evaluation examples after training (0: skip evaluation)
seed = 0
device = "cpu"              # "cpu", "cuda" or "auto"
source = "local"            # "local" (the shipped data/) or "hub" (the paper's datasets; needs a network)
metric_variant = "ours"     # "ours" or "reference" (the reference implementation's metrics; docs/tasks.md)
runs_dir = "../runs"        # <notebook>.json (the numbers) and, unless train_dir is set, the training runs
figures_dir = "../runs/figures"  # PNG figures (the committed ../figures change only on purpose)
train_dir = None            # training runs, one directory each (None: <runs_dir>/train)
progress = True             # progress bars while training (the suite turns them off)
headless = False            # True: widget apps shown as pictures (the suite's headless runs)
# MoLF hyper-parameters (None = the paper's default: lr 5e-5 for both experts, one LoRA expert r=128, EPD, top-1)
lr_fft = None
lr_lora = None
ranks = None
score = None
topk = None

# %%
import pandas as pd

from molf.lab import analysis, notebook, plots

nb = notebook.setup("00_quickstart", globals())

# %% [markdown]
# ## 1. Wrapping a model
#
# `molf.wrap` replaces every `nn.Linear` except `lm_head` with a `MoLFLinear`. LoRA's `B` starts at zero, so
# the wrapped model computes **exactly** what the base model computes; only training changes that.

# %%
import torch

import molf
from molf.lab import models

base, tokenizer = models.load(model)
ids = tokenizer("The Eiffel Tower is located in", return_tensors="pt")["input_ids"]
with torch.no_grad():
    before = base(ids).logits
n_base = sum(p.numel() for p in base.parameters())
molf.wrap(base, ranks=tuple(ranks) if ranks else (128,))
wrapped = molf.wrapped_modules(base)
with torch.no_grad():
    after = base(ids).logits
n_total = sum(p.numel() for p in base.parameters())
wrap_max_abs_diff = float((after - before).abs().max())
print(f"{len(wrapped)} wrapped linear modules, e.g. {next(iter(wrapped))}:")
print(next(iter(wrapped.values())))
print(f"parameters: base {n_base / 1e6:.1f} M, with LoRA experts {n_total / 1e6:.1f} M "
      f"(+{(n_total - n_base) / n_base:.0%})")
print(f"max |logits after wrap - before| = {wrap_max_abs_diff:.2e}  (0: wrapping changes nothing)")
n_wrapped = len(wrapped)
del base, wrapped, before, after

# %% [markdown]
# ## 2. A short training run
#
# `molf.lab.train.run` does everything: data, the MoLF optimizer, a cosine schedule with warm-up, logs of the
# loss, every module's gradient norms and every routing decision (with full-precision scores), evaluation
# and a merge of the adapters back into plain weights. `nb.train` gives the run a directory named after
# its config, so the other notebooks reuse this exact run instead of training it again.
#
# The cell first says how long it expects to train (from the step times of a recorded run of the same
# shape, when there is one). Run by hand, the routing map appears after the first steps and redraws as
# training goes, under one progress line with the time left; the run is the same as the runner's.

# %%
data = nb.train(method="molf", live_every=max(1, steps // 10), **nb.common, **nb.molf_hp)
stability = analysis.stability_summary(data.steps)
fig = plots.loss_curves({"molf": data}, title=f"MoLF training loss ({plots.run_title(data)})")
nb.save(fig, "loss")

# %% [markdown]
# ## 3. Which expert won where?
#
# Each cell is one wrapped module (decoder layer × projection type). Its colour is the share of steps in
# which the **FFT expert** won that module's update: red modules trained their dense weights, blue modules
# trained their LoRA expert. The paper reports that modules specialise early; with equal learning rates
# LoRA experts often win EPD early on (their `B` starts at zero, so their per-parameter gradient signal is
# large) and the learning-rate ratio shapes the map (see `05_ablations`).

# %%
fig = plots.routing_heatmap(data)
nb.save(fig, "routing_heatmap")

# %%
fig = plots.routing_summary_bars(data)
nb.save(fig, "routing_by_type")
share = analysis.overall_win_share(data)
print("share of all (module, step) decisions won:", {e: round(v, 3) for e, v in share.items()})
nb.takeaway(analysis.takeaway(data))

# %% [markdown]
# ## 4. The numbers
#
# Saved beside the executed notebook as `00_quickstart.json`. Next: `01_train` trains any method with any
# setting, `02_routing_dynamics` looks at routing over time, `03_compare_methods` puts MoLF next to FFT,
# LoRA and the adaptive-LoRA baselines.

# %%
m = data.metrics
results = {
    "notebook": nb.name, "run_dir": str(data.path), "model": model, "task": task, "steps": m["steps"],
    "n_wrapped_modules": n_wrapped, "wrap_max_abs_diff": wrap_max_abs_diff,
    "final_loss": m["final_loss"], "primary_metric": m["primary_metric"],
    "metric": (m["metrics"] or {}).get(m["primary_metric"]), "metrics": m["metrics"],
    "win_share": share, "stability": stability,
    "routing_heatmap": analysis.heatmap_cells(data),
}
nb.write_results(results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
