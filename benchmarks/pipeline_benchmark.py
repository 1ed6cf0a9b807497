"""Input pipeline throughput and memory on real photographs (a benchmark, not a test).

    python benchmarks/pipeline_benchmark.py                  # throughput table
    python benchmarks/pipeline_benchmark.py --memory         # peak RSS: an epoch of 4096 vs 40960 records
    python benchmarks/pipeline_benchmark.py --cores 1,2,4    # scaling (CPU affinity per measurement)
    python benchmarks/pipeline_benchmark.py --augment        # each dataset.augment policy, and B0's train step

The photographs are the real JPEGs that ship with scikit-learn (china.jpg, flower.jpg, 640x427), plus
scikit-image's bundled photographs when scikit-image is installed (re-encoded as JPEG, native sizes).
They are packed, cycling, into TF-Slim style TFRecord shards in a temporary folder.

For the training and the eval preprocessing it compares `build_dataset` (parallel interleave, parallel
map, bad-record checks, prefetch, tf.data options from the config) with the plain composition of the
reference input pipeline: interleave -> shuffle -> map -> batch with no other options and the same
shuffle buffer. Its map is the reference's preprocessing: the same decoding, crops and bicubic resize
(JPEG only, so without our per-image format detection) and the reference's normalization arithmetic,
(x - mean) / std with [3] vectors broadcast over the channels (ours computes the same values on rows
of width x 3, which Eigen vectorises). Each measurement runs in its own process (so its
peak RSS is its own), pinned to the given number of cores; images/s is measured over `--batches`
batches after `--warmup` batches, and the best of `--repeat` alternating measurements is shown. CPU ms per
image (user + system time of the process over the same batches) is shown too: unlike images/s it hardly
moves when other work shares the machine.
"""
import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# --------------------------------------------------------------------------- data


def _photos():
    """[(name, JPEG bytes)] of real photographs at their native sizes."""
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    photos = []
    for name in ("china.jpg", "flower.jpg"):
        with open(os.path.join(folder, name), "rb") as handle:
            photos.append((name, handle.read()))
    try:
        import io

        import numpy as np
        import skimage.data
        from PIL import Image

        for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle_left"):
            try:
                pixels = np.asarray(getattr(skimage.data, name)())
            except Exception:  # some need a download (pooch) in newer scikit-image versions
                continue
            if pixels.ndim != 3:
                continue
            out = io.BytesIO()
            Image.fromarray(pixels[..., :3].astype(np.uint8)).save(out, "JPEG", quality=95)
            photos.append((name + ".jpg", out.getvalue()))
    except ImportError:
        pass
    return photos


def write_records(folder, num_records, num_shards):
    """num_records records cycling through the photos, in num_shards train-* shards of folder."""
    import io

    from PIL import Image

    from effnet_exp.data import records

    photos = _photos()
    os.makedirs(folder)
    per_shard = [list(range(num_records))[i::num_shards] for i in range(num_shards)]
    for shard, indices in enumerate(per_shard):
        examples = []
        for i in indices:
            name, data = photos[i % len(photos)]
            width, height = Image.open(io.BytesIO(data)).size
            examples.append(records.make_example(data, i % 10, height=height, width=width,
                                                 text=str(i % 10), filename=name))
        records.write_tfrecord(os.path.join(folder, "train-{:05d}-of-{:05d}".format(shard, num_shards)),
                                examples)
    return [name for name, _ in photos]


# --------------------------------------------------------------------------- one measurement (child)


def _plain_dataset(cfg, files, batch_size, image_size, is_training, plain_map="reference"):
    """The reference composition: interleave -> shuffle -> map -> batch, nothing else. plain_map
    "reference": the reference's map, JPEG only (no format detection) and its normalization arithmetic;
    "ours": our preprocessing functions (format detection, our normalization), to compare compositions only."""
    import tensorflow as tf

    from effnet_exp.data import pipeline, preprocessing

    dataset = tf.data.Dataset.from_tensor_slices(files)
    if is_training:
        dataset = dataset.repeat()
    dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(cfg.cycle_length, len(files)))
    if is_training:
        dataset = dataset.shuffle(cfg.shuffle_buffer)

    def parse(serialized):
        image_bytes, label = pipeline.parse_record(serialized, cfg)
        if plain_map == "ours":
            image = preprocessing.preprocess_image(image_bytes, image_size, is_training, cfg=cfg)
            return preprocessing.normalize(image, cfg.normalization), label
        image = preprocessing.preprocess_image(image_bytes, image_size, is_training, cfg=cfg,
                                               image_format="jpeg")
        return preprocessing.normalize(image, cfg.normalization, rows=False), label

    return dataset.map(parse).batch(batch_size, drop_remainder=is_training)


