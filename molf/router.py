"""Router scores and the top-k decision, batched over every expert of every module.

A score is a callable ``score(stats: RouterStats) -> Tensor[n_experts]`` (one value per expert, all
modules at once, higher = more deserving of the update). It sees the Adam moments *after* this step's
moment update, raw (not bias-corrected). Register new ones with ``register_score(name, fn)``.

EPD, Expected Preconditioned Descent (paper Eq. 10, the default)::

    S_e = (lr_e / N_e) * sum_{params of e} m^2 / (sqrt(v) + eps)

the first-order loss reduction one Adam step of expert ``e`` would give, per parameter. It is not
scale-invariant on purpose: the expert's current (scheduled) learning rate enters.

PFN, Preconditioned Frobenius Norm (Eq. 11, ablation)::

    S_e = sqrt(sum_{params of e} (m / (sqrt(v) + eps))^2) / sqrt(N_e)

the size of the preconditioned direction alone, scale-invariant.

Both are sums over every element of an expert of a per-element term of ``u = m / (sqrt(v) + eps)``,
``m * u`` (EPD) and ``u * u`` (PFN), turned into a score by a last per-expert formula. A ``Score``
holds exactly these two pieces, ``term`` and ``finish``, and every path of the optimizer uses them:
the CPU path sums ``term`` chunk by chunk inside its moment pass and hands the per-parameter sums over
as ``RouterStats.param_sums`` (then ``sqrt_exp_avg_sqs`` is None); the whole-tensor paths apply
``term`` to whole tensors. Any other callable ``score(RouterStats) -> Tensor[n_experts]`` works too,
but only on the whole-tensor paths (it has no term to sum in chunks).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class RouterStats:
    """What a score sees. Lists are per parameter (only parameters with a gradient this step);
    tensors indexed by expert cover every expert of every MoLF module, on the parameters' device."""

    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    sqrt_exp_avg_sqs: list[torch.Tensor] | None  # sqrt(v), computed for the update; do not modify
                                                 # (None when param_sums is given)
    eps: list[float]                       # per parameter
    lr: torch.Tensor                       # [E] the expert's current learning rate
    numel: torch.Tensor                    # [E] N_e, scalar parameters in the expert (global under FSDP)
    expert_names: list[str]                # [E] "fft", "lora0", ...
    per_expert_sum: Callable[[list[torch.Tensor]], torch.Tensor]  # per-param 0-dim values -> [E] sums
    # per param: the score's ``term`` summed over the parameter, when the optimizer computed it on the
    # fly (the chunked CPU path, ``Score`` objects only); None otherwise. Accepted by per_expert_sum as is.
    param_sums: torch.Tensor | None = None


def _preconditioned(stats: RouterStats) -> list[torch.Tensor]:
    """``u = m / (sqrt(v) + eps)`` per parameter, built in one new list (the only temporary)."""
    u = torch._foreach_add(stats.sqrt_exp_avg_sqs, stats.eps)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, stats.exp_avgs)
    return u


@dataclass(frozen=True)
class Score:
    """A score written as a sum of a per-element term over each expert, then a per-expert formula.

    term    ``term(m, u) -> terms``: lists of tensors (a parameter, or a chunk of one) -> the list of
            per-element terms. It may overwrite ``u`` in place and return it (no new memory); it must
            not touch ``m``. Terms must be non-negative: the whole-tensor paths add them up as one
            multi-tensor L1 norm, the chunked path with a plain sum.
    finish  ``finish(sums, lr, numel) -> scores``, all ``[E]`` tensors: the term's sum over each expert,
            the expert's current learning rate and its number of scalar parameters.
    cpp_term  optional: the same term as a C++ expression in the scalars ``m`` and ``u`` (EPD ``"m * u"``),
            for the C++ kernels of ``MoLFAdamW(impl="compiled")`` (``molf._compiled``); without it that
            impl takes the eager chunked path.
    """

    name: str
    term: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]
    finish: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    cpp_term: str | None = None

    def __call__(self, stats: RouterStats) -> torch.Tensor:
        if stats.param_sums is None:
            terms = self.term(stats.exp_avgs, _preconditioned(stats))
            sums = torch._foreach_norm(terms, 1)  # L1 norm of non-negative terms = their sum
        else:
            sums = stats.param_sums
        return self.finish(stats.per_expert_sum(sums), stats.lr, stats.numel)


def _m_times_u(m: list[torch.Tensor], u: list[torch.Tensor]) -> list[torch.Tensor]:
    torch._foreach_mul_(u, m)  # m^2 / (sqrt(v) + eps) >= 0
    return u


def _u_squared(m: list[torch.Tensor], u: list[torch.Tensor]) -> list[torch.Tensor]:
    torch._foreach_mul_(u, u)
    return u


def _epd_finish(sums: torch.Tensor, lr: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
    return lr / numel * sums


def _pfn_finish(sums: torch.Tensor, lr: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(sums / numel)


epd = Score("epd", term=_m_times_u, finish=_epd_finish, cpp_term="m * u")
pfn = Score("pfn", term=_u_squared, finish=_pfn_finish, cpp_term="u * u")


SCORES: dict[str, Callable[[RouterStats], torch.Tensor]] = {"epd": epd, "pfn": pfn}


def register_score(name: str, fn: Callable[[RouterStats], torch.Tensor]) -> None:
    """Make ``fn`` (a ``Score``, or any callable ``score(RouterStats) -> Tensor[n_experts]``) available
    as ``MoLFAdamW(score=name)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"score name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"score {name!r} must be callable, got {fn!r}")
    SCORES[name] = fn


def resolve_score(score) -> Callable[[RouterStats], torch.Tensor]:
    if callable(score):
        return score
    if isinstance(score, str) and score.lower() in SCORES:
        return SCORES[score.lower()]
    raise ValueError(f"unknown score {score!r}; use one of {sorted(SCORES)} or a callable "
                     f"score(stats: RouterStats) -> Tensor[n_experts]")


def decide(scores: torch.Tensor, valid: torch.Tensor, topk: torch.Tensor):
    """Top-k per module, on the device, with no host sync.

    scores  [M, K] expert scores of M modules (K = most experts in a module; padding anywhere invalid)
    valid   [M, K] bool, which slots are real experts
    topk    [M] or scalar, experts to update per module
    Returns ``winners`` [M, K] bool and ``finite`` [M] bool. A module with any NaN/inf score among its
    experts gets no winner at all (its update is skipped), so a NaN can never win. Ties go to the
    lower expert index (the FFT expert first): a stable descending sort keeps index order among equals.
    """
    finite_or_pad = torch.isfinite(scores) | ~valid
    finite = finite_or_pad.all(dim=1)
    ranked = torch.where(valid & torch.isfinite(scores), scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    topk = torch.as_tensor(topk, device=scores.device)
    winners = (rank < topk.reshape(-1, 1)) & valid & finite.unsqueeze(1)
    return winners, finite


def top_k_flags(scores, k: int) -> list[bool]:
    """``decide`` for one module, on the host: which of ``scores`` (a 1-D tensor or a list of floats,
    one per expert) are among the top ``k``. Same rule as the optimizer: ties go to the lower index,
    and a NaN/inf score anywhere means no winner at all (a NaN never wins)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    row = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if row.dim() != 1:
        raise ValueError(f"scores must be one value per expert (1-D), got shape {tuple(row.shape)}")
    winners, _ = decide(row.view(1, -1), torch.ones(1, len(row), dtype=torch.bool), torch.tensor([k]))
    return winners[0].tolist()
