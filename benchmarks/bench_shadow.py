"""The shadow routers' cost, as a ratio to the training step it watches.

    python benchmarks/bench_shadow.py                 # the toy network and the tiny Llama
    python benchmarks/bench_shadow.py --reps 30

For each model: one MoLF training step (zero_grad, forward, backward, ``MoLFAdamW.step``) and, after it,
``ShadowRouters.record`` with one rule (``pfn``) and with the five default rules (epd, pfn, grad_rms,
random, cycle), timed interleaved (``_common.interleaved``). Reported: the median seconds of each and the
ratio record / step. The toy is ``tests/toy.py`` (2 blocks of width 16, one LoRA expert r=2); the tiny
Llama is the runner's ``molf`` run of ``model="tiny"`` (2 layers, hidden 64, the paper's r=128) on
``fact``, batch 4 x 64 tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _toy():
    import toy

    import molf
    model = toy.toy()
    molf.wrap(model, ranks=(2,))
    opt = molf.MoLFAdamW(molf.param_groups(model, lr_fft=1e-3, lr_lora=1e-4))
    return model, opt, lambda step: [toy.batch(step)], toy.loss_fn, None


def _tiny(out: str):
    from molf.lab import train
    config = train.TrainConfig(model="tiny", task="fact", method="molf", steps=1000, batch_size=4, seq_len=64,
                               eval_limit=0, save_model=False, progress=False, out_dir=out)
    session = train.Session(config)
    return session.model, session.optimizer, session.batches, lambda m, b: m(**b).loss, session


def measure(name: str, build, reps: int, warmup: int) -> dict:
    from molf.lab import shadow
    with tempfile.TemporaryDirectory() as out:
        model, opt, batches, loss_fn, session = build(out) if name == "tiny" else build()
        counter = {"step": 0}
        one = shadow.ShadowRouters(rules=("pfn",))
        five = shadow.ShadowRouters()

        def step():
            opt.zero_grad(set_to_none=True)
            for micro in batches(counter["step"]):
                loss_fn(model, micro).backward()
            opt.step()
            counter["step"] += 1

        times = C.interleaved({"step": step, "record 1 rule": lambda: one.record(counter["step"], opt),
                               "record 5 rules": lambda: five.record(counter["step"], opt)}, warmup, reps)
        if session is not None:
            session.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "reps": reps, "step_s": median["step"],
            "record_1_rule_s": median["record 1 rule"], "record_5_rules_s": median["record 5 rules"],
            "ratio_1_rule": median["record 1 rule"] / median["step"],
            "ratio_5_rules": median["record 5 rules"] / median["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    C.setup_threads(2)
    print(C.machine())
    rows = [measure("toy", _toy, args.reps, args.warmup), measure("tiny", _tiny, args.reps, args.warmup)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':6s} {'step ms':>9s} {'1 rule ms':>10s} {'5 rules ms':>11s} {'1 rule / step':>14s} "
          f"{'5 rules / step':>15s}")
    for r in rows:
        print(f"{r['model']:6s} {1e3 * r['step_s']:9.2f} {1e3 * r['record_1_rule_s']:10.2f} "
              f"{1e3 * r['record_5_rules_s']:11.2f} {r['ratio_1_rule']:14.2f} {r['ratio_5_rules']:15.2f}")


if __name__ == "__main__":
    main()
