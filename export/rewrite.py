"""Exact graph rewrites of a Keras 3 ConvMixer applied before TFLite conversion.

- :func:`fold_preprocessing`: folds the input ``Normalization`` ((x - mean) / std) into the stem
  conv (valid padding, stride = kernel, so the fold is exact). The .tflite then takes raw pixels
  straight into its first CONV_2D: no SUB/MUL, and with int8 input the pixels map exactly onto the
  int8 grid.
- :func:`tile_depthwise`: replaces k x k depthwise convs (k > ``max_kernel``) by a sum of t x t
  depthwise convs over shifted windows of the padded input, in stock layers. XNNPACK has fast
  depthwise kernels only up to 5x5, so a 9x9 conv written as nine 3x3 convs runs much faster,
  with the same result up to float summation order.

Example:
    >>> import convmixer_tf
    >>> from export import rewrite
    >>> model = convmixer_tf.ConvMixer(16, 1, 9, 2, input_shape=(16, 16, 3), num_classes=10)
    >>> fast = rewrite.tile_depthwise(rewrite.fold_preprocessing(model), tile=5)
    >>> fast.get_layer("blocks_0_dwconv_tile_1_1").__class__.__name__
    'DepthwiseConv2D'
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tf_keras

import convmixer_tf


def _module(model):
    """The Keras (3 or tf_keras) that built ``model``."""
    return tf_keras if isinstance(model, tf_keras.Model) else keras


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
    module = _module(model)
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


def _parents(layer, module) -> list:
    """The layers whose outputs ``layer`` was called on, in argument order (its first call)."""
    if module is tf_keras:
        inbound = layer.inbound_nodes[0].inbound_layers
        return list(inbound) if isinstance(inbound, list | tuple) else [inbound]
    # Keras 3 keeps a node's parents on the private `_inbound_nodes` (no public accessor).
    return [parent.operation for parent in layer._inbound_nodes[0].parent_nodes]


def tile_depthwise(model, tile: int = 3, max_kernel: int = 5):
    """Returns ``model`` with every depthwise conv larger than ``max_kernel`` tiled, in stock
    layers (Keras 3 or tf_keras, as ``model``).

    A "same" k x k depthwise conv (stride 1) becomes: one ``ZeroPadding2D`` (TensorFlow's "same"
    padding, plus zeros for the kernel's extension to a multiple of t), then per t x t tile a
    ``Cropping2D`` window of it and a "valid" t x t ``DepthwiseConv2D`` (the first one carries
    the bias), summed by ``Add`` layers: PAD, STRIDED_SLICE, DEPTHWISE_CONV_2D and ADD in the
    .tflite. XNNPACK's fast depthwise kernels stop at 5x5 (docs/performance.md: 109.5 ms plain
    against 15.8 ms in 3x3 tiles for ConvMixer-1024/20's depthwise part). Because every piece is
    a stock layer, tensorflow-model-optimization quantizes each tile and each partial sum as
    the int8 graph computes them, so a QAT export is tiled too (:mod:`export.quantize`).

    The result computes the same function (float summation order aside); a model without
    such convs is returned as it is. Layers keep their names; the tiles of ``blocks_0_dwconv``
    are ``blocks_0_dwconv_tile_{row}_{col}``.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 7, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> tiled = tile_depthwise(model, tile=3)
        >>> tiled.get_layer("blocks_0_dwconv_tile_2_2").kernel_size
        (3, 3)
    """
    if tile < 1:
        raise ValueError(f"`tile` must be >= 1. Received: tile={tile}")
    convmixer_tf.model_arguments(model)
    module = _module(model)
    large = {
        layer.name
        for layer in model.layers
        if isinstance(layer, module.layers.DepthwiseConv2D) and layer.kernel_size[0] > max_kernel
    }
    if not large:
        return model
    for name in large:
        layer = model.get_layer(name)
        if tuple(layer.strides) != (1, 1) or layer.padding != "same" or not layer.use_bias:
            raise ValueError(
                f"Depthwise layer {name!r} cannot be tiled: needs stride 1, 'same' padding and a "
                f"bias. Received: strides={layer.strides}, padding={layer.padding!r}"
            )
        if None in layer.input.shape[1:3]:
            raise ValueError(
                f"Depthwise layer {name!r} cannot be tiled without a static height and width. "
                f"Received: input shape {layer.input.shape}"
            )

    (input_layer,) = [layer for layer in model.layers if type(layer).__name__ == "InputLayer"]
    inputs = module.Input(batch_shape=tuple(model.input_shape), name=input_layer.name)
    outputs = {input_layer.name: inputs}
    weights = {}  # new layer -> its weights
    for layer in model.layers:
        if layer is input_layer:
            continue
        args = [outputs[parent.name] for parent in _parents(layer, module)]
        x = args[0] if len(args) == 1 else args
        if layer.name in large:
            outputs[layer.name] = _tiled(module, layer, x, tile, weights)
        else:
            clone = layer.__class__.from_config(layer.get_config())
            outputs[layer.name] = clone(x)
            weights[clone] = layer.get_weights()
    model_outputs = [outputs[layer.name] for layer in _output_layers(model)]
    tiled = module.Model(inputs, model_outputs[0] if len(model_outputs) == 1 else model_outputs,
                         name=model.name)  # fmt: skip
    for layer, values in weights.items():
        layer.set_weights(values)
    return tiled


def _output_layers(model) -> list:
    if isinstance(model, tf_keras.Model):
        return list(model._output_layers)
    return [tensor._keras_history.operation for tensor in model.outputs]


def _tiled(module, layer, x, t: int, weights: dict):
    """The stock-layer subgraph of one tiled k x k depthwise conv on ``x`` (see tile_depthwise)."""
    k = layer.kernel_size[0]
    n = math.ceil(k / t)
    height, width = x.shape[1], x.shape[2]
    kernel, bias = layer.get_weights()
    extended = np.zeros((n * t, n * t, *kernel.shape[2:]), kernel.dtype)
    extended[:k, :k] = kernel
    # TensorFlow's "same": total padding k - 1, the smaller half on top/left; then zeros for
    # the kernel's extension to n * t.
    before = (k - 1) // 2
    after = k - 1 - before + (n * t - k)
    padded = module.layers.ZeroPadding2D(((before, after), (before, after)),
                                         name=f"{layer.name}_pad")(x)  # fmt: skip
    padded_height, padded_width = height + before + after, width + before + after
    total = None
    for row in range(n):
        for col in range(n):
            name = f"{layer.name}_tile_{row}_{col}"
            top, left = row * t, col * t
            window = module.layers.Cropping2D(
                ((top, padded_height - (top + height + t - 1)),
                 (left, padded_width - (left + width + t - 1))),
                name=f"{name}_window",
            )(padded)  # fmt: skip
            first = total is None
            conv = module.layers.DepthwiseConv2D(t, padding="valid", use_bias=first, name=name)
            part = conv(window)
            tile_kernel = extended[row * t : (row + 1) * t, col * t : (col + 1) * t]
            weights[conv] = [tile_kernel, bias] if first else [tile_kernel]
            total = part if first else module.layers.Add(name=f"{name}_sum")([total, part])
    return total


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
        >>> type(fold_last_batch_norm(model).get_layer("blocks_0_pwconv_bn")).__name__
        'Identity'
    """
    args = convmixer_tf.model_arguments(model)
    if not args["include_top"]:
        return model
    module = _module(model)
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
    keras_module = _module(model).__name__  # "keras" or "tf_keras"
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
    module = _module(model)
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
