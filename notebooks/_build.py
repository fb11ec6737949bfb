"""Generate the notebook suite (``python notebooks/_build.py``): one source of truth for every cell.

The notebooks are committed with outputs cleared; ``python -m molf.lab.suite`` executes them with papermill.
Every notebook: a markdown story, a first code cell tagged ``parameters``, heavy code in ``molf``,
figures saved under ``figures_dir`` as ``<notebook>_<name>.png`` and key numbers in
``<runs_dir>/<notebook>.json``.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# The main job's defaults (SmolLM2-135M on 2 CPU cores: the whole suite in about 20 minutes). Every notebook
# uses the same values, so the default MoLF run is trained once and shared by all of them.
COMMON = '''model = "smollm2-135m"     # "tiny" for a 2-layer random Llama; a hub id / local path for a bigger model
task = "fact"               # "fact" (counterfactual knowledge injection), "sql" or "mcq"
steps = 20                  # optimizer steps per training run
batch_size = 4
seq_len = 64                # tokens per example (longer ones are truncated)
eval_limit = 32             # evaluation examples after training (0: skip evaluation)
seed = 0
device = "cpu"              # "cpu", "cuda" or "auto"
runs_dir = "../runs"        # training runs, executed notebooks and <notebook>.json
figures_dir = "../figures"  # PNG figures'''

MOLF_HP = '''# MoLF hyper-parameters (None = the paper's default: lr 5e-5 for both experts, one LoRA expert r=128, EPD, top-1)
lr_fft = None
lr_lora = None
ranks = None
score = None
topk = None'''

SETUP = '''%matplotlib inline
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from molf.lab import analysis, plots, runs, suite

NOTEBOOK = "{name}"
common = dict(model=model, task=task, steps=steps, batch_size=batch_size, seq_len=seq_len,
              eval_limit=eval_limit, seed=seed, device=device)
molf_hp = {{k: v for k, v in dict(lr_fft=lr_fft, lr_lora=lr_lora, ranks=ranks, score=score, topk=topk).items()
           if v is not None}}


def save(fig, name):
    """Save under figures_dir as <notebook>_<name>.png (the figure is also shown below the cell)."""
    return plots.save(fig, suite.figure_path(figures_dir, NOTEBOOK, name))'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, tags=None):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(*blocks: str):
    return code("\n".join(b.strip("\n") for b in blocks), tags=["parameters"])


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python", "codemirror_mode": {"name": "ipython", "version": 3},
                                    "file_extension": ".py", "mimetype": "text/x-python",
                                    "nbconvert_exporter": "python", "pygments_lexer": "ipython3"}
    return nb


# ---------------------------------------------------------------------------- 00 quickstart
def quickstart():
    name = "00_quickstart"
    return notebook([
        md('''
# 00 · Quickstart: MoLF in five minutes

**MoLF** (Mixture of LoRA and Full fine-tuning) turns every linear layer of a model into

$$y = W x + \\sum_i s_i\\, B_i A_i x$$

one **FFT expert** (the dense weight $W$) plus **LoRA experts** $B_i A_i$. The forward pass is dense:
every expert gets its exact gradient at every step. The sparsity lives in the optimizer: a custom
AdamW tracks Adam moments for *all* experts, scores each expert of each module (EPD: the expected loss
decrease of one Adam step, per parameter) and updates only the **top-1 expert of each module**.
So every `q_proj`, `up_proj`, ... decides on its own, at every step, whether full fine-tuning or LoRA is
the better move.

This notebook wraps SmolLM2-135M, trains a short run and shows which expert won where.
'''),
        params(COMMON, MOLF_HP),
        code(SETUP.format(name=name)),
        md('''
## 1. Wrapping a model

`molf.wrap` replaces every `nn.Linear` except `lm_head` with a `MoLFLinear`. LoRA's `B` starts at zero, so
the wrapped model computes **exactly** what the base model computes; only training changes that.
'''),
        code('''
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
'''),
        md('''
## 2. A short training run

`molf.lab.train.run` does everything: data, the MoLF optimizer, a cosine schedule with warm-up, logs of the
loss, every module's gradient norms and every routing decision (with full-precision scores), evaluation
and a merge of the adapters back into plain weights. `suite.train` gives the run a directory named after
its config, so the other notebooks reuse this exact run instead of training it again.
'''),
        code('''
data = suite.train(runs_dir, method="molf", **common, **molf_hp)
stability = analysis.stability_summary(data.steps)
fig = plots.loss_curves({"molf": data}, title=f"MoLF training loss ({plots.run_title(data)})")
save(fig, "loss")
'''),
        md('''
## 3. Which expert won where?

Each cell is one wrapped module (decoder layer × projection type). Its colour is the share of steps in
which the **FFT expert** won that module's update: red modules trained their dense weights, blue modules
trained their LoRA expert. The paper reports that modules specialise early; with equal learning rates
LoRA experts often win EPD early on (their `B` starts at zero, so their per-parameter gradient signal is
large) and the learning-rate ratio shapes the map (see `05_ablations`).
'''),
        code('''
fig = plots.routing_heatmap(data)
save(fig, "routing_heatmap")
'''),
        code('''
fig = plots.routing_summary_bars(data)
save(fig, "routing_by_type")
share = analysis.overall_win_share(data)
print("share of all (module, step) decisions won:", {e: round(v, 3) for e, v in share.items()})
'''),
        md('''
## 4. The numbers

Saved beside the executed notebook as `00_quickstart.json`. Next: `01_train` trains any method with any
setting, `02_routing_dynamics` looks at routing over time, `03_compare_methods` puts MoLF next to FFT,
LoRA and the adaptive-LoRA baselines.
'''),
        code('''
m = data.metrics
results = {
    "notebook": NOTEBOOK, "run_dir": str(data.path), "model": model, "task": task, "steps": m["steps"],
    "n_wrapped_modules": n_wrapped, "wrap_max_abs_diff": wrap_max_abs_diff,
    "final_loss": m["final_loss"], "primary_metric": m["primary_metric"],
    "metric": (m["metrics"] or {}).get(m["primary_metric"]), "metrics": m["metrics"],
    "win_share": share, "stability": stability,
    "routing_heatmap": analysis.heatmap_cells(data),
}
suite.write_results(runs_dir, NOTEBOOK, results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
'''),
    ])


# ---------------------------------------------------------------------------- 01 train
def train_nb():
    name = "01_train"
    return notebook([
        md('''
# 01 · Train one run

Every setting of `molf.lab.train.TrainConfig` is a parameter of this notebook (papermill: `-p name value`).
`None` means the method's paper default. A bad value fails in the first cell after the parameters,
with the runner's `ValueError`, before anything trains.

Methods: `fft` (dense AdamW), `lora`, `dora`, `adalora` (peft), `molf` (FFT expert + LoRA experts),
`molf_e` (MoLF-Efficient: frozen base, two LoRA experts of different ranks).
'''),
        params(COMMON, '''
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
dtype = "float32"
window = 5                  # rolling window (steps) of the stability summary
spike_k = 3.0               # a spike: loss > rolling mean + spike_k * rolling std
'''),
        code('''
%matplotlib inline
import matplotlib.pyplot as plt
import pandas as pd

from molf.lab import analysis, plots, runs, suite

NOTEBOOK = "01_train"
hp = dict(lr=lr, wd=wd, lr_fft=lr_fft, lr_lora=lr_lora, wd_fft=wd_fft, wd_lora=wd_lora, ranks=ranks,
          alphas=alphas, dropout=dropout, score=score, topk=topk, freeze_non_linear=freeze_non_linear)
settings = dict(model=model, task=task, method=method, steps=steps, epochs=epochs, batch_size=batch_size,
                grad_accum=grad_accum, seq_len=seq_len, schedule=schedule, warmup_ratio=warmup_ratio,
                max_grad_norm=max_grad_norm, seed=seed, train_limit=train_limit, eval_split=eval_split,
                eval_limit=eval_limit, device=device, dtype=dtype,
                **{k: v for k, v in hp.items() if v is not None})
config = suite.run_config(runs_dir, **settings)   # validates every value: a bad one stops here
print("run directory:", config.out_dir)
pd.Series({k: v for k, v in vars(config).items() if k != "out_dir"}, dtype=object).to_frame("resolved config")
'''),
        code('''
def save(fig, name):
    return plots.save(fig, suite.figure_path(figures_dir, NOTEBOOK, name))

data = suite.train(runs_dir, **settings)
'''),
        md('''
## Loss

Thin line: the loss of each step; thick: its rolling mean; crosses: spikes (a loss above the rolling mean
of the previous steps by more than `spike_k` standard deviations). The lower panel is the rolling
standard deviation: how noisy training is.
'''),
        code('''
stability = analysis.stability_summary(data.steps, window=window, k=spike_k)
fig = plots.loss_curves({method: data}, window=window, k=spike_k, title=f"Training loss: {plots.run_title(data)}")
save(fig, "loss")
pd.Series(stability, dtype=object).to_frame("stability")
'''),
        code('''
fig = plots.lr_curve(data)
save(fig, "lr")
'''),
        md('''
## Gradient norms

Left: the global gradient norm before clipping. Right: the mean gradient norm of each adapted module per
layer; for MoLF one line per expert, since every expert receives its gradient at every step whether or
not it wins the update.
'''),
        code('''
fig = plots.grad_norm_plot(data)
save(fig, "grad_norms")
'''),
        md('''
## Routing (MoLF and MoLF-E only)

Where the FFT expert (MoLF) or the larger LoRA expert (MoLF-E) won, per layer and module type.
'''),
        code('''
routed = data.routing is not None
if routed:
    fig = plots.routing_heatmap(data)
    save(fig, "routing_heatmap")
else:
    print(f"{method} does not route: no routing map")
'''),
        code('''
m = data.metrics
results = {
    "notebook": NOTEBOOK, "run_dir": str(data.path), "config": data.config, "steps": m["steps"],
    "final_loss": m["final_loss"], "primary_metric": m["primary_metric"],
    "metric": (m["metrics"] or {}).get(m["primary_metric"]), "metrics": m["metrics"],
    "train_time_s": m["train_time_s"], "step_time_s": m["step_time_s"],
    "trainable_params": m["trainable_params"], "optimizer_state_bytes": m["optimizer_state_bytes"],
    "peak_memory_bytes": m["peak_memory_bytes"], "stability": stability,
    "win_share": analysis.overall_win_share(data) if routed else None,
    "routing_heatmap": analysis.heatmap_cells(data) if routed else None,
}
suite.write_results(runs_dir, NOTEBOOK, results)
pd.Series({k: v for k, v in results.items() if not isinstance(v, (dict, list))}, dtype=object)
'''),
    ])


# ---------------------------------------------------------------------------- 02 routing dynamics
def routing_nb():
    name = "02_routing_dynamics"
    return notebook([
        md('''
# 02 · Routing dynamics

What does the router actually do? From one MoLF run (the same run as `00_quickstart` when the settings
are equal) we look at

1. **where** the FFT expert wins (layer × module type),
2. **when**: the same map over windows of training steps (does each module specialise early?),
3. **how often** each module switches expert,
4. the **scores** behind the decisions for a few modules,
5. **EPD vs PFN**: the paper's score against its scale-invariant ablation.
'''),
        params(COMMON, MOLF_HP, '''
windows = 5                 # windows of steps for the routing-over-time figure
trace_modules = None        # module names to trace, e.g. ["model.layers.0.self_attn.q_proj"]; None: picked
'''),
        code(SETUP.format(name=name)),
        code('''
data = suite.train(runs_dir, method="molf", **common, **molf_hp)
'''),
        md('''
## 1. Where: the routing map

One cell per wrapped module; the value is the share of steps its FFT expert won (1: it always trained the
dense weight; 0: always its LoRA expert).
'''),
        code('''
fig = plots.routing_heatmap(data)
save(fig, "routing_heatmap")
heatmap = analysis.heatmap_cells(data)
print(f"{len(heatmap)} modules; FFT won {analysis.overall_win_share(data)['fft']:.1%} of all decisions")
'''),
        md('''
## 2. When: routing over training time

If the lines are flat from the first window, modules pick their expert early and keep it (the paper's
"early specialisation"); drifting lines mean the preference changes as training proceeds (for example
once the warm-up ends or the cosine schedule decays).
'''),
        code('''
fig = plots.win_fraction_over_time(data, windows=windows)
save(fig, "routing_over_time")
over_time = analysis.windowed_win_fraction(data, windows=windows)
per_window = over_time.groupby("window").agg(step_start=("step_start", "first"), step_end=("step_end", "first"),
                                             fft_win_fraction=("win_fraction", "mean"))
per_window
'''),
        md('''
## 3. How often: switch frequency

The share of consecutive step pairs in which the module's winner changed. 0 = the module never changed
its mind; values near 1 = it alternates almost every step (the two experts' scores are close).
'''),
        code('''
fig = plots.switch_frequency_plot(data)
save(fig, "switch_frequency")
switches = analysis.switch_table(data)
switches.groupby("module_type")["switch_rate"].mean().rename("mean switch rate").to_frame().T
'''),
        md('''
## 4. Why: the scores

EPD scores are tiny numbers (1e-12..1e-6), so they are drawn on a log scale; a filled dot marks the
expert that won the step. Picked by default: the module that switched most, the most FFT-dominated,
the most LoRA-dominated and a few spread over the layers.
'''),
        code('''
modules = trace_modules or analysis.pick_trace_modules(data, n=3)
fig = plots.score_traces(data, modules)
save(fig, "score_traces")
'''),
        md('''
## 5. EPD vs PFN

EPD multiplies the preconditioned gradient signal by the expert's learning rate and is not
scale-invariant on purpose; PFN is the norm of the Adam direction alone. Same data, same seed, same
learning rates; only the score differs.
'''),
        code('''
other = "pfn" if (score or "epd") == "epd" else "epd"
contrast = suite.train(runs_dir, method="molf", **common, **{**molf_hp, "score": other})
labels = {(score or "epd").upper(): data, other.upper(): contrast}
fig = plots.compare_heatmaps(labels, title="EPD vs PFN: share of steps won by the FFT expert")
save(fig, "epd_vs_pfn")
'''),
        code('''
results = {
    "notebook": NOTEBOOK, "run_dir": str(data.path), "steps": data.metrics["steps"],
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
suite.write_results(runs_dir, NOTEBOOK, results)
print({k: results[k] for k in ("win_share", "mean_switch_rate")}, results["contrast"]["win_share"])
'''),
    ])


# ---------------------------------------------------------------------------- 03 compare methods
def compare_nb():
    name = "03_compare_methods"
    return notebook([
        md('''
# 03 · FFT, LoRA, MoLF and friends on one task

The same data, order, schedule, batch, seed and evaluation for every method; only the adaptation
differs. Each method uses the paper's hyper-parameters unless overridden. What we compare:

- **loss** curves and their **stability** (rolling std, spikes),
- **per-layer gradient norms** (the gradient of each adapted module's trainable parameters),
- the **task metric** after training,
- the **cost**: trainable parameters, optimizer memory and time per step.

With a few dozen steps on a 135M model the metric differences are within noise; the point of the
default run is the machinery and the cost profile. Pass more steps (and a GPU) for real comparisons.
'''),
        params(COMMON, MOLF_HP, '''
methods = ["fft", "lora", "dora", "adalora", "molf", "molf_e"]
lr = None                   # fft and the LoRA family (None: fft 5e-5, LoRA family 5e-4)
method_overrides = {}       # e.g. {"lora": {"ranks": [16]}, "molf_e": {"lr_lora": 1e-4}}
window = 5                  # rolling window (steps) of the stability summary
spike_k = 3.0
'''),
        code(SETUP.format(name=name)),
        code('''
def settings_for(method):
    kw = dict(method=method, **common)
    if method in ("molf", "molf_e"):
        kw.update({k: v for k, v in molf_hp.items() if method == "molf" or k in ("lr_fft", "lr_lora", "score", "topk")})
    elif lr is not None:
        kw["lr"] = lr
    kw.update(method_overrides.get(method, {}))
    return kw

unknown = sorted(set(method_overrides) - set(methods))
if unknown:
    raise ValueError(f"method_overrides names methods not in methods: {unknown}")
configs = {m: suite.run_config(runs_dir, **settings_for(m)) for m in methods}  # validate all first
all_runs = {m: suite.train(runs_dir, **settings_for(m)) for m in methods}
'''),
        md('''
## Loss and stability
'''),
        code('''
fig = plots.loss_curves(all_runs, window=window, k=spike_k,
                        title=f"Training loss per method ({model}, {task}, {steps} steps)")
save(fig, "loss")
stability = {m: analysis.stability_summary(d.steps, window=window, k=spike_k) for m, d in all_runs.items()}
pd.DataFrame(stability).T[["final_loss", "min_loss", "rolling_std_mean", "rolling_std_max", "n_spikes"]]
'''),
        md('''
## Gradient norms per layer

FFT's gradient covers each whole weight matrix; LoRA-family methods only their low-rank factors; MoLF
carries both (the dense forward gives every expert its gradient, the router decides which one moves).
'''),
        code('''
fig = plots.grad_norms_per_layer(all_runs)
save(fig, "grad_norms")
'''),
        md('''
## Final metrics and cost
'''),
        code('''
table = analysis.metrics_table(all_runs)
fig = plots.metrics_overview(table, title=f"After {steps} steps on {task} ({model})")
save(fig, "metrics")
fig = plots.cost_overview(table, title=f"Cost per method ({model}, batch {batch_size} x {seq_len} tokens)")
save(fig, "cost")
table.set_index("run")
'''),
        code('''
results = {
    "notebook": NOTEBOOK, "methods": methods, "steps": steps,
    "table": table.to_dict(orient="records"),
    "stability": stability,
    "run_dirs": {m: str(d.path) for m, d in all_runs.items()},
    "routing_heatmap": {m: analysis.heatmap_cells(d) for m, d in all_runs.items() if d.routing is not None},
}
suite.write_results(runs_dir, NOTEBOOK, results)
'''),
    ])


# ---------------------------------------------------------------------------- 04 router explorer
def explorer_nb():
    name = "04_router_explorer"
    return notebook([
        md('''
# 04 · Router explorer

An interactive app (JupyterLab + ipywidgets) over a MoLF run:

- **step** slider (▶ plays through training), **layer** and **module** pickers, and a **mode** toggle:
  the experts chosen at that step, or each module's cumulative FFT win share up to it;
- left: the routing map with the selected module outlined; right: that module's scores over training
  and every module of the selected layer at the chosen step.

Open it with `jupyter lab notebooks/04_router_explorer.ipynb` and run all cells. Read headlessly
(papermill, GitHub) the widgets do not render, so the notebook also draws the final frame as a picture.
'''),
        params(COMMON, MOLF_HP, '''
run_dir = None              # a run directory to explore; None: the default MoLF run (trained if missing)
live = True                 # train a small run and redraw its routing map as it goes
live_steps = 6              # steps of the live run
live_chunk = 3              # redraw every live_chunk steps
'''),
        code(SETUP.format(name=name)),
        code('''
from molf.lab import explorer

if run_dir is None:
    run_dir = suite.train(runs_dir, method="molf", **common, **molf_hp).path
app = explorer.RouterExplorer(run_dir)
app.widget()
'''),
        md('''
### The final frame (what the app shows at the last step, for static readers)

The outlined module is the one that switched expert most often.
'''),
        code('''
fig = app.render_final_frame()
save(fig, "final_frame")
'''),
        md('''
### Any run

Every routed run (MoLF or MoLF-E) under `runs_dir`, newest first.
'''),
        code('''
explorer.explore(runs_dir)
'''),
        md('''
## Live mode

Trains a small run in resumable chunks (`molf.lab.train.run(config, stop_after=live_chunk)`) and redraws the
routing map after each chunk. The run is kept: a second execution shows the finished run at once.
'''),
        code('''
live_result = None
if live:
    live_config = suite.run_config(runs_dir, method="molf", **{**common, "steps": live_steps}, **molf_hp,
                                   save_every=0)
    live_result, fig = explorer.live(live_config, chunk=live_chunk)
    save(fig, "live_final")
'''),
        code('''
data = app.data
results = {
    "notebook": NOTEBOOK, "run_dir": str(app.run_dir), "steps_logged": len(app.steps),
    "layers": app.layers, "module_types": app.types,
    "win_share": analysis.overall_win_share(data),
    "routing_heatmap": analysis.heatmap_cells(data),
    "live": None if live_result is None else {
        "run_dir": str(live_result.out_dir), "steps": live_result.metrics["steps"],
        "final_loss": live_result.metrics["final_loss"],
        "win_share": analysis.overall_win_share(runs.load(live_result.out_dir))},
}
suite.write_results(runs_dir, NOTEBOOK, results)
'''),
    ])


# ---------------------------------------------------------------------------- 05 ablations
def ablation_nb():
    name = "05_ablations"
    return notebook([
        md('''
# 05 · Ablations: what shapes the routing?

Starting from the default MoLF run, one knob at a time:

| knob | values | question |
|---|---|---|
| score function | EPD, PFN | does scale-invariance change who wins? |
| top-k | 1, 2 | top-2 of two experts = dense update of both (no routing) |
| LoRA rank | e.g. 16, 128 | does a smaller LoRA expert win less often? |
| lr_lora / lr_fft | e.g. 0.1, 1, 10 | EPD scales with the learning rate: the ratio tilts the routing |

Each figure shows the FFT win share per module type (left) and the task metric and final loss (right).
Runs equal to the default run (or to `02`'s PFN run) are reused, not retrained.
'''),
        params(COMMON, '''
lr_fft = 5e-5               # the FFT expert's learning rate (held fixed in the ratio ablation)
lr_lora = 5e-5
ranks = [128]
score = "epd"
topk = 1
scores = ["epd", "pfn"]
topks = [1, 2]
rank_grid = [16, 128]
lr_ratios = [0.1, 1.0, 10.0]  # lr_lora / lr_fft
'''),
        code(SETUP.format(name=name)),
        code('''
base = dict(method="molf", **common, lr_fft=lr_fft, lr_lora=lr_lora, ranks=list(ranks), score=score, topk=topk)
axes = {
    "score function": {s.upper(): {"score": s} for s in scores},
    "top-k": {f"k={k}": {"topk": k} for k in topks},
    "LoRA rank": {f"r={r}": {"ranks": [r]} for r in rank_grid},
    "lr_lora / lr_fft": {f"{q:g}x": {"lr_lora": lr_fft * q} for q in lr_ratios},
}
for axis, settings in axes.items():   # validate every setting before training any
    for change in settings.values():
        suite.run_config(runs_dir, **{**base, **change})
ablations = {axis: {label: suite.train(runs_dir, **{**base, **change}) for label, change in settings.items()}
             for axis, settings in axes.items()}
'''),
        code('''
summary = []
for axis, runs_of_axis in ablations.items():
    slug = {"score function": "score", "top-k": "topk", "LoRA rank": "rank", "lr_lora / lr_fft": "lr_ratio"}[axis]
    save(plots.ablation_plot(runs_of_axis, axis), slug)
    for label, d in runs_of_axis.items():
        m = d.metrics
        summary.append({"axis": axis, "setting": label, "fft_win_share": analysis.overall_win_share(d)["fft"],
                        "mean_switch_rate": float(analysis.switch_table(d)["switch_rate"].mean()),
                        "final_loss": m["final_loss"], "primary_metric": m["primary_metric"],
                        "metric": (m["metrics"] or {}).get(m["primary_metric"]), "run_dir": str(d.path)})
summary = pd.DataFrame(summary)
summary.drop(columns="run_dir")
'''),
        md('''
Reading the table: with top-2 of two experts every module updates both, so the FFT win share is 1 by
construction. In the learning-rate ratio rows, raising `lr_lora` multiplies every LoRA EPD score by the
same factor, so the map tilts towards LoRA; lowering it hands modules to the FFT expert.
'''),
        code('''
results = {"notebook": NOTEBOOK, "steps": steps, "ablations": summary.to_dict(orient="records"),
           "routing_heatmap": {f"{r['axis']}: {r['setting']}": analysis.heatmap_cells(ablations[r['axis']][r['setting']])
                               for r in summary.to_dict(orient="records")}}
suite.write_results(runs_dir, NOTEBOOK, results)
'''),
    ])


BUILDERS = {"00_quickstart": quickstart, "01_train": train_nb, "02_routing_dynamics": routing_nb,
            "03_compare_methods": compare_nb, "04_router_explorer": explorer_nb, "05_ablations": ablation_nb}


def main():
    for name, build in BUILDERS.items():
        nb = build()
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
