"""``MoLFAdamW(impl="compiled")``: C++ kernels built from the score's ``cpp_term`` (``molf/csrc/cpu_step.cpp``).

Against the chunked path (the eager reference of the CPU): the same decisions at every step, the
moments and parameters to float rounding; a non-finite gradient skips its module's whole step; a
dense update moves as ``torch.optim.AdamW``; the kernels one by one against eager torch ops in
float32, bfloat16 and float64; a score without ``cpp_term`` or a failed build takes the chunked path
(one line). The EPD and PFN builds are made once per machine (torch's extension cache), so only the
first run here pays ~20 s for each.
"""
import copy
import logging

import pytest
import torch
from toy import batch, loss_fn, toy

import molf
from molf import _compiled
from molf.router import Score, epd, pfn

STEPS = 12


def run(impl, score="epd", steps=STEPS, poison=(), dtype=torch.float32):
    model = molf.wrap(toy(3, d=24), ranks=(4, 4)).to(dtype)
    opt = molf.MoLFAdamW(molf.param_groups(model, 2e-2, 4e-3, wd_fft=0.1, wd_lora=0.01), score=score, impl=impl)
    log = []
    for s in range(steps):
        opt.zero_grad()
        loss_fn(model, batch(s)).float().backward()
        if s in poison:  # one module's base weight gets a NaN gradient
            model.layers[0].q_proj.base_layer.weight.grad[0, 0] = float("nan")
        opt.step()
        log.append(opt.last_decisions)
    state = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), float(opt.state[p]["step"]))
             for p in model.parameters() if p in opt.state]
    return log, [p.detach().clone() for p in model.parameters()], state, opt


def assert_close_runs(a, b, rtol=1e-5, atol=1e-6):
    (log_a, params_a, state_a, _), (log_b, params_b, state_b, _) = a, b
    assert log_a == log_b
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    for (m, v, t), (m2, v2, t2) in zip(state_a, state_b):
        assert t == t2
        for x, y in ((m, m2), (v, v2)):  # to rounding, relative to the tensor's scale
            assert (x - y).abs().max() <= 1e-4 * x.abs().max()


def test_compiled_decides_like_chunked_and_moves_like_it_to_rounding():
    chunked, compiled = run("chunked"), run("compiled")
    assert_close_runs(chunked, compiled)
    assert {e for d in chunked[0] for w in d.values() for e in w} == {"fft", "lora0", "lora1"}


def test_compiled_pfn_decides_like_chunked():
    chunked, compiled = run("chunked", score="pfn"), run("compiled", score="pfn")
    assert_close_runs(chunked, compiled)
    assert all(len(w) == 1 for d in compiled[0] for w in d.values())  # a winner in every module, every step


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_decides_like_chunked_in_other_dtypes(dtype):
    chunked, compiled = run("chunked", steps=6, dtype=dtype), run("compiled", steps=6, dtype=dtype)
    assert chunked[0] == compiled[0]
    # Parameters after one step, to rounding relative to each tensor's scale: a few ulps of float64, one
    # ulp of bfloat16 (the plain parameters' fused AdamW keeps float32 between its ops where the eager
    # ops round each to bfloat16; later steps then see other gradients, so runs drift apart in bfloat16)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-12
    one_chunked, one_compiled = run("chunked", steps=1, dtype=dtype), run("compiled", steps=1, dtype=dtype)
    for p, q in zip(one_chunked[1], one_compiled[1]):
        assert p.dtype == q.dtype == dtype
        assert (p.double() - q.double()).abs().max() <= tol * p.double().abs().max()


def test_compiled_skips_a_module_with_a_nonfinite_gradient_whole():
    chunked, compiled = run("chunked", poison=(3, 4)), run("compiled", poison=(3, 4))
    assert compiled[0][3]["layers.0.q_proj"] == () == compiled[0][4]["layers.0.q_proj"]
    assert compiled[3].nonfinite_grad_skips == chunked[3].nonfinite_grad_skips == 2
    assert_close_runs(chunked, compiled)
    assert all(torch.isfinite(p).all() for p in compiled[1])


