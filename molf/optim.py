"""MoLF AdamW: universal moment tracking, gradient-guided routing, winner-only updates.

Every step, for every wrapped module: the Adam moments of **all** experts advance; each expert is
scored from its raw moments (``molf.router``); the top-k win (ties: the lower index; a NaN never wins);
winners alone take the decoupled AdamW update. Plain groups (embeddings, norms) take a dense AdamW step.
Shaped as torch's Adam: the class keeps settings (``score``, ``impl``, ``topk`` are group settings,
checkpointed as torch's ``foreach``), state and checkpoints; ``molf.groups`` checks settings,
``molf.plan`` routes, ``molf.readback`` tells what the routing did, ``molf.functional`` holds the
arithmetic, one function per ``impl``. Rules where the paper is silent: docs/method.md.
"""
from __future__ import annotations

import functools

import torch

from . import _compiled, functional, groups
from .functional import IMPLEMENTATIONS, ParamBatch
from .groups import IMPLS  # noqa: F401 (molf.optim.IMPLS)
from .plan import StepRouter, molf_groups
from .readback import RoutingReadback
from .router import Score

DEFAULT_BETAS = (0.9, 0.999)  # Adam's (beta1, beta2), as torch.optim.AdamW; the one source in molf
DEFAULT_EPS = 1e-8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (FSDP2 parameters, grads, state); other tensors as they are."""
    return t.to_local() if hasattr(t, "to_local") else t


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW that routes each module's update to its top-k experts.

    params        groups from ``molf.param_groups(model, lr_fft, lr_lora, ...)``; plain groups (no
                  ``molf_module`` key) and plain parameter lists train as ordinary AdamW.
    score         ``"epd"`` (paper Eq. 10, default), ``"pfn"`` (Eq. 11), a registered name (any case), a
                  ``molf.router.Score`` or any callable ``score(RouterStats) -> Tensor[n_experts]``.
    topk          experts updated per module (the paper: 1); all of them: the dense "no routing" ablation.
    betas, eps    Adam's, as torch's AdamW (``eps > 0``); lr, weight_decay: defaults for the groups.
    process_group the group whose ranks each hold a shard of every expert (FSDP); score sums are
                  all-reduced over it. Detected automatically for DTensor (FSDP2) parameters.
    impl          ``"auto"`` (default), ``"chunked"``, ``"compiled"`` (C++ kernels, built on first use),
                  ``"foreach"`` or ``"masked"`` (``molf.functional``); all give the same decisions.

    After each ``step()``: ``last_decisions`` (module -> winning experts; empty: skipped or no gradient),
    ``last_scores`` (module -> {expert: score}, NaN: not scored), ``win_counts``, ``nonfinite_skips``
    (module-steps without a winner for a NaN/inf score or gradient) and ``nonfinite_grad_skips``
    (module- and plain-parameter-steps skipped whole for a NaN/inf gradient); ``state_dict()`` carries them.
    """

    def __init__(self, params, score="epd", topk: int = 1, betas=DEFAULT_BETAS, eps: float = DEFAULT_EPS,
                 lr: float | None = None, weight_decay: float = 0.0, process_group=None, impl: str = "auto"):
        self._scores = groups.Scores()   # names -> callables, those given here too
        self._router = StepRouter(process_group)
        self._readback = RoutingReadback([])   # regridded to the modules at each step
        self._skips = functional.DeferredSkips()  # the masked path's step counters to give back
        self._scratch = functional.Scratch()
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "topk": topk,
                    "score": self._scores.adopt(score), "impl": impl}
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- groups and their settings
    def add_param_group(self, group: dict) -> None:
        """torch's, with every setting checked (before anything changes); allowed after steps too: the
        new modules are routed from the next step on, and the routing counters grow to hold them."""
        n = len(self.param_groups)
        super().add_param_group(group)
        try:
            self.param_groups[-1].update(groups.checked(self.param_groups[-1], self._scores))
            groups.check_together(self.param_groups)
        except BaseException:
            del self.param_groups[n:]
            raise
        self._router.reset()

    score_name = property(lambda self: self.param_groups[0]["score"], doc="The score's name (every group's).")
    score_fn = property(lambda self: self._scores(self.score_name), doc="The score itself.")
    impl = property(lambda self: self.param_groups[0]["impl"], doc="How a step is computed (every group's).")
    process_group = property(lambda self: self._router.process_group)

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._skips.settle()
        batch = self._collect()  # checks dtypes; creates no state
        device = batch.grads[0].device if batch else self.param_groups[0]["params"][0].device
        plan = self._router.plan_for(self.param_groups, device)
        readback = self._readback.regrid(plan.layout).to(device)  # kept once nothing can fail
        if not batch:  # no gradient anywhere: nothing routed, no winner
            self._readback = readback
            readback.record_no_routing()
            return loss
        created = self._init_state(batch)
        try:  # everything that can fail, before anything changes
            impl = self._impl_for(batch, device)
            self._router.check_score(batch, device, self.score_fn, self.score_name, impl)
        except BaseException:
            for p in created:
                del self.state[p]
            raise
        self._readback = readback
        gate = self._router.gate(batch, device, readback,
                                 in_kernels=impl == "compiled" and not self._router.shared_experts)
        if impl == "masked":  # step counters advance on the host; the skipped ones are given back later
            torch._foreach_add_(batch.steps, 1.0)
            batch.ok = gate.param_ok
            self._skips.expect(batch.steps, gate.param_ok)
        else:
            keep = gate.param_ok.tolist()
            if not all(keep):
                batch = batch.subset([i for i, k in enumerate(keep) if k])
            if batch.steps:
                torch._foreach_add_(batch.steps, 1.0)
        functional.bias_corrections(batch)
        if impl == "compiled":  # the kernels check module by module
            batch.module_of = [plan.param_module[id(batch.params[i])] for i in batch.molf_index]
        route = functools.partial(self._router.route, batch=batch, device=device, gate=gate, readback=readback,
                                  score=self.score_fn, score_name=self.score_name)
        skipped = IMPLEMENTATIONS[impl](batch, route, score=self.score_fn, scratch=self._scratch)
        if skipped is not None:  # the compiled path: give the skipped parameters their step counter back
            for i in skipped.params:
                batch.steps[i] -= 1
            readback.grad_skips += skipped.count
        return loss

    def _impl_for(self, batch: ParamBatch, device: torch.device) -> str:
        impl, score = self.impl, self.score_fn
        if impl == "auto":
            if device.type != "cpu":
                return "masked"
            return "chunked" if isinstance(score, Score) and batch.contiguous else "foreach"
        if impl == "compiled" and device.type != "cpu":
            raise ValueError(f"impl='compiled' is a CPU path (it reads the decisions back); on {device.type} "
                             f"use impl='auto' (the masked path: no host sync)")
        if impl in ("chunked", "compiled") and not batch.contiguous:
            raise ValueError(f"impl={impl!r} walks flat views of every tensor and needs contiguous parameters, "
                             "gradients and state; use impl='auto' or 'foreach' for non-contiguous ones")
        if impl == "compiled" and not _compiled.available(score):
            return "chunked"  # no cpp_term, or the kernels could not be built (said once on the molf logger)
        return impl

    def _collect(self) -> ParamBatch:
        """Every parameter with a gradient (in group order) and its hyper-parameters, read at every step
        (schedulers move learning rates). Unsupported dtypes fail here, before any state exists."""
        b = ParamBatch()
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MoLFAdamW does not support sparse gradients")
                if p.dtype not in SUPPORTED_DTYPES:
                    where = f"module {group['molf_module']!r}" if "molf_module" in group else "a plain parameter group"
                    raise TypeError(
                        f"MoLFAdamW supports float32, bfloat16 and float64 parameters, got {p.dtype} (a "
                        f"parameter of shape {tuple(p.shape)} in {where}). In float16 eps=1e-8 rounds to 0 "
                        f"and the moments underflow, so every score would be NaN and nothing would train: "
                        f"keep float32 weights under torch.autocast(dtype=torch.float16), or use bfloat16")
                if "molf_module" in group:
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
        self._router.sharded = any(hasattr(p, "to_local") for p in b.params)
        return b

    def _init_state(self, batch: ParamBatch) -> list:
        """Fill in the batch's state (created on first use, as torch's AdamW); return the new ones."""
        created = []
        for p in batch.params:
            st = self.state[p]
            if not st:
                created.append(p)
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            batch.local_params.append(_local(p))
            batch.exp_avgs.append(_local(st["exp_avg"]))
            batch.exp_avg_sqs.append(_local(st["exp_avg_sq"]))
            batch.steps.append(st["step"])
        return created

    # ---------------------------------------------------------------- the routing, read back (molf.readback)
    last_decisions = property(lambda self: self._readback.last_decisions(),
                              doc="Module name -> winning experts of the last step (empty: skipped, no gradient).")
    last_scores = property(lambda self: self._readback.last_scores(),
                           doc="Module name -> {expert: score} of the last step (NaN: not scored).")
    win_counts = property(lambda self: self._readback.win_table(), doc="Module name -> {expert: steps won}.")
    nonfinite_skips = property(lambda self: int(self._readback.skips),
                               doc="Module-steps without a winner for a NaN/inf score or gradient.")
    nonfinite_grad_skips = property(lambda self: int(self._readback.grad_skips),
                                    doc="Module- and plain-parameter-steps skipped whole for a NaN/inf gradient.")

    def routing_snapshot(self) -> tuple[dict, dict]:
        """``(last_decisions, last_scores)`` with a single device-to-host copy (for logging)."""
        return self._readback.snapshot()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        self._skips.settle()
        sd = super().state_dict()
        sd["molf"] = self._readback.state_dict() if self._readback.layout else None
        return sd

    def __getstate__(self):  # copy.deepcopy and pickle: torch keeps only groups and state; add our own
        self._skips.settle()
        return {**super().__getstate__(), "_scores": self._scores, "_readback": self._readback}

    def __setstate__(self, state: dict) -> None:  # torch's load_state_dict calls it too: keep what we have
        scores, readback = state.pop("_scores", None), state.pop("_readback", None)
        super().__setstate__(state)
        if scores is not None:  # a copy or an unpickled optimizer: rebuild what is not state
            self._scores, self._readback, self._router = scores, readback, StepRouter(None)
            self._skips, self._scratch = functional.DeferredSkips(), functional.Scratch()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, after checking that the checkpoint fits: the same modules (by name), experts,
        parameter counts and shapes; ``ValueError`` naming the first mismatch, before anything changes.
        ``score``, ``impl`` and ``topk`` come from the checkpoint (where older ones lack them: as now)."""
        state_dict = dict(state_dict)
        routing = state_dict.pop("molf", None)
        groups.check_checkpoint(self.param_groups, state_dict)
        loaded = [groups.checked({**current, **saved}, self._scores)
                  for current, saved in zip(self.param_groups, state_dict["param_groups"])]
        groups.check_together(loaded)
        readback = RoutingReadback([])
        if routing and routing.get("win_counts") is not None:
            layout = [(g["molf_module"], tuple(g["experts"])) for g in molf_groups(loaded)]
            readback = RoutingReadback.from_state_dict(routing, layout)
        state_dict["param_groups"] = loaded
        super().load_state_dict(state_dict)
        for st in self.state.values():  # torch casts state to the parameter's device; AdamW keeps steps on the CPU
            if isinstance(st, dict) and isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].detach().to("cpu", torch.float32)
        self._router.reset()
        self._skips.pending = None  # the loaded counters are the truth
        self._readback = readback
