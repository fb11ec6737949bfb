"""One training runner for every method: ``run(TrainConfig(...)) -> Run``.

Methods: ``fft`` (dense AdamW), ``lora`` (peft, rsLoRA, all linear layers but ``lm_head``), ``dora``
(peft ``use_dora``), ``adalora`` (peft AdaLoRA), ``molf`` (FFT expert + LoRA experts, MoLFAdamW) and
``molf_e`` (MoLF-Efficient: frozen base, two LoRA experts of different ranks). Every method sees the same
data order, schedule, batch, seed and evaluation.

A run directory holds
    config.json        the resolved config
    data.json          (local data) the SHA-256 of each of the task's data files: a run trained on other
                       data is refused when resumed or reused, not silently mixed in
    steps.csv          step, loss, lr, grad_norm (before clipping), step_time_s
    grad_norms.csv     step, module, expert, grad_norm: every adapted linear module, every expert
    routing.jsonl      (molf, molf_e) one line per step: winners and every expert's score, full precision
    tensorboard/       (log_tensorboard=True) the same steps and routing statistics as TensorBoard events
    routing_winners.csv.gz  (molf, molf_e) who won, per step and module, without the scores: a few KB,
                       the record of the routing that is committed with a grid run (``molf.lab.runs``)
    metrics.json       task metrics after training, times, tokens per second, peak memory, parameter
                       and state sizes
    checkpoint.pt      model, optimizer (with routing counters), scheduler, RNG and step: the resume
                       point while a run is unfinished (removed at the end unless keep_checkpoint)
    model/             the final merged model, a plain ``transformers`` checkpoint (+ tokenizer)
    run.lock           held (``fcntl.flock``) by the runner writing the directory: a second one is refused
``molf.lab.runs.load(out_dir)`` reads it all back into pandas.

Resuming: ``run(config)`` on a directory holding a checkpoint of the same config continues from it and
ends identical to an uninterrupted run (the data order is a pure function of the seed and the step).
On a directory holding a *finished* run of the same config it returns that run without training
(``Run.model`` is then None); a different config in the same directory is an error.
``stop_after=N`` ends a call after N optimizer steps (a resumable chunk, e.g. to fit a time budget).
The steps are ``molf.lab.engine.fit``'s; logging, checkpoints and the progress bar are its callbacks, on a
``Session`` (one run held in memory: built or resumed once, trained by ``fit`` calls, finished once).

Training length: give ``steps`` (optimizer steps) or ``epochs`` (passes over the encoded training rows:
``ceil(epochs * rows / (batch_size * grad_accum))`` steps), never both: ``TrainConfig(steps=None,
epochs=2)``; giving both (or neither) is a ValueError. Data: ``source="local"`` (the shipped files) or
``"hub"`` (the paper's datasets, ``molf.lab.tasks.load``), for training and evaluation alike.
``metric_variant`` picks ours or the reference implementation's metrics (``molf.lab.tasks.evaluate``).
Scale switches: ``dtype="bfloat16"`` (bf16 weights), ``autocast=True`` (bf16 autocast of the forward and
loss, weights and optimizer in ``dtype``), ``gradient_checkpointing=True`` (recompute activations in
the backward pass; same numbers, less memory), ``grad_accum`` (micro-batches per optimizer step; the
paper's effective batch 32 is ``batch_size=8, grad_accum=4``), ``device="auto"`` (CUDA when present).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import resource
import shutil
import socket
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import _validate as _check
from ..model import DEFAULT_ALPHA, merge, no_weight_decay, param_groups, wrap, wrapped_modules
from ..optim import DEFAULT_BETAS, DEFAULT_EPS, IMPLS, MoLFAdamW
from ..router import SCORES
from ..routing_log import RoutingRecord
from . import models, runs, tasks
from .engine import Callback, Loop, TrainingDiverged, fit

METHODS = ("fft", "lora", "dora", "adalora", "molf", "molf_e")
MOLF_METHODS = ("molf", "molf_e")
PEFT_METHODS = ("lora", "dora", "adalora")
SCHEDULES = ("cosine", "linear", "constant")

# Which optional hyper-parameters each method takes; anything else given to it is an error.
_ALLOWED = {
    "fft": {"lr", "wd"},
    "lora": {"lr", "wd", "ranks", "alphas", "dropout"},
    "dora": {"lr", "wd", "ranks", "alphas", "dropout"},
    "adalora": {"lr", "wd", "ranks", "alphas", "dropout"},
    "molf": {"lr_fft", "lr_lora", "wd_fft", "wd_lora", "ranks", "alphas", "dropout", "score", "topk"},
    "molf_e": {"lr_fft", "lr_lora", "wd_fft", "wd_lora", "ranks", "alphas", "dropout", "score", "topk",
               "freeze_non_linear"},
}
# The paper's settings (docs/method.md), used where the config leaves a value as None.
_DEFAULTS = {
    "fft": {"lr": 5e-5, "wd": 0.1},
    "lora": {"lr": 5e-4, "wd": 0.01, "ranks": (32,), "alphas": None, "dropout": 0.05},
    "dora": {"lr": 5e-4, "wd": 0.01, "ranks": (32,), "alphas": None, "dropout": 0.05},
    "adalora": {"lr": 5e-4, "wd": 0.01, "ranks": (32,), "alphas": None, "dropout": 0.05},
    "molf": {"lr_fft": 5e-5, "lr_lora": 5e-5, "wd_fft": 0.1, "wd_lora": 0.01, "ranks": (128,),
             "alphas": None, "dropout": 0.0, "score": "epd", "topk": 1},
    "molf_e": {"lr_fft": 5e-5, "lr_lora": 5e-5, "wd_fft": 0.1, "wd_lora": 0.01, "ranks": (16, 128),
               "alphas": None, "dropout": 0.0, "score": "epd", "topk": 1, "freeze_non_linear": False},
}


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` means "the method's paper default" (see ``_DEFAULTS``).

    ``lr``/``wd`` are for single-optimizer methods (fft and the LoRA family); MoLF takes
    ``lr_fft``/``lr_lora``/``wd_fft``/``wd_lora``. LoRA-family alphas default to round(2 sqrt(r)) (the
    paper's LoRA baseline), MoLF's to 32. Giving an option the method does not use is an error.
    """

    model: str = "smollm2-135m"
    task: str = "fact"
    method: str = "molf"
    steps: int | None = 100            # optimizer steps; or give epochs instead
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    lr: float | None = None
    wd: float | None = None
    lr_fft: float | None = None
    lr_lora: float | None = None
    wd_fft: float | None = None
    wd_lora: float | None = None
    ranks: tuple | None = None
    alphas: tuple | None = None
    dropout: float | None = None
    score: str | None = None
    topk: int | None = None
    freeze_non_linear: bool | None = None
    train_limit: int | None = None     # use the first N training rows
    source: str = "local"              # "local" (data/) or "hub" (the paper's datasets)
    eval_split: str = "test"
    eval_limit: int | None = 50
    eval_batch_size: int = 16
    metric_variant: str = "ours"       # "ours" or "reference" (molf.lab.tasks.evaluate)
    out_dir: str = "runs/default"
    save_every: int = 50               # checkpoint every N steps (and at the end); 0: only at the end
    save_model: bool = True            # write the merged final model to out_dir/model
    keep_checkpoint: bool = False      # keep checkpoint.pt once the run has finished
    log_grad_norms: bool = True
    log_routing: bool = True
    log_tensorboard: bool = False      # also write loss, lr, grad norm and routing statistics as TensorBoard
                                       # events to out_dir/tensorboard (needs the tensorboard package)
    device: str = "cpu"                # "cpu", "cuda", "auto"
    dtype: str = "float32"             # "float32" or "bfloat16": the weights' dtype
    autocast: bool = False             # bf16 autocast of forward and loss (weights stay in dtype)
    gradient_checkpointing: bool = False
    # MoLFAdamW's step implementation (molf and molf_e only): "auto" (eager), or "compiled" for the C++
    # kernels on the CPU (same decisions, parameters to rounding; built on first use, ~1 min once)
    optimizer_impl: str = "auto"
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """Validate and fill the method's defaults; raise ``ValueError`` before any training starts."""
        _validate(self)
        values = dataclasses.asdict(self)
        for key, default in _DEFAULTS[self.method].items():
            if values[key] is None:
                values[key] = default
        if values["ranks"] is not None:
            values["ranks"] = tuple(values["ranks"])
        if values["alphas"] is None and values["ranks"] is not None:
            values["alphas"] = (tuple(DEFAULT_ALPHA for _ in values["ranks"]) if self.method in MOLF_METHODS
                                else tuple(float(round(2 * math.sqrt(r))) for r in values["ranks"]))
        if values["alphas"] is not None:
            values["alphas"] = tuple(float(a) for a in values["alphas"])
        return TrainConfig(**values)


