"""On a CUDA device (skipped elsewhere): the masked path decides as the reference optimizer, and
``step()`` runs under ``torch.cuda.set_sync_debug_mode("error")``, so any host sync in it fails.
``benchmarks/gpu_check.sh`` runs this file on a GPU."""
import pytest
import torch
from toy import batch, loss_fn, toy

import molf
from molf.reference import NaiveMoLFAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 12


def run(device, make_opt, score, dtype=torch.float32):
    model = molf.wrap(toy(3, d=24), ranks=(4, 4)).to(device, dtype)
    opt = make_opt(molf.param_groups(model, 2e-2, 4e-3, wd_fft=0.1, wd_lora=0.01), score)
    log = []
    for s in range(STEPS):
        opt.zero_grad()
        loss_fn(model, batch(s).to(device)).backward()
        opt.step()
        log.append(opt.last_decisions)
    return log, [p.detach().float().cpu() for p in model.parameters()]


@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_cuda_masked_path_decides_like_the_reference(score):
    want, want_params = run("cpu", lambda g, s: NaiveMoLFAdamW(g, score=s), score)
    got, params = run("cuda", lambda g, s: molf.MoLFAdamW(g, score=s), score)
    assert got == want
    for p, q in zip(params, want_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_step_makes_no_host_sync(dtype):
    model = molf.wrap(toy(0), ranks=(4, 8)).to("cuda", dtype)
    opt = molf.MoLFAdamW(molf.param_groups(model, 1e-2, 3e-3, wd_fft=0.1, wd_lora=0.01))
    for s in range(4):
        opt.zero_grad()
        loss_fn(model, batch(s).to("cuda")).backward()
        if s == 3:  # a NaN gradient on the device: skipped without a host read
            model.layers[0].q_proj.base_layer.weight.grad[0, 0] = float("nan")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.nonfinite_grad_skips == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
