"""Reading run directories (written by ``molf.lab.train.run`` or ``molf.hf.MoLFTrainer``) into pandas,
and cutting a run's logs back to a checkpoint (``truncate_logs``).

Every reader validates what it reads and names the file, and the line where there is one, of the first
record that is not what the runner writes: a torn (unterminated) last line, a value of the wrong type, a
missing key, a step out of sequence. Steps count up from 0 by one, each once: a log with a missing or a
duplicated record is refused, never read as a run of another length. ``docs/run_directory.md`` lists
what a run directory guarantees.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..routing_log import RoutingRecord

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")

# The per-step logs the runner appends to, and the columns of the two CSV logs (their header line).
LOGS = ("steps.csv", "grad_norms.csv", "routing.jsonl")
STEPS_COLUMNS = ("step", "loss", "lr", "grad_norm", "step_time_s")
GRAD_NORMS_COLUMNS = ("step", "module", "expert", "grad_norm")
# What metrics.json must hold to mark a finished run (the runner writes more), with the allowed types.
METRICS_KEYS = {"method": (str,), "task": (str,), "model": (str,), "seed": (int,), "steps": (int,),
                "metrics": (dict,), "primary_metric": (str,)}


class RunDirectoryError(ValueError):
    """A file of a run directory is not what the runner writes. ``path`` names the file, ``line`` the
    1-based line of the bad record (None for the file as a whole)."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path, self.line = Path(path), line
        super().__init__(f"{path}{'' if line is None else f', line {line}'}: {message}")


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


# ---------------------------------------------------------------------------- lines and records
def _split_lines(path: Path, data: bytes) -> tuple[list[bytes], bytes | None]:
    """The newline-terminated lines of ``data`` (with their newlines) and the torn last line, if any."""
    lines = data.splitlines(keepends=True)
    torn = lines.pop() if lines and not lines[-1].endswith(b"\n") else None
    return lines, torn