def _validate(c: TrainConfig) -> None:
    if c.method not in METHODS:
        raise ValueError(f"unknown method {c.method!r}; use one of {METHODS}")
    if c.task not in tasks.TASKS:
        raise ValueError(f"unknown task {c.task!r}; use one of {tasks.TASKS}")
    given = {k for k in ("lr", "wd", "lr_fft", "lr_lora", "wd_fft", "wd_lora", "ranks", "alphas", "dropout",
                         "score", "topk", "freeze_non_linear") if getattr(c, k) is not None}
    extra = sorted(given - _ALLOWED[c.method])
    if extra:
        raise ValueError(f"method {c.method!r} does not take {extra}; it takes {sorted(_ALLOWED[c.method])}")
    for name in ("lr", "lr_fft", "lr_lora"):
        if getattr(c, name) is not None:
            _check.number(name, getattr(c, name), positive=True)
    for name in ("wd", "wd_fft", "wd_lora"):
        if getattr(c, name) is not None:
            _check.number(name, getattr(c, name))
    for name in ("batch_size", "grad_accum", "seq_len"):
        _check.integer(name, getattr(c, name))
    if (c.steps is None) == (c.epochs is None):
        raise ValueError(f"give exactly one of steps and epochs, got steps={c.steps!r}, epochs={c.epochs!r}")
    if c.steps is not None:
        _check.integer("steps", c.steps)
    if c.epochs is not None:
        _check.number("epochs", c.epochs, positive=True)
    if c.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {c.schedule!r}; use one of {SCHEDULES}")
    _check.fraction("warmup_ratio", c.warmup_ratio)
    if c.max_grad_norm is not None:
        _check.number("max_grad_norm", c.max_grad_norm, positive=True)
    if c.optimizer_impl not in IMPLS:
        raise ValueError(f"unknown optimizer_impl {c.optimizer_impl!r}; use one of {IMPLS}")
    if c.optimizer_impl != "auto" and c.method not in MOLF_METHODS:
        raise ValueError(f"optimizer_impl={c.optimizer_impl!r} chooses how MoLFAdamW steps; method {c.method!r} "
                         f"trains with torch's AdamW: leave optimizer_impl at 'auto'")
    if c.score is not None and c.score not in SCORES:
        raise ValueError(f"unknown score {c.score!r}; use one of {sorted(SCORES)}")
    if c.ranks is not None:
        ranks = tuple(c.ranks) if isinstance(c.ranks, (list, tuple)) else (c.ranks,)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"ranks must be positive integers, got {c.ranks!r}")
        if c.method in PEFT_METHODS and len(ranks) != 1:
            raise ValueError(f"method {c.method!r} takes one rank, got ranks={c.ranks!r}")
        if c.method == "molf_e" and len(ranks) < 2:
            raise ValueError(f"molf_e routes between LoRA experts and needs two or more ranks, got {c.ranks!r}")
    if c.topk is not None:
        n_experts = len(c.ranks or _DEFAULTS[c.method]["ranks"]) + (c.method == "molf")
        if isinstance(c.topk, bool) or not isinstance(c.topk, int) or not 1 <= c.topk <= n_experts:
            raise ValueError(f"topk must be an integer in [1, {n_experts}] (the number of experts), got {c.topk!r}")
    if c.dropout is not None:
        _check.fraction("dropout", c.dropout)
    if c.source not in tasks.SOURCES:
        raise ValueError(f"unknown source {c.source!r}; use one of {tasks.SOURCES}")
    if c.metric_variant not in tasks.METRIC_VARIANTS:
        raise ValueError(f"unknown metric_variant {c.metric_variant!r}; use one of {tasks.METRIC_VARIANTS}")
    for name in ("autocast", "gradient_checkpointing"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}")
    if c.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {c.dtype!r}")
    if c.device not in ("cpu", "cuda", "auto") and not str(c.device).startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {c.device!r}")
    if c.eval_limit is not None and (not isinstance(c.eval_limit, int) or c.eval_limit < 0):
        raise ValueError(f"eval_limit must be an integer >= 0 or None, got {c.eval_limit!r}")
    if c.train_limit is not None and (isinstance(c.train_limit, bool) or not isinstance(c.train_limit, int)
                                      or c.train_limit < 1):
        raise ValueError(f"train_limit must be an integer >= 1 or None (all rows), got {c.train_limit!r}")
    if c.eval_split not in tasks.SPLITS:
        raise ValueError(f"unknown eval_split {c.eval_split!r}; use one of {tasks.SPLITS}")
    _check.integer("eval_batch_size", c.eval_batch_size)
    _check.integer("save_every", c.save_every, minimum=0)
    _check.integer("seed", c.seed, minimum=0)
    for name in ("save_model", "keep_checkpoint", "log_grad_norms", "log_routing", "log_tensorboard", "progress"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}")
    if not isinstance(c.model, str) or not c.model:
        raise ValueError(f"model must be a model name or path (a non-empty string), got {c.model!r}")
    if not isinstance(c.out_dir, (str, os.PathLike)) or not str(c.out_dir):
        raise ValueError(f"out_dir must be a directory path, got {c.out_dir!r}")
    out = Path(c.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"out_dir {c.out_dir!r} is not writable: {error}") from None


