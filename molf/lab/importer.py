"""Runs from elsewhere: the reference implementation's routing log as a molf run directory.

The reference MoLF optimizer writes ``molf_expert_selection.jsonl``, one line per optimizer step::

    {"step": 12, "selections": {"model.layers.0.self_attn.q_proj":
                                {"winners": ["fft"], "scores": {"fft": 0.0, "lora": 0.0}}, ...}}

``import_reference_log(log, out_dir)`` turns it into a run directory (``config.json``, ``steps.csv``,
``routing.jsonl``, ``routing_winners.csv.gz``) that ``molf.lab.runs.load``, the router explorer and the
routing notebooks read like one of ours, so a paper-scale GPU run can be explored here.

What survives: every decision (the log names the winners). What may not: the scores. The reference
rounds each score to 6 decimals, and EPD scores at small scale are 1e-7 to 1e-12, so most read 0.0. A
score that reads exactly 0.0 is stored as NaN ("not recorded"), never as a true zero, and the returned
``ImportReport`` says how many scores and decisions that touched::

    python -m molf.lab.importer molf_expert_selection.jsonl runs/imported/ref_run
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..routing_log import RoutingRecord
from . import runs

ROUNDING_DECIMALS = 6  # the reference writes round(float(score), 6)


@dataclass(frozen=True)
class ImportReport:
    """What an import kept and what the log's rounding had already lost."""

    records: int            # optimizer steps imported
    modules: int            # routed modules seen
    decisions: int          # (step, module) decisions, every one kept
    scores: int             # expert scores in the log
    scores_lost: int        # of those, read as 0.0 at 6 decimals: stored as NaN
    decisions_unreadable: int  # decisions whose winner cannot be told from the rounded scores
    missing_steps: int = 0  # steps absent from the log, imported as steps without a winner

    def summary(self) -> str:
        return (f"imported {self.records} steps, {self.modules} modules, {self.decisions} decisions (all kept); "
                f"{self.scores_lost} of {self.scores} scores read 0.0 at {ROUNDING_DECIMALS} decimals and are "
                f"stored as NaN; {self.decisions_unreadable} decisions cannot be recovered from the rounded "
                f"scores alone (the log's winners are used); {self.missing_steps} steps missing from the log "
                f"are imported without a winner")


def _bad(path: Path, line_no: int, why: str) -> ValueError:
    return ValueError(f"{path}, line {line_no}: {why}")


def read_reference_log(path: str | Path) -> list[dict]:
    """The log's records in file order, each checked: a JSON object with an integer ``step`` and a
    ``selections`` object of ``{module: {"winners": [...], "scores": {expert: number}}}``. Steps must
    be unique and increasing (the reference restarts its counter at 0 when a run is resumed into the same
    file: split such a log at the restart first)."""
    path = Path(path)
    records, last_step = [], None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _bad(path, line_no, f"not UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise _bad(path, line_no, f"not JSON ({e.msg}); a torn last line means the run was cut mid-write") from None
            if not isinstance(row, dict) or not isinstance(row.get("selections"), dict):
                raise _bad(path, line_no, "expected an object with 'step' and 'selections'")
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise _bad(path, line_no, f"'step' must be an integer >= 0, got {step!r}")
            if last_step is not None and step <= last_step:
                raise _bad(path, line_no, f"step {step} after step {last_step}: steps must increase (a resumed "
                                          "reference run restarts at 0 in the same file; split the log there)")
            for module, sel in row["selections"].items():
                if not (isinstance(sel, dict) and isinstance(sel.get("winners"), list)
                        and isinstance(sel.get("scores"), dict)):
                    raise _bad(path, line_no, f"module {module!r}: expected {{'winners': [...], 'scores': {{...}}}}")
                for expert, score in sel["scores"].items():
                    if isinstance(score, bool) or not isinstance(score, (int, float)):
                        raise _bad(path, line_no, f"module {module!r}, expert {expert!r}: score {score!r} is not a number")
                unknown = [w for w in sel["winners"] if w not in sel["scores"]]
                if unknown:
                    raise _bad(path, line_no, f"module {module!r}: winners {unknown} have no score")
            records.append(row)
            last_step = step
    if not records:
        raise ValueError(f"{path} holds no routing records")
    return records


def import_reference_log(log: str | Path, out_dir: str | Path, *, expert_names: dict | None = None,
                         overwrite: bool = False, config: dict | None = None) -> ImportReport:
    """Write the reference log ``log`` as a run directory at ``out_dir``; return what was kept and lost.

    ``expert_names`` renames experts (e.g. ``{"lora_0": "lora0"}``; unnamed ones keep their names).
    ``config`` adds keys to ``config.json`` (model, task, ...). An existing ``out_dir`` is refused
    unless ``overwrite``: nothing is written before the whole log has been read and checked.
    """
    rename = dict(expert_names or {})
    records = read_reference_log(log)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    modules, decisions, n_scores, lost, unreadable = set(), 0, 0, 0, 0
    lines = []
    experts_of = {}
    for row in records:
        for module, sel in row["selections"].items():
            experts_of.setdefault(module, [rename.get(e, e) for e in sel["scores"]])
    gaps = 0
    for row in records:
        while len(lines) < row["step"]:  # a step the log skipped (no module had a gradient): no winner
            lines.append(RoutingRecord(step=len(lines), lr=None, winners={m: () for m in experts_of},
                                       scores={m: dict.fromkeys(es, math.nan) for m, es in experts_of.items()},
                                       extra={"imported": True, "missing": True}).to_json())
            gaps += 1
        winners, scores = {}, {}
        for module, sel in row["selections"].items():
            modules.add(module)
            decisions += 1
            named = {rename.get(e, e): float(s) for e, s in sel["scores"].items()}
            won = tuple(rename.get(w, w) for w in sel["winners"])
            n_scores += len(named)
            lost += sum(s == 0.0 for s in named.values())
            losers = [s for e, s in named.items() if e not in won]
            if won and losers and min(named[w] for w in won) <= max(losers):
                unreadable += 1
            winners[module] = won
            scores[module] = {e: (math.nan if s == 0.0 else s) for e, s in named.items()}
        lines.append(RoutingRecord(step=row["step"], lr=None, winners=winners, scores=scores,
                                   extra={"imported": True}).to_json())
    (out / "routing.jsonl").write_text("".join(lines))
    (out / "steps.csv").write_text("step,loss,lr,grad_norm,step_time_s\n"
                                   + "".join(f"{s},nan,nan,nan,nan\n" for s in range(len(lines))))
    report = ImportReport(len(records), len(modules), decisions, n_scores, lost, unreadable, gaps)
    meta = {"method": "molf", "source": "reference-import", "imported_from": str(Path(log).resolve()),
            "steps": len(lines), "score_decimals": ROUNDING_DECIMALS, "import": report.__dict__,
            **(config or {})}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    runs.write_winners(out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m molf.lab.importer", description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="the reference's molf_expert_selection.jsonl")
    parser.add_argument("out_dir", help="the run directory to write")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="rename an expert")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = parser.parse_args(argv)
    rename = {}
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            parser.error(f"--rename takes OLD=NEW, got {item!r}")
        rename[old] = new
    try:
        report = import_reference_log(args.log, args.out_dir, expert_names=rename, overwrite=args.overwrite)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}")
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
