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
import convmixer_tf.model


def convmixer_arguments(model) -> dict:
    """Recovers the :func:`convmixer_tf.ConvMixer` arguments of a built ConvMixer.

    Works on Keras 3 and tf_keras models (read from layer names and configs, see
    :mod:`convmixer_tf.blocks`). Raises a ValueError naming the missing layer if ``model`` is not
    a ConvMixer.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 2, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> convmixer_arguments(model)["depth"]
        2
    """
    names = {layer.name for layer in getattr(model, "layers", [])}
    for required in ("stem_conv", "stem_act", "stem_bn", "blocks_0_dwconv"):
        if required not in names:
            raise ValueError(
                f"Model {getattr(model, 'name', model)!r} is not a ConvMixer built by "
                f"convmixer_tf: it has no layer named {required!r}."
            )
    depth = 0
    while f"blocks_{depth}_dwconv" in names:
        depth += 1
    stem = model.get_layer("stem_conv")
    dwconv = model.get_layer("blocks_0_dwconv")
    activation = model.get_layer("stem_act").get_config()["activation"]
    if not isinstance(activation, str):
        raise ValueError(f"Unsupported activation in 'stem_act': {activation!r}")
    args = {
        "dim": int(stem.filters),
        "depth": depth,
        "kernel_size": int(dwconv.kernel_size[0]),
        "patch_size": int(stem.kernel_size[0]),
        "activation": activation,
        "input_shape": tuple(model.input_shape[1:]),
        "include_preprocessing": "preprocessing" in names,
        "include_top": "head" in names,
        "synchronized_bn": bool(model.get_layer("stem_bn").get_config().get("synchronized")),
        "name": model.name,
    }
    if args["include_preprocessing"]:
        norm = model.get_layer("preprocessing")
        mean = np.ravel(np.asarray(norm.mean, dtype="float64"))
        variance = np.ravel(np.asarray(norm.variance, dtype="float64"))
        args["mean"] = tuple(float(v) for v in mean / 255.0)
        args["std"] = tuple(float(v) for v in np.sqrt(variance) / 255.0)
    if args["include_top"]:
        head = model.get_layer("head")
        args["num_classes"] = int(head.units)
        head_activation = head.get_config()["activation"]
        args["classifier_activation"] = None if head_activation == "linear" else head_activation
    else:
        args["pooling"] = "avg" if "avg_pool" in names else "max" if "max_pool" in names else None
    return args


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
        >>> layer(np.zeros((1, 8, 8, 4), "float32")).shape
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


def rebuild(
    model,
    *,
    keras_module: str = "keras",
    batch_size: int | None = None,
    fold_preprocessing: bool = False,
):
    """Rebuilds a ConvMixer from :func:`convmixer_tf.ConvMixer` with the same weights.

    Args:
        model: a ConvMixer (Keras 3 or tf_keras), e.g. loaded from a ``.keras`` file.
        keras_module: ``"keras"`` (Keras 3) or ``"tf_keras"`` (for tfmot).
        batch_size: a static batch size for the input (1 for edge exports) or None.
        fold_preprocessing: fold the input normalization ((x - mean) / std) into the stem conv
            (valid padding, stride = kernel: exact). The rebuilt model still takes raw pixels
            0..255, and the first op of its .tflite is the stem CONV_2D.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> rebuild(model, keras_module="tf_keras", batch_size=1).input_shape
        (1, 16, 16, 3)
    """
    args = convmixer_arguments(model)
    fold = fold_preprocessing and args["include_preprocessing"]
    if fold:
        args["include_preprocessing"] = False
    target_keras = convmixer_tf.model.resolve_keras(keras_module)
    input_shape = args.pop("input_shape")
    pixels = target_keras.Input(shape=input_shape, batch_size=batch_size, name="pixels")
    rebuilt = convmixer_tf.ConvMixer(**args, input_tensor=pixels, keras_module=keras_module)
    for layer in rebuilt.layers:
        if layer.weights:
            source = model.get_layer(layer.name).get_weights()
            if [w.shape for w in source] != [tuple(w.shape) for w in layer.get_weights()]:
                raise ValueError(
                    f"Cannot rebuild layer {layer.name!r}: weight shapes differ "
                    f"({[w.shape for w in source]} vs {[w.shape for w in layer.get_weights()]})."
                )
            layer.set_weights(source)
    if fold:
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


def fold_preprocessing(model):
    """Returns an equivalent ConvMixer whose stem conv includes the input normalization.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> "preprocessing" in [layer.name for layer in fold_preprocessing(model).layers]
        False
    """
    return rebuild(model, fold_preprocessing=True)


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
    convmixer_arguments(model)
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
    convmixer_arguments(model)
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
