"""MoLF AdamW: universal moment tracking, gradient-guided routing, winner-only updates.

For every wrapped module (one parameter group from ``molf.param_groups``), at every step:

1. Adam moments of **all** experts advance: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
   ``t <- t + 1`` (winners and losers alike, so a loser's state is mature when it wins later).
2. Every expert is scored from its raw moments (``molf.router``: EPD by default, PFN, or your own).
3. The top-k experts of each module win (ties: lower expert index, the FFT expert first). A module
   with a NaN/inf score among its experts gets no winner this step and is counted in
   ``nonfinite_skips``: a NaN never wins.
4. Winners only get the decoupled AdamW update ``p <- p (1 - lr wd)``,
   ``p <- p - lr m_hat / (sqrt(v_hat) + eps)``; losers keep their parameters and get no weight decay.

Plain groups (embeddings, norms, excluded linears) take an ordinary dense AdamW step, so the same
optimizer trains the whole model.

Scoring and the decision are one batched computation over all modules. On an accelerator the
decisions stay on the device and the winners are applied through masks, so ``step()`` makes no host
sync; on the CPU (where there is nothing to sync with) the losers' updates are not computed at all.
``last_decisions``, ``last_scores`` and ``win_counts`` read the results back lazily (one copy per read).
Losers on the masked path: an update is cancelled by dividing it by infinity, which is exact for finite
moments; a module whose moments went non-finite is skipped by the router on both paths, but on the
masked path its parameters then take the NaN too (on the CPU path they stay unchanged).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .router import RouterStats, decide, resolve_score


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (FSDP2 parameters, grads, state); other tensors as they are."""
    return t.to_local() if hasattr(t, "to_local") else t


def _check_betas(betas) -> tuple[float, float]:
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must both be in [0, 1), got {betas!r}")
    return b1, b2


