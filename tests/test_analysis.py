"""``molf.lab.analysis``: the one rule for "the busiest module" (the explorer, the score traces)."""

import pandas as pd
import pytest

from molf.lab import analysis, runs


def routing_table(winners: dict[str, list[str]]) -> pd.DataFrame:
    """A routing table (``runs.read_routing``'s columns) from each module's winner per step."""
    rows = []
    for module, sequence in winners.items():
        for step, winner in enumerate(sequence):
            for expert in ("fft", "lora0"):
                rows.append((step, module, expert, 1.0 if expert == winner else 0.5, expert == winner, 1e-3))
    frame = pd.DataFrame(rows, columns=["step", "module", "expert", "score", "won", "lr"])
    frame.insert(2, "layer", frame["module"].map(runs.module_layer))
    frame.insert(3, "module_type", frame["module"].map(runs.module_type))
    return frame


def test_busiest_module_has_the_most_switches():
    table = routing_table({
        "model.layers.0.self_attn.q_proj": ["fft", "fft", "lora0", "lora0", "lora0"],   # 1 switch
        "model.layers.1.mlp.up_proj": ["fft", "lora0", "fft", "lora0", "lora0"],        # 3 switches
        "model.layers.0.mlp.down_proj": ["fft", "lora0", "lora0", "fft", "fft"],        # 2 switches
    })
    assert analysis.busiest_module(table) == "model.layers.1.mlp.up_proj"
    assert analysis.pick_trace_modules(table, n=1) == ["model.layers.1.mlp.up_proj"]


def test_busiest_module_breaks_ties_by_decoder_order_not_log_order():
    table = routing_table({
        "model.layers.1.self_attn.q_proj": ["fft", "lora0", "fft"],    # 2 switches, later layer
        "model.layers.0.mlp.down_proj": ["fft", "lora0", "fft"],       # 2 switches, layer 0, down
        "model.layers.0.self_attn.v_proj": ["lora0", "fft", "lora0"],  # 2 switches, layer 0, v: first
        "model.layers.0.self_attn.q_proj": ["fft", "fft", "fft"],      # none
    })
    assert analysis.busiest_module(table) == "model.layers.0.self_attn.v_proj"


def test_busiest_module_of_a_run_that_never_switched_is_its_first_module():
    table = routing_table({"model.layers.1.self_attn.k_proj": ["fft"] * 3,
                           "model.layers.0.mlp.gate_proj": ["lora0"] * 3})
    assert analysis.busiest_module(table) == "model.layers.0.mlp.gate_proj"


def test_busiest_module_of_an_unrouted_run_says_so():
    with pytest.raises(ValueError, match="no routing log"):
        analysis.busiest_module(pd.DataFrame())
