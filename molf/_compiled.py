"""The C++ kernels of ``impl="compiled"`` (``molf/csrc/cpu_step.cpp``), built on first use.

``kernels(score)`` gives the extension module: ``advance_and_score`` (pass 1, module by module),
``adamw_from_moments`` (pass 2, the winners) and ``gated_adamw`` (plain parameters), each checking a
gradient for NaN/inf just before using it (see the source file's header).

A score takes this path when it is a ``molf.router.Score`` with a ``cpp_term``: the C++ expression of
its per-element term in ``m`` and ``u`` (EPD ``m * u``, PFN ``u * u``), the same term its Python
``term`` computes (the tests hold the two together). The kernels are compiled with
``torch.utils.cpp_extension.load_inline`` into one extension per distinct term, kept in torch's
extension cache (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``): the first build
on a machine takes ~20-60 s and is announced with one line on the ``molf`` logger (warning level:
shown by default); later processes load the cached build in about a second. When building fails (no
C++ compiler, no ninja, a term that does not compile, ...), ``kernels`` returns None after one warning
line and the optimizer takes the eager chunked path instead.
"""
from __future__ import annotations

import hashlib
import logging
import platform
import time
from pathlib import Path

from .router import Score

log = logging.getLogger("molf")

SOURCE = Path(__file__).with_name("csrc") / "cpu_step.cpp"
# -ffp-contract=off: no fused multiply-adds the eager ops do not make, so float32 results round as they do;
# -fno-math-errno lets sqrt vectorise; -fopenmp: at::parallel_for shares the chunks among torch's threads.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]

_BUILT: dict = {}    # cpp_term -> extension module, or None when building failed


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's feature flags (Linux), else the architecture's name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line for line in f if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return platform.machine()


def _build(term: str):
    source = f"#define MOLF_TERM(m, u) ({term})\n" + SOURCE.read_text()
    # One build per term and CPU (a cache shared by machines of other CPUs must not hand them this one)
    name = "molf_cpu_step_" + hashlib.sha1((term + _cpu_features()).encode()).hexdigest()[:12]
    from torch.utils.cpp_extension import load_inline  # setuptools and friends: only when asked for

    return load_inline(name, cpp_sources=[source], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])


def kernels(score: Score):
    """The extension module for ``score`` (``advance_and_score``, ``adamw_from_moments``, ``gated_adamw``),
    or None when the score has no ``cpp_term`` or building failed (then the eager path is the one to
    use). Builds at the first call per term in a process (or loads the cached build)."""
    term = getattr(score, "cpp_term", None)
    if term is None:
        return None
    if term in _BUILT:
        return _BUILT[term]
    log.warning("molf: building the C++ kernels of impl='compiled' for score %r (term %s); the first time on "
                "a machine this takes ~20-60 s, later processes load the cached build in about a second",
                score.name, term)
    start = time.perf_counter()
    try:
        module = _build(term)
    except Exception as err:  # noqa: BLE001 - any build failure means: use the eager path
        give_up(score, err)
        return None
    log.info("molf: C++ kernels ready in %.1f s", time.perf_counter() - start)
    _BUILT[term] = module
    return module


def give_up(score: Score, err: Exception) -> None:
    """The kernels of ``score`` failed to build: use the eager path for it from now on (one log line)."""
    _BUILT[score.cpp_term] = None
    log.warning("molf: the C++ kernels of score %r failed (%s: %s); impl='compiled' uses the eager chunked "
                "path instead", score.name, type(err).__name__, (str(err).strip().splitlines() or [''])[-1][:200])


def available(score) -> bool:
    """Whether ``impl="compiled"`` can run ``score`` here (building its kernels if needed)."""
    return isinstance(score, Score) and kernels(score) is not None
