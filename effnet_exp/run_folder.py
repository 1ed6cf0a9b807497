"""What a run folder says about the checkpoints inside it: the model that made them and its class names."""
import os

from omegaconf import OmegaConf

from effnet_exp.run_files import CHECKPOINT_DIR


def run_folder_of(checkpoint_prefix):
    """The run folder holding checkpoint_prefix (…/<run>/checkpoints[/best]/model.ckpt-N), or None."""
    ckpt_dir = os.path.dirname(os.path.abspath(checkpoint_prefix))
    if os.path.basename(ckpt_dir) == "best":
        ckpt_dir = os.path.dirname(ckpt_dir)
    if os.path.basename(ckpt_dir) != CHECKPOINT_DIR:
        return None
    run_dir = os.path.dirname(ckpt_dir)
    return run_dir if os.path.isfile(os.path.join(run_dir, ".hydra", "config.yaml")) else None


def saved_model_config(run_dir, schema_cls):
    """The run's model section (resolved against its whole saved config) and its effective normalisation."""
    saved = OmegaConf.load(os.path.join(run_dir, ".hydra", "config.yaml"))
    model = OmegaConf.to_container(saved.model, resolve=True)
    dataset = OmegaConf.to_container(saved.dataset, resolve=True)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_cls), model))
    image_size = model_cfg.image_size or dataset.get("image_size") or model_cfg.resolution
    normalization = model_cfg.normalization or dataset.get("normalization")
    return model_cfg, image_size, normalization


def saved_class_names(run_dir):
    path = os.path.join(run_dir, "labels.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]
