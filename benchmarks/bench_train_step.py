"""A whole training step (forward, backward, optimizer step) of FFT, LoRA, MoLF and MoLF-Efficient.

    python benchmarks/bench_train_step.py           # SmolLM2-135M, batch 4 x 64 tokens (16 min on a loaded 2-core VM)
    python benchmarks/bench_train_step.py --quick   # tiny model, batch 2 x 16, fft/lora/molf/molf_e,
                                                    # peak memory of lora and molf_e only (< 1 min)

Methods (lr 5e-5 throughout; the values do not change the cost):

    fft            all parameters, torch.optim.AdamW(fused=True), wd 0.1 on matrices
    lora           peft LoraConfig(r=128, lora_alpha=32, use_rslora=True, target_modules="all-linear"),
                   AdamW(fused=True) over the trainable parameters, wd 0.01
    lora_r16       the same at r=16
    molf           molf.wrap(ranks=(128,)) + MoLFAdamW (the paper's MoLF)
    molf_compiled  the same with MoLFAdamW(impl="compiled") (C++ kernels; a first build falls in the warm-up step)
    molf_e         molf.wrap(ranks=(16, 128), train_base=False) + MoLFAdamW (MoLF-Efficient; embeddings
                   and norms still train, densely)
    molf_e_frozen  the same with freeze_non_linear=True (only the LoRA experts train)

All methods are timed interleaved in one process on the same batch; each step is split into
forward+backward and optimizer step. Ratios are to fft. The MoLF target compares against
``fft step + LoRA forward/backward``, computed as ``t(fft) + t_fwd_bwd(lora)`` (both medians; it counts
the base forward twice, so it is a generous bound). Peak memory comes from a fresh child process per
method (see ``_common``): total peak RSS over two steps (model included) and the part above the
loaded, wrapped model; optimizer-state bytes sum the optimizer's state tensors.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import molf  # noqa: E402
from molf.lab import models  # noqa: E402

LR = 5e-5
METHODS = ("fft", "lora", "lora_r16", "molf", "molf_compiled", "molf_e", "molf_e_frozen")
QUICK_METHODS, QUICK_MEMORY = ("fft", "lora", "molf", "molf_e"), ("lora", "molf_e")


DEVICE, DTYPE = "cpu", torch.float32  # --device / --dtype


def setup(method: str, model_name: str, base=None):
    """(model, optimizer) for ``method``, on a copy of ``base`` (or a freshly loaded model)."""
    model = copy.deepcopy(base) if base is not None else models.load(model_name)[0].to(DEVICE, DTYPE)
    if method.startswith("lora"):
        from peft import LoraConfig, get_peft_model
        r = 16 if method == "lora_r16" else 128
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=32, use_rslora=True, target_modules="all-linear"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01, fused=True)
    if method == "fft":
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        return model, torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                         {"params": rest, "weight_decay": 0.0}], lr=LR, fused=True)
    if method in ("molf", "molf_compiled"):
        molf.wrap(model, ranks=(128,))
    else:
        molf.wrap(model, ranks=(16, 128), train_base=False, freeze_non_linear=method == "molf_e_frozen")
    impl = "compiled" if method == "molf_compiled" and DEVICE == "cpu" else "auto"
    return model, molf.MoLFAdamW(molf.param_groups(model, LR, LR), impl=impl)


def lora_flop_share(model) -> float:
    """Extra matmul FLOPs of the LoRA paths relative to the base linears (per token: ``r (in + out)``
    against ``in * out``); forward and backward scale alike."""
    base = extra = 0
    for module in model.modules():
        if isinstance(module, molf.MoLFLinear):
            w = module.base_layer.weight
            base += w.numel()
            extra += sum(a.weight.numel() + b.weight.numel() for a, b in zip(module.lora_A, module.lora_B))
    return extra / base if base else 0.0


def batch(model, shape):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def train_step(model, opt, ids) -> tuple[float, float]:
    """One step; returns (forward+backward seconds, optimizer-step seconds)."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    C.sync()
    mid = time.perf_counter()
    opt.step()
    C.sync()
    return mid - start, time.perf_counter() - mid


