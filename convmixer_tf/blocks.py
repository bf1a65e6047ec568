"""ConvMixer's building blocks: functions that take a tensor and return a tensor.

They are written against a ``keras``-like module passed in as ``keras`` so that the same code
builds a Keras 3 model and a tf_keras (Keras 2) model; see :mod:`convmixer_tf.model`.

Layer names follow timm's checkpoint names (``stem.0`` -> ``stem_conv``,
``blocks.{i}.0.fn.0`` -> ``blocks_{i}_dwconv``, ...), so weight import is a string mapping.
"""

from __future__ import annotations

import functools
import importlib

import tensorflow as tf

# PyTorch's BatchNorm2d defaults. Keras' own (epsilon 1e-3, momentum 0.99) do not reproduce the
# paper's checkpoints: the epsilon changes every output, and the momentum the training dynamics.
# Keras' momentum is the weight of the old statistics: 1 - PyTorch's momentum (0.1).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def batch_norm(keras, name: str, synchronized: bool = False):
    """A BatchNorm layer with PyTorch's epsilon and momentum."""
    kwargs = {"synchronized": True} if synchronized else {}
    return keras.layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name, **kwargs
    )


# Exact GELU: gelu(x) = x * Phi(x), Phi(x) = erfc(-x / sqrt(2)) / 2 (the standard normal CDF),
# gelu'(x) = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi).
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def _gelu_forward(x: tf.Tensor) -> tf.Tensor:
    x32 = tf.cast(x, tf.float32)
    return tf.cast(0.5 * x32 * tf.math.erfc(-x32 * _SQRT_HALF), x.dtype)


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def _gelu_backward(x: tf.Tensor, upstream: tf.Tensor) -> tf.Tensor:
    x32 = tf.cast(x, tf.float32)
    cdf = 0.5 * tf.math.erfc(-x32 * _SQRT_HALF)
    derivative = cdf + x32 * _INV_SQRT_2PI * tf.exp(-0.5 * x32 * x32)
    return tf.cast(tf.cast(upstream, tf.float32) * derivative, x.dtype)


@tf.custom_gradient
def gelu_fused(x: tf.Tensor):
    """Exact (erf) GELU whose forward and backward passes are each one XLA-fused loop.

    The same function as ``keras.activations.gelu(x, approximate=False)`` (= ``tf.nn.gelu``),
    equal within float32 rounding, values and gradients. TensorFlow runs ``tf.nn.gelu`` as five
    elementwise kernels and its automatic gradient as about ten more, each a pass over memory;
    here each direction is one pass (XLA on this function only: whole-model ``jit_compile`` is
    slower on CPU, whose XLA convolutions are slow). Computes in float32 for float16/bfloat16.

    Example:
        >>> import numpy as np
        >>> x = tf.constant([-3.0, -1.0, 0.0, 1.0, 3.0])
        >>> bool(np.allclose(gelu_fused(x), tf.nn.gelu(x, approximate=False), atol=1e-6))
        True
    """
    x = tf.convert_to_tensor(x)

    def grad(upstream):
        return _gelu_backward(x, upstream)

    return _gelu_forward(x), grad


@functools.cache
def gelu_layer_class(keras):
    """The ``GELU`` layer class of a keras module (Keras 3 or tf_keras), registered for loading.

    A ``keras.layers.Activation("gelu")`` (same config, ``{"activation": "gelu", ...}``) whose
    training pass runs :func:`gelu_fused`. At inference (``training`` not True) it runs
    ``tf.nn.gelu``, the very ops of ``Activation("gelu")``, so TFLite conversion still fuses them
    into one builtin GELU op. Registered as ``"convmixer_tf>GELU"``: ``.keras`` files load with
    ``safe_mode=True`` once ``convmixer_tf`` is imported.

    Example:
        >>> import keras
        >>> layer = gelu_layer_class(keras)(name="act")
        >>> layer.get_config()["activation"]
        'gelu'
    """

    @keras.saving.register_keras_serializable(package="convmixer_tf")
    class GELU(keras.layers.Activation):
        """Exact (erf) GELU; fused forward and backward passes in training."""

        def __init__(self, activation: str = "gelu", **kwargs):
            if activation != "gelu":
                raise ValueError(
                    f"The GELU layer only computes 'gelu'. Received: activation={activation!r}"
                )
            super().__init__("gelu", **kwargs)

        def call(self, inputs, training=None):
            if training is True:
                return gelu_fused(inputs)
            return tf.nn.gelu(inputs, approximate=False)

    return GELU


def activation_layer(keras, activation: str, name: str):
    """The activation layer of the blocks: the fused-gradient ``GELU`` for Keras 3 GELU models,
    ``keras.layers.Activation(activation)`` otherwise.

    tf_keras models keep ``Activation("gelu")``: tensorflow-model-optimization's quantization
    (``export.quantize``) keys its policy on that layer class. Both compute the same function.
    """
    if activation == "gelu" and keras.__name__ == "keras":
        return gelu_layer_class(keras)(name=name)
    return keras.layers.Activation(activation, name=name)


def apply_stem(x, keras, dim: int, patch_size: int, activation: str, synchronized_bn: bool = False):
    """Patch embedding: ``Conv(dim, k=p, s=p)`` -> activation -> BN."""
    x = keras.layers.Conv2D(dim, patch_size, strides=patch_size, name="stem_conv")(x)
    x = activation_layer(keras, activation, "stem_act")(x)
    return batch_norm(keras, "stem_bn", synchronized_bn)(x)


def apply_block(
    x, keras, index: int, dim: int, kernel_size: int, activation: str, synchronized_bn: bool = False
):
    """One ConvMixer block.

    ``x = BN(act(DepthwiseConv(x))) + x`` (the residual wraps the depthwise part only), then
    ``x = BN(act(Conv1x1(x)))``. Note the order conv -> activation -> BN.
    """
    prefix = f"blocks_{index}"
    shortcut = x
    x = keras.layers.DepthwiseConv2D(kernel_size, padding="same", name=f"{prefix}_dwconv")(x)
    x = activation_layer(keras, activation, f"{prefix}_dwconv_act")(x)
    x = batch_norm(keras, f"{prefix}_dwconv_bn", synchronized_bn)(x)
    x = keras.layers.Add(name=f"{prefix}_add")([x, shortcut])
    x = keras.layers.Conv2D(dim, 1, name=f"{prefix}_pwconv")(x)
    x = activation_layer(keras, activation, f"{prefix}_pwconv_act")(x)
    return batch_norm(keras, f"{prefix}_pwconv_bn", synchronized_bn)(x)


# Register the Keras 3 GELU layer at import: a saved .keras file then loads in a fresh process
# after `import convmixer_tf`.
gelu_layer_class(importlib.import_module("keras"))
