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
# # 08 · What the router did
#
# The routing notebooks show *where* each expert won. This page asks what that choice was worth and what
# it did to the weights, for one task and every method:
#
# 1. **Shadow routers.** While the MoLF run trains, every other rule (PFN, gradient RMS, LISA-style random
#    experts, BAdam-style block cycling) scores the same Adam moments each step. How often would it have
#    picked the same expert as the real router (EPD by default), per module type and over time? And at a
#    few probe steps: what did the real choice gain over the shadow's, in loss a few steps later?
# 2. **The update audit.** Per step and expert, how far its parameters moved: the winners move, the losers
#    must not move at all (MoLF's sparsity is in the update; the forward pass stays dense).
# 3. **What each update did to the weights**, FFT, LoRA, MoLF and MoLF-Efficient side by side: the effective
#    rank of each module's ΔW, how many singular values hold 99% of it, its size, and the *intruder
#    dimensions* (new top singular directions of the tuned weight, unlike any of the base weight's), put
#    beside the retention probe of each run.

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
methods = ["fft", "lora", "molf", "molf_e"]   # the methods whose updates are compared (molf: the shadow run)
shadow_rules = ["epd", "pfn", "grad_rms", "random", "cycle"]  # scores and policies run beside the router
cycle_every = 5             # the "cycle" policy moves to the next expert every this many steps
probe_steps = 2             # steps at which the choice's cost is probed, spread over the run
horizon = 3                 # steps each probe trains before its loss is read
windows = 4                 # windows of steps for the agreement-over-time figure
weight_layers = 3           # decoder layers the weight views cover: n spread evenly, a list, or None (all)

# %%
import time
from pathlib import Path

from molf.lab import analysis, models, notebook, retention, router_report, shadow

nb = notebook.setup("08_what_the_router_did", globals())
own_runs = nb.train_dir / "08_what_the_router_did"   # this page's runs keep their merged models

# %% [markdown]
# ## 1. Shadow routers on the MoLF run
#
# **Time.** On the tiny model this section takes seconds. On SmolLM2-135M with the defaults (20 steps,
# batch 4, 64 tokens) it trains the 20 steps plus, at each of the `probe_steps` probes, one copy of the
# model per branch for `horizon` steps: the real rule and each of the 4 other rules, 2 x 5 x 3 = 30 steps
# more. At the 1.2-1.4 s per SmolLM2 step that `00_quickstart` shows on two idle CPU cores, that is one to
# two minutes of training; copying the model per branch, the shadow records of 210 modules and the
# evaluation come on top, and a busy machine is several times slower (docs/analysis.md has one measured
# run). The cell prints the time it took. A finished run
# in `own_runs` with its shadow tables is read back, not retrained.

# %%
began = time.perf_counter()
config = router_report.own_folder(nb.run_config(method="molf", **nb.common), own_runs)
result = shadow.train_with_shadows(config, rules=shadow_rules, n_probes=probe_steps, horizon=horizon,
                                   cycle_every=cycle_every)
real_score = result.run.config.score
print(f"MoLF run {Path(result.run.out_dir).name}: {result.run.metrics['steps']} steps, routed by {real_score}; "
      f"{result.shadows['step'].nunique()} steps x {result.shadows['module'].nunique()} modules recorded, "
      f"{len(result.costs)} probes; {time.perf_counter() - began:.0f} s")

# %% [markdown]
# ### Agreement per rule and module type
#
# Each cell: the share of decisions (all layers, all steps) where the rule would have picked the same
# expert as the real router. The routing score as its own shadow must read 1.00 everywhere: a check that
# the shadows see what the router saw.

# %%
nb.save(router_report.agreement_heatmap(result.shadows), "shadow_agreement")
per_rule = shadow.agreement(result.shadows, by=("rule",)).set_index("rule")["agreement"]
n_experts = result.shadows.groupby(["step", "module"])["expert"].nunique().max()
for rule, share in per_rule.items():
    print(f"{rule:10s} agrees with the real router in {share:.0%} of decisions")
