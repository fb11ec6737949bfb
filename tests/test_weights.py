"""What training did to the weights: update spectra, intruder dimensions and the update audit."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from toy import batch, loss_fn, toy

import molf
from molf.lab import weights


def _train(model, opt, steps, audit=None):
    if audit is not None:
        audit.on_begin(SimpleNamespace(optimizer=opt))
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, batch(step)).backward()
        opt.step()
        if audit is not None:
            audit.on_step(SimpleNamespace(step=step, optimizer=opt))


@pytest.mark.parametrize("ranks, train_base, bounded", [((1, 1), False, True), ((2,), True, False)])
def test_a_lora_only_update_has_rank_at_most_r_and_fft_exceeds_it(ranks, train_base, bounded):
    """LoRA experts of ranks 1 and 1 (base frozen) can only add rank 2; the FFT expert is not bounded."""
    base = toy()
    model = copy.deepcopy(base)
    molf.wrap(model, ranks=ranks, exclude=(), train_base=train_base)
    opt = molf.MoLFAdamW(molf.param_groups(model, lr_fft=1e-2, lr_lora=1e-2), topk=2)
    _train(model, opt, 5)
    molf.merge(model)
    table = weights.weight_table(base, model, k=4)
    assert len(table) == 6 and (table["delta_norm"] > 0).all()  # 2 blocks x (q, up, down); lm_head aside
    numerical_ranks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            s = weights.singular_values(module.weight - base.get_submodule(name).weight)
            numerical_ranks.append(int((s > s[0] * 1e-6).sum()))
    if bounded:
        assert max(numerical_ranks) <= 2 and (table["rank_99"] <= 2).all()
        assert (table["effective_rank"] <= 2 + 1e-9).all()
    else:
        assert max(numerical_ranks) > 2 and (table["rank_99"] > 2).any()


def test_effective_and_energy_rank_on_known_spectra():
    assert weights.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert weights.effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert weights.effective_rank(torch.zeros(3)) == 0.0
    assert weights.energy_rank(torch.tensor([10.0, 2.0, 0.1])) == 2
    assert weights.energy_rank(torch.tensor([10.0, 0.01])) == 1
    with pytest.raises(ValueError, match="share must be in"):
        weights.energy_rank(torch.ones(2), share=0)


def test_a_new_strong_direction_is_an_intruder_and_a_small_nudge_is_not():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 128, generator=g) / 128 ** 0.5
    u, v = torch.randn(128, 1, generator=g), torch.randn(1, 128, generator=g)
    u, v = u / u.norm(), v / v.norm()
    strong = weights.intruders(w, w + 20 * u @ v, k=3)
    assert strong[0] < 0.5 and sum(x < 0.5 for x in strong) == 1
    nudged = weights.intruders(w, w + 1e-4 * torch.randn(128, 128, generator=g), k=3)
    assert min(nudged) > 0.99
    with pytest.raises(ValueError, match="threshold"):
        weights.intruders(w, w, threshold=1.5)


def test_weight_table_refuses_an_unmerged_model_and_unrelated_models():
    model = toy()
    molf.wrap(model, ranks=(2,))
    with pytest.raises(ValueError, match="molf.merge"):
        weights.weight_table(toy(), model)
    with pytest.raises(ValueError, match="share no linear module"):
        weights.weight_table(toy(d=8), toy(d=16))


@pytest.mark.parametrize("topk", [1, 2])
def test_the_update_audit_shows_winners_moved_and_losers_did_not(topk):
    model = toy()
    molf.wrap(model, ranks=(2,), exclude=())
    opt = molf.MoLFAdamW(molf.param_groups(model, lr_fft=1e-3, lr_lora=1e-3), topk=topk)
    audit = weights.UpdateAudit(model)
    _train(model, opt, 4, audit)
    table = audit.table()
    assert len(table) == 4 * 7 * 2  # steps x modules x experts
    assert (table.loc[table["won"], "moved"] > 0).all()
    assert (table.loc[~table["won"], "moved"] == 0).all()
    assert table["won"].sum() == 4 * 7 * topk
    with pytest.raises(ValueError, match="molf.wrap"):
        weights.UpdateAudit(toy())
