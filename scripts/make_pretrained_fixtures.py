"""Writes the small PyTorch checkpoints and logits that tests/test_pretrained.py checks against.

Run ONCE, with PyTorch installed in a separate venv (the project itself never needs PyTorch):

    python3 -m venv .torchvenv
    .torchvenv/bin/pip install torch==2.13.0 numpy safetensors
    .torchvenv/bin/python scripts/make_pretrained_fixtures.py

It builds tiny ConvMixers (dim 16, depth 2, patch 2, 10 classes, 16x16 input) written exactly as
timm's (``timm/models/convmixer.py``: ``stem`` / ``blocks`` / ``head``) and as the official
repository's (one ``nn.Sequential``), fills every parameter and every BatchNorm running statistic
with non-trivial random values, and saves:

- ``<name>.safetensors`` for timm's names (what the Hugging Face hub serves),
- ``<name>.pth.tar`` as ``{"state_dict": ...}`` with ``torch.save`` for the official names
  (the release format), one of them with DataParallel's ``module.`` prefix,
- ``expected_logits.npz``: the input pixels (NHWC, 0-255, as the Keras model takes them) and
  each model's logits from PyTorch in eval mode,
- ``eval_image.png`` (a 50x37 portrait test image) and ``expected_eval_transform.npz``: timm's
  evaluation transform of it (PIL resize of the shorter side to ``floor(size / crop_pct)``, then
  torchvision's center crop), for tests/test_imagenet.py. Needs ``pip install pillow`` too.

With ``--full-size NAME`` it writes instead, into ``--output-dir`` (use a temporary folder: these
are not fixtures), a full-size randomly initialized checkpoint of a published variant (timm names
as ``.safetensors``, or official names as ``.pth.tar`` with ``--official``) and
``NAME_expected.npz`` (224x224 input pixels and PyTorch's logits), for
scripts/verify_full_size.py.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIM, DEPTH, PATCH, CLASSES, SIZE = 16, 2, 2, 10, 16

# (input size, crop_pct) of the evaluation-transform fixture: one downscale, one upscale.
EVAL_TRANSFORMS = ((24, 0.875), (48, 0.96))

# name -> (naming scheme, activation, kernel size, key prefix)
FIXTURES = {
    "timm_gelu_k3": ("timm", "gelu", 3, ""),
    "timm_relu_k4": ("timm", "relu", 4, ""),
    "official_relu_k4": ("official", "relu", 4, ""),
    "official_gelu_k3_dataparallel": ("official", "gelu", 3, "module."),
}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
# The published variants: dim, depth, kernel size, patch size, activation.
FULL_SIZE = {
    "convmixer_1536_20": (1536, 20, 9, 7, "gelu"),
    "convmixer_768_32": (768, 32, 7, 7, "relu"),
    "convmixer_1024_20": (1024, 20, 9, 14, "gelu"),
}


class Residual(nn.Module):
    """``fn(x) + x``, as in both timm and the official repository."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def _block(dim: int, kernel_size: int, act) -> nn.Sequential:
    return nn.Sequential(
        Residual(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                act(),
                nn.BatchNorm2d(dim),
            )
        ),
        nn.Conv2d(dim, dim, kernel_size=1),
        act(),
        nn.BatchNorm2d(dim),
    )


class TimmConvMixer(nn.Module):
    """timm's ConvMixer (``timm/models/convmixer.py``), without its optional extras."""

    def __init__(self, dim, depth, kernel_size, patch_size, num_classes, act):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), act(), nn.BatchNorm2d(dim)
        )
        self.blocks = nn.Sequential(*[_block(dim, kernel_size, act) for _ in range(depth)])
        self.pooling = nn.AdaptiveAvgPool2d((1, 1))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(self.pooling(x), 1))


