"""The regime map: a controlled setting where LoRA wins, FFT wins, and MoLF's router is seen choosing.

The setting (one *task* per cell and seed):

- a "pretrained" base network ``Linear(d, h) -> tanh -> Linear(h, d)`` (PyTorch's default init, drawn
  from the seed);
- the fine-tuning target: the same network with each weight shifted by ``U @ V`` of rank ``k``
  (Gaussian factors), scaled to ``shift_scale`` x that weight's Frobenius norm; biases unchanged;
- ``n`` training inputs ``x ~ N(0, I)`` with the target's outputs plus Gaussian noise of
  ``noise`` x their RMS; clean validation and test inputs (the validation set picks each method's
  learning rate and the checkpoint, the test set gives the reported held-out loss).

Every method starts from the base network: FFT (plain AdamW on everything), LoRA and DoRA (peft, rank
``lora_rank``, alpha ``lora_alpha``, rsLoRA scale, base frozen), MoLF (``molf.wrap`` with one LoRA
expert of the same rank, ``MoLFAdamW`` top-1), dense top-2 (the same, every expert updated every step)
and MoLF-Efficient (two LoRA experts, frozen base). No weight decay anywhere, no gradient clipping.

Speed: the runs of one method (every cell, seed and learning rate) train *together* as independent
members of one model (``Members``), through the lab's one loop (``molf.lab.engine.fit``): the summed
loss gives each member exactly its own gradient; Adam and MoLF's per-module routing act per parameter
and per module, so each member trains as it would alone (``tests/test_regime.py`` checks this against a
single-member run). The forward is one ``torch.func.vmap`` of the member network's own forward
(``functional_call``), so peft's DoRA and ``MoLFLinear`` compute as they always do.

    python -m molf.lab.regime --claims                 # run the map, print it and the claim lines
    python -m molf.lab.regime --claims --from results/regime_map.csv   # from a saved map
    python -m molf.lab.regime --slice --claims         # the small regression slice, and its claim lines
    python -m molf.lab.regime --transformer            # the same question in the tiny causal LM

The modules: ``setting`` (cells, the base network and its shifted target, the tasks), ``methods`` (the
methods and the training of one method's runs as one model), ``sweep`` (running the map), ``verdicts``
(reading it: picks, winners, the claim lines), ``figures``, ``classroom`` (the notebook's app),
``transformer`` (the check in the tiny causal LM) and ``cli``. Every public name is importable from here.
"""
from __future__ import annotations

from .classroom import CLASSROOM_LRS, Classroom
from .cli import main
from .figures import WINNER_COLORS, heat_figure, routing_figure, winner_figure
from .methods import DEFAULT_GRID, Config, Members, Trained, build_member, configs, member_loss, train, train_methods
from .setting import (
    LABELS,
    METHODS,
    ROUTED,
    SINGLE_METHODS,
    Cell,
    Setting,
    Task,
    base_network,
    batch_indices,
    make_task,
    seeded_generator,
    shifted,
)
from .sweep import MAP, SLICE, MapSpec, default_cells, routing_curves, run_cell, run_map
from .transformer import BLOCK_LINEARS, transformer_check, transformer_lines
from .verdicts import (
    CELL,
    ROWS,
    agreement_at,
    claim_early_routing,
    claim_molf_near_best,
    claim_top1_vs_dense,
    claim_winner_flips,
    claims,
    fixed_pair,
    load,
    map_table,
    pick,
    shuffled_agreement,
    summarize,
)

__all__ = [
    "agreement_at", "base_network", "batch_indices", "BLOCK_LINEARS", "build_member", "CELL", "Cell",
    "claim_early_routing", "claim_molf_near_best", "claim_top1_vs_dense", "claim_winner_flips", "claims",
    "Classroom", "CLASSROOM_LRS", "Config", "configs", "default_cells", "DEFAULT_GRID", "fixed_pair", "heat_figure",
    "LABELS", "load", "main", "make_task", "MAP", "map_table", "MapSpec", "member_loss", "Members", "METHODS",
    "pick", "ROUTED", "routing_curves", "routing_figure", "ROWS", "run_cell", "run_map", "seeded_generator",
    "Setting", "shifted", "shuffled_agreement", "SINGLE_METHODS", "SLICE", "summarize", "Task", "train",
    "train_methods", "Trained", "transformer_check", "transformer_lines", "WINNER_COLORS", "winner_figure",
]
