"""The parameter groups of ``MoLFAdamW``: their settings checked, and a checkpoint's matched to them.

A group's settings (``lr``, ``betas``, ``eps``, ``weight_decay``, ``topk``, ``score``, ``impl``) are
checked when the group is added and when a checkpoint brings its own, so a bad value fails with its
name before anything changes. ``score`` is kept as a name (``molf.router.score_key``), so that a state
dict holds no code; a callable given to the optimizer and registered nowhere is remembered by it
(``Scores``) under its name.
"""
from __future__ import annotations

import torch

from . import _validate, router

IMPLS = ("auto", "chunked", "compiled", "foreach", "masked")


class Scores:
    """The scores one optimizer can use: the registered ones and the callables it was given."""

    def __init__(self):
        self.custom: dict = {}

    def adopt(self, score) -> str:
        """The name of ``score`` (a name, a ``Score`` or a callable); ``ValueError`` when it is unknown."""
        if not (callable(score) or isinstance(score, str)):
            raise ValueError(f"score must be a name or a callable score(RouterStats) -> Tensor, got {score!r}")
        name = router.name_of(score)
        if callable(score) and router.SCORES.get(name) is not score:
            self.custom[name] = score
        self(name)
        return name

    def __call__(self, name: str):
        """The callable behind ``name``."""
        return self.custom.get(name) or router.resolve_score(name)


def checked(group: dict, scores: Scores) -> dict:
    """A copy of ``group`` with every setting validated; ``ValueError`` naming the bad one."""
    g = dict(group)
    if g["lr"] is None:
        raise ValueError("a parameter group has no lr; give lr= to MoLFAdamW or set it in the group")
    for key in ("lr", "eps", "weight_decay"):
        g[key] = _validate.number(key, g[key], positive=key == "eps")
    g["betas"], g["topk"] = _validate.betas(g["betas"]), _validate.integer("topk", g["topk"])
    g["score"] = scores.adopt(g["score"])
    if g["impl"] not in IMPLS:
        raise ValueError(f"impl must be one of {tuple(i for i in IMPLS if i != 'compiled')}, got "
                         f"{g['impl']!r}, or 'compiled' (the C++ kernels of the CPU path)")
    if g["impl"] in ("chunked", "compiled") and not isinstance(scores(g["score"]), router.Score):
        raise ValueError(f"impl={g['impl']!r} sums the score's per-element term chunk by chunk, but score "
                         f"{g['score']!r} is a plain callable with no term: write it as a "
                         f"molf.router.Score, or use impl='auto', 'foreach' or 'masked'")
    if "molf_module" in g:
        n, name = len(g["experts"]), g["molf_module"]
        if g["topk"] > n:
            raise ValueError(f"topk={g['topk']} exceeds the {n} experts {tuple(g['experts'])} of module "
                             f"{name!r}; use 1 <= topk <= {n}")
        if not len(g["param_expert"]) == len(g["param_weight_decay"]) == len(g["params"]):
            raise ValueError(f"group of module {name!r}: param_expert and param_weight_decay need one "
                             f"entry per parameter")
        for key in ("param_weight_decay", "expert_lr_scale"):
            g[key] = tuple(_validate.number(key, x) for x in g[key])
    return g


def check_together(groups: list[dict]) -> None:
    """One score and one impl route every module (the step routes them all at once); a module is
    routed by one group."""
    for key in ("score", "impl"):
        if len({g[key] for g in groups}) > 1:
            raise ValueError(f"every parameter group must use the same {key} (the step routes all modules "
                             f"at once), got {[g[key] for g in groups]}")
    names = [g["molf_module"] for g in groups if "molf_module" in g]
    if len(set(names)) < len(names):
        raise ValueError(f"module {next(n for n in names if names.count(n) > 1)!r} is in two parameter groups")


def _describe(group: dict, index: int) -> str:
    name = group.get("molf_module")
    return f"group {index} (module {name!r})" if name is not None else f"group {index} (plain)"


def check_checkpoint(groups: list[dict], state_dict: dict) -> None:
    """``ValueError`` unless the optimizer state ``state_dict`` was saved from groups like ``groups``: the
    same number of groups, each routing the same module (by name) with the same experts and the same
    parameters per expert, and every saved moment of the shape of its parameter."""
    saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        raise ValueError("not an optimizer state dict: it needs 'param_groups' (a list) and 'state' (a dict)")
    if len(saved_groups) != len(groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(groups)}: {[g.get('molf_module', 'plain') for g in saved_groups]} vs "
                         f"{[g.get('molf_module', 'plain') for g in groups]}")
    for i, (g, s) in enumerate(zip(groups, saved_groups)):
        where = _describe(g, i)
        if not isinstance(s, dict) or not isinstance(s.get("params"), list):
            raise ValueError(f"{where}: the checkpoint's group is not a dict with a 'params' list")
        for key in ("molf_module", "experts", "param_expert"):
            mine, theirs = g.get(key), s.get(key)
            if (tuple(mine) if isinstance(mine, (list, tuple)) else mine) != \
                    (tuple(theirs) if isinstance(theirs, (list, tuple)) else theirs):
                raise ValueError(f"{where}: the checkpoint's {key} is {theirs!r}, this optimizer's {mine!r}")
        if len(s["params"]) != len(g["params"]):
            raise ValueError(f"{where}: the checkpoint has {len(s['params'])} parameters, this optimizer "
                             f"{len(g['params'])}")
        for j, (index, p) in enumerate(zip(s["params"], g["params"])):
            st = saved_state.get(index)
            if st is None:
                continue
            expert = f" expert {g['experts'][g['param_expert'][j]]!r}" if "molf_module" in g else ""
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if not isinstance(st, dict) or not isinstance(st.get(key), torch.Tensor):
                    raise ValueError(f"{where}{expert} parameter {j}: the checkpoint's state has no tensor {key!r}")
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(st[key].shape) != tuple(p.shape):
                    raise ValueError(f"{where}{expert} parameter {j}: the checkpoint's {key} has shape "
                                     f"{tuple(st[key].shape)}, the parameter {tuple(p.shape)}")
