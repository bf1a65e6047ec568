"""Models the benchmarks share: random weights that behave like trained ones where it matters."""

from __future__ import annotations

import numpy as np


def with_batch_norm_statistics(model, seed: int = 0):
    """Non-trivial BatchNorm statistics (a trained model's BNs are not identities)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name.endswith("_bn"):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                 rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 1.5, var.shape)]
            )  # fmt: skip
    return model
