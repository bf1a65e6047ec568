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
import sys
from collections.abc import Sequence

from convmixer_tf import cli
from export.constants import BATCH_NORM_MODES, FORMATS, INTEGER_FORMATS, IO_TYPES


def build_parser() -> argparse.ArgumentParser:
    from training.data import add_data_source_arguments

    parser = argparse.ArgumentParser(
        prog="python -m export", description="Convert a ConvMixer .keras model to TFLite."
    )
    parser.add_argument("--model", required=True, help="the .keras model")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="the .tflite file to write")
    add_data_source_arguments(parser, required=False)
    parser.add_argument(
        "--calibration-images", type=int, default=256,
        help="training images for the converter's representative dataset (int8, qat)",
    )  # fmt: skip
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input size, for models saved without a fixed one")  # fmt: skip
    parser.add_argument(
        "--io", choices=IO_TYPES, default="int8",
        help=f"input/output type of {' and '.join(INTEGER_FORMATS)} models",
    )  # fmt: skip
    qat = parser.add_mutually_exclusive_group()
    qat.add_argument("--qat-steps", type=int, default=None, help="QAT length in optimizer steps")
    qat.add_argument("--qat-epochs", type=float, default=None, help="QAT length in epochs")
    parser.add_argument("--qat-lr", type=float, default=1e-5, help="QAT learning rate (AdamW)")
    parser.add_argument("--qat-batch-size", type=int, default=64)
    parser.add_argument(
        "--depthwise-tile", default="auto",
        help="auto (3x3 tiles for kernels > 5; not for qat), none, or a tile size",
    )  # fmt: skip
    parser.add_argument(
        "--batch-norm", choices=BATCH_NORM_MODES, default="depthwise",
        help="int8: BatchNorms as 1x1 depthwise convs (per-channel, accurate; default) or as "
        "MUL + ADD (smaller file)",
    )  # fmt: skip
    parser.add_argument("--edgetpu", action="store_true",
                        help="report whether every op suits the Edge TPU compiler")  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Exports as ``args`` say; prints the JSON report on stdout, all logging on stderr."""
    from convmixer_tf import files
    from export import pipeline
    from training.data import data_source_kwargs

    has_data = bool(args.data_dir or args.dataset)
    request = dict(
        io_type=args.io,
        depthwise_tile=args.depthwise_tile,
        batch_norm=args.batch_norm,
        qat_steps=args.qat_steps,
        qat_epochs=args.qat_epochs,
        calibration_images=args.calibration_images,
    )
    # Everything that can be checked without loading a model, before loading it.
    pipeline.check_request(args.format, has_data=has_data, **request)
    files.check_writable(args.output)
    with cli.stdout_to_stderr():
        import convmixer_tf

        model = convmixer_tf.load_model(args.model)
        result = pipeline.export_model(
            model,
            args.format,
            args.output,
            data=data_source_kwargs(args) if has_data else None,
            input_size=args.input_size,
            qat_lr=args.qat_lr,
            qat_batch_size=args.qat_batch_size,
            edgetpu=args.edgetpu,
            **request,
        )
    print(json.dumps(result.report), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
