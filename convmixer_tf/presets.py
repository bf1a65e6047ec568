"""The paper's ConvMixer variants, as data.

Each preset holds the architecture (``dim``, ``depth``, ``kernel_size``, ``patch_size``,
``activation``), the evaluation settings that travel with its checkpoint (input size, crop_pct,
interpolation, mean/std, as timm evaluates them), the trainable parameter count of the released
checkpoint and the top-1 accuracy reported for it.
"""

from __future__ import annotations

import dataclasses

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named ConvMixer variant and the settings its checkpoint is evaluated with."""

    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    activation: str = "gelu"
    num_classes: int = 1000
    input_size: tuple[int, int] = (224, 224)
    crop_pct: float = 0.96
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    params: int | None = None
    top1: float | None = None
    dataset: str = "imagenet"
    url: str | None = None
    sha256: str | None = None

    def architecture(self) -> dict:
        """The keyword arguments of :func:`convmixer_tf.ConvMixer` that this preset fixes."""
        return {
            "dim": self.dim,
            "depth": self.depth,
            "kernel_size": self.kernel_size,
            "patch_size": self.patch_size,
            "activation": self.activation,
            "num_classes": self.num_classes,
            "mean": self.mean,
            "std": self.std,
        }


_HF = "https://huggingface.co/timm/{}.in1k/resolve/main/model.safetensors"

PRESETS: dict[str, Preset] = {
    "convmixer_1536_20": Preset(
        1536, 20, 9, 7, params=51_625_960, top1=81.37, url=_HF.format("convmixer_1536_20")
    ),
    "convmixer_768_32": Preset(
        768,
        32,
        7,
        7,
        activation="relu",
        params=21_110_248,
        top1=80.16,
        url=_HF.format("convmixer_768_32"),
    ),
    "convmixer_1024_20": Preset(
        1024,
        20,
        9,
        14,
        params=24_383_464,
        top1=76.94,
        url=_HF.format("convmixer_1024_20_ks9_p14"),
    ),
    # keras-cv's configuration; no released checkpoint. Accuracy as reported in the paper.
    "convmixer_512_16": Preset(512, 16, 8, 7, top1=73.76),
    # The paper's CIFAR-10 model (reference script): 10 classes, 32x32 input.
    "convmixer_256_8": Preset(
        256,
        8,
        5,
        2,
        num_classes=10,
        input_size=(32, 32),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        params=594_186,
        dataset="cifar10",
    ),
}

# timm publishes convmixer_1024_20 under this longer name; accept both.
ALIASES = {"convmixer_1024_20_ks9_p14": "convmixer_1024_20"}


def get_preset(name: str) -> Preset:
    """Returns the preset called ``name`` (timm's names), or raises a ValueError listing them."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(
            f"Unknown ConvMixer variant {name!r}. Valid names: {', '.join(sorted(PRESETS))}. "
            f"Received: name={name!r}"
        )
    return PRESETS[key]
