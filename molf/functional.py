"""The four ways ``MoLFAdamW`` applies a step, as functions with one signature.

As torch keeps ``_single_tensor_adam`` / ``_multi_tensor_adam`` beside its ``Adam`` class, the
optimizer (``molf.optim``) only collects the parameters and their state, decides which of them take
part, and calls one of these::

    impl(batch: ParamBatch, route: Route, *, score, scratch) -> None  (compiled_step: Skipped)

- ``chunked_step`` (the CPU, ``Score`` objects only): each parameter is walked in cache-sized chunks,
  moments and score terms in one pass, then the winners' update in a second pass; losers' updates are
  not computed at all, and no tensor larger than a chunk is ever allocated.
- ``compiled_step`` (the CPU, ``Score`` objects with a ``cpp_term``; ``impl="compiled"``): the same two
  passes as C++ kernels (``molf/csrc/cpu_step.cpp``, built on first use by ``molf._compiled``), each one
  call over all its parameters at memory speed: pass 1 advances the moments and sums the score's term
  (one read of g, m, v; one write of m, v), pass 2 updates the winners (one read of p, m, v; one write
  of p), and plain parameters take one whole AdamW step. The kernels check each gradient just before
  they use it (from the cache), so this path alone returns what it skipped (``Skipped``).
- ``foreach_step``: whole-list ``torch._foreach_*`` ops as torch's foreach AdamW; the decisions are
  read back once and the losers skipped.
- ``masked_step`` (accelerators): the same ops, but the decisions stay on the device and are applied
  through per-parameter masks, so the step makes no host sync. Parameters the optimizer told to skip
  (``batch.ok``: a non-finite gradient somewhere in their module) keep their moments through a
  ``torch.where`` select, since a host-side skip would need the flags on the host.

``MoLFAdamW(impl="auto")`` (the default) takes chunked on the CPU for ``Score`` objects and contiguous
tensors, masked on accelerators, foreach otherwise; never compiled (a first step that may spend a
minute building, and needs a C++ compiler and ninja, is for a user to ask for).

Each advances the moments of every parameter in ``batch``, calls ``route`` exactly once (with the
``sqrt(v)`` list or the per-parameter score sums it computed) to learn which MoLF parameters won, and
applies the decoupled AdamW update to the winners and to the plain parameters. On the chunked, foreach
and masked paths every element-wise op is the one torch's foreach AdamW applies, in the same order, so
a forced winner moves exactly as ``torch.optim.AdamW(foreach=True)`` would move it; on the compiled
path it moves as that to rounding.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .router import Score

# Elements per chunk on the CPU path: 128 Ki float32 = 512 KiB per tensor, so a chunk of p, g, m, v and
# the scratch buffer stays in L2/L3 across the ~8 element-wise ops applied to it, while the Python
# overhead per chunk (~10 small op dispatches) stays a few percent of the memory traffic.
CHUNK = 1 << 17


@dataclass
class ParamBatch:
    """The parameters taking part in one step, their (rank-local) tensors and per-parameter settings.

    ``bias1`` / ``bias2_sqrt`` are ``1 - b1^t`` and ``sqrt(1 - b2^t)`` after this step's counter
    advance. ``ok`` (``masked_step`` only) is a device bool per parameter: False means the whole step
    of that parameter is a no-op (moments and parameter unchanged); None means every parameter steps.
    """
    params: list = field(default_factory=list)          # the parameters themselves (identity)
    local_params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    exp_avgs: list = field(default_factory=list)
    exp_avg_sqs: list = field(default_factory=list)
    steps: list = field(default_factory=list)           # CPU step counters, as torch's AdamW keeps them
    lrs: list = field(default_factory=list)
    wds: list = field(default_factory=list)
    eps: list = field(default_factory=list)
    betas: list = field(default_factory=list)
    molf_index: list = field(default_factory=list)      # positions of MoLF expert parameters
    bias1: list = field(default_factory=list)
    bias2_sqrt: list = field(default_factory=list)
    ok: torch.Tensor | None = None
    module_of: list = field(default_factory=list)       # compiled path: module index per MoLF parameter

    _PER_PARAM = ("params", "local_params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "lrs", "wds",
                  "eps", "betas")

    def __len__(self) -> int:
        return len(self.params)

    @property
    def contiguous(self) -> bool:
        return all(t.is_contiguous() for ts in (self.local_params, self.grads, self.exp_avgs, self.exp_avg_sqs)
                   for t in ts)

    def subset(self, keep: list[int]) -> ParamBatch:
        """The parameters at positions ``keep`` (in order), before bias corrections are filled in."""
        molf = set(self.molf_index)
        out = ParamBatch(**{name: [getattr(self, name)[i] for i in keep] for name in self._PER_PARAM})
        out.molf_index = [j for j, i in enumerate(keep) if i in molf]
        return out


def bias_corrections(batch: ParamBatch) -> None:
    """Fill in ``batch.bias1`` and ``batch.bias2_sqrt`` (``1 - b1^t``, ``sqrt(1 - b2^t)``) as Python floats,
    exactly as torch's AdamW computes them: one host read of all step counters (CPU tensors, so no
    device sync) and one power per distinct (betas, t), in practice one per step."""
    table, batch.bias1, batch.bias2_sqrt = {}, [], []
    for (b1, b2), t in zip(batch.betas, torch.stack(batch.steps).tolist() if batch.steps else []):
        if (b1, b2, t) not in table:
            table[b1, b2, t] = (1 - b1 ** t, (1 - b2 ** t) ** 0.5)
        batch.bias1.append(table[b1, b2, t][0])
        batch.bias2_sqrt.append(table[b1, b2, t][1])


class Scratch:
    """``scratch(like)``: one reusable chunk-sized buffer per (dtype, device), for the CPU paths. No large
    temporaries: on the CPU, fresh memory costs a page fault per 4 KiB, which made temporaries the
    largest cost of a step."""

    def __init__(self):
        self.buffers: dict = {}

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self.buffers or self.buffers[key].numel() < CHUNK:
            self.buffers[key] = torch.empty(CHUNK, dtype=like.dtype, device=like.device)
        return self.buffers[key]


class DeferredSkips:
    """The masked path advances every step counter on the host and learns on the device which parameters
    skipped (a non-finite gradient). ``expect`` starts the flags' copy to the host (pinned memory and a
    CUDA event, so the wait, if any, is for a step the device finished long ago); ``settle``, at the
    start of the next ``step()`` or ``state_dict()``, gives the skipped counters their step back. In
    between, a skipped parameter's ``state["step"]`` reads one too high; nothing uses it before."""

    def __init__(self):
        self.pending = None  # (step counters, host flags, event)

    def expect(self, steps: list, ok: torch.Tensor) -> None:
        event = torch.cuda.Event() if ok.device.type == "cuda" else None
        flags = ok.to("cpu", non_blocking=event is not None)
        if event is not None:
            event.record()
        self.pending = (steps, flags, event)

    def settle(self) -> None:
        if self.pending is not None:
            steps, flags, event = self.pending
            self.pending = None
            if event is not None:
                event.synchronize()
            for step, ok in zip(steps, flags.tolist()):
                if not ok:
                    step -= 1

