"""The regime map: a controlled setting where LoRA wins, FFT wins, and MoLF's router is seen choosing.

The setting (one *task* per cell and seed):

- a "pretrained" base network ``Linear(d, h) -> tanh -> Linear(h, d)`` (PyTorch's default init, drawn
  from the seed);
- the fine-tuning target: the same network with each weight shifted by ``U @ V`` of rank ``k``
  (Gaussian factors), scaled to ``shift_scale`` x that weight's Frobenius norm; biases unchanged;
- ``n`` training inputs ``x ~ N(0, I)`` with the target's outputs plus Gaussian noise of
  ``noise`` x their RMS; clean validation and test inputs (the validation set picks each method's
  learning rate and the checkpoint, the test set gives the reported held-out loss).

Every method starts from the base network: FFT (plain AdamW on everything), LoRA and DoRA (peft, rank
``lora_rank``, alpha ``lora_alpha``, rsLoRA scale, base frozen), MoLF (``molf.wrap`` with one LoRA
expert of the same rank, ``MoLFAdamW`` top-1), dense top-2 (the same, every expert updated every step)
and MoLF-Efficient (two LoRA experts, frozen base). No weight decay anywhere, no gradient clipping.

Speed: the runs of one method (every cell, seed and learning rate) train *together* as independent
members of one model (``Members``), through the lab's one loop (``molf.lab.engine.fit``): the summed
loss gives each member exactly its own gradient; Adam and MoLF's per-module routing act per parameter
and per module, so each member trains as it would alone (``tests/test_regime.py`` checks this against a
single-member run). The forward is one ``torch.func.vmap`` of the member network's own forward
(``functional_call``), so peft's DoRA and ``MoLFLinear`` compute as they always do.

    python -m molf.lab.regime --claims                 # run the map, print it and the claim lines
    python -m molf.lab.regime --claims --from results/regime_map.csv   # from a saved map
    python -m molf.lab.regime --slice --claims         # the small regression slice, and its claim lines
    python -m molf.lab.regime --transformer            # the same question in the tiny causal LM
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, vmap

import molf

from . import engine, stats

METHODS = ("fft", "lora", "dora", "molf", "molf_dense", "molf_e")
SINGLE_METHODS = ("fft", "lora", "dora")   # the methods the map's winner is chosen from
ROUTED = ("molf", "molf_dense", "molf_e")  # trained by MoLFAdamW
LABELS = {"fft": "FFT", "lora": "LoRA", "dora": "DoRA", "molf": "MoLF (tuned)", "molf_fixed": "MoLF (fixed)",
          "molf_dense": "dense top-2", "molf_e": "MoLF-E"}


# ---------------------------------------------------------------------------- the setting
@dataclass(frozen=True)
class Cell:
    """One point of the map: the shift's rank, the number of training examples, the noise level."""

    shift_rank: int
    examples: int
    noise: float = 0.1

    def __post_init__(self):
        for name in ("shift_rank", "examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise!r}")

    @property
    def label(self) -> str:
        return f"k={self.shift_rank} n={self.examples} noise={self.noise:g}"


@dataclass(frozen=True)
class Setting:
    """Everything but the cell: the network, the shift's size, the data sizes, the training budget and
    the adapters' settings."""

    width: int = 64              # inputs and outputs
    hidden: int = 128
    shift_scale: float = 0.5     # ||U V|| = shift_scale * ||W|| for each weight
    n_val: int = 256             # clean validation inputs (lr and checkpoint choice)
    n_test: int = 256            # clean test inputs (the reported loss)
    steps: int = 300
    batch_size: int = 32
    check_every: int = 25        # validation checks (the best one is kept)
    lora_rank: int = 4
    lora_alpha: float = 8.0
    efficient_ranks: tuple = (4, 16)          # MoLF-E's two LoRA experts
    efficient_alphas: tuple = (8.0, 16.0)     # equal rsLoRA scales (4 and 4)
    impl: str = "auto"           # MoLFAdamW's implementation ("compiled": the C++ kernels)

    def __post_init__(self):
        for name in ("width", "hidden", "n_val", "n_test", "steps", "batch_size", "check_every", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("shift_scale", "lora_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.check_every > self.steps:
            raise ValueError(f"check_every={self.check_every} exceeds steps={self.steps}: no check would run")


def _generator(*key) -> torch.Generator:
    """A generator seeded from a tuple of ints/strings, the same in every process."""
    text = "/".join(str(k) for k in key)
    seed = 0
    for ch in text.encode():
        seed = (seed * 131 + ch) % (2 ** 61 - 1)
    return torch.Generator().manual_seed(seed)


def base_network(seed: int, setting: Setting) -> nn.Sequential:
    """The seed's "pretrained" network (nn.Linear's default init, drawn from the seed)."""
    g = _generator("base", seed)
    net = nn.Sequential(nn.Linear(setting.width, setting.hidden), nn.Tanh(), nn.Linear(setting.hidden, setting.width))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=g)
            bound = 1 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=g)
    return net


def shifted(base: nn.Sequential, rank: int, seed: int, scale: float) -> nn.Sequential:
    """``base`` with each weight moved by a rank-``rank`` Gaussian ``U @ V`` of norm ``scale * ||W||``."""
    target = copy.deepcopy(base)
    g = _generator("shift", seed, rank)
    with torch.no_grad():
        for layer in (target[0], target[2]):
            out_f, in_f = layer.weight.shape
            if rank > min(out_f, in_f):
                raise ValueError(f"shift_rank={rank} exceeds the rank a {out_f}x{in_f} weight can have "
                                 f"(at most {min(out_f, in_f)})")
            delta = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)
            layer.weight += delta * (scale * layer.weight.norm() / delta.norm())
    return target


