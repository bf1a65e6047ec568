"""Shared test settings: quiet TensorFlow, the real data's location, tiny model arguments."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The CIFAR-10 train split as JPEG class folders, beside the repo (never copied into it).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CIFAR10_TRAIN = SHARED_DATA / "cifar10" / "train"


@pytest.fixture
def cifar10_train_dir() -> pathlib.Path:
    if not CIFAR10_TRAIN.is_dir():
        raise FileNotFoundError(f"The shared test data is missing: {CIFAR10_TRAIN}")
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
    """A generated image folder: 3 classes of 6 PNG images of 16x16 (no shared data needed)."""
    return make_image_folder(tmp_path / "images")
