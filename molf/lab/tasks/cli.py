"""``python -m molf.lab.tasks evaluate --task sql --model smollm2-135m --split test [--variant reference]``:
print a model's metrics on a task split as JSON."""
from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    from .. import models, tasks

    parser = argparse.ArgumentParser(prog="python -m molf.lab.tasks", description="MoLF task data and metrics")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evaluate", help="print a model's metrics on a task split as JSON")
    run.add_argument("--task", required=True, choices=tasks.TASKS)
    run.add_argument("--model", default="smollm2-135m", help="a name for molf.lab.models.load (default smollm2-135m)")
    run.add_argument("--split", default="test", choices=tasks.SPLITS)
    run.add_argument("--source", default="local", choices=tasks.SOURCES)
    run.add_argument("--limit", type=int, default=None)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--variant", default="ours", choices=tasks.METRIC_VARIANTS,
                     help="ours (default) or the reference implementation's metrics beside ours")
    args = parser.parse_args(argv)

    model, tokenizer = models.load(args.model)
    rows = tasks.load(args.task, args.split, source=args.source, limit=args.limit, variant=args.variant)
    metrics = tasks.evaluate(args.task, model, tokenizer, rows, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, variant=args.variant)
    print(json.dumps({"task": args.task, "split": args.split, "model": args.model, "variant": args.variant,
                      **metrics}, indent=2))
