"""The routing plan of ``MoLFAdamW``: where every expert lives, and one step's routing over it.

The optimizer sees parameters; the router sees experts of modules. ``build_plan`` maps one to the
other once per set of parameter groups (index tensors on the device), ``build_layout`` once per set of
parameters with a gradient. ``StepRouter`` keeps both (rebuilt when the groups change) and does what
every step needs from them, on the device and without a host read: the non-finite gradient gate,
the score of every expert, and the top-k decision (``molf.router.decide``), recorded in a
``molf.readback.RoutingReadback``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import router
from .functional import ParamBatch, _to_device
from .readback import RoutingReadback
from .router import RouterStats


@dataclass
class Plan:
    """Index tensors that map parameters to experts and experts to (module, slot). Built once."""
    device: torch.device
    modules: list            # the MoLF parameter groups, in order
    module_names: list
    K: int                   # most experts in a module
    expert_names: list       # [E] over all modules
    expert_slot: torch.Tensor  # [E] position in the flattened [M, K] grid
    numel: torch.Tensor      # [E] N_e
    valid: torch.Tensor      # [M, K] real expert slots
    topk: torch.Tensor       # [M]
    expert_of_group: list    # [E] (group, expert index in the group)
    param_slot: dict         # id(param) -> (expert, position among the expert's parameters)
    param_module: dict       # id(param) -> module index
    max_params: int          # most parameters in one expert

    @property
    def layout(self) -> list[tuple[str, tuple[str, ...]]]:
        """(module name, expert names) per module: what the routing counters are indexed by."""
        return [(g["molf_module"], tuple(g["experts"])) for g in self.modules]


@dataclass
class Layout:
    """Device index tensors for the MoLF parameters of one batch (rebuilt only when that set changes)."""
    padded_slot: torch.Tensor      # per MoLF param: row-major slot in an [E, max_params] matrix
    slot_of_param: torch.Tensor    # per MoLF param: its expert's slot in the [M, K] grid
    molf_index: torch.Tensor       # positions of the MoLF params in the batch
    module_of_param: torch.Tensor  # per MoLF param: its module
    has_grad: torch.Tensor         # [M] bool: the module has a parameter in the batch


@dataclass
class Gate:
    """Who steps this time (device flags): a parameter unless its gradient (for MoLF parameters: any
    gradient of its module) holds a NaN/inf; a module when it has a gradient and all of it is finite."""
    param_ok: torch.Tensor     # [n] bool, per parameter of the collected batch
    module_ok: torch.Tensor    # [M] bool
    has_grad: torch.Tensor     # [M] bool


def molf_groups(groups: list[dict]) -> list[dict]:
    return [g for g in groups if "molf_module" in g]


def build_plan(groups: list[dict], device: torch.device) -> Plan:
    modules = molf_groups(groups)
    K = max((len(g["experts"]) for g in modules), default=0)
    expert_names, expert_slot, numel, param_slot, param_module = [], [], [], {}, {}
    counts = []  # params per expert, to size the per-expert padding
    for m, g in enumerate(modules):
        first = len(expert_names)
        for k, name in enumerate(g["experts"]):
            expert_names.append(name)
            expert_slot.append(m * K + k)
            numel.append(0)
            counts.append(0)
        for p, k in zip(g["params"], g["param_expert"]):
            param_slot[id(p)] = (first + k, counts[first + k])
            param_module[id(p)] = m
            counts[first + k] += 1
            numel[first + k] += p.numel()
    valid = torch.zeros(len(modules) * K, dtype=torch.bool)
    valid[expert_slot] = True
    return Plan(
        device=device, modules=modules, module_names=[g["molf_module"] for g in modules], K=K,
        expert_names=expert_names,
        expert_slot=torch.tensor(expert_slot, dtype=torch.long, device=device),
        numel=torch.tensor(numel, dtype=torch.float32, device=device),
        valid=valid.view(len(modules), K).to(device),
        topk=torch.tensor([g["topk"] for g in modules], device=device),
        expert_of_group=[(g, k) for g in modules for k in range(len(g["experts"]))],
        param_slot=param_slot, param_module=param_module, max_params=max(counts, default=0),
    )


def build_layout(plan: Plan, batch: ParamBatch, device: torch.device) -> Layout:
    P = plan.max_params
    expert_of, padded_slot, module_of = [], [], []
    for i in batch.molf_index:
        e, position = plan.param_slot[id(batch.params[i])]
        expert_of.append(e)
        padded_slot.append(e * P + position)
        module_of.append(plan.param_module[id(batch.params[i])])
    has_grad = torch.zeros(len(plan.modules), dtype=torch.bool)
    has_grad[module_of] = True
    return Layout(
        padded_slot=torch.tensor(padded_slot, dtype=torch.long, device=device),
        slot_of_param=plan.expert_slot[torch.tensor(expert_of, dtype=torch.long, device=device)],
        molf_index=torch.tensor(batch.molf_index, dtype=torch.long, device=device),
        module_of_param=torch.tensor(module_of, dtype=torch.long, device=device),
        has_grad=has_grad.to(device),
    )


class StepRouter:
    """The plan and layouts of one optimizer (cached), and the gate, scores and decision of a step.

    ``process_group``: the group whose ranks each hold a shard of every expert (FSDP); score sums and
    non-finite flags are all-reduced over it (``sharded``: the parameters are DTensors, default group).
    """

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.sharded = False
        self.plan: Plan | None = None
        self._layouts: dict = {}       # batch key -> Layout
        self._checked: set = set()     # batch keys whose score output shape was checked (dry run)

    def reset(self) -> None:
        """The groups changed (added, loaded): rebuild everything at the next use."""
        self.plan, self._layouts, self._checked = None, {}, set()

    def plan_for(self, groups: list[dict], device: torch.device) -> Plan:
        if self.plan is None or self.plan.device != device:
            self.plan, self._layouts = build_plan(groups, device), {}
        return self.plan

    def layout_for(self, batch: ParamBatch, device: torch.device) -> Layout:
        """Cached per set of parameters, so a steady training loop builds it once."""
        key = (device, tuple(id(batch.params[i]) for i in batch.molf_index))
        if key not in self._layouts:
            if len(self._layouts) >= 8:  # a handful of distinct sets (full batch, a few with skips)
                self._layouts.clear()
            self._layouts[key] = build_layout(self.plan, batch, device)
        return self._layouts[key]

    @property
    def shared_experts(self) -> bool:
        """Each rank holds a shard of every expert (FSDP): flags and score sums are all-reduced."""
        return self.process_group is not None or self.sharded

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks that share the experts (FSDP); in place, returned."""
        if self.shared_experts:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t

    def gate(self, batch: ParamBatch, device: torch.device, readback: RoutingReadback, *,
             in_kernels: bool = False) -> Gate:
        """Non-finite gradient flags per parameter and module, on the device (no host read), from one
        multi-tensor L2 norm of the gradients: NaN/inf for any NaN/inf element, and inf too for elements
        so large (``|g|`` near 1e19 in float32) that ``g^2`` would make the second moment infinite.
        ``in_kernels`` (the compiled path): the kernels check, so every parameter steps unless they say."""
        M = len(self.plan.modules)
        no_module = torch.zeros(M, dtype=torch.bool, device=device)
        has_grad = self.layout_for(batch, device).has_grad if batch.molf_index else no_module
        if in_kernels:
            return Gate(torch.ones(len(batch), dtype=torch.bool, device=device), has_grad, has_grad)
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(batch.grads, 2)).float())
        if self.shared_experts:
            bad = self.reduce(bad.float()) > 0
        param_ok = ~bad
        if not batch.molf_index:
            readback.grad_skips += bad.sum()
            return Gate(param_ok, no_module, no_module)
        layout = self.layout_for(batch, device)
        molf_bad = bad.index_select(0, layout.molf_index)
        module_bad = torch.zeros(M, device=device).index_add_(0, layout.module_of_param, molf_bad.float()) > 0
        module_ok = has_grad & ~module_bad
        param_ok.index_copy_(0, layout.molf_index, module_ok.index_select(0, layout.module_of_param))
        readback.grad_skips += (has_grad & module_bad).sum() + bad.sum() - molf_bad.sum()
        return Gate(param_ok, module_ok, has_grad)

    def scores(self, batch: ParamBatch, device: torch.device, score, score_name: str, sqrt_v=None,
               param_sums=None) -> torch.Tensor:
        """The score of every expert ([E], on the device) from the MoLF parameters of ``batch``;
        ``sqrt_v`` per MoLF parameter. Raises when the score returns anything but one value per expert."""
        plan, layout = self.plan, self.layout_for(batch, device)
        E, P = len(plan.expert_names), plan.max_params

        def per_expert_sum(values) -> torch.Tensor:
            # Deterministic segmented sum: scatter into an [E, P] zero matrix, then sum rows.
            values = values if isinstance(values, torch.Tensor) else torch.stack(values)
            padded = torch.zeros(E * P, dtype=torch.float32, device=device)
            padded[layout.padded_slot] = values.float()
            return self.reduce(padded.view(E, P).sum(dim=1))

        molf = batch.molf_index
        expert_lr = [g["lr"] * g["expert_lr_scale"][k] for g, k in plan.expert_of_group]
        stats = RouterStats(
            exp_avgs=[batch.exp_avgs[i] for i in molf], exp_avg_sqs=[batch.exp_avg_sqs[i] for i in molf],
            sqrt_exp_avg_sqs=sqrt_v, eps=[batch.eps[i] for i in molf],
            lr=_to_device(expert_lr, torch.float32, device), numel=plan.numel,
            expert_names=plan.expert_names, per_expert_sum=per_expert_sum, param_sums=param_sums)
        scores = score(stats)
        if not isinstance(scores, torch.Tensor) or scores.shape != (E,):
            raise ValueError(f"score {score_name!r} must return a tensor of shape ({E},), one value "
                             f"per expert, got {getattr(scores, 'shape', type(scores).__name__)}")
        return scores

    def check_score(self, batch: ParamBatch, device: torch.device, score, score_name: str, impl: str) -> None:
        """Dry run: call the score once on the current state, the first time a set of parameters is
        routed, so that a score of the wrong shape fails before anything changes. Built-in scores return
        one value per expert by construction and skip it."""
        key = (device, tuple(id(batch.params[i]) for i in batch.molf_index))
        if not batch.molf_index or score in (router.epd, router.pfn) or key in self._checked:
            return
        if impl in ("chunked", "compiled"):
            sums = torch.zeros(len(batch.molf_index), dtype=torch.float64)
            self.scores(batch, device, score, score_name, param_sums=sums)
        else:
            sqrt_v = torch._foreach_sqrt([batch.exp_avg_sqs[i] for i in batch.molf_index])
            self.scores(batch, device, score, score_name, sqrt_v=sqrt_v)
        self._checked.add(key)

    def route(self, sqrt_v=None, param_sums=None, skipped_modules=(), *, batch: ParamBatch,
              device: torch.device, gate: Gate, readback: RoutingReadback, score, score_name: str) -> torch.Tensor:
        """Score all experts of all modules at once, decide top-k per module on the device; return the
        winner flag (bool tensor, on the device) of every MoLF parameter of ``batch``. Modules that are
        skipped (non-finite gradient: ``gate``, or ``skipped_modules``, the module indices in which the
        compiled path's kernels found one) or have no gradient are not scored (NaN) and get no winner."""
        plan = self.plan
        M, K = len(plan.modules), plan.K
        if M == 0:
            return torch.zeros(0, dtype=torch.bool, device=device)
        grid = torch.full((M * K,), float("nan"), dtype=torch.float32, device=device)
        if batch.molf_index:
            molf_sqrt_v = None if sqrt_v is None else [sqrt_v[i] for i in batch.molf_index]
            scores = self.scores(batch, device, score, score_name, sqrt_v=molf_sqrt_v, param_sums=param_sums)
            grid[plan.expert_slot] = scores.detach().float()
        module_ok = gate.module_ok
        if skipped_modules:  # the compiled path found a non-finite gradient there
            module_ok = module_ok.clone()
            module_ok[list(skipped_modules)] = False
        grid = torch.where(module_ok.unsqueeze(1), grid.view(M, K), float("nan"))
        winners, finite = router.decide(grid, plan.valid, plan.topk)
        readback.record(grid, winners, skips=(~finite & gate.has_grad).sum())
        if not batch.molf_index:
            return torch.zeros(0, dtype=torch.bool, device=device)
        return winners.view(-1)[self.layout_for(batch, device).slot_of_param]