@dataclass
class Task:
    """One cell at one seed: the base network and the data (inputs ``x``, outputs ``y``)."""

    cell: Cell
    seed: int
    base: nn.Sequential
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    base_test_loss: float        # the untouched base network's test MSE (the loss of doing nothing)


def make_task(cell: Cell, seed: int, setting: Setting = Setting()) -> Task:
    base = base_network(seed, setting)
    target = shifted(base, cell.shift_rank, seed, setting.shift_scale)
    g = _generator("data", seed, cell.examples)
    x = torch.randn(cell.examples, setting.width, generator=g)
    x_val = torch.randn(setting.n_val, setting.width, generator=_generator("val", seed))
    x_test = torch.randn(setting.n_test, setting.width, generator=_generator("test", seed))
    with torch.no_grad():
        y_clean = target(x)
        rms = y_clean.pow(2).mean().sqrt()
        noise = torch.randn(y_clean.shape, generator=_generator("noise", seed, cell.examples))
        y = y_clean + cell.noise * rms * noise
        y_val, y_test = target(x_val), target(x_test)
        base_loss = float((base(x_test) - y_test).pow(2).mean())
    return Task(cell, seed, base, x, y, x_val, y_val, x_test, y_test, base_loss)


def batch_indices(task: Task, setting: Setting) -> torch.Tensor:
    """The ``steps x batch_size`` example indices of the task's training run (drawn uniformly with
    replacement from the task's seed, so every method and learning rate sees the same batches)."""
    g = _generator("batches", task.seed, task.cell.examples)
    return torch.randint(0, task.cell.examples, (setting.steps, setting.batch_size), generator=g)