def test_compiled_skips_a_plain_parameter_with_a_nonfinite_gradient_alone():
    runs = {}
    for impl in ("chunked", "compiled"):
        model = molf.wrap(toy(3, d=24), ranks=(4, 4))
        opt = molf.MoLFAdamW(molf.param_groups(model, 2e-2, 4e-3, wd_fft=0.1, wd_lora=0.01), impl=impl)
        for s in range(3):
            opt.zero_grad()
            loss_fn(model, batch(s)).backward()
            if s == 1:
                model.embed_tokens.weight.grad[0, 0] = float("inf")
                before = model.embed_tokens.weight.detach().clone()
            opt.step()
            if s == 1:
                assert torch.equal(model.embed_tokens.weight, before)  # skipped whole
        runs[impl] = (opt, [p.detach().clone() for p in model.parameters()])
    (chunked, p_chunked), (compiled, p_compiled) = runs["chunked"], runs["compiled"]
    assert compiled.nonfinite_grad_skips == chunked.nonfinite_grad_skips == 1
    assert compiled.nonfinite_skips == chunked.nonfinite_skips == 0
    for p, q in zip(p_chunked, p_compiled):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    steps = [float(st["step"]) for st in compiled.state.values()]
    assert sorted(set(steps)) == [2.0, 3.0] and steps.count(2.0) == 1  # the skipped one gave its step back


def test_every_expert_winning_moves_as_adamw():
    model = molf.wrap(toy(1, d=16), ranks=(4,))
    reference, start = copy.deepcopy(model), [p.detach().clone() for p in model.parameters()]
    opt = molf.MoLFAdamW(molf.param_groups(model, 1e-2, 1e-2, wd_fft=0.1, wd_lora=0.01), topk=2,
                         impl="compiled")  # topk = both experts: a dense update of every expert
    ref_groups = []
    for g in molf.param_groups(reference, 1e-2, 1e-2, wd_fft=0.1, wd_lora=0.01):
        wds = g.get("param_weight_decay", [g.get("weight_decay", 0.0)] * len(g["params"]))
        ref_groups += [{"params": [p], "weight_decay": wd} for p, wd in zip(g["params"], wds)]
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-2, foreach=True)
    for s in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss_fn(m, batch(s)).backward()
            o.step()
    for p, q, p0 in zip(model.parameters(), reference.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, p0)  # every parameter, every expert, was updated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pass_one_kernel_advances_the_moments_and_sums_the_term_as_eager_ops(dtype):
    kernels = _compiled.kernels(epd)
    gen = torch.Generator().manual_seed(0)
    shapes = [(300_000,), (17, 5), (1,)]  # several chunks, a small tensor, a single element
    g = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    m = [torch.randn(s, generator=gen).to(dtype) * 0.1 for s in shapes]
    v = [torch.rand(s, generator=gen).to(dtype) * 0.01 for s in shapes]
    m_ref, v_ref = [x.clone() for x in m], [x.clone() for x in v]
    for b1, b2, eps in ((0.9, 0.999, 1e-8), (0.3, 0.95, 1e-6)):  # lerp weight above and below 0.5
        sums, skipped = kernels.advance_and_score(g, m, v, [0, 1, 1], b1, b2, eps)
        assert skipped.tolist() == [False, False]
        torch._foreach_lerp_(m_ref, g, 1 - b1)
        torch._foreach_mul_(v_ref, b2)
        torch._foreach_addcmul_(v_ref, g, g, 1 - b2)
        for x, y in zip(m + v, m_ref + v_ref):  # eager lerp / addcmul may fuse a multiply-add: ulps apart
            assert (x.double() - y.double()).abs().max() <= 4 * torch.finfo(dtype).eps * y.double().abs().max()
        u = [mi / (torch.sqrt(vi) + eps) for mi, vi in zip(m_ref, v_ref)]
        expected = torch.stack([(mi.double() * ui.double()).sum() for mi, ui in zip(m_ref, u)])
        assert sums.dtype == torch.float64 and sums.shape == (3,)
        torch.testing.assert_close(sums, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)


def test_pass_two_kernel_is_the_decoupled_adamw_update():
    kernels = _compiled.kernels(epd)
    gen = torch.Generator().manual_seed(1)
    p = [torch.randn(200_000, generator=gen), torch.randn(7, 3, generator=gen)]
    m = [torch.randn(x.shape, generator=gen) * 0.1 for x in p]
    v = [torch.rand(x.shape, generator=gen) * 0.01 for x in p]
    lr, wd, bias1, bias2_sqrt, eps = [1e-2, 3e-3], [0.1, 0.0], [0.19, 0.1], [0.04, 0.03], [1e-8, 1e-6]
    expected = [x.clone() for x in p]
    for i, x in enumerate(expected):
        x.mul_(1 - lr[i] * wd[i]).addcdiv_(m[i], torch.sqrt(v[i]) / bias2_sqrt[i] + eps[i], value=-lr[i] / bias1[i])
    kernels.adamw_from_moments(p, m, v, lr, wd, bias1, bias2_sqrt, eps)
    for x, y in zip(p, expected):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


