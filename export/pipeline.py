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
from convmixer_tf.constants import INTERPOLATIONS
from export import quantize, saved_model, tflite
from export.constants import BATCH_NORM_MODES, FORMATS, GELU_MODES, INTEGER_FORMATS, IO_TYPES

DEFAULT_CALIBRATION_IMAGES = 256
# Images TFLite Micro runs to compare its outputs with LiteRT's (its kernels are slow).
DEFAULT_TFLM_IMAGES = 32


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


def parse_depthwise_tile(value: str | int | None) -> str | int | None:
    """``"auto"``, ``"none"`` / None, or a positive tile size (an int or its string)."""
    if value in ("auto", "none", None):
        return None if value in ("none", None) else "auto"
    try:
        tile = int(value)
    except (TypeError, ValueError):
        tile = 0
    if tile < 1:
        raise ValueError(
            f"depthwise_tile must be auto, none or a positive int. Received: {value!r}"
        )
    return tile


def check_request(
    fmt: str,
    *,
    has_data: bool,
    io_type: str = "int8",
    depthwise_tile: str | int | None = "auto",
    batch_norm: str = "depthwise",
    qat_steps: int | None = None,
    qat_epochs: float | None = None,
    calibration_images: int | np.ndarray = DEFAULT_CALIBRATION_IMAGES,
    gelu: str = "exact",
) -> None:
    """Raises a ValueError naming the option whose value cannot work; no TensorFlow work."""
    parse_depthwise_tile(depthwise_tile)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}. Received: {fmt!r}")
    if io_type not in IO_TYPES:
        raise ValueError(f"io must be one of {IO_TYPES}. Received: {io_type!r}")
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}. Received: {batch_norm!r}")
    if gelu not in GELU_MODES:
        raise ValueError(f"gelu must be one of {GELU_MODES}. Received: {gelu!r}")
    if gelu != "exact" and fmt == "saved_model":
        raise ValueError("gelu 'sigmoid' applies to .tflite formats; a SavedModel is exact.")
    integer = fmt in INTEGER_FORMATS
    if integer and not has_data and not isinstance(calibration_images, np.ndarray):
        raise ValueError(
            f"format {fmt} needs training data for calibration"
            f"{' and fine-tuning' if fmt == 'qat' else ''}: pass --data-dir or --dataset."
        )
    if fmt == "qat":
        if batch_norm != "depthwise":
            raise ValueError(
                "batch_norm 'mul' applies to format int8 only: QAT always computes its "
                "BatchNorms as depthwise convs (what its fake-quant model is trained for)."
            )
        if qat_steps is None and qat_epochs is None:
            raise ValueError("format qat needs --qat-steps or --qat-epochs.")
        if not has_data:
            raise ValueError("format qat needs training data: pass --data-dir or --dataset.")
    if qat_steps is not None and qat_steps < 1:
        raise ValueError(f"qat_steps must be positive. Received: {qat_steps}")
    if qat_epochs is not None and qat_epochs <= 0:
        raise ValueError(f"qat_epochs must be positive. Received: {qat_epochs}")
    if not isinstance(calibration_images, np.ndarray) and calibration_images < 1:
        raise ValueError(f"calibration_images must be positive. Received: {calibration_images}")


def edge_targets(targets: Sequence[str] | None, fmt: str) -> list[str]:
    """The requested edge targets, deduplicated, or a ValueError naming the problem (unknown
    target, a format that is not fully integer, the tool not installed)."""
    from export import edge

    return edge.check_targets(targets or (), fmt)


def _check_targets(blob, targets, output, *, main_output, images, tflm_images, vela_options):
    """Runs each target's tool on ``blob``; writes Vela's files (and the TFLM file when it is
    not the main output) beside ``output``; returns the report per target."""
    from export import edge
    from export.constants import TFLM_TARGET

    graph = "the main output" if main_output else "untiled depthwise convs"
    reports = {}
    tflm = None
    if TFLM_TARGET in targets:
        tflm = edge.run_tflm(blob, images[:tflm_images])
        tflm["graph"] = graph
        if output is not None and not main_output:
            path = edge.target_path(output, TFLM_TARGET)
            files.write_atomic(path, blob)
            tflm["output"] = path
        elif output is not None:
            tflm["output"] = os.fspath(output)
        reports[TFLM_TARGET] = tflm
    for target in targets:
        if target == TFLM_TARGET:
            continue
        optimized, vela = edge.run_vela(blob, target, **vela_options)
        vela["graph"] = graph
        if output is not None:
            path = edge.target_path(output, target)
            files.write_atomic(path, optimized)
            vela["output"] = path
        if tflm is None and edge.tflm_installed():
            tflm = edge.tflm_ops_check(blob)
        if tflm is not None:
            vela["tflm_chain"] = edge.micro_chain(vela, tflm)
        reports[target] = vela
    return reports


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


