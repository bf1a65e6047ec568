"""The export's choices, shared by its library and its command lines; imports no TensorFlow."""

TFLITE_FORMATS = ("fp32", "fp16", "dynamic", "int8", "qat")
# What `python -m export --format` writes: a .tflite of TFLITE_FORMATS, or a serving SavedModel.
FORMATS = (*TFLITE_FORMATS, "saved_model")
FLOAT_FORMATS = ("fp32", "fp16", "dynamic")
INTEGER_FORMATS = ("int8", "qat")
IO_TYPES = ("int8", "uint8")
# How an int8 (PTQ) graph computes the BatchNorms: "depthwise" (1x1 depthwise convs with
# per-channel int8 weights: accurate) or "mul" (MUL + ADD with one int8 scale for the
# multipliers: the converter's default, a smaller file). QAT always uses "depthwise".
BATCH_NORM_MODES = ("depthwise", "mul")
