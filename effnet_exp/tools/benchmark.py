"""Training and inference throughput of our EfficientNet against Keras's, in one process (a benchmark).

    python -m effnet_exp.tools.benchmark [--model efficientnet_b0] [--batch-size 32] [--image-size 224]
                                         [--steps 10] [--rounds 3] [--json results.json] [--scaling]

Both sides get the same random batch already in memory, the same optimizer (SGD with Nesterov momentum
0.9), batch, resolution, thread settings and warm-up; the two sides take turns for --rounds rounds, and each
figure is the median over the rounds of the median over --steps timed steps.
Keras 3 runs only on the TF 2.x stack (keras.applications.EfficientNetB0..B7 for efficientnet_b0..b7,
EfficientNetV2B0..B3 / V2S / V2M / V2L for efficientnetv2_b0..b3 / s / m / l; weights=None).
The machine's float32 matrix-multiply rate is measured in the same rounds, timed the same way, in a session
with our model's thread settings; for B0 at 224x224 each throughput is also given as a fraction of that rate.
"""
import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import: no C++ start-up banner

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from effnet_exp.data.config import Builtin, DatasetConfig  # noqa: E402
from effnet_exp.data.pipeline import build_dataset  # noqa: E402
from effnet_exp.data.source import resolve_data_source  # noqa: E402
from effnet_exp.devices.base import Purpose  # noqa: E402
from effnet_exp.devices.config import CpuDeviceConfig  # noqa: E402
from effnet_exp.devices.factory import make_device  # noqa: E402
from effnet_exp.model.efficientnet import build_efficientnet  # noqa: E402
from effnet_exp import optional  # noqa: E402
from effnet_exp.model.pretrained.importer import load_model_config  # noqa: E402
from effnet_exp.training.metrics import cross_entropy  # noqa: E402

# FLOPs of one EfficientNet-B0 image at 224x224 (a multiply-add counts 2), for the fraction of the matmul rate.
# Eval (forward): model_flops() counts 0.79 GFLOP on our inference graph, 0.77 of them in the convolutions and
# the classifier (the paper's 0.39 B multiply-adds). Train ~= 3x forward: the backward pass computes the
# gradients of the activations and of the weights, each about one forward pass (TensorFlow's profiler counts
# 2.23 GFLOP on our gradient graph, plus 0.14 for the depthwise-convolution gradients it has no formula for).
B0_EVAL_GFLOP_PER_IMAGE = 0.78
B0_TRAIN_GFLOP_PER_IMAGE = 3 * B0_EVAL_GFLOP_PER_IMAGE


