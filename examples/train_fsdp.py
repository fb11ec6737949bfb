"""MoLF under FSDP2 (``fully_shard``), launched with torchrun.

    torchrun --nproc_per_node 2 examples/train_fsdp.py --out runs/fsdp

Each rank holds a shard of every expert. ``MoLFAdamW`` sees DTensor parameters, so it all-reduces the
per-expert score sums (and uses global expert sizes) before the top-k decision: every rank routes
exactly as one process on the whole batch would. Order matters: wrap, then shard, then build the
optimizer (``fully_shard`` replaces the parameters with sharded ones).
"""
import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from _data import global_batches, shard_of
from torch.distributed.device_mesh import init_device_mesh

import molf
from molf import distributed as md
from molf.lab.models import load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr-fft", type=float, default=3e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/fsdp")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    with md.main_process_first():  # rank 0 fills the model cache, the others then read it
        model, tokenizer = load("tiny")
    torch.manual_seed(0)  # the same LoRA init on every rank: fully_shard keeps each rank's own slice
    molf.wrap(model, ranks=(16,))
    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    md.shard(model, mesh=mesh, units=model.model.layers)  # one FSDP unit per decoder layer, then the root
    opt = molf.MoLFAdamW(molf.param_groups(model, args.lr_fft, args.lr_lora))  # after sharding

    out = Path(args.out)
    for step, batch in enumerate(global_batches(tokenizer, args.steps)):
        ids = shard_of(batch, rank, world).to(device)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        assert md.routing_agrees(opt), f"step {step}: ranks routed differently"
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)  # the loss of the whole global batch, for the log
        global_loss = global_loss.item() / world
        md.write_routing_log(out / "routing.jsonl", opt, step, loss=global_loss)  # rank 0 only

    md.merge_and_save(model, out / "merged")  # gathers full weights; every rank calls it, rank 0 writes
    if md.is_main_process():
        wins = {e: sum(w[e] for w in opt.win_counts.values()) for e in ("fft", "lora0")}
        print(f"fsdp: {world} ranks, {args.steps} steps, loss {global_loss:.3f}, wins {wins}, "
              f"routing agrees on all {world} ranks; merged model in {out / 'merged'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
