"""The routing log: one JSON line per optimizer step, the only format molf writes or reads.

    {"step": 12, "lr": 5e-05, "winners": {"model.layers.0.self_attn.q_proj": ["fft"], ...},
     "scores": {"model.layers.0.self_attn.q_proj": {"fft": 3.1e-09, "lora0": 2.7e-09}, ...}}

``step`` is the 0-based index of the optimizer step, ``lr`` the reference learning rate of the first
parameter group at that step (None where the writer does not know it), ``winners`` the experts that were
updated (an empty list: the module was skipped), ``scores`` every expert's score at full precision (EPD
scores are typically 1e-10..1e-6: rounding would turn them into zeros). Writers may add more keys
(``extra``); readers keep them. Written by ``molf.lab.train.run``, ``molf.hf.MoLFTrainer`` and
``molf.distributed.write_routing_log``; read by ``molf.lab.runs.read_routing``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

_KEYS = ("step", "lr", "winners", "scores")


def unwrap_optimizer(optimizer):
    """The ``MoLFAdamW`` behind an Accelerate / Trainer optimizer wrapper (``.optimizer`` chains), or None."""
    from .optim import MoLFAdamW

    while optimizer is not None and not isinstance(optimizer, MoLFAdamW):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def require_molf_optimizer(optimizer):
    """``unwrap_optimizer(optimizer)``, or a ``ValueError`` naming the type when no MoLFAdamW is behind it."""
    molf_optimizer = unwrap_optimizer(optimizer)
    if molf_optimizer is None:
        raise ValueError(f"{type(optimizer).__name__} is not a MoLFAdamW (nor wraps one): it has no routing")
    return molf_optimizer


@dataclass(frozen=True)
class RoutingRecord:
    """One line of the routing log: the routing of one optimizer step."""

    step: int
    lr: float | None
    winners: dict[str, tuple[str, ...]]
    scores: dict[str, dict[str, float]]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_optimizer(cls, optimizer, step: int, lr: float | None = None, **extra) -> RoutingRecord:
        """The last step of ``optimizer`` (a ``MoLFAdamW`` or a wrapper around one), read back with one
        device-to-host copy."""
        molf_optimizer = require_molf_optimizer(optimizer)
        clash = sorted(set(extra) & set(_KEYS))
        if clash:
            raise ValueError(f"extra keys {clash} clash with the routing log's own keys {list(_KEYS)}")
        winners, scores = molf_optimizer.routing_snapshot()
        return cls(step=int(step), lr=None if lr is None else float(lr), winners=winners, scores=scores,
                   extra=dict(extra))

    def to_json(self) -> str:
        """The record as one JSON line (with its newline)."""
        return json.dumps({"step": self.step, "lr": self.lr,
                           "winners": {m: list(w) for m, w in self.winners.items()},
                           "scores": self.scores, **self.extra}) + "\n"

    @classmethod
    def from_json(cls, line: str) -> RoutingRecord:
        row = json.loads(line)
        missing = [k for k in ("step", "winners", "scores") if k not in row]
        if missing:
            raise ValueError(f"not a routing-log line (missing {missing}): {line[:120]!r}")
        return cls(step=row["step"], lr=row.get("lr"),
                   winners={m: tuple(w) for m, w in row["winners"].items()}, scores=row["scores"],
                   extra={k: v for k, v in row.items() if k not in _KEYS})


def append(path: str | Path, record: RoutingRecord) -> None:
    """Append ``record`` to the log at ``path`` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(record.to_json())


def read(path: str | Path, drop_torn_tail: bool = False) -> list[RoutingRecord]:
    """Every record of the log at ``path``, in file order. A line that is not a record raises a
    ``ValueError`` naming the file and line. A last line without its newline is a record whose write was cut
    off (a crash mid-step): an error, or with ``drop_torn_tail`` left out (a resume trains that step again).
    ``molf.lab.runs.read_routing_records`` checks more (step order, the same experts on every line)."""
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")
    tail = lines.pop()                     # "" when the file ends with its newline
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            records.append(_record(path, number, line))
    if tail.strip() and not drop_torn_tail:
        raise ValueError(f"{path}, line {len(lines) + 1}: the last line has no newline (a write cut off by a "
                         f"crash?); resume with drop_torn_tail=True to leave it out: {tail[:120]!r}")
    return records


def _record(path: Path, number: int, line: str) -> RoutingRecord:
    try:
        record = RoutingRecord.from_json(line)
    except (ValueError, AttributeError, TypeError) as error:   # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}, line {number}: not a routing-log record ({error}): {line[:120]!r}") from None
    if isinstance(record.step, bool) or not isinstance(record.step, int) or record.step < 0:
        raise ValueError(f"{path}, line {number}: step must be an integer >= 0, got {record.step!r}")
    return record
