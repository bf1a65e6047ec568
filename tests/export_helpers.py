"""Shared helpers of the export tests: tiny ConvMixers with non-trivial BN statistics."""

import numpy as np

import convmixer_tf

TINY = dict(dim=16, depth=2, kernel_size=5, patch_size=2, input_shape=(16, 16, 3), num_classes=10)


def tiny_model(seed: int = 0, **overrides):
    """A tiny Keras 3 ConvMixer whose BatchNorms are not identities (so folding matters)."""
    model = convmixer_tf.ConvMixer(**{**TINY, **overrides})
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name.endswith("_bn"):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0, 0.2, beta.shape).astype("float32"),
                    rng.normal(0, 0.2, mean.shape).astype("float32"),
                    rng.uniform(0.5, 1.5, var.shape).astype("float32"),
                ]
            )
    return model


def pixels(count: int = 32, size: int = 16, seed: int = 1) -> np.ndarray:
    """Random raw pixels 0..255 (integers, as camera images), float32 (N, size, size, 3)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3)).astype("float32")


def keras_logits(model, images) -> np.ndarray:
    return np.asarray(model(images, training=False))
