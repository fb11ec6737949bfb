"""The router explorer as one self-contained HTML file: share a run with people who have no kernel.

Every frame (each step x layer x module type) is precomputed into the page as numbers; the slider, the
Play button and the dropdowns are driven by a few lines of JavaScript in the page itself. No server, no
kernel, no network: open the file from disk in any browser.

    python -m molf.lab.html_app runs/train/<run> explorer.html               # one run
    python -m molf.lab.html_app runs/train/<run_a> runs/train/<run_b> two.html  # a run picker

    from molf.lab import html_app
    html_app.export({"EPD": "runs/train/a", "PFN": "runs/train/b"}, "explorer.html")
    html_app.export({lesson.settings.label(): lesson.routing for lesson in lessons}, "classroom.html")

What a frame shows: the routing map of that step (who won each module, or each module's cumulative
win share of the tracked expert), the selected module's scores over training with the step marked, and
one line naming the winner and the scores. The page's size is about 12 bytes per (step, module, expert);
a SmolLM2 run of 150 steps is about 0.5 MB. Past ``max_mb`` (default 20) the export refuses and says
which ``every`` would fit: ``every=N`` keeps every N-th step (and the last), ``every="auto"`` picks N.
"""
from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import analysis, plots, runs

MAX_MB = 20.0
MODES = ("decisions", "cumulative win share")


def _routing(source) -> tuple[pd.DataFrame, str]:
    """A routing table and a title from a run directory or a routing DataFrame (a Lesson's ``routing``)."""
    if isinstance(source, pd.DataFrame):
        return analysis.routing_of(source), ""
    data = runs.load(source)
    title = " ".join(str(data.config.get(k, "")) for k in ("method", "task", "score")).strip()
    return analysis.routing_of(data), title


