"""CPU-fast training passes for ConvMixer's GELU, BatchNorm and depthwise conv, as drop-in
Keras layers.

TensorFlow runs ``tf.nn.gelu`` as a handful of elementwise kernels and its automatic gradient
as about ten more, Keras 3's BatchNormalization as ``moments`` + ``batch_normalization`` and
their gradients (a dozen passes over memory), and the depthwise filter gradient at a fraction of
the CPU's speed (slower still in bfloat16). Here: :func:`gelu_fused` computes GELU and its
gradient as one XLA loop each; :func:`batch_norm_train_fused` is TensorFlow's fused BatchNorm
kernel (oneDNN on x86); :func:`depthwise_conv2d_fused` computes the filter gradient as a grouped
convolution's. Float32 and bfloat16 (``mixed_bfloat16``) alike; docs/performance.md has the
measurements.

:func:`activation_layer`, :func:`batch_norm` and :func:`depthwise_conv` choose the layer the
builder (:mod:`convmixer_tf.model`) puts in a model: the fused subclasses for Keras 3 models that
train on CPUs (:func:`use_fused`), the stock classes for tf_keras (tensorflow-model-optimization
keys its quantization policy on those) and wherever a GPU or TPU trains the model: the fused
passes were measured on CPUs only, and the grouped-convolution filter gradient does 8x the
multiply-adds of the depthwise one, a trade that only pays where the depthwise kernel is slow. The
fused classes keep the stock classes' configs and weights and are registered as
``convmixer_tf>GELU``, ``convmixer_tf>FusedBatchNormalization`` and
``convmixer_tf>FusedDepthwiseConv2D``, so that files saved with them load through
:func:`convmixer_tf.load_model`; the files the project writes hold the stock classes
(:func:`stock_class`).
"""

from __future__ import annotations

import functools
import importlib

import tensorflow as tf

ACCELERATORS = ("GPU", "TPU")


def device_type(devices) -> str:
    """``"TPU"``, ``"GPU"`` or ``"CPU"``: the accelerator among ``devices`` (device names such as
    ``"/job:worker/replica:0/task:0/device:GPU:0"``), else ``"CPU"``.

    Example:
        >>> device_type(["/job:localhost/replica:0/task:0/device:CPU:0"])
        'CPU'
        >>> device_type(["/device:CPU:0", "/job:worker/task:1/device:TPU:3"])
        'TPU'
    """
    kinds = {tf.DeviceSpec.from_string(name).device_type for name in devices}
    return next((kind for kind in ACCELERATORS[::-1] if kind in kinds), "CPU")


def training_device_type() -> str:
    """The kind of device a model built now trains on: the devices of the current
    tf.distribute strategy (``MirroredStrategy``, ``TPUStrategy``, ...), or outside one,
    where TensorFlow places ops (the first GPU when one is visible)."""
    strategy = tf.distribute.get_strategy()
    if tf.distribute.has_strategy():
        return device_type(strategy.extended.worker_devices)
    return device_type(device.name for device in tf.config.list_logical_devices())


def use_fused(keras) -> bool:
    """Whether the builder puts the fused layers into a model of ``keras``: Keras 3 models that
    train on CPUs (:func:`training_device_type`). GPUs and TPUs get the stock layers until a
    measurement on such a device says otherwise (docs/performance.md)."""
    return keras.__name__ == "keras" and training_device_type() == "CPU"


def batch_norm(keras, name: str, epsilon: float, momentum: float, synchronized: bool = False):
    """A BatchNorm layer of ``keras`` with the given epsilon and momentum.

    Keras 3 models on CPUs (:func:`use_fused`) get :func:`batch_norm_layer_class`'s subclass
    (fused training pass), unless ``synchronized``; tf_keras models keep
    ``BatchNormalization`` (already a fused kernel there, and tensorflow-model-optimization keys
    its quantization policy on that class), and so do models trained on a GPU or TPU.
    """
    if synchronized:
        return keras.layers.BatchNormalization(
            epsilon=epsilon, momentum=momentum, name=name, synchronized=True
        )
    layer_class = keras.layers.BatchNormalization
    if use_fused(keras):
        layer_class = batch_norm_layer_class(keras)
    return layer_class(epsilon=epsilon, momentum=momentum, name=name)


