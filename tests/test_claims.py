"""experiments/report.py's Claims section on a fake results folder whose outcomes are known."""
import json
from pathlib import Path

import pandas as pd
from scripts import figures, report

N = 100  # items per task


def correct_share(share: float, offset: int = 0) -> list[int]:
    """0/1 per item: the first ``share`` of the items right (rotated by ``offset``)."""
    right = [int(i < share * N) for i in range(N)]
    return right[offset:] + right[:offset]


def fake_results(tmp_path: Path, outcomes: dict, table: str = "tbl", with_predictions: bool = True) -> Path:
    """``outcomes``: (task, method) -> per-seed lists of 0/1 per item. Writes the runs' predictions and
    the table CSV the grid would write."""
    results = tmp_path / "results"
    rows = []
    for (task, method), seeds in outcomes.items():
        for seed, correct in enumerate(seeds):
            folder = results / "runs" / table / task / method / f"lr0.001_s{seed}"
            folder.mkdir(parents=True)
            if with_predictions:
                (folder / "test_predictions.jsonl").write_text("".join(
                    json.dumps({"id": f"{task}-{i}", "prediction": "x", "correct": c}) + "\n"
                    for i, c in enumerate(correct)))
            rows.append({"model": "m", "task": task, "method": method, "lr": 0.001, "seed": seed,
                         "test_score": sum(correct) / N, "dir": str(folder.relative_to(results))})
    pd.DataFrame(rows).to_csv(results / f"{table}.csv", index=False)
    return results


def lines_of(text: str) -> dict[int, str]:
    return {int(line.split(":")[0].split()[1]): line for line in text.splitlines()}


def test_claims_follow_the_paired_comparisons(tmp_path):
    seeds = 3
    good, poor = [correct_share(0.9)] * seeds, [correct_share(0.3)] * seeds
    outcomes = {
        ("fact", "fft"): good, ("fact", "lora"): poor,         # FFT wins knowledge injection
        ("sql", "fft"): poor, ("sql", "lora"): good,           # LoRA wins sql
        ("mcq2", "fft"): poor, ("mcq2", "lora"): good,         # and mcq2: claim 1 reproduced
        ("fact", "molf"): good, ("sql", "molf"): good, ("mcq2", "molf"): good,  # = the better: claim 2
        ("fact", "molf_e"): poor, ("fact", "adalora"): good, ("fact", "dora"): good,  # claim 3 fails
    }
    results = fake_results(tmp_path, outcomes)
    claims = lines_of(report.claims_section(results, "tbl"))
    # mcq2 leaves the verdicts: claim 1 reads fact and sql only
    assert claims[1].startswith("claim 1: reproduced") and claims[1].count("→ reproduced") == 2
    assert "mcq2" not in claims[1] and "mcq2" not in claims[2]
    assert "fact: fft 0.900 vs lora 0.300: diff +0.600" in claims[1] and "n=300" in claims[1]
    assert claims[2].startswith("claim 2: reproduced")
    # claim 3 fails on fact, but sql, a task of the table, has no MoLF-E runs: incomplete, saying what
    assert claims[3].startswith("claim 3: incomplete (sql: no test runs of molf_e)")
    assert "molf_e 0.300 vs adalora 0.900" in claims[3] and "→ not reproduced" in claims[3]
    assert claims[4].startswith("claim 4: inconclusive") and claims[5].startswith("claim 5: inconclusive")


def test_claim_1_reads_sql2_where_a_table_has_it_as_it_reads_mcq2_over_mcq(tmp_path):
    good, poor = [correct_share(0.9)], [correct_share(0.3)]
    outcomes = {("sql", "fft"): good, ("sql", "lora"): good,      # saturated: both right everywhere
                ("sql2", "fft"): poor, ("sql2", "lora"): good,    # the version that tests transfer
                ("mcq", "fft"): good, ("mcq", "lora"): poor, ("mcq2", "fft"): poor, ("mcq2", "lora"): good}
    claim = lines_of(report.claims_section(fake_results(tmp_path, outcomes), "tbl"))[1]
    assert claim.startswith("claim 1: reproduced") and "sql2: lora 0.900 vs fft 0.300" in claim
    assert "sql:" not in claim and "mcq:" not in claim


