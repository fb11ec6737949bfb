"""The 08 page's helpers: which layers the weight views cover, and a subset that compares just those."""
from __future__ import annotations

import pytest
import torch

from molf.lab import models, router_report, weights


def test_pick_layers_spreads_them_and_names_a_bad_choice():
    assert router_report.pick_layers(30, None) == list(range(30))
    assert router_report.pick_layers(30, 3) == [0, 14, 29]
    assert router_report.pick_layers(30, 1) == [15]
    assert router_report.pick_layers(2, 3) == [0, 1]
    assert router_report.pick_layers(30, [5, 2, 5]) == [2, 5]
    for bad in (0, True, [30], []):
        with pytest.raises(ValueError, match="layers"):
            router_report.pick_layers(30, bad)


def test_a_linear_subset_gives_the_rows_of_its_layers_and_shares_the_weights():
    base, _ = models.load("tiny")
    tuned, _ = models.load("tiny")
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(1e-2 * torch.randn_like(p))
    full = weights.weight_table(base, tuned).set_index("module")
    part = weights.weight_table(router_report.linear_subset(base, [1]), router_report.linear_subset(tuned, [1]))
    assert len(part) == 7 and set(part["layer"]) == {1}
    assert part.set_index("module")["effective_rank"].to_dict() == full.loc[part["module"], "effective_rank"].to_dict()
    subset = router_report.linear_subset(tuned, [0])
    assert subset.get_submodule("model.layers.0.mlp.up_proj") is tuned.get_submodule("model.layers.0.mlp.up_proj")