# route(sqrt_v=None, param_sums=None, skipped_modules=()) -> bool tensor on the device, one flag per MoLF
# parameter of the batch (in ``molf_index`` order): did its expert win? ``sqrt_v`` is the full
# per-parameter list; ``skipped_modules`` the module indices the compiled path skipped (no winner there).
Route = Callable[..., torch.Tensor]


@dataclass
class Skipped:
    """What the compiled path skipped for a non-finite gradient (the other paths skip before they start):
    the batch positions of the parameters left untouched, and how many skips that is (one per module,
    one per plain parameter), for the optimizer's counters."""
    params: list
    count: int


def _chunks(*tensors: torch.Tensor):
    """Aligned views of ``CHUNK`` elements of same-sized contiguous tensors."""
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield tuple(t[start:start + CHUNK] for t in flat)


def _adamw_chunk(p, m, v, buf, lr, wd, eps, bias1, bias2_sqrt) -> None:
    """Decoupled AdamW update of one chunk from its advanced moments, with the ops (and order) of torch's
    foreach AdamW: ``p *= 1 - lr wd``; ``p -= lr/bias1 * m / (sqrt(v)/bias2_sqrt + eps)``."""
    d = torch.sqrt(v, out=buf).div_(bias2_sqrt).add_(eps)
    if wd != 0:
        p.mul_(1 - lr * wd)
    p.addcdiv_(m, d, value=-lr / bias1)


