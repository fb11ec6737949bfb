"""What a notebook kernel holds in memory: before, during and after its training runs, and after freeing.

    python benchmarks/bench_kernel_memory.py                 # SmolLM2-135M and the tiny model
    python benchmarks/bench_kernel_memory.py --models tiny   # the tiny model only (seconds)

Each model runs in a fresh child process that does what a notebook does (notebooks 00-04's settings:
fact, batch 4 x 64 tokens; a few steps, since the memory of a step does not grow with their number):
``notebook.setup``, then ``nb.train`` for each method in turn (FFT, LoRA, MoLF), then ``nb.free`` (what
each notebook's last cell does). Reported per model, resident memory (VmRSS) in MB:

- ``imports``: Python, torch, transformers, matplotlib and molf loaded, nothing trained;
- ``peak``: the most the process held at any time (VmHWM), i.e. while the heaviest run trained;
- ``after runs``: once the runs returned, before freeing (the run logs are kept, the models dropped);
- ``after free``: after ``nb.free()`` (garbage collected, heap pages handed back to the system);

and ``after free / imports``, the share of the kernel's floor that the runs leave behind.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("fft", "lora", "molf")


def one(model: str, steps: int) -> dict:
    """One kernel's life in this process; return its resident memory at each stage (MB)."""
    C.setup_threads(2)
    import peft  # noqa: F401  (what the runs import lazily counts in the floor, not in the runs)
    import transformers.models.llama.modeling_llama  # noqa: F401

    from molf.lab import notebook, train  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        nb = notebook.setup("bench_memory", {"runs_dir": tmp, "figures_dir": tmp, "progress": False,
                                             "headless": True})
        imports = C.rss_bytes() / 2**20
        for method in METHODS:
            nb.train(model=model, task="fact", method=method, steps=steps, batch_size=4, seq_len=64,
                     eval_limit=4)
        after_runs = C.rss_bytes() / 2**20
        after_free = nb.free()
        peak = C.peak_bytes() / 2**20
    return {"model": model, "steps": steps, "imports": imports, "peak": peak, "after runs": after_runs,
            "after free": after_free, "ratio": after_free / imports}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one(args.child, args.steps)))
        return 0
    rows = []
    for model in args.models:
        out = subprocess.run([sys.executable, __file__, "--child", model, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(C.machine())
    print(f"resident memory of one kernel, MB ({', '.join(METHODS)} trained in turn, {args.steps} steps each; "
          f"fact, batch 4 x 64)")
    print("| model | after imports | peak | after the runs | after nb.free() | after free / imports |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['imports']:.0f} | {r['peak']:.0f} | {r['after runs']:.0f} | "
              f"{r['after free']:.0f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
