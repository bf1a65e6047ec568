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
