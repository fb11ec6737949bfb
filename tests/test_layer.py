import copy
import math

import pytest
import torch
from torch import nn
from toy import batch, toy, train

import molf


def test_wrap_replaces_targets_and_keeps_lm_head():
    model = molf.wrap(toy(), ranks=(4, 8), alphas=(8, 16))
    layers = molf.wrapped_modules(model)
    assert sorted(layers) == sorted(f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "up_proj", "down_proj"))
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, molf.MoLFLinear)
    q = model.layers[0].q_proj
    assert q.ranks == (4, 8)
    assert q.scales == pytest.approx((8 / math.sqrt(4), 16 / math.sqrt(8)))
    assert [a.weight.shape for a in q.lora_A] == [(4, 16), (8, 16)]
    assert [b.weight.shape for b in q.lora_B] == [(16, 4), (16, 8)]
    assert all(b.lora_B[0].weight.abs().sum() == 0 for b in layers.values())
    assert all(a.lora_A[0].bias is None for a in layers.values())


def test_classic_lora_scale_and_default_alpha():
    model = molf.wrap(toy(), ranks=(16,), rslora=False)
    assert model.layers[0].q_proj.scales == (32 / 16,)


def test_targets_suffix_list():
    model = molf.wrap(toy(), ranks=(4,), targets=["q_proj"])
    assert sorted(molf.wrapped_modules(model)) == ["layers.0.q_proj", "layers.1.q_proj"]


def test_wrapped_model_equals_base_at_init_and_after_merge():
    base = toy()
    ids = batch(0)
    with torch.no_grad():
        expected = base(ids)
    model = molf.wrap(copy.deepcopy(base), ranks=(4, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), expected)  # B = 0: exactly the base model

    opt = molf.MoLFAdamW(molf.param_groups(model, 1e-2, 1e-2), topk=2)
    train(model, opt, 5)
    assert any(l.lora_B[0].weight.abs().sum() > 0 for l in molf.wrapped_modules(model).values())
    with torch.no_grad():
        unmerged = model(ids)
        molf.merge(model)
        merged = model(ids)
    assert not molf.wrapped_modules(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert all(p.requires_grad for p in model.parameters())


def test_unmerge_restores_weights():
    model = molf.wrap(toy(), ranks=(4,))
    layer = model.layers[0].q_proj
    with torch.no_grad():
        layer.lora_B[0].weight.normal_()
    before = layer.base_layer.weight.clone()
    layer.merge()
    assert not torch.allclose(layer.base_layer.weight, before)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, before, atol=1e-6)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_dropout_only_on_lora_path():
    model = molf.wrap(toy(), ranks=(4,), dropout=0.5)
    layer = model.layers[0].q_proj
    x = torch.randn(3, 16)
    layer.train()
    # B = 0, so the LoRA path contributes nothing: dropout on it must not change the output
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(ranks=(0,)), "rank must be a positive integer"),
    (dict(ranks=(-4,)), "-4"),
    (dict(ranks=(4, 8), alphas=(1,)), "alphas"),
    (dict(ranks=()), "ranks is empty"),
    (dict(ranks=(4,), alphas=(0,)), "alpha must be a positive"),
    (dict(ranks=(4,), dropout=1.0), "dropout"),
    (dict(ranks=(4,), targets=["nope_proj"]), "match no nn.Linear"),
    (dict(ranks=(4,), targets="everything"), "all-linear"),
    (dict(ranks=(4,), train_base=False), "at least two ranks"),
])
def test_wrap_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        molf.wrap(toy(), **kwargs)


def test_wrap_twice_is_an_error():
    model = molf.wrap(toy(), ranks=(4,))
    with pytest.raises(ValueError, match="already wrapped"):
        molf.wrap(model, ranks=(4,))


def test_merge_unwrapped_is_an_error():
    with pytest.raises(ValueError, match="no MoLF layers"):
        molf.merge(toy())


