"""Shared test settings: quiet TensorFlow, the committed CIFAR-10 slice, tiny model arguments."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# 40 real CIFAR-10 training JPEGs per class, committed (scripts/make_cifar10_fixtures.py).
CIFAR10_TRAIN = REPO_ROOT / "tests" / "fixtures" / "cifar10"


@pytest.fixture
def cifar10_train_dir() -> pathlib.Path:
    """CIFAR-10 class folders, 40 JPEGs each: the last 4 are the validation split (10%)."""
    return CIFAR10_TRAIN


@pytest.fixture
def tiny_kwargs() -> dict:
    """A tiny ConvMixer: fast to build and run, every layer kind present."""
    return dict(dim=16, depth=2, kernel_size=3, patch_size=2, input_shape=(8, 8, 3), num_classes=5)


def make_image_folder(root: pathlib.Path, classes: int = 3, per_class: int = 6, size: int = 16):
    """``root/<class>/<nnnn>.png``: ``per_class`` random images of each of ``classes`` classes
    (each class a different mean colour, so that a model can learn them). Returns ``root``."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 40 + 180 * label / max(1, classes - 1)
            pixels = np.clip(rng.normal(base, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            (folder / f"{i:04d}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    return root


@pytest.fixture
def image_folder(tmp_path) -> pathlib.Path:
    """A generated image folder: 3 classes of 6 PNG images of 16x16 (made here)."""
    return make_image_folder(tmp_path / "images")
