"""ConvMixer's building blocks: functions that take a tensor and return a tensor.

They are written against a ``keras``-like module passed in as ``keras`` so that the same code
builds a Keras 3 model and a tf_keras (Keras 2) model; see :mod:`convmixer_tf.model`.

Layer names follow timm's checkpoint names (``stem.0`` -> ``stem_conv``,
``blocks.{i}.0.fn.0`` -> ``blocks_{i}_dwconv``, ...), so weight import is a string mapping.
"""

from __future__ import annotations

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


def apply_stem(x, keras, dim: int, patch_size: int, activation: str, synchronized_bn: bool = False):
    """Patch embedding: ``Conv(dim, k=p, s=p)`` -> activation -> BN."""
    x = keras.layers.Conv2D(dim, patch_size, strides=patch_size, name="stem_conv")(x)
    x = keras.layers.Activation(activation, name="stem_act")(x)
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
    x = keras.layers.Activation(activation, name=f"{prefix}_dwconv_act")(x)
    x = batch_norm(keras, f"{prefix}_dwconv_bn", synchronized_bn)(x)
    x = keras.layers.Add(name=f"{prefix}_add")([x, shortcut])
    x = keras.layers.Conv2D(dim, 1, name=f"{prefix}_pwconv")(x)
    x = keras.layers.Activation(activation, name=f"{prefix}_pwconv_act")(x)
    return batch_norm(keras, f"{prefix}_pwconv_bn", synchronized_bn)(x)
