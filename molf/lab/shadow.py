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

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from .. import router
from . import engine, runs

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

    def on_optimizer_step(self, loop) -> None:
        # before the scheduler moves the learning rates on: the rules see the lr the router used (at the
        # last step of a cosine schedule the next lr is 0, and every EPD score with it)
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
    return choice_costs(model, optimizer, batches, loss_fn, step, (rule,), horizon, max_grad_norm, seed,
                        cycle_every)[0]


def choice_costs(model, optimizer, batches, loss_fn, step: int, rules, horizon: int = 5,
                 max_grad_norm: float | None = None, seed: int = 0, cycle_every: int = 10) -> list[dict]:
    """:func:`choice_cost` for several rules at one step, the real branch trained once for all of them
    (``1 + len(rules)`` copies of ``horizon`` steps each). One dict per rule, in the order given. Every
    branch starts from the same random state (dropout draws the same masks) and the caller's random
    state is restored afterwards, so probing does not change the run being probed."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    rules = [str(r) for r in rules]
    if not rules:
        raise ValueError("give at least one rule to probe")
    fns = {rule: _rule(rule) for rule in rules}                       # unknown rules fail before any work
    real_rule = optimizer.param_groups[0]["score"]
    rng = torch.random.get_rng_state()
    try:
        real_loss, real_first = _branch(model, optimizer, batches, loss_fn, step, _rule(real_rule), horizon,
                                        max_grad_norm, seed, cycle_every, rng)
        out = []
        for rule in rules:
            loss, first = _branch(model, optimizer, batches, loss_fn, step, fns[rule], horizon, max_grad_norm,
                                  seed, cycle_every, rng)
            differed = [m for m in real_first if set(real_first[m]) != set(first.get(m, ()))]
            out.append({"step": step, "rule": rule, "horizon": horizon, "loss_real": real_loss,
                        "loss_shadow": loss, "cost": loss - real_loss,
                        "modules_differing": len(differed) / max(1, len(real_first))})
    finally:
        torch.random.set_rng_state(rng)
    return out


class _RouteFirstStep:
    """An engine callback routing the step ``step`` by ``rule_fn`` (through a plain callable registered
    for that one step), the others by the optimizer's own score; it keeps that step's decisions."""

    name = "_shadow_probe"

    def __init__(self, step, rule_fn, seed, cycle_every):
        self.step, self.rule_fn, self.seed, self.cycle_every = step, rule_fn, seed, cycle_every
        self.first, self.real_score = {}, None

    def on_after_backward(self, loop) -> None:
        if loop.step != self.step:
            return
        opt = loop.optimizer

        def score(stats):  # the rule on our own view of the moments the router sees
            mine, _, module_of, expert_index, grads = _stats(opt)
            ctx = StepContext(self.step, module_of, expert_index, grads, self.seed, self.cycle_every)
            return self.rule_fn(mine, ctx).to(stats.lr.device, stats.lr.dtype)
        router.register_score(self.name, score)
        self.real_score = [g["score"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["score"] = self.name

    def on_optimizer_step(self, loop) -> None:
        if loop.step == self.step:
            self.first = dict(loop.optimizer.last_decisions)
            self.restore(loop)

    def on_end(self, loop) -> None:  # also after an error in the step
        self.restore(loop)

    def restore(self, loop) -> None:
        router.SCORES.pop(self.name, None)
        if self.real_score is not None:
            for g, name in zip(loop.optimizer.param_groups, self.real_score):
                g["score"] = name
            self.real_score = None


def _branch(model, optimizer, batches, loss_fn, step, rule_fn, horizon, max_grad_norm, seed, cycle_every, rng):
    """Train a fork of (model, optimizer) for ``horizon`` steps from ``step`` with the lab's one loop
    (``engine.fit``), its first step routed by ``rule_fn`` (every branch takes that step through a plain
    callable: the same arithmetic); return its loss on ``batches(step + horizon)`` and the first step's
    decisions."""
    torch.random.set_rng_state(rng)
    m, opt = _fork(model, optimizer)
    route = _RouteFirstStep(step, rule_fn, seed, cycle_every)
    engine.fit(m, opt, batches, steps=step + horizon, start_step=step, max_grad_norm=max_grad_norm,
               loss_fn=loss_fn, callbacks=[route])
    with torch.no_grad():
        micro_batches = batches(step + horizon)
        loss = float(sum(loss_fn(m, b) for b in micro_batches) / len(micro_batches))
    return loss, route.first


def probe_steps(total_steps: int, n: int, horizon: int) -> list[int]:
    """``n`` steps spread evenly over a run of ``total_steps`` at which a probe of ``horizon`` steps still
    has its batches (``1 <= step <= total_steps - horizon - 1``: the step after the horizon is the loss)."""
    last = total_steps - horizon - 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of probe steps must be an integer >= 1, got {n!r}")
    if last < 1:
        raise ValueError(f"a run of {total_steps} steps has no room for a probe of horizon {horizon} "
                         f"(it needs at least {horizon + 2} steps)")
    if n == 1:
        return [max(1, last // 2)]
    return sorted({round(1 + i * (last - 1) / (n - 1)) for i in range(n)})


class ChoiceCosts:
    """A training callback: at each of ``steps``, from the state just before that step, what the real
    rule's choice gained over each of ``rules`` (:func:`choice_costs`). ``batches`` and ``loss_fn`` are the
    run's own (a probe trains forks on the same data the run sees)."""

    def __init__(self, batches, rules, steps, horizon: int = 3, loss_fn=None, max_grad_norm: float | None = None,
                 seed: int = 0, cycle_every: int = 10):
        self.steps = sorted({int(s) for s in steps})
        if any(s < 0 for s in self.steps):
            raise ValueError(f"probe steps must be >= 0, got {self.steps}")
        self.rules = [str(r) for r in rules]
        for rule in self.rules:
            _rule(rule)                                   # an unknown rule is named now, not mid-run
        self.batches, self.horizon, self.max_grad_norm = batches, horizon, max_grad_norm
        self.loss_fn = loss_fn or (lambda model, batch: model(**batch).loss)
        self.seed, self.cycle_every = seed, cycle_every
        self.rows: list[dict] = []

    def _probe(self, loop, step: int) -> None:
        if step in self.steps and step + self.horizon < loop.steps:
            self.rows += choice_costs(loop.model, loop.optimizer, self.batches, self.loss_fn, step, self.rules,
                                      self.horizon, self.max_grad_norm, self.seed, self.cycle_every)

    def on_begin(self, loop) -> None:
        self._probe(loop, loop.start_step)

    def on_step(self, loop) -> None:
        self._probe(loop, loop.step + 1)

    def table(self) -> pd.DataFrame:
        """step, rule, horizon, loss_real, loss_shadow, cost, modules_differing."""
        return pd.DataFrame(self.rows, columns=["step", "rule", "horizon", "loss_real", "loss_shadow", "cost",
                                                "modules_differing"])


