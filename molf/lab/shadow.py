"""Shadow routers: would another rule have chosen differently, and what would its choice have cost?

While a MoLF run trains, ``ShadowRouters`` (a training callback, ``molf.lab.engine``) computes, after
every optimizer step, what each of several *rules* would have picked from the same Adam moments the
real router just used. A rule is any registered score (``"epd"``, ``"pfn"``, your own: the moments,
learning rates and sizes of ``molf.router.RouterStats``) or a simple policy written as a score:

    grad_rms   the expert with the largest gradient RMS, sqrt(sum g^2 / N_e)
    random     LISA-style: a random expert of each module, drawn anew each step (seeded)
    cycle      BAdam-style block cycling: expert (step // every) mod n_experts of each module

The real decisions are logged beside them as the rule ``"real"``. ``agreement(table)`` gives, per rule,
layer and module type, the share of decisions where the rule picked the same experts; ``over_time``
the same per window of steps. ``choice_cost`` answers "what did the real rule's choice cost here": from
the state at one step it trains two copies for ``horizon`` steps, one routed by the real rule and one
whose first step is routed by the shadow rule, and compares their loss on the batch that follows
(positive: the shadow's choice would have done worse, so the real choice gained that much).

Cost: the callback reads every expert's moments once more per step and per rule, a pass over the
optimizer's state (benchmarks/bench_shadow.py measures it against the step); it is opt-in.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from .. import router
from . import runs

POLICIES = ("grad_rms", "random", "cycle")


@dataclass
class StepContext:
    """What a policy may look at beyond the moments: the step, each expert's module and gradients."""

    step: int
    module_of_expert: torch.Tensor   # [E] module index of each expert
    expert_index: list[int]          # per parameter in the stats' lists: its expert
    grads: list[torch.Tensor]        # per parameter, as the stats' lists
    seed: int
    cycle_every: int


def _grad_rms(stats: router.RouterStats, ctx: StepContext) -> torch.Tensor:
    squares = torch.stack([g.float().pow(2).sum() for g in ctx.grads])
    return torch.sqrt(stats.per_expert_sum(list(squares)) / stats.numel)


def _random(stats: router.RouterStats, ctx: StepContext) -> torch.Tensor:
    generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.step)
    return torch.rand(len(stats.expert_names), generator=generator)


