"""Export a ConvMixer ``.keras`` model to TFLite or to a SavedModel for serving.

Usage::

    # float formats (no data needed)
    python -m export --model model.keras --format fp32 --output out/model_fp32.tflite
    # full-integer post-training quantization, calibrated on the training images
    python -m export --model model.keras --format int8 --output out/model_int8.tflite \\
        --data-dir ../shared/data/cifar10/train
    # quantization-aware fine-tuning (tfmot), then full-integer conversion; Edge TPU op check
    python -m export --model model.keras --format qat --output out/model_qat.tflite \\
        --data-dir ../shared/data/cifar10/train --qat-steps 300 --qat-lr 1e-5 --edgetpu
    # an Arm Ethos-U55 (Vela) and a microcontroller (TFLite Micro) check of the int8 file
    python -m export --model model.keras --format int8 --output out/model_int8.tflite \\
        --data-dir ../shared/data/cifar10/train --target ethos-u55-128 --target tflm
    # a SavedModel for TF Serving: raw uint8 pixels or encoded image files in, top-5 out
    python -m export --model runs/c10/model.keras --format saved_model --output served/1

Writes the .tflite atomically, the class names next to it (``model.labels.txt``; also stored in
the file's metadata; ``serving_default`` signature: ``pixels`` in, ``logits`` out) and prints one
JSON line describing the result. Class names come from ``--data-dir`` / ``--dataset``, else from
the training run's ``class_names.json`` beside ``--model``; a SavedModel's image-file
preprocessing from the run's ``config.json`` (``crop_pct``, ``interpolation``) unless given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from convmixer_tf import cli
from convmixer_tf.constants import INTERPOLATIONS
from export.constants import (
    BATCH_NORM_MODES,
    FORMATS,
    GELU_MODES,
    INTEGER_FORMATS,
    IO_TYPES,
    TARGETS,
)


def build_parser() -> argparse.ArgumentParser:
    from training.data import add_data_source_arguments

    parser = argparse.ArgumentParser(
        prog="python -m export", description="Convert a ConvMixer .keras model to TFLite."
    )
    parser.add_argument("--model", required=True, help="the .keras model")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--output", required=True, help="the .tflite file (a folder for saved_model) to write"
    )
    add_data_source_arguments(parser, required=False)
    parser.add_argument(
        "--calibration-images", type=int, default=256,
        help="training images for the converter's representative dataset (int8, qat)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0,
        help="draws the calibration images and orders QAT's batches (vary it to measure spread)",
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
        help="auto (3x3 tiles for kernels > 5, qat included; the edge targets get the untiled "
        "graph from int8), none, or a tile size",
    )  # fmt: skip
    parser.add_argument(
        "--batch-norm", choices=BATCH_NORM_MODES, default="depthwise",
        help="int8: BatchNorms as 1x1 depthwise convs (per-channel, accurate; default) or as "
        "MUL + ADD (smaller file)",
    )  # fmt: skip
    parser.add_argument(
        "--gelu", choices=GELU_MODES, default="exact",
        help="GELU models: exact (TFLite's GELU op) or sigmoid (x * sigmoid(1.702 x) as "
        "LOGISTIC + MUL: one XNNPACK partition in int8, runs in TFLite Micro; use with qat)",
    )  # fmt: skip
    parser.add_argument("--edgetpu", action="store_true",
                        help="report whether every op suits the Edge TPU compiler")  # fmt: skip
    parser.add_argument(
        "--target", action="append", choices=TARGETS, default=[], metavar="TARGET",
        help="int8/qat: check the file with an edge target's own tool (repeatable): a Vela "
        "accelerator configuration (Arm Ethos-U: writes <output>.<target>.tflite and reports "
        "Vela's NPU/CPU op split, estimated time and memory) or tflm (runs it in TFLite Micro, "
        f"compared with LiteRT). Choices: {', '.join(TARGETS)}",
    )  # fmt: skip
    parser.add_argument(
        "--vela-system-config", default=None,
        help="Vela's system configuration (default: Vela's own for the accelerator family)",
    )  # fmt: skip
    parser.add_argument("--vela-memory-mode", default=None, help="Vela's memory mode")
    parser.add_argument("--vela-config", default=None, help="a Vela .ini file defining them")
    parser.add_argument("--tflm-images", type=int, default=32,
                        help="images the TFLite Micro comparison runs")  # fmt: skip
    parser.add_argument(
        "--crop-pct", type=float, default=None,
        help="saved_model: center crop of the image-file signature (default: the training run's "
        "config.json beside --model, else 0.96 as for the ImageNet checkpoints)",
    )  # fmt: skip
    parser.add_argument(
        "--interpolation", choices=INTERPOLATIONS, default=None,
        help="saved_model: resize method of the image-file signature (default: the training "
        "run's, else bicubic)",
    )  # fmt: skip
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Exports as ``args`` say; prints the JSON report on stdout, all logging on stderr."""
    from convmixer_tf import files
    from export import pipeline, saved_model
    from training.data import data_source_kwargs

    has_data = bool(args.data_dir or args.dataset)
    request = dict(
        io_type=args.io,
        depthwise_tile=args.depthwise_tile,
        batch_norm=args.batch_norm,
        gelu=args.gelu,
        qat_steps=args.qat_steps,
        qat_epochs=args.qat_epochs,
        calibration_images=args.calibration_images,
    )
    # Everything that can be checked without loading a model, before loading it.
    pipeline.check_request(args.format, has_data=has_data, **request)
    targets = pipeline.edge_targets(args.target, args.format)
    if args.tflm_images < 1:
        raise ValueError(f"--tflm-images must be positive. Received: {args.tflm_images}")
    if args.format == "saved_model":
        saved_model.check_output(args.output)
    else:
        files.check_writable(args.output)
    # A training run's folder tells the class names and the evaluation transform.
    run_settings = pipeline.training_run_settings(args.model)
    if has_data:
        run_settings.pop("class_names", None)  # the data's own names win
    for name in ("crop_pct", "interpolation"):
        if getattr(args, name) is not None:
            run_settings[name] = getattr(args, name)
    with cli.stdout_to_stderr():
        import convmixer_tf

        model = convmixer_tf.load_model(args.model, unsafe=args.unsafe)
        result = pipeline.export_model(
            model,
            args.format,
            args.output,
            data=data_source_kwargs(args) if has_data else None,
            input_size=args.input_size,
            **run_settings,
            qat_lr=args.qat_lr,
            qat_batch_size=args.qat_batch_size,
            edgetpu=args.edgetpu,
            targets=targets,
            vela_system_config=args.vela_system_config,
            vela_memory_mode=args.vela_memory_mode,
            vela_config=args.vela_config,
            tflm_images=args.tflm_images,
            seed=args.seed,
            **request,
        )
    print(json.dumps(result.report), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
