"""The evaluation's figures (effnet_exp/reporting/eval_plots.py): the numbers behind them against hand-built
matrices and bins, and the PNGs as files (written whole or not at all, readable, the mistakes' images in them)."""
import collections
import os

import numpy as np
import pytest
from PIL import Image

from effnet_exp.reporting import eval_plots

Bins = collections.namedtuple("Bins", "edges accuracy confidence count")

# Rows true, columns predicted. Off-diagonal (true -> predicted): 0->1 once, 1->0 twice, 3->0 four times, 3->2 once,
# 4->1 once.
HAND = np.array([[5, 1, 0, 0, 0],
                 [2, 3, 0, 0, 0],
                 [0, 0, 7, 0, 0],
                 [4, 0, 1, 2, 0],
                 [0, 1, 0, 0, 0]])
# Errors per class (row off-diagonal + column off-diagonal), by hand:
# 0: row 1 + column (2 + 4) = 7; 1: row 2 + column (1 + 1) = 4; 2: row 0 + column 1 = 1; 3: row 5 + column 0 = 5;
# 4: row 1 + column 0 = 1.
HAND_ERRORS = [7, 4, 1, 5, 1]


def test_row_normalised_divides_by_support_and_keeps_empty_rows_zero():
    matrix = eval_plots.row_normalised([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    np.testing.assert_allclose(matrix, [[5 / 6., 1 / 6., 0], [0.4, 0.6, 0], [0, 0, 0]], rtol=0, atol=1e-15)


def test_class_errors_count_each_class_row_and_column():
    assert list(eval_plots.class_errors(HAND)) == HAND_ERRORS


def test_worst_classes_most_errors_first_ties_by_index():
    assert eval_plots.worst_classes(HAND, 3) == [0, 3, 1]
    assert eval_plots.worst_classes(HAND, 5) == [0, 3, 1, 2, 4]  # 2 and 4 tie at 1 error
    assert eval_plots.worst_classes(np.diag([3, 4, 5]), 40) == []  # no errors, no class


def test_top_confusions_are_off_diagonal_pairs_most_first():
    assert eval_plots.top_confusions(HAND, 3) == [(3, 0, 4), (1, 0, 2), (0, 1, 1)]
    assert eval_plots.top_confusions(HAND, 20) == [(3, 0, 4), (1, 0, 2), (0, 1, 1), (3, 2, 1), (4, 1, 1)]
    assert eval_plots.top_confusions(np.diag([3, 4]), 20) == []


def test_up_to_40_classes_all_shown_above_the_worst_40():
    forty = np.eye(40, dtype=int) * 3
    assert eval_plots.classes_shown(forty) == (list(range(40)), "all 40 classes")
    big = np.eye(45, dtype=int) * 10
    for c in range(44):  # class c's images go to class c + 1: once for c < 40, c + 2 times from 40 on
        big[c, c + 1] = 1 if c < 40 else c + 2
    # Errors (row + column) by hand: class 0: 1; 1..39: 2; 40: 42 + 1; 41: 43 + 42; 42: 44 + 43; 43: 45 + 44;
    # 44: 0 + 45. The 40 with the most: 40..44, then 35 of the 39 tied at 2, the lowest indices: 1..35.
    shown, title = eval_plots.classes_shown(big)
    assert shown == list(range(1, 36)) + list(range(40, 45))
    assert title == "the 40 classes with the most errors of 45"


def test_filled_bins_leave_out_the_empty_ones():
    bins = Bins(edges=[0.0, 0.25, 0.5, 0.75, 1.0], accuracy=[float("nan"), 0.5, float("nan"), 0.9],
                confidence=[float("nan"), 0.4, float("nan"), 0.85], count=[0, 4, 0, 10])
    left, width, centre, accuracy, confidence = eval_plots.filled_bins(bins)
    np.testing.assert_array_equal(left, [0.25, 0.75])
    np.testing.assert_array_equal(width, [0.25, 0.25])
    np.testing.assert_array_equal(centre, [0.375, 0.875])
    np.testing.assert_array_equal(accuracy, [0.5, 0.9])
    np.testing.assert_array_equal(confidence, [0.4, 0.85])


@pytest.mark.parametrize("count, shape", [(0, (0, 0)), (1, (1, 1)), (6, (1, 6)), (7, (2, 6)), (24, (4, 6))])
def test_mistake_grid_is_six_wide(count, shape):
    assert eval_plots.grid_shape(count) == shape


def test_captions_name_both_classes_and_the_probability():
    assert eval_plots.caption("cat", "dog", 0.934) == "true: cat\npred: dog\np = 0.93"
    assert eval_plots.MAX_NAME == 24
    text = eval_plots.caption("American Staffordshire terrier", "abcdefghijklmnopqrstuvwxyz", 1.0)
    assert text == u"true: American Staffordshire\u2026\npred: abcdefghijklmnopqrstuvw\u2026\np = 1.00"
    assert eval_plots.short_name("abcdefghijklmnopqrstuvwx") == "abcdefghijklmnopqrstuvwx"  # 24 fit


# --- the PNG files ---------------------------------------------------------------------------------------------

def png(path):
    image = Image.open(path)
    image.load()
    return image


def test_confusion_png_small_and_large(tmp_path):
    small = eval_plots.confusion_png(str(tmp_path / "small.png"), HAND, ["a", "b", "c", "d", "e"])
    rng = np.random.RandomState(0)
    many = rng.poisson(1.0, (45, 45)) + np.diag(rng.poisson(20, 45))
    large = eval_plots.confusion_png(str(tmp_path / "large.png"), many, ["class %d" % i for i in range(45)])
    assert small == str(tmp_path / "small.png") and large == str(tmp_path / "large.png")
    small_image, large_image = png(small), png(large)
    assert small_image.format == "PNG" and small_image.mode == "RGBA"
    # The large one has the second panel (the most frequent pairs) beside its matrix.
    assert large_image.size[0] > 2 * small_image.size[0]
    assert sorted(os.listdir(str(tmp_path))) == ["large.png", "small.png"]  # no temporary files left


def test_reliability_png(tmp_path):
    bins = Bins(edges=np.linspace(0, 1, 16), accuracy=np.r_[[np.nan] * 5, np.linspace(0.3, 0.9, 10)],
                confidence=np.r_[[np.nan] * 5, np.linspace(0.35, 0.97, 10)], count=np.r_[[0] * 5, np.arange(1, 11)])
    path = eval_plots.reliability_png(str(tmp_path / "reliability.png"), bins, 0.0423)
    assert path == str(tmp_path / "reliability.png") and png(path).format == "PNG"


RED = (255, 0, 0)


def red_pixels(path):
    pixels = np.asarray(png(path).convert("RGB")).reshape(-1, 3)
    return int(np.sum(np.all(pixels == RED, axis=1)))


def test_mistakes_png_draws_the_images_themselves(tmp_path):
    images = np.zeros((7, 16, 16, 3), np.uint8)
    images[3] = RED  # one pure red image among black ones
    path = eval_plots.mistakes_png(str(tmp_path / "mistakes.png"), images, ["cat"] * 7, ["dog"] * 7,
                                   np.linspace(0.9, 0.6, 7))
    three = eval_plots.mistakes_png(str(tmp_path / "three.png"), images[:3], ["cat"] * 3, ["dog"] * 3, [0.9] * 3)
    # The red square fills most of a grid cell (about 2 inches at 100 dpi); the first three images are black.
    assert red_pixels(path) > 100 * 100 and red_pixels(three) == 0
    assert png(path).size[1] > png(three).size[1]  # 7 images: two rows, 3 images: one


def test_no_mistakes_writes_a_figure_saying_so(tmp_path):
    """An evaluation without mistakes replaces the mistakes.png of an earlier evaluation of the run."""
    path = str(tmp_path / "mistakes.png")
    images = np.zeros((1, 8, 8, 3), np.uint8)
    images[0] = RED
    eval_plots.mistakes_png(path, images, ["cat"], ["dog"], [0.9])
    assert red_pixels(path) > 0
    assert eval_plots.mistakes_png(path, np.zeros((0, 8, 8, 3), np.uint8), [], [], []) == path
    assert red_pixels(path) == 0 and png(path).format == "PNG"


def test_a_failed_drawing_leaves_the_previous_file(tmp_path):
    path = tmp_path / "mistakes.png"
    path.write_bytes(b"the previous figure")
    with pytest.raises(IndexError):  # two images, one caption
        eval_plots.mistakes_png(str(path), np.zeros((2, 8, 8, 3), np.uint8), ["cat"], ["dog"], [0.9])
    assert path.read_bytes() == b"the previous figure"
    assert os.listdir(str(tmp_path)) == ["mistakes.png"]


def test_without_matplotlib_nothing_is_drawn(tmp_path, monkeypatch):
    def no_matplotlib():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(eval_plots, "matplotlib", no_matplotlib)
    bins = Bins([0.0, 1.0], [0.5], [0.6], [2])
    assert eval_plots.confusion_png(str(tmp_path / "c.png"), HAND, list("abcde")) is None
    assert eval_plots.reliability_png(str(tmp_path / "r.png"), bins, 0.1) is None
    assert eval_plots.mistakes_png(str(tmp_path / "m.png"), np.zeros((1, 8, 8, 3), np.uint8), ["a"], ["b"], [1.0]) \
        is None
    assert os.listdir(str(tmp_path)) == []