def chunked_step(batch: ParamBatch, route: Route, *, score, scratch) -> None:
    """CPU path: walk every parameter in chunks of ``CHUNK`` elements, so that the several element-wise
    ops on a chunk (moments, score terms, update) run on data still in cache.

    Pass 1 (every parameter): advance the moments; plain parameters also take their whole AdamW step;
    MoLF parameters add up ``score.term(m, u)`` (``u = m / (sqrt(v) + eps)``) per parameter, in float64
    across chunks. Then route (batched, as everywhere). Pass 2 (winners only): the AdamW update. Losers
    are not touched. ``scratch(like)`` gives a reusable chunk-sized buffer of ``like``'s dtype.
    """
    if not isinstance(score, Score):
        raise ValueError(f"chunked_step needs a molf.router.Score (a per-element term to sum in chunks), "
                         f"got {score!r}")
    if batch.ok is not None:
        raise ValueError("chunked_step skips parameters on the host: give it only the parameters that step")
    routed = set(batch.molf_index)
    sums = []
    for i in range(len(batch)):
        b1, b2 = batch.betas[i]
        buf = scratch(batch.exp_avgs[i])
        total = 0.0
        for p, g, m, v in _chunks(batch.local_params[i], batch.grads[i], batch.exp_avgs[i], batch.exp_avg_sqs[i]):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            d = buf[:m.numel()]
            if i in routed:
                torch.sqrt(v, out=d).add_(batch.eps[i])
                u = torch.div(m, d, out=d)
                total += score.term([m], [u])[0].sum(dtype=opmath_dtype(u.dtype)).item()
            else:
                _adamw_chunk(p, m, v, d, batch.lrs[i], batch.wds[i], batch.eps[i], batch.bias1[i],
                             batch.bias2_sqrt[i])
        if i in routed:
            sums.append(total)
    won = route(param_sums=torch.tensor(sums, dtype=torch.float64))
    for i, w in zip(batch.molf_index, won.tolist()):
        if w:
            buf = scratch(batch.exp_avgs[i])
            for p, _, m, v in _chunks(batch.local_params[i], batch.grads[i], batch.exp_avgs[i], batch.exp_avg_sqs[i]):
                _adamw_chunk(p, m, v, buf[:m.numel()], batch.lrs[i], batch.wds[i], batch.eps[i],
                             batch.bias1[i], batch.bias2_sqrt[i])


