"""The optimizer step alone: ``MoLFAdamW`` against torch's AdamW on the same parameters.

    python benchmarks/bench_optimizer.py            # tiny, SmolLM2-135M at rank 16 and 128 (18 min on a loaded 2-core VM)
    python benchmarks/bench_optimizer.py --quick    # tiny model, rank 16 only (seconds; --no-memory: faster)
    python benchmarks/bench_optimizer.py --config llama-4x256:16   # chosen model:rank pairs only

Models: ``tiny`` (2 layers, hidden 64: the tied embedding is 97% of it), ``llama-4x256`` (a random
Llama with 4 layers, hidden 256, MLP 768, SmolLM2's vocabulary: 16.7M parameters, the embedding 75%),
``smollm2-135m`` (the embedded model).

For every model/rank: the model is wrapped with ``molf.wrap(ranks=(rank,))``, one forward/backward on
a fixed random batch gives real gradients (so the routing is a real one), and then, interleaved on
the very same parameters and gradients, we time ``step()`` of

    molf           MoLFAdamW as shipped (on the CPU: the chunked path)
    molf_compiled  MoLFAdamW(impl="compiled"): the C++ kernels (pass 1 moments + score sums in one call,
                   pass 2 the winners only, fused AdamW for plain parameters; built in the warm-up if needed)
    molf_masked    MoLFAdamW(impl="masked"): the accelerator path (foreach + masks, no sync), run here
    adamw_foreach  torch.optim.AdamW(foreach=True) over all trainable parameters (decay / no-decay groups)
    adamw_fused    torch.optim.AdamW(fused=True), same groups
    naive          molf.reference: per-module, per-expert Python loop with .item() reads

Each optimizer keeps its own state; they all update the same tensors, which does not change the work.
Peak memory: per method in a fresh child process (see ``_common``): the peak RSS the optimizer adds on
top of model + gradients over two steps (state + temporaries), and the optimizer-state bytes.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import molf  # noqa: E402
from molf.lab import models  # noqa: E402
from molf.reference import NaiveMoLFAdamW  # noqa: E402

LR, WD_FFT, WD_LORA = 5e-5, 0.1, 0.01
METHODS = ("molf", "molf_compiled", "molf_masked", "adamw_foreach", "adamw_fused", "naive")


def load(model_name: str):
    if model_name == "llama-4x256":
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    return models.load(model_name)[0]


DEVICE, DTYPE = "cpu", torch.float32  # --device / --dtype


def build(model_name: str, rank: int, real_grads: bool):
    model = load(model_name).to(DEVICE, DTYPE)
    molf.wrap(model, ranks=(rank,))
    if real_grads:
        ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        model(input_ids=ids, labels=ids).loss.backward()
    else:  # memory only: the values do not matter
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p) * 1e-3
    return model


def make(method: str, model):
    groups = molf.param_groups(model, LR, LR, wd_fft=WD_FFT, wd_lora=WD_LORA)
    if method.startswith("molf"):
        impl = {"molf_masked": "masked", "molf_compiled": "compiled"}.get(method, "auto")
        if impl == "compiled" and DEVICE != "cpu":
            impl = "auto"  # the compiled path is the CPU's; on a GPU this row repeats the masked path
        return molf.MoLFAdamW(groups, impl=impl)
    if method == "naive":
        return NaiveMoLFAdamW(groups)
    decay, no_decay = [], []
    for g in groups:
        wds = g.get("param_weight_decay", [g.get("weight_decay", 0.0)] * len(g["params"]))
        for p, wd in zip(g["params"], wds):
            (decay if wd else no_decay).append(p)
    kind = {"foreach": True} if method == "adamw_foreach" else {"fused": True}
    return torch.optim.AdamW([{"params": decay, "weight_decay": WD_FFT}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=LR, **kind)


def memory_child(model_name: str, rank: int, method: str) -> None:
    C.setup_threads()
    model = build(model_name, rank, real_grads=False)
    opt = make(method, model)
    C.reset_peak()
    before = C.rss_bytes()
    for _ in range(2):
        opt.step()
    print(json.dumps({"peak_extra": C.peak_bytes() - before, "state": C.state_bytes(opt)}))


def bench(model_name: str, rank: int, warmup: int, reps: int, memory: bool) -> list[list]:
    model = build(model_name, rank, real_grads=True)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opts = {m: make(m, model) for m in METHODS}
    times = C.interleaved({m: opts[m].step for m in METHODS}, warmup, reps)
    fused_med, fused_min = C.median(times["adamw_fused"]), min(times["adamw_fused"])
    mem = {m: C.child_memory("bench_optimizer.py", [model_name, str(rank), m]) if memory else None for m in METHODS}
    won = opts["molf"].last_decisions
    lora_share = sum(d == ("lora0",) for d in won.values()) / max(len(won), 1)
    rows = []
    for m in METHODS:
        med, lo = C.median(times[m]), min(times[m])
        rows.append([model_name, rank, round(n_params / 1e6, 2), m, med * 1e3, lo * 1e3, med / fused_med,
                     lo / fused_min,
                     round(mem[m]["peak_extra"] / C.MiB) if memory else "-",
                     round(mem[m]["state"] / C.MiB) if memory else "-",
                     f"{lora_share:.0%}" if m == "molf" else ""])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, few repetitions")
    ap.add_argument("--reps", type=int, default=None, help="measured repetitions (default 20 tiny, 5 SmolLM2)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--config", action="append", metavar="MODEL:RANK",
                    help="only these model:rank pairs (repeatable), e.g. llama-4x256:16")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-memory", action="store_true", help="skip the child processes for peak memory")
    ap.add_argument("--memory-child", nargs=3, metavar=("MODEL", "RANK", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        model_name, rank, method = args.memory_child
        return memory_child(model_name, int(rank), method)

    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, getattr(torch, args.dtype)
    if DEVICE != "cpu":
        args.no_memory = True  # peak memory here is the host RSS
    C.setup_threads()
    print(f"machine: {C.machine()}; device {DEVICE}, {args.dtype}")
    configs = [("tiny", 16)] if args.quick else \
        [("tiny", 16), ("tiny", 128), ("llama-4x256", 16), ("smollm2-135m", 16), ("smollm2-135m", 128)]
    if args.config:
        configs = [(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in args.config]
    header = ["model", "rank", "params (M)", "method", "median ms", "min ms", "x fused (median)",
              "x fused (min)", "peak extra MiB", "state MiB", "modules won by LoRA"]
    rows = []
    for model_name, rank in configs:
        small = model_name in ("tiny", "llama-4x256")
        warmup = args.warmup if args.warmup is not None else (2 if args.quick or small else 1)
        reps = args.reps if args.reps is not None else (5 if args.quick else 20 if small else 5)
        rows += bench(model_name, rank, warmup, reps, memory=not args.no_memory)
        print(f"done {model_name} r{rank}", file=sys.stderr, flush=True)
    print(C.table(header, rows))
    print()
    for model_name, rank in configs:
        r = {row[3]: row for row in rows if row[0] == model_name and row[1] == rank}
        print(f"target MoLFAdamW.step <= 1.3 x AdamW(fused): {model_name} r{rank}: "
              f"{r['molf'][6]:.2f} (median), {r['molf'][7]:.2f} (min); "
              f"impl=compiled: {r['molf_compiled'][6]:.2f} (median), {r['molf_compiled'][7]:.2f} (min); "
              f"vs AdamW(foreach): {r['molf'][4] / r['adamw_foreach'][4]:.2f}; "
              f"naive / molf: {r['naive'][4] / r['molf'][4]:.1f}")


if __name__ == "__main__":
    main()
