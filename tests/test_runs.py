"""Run directories: validated readers (``molf.lab.runs.load`` and the per-file readers), ``read_metrics``
and ``truncate_logs``, swept over every log file and every defect a crash or a second writer leaves.

The run directories here are written the way the runner writes them (``csv.writer`` rows, one
``RoutingRecord.to_json`` line per step), without training, so the sweeps stay fast."""

import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from molf.lab import analysis, runs
from molf.routing_log import RoutingRecord

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj")
EXPERTS = ("fft", "lora0")
STEPS = 6


def _csv_line(row) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue().encode()


def _records(n: int) -> dict[str, list[bytes]]:
    """The lines (header first for the CSVs) of each log of an ``n``-step run, as the runner writes them."""
    steps = [_csv_line(runs.STEPS_COLUMNS)]
    grads = [_csv_line(runs.GRAD_NORMS_COLUMNS)]
    routing = []
    for step in range(n):
        lr = 1e-3 / (step + 1)
        steps.append(_csv_line([step, 2.0 / (step + 1), lr, 0.5 + step, 0.01]))
        for module in MODULES:
            for expert in EXPERTS:
                grads.append(_csv_line([step, module, expert, 0.1 * (step + 1)]))
        scores = {m: {"fft": 1e-9 * (1 + (step + i) % 3), "lora0": 2e-9} for i, m in enumerate(MODULES)}
        winners = {m: (max(s, key=s.get),) for m, s in scores.items()}
        routing.append(RoutingRecord(step=step, lr=lr, winners=winners, scores=scores).to_json().encode())
    return {"steps.csv": steps, "grad_norms.csv": grads, "routing.jsonl": routing}


def write_run(out: Path, n: int = STEPS, finished: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"method": "molf", "task": "fact", "model": "tiny", "steps": n}))
    for name, lines in _records(n).items():
        (out / name).write_bytes(b"".join(lines))
    if finished:
        (out / "metrics.json").write_text(json.dumps({
            "method": "molf", "task": "fact", "model": "tiny", "seed": 0, "steps": n,
            "metrics": {"efficacy": 0.5}, "primary_metric": "efficacy", "final_loss": 0.3}))
    return out


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _first_record_line(name: str, step: int) -> int:
    """1-based line of the first record of ``step`` in the log ``name``."""
    per_step = len(MODULES) * len(EXPERTS) if name == "grad_norms.csv" else 1
    return (1 if name.endswith(".csv") else 0) + step * per_step + 1