def grads_and_flags():
    """Gradients with a NaN, a -inf in a later chunk, an overflowing square (float32) and its float64 twin
    (no overflow), a bfloat16 inf, and the optimizer's eager rule for each (a non-finite 2-norm)."""
    grads = [torch.ones(100_000), torch.ones(5), torch.ones(70_000), torch.full((4,), 1e20),
             torch.full((4,), 1e20, dtype=torch.float64), torch.ones(3, dtype=torch.bfloat16)]
    grads[1][2] = float("nan")
    grads[2][69_999] = float("-inf")  # in the second chunk of the tensor
    grads[5][0] = float("inf")
    eager = [not torch.isfinite(n).item() for n in torch._foreach_norm(grads, 2)]
    assert eager == [False, True, True, True, False, True]
    return grads, eager


def test_gated_adamw_skips_exactly_what_the_eager_rule_skips_and_steps_the_rest():
    kernels = _compiled.kernels(epd)
    grads, eager = grads_and_flags()
    params = [torch.zeros_like(g) for g in grads]
    m, v = [torch.zeros_like(g) for g in grads], [torch.zeros_like(g) for g in grads]
    n = len(grads)
    flags = kernels.gated_adamw(params, grads, m, v, [0.1] * n, [0.0] * n, [0.9] * n, [0.999] * n, [1e-8] * n,
                                [0.1] * n, [0.999 ** 0.5 * 0.0316] * n)
    assert flags.tolist() == eager
    for p, mi, vi, skip in zip(params, m, v, eager):
        untouched = not p.any() and not mi.any() and not vi.any()
        assert untouched == skip


def test_pass_one_skips_a_whole_module_with_a_nonfinite_gradient():
    kernels = _compiled.kernels(epd)
    grads, eager = grads_and_flags()
    m, v = [torch.zeros_like(g) for g in grads], [torch.zeros_like(g) for g in grads]
    module_of = [7, 3, 7, 5, 9, 6]  # tensors 0 and 2 share module 7, which tensor 2 spoils
    sums, skipped = kernels.advance_and_score(grads, m, v, module_of, 0.9, 0.999, 1e-8)
    assert skipped.tolist() == [True, True, True, False, True]  # modules 7, 3, 5, 9, 6: first appearance
    assert [bool(torch.isnan(s)) for s in sums] == [True, True, True, True, False, True]
    for mi, vi, k in zip(m, v, module_of):
        assert (not mi.any() and not vi.any()) == (k != 9)


def test_kernels_refuse_mismatched_lists():
    kernels = _compiled.kernels(epd)
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.advance_and_score([torch.ones(4)], [torch.ones(5)], [torch.ones(4)], [0], 0.9, 0.999, 1e-8)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.advance_and_score([torch.ones(4, 4)], [torch.ones(4, 4).t()], [torch.ones(4, 4)], [0], 0.9, 0.999,
                                  1e-8)
    with pytest.raises(RuntimeError, match="module index per tensor"):
        kernels.advance_and_score([torch.ones(4)], [torch.ones(4)], [torch.ones(4)], [0, 1], 0.9, 0.999, 1e-8)


def test_a_score_without_cpp_term_takes_the_chunked_path():
    score = Score("epd_python_only", term=epd.term, finish=epd.finish)
    chunked, compiled = run("chunked", score=score, steps=4), run("compiled", score=score, steps=4)
    assert compiled[0] == chunked[0]
    for p, q in zip(compiled[1], chunked[1]):
        assert torch.equal(p, q)  # the eager path took every step: bit-identical


def test_a_kernel_that_fails_to_build_falls_back_to_chunked(monkeypatch, caplog):
    def broken(term):
        raise RuntimeError("Error building extension: no C++ compiler here")
    score = Score("epd_copy", term=epd.term, finish=epd.finish, cpp_term="(m) * (u) /* failing build */")
    monkeypatch.setattr(_compiled, "_build", broken)
    with caplog.at_level(logging.INFO, logger="molf"):
        compiled = run("compiled", score=score, steps=4)
    chunked = run("chunked", score=score, steps=4)
    assert compiled[0] == chunked[0]
    for p, q in zip(compiled[1], chunked[1]):
        assert torch.equal(p, q)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("building the C++ kernels" in m for m in messages) == 1  # the cost is announced once
    assert sum("failed" in m and "chunked" in m and "no C++ compiler" in m for m in messages) == 1


def test_compiled_refuses_a_plain_callable_score():
    model = molf.wrap(toy(1, d=16), ranks=(4,))
    with pytest.raises(ValueError, match="compiled"):
        molf.MoLFAdamW(molf.param_groups(model, 1e-2, 1e-2), score=lambda stats: stats.lr, impl="compiled")


def test_builtin_scores_carry_a_cpp_term():
    assert (epd.cpp_term, pfn.cpp_term) == ("m * u", "u * u")
