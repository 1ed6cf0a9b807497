"""effnet-exp: EfficientNet training, evaluation and export in TensorFlow graph mode."""

__version__ = "0.1.0"
