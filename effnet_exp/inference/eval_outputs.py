"""The files of an evaluation in the run folder, each written whole or not at all: confusion.csv, predictions.jsonl
(eval.save_predictions), eval.json and the TensorBoard eval run's numbers at once; the figures (confusion.png,
reliability.png, mistakes.png) and the confusion image in TensorBoard in the background (reporting.drawing), so
the run goes on while they are drawn. A figure that cannot be drawn, e.g. without matplotlib, is logged and left
out."""
import csv
import io
import itertools
import json
import logging
import os
import struct

import tensorflow as tf

from effnet_exp import run_folder
from effnet_exp.inference.eval_metrics import calibration_error, reliability_bins
from effnet_exp.reporting import drawing
from effnet_exp.reporting.eval_plots import confusion_png, mistakes_png, reliability_png
from effnet_exp.training.summaries import write_scalars

log = logging.getLogger(__name__)

_WRITERS = itertools.count()

# eval.json's numbers that go to TensorBoard's eval run, besides the per-class recall.
SCALARS = ("top1", "top5", "loss", "balanced_accuracy", "macro_f1", "nll", "ece")


def write_outputs(run_dir, result, confusion, arrays, class_names, sources=None, mistakes=None):
    """result: eval.json's fields; arrays: the EvalArrays; sources: one per image for predictions.jsonl (None:
    not written); mistakes: (indices, uint8 images) of the images for mistakes.png, most confident first (none
    kept: a figure saying so; None: not drawn)."""
    run_folder.atomic_write_text(os.path.join(run_dir, run_folder.CONFUSION_CSV),
                                 confusion_csv(confusion, class_names))
    if sources is not None:
        run_folder.atomic_write_text(os.path.join(run_dir, run_folder.EVAL_PREDICTIONS),
                                     predictions_jsonl(arrays, sources))
    run_folder.atomic_write_json(run_folder.eval_path(run_dir), result)
    step = result["step"] or 0
    _write_tensorboard(run_dir, step, _scalars(result))
    drawing.submit(("evaluation figures", run_dir), _figures, run_dir, step, confusion, arrays, class_names, mistakes)


def confusion_csv(confusion, class_names):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([""] + list(class_names))
    for name, row in zip(class_names, confusion):
        writer.writerow([name] + [int(v) for v in row])
    return out.getvalue()


def predictions_jsonl(arrays, sources):
    """One line per image in eval order: index, source, label, the true class's probability, top-5."""
    lines = []
    for index, source in enumerate(sources):
        top = [{"index": int(c), "probability": float(p)}
               for c, p in zip(arrays.top_index[index], arrays.top_probability[index])]
        lines.append(json.dumps({"index": index, "source": source, "label": int(arrays.labels[index]),
                                 "label_probability": float(arrays.label_probability[index]), "top5": top}))
    return "\n".join(lines) + "\n"


def _draw(path, draw, *args):
    """draw(path, *args) (it returns None without matplotlib); whether it drew. A failure is logged: the
    evaluation's numbers matter more."""
    try:
        return draw(path, *args) is not None
    except Exception as err:  # matplotlib broken, disk full
        log.warning("could not draw %s: %s: %s", path, type(err).__name__, err)
        return False


def _figures(run_dir, step, confusion, arrays, class_names, mistakes):
    """Draws the evaluation's figures, then adds the confusion figure to TensorBoard's eval run."""
    if _draw_figures(run_dir, confusion, arrays, class_names, mistakes)[run_folder.CONFUSION_PNG]:
        _write_tensorboard(run_dir, step, image=os.path.join(run_dir, run_folder.CONFUSION_PNG))


def _draw_figures(run_dir, confusion, arrays, class_names, mistakes):
    """{file name: drawn} of the evaluation's figures."""
    confidence = arrays.top_probability[:, 0]
    bins = reliability_bins(confidence, arrays.top_index[:, 0] == arrays.labels)
    drawn = {
        run_folder.CONFUSION_PNG: _draw(os.path.join(run_dir, run_folder.CONFUSION_PNG), confusion_png, confusion,
                                        class_names),
        run_folder.RELIABILITY_PNG: _draw(os.path.join(run_dir, run_folder.RELIABILITY_PNG), reliability_png, bins,
                                          calibration_error(bins))}
    if mistakes is not None:
        indices, images = mistakes
        true_names = [class_names[c] for c in arrays.labels[indices]]
        predicted_names = [class_names[c] for c in arrays.top_index[indices, 0]]
        drawn[run_folder.MISTAKES_PNG] = _draw(os.path.join(run_dir, run_folder.MISTAKES_PNG), mistakes_png, images,
                                               true_names, predicted_names, confidence[indices])
    return drawn


def _scalars(result):
    """SCALARS and the per-class recall (recall/<class name>)."""
    scalars = {k: result[k] for k in SCALARS}
    scalars.update(("recall/" + entry["name"], entry["recall"]) for entry in result["per_class"])
    return scalars


def _write_tensorboard(run_dir, step, scalars=None, image=None):
    """Adds scalars and the confusion figure (a PNG file) to the eval run at step. Each call writes its own
    events file: the name TensorFlow gives one has only the second in it, and a second writer within that
    second (the figure's, drawn in the background) would replace the first's file."""
    with tf.Graph().as_default():
        writer = tf.compat.v1.summary.FileWriter(run_folder.tensorboard_dir(run_dir, "eval"),
                                                 filename_suffix=".{}.{}".format(os.getpid(), next(_WRITERS)))
        try:
            if scalars:
                write_scalars(writer, step, scalars)
            if image and os.path.isfile(image):
                writer.add_summary(_image_summary("confusion", image), step)
                writer.flush()
        finally:
            writer.close()


def _image_summary(tag, png_path):
    """A Summary holding the PNG file as an image (its size and colour type read from its header)."""
    with open(png_path, "rb") as f:
        data = f.read()
    width, height = struct.unpack(">II", data[16:24])
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(data[25], 4)  # PNG colour type: grey, RGB, grey + alpha, RGBA
    image = tf.compat.v1.Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
    return tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag=tag, image=image)])
