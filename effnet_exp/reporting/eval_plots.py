"""The evaluation's figures in a run folder: confusion.png, reliability.png and mistakes.png.

Each draw function renders the whole PNG in memory and then replaces the file in one step (plots.save_png), so an
interrupted evaluation leaves the previous figure or none, never half of one. Each returns the path written, or
None when matplotlib cannot be imported (logged; the evaluation's numbers matter more than its pictures). The
data-preparation functions (worst_classes, top_confusions, ...) are separate so they can be tested on numbers.
"""
import io
import logging

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from effnet_exp.optional import matplotlib
from effnet_exp.reporting.plots import new_figure, save_png
from effnet_exp.run_folder import atomic_write_bytes

log = logging.getLogger(__name__)

MAX_MATRIX_CLASSES = 40  # above this, the matrix shows only the classes with the most errors
TOP_PAIRS = 20
MAX_NAME = 24  # characters of a class name in tick labels and captions
MISTAKE_COLUMNS = 6
MIN_CELL = 160  # pixels: a grid image at least this tall (enlarged by a whole factor)
CAPTION_FONT = 12  # pixels
LINE = 15  # pixels per caption line
GAP = 8
TITLE = 28
ARROW = u"\u2192"


# --- data preparation (numbers only) ------------------------------------------------------------------------

