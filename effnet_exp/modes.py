"""What a run does (`mode=`): its own module at the bottom of the imports, for the config and the devices."""
import enum


class Mode(enum.Enum):
    train_eval = "train_eval"
    train = "train"
    eval = "eval"
    predict = "predict"
    export = "export"


TRAINING_MODES = (Mode.train_eval, Mode.train)
INFERENCE_MODES = (Mode.eval, Mode.predict, Mode.export)  # the weights come from eval.checkpoint
