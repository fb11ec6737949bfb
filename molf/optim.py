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

Scoring and the decision are one batched computation over all modules (``_route``). Two ways to
apply them:

- accelerators (``_step_foreach``): whole-list ``torch._foreach_*`` ops as torch's foreach AdamW; the
  decisions stay on the device and the winners are applied through masks, so ``step()`` makes no host
  sync (``masked_update=True`` forces this path anywhere).
- the CPU (``_step_chunked``, for the built-in scores): each parameter is walked in cache-sized
  chunks, moments and score terms in one pass, then the winners' update in a second pass; losers'
  updates are not computed at all, and no tensor larger than a chunk is ever allocated.

Both paths give the same decisions and (up to float rounding in the scores) the same parameters.
``last_decisions``, ``last_scores`` and ``win_counts`` read the results back lazily (one copy per read).
Losers on the masked path: an update is cancelled by dividing it by infinity, which is exact for finite
moments; a module whose moments went non-finite is skipped by the router on both paths, but on the
masked path its parameters then take the NaN too (on the CPU path they stay unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .router import REDUCTIONS, RouterStats, decide, resolve_score

# Elements per chunk on the CPU path: 128 Ki float32 = 512 KiB per tensor, so a chunk of p, g, m, v and
# the scratch buffer stays in L2/L3 across the ~8 element-wise ops applied to it, while the Python
# overhead per chunk (~10 small op dispatches) stays a few percent of the memory traffic.
CHUNK = 1 << 17


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


@dataclass
class _Work:
    """The parameters that have a gradient this step, with their (rank-local) tensors and settings."""
    params: list = field(default_factory=list)
    local_params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    exp_avgs: list = field(default_factory=list)
    exp_avg_sqs: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    wds: list = field(default_factory=list)
    eps: list = field(default_factory=list)
    betas: list = field(default_factory=list)
    molf_index: list = field(default_factory=list)   # positions of MoLF expert parameters
    contiguous: bool = True


def _chunks(*tensors: torch.Tensor):
    """Aligned views of ``CHUNK`` elements of same-sized contiguous tensors."""
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield tuple(t[start:start + CHUNK] for t in flat)


def _adamw_chunk(p, m, v, buf, lr, wd, eps, bias1, bias2_sqrt) -> None:
    """Decoupled AdamW update of one chunk from its advanced moments, with the ops (and order) of torch's
    foreach AdamW: ``p *= 1 - lr wd``; ``p -= lr/bias1 * m / (sqrt(v)/bias2_sqrt + eps)``."""
    d = torch.sqrt(v, out=buf).div_(bias2_sqrt).add_(eps)
    if wd != 0:
        p.mul_(1 - lr * wd)
    p.addcdiv_(m, d, value=-lr / bias1)


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
        self._plan = None
        self._layout = None          # per-step index tensors, see _layout_for
        self._scratch_buffers = {}   # (dtype, device) -> chunk buffer of the CPU path
        super().__init__(params, defaults)
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
            "expert_of_group": [(g, k) for g in modules for k in range(len(g["experts"]))],
            "param_slot": param_slot,
            "max_params": max(counts, default=0),
        }

    def _plan_for(self, device: torch.device) -> dict:
        if self._plan is None or self._plan["device"] != device:
            self._plan = self._build_plan(device)
            self._layout = None
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
        work = self._collect()
        if work is None:
            return loss
        torch._foreach_add_(work.steps, 1.0)
        bias1, bias2_sqrt = self._bias_corrections(work)
        device = work.local_params[0].device
        masked = self.masked_update if self.masked_update is not None else device.type != "cpu"
        if not masked and device.type == "cpu" and work.contiguous \
                and getattr(self.score_fn, "reduction", None) in REDUCTIONS:
            self._step_chunked(work, bias1, bias2_sqrt)
        else:
            self._step_foreach(work, bias1, bias2_sqrt, masked, device)
        return loss

    def _collect(self) -> _Work | None:
        """Every parameter with a gradient (in group order), its state (created on first use) and
        hyper-parameters. Learning rates are read at every step, since schedulers move them."""
        w = _Work()
        for group in self.param_groups:
            is_molf = "molf_module" in group
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MoLFAdamW does not support sparse gradients")
                if is_molf:
                    w.molf_index.append(len(w.params))
                    w.lrs.append(group["lr"] * group["expert_lr_scale"][group["param_expert"][i]])
                    w.wds.append(group["param_weight_decay"][i])
                else:
                    w.lrs.append(group["lr"])
                    w.wds.append(group["weight_decay"])
                w.params.append(p)
                w.grads.append(_local(p.grad))
                w.eps.append(group["eps"])
                w.betas.append(group["betas"])
        if not w.params:
            return None
        for p in w.params:
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            w.local_params.append(_local(p))
            w.exp_avgs.append(_local(st["exp_avg"]))
            w.exp_avg_sqs.append(_local(st["exp_avg_sq"]))
            w.steps.append(st["step"])
        self._sharded = any(hasattr(p, "to_local") for p in w.params)
        w.contiguous = all(t.is_contiguous() for ts in (w.local_params, w.grads, w.exp_avgs, w.exp_avg_sqs)
                           for t in ts)
        return w

    @staticmethod
    def _bias_corrections(work: _Work) -> tuple[list[float], list[float]]:
        """``1 - b1^t`` and ``sqrt(1 - b2^t)`` per parameter, as Python floats exactly as torch's AdamW
        computes them: one host read of all step counters (CPU tensors, so no device sync) and one
        power per distinct (betas, t), in practice one per step."""
        table, bias1, bias2_sqrt = {}, [], []
        for (b1, b2), t in zip(work.betas, torch.stack(work.steps).tolist()):
            if (b1, b2, t) not in table:
                table[b1, b2, t] = (1 - b1 ** t, (1 - b2 ** t) ** 0.5)
            c1, c2 = table[b1, b2, t]
            bias1.append(c1)
            bias2_sqrt.append(c2)
        return bias1, bias2_sqrt

    # ---------------------------------------------------------------- CPU: chunked, cache-resident passes
    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """One reusable chunk-sized buffer per dtype: no large temporaries (on the CPU, fresh memory
        costs a page fault per 4 KiB, which made temporaries the largest cost of a step)."""
        key = (like.dtype, like.device)
        if key not in self._scratch_buffers:
            self._scratch_buffers[key] = torch.empty(CHUNK, dtype=like.dtype, device=like.device)
        return self._scratch_buffers[key]

    def _step_chunked(self, work: _Work, bias1, bias2_sqrt) -> None:
        """CPU path: walk every parameter in chunks of ``CHUNK`` elements, so that the several
        element-wise ops on a chunk (moments, score terms, update) run on data still in cache.

        Pass 1 (every parameter): advance the moments; plain parameters also take their whole AdamW
        step; MoLF parameters add up the score's per-parameter sum (``m.u`` for EPD, ``u.u`` for PFN,
        ``u = m / (sqrt(v) + eps)``, in float64 across chunks). Then route (batched, as everywhere).
        Pass 2 (winners only): the AdamW update. Losers are not touched. The element-wise ops are the
        ones torch's foreach AdamW applies, in the same order, so a forced winner moves exactly as
        ``torch.optim.AdamW(foreach=True)`` would move it.
        """
        routed = set(work.molf_index)
        use_m = self.score_fn.reduction == "m_u"
        sums = []
        for i in range(len(work.params)):
            b1, b2 = work.betas[i]
            buf = self._scratch(work.exp_avgs[i])
            total = 0.0
            for p, g, m, v in _chunks(work.local_params[i], work.grads[i], work.exp_avgs[i], work.exp_avg_sqs[i]):
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                d = buf[:m.numel()]
                if i in routed:
                    torch.sqrt(v, out=d).add_(work.eps[i])
                    u = torch.div(m, d, out=d)
                    total += torch.dot(m if use_m else u, u).item()
                else:
                    _adamw_chunk(p, m, v, d, work.lrs[i], work.wds[i], work.eps[i], bias1[i], bias2_sqrt[i])
            if i in routed:
                sums.append(total)
        if not work.molf_index:
            return
        won = self._route(work, torch.device("cpu"), param_sums=torch.tensor(sums, dtype=torch.float64))
        for i, w in zip(work.molf_index, won.tolist()):
            if w:
                buf = self._scratch(work.exp_avgs[i])
                for p, _, m, v in _chunks(work.local_params[i], work.grads[i], work.exp_avgs[i], work.exp_avg_sqs[i]):
                    _adamw_chunk(p, m, v, buf[:m.numel()], work.lrs[i], work.wds[i], work.eps[i],
                                 bias1[i], bias2_sqrt[i])

    # ---------------------------------------------------------------- accelerators: foreach, masks, no sync
    def _step_foreach(self, work: _Work, bias1, bias2_sqrt, masked: bool, device: torch.device) -> None:
        """Whole-list ``torch._foreach_*`` ops (one multi-tensor kernel each on CUDA), as torch's foreach
        AdamW. With ``masked`` the decisions stay on the device and are applied through a 0/1 mask per
        parameter (a loser's denominator is divided by 0 -> inf, so its step is exactly 0, and its weight
        decay factor becomes 1): no host sync. Otherwise the decisions are read once and losers skipped.
        Custom scores (no ``reduction``) use this path on the CPU too: they see whole tensors."""
        n = len(work.params)
        by_betas: dict[tuple[float, float], list[int]] = {}
        for i, b in enumerate(work.betas):
            by_betas.setdefault(b, []).append(i)
        for (b1, b2), idx in by_betas.items():
            m, v, g = ([ts[i] for i in idx] for ts in (work.exp_avgs, work.exp_avg_sqs, work.grads))
            torch._foreach_lerp_(m, g, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, 1 - b2)
        denoms = torch._foreach_sqrt(work.exp_avg_sqs)  # sqrt(v): shared by the score and the update
        win = self._route(work, device, sqrt_v=denoms) if work.molf_index else None
        torch._foreach_div_(denoms, bias2_sqrt)
        torch._foreach_add_(denoms, work.eps)
        step_sizes = [-lr / c1 for lr, c1 in zip(work.lrs, bias1)]
        decay = [i for i in range(n) if work.wds[i] != 0]  # zero-decay parameters skip the multiply
        if win is not None and not masked:  # read the decisions once, skip the losers entirely
            lost = {i for i, w in zip(work.molf_index, win.tolist()) if not w}
            keep = [i for i in range(n) if i not in lost]
            decay = [i for i in decay if i not in lost]
        else:
            keep = range(n)
        factors = [1 - work.lrs[i] * work.wds[i] for i in decay]
        params = [work.local_params[i] for i in decay]
        if win is not None and masked:
            layout = self._layout
            mask = torch.ones(n, device=device)
            mask.index_copy_(0, layout["molf_index"], win.to(mask.dtype))
            if decay:
                factors = self._to_device(factors, torch.float32, device)
                mask_decay = mask.index_select(0, self._to_device(decay, torch.long, device))
                factors = torch.where(mask_decay > 0, factors, torch.ones_like(factors))
                torch._foreach_mul_(params, list(factors.unbind()))
            torch._foreach_div_(denoms, list(mask.unbind()))
        elif decay:
            torch._foreach_mul_(params, factors)
        torch._foreach_addcdiv_([work.local_params[i] for i in keep], [work.exp_avgs[i] for i in keep],
                                [denoms[i] for i in keep], [step_sizes[i] for i in keep])

    # ---------------------------------------------------------------- routing, shared by both paths
    def _route(self, work: _Work, device: torch.device, sqrt_v=None, param_sums=None) -> torch.Tensor:
        """Score all experts of all modules at once, decide top-k per module on the device; return the
        winner flag (bool tensor, on the device) of every MoLF parameter of ``work``."""
        plan = self._plan_for(device)
        layout = self._layout_for(work, plan, device)
        E, P = len(plan["expert_names"]), plan["max_params"]

        def per_expert_sum(values) -> torch.Tensor:
            # Deterministic segmented sum: scatter into an [E, P] zero matrix, then sum rows.
            values = values if isinstance(values, torch.Tensor) else torch.stack(values)
            padded = torch.zeros(E * P, dtype=torch.float32, device=device)
            padded[layout["padded_slot"]] = values.float()
            sums = padded.view(E, P).sum(dim=1)
            if self.process_group is not None or self._sharded:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.process_group)
            return sums

        molf = work.molf_index
        expert_lr = [g["lr"] * g["expert_lr_scale"][k] for g, k in plan["expert_of_group"]]
        stats = RouterStats(
            exp_avgs=[work.exp_avgs[i] for i in molf],
            exp_avg_sqs=[work.exp_avg_sqs[i] for i in molf],
            sqrt_exp_avg_sqs=None if sqrt_v is None else [sqrt_v[i] for i in molf],
            eps=[work.eps[i] for i in molf],
            lr=self._to_device(expert_lr, torch.float32, device),
            numel=plan["numel"],
            expert_names=plan["expert_names"],
            per_expert_sum=per_expert_sum,
            param_sums=param_sums,
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
        return winners.view(-1)[layout["slot_of_param"]]

    def _layout_for(self, work: _Work, plan: dict, device: torch.device) -> dict:
        """Device index tensors for the MoLF parameters that have a gradient; rebuilt only when that set
        (or the device) changes, so a steady training loop builds them once."""
        key = (device, tuple(id(work.params[i]) for i in work.molf_index))
        if self._layout is not None and self._layout["key"] == key:
            return self._layout
        P = plan["max_params"]
        expert_of, padded_slot = [], []
        for i in work.molf_index:
            e, position = plan["param_slot"][id(work.params[i])]
            expert_of.append(e)
            padded_slot.append(e * P + position)
        expert_of = torch.tensor(expert_of, dtype=torch.long, device=device)
        self._layout = {
            "key": key,
            "padded_slot": torch.tensor(padded_slot, dtype=torch.long, device=device),
            "slot_of_param": plan["expert_slot"][expert_of],
            "molf_index": torch.tensor(work.molf_index, dtype=torch.long, device=device),
        }
        return self._layout

    @staticmethod
    def _to_device(values, dtype, device):
        """A small per-step host list on the device, without a sync (pinned, non-blocking on CUDA)."""
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
        self._layout = None
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
