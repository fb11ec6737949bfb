"""The regime map's classroom app in a real browser: JupyterLab driven by headless Chromium (playwright).

A JupyterLab server on 127.0.0.1 serves a copy of ``07_regime_map`` with small parameters (the committed
map, no regression slice, short routing and classroom runs). The test runs all cells from the Run menu,
waits for the classroom app, and checks that its sliders are real controls, that moving the shift-rank
slider and the learning-rate-ratio slider each retrains and redraws the figure (the info line changes with
it), that no cell shows a traceback and that the browser console stays free of errors. The browser only
talks to 127.0.0.1. Shares the server and browser helpers of ``tests/test_browser.py``; skipped without
Debian's ``chromium`` and ``playwright`` (a failure when ``MOLF_REQUIRE_BROWSER=1``).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    NEW_FIGURE,
    PANEL,
    _browser_or_skip,
    lab_over,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "07_regime_map"
SMALL = {"map_csv": str(ROOT / "results" / "regime_map.csv"), "regression_slice": False, "routing_seeds": 2,
         "routing_steps": 30, "classroom_seeds": 2, "classroom_steps": 40}
RUN_ALL_S = 240
REDRAW_S = 60            # one retrain of every method (about 2 s on an idle core) and the redraw
APP = "[data-browser-test=regime-app]"
FIGURE = f"{APP} .widget-output img"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser_regime")
    with lab_over(folder, NOTEBOOK, SMALL, runs_dir=folder / "runs") as (base, token):
        yield base, token, folder


def _redraw(pg, action, what: str) -> float:
    before = pg.locator(FIGURE).first.get_attribute("src") or ""
    start = time.monotonic()
    action()
    try:
        pg.wait_for_function(NEW_FIGURE, arg=[FIGURE, before], timeout=REDRAW_S * 1000, polling=100)
    except Exception as error:
        raise AssertionError(f"the figure did not change within {REDRAW_S} s after {what}") from error
    return time.monotonic() - start


def test_classroom_app_in_jupyterlab(lab):
    sync_playwright = _browser_or_skip()
    base, token, folder = lab
    errors, refused = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1100})

            def local_only(route):
                if route.request.url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:")):
                    route.continue_()
                else:
                    refused.append(route.request.url)
                    route.abort()

            context.route("**/*", local_only)
            pg = context.new_page()
            pg.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            pg.set_default_timeout(30_000)
            try:
                _check_app(pg, base, token)
            except BaseException:
                pg.screenshot(path=str(folder / "failure.png"), full_page=True)
                print(f"screenshot {folder / 'failure.png'}; JupyterLab log:\n{(folder / 'lab.log').read_text()[-4000:]}")
                raise
        finally:
            browser.close()
    assert not errors, "browser console errors:\n" + "\n".join(errors)
    assert not refused, f"the page asked for something other than 127.0.0.1: {refused}"


def _check_app(pg, base: str, token: str) -> None:
    pg.goto(f"{base}/lab/workspaces/regime-test/tree/{NOTEBOOK}.ipynb?reset&token={token}")
    pg.locator(PANEL).locator(".jp-Cell").first.wait_for(timeout=60_000)
    pg.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(timeout=60_000)
    pg.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    pg.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    panel = pg.locator(PANEL)
    app = panel.locator(".jp-OutputArea-output", has=pg.locator(".widget-slider")).first
    app.locator(".widget-output img").first.wait_for(timeout=RUN_ALL_S * 1000)
    app.evaluate("el => el.setAttribute('data-browser-test', 'regime-app')")

    text = panel.inner_text()
    for bad in ("Box(children=", "Error displaying widget", "Traceback"):
        assert bad not in text, f"the notebook shows {bad!r}"
    sliders = pg.locator(f"{APP} .widget-slider")
    assert sliders.count() == 5, "five sliders: shift rank, examples, noise, LoRA rank, lr ratio"
    info = pg.locator(f"{APP} .widget-html").last
    before = info.inner_text()

    rank = sliders.nth(0)
    seconds = _redraw(pg, lambda: (rank.locator(".noUi-handle").first.focus(),
                                   rank.locator(".noUi-handle").first.press("End")), "moving the shift rank")
    assert rank.locator(".widget-readout").inner_text().strip() == "64"
    assert info.inner_text() != before and "FFT" in info.inner_text().split(" wins")[0], info.inner_text()
    ratio = sliders.nth(4)
    seconds2 = _redraw(pg, lambda: (ratio.locator(".noUi-handle").first.focus(),
                                    ratio.locator(".noUi-handle").first.press("End")), "moving the lr ratio")
    assert ratio.locator(".widget-readout").inner_text().strip() == "10.0"
    print(f"redraw seconds: shift rank {seconds:.1f}, lr ratio {seconds2:.1f}")
