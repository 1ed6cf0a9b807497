"""Where a run's records come from: resolves dataset config to files and counts, before any graph."""
import os
from collections import namedtuple

from effnet_exp.errors import UserError

DataSource = namedtuple("DataSource", "data_dir train_files eval_files num_train num_eval class_names")


def resolve_data_source(ds_cfg, need_train=True, need_eval=True):
    from effnet_exp.data import pipeline

    class_names = None
    num_train, num_eval = ds_cfg.num_train_images, ds_cfg.num_eval_images
    if ds_cfg.builtin:
        from effnet_exp.data.bundled import prepare_builtin

        info = prepare_builtin(ds_cfg.builtin, ds_cfg.cache_dir)
        data_dir = info["data_dir"]
        class_names = list(info["class_names"])
        num_train = num_train or info["num_train"]
        num_eval = num_eval or info["num_eval"]
        if info["num_classes"] != ds_cfg.num_classes:
            raise UserError("dataset.num_classes={} but the built-in dataset {!r} has {} classes".format(
                ds_cfg.num_classes, ds_cfg.builtin, info["num_classes"]))
    else:
        if not ds_cfg.data_dir:
            raise UserError("dataset.data_dir is not set (the folder holding the TFRecord shards)")
        data_dir = ds_cfg.data_dir
        if "://" not in data_dir:  # gs://, hdfs://, obs:// paths are left to tf.io.gfile
            data_dir = os.path.abspath(os.path.expanduser(data_dir))
        if "://" not in data_dir and not os.path.isdir(data_dir):
            raise UserError("dataset.data_dir={} does not exist or is not a folder".format(data_dir))
    try:
        train_files = pipeline.list_files(data_dir, ds_cfg.train_pattern) if need_train else []
        eval_files = pipeline.list_files(data_dir, ds_cfg.eval_pattern) if need_eval else []
    except (IOError, OSError) as err:  # FileNotFoundError on Python 3
        raise UserError(str(err))
    if need_train and not num_train:
        num_train = pipeline.count_records(train_files)
    if need_eval and not num_eval:
        num_eval = pipeline.count_records(eval_files)
    return DataSource(data_dir, train_files, eval_files, num_train, num_eval, class_names)
