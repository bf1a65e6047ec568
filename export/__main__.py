"""Export a ConvMixer ``.keras`` model to TFLite or to a SavedModel for serving.

Usage::

    # float formats (no data needed)
    python -m export --model model.keras --format fp32 --output out/model_fp32.tflite
    # full-integer post-training quantization, calibrated on the training images
    python -m export --model model.keras --format int8 --output out/model_int8.tflite \\
        --data-dir DATA/cifar10/train
    # quantization-aware fine-tuning (tfmot), then full-integer conversion; Edge TPU op check
    python -m export --model model.keras --format qat --output out/model_qat.tflite \\
        --data-dir DATA/cifar10/train --qat-steps 300 --qat-lr 1e-5 --edgetpu
    # an Arm Ethos-U55 (Vela) and a microcontroller (TFLite Micro) check of the int8 file
    python -m export --model model.keras --format int8 --output out/model_int8.tflite \\
        --data-dir DATA/cifar10/train --target ethos-u55-128 --target tflm
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
import sys
from collections.abc import Sequence

from convmixer_tf import cli
from export import options as options_lib
from export.constants import FORMATS


def build_parser() -> argparse.ArgumentParser:
    from training.data import add_data_source_arguments

    parser = cli.ArgumentParser(
        prog="python -m export",
        description="Export a ConvMixer .keras model to TFLite or to a serving SavedModel.",
    )
    parser.add_argument("--model", required=True, type=cli.input_path, help="the .keras model file")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--output", required=True, type=cli.output_path,
        help="the .tflite file (a folder for saved_model) to write",
    )  # fmt: skip
    add_data_source_arguments(parser, required=False)
    options_lib.add_arguments(parser)
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Exports as ``args`` say; prints the JSON report on stdout, all logging on stderr."""
    from convmixer_tf import files, saving
    from export import pipeline, saved_model
    from training.data import data_source_kwargs

    has_data = bool(args.data_dir or args.dataset)
    options = options_lib.from_args(args)
    # Everything that can be checked without loading a model, before loading it.
    pipeline.check_request(args.format, options, has_data=has_data)
    if args.format == "saved_model":
        saved_model.check_output(args.output)
    else:
        files.check_writable(args.output)
    files.check_not_input(
        [("--output", path) for path in pipeline.output_paths(args.format, args.output, options)],
        {"--model": args.model, "--data-dir": args.data_dir, "--val-dir": args.val_dir,
         "--vela-config": args.vela_config},
    )  # fmt: skip
    # A training run's folder tells the class names and the evaluation transform.
    run_settings = saving.training_run_settings(args.model)
    class_names = None if has_data else run_settings.get("class_names")  # the data's win
    overrides = {
        name: run_settings[name]
        for name in ("crop_pct", "interpolation")
        if getattr(options, name) is None and name in run_settings
    }
    with cli.stdout_to_stderr():
        import convmixer_tf

        model = convmixer_tf.load_model(args.model, unsafe=args.unsafe)
        result = pipeline.export_model(
            model, args.format, args.output, class_names=class_names, options=options,
            data=data_source_kwargs(args) if has_data else None, **overrides,
        )  # fmt: skip
    cli.emit(result.report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
