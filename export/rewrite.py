"""Exact graph rewrites of a Keras 3 ConvMixer applied before TFLite conversion.

- :func:`fold_preprocessing`: folds the input ``Normalization`` ((x - mean) / std) into the stem
  conv (valid padding, stride = kernel, so the fold is exact). The .tflite then takes raw pixels
  straight into its first CONV_2D: no SUB/MUL, and with int8 input the pixels map exactly onto the
  int8 grid.
- :func:`tile_depthwise`: replaces k x k depthwise convs (k > ``max_kernel``) by
  :class:`TiledDepthwiseConv2D`, a sum of t x t depthwise convs over shifted views of the padded
  input. XNNPACK has fast depthwise kernels only up to 5x5, so a 9x9 conv written as four 5x5
  (or nine 3x3) convs runs much faster, with the same result up to float summation order.

Example:
    >>> import convmixer_tf
    >>> from export import rewrite
    >>> model = convmixer_tf.ConvMixer(16, 1, 9, 2, input_shape=(16, 16, 3), num_classes=10)
    >>> fast = rewrite.tile_depthwise(rewrite.fold_preprocessing(model), tile=5)
    >>> fast.get_layer("blocks_0_dwconv").__class__.__name__
    'TiledDepthwiseConv2D'
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tf_keras

import convmixer_tf


@keras.saving.register_keras_serializable(package="convmixer_export")
class TiledDepthwiseConv2D(keras.layers.Layer):
    """A "same"-padded k x k depthwise conv (stride 1, bias) computed as t x t tiles.

    The k x k kernel, zero-extended to a multiple of ``tile``, is cut into ``ceil(k/t)**2``
    tiles, held as separate weights ``tile_{row}_{col}`` of shape ``(t, t, channels, 1)`` (so the
    converter sees plain constant filters); each tile is a "valid" t x t depthwise conv over a
    shifted window of the input padded once, and the partial results are summed. Mathematically
    identical to ``DepthwiseConv2D(k, padding="same")``; :meth:`set_kernel` takes that layer's
    weights.

    Args:
        kernel_size: k.
        tile: t, the size of the small convs (5 runs fast in XNNPACK).

    Example:
        >>> layer = TiledDepthwiseConv2D(kernel_size=9, tile=5)
        >>> tuple(layer(np.zeros((1, 8, 8, 4), "float32")).shape)
        (1, 8, 8, 4)
    """

    def __init__(self, kernel_size: int, tile: int, **kwargs):
        # kwargs: only the base Layer's (name, dtype, trainable), checked by keras.Layer.
        super().__init__(**kwargs)
        if tile < 1 or kernel_size < 1:
            raise ValueError(
                f"`kernel_size` and `tile` must be >= 1. Received: kernel_size={kernel_size}, "
                f"tile={tile}"
            )
        self.kernel_size = int(kernel_size)
        self.tile = int(tile)
        self.tiles_per_side = math.ceil(self.kernel_size / self.tile)

    def build(self, input_shape):
        channels = input_shape[-1]
        t = self.tile
        self.tile_kernels = [
            [
                self.add_weight(name=f"tile_{row}_{col}", shape=(t, t, channels, 1))
                for col in range(self.tiles_per_side)
            ]
            for row in range(self.tiles_per_side)
        ]
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer="zeros")

    def set_kernel(self, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Sets the tiles from a ``DepthwiseConv2D`` kernel ``(k, k, channels, 1)`` and bias."""
        k, t, n = self.kernel_size, self.tile, self.tiles_per_side
        if kernel.shape[:2] != (k, k):
            raise ValueError(
                f"{self.name}: expected a {k}x{k} kernel. Received: shape {kernel.shape}"
            )
        extended = np.zeros((n * t, n * t, *kernel.shape[2:]), kernel.dtype)
        extended[:k, :k] = kernel
        for row in range(n):
            for col in range(n):
                self.tile_kernels[row][col].assign(
                    extended[row * t : (row + 1) * t, col * t : (col + 1) * t]
                )
        self.bias.assign(bias)

    def call(self, inputs):
        k, t, n = self.kernel_size, self.tile, self.tiles_per_side
        height, width = inputs.shape[1], inputs.shape[2]
        if height is None or width is None:
            raise ValueError(
                f"{self.name}: TiledDepthwiseConv2D needs a static height and width. "
                f"Received: input shape {inputs.shape}"
            )
        # TensorFlow's "same": total padding k - 1, the smaller half on top/left; then zeros for
        # the kernel's extension to n * t.
        before = (k - 1) // 2
        after = k - 1 - before + (n * t - k)
        padded = keras.ops.pad(inputs, [[0, 0], [before, after], [before, after], [0, 0]])
        out = None
        for row in range(n):
            for col in range(n):
                window = padded[
                    :, row * t : row * t + height + t - 1, col * t : col * t + width + t - 1, :
                ]
                part = keras.ops.depthwise_conv(
                    window, self.tile_kernels[row][col], strides=1, padding="valid"
                )
                out = part if out is None else out + part
        return out + self.bias

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "tile": self.tile}


