"""The reference MoLF AdamW: the algorithm written out module by module, expert by expert.

As torch keeps its single-tensor Adam beside the multi-tensor one, this is the readable oracle that
``molf.MoLFAdamW`` must agree with (``tests/test_router_equivalence.py``) and the "naive" line of
``benchmarks/bench_optimizer.py``: every module is scored in a Python loop and every score is read back
to the host with ``.item()`` (one device sync per expert per module per step on a GPU), exactly the
straightforward implementation that ``molf.MoLFAdamW`` batches. It takes the parameter groups of
``molf.param_groups`` and keeps its state per parameter like torch's AdamW. Readable first: no
foreach, no fusion, no batching. It follows the same rules as ``MoLFAdamW`` where the paper is
silent: a module (or plain parameter) with a non-finite gradient skips its whole step, and a module
without any gradient is not routed (empty decision, no scores).
"""
from __future__ import annotations

import math

import torch

from .optim import DEFAULT_BETAS, DEFAULT_EPS


class NaiveMoLFAdamW:
    def __init__(self, groups, score="epd", topk=1, betas=DEFAULT_BETAS, eps=DEFAULT_EPS, weight_decay=0.0):
        if score not in ("epd", "pfn"):
            raise ValueError(f"score must be 'epd' or 'pfn', got {score!r}")
        self.param_groups = [dict(g) for g in groups]
        self.score, self.topk, self.betas, self.eps, self.weight_decay = score, topk, betas, eps, weight_decay
        self.state: dict[torch.Tensor, dict] = {}
        self.last_decisions: dict[str, tuple[str, ...]] = {}
        self.last_scores: dict[str, dict[str, float]] = {}

    def zero_grad(self):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    # ------------------------------------------------------------------ the pieces of the method (docs/method.md)
    def _moments(self, p):
        """Step 1: m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, t <- t + 1 (winners and losers)."""
        b1, b2 = self.betas
        st = self.state.setdefault(p, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
        st["step"] += 1
        st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)

    def _update(self, p, lr, wd):
        """Step 4: decoupled AdamW with bias-corrected moments."""
        b1, b2 = self.betas
        st = self.state[p]
        m_hat = st["exp_avg"] / (1 - b1 ** st["step"])
        v_hat = st["exp_avg_sq"] / (1 - b2 ** st["step"])
        p.mul_(1 - lr * wd)
        p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))

    def _score(self, params, lr):
        """Step 2, from the raw moments after this step's update; one host read per expert."""
        n = sum(p.numel() for p in params)
        total = 0.0
        for p in params:
            if p.grad is None:
                continue
            m, v = self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]
            u = m / (v.sqrt() + self.eps)
            total += (m * u).sum().item() if self.score == "epd" else (u * u).sum().item()
        return lr / n * total if self.score == "epd" else math.sqrt(total / n)

    @torch.no_grad()
    def step(self):
        self.last_decisions, self.last_scores = {}, {}
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if "molf_module" not in group:  # embeddings, norms: plain dense AdamW
                for p in with_grad:
                    if torch.isfinite(p.grad).all():  # a non-finite gradient skips the parameter's step
                        self._moments(p)
                        self._update(p, group["lr"], group.get("weight_decay", self.weight_decay))
                continue
            name = group["molf_module"]
            if not with_grad:  # nothing to route
                self.last_decisions[name] = ()
                continue
            if not all(torch.isfinite(p.grad).all() for p in with_grad):  # skip the whole module
                self.last_decisions[name] = ()
                continue
            for p in with_grad:
                self._moments(p)
            experts = group["experts"]
            lrs = [group["lr"] * s for s in group["expert_lr_scale"]]
            members = [[p for p, e in zip(group["params"], group["param_expert"]) if e == k] for k in range(len(experts))]
            scores = [self._score(members[k], lrs[k]) for k in range(len(experts))]
            self.last_scores[name] = dict(zip(experts, scores))
            if not all(math.isfinite(s) for s in scores):  # a NaN never wins: skip the module
                self.last_decisions[name] = ()
                continue
            # Step 3: top-k, ties to the lower index (the FFT expert first).
            topk = group.get("topk", self.topk)
            winners = sorted(range(len(experts)), key=lambda k: (-scores[k], k))[:topk]
            self.last_decisions[name] = tuple(experts[k] for k in sorted(winners))
            for p, e, wd in zip(group["params"], group["param_expert"], group["param_weight_decay"]):
                if e in winners and p.grad is not None:
                    self._update(p, lrs[e], wd)