def test_a_small_difference_is_inconclusive_and_a_clear_loss_within_margin_claims_fail(tmp_path):
    outcomes = {
        ("fact", "fft"): [correct_share(0.52, 3)], ("fact", "lora"): [correct_share(0.50)],  # too close to call
        ("fact", "molf"): [correct_share(0.30)],                    # far below the better: claim 2 fails
    }
    claims = lines_of(report.claims_section(fake_results(tmp_path, outcomes), "tbl"))
    assert claims[1].startswith("claim 1: inconclusive") and "→ inconclusive" in claims[1]
    assert claims[2].startswith("claim 2: not reproduced")
    assert claims[3].count("no test runs of molf_e") == 1  # said once, not once per method compared
    assert claims[3].startswith("claim 3: incomplete (fact: no test runs of molf_e)")


def test_a_gap_that_flips_with_the_seed_gets_no_verdict(tmp_path):
    # FFT wins seeds 0 and 2 by 40 points and loses seed 1 by 40: 120 discordant items, 80 for FFT,
    # which McNemar over the pooled items would call significant; resampling seeds shows the sign
    # of the gap is not settled by three runs.
    outcomes = {("fact", "fft"): [correct_share(0.8), correct_share(0.4), correct_share(0.8)],
                ("fact", "lora"): [correct_share(0.4), correct_share(0.8), correct_share(0.4)]}
    results = fake_results(tmp_path, outcomes)
    claims = lines_of(report.claims_section(results, "tbl"))
    assert claims[1].startswith("claim 1: inconclusive") and "diff +0.133" in claims[1]
    low = float(claims[1].split("diff +0.133 [")[1].split(",")[0])
    assert low < 0 and "3 seeds → inconclusive" in claims[1]
    xs, ys, seeds = report.paired_scores(pd.read_csv(results / "tbl.csv"), results, "tbl", "fact", "fft", "lora")
    assert seeds == 3 and [sum(row) for row in xs] == [80, 40, 80] and [sum(row) for row in ys] == [40, 80, 40]


def test_an_unfinished_table_shows_its_numbers_but_gives_no_verdict_yet(tmp_path):
    outcomes = {("fact", "fft"): [correct_share(0.9)], ("fact", "lora"): [correct_share(0.3)]}
    results = fake_results(tmp_path, outcomes)
    csv = pd.read_csv(results / "tbl.csv")
    for open_sweep, planned, why in ((True, 1, "lr sweep of lora unfinished"), (False, 5, "1 of 5 seeds")):
        csv.assign(sweep_complete=[True, not open_sweep], seeds_planned=planned).to_csv(results / "tbl.csv",
                                                                                        index=False)
        claim = lines_of(report.claims_section(results, "tbl"))[1]
        assert claim.startswith("claim 1: inconclusive")
        assert f"→ reproduced so far, preliminary ({why})" in claim and "fft 0.900 vs lora 0.300" in claim
    csv.assign(sweep_complete=True, seeds_planned=1).to_csv(results / "tbl.csv", index=False)
    assert lines_of(report.claims_section(results, "tbl"))[1].startswith("claim 1: reproduced")


def test_an_unfinished_comparison_that_leans_nowhere_still_says_it_is_unfinished(tmp_path):
    outcomes = {("fact", "fft"): [correct_share(0.52)], ("fact", "lora"): [correct_share(0.5)]}
    results = fake_results(tmp_path, outcomes)
    csv = pd.read_csv(results / "tbl.csv")
    csv.assign(sweep_complete=True, seeds_planned=5).to_csv(results / "tbl.csv", index=False)
    claim = lines_of(report.claims_section(results, "tbl"))[1]
    assert claim.startswith("claim 1: inconclusive")
    assert "1 seeds → inconclusive so far, preliminary (1 of 5 seeds)" in claim
    csv.assign(sweep_complete=True, seeds_planned=1).to_csv(results / "tbl.csv", index=False)
    assert "preliminary" not in lines_of(report.claims_section(results, "tbl"))[1]


def test_runs_without_predictions_get_no_verdict(tmp_path):
    outcomes = {("fact", "fft"): [correct_share(0.9)], ("fact", "lora"): [correct_share(0.1)]}
    claims = lines_of(report.claims_section(fake_results(tmp_path, outcomes, with_predictions=False), "tbl"))
    assert claims[1] == "claim 1: inconclusive (no per-item predictions) — fact fft vs lora: no per-item predictions"