@dataclass
class ShadowRun:
    """A routed run trained with shadow routers, the update audit and choice-cost probes."""

    run: object                    # molf.lab.train.Run (its model: the merged model)
    shadows: pd.DataFrame          # ShadowRouters.table()
    audit: pd.DataFrame            # molf.lab.weights.UpdateAudit.table()
    costs: pd.DataFrame            # ChoiceCosts.table()
    model: torch.nn.Module | None = None
    tokenizer: object = None


@contextlib.contextmanager
def quiet_transformers(quiet: bool = True):
    """transformers' own progress bars (saving and loading a model) off inside the block when ``quiet``."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was:
            hf_logging.enable_progress_bar()


SHADOW_FILES = {"shadows": "shadows.csv.gz", "audit": "update_audit.csv.gz", "costs": "choice_costs.csv"}


def train_with_shadows(config, rules=("epd", "pfn") + POLICIES, n_probes: int = 2, horizon: int = 3,
                       probe_rules=None, cycle_every: int = 10) -> ShadowRun:
    """Train ``config`` (a ``molf.lab.train.TrainConfig`` of a routed method) through ``train.Session``
    with ``ShadowRouters``, ``weights.UpdateAudit`` and ``ChoiceCosts`` as callbacks, and write their
    tables beside the run's own logs (``SHADOW_FILES``). If ``config.out_dir`` already holds this run,
    finished, with those tables, nothing trains: the tables and the saved model are read back. A partial
    run there (a checkpoint) starts over: the shadow tables live in memory while training, so a resumed
    run would lack the steps before the checkpoint. ``probe_rules``: the rules whose choice cost is
    probed (default: ``rules`` but the routing score itself, whose cost is 0 by construction)."""
    import dataclasses
    from pathlib import Path

    from . import models, train, weights
    config = dataclasses.replace(config.resolved(), save_model=True)
    if config.method not in ("molf", "molf_e"):
        raise ValueError(f"shadow routers need a routed method ('molf' or 'molf_e'), got {config.method!r}")
    rules = tuple(str(r) for r in rules)
    probe_rules = [r for r in rules if r != config.score] if probe_rules is None else list(probe_rules)
    out = Path(config.out_dir)
    files = {key: out / name for key, name in SHADOW_FILES.items()}
    if (out / "metrics.json").is_file() and (out / "model").is_dir() and all(f.is_file() for f in files.values()):
        run = train.run(config)                            # the finished run (its config checked), not retrained
        with quiet_transformers(not config.progress):
            model, tokenizer = models.load(str(out / "model"))
        tables = {key: pd.read_csv(f) for key, f in files.items()}
        return ShadowRun(run, tables["shadows"], tables["audit"], tables["costs"], model, tokenizer)
    (out / "checkpoint.pt").unlink(missing_ok=True)        # start over (see above); Session clears the logs
    out.mkdir(parents=True, exist_ok=True)
    session = train.Session(config)
    try:
        shadows = ShadowRouters(rules=rules, seed=config.seed, cycle_every=cycle_every)
        audit = weights.UpdateAudit(session.model)
        steps = probe_steps(session.total_steps, n_probes, horizon) if probe_rules else []
        device = session.device

        def loss_fn(model, batch):
            return model(**{k: v.to(device) for k, v in batch.items()}).loss
        costs = ChoiceCosts(session.batches, probe_rules, steps, horizon, loss_fn, config.max_grad_norm,
                            config.seed, cycle_every)
        session.fit(callbacks=[shadows, audit, costs])
        with quiet_transformers(not config.progress):
            run = session.finish()
    finally:
        session.close()
    tables = {"shadows": shadows.table(), "audit": audit.table(), "costs": costs.table()}
    for key, frame in tables.items():
        frame.to_csv(files[key], index=False)
    return ShadowRun(run, tables["shadows"], tables["audit"], tables["costs"], run.model, run.tokenizer)
