"""Nothing silent, nothing poisoned: every failure either works or fails loudly before changing anything.

Each case runs on every implementation it applies to (``impl="chunked"``, ``"foreach"``, ``"masked"``;
all run on the CPU here, the masked one as it runs on accelerators).
"""
import copy
import math

import pytest
import torch
from toy import batch, loss_fn, toy, train

import molf
from molf.router import Score

IMPLS = ["chunked", "foreach", "masked"]
Q = "layers.0.q_proj"


def make(impl="auto", ranks=(4, 8), score="epd", dtype=torch.float32, **wrap_kw):
    model = molf.wrap(toy(0).to(dtype), ranks=ranks, **wrap_kw)
    groups = molf.param_groups(model, 1e-2, 3e-3, wd_fft=0.1, wd_lora=0.01)
    return model, molf.MoLFAdamW(groups, score=score, impl=impl)


def snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters() if p in opt.state}
    return params, state


def backward(model, step):
    loss_fn(model, batch(step)).backward()


def same(a: dict, b: dict, names) -> bool:
    return all(torch.equal(a[n], b[n]) if isinstance(a[n], torch.Tensor) else same(a[n], b[n], a[n]) for n in names)


# ---------------------------------------------------------------- one bad gradient
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_skips_the_whole_module_step_and_training_resumes(impl, bad):
    model, opt = make(impl)
    train(model, opt, 2)
    q = model.layers[0].q_proj
    opt.zero_grad()
    backward(model, 2)
    q.base_layer.weight.grad[1, 2] = bad                  # one element of one expert
    model.embed_tokens.weight.grad[0, 0] = bad            # and one of a plain parameter
    before_params, before_state = snapshot(model, opt)
    wins_before = opt.win_counts
    opt.step()
    skipped = [n for n in before_params if n.startswith(Q + ".") or n == "embed_tokens.weight"]
    opt.state_dict()  # gives the masked path's skipped step counters back, as the next step would
    after_params, after_state = snapshot(model, opt)
    for n in skipped:  # parameters, moments and step counters untouched
        assert torch.equal(after_params[n], before_params[n]), n
        assert same(after_state[n], before_state[n], before_state[n]), n
    moved = [n for n in before_params if n not in skipped and not torch.equal(after_params[n], before_params[n])]
    assert any(n.startswith("layers.1.") for n in moved)  # the others trained
    assert opt.last_decisions[Q] == ()
    assert math.isnan(opt.last_scores[Q]["fft"])
    assert opt.win_counts[Q] == wins_before[Q]
    assert opt.nonfinite_skips == 1          # one decision without a winner (the module)
    assert opt.nonfinite_grad_skips == 2     # the module and the plain parameter
    assert all(len(d) == 1 for m, d in opt.last_decisions.items() if m != Q)

    train(model, opt, 2, start=3)            # finite again: the module trains, from the state it had
    for n in skipped:
        p = dict(model.named_parameters())[n]
        assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg"]).all(), n
        assert opt.state[p]["step"].item() == 4, n   # 2 + 2 steps, the skipped one not counted
    assert len(opt.last_decisions[Q]) == 1
    assert any(not torch.equal(dict(model.named_parameters())[n], before_params[n]) for n in skipped
               if n.startswith(Q + "."))
    assert opt.nonfinite_skips == 1 and opt.nonfinite_grad_skips == 2


def test_every_path_skips_alike():
    """The same run with a bad gradient at step 3 ends in the same parameters on every path."""
    finals = []
    for impl in IMPLS:
        model, opt = make(impl)
        for s in range(6):
            opt.zero_grad()
            backward(model, s)
            if s == 3:
                model.layers[1].up_proj.lora_A[0].weight.grad[0, 0] = float("nan")
            opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    for other in finals[1:]:
        for p, q in zip(finals[0], other):
            assert torch.allclose(p, q, rtol=0, atol=1e-7)
    assert all(torch.isfinite(p).all() for p in finals[-1])


def test_masked_step_counter_is_given_back_at_the_next_step():
    model, opt = make("masked")
    train(model, opt, 1)
    opt.zero_grad()
    backward(model, 1)
    w = model.layers[0].q_proj.base_layer.weight
    w.grad[0, 0] = float("inf")
    opt.step()
    train(model, opt, 1, start=2)            # settles the skipped step, then steps
    assert opt.state[w]["step"].item() == 2
    assert opt.state[model.layers[1].q_proj.base_layer.weight]["step"].item() == 3


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("impl", IMPLS)
def test_float16_parameters_fail_loudly_before_anything_changes(impl):
    model, opt = make(impl, dtype=torch.float16)
    backward(model, 0)
    before, _ = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"float32, bfloat16 and float64 .* got torch.float16"):
        opt.step()
    assert len(opt.state) == 0
    assert same(before, snapshot(model, opt)[0], before)