# ---------------------------------------------------------------------------- the methods
def build_member(method: str, base: nn.Module, setting: Setting, seed: int = 0) -> nn.Module:
    """A trainable copy of ``base`` for ``method`` (the base itself is not touched). The adapters' random
    init (LoRA's ``A``) is drawn from ``seed``, not from the global generator, so a run is the same
    whether it trains alone or among others."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_generator("member", method, seed).initial_seed()))
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


# ---------------------------------------------------------------------------- routing settles early? (claim 4)
def agreement_at(decisions: np.ndarray, fraction: float = 0.1, final_fraction: float = 0.5) -> np.ndarray:
    """``decisions``: ``[steps, members, modules]`` (first expert won). Per member: the share of its
    modules whose winner at ``fraction`` of training equals their most frequent winner over the last
    ``final_fraction`` of training (ties: the winner of the last step), as
    ``molf.lab.analysis.agreement_with_final`` defines it."""
    steps = decisions.shape[0]
    if steps < 2:
        raise ValueError(f"need at least 2 steps of decisions, got {steps}")
    at = min(steps - 1, int(round(fraction * (steps - 1))))
    tail = decisions[int(math.floor(steps * (1.0 - final_fraction))):]
    won = tail.mean(axis=0)
    final = np.where(won == 0.5, tail[-1], won > 0.5)
    return (decisions[at] == final).mean(axis=-1)


def shuffled_agreement(decisions: np.ndarray, fraction: float = 0.1, shuffles: int = 50,
                       seed: int = 0) -> np.ndarray:
    """The same agreement when each module's decisions are shuffled in time (the null of no early
    settling: the same win counts, no order); mean over ``shuffles`` shuffles, per member."""
    rng = np.random.default_rng(seed)
    steps, members, modules = decisions.shape
    total = np.zeros(members)
    for _ in range(shuffles):
        order = np.argsort(rng.random((steps, members, modules)), axis=0)
        total += agreement_at(np.take_along_axis(decisions, order, axis=0), fraction)
    return total / shuffles


# ---------------------------------------------------------------------------- the map
@dataclass
class MapSpec:
    """The grid of a map: cells, seeds, the learning-rate grid and the methods."""

    cells: tuple
    seeds: int = 20
    setting: Setting = field(default_factory=Setting)
    grid: dict = field(default_factory=lambda: dict(DEFAULT_GRID))
    methods: tuple = METHODS


def default_cells(ranks=(1, 8, 64), examples=(32, 512, 4096), noise=0.1,
                  noise_slice=((1, 512), (64, 512)), noise_levels=(1.0,)) -> tuple:
    """The map's cells: ``ranks x examples`` at ``noise``, plus the noise slice (``noise_levels`` at
    each (rank, examples) of ``noise_slice``)."""
    cells = [Cell(k, n, noise) for k in ranks for n in examples]
    cells += [Cell(k, n, level) for k, n in noise_slice for level in noise_levels]
    return tuple(dict.fromkeys(cells))


MAP = MapSpec(cells=default_cells(), setting=Setting(steps=150, check_every=15, impl="compiled"),
              grid={**DEFAULT_GRID, "dora": (1e-3, 3e-3, 1e-2), "molf_e": (3e-3, 1e-2)})
SLICE = MapSpec(cells=(Cell(1, 64), Cell(32, 64)), seeds=4,
                setting=Setting(steps=120, check_every=20, n_val=128, n_test=128, impl="compiled"),
                grid={"fft": (1e-3, 3e-3), "lora": (3e-3, 1e-2), "dora": (3e-3, 1e-2), "molf_e": (3e-3,),
                      "molf_fft": (3e-4, 3e-3), "molf_lora": (1e-3, 1e-2)})


def run_cell(cell: Cell, spec: MapSpec, methods=None, log=None) -> pd.DataFrame:
    """Every method at every learning rate on ``spec.seeds`` tasks of ``cell``: one row per run
    (cell, seed, method, lr_fft, lr_lora, val, test, best_step, fft_share, base_loss, and for MoLF
    top-1 runs agree10 / agree10_null: routing at 10% of training against the time-shuffled null).
    Dense top-2 runs at the cell's tuned MoLF pair (picked on validation), when MoLF is among
    ``methods``; otherwise at every pair of the grid."""
    methods = tuple(methods or spec.methods)
    setting = spec.setting
    tasks = [make_task(cell, seed, setting) for seed in range(spec.seeds)]
    frames = []
    for method in [m for m in methods if m != "molf_dense"] + (["molf_dense"] if "molf_dense" in methods else []):
        if method == "molf_dense":
            done = pd.concat(frames) if frames else pd.DataFrame()
            mine = done[done["method"] == "molf"] if len(done) else done
            if len(mine):
                best = mine.groupby(["lr_fft", "lr_lora"])["val"].mean().idxmin()
                cfgs = [Config(*best)]
            else:
                cfgs = configs(method, spec.grid)
        else:
            cfgs = configs(method, spec.grid)
        runs = [(t, c) for c in cfgs for t in range(len(tasks))]
        trained = train(method, tasks, runs, setting, record_routing=method == "molf")
        frame = pd.DataFrame({
            "shift_rank": cell.shift_rank, "examples": cell.examples, "noise": cell.noise,
            "seed": [tasks[t].seed for t, _ in runs], "method": method,
            "lr_fft": [c.lr_fft for _, c in runs], "lr_lora": [c.lr_lora for _, c in runs],
            "val": trained.val, "test": trained.test, "best_step": trained.best_step,
            "fft_share": trained.fft_share, "base_loss": [tasks[t].base_test_loss for t, _ in runs]})
        if trained.decisions is not None:
            frame["agree10"] = agreement_at(trained.decisions)
            frame["agree10_null"] = shuffled_agreement(trained.decisions)
        frames.append(frame)
        if log:
            log(f"{cell.label}: {method} {len(runs)} runs in {trained.seconds:.1f} s")
    return pd.concat(frames, ignore_index=True)


def run_map(spec: MapSpec, methods=None, out=None, log=None) -> pd.DataFrame:
    """``run_cell`` for every cell; with ``out`` (a CSV path), rows are appended cell by cell and cells
    already there are not run again (so an interrupted map resumes)."""
    done = pd.read_csv(out) if out is not None and _exists(out) else pd.DataFrame()
    frames = [done] if len(done) else []
    for cell in spec.cells:
        if len(done) and ((done["shift_rank"] == cell.shift_rank) & (done["examples"] == cell.examples)
                          & np.isclose(done["noise"], cell.noise)).any():
            continue
        frame = run_cell(cell, spec, methods, log)
        frames.append(frame)
        if out is not None:
            frame.to_csv(out, mode="a", header=not _exists(out), index=False, float_format="%.6g")
    return pd.concat(frames, ignore_index=True)


def _exists(path) -> bool:
    from pathlib import Path
    return Path(path).exists()


# ---------------------------------------------------------------------------- reading the map
CELL = ["shift_rank", "examples", "noise"]
ROWS = ("fft", "lora", "dora", "molf", "molf_fixed", "molf_dense", "molf_e")


def load(paths) -> pd.DataFrame:
    """The runs of a map from one or more CSV files written by ``run_map``."""
    paths = [paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "open") else list(paths)
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def fixed_pair(runs: pd.DataFrame) -> tuple[float, float]:
    """MoLF's one learning-rate pair for the whole map: the pair whose mean validation loss is, on
    average over cells, closest to the best pair of each cell (mean of log(loss / cell's best))."""
    molf_runs = runs[runs["method"] == "molf"]
    if molf_runs.empty:
        raise ValueError("no MoLF runs in the map: the fixed pair is picked among them")
    means = molf_runs.groupby(CELL + ["lr_fft", "lr_lora"])["val"].mean().rename("val").reset_index()
    means["log_ratio"] = np.log(means["val"] / means.groupby(CELL)["val"].transform("min"))
    pairs = means.groupby(["lr_fft", "lr_lora"])
    complete = pairs["log_ratio"].count() == means.groupby(CELL).ngroups   # a pair run in every cell
    score = pairs["log_ratio"].mean()[complete]
    if score.empty:
        raise ValueError("no MoLF learning-rate pair was run in every cell")
    return tuple(float(v) for v in score.idxmin())


def pick(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, row, seed): each method at the learning rate(s) with the lowest mean
    validation loss in the cell ("molf" tuned per cell), and "molf_fixed": MoLF at ``fixed_pair``."""
    missing = {"method", "lr_fft", "lr_lora", "seed", "val", "test"} - set(runs.columns)
    if missing:
        raise ValueError(f"map runs lack the columns {sorted(missing)}")
    frames = []
    for keys, group in runs.groupby(CELL + ["method"], sort=True):
        method = keys[-1]
        means = group.groupby(["lr_fft", "lr_lora"])["val"].mean()
        lr_fft, lr_lora = means.idxmin()
        frames.append(group[(group["lr_fft"] == lr_fft) & (group["lr_lora"] == lr_lora)].assign(row=method))
    if (runs["method"] == "molf").any():
        lr_fft, lr_lora = fixed_pair(runs)
        fixed = runs[(runs["method"] == "molf") & (runs["lr_fft"] == lr_fft) & (runs["lr_lora"] == lr_lora)]
        frames.append(fixed.assign(row="molf_fixed"))
    return pd.concat(frames, ignore_index=True).sort_values(CELL + ["row", "seed"]).reset_index(drop=True)


def _per_seed(cell_rows: pd.DataFrame, row: str, column: str = "test") -> np.ndarray | None:
    part = cell_rows[cell_rows["row"] == row].sort_values("seed")
    return part[column].to_numpy(dtype=float, copy=True) if len(part) else None


def _beats(winner: np.ndarray, loser: np.ndarray, margin: float = 0.0) -> stats.Comparison:
    """Paired over seeds: loser's loss minus winner's (> 0: the first has the lower loss)."""
    return stats.compare(loser * (1.0 + margin), winner)


def summarize(picked: pd.DataFrame, margin: float = 0.25) -> pd.DataFrame:
    """One row per cell: mean test loss of every row; the winner among FFT, LoRA and DoRA and whether it
    beats the runner-up significantly (paired bootstrap over seeds); LoRA - FFT; MoLF's gap to the
    winner (ratio of mean losses - 1) and whether it is within ``margin`` (paired non-inferiority,
    ``verdict`` of "MoLF's loss < (1 + margin) x the winner's"), tuned and fixed; FFT shares; top-1
    against dense top-2."""
    records = []
    for cell, rows in picked.groupby(CELL, sort=True):
        rec = dict(zip(CELL, cell))
        losses = {row: _per_seed(rows, row) for row in ROWS}
        for row, loss in losses.items():
            rec[row] = float(loss.mean()) if loss is not None else math.nan
        singles = [m for m in SINGLE_METHODS if losses[m] is not None]
        if singles:
            ranked = sorted(singles, key=lambda m: losses[m].mean())
            winner = ranked[0]
            rec["winner"] = winner
            rec["winner_verdict"] = "only one method" if len(ranked) == 1 else \
                stats.verdict(_beats(losses[winner], losses[ranked[1]]))
            rec["runner_up"] = ranked[1] if len(ranked) > 1 else ""
            best = losses[winner]
            for row in ("molf", "molf_fixed"):
                if losses[row] is not None:
                    rec[f"{row}_gap"] = float(losses[row].mean() / best.mean() - 1.0)
                    rec[f"{row}_within"] = stats.verdict(_beats(losses[row], best, margin))
        if losses["fft"] is not None and losses["lora"] is not None:
            c = _beats(losses["lora"], losses["fft"])
            rec["lora_minus_fft"], rec["lora_vs_fft_low"], rec["lora_vs_fft_high"] = -c.diff, -c.high, -c.low
            rec["lora_beats_fft"] = stats.verdict(c)
            rec["fft_beats_lora"] = stats.verdict(_beats(losses["fft"], losses["lora"]))
        for row in ("molf", "molf_fixed", "molf_e"):
            share = _per_seed(rows, row, "fft_share")
            if share is not None:
                rec[f"{row}_share"] = float(np.nanmean(share))
        if losses["molf"] is not None and losses["molf_dense"] is not None:
            rec["top1_beats_dense"] = stats.verdict(_beats(losses["molf"], losses["molf_dense"]))
            rec["dense_beats_top1"] = stats.verdict(_beats(losses["molf_dense"], losses["molf"]))
        tuned = rows[rows["row"] == "molf"]
        if len(tuned):
            rec["molf_pair"] = f"{tuned['lr_fft'].iloc[0]:g}/{tuned['lr_lora'].iloc[0]:g}"
        records.append(rec)
    return pd.DataFrame(records)


def _cells(table: pd.DataFrame, mask) -> str:
    part = table[mask]
    return ", ".join(f"k={r.shift_rank} n={r.examples}" + (f" noise={r.noise:g}" if r.noise != 0.1 else "")
                     for r in part.itertuples()) or "none"


def claim_winner_flips(summary: pd.DataFrame) -> str:
    """Claim 1: LoRA beats FFT (significantly) in some cells and FFT beats LoRA in others."""
    lora = summary["lora_beats_fft"] == "reproduced"
    fft = summary["fft_beats_lora"] == "reproduced"
    if lora.any() and fft.any():
        verdict = "reproduced"
    elif (summary["lora_beats_fft"] == "not reproduced").all() or (summary["fft_beats_lora"] == "not reproduced").all():
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return (f"claim 1 (the winner flips with the regime): {verdict} — LoRA beats FFT in {int(lora.sum())} of "
            f"{len(summary)} cells ({_cells(summary, lora)}); FFT beats LoRA in {int(fft.sum())} "
            f"({_cells(summary, fft)}); paired bootstrap over seeds, 95% CI of the loss difference excludes 0")


def claim_molf_near_best(summary: pd.DataFrame, margin: float, fixed: tuple | None = None) -> str:
    """Claim 2: MoLF's loss within (1 + margin) x the best single method's, in every cell, tuned and
    fixed. Per row: reproduced when every cell's interval says so, not reproduced when one cell's
    interval lies beyond the margin, else inconclusive."""
    parts, verdicts = [], []
    for row in ("molf", "molf_fixed"):
        column = f"{row}_within"
        if column not in summary:
            continue
        v = summary[column]
        verdict = "reproduced" if (v == "reproduced").all() else (
            "not reproduced" if (v == "not reproduced").any() else "inconclusive")
        verdicts.append(verdict)
        worst = summary.loc[summary[f"{row}_gap"].idxmax()]
        name = "tuned per cell" if row == "molf" else (
            f"fixed {fixed[0]:g}/{fixed[1]:g}" if fixed else "fixed")
        parts.append(f"{name}: {verdict}, within in {int((v == 'reproduced').sum())}/{len(v)} cells, beyond "
                     f"in {int((v == 'not reproduced').sum())}, worst {worst[f'{row}_gap']:+.0%} at "
                     f"k={worst['shift_rank']} n={worst['examples']} noise={worst['noise']:g}")
    overall = "reproduced" if verdicts and all(v == "reproduced" for v in verdicts) else (
        "not reproduced" if "not reproduced" in verdicts else "inconclusive")
    return (f"claim 2 (MoLF within {margin:.0%} of the best of FFT/LoRA/DoRA): {overall} — " + "; ".join(parts))


def claim_early_routing(picked: pd.DataFrame, row: str = "molf_fixed") -> str:
    """Claim 4: routing at 10% of training agrees with the final routing more often than when each
    module's decisions are shuffled in time (paired over runs: every cell and seed)."""
    part = picked[picked["row"] == row].dropna(subset=["agree10", "agree10_null"])
    if part.empty:
        return "claim 4 (routing at 10% agrees with the final routing): inconclusive — no routing recorded"
    c = stats.compare(part["agree10"].to_numpy(dtype=float, copy=True),
                      part["agree10_null"].to_numpy(dtype=float, copy=True))
    mixed = part[(part["fft_share"] > 0.02) & (part["fft_share"] < 0.98)]
    mixed_line = ""
    if len(mixed) >= 2:
        m = stats.compare(mixed["agree10"].to_numpy(dtype=float, copy=True),
                          mixed["agree10_null"].to_numpy(dtype=float, copy=True))
        mixed_line = (f"; in the {len(mixed)} runs with mixed routing (FFT share 2-98%): {m.mean_a:.2f} vs "
                      f"{m.mean_b:.2f}, {stats.verdict(m)}")
    return (f"claim 4 (routing at 10% of training agrees with the final routing, MoLF {row.replace('molf_', '')}): "
            f"{stats.verdict(c)} — {c.line('observed', 'time-shuffled null')} runs{mixed_line}")


def claim_top1_vs_dense(summary: pd.DataFrame) -> str:
    """Claim 5: top-1 routing beats a dense top-2 update (both at the cell's tuned MoLF pair)."""
    if "top1_beats_dense" not in summary:
        return "claim 5 (top-1 beats dense top-2): inconclusive — no dense runs"
    top1 = summary["top1_beats_dense"] == "reproduced"
    dense = summary["dense_beats_top1"] == "reproduced"
    n = len(summary)
    verdict = "reproduced" if top1.sum() > n / 2 and not dense.any() else (
        "not reproduced" if (summary["top1_beats_dense"] == "not reproduced").sum() > n / 2 else "inconclusive")
    return (f"claim 5 (top-1 beats dense top-2, at the tuned pair): {verdict} — top-1 better in {int(top1.sum())} "
            f"of {n} cells ({_cells(summary, top1)}), dense better in {int(dense.sum())} ({_cells(summary, dense)})")


def map_table(summary: pd.DataFrame) -> str:
    """The map as text: mean test MSE x 1e3 per row, the winner (* significant), MoLF's gaps and FFT shares."""
    lines = ["  k     n noise |    FFT   LoRA   DoRA |  MoLF-t  MoLF-f  dense  MoLF-E | winner  | gap-t  gap-f | "
             "share-t share-f | tuned pair"]
    for r in summary.itertuples():
        mark = "*" if getattr(r, "winner_verdict", "") == "reproduced" else " "
        cells = [f"{getattr(r, m, math.nan) * 1e3:6.2f}" for m in ("fft", "lora", "dora")]
        molfs = [f"{getattr(r, m, math.nan) * 1e3:7.2f}" for m in ("molf", "molf_fixed", "molf_dense", "molf_e")]
        lines.append(f"{r.shift_rank:3d} {r.examples:5d} {r.noise:5g} | {' '.join(cells)} | {' '.join(molfs)} | "
                     f"{LABELS.get(getattr(r, 'winner', ''), '?'):5s}{mark} | "
                     f"{getattr(r, 'molf_gap', math.nan):+5.0%} {getattr(r, 'molf_fixed_gap', math.nan):+5.0%} | "
                     f"{getattr(r, 'molf_share', math.nan):7.2f} {getattr(r, 'molf_fixed_share', math.nan):7.2f} | "
                     f"{getattr(r, 'molf_pair', '')}")
    return "\n".join(lines)


def claims(runs: pd.DataFrame, margin: float = 0.25) -> list[str]:
    """The claim lines of a map (its runs as ``run_map`` returns them)."""
    picked = pick(runs)
    summary = summarize(picked, margin)
    fixed = fixed_pair(runs) if (runs["method"] == "molf").any() else None
    return [claim_winner_flips(summary), claim_molf_near_best(summary, margin, fixed),
            claim_early_routing(picked), claim_top1_vs_dense(summary)]


# ---------------------------------------------------------------------------- routing over training
def routing_curves(cells: Sequence[Cell], pair: tuple[float, float], seeds: int = 4,
                   setting: Setting = Setting(steps=150, check_every=15)) -> pd.DataFrame:
    """MoLF at one lr pair in each of ``cells``: the share of FFT decisions per step (mean over modules
    and seeds), with the held-out loss. Columns: cell, step, fft_share, test."""
    frames = []
    for cell in cells:
        tasks = [make_task(cell, seed, setting) for seed in range(seeds)]
        trained = train("molf", tasks, [(t, Config(*pair)) for t in range(seeds)], setting, record_routing=True)
        share = trained.decisions.mean(axis=(1, 2))
        frames.append(pd.DataFrame({"cell": cell.label, "step": np.arange(1, len(share) + 1), "fft_share": share,
                                    "test": float(trained.test.mean())}))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------- figures
WINNER_COLORS = {"fft": "#d62728", "lora": "#1f77b4", "dora": "#17becf"}   # the project's palette


def _grid(summary: pd.DataFrame, column: str, noise: float = 0.1) -> pd.DataFrame:
    part = summary[np.isclose(summary["noise"], noise)]
    return part.pivot(index="shift_rank", columns="examples", values=column).sort_index(ascending=False)


def winner_figure(summary: pd.DataFrame, noise: float = 0.1):
    """The winner of each cell among FFT, LoRA and DoRA (colour), its loss ratio to FFT / LoRA, and a
    star when it beats the runner-up significantly; the noise slice beside it."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    slice_ = summary[~np.isclose(summary["noise"], noise)]
    fig, axes = plt.subplots(1, 2 if len(slice_) else 1, figsize=(10 if len(slice_) else 6, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if len(slice_) else [1]})
    ax = axes[0, 0]
    main = summary[np.isclose(summary["noise"], noise)]
    ranks = sorted(main["shift_rank"].unique(), reverse=True)
    ns = sorted(main["examples"].unique())

    def draw(ax, rows, xs, ys, xkey, ykey):
        for r in rows.itertuples():
            x, y = xs.index(getattr(r, xkey)), ys.index(getattr(r, ykey))
            color = WINNER_COLORS.get(r.winner, "#999999")
            significant = r.winner_verdict == "reproduced"
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, color=color, alpha=0.85 if significant else 0.35))
            ratio = r.lora / r.fft
            ax.text(x, y, f"{LABELS[r.winner]}{' *' if significant else ''}\nLoRA/FFT {ratio:.2f}", ha="center",
                    va="center", fontsize=8, color="white" if significant else "black")
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_ylim(len(ys) - 0.5, -0.5)
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])

    draw(ax, main, ns, ranks, "examples", "shift_rank")
    ax.set_xlabel("training examples n")
    ax.set_ylabel("rank k of the weight shift")
    ax.set_title(f"Who wins (lowest held-out MSE), noise {noise:g}")
    if len(slice_):
        ax2 = axes[0, 1]
        both = pd.concat([summary[summary.set_index(["shift_rank", "examples"]).index.isin(
            slice_.set_index(["shift_rank", "examples"]).index) & np.isclose(summary["noise"], noise)], slice_])
        levels = sorted(both["noise"].unique())
        keys = sorted(both["shift_rank"].unique(), reverse=True)
        draw(ax2, both, levels, keys, "noise", "shift_rank")
        ax2.set_xlabel("label noise (x the outputs' RMS)")
        ax2.set_ylabel("rank k of the weight shift")
        ax2.set_title(f"Noise slice, n={int(both['examples'].iloc[0])}")
    fig.legend(handles=[Patch(color=c, label=LABELS[m]) for m, c in WINNER_COLORS.items()]
               + [Patch(color="#cccccc", label="pale: not significant")], loc="lower center", ncol=4,
               bbox_to_anchor=(0.5, -0.06), frameon=False)
    fig.tight_layout()
    return fig


def heat_figure(summary: pd.DataFrame, columns: Sequence[str], titles: Sequence[str], label: str,
                fmt: str = "{:+.0%}", vmin=None, vmax=None, cmap: str = "Reds", noise: float = 0.1):
    """Heatmaps of summary columns over shift rank x examples (one panel per column)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.8), squeeze=False)
    for ax, column, title in zip(axes[0], columns, titles):
        grid = _grid(summary, column, noise)
        image = ax.imshow(grid.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
        ax.set_xlabel("training examples n")
        ax.set_ylabel("rank k of the weight shift")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    return fig


def routing_figure(curves: pd.DataFrame):
    """FFT share of MoLF's decisions per step in each cell of ``routing_curves``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    styles = ["-", "--", ":", "-."]
    for i, (cell, part) in enumerate(curves.groupby("cell", sort=False)):
        ax.plot(part["step"], part["fft_share"], color="#d62728", ls=styles[i % 4], lw=1.8, label=cell)
    ax.axhline(0.5, color="#999999", lw=0.8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of decisions won by FFT (fraction)")
    ax.set_title("MoLF's routing over training (mean over modules and seeds)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- the classroom
CLASSROOM_LRS = {"fft": 1e-3, "lora": 1e-2, "dora": 1e-2}


class Classroom:
    """One cell, every method retrained on a change: FFT, LoRA, DoRA at fixed learning rates
    (``CLASSROOM_LRS``) and MoLF at ``lr_fft`` = FFT's and ``lr_lora = lr_ratio x lr_fft``."""

    def __init__(self, shift_rank: int = 1, examples: int = 256, noise: float = 0.1, lora_rank: int = 4,
                 lr_ratio: float = 1.0, seeds: int = 3, steps: int = 100):
        self.seeds, self.steps = seeds, steps
        self.values = dict(shift_rank=shift_rank, examples=examples, noise=noise, lora_rank=lora_rank, lr_ratio=lr_ratio)
        self._widgets = None
        self.retrain()

    def retrain(self, **changes) -> dict:
        v = {**self.values, **changes}
        if not (isinstance(v["lr_ratio"], (int, float)) and v["lr_ratio"] > 0):
            raise ValueError(f"lr_ratio must be a number > 0, got {v['lr_ratio']!r}")
        setting = Setting(steps=self.steps, check_every=max(1, self.steps // 5), n_val=128, n_test=128,
                          lora_rank=int(v["lora_rank"]), lora_alpha=2.0 * int(v["lora_rank"]))
        cell = Cell(int(v["shift_rank"]), int(v["examples"]), float(v["noise"]))
        began = time.perf_counter()
        tasks = [make_task(cell, seed, setting) for seed in range(self.seeds)]
        lr_fft = CLASSROOM_LRS["fft"]
        plan = {m: [(t, Config(lr, lr)) for t in range(self.seeds)] for m, lr in CLASSROOM_LRS.items()}
        plan["molf"] = [(t, Config(lr_fft, lr_fft * v["lr_ratio"])) for t in range(self.seeds)]
        trained = train_methods(tasks, plan, setting, record_routing=True)   # one model, one fit
        losses = {m: t.test for m, t in trained.items()}
        molf_run = trained["molf"]
        self.values = v
        self.result = {"cell": cell, "losses": {m: float(np.mean(x)) for m, x in losses.items()},
                       "fft_share": float(np.mean(molf_run.fft_share)),
                       "curve": molf_run.decisions.mean(axis=(1, 2)), "seconds": time.perf_counter() - began}
        return self.result

    def frame(self):
        import matplotlib.pyplot as plt

        r = self.result
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
        methods = list(r["losses"])
        colors = [WINNER_COLORS.get(m, "#2ca02c") for m in methods]
        left.bar([LABELS[m].split(" ")[0] for m in methods], [r["losses"][m] * 1e3 for m in methods], color=colors)
        left.set_ylabel("held-out MSE x 1e3")
        left.set_title(f"{r['cell'].label} (mean of {self.seeds} seeds)", fontsize=10)
        right.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], color="#d62728", lw=1.8)
        right.set_ylim(-0.03, 1.03)
        right.set_xlabel("training step")
        right.set_ylabel("MoLF: share won by FFT")
        right.set_title(f"MoLF routing, lr_lora/lr_fft = {self.values['lr_ratio']:g}: FFT share "
                        f"{r['fft_share']:.0%}", fontsize=10)
        fig.tight_layout()
        return fig

    def widget(self):
        """Sliders (retrain on release) and the picture."""
        import ipywidgets as w
        import matplotlib.pyplot as plt
        from IPython.display import display

        if self._widgets is not None:
            return self._widgets["box"]
        wide, style = w.Layout(width="330px"), {"description_width": "initial"}
        v = self.values
        controls = {
            "shift_rank": w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64], value=v["shift_rank"],
                                            description="shift rank k", continuous_update=False, layout=wide, style=style),
            "examples": w.SelectionSlider(options=[32, 64, 128, 256, 512, 1024, 2048, 4096], value=v["examples"],
                                          description="examples n", continuous_update=False, layout=wide, style=style),
            "noise": w.SelectionSlider(options=[0.0, 0.1, 0.3, 1.0], value=v["noise"], description="noise",
                                       continuous_update=False, layout=wide, style=style),
            "lora_rank": w.SelectionSlider(options=[1, 2, 4, 8, 16], value=v["lora_rank"], description="LoRA rank",
                                           continuous_update=False, layout=wide, style=style),
            "lr_ratio": w.SelectionSlider(options=[0.1, 0.3, 1.0, 3.0, 10.0], value=v["lr_ratio"],
                                          description="lr_lora / lr_fft", continuous_update=False, layout=wide,
                                          style=style),
        }
        info, out = w.HTML(), w.Output()

        def redraw():
            r = self.result
            best = min(("fft", "lora", "dora"), key=lambda m: r["losses"][m])
            info.value = (f"<b>{LABELS[best]}</b> wins this cell; MoLF {r['losses']['molf'] * 1e3:.2f} vs best "
                          f"{r['losses'][best] * 1e3:.2f} (x1e3), FFT share {r['fft_share']:.0%}; retrained in "
                          f"{r['seconds']:.1f} s")
            fig = self.frame()
            with out:
                out.clear_output(wait=True)
                display(fig)
            plt.close(fig)

        def retrain(*_):
            self.retrain(**{k: c.value for k, c in controls.items()})
            redraw()

        for control in controls.values():
            control.observe(retrain, names="value")
        redraw()
        box = w.VBox([w.HTML("<b>Classroom</b>: move a slider; every method retrains on this cell and the picture "
                             "redraws"),
                      w.HBox([controls["shift_rank"], controls["examples"], controls["noise"]]),
                      w.HBox([controls["lora_rank"], controls["lr_ratio"]]), info, out])
        self._widgets = {"box": box, "info": info, "out": out, **controls}
        return box


