"""The regime map's setting: cells, the base network, its shifted target, and the tasks drawn from them."""
import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

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


def seeded_generator(*key) -> torch.Generator:
    """A generator seeded from a tuple of ints/strings, the same in every process."""
    text = "/".join(str(k) for k in key)
    seed = 0
    for ch in text.encode():
        seed = (seed * 131 + ch) % (2 ** 61 - 1)
    return torch.Generator().manual_seed(seed)


def base_network(seed: int, setting: Setting) -> nn.Sequential:
    """The seed's "pretrained" network (nn.Linear's default init, drawn from the seed)."""
    g = seeded_generator("base", seed)
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
    g = seeded_generator("shift", seed, rank)
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
    g = seeded_generator("data", seed, cell.examples)
    x = torch.randn(cell.examples, setting.width, generator=g)
    x_val = torch.randn(setting.n_val, setting.width, generator=seeded_generator("val", seed))
    x_test = torch.randn(setting.n_test, setting.width, generator=seeded_generator("test", seed))
    with torch.no_grad():
        y_clean = target(x)
        rms = y_clean.pow(2).mean().sqrt()
        noise = torch.randn(y_clean.shape, generator=seeded_generator("noise", seed, cell.examples))
        y = y_clean + cell.noise * rms * noise
        y_val, y_test = target(x_val), target(x_test)
        base_loss = float((base(x_test) - y_test).pow(2).mean())
    return Task(cell, seed, base, x, y, x_val, y_val, x_test, y_test, base_loss)


def batch_indices(task: Task, setting: Setting) -> torch.Tensor:
    """The ``steps x batch_size`` example indices of the task's training run (drawn uniformly with
    replacement from the task's seed, so every method and learning rate sees the same batches)."""
    g = seeded_generator("batches", task.seed, task.cell.examples)
    return torch.randint(0, task.cell.examples, (setting.steps, setting.batch_size), generator=g)
