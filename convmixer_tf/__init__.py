"""ConvMixer for TensorFlow / Keras: the models of "Patches Are All You Need?".

Example:
    >>> import convmixer_tf
    >>> model = convmixer_tf.create_model("convmixer_256_8")  # CIFAR-10, 32x32 raw pixels in
    >>> model.output_shape
    (None, 10)
"""

from convmixer_tf.model import ConvMixer, create_model
from convmixer_tf.presets import PRESETS, Preset, get_preset
from convmixer_tf.pretrained import load_pretrained

__all__ = ["ConvMixer", "PRESETS", "Preset", "create_model", "get_preset", "load_pretrained"]
__version__ = "0.1.0"
