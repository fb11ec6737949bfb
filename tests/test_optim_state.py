"""The optimizer's state, as a careful user and an attacker would handle it.

Checkpoints carry ``score``, ``impl`` and ``topk`` and fit only the optimizer they came from (module
names, experts, shapes), refused naming the mismatch before anything changes; groups may be added after
steps; a step that raises changes nothing; a step without gradients reports no winner; eps must be
> 0; score names follow one case rule. Failure classes sweep every eager impl and every dtype.
"""
import copy
import math

import pytest
import torch
from toy import batch, loss_fn, toy, train

import molf
from molf.routing_log import RoutingRecord

IMPLS = [i for i in molf.optim.IMPLS if i != "auto"]  # compiled: built once per machine
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def make(targets="all-linear", ranks=(4,), dtype=torch.float32, seed=0, **opt_kw):
    model = molf.wrap(toy(seed).to(dtype), ranks=ranks, targets=targets)
    return model, molf.MoLFAdamW(molf.param_groups(model, 1e-2, 3e-3, wd_fft=0.1, wd_lora=0.01), **opt_kw)


def frozen(opt) -> dict:
    """Everything an optimizer holds, copied: state, group settings, routing counters and last step."""
    sd = copy.deepcopy(opt.state_dict())
    return {"sd": sd, "decisions": opt.last_decisions, "wins": opt.win_counts,
            "skips": (opt.nonfinite_skips, opt.nonfinite_grad_skips)}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num())
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)


# ---------------------------------------------------------------- score, impl and topk travel with the state
def test_score_impl_and_topk_are_group_settings_that_a_checkpoint_restores():
    model, opt = make(ranks=(4, 8), score="pfn", impl="foreach", topk=2)
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    assert all(g["score"] == "pfn" and g["impl"] == "foreach" and g["topk"] == 2 for g in sd["param_groups"])
    model_b, fresh = make(ranks=(4, 8))                # epd, auto, top-1
    fresh.load_state_dict(sd)
    assert (fresh.score_name, fresh.impl) == ("pfn", "foreach") and fresh.score_fn is molf.router.pfn
    assert all(g["topk"] == 2 for g in fresh.param_groups)
    model_b.load_state_dict(model.state_dict())
    train(model_b, fresh, 1, start=2)
    assert all(len(d) == 2 for d in fresh.last_decisions.values())  # routed top-2, as saved


def test_a_state_dict_holds_no_code_and_loads_with_weights_only(tmp_path):
    def mine(stats):
        return molf.router.epd(stats)
    model, opt = make(score=mine)
    train(model, opt, 1)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert {g["score"] for g in sd["param_groups"]} == {"mine"}
    _, same = make(score=mine)
    same.load_state_dict(sd)                            # the name is this optimizer's callable
    assert same.score_fn is mine
    _, other = make()
    with pytest.raises(ValueError, match="unknown score 'mine'"):
        other.load_state_dict(sd)                       # registered nowhere: refused, named


def test_an_older_checkpoint_without_the_new_settings_takes_the_optimizers():
    model, opt = make(impl="foreach")
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["score"], g["impl"]
    _, fresh = make(score="pfn", impl="masked")
    fresh.load_state_dict(sd)
    assert (fresh.score_name, fresh.impl) == ("pfn", "masked")
    assert fresh.win_counts == opt.win_counts


# ---------------------------------------------------------------- a checkpoint fits only its own optimizer
def mismatches():
    def other_module():   # same shapes, another module: matched by name, not by position
        return make(targets=["layers.0.q_proj"]), make(targets=["layers.1.q_proj"])

    def other_ranks():    # same names, other shapes
        return make(ranks=(4,)), make(ranks=(8,))

    def other_experts():  # another number of experts
        return make(ranks=(4,)), make(ranks=(4, 4))

    def other_groups():
        return make(), make(targets=["q_proj"])

    return {"module": (other_module, r"group 0 \(module 'layers.1.q_proj'\): the checkpoint's "
                                     r"molf_module is 'layers.0.q_proj', this optimizer's 'layers.1.q_proj'"),
            "ranks": (other_ranks, r"module 'layers.0.q_proj'\) expert 'lora0' parameter \d: the checkpoint's "
                                   r"exp_avg has shape \(4, 16\), the parameter \(8, 16\)"),
            "experts": (other_experts, r"experts is \('fft', 'lora0'\), this optimizer's \('fft', 'lora0', 'lora1'\)"),
            "groups": (other_groups, r"the checkpoint has 8 parameter groups, this optimizer 4")}


