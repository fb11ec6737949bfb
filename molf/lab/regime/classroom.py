"""The regime classroom: one cell, every method, sliders for the cell's knobs."""
import time

import numpy as np

from .figures import WINNER_COLORS
from .methods import Config, train_methods
from .setting import LABELS, Cell, Setting, make_task

# ---------------------------------------------------------------------------- the classroom
CLASSROOM_LRS = {"fft": 1e-3, "lora": 1e-2, "dora": 1e-2}


class Classroom:
    """One cell, every method retrained on a change: FFT, LoRA, DoRA at fixed learning rates
    (``CLASSROOM_LRS``) and MoLF at ``lr_fft`` = FFT's and ``lr_lora = lr_ratio x lr_fft``."""

    def __init__(self, shift_rank: int = 1, examples: int = 256, noise: float = 0.1, lora_rank: int = 4,
                 lr_ratio: float = 1.0, seeds: int = 3, steps: int = 100):
        self.seeds, self.steps = seeds, steps
        self.values = dict(shift_rank=shift_rank, examples=examples, noise=noise, lora_rank=lora_rank, lr_ratio=lr_ratio)
        self._widgets = None
        self.retrain()

    def retrain(self, **changes) -> dict:
        v = {**self.values, **changes}
        if not (isinstance(v["lr_ratio"], (int, float)) and v["lr_ratio"] > 0):
            raise ValueError(f"lr_ratio must be a number > 0, got {v['lr_ratio']!r}")
        setting = Setting(steps=self.steps, check_every=max(1, self.steps // 5), n_val=128, n_test=128,
                          lora_rank=int(v["lora_rank"]), lora_alpha=2.0 * int(v["lora_rank"]))
        cell = Cell(int(v["shift_rank"]), int(v["examples"]), float(v["noise"]))
        began = time.perf_counter()
        tasks = [make_task(cell, seed, setting) for seed in range(self.seeds)]
        lr_fft = CLASSROOM_LRS["fft"]
        plan = {m: [(t, Config(lr, lr)) for t in range(self.seeds)] for m, lr in CLASSROOM_LRS.items()}
        plan["molf"] = [(t, Config(lr_fft, lr_fft * v["lr_ratio"])) for t in range(self.seeds)]
        trained = train_methods(tasks, plan, setting, record_routing=True)   # one model, one fit
        losses = {m: t.test for m, t in trained.items()}
        molf_run = trained["molf"]
        self.values = v
        self.result = {"cell": cell, "losses": {m: float(np.mean(x)) for m, x in losses.items()},
                       "fft_share": float(np.mean(molf_run.fft_share)),
                       "curve": molf_run.decisions.mean(axis=(1, 2)), "seconds": time.perf_counter() - began}
        return self.result

    def frame(self):
        import matplotlib.pyplot as plt

        r = self.result
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
        methods = list(r["losses"])
        colors = [WINNER_COLORS.get(m, "#2ca02c") for m in methods]
        left.bar([LABELS[m].split(" ")[0] for m in methods], [r["losses"][m] * 1e3 for m in methods], color=colors)
        left.set_ylabel("held-out MSE x 1e3")
        left.set_title(f"{r['cell'].label} (mean of {self.seeds} seeds)", fontsize=10)
        right.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], color="#d62728", lw=1.8)
        right.set_ylim(-0.03, 1.03)
        right.set_xlabel("training step")
        right.set_ylabel("MoLF: share won by FFT")
        right.set_title(f"MoLF routing, lr_lora/lr_fft = {self.values['lr_ratio']:g}: FFT share "
                        f"{r['fft_share']:.0%}", fontsize=10)
        fig.tight_layout()
        return fig

    def widget(self):
        """Sliders (retrain on release) and the picture."""
        import ipywidgets as w

        from .. import plots

        if self._widgets is not None:
            return self._widgets["box"]
        wide, style = w.Layout(width="330px"), {"description_width": "initial"}
        v = self.values
        controls = {
            "shift_rank": w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64], value=v["shift_rank"],
                                            description="shift rank k", continuous_update=False, layout=wide, style=style),
            "examples": w.SelectionSlider(options=[32, 64, 128, 256, 512, 1024, 2048, 4096], value=v["examples"],
                                          description="examples n", continuous_update=False, layout=wide, style=style),
            "noise": w.SelectionSlider(options=[0.0, 0.1, 0.3, 1.0], value=v["noise"], description="noise",
                                       continuous_update=False, layout=wide, style=style),
            "lora_rank": w.SelectionSlider(options=[1, 2, 4, 8, 16], value=v["lora_rank"], description="LoRA rank",
                                           continuous_update=False, layout=wide, style=style),
            "lr_ratio": w.SelectionSlider(options=[0.1, 0.3, 1.0, 3.0, 10.0], value=v["lr_ratio"],
                                          description="lr_lora / lr_fft", continuous_update=False, layout=wide,
                                          style=style),
        }
        info, out = w.HTML(), w.Output()

        def redraw():
            r = self.result
            best = min(("fft", "lora", "dora"), key=lambda m: r["losses"][m])
            info.value = (f"<b>{LABELS[best]}</b> wins this cell; MoLF {r['losses']['molf'] * 1e3:.2f} vs best "
                          f"{r['losses'][best] * 1e3:.2f} (x1e3), FFT share {r['fft_share']:.0%}; retrained in "
                          f"{r['seconds']:.1f} s")
            plots.show_in(out, self.frame())

        def retrain(*_):
            self.retrain(**{k: c.value for k, c in controls.items()})
            redraw()

        for control in controls.values():
            control.observe(retrain, names="value")
        redraw()
        box = w.VBox([w.HTML("<b>Classroom</b>: move a slider; every method retrains on this cell and the picture "
                             "redraws"),
                      w.HBox([controls["shift_rank"], controls["examples"], controls["noise"]]),
                      w.HBox([controls["lora_rank"], controls["lr_ratio"]]), info, out])
        self._widgets = {"box": box, "info": info, "out": out, **controls}
        return box