def batch_norm_train_fused(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float):
    """Training-mode BatchNorm of an NHWC tensor: ``(y, batch mean, batch variance)``.

    ``y = (x - mean) / sqrt(variance + epsilon) * gamma + beta`` with the batch's (biased)
    statistics, as ``keras.layers.BatchNormalization(...)(x, training=True)`` computes it, in
    TensorFlow's fused kernel (``FusedBatchNormV3``, oneDNN's on x86; its gradient is
    ``FusedBatchNormGradV3``): one op per direction instead of the dozen kernels of Keras 3's
    ``moments`` + ``batch_normalization`` and their gradients. ``x`` may be float32, float16 or
    bfloat16 (``y`` and the gradient of ``x`` keep its dtype); ``gamma``, ``beta`` and the
    statistics are float32. No gradient flows through the returned statistics.

    Example:
        >>> x = tf.random.normal((8, 4, 4, 3))
        >>> y, mean, variance = batch_norm_train_fused(x, tf.ones(3), tf.zeros(3), 1e-5)
        >>> bool(tf.reduce_max(tf.abs(tf.reduce_mean(y, [0, 1, 2]))) < 1e-5)
        True
    """
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, epsilon=epsilon, data_format="NHWC", is_training=True
    )[:3]
    # The kernel returns the unbiased (Bessel-corrected) variance for the moving average;
    # Keras' layers average the biased one, which y is normalized with.
    count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
    variance = variance * tf.maximum(count - 1.0, 0.0) / count
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance)


@functools.cache
def batch_norm_layer_class(keras):
    """Keras 3's ``BatchNormalization`` whose training pass runs :func:`batch_norm_train_fused`.

    Same config, weights, moving-average update and inference as the parent class; other
    settings (masks, renorm, synchronized, axis not last, inputs not 4-D, no scale or center)
    use the parent's ``call``. Registered as ``"convmixer_tf>FusedBatchNormalization"``.

    Example:
        >>> import keras
        >>> layer = batch_norm_layer_class(keras)(epsilon=1e-5, momentum=0.9)
        >>> isinstance(layer, keras.layers.BatchNormalization)
        True
    """

    @keras.saving.register_keras_serializable(package="convmixer_tf")
    class FusedBatchNormalization(keras.layers.BatchNormalization):
        """BatchNormalization whose training pass is TensorFlow's fused kernel."""

        def call(self, inputs, training=None, mask=None):
            fusable = (
                training is True
                and self.trainable
                and mask is None
                and self.scale
                and self.center
                and not self.renorm
                and not self.synchronized
                and len(inputs.shape) == 4
                and self.axis in (-1, 3)
            )
            if not fusable:
                return super().call(inputs, training=training, mask=mask)
            # float32 statistics and parameters under mixed precision, as the parent class
            # computes them; the kernel reads and writes the compute dtype (bfloat16).
            gamma = tf.cast(self.gamma, tf.float32)
            beta = tf.cast(self.beta, tf.float32)
            y, mean, variance = batch_norm_train_fused(inputs, gamma, beta, self.epsilon)
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + variance * (1.0 - momentum)
            )
            return y

    return FusedBatchNormalization