def fold_preprocessing(model, *, keras_module: str = "keras", batch_size: int | None = None):
    """Returns an equivalent ConvMixer whose stem conv includes the input normalization.

    ``conv((x - mean) / std)`` is ``conv'(x)`` with the kernel divided by ``std`` per input
    channel and the bias shifted: exact, because the stem conv has valid padding and stride =
    kernel. The result still takes raw pixels 0..255 and the first op of its .tflite is the stem
    CONV_2D. Rebuilt with ``keras_module`` and ``batch_size`` (see :func:`convmixer_tf.rebuild`);
    a model without preprocessing is only rebuilt.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> "preprocessing" in [layer.name for layer in fold_preprocessing(model).layers]
        False
    """
    if not convmixer_tf.model_arguments(model)["include_preprocessing"]:
        return convmixer_tf.rebuild(model, keras_module=keras_module, batch_size=batch_size)
    rebuilt = convmixer_tf.rebuild(
        model, keras_module=keras_module, batch_size=batch_size, include_preprocessing=False
    )
    norm = model.get_layer("preprocessing")
    mean = np.ravel(np.asarray(norm.mean, dtype="float64"))
    std = np.sqrt(np.ravel(np.asarray(norm.variance, dtype="float64")))
    kernel, bias = (
        np.asarray(w, dtype="float64") for w in model.get_layer("stem_conv").get_weights()
    )
    # conv((x - m) / s) = conv'(x) with W' = W / s (per input channel), b' = b - sum(W m / s).
    new_kernel = kernel / std[None, None, :, None]
    new_bias = bias - np.einsum("hwcd,c->d", kernel, mean / std)
    rebuilt.get_layer("stem_conv").set_weights(
        [new_kernel.astype("float32"), new_bias.astype("float32")]
    )
    return rebuilt


def _clone_replacing(model, replacement, load_replaced):
    """Clones a Keras 3 or tf_keras functional model, swapping some layers.

    ``replacement(layer)`` returns the new layer for ``layer`` or None (cloned as it is);
    ``load_replaced(new, old)`` sets a new layer's weights from the old one's; every other layer
    gets its source's weights.
    """
    module = tf_keras if isinstance(model, tf_keras.Model) else keras
    replaced = set()

    def _clone(layer):
        new = replacement(layer)
        if new is None:
            return layer.__class__.from_config(layer.get_config())
        replaced.add(layer.name)
        return new

    if module is keras:
        # Keras 3 replays each node's call arguments (BatchNormalization's include `mask`,
        # which the replacements do not take).
        def _call(layer, *args, **kwargs):
            if layer.name in replaced:
                kwargs.pop("mask", None)
            return layer(*args, **kwargs)

        clone = keras.models.clone_model(model, clone_function=_clone, call_function=_call)
    else:
        clone = tf_keras.models.clone_model(model, clone_function=_clone)
    for layer in clone.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name)
        if layer.name in replaced:
            load_replaced(layer, source)
        else:
            layer.set_weights(source.get_weights())
    return clone


