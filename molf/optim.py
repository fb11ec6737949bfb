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

Where the paper is silent, this optimizer chooses:

- **A non-finite gradient** (any NaN/inf element, or one whose squared norm overflows) skips the
  *whole* step of its module: no moment
  update, no step-counter advance, no parameter change, no winner. Plain parameters follow the same
  rule one parameter at a time (torch's AdamW would instead spread the NaN into the moments and the
  weights, and every later step; a loud error is not an option on the accelerator path, which must
  not read the gradients back). Each skip is counted in ``nonfinite_grad_skips`` (modules and plain
  parameters) and, for modules, also in ``nonfinite_skips`` (decisions without a winner). At the next
  finite step the module trains again from the state it had. Under FSDP the flags are all-reduced,
  so every rank skips the same modules.
- **A module with no gradient at all** this step is not routed: no winner, nothing counted, its
  ``last_decisions`` entry is the empty tuple and its ``last_scores`` are NaN ("not scored").
- **Parameter dtypes**: float32, bfloat16 and float64. float16 is refused at the first step (eps=1e-8
  is 0 in float16 and ``g^2`` underflows, so every score would be NaN and nothing would train): keep
  float32 weights under ``torch.autocast(dtype=torch.float16)``, or use bfloat16.
- **A custom score** is called once on the current state (a dry run) the first time a set of
  parameters is routed, so an output of the wrong shape is reported before any state changes.

The step is split as torch splits its Adam: the class keeps hyper-parameters, state and the routing
read-back; the arithmetic lives in ``molf.functional``, four functions with one signature, chosen by
``impl``:

- ``"chunked"`` (the CPU): each parameter walked in cache-sized chunks; losers' updates never computed.
- ``"foreach"``: whole-list ``torch._foreach_*`` ops as torch's foreach AdamW; decisions read back once.
- ``"masked"`` (accelerators): the same ops with the decisions applied through masks on the device:
  ``step()`` makes no host sync. The one host-side consequence of a skip, giving the step counter its
  step back, is applied at the start of the next ``step()`` (or ``state_dict()``) from a copy of the
  per-parameter flags started right after they were computed (pinned memory and a CUDA event, so the
  wait, if any, is for a step the device finished long ago). In between, ``opt.state[p]["step"]`` of a
  skipped parameter reads one too high; nothing uses it before it is corrected.
- ``"compiled"`` (the CPU, ``Score`` objects, contiguous tensors): the two passes as C++ kernels
  (``molf/csrc/cpu_step.cpp``), one call each over all parameters at memory speed: pass 1 advances
  the moments in place and sums the score's term (its ``cpp_term``: built-in for EPD and PFN), pass 2
  updates the winners only; plain parameters take one whole AdamW step each. The kernels check each
  gradient just before they use it (so it is read from memory once), skip what the other paths skip
  and report it back (under FSDP the optimizer's own, all-reduced check runs first, so that every
  rank skips the same modules). The fastest CPU path. The first use on a machine builds the
  kernels (~20-60 s, announced by one line on the ``molf`` logger; later processes load the cached
  build in about a second); a score without ``cpp_term``, or a failed build (said in one line), takes
  the chunked path instead. Each op rounds as the chunked path's does; the score sums are added in
  another order, so the scores agree to float rounding and the decisions are the same.
- ``"auto"`` (default): chunked on the CPU for ``Score`` objects (built-ins) and contiguous tensors,
  masked on accelerators, foreach otherwise. It never picks ``"compiled"``: a first step that may
  spend a minute building, and that needs a C++ compiler and ninja, is for a user to ask for.

All paths give the same decisions and (up to float rounding in the scores) the same parameters.
``last_decisions``, ``last_scores`` and ``win_counts`` read the results back lazily (one copy per read).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _compiled, _validate, functional, router
from .functional import IMPLEMENTATIONS, ParamBatch, _to_device
from .router import RouterStats, Score, decide, resolve_score

IMPLS = ("auto", "chunked", "compiled", "foreach", "masked")
DEFAULT_BETAS = (0.9, 0.999)  # Adam's (beta1, beta2), as torch.optim.AdamW; the one source in molf
DEFAULT_EPS = 1e-8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (FSDP2 parameters, grads, state); other tensors as they are."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class _Plan:
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