# Exact GELU: gelu(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt(2))) / 2 (the standard normal CDF),
# gelu'(x) = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi). The erf form is tf.nn.gelu's and PyTorch's;
# XLA computes it 2x faster than erfc(-x / sqrt(2)) / 2.
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _normal_cdf(x32: tf.Tensor) -> tf.Tensor:
    # XLA's float32 erf stops short of +-1 (erf(-21) = -0.99999991): beyond |x| = 6, where
    # erf(x / sqrt(2)) is +-1 in float32, take the limit so that gelu(-30) is 0 as in tf.nn.gelu.
    erf = tf.where(tf.abs(x32) > 6.0, tf.sign(x32), tf.math.erf(x32 * _SQRT_HALF))
    return 0.5 + 0.5 * erf


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def _gelu_forward(x: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    x32 = tf.cast(x, tf.float32)
    return tf.cast(x32 * _normal_cdf(x32), like.dtype)


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def _gelu_backward(x: tf.Tensor, upstream: tf.Tensor) -> tf.Tensor:
    x32 = tf.cast(x, tf.float32)
    derivative = _normal_cdf(x32) + x32 * _INV_SQRT_2PI * tf.exp(-0.5 * x32 * x32)
    return tf.cast(tf.cast(upstream, tf.float32) * derivative, x.dtype)


def gelu_fused(x: tf.Tensor, output_dtype: tf.DType | None = None):
    """Exact (erf) GELU whose forward and backward passes are each one XLA-fused loop.

    The same function as ``keras.activations.gelu(x, approximate=False)`` (= ``tf.nn.gelu``),
    equal within float32 rounding, values and gradients. TensorFlow runs ``tf.nn.gelu`` as five
    elementwise kernels and its automatic gradient as about ten more, each a pass over memory;
    here each direction is one pass (XLA on this function only: whole-model ``jit_compile`` is
    slower on CPU, whose XLA convolutions are slow). Computes in float32 for float16/bfloat16;
    the output has ``output_dtype`` (default: ``x``'s), the gradient ``x``'s dtype.

    Example:
        >>> import numpy as np
        >>> x = tf.constant([-3.0, -1.0, 0.0, 1.0, 3.0])
        >>> bool(np.allclose(gelu_fused(x), tf.nn.gelu(x, approximate=False), atol=1e-6))
        True
    """
    x = tf.convert_to_tensor(x)
    like = tf.zeros((), output_dtype or x.dtype)

    @tf.custom_gradient
    def gelu(x):
        def grad(upstream):
            return _gelu_backward(x, upstream)

        return _gelu_forward(x, like), grad

    return gelu(x)


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


# Channels per group of the grouped convolution that computes the depthwise filter gradient
# (see depthwise_conv2d_fused). oneDNN's grouped-conv filter gradient with 8 channels per group
# does 8x the depthwise conv's multiply-adds, yet is 2x faster in float32 and 5x in bfloat16
# than TensorFlow's DepthwiseConv2dNativeBackpropFilter (docs/performance.md).
_FILTER_GRAD_GROUP = 8


def _filter_grad_group(channels: int) -> int:
    return max(g for g in range(1, _FILTER_GRAD_GROUP + 1) if channels % g == 0)


def depthwise_filter_gradient(x, upstream, kernel_size, padding: str = "SAME"):
    """The gradient of ``depthwise_conv2d(x, w, stride 1)`` with respect to ``w`` (multiplier 1).

    ``dW[i, j, c] = sum over n, h, w of x_padded[n, h + i, w + j, c] * upstream[n, h, w, c]``,
    computed as the filter gradient of a grouped convolution (``g`` channels per group, each
    output channel seeing the ``g`` inputs of its group) whose diagonal is the depthwise
    gradient: the same sums, through oneDNN's fast grouped-convolution kernel. Returns
    ``(kh, kw, C, 1)`` in ``x``'s dtype.

    Example:
        >>> x = tf.random.normal((2, 6, 6, 16))
        >>> w = tf.random.normal((3, 3, 16, 1))
        >>> with tf.GradientTape() as tape:
        ...     tape.watch(w)
        ...     y = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME")
        >>> expected = tape.gradient(y, w, output_gradients=tf.ones_like(y))
        >>> got = depthwise_filter_gradient(x, tf.ones_like(y), (3, 3))
        >>> bool(tf.reduce_max(tf.abs(got - expected)) < 1e-4)
        True
    """
    channels = x.shape[-1]
    group = _filter_grad_group(channels)
    grouped = tf.raw_ops.Conv2DBackpropFilter(
        input=x,
        filter_sizes=(*kernel_size, group, channels),
        out_backprop=upstream,
        strides=[1, 1, 1, 1],
        padding=padding,
    )
    # Output channel c sees input channel c at position c % group of its group: the diagonal.
    grouped = tf.reshape(grouped, (*kernel_size, group, channels // group, group))
    diagonal = tf.reshape(tf.eye(group, dtype=grouped.dtype), (group, 1, group))
    return tf.reshape(tf.reduce_sum(grouped * diagonal, 2), (*kernel_size, channels, 1))


def depthwise_conv2d_fused(x: tf.Tensor, kernel: tf.Tensor, padding: str = "SAME"):
    """``tf.nn.depthwise_conv2d(x, kernel, stride 1, padding)`` (multiplier 1, NHWC) with a
    faster filter gradient on CPU (:func:`depthwise_filter_gradient`); the same values and
    input gradient (TensorFlow's own kernels).

    Example:
        >>> x = tf.random.normal((2, 6, 6, 4))
        >>> w = tf.random.normal((5, 5, 4, 1))
        >>> y = depthwise_conv2d_fused(x, w)
        >>> bool(tf.reduce_max(tf.abs(y - tf.nn.depthwise_conv2d(x, w, [1] * 4, "SAME"))) == 0)
        True
    """
    strides = [1, 1, 1, 1]

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.depthwise_conv2d(x, kernel, strides, padding)

        def grad(upstream):
            d_x = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                input_sizes=tf.shape(x),
                filter=kernel,
                out_backprop=upstream,
                strides=strides,
                padding=padding,
            )
            return d_x, depthwise_filter_gradient(x, upstream, kernel.shape[:2], padding)

        return y, grad

    return conv(x, kernel)


@functools.cache
def depthwise_conv_layer_class(keras):
    """Keras 3's ``DepthwiseConv2D`` whose filter gradient is :func:`depthwise_filter_gradient`.

    Same config, weights and outputs as the parent class. Inference, and settings other than
    stride 1, dilation 1, multiplier 1 and channels last, use the parent's ``call``. Registered as
    ``"convmixer_tf>FusedDepthwiseConv2D"``.

    Example:
        >>> import keras
        >>> layer = depthwise_conv_layer_class(keras)(5, padding="same")
        >>> isinstance(layer, keras.layers.DepthwiseConv2D)
        True
    """

    @keras.saving.register_keras_serializable(package="convmixer_tf")
    class FusedDepthwiseConv2D(keras.layers.DepthwiseConv2D):
        """DepthwiseConv2D with a faster filter gradient (grouped-convolution kernel)."""

        def call(self, inputs, training=None):
            fusable = (
                training is True
                and tuple(self.strides) == (1, 1)
                and tuple(self.dilation_rate) == (1, 1)
                and self.depth_multiplier == 1
                and self.data_format == "channels_last"
                and self.padding in ("same", "valid")
            )
            if not fusable:
                return super().call(inputs)
            kernel = tf.cast(self.kernel, self.compute_dtype)
            outputs = depthwise_conv2d_fused(inputs, kernel, self.padding.upper())
            if self.use_bias:
                outputs = outputs + tf.cast(self.bias, self.compute_dtype)
            if self.activation is not None:
                outputs = self.activation(outputs)
            return outputs

    return FusedDepthwiseConv2D


def depthwise_conv(keras, kernel_size: int, name: str, **kwargs):
    """The blocks' depthwise convolution ("same" padding): :func:`depthwise_conv_layer_class`'s
    subclass for Keras 3 on CPUs (:func:`use_fused`), ``DepthwiseConv2D`` otherwise
    (tensorflow-model-optimization keys its quantization policy on that class). Both compute
    the same function. ``kwargs`` go to the layer (initializers)."""
    layer_class = keras.layers.DepthwiseConv2D
    if use_fused(keras):
        layer_class = depthwise_conv_layer_class(keras)
    return layer_class(kernel_size, padding="same", name=name, **kwargs)


def stock_class(layer):
    """The stock Keras class a fused layer extends (``Activation`` for ``GELU``,
    ``BatchNormalization`` for ``FusedBatchNormalization``, ``DepthwiseConv2D`` for
    ``FusedDepthwiseConv2D``), or None for any other layer. Same config and weights:
    ``stock_class(layer).from_config(layer.get_config())`` is the layer users receive in saved
    files."""
    for fused_class in (gelu_layer_class, batch_norm_layer_class, depthwise_conv_layer_class):
        if type(layer) is fused_class(_keras3):
            return fused_class(_keras3).__bases__[0]
    return None


def activation_layer(keras, activation: str, name: str):
    """The activation layer of the blocks: the fused-gradient ``GELU`` for Keras 3 GELU models
    on CPUs (:func:`use_fused`), ``keras.layers.Activation(activation)`` otherwise.

    tf_keras models keep ``Activation("gelu")``: tensorflow-model-optimization's quantization
    (``export.quantize``) keys its policy on that layer class. Both compute the same function.
    """
    if activation == "gelu" and use_fused(keras):
        return gelu_layer_class(keras)(name=name)
    return keras.layers.Activation(activation, name=name)


# Register the Keras 3 classes at import, for files saved with them.
_keras3 = importlib.import_module("keras")
gelu_layer_class(_keras3)
batch_norm_layer_class(_keras3)
depthwise_conv_layer_class(_keras3)
