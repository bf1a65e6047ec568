"""Edge export of ConvMixer: TFLite conversion (fp32, fp16, dynamic, int8, QAT), verification.

:func:`export_model` (:mod:`export.pipeline`) is the one export function, behind
``python -m export`` and ``python -m export.benchmark``.

Modules: :mod:`export.pipeline` (the export in stages), :mod:`export.options` (its options, once),
:mod:`export.constants` (formats and choices), :mod:`export.tflite` (converter, integer checks,
Edge TPU check), :mod:`export.quantize` (tfmot QuantizeConfigs and the policy table, QAT),
:mod:`export.rewrite` (exact graph rewrites: folded preprocessing, tiled depthwise convs),
:mod:`export.edge` (Vela for Ethos-U, TFLite Micro), :mod:`export.saved_model` (serving),
:mod:`export.evaluate` (accuracy with ai-edge-litert), :mod:`export.benchmark`
(``python -m export`` is :mod:`export.__main__`).

Example:
    >>> import convmixer_tf
    >>> from export import tflite
    >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
    >>> len(tflite.convert(model, "fp32")) > 0
    True
"""

import importlib

__all__ = ["ExportResult", "export_model"]


def __getattr__(name: str):
    # Imported on first use: `python -m export --help` and argument errors stay fast.
    if name in __all__:
        return getattr(importlib.import_module("export.pipeline"), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
