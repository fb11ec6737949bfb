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
    assert "_shadow_probe" not in router.SCORES


def test_through_the_engine_the_router_is_read_before_the_scheduler_moves_the_lr():
    """At the last step of a cosine schedule the next lr is 0 (every EPD score 0, a tie): a shadow read
    after the scheduler would disagree there. Read on the optimizer step, EPD agrees with itself always."""
    from molf.lab import engine, train
    model, opt = _setup(score="epd")
    scheduler = train.make_scheduler(opt, "cosine", 6, 0.0)
    shadows = shadow.ShadowRouters(rules=("epd",))
    engine.fit(model, opt, lambda t: [batch(t)], steps=6, scheduler=scheduler, loss_fn=loss_fn, callbacks=[shadows])
    table = shadows.table()
    assert sorted(set(table["step"])) == list(range(6))
    assert shadow.agreement(table, by=("rule",))["agreement"].tolist() == [1.0]
    assert (table.query("rule == 'real' and won")["expert"] != "fft").any()  # LoRA won somewhere: not a trivial tie


def test_probe_steps_leave_room_for_the_horizon():
    assert shadow.probe_steps(8, 2, 3) == [1, 4]
    assert shadow.probe_steps(20, 3, 3) == [1, 8, 16]
    assert shadow.probe_steps(20, 1, 3) == [8]
    assert all(s + 3 < 20 for s in shadow.probe_steps(20, 5, 3))
    with pytest.raises(ValueError, match="no room for a probe of horizon 3"):
        shadow.probe_steps(4, 1, 3)
    with pytest.raises(ValueError, match="probe steps must be an integer"):
        shadow.probe_steps(8, 0, 3)


def test_choice_costs_train_the_real_branch_once_and_leave_the_random_state_alone():
    model, opt = _setup()
    _train(model, opt, 2, shadow.ShadowRouters(rules=("epd",)))
    batches = lambda t: [batch(t)]
    state = torch.random.get_rng_state()
    rows = shadow.choice_costs(model, opt, batches, loss_fn, step=2, rules=("epd", "cycle", "pfn"), horizon=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [r["rule"] for r in rows] == ["epd", "cycle", "pfn"]
    assert len({r["loss_real"] for r in rows}) == 1 and rows[0]["cost"] == 0.0
    single = shadow.choice_cost(model, opt, batches, loss_fn, step=2, rule="cycle", horizon=2)
    assert single["cost"] == rows[1]["cost"]
    with pytest.raises(ValueError, match="unknown shadow rule 'nope'"):
        shadow.choice_costs(model, opt, batches, loss_fn, step=2, rules=("nope",))


def test_the_choice_costs_callback_probes_at_its_steps_from_the_state_before_them():
    from molf.lab import engine
    model, opt = _setup()
    batches = lambda t: [batch(t)]
    costs = shadow.ChoiceCosts(batches, ("cycle",), steps=[0, 3, 5], horizon=2, loss_fn=loss_fn)
    engine.fit(model, opt, batches, steps=6, loss_fn=loss_fn, callbacks=[costs])
    table = costs.table()
    assert table["step"].tolist() == [0, 3]          # step 5 + horizon 2 runs past the 6 steps: not probed
    # the probe at 3 started from the state after step 2: the same as probing a run stopped there
    again, opt2 = _setup()
    engine.fit(again, opt2, batches, steps=3, loss_fn=loss_fn)
    direct = shadow.choice_cost(again, opt2, batches, loss_fn, step=3, rule="cycle", horizon=2)
    assert table.iloc[1]["cost"] == pytest.approx(direct["cost"], abs=1e-7)
    with pytest.raises(ValueError, match="unknown shadow rule"):
        shadow.ChoiceCosts(batches, ("nope",), steps=[1])


def test_train_with_shadows_on_the_tiny_model_and_reads_a_finished_run_back(tmp_path):
    from molf.lab import notebook, weights
    config = notebook.run_config(tmp_path, model="tiny", method="molf", steps=6, batch_size=2, seq_len=32,
                                 eval_limit=0)
    first = shadow.train_with_shadows(config, rules=("epd", "cycle"), n_probes=1, horizon=2)
    assert shadow.agreement(first.shadows, by=("rule",)).set_index("rule")["agreement"]["epd"] == 1.0
    assert first.costs["rule"].tolist() == ["cycle"] and first.costs["step"].tolist() == shadow.probe_steps(6, 1, 2) == [1]
    assert first.audit.query("not won")["moved"].max() == 0.0 and first.audit.query("won")["moved"].min() > 0
    assert not weights.wrapped_modules(first.model)   # merged into a plain model
    again = shadow.train_with_shadows(config, rules=("epd", "cycle"), n_probes=1, horizon=2)
    assert again.run.model is None                     # read back, not retrained
    assert again.costs["cost"].tolist() == pytest.approx(first.costs["cost"].tolist())
    assert shadow.agreement(again.shadows).equals(shadow.agreement(first.shadows))
    tuned = dict(first.model.named_parameters())
    assert all(torch.equal(p, tuned[n]) for n, p in again.model.named_parameters())
    with pytest.raises(ValueError, match="routed method"):
        shadow.train_with_shadows(notebook.run_config(tmp_path, model="tiny", method="fft", steps=6))
