"""The reference implementation's routing log, imported as a run directory."""
from __future__ import annotations

import json
import math

import pytest
from toy import toy, train

import molf
from molf.lab import importer, runs


def _reference_log(path, steps=6):
    """A log in the reference's format, made from a real MoLF run on the toy model: each score rounded
    to 6 decimals as the reference rounds it. Returns the decisions it was made from."""
    model = toy()
    molf.wrap(model, ranks=(4,), exclude=())
    opt = molf.MoLFAdamW(molf.param_groups(model, lr_fft=1e-3, lr_lora=1e-3))
    decisions, lines = [], []

    class Recorder(list):
        def append(self, last):
            decisions.append(dict(last))
            lines.append(json.dumps({"step": len(lines), "selections": {
                m: {"winners": list(w), "scores": {e: round(s, 6) for e, s in opt.last_scores[m].items()}}
                for m, w in last.items()}}))

    train(model, opt, steps, log=Recorder())
    path.write_text("\n".join(lines) + "\n")
    return decisions


def test_an_imported_log_gives_back_the_decisions_it_was_made_from(tmp_path):
    decisions = _reference_log(tmp_path / "ref.jsonl")
    report = importer.import_reference_log(tmp_path / "ref.jsonl", tmp_path / "run")
    data = runs.load(tmp_path / "run")
    won = data.routing[data.routing["won"]]
    back = [{m: tuple(won[(won["step"] == s) & (won["module"] == m)]["expert"]) for m in decisions[s]}
            for s in range(len(decisions))]
    assert back == decisions
    assert report.records == len(decisions) and report.decisions == sum(len(d) for d in decisions)
    assert sorted(data.steps["step"]) == list(range(len(decisions)))
    # the committed winners file says the same
    winners = runs.read_winners(tmp_path / "run" / runs.WINNERS_FILE)
    assert winners[winners["won"]][["step", "module", "expert"]].values.tolist() == \
        won[["step", "module", "expert"]].values.tolist()


def test_scores_rounded_to_zero_are_reported_and_stored_as_not_recorded(tmp_path):
    log = tmp_path / "ref.jsonl"
    log.write_text(json.dumps({"step": 0, "selections": {
        "model.layers.0.mlp.up_proj": {"winners": ["lora"], "scores": {"fft": 0.0, "lora": 0.0}},
        "model.layers.0.mlp.down_proj": {"winners": ["fft"], "scores": {"fft": 0.25, "lora": 0.125}}}}) + "\n")
    report = importer.import_reference_log(log, tmp_path / "run", expert_names={"lora": "lora0"})
    assert (report.scores, report.scores_lost, report.decisions_unreadable) == (4, 2, 1)
    routing = runs.load(tmp_path / "run").routing.set_index(["module", "expert"])
    assert math.isnan(routing.loc[("model.layers.0.mlp.up_proj", "fft"), "score"])
    assert routing.loc[("model.layers.0.mlp.down_proj", "lora0"), "score"] == 0.125
    assert bool(routing.loc[("model.layers.0.mlp.up_proj", "lora0"), "won"])
    assert "2 of 4 scores" in report.summary()


@pytest.mark.parametrize("content, needle", [
    ('{"step": 0, "selections": {}}\n{"step": 1, "selec', "line 2: not JSON"),
    ('{"step": 0, "selections": {}}\n{"step": 0, "selections": {}}\n', "line 2: step 0 after step 0"),
    ('{"step": -1, "selections": {}}\n', "line 1: 'step' must be an integer"),
    ('{"step": 0, "selections": {"m": {"winners": ["x"], "scores": {"y": 1.0}}}}\n', "winners ['x'] have no score"),
    ('{"step": 0, "selections": {"m": {"winners": [], "scores": {"y": "1"}}}}\n', "is not a number"),
    ('[1, 2]\n', "line 1: expected an object"),
    ('', "holds no routing records"),
])
def test_a_bad_log_is_refused_naming_the_file_and_line_before_anything_is_written(tmp_path, content, needle):
    log = tmp_path / "ref.jsonl"
    log.write_text(content)
    with pytest.raises(ValueError, match="ref.jsonl") as err:
        importer.import_reference_log(log, tmp_path / "run")
    assert needle in str(err.value)
    assert not (tmp_path / "run").exists()


def test_invalid_utf8_names_the_line(tmp_path):
    log = tmp_path / "ref.jsonl"
    log.write_bytes(b'{"step": 0, "selections": {}}\n\xff\xfe\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        importer.import_reference_log(log, tmp_path / "run")


def test_an_existing_run_directory_is_kept_unless_overwrite_is_asked(tmp_path, capsys):
    _reference_log(tmp_path / "ref.jsonl", steps=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    assert importer.main([str(tmp_path / "ref.jsonl"), str(tmp_path / "run")]) == 2
    assert "exists" in capsys.readouterr().out and (tmp_path / "run" / "keep.txt").exists()
    assert importer.main([str(tmp_path / "ref.jsonl"), str(tmp_path / "run"), "--overwrite"]) == 0
    assert "imported 2 steps" in capsys.readouterr().out and not (tmp_path / "run" / "keep.txt").exists()


def test_the_router_explorer_draws_an_imported_run(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from molf.lab import explorer

    _reference_log(tmp_path / "ref.jsonl", steps=3)
    importer.import_reference_log(tmp_path / "ref.jsonl", tmp_path / "run")
    fig = explorer.RouterExplorer(tmp_path / "run").frame(step=2)
    assert fig.axes


def test_a_step_missing_from_the_log_is_imported_without_a_winner(tmp_path):
    log = tmp_path / "ref.jsonl"
    line = '{"step": %d, "selections": {"model.layers.0.mlp.up_proj": {"winners": ["fft"], "scores": {"fft": 0.5, "lora": 0.25}}}}\n'
    log.write_text(line % 0 + line % 2)
    report = importer.import_reference_log(log, tmp_path / "run")
    assert (report.records, report.missing_steps) == (2, 1)
    data = runs.load(tmp_path / "run")
    assert list(data.steps["step"]) == [0, 1, 2]
    assert data.routing.groupby("step")["won"].sum().tolist() == [1, 0, 1]
