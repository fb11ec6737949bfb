"""``MoLFAdamW.step()`` on the accelerator path (``impl="masked"``) never reads a tensor back to the host.

The check is structural, so it runs without a GPU: a ``TorchDispatchMode`` sees every ATen op the step runs and
records the ones that force a device->host sync on an accelerator (``_local_scalar_dense``, behind
``.item()``, ``float()``, ``bool()``, ``int()``; ``nonzero``, ``is_nonzero``, ``masked_select``,
``unique``, ``equal``; boolean-mask indexing), and ``Tensor.tolist``/``numpy``/``cpu`` are wrapped
(on CPU tensors they reach no ATen op). Reads of the step counters are allowed: they are CPU tensors
on purpose, as in torch's AdamW, so reading them is no device sync. So are the previous step's
per-parameter "finite gradient" flags, which the masked path copies to (pinned) host memory right after
computing them and reads at the next step to give skipped parameters their step counter back. A tensor
computed only from such host tensors (``torch.stack(steps)``) is a host tensor too; every other tensor,
factories included, counts as living on the device.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from toy import batch, loss_fn, toy

import molf

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
            aten.masked_select.default, aten.equal.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.item.default}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class SyncDetector(TorchDispatchMode):
    def __init__(self, host_tensors):
        super().__init__()
        self.host = {t.data_ptr() for t in host_tensors}
        self.syncs = []

    def is_host(self, t):
        return t.data_ptr() in self.host

    def record(self, what, tensor):
        if not self.is_host(tensor):
            self.syncs.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if func in SYNC_OPS:
            for t in inputs:
                self.record(str(func), t)
        if func in INDEX_OPS and any(t.dtype == torch.bool for t in inputs[1:]):
            self.syncs.append(f"{func} with a boolean mask")
        out = func(*args, **kwargs)
        if inputs and all(self.is_host(t) for t in inputs):  # computed from host tensors only
            self.host.update(o.data_ptr() for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
        return out


@pytest.fixture
def detect(monkeypatch):
    """``detect(opt)`` -> a context manager counting host reads during ``opt.step()``."""
    def make(opt):
        host = [st["step"] for st in opt.state.values()]
        if opt._skips.pending is not None:  # last step's flags, copied to the host asynchronously
            host.append(opt._skips.pending[1])
        detector = SyncDetector(host)
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)

            def wrapped(self, *a, _original=original, _name=name, **kw):
                detector.record(f"Tensor.{_name}", self)
                return _original(self, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, wrapped)
        return detector
    return make


def trained(masked, score="epd", steps=2):
    model = molf.wrap(toy(0), ranks=(4, 8))
    opt = molf.MoLFAdamW(molf.param_groups(model, 1e-2, 3e-3, wd_fft=0.1, wd_lora=0.01), score=score,
                         impl="masked" if masked else "chunked")
    for s in range(steps):  # state exists, the routing plan and index tensors are built
        opt.zero_grad()
        loss_fn(model, batch(s)).backward()
        opt.step()
    opt.zero_grad()
    loss_fn(model, batch(steps)).backward()
    return model, opt


@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_masked_step_makes_no_host_read(detect, score):
    model, opt = trained(masked=True, score=score)
    before = [p.detach().clone() for p in model.parameters()]
    detector = detect(opt)
    with detector:
        opt.step()
    assert detector.syncs == []
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # it did step
    assert all(len(d) == 1 for d in opt.last_decisions.values())  # decisions were made


def test_detector_sees_the_reads_of_the_cpu_path(detect):
    # the CPU path reads its decisions back (and its per-chunk score sums): the detector must see that
    model, opt = trained(masked=False)
    detector = detect(opt)
    with detector:
        opt.step()
    assert any("Tensor.tolist" in s for s in detector.syncs)
    assert any("_local_scalar_dense" in s for s in detector.syncs)


def test_detector_flags_common_syncs_but_not_step_counters(detect):
    model, opt = trained(masked=True)
    detector = detect(opt)
    w = model.layers[0].q_proj.base_layer.weight.detach()
    with detector:
        [st["step"].item() for st in opt.state.values()]
        torch.stack([st["step"] for st in opt.state.values()]).tolist()
        assert detector.syncs == []
        float(w.sum()), bool((w > 0).any()), w[w > 0], w.nonzero(), w.tolist()
    assert len(detector.syncs) >= 5
