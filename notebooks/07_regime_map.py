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
# # 07 · The regime map: when does LoRA win, when does FFT win, and does MoLF's router follow?
#
# MoLF exists because neither full fine-tuning (FFT) nor LoRA wins everywhere: its router is meant to find,
# module by module, which one to update. On the suite's language tasks FFT is level with LoRA or ahead, so
# the premise cannot be seen there. This notebook builds a small world in which the answer **does** change,
# and measures it properly.
#
# **The setting.** A "pretrained" network `Linear(64, 128) → tanh → Linear(128, 64)`. The fine-tuning
# target is the same network with each weight moved by a random matrix of **rank k** (its size fixed at
# half the weight's norm). We see **n** noisy input/output pairs of the target. A LoRA adapter of rank 4
# can represent a rank-1 move exactly and a rank-64 move not at all; FFT can represent both, but has 50×
# more parameters to fit from the same n examples. So we expect LoRA to win at small k, FFT at large k,
# and the noise and n to move the border.
#
# **The protocol.** Every method (FFT, LoRA and DoRA through peft, MoLF, dense top-2, MoLF-Efficient) is
# trained at several learning rates on the same data; each method's learning rate (MoLF: the pair
# `lr_fft` × `lr_lora`) is picked on clean validation inputs, and the reported number is the MSE on other
# clean test inputs. 20 seeds per cell (a seed draws the base network, the shift and the data), compared
# seed by seed (paired bootstrap, `molf.lab.stats`). MoLF appears twice: **tuned** (its best pair in each
# cell) and **fixed** (one pair for the whole map: the pair best on average). The fixed row is the test of
# the router itself: with its settings frozen, does it follow the winner from cell to cell?
#
# The map was computed once (`python -m molf.lab.regime --run results/regime_map.csv`: 4,840 training runs,
# about 7 CPU-minutes, see `benchmarks/bench_regime.py`) and is read here; `python -m molf.lab.regime
# --claims --from results/regime_map.csv` prints the same table and claim lines.

# %% tags=["parameters"]
map_csv = "../results/regime_map.csv"  # the map's runs; missing: the small regression slice stands in
margin = 0.25              # claim 2: MoLF within 25% of the best single method's loss
routing_cells = ((1, 512), (64, 512))  # two contrasting cells (shift rank, examples) for the routing figure
routing_seeds = 4
routing_steps = 150
regression_slice = True    # run the small slice (2 cells x 4 seeds, ~20 s) and write its numbers
classroom_seeds = 2
classroom_steps = 80
runs_dir = "../runs"       # <runs_dir>/07_regime_map.json: this notebook's numbers
figures_dir = "../runs/figures"  # PNG figures (the committed ../figures change only on purpose)
train_dir = None           # unused here (nothing is written besides the numbers and figures); the suite passes it
progress = True            # progress lines while training (the suite turns them off)
headless = False           # True: the classroom app shown as a picture (the suite's headless runs)

# %%
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Markdown, display

from molf.lab import notebook, regime

nb = notebook.setup("07_regime_map", globals())
torch.set_num_threads(1)   # these small kernels run faster on one thread than on two shared ones
pd.set_option("display.width", 160)

if Path(map_csv).is_file():
    runs = regime.load(map_csv)
    source = f"the map in {map_csv}"
else:
    runs = regime.run_map(regime.SLICE)
    source = "the regression slice (no map file found)"
picked = regime.pick(runs)
summary = regime.summarize(picked, margin)
fixed = regime.fixed_pair(runs)
seeds = runs.groupby(regime.CELL)["seed"].nunique()
count = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
print(f"{source}: {len(summary)} cells, {count} seeds per cell, {len(runs)} training runs; "
      f"MoLF's fixed pair lr_fft/lr_lora = {fixed[0]:g}/{fixed[1]:g}")
print(regime.map_table(summary))

# %% [markdown]
# ## 1. Who wins where
#
# Each square is one cell of the map. The colour is the method with the lowest mean held-out loss among
# FFT, LoRA and DoRA; a solid colour and a star mean it beats the runner-up in a paired test over the 20
# seeds (95% interval of the difference excluding 0); pale means the top two are not separable. The
# number is LoRA's loss over FFT's: below 1 LoRA is better.

# %%
fig = regime.winner_figure(summary)
nb.save(fig, "winner")

# %% [markdown]
# ## 2. How far is MoLF from the winner?
#
# The gap is MoLF's mean loss over the winner's, minus one (+10% = 10% higher loss). Left: MoLF with its
# learning-rate pair tuned in each cell, as every other method is. Right: one pair for the whole map.

# %%
fig = regime.heat_figure(summary, ["molf_gap", "molf_fixed_gap"],
                         ["MoLF tuned per cell", f"MoLF fixed ({fixed[0]:g}/{fixed[1]:g})"],
                         "MoLF loss / best loss - 1", vmin=0, vmax=1.0)
nb.save(fig, "gap")