def compiled_step(batch: ParamBatch, route: Route, *, score, scratch) -> Skipped:
    """CPU path on C++ kernels built from the score's ``cpp_term`` (``molf._compiled``; the optimizer
    takes the chunked path instead when they are not available). Each kernel checks a gradient just
    before it uses it, by the rule of the other paths, and leaves a module (or plain parameter) with a
    non-finite one untouched; the optimizer hands them in unchecked (``batch.module_of`` tells the
    modules apart) and learns what was skipped from the return value.

    Pass 1, one call over every MoLF parameter, module by module: check, advance both moments in place
    and sum the score's term over the advanced moments (one read of g, m, v from memory, one write of m,
    v). Then route. Pass 2, one call over the winners: the AdamW update from the advanced moments (one
    read of p, m, v, one write of p); losers are not touched again. Plain parameters: check, then the
    whole AdamW step, one call. Each element-wise op rounds as the chunked path's does; the score sums
    are added in another order (blocks of 2048 in the compute dtype, then float64), so scores agree with
    the other paths to float rounding and the decisions are the same.
    """
    from . import _compiled

    kernels = _compiled.kernels(score)
    if batch.ok is not None:
        raise ValueError("compiled_step checks the gradients itself: give it the parameters unchecked (ok=None)")
    skipped_params, skipped_modules = [], []
    sums = torch.zeros(len(batch.molf_index), dtype=torch.float64)
    by_hyper: dict[tuple, list[int]] = {}  # positions in molf_index, per (b1, b2, eps)
    for j, i in enumerate(batch.molf_index):
        by_hyper.setdefault((*batch.betas[i], batch.eps[i]), []).append(j)
    for (b1, b2, eps), js in by_hyper.items():
        idx, module_of = [batch.molf_index[j] for j in js], [batch.module_of[j] for j in js]
        part, module_skipped = kernels.advance_and_score(
            [batch.grads[i] for i in idx], [batch.exp_avgs[i] for i in idx], [batch.exp_avg_sqs[i] for i in idx],
            module_of, b1, b2, eps)
        sums[js] = part
        if module_skipped.any():  # the kernel's modules come in order of first appearance in module_of
            bad = {k for k, s in zip(dict.fromkeys(module_of), module_skipped.tolist()) if s}
            skipped_modules += sorted(bad)
            skipped_params += [i for i, k in zip(idx, module_of) if k in bad]
    won = route(param_sums=sums, skipped_modules=skipped_modules)
    winners = [i for i, w in zip(batch.molf_index, won.tolist()) if w]
    if winners:
        kernels.adamw_from_moments(*([ts[i] for i in winners] for ts in (batch.local_params, batch.exp_avgs,
                                                                         batch.exp_avg_sqs)),
                                   *([xs[i] for i in winners] for xs in (batch.lrs, batch.wds, batch.bias1,
                                                                         batch.bias2_sqrt, batch.eps)))
    routed = set(batch.molf_index)
    plain = [i for i in range(len(batch)) if i not in routed]
    if plain:
        flags = kernels.gated_adamw(
            *([ts[i] for i in plain] for ts in (batch.local_params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs)),
            [batch.lrs[i] for i in plain], [batch.wds[i] for i in plain], [batch.betas[i][0] for i in plain],
            [batch.betas[i][1] for i in plain], *([xs[i] for i in plain] for xs in (batch.eps, batch.bias1,
                                                                                     batch.bias2_sqrt)))
        skipped_params += [i for i, s in zip(plain, flags.tolist()) if s]
        skipped_count = len(skipped_modules) + sum(flags.tolist())
    else:
        skipped_count = len(skipped_modules)
    return Skipped(params=skipped_params, count=skipped_count)


def foreach_step(batch: ParamBatch, route: Route, *, score, scratch) -> None:
    """Whole-list ``torch._foreach_*`` ops; the decisions are read back once and the losers skipped.
    Works for any score (custom callables see whole tensors)."""
    if batch.ok is not None:
        raise ValueError("foreach_step skips parameters on the host: give it only the parameters that step")
    _whole_tensor_step(batch, route, masked=False)


def masked_step(batch: ParamBatch, route: Route, *, score, scratch) -> None:
    """Whole-list ``torch._foreach_*`` ops with the decisions applied on the device: no host sync.

    A loser's denominator is divided by a 0 mask (-> inf, so its step is exactly 0) and its weight decay
    factor replaced by 1. Parameters with ``batch.ok`` False also keep their moments: the new moments
    go to a temporary and a ``torch.where`` keeps the old ones (exact, and NaN-proof, whatever the
    gradient holds). Masks and weight-decay factors are built in each parameter's compute dtype
    (``opmath``: float64 for float64 parameters, float32 for float32 and bfloat16 ones), the precision
    in which the other paths apply their Python-float factors, so the masked path agrees exactly with
    the chunked one on the CPU (float32, float64 and bfloat16 alike).
    """
    _whole_tensor_step(batch, route, masked=True)


def _select_(targets: list[torch.Tensor], new: list[torch.Tensor], keep: list[torch.Tensor]) -> None:
    """``targets[i] <- new[i] if keep[i] else targets[i]``, in place, on the device (keep: 0-dim bools)."""
    for t, n, k in zip(targets, new, keep):
        torch.where(k, n, t, out=t)