# ---------------------------------------------------------------------------- the same question in a transformer
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def transformer_check(shift_ranks=(1, 32), seeds: int = 5, steps: int = 150, examples: int = 256, vocab: int = 256,
                      seq_len: int = 16, batch_size: int = 16, noise: float = 0.1,
                      lrs=None, log=None) -> pd.DataFrame:
    """The map's experiment in the shipped tiny causal LM (``molf.lab.models.load("tiny")``: a 2-layer
    random Llama, hidden 64), as a regression on its logits.

    The base: the tiny model with its head cut to the first ``vocab`` tokens. The target: each of its
    block linears (``BLOCK_LINEARS``) shifted by a rank-k Gaussian ``U @ V`` of half the weight's norm.
    Data: ``examples`` random token sequences (tokens < ``vocab``) with the target's logits plus noise of
    ``noise`` x the RMS of the shift's effect (target - base logits). FFT trains the block linears only
    (embeddings, norms and head frozen, as for LoRA); LoRA (peft, r=4, alpha 8, rsLoRA) adapts the same
    linears. Each method's lr is picked on validation sequences; the test loss is the MSE to the clean
    target logits over the base's (1: nothing learned). Rows: shift_rank, seed, method, lr, val, test."""
    from peft import LoraConfig, get_peft_model

    from . import models

    lrs = lrs or {"fft": (3e-4, 1e-3, 3e-3), "lora": (3e-3, 1e-2, 3e-2)}
    full, _ = models.load("tiny")
    base = copy.deepcopy(full)
    head = nn.Linear(full.config.hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(full.get_output_embeddings().weight[:vocab])
    base.lm_head = head
    base.config.tie_word_embeddings = False
    rows = []
    for k in shift_ranks:
        for seed in range(seeds):
            target = copy.deepcopy(base)
            g = _generator("lm-shift", seed, k)
            with torch.no_grad():
                for name, module in target.named_modules():
                    if isinstance(module, nn.Linear) and name.endswith(BLOCK_LINEARS):
                        out_f, in_f = module.weight.shape
                        delta = torch.randn(out_f, k, generator=g) @ torch.randn(k, in_f, generator=g)
                        module.weight += delta * (0.5 * module.weight.norm() / delta.norm())
            data = {}
            with torch.no_grad():
                for split, n in (("train", examples), ("val", 64), ("test", 64)):
                    x = torch.randint(0, vocab, (n, seq_len), generator=_generator("lm-data", seed, split))
                    y, y0 = target(input_ids=x).logits, base(input_ids=x).logits
                    data[split] = (x, y, float((y0 - y).pow(2).mean()))
                x, y, _ = data["train"]
                effect = (y - base(input_ids=x).logits).pow(2).mean().sqrt()
                y_noisy = y + noise * effect * torch.randn(y.shape, generator=_generator("lm-noise", seed, k))
            order = torch.randint(0, examples, (steps, batch_size), generator=_generator("lm-batches", seed))
            for method, grid in lrs.items():
                for lr in grid:
                    model = copy.deepcopy(base)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        if method == "lora":
                            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                     target_modules=list(BLOCK_LINEARS)))
                        else:
                            for name, p in model.named_parameters():
                                p.requires_grad_(any(f"{t}." in name for t in BLOCK_LINEARS))
                    params = [p for p in model.parameters() if p.requires_grad]
                    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
                    began = time.perf_counter()
                    engine.fit(model, optimizer, lambda step, x=x, y=y_noisy, order=order: [(x[order[step]], y[order[step]])],
                               steps=steps, loss_fn=lambda m, b: (m(input_ids=b[0]).logits - b[1]).pow(2).mean())
                    model.eval()
                    with torch.no_grad():
                        scores = {split: float((model(input_ids=data[split][0]).logits - data[split][1]).pow(2).mean())
                                  / data[split][2] for split in ("val", "test")}
                    rows.append({"shift_rank": k, "seed": seed, "method": method, "lr": lr, **scores})
                    if log:
                        log(f"k={k} seed {seed} {method} lr {lr:g}: test {scores['test']:.3f} "
                            f"({time.perf_counter() - began:.1f} s)")
    return pd.DataFrame(rows)


