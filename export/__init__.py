"""Edge export of ConvMixer: TFLite conversion (fp32, fp16, dynamic, int8, QAT), verification.

Modules: :mod:`export.tflite` (converter, integer checks, Edge TPU check, atomic writes),
:mod:`export.quantize` (tfmot QuantizeConfigs and the policy table, QAT),
:mod:`export.rewrite` (exact graph rewrites: folded preprocessing, tiled depthwise convs),
:mod:`export.evaluate` (accuracy with ai-edge-litert), :mod:`export.benchmark`.

Example:
    >>> import convmixer_tf
    >>> from export import tflite
    >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
    >>> len(tflite.convert(model, "fp32")) > 0
    True
"""
