"""``MoLFAdamW(impl="compiled")``: a torch.compile'd pass 1 built from the score's term, torch's fused
AdamW kernel as pass 2.

Against the chunked path (the eager reference of the CPU): the same decisions at every step, the
parameters to rounding (the fused kernel rounds as ``AdamW(fused=True)``); a non-finite gradient skips
its module's whole step; a kernel that cannot be compiled falls back to the chunked path with one
line. Every test here shares one compile of the EPD kernel per process (cached in ``molf._compiled``;
inductor's on-disk cache makes later runs fast); the PFN one is marked slow.
"""
import copy
import logging

import pytest
import torch
from toy import batch, loss_fn, toy

import molf
from molf import _compiled
from molf.router import Score

STEPS = 12


def run(impl, score="epd", steps=STEPS, poison=()):
    model = molf.wrap(toy(3, d=24), ranks=(4, 4))
    opt = molf.MoLFAdamW(molf.param_groups(model, 2e-2, 4e-3, wd_fft=0.1, wd_lora=0.01), score=score, impl=impl)
    log = []
    for s in range(steps):
        opt.zero_grad()
        loss_fn(model, batch(s)).backward()
        if s in poison:  # one module's base weight gets a NaN gradient
            model.layers[0].q_proj.base_layer.weight.grad[0, 0] = float("nan")
        opt.step()
        log.append(opt.last_decisions)
    state = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), float(opt.state[p]["step"]))
             for p in model.parameters() if p in opt.state]
    return log, [p.detach().clone() for p in model.parameters()], state, opt


def assert_close_runs(a, b):
    (log_a, params_a, state_a, _), (log_b, params_b, state_b, _) = a, b
    assert log_a == log_b
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for (m, v, t), (m2, v2, t2) in zip(state_a, state_b):
        assert t == t2
        for x, y in ((m, m2), (v, v2)):  # to rounding, relative to the tensor's scale
            assert (x - y).abs().max() <= 1e-4 * x.abs().max()


def test_compiled_decides_like_chunked_and_moves_like_it_to_rounding():
    chunked, compiled = run("chunked"), run("compiled")
    assert_close_runs(chunked, compiled)
    assert {e for d in chunked[0] for w in d.values() for e in w} == {"fft", "lora0", "lora1"}


def test_compiled_skips_a_module_with_a_nonfinite_gradient_whole():
    chunked, compiled = run("chunked", poison=(3, 4)), run("compiled", poison=(3, 4))
    assert compiled[0][3]["layers.0.q_proj"] == () == compiled[0][4]["layers.0.q_proj"]
    assert compiled[3].nonfinite_grad_skips == chunked[3].nonfinite_grad_skips == 2
    assert_close_runs(chunked, compiled)
    assert all(torch.isfinite(p).all() for p in compiled[1])


def test_every_expert_winning_moves_exactly_as_fused_adamw():
    model = molf.wrap(toy(1, d=16), ranks=(4,))
    reference = copy.deepcopy(model)
    opt = molf.MoLFAdamW(molf.param_groups(model, 1e-2, 1e-2, wd_fft=0.1, wd_lora=0.01), topk=2,
                         impl="compiled")  # topk = both experts: a dense update of every expert
    ref_groups = []
    for g in molf.param_groups(reference, 1e-2, 1e-2, wd_fft=0.1, wd_lora=0.01):
        wds = g.get("param_weight_decay", [g.get("weight_decay", 0.0)] * len(g["params"]))
        ref_groups += [{"params": [p], "weight_decay": wd} for p, wd in zip(g["params"], wds)]
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-2, fused=True)
    for s in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss_fn(m, batch(s)).backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_a_kernel_that_fails_to_compile_falls_back_to_chunked(monkeypatch, caplog):
    def broken(score):
        def fn(*args):
            raise RuntimeError("no C compiler here")
        return fn
    score = Score("epd_copy", term=molf.router.epd.term, finish=molf.router.epd.finish)
    monkeypatch.setattr(_compiled, "_build", broken)
    with caplog.at_level(logging.INFO, logger="molf"):
        compiled = run("compiled", score=score, steps=4)
    chunked = run("chunked", score=score, steps=4)
    assert compiled[0] == chunked[0]
    for p, q in zip(compiled[1], chunked[1]):
        assert torch.equal(p, q)  # the eager path took every step: bit-identical
    messages = [r.getMessage() for r in caplog.records]
    assert sum("compiling" in m for m in messages) == 1  # the cost is announced once
    assert sum("failed" in m and "chunked" in m for m in messages) == 1


def test_compiled_refuses_a_plain_callable_score():
    model = molf.wrap(toy(1, d=16), ranks=(4,))
    with pytest.raises(ValueError, match="compiled"):
        molf.MoLFAdamW(molf.param_groups(model, 1e-2, 1e-2), score=lambda stats: stats.lr, impl="compiled")


@pytest.mark.slow
def test_compiled_pfn_decides_like_chunked():
    assert_close_runs(run("chunked", score="pfn"), run("compiled", score="pfn"))