@pytest.mark.parametrize("case", sorted(mismatches()))
def test_a_checkpoint_of_another_layout_is_refused_naming_it_before_anything_changes(case):
    build, match = mismatches()[case]
    (model_a, opt_a), (model_b, opt_b) = build()
    train(model_a, opt_a, 2)
    train(model_b, opt_b, 1)
    before = frozen(opt_b)
    with pytest.raises(ValueError, match=match):
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert_same(frozen(opt_b), before)
    train(model_b, opt_b, 1, start=1)                   # and it still trains


def _drop_moment(sd):
    del sd["state"][0]["exp_avg_sq"]


def _moment_as_list(sd):
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].tolist()


def _group_without_params(sd):
    del sd["param_groups"][1]["params"]


@pytest.mark.parametrize("corrupt, match", [
    (_drop_moment, r"group 0 \(module 'layers.0.q_proj'\) expert 'fft' parameter 0: the checkpoint's state has "
                   r"no tensor 'exp_avg_sq'"),
    (_moment_as_list, "has no tensor 'exp_avg'"),
    (_group_without_params, r"group 1 \(module 'layers.0.up_proj'\): the checkpoint's group is not a dict with a "
                            r"'params' list"),
])
def test_a_malformed_checkpoint_is_refused_naming_the_part_before_anything_changes(corrupt, match):
    model, opt = make()
    train(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = frozen(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same(frozen(opt), before)


def test_routing_counters_that_do_not_fit_are_refused_before_anything_changes():
    model, opt = make()
    train(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    sd["molf"]["win_counts"] = sd["molf"]["win_counts"][:-1]
    before = frozen(opt)
    with pytest.raises(ValueError, match=r"routing counters have shape \(5, 2\), this optimizer routes 6 modules"):
        opt.load_state_dict(sd)
    assert_same(frozen(opt), before)


# ---------------------------------------------------------------- add_param_group after steps
@pytest.mark.parametrize("impl", IMPLS)
def test_a_group_added_after_steps_is_routed_and_counted(impl):
    model = molf.wrap(toy(0), ranks=(4,))
    groups = molf.param_groups(model, 1e-2, 3e-3)
    first, later = groups[:3], groups[3:]
    opt = molf.MoLFAdamW(first, impl=impl)
    train(model, opt, 2)
    assert set(opt.win_counts) == {g["molf_module"] for g in first}
    for g in later:
        opt.add_param_group(g)
    train(model, opt, 3, start=2)
    modules = [g["molf_module"] for g in groups if "molf_module" in g]
    assert list(opt.win_counts) == modules
    for i, g in enumerate(groups):
        if "molf_module" in g:
            wins = sum(opt.win_counts[g["molf_module"]].values())
            assert wins == (5 if i < len(first) else 3), g["molf_module"]
    assert all(len(opt.last_decisions[m]) == 1 for m in modules)
    steps = {float(opt.state[p]["step"]) for g in later for p in g["params"]}
    assert steps == {3.0}
    _, fresh = make()                                   # and its state loads where the groups are the same
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.win_counts == opt.win_counts


def test_add_param_group_refuses_bad_settings_and_leaves_the_optimizer_as_it_was():
    model, opt = make()
    train(model, opt, 1)
    n = len(opt.param_groups)
    extra = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got 0"):
        opt.add_param_group({"params": [extra], "lr": 1e-3, "eps": 0})
    with pytest.raises(ValueError, match="same impl"):
        opt.add_param_group({"params": [extra], "lr": 1e-3, "impl": "foreach"})
    with pytest.raises(ValueError, match="module 'layers.0.q_proj' is in two parameter groups"):
        opt.add_param_group({**opt.param_groups[0], "params": [torch.nn.Parameter(p.detach().clone())
                                                               for p in opt.param_groups[0]["params"]]})
    assert len(opt.param_groups) == n
    opt.add_param_group({"params": [extra], "lr": 1e-3})   # a good one still goes in
    assert len(opt.param_groups) == n + 1


# ---------------------------------------------------------------- a step that raises changes nothing
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_step_that_raises_leaves_every_state_as_it_was(impl, dtype):
    model, opt = make(impl=impl, dtype=dtype)
    train(model, opt, 2)
    half = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt.add_param_group({"params": [half], "lr": 1e-3})
    opt.zero_grad()
    loss_fn(model, batch(2)).float().backward()
    half.grad = torch.ones_like(half)
    before, params = frozen(opt), [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="got torch.float16"):
        opt.step()
    assert_same(frozen(opt), before)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_refused_impl_creates_no_state(dtype):
    """``impl="chunked"`` needs contiguous tensors: the refusal comes after the state was looked up."""
    model, opt = make(impl="chunked", dtype=dtype)
    loss_fn(model, batch(0)).float().backward()
    w = model.layers[0].q_proj.base_layer.weight
    w.grad = w.grad.t().contiguous().t()
    with pytest.raises(ValueError, match="needs contiguous"):
        opt.step()
    assert len(opt.state) == 0 and opt.last_decisions == {}


@pytest.mark.parametrize("impl", ["foreach", "masked"])
def test_a_wrong_score_met_first_after_a_group_is_added_changes_nothing(impl):
    calls = []

    def picky(stats):  # right for the first set of modules only
        calls.append(len(stats.expert_names))
        return molf.router.epd(stats)[: 6 if len(calls) > 2 else None]
    model = molf.wrap(toy(0), ranks=(4,))
    groups = molf.param_groups(model, 1e-2, 3e-3)
    opt = molf.MoLFAdamW(groups[:3], score=picky, impl=impl)
    train(model, opt, 1)
    opt.add_param_group(groups[3])
    opt.zero_grad()
    loss_fn(model, batch(1)).backward()
    before = frozen(opt)
    with pytest.raises(ValueError, match="one value per expert"):
        opt.step()
    assert_same(frozen(opt), before)


# ---------------------------------------------------------------- a step without gradients
@pytest.mark.parametrize("impl", IMPLS)
def test_a_step_without_gradients_reports_no_winner(impl):
    model, opt = make(impl=impl)
    train(model, opt, 2)
    wins = opt.win_counts
    opt.zero_grad()
    opt.step()
    assert opt.last_decisions == {m: () for m in molf.wrapped_modules(model)}
    assert all(math.isnan(s) for scores in opt.last_scores.values() for s in scores.values())
    record = RoutingRecord.from_optimizer(opt, step=2)
    assert all(w == () for w in record.winners.values()) and len(record.winners) == 6
    assert opt.win_counts == wins and opt.nonfinite_skips == 0


def test_a_first_step_without_gradients_reports_no_winner_either():
    model, opt = make()
    opt.step()
    assert opt.last_decisions == {m: () for m in molf.wrapped_modules(model)} and len(opt.state) == 0


# ---------------------------------------------------------------- eps and score names
@pytest.mark.parametrize("eps", [0, 0.0, -1e-8])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match=f"eps must be a finite number > 0, got {eps!r}"):
        make(eps=eps)
    model = molf.wrap(toy(0), ranks=(4,))
    groups = molf.param_groups(model, 1e-2, 3e-3)
    groups[0]["eps"] = eps
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        molf.MoLFAdamW(groups)


@pytest.mark.parametrize("registered, asked", [("MyScore", "MyScore"), ("MyScore", "myscore"),
                                               ("myscore", "MYSCORE")])
def test_score_names_follow_one_case_rule(registered, asked):
    molf.register_score(registered, molf.router.pfn)
    try:
        model, opt = make(score=asked)
        train(model, opt, 1)
        assert opt.score_name == "myscore" and opt.score_fn is molf.router.pfn
    finally:
        del molf.router.SCORES["myscore"]


def test_the_readback_carries_counters_over_by_name_when_modules_are_added():
    from molf.readback import RoutingReadback
    old = RoutingReadback([("a", ("fft", "lora0")), ("b", ("fft", "lora0"))])
    old.record(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[False, True], [True, False]]), torch.tensor(1))
    new = old.regrid([("c", ("fft", "lora0", "lora1")), ("b", ("fft", "lora0")), ("a", ("fft", "lora0"))])
    assert new.win_table() == {"c": {"fft": 0, "lora0": 0, "lora1": 0}, "b": {"fft": 1, "lora0": 0},
                               "a": {"fft": 0, "lora0": 1}}
    assert new.last_decisions() == {"c": (), "b": ("fft",), "a": ("lora0",)}
    assert new.last_scores()["a"] == {"fft": 1.0, "lora0": 2.0} and math.isnan(new.last_scores()["c"]["lora1"])
    assert int(new.skips) == 1


@pytest.mark.parametrize("impl", ["chunked", "foreach", "masked"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_its_routing_and_trains_as_the_original(impl, how):
    import pickle

    model, opt = make(impl=impl)
    train(model, opt, 3)
    model_copy, opt_copy = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert opt_copy.win_counts == opt.win_counts and opt_copy.last_decisions == opt.last_decisions
    assert opt_copy.score_name == opt.score_name and opt_copy.impl == impl
    log, log_copy = [], []
    train(model, opt, 2, start=3, log=log)
    train(model_copy, opt_copy, 2, start=3, log=log_copy)
    assert log == log_copy and opt_copy.win_counts == opt.win_counts
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_copy.parameters()))
