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
# # 05 · Ablations: what shapes the routing?
#
# Starting from the default MoLF run, one knob at a time:
#
# | knob | values | question |
# |---|---|---|
# | score function | EPD, PFN | does scale-invariance change who wins? |
# | top-k | 1, 2 | top-2 of two experts = dense update of both (no routing) |
# | LoRA rank | e.g. 16, 128 | does a smaller LoRA expert win less often? |
# | lr_lora / lr_fft | e.g. 0.1, 1, 10 | EPD scales with the learning rate: the ratio tilts the routing |
#
# Each figure shows the FFT win share per module type (left) and the task metric and final loss (right).
# Runs equal to the default run (or to `02`'s PFN run) are reused, not retrained.

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
lr_fft = 5e-5               # the FFT expert's learning rate (held fixed in the ratio ablation)
lr_lora = 5e-5
ranks = [128]
score = "epd"
topk = 1
scores = ["epd", "pfn"]
topks = [1, 2]
rank_grid = [16, 128]
lr_ratios = [0.1, 1.0, 10.0]  # lr_lora / lr_fft

# %%
import pandas as pd

from molf.lab import analysis, notebook, plots

nb = notebook.setup("05_ablations", globals())

# %%
base = dict(method="molf", **nb.common, lr_fft=lr_fft, lr_lora=lr_lora, ranks=list(ranks), score=score, topk=topk)
axes = {
    "score function": {s.upper(): {"score": s} for s in scores},
    "top-k": {f"k={k}": {"topk": k} for k in topks},
    "LoRA rank": {f"r={r}": {"ranks": [r]} for r in rank_grid},
    "lr_lora / lr_fft": {f"{q:g}x": {"lr_lora": lr_fft * q} for q in lr_ratios},
}
for settings in axes.values():   # validate every setting before training any
    for change in settings.values():
        nb.run_config(**{**base, **change})
ablations = {axis: {label: nb.train(**{**base, **change}) for label, change in settings.items()}
             for axis, settings in axes.items()}

# %%
summary = []
for axis, runs_of_axis in ablations.items():
    slug = {"score function": "score", "top-k": "topk", "LoRA rank": "rank", "lr_lora / lr_fft": "lr_ratio"}[axis]
    nb.save(plots.ablation_plot(runs_of_axis, axis), slug)
    for label, d in runs_of_axis.items():
        m = d.metrics
        summary.append({"axis": axis, "setting": label, "fft_win_share": analysis.overall_win_share(d)["fft"],
                        "mean_switch_rate": float(analysis.switch_table(d)["switch_rate"].mean()),
                        "final_loss": m["final_loss"], "primary_metric": m["primary_metric"],
                        "metric": (m["metrics"] or {}).get(m["primary_metric"]), "run_dir": str(d.path)})
summary = pd.DataFrame(summary)
lr_rows = summary[summary["axis"] == "lr_lora / lr_fft"]
nb.takeaway("**In these runs:** the FFT expert's share of decisions moved with the lr ratio from "
            + ", ".join(f"**{r.fft_win_share:.0%}** at {r.setting}" for r in lr_rows.itertuples())
            + "; by score function it was " + ", ".join(
                f"**{r.fft_win_share:.0%}** ({r.setting})" for r in summary[summary["axis"] == "score function"].itertuples())
            + f". Final losses spread over {summary['final_loss'].min():.3f}..{summary['final_loss'].max():.3f}.")
summary.drop(columns="run_dir")

# %% [markdown]
# Reading the table: with top-2 of two experts every module updates both, so the FFT win share is 1 by
# construction. In the learning-rate ratio rows, raising `lr_lora` multiplies every LoRA EPD score by the
# same factor, so the map tilts towards LoRA; lowering it hands modules to the FFT expert.

# %%
results = {"notebook": nb.name, "steps": steps, "ablations": summary.to_dict(orient="records"),
           "routing_heatmap": {f"{r['axis']}: {r['setting']}": analysis.heatmap_cells(ablations[r['axis']][r['setting']])
                               for r in summary.to_dict(orient="records")}}
nb.write_results(results)
