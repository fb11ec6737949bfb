"""molf.lab.engine.fit: the lab's one training loop (accumulation, clipping, stopping, divergence,
non-finite gradients, callbacks), on a small MLP trained with its own loss on (x, y) batches."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from molf.lab.engine import Callback, TrainingDiverged, fit


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def data(step, n=8):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 3, generator=g)
    return x, x.sum(1, keepdim=True) ** 2


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class Record(Callback):
    """Keeps what each hook saw."""

    def __init__(self, name="", log=None):
        self.name, self.log = name, log if log is not None else []
        self.grads, self.clipped, self.losses, self.norms = [], [], [], []

    def on_begin(self, loop):
        self.log.append((self.name, "begin", loop.step))

    def on_after_backward(self, loop):
        self.log.append((self.name, "after_backward", loop.step))
        self.grads.append([p.grad.clone() for p in loop.model.parameters()])
        self.norms.append(loop.grad_norm)

    def on_optimizer_step(self, loop):
        self.log.append((self.name, "optimizer_step", loop.step))
        self.clipped.append([p.grad.clone() for p in loop.model.parameters()])

    def on_step(self, loop):
        self.log.append((self.name, "step", loop.step))
        self.losses.append(loop.loss)

    def on_end(self, loop):
        self.log.append((self.name, "end", loop.step))


def test_accumulated_micro_batches_equal_one_bigger_batch():
    big, small = mlp(), mlp()
    opt_big = torch.optim.AdamW(big.parameters(), lr=1e-2)
    opt_small = torch.optim.AdamW(small.parameters(), lr=1e-2)
    whole = fit(big, opt_big, lambda s: [data(s)], steps=3, loss_fn=mse)
    halves = lambda s: [tuple(t[:4] for t in data(s)), tuple(t[4:] for t in data(s))]  # noqa: E731
    split = fit(small, opt_small, halves, steps=3, loss_fn=mse)
    assert torch.allclose(params(big), params(small), atol=1e-6)
    assert split.loss == pytest.approx(whole.loss, rel=1e-6)
    assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)


def test_clipping_scales_the_gradients_to_max_grad_norm():
    model = mlp()
    record = Record()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: [data(s)], steps=2, loss_fn=mse,
        max_grad_norm=0.5, callbacks=[record])
    assert all(norm > 0.5 for norm in record.norms)             # the data's gradients are larger ...
    for before, after, norm in zip(record.grads, record.clipped, record.norms):
        assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in after])) == pytest.approx(0.5, rel=1e-4)
        for b, a in zip(before, after):                          # ... and only rescaled
            assert torch.allclose(a, b * 0.5 / norm, rtol=1e-4, atol=1e-7)
    unclipped = Record()
    model = mlp()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: [data(s)], steps=1, loss_fn=mse,
        callbacks=[unclipped])
    assert all(torch.equal(a, b) for a, b in zip(unclipped.grads[0], unclipped.clipped[0]))


def test_a_nonfinite_gradient_norm_is_counted_and_not_clipped():
    model = mlp()
    bad = nn.Parameter(torch.ones(2))
    model.register_parameter("bad", bad)

    def loss_fn(m, batch):   # finite loss (sqrt(0) = 0), infinite gradient for `bad` on odd steps
        extra = torch.sqrt(m.bad.sum() - m.bad.sum().detach()) if batch[2] % 2 else 0 * m.bad.sum()
        return mse(m, batch[:2]) + extra

    record = Record()
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if n != "bad"], lr=0.1)
    loop = fit(model, optimizer, lambda s: [(*data(s), s)], steps=4, loss_fn=loss_fn, max_grad_norm=1e-3,
               callbacks=[record])
    assert loop.nonfinite_grad_steps == 2
    assert [math.isfinite(n) for n in record.norms] == [True, False, True, False]
    for step in (1, 3):   # the finite gradients of the other parameters are left as they were
        assert all(torch.equal(a, b) for a, b in zip(record.grads[step], record.clipped[step]))
        assert torch.isinf(record.clipped[step][0]).all()      # `bad` (registered on the model first)
        assert record.clipped[step][1].abs().sum() > 0           # clipping by inf would have zeroed this
    assert torch.isfinite(params(model[0])).all() and torch.isfinite(params(model[2])).all()


def test_request_stop_ends_after_the_current_step():
    asked = []

    class StopAtTwo(Callback):
        def on_step(self, loop):
            if loop.step == 2:
                loop.request_stop("enough")

    model = mlp()
    record = Record()
    loop = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: asked.append(s) or [data(s)],
               steps=10, loss_fn=mse, callbacks=[StopAtTwo(), record])
    assert asked == [0, 1, 2] and loop.step == 2 and loop.steps_done == 3
    assert loop.stop_reason == "enough"
    assert record.log[-2:] == [("", "step", 2), ("", "end", 2)]

    class StopAtOnce(Callback):
        def on_begin(self, loop):
            loop.request_stop("not now")

    before = params(model)
    loop = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: [data(s)], steps=10,
               start_step=3, loss_fn=mse, callbacks=[StopAtOnce()])
    assert loop.steps_done == 0 and loop.stop_reason == "not now" and torch.equal(params(model), before)


def test_natural_end_is_done_and_a_resumed_fit_equals_one_fit():
    one, two = mlp(), mlp()
    opt_one, opt_two = torch.optim.AdamW(one.parameters(), lr=1e-2), torch.optim.AdamW(two.parameters(), lr=1e-2)
    sched_one = torch.optim.lr_scheduler.LambdaLR(opt_one, lambda s: 1 / (1 + s))
    sched_two = torch.optim.lr_scheduler.LambdaLR(opt_two, lambda s: 1 / (1 + s))
    record = Record()
    loop = fit(one, opt_one, lambda s: [data(s)], steps=4, scheduler=sched_one, loss_fn=mse, callbacks=[record])
    assert loop.stop_reason == "done" and loop.step == 3
    assert loop.lr == pytest.approx(1e-2 / 4)        # the lr the last step used, before the scheduler moved
    first = fit(two, opt_two, lambda s: [data(s)], steps=2, scheduler=sched_two, loss_fn=mse)
    assert first.step == 1
    fit(two, opt_two, lambda s: [data(s)], steps=4, start_step=2, scheduler=sched_two, loss_fn=mse)
    assert torch.equal(params(one), params(two))


def test_a_nan_loss_raises_training_diverged_naming_the_step_and_on_end_still_runs():
    model = mlp()
    record = Record()

    def loss_fn(m, batch):
        loss = mse(m, batch[:2])
        return loss * math.nan if batch[2] == 3 else loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    with pytest.raises(TrainingDiverged, match="step 3"):
        fit(model, optimizer, lambda s: [(*data(s), s)], steps=6, loss_fn=loss_fn,
            callbacks=[record, SimpleNamespace(on_step=lambda loop: snapshots.append(params(loop.model)))])
    assert record.losses and len(record.losses) == 3          # steps 0..2 finished
    assert record.log[-1] == ("", "end", 3)
    assert torch.equal(params(model), snapshots[-1])         # the diverged step changed nothing
    assert torch.isfinite(params(model)).all()


def test_callbacks_run_in_list_order_and_on_end_runs_after_an_exception():
    log = []
    model = mlp()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: [data(s)], steps=2, loss_fn=mse,
        callbacks=[Record("a", log), Record("b", log)])
    hooks = ["after_backward", "optimizer_step", "step"]
    expected = [("a", "begin", -1), ("b", "begin", -1)]
    for step in range(2):
        expected += [(who, hook, step) for hook in hooks for who in "ab"]
    expected += [("a", "end", 1), ("b", "end", 1)]
    assert log == expected

    class Boom(Callback):
        def on_step(self, loop):
            if loop.step == 1:
                raise KeyError("callback failed")

    ended = []

    class End(Callback):
        def on_end(self, loop):
            ended.append((loop.step, type(loop.error).__name__, loop.stop_reason))

    with pytest.raises(KeyError):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: [data(s)], steps=5, loss_fn=mse,
            callbacks=[Boom(), End()])
    assert ended == [(1, "KeyError", "error: KeyError: 'callback failed'")]

    def failing_batches(step):
        raise OSError("disk gone")

    ended.clear()
    with pytest.raises(OSError):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), failing_batches, steps=5, loss_fn=mse,
            callbacks=[End()])
    assert ended == [(-1, "OSError", "error: OSError: disk gone")]


class DictLM(nn.Module):
    """A model called like a transformers LM: ``model(**batch).loss``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.head(self.embed(input_ids))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        mask = attention_mask.flatten().float()
        return SimpleNamespace(loss=(loss * mask).sum() / mask.sum())


def test_default_loss_takes_dict_batches_and_counts_their_tokens():
    torch.manual_seed(0)
    model = DictLM()
    ids = torch.randint(0, 10, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    loop = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: [batch, batch], steps=3,
               device="cpu")
    assert loop.tokens == 3 * 2 * 8
    assert loop.seconds > 0 and math.isfinite(loop.loss) and model.training


def test_bad_arguments_are_refused_before_any_step():
    model = mlp()
    before = params(model)
    for kwargs in ({"steps": -1}, {"steps": 2, "start_step": 1.5}, {"steps": 2, "max_grad_norm": 0}):
        with pytest.raises(ValueError):
            fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: [data(s)], loss_fn=mse, **kwargs)
    with pytest.raises(ValueError, match="no micro-batches"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: [], steps=2, loss_fn=mse)
    assert torch.equal(params(model), before)
