"""molf: MoLF, Mixture of LoRA and Full fine-tuning (arXiv 2605.07111).

    model = molf.wrap(model, ranks=(128,))                  # W x + sum_i s_i B_i A_i x
    opt = molf.MoLFAdamW(molf.param_groups(model, lr_fft=5e-5, lr_lora=5e-5), score="epd", topk=1)
    ...train...
    molf.merge(model); model.save_pretrained(path)         # a plain transformers checkpoint
"""
from .layer import MoLFLinear
from .model import merge, param_groups, wrap, wrapped_modules
from .optim import DEFAULT_BETAS, DEFAULT_EPS, MoLFAdamW
from .router import RouterStats, Score, register_score

__all__ = ["DEFAULT_BETAS", "DEFAULT_EPS", "MoLFLinear", "MoLFAdamW", "RouterStats", "Score", "merge", "param_groups", "register_score", "wrap",
           "wrapped_modules"]
__version__ = "0.1.0"
