"""The one training loop of the lab: ``fit(model, optimizer, batches, steps=...)``.

The runner (``molf.lab.train.run``), the teaching classroom (``molf.lab.teaching.train``), the live
explorer and the regime map all train through ``fit``. The loop does only what every trainer does:

    for step in range(start_step, steps):
        zero the gradients
        for each micro-batch of batches(step):     # gradient accumulation = how many there are
            loss = loss_fn(model, micro_batch) / len(micro_batches); loss.backward()
        stop if the loss is NaN/inf (TrainingDiverged)
        grad_norm = total norm of the gradients     # before clipping; an inf/NaN norm skips clipping
        clip to max_grad_norm, optimizer.step(), scheduler.step()

Everything else (log files, checkpoints, routing records, redrawing a figure, a stop button) is a
``Callback``: an object with any of ``on_begin``, ``on_after_backward``, ``on_optimizer_step``, ``on_step``
and ``on_end``, called in list order with the ``Loop`` (the state of the loop: model, optimizer, step,
loss, lr, grad_norm, ...).

    loop = fit(model, optimizer, lambda step: [next_batch()], steps=100, max_grad_norm=1.0,
               callbacks=[PrintLoss()])
    loop.stop_reason       # "done", or the reason a callback passed to loop.request_stop(...)
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Callback:
    """A hook into ``fit``. Override any of these; each gets the ``Loop``."""

    def on_begin(self, loop: Loop) -> None:
        """Before the first step."""

    def on_after_backward(self, loop: Loop) -> None:
        """Gradients of the step are present (``loop.grad_norm`` is set), before clipping."""

    def on_optimizer_step(self, loop: Loop) -> None:
        """After ``optimizer.step()``, before ``scheduler.step()`` (the optimizer's state and learning
        rates are the ones this step used)."""

    def on_step(self, loop: Loop) -> None:
        """After ``optimizer.step()`` and ``scheduler.step()``."""

    def on_end(self, loop: Loop) -> None:
        """Always, last: after the final step, a stop, or an exception (``loop.error`` is then set)."""


class Loop:
    """The state of one ``fit`` call, as every callback sees it."""

    def __init__(self, model, optimizer, scheduler, start_step: int, steps: int):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.start_step = start_step       # first step of this call
        self.steps = steps                 # this call trains steps start_step .. steps-1
        self.step = start_step - 1         # index of the step just taken (start_step - 1: none yet)
        self.loss = math.nan               # this step's loss (mean over its micro-batches)
        self.lr = math.nan                 # optimizer.param_groups[0]["lr"] used for this step
        self.grad_norm = math.nan          # total gradient norm before clipping (may be inf/nan)
        self.seconds = 0.0                 # wall time of this step
        self.tokens = 0                    # attention-mask tokens trained on in this call
        self.nonfinite_grad_steps = 0      # steps of this call whose gradient norm was not finite
        self.stop_reason: str | None = None
        self.error: BaseException | None = None   # the exception that ended the loop, if any

    @property
    def steps_done(self) -> int:
        """Steps taken in this call."""
        return self.step + 1 - self.start_step

    def request_stop(self, reason: str) -> None:
        """End the loop after the current step (before the first one when called from ``on_begin``)."""
        self.stop_reason = str(reason)


def default_loss(model, batch):
    """A transformers causal LM's loss: ``model(**batch).loss``."""
    return model(**batch).loss


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        batches: Callable[[int], Sequence], *, steps: int, start_step: int = 0, scheduler=None,
        max_grad_norm: float | None = None, loss_fn: Callable | None = None,
        callbacks: Sequence = (), autocast: bool = False, device=None) -> Loop:
    """Train steps ``start_step .. steps-1``; return the ``Loop``.

    ``batches(step)`` returns the step's list of micro-batches (gradient accumulation = its length).
    ``loss_fn(model, micro_batch)`` returns a 0-dim loss tensor (default ``model(**micro_batch).loss``);
    dict micro-batches are moved to ``device`` when one is given. ``autocast``: bf16 autocast of the
    forward and loss. A non-finite loss raises ``TrainingDiverged`` naming the step. A non-finite gradient
    norm is counted and the gradients are left unclipped (clipping by it would zero or NaN all of them;
    ``MoLFAdamW`` skips the modules whose gradient is not finite).
    """
    for name, value in (("steps", steps), ("start_step", start_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
    loss_fn = loss_fn or default_loss
    device = torch.device(device) if device is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast_device = (device or (trainable[0].device if trainable else torch.device("cpu"))).type
    loop = Loop(model, optimizer, scheduler, start_step, steps)

    def call(hook: str) -> None:
        for callback in callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(loop)

    model.train()
    try:
        call("on_begin")
        for step in range(start_step, steps):
            if loop.stop_reason is not None:
                break
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)   # also trainable parameters the optimizer does not hold
            micro_batches = batches(step)
            if len(micro_batches) == 0:
                raise ValueError(f"batches({step}) returned no micro-batches")
            loss_sum = 0.0
            for micro_batch in micro_batches:
                if isinstance(micro_batch, dict):
                    if "attention_mask" in micro_batch:
                        loop.tokens += int(micro_batch["attention_mask"].sum())
                    if device is not None:
                        micro_batch = {k: v.to(device) for k, v in micro_batch.items()}
                with torch.autocast(device_type=autocast_device, dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_fn(model, micro_batch) / len(micro_batches)
                loss.backward()
                loss_sum += loss.detach()
            loop.step = step
            loop.loss = float(loss_sum)
            if not math.isfinite(loop.loss):
                raise TrainingDiverged(f"loss became {loop.loss} at step {step} (lr too high?)")

            grads = [p.grad for p in trainable if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            loop.grad_norm = float(grad_norm)
            finite = math.isfinite(loop.grad_norm)
            if not finite:
                loop.nonfinite_grad_steps += 1
            call("on_after_backward")
            if finite and max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(trainable, max_grad_norm, grad_norm)

            loop.lr = float(optimizer.param_groups[0]["lr"])
            optimizer.step()
            call("on_optimizer_step")
            if scheduler is not None:
                scheduler.step()
            loop.seconds = time.perf_counter() - began
            call("on_step")
        if loop.stop_reason is None:
            loop.stop_reason = "done"
    except BaseException as error:
        loop.error = error
        if loop.stop_reason is None:
            loop.stop_reason = f"error: {type(error).__name__}: {error}"
        raise
    finally:
        call("on_end")
    return loop
