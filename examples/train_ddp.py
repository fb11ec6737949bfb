"""MoLF under DDP, launched with torchrun.

    torchrun --nproc_per_node 2 examples/train_ddp.py --out runs/ddp

DDP averages the gradients before ``step()``, so every rank holds the same Adam moments and takes the
same routing decisions on its own: the optimizer reduces nothing (``process_group`` stays None).
"""
import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from _data import global_batches, shard_of
from torch.nn.parallel import DistributedDataParallel

import molf
from molf import distributed as md
from molf.lab.models import load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr-fft", type=float, default=3e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/ddp")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    with md.main_process_first():  # rank 0 fills the model cache, the others then read it
        model, tokenizer = load("tiny")
    torch.manual_seed(0)  # the same LoRA init on every rank (DDP also broadcasts rank 0's weights)
    molf.wrap(model, ranks=(16,))
    model.to(device)
    ddp = DistributedDataParallel(model)
    opt = molf.MoLFAdamW(molf.param_groups(model, args.lr_fft, args.lr_lora))

    out = Path(args.out)
    for step, batch in enumerate(global_batches(tokenizer, args.steps)):
        ids = shard_of(batch, rank, world).to(device)
        opt.zero_grad()
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        assert md.routing_agrees(opt), f"step {step}: ranks routed differently"
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)  # the loss of the whole global batch, for the log
        global_loss = global_loss.item() / world
        md.write_routing_log(out / "routing.jsonl", opt, step, loss=global_loss)  # rank 0 only

    md.merge_and_save(ddp, out / "merged")  # every rank calls it; rank 0 writes
    if md.is_main_process():
        wins = {e: sum(w[e] for w in opt.win_counts.values()) for e in ("fft", "lora0")}
        print(f"ddp: {world} ranks, {args.steps} steps, loss {global_loss:.3f}, wins {wins}, "
              f"routing agrees on all {world} ranks; merged model in {out / 'merged'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