def transformer_lines(rows: pd.DataFrame) -> list[str]:
    """Per shift rank: FFT and LoRA at their lr picked on validation, paired over seeds."""
    lines = []
    for k, part in rows.groupby("shift_rank"):
        best = {}
        for method, m in part.groupby("method"):
            lr = m.groupby("lr")["val"].mean().idxmin()
            best[method] = m[m["lr"] == lr].sort_values("seed")
        fft, lora = (best[m]["test"].to_numpy(dtype=float, copy=True) for m in ("fft", "lora"))
        c = stats.compare(fft, lora)
        lines.append(f"tiny LM, shift rank {k}: LoRA beats FFT: {stats.verdict(c)} — "
                     f"{c.line('FFT', 'LoRA')} seeds (test MSE / the base's, lr FFT "
                     f"{best['fft']['lr'].iloc[0]:g}, LoRA {best['lora']['lr'].iloc[0]:g})")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molf.lab.regime", description=__doc__.split("\n")[0])
    parser.add_argument("--run", metavar="CSV", help="run the map (resuming), writing its runs to CSV")
    parser.add_argument("--slice", action="store_true", help="the small regression slice instead of the map")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="only these methods")
    parser.add_argument("--claims", action="store_true", help="print the map and its claim lines")
    parser.add_argument("--from", dest="source", nargs="+", metavar="CSV", help="read the runs instead of training")
    parser.add_argument("--margin", type=float, default=0.25, help="claim 2's margin (0.25: within 25%%)")
    parser.add_argument("--transformer", action="store_true", help="the same question in the tiny causal LM")
    parser.add_argument("--part", default="0/1", help="i/n: run only cells i, i+n, i+2n, ... (parallel runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # two busy threads on two shared cores run ~20x slower than one
    spec = SLICE if args.slice else MAP
    i, n = (int(v) for v in args.part.split("/"))
    if not 0 <= i < n:
        raise SystemExit(f"--part must be i/n with 0 <= i < n, got {args.part!r}")
    spec = replace(spec, cells=spec.cells[i::n])
    began = time.perf_counter()
    if args.transformer:
        rows = transformer_check(log=lambda s: print(s, flush=True))
        print(f"{len(rows)} runs in {time.perf_counter() - began:.1f} s")
        for line in transformer_lines(rows):
            print(line)
        return
    if args.source:
        runs = load(args.source)
    else:
        runs = run_map(spec, args.methods, out=args.run, log=lambda s: print(s, flush=True))
        print(f"{len(runs)} runs in {time.perf_counter() - began:.1f} s")
    if args.claims:
        summary = summarize(pick(runs), args.margin)
        seeds = runs.groupby(CELL)["seed"].nunique()
        count = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
        print(f"mean held-out MSE x 1e3 (lr picked on validation), {count} seeds per cell; "
              f"* the winner beats the runner-up (paired bootstrap over seeds, p < 0.05)")
        print(map_table(summary))
        for line in claims(runs, args.margin):
            print(line)


if __name__ == "__main__":
    main()