def tile_depthwise(model: keras.Model, tile: int = 5, max_kernel: int = 5) -> keras.Model:
    """Returns ``model`` with every depthwise conv larger than ``max_kernel`` tiled.

    The result computes the same function (float summation order aside). Models without such
    convs are returned unchanged.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 7, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> tiled = tile_depthwise(model, tile=3)
        >>> tiled.get_layer("blocks_0_dwconv").tile
        3
    """
    convmixer_tf.model_arguments(model)
    large = {
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.DepthwiseConv2D) and layer.kernel_size[0] > max_kernel
    }
    if not large:
        return model
    for name in large:
        layer = model.get_layer(name)
        if layer.strides != (1, 1) or layer.padding != "same" or not layer.use_bias:
            raise ValueError(
                f"Depthwise layer {name!r} cannot be tiled: needs stride 1, 'same' padding and a "
                f"bias. Received: strides={layer.strides}, padding={layer.padding!r}"
            )

    def _replacement(layer):
        if layer.name in large:
            return TiledDepthwiseConv2D(layer.kernel_size[0], tile, name=layer.name)
        return None

    return _clone_replacing(
        model, _replacement, lambda new, old: new.set_kernel(*old.get_weights())
    )


def fold_last_batch_norm(model):
    """Returns ``model`` with its last BatchNorm folded into the classifier.

    The last block ends ``BN(act(conv(x)))``, then global average pooling and the Dense head.
    A BN is a per-channel affine map, which commutes with averaging: ``mean(BN(y)) =
    BN(mean(y))``, so ``head(mean(BN(y)))`` equals ``head'(mean(y))`` with ``W' = diag(s) W``
    and ``b' = b + (beta - mean * s) W`` (``s = gamma / sqrt(var + eps)``): exact in float, one
    op fewer, and in int8 the pooled tensor comes straight from the activation instead of from
    the BN's output, whose wide, sparse range gave the int8 graph its coarsest step
    (``benchmarks.int8_layers``). A model without the classifier is returned as it is.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> [layer.name for layer in fold_last_batch_norm(model).layers][-3:]
        ['blocks_0_pwconv_act', 'avg_pool', 'head']
    """
    args = convmixer_tf.model_arguments(model)
    if not args["include_top"]:
        return model
    module = tf_keras if isinstance(model, tf_keras.Model) else keras
    last = f"blocks_{args['depth'] - 1}_pwconv_bn" if args["depth"] else "stem_bn"
    norm = model.get_layer(last)
    if not isinstance(norm, module.layers.BatchNormalization):
        raise ValueError(f"Layer {last!r} is not a BatchNormalization: {type(norm).__name__}")
    gamma, beta, mean, variance = (np.asarray(w, "float64") for w in norm.get_weights())
    scale = gamma / np.sqrt(variance + norm.epsilon)
    shift = beta - mean * scale
    kernel, bias = (np.asarray(w, "float64") for w in model.get_layer("head").get_weights())

    def _replacement(layer):
        return module.layers.Identity(name=layer.name) if layer.name == last else None

    folded = _clone_replacing(model, _replacement, lambda new, old: None)
    folded.get_layer("head").set_weights(
        [(scale[:, None] * kernel).astype("float32"), (bias + shift @ kernel).astype("float32")]
    )
    return folded


# x * sigmoid(1.702 x): the sigmoid approximation of GELU (Hendrycks & Gimpel, 2016).
SIGMOID_GELU_ALPHA = 1.702


