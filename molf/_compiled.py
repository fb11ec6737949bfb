"""The ``torch.compile`` kernel of ``impl="compiled"``: one read of g, m, v per parameter gives the
score's sum over the parameter's *advanced* moments.

The kernel is built from the score's own ``term`` (``molf.router.Score``), so a score has one
definition, used by every path. It is compiled once per score and dtype (``dynamic=True``: one kernel
for every tensor size); inductor keeps the generated code in its on-disk cache, so a later process
loads it in seconds. The first compile in a process is announced with one line on the ``molf`` logger
(warning level: shown by default) because it can take a minute on a small machine. When compiling
fails (no C compiler, an untraceable term, ...), ``kernel`` returns None after one warning line and
the caller falls back to the eager path.
"""
from __future__ import annotations

import logging
import time

import torch

from .router import Score

log = logging.getLogger("molf")

_KERNELS: dict = {}      # (score, dtype) -> callable, or None when compiling failed
_FAILED: dict = {}       # score -> the exception that made it fall back


def constants(b1: float, b2: float, eps: float) -> torch.Tensor:
    """The kernel's scalars as one float64 CPU tensor (a tensor, so new values never recompile)."""
    return torch.tensor([1 - b1, b2, 1 - b2, eps], dtype=torch.float64)


def _build(score: Score):
    term = score.term

    def advanced_score_sum(g, m, v, c):
        # c = [1 - b1, b2, 1 - b2, eps]. The moments are advanced as the other paths advance them
        # (torch's lerp for a weight below 0.5 is m + w (g - m)), in registers: nothing is written.
        m_new = m + c[0] * (g - m)
        v_new = v * c[1] + c[2] * (g * g)
        u = m_new / (torch.sqrt(v_new) + c[3])
        return term([m_new], [u])[0].sum(dtype=torch.float64)

    # A code object of its own per score: dynamo caches compiled graphs (and counts recompiles) per
    # code object, so scores do not share one cache and its recompile limit.
    advanced_score_sum.__code__ = advanced_score_sum.__code__.replace()
    return torch.compile(advanced_score_sum, dynamic=True, fullgraph=True)


def kernel(score: Score, dtype: torch.dtype):
    """``fn(g, m, v, constants) -> 0-dim float64 sum`` of ``score.term`` over one flat parameter, or
    None if compiling it failed (then the eager path is the one to use). The first call per score and
    dtype compiles; it runs here, on a small probe, so that its cost is announced and timed once."""
    key = (score, dtype)
    if key in _KERNELS:
        return _KERNELS[key]
    if score in _FAILED:
        _KERNELS[key] = None
        return None
    log.warning("molf: compiling the fused moment-and-score kernel for score %r (%s) with torch.compile; "
                "the first time on a machine this takes ~10-60 s, later processes load it from inductor's "
                "cache in seconds", score.name, str(dtype).replace("torch.", ""))
    start = time.perf_counter()
    fn = _build(score)
    try:
        probe = torch.ones(8, dtype=dtype)
        fn(probe, probe.clone(), probe.clone(), constants(0.9, 0.999, 1e-8))
    except Exception as err:  # noqa: BLE001 - any compile failure means: use the eager path
        _FAILED[score] = err
        _KERNELS[key] = None
        log.warning("molf: torch.compile failed for score %r (%s: %s); impl='compiled' uses the eager "
                    "chunked path instead", score.name, type(err).__name__, str(err).splitlines()[0][:200])
        return None
    log.info("molf: compiled in %.1f s", time.perf_counter() - start)
    _KERNELS[key] = fn
    return fn


def give_up(score: Score, err: Exception) -> None:
    """A compiled kernel failed while running: use the eager path for ``score`` from now on."""
    _FAILED[score] = err
    for key in [k for k in _KERNELS if k[0] is score]:
        _KERNELS[key] = None
    log.warning("molf: the compiled kernel of score %r failed (%s: %s); impl='compiled' uses the eager "
                "chunked path from now on", score.name, type(err).__name__, str(err).splitlines()[0][:200])

