"""experiments/report.py's Claims section on a fake results folder whose outcomes are known."""
import json
from pathlib import Path

import pandas as pd
from scripts import report

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
    assert claims[1].startswith("claim 1: reproduced") and claims[1].count("→ reproduced") == 3
    assert "fact: fft 0.900 vs lora 0.300: diff +0.600" in claims[1] and "n=300" in claims[1]
    assert claims[2].startswith("claim 2: reproduced")
    assert claims[3].startswith("claim 3: not reproduced") and "molf_e 0.300 vs adalora 0.900" in claims[3]
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
    printed = report.brief(ROOT / "results" / "v2", "main_v2", "ablations_v2")
    assert block.strip() == printed.strip(), (
        "README.md's evidence block is stale: rerun experiments/report.py --results results/v2 --table main_v2 "
        "--ablations ablations_v2 --brief --readme README.md")


def test_a_claim_over_every_task_stays_inconclusive_while_a_planned_task_has_no_runs(tmp_path):
    seeds = 3
    outcomes = {("fact", "fft"): [correct_share(0.9)] * seeds, ("fact", "lora"): [correct_share(0.3)] * seeds,
                ("fact", "molf"): [correct_share(0.9)] * seeds}
    results = fake_results(tmp_path, outcomes)
    claims = lines_of(report.claims_section(results, "tbl"))
    assert claims[2].startswith("claim 2: reproduced")  # the table plans fact only
    csv = pd.read_csv(results / "tbl.csv")
    csv.assign(tasks_planned="fact mcq2 sql").to_csv(results / "tbl.csv", index=False)
    claims = lines_of(report.claims_section(results, "tbl"))
    for n in (1, 2, 3):
        assert claims[n].startswith(f"claim {n}: inconclusive") and "mcq2: no test runs yet; sql: no test runs yet" in claims[n]