def median_rate(fn, units, steps, warmup):
    """units (images, FLOPs) per second of fn, which processes `units` per call: the median of `steps` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return units / float(np.median(times))


def model_config(name, image_size):
    return dataclasses.replace(load_model_config(name), image_size=image_size, pretrained=None)


def session_config(threads):
    intra, inter = threads
    device = make_device(CpuDeviceConfig(intra_op_threads=intra, inter_op_threads=inter))
    return device.session_config(Purpose.TRAIN)


def ours(model_name, batch, image_size, threads, xla_swish_grad=True):
    """{"train": step, "eval": step}: one call runs one training step or one forward pass of our graph-mode
    model on a batch held in variables (no feed, no host copy per step); the sessions stay open.
    xla_swish_grad: as device.xla_swish_grad (on by default for device=cpu)."""
    cfg = model_config(model_name, image_size)
    rng = np.random.RandomState(0)
    images_np = rng.uniform(-2, 2, (batch, image_size, image_size, 3)).astype(np.float32)
    labels_np = rng.randint(0, 1000, batch).astype(np.int32)
    steps = {}
    for training in (True, False):
        graph = tf.Graph()
        with graph.as_default():
            images = tf.compat.v1.get_variable("bench_images", initializer=images_np, trainable=False)
            labels = tf.compat.v1.get_variable("bench_labels", initializer=labels_np, trainable=False)
            logits, _ = build_efficientnet(images, cfg, is_training=training, xla_swish_grad=xla_swish_grad)
            if training:
                loss = cross_entropy(logits, labels, 1000)
                opt = tf.compat.v1.train.MomentumOptimizer(0.01, 0.9, use_nesterov=True)
                with tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):
                    op = opt.minimize(loss)
            else:
                op = logits
            init = tf.compat.v1.global_variables_initializer()
        sess = tf.compat.v1.Session(graph=graph, config=session_config(threads))
        sess.run(init)
        steps["train" if training else "eval"] = (lambda sess=sess, op=op: sess.run(op))
    return steps


def matmul_step(size, threads):
    """One call multiplies two size x size float32 matrices held in variables, in a session configured as
    ours(). The product is summed (size**2 more additions) so that Grappler cannot prune the multiply and no
    matrix is copied to the host."""

    rng = np.random.RandomState(0)
    graph = tf.Graph()
    with graph.as_default():
        a, b = (tf.compat.v1.get_variable(name, initializer=rng.uniform(-1, 1, (size, size)).astype(np.float32),
                                          trainable=False) for name in ("a", "b"))
        op = tf.reduce_sum(tf.matmul(a, b))
        init = tf.compat.v1.global_variables_initializer()
    sess = tf.compat.v1.Session(graph=graph, config=session_config(threads))
    sess.run(init)
    return lambda: sess.run(op)


def rates_in_rounds(sides, steps, warmup, rounds):
    """{side: {kind: units/s}} for sides = {side: (units per call, {kind: step})}: the sides take turns,
    round after round (so a slow spell of the machine hits all), each measurement the median of `steps` timed
    steps; the result is the median over the rounds."""
    measured = {side: {kind: [] for kind in fns} for side, (_, fns) in sides.items()}
    for _ in range(rounds):
        for side, (units, fns) in sides.items():
            for kind, fn in fns.items():
                measured[side][kind].append(median_rate(fn, units, steps, warmup))
    return {side: {kind: float(np.median(values)) for kind, values in kinds.items()}
            for side, kinds in measured.items()}


def gflop_per_image(model_name, image_size):
    """{"train": GFLOP, "eval": GFLOP} of one image, known for B0 at 224x224 only (else None)."""
    if (model_name, image_size) != ("efficientnet_b0", 224):
        return None
    return {"train": B0_TRAIN_GFLOP_PER_IMAGE, "eval": B0_EVAL_GFLOP_PER_IMAGE}


def fraction_of(images_per_sec, gflop, matmul_gflops_per_sec):
    """The share of the matmul rate that images_per_sec of gflop each amount to, or None if either is unknown."""
    if images_per_sec is None or gflop is None:
        return None
    return images_per_sec * gflop / matmul_gflops_per_sec


def model_flops(model_name, image_size):
    """Floating-point operations of one image's forward pass, counted by TensorFlow's profiler on the ops the
    logits depend on (the inference graph also holds each convolution as built, before batch norm was folded
    into a copy of it)."""

    with tf.Graph().as_default() as built:
        logits, _ = build_efficientnet(tf.zeros([1, image_size, image_size, 3]),
                                       model_config(model_name, image_size), is_training=False)
    needed = tf.compat.v1.graph_util.extract_sub_graph(built.as_graph_def(), [logits.op.name])
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(needed, name="")
        options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


def keras_steps(model_name, batch, image_size, threads):
    """{"train": step, "eval": step} for keras.applications' EfficientNet (same batch, optimizer and
    resolution as ours), or None without Keras 3."""
    keras = optional.keras()
    if keras is None:
        return None

    if threads[0]:
        tf.config.threading.set_intra_op_parallelism_threads(threads[0])
    if threads[1]:
        tf.config.threading.set_inter_op_parallelism_threads(threads[1])
    build = getattr(keras.applications, keras_model_name(model_name), None)
    if build is None:
        return None
    model = build(weights=None, input_shape=(image_size, image_size, 3), classes=1000)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss="sparse_categorical_crossentropy")
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype(np.float32)
    y = rng.randint(0, 1000, batch).astype(np.int32)
    return {"train": lambda: model.train_on_batch(x, y), "eval": lambda: model.predict_on_batch(x)}


def keras_model_name(model_name):
    """keras.applications' name of a variant: efficientnet_b0 -> EfficientNetB0, efficientnetv2_s ->
    EfficientNetV2S (for a variant Keras lacks, e.g. Lite, a name keras.applications does not have)."""
    family, variant = model_name.rsplit("_", 1)
    return {"efficientnet": "EfficientNet", "efficientnetv2": "EfficientNetV2"}.get(family, family) + variant.upper()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pipeline_rate(batch, image_size):
    """Training input pipeline images/s on the bundled digits (decode, crop, resize, flip, batch)."""
    ds_cfg = DatasetConfig(num_classes=10, builtin=Builtin.digits,
                           cache_dir=os.environ.get("EFFNET_EXP_CACHE", "~/.cache/effnet_exp"))
    source = resolve_data_source(ds_cfg, need_eval=False)
    with tf.Graph().as_default():
        dataset = build_dataset(source, ds_cfg, is_training=True, batch_size=batch, image_size=image_size,
                                normalization=ds_cfg.normalization, seed=0)
        batch_op = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        with tf.compat.v1.Session() as sess:
            return median_rate(lambda: sess.run(batch_op), batch, 20, 5)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="ours, Keras and the matmul take turns this many times")
    parser.add_argument("--intra-threads", type=int, default=0)
    parser.add_argument("--inter-threads", type=int, default=0)
    parser.add_argument("--no-keras", action="store_true")
    parser.add_argument("--no-xla-swish-grad", action="store_true",
                        help="our training graph with TensorFlow's own swish gradient (device.xla_swish_grad=false)")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="the square float32 matrix multiply that measures the machine's rate")
    parser.add_argument("--scaling", action="store_true", help="also time B0-B3 against their FLOPs")
    parser.add_argument("--scaling-batch", type=int, default=4)
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def measure(args):
    """Ours, Keras and the matmul in turns; the results dict (written by --json)."""
    threads = (args.intra_threads, args.inter_threads)
    xla_swish_grad = not args.no_xla_swish_grad
    sides = {"ours": (args.batch_size, ours(args.model, args.batch_size, args.image_size, threads, xla_swish_grad))}
    keras = None if args.no_keras else keras_steps(args.model, args.batch_size, args.image_size, threads)
    if keras:
        sides["keras"] = (args.batch_size, keras)
    sides["matmul"] = (2 * args.matmul_size ** 3, {"flops": matmul_step(args.matmul_size, threads)})
    rates = rates_in_rounds(sides, args.steps, args.warmup, args.rounds)
    train, evaluate = rates["ours"]["train"], rates["ours"]["eval"]
    keras_train = rates["keras"]["train"] if keras else None
    keras_eval = rates["keras"]["eval"] if keras else None
    matmul = rates["matmul"]["flops"] / 1e9
    gflop = gflop_per_image(args.model, args.image_size) or {"train": None, "eval": None}
    return {
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
        "steps": args.steps, "rounds": args.rounds, "tf_version": tf.__version__,
        "xla_swish_grad": xla_swish_grad,
        "python": platform.python_version(),
        "cores": os.cpu_count(), "train_images_per_sec": train, "eval_images_per_sec": evaluate,
        "keras_train_images_per_sec": keras_train, "keras_eval_images_per_sec": keras_eval,
        "train_ratio": train / keras_train if keras_train else None,
        "eval_ratio": evaluate / keras_eval if keras_eval else None,
        "matmul_size": args.matmul_size, "matmul_gflops_per_sec": matmul,
        "train_gflop_per_image": gflop["train"], "eval_gflop_per_image": gflop["eval"],
        "train_fraction_of_matmul": fraction_of(train, gflop["train"], matmul),
        "eval_fraction_of_matmul": fraction_of(evaluate, gflop["eval"], matmul),
        "keras_train_fraction_of_matmul": fraction_of(keras_train, gflop["train"], matmul),
        "keras_eval_fraction_of_matmul": fraction_of(keras_eval, gflop["eval"], matmul),
        "pipeline_images_per_sec": pipeline_rate(args.batch_size, args.image_size),
        "peak_rss_mb": peak_rss_mb(),
    }


def _fmt(v, spec="{:.1f}"):
    return "-" if v is None else spec.format(v)


def print_table(results):
    r = results
    xla = ("on" if r["xla_swish_grad"] else "off") if not r["tf_version"].startswith("1.") else "n/a on TF 1.x"
    print("EfficientNet throughput: {} cores, TensorFlow {}, Python {}; {} at {}x{}, batch {}, median of {} "
          "rounds of {} steps; xla_swish_grad {}".format(r["cores"], r["tf_version"], r["python"], r["model"],
                                                         r["image_size"], r["image_size"], r["batch_size"],
                                                         r["rounds"], r["steps"], xla))
    per_image = ("images/s x {:.2f} GFLOP per image (train) or {:.2f} (eval)".format(
        r["train_gflop_per_image"], r["eval_gflop_per_image"]) if r["train_gflop_per_image"]
        else "given for efficientnet_b0 at 224x224 only")
    print("float32 matmul {0}x{0} in our session: {1:.1f} GFLOP/s, the median as above; % of matmul = {2}".format(
        r["matmul_size"], r["matmul_gflops_per_sec"], per_image))
    print("| | ours (img/s) | ours (% of matmul) | Keras 3 (img/s) | Keras 3 (% of matmul) | ours / Keras |")
    print("|---|---|---|---|---|---|")
    for kind, prefix in (("train", "train"), ("eval", "eval")):
        print("| {} | {} | {} | {} | {} | {} |".format(
            kind, _fmt(r[prefix + "_images_per_sec"]), _fmt(r[kind + "_fraction_of_matmul"], "{:.0%}"),
            _fmt(r["keras_{}_images_per_sec".format(prefix)]),
            _fmt(r["keras_{}_fraction_of_matmul".format(kind)], "{:.0%}"), _fmt(r[kind + "_ratio"], "{:.2f}x")))
    print("| input pipeline (train preprocessing) | {} | | | | |".format(_fmt(r["pipeline_images_per_sec"])))
    print("peak RSS {:.0f} MB".format(r["peak_rss_mb"]))


def scaling_rows(args):
    """B0-B3 at their resolutions: time per image against forward FLOPs."""
    threads = (args.intra_threads, args.inter_threads)
    rows = []
    for variant in ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"):
        size = model_config(variant, None).resolution
        flops = model_flops(variant, size)
        steps = ours(variant, args.scaling_batch, size, threads, not args.no_xla_swish_grad)
        scaled = rates_in_rounds({"ours": (args.scaling_batch, steps)}, max(3, args.steps // 2), 1, 1)["ours"]
        rows.append({"model": variant, "image_size": size, "gflops": flops / 1e9,
                     "train_ms_per_image": 1000.0 / scaled["train"], "eval_ms_per_image": 1000.0 / scaled["eval"]})
    return rows


def print_scaling(rows, batch):
    base = rows[0]
    print("\nCompound scaling (batch {}): time per image against forward FLOPs".format(batch))
    print("| model | size | GFLOPs | x B0 | train ms/img | x B0 | eval ms/img | x B0 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| {} | {} | {:.2f} | {:.2f} | {:.0f} | {:.2f} | {:.0f} | {:.2f} |".format(
            r["model"], r["image_size"], r["gflops"], r["gflops"] / base["gflops"],
            r["train_ms_per_image"], r["train_ms_per_image"] / base["train_ms_per_image"],
            r["eval_ms_per_image"], r["eval_ms_per_image"] / base["eval_ms_per_image"]))


def main(argv=None):
    args = parse_args(argv)
    results = measure(args)
    print_table(results)
    if args.scaling:
        results["scaling"] = scaling_rows(args)
        print_scaling(results["scaling"], args.scaling_batch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
