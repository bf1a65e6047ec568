"""The reference CIFAR-10 recipe in PyTorch, on the same image folder and split as ours: the peer
that tells a difference of our implementation from one of the data.

Runs in the peers' environment (``requirements-bench.txt``: PyTorch, torchvision), never
imports TensorFlow::

    .torchvenv/bin/python -m benchmarks.peer_recipe --data-dir DATA/cifar10/train \\
        --stop-after 5 --output runs/peer_recipe.json

What it trains is the reference script's README command (locuslab/convmixer-cifar10:
``--lr-max=0.05 --ra-n=2 --ra-m=12 --wd=0.005 --scale=1.0 --jitter=0 --reprob=0``), written
here from its description: ConvMixer-256/8 (k5, p2) with PyTorch's default initialization;
batch 512; AdamW (weight decay 0.005 on every parameter); the learning rate interpolated per
step over ``[0, 2E/5, 4E/5, E]`` epochs to ``[0, lr_max, lr_max / 20, 0]``; flip and
torchvision's ``RandAugment(2, 12)`` per image (the README's crop with scale 1 and ratio 1 is the
identity on 32x32 images); the CIFAR-10 mean and std; cross-entropy; bfloat16 autocast (the
reference used float16 autocast on a GPU). The split is ``training.data``'s: the file names of
each class sorted, the last ``ceil(validation_fraction * n)`` held out.

``--stop-after N`` stops after N epochs of the E-epoch schedule (the curve up to there, for a
side-by-side with our run's ``metrics.json``). Prints one JSON line: per epoch the training
accuracy (running, augmented), the held-out top-1 and the seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from benchmarks.peer_models import convmixer
from convmixer_tf import cli, files

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def split_files(data_dir: str, validation_fraction: float):
    """``(train, held_out, class_names)``: lists of ``(path, label)`` as ``training.data``
    splits an image folder."""
    class_names = sorted(
        name for name in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, name))
    )
    if not class_names:
        raise ValueError(f"{data_dir!r} has no class folders.")
    train, held_out = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(data_dir, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"The class folder {folder!r} has no images.")
        cut = len(files) - math.ceil(validation_fraction * len(files))
        train += [(os.path.join(folder, f), label) for f in files[:cut]]
        held_out += [(os.path.join(folder, f), label) for f in files[cut:]]
    return train, held_out, class_names


def import_transforms():
    """``torchvision.transforms``, also where ``import torchvision`` fails.

    PyPI's torchvision wheels for Linux are built against CUDA PyTorch: next to the CPU build of
    requirements-bench.txt their C extension (detection ops, image codecs) does not load, and
    ``import torchvision`` stops in ``torchvision._meta_registrations`` ("operator
    torchvision::nms does not exist"). The transforms used here are Python on PIL images, so
    they are imported without running the package's ``__init__``.
    """
    import importlib
    import importlib.util
    import types

    try:
        return importlib.import_module("torchvision.transforms")
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        package = types.ModuleType("torchvision")
        package.__path__ = list(importlib.util.find_spec("torchvision").submodule_search_locations)
        sys.modules["torchvision"] = package
        return importlib.import_module("torchvision.transforms")


def one_cycle(epoch_fraction: float, epochs: int, lr_max: float) -> float:
    """The reference's per-step learning rate at ``epoch_fraction`` epochs of ``epochs``."""
    knots = [0, 2 * epochs / 5, 4 * epochs / 5, epochs]
    return float(np.interp(epoch_fraction, knots, [0, lr_max, lr_max / 20, 0]))


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.peer_recipe", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data-dir", required=True, type=cli.input_dir,
                        help="an image folder DIR/<class>/<image>")  # fmt: skip
    parser.add_argument("--validation-fraction", type=cli.held_out_fraction, default=0.1)
    parser.add_argument("--epochs", type=cli.positive_int, default=25,
                        help="the schedule's length")  # fmt: skip
    parser.add_argument("--stop-after", type=cli.positive_int, default=None,
                        help="epochs to run (default: all)")  # fmt: skip
    parser.add_argument("--batch-size", type=cli.positive_int, default=512)
    parser.add_argument("--lr-max", type=cli.positive_float, default=0.05)
    parser.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.005)
    parser.add_argument("--ra-n", type=cli.nonnegative_int, default=2)
    parser.add_argument("--ra-m", type=cli.nonnegative_int, default=12)
    parser.add_argument("--precision", choices=("autocast_bf16", "float32"),
                        default="autocast_bf16")  # fmt: skip
    parser.add_argument("--workers", type=cli.nonnegative_int, default=2,
                        help="DataLoader worker processes")  # fmt: skip
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
    parser.add_argument("--output", type=cli.output_path, default=None,
                        help="also write the JSON here")  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Trains as ``args`` say; prints one JSON line."""
    files.check_not_input({"--output": args.output}, {"--data-dir": args.data_dir})
    cli.require_peers("torch", "torchvision")
    import torch
    from PIL import Image
    from torch import nn

    transforms = import_transforms()
    torch.manual_seed(args.seed)
    train_files, held_out_files, class_names = split_files(args.data_dir, args.validation_fraction)

    def decode(items):
        return [(Image.open(path).convert("RGB"), label) for path, label in items]

    normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    train_transform = transforms.Compose(
        [transforms.RandomHorizontalFlip(),
         transforms.RandAugment(num_ops=args.ra_n, magnitude=args.ra_m), *normalize]
    )  # fmt: skip
    test_transform = transforms.Compose(normalize)

    class Images(torch.utils.data.Dataset):
        def __init__(self, items, transform):
            self.items, self.transform = items, transform

        def __len__(self):
            return len(self.items)

        def __getitem__(self, index):
            image, label = self.items[index]
            return self.transform(image), label

    start = time.perf_counter()
    train_set = Images(decode(train_files), train_transform)
    held_out_set = Images(decode(held_out_files), test_transform)
    print(f"decoded {len(train_set)} + {len(held_out_set)} images in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)  # fmt: skip
    loader_options = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, **loader_options
    )
    held_out_loader = torch.utils.data.DataLoader(
        held_out_set, batch_size=args.batch_size, shuffle=False, **loader_options
    )
    # channels_last: PyTorch's fastest eager layout for this model on CPUs (8.9 s against
    # 11.1 s per step of 512 in bfloat16 autocast on the 2-core EPYC).
    model = convmixer(256, 8, 5, 2, len(class_names), "gelu").train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr_max, weight_decay=args.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    autocast = dict(device_type="cpu", dtype=torch.bfloat16,
                    enabled=args.precision == "autocast_bf16")  # fmt: skip
    history = []
    for epoch in range(args.stop_after or args.epochs):
        started = time.perf_counter()
        model.train()
        correct = seen = 0
        for i, (x, y) in enumerate(train_loader):
            lr = one_cycle(epoch + (i + 1) / len(train_loader), args.epochs, args.lr_max)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(**autocast):
                logits = model(x)
                loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            if (i + 1) % 10 == 0:
                print(f"epoch {epoch + 1} step {i + 1}/{len(train_loader)}: training top-1 "
                      f"{100 * correct / seen:.2f}", file=sys.stderr, flush=True)  # fmt: skip
        model.eval()
        hits = total = 0
        with torch.no_grad(), torch.autocast(**autocast):
            for x, y in held_out_loader:
                x = x.contiguous(memory_format=torch.channels_last)
                hits += int((model(x).argmax(-1) == y).sum())
                total += len(y)
        history.append({
            "epoch": epoch + 1, "train_accuracy": round(100 * correct / seen, 2),
            "held_out_top1": round(100 * hits / total, 2), "lr": lr,
            "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        print(history[-1], file=sys.stderr, flush=True)
    result = {
        "torch": torch.__version__, "precision": args.precision, "epochs": args.epochs,
        "train_images": len(train_set), "held_out_images": len(held_out_set),
        "threads": torch.get_num_threads(), "history": history,
    }  # fmt: skip
    if args.output:
        with files.replacing(args.output) as tmp, open(tmp, "w") as f:
            f.write(json.dumps(cli.finite_json(result), allow_nan=False) + "\n")
    cli.emit(result)
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
