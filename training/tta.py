"""Test-time augmentation: the views an evaluation averages the logits of.

``"flip"``: the image and its mirror image (2 views, equal weights). ``"flip-translate"``: those
two, plus both shifted by one pixel up-left and down-right with the border reflected (6 views;
the unshifted pair weighs 1/4 each and the shifted ones 1/8 each, so that the shifted views
together count as much as the unshifted ones; the fast CIFAR-10 trainers weigh them so). A
model runs once per view: the cost of an evaluation, or of an inference on a device, is
multiplied by the number of views.

Example:
    >>> import numpy as np
    >>> images = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    >>> [(weight, view.shape) for weight, view in views(images, "flip")]
    [(0.5, (2, 4, 4, 3)), (0.5, (2, 4, 4, 3))]
    >>> len(views(images, "flip-translate")), sum(w for w, _ in views(images, "flip-translate"))
    (6, 1.0)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TTA_MODES = ("none", "flip", "flip-translate")
_VIEW_COUNTS = {"none": 1, "flip": 2, "flip-translate": 6}


def view_count(mode: str) -> int:
    """How many views (model runs per image) ``mode`` averages.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"Unknown test-time augmentation {mode!r}: choose from {TTA_MODES}.")
    return _VIEW_COUNTS[mode]


def _shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``images`` (N, H, W, C) moved by (dy, dx) pixels, the uncovered border reflected."""
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return padded[:, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


def views(images: np.ndarray, mode: str) -> list[tuple[float, np.ndarray]]:
    """The ``(weight, images)`` views of a batch ``(N, H, W, C)`` for ``mode``; weights sum to 1.

    Raises:
        ValueError: an unknown ``mode``, or images too small to shift (``flip-translate`` needs
            at least 2x2 pixels).
    """
    view_count(mode)
    images = np.asarray(images)
    if mode == "none":
        return [(1.0, images)]
    pair = [images, images[:, :, ::-1]]
    if mode == "flip":
        return [(0.5, view) for view in pair]
    if min(images.shape[1:3]) < 2:
        raise ValueError(f"'flip-translate' needs images of at least 2x2 pixels: {images.shape}.")
    shifted = [_shift(view, d, d) for d in (-1, 1) for view in pair]
    return [(0.25, view) for view in pair] + [(0.125, view) for view in shifted]


def average_logits(predict: Callable[[np.ndarray], np.ndarray], images, mode: str) -> np.ndarray:
    """The weighted mean of ``predict(view)`` (logits ``(N, classes)``) over the views."""
    total = None
    for weight, view in views(images, mode):
        logits = weight * np.asarray(predict(np.ascontiguousarray(view)), dtype=np.float64)
        total = logits if total is None else total + logits
    return total.astype(np.float32)
