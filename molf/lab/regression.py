"""Golden numbers of the notebook suite's regression mode, and the check against them.

Each notebook writes its key numbers to ``<runs_dir>/<notebook>.json``. :func:`key_numbers` picks from
them what a regression shows in: win shares (overall and per module type), switch rates, final losses,
task metrics and sizes, each named readably ("fft win share of k_proj"). The golden file of a notebook
(``<golden_dir>/<notebook>.json``) holds these with the tolerance of each:

    python -m molf.lab.suite --tiny --check           # run, then compare with the golden files
    python -m molf.lab.suite --tiny --update-golden   # run, then rewrite them (on purpose)

Decisions can flip on near-ties from one CPU to another, so single routing decisions are never compared,
only shares of many (see :data:`TOLERANCES`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# kind -> (absolute tolerance, why); a key's kind follows from its name (``_kind``).
TOLERANCES = {
    "run share": (0.05, "a share of all 112 decisions of a run (14 modules x 8 steps): about 5 flipped decisions"),
    "part share": (0.13, "a share of one module type (2 layers x 8 steps = 16 decisions), a window of steps "
                         "(14 modules x 2 steps = 28) or one step (14): about two flipped decisions"),
    "switch rate": (0.15, "a share of 14 step-to-step transitions (2 layers x 7): two extra switches"),
    "loss": (2e-3, "nats per token; float rounding moves it by ~1e-6, a changed routing by ~1e-3 or more"),
    "metric": (0.26, "fractions of the 4 evaluation examples: one example may flip on a near-tie"),
    "exact": (0.0, "sizes and counts: integers that only a code change moves"),
}
_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _kind(key: str) -> str:
    if "switch rate" in key:
        return "switch rate"
    if "win share of" in key or "win share in steps" in key or "win share at step" in key:
        return "part share"
    if "win share" in key:
        return "run share"
    if "loss" in key:
        return "loss"
    if key.startswith(("trainable params", "modules", "steps", "wrap ", "live steps")):
        return "exact"
    return "metric"


def _type_shares(cells, expert_label: str, suffix: str = "") -> dict:
    """Mean win fraction per module type of a routing heatmap (``analysis.heatmap_cells``)."""
    by_type: dict[str, list[float]] = {}
    for cell in cells or []:
        by_type.setdefault(cell["module_type"], []).append(cell["win_fraction"])
    order = sorted(by_type, key=lambda t: (_TYPES.index(t) if t in _TYPES else len(_TYPES), t))
    return {f"{expert_label} win share of {t}{suffix}": sum(by_type[t]) / len(by_type[t]) for t in order}


def _metrics(metrics, suffix: str = "") -> dict:
    return {f"{k}{suffix}": v for k, v in (metrics or {}).items() if k != "n" and isinstance(v, (int, float))}


def _switch_by_type(switch_rate: dict, suffix: str = "") -> dict:
    by_type: dict[str, list[float]] = {}
    for module, rate in switch_rate.items():
        by_type.setdefault(module.rsplit(".", 1)[-1], []).append(rate)
    return {f"switch rate of {t}{suffix}": sum(v) / len(v) for t, v in by_type.items()}


def key_numbers(results: dict) -> dict[str, float]:
    """The numbers of one notebook's results that the regression check compares, by readable name."""
    name = results["notebook"]
    out: dict[str, float] = {}
    if name == "00_quickstart":
        out.update({"steps": results["steps"], "modules wrapped": results["n_wrapped_modules"],
                    "wrap max |logits change|": results["wrap_max_abs_diff"], "final loss": results["final_loss"],
                    "fft win share": results["win_share"]["fft"]})
        out.update(_metrics(results["metrics"]))
        out.update(_type_shares(results["routing_heatmap"], "fft"))
    elif name == "01_train":
        out.update({"steps": results["steps"], "final loss": results["final_loss"],
                    "trainable params": results["trainable_params"]})
        out.update(_metrics(results["metrics"]))
        if results.get("win_share"):
            out["fft win share"] = results["win_share"].get("fft", 0.0)
            out.update(_type_shares(results["routing_heatmap"], "fft"))
    elif name == "02_routing_dynamics":
        out["fft win share"] = results["win_share"]["fft"]
        out.update(_type_shares(results["routing_heatmap"], "fft"))
        for w in results["routing_over_time"]:
            out[f"fft win share in steps {w['step_start']}-{w['step_end']}"] = w["fft_win_fraction"]
        out["mean switch rate"] = results["mean_switch_rate"]
        out.update(_switch_by_type(results["switch_rate"]))
        other = results["contrast"]["score"].upper()
        out[f"fft win share ({other})"] = results["contrast"]["win_share"]["fft"]
        out.update(_type_shares(results["contrast"]["routing_heatmap"], "fft", f" ({other})"))
    elif name == "03_compare_methods":
        for row in results["table"]:
            run = f" ({row['run']})"
            out[f"final loss{run}"] = row["final_loss"]
            if row.get("score") is not None:
                out[f"{row['primary_metric']}{run}"] = row["score"]
            out[f"trainable params{run}"] = row["trainable_params"]
        for run, cells in results["routing_heatmap"].items():
            expert = cells[0]["expert"] if cells else "fft"
            out.update(_type_shares(cells, expert, f" ({run})"))
    elif name == "04_router_explorer":
        out["fft win share"] = results["win_share"]["fft"]
        out.update(_type_shares(results["routing_heatmap"], "fft"))
        if results.get("live"):
            out["live steps"] = results["live"]["steps"]
            out["live final loss"] = results["live"]["final_loss"]
            out["live fft win share"] = results["live"]["win_share"]["fft"]
    elif name == "05_ablations":
        for row in results["ablations"]:
            setting = f" ({row['axis']} {row['setting']})"
            out[f"fft win share{setting}"] = row["fft_win_share"]
            out[f"mean switch rate{setting}"] = row["mean_switch_rate"]
            out[f"final loss{setting}"] = row["final_loss"]
            if row.get("metric") is not None:
                out[f"{row['primary_metric']}{setting}"] = row["metric"]
        for label, cells in results["routing_heatmap"].items():
            axis, setting = label.split(": ", 1)
            out.update(_type_shares(cells, "fft", f" ({axis} {setting})"))
    elif name == "06_why_an_expert_wins":
        out.update({"steps": results["steps"], "final loss": results["final_loss"],
                    "fft win share": results["win_share"]["fft"]})
        if results.get("pfn_first_step"):
            out["fft win share at step 0 under PFN"] = results["pfn_first_step"]["fft_win_share"]
        tilt = results.get("lr_tilt") or {}
        for ratio, share in zip(tilt.get("lr_ratios", []), tilt.get("lora_share_run", [])):
            out[f"lora win share (lr_lora / lr_fft {ratio:g}x)"] = share
        if results.get("classroom"):
            out["lora win share (classroom)"] = results["classroom"]["lora_win_share"]
    else:  # a notebook the suite does not know yet: every top-level number
        out.update({k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: float(v) for k, v in out.items()}


def golden_entry(results: dict, parameters: dict) -> dict:
    """What a golden file holds: the parameters of the run and each key number with its tolerance."""
    numbers = key_numbers(results)
    return {"notebook": results["notebook"], "parameters": parameters,
            "tolerances": {kind: {"abs": tol, "why": why} for kind, (tol, why) in TOLERANCES.items()},
            "numbers": {k: {"value": v, "tolerance": TOLERANCES[_kind(k)][0]} for k, v in numbers.items()}}


def write_golden(golden_dir, runs_dir, notebooks, parameters: dict) -> list[Path]:
    golden_dir = Path(golden_dir)
    golden_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in notebooks:
        results = json.loads((Path(runs_dir) / f"{name}.json").read_text())
        path = golden_dir / f"{name}.json"
        path.write_text(json.dumps(golden_entry(results, parameters), indent=1) + "\n")
        written.append(path)
    return written


def _fmt(value) -> str:
    if value is None:
        return "<absent>"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value)}"
    return f"{value:.4g}"