def memory_child(model_name: str, method: str, shape) -> None:
    C.setup_threads()
    model, opt = setup(method, model_name)
    ids = batch(model, shape)
    C.reset_peak()
    before = C.rss_bytes()
    for _ in range(2):
        train_step(model, opt, ids)
    peak = C.peak_bytes()
    print(json.dumps({"peak": peak, "peak_extra": peak - before, "state": C.state_bytes(opt)}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, short batch, few repetitions")
    ap.add_argument("--reps", type=int, default=None, help="measured repetitions (default 5; quick 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the child processes for peak memory")
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, getattr(torch, args.dtype)
    if DEVICE != "cpu":
        args.no_memory = True  # peak memory here is the host RSS
    model_name = "tiny" if args.quick else "smollm2-135m"
    shape = (2, 16) if args.quick else (4, 64)
    if args.memory_child:
        return memory_child(*args.memory_child, shape)

    C.setup_threads()
    reps = args.reps or (3 if args.quick else 5)
    print(f"machine: {C.machine()}")
    print(f"model: {model_name}, batch {shape[0]} x {shape[1]} tokens, {args.warmup} warm-up + {reps} measured steps")
    methods = QUICK_METHODS if args.quick else METHODS
    memory = () if args.no_memory else QUICK_MEMORY if args.quick else METHODS
    base = models.load(model_name)[0].to(DEVICE, DTYPE)
    runs = {m: setup(m, model_name, base) for m in methods}
    del base
    ids = batch(runs["fft"][0], shape)
    parts = {m: {"fb": [], "opt": [], "total": []} for m in methods}
    for r in range(args.warmup + reps):
        for m, (model, opt) in runs.items():
            fb, step = train_step(model, opt, ids)
            if r >= args.warmup:
                parts[m]["fb"].append(fb)
                parts[m]["opt"].append(step)
                parts[m]["total"].append(fb + step)
    med = {m: {k: C.median(v) for k, v in p.items()} for m, p in parts.items()}
    mem = {m: C.child_memory("bench_train_step.py", [model_name, m]) if m in memory else None for m in methods}
    trainable = {m: sum(p.numel() for p in runs[m][0].parameters() if p.requires_grad) for m in methods}

    header = ["method", "trainable (M)", "fwd+bwd ms", "opt step ms", "step ms", "x fft", "min step ms",
              "fwd+bwd share", "opt share", "tokens/s", "peak RSS MiB", "peak extra MiB", "opt state MiB"]
    tokens = shape[0] * shape[1]
    rows = []
    for m in methods:
        rows.append([m, round(trainable[m] / 1e6, 2), med[m]["fb"] * 1e3, med[m]["opt"] * 1e3,
                     med[m]["total"] * 1e3, med[m]["total"] / med["fft"]["total"], min(parts[m]["total"]) * 1e3,
                     f"{med[m]['fb'] / med[m]['total']:.0%}", f"{med[m]['opt'] / med[m]['total']:.0%}",
                     round(tokens / med[m]["total"]),
                     round(mem[m]["peak"] / C.MiB) if mem[m] else "-",
                     round(mem[m]["peak_extra"] / C.MiB) if mem[m] else "-",
                     round(mem[m]["state"] / C.MiB) if mem[m] else "-"])
    print(C.table(header, rows))
    print()
    bound = med["fft"]["total"] + med["lora"]["fb"]
    print(f"target MoLF step <= 1.15 x (fft step + lora fwd/bwd): {med['molf']['total'] / bound:.2f} "
          f"({med['molf']['total'] * 1e3:.0f} ms vs {med['fft']['total'] * 1e3:.0f} + {med['lora']['fb'] * 1e3:.0f} ms)")
    # The MoLF step's excess over FFT against what it must cost: the LoRA paths' extra FLOPs in the
    # forward/backward (r=128 on a 576-wide model: ~35-45%) plus the optimizer at its target (<= 1.3 x
    # fused AdamW over MoLF's parameters, i.e. fft's optimizer step scaled by the parameter ratio).
    lora_flops = lora_flop_share(runs["molf"][0])
    opt_target = 1.3 * med["fft"]["opt"] * trainable["molf"] / trainable["fft"]
    allowed = (lora_flops * med["fft"]["fb"] + opt_target - med["fft"]["opt"]) / med["fft"]["total"]
    for m, label in (("molf", "MoLF"), ("molf_compiled", "MoLF (impl=compiled)")):
        if m not in med:
            continue
        excess = med[m]["total"] / med["fft"]["total"] - 1
        excess_min = min(parts[m]["total"]) / min(parts["fft"]["total"]) - 1  # the min: least disturbed step
        print(f"{label} step excess over fft: {excess:+.0%} median, {excess_min:+.0%} min (fwd+bwd "
              f"{med[m]['fb'] / med['fft']['fb'] - 1:+.0%}, optimizer {med[m]['opt'] / med['fft']['opt']:.1f} x "
              f"fft's); allowed: {allowed:+.0%} = extra LoRA FLOPs {lora_flops:+.0%} of fwd+bwd + optimizer at "
              f"1.3 x fused ({opt_target * 1e3:.0f} ms): {'met' if excess <= allowed else 'not met'} (median), "
              f"{'met' if excess_min <= allowed else 'not met'} (min)")
    for m in ("molf_e", "molf_e_frozen"):
        if m in memory and "lora" in memory:
            print(f"target {m} peak memory <= 1.1 x lora (r=128): {mem[m]['peak'] / mem['lora']['peak']:.2f} (total RSS), "
                  f"{mem[m]['peak_extra'] / mem['lora']['peak_extra']:.2f} (above the loaded model)")


if __name__ == "__main__":
    main()