# Each defect edits one log and returns the line the reader must name (None: the file as a whole).
def torn(path: Path) -> int:
    lines = _lines(path)
    path.write_bytes(b"".join(lines) + lines[-1][: len(lines[-1]) // 2])
    return len(lines) + 1


def missing(path: Path) -> int:
    """One record of step 2 is gone (grad_norms.csv: one (module, expert) row of it)."""
    lines = _lines(path)
    at = _first_record_line(path.name, 2)
    del lines[at - 1]
    path.write_bytes(b"".join(lines))
    # steps/routing: the next record (step 3) is where the gap shows; grad_norms: step 2 ends short at step 3
    return at if path.name != "grad_norms.csv" else _first_record_line(path.name, 3) - 1


def duplicated(path: Path) -> int:
    lines = _lines(path)
    at = _first_record_line(path.name, 2)
    lines.insert(at, lines[at - 1])
    path.write_bytes(b"".join(lines))
    return at + 1


def missing_last(path: Path) -> None:
    """The records of the last step are gone: the log is a well-formed shorter run (the 35-of-40 case)."""
    lines = _lines(path)
    keep = _first_record_line(path.name, STEPS - 1) - 1
    path.write_bytes(b"".join(lines[:keep]))
    return None


def garbage(path: Path) -> int:
    lines = _lines(path)
    at = _first_record_line(path.name, 3)
    lines[at - 1] = b"3,oops,\xff\xfe,nan\r\n" if path.name.endswith(".csv") else b'{"step": 3, "scores": [\n'
    path.write_bytes(b"".join(lines))
    return at


def wrong_type(path: Path) -> int:
    lines = _lines(path)
    at = _first_record_line(path.name, 1)
    text = lines[at - 1].decode()
    if path.name == "steps.csv":
        text = text.replace("1,", "1,fast,", 1).replace(",0.5", "", 1)      # loss 'fast'
    elif path.name == "grad_norms.csv":
        text = text.rsplit(",", 1)[0] + ",big\r\n"                          # grad_norm 'big'
    else:
        record = json.loads(text)
        record["step"] = "1"                                                # a string step
        text = json.dumps(record) + "\n"
    lines[at - 1] = text.encode()
    path.write_bytes(b"".join(lines))
    return at


DEFECTS = [torn, missing, duplicated, missing_last, garbage, wrong_type]


# ---------------------------------------------------------------------------- readers
def test_a_sound_run_reads_back_with_its_types(tmp_path):
    data = runs.load(write_run(tmp_path / "run"))
    assert list(data.steps["step"]) == list(range(STEPS))
    assert data.steps.dtypes.to_dict() == {"step": "int64", "loss": "float64", "lr": "float64",
                                           "grad_norm": "float64", "step_time_s": "float64"}
    assert data.grad_norms["step"].dtype == "int64" and data.grad_norms["grad_norm"].dtype == "float64"
    assert len(data.grad_norms) == STEPS * len(MODULES) * len(EXPERTS)
    assert set(data.routing["module"]) == set(MODULES) and data.routing["score"].dtype == "float64"
    assert data.metrics["steps"] == STEPS
    assert (analysis.win_table(data)["steps"] == STEPS).all()


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", runs.LOGS)
def test_load_refuses_every_broken_log_naming_file_and_line(tmp_path, name, defect):
    run_dir = write_run(tmp_path / "run")
    line = defect(run_dir / name)
    with pytest.raises(runs.RunDirectoryError) as caught:
        runs.load(run_dir)
    error = caught.value
    assert isinstance(error, ValueError)                 # callers that catch ValueError keep working
    # the file at fault is named (a short steps.csv disagrees with metrics.json: steps.csv is named)
    assert error.path == run_dir / name, str(error)
    assert error.line == line, str(error)
    assert str(run_dir / name) in str(error) and (line is None or f"line {line}" in str(error))


@pytest.mark.parametrize("defect", [torn, missing, duplicated, garbage, wrong_type], ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", runs.LOGS)
def test_each_reader_refuses_a_broken_log_on_its_own(tmp_path, name, defect):
    run_dir = write_run(tmp_path / "run")
    line = defect(run_dir / name)
    reader = {"steps.csv": runs.read_steps, "grad_norms.csv": runs.read_grad_norms,
              "routing.jsonl": runs.read_routing}[name]
    with pytest.raises(runs.RunDirectoryError, match=f"line {line}:"):
        reader(run_dir / name)


@pytest.mark.parametrize("extra_steps", [-5, 5])
def test_a_routing_log_of_another_length_never_reaches_win_table(tmp_path, extra_steps):
    """The issue's case: a 40-step run whose routing log holds 35 or 45 steps."""
    run_dir = write_run(tmp_path / "run", n=40)
    longer = write_run(tmp_path / "other", n=40 + extra_steps)
    (run_dir / "routing.jsonl").write_bytes((longer / "routing.jsonl").read_bytes())
    with pytest.raises(runs.RunDirectoryError, match=rf"routing.jsonl: holds {40 + extra_steps} steps .* "
                                                     r"steps.csv holds 40 steps"):
        runs.load(run_dir)


def test_a_garbage_row_never_turns_steps_into_strings(tmp_path):
    run_dir = write_run(tmp_path / "run")
    with open(run_dir / "steps.csv", "a", newline="") as f:
        csv.writer(f).writerow(["6", "loss?", "x", "y", "z"])
    with pytest.raises(runs.RunDirectoryError, match=r"steps.csv, line 8: loss is 'loss\?', not a number"):
        runs.read_steps(run_dir / "steps.csv")


def test_winners_file_is_validated_like_the_log(tmp_path):
    run_dir = write_run(tmp_path / "run")
    runs.write_winners(run_dir)
    (run_dir / "routing.jsonl").unlink()
    good = runs.load(run_dir).routing
    assert sorted(good["step"].unique()) == list(range(STEPS))
    table = pd.read_csv(run_dir / runs.WINNERS_FILE)
    pd.concat([table, table.iloc[[2]]]).sort_values("step", kind="stable").to_csv(
        run_dir / runs.WINNERS_FILE, index=False, compression="gzip")
    with pytest.raises(runs.RunDirectoryError, match=r"routing_winners.csv.gz, line 5: step 2 again"):
        runs.load(run_dir)
    (run_dir / runs.WINNERS_FILE).write_bytes((run_dir / runs.WINNERS_FILE).read_bytes()[:-20])
    with pytest.raises(runs.RunDirectoryError, match="not a complete gzip file"):
        runs.read_winners(run_dir / runs.WINNERS_FILE)


def test_a_routing_record_naming_an_unscored_winner_is_refused(tmp_path):
    run_dir = write_run(tmp_path / "run")
    lines = _lines(run_dir / "routing.jsonl")
    record = json.loads(lines[1])
    record["winners"][MODULES[0]] = ["lora7"]
    lines[1] = (json.dumps(record) + "\n").encode()
    (run_dir / "routing.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(runs.RunDirectoryError, match=r"line 2: winner\(s\) \['lora7'\]"):
        runs.read_routing(run_dir / "routing.jsonl")


# ---------------------------------------------------------------------------- metrics.json
@pytest.mark.parametrize("content, message", [
    ("[]", "holds a JSON list, not the object"),
    ("{}", "lacks \\['method', 'task', 'model', 'seed', 'steps', 'metrics', 'primary_metric'\\]"),
    ('{"method": "molf"', "not JSON"),
    ("null", "holds a JSON NoneType"),
])
def test_read_metrics_refuses_what_is_not_a_finished_run(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(runs.RunDirectoryError, match=message) as caught:
        runs.read_metrics(path)
    assert caught.value.path == path and str(path) in str(caught.value)


@pytest.mark.parametrize("key, value", [("steps", "40"), ("seed", True), ("metrics", []), ("method", None),
                                        ("steps", -1)])
def test_read_metrics_checks_the_types_of_its_keys(tmp_path, key, value):
    run_dir = write_run(tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert runs.read_metrics(run_dir / "metrics.json") == metrics
    metrics[key] = value
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(runs.RunDirectoryError, match=rf"metrics.json: {key} is"):
        runs.read_metrics(run_dir / "metrics.json")
    with pytest.raises(runs.RunDirectoryError, match=rf"metrics.json: {key} is"):
        runs.load(run_dir)


def test_read_metrics_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        runs.read_metrics(tmp_path / "metrics.json")


# ---------------------------------------------------------------------------- truncate_logs
def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def _expected_logs(n: int) -> dict[str, bytes]:
    return {name: b"".join(lines) for name, lines in _records(n).items()}


@pytest.mark.parametrize("defect", [torn, missing, duplicated], ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", runs.LOGS)
def test_truncate_logs_sweep(tmp_path, name, defect):
    """Every log x (torn last line, missing records, duplicated records): a defect after the checkpoint
    is cut away with the records it sits in; one before it is refused, naming file and line, and no log
    changes."""
    # after the checkpoint at step 2 (records of steps >= 2 are dropped)
    after = write_run(tmp_path / "after", finished=False)
    defect(after / name)
    runs.truncate_logs(after, 2)
    assert {n: (after / n).read_bytes() for n in runs.LOGS} == _expected_logs(2)
    assert not list(after.glob("*.tmp"))
    assert list(runs.load(after).steps["step"]) == [0, 1]

    # before the checkpoint at step 5 (a torn last line is always after the checkpoint: it is cut)
    before = write_run(tmp_path / "before", finished=False)
    line = defect(before / name)
    untouched = _snapshot(before)
    if defect is torn:
        runs.truncate_logs(before, STEPS)
        assert {n: (before / n).read_bytes() for n in runs.LOGS} == _expected_logs(STEPS)
        return
    with pytest.raises(runs.RunDirectoryError) as caught:
        runs.truncate_logs(before, 5)
    assert caught.value.path == before / name and caught.value.line == line, str(caught.value)
    assert _snapshot(before) == untouched


@pytest.mark.parametrize("step", [0, 1, 4, STEPS])
def test_truncate_logs_keeps_exactly_the_steps_before_the_checkpoint(tmp_path, step):
    run_dir = write_run(tmp_path / "run", finished=False)
    runs.truncate_logs(run_dir, step)
    assert {n: (run_dir / n).read_bytes() for n in runs.LOGS} == _expected_logs(step)
    runs.truncate_logs(run_dir, step)                      # idempotent
    assert {n: (run_dir / n).read_bytes() for n in runs.LOGS} == _expected_logs(step)


def test_truncate_logs_refuses_a_log_shorter_than_the_checkpoint(tmp_path):
    run_dir = write_run(tmp_path / "run", n=3, finished=False)
    untouched = _snapshot(run_dir)
    with pytest.raises(runs.RunDirectoryError, match=r"steps.csv.*holds 3 steps \(0..2\) before the checkpoint"):
        runs.truncate_logs(run_dir, 5)
    assert _snapshot(run_dir) == untouched


def test_truncate_logs_drops_garbage_after_the_checkpoint_and_a_torn_header(tmp_path):
    run_dir = write_run(tmp_path / "run", finished=False)
    for name in runs.LOGS:
        with open(run_dir / name, "ab") as f:
            f.write(b"\x00\x00\x00\n{half")                # a crash's garbage after the last record
    runs.truncate_logs(run_dir, STEPS)
    assert {n: (run_dir / n).read_bytes() for n in runs.LOGS} == _expected_logs(STEPS)
    (run_dir / "steps.csv").write_bytes(b"step,lo")          # the crash came while writing the header
    (run_dir / "grad_norms.csv").write_bytes(b"")
    (run_dir / "routing.jsonl").write_bytes(b'{"step": 0, "l')
    runs.truncate_logs(run_dir, 0)
    assert {n: (run_dir / n).read_bytes() for n in runs.LOGS} == _expected_logs(0)


def test_truncate_logs_writes_aside_so_a_crash_leaves_the_log_whole(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path / "run", finished=False)
    before = _snapshot(run_dir)

    def crash(*_args):
        raise OSError("power cut")

    monkeypatch.setattr(runs.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        runs.truncate_logs(run_dir, 2)
    assert {n: (run_dir / n).read_bytes() for n in runs.LOGS} == {n: before[n] for n in runs.LOGS}
    monkeypatch.undo()
    runs.truncate_logs(run_dir, 2)                           # the next resume cuts it back
    assert {n: (run_dir / n).read_bytes() for n in runs.LOGS} == _expected_logs(2)


@pytest.mark.parametrize("step", [-1, 1.0, True, "2", None])
def test_truncate_logs_refuses_a_bad_step(tmp_path, step):
    run_dir = write_run(tmp_path / "run", finished=False)
    untouched = _snapshot(run_dir)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        runs.truncate_logs(run_dir, step)
    assert _snapshot(run_dir) == untouched


def test_truncate_logs_leaves_absent_logs_absent(tmp_path):
    run_dir = write_run(tmp_path / "run", finished=False)
    (run_dir / "routing.jsonl").unlink()
    (run_dir / "grad_norms.csv").unlink()
    runs.truncate_logs(run_dir, 3)
    assert not (run_dir / "routing.jsonl").exists() and not (run_dir / "grad_norms.csv").exists()
    assert (run_dir / "steps.csv").read_bytes() == _expected_logs(3)["steps.csv"]
