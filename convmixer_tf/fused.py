"""CPU-fused training kernels for ConvMixer's GELU and BatchNorm, as drop-in Keras layers.

TensorFlow runs ``tf.nn.gelu`` and BatchNormalization's training pass as a dozen small kernels
each, forward and backward, every one a pass over memory; on CPU they cost more than the
convolutions of a ConvMixer training step. :func:`gelu_fused` and :func:`batch_norm_train_fused`
compute the same functions as one XLA computation per direction (XLA on these functions only:
whole-model ``jit_compile`` is slower on CPU, whose XLA convolutions are slow).

:func:`activation_layer` and :func:`batch_norm` choose the layer the builder
(:mod:`convmixer_tf.model`) puts in a model: the fused subclasses for Keras 3, the stock classes
for tf_keras (tensorflow-model-optimization keys its quantization policy on those). The fused
classes keep the stock classes' configs and weights and are registered as
``convmixer_tf>GELU`` and ``convmixer_tf>FusedBatchNormalization``, so that files saved with them
load through :func:`convmixer_tf.load_model`.
"""

from __future__ import annotations

import functools
import importlib

import tensorflow as tf


def batch_norm(keras, name: str, epsilon: float, momentum: float, synchronized: bool = False):
    """A BatchNorm layer of ``keras`` with the given epsilon and momentum.

    Keras 3 models get :func:`batch_norm_layer_class`'s subclass (fused training pass), unless
    ``synchronized``; tf_keras models keep ``BatchNormalization`` (already a fused kernel there,
    and tensorflow-model-optimization keys its quantization policy on that class).
    """
    if synchronized:
        return keras.layers.BatchNormalization(
            epsilon=epsilon, momentum=momentum, name=name, synchronized=True
        )
    layer_class = keras.layers.BatchNormalization
    if keras.__name__ == "keras":
        layer_class = batch_norm_layer_class(keras)
    return layer_class(epsilon=epsilon, momentum=momentum, name=name)


def _reduction_axes(x: tf.Tensor) -> list[int]:
    return list(range(len(x.shape) - 1))


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def _batch_norm_forward(x, gamma, beta, shift, epsilon):
    # One pass for both statistics: the sums of (x - shift) and of its square. Shifting by an
    # estimate of the mean (the moving mean) keeps E[d^2] - E[d]^2 free of cancellation.
    rows = tf.reshape(x - shift, (-1, tf.shape(x)[-1]))
    shifted_mean = tf.reduce_mean(rows, 0)
    variance = tf.maximum(tf.reduce_mean(tf.square(rows), 0) - tf.square(shifted_mean), 0.0)
    mean = shift + shifted_mean
    scale = tf.math.rsqrt(variance + epsilon) * gamma
    return x * scale + (beta - mean * scale), mean, variance


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def _batch_norm_backward(x, gamma, mean, variance, epsilon, upstream):
    axes = _reduction_axes(x)
    inv_std = tf.math.rsqrt(variance + epsilon)
    x_hat = (x - mean) * inv_std
    d_beta = tf.reduce_sum(upstream, axes)
    d_gamma = tf.reduce_sum(upstream * x_hat, axes)
    count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
    d_x = (gamma * inv_std / count) * (count * upstream - d_beta - x_hat * d_gamma)
    return d_x, d_gamma, d_beta