def row_normalised(confusion):
    """Each row divided by its sum (the true class's support); a class without images keeps a row of zeros."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, support, out=np.zeros_like(confusion), where=support > 0)


def class_errors(confusion):
    """Per class: its off-diagonal counts in its row (its images predicted as another class) plus its column
    (other classes' images predicted as it)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    off = confusion - np.diag(np.diag(confusion))
    return off.sum(axis=1) + off.sum(axis=0)


def worst_classes(confusion, n):
    """The indices of up to n classes with the most errors (class_errors), most first, ties by class index;
    classes without errors are left out."""
    errors = class_errors(confusion)
    order = sorted(np.flatnonzero(errors > 0), key=lambda c: (-errors[c], c))
    return [int(c) for c in order[:n]]


def top_confusions(confusion, n):
    """The n most frequent off-diagonal (true, predicted, count), most first, ties by (true, predicted)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    true, predicted = np.nonzero(confusion)
    pairs = [(int(t), int(p), int(confusion[t, p])) for t, p in zip(true, predicted) if t != p]
    return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))[:n]


def classes_shown(confusion):
    """(class indices in class order, title) of the matrix drawn: all classes up to MAX_MATRIX_CLASSES, else
    the ones with the most errors."""
    num_classes = len(confusion)
    if num_classes <= MAX_MATRIX_CLASSES:
        return list(range(num_classes)), "all {} classes".format(num_classes)
    shown = sorted(worst_classes(confusion, MAX_MATRIX_CLASSES))
    return shown, "the {} classes with the most errors of {}".format(len(shown), num_classes)


def filled_bins(bins):
    """(left edge, width, centre, accuracy, mean confidence) of the reliability bins that hold images."""
    edges = np.asarray(bins.edges, dtype=np.float64)
    full = np.asarray(bins.count) > 0
    left, width = edges[:-1], np.diff(edges)
    return (left[full], width[full], (left + width / 2)[full], np.asarray(bins.accuracy, dtype=np.float64)[full],
            np.asarray(bins.confidence, dtype=np.float64)[full])


def grid_shape(count, columns=MISTAKE_COLUMNS):
    """(rows, columns) of a grid of `count` images, at most `columns` wide."""
    return -(-count // columns), min(count, columns)


def short_name(name):
    name = str(name)
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 1].rstrip() + u"\u2026"


def caption(true_name, pred_name, probability):
    return u"true: {}\npred: {}\np = {:.2f}".format(short_name(true_name), short_name(pred_name), probability)


# --- drawing --------------------------------------------------------------------------------------------------

def _drawable(path):
    try:
        matplotlib()
    except ImportError as err:
        log.warning("%s not drawn: matplotlib cannot be imported (%s)", path, err)
        return False
    return True


def _message(axes, text):
    axes.axis("off")
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, transform=axes.transAxes)


def _matrix_panel(axes, confusion, shown, class_names):
    if not shown:
        _message(axes, "no errors: every image is on the diagonal")
        return None
    matrix = row_normalised(confusion)[np.ix_(shown, shown)]
    image = axes.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    names = [short_name(class_names[c]) for c in shown]
    size = 8 if len(shown) <= 20 else 6
    axes.set_xticks(range(len(shown)))
    axes.set_xticklabels(names, rotation=90, fontsize=size)
    axes.set_yticks(range(len(shown)))
    axes.set_yticklabels(names, fontsize=size)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(shown) <= 10:  # few cells: the fractions fit in them
        for (row, column), value in np.ndenumerate(matrix):
            axes.text(column, row, "{:.2f}".format(value), ha="center", va="center", fontsize=7,
                      color="white" if value > 0.5 else "black")
    return image


def _pairs_panel(axes, confusion, class_names):
    pairs = top_confusions(confusion, TOP_PAIRS)
    if not pairs:
        _message(axes, "no errors")
        return
    labels = [u"{} {} {}".format(short_name(class_names[t]), ARROW, short_name(class_names[p])) for t, p, _ in pairs]
    axes.barh(range(len(pairs)), [count for _, _, count in pairs], color="C3")
    axes.set_yticks(range(len(pairs)))
    axes.set_yticklabels(labels, fontsize=7)
    axes.invert_yaxis()  # the most frequent pair on top
    axes.set_xlabel("images")
    axes.set_title(u"the {} most frequent pairs, true {} predicted".format(len(pairs), ARROW), fontsize=9)


def confusion_png(path, confusion, class_names):
    """confusion.png: the row-normalised confusion matrix (confusion: counts [C, C], rows true, columns predicted)
    with class names on both axes; above MAX_MATRIX_CLASSES classes, the classes with the most errors and a
    second panel with the TOP_PAIRS most frequent (true -> predicted) pairs."""
    if not _drawable(path):
        return None
    confusion = np.asarray(confusion)
    shown, which = classes_shown(confusion)
    side = min(12.0, max(4.0, 2.5 + 0.22 * len(shown)))
    split = len(confusion) > MAX_MATRIX_CLASSES
    figure = new_figure(side + (7.0 if split else 1.5), side)
    axes = figure.add_subplot(1, 2, 1) if split else figure.add_subplot(1, 1, 1)
    image = _matrix_panel(axes, confusion, shown, class_names)
    if image is not None:
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02).set_label("fraction of the true class's images")
    if split:
        _pairs_panel(figure.add_subplot(1, 2, 2), confusion, class_names)
    figure.suptitle("confusion matrix, row-normalised: {} ({} images)".format(which, int(confusion.sum())),
                    fontsize=10)
    save_png(figure, path)
    return path


def reliability_png(path, bins, ece):
    """reliability.png: accuracy per top-1 confidence bin (bars) against the diagonal, each bin's mean confidence
    (markers) and its image count (lower panel); bins without images are left empty. bins: a namedtuple with
    edges [B+1], accuracy [B], confidence [B], count [B]."""
    if not _drawable(path):
        return None
    left, width, centre, accuracy, confidence = filled_bins(bins)
    edges, count = np.asarray(bins.edges, dtype=np.float64), np.asarray(bins.count)
    figure = new_figure(6, 7)
    grid = figure.add_gridspec(2, 1, height_ratios=[3, 1])
    top = figure.add_subplot(grid[0])
    top.bar(left, accuracy, width=width, align="edge", color="C0", edgecolor="black", alpha=0.8, label="accuracy")
    top.plot(centre, confidence, linestyle="none", marker="D", color="C3", label="mean confidence")
    top.plot([edges[0], edges[-1]], [edges[0], edges[-1]], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(edges[0], edges[-1])
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy in the bin")
    top.legend(loc="upper left", fontsize=8)
    bottom = figure.add_subplot(grid[1], sharex=top)
    bottom.bar(edges[:-1], count, width=np.diff(edges), align="edge", color="gray", edgecolor="black")
    for x, n in zip(centre, count[count > 0]):
        bottom.text(x, n, str(int(n)), ha="center", va="bottom", fontsize=6)
    bottom.set_ylim(0, max(1, count.max()) * 1.3)  # room for the numbers above the bars
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("images")
    bottom.yaxis.set_major_locator(matplotlib().MaxNLocator(integer=True))
    figure.suptitle("reliability: ECE = {:.4f} ({} bins, {} images)".format(ece, len(count), int(count.sum())),
                    fontsize=10)
    save_png(figure, path)
    return path


def mistakes_png(path, images, true_names, pred_names, probabilities):
    """mistakes.png: the images (uint8 [K, S, S, 3], as the model saw them, most confidently wrong first) in a
    grid of MISTAKE_COLUMNS, each captioned with its true and predicted class and the predicted probability.
    K = 0 writes a figure saying so, which replaces the mistakes of an earlier evaluation of the run. Composed
    with Pillow (matplotlib's font): a grid of images needs no axes, and matplotlib took 0.7 s for 24 of them."""
    if not _drawable(path):
        return None
    images = np.asarray(images, dtype=np.uint8)
    if len(true_names) != len(images) or len(pred_names) != len(images) or len(probabilities) != len(images):
        raise IndexError("{} images but {} / {} / {} captions".format(len(images), len(true_names), len(pred_names),
                                                                    len(probabilities)))
    font = ImageFont.truetype(matplotlib().font_file, CAPTION_FONT)
    if not len(images):
        return _save_pil(_text_canvas(u"no mistakes: every eval image was classified correctly", font), path)
    rows, columns = grid_shape(len(images))
    zoom = max(1, -(-MIN_CELL // images.shape[1]))  # small eval images enlarged, pixel for pixel
    cell_w, cell_h = images.shape[2] * zoom, images.shape[1] * zoom
    step_x, step_y = cell_w + GAP, cell_h + 3 * LINE + GAP
    canvas = Image.new("RGB", (GAP + columns * step_x, TITLE + rows * step_y), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, GAP), "the {} most confidently wrong eval images, as the model saw them".format(len(images)),
              fill="black", font=font)
    for index, image in enumerate(images):
        x, y = GAP + (index % columns) * step_x, TITLE + (index // columns) * step_y
        canvas.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        lines = caption(true_names[index], pred_names[index], probabilities[index]).split("\n")
        for number, line in enumerate(lines):
            draw.text((x, y + cell_h + 2 + number * LINE), _fit(line, font, cell_w), fill="black", font=font)
    return _save_pil(canvas, path)


def _fit(text, font, width):
    """text, shortened with an ellipsis until it fits in width pixels."""
    while len(text) > 1 and font.getlength(text) > width:
        text = text[:-2].rstrip() + u"\u2026"
    return text


def _text_canvas(text, font):
    canvas = Image.new("RGB", (int(font.getlength(text)) + 2 * GAP, TITLE + GAP), "white")
    ImageDraw.Draw(canvas).text((GAP, GAP), text, fill="black", font=font)
    return canvas


def _save_pil(image, path):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
