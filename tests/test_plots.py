"""``molf.lab.plots``: one expert palette (FFT red, LoRA experts blues, skipped grey) in every figure, and
module-type or run lines that never borrow an expert's red or blue."""

import colorsys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex, to_rgb  # noqa: E402
from test_runs import write_run  # noqa: E402

from molf.lab import analysis, plots, runs  # noqa: E402


def hue_saturation(color) -> tuple[float, float]:
    h, _l, s = colorsys.rgb_to_hls(*to_rgb(color))
    return h * 360, s


def hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 360 - abs(a - b))


RED = hue_saturation(plots.EXPERT_COLORS["fft"])[0]
BLUES = [hue_saturation(c)[0] for c in plots.LORA_BLUES]


def test_expert_palette():
    assert plots.expert_color("fft") == "#d62728"
    lora = [plots.expert_color(f"lora{i}") for i in range(len(plots.LORA_BLUES))]
    assert len(set(lora)) == len(lora)                                   # each LoRA expert its own shade
    for color in lora:
        assert 190 <= hue_saturation(color)[0] <= 240                     # ... of blue
    assert plots.expert_color(f"lora{len(plots.LORA_BLUES)}") == lora[0]   # more experts cycle the blues
    assert hue_saturation(plots.expert_color("skipped"))[1] == 0          # grey
    assert plots.expert_color("several") not in {plots.expert_color("fft"), *lora}
    for bad in ("q_proj", "lora", "lorax", "FFT"):
        with pytest.raises(ValueError, match="experts are 'fft' and 'lora<i>'"):
            plots.expert_color(bad)


@pytest.mark.parametrize("color", [*plots.MODULE_TYPE_COLORS.values(), *plots.LINE_COLORS],
                         ids=lambda c: c)
def test_module_type_and_run_lines_are_neither_red_nor_blue_nor_grey(color):
    hue, saturation = hue_saturation(color)
    assert hue_distance(hue, RED) > 20 and all(hue_distance(hue, b) > 25 for b in BLUES)
    assert saturation > 0.3
    assert color not in plots.EXPERT_COLORS.values()


def test_every_module_type_has_its_own_colour():
    assert set(plots.MODULE_TYPE_COLORS) == set(analysis.MODULE_TYPES)
    assert len(set(plots.MODULE_TYPE_COLORS.values())) == len(analysis.MODULE_TYPES)
    assert plots.module_type_color("c_attn", 0) in plots.LINE_COLORS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.load(write_run(tmp_path_factory.mktemp("run") / "molf"))


def _lines_by_label(ax) -> dict[str, str]:
    return {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()}


def test_expert_figures_use_the_palette(data):
    config = data.config
    experts = analysis.experts_of(data)
    want = {plots.expert_label(e, config): plots.expert_color(e) for e in experts}

    fig = plots.score_traces(data, n=2)
    for ax in fig.axes:
        assert {k: v for k, v in _lines_by_label(ax).items() if not k.startswith("_")} == want
    plt.close(fig)

    fig = plots.routing_summary_bars(data)
    bars = {c.get_label(): to_hex(c.patches[0].get_facecolor()) for c in fig.axes[0].containers}
    assert bars == want
    fig.canvas.draw()   # the legend sits right of the bars, outside the axes: it cannot hide a bar
    legend = fig.axes[0].get_legend().get_window_extent()
    assert legend.x0 >= fig.axes[0].get_window_extent().x1
    plt.close(fig)

    fig = plots.grad_norm_plot(data)
    assert _lines_by_label(fig.axes[1]) == want
    plt.close(fig)


def test_module_type_lines_use_their_own_colours(data):
    fig = plots.win_fraction_over_time(data, windows=2)
    lines = _lines_by_label(fig.axes[0])
    types = sorted(data.routing["module_type"].unique())
    assert {t: lines[plots.short_type(t)] for t in types} == {t: plots.MODULE_TYPE_COLORS[t] for t in types}
    plt.close(fig)

    # a run with one expert (LoRA): the gradient panel draws one line per module type
    one_expert = runs.RunData(data.path, {**data.config, "method": "lora"}, data.metrics, data.steps,
                              data.grad_norms[data.grad_norms["expert"] == "lora0"], None)
    fig = plots.grad_norm_plot(one_expert)
    lines = _lines_by_label(fig.axes[1])
    assert {t: lines[plots.short_type(t)] for t in types} == {t: plots.MODULE_TYPE_COLORS[t] for t in types}
    plt.close(fig)


def test_run_lines_avoid_the_expert_colours(data):
    curves = {f"seed {i}": analysis.agreement_with_final(data) for i in range(4)}
    fig = plots.agreement_plot(curves)
    assert list(_lines_by_label(fig.axes[0]).values()) == list(plots.LINE_COLORS[:4])
    plt.close(fig)


def test_thirty_layer_maps_label_every_fifth_layer_and_legends_sit_beside_the_bars():
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from molf.lab import plots as p
    types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    fig, ax = plt.subplots()
    p._draw_grid(ax, pd.DataFrame(np.full((30, 7), 0.5), index=range(30), columns=types), p.WIN_CMAP, 0, 1, None)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "5", "10", "15", "20", "25", "29"]
    assert list(ax.get_yticks()[:2]) == [0.5, 5.5]
    plt.close(fig)
    fig, ax = plt.subplots()
    p._draw_grid(ax, pd.DataFrame(np.full((4, 7), 0.5), index=range(4), columns=types), p.WIN_CMAP, 0, 1, None)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    plt.close(fig)


def test_the_takeaway_states_this_runs_numbers(data):
    from molf.lab import analysis
    text = analysis.takeaway(data)
    table = analysis.win_table(data, "fft")
    by_type = table.groupby("module_type")["win_fraction"].mean()
    share = analysis.overall_win_share(data)["fft"]
    assert f"won **{share:.0%}** of all module decisions" in text
    assert f"most in `{by_type.idxmax()}`" in text and f"(**{by_type.max():.0%}** of their steps" in text
    assert f"least in `{by_type.idxmin()}`" in text and f"(**{by_type.min():.0%}**)" in text
    assert f"({data.routing['step'].nunique()} steps)" in text
