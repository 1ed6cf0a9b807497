"""mode=predict: top-k classes for image files, one result (or one error) per file, in the order given."""
import logging
import os

import numpy as np
import tensorflow as tf

from effnet_exp import interrupts
from effnet_exp.data.diagnostics import bad_data_message
from effnet_exp.data.folder import image_problem
from effnet_exp.data.preprocessing import normalize, preprocess_for_eval
from effnet_exp.inference.artifacts import open_model
from effnet_exp.run_folder import atomic_write_json, predictions_path

log = logging.getLogger(__name__)


class Predictor(object):
    def __init__(self, model_cfg, image_size, normalization, crop_padding, class_names, session_config, threads=0):
        self.model_cfg = model_cfg
        self.image_size = image_size
        self.normalization = normalization
        self.crop_padding = crop_padding
        self.class_names = class_names
        self.session_config = session_config
        self.threads = threads

    def predict(self, checkpoint, paths, top_k=5, use_ema=True):
        top_k = min(top_k, self.model_cfg.num_classes)
        graph = tf.Graph()
        with graph.as_default():
            # One file's bytes per call: inference on user files, not the training input pipeline.
            image_bytes = tf.compat.v1.placeholder(tf.string, shape=[], name="image_bytes")
            image = preprocess_for_eval(image_bytes, self.image_size, crop_padding=self.crop_padding)
            images = tf.expand_dims(normalize(image, self.normalization), 0)
            # A checkpoint, or an exported artifact (.pb, saved_model/, .tflite).
            model = open_model(checkpoint, self.model_cfg, use_ema, self.threads)
            probs, indices = tf.nn.top_k(tf.exp(model.log_probabilities(images))[0], k=top_k)
        graph.finalize()
        results = []
        with tf.compat.v1.Session(graph=graph, config=self.session_config) as sess:
            model.restore(sess)
            log.info("predicting with %s", model.describe())
            for path in paths:
                results.append(self._one(sess, image_bytes, probs, indices, path))
                interrupts.fault_point("predicting")
        return results

    def _one(self, sess, image_bytes, probs, indices, path):
        try:
            with open(os.path.expanduser(path), "rb") as f:
                data = f.read()
        except (IOError, OSError) as err:
            return {"image": path, "error": "cannot read {}: {}".format(path, err.strerror or err)}
        problem = image_problem(data)
        if problem:
            return {"image": path, "error": "{} {}".format(path, problem)}
        try:
            p, idx = sess.run([probs, indices], feed_dict={image_bytes: data})
        except tf.errors.OpError as err:
            # TF 2.x puts "Graph execution error:" first; prefer the pipeline's own one-line reason.
            reason = bad_data_message(err) or (err.message or str(err)).strip().splitlines()[-1]
            return {"image": path, "error": "cannot decode {} as an image: {}".format(path, reason)}
        return {"image": path, "top5": [
            {"index": int(i), "label": self._name(int(i)), "probability": float(q)}
            for i, q in zip(idx, np.asarray(p))]}

    def _name(self, index):
        if self.class_names and index < len(self.class_names):
            return self.class_names[index]
        return str(index)


def report(results, run_dir):
    """Writes predictions.json and prints each file's classes; returns the number of files that failed."""
    atomic_write_json(predictions_path(run_dir), results)
    failed = 0
    for result in results:
        if "error" in result:
            failed += 1
            print("{}: error: {}".format(result["image"], result["error"]))
            continue
        print(result["image"])
        for rank, item in enumerate(result["top5"], 1):
            print("  {}. {:<30s} {:.4f}  (class {})".format(rank, item["label"], item["probability"],
                                                          item["index"]))
    return failed
