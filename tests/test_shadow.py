"""Shadow routers: other rules on the same moments, their agreement with the router, and their cost."""
from __future__ import annotations

import copy

import pytest
import torch
from toy import batch, loss_fn, toy

import molf
from molf import router
from molf.lab import shadow


def _setup(score="epd", topk=1, lr_lora=1e-4, impl="auto"):
    model = toy()
    molf.wrap(model, ranks=(2,))
    opt = molf.MoLFAdamW(molf.param_groups(model, lr_fft=1e-3, lr_lora=lr_lora), score=score, topk=topk, impl=impl)
    return model, opt


def _train(model, opt, steps, shadows):
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, batch(step)).backward()
        opt.step()
        shadows.record(step, opt)


@pytest.fixture
def reversed_epd():
    router.register_score("reversed_epd", lambda stats: -router.epd(stats))
    yield "reversed_epd"
    router.SCORES.pop("reversed_epd", None)


@pytest.mark.parametrize("impl", ["chunked", "foreach"])
@pytest.mark.parametrize("real", ["epd", "pfn"])
def test_the_routing_score_agrees_with_itself_and_its_reverse_never(real, impl, reversed_epd):
    model, opt = _setup(score=real, impl=impl)
    shadows = shadow.ShadowRouters(rules=(real, reversed_epd))
    _train(model, opt, 8, shadows)
    per_rule = shadow.agreement(shadows.table(), by=("rule",)).set_index("rule")["agreement"]
    assert per_rule[real] == 1.0
    if real == "epd":
        assert per_rule[reversed_epd] == 0.0
    table = shadows.table()
    assert set(table["rule"]) == {real, reversed_epd, "real"}
    assert (table[table.rule != "real"].groupby(["step", "module", "rule"])["won"].sum() == 1).all()


def test_topk_two_picks_both_experts_under_every_rule():
    model, opt = _setup(topk=2)
    shadows = shadow.ShadowRouters()
    _train(model, opt, 3, shadows)
    assert (shadow.agreement(shadows.table(), by=("rule",))["agreement"] == 1.0).all()


def test_the_policies_pick_what_they_say():
    model, opt = _setup()
    shadows = shadow.ShadowRouters(rules=("cycle", "random", "grad_rms"), cycle_every=2)
    _train(model, opt, 6, shadows)
    t = shadows.table()
    cycle = t[(t.rule == "cycle") & t.won]
    assert all(e == ("fft" if (s // 2) % 2 == 0 else "lora0") for s, e in zip(cycle["step"], cycle["expert"]))
    again = shadow.ShadowRouters(rules=("random",), cycle_every=2)
    model2, opt2 = _setup()
    _train(model2, opt2, 6, again)
    first = t[(t.rule == "random") & t.won][["step", "module", "expert"]].values.tolist()
    assert first == again.table().query("rule == 'random' and won")[["step", "module", "expert"]].values.tolist()


def test_grad_rms_is_the_gradient_rms_of_each_expert():
    model, opt = _setup()
    opt.zero_grad()
    loss_fn(model, batch(0)).backward()
    opt.step()
    shadows = shadow.ShadowRouters(rules=("grad_rms",))
    shadows.record(0, opt)
    scores = shadows.table().query("rule == 'grad_rms'").set_index(["module", "expert"])["score"]
    layer = dict(model.named_modules())["layers.1.up_proj"]
    for expert, params in layer.expert_parameters().items():
        grads = [p.grad for p in params if p.grad is not None]
        n = sum(p.numel() for p in params if p.requires_grad)
        expected = (sum(float(g.pow(2).sum()) for g in grads) / n) ** 0.5
        assert scores[("layers.1.up_proj", expert)] == pytest.approx(expected, rel=1e-5)


def test_agreement_over_time_has_one_row_per_window():
    model, opt = _setup()
    shadows = shadow.ShadowRouters(rules=("epd", "cycle"))
    _train(model, opt, 9, shadows)
    windows = shadow.over_time(shadows.table(), window=4)
    assert sorted(set(windows["step_start"])) == [0, 4, 8]
    assert (windows[windows.rule == "epd"]["agreement"] == 1.0).all()
    with pytest.raises(ValueError, match="window"):
        shadow.over_time(shadows.table(), window=0)


def test_an_unknown_rule_is_named():
    with pytest.raises(ValueError, match="unknown shadow rule 'nope'"):
        shadow.ShadowRouters(rules=("nope",))


@pytest.mark.parametrize("rule", ["epd", "cycle"])
def test_choice_cost_is_zero_for_the_same_rule_and_leaves_the_run_alone(rule):
    model, opt = _setup()
    _train(model, opt, 2, shadow.ShadowRouters(rules=("epd",)))
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    batches = lambda t: [batch(t)]
    result = shadow.choice_cost(model, opt, batches, loss_fn, step=2, rule=rule, horizon=3, max_grad_norm=1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    now = opt.state_dict()["state"]
    assert all(torch.equal(now[i][k], state["state"][i][k]) for i in state["state"] for k in ("exp_avg", "exp_avg_sq"))
    if rule == "epd":
        assert result["cost"] == 0.0 and result["modules_differing"] == 0.0
    else:
        # cycle picks the FFT expert at step 2 (every 10 steps: block 0) where EPD picked LoRA somewhere
        assert result["modules_differing"] > 0 and result["cost"] != 0.0
    assert "_shadow_" + rule not in router.SCORES