others = per_rule.drop(index=real_score, errors="ignore")
print(f"\nThe routing score itself ({real_score}) agrees in {per_rule.get(real_score, float('nan')):.0%}. "
      f"Among the other rules, {others.idxmax()} agrees most ({others.max():.0%}), {others.idxmin()} least "
      f"({others.min():.0%}); a rule picking one of {n_experts} experts at random would agree in about "
      f"{1 / n_experts:.0%}.")

# %% [markdown]
# ### Agreement over training
#
# A line that climbs means the rule and the router converge once the moments settle (the first steps' Adam
# moments are dominated by a single gradient); a flat line at the random level means the rule sees
# something else entirely.

# %%
window = max(1, result.run.metrics["steps"] // windows)
nb.save(router_report.agreement_over_time_plot(result.shadows, window=window), "shadow_over_time")
over_time = shadow.over_time(result.shadows, window=window)
first_last = over_time.groupby("rule")["agreement"].agg(["first", "last"])
first_last

# %% [markdown]
# ### What the real rule's choice gained
#
# At each probe step two copies of the run are trained `horizon` steps from the same state: one routed by
# the real rule throughout, one whose first step is routed by the shadow rule. Bar: the shadow copy's loss
# minus the real copy's on the batch after the horizon (> 0: the real choice was the better one). Where
# the rules agreed on every module the two copies are identical and the cost is exactly 0.

# %%
costs = result.costs
nb.save(router_report.choice_cost_plot(costs), "choice_cost")
if costs.empty:
    print("No probe step fits in this run (it needs at least horizon + 2 steps): nothing to say about costs.")
else:
    print(costs[["step", "rule", "modules_differing", "cost"]].to_string(index=False))
    decided = costs[costs["modules_differing"] > 0]
    better = int((decided["cost"] > 0).sum())
    print(f"\nWhere a rule chose differently ({len(decided)} of {len(costs)} probes), the real rule's choice was "
          f"better in {better} and worse in {len(decided) - better}; the largest |cost| is "
          f"{costs['cost'].abs().max():.2e} nats per token. {len(costs)} probes at {costs['step'].nunique()} "
          f"steps are a handful of single draws: they show the size of the effect, not a ranking of the rules.")

# %% [markdown]
# ### The update audit: winners moved, losers did not
#
# Per step, the smallest and median parameter change of the step's winners and the largest change of any
# loser. MoLF neither updates nor decays a losing expert, so the loser line must lie at exactly 0.

# %%
nb.save(router_report.update_audit_plot(result.audit), "update_audit")
audit = router_report.audit_summary(result.audit)
loser_steps = int((audit["loser_max"] > 0).sum())
frozen_winners = int((audit["winner_min"] == 0).sum())
print(f"largest move of a losing expert: {audit['loser_max'].max():g} (steps where a loser moved: {loser_steps}); "
      f"median move of a winner: {audit['winner_median'].median():.3g}; steps where some winner did not move: "
      f"{frozen_winners}")

# %% [markdown]
# ## 2. What each update did to the weights
#
# **Time.** Each method other than MoLF trains its own run (same data, steps and seed): about three times
# the MoLF run without its probes. Then each module's singular value decompositions (ΔW, the base and
# the tuned weight, in float64): seconds on the tiny model, but on SmolLM2 tens of seconds per decoder
# layer and method on two busy CPU cores, so `weight_layers = 3` covers three layers (first, middle,
# last) by default; `None` covers all 30 (about ten times longer). The retention probe always runs on
# the whole model. The runs live in `own_runs` with their merged models, so a second run of the notebook
# only recomputes the tables.

# %%
began = time.perf_counter()
base, tokenizer = models.load(nb.common["model"])
probe_rows = retention.load()
base_retention = retention.evaluate(base, tokenizer, probe_rows)["retention"]
tuned, run_metrics = {}, {}
for method in methods:
    if method == "molf":
        tuned[method], run_metrics[method] = (result.model, result.tokenizer), result.run.metrics
        continue
    run, tuned_model, tuned_tokenizer = router_report.merged_model(
        router_report.own_folder(nb.run_config(method=method, **nb.common), own_runs))
    tuned[method], run_metrics[method] = (tuned_model, tuned_tokenizer), run.metrics
table, summary = router_report.method_weights(base, tuned, probe_rows, layers=weight_layers)
print(f"weight views over decoder layers {sorted(set(table['layer']))}; {time.perf_counter() - began:.0f} s")
summary

# %% [markdown]
# ### Spectra of ΔW by module type
#
# A LoRA update of rank r has at most r non-zero singular values; FFT's is free to be full rank. MoLF's ΔW
# is the sum of the dense steps its FFT expert won and its LoRA expert's product, so it can fall on either side.

# %%
nb.save(router_report.spectra_plot(table), "spectra")
ranks = summary.set_index("method")[["effective_rank", "rank_99", "relative_delta"]]
print(ranks.round(3).to_string())
print(f"\nHighest mean effective rank: {ranks['effective_rank'].idxmax()} ({ranks['effective_rank'].max():.1f}); "
      f"lowest: {ranks['effective_rank'].idxmin()} ({ranks['effective_rank'].min():.1f}). Largest update relative "
      f"to the base weights: {ranks['relative_delta'].idxmax()} ({ranks['relative_delta'].max():.2e}).")

# %% [markdown]
# ### Intruder dimensions against retention
#
# One point per run. With this few runs (one per method, one seed) the figure can only show whether the
# run that forgot most also has the most intruders; it cannot show a relation between the two. The cell
# below says what the points show.

# %%
nb.save(router_report.intruders_vs_retention_plot(summary, base_retention), "intruders_vs_retention")
by_method = summary.set_index("method")
most_intruders, least_retention = by_method["intruders"].idxmax(), by_method["retention"].idxmin()
print(f"base model retention: {base_retention:.3f}")
print(by_method[["intruders", "retention"]].to_string())
if by_method["intruders"].nunique() == 1:
    print(f"\nEvery run has {int(by_method['intruders'].iloc[0])} intruder dimensions: these runs show no "
          f"difference in intruders to set against retention.")
elif by_method["retention"].nunique() == 1:
    print("\nEvery run keeps the same retention: these runs show no forgetting to set against intruders.")
else:
    same = most_intruders == least_retention
    print(f"\nMost intruders: {most_intruders}; least retention: {least_retention} "
          f"({'the same run' if same else 'different runs'}). {len(by_method)} runs of one seed show at most a "
          f"coincidence, not a relation: that needs several seeds and tasks per method.")

# %% [markdown]
# ## Results

# %%
results = {"notebook": nb.name, "steps": int(result.run.metrics["steps"]), "real score": real_score}
results.update({f"agreement of {rule}": float(share) for rule, share in per_rule.items()})
results.update({f"choice cost (loss) of {row.rule} at probe {i}": float(row.cost)
                for i, (_, part) in enumerate(costs.groupby("step")) for row in part.itertuples()})
results["steps where a loser moved"] = loser_steps
for row in summary.itertuples():
    results[f"intruders ({row.method})"] = int(row.intruders)
    results[f"retention ({row.method})"] = float(row.retention)
    results[f"effective rank ({row.method})"] = float(row.effective_rank)
    results[f"rank_99 ({row.method})"] = float(row.rank_99)
results["retention (base)"] = float(base_retention)
results["details"] = {"probe_steps": sorted(int(s) for s in costs["step"].unique()),
                      "agreement_by_type": router_report.agreement_grid(result.shadows).round(4).to_dict(),
                      "methods": [{**row, "final_loss": run_metrics[row["method"]]["final_loss"],
                                   "train_time_s": run_metrics[row["method"]]["train_time_s"],
                                   "trainable_params": run_metrics[row["method"]]["trainable_params"],
                                   "metric": analysis.primary_score(run_metrics[row["method"]])}
                                  for row in summary.to_dict(orient="records")]}
nb.write_results(results)
print({k: v for k, v in results.items() if k != "details"})
