"""One export function: a Keras ConvMixer in, a checked .tflite (and its report) out.

:func:`export_model` is what ``python -m export`` and ``python -m export.benchmark`` both call:
it validates the request before any expensive work, draws the calibration images from the
training data, runs quantization-aware fine-tuning for ``"qat"``, converts
(:func:`export.tflite.convert`), writes the .tflite and its labels atomically, and reports.

Example:
    >>> import convmixer_tf
    >>> from export import export_model
    >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
    >>> result = export_model(model, "fp32")
    >>> result.report["format"], result.report["input_dtype"]
    ('fp32', 'float32')
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

import convmixer_tf
from convmixer_tf import files, imagenet
from export import quantize, saved_model, tflite
from export.constants import FORMATS, INTEGER_FORMATS
from export.options import ExportOptions, parse_depthwise_tile, resolve


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_model` made: the .tflite bytes (None for a SavedModel), its JSON-ready
    report, and the fake-quant Keras model of a QAT export (the reference its .tflite should
    agree with)."""

    blob: bytes | None
    report: dict
    qat_model: object | None = None


def draw_calibration_images(dataset, count: int) -> np.ndarray:
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


def check_request(fmt: str, options: ExportOptions, *, has_data: bool) -> None:
    """Raises a ValueError naming the option that cannot work with ``fmt``; no TensorFlow
    work (each option's own range is checked by :class:`ExportOptions`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}. Received: {fmt!r}")
    if options.gelu != "exact" and fmt == "saved_model":
        raise ValueError("gelu 'sigmoid' applies to .tflite formats; a SavedModel is exact.")
    images_given = isinstance(options.calibration_images, np.ndarray)
    if fmt in INTEGER_FORMATS and not has_data and not images_given:
        raise ValueError(
            f"format {fmt} needs training data for calibration"
            f"{' and fine-tuning' if fmt == 'qat' else ''}: pass --data-dir or --dataset."
        )
    if fmt == "qat":
        if options.batch_norm != "depthwise":
            raise ValueError(
                "batch_norm 'mul' applies to format int8 only: QAT always computes its "
                "BatchNorms as depthwise convs (what its fake-quant model is trained for)."
            )
        if options.qat_steps is None and options.qat_epochs is None:
            raise ValueError("format qat needs --qat-steps or --qat-epochs.")
        if options.qat_steps is not None and options.qat_epochs is not None:
            raise ValueError("give --qat-steps or --qat-epochs, not both.")
        if not has_data:
            raise ValueError("format qat needs training data: pass --data-dir or --dataset.")
    edge_targets(options.targets, fmt)


def edge_targets(targets: Sequence[str] | None, fmt: str) -> list[str]:
    """The requested edge targets, deduplicated, or a ValueError naming the problem (unknown
    target, a format that is not fully integer, the tool not installed)."""
    from export import edge

    return edge.check_targets(targets or (), fmt)


def _check_targets(blob, targets, output, *, main_output, images, options):
    """Runs each target's tool on ``blob``; returns the report per target and the files to
    write beside ``output`` (Vela's, and the TFLM file when it is not the main output)."""
    from export import edge
    from export.constants import TFLM_TARGET

    graph = "the main output" if main_output else "untiled depthwise convs"
    reports, outputs = {}, {}
    tflm = None
    if TFLM_TARGET in targets:
        tflm = edge.run_tflm(blob, images[: options.tflm_images])
        tflm["graph"] = graph
        if output is not None and not main_output:
            path = edge.target_path(output, TFLM_TARGET)
            outputs[path] = blob
            tflm["output"] = path
        elif output is not None:
            tflm["output"] = os.fspath(output)
        reports[TFLM_TARGET] = tflm
    for target in targets:
        if target == TFLM_TARGET:
            continue
        optimized, vela = edge.run_vela(
            blob, target, system_config=options.vela_system_config,
            memory_mode=options.vela_memory_mode, config=options.vela_config,
        )  # fmt: skip
        vela["graph"] = graph
        if output is not None:
            path = edge.target_path(output, target)
            outputs[path] = optimized
            vela["output"] = path
        if tflm is None and edge.tflm_installed():
            tflm = edge.tflm_ops_check(blob)
        if tflm is not None:
            vela["tflm_chain"] = edge.micro_chain(vela, tflm)
        reports[target] = vela
    return reports, outputs


def _check_class_names(class_names, model) -> None:
    outputs = int(model.output_shape[-1])
    if class_names is not None and len(class_names) != outputs:
        raise ValueError(
            f"{len(class_names)} class names ({list(class_names)[:3]}...) for a model with "
            f"{outputs} outputs."
        )


def fixed_input_model(model, input_size: int | None = None):
    """``model`` with a fixed square input size (exports need one); ValueError if it has none."""
    args = convmixer_tf.model_arguments(model)
    height, width = args["input_shape"][:2]
    if input_size is not None:
        if (height, width) == (input_size, input_size):
            return model
        return convmixer_tf.rebuild(model, input_shape=(input_size, input_size, 3))
    if height is None or width is None:
        raise ValueError(
            f"Model {model.name!r} has no fixed input size (input shape {args['input_shape']}): "
            "give the export an input size (--input-size)."
        )
    return model


def output_paths(fmt: str, output: str | os.PathLike, options: ExportOptions) -> list[str]:
    """Every path an export to ``output`` may write (the file or folder, its labels, the edge
    targets' files): what the command checks against its inputs before any work."""
    if fmt == "saved_model":
        return [os.fspath(output)]
    from export import edge

    paths = [os.fspath(output), tflite.labels_path(output)]
    return paths + [edge.target_path(output, target) for target in options.targets]


def export_model(
    model,
    fmt: str,
    output: str | os.PathLike | None = None,
    *,
    data: Mapping | None = None,
    class_names: Sequence[str] | None = None,
    options: ExportOptions | None = None,
    **overrides,
) -> ExportResult:
    """Converts a Keras ConvMixer to a .tflite of ``fmt`` or a serving SavedModel.

    Every file it writes (the .tflite, its labels, the edge targets' files) appears only once
    all of them are made: a failure at any stage leaves nothing new behind.

    Args:
        model: a Keras 3 or tf_keras ConvMixer (for example from :func:`convmixer_tf.load_model`).
        fmt: ``"fp32"``, ``"fp16"``, ``"dynamic"``, ``"int8"`` (post-training), ``"qat"``, or
            ``"saved_model"`` (:mod:`export.saved_model`).
        output: the .tflite path (the class names beside it as ``<name>.labels.txt``; None
            returns the bytes only), or the SavedModel folder.
        data: the training data, as :func:`training.data.load_dataset` keyword arguments that
            name it (``data_dir`` or ``dataset``, ``tfds_data_dir``, ``validation_fraction``,
            ``limit_per_class``): calibration images, QAT batches and class names come from its
            training split.
        class_names: stored in the .tflite's metadata; default: the data's class names.
        options: an :class:`export.options.ExportOptions` (its fields document every option:
            calibration, QAT length and learning rate, depthwise tiling, BatchNorm and GELU
            forms, edge targets, the SavedModel's crop and interpolation, ...).
        **overrides: fields of ``options`` by name (``qat_steps=100``, ``targets=["tflm"]``).

    Returns:
        An :class:`ExportResult`; ``report`` is what ``python -m export`` prints.

    Raises:
        ValueError: a request that cannot work (checked before any data is read or model
            converted), naming the option; or an edge tool that rejected the file.
    """
    options = resolve(options, overrides)
    check_request(fmt, options, has_data=data is not None)
    if fmt == "saved_model":
        return _export_saved_model(model, output, data, class_names, options)
    if output is not None:
        output = files.check_writable(output)
    model = _prepared_model(model, options)
    calibration, class_names, training_batches = _read_data(model, fmt, data, class_names, options)
    model, qat_model, fine_tune = _fine_tune(model, fmt, calibration, training_batches, options)
    tile = parse_depthwise_tile(options.depthwise_tile)
    blob = _convert(model, fmt, calibration, class_names, options, tile)
    report = _report(blob, fmt, output, options)
    outputs = {}
    if output is not None:
        outputs[output] = blob
        if class_names is not None:
            report["labels"] = tflite.labels_path(output)
            outputs[report["labels"]] = tflite.labels_text(class_names)
    if fine_tune is not None:
        report["qat"] = fine_tune
    if options.edgetpu:
        report["edgetpu"] = tflite.edgetpu_report(blob)
    if options.targets:
        report["targets"], edge_outputs = _edge_checks(
            model, blob, fmt, output, calibration, class_names, options
        )
        outputs.update(edge_outputs)
    files.write_all(outputs)
    return ExportResult(blob=blob, report=report, qat_model=qat_model)


def _export_saved_model(model, output, data, class_names, options) -> ExportResult:
    """The saved_model format: a serving SavedModel folder (:mod:`export.saved_model`)."""
    if output is None:
        raise ValueError("format saved_model needs an output folder.")
    saved_model.check_output(os.fspath(output))
    if class_names is None and data is not None:
        from training.data import decoded_dataset

        class_names = decoded_dataset(**data, split="train").class_names
    report = saved_model.write(
        model, output, class_names=class_names, input_size=options.input_size,
        crop_pct=options.crop_pct or imagenet.CROP_PCT,
        interpolation=options.interpolation or imagenet.INTERPOLATION,
    )  # fmt: skip
    return ExportResult(blob=None, report=report)


def _prepared_model(model, options: ExportOptions):
    """The model with a fixed input size, its GELUs rewritten for ``gelu="sigmoid"``."""
    model = fixed_input_model(model, options.input_size)
    if options.gelu == "sigmoid":
        from export import rewrite

        model = rewrite.gelu_as_silu(model)
    return model


def _read_data(model, fmt, data, class_names, options: ExportOptions):
    """``(calibration images, class names, training_batches(batch_size))`` from the data."""
    calibration = options.calibration_images
    calibration = calibration if isinstance(calibration, np.ndarray) else None
    if data is None:
        _check_class_names(class_names, model)
        return calibration, class_names, None
    from training.data import load_dataset

    image_size = tuple(int(d) for d in convmixer_tf.model_arguments(model)["input_shape"][:2])

    def training_batches(batch_size):
        return load_dataset(
            **data, split="train", image_size=image_size, batch_size=batch_size,
            shuffle=True, seed=options.seed,
        )  # fmt: skip

    calibration_ds, data_class_names = training_batches(64)
    class_names = data_class_names if class_names is None else class_names
    if calibration is None and fmt in INTEGER_FORMATS:
        calibration = draw_calibration_images(calibration_ds, options.calibration_images)
    _check_class_names(class_names, model)  # the data's classes must fit the model too
    return calibration, class_names, training_batches


def _fine_tune(model, fmt, calibration, training_batches, options: ExportOptions):
    """QAT (format qat): ``(model to convert, fake-quant model, QAT report)``; otherwise the
    model as it is and two Nones."""
    if fmt != "qat":
        return model, None, None
    train_ds, _ = training_batches(options.qat_batch_size)
    steps = options.qat_steps
    if steps is None:
        batches = int(train_ds.cardinality())
        if batches < 0:
            raise ValueError("The training data's size is unknown: give qat_steps.")
        steps = max(1, math.ceil(options.qat_epochs * batches))
    tile = parse_depthwise_tile(options.depthwise_tile)
    qat_model = quantize.quantize_model(
        model, calibration_images=calibration,
        depthwise_tile=tflite.DEFAULT_DEPTHWISE_TILE if tile == "auto" else tile,
    )  # fmt: skip
    report = quantize.finetune(
        qat_model, train_ds, steps=steps, learning_rate=options.qat_lr, verbose=options.verbose
    )
    report["steps"] = steps
    return quantize.rebatch_qat_model(qat_model), qat_model, report


def _convert(model, fmt, calibration, class_names, options: ExportOptions, depthwise_tile):
    """The .tflite bytes (:func:`export.tflite.convert`; int8 and qat files fully integer)."""
    return tflite.convert(
        model, fmt, calibration_images=calibration, io_type=options.io_type,
        depthwise_tile=depthwise_tile, class_names=class_names, batch_norm=options.batch_norm,
    )  # fmt: skip


def _report(blob: bytes, fmt: str, output, options: ExportOptions) -> dict:
    """What the export prints: the file's format, size, types and ops."""
    summary = tflite.summarize(blob)
    report = {
        "output": None if output is None else os.fspath(output),
        "format": fmt,
        "bytes": len(blob),
        "input_dtype": summary.input_dtype,
        "input_quantization": (
            list(summary.input_quantization) if summary.input_quantization else None
        ),
        "output_dtype": summary.output_dtype,
        "ops": sorted(set(summary.ops)),
    }
    if options.gelu != "exact":
        report["gelu"] = options.gelu
    if fmt in INTEGER_FORMATS:
        report["fully_integer"] = True  # tflite.convert raises for one that is not
    return report


def _edge_checks(model, blob, fmt, output, calibration, class_names, options: ExportOptions):
    """Each edge target's own tool on the file (the untiled graph for int8 with automatic
    tiles: smaller and faster there); returns the reports and the files to write."""
    edge_blob = blob
    auto = parse_depthwise_tile(options.depthwise_tile) == "auto"
    if auto and fmt != "qat" and tflite.has_tiled_depthwise(model):
        edge_blob = _convert(model, fmt, calibration, class_names, options, depthwise_tile=None)
    # A QAT file's tiles were fine-tuned as tiles: the edge tools get it as it is (for the
    # untiled graph they prefer, export qat with depthwise_tile none).
    return _check_targets(
        edge_blob, options.targets, output, main_output=edge_blob is blob, images=calibration,
        options=options,
    )  # fmt: skip
