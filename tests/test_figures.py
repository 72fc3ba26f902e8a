"""Figures a biologist reads without help: what each figure must say, checked on the figure itself (its axes, labels
and ticks), with known answers."""

import numpy as np
import pandas as pd
import pytest

from scdino.cells.source import CropStoreSource, PlateSource
from scdino.engine import plots
from scdino.engine.attention import row_title
from scdino.engine.evaluate import EvalSettings, Grid, input_sizes_text, write_report
from scdino.engine.plate_view import profile_map


def test_confusion_matrix_has_a_colour_bar_and_says_rows_are_normalised(tmp_path):
    cm = np.array([[40, 8, 2], [5, 30, 15], [0, 3, 47]])
    fig = plots.confusion_png(cm, ["G1", "S", "G2/M"], str(tmp_path / "c.png"), "k-NN")
    assert len(fig.axes) == 2  # the matrix and its colour bar
    assert "share of the true class" in fig.axes[1].get_ylabel()
    assert "rows normalised" in fig.axes[0].get_title()
    shown = fig.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(shown[1], [0.1, 0.6, 0.3])  # 5, 30, 15 of 50 cells


@pytest.mark.parametrize(("epochs", "ticks"), [([2], [2]), ([0, 10, 20, 30], [0, 10, 20, 30])])
def test_epoch_axis_shows_whole_epochs(tmp_path, epochs, ticks):
    fig = plots.epochs_png(epochs, [0.7] * len(epochs), str(tmp_path / "e.png"), {"untrained": 0.5})
    assert fig.axes[0].get_xticks().tolist() == ticks  # was 1.900 .. 2.100 for one epoch
    many = plots.epochs_png(list(range(40)), [0.7] * 40, str(tmp_path / "m.png"))
    assert all(float(t).is_integer() for t in many.axes[0].get_xticks())


def test_profile_map_axes_say_the_explained_variance(tmp_path):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16)) + np.repeat(np.arange(4), 2)[:, None] * rng.normal(size=16)
    xy, how, (xl, yl) = profile_map(x)
    z = (x - x.mean(0)) / x.std(0)
    ratio = PCA(2).fit(z).explained_variance_ratio_
    assert xl == f"PC 1 ({100 * ratio[0]:.1f}% of variance)" and yl == f"PC 2 ({100 * ratio[1]:.1f}% of variance)"
    assert "PCA" in how
    fig = plots.scatter_labels_png(xy, ["a"] * 8, [f"A0{i}" for i in range(8)], str(tmp_path / "m.png"), how, (xl, yl))
    assert fig.axes[0].get_xlabel() == xl and fig.axes[0].get_ylabel() == yl


def test_attention_panels_are_equal_and_rows_are_named(tmp_path):
    rng = np.random.default_rng(0)
    crops = rng.integers(100, 4000, size=(3, 2, 16, 16)).astype(np.uint16)
    att = rng.random((3, 4, 16, 16))
    fig = plots.attention_png(crops, att, ["a", "b", "c"], ["DNA", "BF"], str(tmp_path / "a.png"))
    panels = [ax for ax in fig.axes if len(ax.get_images()) and ax.get_images()[0].get_array().shape == (16, 16)]
    assert len(panels) == 3 * (2 + 4 + 1)
    widths = [ax.get_position().width for ax in panels]
    assert max(widths) == pytest.approx(min(widths), rel=0.01)  # the last head no longer squeezed by its colour bar
    assert fig._suptitle.get_fontsize() >= 9
    plate = pd.Series({"well": "B/3", "field": "0", "label": 17, "class": "G1"})
    assert row_title(PlateSource.title(plate), plate, "class") == "class G1\nwell B/3, field 0\ncell 17"
    crop = pd.Series({"path": "G2/cell_000123.tif", "class": "G2"})
    assert row_title(CropStoreSource.title(crop), crop) == "cell_000123.tif"
    long = pd.Series({"path": "G2/a_very_long_file_name_of_a_cell_000123.tif"})
    assert CropStoreSource.title(long) == "a_very_lon..._000123.tif"  # 24 characters, the middle cut out


def test_evaluation_report_names_the_input_size(tmp_path):
    assert input_sizes_text({"default": 224, "untrained vit_small16": 224}, None) == "input 224 px (the models' own)"
    assert input_sizes_text({"a": 224, "b": 112}, None) == "input 224 px (a), 112 px (b)"
    grid = Grid(["DNA"], ["default", "raw pixels"], np.array([[0.8, 0.5]]), classes=["G1", "S"], n_cells=10)
    grid.input_sizes = {"default": 224}
    write_report(tmp_path, "crops.zarr", grid, EvalSettings())
    text = (tmp_path / "report.md").read_text()
    assert "None" not in text and "input 224 px (the models' own)" in text
