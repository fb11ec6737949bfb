"""Make the screenshots in docs/notebooks.md (PNGs under docs/img/), by driving Chromium with playwright.

    PYTHONPATH=. python docs/screenshots.py RUNS_DIR          # after python -m molf.lab.suite --tiny --runs-dir RUNS_DIR
    MOLF_REQUIRE_BROWSER=1 MOLF_SCREENSHOTS=docs/img python -m pytest tests/test_browser.py -k jupyterlab

The first writes the HTML exports of a suite run (``RUNS_DIR/04_router_explorer_explorer.html`` and
``RUNS_DIR/06_why_an_expert_wins_classroom.html``) as pictures: the page at the last step and again
mid-run with another module. The second runs JupyterLab's real app (tests/test_browser.py) and copies its
screenshots (the explorer with Play and "save this frame", the comparison) here. Every PNG is reduced to a
256-colour palette and at most 1000 px wide, so each stays well under 200 KB.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (never ``playwright install``).
"""
from __future__ import annotations

import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
OUT = Path(__file__).resolve().parent / "img"


def shrink(path: Path, width: int = 1000) -> Path:
    """Make ``path`` small: at most ``width`` px wide, a 256-colour palette, optimised PNG."""
    from PIL import Image
    image = Image.open(path).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def html_pages(runs_dir: Path, out: Path = OUT) -> list[Path]:
    from playwright.sync_api import sync_playwright
    out.mkdir(parents=True, exist_ok=True)
    pages = {"html_explorer": runs_dir / "04_router_explorer_explorer.html",
             "html_classroom": runs_dir / "06_why_an_expert_wins_classroom.html"}
    missing = [str(p) for p in pages.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: run `python -m molf.lab.suite --tiny --runs-dir {runs_dir}` first")
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        # the page is self-contained: anything but the file itself is refused
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                   else route.abort())
        for name, path in pages.items():
            page.goto(path.as_uri())
            if name == "html_classroom" and page.locator("#run option").count() > 1:
                page.select_option("#run", index=1)     # a second setting from the picker
            page.eval_on_selector("#step", "s => { s.value = Math.floor(s.max / 2); "
                                           "s.dispatchEvent(new Event('input')); }")
            page.select_option("#type", index=1)
            target = out / f"{name}.png"
            page.screenshot(path=str(target), full_page=True)
            written.append(shrink(target))
        browser.close()
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for path in html_pages(Path(sys.argv[1])):
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} KB)")