def test_dense_vs_routed_claim_reads_the_ablation_table(tmp_path):
    results = fake_results(tmp_path, {("fact", "fft"): [correct_share(0.5)]})
    routed = fake_results(tmp_path / "abl", {("fact", "molf_k1"): [correct_share(0.8)] * 2,
                                             ("fact", "molf_dense_k2"): [correct_share(0.4)] * 2},
                          table="ablations_v2")
    for path in routed.rglob("*"):  # move the ablation runs into the main results folder
        target = results / path.relative_to(routed)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
    claims = lines_of(report.claims_section(results, "tbl", "ablations_v2"))
    assert claims[5].startswith("claim 5: reproduced") and "molf_k1 0.800 vs molf_dense_k2 0.400" in claims[5]


def test_claim_5_of_ablations_v3_compares_the_tuned_dense_runs_on_the_edit_score(tmp_path):
    results = fake_results(tmp_path, {("fact", "fft"): [correct_share(0.5)]})
    table = "ablations_v3"
    rows = []
    # both at the efficacy ceiling (every edit learned); routed flips fewer neighbours: edit score 0.8 vs 0.5
    for method, edit in [("molf_k1", 0.8), ("molf_dense_k2", 0.5)]:
        for seed in range(3):
            folder = results / "runs" / table / "fact" / method / f"lr0.001_s{seed}"
            folder.mkdir(parents=True)
            (folder / "test_predictions.jsonl").write_text("".join(
                json.dumps({"id": f"fact-{i}", "prediction": "new", "correct": 1,
                            "edit_score": float(i < edit * N)}) + "\n" for i in range(N)))
            rows.append({"model": "m", "task": "fact", "method": method, "lr": 0.001, "seed": seed,
                         "test_score": 1.0, "dir": str(folder.relative_to(results))})
    pd.DataFrame(rows).to_csv(results / f"{table}.csv", index=False)
    claim5 = lines_of(report.claims_section(results, "tbl", table))[5]
    assert claim5.startswith("claim 5: reproduced") and "molf_k1 0.800 vs molf_dense_k2 0.500" in claim5
    assert claim5.endswith("(on the per-item edit score)")
    # ablations_v2 compares efficacy: the same runs there would sit at the ceiling
    assert report.ABLATION_FIELD.get("ablations_v2", "correct") == "correct"
    assert ("molf_e_equal_scale", "molf_e_k1") in report.ablation_pairs(table)


def test_fact_scores_beyond_efficacy_are_compared_paired_and_tell_methods_apart(tmp_path):
    # both methods learn every edit (efficacy 1.0: at the ceiling), FFT leaves more neighbours alone
    outcomes = {("fact", "fft"): [[1] * N] * 2, ("fact", "lora"): [[1] * N] * 2}
    results = fake_results(tmp_path, outcomes)
    for method, flip in (("fft", 0.2), ("lora", 0.6)):
        for seed in range(2):
            path = results / "runs" / "tbl" / "fact" / method / f"lr0.001_s{seed}" / "test_predictions.jsonl"
            path.write_text("".join(json.dumps(
                {"id": f"fact-{i}", "prediction": "new", "correct": 1, "paraphrase_efficacy": 1.0,
                 "edit_score": 1 - int(i < flip * N), "margin": 3.0 if method == "fft" else 2.0}) + "\n"
                for i in range(N)))
    claim = lines_of(report.claims_section(results, "tbl"))[1]
    assert claim.startswith("claim 1: inconclusive") and "diff +0.000" in claim and "(both at the ceiling)" in claim
    lines = report.secondary_lines(results, "tbl").splitlines()
    assert len(lines) == 3  # fft vs lora on each secondary score; the pairs that did not run are left out
    edit, margin, paraphrase = lines
    assert edit.startswith("fact edit score") and "fft 0.800 vs lora 0.400: diff +0.400" in edit
    assert edit.endswith("→ fft higher") and "n=200, 2 seeds" in edit
    assert "diff +1.000" in margin and margin.endswith("→ fft higher")
    assert paraphrase.endswith("→ no difference shown")
    # another table's pairs (the ablations'): only those, in their own order
    swapped = report.secondary_lines(results, "tbl", [("lora", "fft"), ("molf", "fft")]).splitlines()
    assert len(swapped) == 3 and "lora 0.400 vs fft 0.800: diff -0.400" in swapped[0]
    assert ("molf_e_k1", "molf_e_train_embeddings") in report.ablation_pairs("ablations_v2")