def _text(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise RunDirectoryError(path, f"not UTF-8 text ({error.reason} at byte {error.start})", line) from None


def _torn_error(path: Path, line: int) -> RunDirectoryError:
    return RunDirectoryError(path, "the last line is incomplete (no newline: the writer stopped mid-line); "
                                   "resuming the run cuts it off (molf.lab.runs.truncate_logs)", line)


def _number(path: Path, line: int, column: str, text: str, integer: bool = False):
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise RunDirectoryError(path, f"{column} is {text!r}, not {kind}", line) from None
    if integer and value < 0:
        raise RunDirectoryError(path, f"{column} is {value}, a step is >= 0", line)
    return value


def _csv_header(path: Path, text: str, columns: tuple[str, ...], line: int = 1) -> list[str]:
    header = next(csv.reader([text]), [])
    if header[:len(columns)] != list(columns) or len(set(header)) != len(header):
        raise RunDirectoryError(path, f"the header is {header}; it must start with {list(columns)} "
                                      "(each column once)", line)
    return header


def _steps_row(path: Path, line: int, text: str, header: list[str]) -> dict:
    fields = next(csv.reader([text]), [])
    if len(fields) != len(header):
        raise RunDirectoryError(path, f"{len(fields)} fields where the header names {len(header)}: {text[:120]!r}",
                                line)
    row = {"step": _number(path, line, "step", fields[0], integer=True)}
    for column, value in zip(header[1:], fields[1:]):
        row[column] = _number(path, line, column, value)
    return row


def _grad_norms_row(path: Path, line: int, text: str, header: list[str]) -> dict:
    fields = next(csv.reader([text]), [])
    if len(fields) != len(header):
        raise RunDirectoryError(path, f"{len(fields)} fields where the header names {len(header)}: {text[:120]!r}",
                                line)
    step, module, expert, norm = fields[:4]
    if not module or not expert:
        raise RunDirectoryError(path, f"empty module or expert name: {text[:120]!r}", line)
    row = {"step": _number(path, line, "step", step, integer=True), "module": module, "expert": expert,
           "grad_norm": _number(path, line, "grad_norm", norm)}
    for column, value in zip(header[4:], fields[4:]):
        row[column] = value
    return row


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _routing_row(path: Path, line: int, text: str) -> RoutingRecord:
    """One routing-log line, its types checked as ``molf.routing_log`` writes them."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunDirectoryError(path, f"not JSON ({error.msg} at column {error.colno})", line) from None
    if not isinstance(row, dict):
        raise RunDirectoryError(path, f"a JSON {type(row).__name__}, not a routing record (an object)", line)
    missing = [k for k in ("step", "winners", "scores") if k not in row]
    if missing:
        raise RunDirectoryError(path, f"missing key(s) {missing} of a routing record", line)
    step, lr, winners, scores = row["step"], row.get("lr"), row["winners"], row["scores"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise RunDirectoryError(path, f"step is {step!r}, not an integer >= 0", line)
    if lr is not None and not _is_number(lr):
        raise RunDirectoryError(path, f"lr is {lr!r}, not a number or null", line)
    if not isinstance(scores, dict) or not all(
            isinstance(e, dict) and e and all(_is_number(s) for s in e.values()) for e in scores.values()):
        raise RunDirectoryError(path, "scores must map each module to {expert: number}", line)
    if not isinstance(winners, dict) or not all(
            isinstance(w, list) and all(isinstance(e, str) for e in w) for w in winners.values()):
        raise RunDirectoryError(path, "winners must map each module to a list of expert names", line)
    for module, won in winners.items():
        unknown = [e for e in won if e not in scores.get(module, {})]
        if unknown:
            raise RunDirectoryError(path, f"winner(s) {unknown} of {module} are not among its scored experts "
                                          f"{list(scores.get(module, {}))}", line)
    return RoutingRecord(step=step, lr=None if lr is None else float(lr),
                         winners={m: tuple(w) for m, w in winners.items()}, scores=scores,
                         extra={k: v for k, v in row.items() if k not in ("step", "lr", "winners", "scores")})


class _Sequence:
    """Checks that records come in steps 0, 1, 2, ... each step once; with ``keys``, that each step holds
    the same set of keys (a grad-norm row per module and expert) as step 0, each once."""

    def __init__(self, path: Path, keyed: bool = False):
        self.path, self.keyed = path, keyed
        self.step = -1           # the step of the current group
        self.first: set | None = None  # the keys of step 0
        self.keys: set = set()   # the keys of the current group
        self.line = 0

    def add(self, line: int, step: int, key=None) -> None:
        if step == self.step:
            if not self.keyed:
                raise RunDirectoryError(self.path, f"step {step} again (a duplicated record)", line)
            if key in self.keys:
                raise RunDirectoryError(self.path, f"step {step} has {key} again (a duplicated record)", line)
        elif step == self.step + 1:
            self._close(line)
            self.step, self.keys = step, set()
        elif step > self.step + 1:
            gap = f"step {self.step + 1}" if step == self.step + 2 else f"steps {self.step + 1}..{step - 1}"
            raise RunDirectoryError(self.path, f"step {step} follows step {self.step}: {gap} missing", line)
        else:
            raise RunDirectoryError(self.path, f"step {step} follows step {self.step} (a duplicated or "
                                               "out-of-order record)", line)
        self.keys.add(key)
        self.line = line

    def _close(self, line: int) -> None:
        """The current group is over: for keyed logs, it must hold step 0's keys."""
        if not self.keyed or self.step < 0:
            return
        if self.first is None:
            self.first = self.keys
        elif self.keys != self.first:
            lacking = sorted(self.first - self.keys, key=str)
            extra = sorted(self.keys - self.first, key=str)
            what = (f"lacks {len(lacking)} of step 0's {len(self.first)} records, e.g. {lacking[0]}" if lacking
                    else f"has {len(extra)} records step 0 lacks, e.g. {extra[0]}")
            raise RunDirectoryError(self.path, f"step {self.step} {what} (a missing record)", line)

    def finish(self, line: int) -> int:
        """End of the records: check the last group; return the number of steps."""
        self._close(line)
        return self.step + 1

    def complete_through(self, last: int) -> bool:
        """Whether steps 0..last are all in and complete (for keyed logs: the last group as big as step 0)."""
        if self.step != last:
            return False
        return not self.keyed or self.first is None or len(self.keys) == len(self.first)


def _describe(n: int) -> str:
    return "no steps" if n == 0 else f"{n} step{'s' if n != 1 else ''} (0..{n - 1})"


# ---------------------------------------------------------------------------- the readers
def _read_csv_log(path: Path, columns: tuple[str, ...], parse, keyed: bool) -> tuple[list[dict], list[str], int]:
    path = Path(path)
    lines, torn = _split_lines(path, path.read_bytes())
    if torn is not None:
        raise _torn_error(path, len(lines) + 1)
    if not lines:
        raise RunDirectoryError(path, f"the file is empty; a log starts with its header {list(columns)}")
    header = _csv_header(path, _text(path, lines[0], 1), columns)
    sequence, rows = _Sequence(path, keyed), []
    for number, raw in enumerate(lines[1:], start=2):
        row = parse(path, number, _text(path, raw, number), header)
        sequence.add(number, row["step"], (row["module"], row["expert"]) if keyed else None)
        rows.append(row)
    return rows, header, sequence.finish(len(lines) + 1)


def read_steps(path: str | Path) -> pd.DataFrame:
    """``steps.csv`` as a table: step (int), loss, lr, grad_norm, step_time_s (float), one row per step
    0, 1, 2, ...; a RunDirectoryError names the file and line of a bad record."""
    rows, header, _ = _read_csv_log(Path(path), STEPS_COLUMNS, _steps_row, keyed=False)
    frame = pd.DataFrame(rows, columns=header)
    return frame.astype({"step": "int64", **{c: "float64" for c in header[1:]}})


def read_grad_norms(path: str | Path) -> pd.DataFrame:
    """``grad_norms.csv`` as a table: step, module, layer, module_type, expert, grad_norm; every step
    holds one row per (module, expert) of step 0, each once."""
    rows, header, _ = _read_csv_log(Path(path), GRAD_NORMS_COLUMNS, _grad_norms_row, keyed=True)
    frame = pd.DataFrame(rows, columns=header).astype({"step": "int64", "grad_norm": "float64"})
    return _with_module_columns(frame)


def read_routing_records(path: str | Path) -> list[RoutingRecord]:
    """Every record of a routing log, validated: one JSON object per line with the log's keys and types,
    steps 0, 1, 2, ... each once, each module's experts the same on every line."""
    path = Path(path)
    lines, torn = _split_lines(path, path.read_bytes())
    if torn is not None:
        raise _torn_error(path, len(lines) + 1)
    sequence, records, experts = _Sequence(path), [], {}
    for number, raw in enumerate(lines, start=1):
        text = _text(path, raw, number)
        if not text.strip():
            raise RunDirectoryError(path, "an empty line (a routing log has one record per line)", number)
        record = _routing_row(path, number, text)
        sequence.add(number, record.step)
        for module, scores in record.scores.items():
            known = experts.setdefault(module, list(scores))
            if list(scores) != known:
                raise RunDirectoryError(path, f"{module} has experts {list(scores)} here, {known} before", number)
        records.append(record)
    return records


def read_routing(path: str | Path) -> pd.DataFrame:
    """``routing.jsonl`` as a long table: step, module, layer, module_type, expert, score, won, lr."""
    records = []
    for row in read_routing_records(path):
        for module, scores in row.scores.items():
            winners = set(row.winners.get(module, ()))
            for expert, score in scores.items():
                records.append((row.step, module, expert, float(score), expert in winners, row.lr))
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
    records = read_routing_records(run_dir / "routing.jsonl")
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
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise RunDirectoryError(path, f"not a complete gzip file ({error})") from None
    lines, torn = _split_lines(path, data)
    if torn is not None:
        raise _torn_error(path, len(lines) + 1)
    if not lines:
        raise RunDirectoryError(path, "the file is empty; it starts with the header step,lr,<module>...")
    header = _csv_header(path, _text(path, lines[0], 1), ("step", "lr"))
    sequence, records = _Sequence(path), []
    for number, raw in enumerate(lines[1:], start=2):
        fields = next(csv.reader([_text(path, raw, number)]), [])
        if len(fields) != len(header):
            raise RunDirectoryError(path, f"{len(fields)} fields where the header names {len(header)}", number)
        step = _number(path, number, "step", fields[0], integer=True)
        lr = None if fields[1] == "" else _number(path, number, "lr", fields[1])
        sequence.add(number, step)
        for module, cell in zip(header[2:], fields[2:]):
            if not cell:
                continue
            experts = cell.split("|")
            if not all(e.lstrip("*") for e in experts):
                raise RunDirectoryError(path, f"{module}: {cell!r} is not experts joined by '|'", number)
            for expert in experts:
                records.append((step, module, expert.lstrip("*"), float("nan"), expert.startswith("*"), lr))
    sequence.finish(len(lines) + 1)
    frame = pd.DataFrame(records, columns=["step", "module", "expert", "score", "won", "lr"])
    return _with_module_columns(frame)


def has_routing(run_dir: str | Path) -> bool:
    """Whether the run has a routing record: its ``routing.jsonl`` or the committed winners file."""
    return (Path(run_dir) / "routing.jsonl").is_file() or (Path(run_dir) / WINNERS_FILE).is_file()


def _read_json_object(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RunDirectoryError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise RunDirectoryError(path, f"not JSON ({error.msg})", error.lineno) from None
    if not isinstance(value, dict):
        raise RunDirectoryError(path, f"holds a JSON {type(value).__name__}, not the object {what}")
    return value


def read_metrics(path: str | Path) -> dict:
    """A finished run's ``metrics.json`` (the path of the file), checked: a JSON object with the keys the
    runner writes (``METRICS_KEYS``) of the right types. Anything else is a RunDirectoryError naming the
    file: that directory holds no finished run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a finished run has a metrics.json)")
    metrics = _read_json_object(path, "a finished run writes: not a finished run")
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing:
        raise RunDirectoryError(path, f"lacks {missing} (a finished run's metrics.json holds "
                                      f"{list(METRICS_KEYS)}): not a finished run")
    for key, types in METRICS_KEYS.items():
        value = metrics[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise RunDirectoryError(path, f"{key} is {value!r}, not a {types[0].__name__}: not a finished run")
    if metrics["steps"] < 0:
        raise RunDirectoryError(path, f"steps is {metrics['steps']}, a number of steps is >= 0")
    return metrics


# ---------------------------------------------------------------------------- a run directory
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
    comes from ``routing.jsonl``, else from ``routing_winners.csv.gz`` (who won, without the scores).

    Every file is validated (see the module docstring), and the logs must agree: each holds the steps of
    ``steps.csv`` (``grad_norms.csv`` may hold none: no module logged), and a finished run
    (``metrics.json``) has as many steps as its metrics say. A RunDirectoryError names the file at fault."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a run directory (no config.json)")
    config = _read_json_object(path / "config.json", "the runner writes (its TrainConfig)")
    metrics = read_metrics(path / "metrics.json") if (path / "metrics.json").is_file() else None
    if not (path / "steps.csv").is_file():
        raise RunDirectoryError(path / "steps.csv", "no such file (the runner writes it when training starts)")
    steps = read_steps(path / "steps.csv")
    n = len(steps)
    if metrics is not None and metrics["steps"] != n:
        raise RunDirectoryError(path / "steps.csv", f"holds {_describe(n)}, but metrics.json says the finished "
                                                    f"run trained {metrics['steps']}: records are missing")
    grad_norms = None
    if (path / "grad_norms.csv").is_file():
        grad_norms = read_grad_norms(path / "grad_norms.csv")
        _check_steps(path / "grad_norms.csv", grad_norms, n, allow_empty=True)
    routing = None
    if (path / "routing.jsonl").is_file():
        routing = read_routing(path / "routing.jsonl")
        _check_steps(path / "routing.jsonl", routing, n)
    elif (path / WINNERS_FILE).is_file():
        routing = read_winners(path / WINNERS_FILE)
        _check_steps(path / WINNERS_FILE, routing, n)
    return RunData(path, config, metrics, steps, grad_norms, routing)


def _check_steps(path: Path, table: pd.DataFrame, n: int, allow_empty: bool = False) -> None:
    """``table`` (a validated log: steps 0..k-1) covers the ``n`` steps of steps.csv."""
    k = int(table["step"].max()) + 1 if len(table) else 0
    if k != n and not (allow_empty and k == 0):
        raise RunDirectoryError(path, f"holds {_describe(k)}, but steps.csv holds {_describe(n)}: "
                                      f"{'records are missing' if k < n else 'it holds steps the run never logged'}")


# ---------------------------------------------------------------------------- truncation (resume)
def _kept_bytes(path: Path, step: int) -> bytes:
    """The bytes of the log at ``path`` cut back to the records of steps < ``step`` (validated: those
    records must be steps 0..step-1, complete, each once). Records from ``step`` on, and a torn last line,
    are dropped; so is whatever follows once the steps before ``step`` are all in."""
    lines, _torn = _split_lines(path, path.read_bytes())
    csv_columns = {"steps.csv": STEPS_COLUMNS, "grad_norms.csv": GRAD_NORMS_COLUMNS}.get(path.name)
    keyed = path.name == "grad_norms.csv"
    kept: list[bytes] = []
    header = None
    body = lines
    if csv_columns is not None:
        if not lines:  # empty, or only a torn header: nothing was logged yet
            header = list(csv_columns)
            kept = [",".join(csv_columns).encode() + b"\r\n"]
        else:
            header = _csv_header(path, _text(path, lines[0], 1), csv_columns)
            kept, body = [lines[0]], lines[1:]
    sequence = _Sequence(path, keyed)
    first_line = len(lines) - len(body) + 1
    for number, raw in enumerate(body, start=first_line):
        if not keyed and sequence.complete_through(step - 1):
            break  # steps 0..step-1 are all in: the rest was written after the checkpoint
        try:
            text = _text(path, raw, number)
            if path.name == "steps.csv":
                record_step, key = _steps_row(path, number, text, header)["step"], None
            elif keyed:
                row = _grad_norms_row(path, number, text, header)
                record_step, key = row["step"], (row["module"], row["expert"])
            else:
                record_step, key = _routing_row(path, number, text).step, None
        except RunDirectoryError:
            if sequence.complete_through(step - 1):
                break  # an unreadable record after the checkpoint's: dropped with the rest
            raise
        if record_step >= step:
            break
        sequence.add(number, record_step, key)
        kept.append(raw)
    else:
        number = len(lines) + 1
    n = sequence.finish(number)
    if n != step and not (keyed and n == 0):
        raise RunDirectoryError(path, f"holds {_describe(n)} before the checkpoint at step {step}: "
                                      "records are missing, the run cannot resume from this checkpoint")
    return b"".join(kept)


def truncate_logs(run_dir: str | Path, step: int) -> None:
    """Cut every log of ``run_dir`` (``LOGS``: steps.csv, grad_norms.csv, routing.jsonl, those present)
    back to the records of steps < ``step``: what a checkpoint at ``step`` has seen. Records of later
    steps (they are trained again) and a torn last line (a crash mid-write) are dropped.

    The records kept must be steps 0..step-1, each once (grad_norms.csv: each (module, expert) of step 0,
    each once, or no rows at all); otherwise a RunDirectoryError names the file and line, and no log is
    changed. Each log is written aside and renamed over the old one (``os.replace``), so a crash leaves
    it whole; a crash between two logs leaves a directory that the next call cuts back the same way."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an integer >= 0 (the checkpoint's step), got {step!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    cut = {}
    for name in LOGS:
        path = run_dir / name
        if path.is_file():
            cut[path] = _kept_bytes(path, step)   # every log checked before any is changed
    for path, data in cut.items():
        if path.read_bytes() == data:
            continue
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

