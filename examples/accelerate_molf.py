"""MoLF through Hugging Face Accelerate.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_molf.py --out runs/accelerate

``--multi_gpu`` only picks Accelerate's torchrun launcher: on a machine without CUDA the script's
``Accelerator(cpu=True)`` makes it a 2-process CPU (gloo) run. (``accelerate launch --cpu
--num_processes 2`` starts a single process in accelerate 1.15 unless given an ``--mpirun_hostfile``.)
``accelerator.prepare`` wraps the model in DDP and ``MoLFAdamW`` in an ``AcceleratedOptimizer``; the
routing is untouched (DDP averages the gradients, so every rank routes alike).
"""
import argparse
import os
from pathlib import Path

import torch
from _data import global_batches, shard_of
from accelerate import Accelerator

import molf
from molf import distributed as md
from molf.lab.models import load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr-fft", type=float, default=3e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/accelerate")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:  # e.g. FSDP flags without a GPU: N independent runs
        raise RuntimeError(f"launched {launched} processes but Accelerate joined {accelerator.num_processes}")
    with accelerator.main_process_first():  # rank 0 fills the model cache, the others then read it
        model, tokenizer = load("tiny")
    torch.manual_seed(0)
    molf.wrap(model, ranks=(16,))
    opt = molf.MoLFAdamW(molf.param_groups(model, args.lr_fft, args.lr_lora))
    model, opt = accelerator.prepare(model, opt)

    out = Path(args.out)
    rank, world = accelerator.process_index, accelerator.num_processes
    for step, batch in enumerate(global_batches(tokenizer, args.steps)):
        ids = shard_of(batch, rank, world).to(accelerator.device)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        assert md.routing_agrees(opt), f"step {step}: ranks routed differently"
        global_loss = accelerator.reduce(loss.detach(), "mean").item()  # the whole global batch's
        md.write_routing_log(out / "routing.jsonl", opt, step, loss=global_loss)  # rank 0 only

    md.merge_and_save(model, out / "merged")  # every rank calls it; rank 0 writes
    if accelerator.is_main_process:
        wins = {e: sum(w[e] for w in opt.optimizer.win_counts.values()) for e in ("fft", "lora0")}
        print(f"accelerate ({accelerator.distributed_type}): {world} ranks, {args.steps} steps, "
              f"loss {global_loss:.3f}, wins {wins}, routing agrees on all {world} ranks; "
              f"merged model in {out / 'merged'}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