def test_brief_writes_claims_and_main_table_between_the_readme_markers(tmp_path):
    import pytest
    outcomes = {("fact", "fft"): [correct_share(0.9)], ("fact", "lora"): [correct_share(0.3)]}
    results = fake_results(tmp_path, outcomes)
    test = pd.read_csv(results / "tbl.csv")
    (test.groupby(["task", "method"]).agg(lr=("lr", "first"), mean=("test_score", "mean"),
                                          std=("test_score", "std"), seeds=("seed", "count"))
     .reset_index().assign(sweep_complete=True).to_csv(results / "tbl_summary.csv", index=False))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.README_BEGIN}\nold numbers\n{report.README_END}\nafter\n")
    assert report.main(["--results", str(results), "--table", "tbl", "--brief", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    block = text.split(report.README_BEGIN)[1].split(report.README_END)[0]
    assert "claim 1: reproduced" in block or "claim 1: inconclusive" in block
    assert "| FFT | 90.0 |" in block and block.strip() == report.brief(results, "tbl", None).strip()
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- begin"):
        report.main(["--results", str(results), "--table", "tbl", "--brief", "--readme", str(readme)])


def test_a_task_is_one_when_its_best_method_beats_the_best_model_free_rule(tmp_path):
    from molf.lab import tasks
    ids = [r["id"] for r in tasks.load("mcq2", "test")]
    results = tmp_path / "results"
    rows = []
    for method, share in (("fft", 0.95), ("lora", 0.30)):  # lora near the best rule's ~30%
        folder = results / "runs" / "tbl" / "mcq2" / method / "lr0.001_s0"
        folder.mkdir(parents=True)
        correct = [int(i < share * len(ids)) for i in range(len(ids))]
        (folder / "test_predictions.jsonl").write_text("".join(
            json.dumps({"id": i, "prediction": "A", "correct": c}) + "\n" for i, c in zip(ids, correct)))
        rows.append({"task": "mcq2", "method": method, "lr": 0.001, "seed": 0, "test_score": share,
                     "dir": str(folder.relative_to(results))})
    pd.DataFrame(rows).to_csv(results / "tbl.csv", index=False)
    line = report.task_lines(results, "tbl")
    assert line.startswith("mcq2: best method fft 0.950 vs ") and line.endswith("1 seeds → a task")
    pd.DataFrame(rows[1:]).to_csv(results / "tbl.csv", index=False)  # only the weak method ran
    assert report.task_lines(results, "tbl").endswith("→ not a task yet")


def test_the_readmes_evidence_block_is_what_the_report_prints_from_the_committed_results():
    from scripts import ROOT
    readme = (ROOT / "README.md").read_text()
    block = readme.split(report.README_BEGIN)[1].split(report.README_END)[0]
    printed = report.brief(ROOT / "results" / "v2", "main_v2", "ablations_v3", ROOT / "results" / "v3" / "confirm_v3.csv")
    assert block.strip() == printed.strip(), (
        "README.md's evidence block is stale: rerun python -m experiments.report --results results/v2 --table main_v2 "
        "--ablations ablations_v3 --confirm results/v3/confirm_v3.csv --brief --readme README.md")


def test_a_claim_over_every_task_stays_incomplete_while_a_planned_task_has_no_runs(tmp_path):
    seeds = 3
    outcomes = {("fact", "fft"): [correct_share(0.9)] * seeds, ("fact", "lora"): [correct_share(0.3)] * seeds,
                ("fact", "molf"): [correct_share(0.9)] * seeds}
    results = fake_results(tmp_path, outcomes)
    claims = lines_of(report.claims_section(results, "tbl"))
    assert claims[2].startswith("claim 2: reproduced")  # the table plans fact only
    csv = pd.read_csv(results / "tbl.csv")
    csv.assign(tasks_planned="fact mcq2 sql").to_csv(results / "tbl.csv", index=False)
    claims = lines_of(report.claims_section(results, "tbl"))
    for n in (1, 2, 3):  # mcq2 is planned too, but reads no verdict
        verdict = claims[n].split(" — ")[0]
        assert verdict.startswith(f"claim {n}: incomplete (") and verdict.endswith("sql: no test runs yet)")
        assert "mcq2" not in claims[n]


def test_a_planned_part_without_runs_makes_a_claim_incomplete_never_reproduced():
    passing = ("reproduced", "fact: fft beats lora → reproduced")
    line = report._claim_line(1, [passing, ("reproduced", "sql2: lora beats fft → reproduced"),
                                  ("absent", "sql2: no test runs of molf")])
    assert line.startswith("claim 1: incomplete (sql2: no test runs of molf) — fact: fft beats lora")
    assert report._claim_line(1, [passing, passing]).startswith("claim 1: reproduced")
    failing = ("not reproduced", "fact: lora beats fft → not reproduced")
    assert report._claim_line(1, [passing, failing]).startswith("claim 1: not reproduced")
    assert report._claim_line(1, [failing, ("absent", "x: no test runs yet")]).startswith("claim 1: incomplete")


def test_the_ceiling_guard_covers_non_inferiority(tmp_path):
    # both learn every item: "MoLF no worse than FFT" would pass trivially; it gets no verdict
    outcomes = {("fact", "fft"): [[1] * N] * 2, ("fact", "lora"): [correct_share(0.5)] * 2,
                ("fact", "molf"): [[1] * (N - 1) + [0]] * 2}
    claim = lines_of(report.claims_section(fake_results(tmp_path, outcomes), "tbl"))[2]
    assert claim.startswith("claim 2: inconclusive") and "(both at the ceiling)" in claim
    # below the ceiling the same test decides
    outcomes[("fact", "fft")] = outcomes[("fact", "molf")] = [correct_share(0.8)] * 2
    claim = lines_of(report.claims_section(fake_results(tmp_path / "b", outcomes), "tbl"))[2]
    assert claim.startswith("claim 2: reproduced") and "ceiling" not in claim


def dynamics(rows):
    columns = ["task", "method", "expert", "win_share", "agreement_10pct", "null_time_10pct", "null_type_10pct"]
    return pd.DataFrame(rows, columns=columns)


def test_claim_4_is_judged_against_the_time_shuffled_and_module_type_nulls_with_molf_e_apart():
    early = [("fact", "molf", "fft", 0.5, 0.95, 0.90, 0.85)] * 3
    molf_e = [("fact", "molf_e", "lora1", 0.001, 1.0, 1.0, 1.0)] * 2
    line = report.claim4_line(dynamics(early + molf_e))
    assert line.startswith("claim 4: reproduced — MoLF (3 runs: fact)") and "above both in 3" in line
    assert "MoLF-E apart, not judged: its lora1 expert wins 0.1–0.1%" in line
    # routing that agrees less with the end than its own winners shuffled in time keeps moving
    moving = [("fact", "molf", "fft", 0.5, 0.84, 0.92, 0.82)] * 3
    line = report.claim4_line(dynamics(moving + molf_e))
    assert line.startswith("claim 4: not reproduced") and "above the time-shuffled null in 0 of 3 runs" in line
    # above the time null but not the module-type null in one run of three: not every run beats both
    mixed = early[:2] + [("fact", "molf", "fft", 0.5, 0.95, 0.90, 0.97)]
    assert report.claim4_line(dynamics(mixed)).startswith("claim 4: inconclusive")
    # MoLF-E's degenerate routing never decides; mcq2 runs are left out
    assert report.claim4_line(dynamics(early + [("fact", "molf_e", "lora1", 0.001, 0.1, 1.0, 1.0)])).startswith(
        "claim 4: reproduced")
    assert report.claim4_line(dynamics(early + [("mcq2", "molf", "fft", 0.5, 0.1, 0.9, 0.9)] * 5)).startswith(
        "claim 4: reproduced")
    old = dynamics(early).drop(columns=["null_time_10pct", "null_type_10pct"])
    assert "no null columns" in report.claim4_line(old)


def test_the_nulls_of_claim_4_on_hand_made_routing():
    from molf.lab import runs

    def routing(winner):  # winner(module, step) -> expert; two experts, one winner per (module, step)
        modules = [f"model.layers.0.self_attn.{t}_proj" for t in ("q", "k")] + ["model.layers.1.self_attn.q_proj"]
        rows = [{"module": m, "step": t, "expert": e, "won": winner(m, t) == e}
                for m in modules for t in range(20) for e in ("fft", "lora0")]
        frame = pd.DataFrame(rows)
        frame["module_type"] = [runs.module_type(m) for m in frame["module"]]
        return frame

    # every module keeps one winner from the start: both nulls and the run agree fully
    fixed = routing(lambda m, t: "fft" if "k_proj" in m else "lora0")
    assert figures.null_agreements(fixed) == (1.0, 1.0)
    # modules of one type (the two q) end on different winners: the type alone predicts half of them
    split = routing(lambda m, t: "fft" if "layers.1" in m or "k_proj" in m else "lora0")
    time_null, type_null = figures.null_agreements(split, shuffles=50)
    assert time_null == 1.0 and abs(type_null - 2 / 3) < 0.12
    # a module that alternates in the first half and settles on fft: the shuffle moves fft wins early
    late = routing(lambda m, t: ("fft" if t >= 10 or t % 2 else "lora0") if "k_proj" in m else "lora0")
    time_null, _ = figures.null_agreements(late, shuffles=200)
    assert 2 / 3 < time_null < 1.0


def test_the_fact_confirmation_needs_every_seed_and_shows_the_exploratory_seeds_beside(tmp_path):
    def with_edit_scores(results, table, scores):
        for (method, seed), share in scores.items():
            path = results / "runs" / table / "fact" / method / f"lr0.001_s{seed}" / "test_predictions.jsonl"
            path.write_text("".join(json.dumps({"id": f"fact-{i}", "correct": 1, "edit_score": int(i < share * N)})
                                    + "\n" for i in range(N)))

    methods = {"fft": 0.6, "lora": 0.3, "molf": 0.6, "molf_e": 0.4, "adalora": 0.2, "dora": 0.45}
    explore = fake_results(tmp_path / "e", {("fact", m): [[1] * N] * 2 for m in methods}, table="main")
    with_edit_scores(explore, "main", {(m, s): v for m, v in methods.items() for s in range(2)})
    confirm = fake_results(tmp_path / "c", {("fact", m): [[1] * N] * 5 for m in methods}, table="confirm")
    with_edit_scores(confirm, "confirm", {(m, s): v + 0.01 * (s % 2) for m, v in methods.items() for s in range(5)})
    csv = pd.read_csv(confirm / "confirm.csv")
    csv.assign(seeds_planned=5).to_csv(confirm / "confirm.csv", index=False)
    lines = report.confirmation_lines(confirm / "confirm.csv", explore, "main").splitlines()
    assert lines[0].startswith("Primary metric: fact's edit score; confirmation seeds 0, 1, 2, 3, 4")
    c1, c2, c3a, c3b, c3 = lines[1:]
    assert c1.startswith("C1 (claim 1, fft vs lora, superiority): reproduced — confirmation fact: fft ")
    assert "5 seeds → reproduced" in c1 and "exploratory fact: fft 0.600 vs lora 0.300" in c1  # beside, apart
    assert c2.startswith("C2 (claim 2, molf vs fft, non-inferiority, margin -1.5 points): reproduced")
    assert c3a.startswith("C3 (claim 3, molf_e vs adalora, superiority): reproduced")
    assert c3b.startswith("C3 (claim 3, molf_e vs dora, superiority): not reproduced")
    assert c3 == "C3 (claim 3 on fact, both parts): not reproduced"
    # efficacy is at the ceiling for all; the edit score is what decides
    assert "ceiling" not in c1
    # two of five seeds of lora: its comparisons are incomplete, numbers shown so far
    csv.assign(seeds_planned=5)[~((csv.method == "lora") & (csv.seed > 1))].to_csv(confirm / "confirm.csv", index=False)
    c1 = report.confirmation_lines(confirm / "confirm.csv", explore, "main").splitlines()[1]
    assert c1.startswith("C1 (claim 1, fft vs lora, superiority): incomplete (fft 5 of 5 seeds, lora 2 of 5 seeds)")
    assert "2 seeds (so far)" in c1 and "→ reproduced; exploratory" not in c1
    # before the confirmation's first run: every comparison incomplete, the exploratory seeds beside
    lines = report.confirmation_lines(tmp_path / "none.csv", explore, "main").splitlines()
    assert lines[0].startswith("Primary metric: fact's edit score; confirmation seeds none yet")
    assert lines[1].startswith("C1 (claim 1, fft vs lora, superiority): incomplete (fft 0 of 5 seeds, lora 0 of 5")
    assert "exploratory fact: fft 0.600 vs lora 0.300" in lines[1] and lines[-1].endswith(": incomplete")
    assert lines[2].startswith("C2 (claim 2, molf vs fft or lora, non-inferiority, margin -1.5 points): "
                               "incomplete (no test runs of fft and lora)")


def test_a_prediction_file_with_a_repeated_item_is_refused_naming_file_and_item(tmp_path):
    import pytest
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "test_predictions.jsonl").write_text("".join(
        json.dumps({"id": i, "correct": 1}) + "\n" for i in (0, 1, 2, 1)))
    with pytest.raises(ValueError, match=r"run/test_predictions.jsonl: item 1 has a second record on line 4"):
        report._predictions(folder)
