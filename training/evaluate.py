"""Accuracy of a trained model on an image folder or a TFDS split: top-1, top-5, per class.

Command line (prints ONE JSON line on stdout; logs go to stderr)::

    python -m training.evaluate --model runs/c10_folder/best.keras \\
        --data-dir DATA/cifar10/train --split validation
    python -m training.evaluate --model runs/cifar10_convmixer_256_8/model.keras --dataset cifar10
    python -m training.evaluate ... --tta flip     # or flip-translate: logits averaged over views

A model file in a training run's folder is evaluated with the run's crop and interpolation
(its ``config.json``; ``--crop-pct`` / ``--interpolation`` override them), and data whose classes
are not the run's (its ``class_names.json``) is refused: the labels would not match the outputs.

Python::

    from training.evaluate import evaluate
    result = evaluate(model, dataset, class_names)   # {"top1", "top5", "n", "per_class"}
    result = evaluate(model, dataset, class_names, tta="flip")   # + {"tta", "views"}
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

import convmixer_tf
from convmixer_tf import cli, saving
from convmixer_tf.constants import RUN_CLASS_NAMES_FILE
from training.data import add_evaluation_data_arguments, evaluation_data_kwargs, load_dataset
from training.tta import TTA_MODES, average_logits, view_count

logger = logging.getLogger(__name__)


def evaluate(
    model, dataset: tf.data.Dataset, class_names: Sequence[str], tta: str = "none"
) -> dict:
    """Top-1 / top-5 accuracy (in %) and per-class top-1 accuracy of ``model`` on ``dataset``.

    ``dataset`` yields ``(images, labels)`` batches, labels as class indices or one-hot.
    Works for Keras 3 and tf_keras models. ``tta`` (:data:`training.tta.TTA_MODES`) averages
    the logits over the test-time views of :mod:`training.tta`; the result then names the mode
    and the number of views (model runs per image).

    Raises:
        ValueError: the model's output size differs from the number of classes, or the
            dataset is empty.

    Example:
        >>> from training.data import load_dataset
        >>> ds, names = load_dataset(data_dir="tests/fixtures/cifar10",
        ...                          split="validation", image_size=32, batch_size=100)
        >>> evaluate(model, ds, names)["n"]  # doctest: +SKIP
        5000
    """
    views = view_count(tta)  # checks the mode before any work
    num_classes = len(class_names)
    outputs = model.output_shape[-1]
    if outputs != num_classes:
        raise ValueError(
            f"The model has {outputs} outputs but the data has {num_classes} classes "
            f"({list(class_names)[:10]}...)."
        )
    k = min(5, num_classes)
    correct = np.zeros(num_classes, np.int64)
    total = np.zeros(num_classes, np.int64)
    top5 = 0

    @tf.function(reduce_retracing=True)
    def predict(images):
        return model(images, training=False)

    for images, labels in dataset:
        labels = labels.numpy()
        if labels.ndim == 2:
            labels = labels.argmax(axis=-1)
        if tta == "none":
            logits = predict(images).numpy()
        else:
            logits = average_logits(lambda view: predict(tf.constant(view)), images.numpy(), tta)
        top = np.argsort(-logits, axis=-1)[:, :k]
        hit1 = top[:, 0] == labels
        top5 += int((top == labels[:, None]).any(axis=-1).sum())
        np.add.at(total, labels, 1)
        np.add.at(correct, labels, hit1.astype(np.int64))
    n = int(total.sum())
    if n == 0:
        raise ValueError("The evaluation dataset is empty.")
    per_class = {
        name: (round(100.0 * int(c) / int(t), 2) if t else None)
        for name, c, t in zip(class_names, correct, total, strict=True)
    }
    result = {
        "top1": round(100.0 * int(correct.sum()) / n, 2),
        "top5": round(100.0 * top5 / n, 2),
        "n": n,
        "per_class": per_class,
    }
    if tta != "none":
        result.update(tta=tta, views=views)
    return result


def check_class_names(data_names: Sequence[str], model_names: Sequence[str] | None, source: str):
    """Refuses data whose classes are not the model's (``model_names``, read from ``source``;
    None: unknown, nothing to check): its labels would not match the model's outputs.

    Example:
        >>> check_class_names(["car", "cat"], ["automobile", "cat"], "class_names.json")
        Traceback (most recent call last):
        ...
        ValueError: The data's classes are not the model's (class_names.json): class 0 is ...
    """
    if model_names is None or list(data_names) == list(model_names):
        return
    if len(data_names) != len(model_names):
        detail = f"the data has {len(data_names)} classes, the model {len(model_names)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(data_names, model_names, strict=True)) if a != b)
        detail = f"class {i} is {data_names[i]!r} in the data but {model_names[i]!r} there"
    raise ValueError(
        f"The data's classes are not the model's ({source}): {detail}. The labels would not "
        "match the outputs: name the class folders as the model's classes."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m training.evaluate", description="Evaluate a model: one JSON line."
    )
    parser.add_argument("--model", required=True, type=cli.input_path, help="a .keras file")
    parser.add_argument("--image-size", type=cli.image_size,
                        help="default: the model's input size")  # fmt: skip
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="test-time augmentation: average the logits over the image and its "
                             "mirror (flip), and their 1-pixel shifts (flip-translate); "
                             "reported beside the plain numbers, never instead")  # fmt: skip
    add_evaluation_data_arguments(parser, batch_size=100)
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluates as ``args`` say; prints one JSON line."""
    model = convmixer_tf.load_model(args.model, unsafe=args.unsafe)
    image_size = args.image_size or model.input_shape[1]
    if image_size is None:
        raise ValueError(f"{args.model!r} has no fixed input size: give --image-size.")
    run_settings = saving.training_run_settings(args.model)
    data = evaluation_data_kwargs(args, run_settings)
    dataset, class_names = load_dataset(image_size=image_size, **data)
    names_file = os.path.join(os.path.dirname(os.path.abspath(args.model)), RUN_CLASS_NAMES_FILE)
    check_class_names(class_names, run_settings.get("class_names"), names_file)
    result = evaluate(model, dataset, class_names, tta=args.tta)
    transform = {"crop_pct": data["crop_pct"], "interpolation": data["interpolation"]}
    cli.emit({"model": args.model, "split": data["split"], **transform, **result})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: a user error, one line)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