def gelu_as_silu(model, alpha: float = SIGMOID_GELU_ALPHA):
    """Returns the ConvMixer that computes GELU as ``x * sigmoid(alpha * x)``, in stock layers.

    ``x * sigmoid(a x) = silu(a x) / a``. Each activation of ConvMixer sits between a conv and a
    BatchNorm (``BN(act(conv(x)))``), so ``a`` is folded into the conv (kernel and bias times
    ``a``) and ``1 / a`` into the BN (``BN(y / a)`` equals a BN of ``y`` with the moving mean
    times ``a`` and ``variance + eps`` times ``a**2``): the result is a plain ConvMixer with
    ``activation="silu"`` and no extra op. In int8 its activations are LOGISTIC and MUL, which
    XNNPACK runs inside its partitions and TFLite Micro has (TFLite's int8 GELU is neither).
    The approximation differs from the exact GELU by at most 0.02 (at |x| about 2); QAT on this
    graph absorbs the difference.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> convmixer_tf.model_arguments(gelu_as_silu(model))["activation"]
        'silu'
    """
    args = convmixer_tf.model_arguments(model)
    if args["activation"] != "gelu":
        raise ValueError(
            f"Only a GELU ConvMixer has a sigmoid-GELU form. Received activation "
            f"{args['activation']!r} in model {model.name!r}."
        )
    keras_module = "tf_keras" if isinstance(model, tf_keras.Model) else "keras"
    silu = convmixer_tf.rebuild(
        model, keras_module=keras_module, batch_size=model.input_shape[0], activation="silu"
    )
    convs = ["stem"] + [
        f"blocks_{i}_{part}" for i in range(args["depth"]) for part in ("dwconv", "pwconv")
    ]
    for prefix in convs:
        conv = silu.get_layer("stem_conv" if prefix == "stem" else prefix)
        kernel, bias = conv.get_weights()
        conv.set_weights([kernel * alpha, bias * alpha])
        norm = silu.get_layer(f"{prefix}_bn")
        gamma, beta, mean, variance = (np.asarray(w, "float64") for w in norm.get_weights())
        # BN(y / a): (y / a - m) / sqrt(v + eps) = (y - a m) / sqrt(a^2 (v + eps)).
        variance = alpha**2 * (variance + norm.epsilon) - norm.epsilon
        norm.set_weights([w.astype("float32") for w in (gamma, beta, mean * alpha, variance)])
    return silu


def batch_norm_as_depthwise(model):
    """Returns ``model`` with every BatchNormalization as the equal 1x1 ``DepthwiseConv2D``.

    At inference a BN is the per-channel affine ``x * s + b`` with ``s = gamma / sqrt(var +
    eps)`` and ``b = beta - mean * s``. After an activation (ConvMixer's order) the converter
    cannot fold it into a conv and emits MUL + ADD; in an int8 graph the MUL's constant ``s`` is
    then quantized with ONE scale for all channels, which flattens the small multipliers (a
    channel with ``s`` 100 times below the largest keeps under 2 of its 8 bits). As a 1x1
    depthwise conv the same affine gets per-channel int8 weights and an int32 bias, like every
    other conv: one DEPTHWISE_CONV_2D op instead of two, exact in float. Works on Keras 3 and
    tf_keras ConvMixers (tensorflow-model-optimization then quantizes it as a depthwise conv).

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> type(batch_norm_as_depthwise(model).get_layer("stem_bn")).__name__
        'DepthwiseConv2D'
    """
    convmixer_tf.model_arguments(model)
    module = tf_keras if isinstance(model, tf_keras.Model) else keras
    norms = {
        layer.name: layer
        for layer in model.layers
        if isinstance(layer, module.layers.BatchNormalization)
    }
    for layer in norms.values():
        if not (layer.scale and layer.center) or layer.axis not in (-1, [-1], [3], 3):
            raise ValueError(
                f"BatchNormalization {layer.name!r} cannot become a depthwise conv: needs "
                f"scale, center and the channel axis last. Received: axis={layer.axis}"
            )

    def _replacement(layer):
        if layer.name in norms:
            return module.layers.DepthwiseConv2D(1, use_bias=True, name=layer.name)
        return None

    def _load(new, old):
        gamma, beta, mean, variance = (np.asarray(w, "float64") for w in old.get_weights())
        scale = gamma / np.sqrt(variance + old.epsilon)
        new.set_weights(
            [scale.reshape(1, 1, -1, 1).astype("float32"), (beta - mean * scale).astype("float32")]
        )

    return _clone_replacing(model, _replacement, _load)