def child(spec):
    if spec.get("cores"):
        os.sched_setaffinity(0, list(sorted(os.sched_getaffinity(0)))[:spec["cores"]])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if spec["impl"] == "train_step":
        return _train_step_child(spec)
    # TensorFlow (and what imports it) only now: after the CPU affinity and the log level are set.
    import tensorflow as tf

    from effnet_exp.data import pipeline
    from effnet_exp.data.config import DatasetConfig
    from effnet_exp.data.source import DataSource

    if hasattr(tf.compat.v1, "logging"):
        tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    cfg = DatasetConfig(num_classes=10, shuffle_buffer=spec["shuffle_buffer"], **spec.get("cfg", {}))
    files = sorted(glob.glob(os.path.join(spec["data_dir"], "train-*")))
    is_training = spec["split"] == "train"
    if not is_training:
        # One long pass over the shards, listed as often as needed (no pipeline restarts).
        per_pass = max(spec["records_per_file"] * len(files), 1)
        needed = (spec["warmup"] + spec["batches"]) * spec["batch"]
        files = files * max(1, -(-needed // per_pass))
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(0)
        if spec["impl"] == "plain":
            dataset = _plain_dataset(cfg, files, spec["batch"], spec["image_size"], is_training,
                                     spec.get("plain_map", "reference"))
        else:
            source = DataSource(spec["data_dir"], files, files, None, None, None)
            dataset = pipeline.build_dataset(source, cfg, is_training=is_training, batch_size=spec["batch"],
                                             image_size=spec["image_size"], normalization=cfg.normalization,
                                             seed=0)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        images, labels = iterator.get_next()
        # Touch the batch so it is materialised, but fetch almost nothing back.
        fetch = [tf.reduce_sum(images[:, 0, 0, 0]), tf.size(labels)]
        with tf.compat.v1.Session() as sess:
            sess.run(iterator.initializer)
            for _ in range(spec["warmup"]):
                sess.run(fetch)
            started, cpu_started = time.time(), _cpu_seconds()
            count = 0
            for _ in range(spec["batches"]):
                count += int(sess.run(fetch)[1])
            elapsed, cpu = time.time() - started, _cpu_seconds() - cpu_started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images_per_sec": count / elapsed, "images": count, "seconds": elapsed,
            "cpu_ms_per_image": 1000.0 * cpu / max(count, 1),
            "peak_rss_mb": peak_kb / 1024.0, "tf": tf.__version__}


def _train_step_child(spec):
    """B0's training step (forward, backward, update) on a batch held in memory: images/s, median of the steps."""
    from effnet_exp.tools import benchmark

    steps = benchmark.ours("efficientnet_b0", spec["batch"], spec["image_size"], (0, 0))
    cpu_started = _cpu_seconds()
    rate = benchmark.median_rate(steps["train"], spec["batch"], spec["batches"], spec["warmup"])
    cpu = _cpu_seconds() - cpu_started
    count = spec["batch"] * (spec["batches"] + spec["warmup"])
    return {"images_per_sec": rate, "cpu_ms_per_image": 1000.0 * cpu / count,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(spec):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode != 0:
        raise RuntimeError("measurement {} failed:\n{}".format(spec, proc.stderr[-3000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def _field(item):
    key, _, value = item.partition("=")
    return key.strip(), json.loads(value) if value.strip() not in ("", "None") else None


def _tf_version():
    out = subprocess.run([sys.executable, "-c", "import tensorflow as tf; print(tf.__version__)"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=512, help="records written (cycling the photos)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="measurements per cell; the best is shown")
    parser.add_argument("--shuffle-buffer", type=int, default=1024)
    parser.add_argument("--cores", default="", help="comma-separated core counts (default: all cores)")
    parser.add_argument("--splits", default="train,eval", help="which preprocessing to measure")
    parser.add_argument("--plain-map", choices=("reference", "ours"), default="reference",
                        help="the plain side's map: the reference's preprocessing (default), or ours "
                             "(then only the compositions differ)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a dataset config field for our pipeline (repeatable), e.g. cycle_length=4")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS over one training epoch of --memory-records vs 10x as many records")
    parser.add_argument("--memory-records", type=int, default=4096,
                        help="records of the 1x epoch (the --records shards linked again as needed)")
    parser.add_argument("--augment", action="store_true",
                        help="our training pipeline with each dataset.augment policy, against B0's train step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    available = len(os.sched_getaffinity(0))
    cores = [int(c) for c in args.cores.split(",") if c.strip()] or [available]
    work = tempfile.mkdtemp(prefix="pipeline-bench-")
    try:
        data_dir = os.path.join(work, "records")
        photos = write_records(data_dir, args.records, args.shards)
        size_mb = sum(os.path.getsize(f) for f in glob.glob(os.path.join(data_dir, "*"))) / 2.0 ** 20
        print("# input pipeline benchmark: TensorFlow {}, Python {}, {} cores available ({} cpu_count)".format(
            _tf_version(), platform.python_version(), available, os.cpu_count()))
        print("# {} records ({:.1f} MB, {} shards) cycling {} real photographs: {}".format(
            args.records, size_mb, args.shards, len(photos), ", ".join(photos)))
        print("# image size {}, batch {}, shuffle buffer {}; the plain side runs {} map".format(
            args.image_size, args.batch, args.shuffle_buffer,
            "the reference's" if args.plain_map == "reference" else "our"))
        base = {"data_dir": data_dir, "batch": args.batch, "image_size": args.image_size,
                "records_per_file": args.records // args.shards,
                "warmup": args.warmup, "batches": args.batches, "shuffle_buffer": args.shuffle_buffer,
                "cfg": dict(_field(item) for item in args.set), "plain_map": args.plain_map}
        if base["cfg"]:
            print("# our pipeline with {}".format(", ".join("{}={}".format(k, v) for k, v in
                                                            sorted(base["cfg"].items()))))
        if args.memory:
            return _memory(args, base, work, data_dir)
        if args.augment:
            return _augment(args, base)
        print("| preprocessing | cores | ours img/s | plain img/s | ours/plain | ours CPU ms/img | "
              "plain CPU ms/img | ours peak RSS MB | plain peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
            for n in cores:
                results = {"ours": [], "plain": []}
                for _ in range(args.repeat):  # alternating, best of each: less noise from other load
                    for impl in ("ours", "plain"):
                        results[impl].append(run_child(dict(base, split=split, impl=impl, cores=n)))
                ours, plain = [max(results[impl], key=lambda r: r["images_per_sec"])
                               for impl in ("ours", "plain")]
                ours_cpu, plain_cpu = [min(r["cpu_ms_per_image"] for r in results[impl])
                                       for impl in ("ours", "plain")]
                print("| {} | {} | {:.1f} | {:.1f} | {:.2f}x | {:.2f} | {:.2f} | {:.0f} | {:.0f} |".format(
                    split, n, ours["images_per_sec"], plain["images_per_sec"],
                    ours["images_per_sec"] / plain["images_per_sec"], ours_cpu, plain_cpu,
                    ours["peak_rss_mb"], plain["peak_rss_mb"]))
                sys.stdout.flush()
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


POLICIES = ("none", "autoaugment", "randaugment")


def _augment(args, base):
    """Our training pipeline with each policy (best of --repeat, alternating), then B0's train step alone."""
    results = {policy: [] for policy in POLICIES}
    for _ in range(args.repeat):
        for policy in POLICIES:
            spec = dict(base, split="train", impl="ours", cores=0, cfg=dict(base["cfg"], augment=policy))
            results[policy].append(run_child(spec))
    step = max((run_child(dict(base, impl="train_step", cores=0, batches=min(args.batches, 10), warmup=2))
                for _ in range(args.repeat)), key=lambda r: r["images_per_sec"])
    print("| dataset.augment | input img/s | input CPU ms/img | img/s vs none | input / B0 train step |")
    print("|---|---|---|---|---|")
    none = max(r["images_per_sec"] for r in results["none"])
    for policy in POLICIES:
        rate = max(r["images_per_sec"] for r in results[policy])
        cpu = min(r["cpu_ms_per_image"] for r in results[policy])
        print("| {} | {:.1f} | {:.2f} | {:.2f}x | {:.1f}x |".format(
            policy, rate, cpu, rate / none, rate / step["images_per_sec"]))
    print("# B0 train step at {0}x{0}, batch {1}, batch in memory: {2:.1f} img/s ({3:.0f} CPU ms/img)".format(
        args.image_size, args.batch, step["images_per_sec"], step["cpu_ms_per_image"]))
    slowest = min(max(r["images_per_sec"] for r in results[policy]) for policy in POLICIES)
    print("# input-bound: {} (the slowest policy's input rate is {:.1f}x the train step's; both share the "
          "machine's cores in a real run)".format("yes" if slowest < step["images_per_sec"] else "no",
                                                  slowest / step["images_per_sec"]))
    return 0


def _linked(work, name, shards, copies):
    """A folder holding `copies` links to each shard (the same bytes, read again)."""
    folder = os.path.join(work, name)
    os.makedirs(folder)
    for copy in range(copies):
        for shard in shards:
            os.symlink(shard, os.path.join(folder, "train-{:03d}-{}".format(copy, os.path.basename(shard))))
    return folder


def _memory(args, base, work, data_dir):
    """One training epoch over --memory-records records, then over 10 times as many."""
    shards = sorted(glob.glob(os.path.join(data_dir, "train-*")))
    copies = max(1, -(-args.memory_records // args.records))
    records = copies * args.records
    steps = records // args.batch
    print("| records | training batches | ours img/s | peak RSS MB |")
    print("|---|---|---|---|")
    peaks = []
    for factor in (1, 10):
        folder = _linked(work, "x{}".format(factor), shards, copies * factor)
        spec = dict(base, data_dir=folder, split="train", impl="ours", cores=0, warmup=0,
                    batches=steps * factor)
        result = run_child(spec)
        peaks.append(result["peak_rss_mb"])
        print("| {} | {} | {:.1f} | {:.0f} |".format(records * factor, steps * factor,
                                                     result["images_per_sec"], result["peak_rss_mb"]))
        sys.stdout.flush()
    growth = (peaks[1] - peaks[0]) / peaks[0] * 100.0
    print("# peak RSS growth from 1x to 10x records: {:+.1f}% ({})".format(
        growth, "ok: under 10%" if growth < 10.0 else "TOO MUCH: 10% or more"))
    return 0 if growth < 10.0 else 1


if __name__ == "__main__":
    sys.exit(main())