@dataclass
class _Layout:
    """Device index tensors for the MoLF parameters of one batch (rebuilt only when that set changes)."""
    padded_slot: torch.Tensor      # per MoLF param: row-major slot in an [E, max_params] matrix
    slot_of_param: torch.Tensor    # per MoLF param: its expert's slot in the [M, K] grid
    molf_index: torch.Tensor       # positions of the MoLF params in the batch
    module_of_param: torch.Tensor  # per MoLF param: its module
    has_grad: torch.Tensor         # [M] bool: the module has a parameter in the batch


@dataclass
class _RoutingLog:
    """Running routing counters, on the device (read back lazily)."""
    win_counts: torch.Tensor        # [M, K] int64
    skips: torch.Tensor             # [] module-steps without a winner for a NaN/inf score or gradient
    grad_skips: torch.Tensor        # [] module- and plain-parameter-steps skipped for a NaN/inf gradient
    last: tuple | None = None       # (scores [M, K], winners [M, K]) of the last step

    def to(self, device) -> _RoutingLog:
        return _RoutingLog(self.win_counts.to(device), self.skips.to(device), self.grad_skips.to(device),
                           None if self.last is None else tuple(t.to(device) for t in self.last))


@dataclass
class _Gate:
    """Who steps this time (device flags): a parameter unless its gradient (for MoLF parameters: any
    gradient of its module) holds a NaN/inf; a module when it has a gradient and all of it is finite."""
    param_ok: torch.Tensor     # [n] bool, per parameter of the collected batch
    module_ok: torch.Tensor    # [M] bool
    has_grad: torch.Tensor     # [M] bool


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW that routes each module's update to its top-k experts.

    params        groups from ``molf.param_groups(model, lr_fft, lr_lora, ...)``; plain groups (no
                  ``molf_module`` key) and plain parameter lists train as ordinary AdamW.
    score         ``"epd"`` (paper Eq. 10, default), ``"pfn"`` (Eq. 11), a ``molf.router.Score`` or any
                  callable ``score(RouterStats) -> Tensor[n_experts]`` (see ``molf.router``).
    topk          experts updated per module (the paper: 1). Equal to the number of experts means a
                  dense update of every expert (the paper's "no routing" ablation).
    lr, weight_decay  defaults for groups that do not set them (``lr=None``: every group must).
    process_group the group whose ranks each hold a shard of every expert (FSDP); score sums are
                  all-reduced over it. Detected automatically for DTensor (FSDP2) parameters.
    impl          ``"auto"`` (default), ``"chunked"``, ``"compiled"``, ``"foreach"`` or ``"masked"``: how
                  the step is computed (module docstring); all give the same decisions.
                  ``"compiled"`` is the fastest on the CPU but builds C++ kernels on first use;
                  ``"auto"`` stays eager.

    After each ``step()``: ``last_decisions`` maps module name to the tuple of winning expert names
    (empty when the module was skipped or had no gradient), ``last_scores`` to ``{expert: score}``;
    ``win_counts`` holds the running wins per module and expert, ``nonfinite_skips`` the module-steps
    without a winner for a NaN/inf score or gradient, ``nonfinite_grad_skips`` the module- and
    plain-parameter-steps skipped whole for a NaN/inf gradient. ``state_dict()`` carries all of it.
    """

    def __init__(self, params, score="epd", topk: int = 1, betas=DEFAULT_BETAS, eps: float = DEFAULT_EPS,
                 lr: float | None = None, weight_decay: float = 0.0, process_group=None, impl: str = "auto"):
        self.score_fn = resolve_score(score)
        self.score_name = score if isinstance(score, str) else (
            score.name if isinstance(score, Score) else getattr(score, "__name__", "custom"))
        if impl not in IMPLS:
            eager = tuple(i for i in IMPLS if i != "compiled")
            raise ValueError(f"impl must be one of {eager}, got {impl!r}, or 'compiled' (the C++ kernels "
                             f"of the CPU path)")
        if impl in ("chunked", "compiled") and not isinstance(self.score_fn, Score):
            raise ValueError(f"impl={impl!r} sums the score's per-element term chunk by chunk, but score "
                             f"{self.score_name!r} is a plain callable with no term: write it as a "
                             f"molf.router.Score, or use impl='auto', 'foreach' or 'masked'")
        self.impl = impl
        topk = _validate.integer("topk", topk)
        betas = _validate.betas(betas)
        eps = _validate.number("eps", eps)
        weight_decay = _validate.number("weight_decay", weight_decay)
        if lr is not None:
            lr = _validate.number("lr", lr)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "topk": topk}
        self._plan: _Plan | None = None
        self._layouts: dict = {}         # batch key -> _Layout
        self._checked: set = set()       # batch keys whose score output shape was checked (dry run)
        self._scratch_buffers = {}       # (dtype, device) -> chunk buffer of the CPU path
        self._unconfirmed = None         # masked path: (step counters, flags, event) to settle
        super().__init__(params, defaults)
        self._log: _RoutingLog | None = None
        # Sharded training (FSDP): each rank holds a shard of every expert, so the per-expert score sums
        # (and the non-finite gradient flags) are all-reduced over this group (None: the default group,
        # when parameters are DTensors). Expert sizes N_e are global (DTensor.numel() is the full size).
        self.process_group = process_group
        self._sharded = False

    # ---------------------------------------------------------------- groups and validation
    def add_param_group(self, group: dict) -> None:
        super().add_param_group(group)
        group = self.param_groups[-1]
        if group["lr"] is None:
            raise ValueError("a parameter group has no lr; give lr= to MoLFAdamW or set it in the group")
        group["lr"] = _validate.number("lr", group["lr"])
        group["eps"] = _validate.number("eps", group["eps"])
        group["weight_decay"] = _validate.number("weight_decay", group["weight_decay"])
        group["betas"] = _validate.betas(group["betas"])
        topk = _validate.integer("topk", group["topk"])
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
                _validate.number("weight_decay", wd)
            for s in group["expert_lr_scale"]:
                _validate.number("expert_lr_scale", s)
        self._plan = None

    # ---------------------------------------------------------------- static routing plan
    def _build_plan(self, device: torch.device) -> _Plan:
        modules = [g for g in self.param_groups if "molf_module" in g]
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
                e = first + k
                param_slot[id(p)] = (e, counts[e])
                param_module[id(p)] = m
                counts[e] += 1
                numel[e] += p.numel()
        valid = torch.zeros(len(modules) * K, dtype=torch.bool)
        valid[expert_slot] = True
        return _Plan(
            device=device,
            modules=modules,
            module_names=[g["molf_module"] for g in modules],
            K=K,
            expert_names=expert_names,
            expert_slot=torch.tensor(expert_slot, dtype=torch.long, device=device),
            numel=torch.tensor(numel, dtype=torch.float32, device=device),
            valid=valid.view(len(modules), K).to(device),
            topk=torch.tensor([g["topk"] for g in modules], device=device),
            expert_of_group=[(g, k) for g in modules for k in range(len(g["experts"]))],
            param_slot=param_slot,
            param_module=param_module,
            max_params=max(counts, default=0),
        )

    def _plan_for(self, device: torch.device) -> _Plan:
        if self._plan is None or self._plan.device != device:
            self._plan = self._build_plan(device)
            self._layouts = {}
            if self._log is None:
                M, K = len(self._plan.modules), self._plan.K
                zero = torch.zeros((), dtype=torch.long, device=device)
                self._log = _RoutingLog(torch.zeros((M, K), dtype=torch.long, device=device), zero, zero.clone())
            else:
                self._log = self._log.to(device)
        return self._plan

    def _layout_for(self, batch: ParamBatch, plan: _Plan, device: torch.device) -> _Layout:
        """The index tensors for the MoLF parameters of ``batch``; cached per set of parameters, so a
        steady training loop builds them once."""
        key = (device, tuple(id(batch.params[i]) for i in batch.molf_index))
        if key in self._layouts:
            return self._layouts[key]
        P = plan.max_params
        expert_of, padded_slot, module_of = [], [], []
        for i in batch.molf_index:
            e, position = plan.param_slot[id(batch.params[i])]
            expert_of.append(e)
            padded_slot.append(e * P + position)
            module_of.append(plan.param_module[id(batch.params[i])])
        has_grad = torch.zeros(len(plan.modules), dtype=torch.bool)
        has_grad[module_of] = True
        if len(self._layouts) >= 8:  # a handful of distinct sets (full batch, a few with skips)
            self._layouts.clear()
        layout = self._layouts[key] = _Layout(
            padded_slot=torch.tensor(padded_slot, dtype=torch.long, device=device),
            slot_of_param=plan.expert_slot[torch.tensor(expert_of, dtype=torch.long, device=device)],
            molf_index=torch.tensor(batch.molf_index, dtype=torch.long, device=device),
            module_of_param=torch.tensor(module_of, dtype=torch.long, device=device),
            has_grad=has_grad.to(device),
        )
        return layout

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle_steps()
        batch, created = self._collect()
        if batch is None:
            return loss
        device = batch.local_params[0].device
        impl = self._impl_for(batch, device)
        try:
            self._check_score(batch, device, impl)
        except BaseException:
            for p in created:  # leave the optimizer as it was
                del self.state[p]
            raise
        if impl == "compiled" and not self._shared_experts:
            gate = self._gate_in_kernels(batch, device)  # the kernels check, and report what they skipped
        else:
            gate = self._gate(batch, device)
        if impl == "masked":
            torch._foreach_add_(batch.steps, 1.0)
            batch.ok = gate.param_ok
            self._expect_settle(batch.steps, gate.param_ok, device)
        else:
            keep = gate.param_ok.tolist()
            if not all(keep):
                batch = batch.subset([i for i, k in enumerate(keep) if k])
            if batch.steps:
                torch._foreach_add_(batch.steps, 1.0)
        batch.bias1, batch.bias2_sqrt = self._bias_corrections(batch)
        if impl == "compiled":  # the kernels check module by module
            plan = self._plan_for(device)
            batch.module_of = [plan.param_module[id(batch.params[i])] for i in batch.molf_index]
        route = functools.partial(self._route, batch=batch, device=device, gate=gate)
        skipped = IMPLEMENTATIONS[impl](batch, route, score=self.score_fn, scratch=self._scratch)
        if skipped is not None:  # the compiled path: give the skipped parameters their step counter back
            for i in skipped.params:
                batch.steps[i] -= 1
            self._log.grad_skips += skipped.count
        return loss

    def _impl_for(self, batch: ParamBatch, device: torch.device) -> str:
        if self.impl == "auto":
            if device.type != "cpu":
                return "masked"
            return "chunked" if isinstance(self.score_fn, Score) and batch.contiguous else "foreach"
        if self.impl == "compiled" and device.type != "cpu":
            raise ValueError(f"impl='compiled' is a CPU path (it reads the decisions back); on {device.type} "
                             f"use impl='auto' (the masked path: no host sync)")
        if self.impl in ("chunked", "compiled") and not batch.contiguous:
            raise ValueError(f"impl={self.impl!r} walks flat views of every tensor and needs contiguous parameters, "
                             "gradients and state; use impl='auto' or 'foreach' for non-contiguous ones")
        if self.impl == "compiled" and not _compiled.available(self.score_fn):
            return "chunked"  # no cpp_term, or the kernels could not be built (said once on the molf logger)
        return self.impl

    def _collect(self) -> tuple[ParamBatch | None, list]:
        """Every parameter with a gradient (in group order), its state (created on first use) and
        hyper-parameters; and the parameters whose state was created now. Learning rates are read at
        every step, since schedulers move them. Unsupported dtypes fail here, before any state exists."""
        b = ParamBatch()
        for group in self.param_groups:
            is_molf = "molf_module" in group
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MoLFAdamW does not support sparse gradients")
                if p.dtype not in SUPPORTED_DTYPES:
                    where = f"module {group['molf_module']!r}" if is_molf else "a plain parameter group"
                    raise TypeError(
                        f"MoLFAdamW supports float32, bfloat16 and float64 parameters, got {p.dtype} (a "
                        f"parameter of shape {tuple(p.shape)} in {where}). In float16 eps=1e-8 rounds to 0 "
                        f"and the moments underflow, so every score would be NaN and nothing would train: "
                        f"keep float32 weights under torch.autocast(dtype=torch.float16), or use bfloat16")
                if is_molf:
                    b.molf_index.append(len(b.params))
                    b.lrs.append(group["lr"] * group["expert_lr_scale"][group["param_expert"][i]])
                    b.wds.append(group["param_weight_decay"][i])
                else:
                    b.lrs.append(group["lr"])
                    b.wds.append(group["weight_decay"])
                b.params.append(p)
                b.grads.append(_local(p.grad))
                b.eps.append(group["eps"])
                b.betas.append(group["betas"])
        if not b.params:
            return None, []
        created = []
        for p in b.params:
            st = self.state[p]
            if not st:
                created.append(p)
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            b.local_params.append(_local(p))
            b.exp_avgs.append(_local(st["exp_avg"]))
            b.exp_avg_sqs.append(_local(st["exp_avg_sq"]))
            b.steps.append(st["step"])
        self._sharded = any(hasattr(p, "to_local") for p in b.params)
        return b, created

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks that share the experts (FSDP); in place, returned."""
        if self._shared_experts:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t

    @property
    def _shared_experts(self) -> bool:
        """Each rank holds a shard of every expert (FSDP): flags and score sums are all-reduced."""
        return self.process_group is not None or self._sharded

    def _gate_in_kernels(self, batch: ParamBatch, device: torch.device) -> _Gate:
        """The compiled path checks the gradients inside its kernels: every parameter steps unless they
        say otherwise (``functional.Skipped``)."""
        plan = self._plan_for(device)
        has_grad = torch.zeros(len(plan.modules), dtype=torch.bool, device=device)
        if batch.molf_index:
            has_grad = self._layout_for(batch, plan, device).has_grad
        return _Gate(param_ok=torch.ones(len(batch), dtype=torch.bool, device=device), module_ok=has_grad,
                     has_grad=has_grad)

    def _gate(self, batch: ParamBatch, device: torch.device) -> _Gate:
        """Non-finite gradient flags per parameter and module, on the device (no host read), from one
        multi-tensor L2 norm of the gradients: NaN/inf for any NaN/inf element, and inf too for elements
        so large (``|g|`` near 1e19 in float32) that ``g^2`` would make the second moment infinite. (The
        max-norm would flag exactly the non-finite elements, but it is ~10x slower on the CPU.)"""
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(batch.grads, 2)).float())
        if self._shared_experts:
            bad = self._reduce(bad.float()) > 0
        plan = self._plan_for(device)
        M = len(plan.modules)
        param_ok = ~bad
        if batch.molf_index:
            layout = self._layout_for(batch, plan, device)
            molf_bad = bad.index_select(0, layout.molf_index)
            module_bad = torch.zeros(M, device=device).index_add_(0, layout.module_of_param, molf_bad.float()) > 0
            module_ok = layout.has_grad & ~module_bad
            param_ok.index_copy_(0, layout.molf_index, module_ok.index_select(0, layout.module_of_param))
            has_grad = layout.has_grad
            self._log.grad_skips += (has_grad & module_bad).sum() + bad.sum() - molf_bad.sum()
        else:
            has_grad = module_ok = torch.zeros(M, dtype=torch.bool, device=device)
            self._log.grad_skips += bad.sum()
        return _Gate(param_ok=param_ok, module_ok=module_ok, has_grad=has_grad)

    def _expect_settle(self, steps: list, param_ok: torch.Tensor, device: torch.device) -> None:
        """Masked path: every step counter advanced; remember to give it back where ``param_ok`` is
        False. The flags start their trip to the host now (asynchronously on CUDA)."""
        if device.type == "cuda":
            flags = param_ok.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # the CPU: already there; other accelerators: a plain copy
            flags, event = param_ok.to("cpu"), None
        self._unconfirmed = (steps, flags, event)

    def _settle_steps(self) -> None:
        """Give the skipped parameters of the last masked step their step counter back."""
        if self._unconfirmed is None:
            return
        steps, flags, event = self._unconfirmed
        self._unconfirmed = None
        if event is not None:
            event.synchronize()
        for step, ok in zip(steps, flags.tolist()):
            if not ok:
                step -= 1

    @staticmethod
    def _bias_corrections(batch: ParamBatch) -> tuple[list[float], list[float]]:
        """``1 - b1^t`` and ``sqrt(1 - b2^t)`` per parameter, as Python floats exactly as torch's AdamW
        computes them: one host read of all step counters (CPU tensors, so no device sync) and one
        power per distinct (betas, t), in practice one per step."""
        if not batch.steps:
            return [], []
        table, bias1, bias2_sqrt = {}, [], []
        for (b1, b2), t in zip(batch.betas, torch.stack(batch.steps).tolist()):
            if (b1, b2, t) not in table:
                table[b1, b2, t] = (1 - b1 ** t, (1 - b2 ** t) ** 0.5)
            c1, c2 = table[b1, b2, t]
            bias1.append(c1)
            bias2_sqrt.append(c2)
        return bias1, bias2_sqrt

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """One reusable chunk-sized buffer per dtype: no large temporaries (on the CPU, fresh memory
        costs a page fault per 4 KiB, which made temporaries the largest cost of a step)."""
        key = (like.dtype, like.device)
        if key not in self._scratch_buffers or self._scratch_buffers[key].numel() < functional.CHUNK:
            self._scratch_buffers[key] = torch.empty(functional.CHUNK, dtype=like.dtype, device=like.device)
        return self._scratch_buffers[key]

    # ---------------------------------------------------------------- routing, shared by every path
    def _scores(self, batch: ParamBatch, device: torch.device, sqrt_v=None, param_sums=None) -> torch.Tensor:
        """The score of every expert ([E], on the device) from the MoLF parameters of ``batch``;
        ``sqrt_v`` per MoLF parameter. Raises when the score returns anything but one value per expert."""
        plan = self._plan_for(device)
        layout = self._layout_for(batch, plan, device)
        E, P = len(plan.expert_names), plan.max_params

        def per_expert_sum(values) -> torch.Tensor:
            # Deterministic segmented sum: scatter into an [E, P] zero matrix, then sum rows.
            values = values if isinstance(values, torch.Tensor) else torch.stack(values)
            padded = torch.zeros(E * P, dtype=torch.float32, device=device)
            padded[layout.padded_slot] = values.float()
            return self._reduce(padded.view(E, P).sum(dim=1))

        molf = batch.molf_index
        expert_lr = [g["lr"] * g["expert_lr_scale"][k] for g, k in plan.expert_of_group]
        stats = RouterStats(
            exp_avgs=[batch.exp_avgs[i] for i in molf],
            exp_avg_sqs=[batch.exp_avg_sqs[i] for i in molf],
            sqrt_exp_avg_sqs=sqrt_v,
            eps=[batch.eps[i] for i in molf],
            lr=_to_device(expert_lr, torch.float32, device),
            numel=plan.numel,
            expert_names=plan.expert_names,
            per_expert_sum=per_expert_sum,
            param_sums=param_sums,
        )
        scores = self.score_fn(stats)
        if not isinstance(scores, torch.Tensor) or scores.shape != (E,):
            raise ValueError(f"score {self.score_name!r} must return a tensor of shape ({E},), one value "
                             f"per expert, got {getattr(scores, 'shape', type(scores).__name__)}")
        return scores

    def _check_score(self, batch: ParamBatch, device: torch.device, impl: str) -> None:
        """Dry run: call the score once on the current state, the first time a set of parameters is
        routed, so that a score of the wrong shape fails before anything changes. Built-in scores return
        one value per expert by construction and skip it."""
        if not batch.molf_index or self.score_fn in (router.epd, router.pfn):
            return
        plan = self._plan_for(device)
        key = (device, tuple(id(batch.params[i]) for i in batch.molf_index))
        if key in self._checked:
            return
        self._layout_for(batch, plan, device)
        if impl in ("chunked", "compiled"):
            self._scores(batch, device, param_sums=torch.zeros(len(batch.molf_index), dtype=torch.float64))
        else:
            self._scores(batch, device, sqrt_v=torch._foreach_sqrt([batch.exp_avg_sqs[i] for i in batch.molf_index]))
        self._checked.add(key)

    def _route(self, sqrt_v=None, param_sums=None, skipped_modules=(), *, batch: ParamBatch,
               device: torch.device, gate: _Gate) -> torch.Tensor:
        """Score all experts of all modules at once, decide top-k per module on the device; return the
        winner flag (bool tensor, on the device) of every MoLF parameter of ``batch``. Modules that are
        skipped (non-finite gradient: ``gate``, or ``skipped_modules``, the module indices in which the
        compiled path's kernels found one) or have no gradient are not scored (NaN) and get no winner."""
        plan = self._plan_for(device)
        M, K = len(plan.modules), plan.K
        if M == 0:
            return torch.zeros(0, dtype=torch.bool, device=device)
        grid = torch.full((M * K,), float("nan"), dtype=torch.float32, device=device)
        if batch.molf_index:
            layout = self._layout_for(batch, plan, device)
            molf_sqrt_v = None if sqrt_v is None else [sqrt_v[i] for i in batch.molf_index]
            scores = self._scores(batch, device, sqrt_v=molf_sqrt_v, param_sums=param_sums)
            grid[plan.expert_slot] = scores.detach().float()
        module_ok = gate.module_ok
        if skipped_modules:  # the compiled path found a non-finite gradient there
            module_ok = module_ok.clone()
            module_ok[list(skipped_modules)] = False
        grid = torch.where(module_ok.unsqueeze(1), grid.view(M, K), float("nan"))
        winners, finite = decide(grid, plan.valid, plan.topk)
        log = self._log
        log.win_counts += winners
        log.skips += (~finite & gate.has_grad).sum()
        log.last = (grid, winners)
        if not batch.molf_index:
            return torch.zeros(0, dtype=torch.bool, device=device)
        return winners.view(-1)[layout.slot_of_param]

    # ---------------------------------------------------------------- reading the routing back
    def _module_table(self, tensor: torch.Tensor, convert) -> dict:
        plan = self._plan
        rows = tensor.cpu().tolist()
        return {name: {e: convert(rows[m][k]) for k, e in enumerate(g["experts"])}
                for m, (name, g) in enumerate(zip(plan.module_names, plan.modules))}

    @property
    def last_decisions(self) -> dict[str, tuple[str, ...]]:
        """Module name -> winning expert names of the last step (empty tuple: skipped, or no gradient)."""
        if self._log is None or self._log.last is None:
            return {}
        table = self._module_table(self._log.last[1], bool)
        return {m: tuple(e for e, won in experts.items() if won) for m, experts in table.items()}

    @property
    def last_scores(self) -> dict[str, dict[str, float]]:
        """Module name -> {expert name: score} of the last step, full precision (NaN: not scored)."""
        if self._log is None or self._log.last is None:
            return {}
        return self._module_table(self._log.last[0], float)

    def routing_snapshot(self) -> tuple[dict, dict]:
        """``(last_decisions, last_scores)`` with a single device-to-host copy (for logging)."""
        if self._log is None or self._log.last is None:
            return {}, {}
        grid, winners = self._log.last
        both = torch.stack([grid, winners.to(grid.dtype)]).cpu()
        scores = self._module_table(both[0], float)
        won = self._module_table(both[1], bool)
        return {m: tuple(e for e, w in experts.items() if w) for m, experts in won.items()}, scores

    @property
    def win_counts(self) -> dict[str, dict[str, int]]:
        """Module name -> {expert name: steps won so far}."""
        return {} if self._log is None else self._module_table(self._log.win_counts, int)

    @property
    def nonfinite_skips(self) -> int:
        """Module-steps without a winner because a score or a gradient was NaN or inf."""
        return 0 if self._log is None else int(self._log.skips)

    @property
    def nonfinite_grad_skips(self) -> int:
        """Steps skipped whole (moments, counter and parameters untouched) for a NaN/inf gradient: one per
        MoLF module and one per plain parameter, each step."""
        return 0 if self._log is None else int(self._log.grad_skips)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        self._settle_steps()
        sd = super().state_dict()
        log = self._log
        sd["molf"] = {
            "win_counts": None if log is None else log.win_counts.cpu().clone(),
            "nonfinite_skips": None if log is None else log.skips.cpu().clone(),
            "nonfinite_grad_skips": None if log is None else log.grad_skips.cpu().clone(),
            "last": None if log is None or log.last is None else tuple(t.cpu().clone() for t in log.last),
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
        self._layouts = {}
        self._unconfirmed = None  # the loaded counters are the truth
        self._log = None
        if routing and routing.get("win_counts") is not None:
            modules = [g for g in self.param_groups if "molf_module" in g]
            K = max((len(g["experts"]) for g in modules), default=0)
            if tuple(routing["win_counts"].shape) != (len(modules), K):
                raise ValueError(f"routing counters of shape {tuple(routing['win_counts'].shape)} do not fit "
                                 f"this optimizer's {len(modules)} modules x {K} experts")
            grad_skips = routing.get("nonfinite_grad_skips")  # absent in older checkpoints
            self._log = _RoutingLog(
                win_counts=routing["win_counts"].clone(),
                skips=routing["nonfinite_skips"].clone(),
                grad_skips=torch.zeros((), dtype=torch.long) if grad_skips is None else grad_skips.clone(),
                last=None if routing.get("last") is None else tuple(t.clone() for t in routing["last"]),
            )
            self._plan = self._build_plan(self._log.win_counts.device)
