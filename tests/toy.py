"""A small language-model-shaped network for fast optimizer tests (named like a Llama's layers)."""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=True)
        self.up_proj = nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        h = h + torch.tanh(self.q_proj(self.norm(h)))
        return h + self.down_proj(torch.relu(self.up_proj(h)))


class ToyLM(nn.Module):
    def __init__(self, vocab=40, d=16, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def toy(seed=0, **kw):
    torch.manual_seed(seed)
    return ToyLM(**kw)


def batch(step, vocab=40, n=4, t=12):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (n, t), generator=g)


def loss_fn(model, ids):
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model, opt, steps, start=0, scheduler=None, clip=None, log=None):
    for s in range(start, start + steps):
        opt.zero_grad()
        loss_fn(model, batch(s)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if log is not None:
            log.append(opt.last_decisions)
