"""ConvMixer for TensorFlow / Keras: the models of "Patches Are All You Need?".

Example:
    >>> import convmixer_tf
    >>> model = convmixer_tf.create_model("convmixer_256_8")  # CIFAR-10, 32x32 raw pixels in
    >>> model.output_shape
    (None, 10)

The public names are imported on first use (PEP 562), so that ``convmixer_tf.constants`` and
``convmixer_tf.presets`` can be read without loading TensorFlow.
"""

import importlib

__version__ = "0.2.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "ConvMixer": "convmixer_tf.model",
    "create_model": "convmixer_tf.model",
    "PRESETS": "convmixer_tf.presets",
    "Preset": "convmixer_tf.presets",
    "get_preset": "convmixer_tf.presets",
    "load_pretrained": "convmixer_tf.pretrained",
    "load_model": "convmixer_tf.saving",
    "model_arguments": "convmixer_tf.saving",
    "rebuild": "convmixer_tf.saving",
    "save_model": "convmixer_tf.saving",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convmixer_tf' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_PUBLIC})
