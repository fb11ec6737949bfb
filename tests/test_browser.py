"""The router explorer in a real browser: JupyterLab driven by headless Chromium (playwright).

A JupyterLab server on 127.0.0.1 (random port and token, settings and workspaces in a temporary folder)
serves a temporary copy of ``04_router_explorer`` whose parameters point at the tiny model, with its runs
and figures in the same temporary folder. The test opens it in a fresh workspace, runs all cells from the
Run menu and checks that the widgets render as real controls (no "Box(children=" text, no "Error displaying
widget"), that the mode buttons show their whole labels, that moving the step slider (right away, while
the last cells still run) and changing the layer, the module and the mode each redraw the figure, that the
run picker gives each run its own label, and that the browser console stays free of errors. The browser
only talks to 127.0.0.1: any other request is aborted and fails the test. Screenshots are left in the
temporary folder (printed on failure).

Needs Debian's ``chromium`` and the ``playwright`` package (its own browser download is not used); without
them the test is skipped, or fails when ``MOLF_REQUIRE_BROWSER=1`` (CI sets it).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jupytext
import nbformat
import pytest

from molf.lab import suite

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "04_router_explorer"
CHROMIUM = Path("/usr/bin/chromium")
PLAYWRIGHT_PIN = next((line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                       if line.startswith("playwright==")), "playwright")
INSTALL = f"apt-get install -y chromium && pip install {PLAYWRIGHT_PIN}"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# The notebook's parameters for the test: the suite's regression mode (the 2-layer random Llama, a handful of steps).
TINY = {**suite.TINY, "device": "cpu"}
SERVER_START_S = 90      # JupyterLab answering /api/status
RUN_ALL_S = 150          # every cell executed (tiny training, evaluation, live run)
REDRAW_S = 30            # one control's redraw: a figure of the tiny model takes well under a second
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
# Console errors that are not the app's, as {substring: the reason it is harmless}. None so far: every
# console error and uncaught page error fails the test.
BENIGN_CONSOLE: dict[str, str] = {}


def _browser_or_skip():
    """playwright's sync API, or a skip (a failure under MOLF_REQUIRE_BROWSER=1) naming the install command."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(str(CHROMIUM))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright package")
    if missing:
        message = f"no {' and no '.join(missing)}: install the browser: {INSTALL}"
        if os.environ.get("MOLF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MOLF_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook_with_parameters(folder: Path, name: str, values: dict, runs_dir: Path) -> Path:
    """Notebook ``name`` (from its committed .py) as an .ipynb in ``folder``, with ``values`` and its runs and
    figures under ``runs_dir`` in a cell after its parameters cell, as papermill injects them."""
    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")   # the committed form; the .ipynb is local
    values = {**values, "runs_dir": str(runs_dir), "figures_dir": str(runs_dir / "figures")}
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Parameters for the browser test\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@contextlib.contextmanager
def lab_over(folder: Path, name: str, values: dict, runs_dir: Path):
    """A JupyterLab server (``serve_lab``) over ``folder/notebooks``, which holds notebook ``name`` with
    ``values`` injected (``notebook_with_parameters``): yields (base url, token)."""
    _browser_or_skip()
    root = folder / "notebooks"
    root.mkdir()
    notebook_with_parameters(root, name, values, runs_dir)
    with serve_lab(folder, root) as (base, token):
        yield base, token


def _lab_settings(folder: Path) -> dict:
    """Environment for a JupyterLab that reads and writes only under ``folder`` (no user settings, no news)."""
    settings = folder / "lab-settings"
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    return {"JUPYTER_CONFIG_DIR": str(folder / "config"), "JUPYTER_DATA_DIR": str(folder / "data"),
            "JUPYTER_RUNTIME_DIR": str(folder / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(folder / "workspaces")}


@contextlib.contextmanager
def serve_lab(folder: Path, root: Path):
    """A JupyterLab server on 127.0.0.1 over ``root`` (settings, workspaces and its log in ``folder``):
    yields (base url, token), shut down afterwards."""
    port, token = _free_port(), secrets.token_hex(16)
    jupyter = Path(sys.executable).with_name("jupyter")
    env = {**os.environ, **_lab_settings(folder), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = (folder / "lab.log").open("w")
    server = subprocess.Popen(
        [str(jupyter), "lab", "--allow-root", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--ServerApp.shutdown_no_activity_timeout=600"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({server.returncode}):\n{(folder / 'lab.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab not up after {SERVER_START_S} s:\n"
                                       f"{(folder / 'lab.log').read_text()}") from None
                time.sleep(0.5)
        yield base, token
    finally:
        _shut_down(server, base, token)
        log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 over a tiny copy of the notebook: yields (base url, token, folder)."""
    folder = tmp_path_factory.mktemp("browser")
    with lab_over(folder, NOTEBOOK, TINY, runs_dir=folder / "notebooks" / "runs") as (base, token):
        yield base, token, folder


def _shut_down(server: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to stop (it stops its kernels), then make sure its whole process group is gone."""
    if server.poll() is None:
        try:
            request = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                             headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(request, timeout=10).close()
            server.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
    server.wait(timeout=10)


@pytest.fixture(scope="module")
def page(lab):
    """A headless Chromium page, local traffic only; yields (page, console errors, requests refused)."""
    sync_playwright = _browser_or_skip()
    base, token, folder = lab
    errors: list[str] = []
    refused: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1100})

            def local_only(route):
                url = route.request.url
                if url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:")):
                    route.continue_()
                else:
                    refused.append(url)
                    route.abort()

            context.route("**/*", local_only)
            pg = context.new_page()
            pg.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            pg.set_default_timeout(30_000)
            yield pg, errors, refused, folder
        finally:
            browser.close()


APP = "[data-browser-test=app]"
FIGURE = f"{APP} .widget-output img"
# every code cell has run: its prompt shows an execution count, none is waiting or running
ALL_CELLS_RAN = """(panel) => {
  const prompts = [...document.querySelectorAll(panel + ' .jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p.textContent.trim()));
}"""
NEW_FIGURE = """([selector, before]) => {
  const img = document.querySelector(selector);
  return img !== null && img.complete && img.naturalWidth > 0 && img.src !== before;
}"""


def _figure(pg) -> str:
    return pg.locator(FIGURE).first.get_attribute("src") or ""


def _redraw(pg, action, what: str) -> float:
    """Do ``action`` and wait (bounded) until the app shows a new, decoded figure; return the seconds taken."""
    before = _figure(pg)
    start = time.monotonic()
    action()
    try:
        pg.wait_for_function(NEW_FIGURE, arg=[FIGURE, before], timeout=REDRAW_S * 1000, polling=100)
    except Exception as error:
        raise AssertionError(f"the figure did not change within {REDRAW_S} s after {what}") from error
    return time.monotonic() - start


def _run_all(pg, base: str, token: str) -> None:
    pg.goto(f"{base}/lab/workspaces/browser-test/tree/{NOTEBOOK}.ipynb?reset&token={token}")
    pg.locator(PANEL).locator(".jp-Cell").first.wait_for(timeout=60_000)
    # the kernel must be connected and idle, or Run all opens the "Select Kernel" dialog instead
    pg.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(timeout=60_000)
    pg.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    pg.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def test_explorer_in_jupyterlab(page, lab):
    pg, errors, refused, folder = page
    base, token, _ = lab
    shots = folder / "screenshots"
    shots.mkdir(exist_ok=True)
    try:
        _check_explorer(pg, base, token, shots)
    except BaseException:
        pg.screenshot(path=str(shots / "failure.png"), full_page=True)
        print(f"screenshots in {shots}; JupyterLab log:\n{(folder / 'lab.log').read_text()[-4000:]}")
        raise
    unexplained = [e for e in errors if not any(benign in e for benign in BENIGN_CONSOLE)]
    assert not unexplained, "browser console errors:\n" + "\n".join(unexplained)
    assert not refused, f"the page asked for something other than 127.0.0.1: {refused}"


def _check_explorer(pg, base: str, token: str, shots: Path) -> None:
    t0 = time.monotonic()
    _run_all(pg, base, token)
    panel = pg.locator(PANEL)
    app = panel.locator(".jp-OutputArea-output", has=pg.locator(".widget-slider")).first
    app.locator(".widget-output img").first.wait_for(timeout=RUN_ALL_S * 1000)
    app.evaluate("el => el.setAttribute('data-browser-test', 'app')")
    shown = time.monotonic() - t0

    # the app answers at once: nothing slow is queued below it
    slider = pg.locator(f"{APP} .widget-slider")
    readout = slider.locator(".widget-readout")
    last = int(readout.inner_text())
    handle = slider.locator(".noUi-handle").first
    first_redraw = _redraw(pg, lambda: (handle.focus(), handle.press("Home")), "moving the step slider")
    assert int(readout.inner_text()) != last, "the slider did not move"
    pg.wait_for_function(ALL_CELLS_RAN, arg=PANEL, timeout=RUN_ALL_S * 1000, polling=250)
    print(f"app shown {shown:.1f} s after Run all; first redraw {first_redraw:.1f} s after moving the slider; "
          f"all cells done {time.monotonic() - t0:.1f} s after Run all")

    text = panel.inner_text()
    for bad in ("Box(children=", "Error displaying widget", "Traceback", "PosixPath("):
        assert bad not in text, f"the notebook shows {bad!r}"
    # the training cells said their expected time (recorded, or measured on the first steps)
    assert "expected: about" in text, "no expected time shown"
    said = panel.locator(".jp-OutputArea-output", has_text="expected: about").first
    said.scroll_into_view_if_needed()
    said.screenshot(path=str(shots / "expected_time.png"))
    # real controls: slider with play button, two dropdowns, the two mode buttons
    assert pg.locator(f"{APP} .widget-button", has_text="Play").count() == 1
    assert pg.locator(f"{APP} .widget-button", has_text="save this frame").count() == 1
    selects = pg.locator(f"{APP} .widget-dropdown select")
    assert selects.count() == 2
    modes = pg.locator(f"{APP} .widget-toggle-button")
    assert modes.count() == 2
    cut = modes.evaluate_all("els => els.filter(e => e.scrollWidth > e.clientWidth).map(e => e.textContent)")
    assert not cut, f"mode button labels cut off: {cut}"

    layer, module = selects.nth(0), selects.nth(1)
    other_layer = next(o for o in layer.locator("option").all_inner_texts() if o != layer.input_value())
    timings = {"slider": first_redraw}
    timings["layer"] = _redraw(pg, lambda: layer.select_option(label=other_layer), "changing the layer")
    timings["module"] = _redraw(pg, lambda: module.select_option(label="v_proj"), "changing the module")
    pg.wait_for_timeout(1000)  # a redrawn figure is decoded, not half drawn
    pg.locator(APP).screenshot(path=str(shots / "decision.png"))
    timings["mode"] = _redraw(pg, lambda: modes.filter(has_text="cumulative").click(), "changing the mode")
    timings["slider again"] = _redraw(pg, lambda: (handle.focus(), handle.press("End")), "moving the slider")
    print("redraw seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    info = pg.locator(f"{APP} .widget-html").all_inner_texts()
    assert any("v_proj" in t for t in info), f"the info line does not name the selected module: {info}"

    # Play shows every step, in order: record each value the slider's readout takes while it plays
    steps = list(range(TINY["steps"]))
    readout.evaluate("""el => { window.__seen = [el.textContent.trim()];
        new MutationObserver(() => window.__seen.push(el.textContent.trim()))
            .observe(el, {childList: true, characterData: true, subtree: true}); }""")
    play = pg.locator(f"{APP} .widget-button", has_text="Play")
    play.click()  # at the last step: it starts again from the first
    pg.locator(f"{APP} .widget-button", has_text="Pause").wait_for(timeout=REDRAW_S * 1000)
    pg.locator(f"{APP} .widget-button", has_text="Play").wait_for(timeout=len(steps) * REDRAW_S * 1000)
    seen = [int(v) for v in pg.evaluate("window.__seen") if v.isdigit()]
    shown = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
    assert shown[-len(steps):] == steps, f"Play skipped or reordered steps: {shown}"

    # save this frame: the PNG and the CSV are written and named under the controls
    pg.locator(f"{APP} .widget-button", has_text="save this frame").click()
    pg.locator(f"{APP} .widget-html", has_text=".csv").first.wait_for(timeout=REDRAW_S * 1000)
    saved = pg.locator(f"{APP} .widget-html", has_text=".csv").first.inner_text()
    png = Path(saved.split("saved ", 1)[1].split(" and ", 1)[0])
    assert png.is_file() and png.with_suffix(".csv").is_file(), saved

    # the run picker: one distinct label per run
    picker = panel.locator(".widget-dropdown", has_text="run").locator("select").first
    labels = picker.locator("option").all_inner_texts()
    assert len(labels) >= 2 and len(set(labels)) == len(labels), f"run picker labels: {labels}"

    pg.wait_for_timeout(1000)  # a redrawn figure is decoded, not half drawn
    pg.locator(APP).scroll_into_view_if_needed()
    pg.screenshot(path=str(shots / "explorer.png"))

    # the comparison: a second app with its own Play and its three maps (A, B, A - B)
    compare = panel.locator(".jp-OutputArea-output", has=pg.locator(".widget-slider")).nth(1)
    compare.locator(".widget-output img").first.wait_for(timeout=RUN_ALL_S * 1000)
    assert compare.locator(".widget-button", has_text="Play").count() == 1
    assert compare.locator(".widget-html").filter(has_text="at step").count() == 1
    assert compare.locator(".widget-html", has_text="at step").first.inner_text().count("winner") == 2
    compare.scroll_into_view_if_needed()
    pg.wait_for_timeout(1000)
    compare.screenshot(path=str(shots / "compare.png"))
    copy_to = os.environ.get("MOLF_SCREENSHOTS")
    if copy_to:  # docs/screenshots.py: the docs' pictures of the real app
        sys.path.insert(0, str(ROOT / "docs"))
        from screenshots import shrink
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        for name in ("explorer", "compare", "expected_time"):
            target = Path(copy_to) / f"lab_{name}.png"
            target.write_bytes((shots / f"{name}.png").read_bytes())
            shrink(target)


def test_nothing_trains_below_the_explorer():
    """A kernel handles a widget event only after every queued cell: so that the app answers as soon as
    "Run all" shows it, the live run comes before it and no cell after it trains."""
    cells = [c.source for c in jupytext.read(ROOT / "notebooks" / f"{NOTEBOOK}.py").cells if c.cell_type == "code"]
    app = next(i for i, source in enumerate(cells) if "nb.app(app.widget" in source)
    live = next(i for i, source in enumerate(cells) if "explorer.live(" in source)
    assert live < app
    trains = ("explorer.live(", "nb.train(", "train.run(", ".fit(")
    late = [source for source in cells[app + 1:] if any(t in source for t in trains)]
    assert not late, f"cells below the explorer train, freezing it until they finish: {late}"


def test_run_picker_labels_name_what_differs(tmp_path):
    """Runs that differ only in lr_lora get different labels in the run picker, naming lr_lora."""
    from molf.lab import explorer
    base = {"method": "molf", "model": "tiny", "task": "fact", "steps": 8, "lr_fft": 5e-5, "ranks": [128],
            "score": "epd", "topk": 1, "progress": True}
    for name, lr_lora in (("a", 5e-5), ("b", 5e-4)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({**base, "lr_lora": lr_lora, "out_dir": str(run)}))
        (run / "routing.jsonl").write_text("")
    runs = sorted(explorer.find_runs(tmp_path))
    labels = explorer.run_labels(runs)
    assert labels == ["MoLF tiny fact 8 steps lr_lora=5e-05 (unfinished)",
                      "MoLF tiny fact 8 steps lr_lora=0.0005 (unfinished)"]
    # fields the runs share (and where a run is written) stay out of the label
    assert explorer.run_labels(runs[:1]) == ["MoLF tiny fact 8 steps (unfinished)"]