def _check_nonnegative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW that routes each module's update to its top-k experts.

    params        groups from ``molf.param_groups(model, lr_fft, lr_lora, ...)``; plain groups (no
                  ``molf_module`` key) and plain parameter lists train as ordinary AdamW.
    score         ``"epd"`` (paper Eq. 10, default), ``"pfn"`` (Eq. 11) or a callable
                  ``score(RouterStats) -> Tensor[n_experts]`` (see ``molf.router``).
    topk          experts updated per module (the paper: 1). Equal to the number of experts means a
                  dense update of every expert (the paper's "no routing" ablation).
    lr, weight_decay  defaults for groups that do not set them (``lr=None``: every group must).
    process_group the group whose ranks each hold a shard of every expert (FSDP); score sums are
                  all-reduced over it. Detected automatically for DTensor (FSDP2) parameters.

    After each ``step()``: ``last_decisions`` maps module name to the tuple of winning expert names
    (empty when the module was skipped), ``last_scores`` to ``{expert: score}``; ``win_counts`` holds
    the running wins per module and expert, ``nonfinite_skips`` the modules skipped for a NaN/inf
    score. ``state_dict()`` carries all of it.
    """

    def __init__(self, params, score="epd", topk: int = 1, betas=(0.9, 0.999), eps: float = 1e-8,
                 lr: float | None = None, weight_decay: float = 0.0, process_group=None):
        self.score_fn = resolve_score(score)
        self.score_name = score if isinstance(score, str) else getattr(score, "__name__", "custom")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
        betas = _check_betas(betas)
        _check_nonnegative("eps", eps)
        _check_nonnegative("weight_decay", weight_decay)
        if lr is not None:
            _check_nonnegative("lr", lr)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "topk": topk}
        super().__init__(params, defaults)
        self._plan = None
        self._reset_routing_log()
        # None: apply decisions through masks on accelerators, by selection on the CPU. True/False force
        # one path (the tests check that both give the same result).
        self.masked_update: bool | None = None
        # Sharded training (FSDP): each rank holds a shard of every expert, so the per-expert score sums
        # are all-reduced over this group before deciding (None: the default group, when parameters
        # are DTensors). Expert sizes N_e are global (DTensor.numel() is the full size).
        self.process_group = process_group

    # ---------------------------------------------------------------- groups and validation
    def add_param_group(self, group: dict) -> None:
        super().add_param_group(group)
        group = self.param_groups[-1]
        if group["lr"] is None:
            raise ValueError("a parameter group has no lr; give lr= to MoLFAdamW or set it in the group")
        _check_nonnegative("lr", group["lr"])
        _check_nonnegative("eps", group["eps"])
        _check_nonnegative("weight_decay", group["weight_decay"])
        group["betas"] = _check_betas(group["betas"])
        topk = group["topk"]
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
        if "molf_module" in group:
            n_experts = len(group["experts"])
            if topk > n_experts:
                raise ValueError(f"topk={topk} exceeds the {n_experts} experts {group['experts']} of "
                                 f"module {group['molf_module']!r}; use 1 <= topk <= {n_experts}")
            if len(group["param_expert"]) != len(group["params"]) or \
                    len(group["param_weight_decay"]) != len(group["params"]):
                raise ValueError(f"group of module {group['molf_module']!r}: param_expert and "
                                 f"param_weight_decay need one entry per parameter")
            for wd in group["param_weight_decay"]:
                _check_nonnegative("weight_decay", wd)
            for s in group["expert_lr_scale"]:
                _check_nonnegative("expert_lr_scale", s)
        self._plan = None

    def _reset_routing_log(self) -> None:
        self._win_counts = None      # [M, K] int64 on the device
        self._skips = None           # [] int64 on the device
        self._last = None            # (scores [M, K], winners [M, K]) of the last step

    # ---------------------------------------------------------------- static routing plan
    def _build_plan(self, device: torch.device) -> dict:
        """Index tensors that map parameters to experts and experts to (module, slot). Built once."""
        modules = [g for g in self.param_groups if "molf_module" in g]
        K = max((len(g["experts"]) for g in modules), default=0)
        expert_names, expert_slot, numel, param_slot = [], [], [], {}
        counts = []  # params per expert, to size the per-expert padding
        for m, g in enumerate(modules):
            first = len(expert_names)
            for k, name in enumerate(g["experts"]):
                expert_names.append(name)
                expert_slot.append(m * K + k)
                numel.append(0)
                counts.append(0)
            for p, k in zip(g["params"], g["param_expert"]):
                e = first + k
                param_slot[id(p)] = (e, counts[e])
                counts[e] += 1
                numel[e] += p.numel()
        valid = torch.zeros(len(modules) * K, dtype=torch.bool)
        valid[expert_slot] = True
        return {
            "device": device,
            "modules": modules,
            "module_names": [g["molf_module"] for g in modules],
            "K": K,
            "expert_names": expert_names,
            "expert_slot": torch.tensor(expert_slot, dtype=torch.long, device=device),
            "numel": torch.tensor(numel, dtype=torch.float32, device=device),
            "valid": valid.view(len(modules), K).to(device),
            "topk": torch.tensor([g["topk"] for g in modules], device=device),
            "param_slot": param_slot,
            "max_params": max(counts, default=0),
        }

    def _plan_for(self, device: torch.device) -> dict:
        if self._plan is None or self._plan["device"] != device:
            self._plan = self._build_plan(device)
            if self._win_counts is None:
                shape = (len(self._plan["modules"]), self._plan["K"])
                self._win_counts = torch.zeros(shape, dtype=torch.long, device=device)
                self._skips = torch.zeros((), dtype=torch.long, device=device)
            else:
                self._win_counts = self._win_counts.to(device)
                self._skips = self._skips.to(device)
        return self._plan

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Gather every parameter with a gradient: MoLF experts first, then plain AdamW parameters.
        params, grads, lrs, wds, eps, molf_expert = [], [], [], [], [], []
        by_betas: dict[tuple[float, float], list[int]] = {}
        for group in self.param_groups:
            is_molf = "molf_module" in group
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MoLFAdamW does not support sparse gradients")
                by_betas.setdefault(group["betas"], []).append(len(params))
                params.append(p)
                grads.append(_local(p.grad))
                if is_molf:
                    k = group["param_expert"][i]
                    lrs.append(group["lr"] * group["expert_lr_scale"][k])
                    wds.append(group["param_weight_decay"][i])
                    molf_expert.append(len(params) - 1)
                else:
                    lrs.append(group["lr"])
                    wds.append(group["weight_decay"])
                eps.append(group["eps"])
        if not params:
            return loss

        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._sharded = any(hasattr(p, "to_local") for p in params)
        exp_avgs = [_local(st["exp_avg"]) for st in states]
        exp_avg_sqs = [_local(st["exp_avg_sq"]) for st in states]
        steps = [st["step"] for st in states]
        local_params = [_local(p) for p in params]

        # 1. Universal moment tracking (all experts, every step), as torch's foreach AdamW does it.
        torch._foreach_add_(steps, 1.0)
        bias1, bias2_sqrt = [0.0] * len(params), [0.0] * len(params)
        for (beta1, beta2), idx in by_betas.items():
            torch._foreach_lerp_([exp_avgs[i] for i in idx], [grads[i] for i in idx], 1 - beta1)
            torch._foreach_mul_([exp_avg_sqs[i] for i in idx], beta2)
            torch._foreach_addcmul_([exp_avg_sqs[i] for i in idx], [grads[i] for i in idx],
                                    [grads[i] for i in idx], 1 - beta2)
            for i in idx:
                t = steps[i].item()  # CPU tensor: no device sync
                bias1[i] = 1 - beta1 ** t
                bias2_sqrt[i] = (1 - beta2 ** t) ** 0.5
        sqrt_v = torch._foreach_sqrt(exp_avg_sqs)

        # 2.-3. Score every expert of every module and pick the winners, batched, on the device.
        device = local_params[0].device
        win_param = None
        if molf_expert:
            win_param = self._route(params, exp_avgs, exp_avg_sqs, sqrt_v, eps, lrs, molf_expert, device)

        # 4. Winner-only (and plain) decoupled AdamW update.
        step_sizes = [-lr / b1 for lr, b1 in zip(lrs, bias1)]
        torch._foreach_div_(sqrt_v, bias2_sqrt)
        torch._foreach_add_(sqrt_v, eps)
        denoms = sqrt_v
        masked = self.masked_update if self.masked_update is not None else device.type != "cpu"
        if win_param is None or not masked:
            keep = range(len(params))
            if win_param is not None:  # CPU: read the decisions, skip the losers entirely
                lost = {molf_expert[j] for j, w in enumerate(win_param.tolist()) if not w}
                keep = [i for i in range(len(params)) if i not in lost]
            decay = [i for i in keep if wds[i] != 0]
            if decay:
                torch._foreach_mul_([local_params[i] for i in decay], [1 - lrs[i] * wds[i] for i in decay])
            torch._foreach_addcdiv_([local_params[i] for i in keep], [exp_avgs[i] for i in keep],
                                    [denoms[i] for i in keep], [step_sizes[i] for i in keep])
        else:  # accelerator: apply the decisions through masks, no host sync
            mask = torch.ones(len(params), device=device)
            mask[molf_expert] = win_param.to(mask.dtype)
            mask_list = mask.unbind()
            decay = [i for i in range(len(params)) if wds[i] != 0]
            if decay:
                factors = torch.tensor([1 - lrs[i] * wds[i] for i in decay], dtype=torch.float32)
                factors = factors.pin_memory().to(device, non_blocking=True) if device.type == "cuda" \
                    else factors.to(device)
                factors = torch.where(mask[decay] > 0, factors, torch.ones_like(factors))
                torch._foreach_mul_([local_params[i] for i in decay], list(factors.unbind()))
            torch._foreach_div_(denoms, list(mask_list))  # a loser's denominator becomes inf: no step
            torch._foreach_addcdiv_(local_params, exp_avgs, denoms, step_sizes)
        return loss

    def _route(self, params, exp_avgs, exp_avg_sqs, sqrt_v, eps, lrs, molf_expert, device):
        """Score all experts, decide top-k per module; return the winner flag per MoLF parameter."""
        plan = self._plan_for(device)
        E, P = len(plan["expert_names"]), plan["max_params"]
        expert_of, padded_slot, expert_lr = [], [], [0.0] * E
        for i in molf_expert:
            e, position = plan["param_slot"][id(params[i])]
            expert_of.append(e)
            padded_slot.append(e * P + position)
            expert_lr[e] = lrs[i]
        expert_of_t = self._to_device(expert_of, torch.long, device)
        padded_slot_t = self._to_device(padded_slot, torch.long, device)

        def per_expert_sum(values: list[torch.Tensor]) -> torch.Tensor:
            # Deterministic segmented sum: scatter into an [E, P] zero matrix, then sum rows.
            padded = torch.zeros(E * P, dtype=torch.float32, device=device)
            padded[padded_slot_t] = torch.stack(values).float()
            sums = padded.view(E, P).sum(dim=1)
            if self.process_group is not None or self._sharded:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.process_group)
            return sums

        stats = RouterStats(
            exp_avgs=[exp_avgs[i] for i in molf_expert],
            exp_avg_sqs=[exp_avg_sqs[i] for i in molf_expert],
            sqrt_exp_avg_sqs=[sqrt_v[i] for i in molf_expert],
            eps=[eps[i] for i in molf_expert],
            lr=self._to_device(expert_lr, torch.float32, device),
            numel=plan["numel"],
            expert_names=plan["expert_names"],
            per_expert_sum=per_expert_sum,
        )
        scores = self.score_fn(stats)
        if not isinstance(scores, torch.Tensor) or scores.shape != (E,):
            raise ValueError(f"score {self.score_name!r} must return a tensor of shape ({E},), one value "
                             f"per expert, got {getattr(scores, 'shape', type(scores).__name__)}")
        M, K = len(plan["modules"]), plan["K"]
        grid = torch.full((M * K,), float("nan"), dtype=torch.float32, device=device)
        grid[plan["expert_slot"]] = scores.detach().float()
        grid = grid.view(M, K)
        winners, finite = decide(grid, plan["valid"], plan["topk"])
        self._win_counts += winners
        self._skips += (~finite).sum()
        self._last = (grid, winners)
        return winners.view(-1)[plan["expert_slot"]][expert_of_t]

    @staticmethod
    def _to_device(values, dtype, device):
        t = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    # ---------------------------------------------------------------- reading the routing back
    def _module_table(self, tensor: torch.Tensor, convert) -> dict:
        plan = self._plan
        rows = tensor.cpu().tolist()
        return {name: {e: convert(rows[m][k]) for k, e in enumerate(g["experts"])}
                for m, (name, g) in enumerate(zip(plan["module_names"], plan["modules"]))}

    @property
    def last_decisions(self) -> dict[str, tuple[str, ...]]:
        """Module name -> winning expert names of the last step (empty tuple: skipped)."""
        if self._last is None:
            return {}
        table = self._module_table(self._last[1], bool)
        return {m: tuple(e for e, won in experts.items() if won) for m, experts in table.items()}

    @property
    def last_scores(self) -> dict[str, dict[str, float]]:
        """Module name -> {expert name: score} of the last step, full precision."""
        return {} if self._last is None else self._module_table(self._last[0], float)

    def routing_snapshot(self) -> tuple[dict, dict]:
        """``(last_decisions, last_scores)`` with a single device-to-host copy (for logging)."""
        if self._last is None:
            return {}, {}
        grid, winners = self._last
        both = torch.stack([grid, winners.to(grid.dtype)]).cpu()
        scores = self._module_table(both[0], float)
        won = self._module_table(both[1], bool)
        return {m: tuple(e for e, w in experts.items() if w) for m, experts in won.items()}, scores

    @property
    def win_counts(self) -> dict[str, dict[str, int]]:
        """Module name -> {expert name: steps won so far}."""
        return {} if self._win_counts is None else self._module_table(self._win_counts, int)

    @property
    def nonfinite_skips(self) -> int:
        """Module-steps skipped because an expert's score was NaN or inf."""
        return 0 if self._skips is None else int(self._skips)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["molf"] = {
            "win_counts": None if self._win_counts is None else self._win_counts.cpu().clone(),
            "nonfinite_skips": None if self._skips is None else self._skips.cpu().clone(),
            "last": None if self._last is None else tuple(t.cpu().clone() for t in self._last),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        routing = state_dict.pop("molf", None)
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter's device; keep step counters on the CPU like AdamW.
        for st in self.state.values():
            if isinstance(st, dict) and isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].detach().to("cpu", torch.float32)
        self._plan = None
        self._reset_routing_log()
        if routing and routing.get("win_counts") is not None:
            modules = [g for g in self.param_groups if "molf_module" in g]
            K = max((len(g["experts"]) for g in modules), default=0)
            if tuple(routing["win_counts"].shape) != (len(modules), K):
                raise ValueError(f"routing counters of shape {tuple(routing['win_counts'].shape)} do not fit "
                                 f"this optimizer's {len(modules)} modules x {K} experts")
            self._win_counts = routing["win_counts"].clone()
            self._skips = routing["nonfinite_skips"].clone()
            self._last = None if routing.get("last") is None else tuple(t.clone() for t in routing["last"])
            if self._last is not None or self._win_counts is not None:
                self._plan = self._build_plan(self._win_counts.device)
