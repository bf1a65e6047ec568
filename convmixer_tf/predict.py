"""Classifies image files with a pretrained ConvMixer and prints the top classes.

    python -m convmixer_tf.predict --preset convmixer_768_32 \\
        --weights convmixer_768_32_ks7_p7_relu.pth.tar image.jpg

Images are preprocessed as timm evaluates the checkpoint (the preset's input size, crop_pct and
interpolation; see :func:`convmixer_tf.imagenet.preprocess_image`). Without ``--preset`` the
architecture is read from the checkpoint (see :mod:`convmixer_tf.convert`) and ImageNet's
evaluation settings are used. 1000-class models print ImageNet names; the CIFAR-10 preset prints
CIFAR-10 names; other class counts print class indices.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from convmixer_tf import cli, convert, imagenet, presets
from convmixer_tf.constants import ACTIVATIONS

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def class_names(num_classes: int, dataset: str = "imagenet") -> tuple[str, ...] | None:
    """Names for a classifier's outputs: None means ImageNet's (with WordNet ids).

    Example:
        >>> from convmixer_tf import predict
        >>> predict.class_names(10, "cifar10")[0]
        'airplane'
    """
    if dataset == "cifar10" and num_classes == len(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    if num_classes == imagenet.NUM_CLASSES:
        return None
    return tuple(f"class_{i}" for i in range(num_classes))


def classify(
    model,
    image_paths: Sequence[str],
    *,
    crop_pct: float = imagenet.CROP_PCT,
    interpolation: str = imagenet.INTERPOLATION,
    names: Sequence[str] | None = None,
    top: int = 5,
) -> list[list[tuple[str, str, float]]]:
    """The ``top`` classes ``(id, name, probability)`` of each image file.

    Args:
        model: a ConvMixer taking raw pixels (``include_preprocessing=True``) and giving logits.
        image_paths: image files (JPEG, PNG, ...).
        crop_pct, interpolation: the evaluation transform (the preset's settings).
        names: class names; None for ImageNet's.
        top: classes per image.

    Example:
        >>> from convmixer_tf import predict
        >>> predict.classify(model, ["cat.jpg"])  # doctest: +SKIP
        [[('n02123045', 'tabby, tabby cat', 0.71), ...]]
    """
    size = model.input_shape[1]
    if size is None or size != model.input_shape[2]:
        raise ValueError(f"The model needs a fixed square input. Received: {model.input_shape}")
    batch = tf.stack(
        [
            imagenet.preprocess_image(imagenet.load_image(path), size, crop_pct, interpolation)
            for path in image_paths
        ]
    )
    logits = np.asarray(model.predict(batch, verbose=0), dtype=np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return imagenet.decode_predictions(probabilities, top=top, class_names=names)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m convmixer_tf.predict",
        description="Print the top classes of image files with a pretrained ConvMixer (one "
        "JSON line).",
    )
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP, GIF)")
    convert.add_preset_argument(parser)
    parser.add_argument(
        "--weights", required=True, help="checkpoint path, URL, 'imagenet' or .weights.h5"
    )
    parser.add_argument("--activation", choices=ACTIVATIONS)
    parser.add_argument("--input-size", type=cli.positive_int,
                        help="square input size (default: preset's)")  # fmt: skip
    parser.add_argument("--crop-pct", type=cli.fraction,
                        help="default: the preset's (0.96 ImageNet)")  # fmt: skip
    parser.add_argument("--top", type=cli.positive_int, default=5, help="classes per image")
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Classifies the images ``args`` name; prints the top classes of each."""
    for path in args.images:  # before loading a model: a missing image is a quick error
        imagenet.check_image_file(path)
    crop_pct, interpolation, dataset = imagenet.CROP_PCT, imagenet.INTERPOLATION, "imagenet"
    if args.preset:
        preset = presets.get_preset(args.preset)
        crop_pct, interpolation, dataset = preset.crop_pct, preset.interpolation, preset.dataset
    with cli.stdout_to_stderr():
        model = convert.build_model(
            args.weights, args.preset, activation=args.activation, input_size=args.input_size
        )
        names = class_names(model.output_shape[-1], dataset)
        results = classify(
            model, args.images, crop_pct=args.crop_pct or crop_pct, interpolation=interpolation,
            names=names, top=args.top,
        )  # fmt: skip
    for path, classes in zip(args.images, results, strict=True):
        print(path, file=sys.stderr)
        for rank, (class_id, name, probability) in enumerate(classes, start=1):
            print(f"  {rank}. {100 * probability:6.2f}%  {class_id:>9}  {name}", file=sys.stderr)
    cli.emit({"predictions": [
        {"image": path, "top": [{"id": class_id, "name": name, "probability": probability}
                                for class_id, name, probability in classes]}
        for path, classes in zip(args.images, results, strict=True)
    ]})  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
