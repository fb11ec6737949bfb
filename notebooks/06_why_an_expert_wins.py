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
# # 06 · Why an expert wins: the router's score, factor by factor
#
# The other notebooks show *where* each expert wins. This one shows *why*. At every step, MoLF's optimizer
# scores every expert $e$ of every module from its Adam moments $m, v$ (raw, after this step's update) and
# updates only the top-$k$. Both scores are products of a few numbers you can look at:
#
# $$\text{EPD:}\quad S_e = \underbrace{\eta_e}_{\text{scheduled lr}} \times \underbrace{\frac{1}{N_e}}_{\text{size}}
#   \times \underbrace{\sum_{\text{params of } e} \frac{m^2}{\sqrt{v}+\epsilon}}_{\text{descent signal}}
# \qquad\qquad
# \text{PFN:}\quad S_e = \sqrt{\sum u^2} \times \frac{1}{\sqrt{N_e}}, \quad u = \frac{m}{\sqrt{v}+\epsilon}$$
#
# EPD (the default) is the loss decrease one Adam step of $e$ would bring, per parameter; PFN drops the
# learning rate and takes a root, so it only sees the *direction* of the step. The winner's lead over the
# loser is the product of the factor ratios: read the bars below and you read the decision.
#
# 1. the factors of one module at one step, for EPD and PFN;
# 2. three things to notice, each checked by a number this notebook computes;
# 3. a classroom: move a slider, the tiny model retrains in about a second and everything redraws.

# %% tags=["parameters"]
model = "smollm2-135m"     # the model of the breakdown in section 1 ("tiny": a 2-layer random Llama)
task = "fact"              # "fact", "sql" or "mcq"
steps = 20                 # optimizer steps of the breakdown run
batch_size = 4
seq_len = 64               # tokens per example
eval_limit = 32            # not used here: nothing is evaluated (the suite gives it to every notebook)
seed = 0
device = "cpu"
runs_dir = "../runs"       # <runs_dir>/06_why_an_expert_wins.json: this notebook's numbers
figures_dir = "../runs/figures"  # PNG figures (the committed ../figures change only on purpose)
train_dir = None           # not used here: every lesson trains in memory (the suite gives it to every notebook)
progress = True            # progress bars while training (the suite turns them off)
headless = False           # True: the classroom app shown as a picture (the suite's headless runs)
# MoLF settings (the paper's: lr 5e-5 for both experts, one LoRA expert r=128, alpha 32, EPD, top-1)
lr_fft = 5e-5
lr_ratio = 1.0             # lr_lora / lr_fft
rank = 128
alpha = 32.0
score = "epd"              # "epd" or "pfn"
topk = 1
# what to break down: a step (None: the last one) and a module (layer index and module type)
step = None
layer = 0
module_type = "q_proj"
# sections 2 and 3 always run on the tiny model: a few steps per retrain
classroom_steps = 8
lr_ratios = (0.1, 0.3, 1.0, 3.0, 10.0)

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from molf.lab import notebook, teaching

nb = notebook.setup("06_why_an_expert_wins", globals())
pd.set_option("display.width", 160)
COLUMNS = ["expert", "lr", "n_params", "n_moving", "sum_mu", "sum_uu", "epd", "pfn", "optimizer_score", "won"]

# %% [markdown]
# ## 1. One module, one step: the score in its factors
#
# `teaching.train` runs the same loop as the runner (same data order, seed, schedule, clipping, optimizer)
# in-process and keeps, at the steps asked for, `teaching.score_factors(optimizer)`: every factor of every
# expert recomputed from `optimizer.state` (`exp_avg` = $m$, `exp_avg_sq` = $v$) and the group's
# scheduled learning rate. The recomputed score must equal the optimizer's own (`optimizer_score`, from
# `optimizer.last_scores`): otherwise we would be explaining a different router.

# %%
settings = teaching.Settings(model=model, task=task, steps=steps, batch_size=batch_size, seq_len=seq_len,
                             seed=seed, device=device, lr_fft=lr_fft, lr_ratio=lr_ratio, rank=rank, alpha=alpha,
                             score=score, topk=topk)
shown_step = steps - 1 if step is None else int(step)
lesson = teaching.train(settings, factor_steps={0, shown_step})
module = lesson.module(layer, module_type)
table = lesson.at(shown_step, module)
mismatch = teaching.score_mismatch(lesson.factors, score)
print(f"{settings.label()}: {steps} steps in {lesson.seconds:.1f} s, final loss {lesson.losses[-1]:.4f}")
print(f"recomputed {score.upper()} vs the optimizer's, every module and expert: max relative difference {mismatch:.1e}")
assert mismatch < 1e-5, mismatch
display(table[COLUMNS])
for s in ("epd", "pfn"):
    print("\n".join(teaching.formula_lines(table, s)))
    print("->", teaching.why(table, s))
fig = teaching.explain(lesson, shown_step, module)
nb.save(fig, "factors")
plt.show()

