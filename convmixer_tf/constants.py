"""The choices and defaults that the library, the trainer and the exporter share.

This module imports no TensorFlow, so that parsing a training config or a command line stays
cheap: ``training.config`` checks its values against these tuples without loading TensorFlow.
"""

# "silu" (x * sigmoid(x)) is what an int8 export with the sigmoid GELU approximation computes
# (export.rewrite.gelu_as_silu): LOGISTIC and MUL, which XNNPACK and TFLite Micro run in int8.
ACTIVATIONS = ("gelu", "relu", "silu")
POOLINGS = ("avg", "max", None)
# "keras": Keras' defaults (Glorot-uniform kernels, zero biases); "pytorch": PyTorch's
# (kernels and biases U(+-1/sqrt(fan_in)), fan_in per group), as the paper's models start.
INITIALIZATIONS = ("keras", "pytorch")
KERAS_MODULES = ("keras", "tf_keras")

# Resize methods of the evaluation transform (tf.image.resize's names). timm evaluates the
# ConvMixer checkpoints with bicubic.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")

# The files a training run writes beside its model files (training.rundir), which the tools
# that take a model file read: its class names and its evaluation settings.
RUN_CONFIG_FILE = "config.json"
RUN_CLASS_NAMES_FILE = "class_names.json"