def compare(name: str, results: dict | None, golden: dict, parameters: dict | None = None) -> list[str]:
    """The differences of one notebook's results from its golden entry, one readable line each."""
    lines = []
    if parameters is not None and golden.get("parameters") is not None:
        wanted = json.loads(json.dumps(golden["parameters"]))
        given = json.loads(json.dumps(parameters))
        differ = sorted(k for k in wanted.keys() | given.keys() if wanted.get(k) != given.get(k))
        if differ:
            lines.append(f"{name}: run with other parameters than the golden numbers: "
                         + ", ".join(f"{k} {given.get(k)!r} (golden: {wanted.get(k)!r})" for k in differ))
    if results is None:
        return lines + [f"{name}: no results (<runs_dir>/{name}.json missing)"]
    numbers = key_numbers(results)
    for key, entry in golden["numbers"].items():
        expected, tolerance = entry["value"], entry["tolerance"]
        if key not in numbers:
            lines.append(f"{name}: {key} {_fmt(expected)} → <absent>")
            continue
        got = numbers[key]
        if not math.isfinite(got) or abs(got - expected) > tolerance + 1e-12:
            lines.append(f"{name}: {key} {_fmt(expected)} → {_fmt(got)}, tolerance {tolerance:g}")
    for key in numbers.keys() - golden["numbers"].keys():
        lines.append(f"{name}: {key} is new ({_fmt(numbers[key])}); not in the golden file")
    return lines


def check(runs_dir, golden_dir, notebooks, parameters: dict | None = None) -> list[str]:
    """Compare ``<runs_dir>/<notebook>.json`` with ``<golden_dir>/<notebook>.json`` for each notebook;
    return the differences (empty: the check passed)."""
    lines = []
    for name in notebooks:
        golden_path = Path(golden_dir) / f"{name}.json"
        if not golden_path.is_file():
            lines.append(f"{name}: no golden file {golden_path} (write them with --update-golden)")
            continue
        result_path = Path(runs_dir) / f"{name}.json"
        results = json.loads(result_path.read_text()) if result_path.is_file() else None
        lines += compare(name, results, json.loads(golden_path.read_text()), parameters)
    return lines
