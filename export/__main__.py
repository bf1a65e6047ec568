"""Export a ConvMixer ``.keras`` model to TFLite.

Usage::

    # float formats (no data needed)
    python -m export --model model.keras --format fp32 --output out/model_fp32.tflite
    # full-integer post-training quantization, calibrated on the training images
    python -m export --model model.keras --format int8 --output out/model_int8.tflite \\
        --data-dir ../shared/data/cifar10/train
    # quantization-aware fine-tuning (tfmot), then full-integer conversion; Edge TPU op check
    python -m export --model model.keras --format qat --output out/model_qat.tflite \\
        --data-dir ../shared/data/cifar10/train --qat-steps 300 --qat-lr 1e-5 --edgetpu

Writes the .tflite atomically, the class names next to it (``model.labels.txt``; also stored in
the file's metadata) and prints one JSON line describing the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export", description="Convert a ConvMixer .keras model to TFLite."
    )
    parser.add_argument("--model", required=True, help="the .keras model (Keras 3)")
    parser.add_argument(
        "--format", required=True, choices=("fp32", "fp16", "dynamic", "int8", "qat")
    )
    parser.add_argument("--output", required=True, help="the .tflite file to write")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", help="training image folder DIR/<class>/<image>")
    source.add_argument("--dataset", help="a TFDS name, e.g. cifar10")
    parser.add_argument("--tfds-data-dir", default=None)
    parser.add_argument(
        "--calibration-images", type=int, default=256,
        help="training images for the converter's representative dataset (int8, qat)",
    )  # fmt: skip
    parser.add_argument("--io", choices=("int8", "uint8"), default="int8",
                        help="input/output type of int8 and qat models")  # fmt: skip
    qat = parser.add_mutually_exclusive_group()
    qat.add_argument("--qat-steps", type=int, default=None, help="QAT length in optimizer steps")
    qat.add_argument("--qat-epochs", type=float, default=None, help="QAT length in epochs")
    parser.add_argument("--qat-lr", type=float, default=1e-5, help="QAT learning rate (AdamW)")
    parser.add_argument("--qat-batch-size", type=int, default=64)
    parser.add_argument("--limit-per-class", type=int, default=None,
                        help="use at most this many training images per class")  # fmt: skip
    parser.add_argument(
        "--depthwise-tile", default="auto",
        help="auto (3x3 tiles for kernels > 5; not for qat), none, or a tile size",
    )  # fmt: skip
    parser.add_argument(
        "--batch-norm", choices=("depthwise", "mul"), default="depthwise",
        help="int8: BatchNorms as 1x1 depthwise convs (per-channel, accurate; default) or as "
        "MUL + ADD (smaller file)",
    )  # fmt: skip
    parser.add_argument("--edgetpu", action="store_true",
                        help="report whether every op suits the Edge TPU compiler")  # fmt: skip
    return parser


def _depthwise_tile(value: str):
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    try:
        tile = int(value)
    except ValueError:
        tile = 0
    if tile < 1:
        raise ValueError(
            f"--depthwise-tile must be auto, none or a positive int. Received: {value!r}"
        )
    return tile


def _training_data(args, image_size, batch_size, shuffle=True):
    from training.data import load_dataset

    return load_dataset(
        data_dir=args.data_dir,
        dataset=args.dataset,
        tfds_data_dir=args.tfds_data_dir,
        split="train",
        image_size=image_size,
        batch_size=batch_size,
        shuffle=shuffle,
        limit_per_class=args.limit_per_class,
        seed=0,
    )


def calibration_images(dataset, count: int) -> np.ndarray:
    """The first ``count`` images of a (shuffled) ``(images, labels)`` batch dataset."""
    images, total = [], 0
    for batch, _ in dataset.as_numpy_iterator():
        images.append(batch)
        total += len(batch)
        if total >= count:
            break
    if not images:
        raise ValueError("The calibration data is empty.")
    return np.concatenate(images)[:count].astype(np.float32)


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the printed JSON summary."""
    args = build_parser().parse_args(argv)
    from export import quantize, rewrite, tflite
    from export.evaluate import load_keras_model

    tile = _depthwise_tile(args.depthwise_tile)
    needs_data = args.format in tflite.INTEGER_FORMATS
    if needs_data and not (args.data_dir or args.dataset):
        raise SystemExit(
            f"error: --format {args.format} needs training data for calibration"
            f"{' and fine-tuning' if args.format == 'qat' else ''}: pass --data-dir or --dataset."
        )
    if args.format == "qat" and args.batch_norm != "depthwise":
        raise SystemExit(
            "error: --batch-norm mul applies to --format int8 only: QAT always computes its "
            "BatchNorms as depthwise convs (what its fake-quant model is trained for)."
        )
    if args.format == "qat" and args.qat_steps is None and args.qat_epochs is None:
        raise SystemExit("error: --format qat needs --qat-steps or --qat-epochs.")
    model = load_keras_model(args.model)
    arch = rewrite.convmixer_arguments(model)  # raises ValueError if not a ConvMixer
    image_size = tuple(int(d) for d in arch["input_shape"][:2])

    class_names = None
    calibration = None
    fine_tune = None
    if args.data_dir or args.dataset:
        calib_ds, class_names = _training_data(args, image_size, batch_size=64)
        if needs_data:
            calibration = calibration_images(calib_ds, args.calibration_images)
    if args.format == "qat":
        train_ds, _ = _training_data(args, image_size, batch_size=args.qat_batch_size)
        steps = args.qat_steps
        if steps is None:
            batches = int(train_ds.cardinality())
            if batches < 0:
                raise SystemExit("error: the dataset size is unknown: use --qat-steps.")
            steps = max(1, math.ceil(args.qat_epochs * batches))
        qat_model = quantize.quantize_model(model, calibration_images=calibration)
        fine_tune = quantize.finetune(
            qat_model, train_ds, steps=steps, learning_rate=args.qat_lr, verbose=2
        )
        fine_tune["steps"] = steps
        model = quantize.rebatch_qat_model(qat_model)

    blob = tflite.convert(
        model,
        args.format,
        calibration_images=calibration,
        io_type=args.io,
        depthwise_tile=tile,
        class_names=class_names,
        batch_norm=args.batch_norm,
    )
    tflite.write_atomic(args.output, blob)
    summary = tflite.summarize(blob)
    result = {
        "output": os.fspath(args.output),
        "format": args.format,
        "bytes": len(blob),
        "input_dtype": summary.input_dtype,
        "input_quantization": (
            list(summary.input_quantization) if summary.input_quantization else None
        ),
        "output_dtype": summary.output_dtype,
        "ops": sorted(set(summary.ops)),
    }
    if class_names is not None:
        labels = tflite.labels_path(args.output)
        tflite.write_atomic(labels, "\n".join(class_names) + "\n")
        result["labels"] = labels
    if args.format in tflite.INTEGER_FORMATS:
        result["fully_integer"] = not tflite.integer_problems(blob)
    if fine_tune is not None:
        result["qat"] = fine_tune
    if args.edgetpu:
        result["edgetpu"] = tflite.edgetpu_report(blob)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
