"""Reading run directories (written by ``molf.lab.train.run`` or ``molf.hf.MoLFTrainer``) into pandas."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import routing_log

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def module_layer(name: str) -> int:
    """Decoder layer index of a module name (``model.layers.3.mlp.up_proj`` -> 3), -1 if none."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else -1


def module_type(name: str) -> str:
    """Last component of a module name: ``q_proj``, ``up_proj``, ..."""
    return name.rsplit(".", 1)[-1]


def _with_module_columns(frame: pd.DataFrame) -> pd.DataFrame:
    if not frame.empty:
        frame.insert(frame.columns.get_loc("module") + 1, "layer", frame["module"].map(module_layer))
        frame.insert(frame.columns.get_loc("layer") + 1, "module_type", frame["module"].map(module_type))
    return frame


def read_routing(path: str | Path) -> pd.DataFrame:
    """``routing.jsonl`` as a long table: step, module, layer, module_type, expert, score, won, lr."""
    records = []
    for row in routing_log.read(path):
        for module, scores in row.scores.items():
            winners = set(row.winners.get(module, ()))
            for expert, score in scores.items():
                records.append((row.step, module, expert, score, expert in winners, row.lr))
    frame = pd.DataFrame(records, columns=["step", "module", "expert", "score", "won", "lr"])
    return _with_module_columns(frame)


@dataclass
class RunData:
    path: Path
    config: dict
    metrics: dict | None
    steps: pd.DataFrame
    grad_norms: pd.DataFrame | None
    routing: pd.DataFrame | None


def load(path: str | Path) -> RunData:
    """Everything a run directory holds, as pandas DataFrames (missing logs are ``None``)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a run directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else None
    steps = pd.read_csv(path / "steps.csv")
    grad_norms = None
    if (path / "grad_norms.csv").is_file():
        grad_norms = _with_module_columns(pd.read_csv(path / "grad_norms.csv"))
    routing = read_routing(path / "routing.jsonl") if (path / "routing.jsonl").is_file() else None
    return RunData(path, config, metrics, steps, grad_norms, routing)