# %% [markdown]
# How to read it: each group of bars is one factor (log scale), one bar per expert; the filled bar is the
# expert that score picks. Multiply the bars of a colour and you get its score (the last group). The line
# under the bars is the winner's lead written as a product of factor ratios: the factor with the largest
# ratio is *why* it won. Below: the routing map of the same step (every module of the model, the shown one
# outlined) and the FFT expert's win share over the run.
#
# The same picture at the very first step, where the moments have seen one gradient:

# %%
fig = teaching.explain(lesson, 0, module)
nb.save(fig, "factors_step0")
plt.show()
first = lesson.at(0, module)
for s in ("epd", "pfn"):
    print(teaching.why(first, s))
teaching.free_models()  # from here on only the tiny model trains: let go of the loaded `model`

# %% [markdown]
# ## 2. Three things to notice
#
# From here on the runs are on the tiny model (`classroom_steps` steps each, about a second).
#
# ### 2a. A fresh LoRA expert cannot win under PFN at the first step
#
# After one step $m = (1-\beta_1) g$ and $v = (1-\beta_2) g^2$, so every entry **with a gradient** has the
# same $|u| = (1-\beta_1)/\sqrt{1-\beta_2} \approx 3.16$ (up to $\epsilon$: entries with $|g|$ below about
# $\epsilon/\sqrt{1-\beta_2} = 3\cdot 10^{-7}$ count less). PFN then only counts which entries had a gradient.
# All of $W$ has one. LoRA's $B$ starts at zero, so its $A$ gets **no** gradient ($\partial L/\partial A =
# s B^\top \cdots = 0$): only the $N_B$ entries of $B$ count, out of $N_A + N_B$. Hence
# $$\frac{\text{PFN(LoRA)}}{\text{PFN(FFT)}} \approx \sqrt{\frac{N_B}{N_A+N_B}} < 1$$
# in every module, whatever the learning rates, rank or alpha: the dense weight wins everywhere.

# %%
base = teaching.Settings(model="tiny", task=task, steps=classroom_steps, batch_size=batch_size, seq_len=seq_len,
                         seed=seed, lr_fft=lr_fft, rank=rank, alpha=alpha, topk=1)
pfn_lesson = teaching.train(base, score="pfn")
pfn_first = teaching.step_one_pfn(pfn_lesson)
display(pfn_first)
pfn_mismatch = teaching.score_mismatch(pfn_lesson.factors, "pfn")
pfn_fft_share = pfn_lesson.win_share("fft", step=0)
pfn_max_dev = float(pfn_first["rel_dev"].max())
print(f"first step under PFN: FFT won {pfn_fft_share:.0%} of modules; measured / predicted ratio off by at most "
      f"{pfn_max_dev:.1%}; LoRA entries with a gradient = N_B in every module: "
      f"{bool((pfn_first['lora_moving'] == pfn_first['n_b']).all())}")
assert pfn_mismatch < 1e-5, pfn_mismatch
assert (pfn_first["lora_moving"] == pfn_first["n_b"]).all()   # A had no gradient, B all of it
assert (pfn_first["measured"] < 1).all() and pfn_fft_share == 1.0
assert pfn_max_dev < 0.1, pfn_max_dev                           # the ratio is sqrt(N_B / (N_A + N_B)), up to eps
fig = teaching.pfn_step_one_figure(pfn_first)
nb.save(fig, "pfn_first_step")
plt.show()

# %% [markdown]
# ### 2b. The learning-rate ratio tilts EPD
#
# EPD multiplies by the expert's learning rate; PFN does not look at it. At the first step the moments do
# not depend on the learning rate yet (nothing has moved), so raising $\eta_\text{LoRA}/\eta_\text{FFT}$ by
# a factor $c$ multiplies **every** LoRA EPD score by exactly $c$ and leaves the FFT scores as they are.
# A module flips to LoRA as soon as $c$ exceeds its ratio $S_\text{FFT}/S_\text{LoRA}$ at $c = 1$, so the
# share of modules LoRA wins at the first step can only rise with $c$. (Over a whole run the trajectories
# differ, so there it is a trend, not a law.)

# %%
tilt = teaching.lr_tilt(base, lr_ratios)
display(tilt)
scaling_error = float(max((tilt["lora_epd_scaling"] - 1).abs().max(), (tilt["lora_epd_scaling_min"] - 1).abs().max(),
                          (tilt["fft_epd_change"] - 1).abs().max()))
shares = list(tilt["lora_share_step0"])
print(f"LoRA EPD / (c x LoRA EPD at c=1) - 1: at most {scaling_error:.1e}; LoRA's first-step share over "
      f"lr ratios {list(tilt['lr_ratio'])}: {[round(x, 3) for x in shares]}")