@dataclass
class Run:
    """What ``run`` returns: the resolved config, the run directory and the final metrics."""

    config: TrainConfig
    out_dir: Path
    metrics: dict
    model: torch.nn.Module | None = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)

    def load(self):
        """All logs of this run as pandas DataFrames (``molf.lab.runs.load``)."""
        return runs.load(self.out_dir)


# ---------------------------------------------------------------------------- building a method
def build(config: TrainConfig, model: torch.nn.Module, total_steps: int):
    """Adapt ``model`` for ``config.method``; return ``(model, optimizer)``."""
    c = config
    if c.method == "fft":
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if no_weight_decay(name, p) else decay).append(p)  # the rule MoLF's plain groups use
        groups = [{"params": decay, "weight_decay": c.wd}, {"params": no_decay, "weight_decay": 0.0}]
        return model, torch.optim.AdamW(groups, lr=c.lr, betas=DEFAULT_BETAS, eps=DEFAULT_EPS)
    if c.method in PEFT_METHODS:
        from peft import AdaLoraConfig, LoraConfig, get_peft_model
        common = dict(lora_alpha=c.alphas[0], lora_dropout=c.dropout, target_modules="all-linear",
                      use_rslora=True, task_type="CAUSAL_LM")
        if c.method == "adalora":
            # AdaLoRA starts at 1.5 r and prunes to r over the middle of training (tinit/tfinal 10%/30%).
            peft_config = AdaLoraConfig(init_r=max(1, round(1.5 * c.ranks[0])), target_r=c.ranks[0],
                                        tinit=int(0.1 * total_steps), tfinal=int(0.3 * total_steps),
                                        deltaT=1, total_step=max(total_steps, 2), **common)
        else:
            peft_config = LoraConfig(r=c.ranks[0], use_dora=c.method == "dora", **common)
        model = get_peft_model(model, peft_config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=c.lr, weight_decay=c.wd, betas=DEFAULT_BETAS, eps=DEFAULT_EPS)
    wrap(model, ranks=c.ranks, alphas=c.alphas, rslora=True, dropout=c.dropout,
         train_base=c.method == "molf", freeze_non_linear=bool(c.freeze_non_linear))
    groups = param_groups(model, lr_fft=c.lr_fft, lr_lora=c.lr_lora, wd_fft=c.wd_fft, wd_lora=c.wd_lora)
    return model, MoLFAdamW(groups, score=c.score, topk=c.topk, betas=DEFAULT_BETAS, eps=DEFAULT_EPS,
                            impl=c.optimizer_impl)


