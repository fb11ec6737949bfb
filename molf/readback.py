"""What ``MoLFAdamW`` tells about its routing: the last step's decisions and scores, and running counters.

Kept on the device (a step never reads it back) and read lazily, one copy per read. Indexed by a
layout, ``[(module name, expert names), ...]`` in the order of the optimizer's MoLF parameter groups.
"""
from __future__ import annotations

import torch


class RoutingReadback:
    """win_counts [M, K] (int64), skips (module-steps without a winner for a NaN/inf score or gradient),
    grad_skips (module- and plain-parameter-steps skipped whole for a NaN/inf gradient) and ``last``,
    the ``(scores [M, K], winners [M, K])`` of the last step (None before the first)."""

    def __init__(self, layout: list[tuple[str, tuple[str, ...]]], device="cpu"):
        self.layout = [(name, tuple(experts)) for name, experts in layout]
        self.K = max((len(e) for _, e in self.layout), default=0)
        self.win_counts = torch.zeros((len(self.layout), self.K), dtype=torch.long, device=device)
        self.skips = torch.zeros((), dtype=torch.long, device=device)
        self.grad_skips = torch.zeros((), dtype=torch.long, device=device)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------- writing (on the device)
    def record(self, grid: torch.Tensor, winners: torch.Tensor, skips: torch.Tensor) -> None:
        self.win_counts += winners
        self.skips += skips
        self.last = (grid, winners)

    def record_no_routing(self) -> None:
        """A step in which no module had a gradient: no winner anywhere, nothing scored."""
        device = self.win_counts.device
        grid = torch.full(self.win_counts.shape, float("nan"), device=device)
        self.last = (grid, torch.zeros(self.win_counts.shape, dtype=torch.bool, device=device))

    def to(self, device) -> RoutingReadback:
        """This readback, moved (counters and last step) to ``device``; ``self`` if it is there already."""
        if self.win_counts.device == torch.device(device):
            return self
        out = RoutingReadback(self.layout, device)
        out.win_counts, out.skips, out.grad_skips = (t.to(device) for t in (self.win_counts, self.skips,
                                                                            self.grad_skips))
        out.last = None if self.last is None else tuple(t.to(device) for t in self.last)
        return out

    def regrid(self, layout: list[tuple[str, tuple[str, ...]]]) -> RoutingReadback:
        """This readback on another layout (a parameter group was added): counters and the last step
        carried over by module and expert name; new modules start at zero (last step: not routed)."""
        layout = [(name, tuple(experts)) for name, experts in layout]
        if layout == self.layout:
            return self
        device = self.win_counts.device
        out = RoutingReadback(layout, device)
        out.skips, out.grad_skips = self.skips.clone(), self.grad_skips.clone()
        old = {(name, e): (m, k) for m, (name, experts) in enumerate(self.layout) for k, e in enumerate(experts)}
        pairs = [((m, k), old[name, e]) for m, (name, experts) in enumerate(layout)
                 for k, e in enumerate(experts) if (name, e) in old]
        if pairs:
            new_at, old_at = (torch.tensor(list(ix), device=device).unbind(1) for ix in zip(*pairs))
            out.win_counts[new_at] = self.win_counts[old_at]
            if self.last is not None:
                out.record_no_routing()
                out.last[0][new_at], out.last[1][new_at] = self.last[0][old_at], self.last[1][old_at]
        return out

    # ---------------------------------------------------------------- reading (one copy to the host each)
    def _table(self, tensor: torch.Tensor, convert) -> dict:
        rows = tensor.cpu().tolist()
        return {name: {e: convert(rows[m][k]) for k, e in enumerate(experts)}
                for m, (name, experts) in enumerate(self.layout)}

    @staticmethod
    def _winners(won: dict) -> dict[str, tuple[str, ...]]:
        return {m: tuple(e for e, w in experts.items() if w) for m, experts in won.items()}

    def last_decisions(self) -> dict[str, tuple[str, ...]]:
        return {} if self.last is None else self._winners(self._table(self.last[1], bool))

    def last_scores(self) -> dict[str, dict[str, float]]:
        return {} if self.last is None else self._table(self.last[0], float)

    def snapshot(self) -> tuple[dict, dict]:
        """``(last_decisions, last_scores)`` with a single device-to-host copy."""
        if self.last is None:
            return {}, {}
        grid, winners = self.last
        both = torch.stack([grid, winners.to(grid.dtype)]).cpu()
        return self._winners(self._table(both[1], bool)), self._table(both[0], float)

    def win_table(self) -> dict[str, dict[str, int]]:
        return self._table(self.win_counts, int)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"win_counts": self.win_counts.cpu().clone(), "nonfinite_skips": self.skips.cpu().clone(),
                "nonfinite_grad_skips": self.grad_skips.cpu().clone(),
                "last": None if self.last is None else tuple(t.cpu().clone() for t in self.last)}

    @classmethod
    def from_state_dict(cls, saved: dict, layout: list[tuple[str, tuple[str, ...]]]) -> RoutingReadback:
        """The readback saved by ``state_dict``, on the CPU; ``ValueError`` when it does not fit ``layout``."""
        out = cls(layout)
        counts, last = saved.get("win_counts"), saved.get("last")
        shape = tuple(out.win_counts.shape)
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != shape:
            raise ValueError(f"the checkpoint's routing counters have shape {tuple(getattr(counts, 'shape', ()))}, "
                             f"this optimizer routes {shape[0]} modules x {shape[1]} experts")
        if last is not None and (len(last) != 2 or any(tuple(t.shape) != shape for t in last)):
            raise ValueError(f"the checkpoint's last routing does not have shape {shape}")
        out.win_counts = counts.detach().to("cpu", torch.long).clone()
        out.skips = torch.as_tensor(saved.get("nonfinite_skips", 0)).to("cpu", torch.long).clone()
        grad_skips = saved.get("nonfinite_grad_skips")  # absent in older checkpoints
        out.grad_skips = torch.as_tensor(0 if grad_skips is None else grad_skips).to("cpu", torch.long).clone()
        out.last = None if last is None else (last[0].detach().clone(), last[1].detach().to(torch.bool).clone())
        return out
