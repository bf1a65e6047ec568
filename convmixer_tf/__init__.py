"""ConvMixer for TensorFlow / Keras: the models of "Patches Are All You Need?".

Example:
    >>> import convmixer_tf
    >>> model = convmixer_tf.create_model("convmixer_256_8")  # CIFAR-10, 32x32 raw pixels in
    >>> model.output_shape
    (None, 10)

The public names are imported on first use (PEP 562), so that ``convmixer_tf.constants`` and
``convmixer_tf.presets`` can be read without loading TensorFlow.

Modules: :mod:`~convmixer_tf.model` (the whole ConvMixer), :mod:`~convmixer_tf.presets` (the
paper's variants), :mod:`~convmixer_tf.constants` (shared choices and defaults),
:mod:`~convmixer_tf.fused` (CPU-fast training layers), :mod:`~convmixer_tf.saving` (load, save,
rebuild, a training run's files beside a model), :mod:`~convmixer_tf.pretrained` and
:mod:`~convmixer_tf.torch_pickle` (the paper's PyTorch checkpoints, read without PyTorch),
:mod:`~convmixer_tf.imagenet` (evaluation preprocessing, class names),
:mod:`~convmixer_tf.files` (atomic writes), :mod:`~convmixer_tf.image_files` (image sizes from
headers), :mod:`~convmixer_tf.cli` (the command-line convention); commands:
:mod:`~convmixer_tf.convert` (PyTorch checkpoint -> ``.keras``) and :mod:`~convmixer_tf.predict`
(classify image files).
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