def make_scheduler(optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def expert_parameters(model: torch.nn.Module, method: str) -> dict[str, dict[str, list]]:
    """Adapted module name -> expert name -> its trainable parameters, for every method alike.

    Names are the base model's (peft's ``base_model.model.`` prefix is removed). FFT treats every
    linear layer but ``lm_head`` as one "fft" expert; peft methods have one "lora0" expert per module.
    """
    out = {}
    if method in MOLF_METHODS:
        for name, layer in wrapped_modules(model).items():
            out[name] = {e: [p for p in ps if p.requires_grad] for e, ps in layer.expert_parameters().items()}
            out[name] = {e: ps for e, ps in out[name].items() if ps}
    elif method == "fft":
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                out[name] = {"fft": [p for p in module.parameters() if p.requires_grad]}
    else:
        from peft.tuners.tuners_utils import BaseTunerLayer
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                params = [p for n, p in module.named_parameters() if p.requires_grad and "base_layer" not in n]
                if params:
                    out[name.removeprefix("base_model.model.")] = {"lora0": params}
    return out


# ---------------------------------------------------------------------------- data
def example_order(n_examples: int, n_needed: int, seed: int) -> list[int]:
    """Indices of the examples to train on, in order: seeded reshuffles, one per epoch."""
    if n_examples < 1 and n_needed > 0:
        raise ValueError(f"no training examples to draw {n_needed} from (the training set is empty)")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_needed:
        order.extend(torch.randperm(n_examples, generator=generator).tolist())
    return order[:n_needed]


def _peak_memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"


def _peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory allocated on ``device`` since the run started; else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _optimizer_state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() if isinstance(st, dict)
               for t in st.values() if isinstance(t, torch.Tensor))


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, device) -> dict:
    """A checkpoint's contents, unpickled as tensors and plain values only (``weights_only``): a file that
    holds anything else could run code when loaded, and is refused."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} holds more than tensors and plain values; refusing to load it (unpickling "
                         f"it could run code): {first}. Delete it to train the run from its start") from None


# ---------------------------------------------------------------------------- the run directory lock
LOCK_FILE = "run.lock"


class RunDirectoryInUse(RuntimeError):
    """Another runner holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory (``fcntl.flock`` on ``out/run.lock``), held until ``release``
    (or the end of a ``with`` block, or the process). A second holder, in this process or another, is
    refused with ``RunDirectoryInUse``."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunDirectoryInUse(f"{out} is in use by another runner ({holder}, lock {self.path}); wait for "
                                    f"it to finish or use another out_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()                            # closing the file releases the lock

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.release()


# ---------------------------------------------------------------------------- the run
def micro_batches(features: list[dict], order: list[int], batch_size: int, grad_accum: int, pad_token_id: int):
    """``batches(step)`` for ``engine.fit``: the ``grad_accum`` micro-batches of ``step``, in the order
    ``example_order`` gave (micro-batch ``m`` of step ``s`` holds examples ``(s*grad_accum + m)*batch_size``
    onwards)."""
    def batches(step: int) -> list[dict]:
        out = []
        for micro in range(grad_accum):
            first = (step * grad_accum + micro) * batch_size
            out.append(tasks.collate([features[i] for i in order[first:first + batch_size]], pad_token_id))
        return out
    return batches


