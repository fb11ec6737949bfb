"""The command line, ``python -m molf.lab.regime``: run the map, or read it, and print it with its claim lines."""
import argparse
import time
from dataclasses import replace

import torch

from .setting import METHODS
from .sweep import MAP, SLICE, run_map
from .transformer import transformer_check, transformer_lines
from .verdicts import CELL, claims, load, map_table, pick, summarize


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molf.lab.regime", description="The regime map: a controlled setting where LoRA wins, FFT wins, and MoLF's router is seen choosing.")
    parser.add_argument("--run", metavar="CSV", help="run the map (resuming), writing its runs to CSV")
    parser.add_argument("--slice", action="store_true", help="the small regression slice instead of the map")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="only these methods")
    parser.add_argument("--claims", action="store_true", help="print the map and its claim lines")
    parser.add_argument("--from", dest="source", nargs="+", metavar="CSV", help="read the runs instead of training")
    parser.add_argument("--margin", type=float, default=0.25, help="claim 2's margin (0.25: within 25%%)")
    parser.add_argument("--transformer", action="store_true", help="the same question in the tiny causal LM")
    parser.add_argument("--part", default="0/1", help="i/n: run only cells i, i+n, i+2n, ... (parallel runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # two busy threads on two shared cores run ~20x slower than one
    spec = SLICE if args.slice else MAP
    i, n = (int(v) for v in args.part.split("/"))
    if not 0 <= i < n:
        raise SystemExit(f"--part must be i/n with 0 <= i < n, got {args.part!r}")
    spec = replace(spec, cells=spec.cells[i::n])
    began = time.perf_counter()
    if args.transformer:
        rows = transformer_check(log=lambda s: print(s, flush=True))
        print(f"{len(rows)} runs in {time.perf_counter() - began:.1f} s")
        for line in transformer_lines(rows):
            print(line)
        return
    if args.source:
        runs = load(args.source)
    else:
        runs = run_map(spec, args.methods, out=args.run, log=lambda s: print(s, flush=True))
        print(f"{len(runs)} runs in {time.perf_counter() - began:.1f} s")
    if args.claims:
        summary = summarize(pick(runs), args.margin)
        seeds = runs.groupby(CELL)["seed"].nunique()
        count = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
        print(f"mean held-out MSE x 1e3 (lr picked on validation), {count} seeds per cell; "
              f"* the winner beats the runner-up (paired bootstrap over seeds, p < 0.05)")
        print(map_table(summary))
        for line in claims(runs, args.margin):
            print(line)