def official_convmixer(dim, depth, kernel_size, patch_size, num_classes, act) -> nn.Sequential:
    """The official repository's ConvMixer (locuslab/convmixer, ``convmixer.py``)."""
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
        act(),
        nn.BatchNorm2d(dim),
        *[_block(dim, kernel_size, act) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, num_classes),
    )


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Random weights and non-trivial BatchNorm statistics (the defaults 0/1 would hide bugs)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.5 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator))
                module.num_batches_tracked.fill_(1234)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def _write_atomic(save, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    save(tmp)
    os.replace(tmp, path)


def timm_eval_transform(image: Image.Image, size: int, crop_pct: float) -> np.ndarray:
    """timm's ``transforms_imagenet_eval`` (crop_mode "center") up to ToTensor, with PIL as
    torchvision's ``Resize(int)`` and ``CenterCrop`` do it; returns uint8 HWC pixels."""
    scale = math.floor(size / crop_pct)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = scale, int(scale * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    resized = image.resize(new_size, Image.BICUBIC)
    top = int(round((resized.height - size) / 2.0))
    left = int(round((resized.width - size) / 2.0))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def write_eval_transform_fixture(output_dir: str, generator: torch.Generator) -> None:
    height, width = 50, 37
    rows = torch.linspace(0, 255, height).view(height, 1, 1)
    cols = torch.linspace(0, 255, width).view(1, width, 1)
    noise = 60 * torch.rand((height, width, 3), generator=generator)
    pixels = (0.5 * rows + 0.3 * cols + noise).clamp(0, 255).to(torch.uint8).numpy()
    image_path = os.path.join(output_dir, "eval_image.png")
    _write_atomic(lambda p: Image.fromarray(pixels).save(p, format="PNG"), image_path)
    image = Image.open(image_path).convert("RGB")
    expected = {
        f"size{size}_crop{crop_pct}": timm_eval_transform(image, size, crop_pct)
        for size, crop_pct in EVAL_TRANSFORMS
    }
    path = os.path.join(output_dir, "expected_eval_transform.npz")
    _write_atomic(lambda p: _savez(p, expected), path)
    print(f"wrote {image_path}, {path}")


def randomize_bn_mildly(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics that keep activations bounded through 20-32 blocks."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(1 + 0.1 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(1 + 0.2 * torch.rand(shape, generator=generator))


def write_full_size(name: str, official: bool, output_dir: str) -> None:
    dim, depth, kernel_size, patch_size, activation = FULL_SIZE[name]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    build = official_convmixer if official else TimmConvMixer
    model = build(dim, depth, kernel_size, patch_size, 1000, ACTIVATIONS[activation])
    randomize_bn_mildly(model, generator)
    with torch.no_grad():  # logits of order 10 rather than 0.3: differences are then visible
        classifier = model.head if not official else model[-1]
        classifier.weight.mul_(30.0)
    model.eval()
    pixels = torch.randint(0, 256, (1, 224, 224, 3), generator=generator).float()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((pixels.permute(0, 3, 1, 2) / 255.0 - mean) / std).numpy()
    state_dict = model.state_dict()
    if official:
        path = os.path.join(output_dir, f"{name}.pth.tar")
        _write_atomic(lambda p: torch.save({"state_dict": state_dict}, p), path)
    else:
        path = os.path.join(output_dir, f"{name}.safetensors")
        _write_atomic(lambda p: save_file(dict(state_dict), p), path)
    expected = os.path.join(output_dir, f"{name}_expected.npz")
    _write_atomic(lambda p: _savez(p, {"pixels": pixels.numpy(), "logits": logits}), expected)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB), {expected}")


def _savez(path: str, arrays: dict) -> None:
    with open(path, "wb") as f:  # a file object, so that np.savez does not append ".npz"
        np.savez(f, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=os.path.join("tests", "fixtures", "pretrained"))
    parser.add_argument("--full-size", choices=sorted(FULL_SIZE))
    parser.add_argument("--official", action="store_true", help="with --full-size: .pth.tar")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.full_size:
        write_full_size(args.full_size, args.official, args.output_dir)
        return

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, SIZE, SIZE, 3), generator=generator).float()  # NHWC, 0-255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch_input = (pixels.permute(0, 3, 1, 2) / 255.0 - mean) / std  # what timm's transforms give

    expected = {"pixels": pixels.numpy()}
    for name, (scheme, activation, kernel_size, prefix) in FIXTURES.items():
        build = TimmConvMixer if scheme == "timm" else official_convmixer
        model = build(DIM, DEPTH, kernel_size, PATCH, CLASSES, ACTIVATIONS[activation])
        randomize(model, generator)
        model.eval()
        with torch.no_grad():
            expected[name] = model(torch_input).numpy()
        state_dict = {prefix + key: value for key, value in model.state_dict().items()}
        if scheme == "timm":
            path = os.path.join(args.output_dir, f"{name}.safetensors")
            _write_atomic(lambda p, sd=state_dict: save_file(sd, p), path)
        else:
            # As timm's train.py saves it (less the optimizer state): args is an argparse.Namespace.
            checkpoint = {
                "epoch": 299,
                "arch": f"convmixer_{DIM}_{DEPTH}",
                "state_dict": state_dict,
                "args": argparse.Namespace(
                    model=f"convmixer_{DIM}_{DEPTH}", lr=0.01, act=activation
                ),
            }
            path = os.path.join(args.output_dir, f"{name}.pth.tar")
            _write_atomic(lambda p, ckpt=checkpoint: torch.save(ckpt, p), path)
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    path = os.path.join(args.output_dir, "expected_logits.npz")
    _write_atomic(lambda p: _savez(p, expected), path)
    print(f"wrote {path}; torch {torch.__version__}")
    write_eval_transform_fixture(args.output_dir, generator)


if __name__ == "__main__":
    main()