class RunLogs(Callback):
    """steps.csv, grad_norms.csv and routing.jsonl, one row (or record) per step, appended as it trains and
    handed to the OS after every step (a reader sees every finished step; a crash loses at most the step it
    was in, which a resume trains again)."""

    def __init__(self, out: Path, config: TrainConfig, experts: dict):
        self.out, self.config = out, config
        self.grad_index = [(m, e, ps) for m, es in experts.items() for e, ps in es.items()]
        self.files = {}

    def _open(self, name: str, header: list[str] | None):
        new = not (self.out / name).exists() or (self.out / name).stat().st_size == 0
        f = self.files[name] = open(self.out / name, "a", newline="")
        if header and new:
            csv.writer(f).writerow(header)
        return f

    def on_begin(self, loop):
        c = self.config
        self.steps = csv.writer(self._open("steps.csv", ["step", "loss", "lr", "grad_norm", "step_time_s"]))
        self.grads = (csv.writer(self._open("grad_norms.csv", ["step", "module", "expert", "grad_norm"]))
                      if c.log_grad_norms else None)
        self.routing = self._open("routing.jsonl", None) if c.method in MOLF_METHODS and c.log_routing else None

    def on_after_backward(self, loop):
        if not (self.grads and self.grad_index):
            return
        norms = torch._foreach_norm([p.grad for _, _, ps in self.grad_index for p in ps if p.grad is not None])
        norms = iter(torch.stack(norms).double().cpu().tolist() if norms else [])
        for module, expert, ps in self.grad_index:
            squares = sum(next(norms) ** 2 for p in ps if p.grad is not None)
            self.grads.writerow([loop.step, module, expert, math.sqrt(squares)])

    def on_step(self, loop):
        if self.routing:
            self.routing.write(RoutingRecord.from_optimizer(loop.optimizer, loop.step, lr=loop.lr).to_json())
        self.steps.writerow([loop.step, loop.loss, loop.lr, loop.grad_norm, loop.seconds])
        self.flush()

    def flush(self):
        for f in self.files.values():
            f.flush()

    def on_end(self, loop):
        for f in self.files.values():
            f.close()
        self.files = {}


class AdaLoraBudget(Callback):
    """AdaLoRA's rank allocation after every optimizer step (peft's ``update_and_allocate``)."""

    def on_step(self, loop):
        loop.model.base_model.update_and_allocate(loop.step)


class ProgressBar(Callback):
    """A tqdm bar over the run's steps: loss, lr, tokens per second, peak memory."""

    def __init__(self, session: Session):
        self.session = session

    def on_begin(self, loop):
        c = self.session.config
        self.bar = tqdm(total=self.session.total_steps, initial=loop.start_step, desc=f"{c.method}/{c.task}",
                        dynamic_ncols=True)

    def on_step(self, loop):
        s = self.session
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loop.loss:.4f}", lr=f"{loop.lr:.2e}",
                             tok_s=f"{s.train_tokens / max(sum(s.step_times), 1e-9):.0f}",
                             mem=f"{_peak_memory_bytes(s.device) / 2**30:.2f}GiB")

    def on_end(self, loop):
        self.bar.close()


class PeriodicCheckpoint(Callback):
    """A checkpoint every ``save_every`` steps (but not at the last step of a ``fit``: the caller saves that)."""

    def __init__(self, session: Session, logs: RunLogs):
        self.session, self.logs = session, logs

    def on_step(self, loop):
        every = self.session.config.save_every
        if every and (loop.step + 1) % every == 0 and loop.step + 1 < loop.steps:
            self.logs.flush()
            self.session.save_checkpoint()


