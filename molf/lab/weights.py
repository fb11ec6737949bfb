"""What training did to the weights: the spectrum of each module's update and which experts moved.

After training (any method, merged into a plain model), per adapted linear module::

    dW = W_tuned - W_base          singular values s_1 >= s_2 >= ...
    effective rank  = exp(H(p)),   p_i = s_i / sum_j s_j        (Roy and Vetterli's entropy rank)
    rank_99         = how many s_i hold 99% of ||dW||_F^2
    intruders       = top-k singular vectors of W_tuned whose largest |cosine| with every singular
                      vector of W_base is below ``threshold``: new high-ranking directions, which LoRA
                      is reported to create (Shuttleworth et al., "LoRA vs Full Fine-tuning: An
                      Illusion of Equivalence") and near which forgetting is said to concentrate

``weight_table(base, tuned)`` gives one row per module; ``UpdateAudit`` is a training callback that
records, per step, module and expert, how far that expert's parameters moved, so a figure can show that
the step's winners moved and its losers did not::

    audit = weights.UpdateAudit(model)           # a wrapped MoLF model, before training
    engine.fit(..., callbacks=[audit])
    audit.table()                                # step, module, layer, module_type, expert, moved
"""
from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from ..model import wrapped_modules
from . import runs


@torch.no_grad()
def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of ``delta`` in float64, largest first."""
    return torch.linalg.svdvals(delta.detach().to(torch.float64).cpu())


def effective_rank(s: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (1 for a rank-1 matrix; 0 for zero)."""
    total = float(s.sum())
    if total <= 0 or not math.isfinite(total):
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(s: torch.Tensor, share: float = 0.99) -> int:
    """How many of the largest singular values hold ``share`` of the squared Frobenius norm."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share!r}")
    energy = s.pow(2)
    total = float(energy.sum())
    if total <= 0:
        return 0
    return int((energy.cumsum(0) / total < share).sum()) + 1


@torch.no_grad()
def intruders(w_base: torch.Tensor, w_tuned: torch.Tensor, k: int = 10, threshold: float = 0.5) -> list[float]:
    """For each of the top-``k`` left singular vectors of ``w_tuned``, its largest |cosine| with any left
    singular vector of ``w_base``; those below ``threshold`` are intruder dimensions."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    u_base = torch.linalg.svd(w_base.detach().to(torch.float64).cpu(), full_matrices=False)[0]
    u_tuned = torch.linalg.svd(w_tuned.detach().to(torch.float64).cpu(), full_matrices=False)[0][:, :k]
    return (u_tuned.T @ u_base).abs().max(dim=1).values.tolist()


def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    prefix = "base_model.model."
    return {name.removeprefix(prefix): m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("lm_head")}


def weight_table(base: nn.Module, tuned: nn.Module, k: int = 10, threshold: float = 0.5) -> pd.DataFrame:
    """One row per linear module (``lm_head`` aside) present in both plain models with one shape:
    module, layer, module_type, delta_norm, relative_delta (||dW|| / ||W_base||), effective_rank,
    rank_99, top_singular_value, intruders (count below ``threshold``), min_similarity."""
    if wrapped_modules(tuned):
        raise ValueError("the tuned model still has MoLF experts: call molf.merge(model) first")
    base_w, tuned_w = _linear_weights(base), _linear_weights(tuned)
    shared = [n for n in tuned_w if n in base_w and base_w[n].shape == tuned_w[n].shape]
    if not shared:
        raise ValueError("the two models share no linear module of the same shape: is `base` the model "
                         "`tuned` was trained from?")
    rows = []
    for name in shared:
        w0, w1 = base_w[name], tuned_w[name]
        delta = w1.detach().double().cpu() - w0.detach().double().cpu()
        s = singular_values(delta)
        sims = intruders(w0, w1, k=min(k, min(w1.shape)), threshold=threshold)
        rows.append({"module": name, "layer": runs.module_layer(name), "module_type": runs.module_type(name),
                     "delta_norm": float(delta.norm()), "relative_delta": float(delta.norm() / w0.detach().double().cpu().norm()),
                     "effective_rank": effective_rank(s), "rank_99": energy_rank(s),
                     "top_singular_value": float(s[0]), "intruders": sum(x < threshold for x in sims),
                     "min_similarity": min(sims)})
    return pd.DataFrame(rows)


class UpdateAudit:
    """A training callback (``molf.lab.engine``): per step, module and expert, the norm of the change
    of that expert's parameters over the step (``moved``), and whether the optimizer named it a winner.

    Keeps one copy of the experts' parameters (the previous step's), so it costs their size in memory.
    """

    def __init__(self, model: nn.Module):
        layers = wrapped_modules(model)
        if not layers:
            raise ValueError("UpdateAudit needs a model wrapped by molf.wrap (it has no MoLF modules)")
        self._params = {(name, expert): [p for p in ps if p.requires_grad]
                        for name, layer in layers.items() for expert, ps in layer.expert_parameters().items()}
        self._params = {key: ps for key, ps in self._params.items() if ps}
        self._before = None
        self.rows: list[tuple] = []

    @torch.no_grad()
    def _snapshot(self):
        return {key: [p.detach().clone() for p in ps] for key, ps in self._params.items()}

    def on_begin(self, loop) -> None:
        self._before = self._snapshot()

    @torch.no_grad()
    def on_step(self, loop) -> None:
        decisions = getattr(loop.optimizer, "last_decisions", {})
        for (module, expert), ps in self._params.items():
            old = self._before[(module, expert)]
            moved = math.sqrt(sum(float((p.float() - q.float()).pow(2).sum()) for p, q in zip(ps, old)))
            self.rows.append((loop.step, module, expert, moved, expert in decisions.get(module, ())))
            for p, q in zip(ps, old):
                q.copy_(p)

    def table(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows, columns=["step", "module", "expert", "moved", "won"])
        frame.insert(2, "layer", frame["module"].map(runs.module_layer))
        frame.insert(3, "module_type", frame["module"].map(runs.module_type))
        return frame
