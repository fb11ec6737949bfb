import copy

import pytest
import torch
from toy import batch, loss_fn, toy, train

import molf
from molf.router import RouterStats


def make(ranks=(4,), lr_fft=1e-2, lr_lora=1e-2, seed=0, wrap_kw=None, **opt_kw):
    model = molf.wrap(toy(seed), ranks=ranks, **(wrap_kw or {}))
    groups = molf.param_groups(model, lr_fft, lr_lora, **opt_kw.pop("group_kw", {}))
    return model, molf.MoLFAdamW(groups, **opt_kw)


def force(expert):
    """A score callable under which ``expert`` wins every module."""
    def score(stats: RouterStats):
        return torch.tensor([1.0 if e == expert else 0.0 for e in stats.expert_names])
    score.__name__ = f"force_{expert}"
    return score


def lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


# ---------------------------------------------------------------- scores
def hand_scores(opt, model, lr_fft, lr_lora, eps=1e-8):
    """EPD and PFN computed by hand, expert by expert, from the optimizer's moments."""
    out = {}
    for name, layer in molf.wrapped_modules(model).items():
        for expert, params in layer.expert_parameters().items():
            m = [opt.state[p]["exp_avg"].double() for p in params]
            v = [opt.state[p]["exp_avg_sq"].double() for p in params]
            n = sum(p.numel() for p in params)
            lr = lr_fft if expert == "fft" else lr_lora
            epd = lr / n * sum((mi ** 2 / (vi.sqrt() + eps)).sum() for mi, vi in zip(m, v))
            pfn = (sum(((mi / (vi.sqrt() + eps)) ** 2).sum() for mi, vi in zip(m, v)) / n).sqrt()
            out[name, expert] = (epd.item(), pfn.item())
    return out


@pytest.mark.parametrize("score, which", [("epd", 0), ("pfn", 1)])
def test_scores_match_hand_computation(score, which):
    model, opt = make(ranks=(4, 8), lr_fft=1e-3, lr_lora=4e-3, score=score)
    train(model, opt, 3)
    expected = hand_scores(opt, model, 1e-3, 4e-3)
    got = opt.last_scores
    assert len(got) == 6
    for (module, expert), values in expected.items():
        assert got[module][expert] == pytest.approx(values[which], rel=1e-4)
    # the decision is the arg-max of those scores
    for module, scores in got.items():
        assert opt.last_decisions[module] == (max(scores, key=scores.get),)


def test_pfn_favours_the_dense_weight_at_step_one():
    """Why PFN routed every fact decision to the FFT expert (docs/evidence.md): after one step every
    parameter with a gradient has the same |m / sqrt(v)|, but while B = 0 LoRA's A gets no gradient, so
    PFN(LoRA) / PFN(FFT) = sqrt(N_B / (N_A + N_B)) < 1 and the dense weight wins everywhere."""
    model, opt = make(ranks=(4,), score="pfn")
    train(model, opt, 1)
    for name, layer in molf.wrapped_modules(model).items():
        n_a, n_b = layer.lora_A[0].weight.numel(), layer.lora_B[0].weight.numel()
        scores = opt.last_scores[name]
        assert scores["lora0"] / scores["fft"] == pytest.approx((n_b / (n_a + n_b)) ** 0.5, rel=1e-3)
        assert opt.last_decisions[name] == ("fft",)


def test_register_custom_score():
    molf.register_score("neg_epd", lambda s: -molf.router.epd(s))
    model, opt = make(score="neg_epd")
    train(model, opt, 2)
    for module, scores in opt.last_scores.items():
        assert opt.last_decisions[module] == (max(scores, key=scores.get),)
        assert all(v <= 0 for v in scores.values())