def _whole_tensor_step(batch: ParamBatch, route: Route, masked: bool) -> None:
    n = len(batch)
    if n == 0:
        route()
        return
    device = batch.local_params[0].device
    ok = None if batch.ok is None else list(batch.ok.unbind())
    by_betas: dict[tuple[float, float], list[int]] = {}
    for i, b in enumerate(batch.betas):
        by_betas.setdefault(b, []).append(i)
    for (b1, b2), idx in by_betas.items():
        m, v, g = ([ts[i] for i in idx] for ts in (batch.exp_avgs, batch.exp_avg_sqs, batch.grads))
        if ok is None:
            torch._foreach_lerp_(m, g, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, 1 - b2)
        else:  # the same ops into temporaries (one at a time), then keep the old moments where skipped
            keep = [ok[i] for i in idx]
            _select_(m, torch._foreach_lerp(m, g, 1 - b1), keep)
            new_v = torch._foreach_mul(v, b2)
            torch._foreach_addcmul_(new_v, g, g, 1 - b2)
            _select_(v, new_v, keep)
            del new_v
    denoms = torch._foreach_sqrt(batch.exp_avg_sqs)  # sqrt(v): shared by the score and the update
    win = route(sqrt_v=denoms)
    torch._foreach_div_(denoms, batch.bias2_sqrt)
    torch._foreach_add_(denoms, batch.eps)
    step_sizes = [-lr / c1 for lr, c1 in zip(batch.lrs, batch.bias1)]
    decay = [i for i in range(n) if batch.wds[i] != 0]  # zero-decay parameters skip the multiply
    if not masked:  # read the decisions once, skip the losers entirely
        lost = {i for i, w in zip(batch.molf_index, win.tolist()) if not w}
        keep_idx = [i for i in range(n) if i not in lost]
        decay = [i for i in decay if i not in lost]
        if decay:
            torch._foreach_mul_([batch.local_params[i] for i in decay], [1 - batch.lrs[i] * batch.wds[i] for i in decay])
    else:
        keep_idx = range(n)
        stepping = batch.ok.clone() if batch.ok is not None else torch.ones(n, dtype=torch.bool, device=device)
        if batch.molf_index:
            stepping.index_copy_(0, _to_device(batch.molf_index, torch.long, device), win)
        if decay:
            on = stepping.index_select(0, _to_device(decay, torch.long, device))
            factors = _per_dtype_scalars([1 - batch.lrs[i] * batch.wds[i] for i in decay], on, 1.0,
                                         [batch.local_params[i] for i in decay])
            torch._foreach_mul_([batch.local_params[i] for i in decay], factors)
        torch._foreach_div_(denoms, _per_dtype_scalars([1.0] * n, stepping, 0.0, denoms))
    torch._foreach_addcdiv_([batch.local_params[i] for i in keep_idx], [batch.exp_avgs[i] for i in keep_idx],
                            [denoms[i] for i in keep_idx], [step_sizes[i] for i in keep_idx])


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch computes element-wise ops on ``dtype`` tensors in (and rounds a Python-float
    factor to): float32 for the 16-bit floats, the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _per_dtype_scalars(values: list[float], on: torch.Tensor, off: float,
                       like: list[torch.Tensor]) -> list[torch.Tensor]:
    """One 0-dim device tensor per entry of ``like``, in that tensor's compute dtype (``opmath_dtype``):
    ``values[i]`` where ``on[i]`` (a device bool), else ``off``. One upload and one select per dtype."""
    device = like[0].device
    out: list[torch.Tensor | None] = [None] * len(like)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(like):
        by_dtype.setdefault(opmath_dtype(t.dtype), []).append(i)
    for dtype, idx in by_dtype.items():
        picked = on if len(idx) == len(like) else on.index_select(0, _to_device(idx, torch.long, device))
        chosen = torch.where(picked, _to_device([values[i] for i in idx], dtype, device), off)
        for i, t in zip(idx, chosen.unbind()):
            out[i] = t
    return out


def _to_device(values, dtype, device):
    """A small per-step host list on the device, without a sync (pinned, non-blocking on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


IMPLEMENTATIONS = {"chunked": chunked_step, "compiled": compiled_step, "foreach": foreach_step, "masked": masked_step}
