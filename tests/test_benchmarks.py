"""The benchmarks run (``--quick``: tiny model) and print a table that parses, with sane numbers.

Timings are only checked to be positive numbers: performance is measured, never asserted here.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def parse_table(text):
    """The first markdown table in ``text`` as a list of {column: cell} dicts."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, text
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    return [dict(zip(header, r)) for r in rows]


def test_bench_optimizer_quick():
    out = run("bench_optimizer.py", "--quick", "--no-memory", "--reps", "2")
    rows = parse_table(out)
    assert [r["method"] for r in rows] == ["molf", "molf_compiled", "molf_masked", "adamw_foreach", "adamw_fused",
                                           "naive"]
    for r in rows:
        assert float(r["median ms"]) > 0 and float(r["min ms"]) > 0
    fused = next(r for r in rows if r["method"] == "adamw_fused")
    assert float(fused["x fused (median)"]) == 1.0
    assert "target MoLFAdamW.step <= 1.3 x AdamW(fused): tiny r16:" in out
    assert "impl=compiled:" in out


def test_bench_train_step_quick():
    out = run("bench_train_step.py", "--quick", "--reps", "2", "--warmup", "0")
    rows = {r["method"]: r for r in parse_table(out)}
    assert list(rows) == ["fft", "lora", "molf", "molf_e"]
    assert float(rows["fft"]["x fft"]) == 1.0
    for r in rows.values():
        assert float(r["step ms"]) >= float(r["opt step ms"]) > 0
        assert float(r["tokens/s"]) > 0
        assert r["fwd+bwd share"].endswith("%") and r["opt share"].endswith("%")
    # trainable parameters: LoRA < MoLF-Efficient (two experts + embeddings); FFT < MoLF (FFT + LoRA)
    trainable = {m: float(r["trainable (M)"]) for m, r in rows.items()}
    assert trainable["lora"] < trainable["molf_e"] and trainable["fft"] < trainable["molf"]
    # peak memory measured for the target pair, the optimizer state is there
    for m in ("lora", "molf_e"):
        assert int(rows[m]["peak RSS MiB"]) > int(rows[m]["peak extra MiB"]) > 0
        assert int(rows[m]["opt state MiB"]) >= 1
    assert rows["molf"]["peak RSS MiB"] == "-"
    assert "target MoLF step <= 1.15 x (fft step + lora fwd/bwd):" in out
    assert "MoLF step excess over fft:" in out and "extra LoRA FLOPs" in out
    assert "target molf_e peak memory <= 1.1 x lora (r=128):" in out


def test_bench_kernel_memory_tiny():
    rows = parse_table(run("bench_kernel_memory.py", "--models", "tiny", "--steps", "2"))
    assert [r["model"] for r in rows] == ["tiny"]
    r = {k: float(v) for k, v in rows[0].items() if k != "model"}
    assert 0 < r["after imports"] <= r["peak"] and r["after nb.free()"] <= r["peak"]
    assert r["after nb.free()"] <= r["after the runs"] + 50   # freeing never costs memory (50 MB: page noise)
