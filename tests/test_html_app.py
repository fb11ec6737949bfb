"""The router explorer as one self-contained HTML file, checked as data and in a real browser."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from toy import batch, loss_fn, toy

import molf
from molf.lab import html_app, runs


def _routing(steps=12, seed=0, lr_lora=1e-4):
    """The routing table of a short MoLF run of the toy model (as a run's ``routing.jsonl`` reads)."""
    model = toy(seed)
    molf.wrap(model, ranks=(2,))
    opt = molf.MoLFAdamW(molf.param_groups(model, lr_fft=1e-3, lr_lora=lr_lora))
    rows = []
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, batch(step)).backward()
        opt.step()
        for module, scores in opt.last_scores.items():
            for expert, score in scores.items():
                rows.append((step, module, expert, score, expert in opt.last_decisions[module]))
    table = pd.DataFrame(rows, columns=["step", "module", "expert", "score", "won"])
    table.insert(2, "layer", table["module"].map(runs.module_layer))
    table.insert(3, "module_type", table["module"].map(runs.module_type))
    return table


def test_frames_hold_every_decision_and_score():
    table = _routing()
    f = html_app.frames(table)
    assert f["steps"] == list(range(12)) and f["experts"] == ["fft", "lora0"] and f["layers"] == [0, 1]
    for row in table[table["won"]].itertuples():
        li, ti = f["layers"].index(row.layer), f["types"].index(row.module_type)
        assert f["experts"][f["winner"][row.step][li][ti]] == row.expert
        assert f["log_score"][row.step][li][ti][f["experts"].index(row.expert)] == pytest.approx(
            torch.tensor(row.score).log10().item(), abs=1e-3)
    fft_share = table[(table.expert == "fft")].groupby("module")["won"].mean()
    li, ti = f["layers"].index(0), f["types"].index("q_proj")
    assert f["cumulative"][-1][li][ti] == pytest.approx(fft_share["layers.0.q_proj"], abs=1e-3)
    assert f["colors"][0] != f["colors"][1]


def test_thinning_keeps_every_nth_step_and_the_last_and_the_cap_names_what_fits(tmp_path):
    table = _routing(steps=10)
    assert html_app.frames(table, every=3)["steps"] == [0, 3, 6, 9]
    assert html_app.frames(table, every=4)["steps"] == [0, 4, 8, 9]
    with pytest.raises(ValueError, match="every must be an integer"):
        html_app.frames(table, every=0)
    cap = html_app.page_mb() + 0.6 * html_app.estimate_mb(table)
    with pytest.raises(ValueError, match=r"every=\d+ \(or every='auto'\) would fit"):
        html_app.export(table, tmp_path / "x.html", max_mb=cap)
    assert not (tmp_path / "x.html").exists()
    path = html_app.export(table, tmp_path / "x.html", every="auto", max_mb=cap)
    data = json.loads(re.search(r"const RUNS = (.*);\n", path.read_text()).group(1))
    assert len(next(iter(data.values()))["steps"]) < 10
    assert path.stat().st_size / 1e6 <= cap * 1.25  # the estimate is an estimate, within 25% here


def test_the_page_is_self_contained(tmp_path):
    page = html_app.export({"EPD": _routing(4), "other seed": _routing(4, seed=1)}, tmp_path / "x.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<script src" not in page and "<link" not in page
    assert '"EPD"' in page and '"other seed"' in page


def test_a_label_cannot_break_out_of_the_script(tmp_path):
    page = html_app.export({"</script><script>alert(1)</script>": _routing(3), "b": _routing(3)},
                           tmp_path / "x.html").read_text()
    assert page.count("</script>") == 1


# ---------------------------------------------------------------------------- in a real browser
def _changing_module(f):
    """A (layer index, type index, step a, step b) whose winner differs between the two steps."""
    for li in range(len(f["layers"])):
        for ti in range(len(f["types"])):
            winners = [frame[li][ti] for frame in f["winner"]]
            if len(set(winners)) > 1:
                a = 0
                b = next(i for i, w in enumerate(winners) if w != winners[a])
                return li, ti, a, b
    pytest.fail("no module changed its winner in this run: pick another lr for the test")


def test_the_page_in_chromium_moves_with_the_slider_and_plays_every_step(tmp_path):
    from test_browser import CHROMIUM, CHROMIUM_ARGS, _browser_or_skip

    sync_playwright = _browser_or_skip()
    table = _routing(steps=12)
    path = html_app.export(table, tmp_path / "explorer.html")
    f = html_app.frames(table)
    li, ti, a, b = _changing_module(f)
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                   else (errors.append(route.request.url), route.abort()))
        page.goto(path.as_uri())
        page.select_option("#layer", str(li))
        page.select_option("#type", str(ti))

        def at(step_index):
            page.eval_on_selector("#step", "(s, v) => { s.value = v; s.dispatchEvent(new Event('input')); }",
                                  str(step_index))
            return (page.inner_text("#winner"), page.inner_text("#step-label"),
                    page.eval_on_selector_all("#map rect", "rs => rs.map(r => r.getAttribute('fill')).join()"),
                    page.get_attribute("#cursor", "x1"))

        first, second = at(a), at(b)
        assert first[0] == f["experts"][f["winner"][a][li][ti]]
        assert second[0] == f["experts"][f["winner"][b][li][ti]] and second[0] != first[0]
        assert first[1] != second[1] and first[2] != second[2] and first[3] != second[3]
        page.screenshot(path=str(tmp_path / "explorer.png"))
        page.evaluate("""() => { window.seen = [];
            new MutationObserver(() => window.seen.push(document.getElementById('step-label').textContent))
              .observe(document.getElementById('step-label'), {childList: true, characterData: true, subtree: true}); }""")
        at(0)
        page.click("#play")
        page.wait_for_function("document.getElementById('play').textContent === 'Play'", timeout=30_000)
        seen = [int(s.split()[0]) for s in page.evaluate("window.seen")]
        browser.close()
    played = list(dict.fromkeys(seen[1:]))  # after the jump to step 0
    assert played == list(range(len(f["steps"]))), f"Play skipped or repeated steps: {played}"
    assert errors == []
