"""The methods of the regime map, and the training of all runs of one method as one model (``Members``)."""
import copy
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

import molf

from .. import engine
from .setting import METHODS, ROUTED, Setting, Task, batch_indices, seeded_generator


# ---------------------------------------------------------------------------- the methods
def build_member(method: str, base: nn.Module, setting: Setting, seed: int = 0) -> nn.Module:
    """A trainable copy of ``base`` for ``method`` (the base itself is not touched). The adapters' random
    init (LoRA's ``A``) is drawn from ``seed``, not from the global generator, so a run is the same
    whether it trains alone or among others."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seeded_generator("member", method, seed).initial_seed()))
        return _build_member(method, copy.deepcopy(base), setting)


def _build_member(method: str, net: nn.Module, setting: Setting) -> nn.Module:
    if method == "fft":
        return net
    if method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=setting.lora_rank, lora_alpha=setting.lora_alpha, target_modules=["0", "2"],
                            lora_dropout=0.0, use_rslora=True, use_dora=method == "dora", bias="none")
        return get_peft_model(net, config)
    if method in ("molf", "molf_dense"):
        return molf.wrap(net, ranks=(setting.lora_rank,), alphas=(setting.lora_alpha,), exclude=())
    if method == "molf_e":
        return molf.wrap(net, ranks=setting.efficient_ranks, alphas=setting.efficient_alphas, exclude=(),
                         train_base=False)
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")


@dataclass(frozen=True)
class Config:
    """One run of a method: its learning rate(s). Single methods use ``lr``; MoLF uses both."""

    lr_fft: float
    lr_lora: float

    @property
    def label(self) -> str:
        return f"{self.lr_fft:g}/{self.lr_lora:g}"


def configs(method: str, grid: dict) -> list[Config]:
    """The learning-rate configurations of ``method`` in ``grid`` (see ``DEFAULT_GRID``)."""
    if method == "fft":
        return [Config(lr, lr) for lr in grid["fft"]]
    if method in ("lora", "dora", "molf_e"):
        return [Config(lr, lr) for lr in grid[method]]
    if method in ("molf", "molf_dense"):
        return [Config(a, b) for a, b in itertools.product(grid["molf_fft"], grid["molf_lora"])]
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")


DEFAULT_GRID = {
    "fft": (3e-4, 1e-3, 3e-3),
    "lora": (1e-3, 3e-3, 1e-2, 3e-2),
    "dora": (1e-3, 3e-3, 1e-2, 3e-2),
    "molf_e": (1e-3, 3e-3, 1e-2),
    "molf_fft": (3e-4, 1e-3, 3e-3),
    "molf_lora": (1e-3, 3e-3, 1e-2),
}


# ---------------------------------------------------------------------------- many runs as one model
class _Block(nn.Module):
    """Members of one architecture and one optimizer setting, run with one vmapped forward.

    ``stacked=True``: each parameter of all members is one ``[S, ...]`` tensor (Adam acts per element,
    so this trains each member exactly as alone, with one optimizer tensor instead of S).
    ``stacked=False``: the members stay separate modules (MoLF routes per module), and their parameters
    are stacked at every forward."""

    def __init__(self, members: Sequence[nn.Module], stacked: bool):
        super().__init__()
        if any(True for m in members for _ in m.buffers()):
            raise ValueError("members with buffers are not supported")
        self.size = len(members)
        self.stacked = stacked
        self._template = [copy.deepcopy(members[0]).to("meta")]  # a list: not a submodule
        self.names = [n for n, _ in members[0].named_parameters()]
        per_name = {n: [dict(m.named_parameters())[n] for m in members] for n in self.names}
        self.trainable = {n: per_name[n][0].requires_grad for n in self.names}
        self.frozen = {}
        for i, n in enumerate(self.names):
            if not self.trainable[n]:
                self.register_buffer(f"frozen{i}", torch.stack([p.detach() for p in per_name[n]]))
        if stacked:
            self.weights = nn.ParameterList(
                nn.Parameter(torch.stack([p.detach() for p in per_name[n]])) for n in self.names if self.trainable[n])
        else:
            self.members = nn.ModuleList(members)
            self._lists = [per_name[n] for n in self.names if self.trainable[n]]

    def stacked_parameters(self) -> dict:
        out, trained = {}, iter(self.weights if self.stacked else [torch.stack(ps) for ps in self._lists])
        for i, n in enumerate(self.names):
            out[n] = next(trained) if self.trainable[n] else getattr(self, f"frozen{i}")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        template = self._template[0]
        return vmap(lambda p, xb: functional_call(template, p, (xb,)))(self.stacked_parameters(), x)


class Members(nn.Module):
    """Independent networks trained as one model: ``forward(x)`` maps ``[S, B, d]`` to ``[S, B, d]``,
    row s through member s (blocks in order)."""

    def __init__(self, blocks: Sequence[_Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.sizes = [b.size for b in blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(part) for b, part in zip(self.blocks, x.split(self.sizes))])


def member_loss(model: nn.Module, batch) -> torch.Tensor:
    """The engine's loss: each member's MSE on its own batch, summed over members (so each member's
    gradient is that of its own loss)."""
    x, y = batch
    return (model(x) - y).pow(2).mean(dim=(1, 2)).sum()


# ---------------------------------------------------------------------------- training one method
@dataclass
class Trained:
    """What one ``train`` call measured, one entry per member (in the order given)."""

    val: np.ndarray                  # best validation MSE over the checks
    test: np.ndarray                 # test MSE at that check
    best_step: np.ndarray            # the step of that check
    fft_share: np.ndarray            # routed methods: share of decisions won by the first expert; else NaN
    decisions: np.ndarray | None     # routed methods, when recorded: [steps, S, modules] first expert won
    seconds: float


class _Checks(engine.Callback):
    """Validation checks every ``check_every`` steps: keep each member's best validation loss and its
    test loss at that check."""

    def __init__(self, model, x_val, y_val, x_test, y_test, check_every):
        self.model, self.check_every = model, check_every
        self.x_val, self.y_val, self.x_test, self.y_test = x_val, y_val, x_test, y_test
        S = x_val.shape[0]
        self.best_val = torch.full((S,), math.inf, dtype=torch.float64)
        self.test = torch.full((S,), math.nan, dtype=torch.float64)
        self.best_step = torch.full((S,), -1, dtype=torch.long)

    @torch.no_grad()
    def on_step(self, loop):
        if (loop.step + 1) % self.check_every:
            return
        val = (self.model(self.x_val) - self.y_val).pow(2).mean(dim=(1, 2)).double()
        test = (self.model(self.x_test) - self.y_test).pow(2).mean(dim=(1, 2)).double()
        better = val < self.best_val   # a NaN never counts as better
        self.best_val = torch.where(better, val, self.best_val)
        self.test = torch.where(better, test, self.test)
        self.best_step = torch.where(better, torch.full_like(self.best_step, loop.step + 1), self.best_step)


class _Routing(engine.Callback):
    """Per step, for every module of every routed member: did its first expert (MoLF: ``fft``) win?"""

    def __init__(self, optimizer, module_first: list[tuple[str, str]]):
        self.optimizer, self.module_first = optimizer, module_first
        self.rows = []

    def on_step(self, loop):
        decisions, _ = self.optimizer.routing_snapshot()
        self.rows.append([first in decisions.get(m, ()) for m, first in self.module_first])


def train(method: str, tasks: Sequence[Task], runs: Sequence[tuple[int, Config]], setting: Setting = Setting(),
          record_routing: bool = False) -> Trained:
    """Train ``method`` once per ``(task index, Config)`` in ``runs``, all as members of one model,
    through ``molf.lab.engine.fit``. Returns every member's best validation loss, its test loss, and
    (MoLF variants) its routing."""
    return train_methods(tasks, {method: runs}, setting, record_routing)[method]


def train_methods(tasks: Sequence[Task], plan: dict, setting: Setting = Setting(),
                  record_routing: bool = False) -> dict[str, Trained]:
    """Train every ``method: runs`` of ``plan`` (runs: ``(task index, Config)`` pairs) as members of ONE
    model in one ``engine.fit``: Adam-only methods as stacked blocks (one per learning rate), each routed
    method as one block of separate members; one optimizer (``MoLFAdamW`` when a method is routed: its
    plain groups are AdamW, and each MoLF module group carries its method's top-k). Returns a ``Trained``
    per method, its entries in the order of its runs."""
    if not plan:
        raise ValueError("no runs to train")
    for method, runs in plan.items():
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
        if not runs:
            raise ValueError(f"no runs to train for {method!r}")
        for t, _ in runs:
            if not 0 <= t < len(tasks):
                raise ValueError(f"task index {t} is out of range for {len(tasks)} tasks")
    began = time.perf_counter()
    any_routed = any(m in ROUTED for m in plan)
    blocks, groups, module_first, task_of, where = [], [], [], [], {}
    for method, runs in plan.items():
        routed = method in ROUTED
        # Adam-only methods: one stacked block per learning rate; a routed method: one block of members
        order = list(range(len(runs))) if routed else \
            sorted(range(len(runs)), key=lambda i: (runs[i][1].lr_fft, runs[i][1].lr_lora))
        first_member = len(task_of)
        where[method] = (first_member, order)
        members = [build_member(method, tasks[runs[i][0]].base, setting, tasks[runs[i][0]].seed) for i in order]
        task_of += [runs[i][0] for i in order]
        if routed:
            blocks.append(_Block(members, stacked=False))
            first = "lora0" if method == "molf_e" else "fft"
            for j, (i, member) in enumerate(zip(order, members)):
                cfg = runs[i][1]
                for g in molf.param_groups(member, lr_fft=cfg.lr_fft, lr_lora=cfg.lr_lora, wd_fft=0.0, wd_lora=0.0):
                    if "molf_module" in g:
                        g["molf_module"] = f"{method}/{first_member + j}.{g['molf_module']}"
                        g["topk"] = 2 if method == "molf_dense" else 1
                        module_first.append((g["molf_module"], first))
                    groups.append(g)
        else:
            for key, idx in itertools.groupby(range(len(order)), key=lambda j: runs[order[j]][1]):
                block = _Block([members[j] for j in idx], stacked=True)
                blocks.append(block)
                groups.append({"params": list(block.weights), "lr": key.lr_fft if method == "fft" else key.lr_lora,
                               "weight_decay": 0.0})
    if any_routed:
        optimizer = molf.MoLFAdamW(groups, impl=setting.impl)
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0, foreach=True)
    model = Members(blocks)

    used = sorted(set(task_of))
    offsets, start = {}, 0
    for t in used:
        offsets[t] = start
        start += tasks[t].cell.examples
    x_all = torch.cat([tasks[t].x for t in used])
    y_all = torch.cat([tasks[t].y for t in used])
    indices = {t: batch_indices(tasks[t], setting) + offsets[t] for t in used}
    rows = torch.stack([indices[t] for t in task_of], dim=1)            # [steps, S, B]

    def batches(step):
        r = rows[step]
        return [(x_all[r], y_all[r])]

    def stack(attr):
        return torch.stack([getattr(tasks[t], attr) for t in task_of])

    checks = _Checks(model, stack("x_val"), stack("y_val"), stack("x_test"), stack("y_test"), setting.check_every)
    callbacks = [checks]
    routing = None
    if any_routed and record_routing:
        routing = _Routing(optimizer, module_first)
        callbacks.append(routing)
    engine.fit(model, optimizer, batches, steps=setting.steps, loss_fn=member_loss, callbacks=callbacks)

    wins_of = optimizer.win_counts if any_routed else {}
    decisions_all = np.asarray(routing.rows, dtype=bool) if routing is not None else None
    out, seconds = {}, time.perf_counter() - began
    for method in plan:
        first_member, order = where[method]
        S = len(order)
        back = np.empty(S, dtype=np.int64)
        back[np.asarray(order)] = np.arange(S)   # block position of run i
        members = first_member + back
        share = np.full(S, np.nan)
        decisions = None
        if method in ROUTED:
            first = "lora0" if method == "molf_e" else "fft"
            won, total = np.zeros(S), np.zeros(S)
            for name, wins in wins_of.items():
                m, rest = name.split("/", 1)
                if m != method:
                    continue
                j = int(rest.split(".", 1)[0]) - first_member
                won[j] += wins.get(first, 0)
                total[j] += sum(wins.values())
            per_step = 2 if method == "molf_dense" else 1
            share = (won / np.maximum(total / per_step, 1))[back]
            if decisions_all is not None:
                columns = [k for k, (name, _) in enumerate(module_first) if name.startswith(method + "/")]
                block = decisions_all[:, columns]
                decisions = block.reshape(block.shape[0], S, -1)[:, back]
        out[method] = Trained(val=checks.best_val.numpy()[members], test=checks.test.numpy()[members],
                              best_step=checks.best_step.numpy()[members], fft_share=share,
                              decisions=decisions, seconds=seconds)
    return out
