"""The input checks, written once: the core (``layer``, ``model``, ``optim``) and the lab's runner use them.

Every check returns the cleaned value or raises ``ValueError`` with a message that names the argument
and repeats the value it got. Numbers must be finite: an infinite learning rate or weight decay is
never what was meant, and it only shows up later as NaN parameters.
"""
from __future__ import annotations

import math


def is_number(value, *, positive: bool = False) -> bool:
    """True for a finite real ``>= 0`` (``> 0`` with ``positive``); bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


def number(name: str, value, *, positive: bool = False) -> float:
    """A finite real number ``>= 0`` (``> 0`` with ``positive``), as a float."""
    if not is_number(value, positive=positive):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def integer(name: str, value, *, minimum: int = 1) -> int:
    """An ``int`` (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def fraction(name: str, value) -> float:
    """A number in ``[0, 1)`` (dropout rates, Adam's betas)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def betas(value) -> tuple[float, float]:
    """Adam's ``(beta1, beta2)``, both in ``[0, 1)``."""
    try:
        b1, b2 = (float(b) for b in value)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {value!r}") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must both be in [0, 1), got {value!r}")
    return b1, b2