def frames(routing: pd.DataFrame, every: int = 1) -> dict:
    """Everything the page draws, as plain lists: steps, layers, types, experts, module names, the
    winner index per [step][layer][type] (-1: none), log10 scores per [step][layer][type][expert] (None
    where not recorded) and the tracked expert's cumulative win share per [step][layer][type]."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1 (keep every N-th step) or 'auto', got {every!r}")
    grid = analysis.routing_grid(routing)
    steps, layers, types, experts, modules = grid.steps, grid.layers, grid.types, grid.experts, grid.modules
    keep = sorted(set(range(0, len(steps), every)) | {len(steps) - 1})
    with np.errstate(divide="ignore", invalid="ignore"):
        log_score = np.log10(grid.score[keep])
    log_score = np.where(np.isfinite(log_score), np.round(log_score, 3), np.nan)
    return {
        "steps": [int(x) for x in steps[keep]], "layers": layers, "types": types, "experts": experts,
        "tracked": grid.expert, "colors": [plots.expert_color(x) for x in experts],
        "modules": [[modules.get((layer, kind), "") for kind in types] for layer in layers],
        "winner": grid.winner[keep].tolist(),
        "log_score": [[[[None if math.isnan(v) else float(v) for v in cell] for cell in row] for row in frame]
                      for frame in log_score],
        "cumulative": np.round(grid.cumulative[keep], 3).tolist(),
    }


def estimate_mb(routing: pd.DataFrame, every: int = 1) -> float:
    """The approximate size in MB of one run's frames in the page at ``every`` (the page adds
    ``page_mb()`` once)."""
    n_steps = len(range(0, routing["step"].nunique(), every)) + 1
    return n_steps * routing["module"].nunique() * (routing["expert"].nunique() * 8 + 10) / 1e6


def page_mb() -> float:
    """The size in MB of the page without any frames (its script and text)."""
    return len(_PAGE.encode()) / 1e6


def export(sources, path, every: int | str = 1, max_mb: float = MAX_MB) -> Path:
    """Write the page for ``sources`` to ``path``: a run directory or a routing table, or a dict of them
    by label (a picker in the page). Returns the path; refuses a page over ``max_mb``, naming the
    ``every`` that would fit."""
    if not isinstance(sources, dict):
        sources = {"run": sources}
    if not sources:
        raise ValueError("nothing to export: give a run directory, a routing table or a dict of them")
    if not (isinstance(max_mb, (int, float)) and max_mb > 0):
        raise ValueError(f"max_mb must be a number > 0, got {max_mb!r}")
    tables = {}
    for label, source in sources.items():
        table, title = _routing(source)
        tables[str(label) if len(sources) > 1 or not title else title] = table
    total = lambda n: page_mb() + sum(estimate_mb(t, n) for t in tables.values())
    if every == "auto":
        longest = max(t["step"].nunique() for t in tables.values())
        every = next((n for n in range(1, longest + 1) if total(n) <= max_mb), longest)
    if total(every) > max_mb:
        fits = next((n for n in range(every + 1, 10_000) if total(n) <= max_mb), None)
        hint = f"every={fits} (or every='auto') would fit" if fits else "export fewer runs"
        raise ValueError(f"the page would be about {total(every):.3g} MB, over max_mb={max_mb:g}: {hint}")
    data = {label: frames(table, every) for label, table in tables.items()}
    title = " | ".join(data) if len(data) <= 2 else f"{len(data)} runs (pick one in the run menu)"
    page = _PAGE.replace("__TITLE__", html.escape(title))
    page = page.replace("__DATA__", json.dumps(data, separators=(",", ":")).replace("</", "<\\/"))
    page = page.replace("__MODES__", json.dumps(MODES))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Router explorer: __TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
.controls > * { margin-right: 12px; } .panels { display: flex; gap: 24px; margin-top: 12px; }
#info { margin-top: 8px; min-height: 2.6em; } svg text { font-size: 11px; }
</style></head><body>
<h2>Router explorer: __TITLE__</h2>
<div class="controls">
  <label>run <select id="run"></select></label>
  <button id="play">Play</button>
  <label>step <input id="step" type="range" min="0" value="0"> <b id="step-label"></b></label>
  <label>layer <select id="layer"></select></label>
  <label>module <select id="type"></select></label>
  <label>view <select id="mode"></select></label>
</div>
<div id="info"></div>
<div class="panels"><svg id="map"></svg><svg id="trace" width="560" height="300"></svg></div>
<p>Map: each cell is one module (decoder layer x projection). Decisions: the colour of the expert
updated at this step (grey: none). Cumulative: the share of steps so far that the tracked expert won
(blue 0, grey 0.5, red 1). Trace: log10 of each expert's routing score of the selected module (dots:
it won), and below it a strip of who won at each step.</p>
<script>
const RUNS = __DATA__;
const MODES = __MODES__;
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let run, timer = null;
function el(tag, attrs, parent, text) {
  const node = document.createElementNS(SVG, tag);
  for (const k in attrs) node.setAttribute(k, attrs[k]);
  if (text !== undefined) node.textContent = text;
  parent.appendChild(node); return node;
}
function fill(select, values) { select.innerHTML = ""; values.forEach((v, i) => select.add(new Option(v, i))); }
function shade(x) {  // the figures' coolwarm ends: 0 blue (the other expert won), 1 red (the tracked expert won)
  const [a, m, b] = [[59, 76, 192], [221, 221, 221], [180, 4, 38]];
  const [p, q, t] = x < 0.5 ? [a, m, 2 * x] : [m, b, 2 * x - 1];
  return `rgb(${p.map((v, i) => Math.round(v + (q[i] - v) * t)).join(",")})`;
}
function pickRun() {
  run = RUNS[$("run").options[$("run").selectedIndex].text];
  $("step").max = run.steps.length - 1; $("step").value = run.steps.length - 1;
  fill($("layer"), run.layers); fill($("type"), run.types); draw();
}
function draw() {
  const si = +$("step").value, li = +$("layer").value, ti = +$("type").value, mode = +$("mode").value;
  const step = run.steps[si];
  $("step-label").textContent = `${step} (${si + 1}/${run.steps.length})`;
  const map = $("map"); map.innerHTML = "";
  const cw = 44, ch = Math.max(8, Math.min(18, 420 / run.layers.length)), x0 = 40, y0 = 20;
  map.setAttribute("width", x0 + cw * run.types.length + 10);
  map.setAttribute("height", y0 + ch * run.layers.length + 10);
  run.types.forEach((t, j) => el("text", {x: x0 + j * cw + 4, y: 14}, map, t.replace("_proj", "")));
  run.layers.forEach((layer, i) => {
    el("text", {x: 4, y: y0 + i * ch + ch - 2}, map, layer);
    run.types.forEach((t, j) => {
      const w = run.winner[si][i][j];
      const color = mode === 0 ? (w < 0 ? "#bbbbbb" : run.colors[w]) : shade(run.cumulative[si][i][j]);
      el("rect", {x: x0 + j * cw, y: y0 + i * ch, width: cw - 2, height: ch - 2, fill: color,
                  "data-layer": layer, "data-type": t}, map);
    });
  });
  el("rect", {x: x0 + ti * cw - 1, y: y0 + li * ch - 1, width: cw, height: ch, fill: "none",
              stroke: "black", "stroke-width": 2.5}, map);
  drawTrace(si, li, ti);
  const w = run.winner[si][li][ti];
  const scores = run.experts.map((e, k) => {
    const v = run.log_score[si][li][ti][k];
    return `${e}: ${v === null ? "not recorded" : "1e" + v.toFixed(2)}`;
  }).join(", ");
  $("info").innerHTML = `<b>${run.modules[li][ti]}</b> at step ${step}: winner ` +
    `<b id="winner">${w < 0 ? "none (skipped)" : run.experts[w]}</b>; scores ${scores}; ` +
    `${run.tracked} won ${Math.round(100 * run.cumulative[si][li][ti])}% of steps so far`;
}
function drawTrace(si, li, ti) {
  const svg = $("trace"); svg.innerHTML = "";
  const W = 560, H = 300, L = 50, B = 30, values = [];
  run.log_score.forEach((f) => f[li][ti].forEach((v) => { if (v !== null) values.push(v); }));
  const n = run.steps.length, X = (i) => L + (W - L - 10) * (n > 1 ? i / (n - 1) : 0.5);
  run.steps.forEach((s, i) => {  // the winner strip: who won at each step
    const w = run.winner[i][li][ti];
    el("rect", {x: X(i) - 1, y: H - B + 4, width: Math.max(2, (W - L - 10) / n), height: 8,
                fill: w < 0 ? "#bbbbbb" : run.colors[w]}, svg);
  });
  el("line", {x1: X(si), y1: 10, x2: X(si), y2: H - B + 12, stroke: "black", "stroke-dasharray": "3,3", id: "cursor"}, svg);
  if (!values.length) { el("text", {x: L, y: H / 2}, svg, "scores not recorded (the strip below shows who won)"); return; }
  const lo = Math.min(...values), hi = Math.max(...values) + 1e-9;
  const Y = (v) => H - B - (H - B - 10) * (v - lo) / (hi - lo);
  el("line", {x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: "#888"}, svg);
  el("text", {x: L, y: H - 2}, svg, `step ${run.steps[0]}`);
  el("text", {x: W - 70, y: H - 2}, svg, `step ${run.steps[n - 1]}`);
  el("text", {x: 2, y: 16}, svg, hi.toFixed(1)); el("text", {x: 2, y: H - B}, svg, lo.toFixed(1));
  run.experts.forEach((e, k) => {
    const pts = [];
    run.log_score.forEach((f, i) => { const v = f[li][ti][k]; if (v !== null) pts.push(`${X(i)},${Y(v)}`); });
    el("polyline", {points: pts.join(" "), fill: "none", stroke: run.colors[k], "stroke-width": 1.5}, svg);
    run.log_score.forEach((f, i) => {
      const v = f[li][ti][k];
      if (v !== null && run.winner[i][li][ti] === k) el("circle", {cx: X(i), cy: Y(v), r: 2.5, fill: run.colors[k]}, svg);
    });
    el("text", {x: W - 80, y: 20 + 14 * k, fill: run.colors[k]}, svg, e);
  });
}
function play() {
  if (timer) { clearTimeout(timer); timer = null; $("play").textContent = "Play"; return; }
  if (+$("step").value >= run.steps.length - 1) $("step").value = 0;
  $("play").textContent = "Pause";
  const next = () => {  // every frame is drawn, none skipped: the next waits for this one
    draw();
    if (+$("step").value >= run.steps.length - 1) { timer = null; $("play").textContent = "Play"; return; }
    $("step").value = +$("step").value + 1; timer = setTimeout(next, 250);
  };
  next();
}
fill($("run"), Object.keys(RUNS)); fill($("mode"), MODES);
$("run").parentNode.style.display = Object.keys(RUNS).length > 1 ? "" : "none";
$("run").onchange = pickRun; $("step").oninput = draw; $("layer").onchange = draw;
$("type").onchange = draw; $("mode").onchange = draw; $("play").onclick = play;
pickRun();
</script></body></html>
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m molf.lab.html_app",
                                     description="Write routed runs as one self-contained HTML router explorer.")
    parser.add_argument("paths", nargs="+", help="run directories, then the HTML file to write")
    parser.add_argument("--every", default="1", help="keep every N-th step (and the last), or 'auto'")
    parser.add_argument("--max-mb", type=float, default=MAX_MB, help=f"refuse a larger page (default {MAX_MB:g})")
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("give at least one run directory and the HTML file to write")
    *run_dirs, out = args.paths
    every = args.every if args.every == "auto" else (int(args.every) if args.every.isdigit() else args.every)
    sources = {Path(d).name: d for d in run_dirs} if len(run_dirs) > 1 else run_dirs[0]
    try:
        path = export(sources, out, every=every, max_mb=args.max_mb)
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); open it in a browser, no kernel needed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
