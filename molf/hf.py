"""MoLF inside a Hugging Face ``Trainer``: one line for a ``transformers`` user.

    model = molf.wrap(model, ranks=(128,))
    trainer = MoLFTrainer(model=model, args=TrainingArguments(learning_rate=5e-5, ...),
                          train_dataset=ds, lr_lora=5e-5, score="epd", topk=1,
                          routing_log="out/routing.jsonl")
    trainer.train()
    trainer.merge_and_save("out/model")   # a plain transformers checkpoint

``args.learning_rate`` and ``args.weight_decay`` are the FFT expert's (and the non-linear parameters');
``lr_lora``/``wd_lora`` the LoRA experts'. Trainer's own scheduler scales both. The routing log has the
format of ``molf.routing_log``, written on the main process only.
"""
from __future__ import annotations

from pathlib import Path

from transformers import Trainer, TrainerCallback

from . import routing_log
from .model import merge, param_groups, wrapped_modules
from .optim import MoLFAdamW
from .routing_log import RoutingRecord, unwrap_optimizer


class RoutingLogCallback(TrainerCallback):
    """Appends one ``routing.jsonl`` line after every optimizer step (main process only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        """A fresh run starts an empty log; a run resumed from a checkpoint at step N keeps the records of
        steps before N and drops the later ones (they are trained again), so no step is logged twice; a last
        line cut off by a crash is dropped with them. A log that is not a routing log raises, naming its line."""
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if state.global_step > 0 and self.path.exists():
            kept = [r for r in routing_log.read(self.path, drop_torn_tail=True) if r.step < state.global_step]
        self.path.write_text("".join(r.to_json() for r in kept))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        molf_optimizer = unwrap_optimizer(optimizer)
        if molf_optimizer is None or not state.is_world_process_zero:
            return
        # global_step counts completed steps: this is step index N
        lr = molf_optimizer.param_groups[0]["lr"]
        routing_log.append(self.path, RoutingRecord.from_optimizer(molf_optimizer, state.global_step, lr=lr))


class MoLFTrainer(Trainer):
    """A ``Trainer`` whose optimizer is ``MoLFAdamW`` over ``molf.param_groups`` of a wrapped model."""

    def __init__(self, *args, lr_lora: float | None = None, wd_lora: float = 0.01, score="epd", topk: int = 1,
                 routing_log: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not wrapped_modules(self.model):
            raise ValueError("MoLFTrainer needs a model wrapped with molf.wrap(model, ...) first")
        self.molf_options = {"lr_lora": lr_lora, "wd_lora": wd_lora, "score": score, "topk": topk}
        if routing_log is not None:
            self.add_callback(RoutingLogCallback(routing_log))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            o, a = self.molf_options, self.args
            groups = param_groups(model if model is not None else self.model, lr_fft=a.learning_rate,
                                  lr_lora=o["lr_lora"] if o["lr_lora"] is not None else a.learning_rate,
                                  wd_fft=a.weight_decay, wd_lora=o["wd_lora"])
            self.optimizer = MoLFAdamW(groups, score=o["score"], topk=o["topk"],
                                       betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
        return self.optimizer

    @property
    def molf_optimizer(self) -> MoLFAdamW | None:
        return unwrap_optimizer(self.optimizer)

    def merge_and_save(self, path: str | Path) -> None:
        """Merge the experts into the base weights and save a plain ``transformers`` checkpoint."""
        model = self.accelerator.unwrap_model(self.model)
        merge(model)
        if self.args.should_save:
            model.save_pretrained(path)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(path)
