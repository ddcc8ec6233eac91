"""The figures name every setting in full, inside the figure, one panel per router (or dtype)."""
import json

import matplotlib.pyplot as plt
import pytest

from detmoe.lab.plot import (FIGURES, draw_by_batch_size, draw_causes, draw_heatmap, draw_margins, plot_run,
                      setting_label)
from tests.lab.fake_cells import factorial_cells


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def labels_inside_figure(fig, labels) -> bool:
    fig.canvas.draw()
    box = fig.bbox
    renderer = fig.canvas.get_renderer()
    return all(box.x0 - 1 <= (e := t.get_window_extent(renderer)).x0 and e.x1 <= box.x1 + 1 for t in labels)


@pytest.mark.parametrize("draw, axis, sep", [(draw_causes, "y", ", "), (draw_heatmap, "x", "\n")])
def test_setting_labels_are_whole_and_inside_the_figure(draw, axis, sep):
    cells = factorial_cells()
    fig = draw(cells)
    ax = visible_axes(fig)[0]
    ticks = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == list(dict.fromkeys(setting_label(c, sep) for c in cells))
    assert "batch_invariant kernels" + sep + "scatter_add combine" + sep + "float32" in [t.get_text() for t in ticks]
    assert "torch kernels" + sep + "ordered combine" + sep + "bfloat16" + sep + "48 probes" in [t.get_text() for t in ticks]
    assert labels_inside_figure(fig, ticks)
    plt.close(fig)


def test_cause_figure_has_a_panel_per_router_with_the_divergent_fraction():
    cells = factorial_cells()
    fig = draw_causes(cells)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["topk router", "capacity router"]
    # each bar's stacked length is the fraction of tokens that differ, and a zero bar says so in words
    topk = axes[0]
    texts = [t.get_text() for t in topk.texts]
    assert texts[2] == "0: none differ" and texts[0] == f"{cells[0]['frac_logits_differ']:.2f}"
    assert "not run" in [t.get_text() for t in axes[1].texts]   # capacity has no bf16 cell
    legend = fig.legends[0].get_texts()
    assert any(t.get_text().startswith("amplified") and "4 tokens" in t.get_text() for t in legend)
    plt.close(fig)


def test_batch_size_figure_has_a_panel_per_router_and_one_legend():
    cells = factorial_cells()
    fig = draw_by_batch_size(cells)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["topk router", "capacity router"]
    assert all(ax.get_legend() is None for ax in axes)
    entries = [t.get_text() for t in fig.legends[0].get_texts()]
    assert entries == list(dict.fromkeys(setting_label(c) for c in cells))
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1", "4", "16"]
    plt.close(fig)


def test_margin_figure_has_a_panel_per_dtype_of_the_stock_cells():
    fig = draw_margins(factorial_cells())
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["float32, stock kernels: 4 cells", "bfloat16, stock kernels: 1 cell"]
    f32, bf16 = ([t.get_text() for t in ax.get_legend().get_texts()] for ax in axes)
    assert "primary flips: none" in f32
    assert "primary flips: 2, largest margin 1.3e-03" in bf16
    assert any(t.startswith("ties (margin <= 0)") for t in bf16)
    plt.close(fig)


def test_plot_run_draws_every_figure_from_a_run_directory(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(dict(cells=factorial_cells())))
    assert [p.name for p in plot_run(tmp_path)] == list(FIGURES)
    assert all((tmp_path / name).stat().st_size > 0 for name in FIGURES)
