"""Turning a model into a MoLF model and back: ``wrap``, ``param_groups``, ``merge``."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import _validate
from .layer import FFT_EXPERT, MoLFLinear, check_experts

DEFAULT_ALPHA = 32.0  # the paper's MoLF setting for every LoRA expert


def wrapped_modules(model: nn.Module) -> dict[str, MoLFLinear]:
    """Every ``MoLFLinear`` of ``model`` by its qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLFLinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _tied_elsewhere(model: nn.Module, chosen: list[str]) -> dict[str, list[str]]:
    """For each chosen linear whose weight or bias is also used outside it (tied, as an output head to
    the input embedding), the qualified names of those other uses. Ties are found by tensor identity and
    by the same memory (a tensor sharing another's data, not merely its storage)."""
    def storage(p):
        return None if p.device.type == "meta" or p.numel() == 0 else (p.device, p.data_ptr())

    owners: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        for key in (id(p), storage(p)):
            if key is not None:
                owners.setdefault(key, []).append(name)
    tied = {}
    for module_name in chosen:
        for p in model.get_submodule(module_name).parameters(recurse=False):
            others = {o for key in (id(p), storage(p)) if key is not None for o in owners[key]
                      if o.rpartition(".")[0] != module_name}
            if others:
                tied[module_name] = sorted(others)
    return tied


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def wrap(model: nn.Module, ranks=(128,), alphas=None, rslora: bool = True, dropout: float = 0.0,
         targets="all-linear", exclude=("lm_head",), train_base: bool = True,
         freeze_non_linear: bool = False) -> nn.Module:
    """Replace the target ``nn.Linear`` layers of ``model`` by ``MoLFLinear`` in place; return ``model``.

    ranks             one LoRA expert per entry (the paper's MoLF: ``(128,)``).
    alphas            one per rank; default 32 for every expert (the paper's MoLF setting).
    rslora            scale ``alpha / sqrt(r)`` (default) or classic ``alpha / r``.
    targets           ``"all-linear"`` (every ``nn.Linear`` not in ``exclude``) or a list of module-name
                      suffixes such as ``["q_proj", "v_proj"]``.
    exclude           module-name suffixes never wrapped (``lm_head`` by default). A layer whose weight is
                      tied to another module's (an output head tied to the embedding) is refused, named.
    train_base=False  MoLF-Efficient: the base weight (the FFT expert) is frozen and each module routes
                      between its LoRA experts, so it needs two or more of them.
    freeze_non_linear freeze everything outside the wrapped layers (embeddings, norms, lm_head), for a
                      truly parameter-efficient run. Otherwise they train densely with plain AdamW.

    Every argument is checked and every new layer built before the model is touched: on an error the
    model is exactly as it was (nothing frozen, nothing replaced).
    """
    ranks = tuple(ranks) if isinstance(ranks, (list, tuple)) else (ranks,)
    alphas = tuple(DEFAULT_ALPHA for _ in ranks) if alphas is None else (
        tuple(alphas) if isinstance(alphas, (list, tuple)) else (alphas,))
    ranks, alphas, dropout = check_experts(ranks, alphas, dropout)
    if not train_base and len(ranks) < 2:
        raise ValueError(f"train_base=False (MoLF-Efficient) routes between LoRA experts and needs at "
                         f"least two ranks, got ranks={ranks}")
    if wrapped_modules(model):
        raise ValueError("model is already wrapped with MoLF; wrap it once (molf.merge(model) undoes it)")
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ValueError(f"targets must be 'all-linear' or a list of module-name suffixes, got {targets!r}")
        suffixes = None
    else:
        suffixes = tuple(targets)
        if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
            raise ValueError(f"targets must be 'all-linear' or a non-empty list of module-name suffixes, "
                             f"got {targets!r}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())

    chosen = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name
              and not _matches(name, exclude)
              and (suffixes is None or _matches(name, suffixes))]
    if not chosen:
        raise ValueError(f"targets={targets!r} (exclude={exclude!r}) match no nn.Linear in the model")

    tied = _tied_elsewhere(model, chosen)
    if tied:
        name, others = next(iter(tied.items()))
        raise ValueError(f"{name!r} shares its weight with {others} (tied weights): routing and merging it "
                         f"would change those too. Leave it out (exclude=({name.rpartition('.')[2]!r},)) "
                         f"or untie it first")
    # Build every layer first (this only reads the model), then change the model.
    layers = {name: MoLFLinear(model.get_submodule(name), ranks, alphas, rslora=rslora, dropout=dropout)
              for name in chosen}
    if freeze_non_linear:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, layer in layers.items():
        layer.base_requires_grad = layer.base_layer.weight.requires_grad if not freeze_non_linear else True
        for p in layer.expert_parameters()[FFT_EXPERT]:
            p.requires_grad_(train_base)
        _set_submodule(model, name, layer)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Merge every MoLF layer into its base weight and put the plain ``nn.Linear`` back; return ``model``.

    Afterwards the model holds no trace of MoLF and saves as an ordinary ``transformers`` checkpoint.
    Base weights get their requires_grad flag from before wrapping back.
    """
    layers = wrapped_modules(model)
    if not layers:
        raise ValueError("model has no MoLF layers to merge (was it wrapped with molf.wrap?)")
    for name, layer in layers.items():
        base = layer.merge()
        for p in base.parameters():
            p.requires_grad_(getattr(layer, "base_requires_grad", True))
        _set_submodule(model, name, base)
    return model


def no_weight_decay(name: str, param) -> bool:
    """The one weight-decay rule for parameters outside the experts: no decay for biases, norms and
    every parameter with fewer than two dimensions (``name`` as in ``model.named_parameters()``)."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, lr_fft: float, lr_lora: float, wd_fft: float = 0.1,
                 wd_lora: float = 0.01) -> list[dict]:
    """Optimizer parameter groups for ``MoLFAdamW``.

    One group per wrapped module, holding all its trainable experts. The group's ``lr`` is the
    reference the LR scheduler scales: ``lr_fft`` when the FFT expert trains, ``lr_lora`` under
    MoLF-Efficient; each expert's learning rate is ``group["lr"] * group["expert_lr_scale"][e]``, so a
    scheduler moves both by the same factor. Weight decay is per parameter
    (``group["param_weight_decay"]``): ``wd_fft`` on the base weight, none on its bias, ``wd_lora`` on
    the LoRA matrices. Then two plain AdamW groups for everything else that trains, at ``lr_fft``:
    weights with ``wd_fft``, norms/biases/1-D parameters with no decay (``no_weight_decay``).
    """
    lr_fft = _validate.number("lr_fft", lr_fft, positive=True)
    lr_lora = _validate.number("lr_lora", lr_lora, positive=True)
    wd_fft = _validate.number("wd_fft", wd_fft)
    wd_lora = _validate.number("wd_lora", wd_lora)
    layers = wrapped_modules(model)
    if not layers:
        raise ValueError("model has no MoLF layers; call molf.wrap(model, ...) before molf.param_groups")

    groups, in_layers = [], set()
    for module_name, layer in layers.items():
        experts, params, expert_of_param, decay = [], [], [], []
        for expert, expert_params in layer.expert_parameters().items():
            in_layers.update(id(p) for p in expert_params)
            trainable = [p for p in expert_params if p.requires_grad]
            if not trainable:
                continue
            experts.append(expert)
            for p in trainable:
                params.append(p)
                expert_of_param.append(len(experts) - 1)
                is_bias = expert == FFT_EXPERT and p is layer.base_layer.bias
                decay.append(0.0 if is_bias else (wd_fft if expert == FFT_EXPERT else wd_lora))
        if not params:
            continue
        group_lr = lr_fft if experts[0] == FFT_EXPERT else lr_lora
        groups.append({
            "params": params,
            "lr": group_lr,
            "molf_module": module_name,
            "experts": tuple(experts),
            "expert_lr_scale": tuple((lr_fft if e == FFT_EXPERT else lr_lora) / group_lr for e in experts),
            "param_expert": tuple(expert_of_param),
            "param_weight_decay": tuple(decay),
        })

    decay_params, plain_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in in_layers:
            (plain_params if no_weight_decay(name, p) else decay_params).append(p)
    if decay_params:
        groups.append({"params": decay_params, "lr": lr_fft, "weight_decay": wd_fft})
    if plain_params:
        groups.append({"params": plain_params, "lr": lr_fft, "weight_decay": 0.0})
    return groups