# ---------------------------------------------------------------- FFT forced: exactly AdamW
def test_fft_forced_equals_torch_adamw_exactly():
    model, opt = make(ranks=(4,), score=force("fft"), group_kw=dict(wd_fft=0.1, wd_lora=0.01))
    reference = copy.deepcopy(model)
    ref_groups = []
    for g in molf.param_groups(reference, 1e-2, 1e-2, wd_fft=0.1):
        if "molf_module" in g:  # only the base weight and bias: the FFT expert
            for p, e, wd in zip(g["params"], g["param_expert"], g["param_weight_decay"]):
                if e == 0:
                    ref_groups.append({"params": [p], "weight_decay": wd})
        else:
            ref_groups.append({"params": g["params"], "weight_decay": g["weight_decay"]})
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-2, foreach=True)
    lora_before = lora_params(model)
    for s in range(6):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss_fn(m, batch(s)).backward()
            o.step()
    for (n, p), (n2, p2) in zip(model.named_parameters(), reference.named_parameters()):
        assert n == n2
        if ".lora_" not in n:
            assert torch.equal(p, p2), n  # bit-identical trajectories
    for n, p in lora_params(model).items():
        assert torch.equal(p, lora_before[n]), n  # losers unchanged ...
    layer = model.layers[0].q_proj
    st = opt.state[layer.lora_B[0].weight]
    assert st["step"].item() == 6 and st["exp_avg"].abs().sum() > 0  # ... but their moments advanced
    assert all(d == ("fft",) for d in opt.last_decisions.values())
    assert all(c == {"fft": 6, "lora0": 0} for c in opt.win_counts.values())


def test_lora_forced_leaves_base_unchanged_but_tracks_moments():
    model, opt = make(ranks=(4,), score=force("lora0"))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    train(model, opt, 3)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, base_before[n]), n
            assert opt.state[p]["exp_avg_sq"].sum() > 0
    assert model.layers[0].q_proj.lora_B[0].weight.abs().sum() > 0


def test_losers_get_no_weight_decay_winners_do():
    # zero learning signal: only weight decay can move a parameter
    model, opt = make(ranks=(4,), score=force("lora0"), group_kw=dict(wd_fft=0.5, wd_lora=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    layer = model.layers[0].q_proj
    W, A = layer.base_layer.weight.detach().clone(), layer.lora_A[0].weight.detach().clone()
    opt.step()
    assert torch.equal(layer.base_layer.weight, W)                                  # loser: untouched
    assert torch.allclose(layer.lora_A[0].weight, A * (1 - 1e-2 * 0.5), atol=0)    # winner: decayed


def test_topk_all_updates_every_expert():
    model, opt = make(ranks=(4,), topk=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 2)
    assert all(set(d) == {"fft", "lora0"} for d in opt.last_decisions.values())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in before if "base_layer.weight" in n or "lora_A" in n} <= changed


def test_ties_go_to_the_lower_index():
    model, opt = make(ranks=(4, 8), score=lambda s: torch.zeros(len(s.expert_names)))
    train(model, opt, 1)
    assert all(d == ("fft",) for d in opt.last_decisions.values())
    model, opt = make(ranks=(4, 8), topk=2, score=lambda s: torch.zeros(len(s.expert_names)))
    train(model, opt, 1)
    assert all(d == ("fft", "lora0") for d in opt.last_decisions.values())


# ---------------------------------------------------------------- MoLF-Efficient
@pytest.mark.parametrize("freeze", [False, True])
def test_molf_efficient_keeps_base_bit_identical(freeze):
    model, opt = make(ranks=(4, 16), wrap_kw=dict(train_base=False, freeze_non_linear=freeze))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not any("base_layer" in n for n in changed)
    assert any(".lora_" in n for n in changed)
    non_linear = {n for n in changed if ".lora_" not in n}
    assert (non_linear == set()) if freeze else ("embed_tokens.weight" in non_linear)
    decisions = opt.last_decisions
    assert all(len(d) == 1 and d[0] in ("lora0", "lora1") for d in decisions.values())
    assert all(set(c) == {"lora0", "lora1"} for c in opt.win_counts.values())


# ---------------------------------------------------------------- schedules, clipping, checkpoints
def test_scheduler_scales_scores_and_steps():
    lr = 1e-2
    model, opt = make(ranks=(4,), lr_fft=lr, lr_lora=2 * lr)
    _sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.25)
    train(model, opt, 2)
    expected = hand_scores(opt, model, lr * 0.25, 2 * lr * 0.25)
    for (module, expert), (epd, _) in expected.items():
        assert opt.last_scores[module][expert] == pytest.approx(epd, rel=1e-4)

    # the step size uses the scheduled lr: first-step Adam update of a winner has size ~lr_scheduled
    model, opt = make(ranks=(4,), score=force("fft"), group_kw=dict(wd_fft=0.0))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1)
    W = model.layers[0].q_proj.base_layer.weight
    before = W.detach().clone()
    train(model, opt, 1)
    assert (W - before).abs().max().item() == pytest.approx(1e-2 * 0.1, rel=1e-3)


