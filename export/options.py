"""The export's options, once: one dataclass that the library, ``python -m export`` and the
benchmarks share (defaults, checks and the command line's options all come from here).

Each field's metadata holds its command-line option (``flag``, ``type``, ``choices``, ``help``);
:func:`add_arguments` turns the fields into argparse options and :func:`from_args` turns the
parsed options back into an :class:`ExportOptions`. A field without a flag is library-only.
Imports no TensorFlow.

Example:
    >>> from export.options import ExportOptions
    >>> ExportOptions(qat_steps=100).qat_lr
    1e-05
    >>> ExportOptions(qat_lr=float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: qat_lr (--qat-lr) must be a positive finite number. Received: inf
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from convmixer_tf import cli
from convmixer_tf.constants import INTERPOLATIONS
from export.constants import BATCH_NORM_MODES, GELU_MODES, INTEGER_FORMATS, IO_TYPES, TARGETS


def _option(default: Any, flag: str | None = None, help: str = "", **argparse_kwargs) -> Any:  # noqa: A002
    return dataclasses.field(
        default=default, metadata={"flag": flag, "help": help, **argparse_kwargs}
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ExportOptions:
    """How :func:`export.export_model` converts (everything but the model, format, output and
    data). Checked when made: a bad value is a ValueError naming the field and its option."""

    calibration_images: Any = _option(
        256, "--calibration-images", type=cli.positive_int,
        help="training images for the converter's representative dataset (int8, qat); the "
        "library also takes the images themselves, an (N, H, W, 3) array",
    )  # fmt: skip
    seed: int = _option(
        0, "--seed", type=cli.nonnegative_int,
        help="draws the calibration images and orders QAT's batches (vary it to measure spread)",
    )  # fmt: skip
    input_size: int | None = _option(
        None, "--input-size", type=cli.image_size,
        help="square input size, for models saved without a fixed one",
    )  # fmt: skip
    io_type: str = _option(
        "int8", "--io", choices=IO_TYPES,
        help=f"input/output type of {' and '.join(INTEGER_FORMATS)} models",
    )  # fmt: skip
    qat_steps: int | None = _option(
        None, "--qat-steps", type=cli.positive_int, help="QAT length in optimizer steps"
    )
    qat_epochs: float | None = _option(
        None, "--qat-epochs", type=cli.positive_float, help="QAT length in epochs"
    )
    qat_lr: float = _option(1e-5, "--qat-lr", type=cli.positive_float,
                            help="QAT learning rate (AdamW)")  # fmt: skip
    qat_batch_size: int = _option(64, "--qat-batch-size", type=cli.positive_int,
                                  help="QAT batch size")  # fmt: skip
    depthwise_tile: str | int | None = _option(
        "auto", "--depthwise-tile", type=lambda text: depthwise_tile_arg(text),
        help="auto (3x3 tiles for kernels > 5, qat included; the edge targets get the untiled "
        "graph from int8), none, or a tile size",
    )  # fmt: skip
    batch_norm: str = _option(
        "depthwise", "--batch-norm", choices=BATCH_NORM_MODES,
        help="int8: BatchNorms as 1x1 depthwise convs (per-channel, accurate; default) or as "
        "MUL + ADD (smaller file)",
    )  # fmt: skip
    gelu: str = _option(
        "exact", "--gelu", choices=GELU_MODES,
        help="GELU models: exact (TFLite's GELU op) or sigmoid (x * sigmoid(1.702 x) as "
        "LOGISTIC + MUL: one XNNPACK partition in int8, runs in TFLite Micro; use with qat)",
    )  # fmt: skip
    edgetpu: bool = _option(False, "--edgetpu", action="store_true",
                            help="report whether every op suits the Edge TPU compiler")  # fmt: skip
    targets: tuple[str, ...] = _option(
        (), "--target", action="append", choices=TARGETS, metavar="TARGET",
        help="int8/qat: check the file with an edge target's own tool (repeatable): a Vela "
        "accelerator configuration (Arm Ethos-U: writes <output>.<target>.tflite and reports "
        "Vela's NPU/CPU op split, estimated time and memory) or tflm (runs it in TFLite Micro, "
        f"compared with LiteRT). Choices: {', '.join(TARGETS)}",
    )  # fmt: skip
    vela_system_config: str | None = _option(
        None, "--vela-system-config",
        help="Vela's system configuration (default: Vela's own for the accelerator family)",
    )  # fmt: skip
    vela_memory_mode: str | None = _option(None, "--vela-memory-mode", help="Vela's memory mode")
    vela_config: str | None = _option(
        None, "--vela-config", type=cli.input_file, help="a Vela .ini file defining them"
    )
    tflm_images: int = _option(32, "--tflm-images", type=cli.positive_int,
                               help="images the TFLite Micro comparison runs")  # fmt: skip
    crop_pct: float | None = _option(
        None, "--crop-pct", type=cli.fraction,
        help="saved_model: center crop of the image-file signature (default: the training run's "
        "config.json beside --model, else 0.96 as for the ImageNet checkpoints)",
    )  # fmt: skip
    interpolation: str | None = _option(
        None, "--interpolation", choices=INTERPOLATIONS,
        help="saved_model: resize method of the image-file signature (default: the training "
        "run's, else bicubic)",
    )  # fmt: skip
    verbose: int = _option(2)  # Keras' verbosity during QAT (library only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets or ())))
        check(self)


def _name(field: dataclasses.Field) -> str:
    flag = field.metadata.get("flag")
    return f"{field.name} ({flag})" if flag else field.name


def check(options: ExportOptions) -> None:
    """Raises a ValueError naming the first option whose value cannot work (no TensorFlow)."""
    fields = {f.name: f for f in dataclasses.fields(options)}
    for name, field in fields.items():
        value, kind = getattr(options, name), field.metadata.get("type")
        if value is None or (name == "calibration_images" and hasattr(value, "shape")):
            continue  # unset, or the calibration images themselves (an array)
        if kind in cli.NUMBER_TYPES and not kind.accepts(value):
            raise ValueError(f"{_name(field)} must be {kind.what}. Received: {value!r}")
        if kind is cli.input_file and not os.path.isfile(value):
            raise ValueError(f"{_name(field)}: file not found: {value!r}")
    for name in ("io_type", "batch_norm", "gelu", "interpolation"):
        choices = fields[name].metadata["choices"]
        value = getattr(options, name)
        if value is not None and value not in choices:
            raise ValueError(f"{_name(fields[name])} must be one of {choices}. Received: {value!r}")
    for target in options.targets:
        if target not in TARGETS:
            raise ValueError(f"target (--target) must be one of {TARGETS}. Received: {target!r}")
    parse_depthwise_tile(options.depthwise_tile)


def parse_depthwise_tile(value: str | int | None) -> str | int | None:
    """``"auto"``, ``"none"`` / None, or a positive tile size (an int or its string)."""
    if value in ("auto", "none", None):
        return None if value in ("none", None) else "auto"
    try:
        tile = int(value)
    except (TypeError, ValueError):
        tile = 0
    if tile < 1 or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(
            "depthwise_tile (--depthwise-tile) must be auto, none or a positive int. "
            f"Received: {value!r}"
        )
    return tile


def add_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """Adds the fields that have a flag (all, or those named in ``only``) as options, with the
    dataclass's defaults."""
    for field in dataclasses.fields(ExportOptions):
        meta = dict(field.metadata)
        flag = meta.pop("flag")
        if flag is None or (only is not None and field.name not in only):
            continue
        default = field.default
        if meta.get("action") == "append":
            default = []
        parser.add_argument(flag, dest=field.name, default=default, **meta)


def from_args(args: argparse.Namespace, **overrides) -> ExportOptions:
    """The :class:`ExportOptions` of parsed options (fields the parser lacks keep defaults)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ExportOptions)
        if hasattr(args, f.name)
    }
    values.update(overrides)
    return ExportOptions(**values)


def resolve(options: ExportOptions | None, overrides: dict) -> ExportOptions:
    """``options`` (default: the defaults) with ``overrides``; an unknown name is a ValueError
    that lists the valid ones."""
    names = {f.name for f in dataclasses.fields(ExportOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown export option(s) {unknown}. Valid: {sorted(names)}")
    return dataclasses.replace(options or ExportOptions(), **overrides)


def depthwise_tile_arg(text: str) -> str | int | None:
    """argparse type of ``--depthwise-tile``: auto, none or a positive tile size."""
    try:
        return parse_depthwise_tile(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be auto, none or a positive int. Received: {text!r}"
        ) from None
