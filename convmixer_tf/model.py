"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, arXiv:2201.09792): the whole model.

Stem, block and head are :func:`apply_stem`, :func:`apply_block` and the end of
:func:`ConvMixer`. One functional builder serves Keras 3 (the default) and tf_keras (Keras 2,
needed by tensorflow-model-optimization and by multi-worker ``fit``): every layer is created
through the module passed as ``keras_module``, so both get the same graph, layer names and
weights order. Layer names follow timm's checkpoint names (``stem.0`` -> ``stem_conv``,
``blocks.{i}.0.fn.0`` -> ``blocks_{i}_dwconv``, ...), so weight import is a string mapping.

The activation and BatchNorm layers come from :mod:`convmixer_tf.fused`: for Keras 3 they are
subclasses of the stock layers with a faster training pass on CPU, the same function and weights.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence

from convmixer_tf import fused, presets
from convmixer_tf.constants import ACTIVATIONS, INITIALIZATIONS, KERAS_MODULES, POOLINGS

# PyTorch's BatchNorm2d defaults. Keras' own (epsilon 1e-3, momentum 0.99) do not reproduce the
# paper's checkpoints: the epsilon changes every output, and the momentum the training dynamics.
# Keras' momentum is the weight of the old statistics: 1 - PyTorch's momentum (0.1).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def is_tf_keras_model(model) -> bool:
    """Whether ``model`` is a tf_keras (Keras 2) object rather than a Keras 3 one."""
    return type(model).__module__.split(".")[0] == "tf_keras"


def resolve_keras(keras_module="keras"):
    """Returns the keras-like module for ``"keras"`` (Keras 3), ``"tf_keras"``, or a module."""
    if not isinstance(keras_module, str):
        return keras_module
    if keras_module not in KERAS_MODULES:
        raise ValueError(
            f"`keras_module` must be one of {KERAS_MODULES} or a module. "
            f"Received: keras_module={keras_module!r}"
        )
    return importlib.import_module(keras_module)


