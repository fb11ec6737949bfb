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
# # 04 · Router explorer
#
# An interactive app (JupyterLab + ipywidgets) over a MoLF run:
#
# - **step** slider with **Play** (every step is drawn: the next one waits for the last picture), **layer** and
#   **module** pickers, and a **mode** toggle: the experts chosen at that step, or each module's cumulative
#   FFT win share up to it; **save this frame** writes the picture (PNG) and its numbers (CSV) into
#   `explorer_frames/` beside the notebook (`app.widget(save_dir=...)` for another folder);
# - left: the routing map with the selected module outlined; right: that module's scores over training and
#   every module of the selected layer at the chosen step.
#
# Open it with `jupyter lab notebooks/04_router_explorer.ipynb` and choose **Run ▸ Run All Cells**. First a
# small run trains live (its routing map redraws as it goes), then the explorer appears and answers the
# controls at once: everything after it takes a second or two. Read headlessly (papermill, GitHub) the
# widgets do not render, so the notebook also draws the final frame as a picture.
#
# *Why the live run comes first:* a kernel does one thing at a time, and a moved slider is handled only
# after every cell that "Run all" has queued. Any training placed below the explorer would leave it frozen
# until that training ends. Set `live = False` to skip the live run.

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
run_dir = None              # a run directory to explore; None: the default MoLF run (trained if missing)
live = True                 # first train a small run and redraw its routing map as it goes
live_steps = 6              # steps of the live run
live_chunk = 3              # redraw every live_chunk steps

# %%
from molf.lab import analysis, explorer, notebook, runs

nb = notebook.setup("04_router_explorer", globals())

# %% [markdown]
# ## Live mode
#
# Trains a small run in resumable chunks (`molf.lab.train.run(config, stop_after=live_chunk)`) and redraws the
# routing map after each chunk. The run is kept: a second execution shows the finished run at once.

# %%
live_result = None
if live:
    live_config = nb.run_config(method="molf", **{**nb.common, "steps": live_steps}, **nb.molf_hp,
                                   save_every=0)
    notebook.say_expected_time(live_config, live=True)
    live_result, fig = explorer.live(live_config, chunk=live_chunk)
    nb.save(fig, "live_final")

# %% [markdown]
# ## The explorer
#
# Trains (or reuses) the run to explore, then shows the app. This is the last cell that trains: the cells
# below only draw, so the controls respond as soon as the app is shown.

# %%
if run_dir is None:
    run_dir = nb.train(method="molf", **nb.common, **nb.molf_hp).path
# the same settings with the other score function, for the comparison below (02 trains it too: shared)
other_score = "pfn" if (score or "epd") == "epd" else "epd"
other_dir = nb.train(method="molf", **nb.common, **{**nb.molf_hp, "score": other_score}).path
app = explorer.RouterExplorer(run_dir)
nb.app(app.widget, app.render_final_frame)  # the app; run headless by the suite, a picture of it

# %% [markdown]
# ### The final frame (what the app shows at the last step, for static readers)
#
# The outlined module is the one that switched expert most often.

# %%
fig = app.render_final_frame()
nb.save(fig, "final_frame")
busiest = analysis.busiest_module(app.data)
nb.takeaway(analysis.takeaway(app.data) + f" The outlined module, `{busiest.removeprefix('model.')}`, switched "
            f"{int(analysis.switch_table(app.data).set_index('module').loc[busiest, 'switches'])} times.")

# %% [markdown]
# ### Share it without a kernel
#
# The same explorer as one self-contained HTML file: every step, layer and module type precomputed into
# the page, its slider, Play button and pickers run in the browser (no server, no kernel, no network).
# Send it to students; they open it from disk. Its size grows with steps x modules; past 20 MB the export
# keeps every N-th step (`every="auto"`, see docs/notebooks.md).

# %%
html_path = nb.export_html(str(app.run_dir), "explorer")

# %% [markdown]
# ### Two runs side by side: EPD against PFN
#
# The same controls drive both runs (same model, task and settings; only the score function differs): each
# run's routing map at the step, and the difference of their cumulative FFT win shares (A minus B: orange
# where A gave the module to FFT more often, purple where B did).

# %%
compare = explorer.CompareExplorer(run_dir, other_dir)
nb.app(compare.widget, compare.frame)
difference = compare.difference(int(compare.steps[-1]))
print(f"{(score or 'epd').upper()} minus {other_score.upper()}: mean FFT win share "
      f"{compare.a.cumulative[-1].mean():.0%} vs {compare.b.cumulative[-1].mean():.0%}; "
      f"{(abs(difference) > 0.5).mean():.0%} of modules differ by more than half of their steps")

# %% [markdown]
# ### Any run
#
# Every routed run (MoLF or MoLF-E) under `train_dir` (the training runs), newest first. The picker names each run by method,
# model, task and steps, and by every setting in which the listed runs differ (e.g. `lr_lora=0.0005`).

# %%
explorer.explore(nb.train_dir)

# %%
data = app.data
results = {
    "notebook": nb.name, "run_dir": str(app.run_dir), "steps_logged": len(app.steps),
    "layers": app.layers, "module_types": app.types, "html_mb": html_path.stat().st_size / 1e6,
    "compare": {"other_score": other_score, "other_run_dir": str(other_dir),
                "mean_abs_difference": float(abs(difference).mean())},
    "win_share": analysis.overall_win_share(data),
    "routing_heatmap": analysis.heatmap_cells(data),
    "live": None if live_result is None else {
        "run_dir": str(live_result.out_dir), "steps": live_result.metrics["steps"],
        "final_loss": live_result.metrics["final_loss"],
        "win_share": analysis.overall_win_share(runs.load(live_result.out_dir))},
}
nb.write_results(results)