assert scaling_error < 1e-5, scaling_error
assert all(a <= b for a, b in zip(shares, shares[1:])), shares   # monotone in the lr ratio
assert shares[-1] > shares[0], shares
fig = teaching.lr_tilt_figure(tilt)
nb.save(fig, "lr_tilt")
plt.show()

# %% [markdown]
# ### 2c. EPD sees LoRA's scale, PFN does not
#
# While $B = 0$, LoRA's gradient is proportional to its scale $s = \alpha/\sqrt{r}$. EPD's descent signal
# $\sum m^2/(\sqrt v+\epsilon)$ grows like $|g|$, so doubling $\alpha$ doubles LoRA's first-step EPD relative
# to FFT's. PFN is scale-invariant: $u$ does not change when $g$ is multiplied by a constant. Alpha is a
# routing knob under EPD, not under PFN.

# %%
alpha_table = teaching.alpha_tilt(base, low=alpha, high=2 * alpha)
display(alpha_table)
epd_change = (float(alpha_table["epd_change"].min()), float(alpha_table["epd_change"].max()))
pfn_change = float((alpha_table["pfn_change"] - 1).abs().max())
print(f"alpha {alpha:g} -> {2 * alpha:g}: LoRA/FFT EPD ratio x{epd_change[0]:.3f} .. x{epd_change[1]:.3f}; "
      f"PFN ratio moved by at most {pfn_change:.1%}")
assert 1.95 < epd_change[0] and epd_change[1] < 2.05, epd_change   # x2, up to eps
assert pfn_change < 0.1, pfn_change                               # unchanged, up to eps
fig = teaching.alpha_tilt_figure(alpha_table)
nb.save(fig, "alpha_tilt")
plt.show()

# %% [markdown]
# ## 3. Classroom: cause and effect on one screen
#
# The sliders retrain the tiny model (lr ratio, LoRA rank, alpha, score, top-k; about a second per setting,
# cached, so going back is instant); step, layer and module only redraw. Things to try: PFN, then step 0
# (2a); the lr ratio from 0.1 to 10 under EPD (2b); alpha 16 vs 64 under EPD and under PFN (2c); top-k 2
# (both experts always update: the scores no longer decide). In a headless run the app is built and the
# same picture is saved as a plain figure.

# %%
classroom = teaching.Classroom(base)
nb.app(classroom.widget, classroom.frame)  # the app; run headless by the suite, a picture of it
fig = classroom.frame()
nb.save(fig, "classroom")
plt.close(fig)

# %% [markdown]
# ### Every setting tried so far, as one page without a kernel
#
# Each setting trained in this kernel (the cells above and every slider position of the classroom) is
# cached; this writes them all into one self-contained HTML router explorer, a run picker naming each
# setting. Run it again after playing with the sliders to include the new ones.

# %%
lessons = {lesson.settings.label(): lesson.routing for lesson in teaching.cached_lessons()}
html_path = nb.export_html(lessons, "classroom")
print(f"{len(lessons)} settings in the page")

# %% [markdown]
# ## Numbers

# %%
nb.takeaway(f"**In this run** ({settings.label()}, {steps} steps, module `{module.removeprefix('model.')}` at "
            f"step {shown_step}): {teaching.why(table, 'epd').rstrip('.')}. Over the whole run the LoRA expert won "
            f"**{lesson.win_share('lora0'):.0%}** of the module decisions.")


# %%
def rows(frame, columns):
    return frame[columns].to_dict(orient="records")


results = {
    "notebook": nb.name, "model": model, "task": task, "steps": steps, "step": shown_step, "module": module,
    "settings": settings.label(),
    "final_loss": lesson.losses[-1],
    "win_share": {e: lesson.win_share(e) for e in ("fft", "lora0")},
    "score_mismatch": {score: mismatch, "pfn_tiny": pfn_mismatch},
    "factors": rows(table, ["expert", "lr", "n_params", "n_moving", "sum_mu", "sum_uu", "epd", "pfn", "won"]),
    "why": {s: teaching.why(table, s) for s in ("epd", "pfn")},
    "pfn_first_step": {"fft_win_share": pfn_fft_share, "max_rel_dev": pfn_max_dev,
                       "modules": rows(pfn_first, ["module", "n_a", "n_b", "measured", "predicted"])},
    "lr_tilt": {"lr_ratios": list(tilt["lr_ratio"]), "lora_share_step0": shares,
                "lora_share_run": list(tilt["lora_share_run"]), "max_scaling_error": scaling_error},
    "alpha_tilt": {"alpha_low": alpha, "alpha_high": 2 * alpha, "epd_change_min": epd_change[0],
                   "epd_change_max": epd_change[1], "pfn_change_max": pfn_change},
    "classroom": {"settings": classroom.settings.label(), "steps": classroom_steps,
                  "lora_win_share": classroom.lesson.win_share("lora0"),
                  "html_settings": len(lessons), "html_mb": html_path.stat().st_size / 1e6},
}
nb.write_results(results)
print(f"key numbers written to {nb.name}.json in runs_dir")
