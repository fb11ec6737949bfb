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
# # 03 · FFT, LoRA, MoLF and friends on one task
#
# The same data, order, schedule, batch, seed and evaluation for every method; only the adaptation
# differs. Each method uses the paper's hyper-parameters unless overridden. What we compare:
#
# - **loss** curves and their **stability** (rolling std, spikes),
# - **per-layer gradient norms** (the gradient of each adapted module's trainable parameters),
# - the **task metric** after training,
# - the **cost**: trainable parameters, optimizer memory and time per step.
#
# With a few dozen steps on a 135M model the metric differences are within noise; the point of the
# default run is the machinery and the cost profile. Pass more steps (and a GPU) for real comparisons.

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
methods = ["fft", "lora", "dora", "adalora", "molf", "molf_e"]
lr = None                   # fft and the LoRA family (None: fft 5e-5, LoRA family 5e-4)
method_overrides = {}       # e.g. {"lora": {"ranks": [16]}, "molf_e": {"lr_lora": 1e-4}}
window = 5                  # rolling window (steps) of the stability summary
spike_k = 3.0

# %%
import pandas as pd

from molf.lab import analysis, notebook, plots

nb = notebook.setup("03_compare_methods", globals())

# %%
def settings_for(method):
    kw = dict(method=method, **nb.common)
    if method in ("molf", "molf_e"):
        kw.update({k: v for k, v in nb.molf_hp.items() if method == "molf" or k in ("lr_fft", "lr_lora", "score", "topk")})
    elif lr is not None:
        kw["lr"] = lr
    kw.update(method_overrides.get(method, {}))
    return kw

unknown = sorted(set(method_overrides) - set(methods))
if unknown:
    raise ValueError(f"method_overrides names methods not in methods: {unknown}")
configs = {m: nb.run_config(**settings_for(m)) for m in methods}  # validate all first
all_runs = {m: nb.train(**settings_for(m)) for m in methods}

# %% [markdown]
# ## Loss and stability

# %%
fig = plots.loss_curves(all_runs, window=window, k=spike_k,
                        title=f"Training loss per method ({model}, {task}, {steps} steps)")
nb.save(fig, "loss")
stability = {m: analysis.stability_summary(d.steps, window=window, k=spike_k) for m, d in all_runs.items()}
pd.DataFrame(stability).T[["final_loss", "min_loss", "rolling_std_mean", "rolling_std_max", "n_spikes"]]

# %% [markdown]
# ## Gradient norms per layer
#
# FFT's gradient covers each whole weight matrix; LoRA-family methods only their low-rank factors; MoLF
# carries both (the dense forward gives every expert its gradient, the router decides which one moves).

# %%
fig = plots.grad_norms_per_layer(all_runs)
nb.save(fig, "grad_norms")

# %% [markdown]
# ## Final metrics and cost

# %%
table = analysis.metrics_table(all_runs)
fig = plots.metrics_overview(table, title=f"After {steps} steps on {task} ({model})")
nb.save(fig, "metrics")
fig = plots.cost_overview(table, title=f"Cost per method ({model}, batch {batch_size} x {seq_len} tokens)")
nb.save(fig, "cost")
table.set_index("run")

# %%
final = {m: d.metrics["final_loss"] for m, d in all_runs.items()}
primary = {m: d.metrics["primary_metric"] for m, d in all_runs.items()}
scored = {m: (d.metrics["metrics"] or {}).get(primary[m]) for m, d in all_runs.items()}
scored = {m: v for m, v in scored.items() if v is not None}
lowest = min(final, key=final.get)
text = (f"**In these runs** ({steps} steps each, one seed): the lowest final training loss is "
        f"{plots.method_label(lowest)}'s ({final[lowest]:.3f}), the highest "
        f"{plots.method_label(max(final, key=final.get))}'s ({max(final.values()):.3f}).")
if scored and max(scored.values()) == min(scored.values()):
    text += (f" On {primary[lowest]}, every method scores {max(scored.values()):.3f}: this budget does not "
             "separate them.")
elif scored:
    best = max(scored, key=scored.get)
    text += (f" On {primary[best]}, {plots.method_label(best)} scores highest (**{scored[best]:.3f}**), "
             f"{plots.method_label(min(scored, key=scored.get))} lowest ({min(scored.values()):.3f}).")
nb.takeaway(text + " One seed and a short budget make each number one draw: which gaps hold across seeds and "
            "items is what the evidence tables (docs/evidence.md) test.")

# %%
results = {
    "notebook": nb.name, "methods": methods, "steps": steps,
    "table": table.to_dict(orient="records"),
    "stability": stability,
    "run_dirs": {m: str(d.path) for m, d in all_runs.items()},
    "routing_heatmap": {m: analysis.heatmap_cells(d) for m, d in all_runs.items() if d.routing is not None},
}
nb.write_results(results)
