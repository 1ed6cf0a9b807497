"""Devices (see factory.make_device). The schemas in config.py import no TensorFlow."""