class Session(Callback):
    """One run held in memory: built (or resumed from ``out_dir/checkpoint.pt``) once, trained by one or
    more ``fit`` calls, finished once. ``run`` is a session's ``fit`` and ``finish``; the live explorer
    trains a session a few steps at a time and redraws in between, with nothing reloaded.

        session = Session(config)           # locks out_dir, loads the model and data, resumes if it can
        session.fit(10)                     # steps session.step .. session.step + 9
        session.fit(callbacks=[redraw])     # the rest
        result = session.finish()           # merge, save the model, evaluate, metrics.json
        session.close()                     # release out_dir (also done by finish)

    Every setting is validated and the evaluation rows are loaded before the first step, so a bad
    setting fails at once, not after training.
    """

    def __init__(self, config: TrainConfig, model=None, tokenizer=None, lock: RunLock | None = None):
        c = self.config = config.resolved()
        self.out = Path(c.out_dir)
        self._own_lock = lock is None
        self.lock = lock or RunLock(self.out)
        try:
            self._prepare(model, tokenizer)
        except BaseException:
            self.close()
            raise

    def _prepare(self, model, tokenizer) -> None:
        c, out = self.config, self.out
        self.device = device = torch.device("cuda" if c.device == "auto" and torch.cuda.is_available() else
                                            ("cpu" if c.device == "auto" else c.device))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c.dtype]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # Data: the same rows, encoding and order for every method; evaluation rows up front (a bad split
        # or data file fails now, not after training).
        rows = tasks.load(c.task, "train", source=c.source, limit=c.train_limit, variant=c.metric_variant)
        if not rows:
            where = tasks.data_dir() if c.source == "local" else "the hub dataset"
            raise ValueError(f"the {c.task!r} training split in {where} has no rows; nothing to train on")
        self.eval_rows = (tasks.load(c.task, c.eval_split, source=c.source, limit=c.eval_limit,
                                     variant=c.metric_variant) if c.eval_limit != 0 else [])
        if model is None or tokenizer is None:
            model, tokenizer = models.load(c.model, dtype=dtype, device=device)
        features = tasks.encode(c.task, rows, tokenizer, max_len=c.seq_len)
        if not features:
            raise ValueError(f"none of the {len(rows)} {c.task!r} training rows could be encoded; nothing to train on")
        per_step = c.batch_size * c.grad_accum
        self.total_steps = c.steps if c.steps is not None else max(1, math.ceil(c.epochs * len(features) / per_step))
        order = example_order(len(features), self.total_steps * per_step, c.seed)
        self.batches = micro_batches(features, order, c.batch_size, c.grad_accum, tokenizer.pad_token_id)

        torch.manual_seed(c.seed)
        random.seed(c.seed)
        if c.gradient_checkpointing:
            # transformers >= 5.x names it activation checkpointing; older releases only have the old name
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise ValueError("gradient_checkpointing needs a transformers model (activation_checkpointing_enable)")
        model, self.optimizer = build(c, model, self.total_steps)
        self.model, self.tokenizer = model.to(device), tokenizer
        self.scheduler = make_scheduler(self.optimizer, c.schedule, self.total_steps, c.warmup_ratio)
        self.experts = expert_parameters(model, c.method)

        self.step = 0                  # the next step to train
        self.nonfinite_grad_steps = 0  # steps whose gradient norm was inf/NaN (engine.fit)
        self.step_times: list[float] = []
        self.train_tokens = 0          # non-padding tokens trained on
        self.checkpoint_path = out / "checkpoint.pt"
        self._saved_step = None        # the step of the checkpoint on disk, when this session wrote or read it
        if self.checkpoint_path.exists():
            _check_same_run(c, out, "a checkpoint")
            self._resume(_load_checkpoint(self.checkpoint_path, device))
            runs.truncate_logs(out, self.step)  # logs written after the checkpoint, a torn last line
        else:
            (out / "config.json").write_text(_config_json(c))
            (out / "data.json").write_text(json.dumps(data_fingerprint(c), indent=2, sort_keys=True))
            for name in ("steps.csv", "grad_norms.csv", "routing.jsonl", runs.WINNERS_FILE, "metrics.json"):
                (out / name).unlink(missing_ok=True)

    def _resume(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.random.set_rng_state(checkpoint["rng"]["torch"])
        if self.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)
        random.setstate(checkpoint["rng"]["python"])
        self.step = self._saved_step = checkpoint["step"]
        self.nonfinite_grad_steps = checkpoint.get("nonfinite_grad_steps", 0)
        self.step_times = list(checkpoint.get("step_times", []))
        self.train_tokens = checkpoint.get("train_tokens", 0)

    def save_checkpoint(self) -> None:
        """Write the resume point (model, optimizer, scheduler, RNG, counters) at ``self.step``."""
        _atomic_torch_save({
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "nonfinite_grad_steps": self.nonfinite_grad_steps, "step_times": self.step_times,
            "train_tokens": self.train_tokens,
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.random.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
        }, self.checkpoint_path)
        self._saved_step = self.step

    # the session's counters follow the loop (a callback, so checkpoints written mid-fit carry them)
    def on_begin(self, loop):
        self._counted = (self.nonfinite_grad_steps, self.train_tokens)

    def on_step(self, loop):
        self.step = loop.step + 1
        self.step_times.append(loop.seconds)
        self.nonfinite_grad_steps = self._counted[0] + loop.nonfinite_grad_steps
        self.train_tokens = self._counted[1] + loop.tokens

    def fit(self, steps: int | None = None, callbacks=()) -> Loop:
        """Train the next ``steps`` steps (default: to the end), logging as it goes; ``callbacks`` run after
        the run's own (logs, progress, checkpoints). Returns the engine's ``Loop``."""
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an integer >= 1 or None (to the end), got {steps!r}")
        c = self.config
        end = self.total_steps if steps is None else min(self.total_steps, self.step + steps)
        logs = RunLogs(self.out, c, self.experts)
        own = ([AdaLoraBudget()] if c.method == "adalora" else []) + [logs, self]
        own += ([ProgressBar(self)] if c.progress else []) + [PeriodicCheckpoint(self, logs)]
        if c.log_tensorboard:
            from .tensorboard import TensorBoardCallback
            own.append(TensorBoardCallback(self.out / "tensorboard"))
        try:
            return fit(self.model, self.optimizer, self.batches, steps=end, start_step=self.step,
                       scheduler=self.scheduler, max_grad_norm=c.max_grad_norm, callbacks=own + list(callbacks),
                       autocast=c.autocast, device=self.device)
        except TrainingDiverged as error:
            raise TrainingDiverged(f"{error} in {c.method}/{c.task}; the last good checkpoint is kept in "
                                   f"{self.checkpoint_path}") from None

    @property
    def finished_training(self) -> bool:
        return self.step >= self.total_steps

    def finish(self) -> Run:
        """Merge the adapters away, save the model, evaluate it and write metrics.json; release out_dir.

        The final checkpoint is written first and removed last (unless ``keep_checkpoint``): if saving
        or evaluating fails, the trained state stays on disk and ``run(config)`` again only evaluates."""
        if not self.finished_training:
            raise RuntimeError(f"{self.total_steps - self.step} of {self.total_steps} steps are left; fit them first")
        c, out, model, optimizer = self.config, self.out, self.model, self.optimizer
        if self._saved_step != self.step:
            self.save_checkpoint()
        trainable = [p for p in model.parameters() if p.requires_grad]
        state_bytes = _optimizer_state_bytes(optimizer)
        n_trainable = sum(p.numel() for p in trainable)
        routing_summary = None
        if c.method in MOLF_METHODS:
            routing_summary = {"win_counts": optimizer.win_counts, "nonfinite_skips": optimizer.nonfinite_skips}
            if c.log_routing:
                runs.write_winners(out)
            merge(model)
        elif c.method in PEFT_METHODS:
            model = self.model = model.merge_and_unload()
        model.eval()
        # Finished atomically: the model first (written aside, then renamed), then the evaluation, then
        # metrics.json (the mark that the run is finished), the checkpoint last. A crash anywhere before the
        # mark leaves a run that the next call resumes from its final checkpoint; never a finished run
        # without its model.
        if c.save_model:
            _save_model_atomically(model, self.tokenizer, out / "model")
        metrics = {}
        if self.eval_rows:
            metrics = tasks.evaluate(c.task, model, self.tokenizer, self.eval_rows, batch_size=c.eval_batch_size,
                                     variant=c.metric_variant)
        train_time = sum(self.step_times)
        result = {
            "method": c.method, "task": c.task, "model": c.model, "seed": c.seed, "steps": self.total_steps,
            "source": c.source, "metric_variant": c.metric_variant,
            "metrics": metrics, "primary_metric": tasks.primary_metric(c.task, c.metric_variant),
            "final_loss": _final_loss(out),
            "train_time_s": train_time,
            "step_time_s": statistics.median(self.step_times) if self.step_times else None,
            "train_tokens": self.train_tokens,
            "tokens_per_s": self.train_tokens / train_time if train_time > 0 else None,
            "device": str(self.device),
            "peak_memory_bytes": _peak_memory_bytes(self.device),
            "peak_memory_kind": _peak_memory_kind(self.device),
            "trainable_params": n_trainable,
            "optimizer_state_bytes": state_bytes,
            "routing": routing_summary,
            "nonfinite_grad_steps": self.nonfinite_grad_steps,
        }
        _atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
        if not c.keep_checkpoint:
            self.checkpoint_path.unlink(missing_ok=True)
        self.close()
        return Run(c, out, result, model, self.tokenizer)

    def close(self) -> None:
        """Release the run directory (the session's lock)."""
        if self._own_lock:
            self.lock.release()