def initializers(keras, initialization: str, fan_in: int, kernel_arg: str = "kernel") -> dict:
    """The kernel and bias initializer arguments of a layer whose outputs each sum ``fan_in``
    inputs: ``{}`` (Keras' defaults) or PyTorch's defaults for ``nn.Conv2d`` / ``nn.Linear``
    (``kaiming_uniform_(a=sqrt(5))``: kernel and bias both U(+-1/sqrt(fan_in))), as stock
    ``RandomUniform`` initializers.

    Keras' Glorot fans count all input channels also for a depthwise kernel (``k*k*dim``), so
    its depthwise kernels start ``sqrt(dim)`` times smaller than PyTorch's (0.03 vs 0.2 for
    ConvMixer-256 k5).

    Example:
        >>> import keras
        >>> init = initializers(keras, "pytorch", fan_in=25)["kernel_initializer"]
        >>> init.get_config()["maxval"]
        0.2
    """
    if initialization == "keras":
        return {}
    bound = 1.0 / math.sqrt(fan_in)
    return {
        f"{kernel_arg}_initializer": keras.initializers.RandomUniform(-bound, bound),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


def apply_stem(
    x,
    keras,
    dim: int,
    patch_size: int,
    activation: str,
    synchronized_bn: bool = False,
    initialization: str = "keras",
):
    """Patch embedding: ``Conv(dim, k=p, s=p)`` -> activation -> BN."""
    fan_in = int(x.shape[-1]) * patch_size * patch_size
    x = keras.layers.Conv2D(
        dim,
        patch_size,
        strides=patch_size,
        name="stem_conv",
        **initializers(keras, initialization, fan_in),
    )(x)
    x = fused.activation_layer(keras, activation, "stem_act")(x)
    return fused.batch_norm(keras, "stem_bn", BN_EPSILON, BN_MOMENTUM, synchronized_bn)(x)


def apply_block(
    x,
    keras,
    index: int,
    dim: int,
    kernel_size: int,
    activation: str,
    synchronized_bn: bool = False,
    initialization: str = "keras",
):
    """One ConvMixer block.

    ``x = BN(act(DepthwiseConv(x))) + x`` (the residual wraps the depthwise part only), then
    ``x = BN(act(Conv1x1(x)))``. Note the order conv -> activation -> BN.
    """
    prefix = f"blocks_{index}"
    shortcut = x
    x = fused.depthwise_conv(
        keras,
        kernel_size,
        f"{prefix}_dwconv",
        **initializers(keras, initialization, kernel_size * kernel_size, "depthwise"),
    )(x)
    x = fused.activation_layer(keras, activation, f"{prefix}_dwconv_act")(x)
    x = fused.batch_norm(keras, f"{prefix}_dwconv_bn", BN_EPSILON, BN_MOMENTUM, synchronized_bn)(x)
    x = keras.layers.Add(name=f"{prefix}_add")([x, shortcut])
    x = keras.layers.Conv2D(
        dim, 1, name=f"{prefix}_pwconv", **initializers(keras, initialization, dim)
    )(x)
    x = fused.activation_layer(keras, activation, f"{prefix}_pwconv_act")(x)
    return fused.batch_norm(keras, f"{prefix}_pwconv_bn", BN_EPSILON, BN_MOMENTUM, synchronized_bn)(
        x
    )


def _check_input_shape(input_shape, patch_size: int) -> tuple:
    if input_shape is None:
        return (None, None, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(
            "`input_shape` must be (height, width, 3): the model takes RGB images, channels last. "
            f"Received: input_shape={input_shape}"
        )
    for size in input_shape[:2]:
        if size is not None and (size < patch_size or size % patch_size):
            raise ValueError(
                f"Image height and width must be multiples of the patch size ({patch_size}). "
                f"Received: input_shape={input_shape}"
            )
    return input_shape


def ConvMixer(  # noqa: N802 (keras.applications naming)
    dim: int,
    depth: int,
    kernel_size: int = 9,
    patch_size: int = 7,
    *,
    include_top: bool = True,
    include_preprocessing: bool = True,
    input_shape: Sequence[int | None] | None = None,
    input_tensor=None,
    pooling: str | None = None,
    num_classes: int = 1000,
    classifier_activation: str | None = None,
    activation: str = "gelu",
    mean: Sequence[float] = presets.IMAGENET_MEAN,
    std: Sequence[float] = presets.IMAGENET_STD,
    synchronized_bn: bool = False,
    initialization: str = "keras",
    weights: str | None = None,
    name: str = "convmixer",
    keras_module="keras",
):
    """Builds a ConvMixer as a Keras functional model.

    Args:
        dim: channels of every layer (the "hidden dimension" h).
        depth: number of ConvMixer blocks.
        kernel_size: depthwise kernel size k (odd or even; "same" padding as PyTorch pads it).
        patch_size: patch size p of the stem (kernel and stride).
        include_top: whether to end with global average pooling and the Dense classifier.
        include_preprocessing: whether the model normalizes its input itself. If True (default),
            the model takes raw RGB pixels in [0, 255] and applies ``(x / 255 - mean) / std``.
        input_shape: ``(height, width, 3)``; height and width multiples of ``patch_size`` or None.
        input_tensor: optional Keras tensor to use as the model's input.
        pooling: with ``include_top=False``: ``"avg"``, ``"max"`` or None (the feature map).
        num_classes: number of classes of the classifier.
        classifier_activation: activation of the classifier; None (default) returns logits.
            The classifier computes in float32 under mixed precision.
        activation: ``"gelu"`` (exact, erf form, as PyTorch's nn.GELU), ``"relu"`` or
            ``"silu"``.
        mean, std: per-channel statistics of the preprocessing, in [0, 1] pixel units.
        synchronized_bn: synchronize BatchNorm statistics across replicas (tf.distribute).
        initialization: the initial weights when ``weights`` is None: ``"keras"`` (default;
            Glorot-uniform kernels, zero biases) or ``"pytorch"`` (PyTorch's defaults, as the
            paper's models are trained from: kernels and biases U(+-1/sqrt(fan_in)) with the fan
            per group, so depthwise kernels U(+-1/k); BatchNorm as Keras).
        weights: None (random initialization), the path of a Keras weights file
            (``.weights.h5``), the path or URL of a PyTorch checkpoint (see
            :func:`convmixer_tf.load_pretrained`), or ``"imagenet"`` (the published checkpoint).
        name: the model's name.
        keras_module: ``"keras"`` (Keras 3, default), ``"tf_keras"`` or a keras-like module.

    Returns:
        A ``keras.Model`` (of ``keras_module``).

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(256, 8, kernel_size=5, patch_size=2,
        ...                                input_shape=(32, 32, 3), num_classes=10)
        >>> model.output_shape
        (None, 10)
    """
    keras = resolve_keras(keras_module)
    for arg_name, value in (
        ("dim", dim),
        ("depth", depth),
        ("kernel_size", kernel_size),
        ("patch_size", patch_size),
        ("num_classes", num_classes),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"`{arg_name}` must be a positive integer. Received: {arg_name}={value!r}"
            )
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"`activation` must be one of {ACTIVATIONS}. Received: activation={activation!r}"
        )
    if initialization not in INITIALIZATIONS:
        raise ValueError(
            f"`initialization` must be one of {INITIALIZATIONS}. "
            f"Received: initialization={initialization!r}"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}")
    if include_top and pooling is not None:
        raise ValueError(
            "`pooling` applies only with `include_top=False` (the classifier always uses "
            f"average pooling). Received: pooling={pooling!r}, include_top={include_top}"
        )
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(
            f"`mean` and `std` need 3 values each, std > 0. Received: mean={mean}, std={std}"
        )
    input_shape = _check_input_shape(input_shape, patch_size)

    if input_tensor is None:
        inputs = keras.Input(shape=input_shape, name="pixels")
    else:
        inputs = input_tensor
    x = inputs
    if include_preprocessing:
        # (x / 255 - mean) / std as one affine layer; no Lambda, so safe_mode loading works.
        x = keras.layers.Normalization(
            mean=[255.0 * m for m in mean],
            variance=[(255.0 * s) ** 2 for s in std],
            name="preprocessing",
        )(x)
    x = apply_stem(x, keras, dim, patch_size, activation, synchronized_bn, initialization)
    for i in range(depth):
        x = apply_block(x, keras, i, dim, kernel_size, activation, synchronized_bn, initialization)

    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # float32 so that logits stay float32 under mixed_float16 / mixed_bfloat16 policies.
        x = keras.layers.Dense(
            num_classes,
            activation=classifier_activation,
            dtype="float32",
            name="head",
            **initializers(keras, initialization, int(x.shape[-1])),
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)

    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model, weights: str) -> None:
    """Loads ``weights`` into ``model``: ``"imagenet"``, the URL or path of a PyTorch checkpoint
    (see :func:`convmixer_tf.load_pretrained`), or a Keras weights file.

    ``"imagenet"`` is the published checkpoint of the preset with the model's architecture; URLs
    are downloaded once into the Keras cache (see :func:`convmixer_tf.pretrained.fetch_checkpoint`).
    """
    from convmixer_tf import pretrained

    path = pretrained.resolve_weights(model, weights)
    if path.endswith(pretrained.CHECKPOINT_SUFFIXES):
        pretrained.load_pretrained(model, path)
    else:
        model.load_weights(path)


def create_model(name: str, **overrides):
    """Builds the named variant (timm's names; see ``convmixer_tf.PRESETS``).

    ``overrides`` are any keyword arguments of :func:`ConvMixer` (``num_classes``,
    ``input_shape``, ``activation``, ``keras_module``, ...). The input shape defaults to the
    variant's evaluation size.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.create_model("convmixer_256_8")
        >>> model.count_params() > 0
        True
    """
    preset = presets.get_preset(name)
    kwargs = preset.architecture()
    kwargs["input_shape"] = (*preset.input_size, 3)
    kwargs["name"] = presets.ALIASES.get(name, name)
    valid = set(_CONVMIXER_ARGS)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for create_model({name!r}). "
            f"Valid options: {', '.join(sorted(valid))}"
        )
    kwargs.update(overrides)
    return ConvMixer(**kwargs)


_CONVMIXER_ARGS = tuple(inspect.signature(ConvMixer).parameters)
