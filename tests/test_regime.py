"""The regime map (molf.lab.regime): members trained together train as alone; the winner flips between a
rank-1 and a rank-32 shift; the fixed MoLF row uses one pair; the claim lines follow their rules."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import molf
from molf.lab import engine
from molf.lab import regime as R


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on two shared cores, two busy threads run these small kernels many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = R.Setting(width=32, hidden=48, steps=30, check_every=30, n_val=64, n_test=64, batch_size=16)


def _alone(method, task, cfg, setting):
    """One member trained by itself: its own module, its own optimizer, its plain forward."""
    member = R.build_member(method, task.base, setting, task.seed)
    if method in R.ROUTED:
        groups = molf.param_groups(member, lr_fft=cfg.lr_fft, lr_lora=cfg.lr_lora, wd_fft=0.0, wd_lora=0.0)
        optimizer = molf.MoLFAdamW(groups, topk=2 if method == "molf_dense" else 1)
    else:
        lr = cfg.lr_fft if method == "fft" else cfg.lr_lora
        optimizer = torch.optim.AdamW([p for p in member.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    idx = R.batch_indices(task, setting)
    engine.fit(member, optimizer, lambda step: [(task.x[idx[step]], task.y[idx[step]])], steps=setting.steps,
               loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    with torch.no_grad():
        return float((member(task.x_val) - task.y_val).pow(2).mean()), optimizer


@pytest.mark.parametrize("method", ["fft", "dora", "molf", "molf_e"])
def test_members_train_as_alone(method):
    tasks = [R.make_task(R.Cell(2, 40), seed, TINY) for seed in range(2)]
    configs = [R.Config(1e-3, 1e-2), R.Config(3e-3, 3e-3)]
    runs = [(t, c) for c in configs for t in range(2)]
    together = R.train(method, tasks, runs, TINY)
    for i, (t, cfg) in enumerate(runs):
        val, optimizer = _alone(method, tasks[t], cfg, TINY)
        assert together.val[i] == pytest.approx(val, rel=1e-4, abs=1e-7), (method, i)
        if method in ("molf", "molf_e"):
            wins = optimizer.win_counts
            first = "lora0" if method == "molf_e" else "fft"
            share = sum(w.get(first, 0) for w in wins.values()) / sum(sum(w.values()) for w in wins.values())
            assert together.fft_share[i] == pytest.approx(share)
    # the members did train, and not all alike
    assert len(set(np.round(together.val, 8))) == len(runs)


def test_methods_in_one_fit_train_as_each_in_its_own():
    tasks = [R.make_task(R.Cell(2, 40), seed, TINY) for seed in range(2)]
    plan = {"fft": [(0, R.Config(1e-3, 1e-3)), (1, R.Config(3e-3, 3e-3))],
            "lora": [(1, R.Config(1e-2, 1e-2)), (0, R.Config(1e-2, 1e-2))],
            "molf": [(0, R.Config(1e-3, 3e-3)), (1, R.Config(3e-3, 1e-3))],
            "molf_dense": [(1, R.Config(1e-3, 1e-3))]}
    together = R.train_methods(tasks, plan, TINY, record_routing=True)
    for method, runs in plan.items():
        alone = R.train(method, tasks, runs, TINY, record_routing=True)
        np.testing.assert_allclose(together[method].val, alone.val, rtol=1e-4, err_msg=method)
        np.testing.assert_allclose(together[method].fft_share, alone.fft_share, err_msg=method)
        if method in R.ROUTED:
            assert (together[method].decisions == alone.decisions).all(), method
    assert together["molf_dense"].fft_share.tolist() == [1.0]      # top-2 of two experts: both, every step


def test_winner_flips_between_rank_1_and_rank_32():
    setting = R.Setting(steps=150, check_every=25, n_val=128, n_test=128)
    out = {}
    for k in (1, 32):
        tasks = [R.make_task(R.Cell(k, 64), seed, setting) for seed in range(3)]
        fft = R.train("fft", tasks, [(t, R.Config(1e-3, 1e-3)) for t in range(3)], setting).test
        lora = R.train("lora", tasks, [(t, R.Config(1e-2, 1e-2)) for t in range(3)], setting).test
        out[k] = (fft, lora)
    assert (out[1][1] < out[1][0]).all(), out[1]     # rank-1 shift: LoRA (r=4) wins every seed
    assert (out[32][0] < out[32][1]).all(), out[32]  # rank-32 shift: FFT wins every seed


def _runs(cells, pairs_val):
    """Hand-made MoLF runs: pairs_val[cell][pair] = validation loss (the same for 3 seeds)."""
    rows = []
    for (k, n), per_pair in zip(cells, pairs_val):
        for (a, b), val in per_pair.items():
            for seed in range(3):
                rows.append(dict(shift_rank=k, examples=n, noise=0.1, seed=seed, method="molf", lr_fft=a,
                                 lr_lora=b, val=val, test=val * (1 + 0.01 * seed), fft_share=0.5))
    return pd.DataFrame(rows)


def test_fixed_pair_is_one_pair_best_on_average_in_log_ratio():
    A, B, C = (1e-3, 1e-3), (3e-3, 1e-3), (1e-3, 1e-2)
    # cell 1 has losses 100x larger: a raw mean would follow cell 1 alone (pick B); relative to each
    # cell's best, A is 10% off in both while B is 5x off in cell 2.
    runs = _runs([(1, 64), (32, 64)], [{A: 1.1, B: 1.0, C: 3.0}, {A: 0.011, B: 0.05, C: 0.01}])
    assert R.fixed_pair(runs) == A
    picked = R.pick(runs)
    fixed = picked[picked["row"] == "molf_fixed"]
    assert set(zip(fixed["lr_fft"], fixed["lr_lora"])) == {A}
    assert len(fixed) == 6
    tuned = picked[picked["row"] == "molf"]
    assert set(zip(tuned["shift_rank"], tuned["lr_fft"], tuned["lr_lora"])) == {(1, *B), (32, *C)}


def test_fixed_pair_needs_a_pair_run_in_every_cell():
    A, B = (1e-3, 1e-3), (3e-3, 1e-3)
    runs = _runs([(1, 64), (32, 64)], [{A: 1.0, B: 0.5}, {A: 1.0}])
    assert R.fixed_pair(runs) == A            # B is best where it ran, but it did not run everywhere


def _summary(**columns):
    n = len(next(iter(columns.values())))
    base = {"shift_rank": [1, 8, 64, 64][:n], "examples": [32, 512, 4096, 32][:n], "noise": [0.1] * n}
    return pd.DataFrame({**base, **columns})


def test_claim_winner_flips_rules():
    both = _summary(lora_beats_fft=["reproduced", "inconclusive"], fft_beats_lora=["not reproduced", "reproduced"])
    assert ": reproduced — LoRA beats FFT in 1 of 2 cells (k=1 n=32); FFT beats LoRA in 1 (k=8 n=512)" in \
        R.claim_winner_flips(both)
    one_side = _summary(lora_beats_fft=["reproduced", "reproduced"], fft_beats_lora=["not reproduced", "inconclusive"])
    assert ": inconclusive —" in R.claim_winner_flips(one_side)
    never = _summary(lora_beats_fft=["reproduced", "reproduced"], fft_beats_lora=["not reproduced", "not reproduced"])
    assert ": not reproduced —" in R.claim_winner_flips(never)


def test_claim_molf_near_best_rules():
    table = _summary(molf_within=["reproduced", "reproduced"], molf_gap=[0.05, 0.10],
                     molf_fixed_within=["reproduced", "inconclusive"], molf_fixed_gap=[0.02, 0.3])
    line = R.claim_molf_near_best(table, 0.25, (3e-3, 3e-3))
    assert line.startswith("claim 2 (MoLF within 25% of the best of FFT/LoRA/DoRA): inconclusive — ")
    assert "tuned per cell: reproduced, within in 2/2 cells, beyond in 0, worst +10% at k=8 n=512" in line
    assert "fixed 0.003/0.003: inconclusive, within in 1/2 cells, beyond in 0, worst +30% at k=8" in line
    table["molf_fixed_within"] = ["reproduced", "not reproduced"]
    assert ": not reproduced — " in R.claim_molf_near_best(table, 0.25)
    table["molf_fixed_within"] = ["reproduced", "reproduced"]
    assert ": reproduced — " in R.claim_molf_near_best(table, 0.25)


def test_claim_top1_vs_dense_rules():
    win = _summary(top1_beats_dense=["reproduced", "reproduced", "inconclusive"],
                   dense_beats_top1=["not reproduced", "not reproduced", "inconclusive"])
    assert ": reproduced — top-1 better in 2 of 3 cells" in R.claim_top1_vs_dense(win)
    win.loc[2, "dense_beats_top1"] = "reproduced"
    assert ": inconclusive — " in R.claim_top1_vs_dense(win)


def test_summarize_names_the_significant_winner():
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(12):
        noise = rng.normal(0, 0.02)
        for method, loss in (("fft", 1.0), ("lora", 0.5), ("dora", 0.52), ("molf", 0.55), ("molf_dense", 0.7)):
            rows.append(dict(shift_rank=1, examples=64, noise=0.1, seed=seed, method=method, lr_fft=1e-3,
                             lr_lora=1e-3, val=loss + noise, test=loss + noise + rng.normal(0, 0.01),
                             fft_share=0.2 if method == "molf" else math.nan))
    summary = R.summarize(R.pick(pd.DataFrame(rows)), margin=0.25)
    r = summary.iloc[0]
    assert r["winner"] == "lora" and r["runner_up"] == "dora"
    assert r["winner_verdict"] == "inconclusive" or r["winner_verdict"] == "reproduced"
    assert r["lora_beats_fft"] == "reproduced" and r["fft_beats_lora"] == "not reproduced"
    assert r["molf_gap"] == pytest.approx(0.1, abs=0.03)
    assert r["molf_within"] == "reproduced"                  # 10% worse, inside the 25% margin
    assert r["top1_beats_dense"] == "reproduced"
    assert R.summarize(R.pick(pd.DataFrame(rows)), margin=0.0).iloc[0]["molf_within"] == "not reproduced"


def test_agreement_against_the_time_shuffled_null():
    steps = 100
    settles = np.zeros((steps, 1, 2), dtype=bool)
    settles[5:, 0, 0] = True                 # module 0: LoRA for 5 steps, then FFT for good
    settles[:, 0, 1] = np.arange(steps) % 10 == 3   # module 1: LoRA with a 10% sprinkle of FFT
    assert R.agreement_at(settles).tolist() == [1.0]
    null = R.shuffled_agreement(settles, shuffles=200)
    assert 0.8 < null[0] < 0.98              # module 0: 95% FFT; module 1: 90% LoRA
    late = settles.copy()
    late[:50, 0, 0] = False                  # module 0 turns to FFT only at half time
    assert R.agreement_at(late).tolist() == [0.5]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="shift_rank must be an integer >= 1, got 0"):
        R.Cell(0, 64)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        R.Cell(1, 64, noise=-0.1)
    with pytest.raises(ValueError, match="check_every=50 exceeds steps=20"):
        R.Setting(steps=20, check_every=50)
    with pytest.raises(ValueError, match="shift_rank=40 exceeds the rank a 48x32 weight can have"):
        R.make_task(R.Cell(40, 16), 0, TINY)
    with pytest.raises(ValueError, match="unknown method 'adalora'"):
        R.train("adalora", [], [(0, R.Config(1e-3, 1e-3))], TINY)


def test_run_map_resumes_and_dense_runs_at_the_tuned_pair(tmp_path):
    grid = {"fft": (1e-3,), "lora": (1e-2,), "dora": (1e-2,), "molf_e": (3e-3,),
            "molf_fft": (3e-4, 3e-3), "molf_lora": (1e-3, 1e-2)}
    spec = R.MapSpec(cells=(R.Cell(1, 40), R.Cell(8, 40)), seeds=2, setting=TINY, grid=grid,
                     methods=("fft", "molf", "molf_dense"))
    out = tmp_path / "map.csv"
    first = R.run_map(R.MapSpec(cells=spec.cells[:1], seeds=2, setting=TINY, grid=grid, methods=spec.methods), out=out)
    assert len(first) == 2 * (1 + 4 + 1)                     # fft, 4 MoLF pairs, dense at one pair
    for _, rows in first.groupby("shift_rank"):
        tuned = rows[rows["method"] == "molf"].groupby(["lr_fft", "lr_lora"])["val"].mean().idxmin()
        dense = rows[rows["method"] == "molf_dense"]
        assert set(zip(dense["lr_fft"], dense["lr_lora"])) == {tuned}
        assert rows[rows["method"] == "molf"]["agree10"].between(0, 1).all()
    calls = []
    whole = R.run_map(spec, out=out, log=calls.append)
    assert all(line.startswith("k=8 n=40") for line in calls)   # the first cell was not trained again
    assert len(whole) == 2 * len(first) and len(R.load(out)) == len(whole)
    pd.testing.assert_frame_equal(whole[whole["shift_rank"] == 1].reset_index(drop=True),
                                  R.load(out).query("shift_rank == 1").reset_index(drop=True), check_exact=False)


def test_transformer_lines_pick_each_lr_on_validation():
    rows = []
    for seed in range(6):
        for method, lr, val, test in (("fft", 1e-3, 0.5, 0.50), ("fft", 3e-3, 0.4, 0.40 + 0.01 * seed),
                                      ("lora", 1e-2, 0.2, 0.20 + 0.01 * seed), ("lora", 3e-2, 0.9, 0.05)):
            rows.append(dict(shift_rank=1, seed=seed, method=method, lr=lr, val=val, test=test))
    (line,) = R.transformer_lines(pd.DataFrame(rows))
    # LoRA's 3e-2 has the lower test loss but the worse validation loss: 1e-2 is picked
    assert line.startswith("tiny LM, shift rank 1: LoRA beats FFT: reproduced — FFT 0.425 vs LoRA 0.225")
    assert "lr FFT 0.003, LoRA 0.01" in line


def test_classroom_widget_retrains_and_redraws_on_a_slider():
    import matplotlib.pyplot as plt

    room = R.Classroom(seeds=1, steps=10, examples=64)
    box = room.widget()
    controls = room._widgets
    assert box is room.widget()
    first_seconds = room.result["seconds"]
    assert "wins this cell" in controls["info"].value
    open_figures = len(plt.get_fignums())               # every redraw closes the figure it showed
    controls["lr_ratio"].value = 10.0                    # a slider change retrains every method
    assert room.values["lr_ratio"] == 10.0
    assert "lr_lora/lr_fft = 10" in room.frame().axes[1].get_title()
    assert room.result["seconds"] != first_seconds
    assert len(plt.get_fignums()) == open_figures + 1   # only the frame() this test drew is open
