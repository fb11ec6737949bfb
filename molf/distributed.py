"""MoLF on several processes: torchrun (DDP, FSDP2 ``fully_shard``) and Hugging Face Accelerate.

The algorithm does not change; only where the numbers live does.

- **DDP** averages gradients before ``step()``, so every rank holds the same moments and reaches the
  same decisions on its own. Nothing is reduced by the optimizer (``process_group`` stays None).
- **FSDP2** gives each rank a shard of every expert. ``MoLFAdamW`` sees DTensor parameters, sums its
  scores over the local shard and all-reduces the per-expert sums before the top-k decision; ``N_e``
  is the global parameter count. Build the optimizer *after* sharding (``fully_shard`` swaps the
  parameters for DTensor ones).
- Merging and saving gathers the full weights first (``merge_and_save``); logs are written by rank 0.

Every function here also works in a single process (no process group), where it is the identity.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.distributed as dist
from torch import nn

from . import routing_log
from .layer import lora_delta
from .model import wrapped_modules
from .routing_log import RoutingRecord, require_molf_optimizer


# ---------------------------------------------------------------- who am I
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on global rank 0, and in a single process."""
    return rank() == 0


def main_process_only(fn):
    """Decorator: run ``fn`` on rank 0 only (other ranks get None). For loggers and writers."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None
    return wrapper


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first, the others after it (downloads, caches, data preparation)."""
    if is_distributed() and not is_main_process():
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main_process():
            dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model under DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers.

    FSDP2 ``fully_shard`` works in place (the model keeps its class as a base), so it needs no unwrapping.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------- FSDP2
def shard(model: nn.Module, mesh=None, units=None, **fsdp_kwargs) -> nn.Module:
    """``fully_shard`` ``units`` (default: every ``MoLFLinear``, so each wrapped layer is one FSDP unit
    holding its FFT and LoRA experts) and then the root, in place; return ``model``.

    Pass the decoder layers as ``units`` for the usual one-unit-per-block layout. Routing does not
    depend on the layout: every expert is sharded either way and its score sums are all-reduced.
    Build the optimizer (``molf.param_groups``) afterwards.
    """
    from torch.distributed.fsdp import fully_shard

    units = list(wrapped_modules(model).values()) if units is None else list(units)
    for unit in units:
        fully_shard(unit, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


# ---------------------------------------------------------------- routing checks and logs
def routing_agrees(optimizer, group=None) -> bool:
    """Collective: True when every rank reached the same decisions at the last step.

    Under DDP and FSDP they must; a False here means the ranks see different moments (e.g. the
    optimizer was built before ``fully_shard``, or gradients were not synchronised).
    """
    mine = sorted(require_molf_optimizer(optimizer).last_decisions.items())
    if not is_distributed():
        return True
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return all(other == mine for other in everyone)


@main_process_only
def write_routing_log(path, optimizer, step: int, **extra) -> None:
    """Append the last step's routing to the log at ``path`` (``molf.routing_log`` format), on rank 0 only.

    ``extra`` keys (``loss=...``) are stored beside the record's own. Every rank holds the same routing
    under DDP and FSDP, so rank 0's view is the whole story.
    """
    molf_optimizer = require_molf_optimizer(optimizer)
    lr = molf_optimizer.param_groups[0]["lr"]
    routing_log.append(path, RoutingRecord.from_optimizer(molf_optimizer, step, lr=lr, **extra))


# ---------------------------------------------------------------- gather, merge, save
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) state dict on CPU on rank 0, ``{}`` on the other ranks.

    Works for FSDP2, DDP and plain models; keys are the plain model's (no ``module.`` prefix).
    """
    if not is_distributed():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@torch.no_grad()
def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the LoRA experts of a full MoLF ``state_dict`` into the base weights, as ``molf.merge`` does
    (``W <- W + sum_i s_i B_i A_i`` in float32), and rename the keys to the plain model's.

    ``model`` (any rank's copy, sharded or not) only supplies the wrapped layers' names and scales.
    """
    state_dict = dict(state_dict)
    for name, layer in wrapped_modules(unwrap(model)).items():
        weight = state_dict.pop(f"{name}.base_layer.weight")
        As = [state_dict.pop(f"{name}.lora_A.{i}.weight") for i in range(len(layer.scales))]
        Bs = [state_dict.pop(f"{name}.lora_B.{i}.weight") for i in range(len(layer.scales))]
        if not layer.merged:  # a merged layer's base weight already holds its experts
            weight = (weight.float() + lora_delta(As, Bs, layer.scales)).to(weight.dtype)
        state_dict[f"{name}.weight"] = weight
        if f"{name}.base_layer.bias" in state_dict:
            state_dict[f"{name}.bias"] = state_dict.pop(f"{name}.base_layer.bias")
    return state_dict


def _plain_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 makes a subclass ``FSDP<Name>`` of it in place."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def merge_and_save(model: nn.Module, path) -> dict[str, torch.Tensor] | None:
    """Collective (call it on every rank): gather the full weights, merge the MoLF experts and write a
    plain checkpoint from rank 0. Returns the merged state dict on rank 0, None elsewhere.

    A ``transformers`` model is saved with ``save_pretrained`` (config, weights, generation config), so
    ``AutoModelForCausalLM.from_pretrained(path)`` loads it with no trace of MoLF. Any other model is
    written as ``path/model.safetensors``. The training model is left as it was (still wrapped and
    sharded), so training can go on.
    """
    full = full_state_dict(model)
    merged = None
    if is_main_process():
        inner = unwrap(model)
        merged = merged_state_dict(inner, full)
        os.makedirs(path, exist_ok=True)
        if hasattr(inner, "save_pretrained") and hasattr(inner, "config"):
            with torch.device("meta"):
                plain = _plain_class(inner)(inner.config)
            plain.load_state_dict(merged, assign=True)
            plain.tie_weights()
            plain.save_pretrained(path)
        else:
            from safetensors.torch import save_file

            # clone: safetensors refuses tensors that share memory (tied weights)
            save_file({k: v.contiguous().clone() for k, v in merged.items()},
                      os.path.join(path, "model.safetensors"))
    if is_distributed():
        dist.barrier()  # nobody reads the checkpoint before rank 0 has written it
    return merged
