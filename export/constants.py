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
# How a GELU ConvMixer's .tflite computes GELU: "exact" (TFLite's GELU op) or "sigmoid"
# (x * sigmoid(1.702 x) as LOGISTIC + MUL, export.rewrite.gelu_as_silu: one XNNPACK partition in
# int8, and an op set TFLite Micro has; QAT absorbs the approximation).
GELU_MODES = ("exact", "sigmoid")
# Edge targets whose own tools check an int8 / qat export (export.edge): Arm Ethos-U NPU
# configurations as Vela names them (ethos-u-vela 5.2.0, --accelerator-config), and TFLite Micro.
VELA_TARGETS = (
    "ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256",
    "ethos-u65-256", "ethos-u65-512",
    "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048",
)  # fmt: skip
TFLM_TARGET = "tflm"
TARGETS = (*VELA_TARGETS, TFLM_TARGET)
