"""Classifies image files with a ConvMixer and prints the top classes (one JSON line).

A pretrained checkpoint::

    python -m convmixer_tf.predict --preset convmixer_768_32 \\
        --weights convmixer_768_32_ks7_p7_relu.pth.tar image.jpg

A ``.keras`` model file, such as a training run's ``model.keras``::

    python -m convmixer_tf.predict --model runs/c10/model.keras image.jpg

Images are preprocessed as timm evaluates (resize, center crop; see
:func:`convmixer_tf.imagenet.preprocess_image`). With ``--weights``: the preset's input size,
crop_pct and interpolation, or, without ``--preset``, the architecture read from the checkpoint
(see :mod:`convmixer_tf.convert`) and ImageNet's settings. With ``--model``: the model's input
size, and the settings and class names of the training run beside the file (its
``config.json`` and ``class_names.json``, as ``python -m training.evaluate`` uses them); a file
alone gets ImageNet's settings if it has 1000 outputs, else the whole image resized
(``crop_pct`` 1, bilinear). ``--crop-pct`` and ``--interpolation`` override either. 1000-class
models print ImageNet names; the CIFAR-10 preset prints CIFAR-10 names; other class counts
print class indices.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from convmixer_tf import cli, convert, imagenet, presets, saving
from convmixer_tf.constants import ACTIVATIONS, INTERPOLATIONS, RUN_CLASS_NAMES_FILE

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
    input_size: int | None = None,
) -> list[list[tuple[str, str, float]]]:
    """The ``top`` classes ``(id, name, probability)`` of each image file.

    Args:
        model: a ConvMixer taking raw pixels (``include_preprocessing=True``) and giving logits.
        image_paths: image files (JPEG, PNG, ...).
        crop_pct, interpolation: the evaluation transform (the preset's settings).
        names: class names; None for ImageNet's.
        top: classes per image.
        input_size: the square size the images are resized to; the model's own by default
            (needed for a model built without a fixed input size).

    Example:
        >>> from convmixer_tf import predict
        >>> predict.classify(model, ["cat.jpg"])  # doctest: +SKIP
        [[('n02123045', 'tabby, tabby cat', 0.71), ...]]
    """
    height, width = model.input_shape[1:3]
    size = input_size or height
    if size is None or (height, width) not in ((size, size), (None, None)):
        raise ValueError(
            "The model needs a fixed square input, or an input size (--input-size) if it has "
            f"none. It takes {height}x{width} images; input size: {input_size}."
        )
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
    parser.add_argument("--model", type=cli.input_file,
                        help="a .keras model file (a training run's model.keras, a converted "
                             "checkpoint); or --weights")  # fmt: skip
    parser.add_argument(
        "--preset", choices=list(presets.PRESETS), metavar="PRESET",
        help=f"with --weights: the variant ({', '.join(presets.PRESETS)})",
    )  # fmt: skip
    parser.add_argument("--weights", help="checkpoint path, URL, 'imagenet' or .weights.h5")
    parser.add_argument("--activation", choices=ACTIVATIONS, help="with --weights")
    parser.add_argument("--input-size", type=cli.image_size,
                        help="square input size (default: preset's, model's)")  # fmt: skip
    parser.add_argument("--crop-pct", type=cli.fraction,
                        help="default: the preset's or the run's (0.96 ImageNet)")  # fmt: skip
    parser.add_argument("--interpolation", choices=INTERPOLATIONS,
                        help="default: the preset's or the run's (bicubic ImageNet)")  # fmt: skip
    parser.add_argument("--top", type=cli.positive_int, default=5, help="classes per image")
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def _old_preset_spelling(argv: Sequence[str]) -> list[str]:
    """``--model NAME`` named a variant before ``--model`` meant a file: a variant name that is
    not a file is taken as ``--preset NAME``, with a deprecation warning."""
    argv, out = list(argv), []
    i = 0
    while i < len(argv):
        token = argv[i]
        option, has_value, value = token.partition("=")
        if option == "--model":
            if not has_value and i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            if value in presets.PRESETS and not os.path.exists(value):
                message = "--model NAME is deprecated for a variant name; use --preset NAME"
                warnings.warn(message, FutureWarning, stacklevel=2)
                print(f"python -m convmixer_tf.predict: warning: {message}", file=sys.stderr)
                out += ["--preset", value]
            else:
                out += [token] if has_value else [token, value]
        else:
            out.append(token)
        i += 1
    return out


def run_settings(model_path: str, num_classes: int) -> tuple[float, str, tuple[str, ...] | None]:
    """``(crop_pct, interpolation, class names)`` for a model file: those of the training run
    beside it (:func:`convmixer_tf.saving.training_run_settings`) where they exist, else
    ImageNet's for a 1000-class model and ``(1.0, "bilinear", indices)`` for others.

    Raises:
        ValueError: naming the run's file if it is not what training writes, or if its class
            names do not match the model's outputs.
    """
    imagenet_model = num_classes == imagenet.NUM_CLASSES
    run = saving.training_run_settings(model_path)
    crop_pct = run.get("crop_pct", imagenet.CROP_PCT if imagenet_model else 1.0)
    interpolation = run.get(
        "interpolation", imagenet.INTERPOLATION if imagenet_model else "bilinear"
    )
    names = class_names(num_classes)
    if "class_names" in run:
        names = tuple(run["class_names"])
        if len(names) != num_classes:
            raise ValueError(
                f"{RUN_CLASS_NAMES_FILE!r} beside {model_path!r} lists {len(names)} class names "
                f"for a model of {num_classes} outputs."
            )
    return float(crop_pct), interpolation, names


def run(args: argparse.Namespace) -> int:
    """Classifies the images ``args`` name; prints the top classes of each."""
    if (args.model is None) == (args.weights is None):
        raise ValueError(
            "Give --model FILE (a .keras model) or --weights CHECKPOINT (with --preset), not "
            f"{'both' if args.model else 'neither'}."
        )
    if args.model and (args.preset or args.activation):
        raise ValueError("--preset and --activation build a model for --weights; --model is one.")
    for path in args.images:  # before loading a model: a missing image is a quick error
        imagenet.check_image_file(path)
    with cli.stdout_to_stderr():
        if args.model:
            model = saving.load_model(args.model, unsafe=args.unsafe)
            crop_pct, interpolation, names = run_settings(args.model, model.output_shape[-1])
        else:
            crop_pct, interpolation, dataset = (
                imagenet.CROP_PCT, imagenet.INTERPOLATION, "imagenet"
            )  # fmt: skip
            if args.preset:
                preset = presets.get_preset(args.preset)
                crop_pct, interpolation = preset.crop_pct, preset.interpolation
                dataset = preset.dataset
            model = convert.build_model(
                args.weights, args.preset, activation=args.activation, input_size=args.input_size
            )
            names = class_names(model.output_shape[-1], dataset)
        results = classify(
            model, args.images, crop_pct=args.crop_pct or crop_pct,
            interpolation=args.interpolation or interpolation, names=names, top=args.top,
            input_size=args.input_size,
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
    argv = sys.argv[1:] if argv is None else argv
    return cli.run(build_parser(), run, _old_preset_spelling(argv))


if __name__ == "__main__":
    sys.exit(main())
