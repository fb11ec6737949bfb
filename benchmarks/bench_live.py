"""The live explorer over a long run: resident memory and seconds per frame.

    python benchmarks/bench_live.py            # tiny model 100 steps, SmolLM2-135M 50 steps
    python benchmarks/bench_live.py --quick    # tiny model only, 10 and 30 steps

Each model runs in a fresh child process: ``explorer.LiveRun`` (MoLF, the paper's defaults, notebook 04's
batch of 4 x 64 tokens on ``fact``; no evaluation) with its app built (so every frame is rendered to a PNG
for the image widget, as in a notebook), redrawing every step. Reported per model: resident memory
(VmRSS) after the 10th step and after the last one, and their ratio (flat memory: ~1.0); the median
seconds per frame (one training step plus the redraw) and of rendering the PNG alone, over the frames after
the first 10.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def one(model: str, steps: int, early: int) -> dict:
    """Train one live run in this process; return its measurements."""
    C.setup_threads(2)
    from molf.lab import explorer
    from molf.lab.train import TrainConfig

    rss, redraw_seconds = {}, []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(model=model, task="fact", method="molf", steps=steps, batch_size=4, seq_len=64,
                             eval_limit=0, save_model=False, progress=False, out_dir=out)
        app = explorer.LiveRun(config)
        app.widget()
        real = app.figure.png

        def timed_png(*args, **kwargs):
            began = time.perf_counter()
            png = real(*args, **kwargs)
            redraw_seconds.append(time.perf_counter() - began)
            return png

        app.figure.png = timed_png

        def on_frame(fig, live):
            if live.record.steps_done in (early, steps):
                rss[live.record.steps_done] = C.rss_bytes()

        app.on_frame = on_frame
        began = time.perf_counter()
        app.run()
        total = time.perf_counter() - began
    later = app.frame_seconds[early:]
    return {"model": model, "steps": steps, "rss_early_step": early, "rss_early_mib": rss[early] / 2**20,
            "rss_last_mib": rss[steps] / 2**20, "rss_ratio": rss[steps] / rss[early],
            "frame_s_median": statistics.median(later), "redraw_s_median": statistics.median(redraw_seconds[early:]),
            "frames": len(app.frame_seconds), "total_s": total, "status": app.status}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, 10 and 30 steps")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "STEPS", "EARLY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        model, steps, early = args.one
        print(json.dumps(one(model, int(steps), int(early))))
        return 0
    plan = [("tiny", 30, 10)] if args.quick else [("tiny", 100, 10), ("smollm2-135m", 50, 10)]
    print(f"machine: {C.machine()}")
    print(f"{'model':14s} {'steps':>5s} {'RSS@10 MiB':>11s} {'RSS@end MiB':>12s} {'end/10':>7s} "
          f"{'s/frame':>8s} {'render s':>9s}")
    for model, steps, early in plan:
        done = subprocess.run([sys.executable, __file__, "--one", model, str(steps), str(early)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['model']:14s} {r['steps']:5d} {r['rss_early_mib']:11.0f} {r['rss_last_mib']:12.0f} "
              f"{r['rss_ratio']:7.3f} {r['frame_s_median']:8.2f} {r['redraw_s_median']:9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
