"""The MoLF layer: one dense FFT expert (the base ``nn.Linear``) plus LoRA experts, all in the forward.

    y = W x + b + sum_i s_i * B_i A_i dropout(x)

Expert 0 ("fft") is the base weight ``W`` (and its bias); expert i >= 1 ("lora{i-1}") is the pair
``(lora_A[i-1], lora_B[i-1])`` of rank ``r_i`` with scale ``s_i = alpha_i / sqrt(r_i)`` (rsLoRA) or
``alpha_i / r_i`` (classic LoRA). ``A`` starts Kaiming-uniform (a = sqrt(5), as ``nn.Linear`` does),
``B`` starts at zero, so a freshly wrapped layer computes exactly what the base layer computed.
The forward is dense: every expert gets its exact gradient every step; the sparsity of MoLF lives in
the optimizer (``molf.optim.MoLFAdamW``), not here.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _validate

FFT_EXPERT = "fft"


def lora_expert_name(index: int) -> str:
    return f"lora{index}"


def check_experts(ranks, alphas, dropout: float = 0.0) -> tuple[tuple[int, ...], tuple[float, ...], float]:
    """Validate the LoRA experts' settings (as ``MoLFLinear`` takes them); return them as tuples."""
    ranks, alphas = tuple(ranks), tuple(alphas)
    if len(ranks) == 0:
        raise ValueError("ranks is empty: give at least one LoRA rank, e.g. ranks=(128,)")
    if len(alphas) != len(ranks):
        raise ValueError(f"alphas {alphas} has {len(alphas)} entries but ranks {ranks} has {len(ranks)}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {r!r} in ranks={ranks}")
    for a in alphas:
        if not _validate.is_number(a, positive=True):
            raise ValueError(f"LoRA alpha must be a positive finite number, got {a!r} in alphas={alphas}")
    return ranks, alphas, _validate.fraction("dropout", dropout)


@torch.no_grad()
def lora_delta(As, Bs, scales) -> torch.Tensor:
    """``sum_i s_i B_i A_i`` in float32 (d_out x d_in, on the experts' device): the one merge formula,
    for ``MoLFLinear.merge`` and for merging a gathered state dict (``molf.distributed``)."""
    As, Bs = list(As), list(Bs)
    delta = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=torch.float32, device=As[0].device)
    for A, B, scale in zip(As, Bs, scales):
        delta.addmm_(B.float(), A.float(), alpha=scale)
    return delta


class MoLFLinear(nn.Module):
    """Wraps ``base_layer`` (an ``nn.Linear``) with LoRA experts of the given ranks.

    Attributes: ``base_layer``, ``lora_A`` / ``lora_B`` (``nn.ModuleList`` of bias-free ``nn.Linear``),
    ``ranks``, ``alphas``, ``scales``, ``merged``. LoRA experts live on the base layer's device and
    dtype. Dropout acts on the LoRA paths only.
    """

    def __init__(self, base_layer: nn.Linear, ranks, alphas, rslora: bool = True, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"MoLFLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        ranks, alphas, dropout = check_experts(ranks, alphas, dropout)

        self.base_layer = base_layer
        self.ranks = ranks
        self.alphas = alphas
        self.rslora = rslora
        self.scales = tuple(a / math.sqrt(r) if rslora else a / r for a, r in zip(alphas, ranks))
        self.merged = False
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.ModuleList(nn.Linear(base_layer.in_features, r, bias=False, **factory) for r in ranks)
        self.lora_B = nn.ModuleList(nn.Linear(r, base_layer.out_features, bias=False, **factory) for r in ranks)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        for A, B in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)

    @property
    def expert_names(self) -> tuple[str, ...]:
        """Names of all experts, the FFT expert first: ``("fft", "lora0", "lora1", ...)``."""
        return (FFT_EXPERT,) + tuple(lora_expert_name(i) for i in range(len(self.ranks)))

    def expert_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of every expert by name (the FFT expert holds the base weight and bias)."""
        experts = {FFT_EXPERT: [p for p in (self.base_layer.weight, self.base_layer.bias) if p is not None]}
        for i, (A, B) in enumerate(zip(self.lora_A, self.lora_B)):
            experts[lora_expert_name(i)] = [A.weight, B.weight]
        return experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        x = self.dropout(x)
        for A, B, scale in zip(self.lora_A, self.lora_B, self.scales):
            y = y + scale * B(A(x))
        return y

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``sum_i s_i B_i A_i`` in float32 (d_out x d_in), by ``lora_delta``."""
        return lora_delta((A.weight for A in self.lora_A), (B.weight for B in self.lora_B), self.scales)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold every LoRA expert into the base weight (``W <- W + sum_i s_i B_i A_i``, summed in float32).

        Returns the base layer. The wrapper keeps its LoRA weights and from now on computes only the
        base layer, so ``unmerge()`` can undo it; ``molf.merge(model)`` also swaps the base layer back in.
        """
        if self.merged:
            raise ValueError("this MoLFLinear is already merged")
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True
        return self.base_layer

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the LoRA experts from the base weight again (exact up to float rounding)."""
        if not self.merged:
            raise ValueError("this MoLFLinear is not merged")
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, scales={tuple(round(s, 4) for s in self.scales)}, merged={self.merged}"
