"""The one validate step: each section's own checks, then the rules across sections; no TensorFlow work.

String choices are Enums in the schemas, so Hydra itself rejects a bad choice, naming the key and the values.
The rules that involve the device's environment (ranks, TF_CONFIG, the replica count) are the device's check().
"""
from effnet_exp.config import requested_image_size
from effnet_exp.data.config import check_dataset
from effnet_exp.devices.config import check_device
from effnet_exp.errors import UserError
from effnet_exp.export.config import check_export
from effnet_exp.model.config import check_model
from effnet_exp.modes import INFERENCE_MODES, Mode
from effnet_exp.training.config import check_eval, check_optimizer, check_train
from effnet_exp.training import progressive


def validate(cfg):
    """UserError naming the key and value at fault, for the first problem found."""
    check_dataset(cfg.dataset)
    check_model(cfg.model)
    check_optimizer(cfg.optimizer)
    check_train(cfg.train)
    check_eval(cfg.eval)
    check_device(cfg.device)
    check_export(cfg.export)
    if cfg.mode in INFERENCE_MODES and not cfg.eval.checkpoint:
        raise UserError("mode={} needs eval.checkpoint=<checkpoint prefix, run folder or package:<variant>>".format(
            cfg.mode.value))
    if cfg.mode == Mode.predict and not cfg.predict.images:
        raise UserError("mode=predict needs predict.images=[a.jpg,b.png]")
    size = requested_image_size(cfg)
    if size < 32:
        raise UserError("image size {} is too small: EfficientNet downsamples by 32".format(size))
    progressive.check_run(cfg, size)
