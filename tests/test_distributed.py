"""MoLF on 2 CPU processes (gloo): DDP and FSDP2 must route exactly like one process on the same data.

Each test spawns 2 ranks that train a tiny MoLF Llama, each on its half of the global batch, and
compares per-step decisions, scores and the final merged weights with a single-process run on the
whole batch. The learning rates are picked so that both experts win somewhere and no decision is a
near-tie (checked), so any divergence in the sums would show up as a different decision.
"""
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import molf
from molf import _compiled, routing_log
from molf import distributed as md
from molf.lab.models import tiny_config
from molf.lab.runs import read_routing

ROOT = Path(__file__).resolve().parents[1]
WORLD, STEPS, BATCH, SEQ, VOCAB = 2, 5, 8, 16, 128
LR_FFT, LR_LORA = 3e-3, 1e-3   # about half of the decisions go each way under EPD
MIN_GAP = 0.01                 # smallest relative winner/loser score gap the reference may have
SCORE_RTOL = 1e-4              # scores: equal up to reduction order (seen: < 5e-6)
WEIGHT_ATOL = 1e-5             # merged weights after STEPS steps of lr <= 3e-3 (seen: 1e-6)


# ---------------------------------------------------------------- the run every rank and the reference do
def make_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(VOCAB))
    torch.manual_seed(1)
    return molf.wrap(model, ranks=(8,))


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def train(model, opt, rank=0, world=1, log_path=None):
    """Train STEPS steps on this rank's slice of each global batch; return the routing per step."""
    decisions, scores, agree = [], [], []
    per_rank = BATCH // world
    for step in range(STEPS):
        ids = global_batch(step)[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()  # mean over equal token counts per rank
        opt.step()
        decisions.append(opt.last_decisions)
        scores.append(opt.last_scores)
        agree.append(md.routing_agrees(opt))
        if log_path is not None:
            md.write_routing_log(log_path, opt, step)
    return {"decisions": decisions, "scores": scores, "agree": agree}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, mode, port, out, impl="auto"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        model = make_model()
        if mode == "ddp":
            trained = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            trained = md.shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        opt = molf.MoLFAdamW(molf.param_groups(model, LR_FFT, LR_LORA), impl=impl)
        local = [p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()]
        record = train(trained, opt, rank, WORLD, log_path=Path(out) / f"routing-rank{rank}.jsonl")
        record["sharded"] = sum(local) < sum(p.numel() for p in model.parameters())
        record["no_process_group"] = opt.process_group is None
        record["kernels_built"] = _compiled.available(opt.score_fn)
        record["merged"] = md.merge_and_save(trained, Path(out) / "merged")
        torch.save(record, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(mode, out, impl="auto"):
    mp.spawn(_worker, args=(mode, _free_port(), str(out), impl), nprocs=WORLD, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@contextmanager
def one_thread():
    """Like the children: tiny ops on 2 busy cores run faster (and far steadier) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def reference():
    """The single-process run on the full global batch, then merged with ``molf.merge``."""
    with one_thread():
        model = make_model()
        opt = molf.MoLFAdamW(molf.param_groups(model, LR_FFT, LR_LORA))
        record = train(model, opt)
        record["merged"] = {k: v.detach().clone() for k, v in molf.merge(model).state_dict().items()}
    # The comparison only means something if both experts win somewhere and nothing is a near-tie.
    winners = {w for step in record["decisions"] for ws in step.values() for w in ws}
    assert winners == {"fft", "lora0"}, f"pick learning rates under which both experts win, got {winners}"
    for step in record["scores"]:
        for module, s in step.items():
            gap = abs(s["fft"] - s["lora0"]) / max(s.values())
            assert gap > MIN_GAP, f"near-tie in the reference at {module}: {s}"
    return record


def check_against_reference(ranks, reference, out):
    for r, record in enumerate(ranks):
        assert all(record["agree"]), f"rank {r}: ranks disagreed on routing at some step"
        assert record["decisions"] == reference["decisions"], f"rank {r} routed differently from 1 process"
        for step, (mine, ref) in enumerate(zip(record["scores"], reference["scores"])):
            for module in ref:
                got, want = torch.tensor(list(mine[module].values())), torch.tensor(list(ref[module].values()))
                assert torch.allclose(got, want, rtol=SCORE_RTOL, atol=0), \
                    f"rank {r} step {step} {module}: scores {mine[module]} != {ref[module]}"
    merged = ranks[0]["merged"]
    assert ranks[1]["merged"] is None  # only rank 0 holds the gathered weights
    assert merged.keys() == reference["merged"].keys()
    for k, want in reference["merged"].items():
        assert torch.allclose(merged[k], want, atol=WEIGHT_ATOL, rtol=0), \
            f"{k}: max diff {(merged[k] - want).abs().max():.2e}"
    # The weights moved: a comparison of untrained models would prove nothing.
    assert not torch.allclose(reference["merged"]["model.layers.0.mlp.up_proj.weight"],
                              make_model().model.layers[0].mlp.up_proj.base_layer.weight)
    # The routing log: written once, by rank 0, with every step's decisions at full precision.
    assert not (out / "routing-rank1.jsonl").exists(), "rank 1 wrote a routing log"
    lines = [json.loads(line) for line in (out / "routing-rank0.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(STEPS))
    assert [{m: tuple(w) for m, w in line["winners"].items()} for line in lines] == reference["decisions"]
    # ... in the one routing-log format, which the lab reads back.
    table = read_routing(out / "routing-rank0.jsonl")
    assert sorted(table["step"].unique()) == list(range(STEPS))
    won = table[table["won"]].groupby("step")["module"].apply(set).tolist()
    assert won == [{m for m, w in d.items() if w} for d in reference["decisions"]]
    assert all(s > 0 for line in lines for e in line["scores"].values() for s in e.values())


def load_plain(path):
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert not any("lora" in k or "base_layer" in k for k in loaded.state_dict())
    return loaded


# ---------------------------------------------------------------- the tests
def test_ddp_routes_like_one_process(reference, tmp_path):
    ranks = run_two_ranks("ddp", tmp_path)
    assert not ranks[0]["sharded"] and ranks[0]["no_process_group"]  # nothing to reduce under DDP
    check_against_reference(ranks, reference, tmp_path)
    loaded = load_plain(tmp_path / "merged")
    for k, v in loaded.state_dict().items():
        assert torch.allclose(v, reference["merged"][k], atol=WEIGHT_ATOL, rtol=0), k


def test_fsdp_routes_like_one_process_and_saves_a_plain_checkpoint(reference, tmp_path):
    ranks = run_two_ranks("fsdp", tmp_path)
    assert ranks[0]["sharded"] and ranks[1]["sharded"]  # every rank really held only a shard
    check_against_reference(ranks, reference, tmp_path)
    loaded = load_plain(tmp_path / "merged")
    ref = make_model()
    molf.merge(ref).load_state_dict(reference["merged"])
    for k, v in loaded.state_dict().items():
        assert torch.allclose(v, reference["merged"][k], atol=WEIGHT_ATOL, rtol=0), k
    ids = global_batch(99)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_fsdp_on_the_compiled_kernels_routes_like_one_process(reference, tmp_path):
    # The optimizer's all-reduced gradient check runs first under FSDP; the kernels then step the shards.
    ranks = run_two_ranks("fsdp", tmp_path, impl="compiled")
    assert all(r["sharded"] and r["kernels_built"] for r in ranks)
    check_against_reference(ranks, reference, tmp_path)


def test_single_process_helpers(tmp_path):
    """Without a process group the helpers are the identity, and merge_and_save equals molf.merge."""
    assert md.is_main_process() and md.world_size() == 1
    model = make_model()
    opt = molf.MoLFAdamW(molf.param_groups(model, LR_FFT, LR_LORA))
    train(model, opt, log_path=tmp_path / "log.jsonl")
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == STEPS
    merged = md.merge_and_save(model, tmp_path / "ckpt")
    assert molf.wrapped_modules(model)  # the training model is left wrapped
    want = molf.merge(model).state_dict()
    loaded = load_plain(tmp_path / "ckpt").state_dict()
    assert merged.keys() == want.keys()
    for k in want:
        assert torch.equal(merged[k], want[k]) and torch.equal(loaded[k], want[k]), k


def test_merge_and_save_plain_torch_model(tmp_path):
    """A model without ``save_pretrained`` is written as ``model.safetensors`` with plain keys."""
    from safetensors.torch import load_file
    from toy import batch, loss_fn, toy

    model = molf.wrap(toy(0), ranks=(4,))
    opt = molf.MoLFAdamW(molf.param_groups(model, 1e-2, 1e-2))
    for step in range(2):
        opt.zero_grad()
        loss_fn(model, batch(step)).backward()
        opt.step()
    md.merge_and_save(model, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    want = molf.merge(model).state_dict()
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


def test_accelerate_launch_example(tmp_path):
    """The documented ``accelerate launch --multi_gpu --num_processes 2`` command on CPU, end to end,
    against the same script run as one plain process on the same global batches."""
    script = str(ROOT / "examples" / "accelerate_molf.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = str(_free_port())
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", port, script, "--steps", "3", "--out", str(tmp_path / "two")]
    single = [sys.executable, script, "--steps", "3", "--out", str(tmp_path / "one")]
    stdout = []
    for cmd in (launch, single):
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        stdout.append(done.stdout)
    assert "MULTI_CPU" in stdout[0] and "routing agrees on all 2 ranks" in stdout[0], stdout[0]
    two, one = tmp_path / "two", tmp_path / "one"
    logs = [[json.loads(line)["winners"] for line in (d / "routing.jsonl").read_text().splitlines()]
            for d in (two, one)]
    assert len(logs[0]) == 3 and logs[0] == logs[1]
    a, b = load_plain(two / "merged").state_dict(), load_plain(one / "merged").state_dict()
    for k in b:
        assert torch.allclose(a[k], b[k], atol=WEIGHT_ATOL, rtol=0), k


def test_torchrun_examples_agree(tmp_path):
    """The documented torchrun commands: DDP and FSDP2 runs of the examples route and end alike."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "examples" / f"train_{name}.py"), "--steps", "3", "--out", str(tmp_path / name)]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "routing agrees on all 2 ranks" in done.stdout, done.stdout
    logs = [[json.loads(line)["winners"] for line in (tmp_path / n / "routing.jsonl").read_text().splitlines()]
            for n in ("ddp", "fsdp")]
    assert len(logs[0]) == 3 and logs[0] == logs[1]
    table = read_routing(tmp_path / "ddp" / "routing.jsonl")  # the lab reads the examples' logs back
    assert table["step"].nunique() == 3 and table.groupby(["step", "module"])["won"].sum().eq(1).all()
    assert all("loss" in record.extra for record in routing_log.read(tmp_path / "ddp" / "routing.jsonl"))
    a, b = (load_plain(tmp_path / n / "merged").state_dict() for n in ("ddp", "fsdp"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=WEIGHT_ATOL, rtol=0), k