def _cycle(stats: router.RouterStats, ctx: StepContext) -> torch.Tensor:
    module = ctx.module_of_expert
    first = torch.searchsorted(module, module)             # index of each module's first expert
    n = torch.bincount(module)[module]                      # experts in the expert's module
    position = torch.arange(len(module)) - first
    return (position == (ctx.step // ctx.cycle_every) % n).float()


_POLICY_FNS: dict[str, Callable] = {"grad_rms": _grad_rms, "random": _random, "cycle": _cycle}


def _rule(name) -> Callable[[router.RouterStats, StepContext], torch.Tensor]:
    if name in _POLICY_FNS:
        return _POLICY_FNS[name]
    try:
        score = router.resolve_score(name)
    except ValueError:
        raise ValueError(f"unknown shadow rule {name!r}: use a registered score {sorted(router.SCORES)} or a "
                         f"policy {POLICIES}") from None
    return lambda stats, ctx: score(stats)


def _stats(optimizer) -> tuple[router.RouterStats, list[dict], torch.Tensor, list[int], list[torch.Tensor]]:
    """The optimizer's current moments as ``RouterStats`` over every expert of every routed module (as
    the router saw them in the step just taken), the module groups, and what policies need."""
    groups = [g for g in optimizer.param_groups if "molf_module" in g]
    if not groups:
        raise ValueError("shadow routers need a MoLFAdamW over molf.param_groups (no routed module found)")
    names, lrs, numel, module_of = [], [], [], []
    exp_avgs, exp_avg_sqs, eps, expert_index, grads = [], [], [], [], []
    for m, g in enumerate(groups):
        first = len(names)
        for k, expert in enumerate(g["experts"]):
            names.append(expert)
            lrs.append(g["lr"] * g["expert_lr_scale"][k])
            numel.append(0)
            module_of.append(m)
        for p, k in zip(g["params"], g["param_expert"]):
            numel[first + k] += p.numel()
            state = optimizer.state.get(p, {})
            if p.grad is None or "exp_avg" not in state:
                continue
            exp_avgs.append(state["exp_avg"].float())
            exp_avg_sqs.append(state["exp_avg_sq"].float())
            eps.append(g["eps"])
            expert_index.append(first + k)
            grads.append(p.grad)
    index = torch.tensor(expert_index, dtype=torch.long)

    def per_expert_sum(values) -> torch.Tensor:
        values = torch.stack(list(values)).reshape(-1).double().cpu() if len(values) else torch.zeros(0)
        return torch.zeros(len(names), dtype=torch.float64).index_add_(0, index, values)

    stats = router.RouterStats(
        exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
        sqrt_exp_avg_sqs=torch._foreach_sqrt(exp_avg_sqs) if exp_avg_sqs else [],
        eps=eps, lr=torch.tensor(lrs, dtype=torch.float64), numel=torch.tensor(numel, dtype=torch.float64),
        expert_names=names, per_expert_sum=per_expert_sum)
    return stats, groups, torch.tensor(module_of), expert_index, grads


class ShadowRouters:
    """A training callback: per step, module and rule, each expert's score and whether the rule picks it.

    ``rules``: registered score names and/or policies (``POLICIES``). Each rule picks the top-k of each
    module with the router's tie rule (``molf.router.top_k_flags``: lower index first, NaN never wins),
    k being the module's own ``topk``. A module without a gradient this step is left out, as the router
    leaves it out.
    """

    def __init__(self, rules=("epd", "pfn") + POLICIES, seed: int = 0, cycle_every: int = 10):
        self.rules = {str(name): _rule(name) for name in rules}
        if not self.rules:
            raise ValueError("give at least one shadow rule")
        if isinstance(cycle_every, bool) or not isinstance(cycle_every, int) or cycle_every < 1:
            raise ValueError(f"cycle_every must be an integer >= 1, got {cycle_every!r}")
        self.seed, self.cycle_every = int(seed), cycle_every
        self.rows: list[tuple] = []

    def on_step(self, loop) -> None:
        self.record(loop.step, loop.optimizer)

    @torch.no_grad()
    def record(self, step: int, optimizer) -> None:
        """Log the real decisions and every rule's at ``step`` (call right after ``optimizer.step()``)."""
        stats, groups, module_of, expert_index, grads = _stats(optimizer)
        ctx = StepContext(int(step), module_of, expert_index, grads, self.seed, self.cycle_every)
        has_grad = set(int(i) for i in expert_index)
        real = optimizer.last_decisions
        for rule, fn in self.rules.items():
            scores = fn(stats, ctx).detach().double().cpu().reshape(-1)
            if scores.shape != (len(stats.expert_names),):
                raise ValueError(f"shadow rule {rule!r} gave {tuple(scores.shape)} scores for "
                                 f"{len(stats.expert_names)} experts")
            for m, g in enumerate(groups):
                slots = (module_of == m).nonzero().flatten().tolist()
                if not any(s in has_grad for s in slots):
                    continue
                flags = router.top_k_flags(scores[slots], g["topk"])
                for s, won in zip(slots, flags):
                    self.rows.append((step, g["molf_module"], rule, stats.expert_names[s], float(scores[s]), won))
        for g in groups:
            name = g["molf_module"]
            if real.get(name):
                for expert in g["experts"]:
                    self.rows.append((step, name, "real", expert, float("nan"), expert in real[name]))

    def table(self) -> pd.DataFrame:
        """step, module, layer, module_type, rule, expert, score, won (the rule ``"real"``: the router)."""
        frame = pd.DataFrame(self.rows, columns=["step", "module", "rule", "expert", "score", "won"])
        frame.insert(2, "layer", frame["module"].map(runs.module_layer))
        frame.insert(3, "module_type", frame["module"].map(runs.module_type))
        return frame


def _decisions(table: pd.DataFrame) -> pd.DataFrame:
    """step, module, layer, module_type, rule, winners (a tuple of the picked experts)."""
    picked = table[table["won"]].groupby(["step", "module", "layer", "module_type", "rule"], sort=False)["expert"]
    return picked.agg(tuple).rename("winners").reset_index()


def _agreeing(table: pd.DataFrame) -> pd.DataFrame:
    decisions = _decisions(table)
    real = decisions[decisions["rule"] == "real"].drop(columns="rule").rename(columns={"winners": "real"})
    if real.empty:
        raise ValueError("the table has no real decisions (rule 'real'): record it with ShadowRouters")
    shadow = decisions[decisions["rule"] != "real"].merge(real, on=["step", "module", "layer", "module_type"])
    return shadow.assign(agree=[set(a) == set(b) for a, b in zip(shadow["winners"], shadow["real"])])


def agreement(table: pd.DataFrame, by=("rule", "layer", "module_type")) -> pd.DataFrame:
    """Share of decisions where each rule picked exactly the real router's experts, grouped by ``by``
    (e.g. ``("rule",)`` for one number per rule)."""
    return _agreeing(table).groupby(list(by))["agree"].mean().rename("agreement").reset_index()


def over_time(table: pd.DataFrame, window: int = 10) -> pd.DataFrame:
    """Agreement per rule per window of ``window`` steps: rule, step_start, agreement."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    agreeing = _agreeing(table)
    agreeing["step_start"] = agreeing["step"] // window * window
    return agreeing.groupby(["rule", "step_start"])["agree"].mean().rename("agreement").reset_index()


def _fork(model, optimizer):
    """A copy of ``model`` and a new optimizer of the same class over it, holding the same state (an
    optimizer is copied through its state dict, as a checkpoint would be)."""
    copied = copy.deepcopy(model)
    new_of = {id(p): q for p, q in zip(model.parameters(), copied.parameters())}
    groups = [{**g, "params": [new_of[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    fork = type(optimizer)(groups)
    fork.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # torch would share the moment tensors
    return copied, fork


def choice_cost(model, optimizer, batches, loss_fn, step: int, rule: str, horizon: int = 5,
                max_grad_norm: float | None = None, seed: int = 0, cycle_every: int = 10) -> dict:
    """From the state *before* ``step`` (model and optimizer as they are now), train two copies for
    ``horizon`` steps on ``batches(step) ...``: one routed by the optimizer's own rule throughout, one
    whose first step is routed by ``rule``. Returns both copies' loss on ``batches(step + horizon)`` and
    ``cost`` = shadow - real (positive: the real rule's choice was the better one by that much), with
    the share of modules whose first decision differed. Leaves ``model`` and ``optimizer`` untouched."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
    fn = _rule(rule)
    name = f"_shadow_{rule}"
    losses, first = {}, {}
    for branch in ("real", "shadow"):
        m, opt = _fork(model, optimizer)
        real_score = {id(g): g["score"] for g in opt.param_groups}
        for t in range(step, step + horizon):
            opt.zero_grad(set_to_none=True)
            for micro in batches(t):
                (loss_fn(m, micro) / len(batches(t))).backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], max_grad_norm)
            if t == step:  # both branches route this step through a plain callable: the same arithmetic
                rule_fn = fn if branch == "shadow" else _rule(opt.param_groups[0]["score"])

                def score(stats, _t=t, _opt=opt, _fn=rule_fn):  # the rule on our own view of the moments
                    mine, _, module_of, expert_index, grads = _stats(_opt)
                    ctx = StepContext(_t, module_of, expert_index, grads, seed, cycle_every)
                    return _fn(mine, ctx).to(stats.lr.device, stats.lr.dtype)
                router.register_score(name, score)
                try:
                    for g in opt.param_groups:
                        g["score"] = name
                    opt.step()
                finally:
                    router.SCORES.pop(name, None)
                    for g in opt.param_groups:
                        g["score"] = real_score[id(g)]
            else:
                opt.step()
            if t == step:
                first[branch] = dict(opt.last_decisions)
        with torch.no_grad():
            micro = batches(step + horizon)
            losses[branch] = float(sum(loss_fn(m, b) for b in micro) / len(micro))
    differed = [name for name in first["real"] if set(first["real"][name]) != set(first["shadow"].get(name, ()))]
    return {"step": step, "rule": rule, "horizon": horizon, "loss_real": losses["real"],
            "loss_shadow": losses["shadow"], "cost": losses["shadow"] - losses["real"],
            "modules_differing": len(differed) / max(1, len(first["real"]))}