@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_masked_path_equals_chunked_path_exactly_in_float64(score):
    results = []
    for impl in ("chunked", "masked"):
        model, opt = make(impl, score=score, dtype=torch.float64)
        log = []
        train(model, opt, 25, log=log)
        results.append((log, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for p, q in zip(results[0][1], results[1][1]):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- modules without a gradient
@pytest.mark.parametrize("impl", IMPLS)
def test_a_module_without_gradient_is_not_routed_nor_counted(impl):
    model, opt = make(impl)
    train(model, opt, 1)
    opt.zero_grad()
    backward(model, 1)
    q = model.layers[0].q_proj
    for p in q.parameters():
        p.grad = None
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    wins = opt.win_counts[Q]
    opt.step()
    assert opt.last_decisions[Q] == ()
    assert opt.win_counts[Q] == wins
    assert all(math.isnan(s) for s in opt.last_scores[Q].values())
    assert opt.nonfinite_skips == 0 and opt.nonfinite_grad_skips == 0
    assert all(torch.equal(p, before[n]) for n, p in q.named_parameters())
    assert all(len(d) == 1 for m, d in opt.last_decisions.items() if m != Q)


# ---------------------------------------------------------------- bad numbers
@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=float("inf")), "lr must be a finite number >= 0, got inf"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0, got inf"),
    (dict(eps=float("inf")), "eps must be a finite number > 0, got inf"),
    (dict(eps=float("nan")), "eps must be a finite number > 0, got nan"),
    (dict(betas=(0.9, float("nan"))), "betas must both be in"),
    (dict(impl="fast"), r"impl must be one of \('auto', 'chunked', 'foreach', 'masked'\), got 'fast'"),
])
def test_optimizer_rejects_non_finite_and_unknown_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        molf.MoLFAdamW([torch.nn.Parameter(torch.ones(2))], **{"lr": 1e-3, **kwargs})


def test_group_settings_are_checked_too():
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got inf"):
        molf.MoLFAdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": float("inf")}])
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got inf"):
        molf.MoLFAdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-3, "weight_decay": float("inf")}])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr_fft=float("inf")), "lr_fft must be a finite number > 0, got inf"),
    (dict(lr_lora=float("nan")), "lr_lora must be a finite number > 0, got nan"),
    (dict(wd_fft=float("inf")), "wd_fft must be a finite number >= 0, got inf"),
])
def test_param_groups_name_the_bad_learning_rate(kwargs, match):
    model = molf.wrap(toy(), ranks=(4,))
    with pytest.raises(ValueError, match=match):
        molf.param_groups(model, **{"lr_fft": 1e-3, "lr_lora": 1e-3, **kwargs})


def test_chunked_needs_a_score_with_a_term():
    with pytest.raises(ValueError, match="impl='chunked' sums the score's per-element term"):
        make("chunked", score=lambda s: molf.router.epd(s))


# ---------------------------------------------------------------- wrap: all or nothing
@pytest.mark.parametrize("kwargs", [
    dict(targets=["nope_proj"]),
    dict(ranks=(0,)),
    dict(ranks=(4,), alphas=(float("inf"),)),
    dict(ranks=(4,), dropout=1.5),
    dict(ranks=(4,), train_base=False),
])
def test_a_failed_wrap_leaves_the_model_as_it_was(kwargs):
    model = toy()
    before = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError):
        molf.wrap(model, freeze_non_linear=True, **kwargs)
    assert all(p.requires_grad for p in model.parameters())
    assert [type(m) for m in model.modules()] == modules
    assert same(before, model.state_dict(), before)


# ---------------------------------------------------------------- scores of the wrong shape
@pytest.mark.parametrize("impl", ["foreach", "masked"])
def test_a_score_of_the_wrong_shape_fails_before_any_state_moves(impl):
    model, opt = make(impl, score=lambda s: torch.zeros(3))
    backward(model, 0)
    before, _ = snapshot(model, opt)
    with pytest.raises(ValueError, match="one value per expert"):
        opt.step()
    assert len(opt.state) == 0                     # no moments were created (or moved)
    assert same(before, snapshot(model, opt)[0], before)


def test_a_score_object_of_the_wrong_shape_fails_before_any_state_moves_on_the_chunked_path():
    bad = Score("first_only", term=molf.router.epd.term, finish=lambda sums, lr, numel: sums[:1])
    model, opt = make("chunked", score=bad)
    backward(model, 0)
    before, _ = snapshot(model, opt)
    with pytest.raises(ValueError, match="one value per expert"):
        opt.step()
    assert len(opt.state) == 0
    assert same(before, snapshot(model, opt)[0], before)


def test_grad_skip_counter_survives_a_checkpoint():
    model, opt = make("chunked")
    backward(model, 0)
    model.layers[0].q_proj.base_layer.weight.grad[0, 0] = float("nan")
    opt.step()
    _, fresh = make("chunked")
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.nonfinite_grad_skips == 1 and fresh.nonfinite_skips == 1