def run(config: TrainConfig, stop_after: int | None = None, model=None, tokenizer=None, callbacks=()) -> Run:
    """Train, merge, save and evaluate one run; resume from ``out_dir/checkpoint.pt`` if present.

    ``model``/``tokenizer`` may be passed in (e.g. already loaded) instead of ``config.model``.
    ``stop_after=N`` trains N steps and leaves the run resumable. ``callbacks`` (``engine.Callback``) run
    after the run's own, as in ``Session.fit``. Another runner on the same ``out_dir`` is refused
    (``RunDirectoryInUse``).
    """
    c = config.resolved()
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be an integer >= 1 (steps to train in this call) or None, got {stop_after!r}")
    with RunLock(Path(c.out_dir)) as lock:
        finished = _finished_run(c, Path(c.out_dir))
        if finished is not None:
            return finished
        session = Session(c, model, tokenizer, lock=lock)
        session.fit(stop_after, callbacks=callbacks)
        if not session.finished_training:  # a resumable chunk: checkpoint and stop here
            session.save_checkpoint()
            return Run(c, session.out, {"completed_steps": session.step, "total_steps": session.total_steps},
                       session.model, session.tokenizer)
        return session.finish()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_model_atomically(model, tokenizer, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)


def _config_json(c: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(c), indent=2, sort_keys=True, default=list)


# Config fields that say where and how a run is written or shown, not what it computes: two configs
# that differ only in these are the same run (a relative or absolute out_dir, a progress bar, ...).
# Gradient checkpointing recomputes the same activations: only memory and time change.
NOT_RUN_IDENTITY = ("out_dir", "progress", "save_every", "keep_checkpoint", "save_model", "gradient_checkpointing",
                    "log_tensorboard")
# Fields added after runs were already written: a saved config without one ran with its default.
_LATER_FIELDS = {"source": "local", "metric_variant": "ours", "autocast": False, "optimizer_impl": "auto"}


def run_identity(config: TrainConfig | dict) -> dict:
    """The fields of a (resolved) config that define what a run computes."""
    values = dataclasses.asdict(config) if isinstance(config, TrainConfig) else {**_LATER_FIELDS, **config}
    values = json.loads(json.dumps(values, default=list))  # tuples and lists compare alike
    return {k: v for k, v in values.items() if k not in NOT_RUN_IDENTITY}


