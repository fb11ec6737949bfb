"""The batched router makes exactly the decisions of the naive per-module one (``molf.reference``).

A random toy model with two LoRA experts of rank 4 per module (three-way decisions), 20 steps, EPD and PFN,
both ways of applying the decisions (the CPU chunked path and the masked foreach path of accelerators),
and the CPU path with chunks so small that every tensor is split (unaligned tails included).
"""
import pytest
import torch
from toy import batch, loss_fn, toy

import molf
import molf.functional
from molf.reference import NaiveMoLFAdamW

STEPS = 20
LR_FFT, LR_LORA = 2e-2, 4e-3   # EPD: every expert wins somewhere (checked below)


def run(make_opt, score):
    model = molf.wrap(toy(3, d=24), ranks=(4, 4))
    opt = make_opt(molf.param_groups(model, LR_FFT, LR_LORA, wd_fft=0.1, wd_lora=0.01), score)
    log = []
    for s in range(STEPS):
        opt.zero_grad()
        loss_fn(model, batch(s)).backward()
        opt.step()
        log.append((opt.last_decisions, opt.last_scores))
    return log, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("score", ["epd", "pfn"])
@pytest.mark.parametrize("path", ["chunked", "small_chunks", "masked"])
def test_batched_router_decides_like_the_naive_one(score, path, monkeypatch):
    if path == "small_chunks":
        monkeypatch.setattr(molf.functional, "CHUNK", 37)

    def batched(groups, score):
        return molf.MoLFAdamW(groups, score=score, impl="masked" if path == "masked" else "chunked")

    naive_log, naive_params = run(lambda groups, score: NaiveMoLFAdamW(groups, score=score), score)
    log, params = run(batched, score)

    winners = set()
    for step, ((want, want_scores), (got, got_scores)) in enumerate(zip(naive_log, log)):
        assert got == want, f"step {step}: decisions differ"
        for module, scores in want_scores.items():
            assert got_scores[module] == pytest.approx(scores, rel=1e-5), (step, module)
            ranked = sorted(scores.values(), reverse=True)
            assert ranked[0] > ranked[1] * (1 + 1e-4), f"step {step} {module}: near-tie, test not meaningful"
        winners |= {e for d in want.values() for e in d}
    if score == "epd":
        assert winners == {"fft", "lora0", "lora1"}  # all three kinds of decision are exercised
    for p, q in zip(params, naive_params):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_one_source_for_the_adam_defaults():
    import inspect
    for fn in (molf.MoLFAdamW.__init__, NaiveMoLFAdamW.__init__):
        params = inspect.signature(fn).parameters
        assert params["betas"].default is molf.DEFAULT_BETAS and params["eps"].default is molf.DEFAULT_EPS
    assert molf.DEFAULT_BETAS == (0.9, 0.999) and molf.DEFAULT_EPS == 1e-8  # torch.optim.AdamW's


@pytest.mark.parametrize("scores, k, want", [
    ([1.0, 2.0, 2.0], 1, [False, True, False]),   # a tie: the lower index wins
    ([3.0, 3.0, 3.0], 2, [True, True, False]),
    ([0.5, 0.1, 0.9], 2, [True, False, True]),
    ([1.0, 2.0], 5, [True, True]),                # k above the number of experts: all win
    ([1.0, float("nan"), 2.0], 1, [False, False, False]),  # a NaN never wins, nor does anyone beside it
    ([float("inf"), 1.0], 1, [False, False]),
])
def test_top_k_flags_is_the_routers_rule(scores, k, want):
    from molf.router import top_k_flags
    assert top_k_flags(scores, k) == want
    assert top_k_flags(torch.tensor(scores, dtype=torch.float32), k) == want
    finite = all(s == s and abs(s) != float("inf") for s in scores)
    if finite:  # the reference's readable rule agrees
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        assert [i in order for i in range(len(scores))] == want


@pytest.mark.parametrize("k", [0, -1, 1.0, True])
def test_top_k_flags_refuses_a_bad_k(k):
    from molf.router import top_k_flags
    with pytest.raises(ValueError, match="k must be an integer"):
        top_k_flags([1.0, 2.0], k)
