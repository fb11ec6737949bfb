"""Size of the self-contained HTML router explorer (molf.lab.html_app) for SmolLM2-135M's shape.

    PYTHONPATH=. python benchmarks/bench_html_size.py

A routing table like a SmolLM2-135M MoLF run's (30 layers x 7 module types, the FFT expert and one
LoRA expert, a random score and winner per step) is exported at several run lengths; prints the file
size, the estimate the cap uses, and the ``every`` that ``every="auto"`` picks under the default cap.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from molf.lab import html_app

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def table(steps: int, layers: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(steps):
        for layer in range(layers):
            for kind in TYPES:
                group = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                module = f"model.layers.{layer}.{group}.{kind}"
                scores = 10 ** rng.normal(-6, 1, size=2)
                for k, expert in enumerate(("fft", "lora0")):
                    rows.append((step, module, layer, kind, expert, scores[k], k == int(scores.argmax())))
    return pd.DataFrame(rows, columns=["step", "module", "layer", "module_type", "expert", "score", "won"])


def main() -> None:
    print(f"{'steps':>6} {'file MB':>8} {'estimate MB':>12} {'auto every':>11}")
    with tempfile.TemporaryDirectory() as folder:
        for steps in (20, 150, 1000, 3000):
            routing = table(steps)
            path = html_app.export(routing, Path(folder) / "x.html", every="auto")
            kept = html_app.frames(routing, 1)["steps"]
            est = html_app.page_mb() + html_app.estimate_mb(routing)
            every = next(n for n in range(1, steps + 1)
                         if html_app.page_mb() + html_app.estimate_mb(routing, n) <= html_app.MAX_MB)
            print(f"{len(kept):>6} {path.stat().st_size / 1e6:>8.2f} {est:>12.2f} {every:>11}")


if __name__ == "__main__":
    main()
