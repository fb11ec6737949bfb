
import pytest
import torch

from molf.lab import models


@pytest.mark.model
def test_default_model_loads_offline_and_gives_finite_logits(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = models.load("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"  # it is the real pretrained model


def test_tiny_model_is_deterministic_and_leaves_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, _ = models.load("tiny")
    after = torch.rand(1)
    b, _ = models.load("tiny")
    assert torch.equal(after, expected_next)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.config.num_hidden_layers == 2


def test_bad_model_name():
    with pytest.raises(ValueError, match="model name must be a non-empty string"):
        models.load("")
