"""The regime map's figures: the winner map, heat maps, routing over training."""
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .setting import LABELS

# ---------------------------------------------------------------------------- figures
WINNER_COLORS = {"fft": "#d62728", "lora": "#1f77b4", "dora": "#17becf"}   # the project's palette


def _grid(summary: pd.DataFrame, column: str, noise: float = 0.1) -> pd.DataFrame:
    part = summary[np.isclose(summary["noise"], noise)]
    return part.pivot(index="shift_rank", columns="examples", values=column).sort_index(ascending=False)


def winner_figure(summary: pd.DataFrame, noise: float = 0.1):
    """The winner of each cell among FFT, LoRA and DoRA (colour), its loss ratio to FFT / LoRA, and a
    star when it beats the runner-up significantly; the noise slice beside it."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    slice_ = summary[~np.isclose(summary["noise"], noise)]
    fig, axes = plt.subplots(1, 2 if len(slice_) else 1, figsize=(10 if len(slice_) else 6, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if len(slice_) else [1]})
    ax = axes[0, 0]
    main = summary[np.isclose(summary["noise"], noise)]
    ranks = sorted(main["shift_rank"].unique(), reverse=True)
    ns = sorted(main["examples"].unique())

    def draw(ax, rows, xs, ys, xkey, ykey):
        for r in rows.itertuples():
            x, y = xs.index(getattr(r, xkey)), ys.index(getattr(r, ykey))
            color = WINNER_COLORS.get(r.winner, "#999999")
            significant = r.winner_verdict == "reproduced"
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, color=color, alpha=0.85 if significant else 0.35))
            ratio = r.lora / r.fft
            ax.text(x, y, f"{LABELS[r.winner]}{' *' if significant else ''}\nLoRA/FFT {ratio:.2f}", ha="center",
                    va="center", fontsize=8, color="white" if significant else "black")
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_ylim(len(ys) - 0.5, -0.5)
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])

    draw(ax, main, ns, ranks, "examples", "shift_rank")
    ax.set_xlabel("training examples n")
    ax.set_ylabel("rank k of the weight shift")
    ax.set_title(f"Who wins (lowest held-out MSE), noise {noise:g}")
    if len(slice_):
        ax2 = axes[0, 1]
        both = pd.concat([summary[summary.set_index(["shift_rank", "examples"]).index.isin(
            slice_.set_index(["shift_rank", "examples"]).index) & np.isclose(summary["noise"], noise)], slice_])
        levels = sorted(both["noise"].unique())
        keys = sorted(both["shift_rank"].unique(), reverse=True)
        draw(ax2, both, levels, keys, "noise", "shift_rank")
        ax2.set_xlabel("label noise (x the outputs' RMS)")
        ax2.set_ylabel("rank k of the weight shift")
        ax2.set_title(f"Noise slice, n={int(both['examples'].iloc[0])}")
    fig.legend(handles=[Patch(color=c, label=LABELS[m]) for m, c in WINNER_COLORS.items()]
               + [Patch(color="#cccccc", label="pale: not significant")], loc="lower center", ncol=4,
               bbox_to_anchor=(0.5, -0.06), frameon=False)
    fig.tight_layout()
    return fig


def heat_figure(summary: pd.DataFrame, columns: Sequence[str], titles: Sequence[str], label: str,
                fmt: str = "{:+.0%}", vmin=None, vmax=None, cmap: str = "Reds", noise: float = 0.1):
    """Heatmaps of summary columns over shift rank x examples (one panel per column)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.8), squeeze=False)
    for ax, column, title in zip(axes[0], columns, titles):
        grid = _grid(summary, column, noise)
        image = ax.imshow(grid.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
        ax.set_xlabel("training examples n")
        ax.set_ylabel("rank k of the weight shift")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    return fig


def routing_figure(curves: pd.DataFrame):
    """FFT share of MoLF's decisions per step in each cell of ``routing_curves``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    styles = ["-", "--", ":", "-."]
    for i, (cell, part) in enumerate(curves.groupby("cell", sort=False)):
        ax.plot(part["step"], part["fft_share"], color="#d62728", ls=styles[i % 4], lw=1.8, label=cell)
    ax.axhline(0.5, color="#999999", lw=0.8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of decisions won by FFT (fraction)")
    ax.set_title("MoLF's routing over training (mean over modules and seeds)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
