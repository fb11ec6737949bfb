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
# # 02 · Routing dynamics
#
# What does the router actually do? From one MoLF run (the same run as `00_quickstart` when the settings
# are equal) we look at
#
# 1. **where** the FFT expert wins (layer × module type),
# 2. **when**: the same map over windows of training steps (does each module specialise early?),
# 3. **how often** each module switches expert,
# 4. the **scores** behind the decisions for a few modules,
# 5. **EPD vs PFN**: the paper's score against its scale-invariant ablation.

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
windows = 5                 # windows of steps for the routing-over-time figure
trace_modules = None        # module names to trace, e.g. ["model.layers.0.self_attn.q_proj"]; None: picked

# %%
from molf.lab import analysis, notebook, plots

nb = notebook.setup("02_routing_dynamics", globals())

# %%
data = nb.train(method="molf", **nb.common, **nb.molf_hp)

# %% [markdown]
# ## 1. Where: the routing map
#
# One cell per wrapped module; the value is the share of steps its FFT expert won (1: it always trained the
# dense weight; 0: always its LoRA expert).

# %%
fig = plots.routing_heatmap(data)
nb.save(fig, "routing_heatmap")
heatmap = analysis.heatmap_cells(data)
print(f"{len(heatmap)} modules; FFT won {analysis.overall_win_share(data)['fft']:.1%} of all decisions")
nb.takeaway(analysis.takeaway(data))

# %% [markdown]
# ## 2. When: routing over training time
#
# If the lines are flat from the first window, modules pick their expert early and keep it (the paper's
# "early specialisation"); drifting lines mean the preference changes as training proceeds (for example
# once the warm-up ends or the cosine schedule decays).

# %%
fig = plots.win_fraction_over_time(data, windows=windows)
nb.save(fig, "routing_over_time")
over_time = analysis.windowed_win_fraction(data, windows=windows)
per_window = over_time.groupby("window").agg(step_start=("step_start", "first"), step_end=("step_end", "first"),
                                             fft_win_fraction=("win_fraction", "mean"))
per_window

# %% [markdown]
# ## 3. How often: switch frequency
#
# The share of consecutive step pairs in which the module's winner changed. 0 = the module never changed
# its mind; values near 1 = it alternates almost every step (the two experts' scores are close).

# %%
fig = plots.switch_frequency_plot(data)
nb.save(fig, "switch_frequency")
switches = analysis.switch_table(data)
switches.groupby("module_type")["switch_rate"].mean().rename("mean switch rate").to_frame().T

# %% [markdown]
# ## 4. Why: the scores
#
# EPD scores are tiny numbers (1e-12..1e-6), so they are drawn on a log scale; a filled dot marks the
# expert that won the step. Picked by default: the module that switched most, the most FFT-dominated,
# the most LoRA-dominated and a few spread over the layers.

# %%
modules = trace_modules or analysis.pick_trace_modules(data, n=3)
fig = plots.score_traces(data, modules)
nb.save(fig, "score_traces")

# %% [markdown]
# ## 5. EPD vs PFN
#
# EPD multiplies the preconditioned gradient signal by the expert's learning rate and is not
# scale-invariant on purpose; PFN is the norm of the Adam direction alone. Same data, same seed, same
# learning rates; only the score differs.

# %%
other = "pfn" if (score or "epd") == "epd" else "epd"
contrast = nb.train(method="molf", **nb.common, **{**nb.molf_hp, "score": other})
labels = {(score or "epd").upper(): data, other.upper(): contrast}
fig = plots.compare_heatmaps(labels, title="EPD vs PFN: share of steps won by the FFT expert")
nb.save(fig, "epd_vs_pfn")
shares = {name: analysis.overall_win_share(run)["fft"] for name, run in labels.items()}
nb.takeaway("**EPD vs PFN in this run:** the FFT expert won " + " and ".join(
    f"**{share:.0%}** of decisions under {name}" for name, share in shares.items())
    + ". PFN compares the Adam direction's norm alone, so the dense weight's many parameters weigh in; "
      "EPD also weighs each expert's learning rate and gradient signal.")

# %%
results = {
    "notebook": nb.name, "run_dir": str(data.path), "steps": data.metrics["steps"],
    "win_share": analysis.overall_win_share(data),
    "routing_heatmap": heatmap,
    "routing_over_time": per_window.reset_index().to_dict(orient="records"),
    "switch_rate": {r.module: r.switch_rate for r in switches.itertuples()},
    "mean_switch_rate": float(switches["switch_rate"].mean()),
    "traced_modules": modules,
    "contrast": {"score": other, "run_dir": str(contrast.path),
                 "win_share": analysis.overall_win_share(contrast),
                 "routing_heatmap": analysis.heatmap_cells(contrast)},
}
nb.write_results(results)
print({k: results[k] for k in ("win_share", "mean_switch_rate")}, results["contrast"]["win_share"])