def _check_same_run(c: TrainConfig, out: Path, what: str) -> None:
    """Raise unless ``out/config.json`` describes the same run as ``c``, naming the fields that differ,
    and ``out/data.json`` the same data (``check_same_data``)."""
    path = out / "config.json"
    if not path.is_file():
        raise ValueError(f"{out} holds {what} but no config.json; delete the directory to train again")
    saved, wanted = run_identity(json.loads(path.read_text())), run_identity(c)
    differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k, "<absent>") != wanted.get(k, "<absent>"))
    if differ:
        detail = ", ".join(f"{k} (there: {saved.get(k, '<absent>')!r}, asked: {wanted.get(k, '<absent>')!r})"
                           for k in differ)
        raise ValueError(f"{out} holds {what} of a different config: {detail}; use another out_dir or delete it")
    check_same_data(c, out, what)


def data_fingerprint(c: TrainConfig) -> dict:
    """``{"train.jsonl": sha256, ...}`` of the local files of ``c.task`` (``{}`` for hub data, which a
    dataset revision pins instead). Written to ``data.json`` so a run cannot be reused on changed data."""
    if c.source != "local":
        return {}
    folder = tasks.data_dir() / c.task
    return {f"{split}.jsonl": hashlib.sha256((folder / f"{split}.jsonl").read_bytes()).hexdigest()
            for split in tasks.SPLITS if (folder / f"{split}.jsonl").is_file()}


def check_same_data(c: TrainConfig, out: Path, what: str) -> None:
    """Raise if ``out/data.json`` records other data files than ``c`` would read now, naming them. A run
    written before data.json existed (no file) is taken as it is."""
    path = out / "data.json"
    if not path.is_file():
        return
    saved, now = json.loads(path.read_text()), data_fingerprint(c)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"{out} holds {what} trained on other {c.task} data: {', '.join(changed)} changed "
                         f"since (under {tasks.data_dir() / c.task}); delete the directory to train again")


def check_reusable(config: TrainConfig, out: Path, what: str = "a finished run") -> None:
    """Raise ValueError unless the run in ``out`` has ``config``'s identity and was trained on the data
    ``config`` would read now (what ``run`` checks before reusing or resuming it)."""
    _check_same_run(config.resolved(), out, what)


def _finished_run(c: TrainConfig, out: Path) -> Run | None:
    """A completed run of the same config in ``out``: returned as is (no model), so notebooks and
    experiments can share runs. Delete the directory (or change ``out_dir``) to train again.

    Complete means: ``metrics.json`` (written last but for the checkpoint's removal) and, when the config
    asks for it, ``model/``. A directory with metrics but without the asked-for model is not finished:
    the caller resumes or redoes it."""
    if not (out / "metrics.json").is_file():
        return None
    _check_same_run(c, out, "a finished run")
    if c.save_model and not (out / "model").is_dir():
        return None
    return Run(c, out, json.loads((out / "metrics.json").read_text()))


def finished_run(config: TrainConfig) -> Run | None:
    """The finished run of ``config`` in its ``out_dir`` (without its model), or None: what ``run`` returns
    without training."""
    c = config.resolved()
    return _finished_run(c, Path(c.out_dir))


def _final_loss(out: Path) -> float | None:
    with open(out / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["loss"]) if rows else None


# ---------------------------------------------------------------------------- command line
def _cli_value(kind: str, name: str):
    """An argparse ``type`` for a TrainConfig field annotated ``kind`` ("int | None", "tuple | None", ...)."""
    base = kind.replace(" ", "").replace("|None", "")
    optional = "None" in kind

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            if base == "bool":
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if base == "int":
                return int(text)
            if base == "float":
                return float(text)
            if base == "tuple":
                return tuple(float(x) if "." in x or "e" in x.lower() else int(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} takes a {base}"
                                             f"{' or none' if optional else ''}, got {text!r}") from None
        return text
    return parse


def main(argv: list[str] | None = None) -> int:
    """``python -m molf.lab.train --method molf --task fact --steps 100 --out-dir runs/molf``: one run.

    Every ``TrainConfig`` field is a flag (``--lr-fft 5e-5``, ``--ranks 16,128``, ``--freeze-non-linear
    true``, ``--epochs 2 --steps none``); anything not given keeps its default. Prints the run's
    metrics.json. ``--stop-after N`` trains N steps of the run and leaves it resumable.
    """
    parser = argparse.ArgumentParser(prog="python -m molf.lab.train", description=main.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_cli_value(str(f.type), f.name),
                            default=f.default, metavar=str(f.type).replace(" ", "").upper())
    parser.add_argument("--stop-after", type=int, default=None, help="train this many steps, then stop (resumable)")
    args = vars(parser.parse_args(argv))
    stop_after = args.pop("stop_after")
    try:
        result = run(TrainConfig(**args), stop_after=stop_after)
    except (ValueError, RunDirectoryInUse) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