def batch_norm_train_fused(
    x: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    epsilon: float,
    shift: tf.Tensor | None = None,
):
    """Training-mode BatchNorm over all axes but the last: ``(y, batch mean, batch variance)``.

    ``y = (x - mean) / sqrt(variance + epsilon) * gamma + beta`` with the batch's (biased)
    statistics, as ``keras.layers.BatchNormalization(...)(x, training=True)`` computes it. The
    forward and the backward pass (the closed-form BatchNorm gradient) are each one XLA
    computation: two passes over ``x`` each (one for the statistics, one for the output),
    instead of the dozen TensorFlow kernels of ``tf.nn.moments`` + ``tf.nn.batch_normalization``
    and their gradients. ``shift``, a per-channel estimate of the mean (the layer passes its
    moving mean), makes the one-pass variance exact to float32 rounding even when the mean is
    large against the spread; zeros by default. The returned statistics are for the moving
    averages; no gradient flows through them (nor into ``shift``).

    Example:
        >>> x = tf.random.normal((8, 4, 4, 3))
        >>> y, mean, variance = batch_norm_train_fused(x, tf.ones(3), tf.zeros(3), 1e-5)
        >>> bool(tf.reduce_max(tf.abs(tf.reduce_mean(y, [0, 1, 2]))) < 1e-5)
        True
    """
    epsilon = tf.constant(epsilon, x.dtype)
    shift = tf.zeros_like(gamma) if shift is None else tf.stop_gradient(shift)

    @tf.custom_gradient
    def fused(x, gamma, beta):
        y, mean, variance = _batch_norm_forward(x, gamma, beta, shift, epsilon)

        def grad(upstream, _upstream_mean, _upstream_variance):
            return _batch_norm_backward(x, gamma, mean, variance, epsilon, upstream)

        return (y, tf.stop_gradient(mean), tf.stop_gradient(variance)), grad

    return fused(x, gamma, beta)


@functools.cache
def batch_norm_layer_class(keras):
    """Keras 3's ``BatchNormalization`` whose training pass runs :func:`batch_norm_train_fused`.

    Same config, weights, moving-average update and inference as the parent class; other
    settings (masks, renorm, synchronized, axis not last, no scale or center) use the parent's
    ``call``. Registered as ``"convmixer_tf>FusedBatchNormalization"``.

    Example:
        >>> import keras
        >>> layer = batch_norm_layer_class(keras)(epsilon=1e-5, momentum=0.9)
        >>> isinstance(layer, keras.layers.BatchNormalization)
        True
    """

    @keras.saving.register_keras_serializable(package="convmixer_tf")
    class FusedBatchNormalization(keras.layers.BatchNormalization):
        """BatchNormalization with a fused (XLA) training pass."""

        def call(self, inputs, training=None, mask=None):
            fusable = (
                training is True
                and self.trainable
                and mask is None
                and self.scale
                and self.center
                and not self.renorm
                and not self.synchronized
                and self.axis in (-1, len(inputs.shape) - 1)
            )
            if not fusable:
                return super().call(inputs, training=training, mask=mask)
            # float32 statistics under mixed precision, as the parent class computes them.
            x = tf.cast(inputs, tf.float32)
            gamma = tf.cast(self.gamma, tf.float32)
            beta = tf.cast(self.beta, tf.float32)
            shift = tf.cast(self.moving_mean, tf.float32)
            y, mean, variance = batch_norm_train_fused(x, gamma, beta, self.epsilon, shift)
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + variance * (1.0 - momentum)
            )
            return tf.cast(y, self.compute_dtype)

    return FusedBatchNormalization


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
    ``safe_mode=True`` once this module is imported.

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


def stock_class(layer):
    """The stock Keras class a fused layer extends (``Activation``, ``BatchNormalization``),
    or None for any other layer. Same config and weights: ``stock_class(layer).from_config(
    layer.get_config())`` is the layer users receive in saved files."""
    for fused_class in (gelu_layer_class, batch_norm_layer_class):
        if type(layer) is fused_class(_keras3):
            return fused_class(_keras3).__bases__[0]
    return None


def activation_layer(keras, activation: str, name: str):
    """The activation layer of the blocks: the fused-gradient ``GELU`` for Keras 3 GELU models,
    ``keras.layers.Activation(activation)`` otherwise.

    tf_keras models keep ``Activation("gelu")``: tensorflow-model-optimization's quantization
    (``export.quantize``) keys its policy on that layer class. Both compute the same function.
    """
    if activation == "gelu" and keras.__name__ == "keras":
        return gelu_layer_class(keras)(name=name)
    return keras.layers.Activation(activation, name=name)


# Register the Keras 3 classes at import, for files saved with them.
_keras3 = importlib.import_module("keras")
gelu_layer_class(_keras3)
batch_norm_layer_class(_keras3)