def test_works_with_gradient_clipping():
    model, opt = make(ranks=(4,))
    train(model, opt, 3, clip=0.1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(opt.last_decisions) == 6


def test_state_dict_round_trip_equals_uninterrupted():
    def fresh():
        return make(ranks=(4, 8), lr_fft=1e-2, lr_lora=3e-2)

    model_a, opt_a = fresh()
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5)
    log_a = []
    train(model_a, opt_a, 10, scheduler=sched_a, log=log_a)

    model_b, opt_b = fresh()
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=3, gamma=0.5)
    log_b = []
    train(model_b, opt_b, 5, scheduler=sched_b, log=log_b)
    saved = copy.deepcopy({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()})

    model_c, opt_c = fresh()
    sched_c = torch.optim.lr_scheduler.StepLR(opt_c, step_size=3, gamma=0.5)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sched_c.load_state_dict(saved["sched"])
    assert opt_c.win_counts == opt_b.win_counts and opt_c.last_decisions == opt_b.last_decisions
    train(model_c, opt_c, 5, start=5, scheduler=sched_c, log=log_b)

    assert log_a == log_b
    assert opt_c.win_counts == opt_a.win_counts
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(p, q), n


def test_same_seed_same_decisions():
    logs = []
    for _ in range(2):
        model, opt = make(ranks=(4, 8), lr_fft=1e-2, lr_lora=1e-3)
        log = []
        train(model, opt, 8, log=log)
        logs.append(log)
    assert logs[0] == logs[1]
    assert len({d for step in logs[0] for v in step.values() for d in v}) >= 1


def test_masked_path_matches_selected_path():
    results = []
    for impl in ("chunked", "masked"):
        model, opt = make(ranks=(4, 8), lr_fft=1e-2, lr_lora=5e-3, group_kw=dict(wd_fft=0.1, wd_lora=0.05),
                          impl=impl)
        log = []
        train(model, opt, 8, log=log)
        results.append((log, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for p, q in zip(results[0][1], results[1][1]):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- NaN guard
@pytest.mark.parametrize("impl", ["foreach", "masked"])
def test_nan_score_never_wins_and_is_counted(impl):
    def nan_for_fft_of_q(stats):
        s = molf.router.epd(stats)
        s[0] = float("nan")  # expert 0 is the FFT expert of the first module (layers.0.q_proj)
        s[1] = float("inf")
        return s
    model, opt = make(ranks=(4,), score=nan_for_fft_of_q, impl=impl)
    q = model.layers[0].q_proj
    frozen = {n: p.detach().clone() for n, p in q.named_parameters()}
    train(model, opt, 3)
    assert opt.last_decisions["layers.0.q_proj"] == ()
    assert opt.nonfinite_skips == 3
    assert opt.win_counts["layers.0.q_proj"] == {"fft": 0, "lora0": 0}
    for n, p in q.named_parameters():
        assert torch.equal(p, frozen[n]), n  # skipped: no update at all
    assert all(len(d) == 1 for m, d in opt.last_decisions.items() if m != "layers.0.q_proj")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(topk=0), "topk must be an integer >= 1, got 0"),
    (dict(topk=3), "topk=3 exceeds the 2 experts"),
    (dict(score="nope"), "unknown score 'nope'"),
    (dict(eps=-1.0), "eps must be a finite number > 0, got -1.0"),
    (dict(eps=0.0), "eps must be a finite number > 0, got 0.0"),  # 0/0 would make every score NaN
    (dict(betas=(0.9, 1.0)), "betas must both be in"),
    (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(weight_decay=-0.5), "weight_decay"),
])
def test_optimizer_rejects_bad_input(kwargs, match):
    model = molf.wrap(toy(), ranks=(4,))
    with pytest.raises(ValueError, match=match):
        molf.MoLFAdamW(molf.param_groups(model, 1e-3, 1e-3), **kwargs)


def test_negative_lr_in_a_group_is_rejected():
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -0.1"):
        molf.MoLFAdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": -0.1}])


def test_bad_score_output_is_a_clear_error():
    model, opt = make(score=lambda s: torch.zeros(3))
    with pytest.raises(ValueError, match="one value per expert"):
        train(model, opt, 1)