# %% [markdown]
# ## 3. What does the router choose?
#
# The share of MoLF's module decisions that went to the FFT expert (the rest went to the LoRA expert),
# over all steps and seeds. If the router followed the winner, the left map would be red where FFT wins
# and white where LoRA wins, and so would the right one, where the learning rates do not move.

# %%
fig = regime.heat_figure(summary, ["molf_share", "molf_fixed_share"],
                         ["MoLF tuned per cell", f"MoLF fixed ({fixed[0]:g}/{fixed[1]:g})"],
                         "share of decisions won by FFT", fmt="{:.2f}", vmin=0, vmax=1, cmap="Reds")
nb.save(fig, "fft_share")

# %% [markdown]
# ## 4. Routing over training, in two contrasting cells
#
# MoLF at the fixed pair, retrained here on a few seeds: the share of FFT decisions at each step. Claim 4
# of the paper is that routing settles early: what the router picks at 10% of training is what it picks at
# the end.

# %%
curves = regime.routing_curves([regime.Cell(k, n) for k, n in routing_cells], fixed, seeds=routing_seeds,
                               setting=regime.Setting(steps=routing_steps, check_every=routing_steps))
fig = regime.routing_figure(curves)
nb.save(fig, "routing")

# %% [markdown]
# ## 5. The claims, and what the map says
#
# One line per claim, from the same numbers (`python -m molf.lab.regime --claims --from results/regime_map.csv`
# prints them too).

# %%
lines = regime.claims(runs, margin)
for line in lines:
    print(line)

main = summary[summary["noise"] == 0.1]
lora_cells = main[main["lora_beats_fft"] == "reproduced"]
fft_cells = main[main["fft_beats_lora"] == "reproduced"]
share_lora = picked[(picked["row"] == "molf_fixed") & picked.set_index(regime.CELL).index.isin(
    lora_cells.set_index(regime.CELL).index)]["fft_share"].mean()
share_fft = picked[(picked["row"] == "molf_fixed") & picked.set_index(regime.CELL).index.isin(
    fft_cells.set_index(regime.CELL).index)]["fft_share"].mean()
display(Markdown(
    f"**Takeaway.** In this setting the winner does flip: LoRA beats FFT significantly in {len(lora_cells)} of "
    f"{len(main)} cells of the main grid and FFT beats LoRA in {len(fft_cells)}. MoLF tuned per cell is "
    f"{summary['molf_gap'].median():+.0%} from the winner at the median cell (worst {summary['molf_gap'].max():+.0%}); "
    f"with one fixed pair it is {summary['molf_fixed_gap'].median():+.0%} at the median (worst "
    f"{summary['molf_fixed_gap'].max():+.0%}). With its settings fixed, the router gives FFT "
    f"{share_lora:.0%} of the decisions in the cells LoRA wins and {share_fft:.0%} in the cells FFT wins: it "
    f"{'moves the right way' if share_fft > share_lora else 'does not move the right way'}, "
    f"{'and commits' if share_fft > 0.9 and share_lora < 0.1 else 'but does not commit'}. Tuned per cell, the "
    f"learning-rate pair does most of the choosing (EPD multiplies each expert's score by its learning rate)."))

# %% [markdown]
# ## Numbers
#
# The regression slice (two cells, 4 seeds, a short budget) gives the numbers the suite's regression check
# compares; the map's own numbers are in `results/regime_map.csv`. (This runs before the classroom: a kernel
# answers a slider only after every queued cell, so nothing trains below the app.)

# %%
results = {"notebook": nb.name, "map_source": source, "cells": len(summary), "fixed_pair": list(fixed),
           "claims": lines, "summary": summary.to_dict(orient="records")}
if regression_slice:
    slice_summary = regime.summarize(regime.pick(regime.run_map(regime.SLICE)), margin)
    for r in slice_summary.itertuples():
        cell = f"k={r.shift_rank} n={r.examples}"
        for row in ("fft", "lora", "dora", "molf", "molf_fixed", "molf_dense", "molf_e"):
            results[f"slice {regime.LABELS[row]} test loss x1e3 ({cell})"] = getattr(r, row) * 1e3
        results[f"slice MoLF tuned fft win share ({cell})"] = r.molf_share
        results[f"slice MoLF fixed fft win share ({cell})"] = r.molf_fixed_share
nb.write_results(results)
print(f"key numbers written to {nb.name}.json in runs_dir")

# %% [markdown]
# ## 6. Classroom: move a slider, every method retrains on one cell
#
# Shift rank, examples, noise, the LoRA rank (of LoRA, DoRA and MoLF's expert) and MoLF's learning-rate
# ratio `lr_lora / lr_fft`. FFT trains at 1e-3, LoRA and DoRA at 1e-2, MoLF at `lr_fft` 1e-3: fixed
# settings, so what you see is what the regime does to fixed methods. Try k=1 then k=64 at n=256, then
# move the lr ratio at k=64 and watch the router's share follow the ratio rather than the task.

# %%
classroom = regime.Classroom(seeds=classroom_seeds, steps=classroom_steps)
nb.app(classroom.widget, classroom.frame)  # the app; run headless by the suite, a picture of it
fig = classroom.frame()
nb.save(fig, "classroom")
