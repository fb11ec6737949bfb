"""Paired comparisons of two methods scored on the same test items (and seeds).

Each method gives one 0/1 (or real-valued) score per item; items are paired across methods, so the
comparisons look at per-item differences, which removes the between-item variance that an unpaired test
(e.g. Welch's on per-seed means) counts as noise.

- ``paired_bootstrap(a, b)``: the mean difference ``mean(a - b)`` with a percentile bootstrap 95%
  interval and a two-sided p-value (the share of resampled differences on the other side of zero,
  doubled). Works for any per-item score. Scores of several seeds come as a seeds x items table (row
  s: seed s's run of each method, the same items in every row); the bootstrap then draws seeds and items
  with replacement, independently (the two-way bootstrap of a crossed design), so the interval holds the
  seed-to-seed spread of training as well as the spread over items. Pooling all (seed, item) pairs as
  independent items would not: every item of one run shares that run's luck (its init, its data order),
  so when runs differ by seed more than items do, the pooled interval is several times too narrow.
- ``mcnemar(a, b)``: the exact McNemar test for one seed's 0/1 scores: only discordant items count (a
  right and b wrong, or the reverse); under the null each is a fair coin, so
  ``p = 2 * P(Binomial(n, 1/2) <= min)``.
- ``compare(a, b)``: what the report uses: McNemar for one seed of 0/1 scores, else the bootstrap.
- ``verdict(...)``: "reproduced" / "not reproduced" / "inconclusive" for a claim "a beats b".

With five seeds the seed draw has only 126 distinct outcomes and a percentile interval over so few
clusters is, if anything, a little narrow; a claim that needs the seed spread to be pinned down needs
more seeds, not a finer test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Comparison:
    """``a`` versus ``b`` on ``n`` paired items."""

    n: int
    mean_a: float
    mean_b: float
    diff: float           # mean(a - b)
    low: float            # 95% interval of diff
    high: float
    p: float              # two-sided

    def line(self, name_a: str = "a", name_b: str = "b") -> str:
        return (f"{name_a} {self.mean_a:.3f} vs {name_b} {self.mean_b:.3f}: diff {self.diff:+.3f} "
                f"[{self.low:+.3f}, {self.high:+.3f}] 95% CI, p={self.p:.3g}, n={self.n}")


def _paired(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Both score sets as seeds x items float64 tables (one item list: one seed)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    for name, x in (("a", a), ("b", b)):
        if x.dim() not in (1, 2):
            raise ValueError(f"scores {name} must be one per item (1-D) or seeds x items (2-D), "
                             f"got shape {tuple(x.shape)}")
    a, b = (x.unsqueeze(0) if x.dim() == 1 else x for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same items: got {_shape(a)} and {_shape(b)} scores")
    if a.numel() == 0:
        raise ValueError("no paired items to compare")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("scores must be finite numbers (found NaN or inf)")
    return a, b


def _shape(x: torch.Tensor) -> str:
    return str(x.shape[1]) if x.shape[0] == 1 else f"{x.shape[0]} x {x.shape[1]}"


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> Comparison:
    """Mean difference of paired scores with a percentile bootstrap interval and two-sided p-value.
    ``a``, ``b``: one score per item, or seeds x items (then seeds and items are both resampled)."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an integer >= 100, got {resamples!r}")
    if not 0.5 < level < 1.0:
        raise ValueError(f"level must be in (0.5, 1), got {level!r}")
    a, b = _paired(a, b)
    d = a - b
    seeds, items = d.shape
    generator = torch.Generator().manual_seed(seed)
    item_draw = torch.randint(0, items, (resamples, items), generator=generator)
    if seeds == 1:
        rows = d.expand(resamples, items)
    else:  # each resample's seed draw, as a weight per seed, averaged into one row per resample
        seed_draw = torch.randint(0, seeds, (resamples, seeds), generator=generator)
        weights = torch.zeros(resamples, seeds, dtype=torch.float64).scatter_add_(
            1, seed_draw, torch.ones(resamples, seeds, dtype=torch.float64))
        rows = weights @ d / seeds
    means = rows.gather(1, item_draw).mean(dim=1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    diff = float(d.mean())
    if diff == 0.0 and bool((d == 0).all()):
        p = 1.0
    else:
        other_side = float((means <= 0).double().mean()) if diff > 0 else float((means >= 0).double().mean())
        p = min(1.0, 2.0 * max(other_side, 1.0 / resamples))
    return Comparison(d.numel(), float(a.mean()), float(b.mean()), diff, low, high, p)


def mcnemar(a, b) -> Comparison:
    """Exact McNemar test of one seed's paired 0/1 scores; the interval is the bootstrap's (seed 0)."""
    a, b = _paired(a, b)
    if a.shape[0] > 1:
        raise ValueError(f"mcnemar counts every pair as independent, so it takes one seed's scores; got "
                         f"{a.shape[0]} seeds: use paired_bootstrap, which resamples seeds too")
    if not bool(((a == 0) | (a == 1)).all() and ((b == 0) | (b == 1)).all()):
        raise ValueError("mcnemar needs 0/1 scores (correct or not); use paired_bootstrap for real-valued ones")
    only_a = int(((a == 1) & (b == 0)).sum())
    only_b = int(((a == 0) & (b == 1)).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)
    boot = paired_bootstrap(a, b)
    return Comparison(a.numel(), float(a.mean()), float(b.mean()), float((a - b).mean()), boot.low, boot.high, p)


def compare(a, b) -> Comparison:
    """The exact McNemar test for one seed of 0/1 scores; otherwise (real-valued scores, or several
    seeds, whose runs differ by more than their items) the paired bootstrap over seeds and items."""
    a, b = _paired(a, b)
    binary = bool(((a == 0) | (a == 1)).all() and ((b == 0) | (b == 1)).all())
    return mcnemar(a, b) if a.shape[0] == 1 and binary else paired_bootstrap(a, b)


def verdict(comparison: Comparison, alpha: float = 0.05, margin: float = 0.0) -> str:
    """For the claim "a beats b (by more than ``margin``)": "reproduced" when the difference is above
    ``margin`` and significant at ``alpha``; "not reproduced" when the 95% interval lies entirely at or
    below ``margin`` (b is at least as good); "inconclusive" otherwise."""
    if comparison.diff > margin and comparison.p < alpha and comparison.low > margin:
        return "reproduced"
    if comparison.high <= margin:
        return "not reproduced"
    return "inconclusive"