def training_run_settings(model_path: str | os.PathLike) -> dict:
    """What a training run's folder says about the model file in it: ``class_names`` (from
    ``class_names.json``) and the evaluation ``crop_pct`` and ``interpolation`` (from
    ``config.json``); an empty dict for a model file outside a run folder."""
    import json

    from training.rundir import CLASS_NAMES_FILE, CONFIG_FILE

    folder = os.path.dirname(os.path.abspath(os.fspath(model_path)))
    settings = {}
    try:
        with open(os.path.join(folder, CLASS_NAMES_FILE)) as f:
            names = json.load(f)
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            settings["class_names"] = names
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            config = json.load(f)
        crop_pct, interpolation = config.get("crop_pct"), config.get("interpolation")
        if isinstance(crop_pct, int | float) and 0 < crop_pct <= 1:
            settings["crop_pct"] = float(crop_pct)
        if interpolation in INTERPOLATIONS:
            settings["interpolation"] = interpolation
    except (OSError, ValueError):
        pass
    return settings


def export_model(
    model,
    fmt: str,
    output: str | os.PathLike | None = None,
    *,
    data: Mapping | None = None,
    calibration_images: int | np.ndarray = DEFAULT_CALIBRATION_IMAGES,
    class_names: Sequence[str] | None = None,
    input_size: int | None = None,
    crop_pct: float = imagenet.CROP_PCT,
    interpolation: str = imagenet.INTERPOLATION,
    io_type: str = "int8",
    depthwise_tile: str | int | None = "auto",
    batch_norm: str = "depthwise",
    gelu: str = "exact",
    qat_steps: int | None = None,
    qat_epochs: float | None = None,
    qat_lr: float = 1e-5,
    qat_batch_size: int = 64,
    edgetpu: bool = False,
    targets: Sequence[str] = (),
    vela_system_config: str | None = None,
    vela_memory_mode: str | None = None,
    vela_config: str | None = None,
    tflm_images: int = DEFAULT_TFLM_IMAGES,
    seed: int = 0,
    verbose: int = 2,
) -> ExportResult:
    """Converts a Keras ConvMixer to a .tflite of ``fmt`` or a serving SavedModel.

    Args:
        model: a Keras 3 or tf_keras ConvMixer (for example from :func:`convmixer_tf.load_model`).
        fmt: ``"fp32"``, ``"fp16"``, ``"dynamic"``, ``"int8"`` (post-training), ``"qat"``, or
            ``"saved_model"`` (:mod:`export.saved_model`).
        output: the .tflite path (written atomically, the class names beside it as
            ``<name>.labels.txt``; None returns the bytes only), or the SavedModel folder.
        data: the training data, as :func:`training.data.load_dataset` keyword arguments that
            name it (``data_dir`` or ``dataset``, ``tfds_data_dir``, ``validation_fraction``,
            ``limit_per_class``): calibration images, QAT batches and class names come from its
            training split.
        calibration_images: how many training images calibrate int8 ranges, or the images
            themselves (raw pixels, ``(N, H, W, 3)``).
        class_names: stored in the .tflite's metadata; default: the data's class names.
        input_size: a square input size for models without a fixed one (a SavedModel keeps
            the free size for its pixel signature and resizes image files to this one).
        crop_pct, interpolation: the evaluation transform of the SavedModel's image-file
            signature (the variant's, or the training run's).
        io_type: input/output type of the integer formats, ``"int8"`` or ``"uint8"``.
        depthwise_tile, batch_norm: see :func:`export.tflite.prepare_keras_model`.
        gelu: ``"exact"`` (TFLite's GELU op) or ``"sigmoid"``: a GELU model's activations as
            ``x * sigmoid(1.702 x)`` (:func:`export.rewrite.gelu_as_silu`; LOGISTIC + MUL, one
            XNNPACK partition in int8, runs in TFLite Micro); QAT then trains that graph.
        qat_steps, qat_epochs: QAT length (one of them for ``"qat"``).
        qat_lr, qat_batch_size: QAT's AdamW learning rate and batch size.
        edgetpu: add the Edge TPU op check to the report.
        targets: edge targets checked by their own tools (:mod:`export.edge`, int8 and qat
            only): Vela accelerator configurations (``"ethos-u55-128"``, ...; the optimized file
            is written beside ``output`` as ``<name>.<target>.tflite``) and ``"tflm"`` (TFLite
            Micro: runs ``tflm_images`` calibration images, compares with LiteRT, measures the
            arena). With ``depthwise_tile="auto"`` these tools get the untiled graph (smaller
            and faster there, docs/export.md); it is written as ``<name>.tflm.tflite`` when it
            differs from ``output``.
        vela_system_config, vela_memory_mode, vela_config: Vela's system configuration, memory
            mode and .ini file (default: Vela's own per accelerator family).
        tflm_images: how many images the TFLite Micro comparison runs.
        seed: draws the calibration images and orders (and seeds) QAT's batches: exports with
            different seeds measure the spread over calibration draws and QAT runs.
        verbose: Keras' verbosity during QAT.

    Returns:
        An :class:`ExportResult`; ``report`` is what ``python -m export`` prints.

    Raises:
        ValueError: a request that cannot work (checked before any data is read or model
            converted), naming the option.
    """
    targets = edge_targets(targets, fmt)
    check_request(
        fmt,
        has_data=data is not None,
        io_type=io_type,
        depthwise_tile=depthwise_tile,
        batch_norm=batch_norm,
        qat_steps=qat_steps,
        qat_epochs=qat_epochs,
        calibration_images=calibration_images,
        gelu=gelu,
    )
    if fmt == "saved_model":
        if output is None:
            raise ValueError("format saved_model needs an output folder.")
        saved_model.check_output(os.fspath(output))
        if class_names is None and data is not None:
            from training.data import decoded_dataset

            class_names = decoded_dataset(**data, split="train").class_names
        report = saved_model.write(
            model, output, class_names=class_names, input_size=input_size, crop_pct=crop_pct,
            interpolation=interpolation,
        )  # fmt: skip
        return ExportResult(blob=None, report=report)
    if output is not None:
        output = files.check_writable(output)
    model = fixed_input_model(model, input_size)
    tile = parse_depthwise_tile(depthwise_tile)
    if gelu == "sigmoid":
        from export import rewrite

        model = rewrite.gelu_as_silu(model)
    image_size = tuple(int(d) for d in convmixer_tf.model_arguments(model)["input_shape"][:2])

    calibration = calibration_images if isinstance(calibration_images, np.ndarray) else None
    if data is not None:
        from training.data import load_dataset

        def training_batches(batch_size):
            return load_dataset(
                **data, split="train", image_size=image_size, batch_size=batch_size,
                shuffle=True, seed=seed,
            )  # fmt: skip

        calibration_ds, data_class_names = training_batches(64)
        class_names = data_class_names if class_names is None else class_names
        if calibration is None and fmt in INTEGER_FORMATS:
            calibration = draw_calibration_images(calibration_ds, calibration_images)
    _check_class_names(class_names, model)  # the data's classes must fit the model too

    fine_tune = qat_model = None
    if fmt == "qat":
        train_ds, _ = training_batches(qat_batch_size)
        steps = qat_steps
        if steps is None:
            batches = int(train_ds.cardinality())
            if batches < 0:
                raise ValueError("The training data's size is unknown: give qat_steps.")
            steps = max(1, math.ceil(qat_epochs * batches))
        qat_model = quantize.quantize_model(
            model, calibration_images=calibration,
            depthwise_tile=tflite.DEFAULT_DEPTHWISE_TILE if tile == "auto" else tile,
        )  # fmt: skip
        fine_tune = quantize.finetune(
            qat_model, train_ds, steps=steps, learning_rate=qat_lr, verbose=verbose
        )
        fine_tune["steps"] = steps
        model = quantize.rebatch_qat_model(qat_model)

    blob = tflite.convert(
        model,
        fmt,
        calibration_images=calibration,
        io_type=io_type,
        depthwise_tile=tile,
        class_names=class_names,
        batch_norm=batch_norm,
    )
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
    if gelu != "exact":
        report["gelu"] = gelu
    if output is not None:
        files.write_atomic(output, blob)
        if class_names is not None:
            labels = tflite.labels_path(output)
            files.write_atomic(labels, "\n".join(class_names) + "\n")
            report["labels"] = labels
    if fmt in INTEGER_FORMATS:
        # tflite.convert raises for an int8 / qat file that is not fully integer.
        report["fully_integer"] = True
    if fine_tune is not None:
        report["qat"] = fine_tune
    if edgetpu:
        report["edgetpu"] = tflite.edgetpu_report(blob)
    if targets:
        edge_blob = blob
        if tile == "auto" and fmt != "qat" and tflite.has_tiled_depthwise(model):
            edge_blob = tflite.convert(
                model, fmt, calibration_images=calibration, io_type=io_type,
                depthwise_tile=None, class_names=class_names, batch_norm=batch_norm,
            )  # fmt: skip
        # A QAT file's tiles were fine-tuned as tiles: the edge tools get it as it is (for the
        # untiled graph they prefer, export qat with depthwise_tile none).
        report["targets"] = _check_targets(
            edge_blob, targets, output, main_output=edge_blob is blob, images=calibration,
            tflm_images=tflm_images, vela_options=dict(system_config=vela_system_config,
            memory_mode=vela_memory_mode, config=vela_config),
        )  # fmt: skip
    return ExportResult(blob=blob, report=report, qat_model=qat_model)
