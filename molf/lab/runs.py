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


# The routing log without its scores: one row per step, one column per module, each cell the module's
# experts in order with a "*" before each winner ("*fft|lora0": the FFT expert won). A 150-step run of
# SmolLM2 fits in a few KB gzipped (routing.jsonl, with every score, is ~5 MB), so unlike the log it is
# a committed record: the routing dynamics can be recomputed on a clone without the run's logs.
WINNERS_FILE = "routing_winners.csv.gz"


def write_winners(run_dir: str | Path) -> Path:
    """Write ``routing_winners.csv.gz`` from the run's ``routing.jsonl``; return its path. The bytes
    depend on the log alone (no timestamp in the gzip header)."""
    run_dir = Path(run_dir)
    records = routing_log.read(run_dir / "routing.jsonl")
    modules = list(dict.fromkeys(m for r in records for m in r.scores))
    rows = [{"step": r.step, "lr": r.lr,
             **{m: "|".join(("*" if e in r.winners.get(m, ()) else "") + e for e in r.scores[m])
                for m in modules if m in r.scores}} for r in records]
    path = run_dir / WINNERS_FILE
    pd.DataFrame(rows, columns=["step", "lr", *modules]).to_csv(
        path, index=False, compression={"method": "gzip", "mtime": 0})
    return path


def read_winners(path: str | Path) -> pd.DataFrame:
    """``routing_winners.csv.gz`` as ``read_routing``'s long table, with ``score`` NaN (not recorded)."""
    wide = pd.read_csv(path)
    records = []
    for row in wide.itertuples(index=False):
        step, lr, cells = row[0], row[1], row[2:]
        for module, cell in zip(wide.columns[2:], cells):
            if isinstance(cell, str):
                for expert in cell.split("|"):
                    records.append((int(step), module, expert.lstrip("*"), float("nan"), expert.startswith("*"),
                                    None if pd.isna(lr) else float(lr)))
    frame = pd.DataFrame(records, columns=["step", "module", "expert", "score", "won", "lr"])
    return _with_module_columns(frame)


def has_routing(run_dir: str | Path) -> bool:
    """Whether the run has a routing record: its ``routing.jsonl`` or the committed winners file."""
    return (Path(run_dir) / "routing.jsonl").is_file() or (Path(run_dir) / WINNERS_FILE).is_file()


@dataclass
class RunData:
    path: Path
    config: dict
    metrics: dict | None
    steps: pd.DataFrame
    grad_norms: pd.DataFrame | None
    routing: pd.DataFrame | None


def load(path: str | Path) -> RunData:
    """Everything a run directory holds, as pandas DataFrames (missing logs are ``None``). The routing
    comes from ``routing.jsonl``, else from ``routing_winners.csv.gz`` (who won, without the scores)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a run directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else None
    steps = pd.read_csv(path / "steps.csv")
    grad_norms = None
    if (path / "grad_norms.csv").is_file():
        grad_norms = _with_module_columns(pd.read_csv(path / "grad_norms.csv"))
    routing = None
    if (path / "routing.jsonl").is_file():
        routing = read_routing(path / "routing.jsonl")
    elif (path / WINNERS_FILE).is_file():
        routing = read_winners(path / WINNERS_FILE)
    return RunData(path, config, metrics, steps, grad_norms, routing)
