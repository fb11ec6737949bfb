"""The experiment grid runner (experiments/grid.py) on the tiny model: lr sweep on the selection seed,
extra seeds at the picked lr only, test on picked runs, CSVs, model pruning, budget stop, resume."""
import json

import pandas as pd
import pytest
from scripts import ROOT, figures, grid, report

SPEC = {
    "model": "tiny", "tasks": ["fact"], "steps": 2, "batch_size": 2, "seq_len": 32, "eval_limit": 4,
    "test_limit": 4, "seeds": [0, 1], "select_seeds": [0], "progress": False,
    "methods": {"lora": {"lrs": [1e-3, 1e-6], "ranks": [4]},
                "molf": {"lrs": [1e-4], "ranks": [4]}},
}


def write_spec(tmp_path, spec=SPEC, name="tbl"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def test_sweep_then_extra_seeds_then_test_on_picked_runs(tmp_path, capsys):
    results = tmp_path / "results"
    assert grid.main([str(write_spec(tmp_path)), "--results", str(results)]) == 0
    val = pd.read_csv(results / "tbl_validation.csv")
    # sweep: lora x 2 lrs + molf x 1 lr on seed 0; then seed 1 at the picked lr only
    assert len(val[val.seed == 0]) == 3
    seed1 = val[val.seed == 1].set_index("method")
    assert sorted(seed1.index) == ["lora", "molf"]
    sweep = val[(val.seed == 0) & (val.method == "lora")].sort_values(["val_score", "lr"], ascending=[False, True])
    assert seed1.loc["lora", "lr"] == sweep.iloc[0].lr

    test = pd.read_csv(results / "tbl.csv")
    assert len(test) == 4 and test["test_score"].between(0, 1).all()
    assert set(zip(test.method, test.lr)) == {("lora", seed1.loc["lora", "lr"]), ("molf", 1e-4)}
    summary = pd.read_csv(results / "tbl_summary.csv").set_index("method")
    assert (summary["seeds"] == 2).all() and summary["sweep_complete"].all()
    assert summary.loc["molf", "mean"] == pytest.approx(test[test.method == "molf"]["test_score"].mean())
    # routed runs record which expert each (module, step) decision updated; top-1: the shares sum to 1
    shares = val[val.method == "molf"][["updated_fft", "updated_lora0"]]
    assert shares.notna().all().all() and (shares.sum(axis=1) - 1).abs().max() < 1e-9
    assert val[val.method == "lora"]["updated_fft"].isna().all()
    assert summary.loc["molf", "updated_fft"] == pytest.approx(shares["updated_fft"].mean())

    # every model is gone: tested ones after caching their score, the unpicked lr because it can't win
    run_dirs = [results / d for d in val["dir"]]
    assert all(not (d / "model").exists() for d in run_dirs)
    picked_dirs = [results / d for d in val.merge(test[["method", "lr", "seed"]])["dir"]]
    assert len(picked_dirs) == 4 and all((d / "test_metrics.json").is_file() for d in picked_dirs)

    # --report trains nothing and rewrites the same tables from the cached test scores
    before = {d: (d / "metrics.json").stat().st_mtime for d in run_dirs}
    assert grid.main([str(write_spec(tmp_path)), "--results", str(results), "--report"]) == 0
    assert {d: (d / "metrics.json").stat().st_mtime for d in run_dirs} == before
    pd.testing.assert_frame_equal(pd.read_csv(results / "tbl.csv"), test)

    # routing-dynamics figures and table from the picked molf runs (both seeds)
    assert figures.main(["--results", str(results), "--figures", str(tmp_path / "fig"), "--table", "tbl"]) == 0
    dynamics = pd.read_csv(results / "routing_dynamics.csv")
    assert list(dynamics["seed"]) == [0, 1] and set(dynamics["method"]) == {"molf"}
    assert dynamics["win_share"].between(0, 1).all() and dynamics["agreement_50pct"].between(0, 1).all()
    per_type = dynamics.filter(like="win_share_")
    assert per_type.shape[1] >= 2 and per_type.stack().between(0, 1).all()
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {
        "evidence_routing_fact_molf.png", "evidence_routing_fact_molf_layers.png", "evidence_routing_agreement.png",
        "evidence_routing_heatmaps.png"}

    # on a machine without the runs' logs (a fresh clone) the committed winners give the same table
    routed = [d for d in picked_dirs if d.parent.name == "molf"]
    for d in routed:
        (d / "routing.jsonl").unlink()
    assert figures.main(["--results", str(results), "--figures", str(tmp_path / "fig"), "--table", "tbl"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(results / "routing_dynamics.csv"), dynamics)
    # without either record the figures script names what to retrain
    (routed[0] / "routing_winners.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="no routing record"):
        figures.main(["--results", str(results), "--figures", str(tmp_path / "fig"), "--table", "tbl"])

    # the docs/evidence.md tables are printed from these CSVs, the numbers as the summary has them
    capsys.readouterr()
    assert report.main(["--results", str(results), "--table", "tbl"]) == 0
    printed = capsys.readouterr().out
    molf_mean = 100 * summary.loc["molf", "mean"]
    assert f"| MoLF | {molf_mean:.1f} ± " in printed and "| fact | MoLF (fft) |" in printed
    assert "| all | MoLF (fft) |" in printed  # the per-module-type table, every task together
    assert f"fft {summary.loc['molf', 'updated_fft']:.2f} · lora0" in report.ablation_table(summary.reset_index())
    with pytest.raises(FileNotFoundError, match="no result CSVs"):
        report.main(["--results", str(tmp_path / "empty")])


def test_budget_stops_and_a_rerun_continues(tmp_path, capsys):
    results = tmp_path / "results"
    spec = write_spec(tmp_path)
    assert grid.main([str(spec), "--results", str(results), "--budget-min", "0"]) == 0
    # a zero budget starts no cell
    assert "budget reached" in capsys.readouterr().out
    assert not (results / "tbl_validation.csv").exists()
    assert grid.main([str(spec), "--results", str(results), "--sweep-only", "--keep-models"]) == 0
    val = pd.read_csv(results / "tbl_validation.csv")
    assert set(val.seed) == {0} and len(val) == 3
    assert all((results / d / "model").is_dir() for d in val["dir"])  # kept


def test_a_finished_cell_trained_on_other_data_stops_the_grid(tmp_path, monkeypatch):
    import shutil

    from molf.lab import tasks
    data = tmp_path / "data"
    for folder in ("fact", "retention"):
        shutil.copytree(tasks.data_dir() / folder, data / folder)
    monkeypatch.setenv("MOLF_DATA", str(data))
    spec = write_spec(tmp_path, {**SPEC, "seeds": [0], "methods": {"lora": {"lrs": [1e-3], "ranks": [4]}}})
    results = tmp_path / "results"
    assert grid.main([str(spec), "--results", str(results), "--sweep-only"]) == 0
    (data / "fact" / "validation.jsonl").write_text((data / "fact" / "validation.jsonl").read_text() + "\n")
    with pytest.raises(ValueError, match="other fact data: validation.jsonl changed"):
        grid.main([str(spec), "--results", str(results), "--report"])


def test_runs_of_shares_another_tables_runs_and_refuses_a_different_config(tmp_path):
    results = tmp_path / "results"
    main = write_spec(tmp_path, {**SPEC, "seeds": [0], "methods": {"lora": {"lrs": [1e-3], "ranks": [4]}}}, "tbl")
    assert grid.main([str(main), "--results", str(results)]) == 0
    shared = results / "runs" / "tbl" / "fact" / "lora" / "lr0.001_s0"
    before = (shared / "metrics.json").stat().st_mtime
    ablation = {**SPEC, "seeds": [0], "methods": {
        "lora_base": {"method": "lora", "lrs": [1e-3], "ranks": [4], "runs_of": "tbl/lora"},
        "lora_r2": {"method": "lora", "lrs": [1e-3], "ranks": [2]}}}
    assert grid.main([str(write_spec(tmp_path, ablation, "abl")), "--results", str(results)]) == 0
    val = pd.read_csv(results / "abl_validation.csv").set_index("method")
    assert val.loc["lora_base", "dir"] == "runs/tbl/fact/lora/lr0.001_s0"  # trained once, for both tables
    assert (shared / "metrics.json").stat().st_mtime == before
    assert val.loc["lora_r2", "dir"] == "runs/abl/fact/lora_r2/lr0.001_s0"
    # the test CSV names each run's folder too, so the report pairs the shared run's predictions
    test = pd.read_csv(results / "abl.csv")
    assert set(test.dir) == {"runs/tbl/fact/lora/lr0.001_s0", "runs/abl/fact/lora_r2/lr0.001_s0"}
    xs, ys, seeds = report.paired_scores(test, results, "abl", "fact", "lora_base", "lora_r2")
    assert seeds == 1 and len(xs) == len(ys) == 1 and len(xs[0]) == len(ys[0]) == 4  # seeds x items
    ablation["methods"]["lora_base"]["ranks"] = [2]  # not the same run: refused, not mixed in
    with pytest.raises(ValueError, match="different config"):
        grid.main([str(write_spec(tmp_path, ablation, "abl2")), "--results", str(results)])
    ablation["methods"]["lora_base"]["runs_of"] = "tbl"
    with pytest.raises(ValueError, match="runs_of must be '<table>/<label>', got 'tbl'"):
        grid.main([str(write_spec(tmp_path, ablation, "abl3")), "--results", str(results)])


def test_update_shares_count_topk_decisions():
    wins = {"a": {"fft": 3, "lora0": 1}, "b": {"fft": 0, "lora0": 4}}
    assert grid.update_shares({"routing": {"win_counts": wins}}, 1) == {"updated_fft": 3 / 8, "updated_lora0": 5 / 8}
    dense = {"a": {"fft": 4, "lora0": 4}}  # top-k = all experts: every expert updated at every decision
    assert grid.update_shares({"routing": {"win_counts": dense}}, 2) == {"updated_fft": 1.0, "updated_lora0": 1.0}
    assert grid.update_shares({"routing": None}, None) == {}


def test_select_seeds_must_be_among_seeds(tmp_path):
    bad = {**SPEC, "select_seeds": [7]}
    with pytest.raises(ValueError, match=r"select_seeds \[7\]"):
        grid.main([str(write_spec(tmp_path, bad)), "--results", str(tmp_path / "r")])


def test_tasks_limits_training_not_the_tables(tmp_path):
    spec = {**SPEC, "tasks": ["fact", "sql"], "seeds": [0], "methods": {"lora": {"lrs": [1e-3], "ranks": [4]}}}
    path, results = write_spec(tmp_path, spec), tmp_path / "results"
    assert grid.main([str(path), "--results", str(results), "--tasks", "fact"]) == 0
    assert set(pd.read_csv(results / "tbl_validation.csv").task) == {"fact"}  # sql not trained
    assert grid.main([str(path), "--results", str(results), "--tasks", "sql"]) == 0
    # the second run trains sql only, and its CSVs still hold fact's finished runs
    assert set(pd.read_csv(results / "tbl_validation.csv").task) == {"fact", "sql"}
    assert set(pd.read_csv(results / "tbl_summary.csv").task) == {"fact", "sql"}
    with pytest.raises(ValueError, match=r"--tasks \['med'\] not in"):
        grid.main([str(path), "--results", str(results), "--tasks", "med"])


# ------------------------------------------------------------------------------------------ --plan

def plan_lines(capsys):
    return capsys.readouterr().out.splitlines()


def test_plan_prints_every_cell_with_a_measured_step_time_and_trains_nothing(tmp_path, capsys):
    spec = {**SPEC, "steps": None, "epochs": 0.5, "grad_accum": 2}
    del spec["steps"]
    results = tmp_path / "results"
    assert grid.main([str(write_spec(tmp_path, spec)), "--results", str(results), "--plan",
                      "--measure-steps", "1"]) == 0
    lines = plan_lines(capsys)
    assert not results.exists()  # nothing trained, nothing written
    # 3 sweep cells on seed 0, then 2 extra-seed cells (seed 1, at the lr still to be picked)
    cells = [line.split() for line in lines if line.split()[:1] == ["fact"]]
    assert [(c[1], c[2], c[3]) for c in cells] == [("lora", "0.001", "0"), ("molf", "0.0001", "0"),
                                                   ("lora", "1e-06", "0"), ("lora", "picked", "1"),
                                                   ("molf", "picked", "1")]
    # 182 fact rows, 0.5 epochs, effective batch 2 x 2: ceil(91 / 4) = 23 steps per cell
    assert all(c[4] == "23" for c in cells) and all(c[7:9] == ["measured", "on"] for c in cells)
    assert all(float(c[6]) > 0 for c in cells)
    total = [line for line in lines if line.startswith("total:")]
    assert total and "5 cells, 0 done, 5 to train" in total[0] and "evaluation not included" in total[0]
    assert any("fact: 182 training rows (local rows)" in line for line in lines)


def test_plan_uses_recorded_step_times_marks_done_cells_and_falls_back_to_flops(tmp_path, capsys):
    results = tmp_path / "results"
    spec = {**SPEC, "methods": {"lora": {"lrs": [1e-3], "ranks": [4]}}, "seeds": [0]}
    path = write_spec(tmp_path, spec)
    assert grid.main([str(path), "--results", str(results), "--sweep-only"]) == 0
    capsys.readouterr()
    assert grid.main([str(path), "--results", str(results), "--plan"]) == 0
    lines = plan_lines(capsys)
    cell = [line.split() for line in lines if line.split()[:1] == ["fact"]]
    recorded = json.loads(next((results / "runs").rglob("metrics.json")).read_text())["step_time_s"]
    assert len(cell) == 1 and cell[0][7:9] == ["recorded", "done"] and float(cell[0][6]) == pytest.approx(
        recorded, rel=1e-2)
    assert "1 cells, 1 done, 0 to train" in [line for line in lines if line.startswith("total:")][0]

    # a task without runs of this method: the recorded time of another task, scaled by tokens per row
    assert grid.main([str(write_spec(tmp_path, {**spec, "tasks": ["fact", "mcq2"]})), "--results", str(results),
                      "--plan", "--measure-steps", "0"]) == 0
    lines = plan_lines(capsys)
    cell = [line.split() for line in lines if line.split()[:1] == ["mcq2"]]
    tokens = {task: grid._tokens_per_row(spec, "tiny", task, {})[0] for task in ("fact", "mcq2")}
    assert tokens["fact"] != tokens["mcq2"]
    assert len(cell) == 1 and cell[0][7:10] == ["scaled", "from", "fact"]
    assert float(cell[0][6]) == pytest.approx(recorded * tokens["mcq2"] / tokens["fact"], rel=1e-2)

    # no model to time (never load one): parameters x tokens / a measured matmul rate, said so
    assert grid.main([str(write_spec(tmp_path, SPEC, "other")), "--results", str(results), "--plan",
                      "--measure-steps", "0"]) == 0
    lines = plan_lines(capsys)
    cells = [line.split() for line in lines if line.split()[:1] == ["fact"]]
    assert len(cells) == 5 and all(c[7] == "flops" for c in cells)
    assert any("TFLOP/s measured (fp32 matmul on cpu) x 0.4 utilisation" in line for line in lines)


def test_plan_of_a_finished_table_finds_the_picks_and_marks_every_cell_done(tmp_path, capsys):
    results = tmp_path / "results"
    path = write_spec(tmp_path, {**SPEC, "extend_sweep": 1})
    assert grid.main([str(path), "--results", str(results)]) == 0
    val = pd.read_csv(results / "tbl_validation.csv")
    capsys.readouterr()
    assert grid.main([str(path), "--results", str(results), "--plan", "--measure-steps", "0"]) == 0
    lines = plan_lines(capsys)
    cells = [line.split() for line in lines if line.split()[:1] == ["fact"]]
    # every run the grid trained (the edge rule's extra lr included) is a done cell at its own lr
    assert sorted((c[1], float(c[2]), int(c[3])) for c in cells) == sorted(zip(val.method, val.lr, val.seed))
    assert all(c[8] == "done" for c in cells)
    assert f"{len(val)} cells, {len(val)} done, 0 to train" in [line for line in lines if line.startswith("total:")][0]


def test_plan_of_hub_models_estimates_from_known_sizes_per_model(tmp_path, capsys):
    spec = {**SPEC, "models": ["Qwen/Qwen2.5-3B", "someone/unknown-model"], "source": "hub",
            "metric_variant": "reference", "epochs": 2, "batch_size": 8, "grad_accum": 4, "seq_len": 512,
            "seeds": [0], "methods": {"fft": {"lrs": [5e-5]}, "lora": {"lrs": [5e-4], "ranks": [32]}}}
    del spec["steps"]
    assert grid.main([str(write_spec(tmp_path, spec)), "--results", str(tmp_path / "r"), "--plan",
                      "--assume-tflops", "1000", "--utilisation", "0.5"]) == 0
    lines = plan_lines(capsys)
    qwen = [line.split() for line in lines if line.split()[:1] == ["Qwen/Qwen2.5-3B"]]
    # CounterFact: 21,919 records x 2 epochs / 32 = 1370 steps; 8 x 4 x 512 tokens per step (the cap)
    assert [(c[2], c[5], c[6]) for c in qwen] == [("fft", "1370", "16384"), ("lora", "1370", "16384")]
    fft_s = 6 * grid.KNOWN_PARAMS["Qwen/Qwen2.5-3B"] * 16384 / (1000e12 * 0.5)
    assert float(qwen[0][7]) == pytest.approx(fft_s, rel=1e-2) and float(qwen[1][7]) == pytest.approx(
        fft_s * 4 / 6, rel=1e-2)
    unknown = [line.split() for line in lines if line.split()[:1] == ["someone/unknown-model"]]
    assert all("unknown" in c for c in unknown)
    assert any(line.strip().startswith("Qwen/Qwen2.5-3B: 2 cells to train") for line in lines)
    assert any("fact: 21919 training rows (upstream size); tokens per row from seq_len cap" in line for line in lines)


def test_paper_table2_spec_plans_as_is(capsys):
    path = ROOT / "experiments" / "paper_table2.json"
    spec = json.loads(path.read_text())
    assert spec["epochs"] == 2 and spec["batch_size"] * spec["grad_accum"] == 32 and spec["source"] == "hub"
    assert grid.main([str(path), "--plan", "--assume-tflops", "989", "--measure-steps", "0"]) == 0
    lines = plan_lines(capsys)
    cells = [line for line in lines if line.split()[:1] and line.split()[0] in spec["models"]]
    # per model and task: 6 sweep cells (fft x 3 lrs, lora x 2, molf x 1) + 2 extra seeds x 3 methods
    assert len(cells) == 3 * 3 * (6 + 2 * 3)
    assert "108 cells, 0 done, 108 to train" in [line for line in lines if line.startswith("total:")][0]


# ------------------------------------------------------------------------------- evidence v2 pieces

def test_test_runs_write_per_item_predictions_trainable_params_and_the_loss_drop(tmp_path):
    spec = {**SPEC, "seeds": [0], "steps": 4, "test_split": {"fact": "train"}, "test_limit": None,
            "methods": {"lora": {"lrs": [1e-3], "ranks": [4]}}}
    results = tmp_path / "results"
    assert grid.main([str(write_spec(tmp_path, spec)), "--results", str(results)]) == 0
    test = pd.read_csv(results / "tbl.csv")
    run = next((results / "runs").rglob("test_metrics.json")).parent
    items = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    n_train = len(grid.tasks.load("fact", "train"))
    assert len(items) == n_train >= 180  # every trained edit
    assert {"id", "prediction", "correct", "edit_score", "margin", "neighbour_flip"} <= set(items[0])
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["split"] == "train" and metrics["n"] == n_train
    assert sum(i["correct"] for i in items) / n_train == pytest.approx(test["test_score"].iloc[0])
    assert test["test_edit_score"].iloc[0] == pytest.approx(metrics["edit_score"])
    assert test["trainable_params"].iloc[0] > 0 and pd.notna(test["last_quarter_drop"].iloc[0])
    summary = pd.read_csv(results / "tbl_summary.csv")
    assert summary["trainable_params"].iloc[0] == test["trainable_params"].iloc[0]


def test_the_whitelist_keeps_the_predictions_of_v1_and_v2_runs():
    import subprocess
    kept = ["results/runs/main/fact/lora/lr1_s0/test_predictions.jsonl",
            "results/v2/runs/main_v2/fact/lora/lr1_s0/test_predictions.jsonl",
            "results/v2/runs/main_v2/fact/lora/lr1_s0/metrics.json",
            "results/v2/runs/main_v2/fact/lora/lr1_s0/test_metrics.json",
            "results/v2/runs/main_v2/fact/lora/lr1_s0/steps.csv",
            "results/v2/runs/main_v2/fact/lora/lr1_s0/config.json",
            "results/v2/runs/main_v2/fact/lora/lr1_s0/data.json",
            "results/v2/runs/main_v2/fact/molf/lr1_s0/routing_winners.csv.gz",
            "results/runs/main/fact/lora/lr1_s0/data.json"]
    dropped = ["results/v2/runs/main_v2/fact/lora/lr1_s0/model/model.safetensors",
               "results/v2/runs/main_v2/fact/lora/lr1_s0/checkpoint.pt",
               "results/v2/runs/main_v2/fact/lora/lr1_s0/routing.jsonl"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *kept, *dropped], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(dropped)


def test_last_quarter_share_is_the_part_of_the_whole_decrease_made_in_the_last_quarter():
    assert grid.last_quarter_share([4.0, 3.0, 2.0, 1.0]) == pytest.approx((2.0 - 1.0) / (4.0 - 1.0))
    assert grid.last_quarter_share([1.0] * 40) is None  # no decrease: nothing to share
    assert grid.last_quarter_share([1.0, 2.0]) is None
    # a loss that ends near 0: the relative drop swings wildly, the share stays near 0
    memorised = [5.0 - i for i in range(5)] + [1e-4] * 30 + [1e-4 + 1e-3 * (i % 2) for i in range(5)]
    assert grid.last_quarter_drop(memorised) < -1
    assert abs(grid.last_quarter_share(memorised)) < 1e-3


def test_last_quarter_drop_is_the_smoothed_relative_fall_over_the_last_quarter():
    assert grid.last_quarter_drop([4.0, 3.0, 2.0, 1.0]) == pytest.approx((2.0 - 1.0) / 2.0)
    assert grid.last_quarter_drop([1.0] * 40) == 0.0
    assert grid.last_quarter_drop([1.0, 2.0]) is None
    losses = [10.0 - 0.1 * i for i in range(40)]  # windows of 4 steps ending at step 30 and step 40
    start, end = sum(losses[26:30]) / 4, sum(losses[36:40]) / 4
    assert grid.last_quarter_drop(losses) == pytest.approx((start - end) / start)


def test_edge_rule_extends_a_sweep_whose_pick_sits_at_its_edge():
    spec = {"seeds": [0], "extend_sweep": 1, "methods": {"lora": {"lrs": [1e-3, 1e-4]}, "fft": {"lrs": [1e-4, 1e-5, 1e-6]}}}
    key_l, key_f = ("m", "fact", "lora"), ("m", "fact", "fft")
    extended = {}
    # lora picked its top lr: one step (x10) up; fft picked its middle one: nothing
    assert grid.extend_sweeps(spec, {key_l: 1e-3, key_f: 1e-5}, {key_l, key_f}, extended)
    assert extended == {key_l: [1e-2]}
    # at most "extend_sweep" times, and only complete sweeps
    assert not grid.extend_sweeps(spec, {key_l: 1e-2}, {key_l}, extended)
    assert not grid.extend_sweeps(spec, {key_f: 1e-6}, set(), extended)
    assert grid.extend_sweeps(spec, {key_f: 1e-6}, {key_f}, extended) and extended[key_f] == [1e-7]
    assert not grid.extend_sweeps({**spec, "extend_sweep": 0}, {key_f: 1e-6}, {key_f}, {})


def test_edge_rule_on_the_tiny_model_sweeps_one_step_further_and_picks_among_all(tmp_path, capsys):
    spec = {**SPEC, "seeds": [0, 1], "extend_sweep": 1, "methods": {"lora": {"lrs": [1e-3, 1e-4], "ranks": [4]}}}
    results = tmp_path / "results"
    assert grid.main([str(write_spec(tmp_path, spec)), "--results", str(results)]) == 0
    assert "sweeps extended at their edge" in capsys.readouterr().out
    val = pd.read_csv(results / "tbl_validation.csv")
    sweep = val[val.seed == 0]
    assert len(sweep) == 3 and set(sweep.lr) & {1e-2, 1e-5}  # one step beyond the picked edge
    best = sweep.sort_values(["val_score", "lr"], ascending=[False, True]).iloc[0].lr
    assert list(val[val.seed == 1].lr) == [best]
    summary = pd.read_csv(results / "tbl_summary.csv")
    assert summary["sweep_complete"].all()
    # --report rebuilds the same tables from the records, the extension included
    test = pd.read_csv(results / "tbl.csv")
    assert grid.main([str(write_spec(tmp_path, spec)), "--results", str(results), "--report"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(results / "tbl.csv"), test)


def test_adalora_alpha_rule_gives_adalora_loras_initial_scale():
    from molf.lab import models
    from molf.lab.train import TrainConfig, build

    scales = {}
    for method, kw in (("lora", {}), ("adalora", {"alpha_rule": "match_lora_scale"})):
        *_, cell_kw = grid._cell("tiny", "fact", method, {"lrs": [1e-3], "ranks": [8], **kw}, 1e-3, 0)
        config = TrainConfig(model="tiny", method=method, steps=10, out_dir="unused", **cell_kw).resolved()
        model, _ = build(config, models.load("tiny")[0], 10)
        layer = next(m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling)
        scale = layer.scaling["default"]
        if method == "adalora":
            scale = scale / float(layer.ranknum["default"])
        scales[method] = scale
    assert scales["lora"] == pytest.approx(grid.lora_scale(8)) and scales["adalora"] == pytest.approx(scales["lora"])
    with pytest.raises(ValueError, match="alpha_rule"):
        grid._cell("tiny", "fact", "lora", {"lrs": [1e-3], "alpha_rule": "match_lora_scale"}, 1e-3, 0)


def test_a_tied_validation_score_goes_to_the_larger_logprob_margin_then_the_smaller_lr():
    spec = {**SPEC, "methods": {"lora": {"lrs": [1e-3, 5e-4, 2.5e-4], "ranks": [4]}}}
    rows = [{"model": "tiny", "task": "fact", "method": "lora", "lr": lr, "seed": 0, "val_score": score,
             "val_tiebreak": margin} for lr, score, margin in [(1e-3, 1.0, 5.1), (5e-4, 1.0, 3.8), (2.5e-4, 0.9, 9.0)]]
    picked, complete = grid.pick_lrs(pd.DataFrame(rows), spec)
    assert picked["tiny", "fact", "lora"] == 1e-3 and complete == {("tiny", "fact", "lora")}
    # the score still comes first: a larger margin does not beat a better score
    rows[0]["val_score"] = 0.8
    assert grid.pick_lrs(pd.DataFrame(rows), spec)[0]["tiny", "fact", "lora"] == 5e-4
    # a task that records no margin: ties go to the smaller lr, as before
    for r in rows:
        r["val_score"], r["val_tiebreak"] = 1.0, float("nan")
    assert grid.pick_lrs(pd.DataFrame(rows), spec)[0]["tiny", "fact", "lora"] == 2.5e-4


def test_recorded_step_time_skips_a_run_that_has_not_logged_a_step(tmp_path):
    # --plan while a grid trains: the newest run's steps.csv exists but is still empty
    started, logged = tmp_path / "lr1_s0", tmp_path / "lr2_s0"
    started.mkdir()
    (started / "steps.csv").write_text("")
    assert grid._recorded_step_time(tmp_path) is None
    logged.mkdir()
    (logged / "steps.csv").write_text("step,loss,step_time_s\n0,2.0,9.0\n1,1.5,3.0\n2,1.0,5.0\n")
    assert grid._recorded_step_time(tmp_path) == 4.0  # the median after the warm-up step


def test_method_order_tests_each_sure_pick_as_soon_as_it_trains(tmp_path, monkeypatch):
    """"cell_order": "method" trains every selection seed of a method before the next method (then the
    extra seeds, method by method); a cell that is its method's pick for sure (one lr, no edge rule; or
    an extra seed) is tested right after it trains, before the next cell starts, and its model is then
    deleted."""
    spec = {**SPEC, "seeds": [5, 6, 7], "select_seeds": [5, 6], "cell_order": "method",
            "methods": {"lora": {"lrs": [1e-3], "ranks": [4]}, "molf": {"lrs": [1e-4], "ranks": [4]}}}
    events = []
    real_run, real_test = grid.run, grid.test_metrics
    monkeypatch.setattr(grid, "run", lambda config: (events.append(("train", config.out_dir)), real_run(config))[1])

    def traced_test(run_dir, *args, **kwargs):
        fresh = not (run_dir / "test_metrics.json").is_file()
        if fresh:
            events.append(("test", str(run_dir)))
        return real_test(run_dir, *args, **kwargs)

    monkeypatch.setattr(grid, "test_metrics", traced_test)
    results = tmp_path / "results"
    assert grid.main([str(write_spec(tmp_path, spec)), "--results", str(results)]) == 0
    cells = [(kind, "/".join(path.split("/")[-2:])) for kind, path in events]
    assert cells == [(kind, cell) for cell in ("lora/lr0.001_s5", "lora/lr0.001_s6", "molf/lr0.0001_s5",
                                               "molf/lr0.0001_s6", "lora/lr0.001_s7", "molf/lr0.0001_s7")
                     for kind in ("train", "test")]
    assert not list(results.rglob("model"))
    with pytest.raises(ValueError, match="cell_order 'task' is not one of"):
        grid.main([str(write_spec(tmp_path, {**spec, "cell_order": "task"}, "bad")), "--results", str(results)])


def test_a_sweep_of_several_lrs_is_tested_only_once_picked(tmp_path, monkeypatch):
    """A cell whose lr may still lose is not tested when it trains: only the picked lr's runs are."""
    tested = []
    real_test = grid.test_metrics
    monkeypatch.setattr(grid, "test_metrics", lambda d, *a, **k: (tested.append(d.name), real_test(d, *a, **k))[1])
    spec = {**SPEC, "seeds": [0], "methods": {"lora": {"lrs": [1e-3, 1e-6], "ranks": [4]}}}
    results = tmp_path / "results"
    assert grid.main([str(write_spec(tmp_path, spec)), "--results", str(results)]) == 0
    picked = pd.read_csv(results / "tbl.csv")["lr"].iloc[0]
    assert tested == [f"lr{picked:g}_s0"]


def test_the_experiment_scripts_run_as_modules_without_editing_sys_path():
    """Run from the repository root as ``python -m experiments.<name>``, a script imports this checkout's
    molf (the root comes first on sys.path); none of them edits sys.path to find it."""
    import subprocess
    import sys
    for name in ("grid", "report", "figures"):
        assert "sys.path" not in (ROOT / "experiments" / f"{name}.py").read_text(), name
    done = subprocess.run([sys.executable, "-m", "experiments.report", "--help"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "--confirm" in done.stdout, done.stderr


def _fake_sweep(tmp_path, spec, scores):
    """Finished sweep runs with only their metrics.json: {lr: (efficacy, edit_score, margin)} of lora."""
    results = tmp_path / "results"
    for lr, (efficacy, edit, margin) in scores.items():
        out = grid.run_dir(spec, "tbl", "tiny", "fact", "lora", lr, 0, results)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({
            "primary_metric": "efficacy", "final_loss": 0.1, "train_time_s": 1.0, "trainable_params": 10,
            "metrics": {"efficacy": efficacy, "edit_score": edit, "logprob_margin": margin}}))
    return results


def test_select_metric_picks_the_lr_on_a_score_that_does_not_saturate(tmp_path, capsys):
    spec = {**SPEC, "seeds": [0], "methods": {"lora": {"lrs": [1e-3, 5e-4], "ranks": [4]}}}
    # efficacy saturates at 1.0 for both; the margin breaks the tie towards 1e-3; the edit score says 5e-4
    results = _fake_sweep(tmp_path, spec, {1e-3: (1.0, 0.2, 5.0), 5e-4: (1.0, 0.4, 3.0)})
    assert grid.finished_picks(spec, "tbl", results)[0]["tiny", "fact", "lora"] == 1e-3
    chosen = {**spec, "select_metric": {"fact": "edit_score"}}
    assert grid.finished_picks(chosen, "tbl", results)[0]["tiny", "fact", "lora"] == 5e-4
    # --picks trains nothing and says the pick and the metric; --select-metric overrides the spec
    path = write_spec(tmp_path, spec)
    assert grid.main([str(path), "--results", str(results), "--picks", "--select-metric", "fact=edit_score"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "lr 0.0005" in out and "validation edit_score" in out and "complete" in out
    # a metric the runs do not record, a task not in the spec, a malformed flag: clear errors
    with pytest.raises(ValueError, match=r"select_metric 'edit' is not one of .*'edit_score'"):
        grid.finished_picks({**spec, "select_metric": {"fact": "edit"}}, "tbl", results)
    with pytest.raises(ValueError, match=r"select_metric names tasks \['sql'\]"):
        grid.select_metric({**spec, "select_metric": {"sql": "accuracy"}}, "fact")
    with pytest.raises(ValueError, match="expected TASK=METRIC"):
        grid.main([str(path), "--results", str(results), "--picks", "--select-metric", "edit_score"])


def test_scored_validation_items_counts_the_validation_edits_a_test_split_also_scores():
    spec = {**SPEC, "tasks": ["fact"]}
    # fact trains on every record: scoring "train" scores all 19 validation edits; its "test" split none
    assert grid.scored_validation_items({**spec, "test_split": {"fact": "train"}}, "fact") == 19
    assert grid.scored_validation_items(spec, "fact") == 0
    # "train-validation": every trained edit but the validation ones, scored; the picks stay held out
    held_out = {**spec, "test_split": {"fact": "train-validation"}}
    assert grid.scored_validation_items(held_out, "fact") == 0
    rows = grid.test_rows(held_out, "fact")
    assert len(rows) == 182 - 19 and not any(r["case_id"] % 10 == 1 for r in rows)
    assert len(grid.test_rows(held_out, "fact", limit=5)) == 5
    with pytest.raises(ValueError, match=r"test_split 'val' of task 'fact' is not one of .*'train-validation'"):
        grid.test_rows({**spec, "test_split": {"fact": "val"}}, "fact")


def test_a_cell_another_process_holds_is_skipped_and_the_next_run_collects_it(tmp_path, capsys):
    """Two grid processes on one table split the cells: a run directory's lock (held by the other
    process while it trains or tests that cell) makes this one skip it and go on."""
    from molf.lab.train import RunLock

    results, spec = tmp_path / "results", write_spec(tmp_path)
    busy = grid.run_dir(SPEC, "tbl", "tiny", "fact", "lora", 1e-3, 0, results)
    busy.mkdir(parents=True)
    with RunLock(busy):  # "another process" trains lora lr=1e-3 seed 0
        assert grid.main([str(spec), "--results", str(results), "--sweep-only"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {busy.relative_to(results)}: another process holds it" in printed
    assert not (busy / "metrics.json").exists()
    val = pd.read_csv(results / "tbl_validation.csv")
    assert sorted(zip(val.method, val.lr)) == [("lora", 1e-6), ("molf", 1e-4)]  # the others trained
    # the next run trains the skipped cell and completes the table
    assert grid.main([str(spec), "--results", str(results)]) == 0
    assert (busy / "metrics.json").is_file()
    assert len(pd.read_csv(results / "tbl_validation.csv")) == 5  # 3 sweep cells + seed 1 of both picks


def test_a_run_another_process_is_testing_is_left_out_then_tested_once(tmp_path, capsys):
    from molf.lab.train import RunDirectoryInUse, RunLock

    results, spec = tmp_path / "results", write_spec(tmp_path)
    assert grid.main([str(spec), "--results", str(results), "--sweep-only", "--keep-models"]) == 0
    picked = grid.run_dir(SPEC, "tbl", "tiny", "fact", "molf", 1e-4, 0, results)
    (picked / "test_metrics.json").unlink()  # as if it had not been tested yet
    with RunLock(picked):
        with pytest.raises(RunDirectoryInUse):
            grid.test_metrics(picked, "fact", SPEC["test_limit"], SPEC)
        capsys.readouterr()
        assert grid.main([str(spec), "--results", str(results), "--report"]) == 0
        assert f"left out {picked.relative_to(results)}: another process is testing it" in capsys.readouterr().out
        assert "molf" not in set(pd.read_csv(results / "tbl.csv").method)
    assert grid.main([str(spec), "--results", str(results), "--report"]) == 0
    assert (picked / "test_metrics.json").is_file()
    assert "molf" in set(pd.read_csv(results / "tbl.csv").method)
