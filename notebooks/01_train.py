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
# # 01 · Train one run
#
# Every setting of `molf.lab.train.TrainConfig` is a parameter of this notebook (papermill: `-p name value`),
# except `out_dir`: the run's directory under `train_dir` is named after its config. `None` means the
# method's paper default. A bad value fails in the first cell after the parameters,
# with the runner's `ValueError`, before anything trains.
#
# Methods: `fft` (dense AdamW), `lora`, `dora`, `adalora` (peft), `molf` (FFT expert + LoRA experts),
# `molf_e` (MoLF-Efficient: frozen base, two LoRA experts of different ranks).

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
method = "molf"             # fft, lora, dora, adalora, molf, molf_e
epochs = None               # train for this many epochs instead (then also pass steps None)
grad_accum = 1
schedule = "cosine"         # cosine, linear, constant
warmup_ratio = 0.1
max_grad_norm = 1.0
lr = None                   # fft and the LoRA family
wd = None
lr_fft = None               # molf / molf_e
lr_lora = None
wd_fft = None
wd_lora = None
ranks = None                # e.g. [128] for molf, [16, 128] for molf_e, [32] for lora
alphas = None
dropout = None
score = None                # "epd" or "pfn"
topk = None
freeze_non_linear = None    # molf_e: also freeze embeddings and norms
train_limit = None
eval_split = "test"
dtype = "float32"           # "float32" or "bfloat16": the weights' dtype
autocast = False            # bf16 autocast of forward and loss (weights stay in dtype)
gradient_checkpointing = False
optimizer_impl = "auto"     # MoLFAdamW's step (molf, molf_e): "auto" (eager) or "compiled" (C++ kernels, CPU)
eval_batch_size = 16
save_every = 50             # checkpoint every N steps (and at the end); 0: only at the end
save_model = False          # write the merged final model to the run directory
keep_checkpoint = False     # keep checkpoint.pt once the run has finished
log_grad_norms = True
log_routing = True
log_tensorboard = False     # also write TensorBoard events to the run directory's tensorboard/ folder
window = 5                  # rolling window (steps) of the stability summary
spike_k = 3.0               # a spike: loss > rolling mean + spike_k * rolling std

# %%
import pandas as pd

from molf.lab import analysis, notebook, plots

nb = notebook.setup("01_train", globals())
settings = notebook.train_settings(globals())  # every TrainConfig field, as set above
config = nb.run_config(**settings)   # validates every value: a bad one stops here
print("run directory:", config.out_dir)
pd.Series({k: v for k, v in vars(config).items() if k != "out_dir"}, dtype=object).to_frame("resolved config")

# %%
data = nb.train(**settings)

# %% [markdown]
# ## Loss
#
# Thin line: the loss of each step; thick: its rolling mean; crosses: spikes (a loss above the rolling mean
# of the previous steps by more than `spike_k` standard deviations). The lower panel is the rolling
# standard deviation: how noisy training is.

# %%
stability = analysis.stability_summary(data.steps, window=window, k=spike_k)
fig = plots.loss_curves({method: data}, window=window, k=spike_k, title=f"Training loss: {plots.run_title(data)}")
nb.save(fig, "loss")
pd.Series(stability, dtype=object).to_frame("stability")

# %%
fig = plots.lr_curve(data)
nb.save(fig, "lr")

# %% [markdown]
# ## Gradient norms
#
# Left: the global gradient norm before clipping. Right: the mean gradient norm of each adapted module per
# layer; for MoLF one line per expert, since every expert receives its gradient at every step whether or
# not it wins the update.

# %%
fig = plots.grad_norm_plot(data)
nb.save(fig, "grad_norms")

# %% [markdown]
# ## Routing (MoLF and MoLF-E only)
#
# Where the FFT expert (MoLF) or the larger LoRA expert (MoLF-E) won, per layer and module type.

# %%
routed = data.routing is not None
if routed:
    fig = plots.routing_heatmap(data)
    nb.save(fig, "routing_heatmap")
else:
    print(f"{method} does not route: no routing map")

# %%
losses = data.steps["loss"]
metric_name = data.metrics["primary_metric"]
metric_value = (data.metrics["metrics"] or {}).get(metric_name)
nb.takeaway(f"**In this run** ({method} on {task}, {len(losses)} steps): the training loss went from "
            f"{losses.iloc[0]:.3f} to {losses.iloc[-1]:.3f} nats/token"
            + (f", and {metric_name} after training is **{metric_value:.3f}**" if metric_value is not None else "")
            + "." + ("" if routed else f" {method} has one optimizer: nothing is routed."))
if routed:
    nb.takeaway(analysis.takeaway(data))

# %%
m = data.metrics
results = {
    "notebook": nb.name, "run_dir": str(data.path), "config": data.config, "steps": m["steps"],
    "final_loss": m["final_loss"], "primary_metric": m["primary_metric"],
    "metric": (m["metrics"] or {}).get(m["primary_metric"]), "metrics": m["metrics"],
    "train_time_s": m["train_time_s"], "step_time_s": m["step_time_s"],
    "trainable_params": m["trainable_params"], "optimizer_state_bytes": m["optimizer_state_bytes"],
    "peak_memory_bytes": m["peak_memory_bytes"], "stability": stability,
    "win_share": analysis.overall_win_share(data) if routed else None,
    "routing_heatmap": analysis.heatmap_cells(data) if routed else None,
}
nb.write_results(results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))}, dtype=object)