def test_param_groups_layout():
    model = molf.wrap(toy(), ranks=(4,))
    groups = molf.param_groups(model, lr_fft=1e-4, lr_lora=5e-4, wd_fft=0.1, wd_lora=0.01)
    molf_groups = [g for g in groups if "molf_module" in g]
    assert len(molf_groups) == 6
    q = next(g for g in molf_groups if g["molf_module"] == "layers.0.q_proj")
    assert q["experts"] == ("fft", "lora0")
    assert q["lr"] == 1e-4 and q["expert_lr_scale"] == pytest.approx((1.0, 5.0))
    assert q["param_expert"] == (0, 0, 1, 1)            # weight, bias | A, B
    assert q["param_weight_decay"] == (0.1, 0.0, 0.01, 0.01)
    plain = [g for g in groups if "molf_module" not in g]
    assert [g["weight_decay"] for g in plain] == [0.1, 0.0]
    n_plain = sum(p.numel() for g in plain for p in g["params"])
    n_emb_head_norm = (model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
                       + sum(p.numel() for n, p in model.named_parameters() if "norm" in n))
    assert n_plain == n_emb_head_norm


def test_param_groups_rejects_bad_lr():
    model = molf.wrap(toy(), ranks=(4,))
    with pytest.raises(ValueError, match="lr_fft must be a finite number > 0, got -1"):
        molf.param_groups(model, lr_fft=-1, lr_lora=1e-3)
    with pytest.raises(ValueError, match="wd_lora must be a finite number >= 0"):
        molf.param_groups(model, lr_fft=1e-3, lr_lora=1e-3, wd_lora=-0.1)


def test_freeze_non_linear():
    model = molf.wrap(toy(), ranks=(4, 8), train_base=False, freeze_non_linear=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_tiny_llama_wrap_merge_save_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    from molf.lab import models
    model, tok = models.load("tiny")
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        base_logits = model(ids).logits
    molf.wrap(model, ranks=(8,))
    assert len(molf.wrapped_modules(model)) == 2 * 7  # q k v o gate up down per layer
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)
    opt = molf.MoLFAdamW(molf.param_groups(model, 1e-3, 1e-3))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(ids).logits
    molf.merge(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "lora" not in str(list(reloaded.state_dict()))
    with torch.no_grad():
        assert (reloaded(ids).logits - trained).abs().max().item() < 1e-5


# ---------------------------------------------------------------- tied output heads
def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def tied_toy():
    model = toy()
    model.lm_head.weight = model.embed_tokens.weight  # as transformers ties an output head
    return model


@pytest.mark.parametrize("build, embedding", [(lambda: tiny_llama(True), "model.embed_tokens.weight"),
                                               (tied_toy, "embed_tokens.weight")])
def test_a_head_tied_to_the_embedding_is_refused_by_name_and_the_model_left_as_it_was(build, embedding):
    model = build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"'lm_head' shares its weight with \['{embedding}'\] \(tied weights\)"):
        molf.wrap(model, ranks=(4,), exclude=())
    assert not molf.wrapped_modules(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert molf.wrapped_modules(molf.wrap(model, ranks=(4,)))  # the default exclude=("lm_head",) wraps the rest


def test_an_untied_head_wraps_trains_and_merges_exactly():
    model = tiny_llama(False)
    molf.wrap(model, ranks=(4,), exclude=())
    assert "lm_head" in molf.wrapped_modules(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = molf.MoLFAdamW(molf.param_groups(model, 1e-2, 1e-2))
    for _ in range(4):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert len(opt.last_decisions) == 8 and sum(opt.win_counts["lm_head"].values()) == 4  # the head was routed
    embedding = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        trained = model(ids).logits
        molf.merge(model)
        merged = model(ids).logits
    assert (merged - trained).abs().max().item() < 1e-5
    assert torch.equal(model.model.embed_tokens.weight, embedding)


# ---------------------------------------------------------------- the LoRA A initialisation
@pytest.mark.parametrize("d_in, rank", [(16, 4), (300, 8)])
def test_lora_a_starts_kaiming_uniform_with_a_sqrt5_and_b_at_zero(d_in, rank):
    """Kaiming-uniform with a = sqrt(5) (as nn.Linear, peft's LoRA and the reference): gain sqrt(1/3),
    so A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)). Pinned draw for draw: any other gain or bound fails."""
    layer = molf.MoLFLinear(nn.Linear(d_in, 12), ranks=(rank, rank), alphas=(8, 8))
    torch.manual_seed(7)
    layer.reset_lora_parameters()
    torch.manual_seed(7)
    bound = 1 / math.sqrt(d_in)
    for A, B in zip(layer.lora_A, layer.lora_B):
        assert torch.equal(A.weight, torch.empty(rank, d_in).uniform_(-bound, bound))
        assert torch.count_nonzero(B.weight) == 0
    assert layer.lora_A[0].weight.abs().max() <= bound
