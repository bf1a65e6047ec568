"""TFLite conversion of ConvMixer: fp32, fp16, dynamic-range, full-integer int8 and QAT models.

Every export is batch 1 with a static shape (what edge runtimes and the Edge TPU compiler need).
Before conversion the Keras 3 model is rebuilt with exact rewrites (:mod:`export.rewrite`): the
input normalization folded into the stem conv, (kernel > 5, all formats but qat) the large
depthwise convs tiled into 3x3 ones that XNNPACK runs fast, and (int8, qat) the BatchNorms as
1x1 depthwise convs.

int8 and qat files are fully integer: int8 (or uint8) input and output, no float tensors and no
QUANTIZE / DEQUANTIZE ops. The input takes raw pixels: its quantization is scale 1 and zero point
-128 (int8: ``q = pixel - 128``) or 0 (uint8: ``q = pixel``).

Example:
    >>> import convmixer_tf, numpy as np
    >>> from export import tflite
    >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
    >>> blob = tflite.convert(model, "fp32")
    >>> tflite.summarize(blob).input_dtype
    'float32'
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import flatbuffers
import numpy as np
import tensorflow as tf
import tf_keras
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from export import quantize, rewrite
from export.constants import BATCH_NORM_MODES, INTEGER_FORMATS, IO_TYPES, TFLITE_FORMATS

# Raw pixels map exactly: scale 1, zero point by io type.
PIXEL_QUANTIZATION = {"int8": (1.0, -128), "uint8": (1.0, 0)}
# XNNPACK's fast depthwise kernels stop at 5x5: larger kernels are tiled. The tile size "auto"
# uses, in every format (qat tiles its fake-quant model, export.quantize): 3x3 tiles were the
# fastest of plain, 5x5 and 3x3 in fp32 and int8 (docs/performance.md has the measurements).
FAST_DEPTHWISE_KERNEL = quantize.FAST_DEPTHWISE_KERNEL
DEFAULT_DEPTHWISE_TILE = quantize.DEFAULT_DEPTHWISE_TILE
LABELS_METADATA = "convmixer_labels"
# The .tflite's one signature: Interpreter.get_signature_runner()(pixels=...)["logits"].
SIGNATURE_KEY = "serving_default"
SIGNATURE_INPUTS = ("pixels",)
SIGNATURE_OUTPUTS = ("logits",)

# Ops the Edge TPU compiler maps to the TPU (coral.ai "TensorFlow models on the Edge TPU",
# supported operations, compiler 16). Everything else (e.g. GELU) falls back to the CPU.
EDGETPU_OPS = frozenset(
    {
        "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS", "FULLY_CONNECTED", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC",
        "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU",
        "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE",
        "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX",
        "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB",
        "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
    }
)  # fmt: skip

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


def representative_dataset(images: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The converter's ``representative_dataset``: one float32 image (batch 1) at a time.

    Example:
        >>> gen = representative_dataset(np.zeros((2, 16, 16, 3), "float32"))
        >>> [x[0].shape for x in gen()]
        [(1, 16, 16, 3), (1, 16, 16, 3)]
    """
    images = np.asarray(images, dtype="float32")

    def generate():
        for image in images:
            yield [image[None]]

    return generate


def prepare_keras_model(
    model, fmt: str, *, depthwise_tile: int | None | str = "auto", batch_norm: str = "depthwise"
):
    """The Keras 3 model that is converted for a float/int8 format: batch 1, rewrites applied.

    ``depthwise_tile``: ``"auto"`` tiles k x k depthwise convs with k > 5 into 3x3 ones, in the
    float formats and in int8 (XNNPACK's int8 depthwise kernels fall off the same cliff as its
    float ones; the int8 tiles add their partial sums as int8 ADDs, about as accurate as the
    plain conv); an int tiles them with that size; None never tiles.

    For int8 with ``batch_norm="depthwise"`` (default), every BatchNorm becomes the equal 1x1
    depthwise conv (:func:`export.rewrite.batch_norm_as_depthwise`: per-channel int8
    multipliers instead of a per-tensor MUL constant: better PTQ accuracy, a slightly larger
    file for the per-channel parameters); ``"mul"`` keeps the converter's MUL + ADD.
    docs/export.md has the measurements.
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(
            f"`batch_norm` must be one of {BATCH_NORM_MODES}. Received: batch_norm={batch_norm!r}"
        )
    model = rewrite.fold_preprocessing(model, batch_size=1)
    model = rewrite.fold_last_batch_norm(model)
    if fmt in INTEGER_FORMATS and batch_norm == "depthwise":
        model = rewrite.batch_norm_as_depthwise(model)
    if depthwise_tile == "auto":
        depthwise_tile = DEFAULT_DEPTHWISE_TILE
    if depthwise_tile is not None:
        model = rewrite.tile_depthwise(
            model, tile=int(depthwise_tile), max_kernel=FAST_DEPTHWISE_KERNEL
        )
    return model


def has_tiled_depthwise(model) -> bool:
    """Whether ``depthwise_tile="auto"`` tiles some depthwise conv of ``model`` (kernel > 5)."""
    import convmixer_tf

    return convmixer_tf.model_arguments(model)["kernel_size"] > FAST_DEPTHWISE_KERNEL


def convert(
    model,
    fmt: str,
    *,
    calibration_images: np.ndarray | None = None,
    io_type: str = "int8",
    depthwise_tile: int | None | str = "auto",
    class_names: Sequence[str] | None = None,
    batch_norm: str = "depthwise",
) -> bytes:
    """Converts a ConvMixer to a .tflite flatbuffer.

    Args:
        model: a Keras 3 ConvMixer (any format but "qat"), or for ``fmt="qat"`` the fine-tuned
            fake-quant model from :func:`export.quantize.quantize_model`.
        fmt: one of :data:`TFLITE_FORMATS`: ``fp32``; ``fp16`` (fp16 weights, float compute);
            ``dynamic`` (int8 weights, float activations); ``int8`` (full-integer post-training
            quantization, calibrated on ``calibration_images``); ``qat`` (full integer from a
            QAT model; the converter still needs ``calibration_images`` for int8 input/output).
        calibration_images: float32 raw pixels ``(N, H, W, 3)`` from the training data (int8,
            qat); a few hundred are plenty.
        io_type: ``"int8"`` or ``"uint8"`` input and output of the int8/qat formats.
        depthwise_tile: see :func:`prepare_keras_model` (ignored for qat: its fake-quant model
            is tiled already, :func:`export.quantize.quantize_model`).
        class_names: stored in the file's metadata (:data:`LABELS_METADATA`).
        batch_norm: int8 only, see :data:`BATCH_NORM_MODES` and :func:`prepare_keras_model`.

    Returns:
        The .tflite file's bytes, each distinct numeric vector (quantization parameters, shapes)
        stored once (:class:`_SharingBuilder`). int8/qat results are checked to be fully integer
        (RuntimeError otherwise).

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> pixels = np.random.uniform(0, 255, (8, 16, 16, 3)).astype("float32")
        >>> blob = convert(model, "int8", calibration_images=pixels)
        >>> summarize(blob).input_quantization
        (1.0, -128)
    """
    if fmt not in TFLITE_FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; valid formats: {', '.join(TFLITE_FORMATS)}.")
    if io_type not in IO_TYPES:
        raise ValueError(f"`io_type` must be one of {IO_TYPES}. Received: io_type={io_type!r}")
    if fmt in INTEGER_FORMATS and (calibration_images is None or len(calibration_images) == 0):
        raise ValueError(
            f"Format {fmt!r} needs calibration images from the training data (the converter's "
            "representative dataset): pass --data-dir or --dataset."
        )
    if fmt == "qat":
        if not isinstance(model, tf_keras.Model):
            raise ValueError(
                "Format 'qat' converts the fake-quant tf_keras model of "
                "export.quantize.quantize_model (after fine-tuning). Received: "
                f"{type(model).__name__} {getattr(model, 'name', '')!r}"
            )
        quantize.input_quantize_layer(model)  # ValueError if it is not a QAT model
        if batch_norm != "depthwise":
            raise ValueError(
                "Format 'qat' computes its BatchNorms as depthwise convs, as its fake-quant "
                f"model was fine-tuned. Received: batch_norm={batch_norm!r}"
            )
    else:
        model = prepare_keras_model(
            model, fmt, depthwise_tile=depthwise_tile, batch_norm=batch_norm
        )

    # Keras' SavedModel export prints its endpoints on stdout: keep stdout for results.
    with contextlib.redirect_stdout(sys.stderr):
        blob = bytes(make_converter(model, fmt, calibration_images, io_type).convert())
    # One parse, every edit, one serialization (with shared vectors).
    flat = _model_object(blob)
    if fmt in INTEGER_FORMATS:
        _pin_input(flat, *PIXEL_QUANTIZATION[io_type])
        problems = _integer_problems(_summary(flat))
        if problems:
            raise RuntimeError(f"The {fmt} model is not fully integer: {'; '.join(problems)}")
    if class_names is not None:
        _set_labels(flat, class_names)
    _name_signature(flat)
    return _model_bytes(flat)


def _name_signature(model) -> None:
    """Names the one signature ``serving_default`` with input ``pixels`` and output ``logits``.

    The converter names the output after the Keras output layer or ``output_0`` (it differs by
    format: QAT's is ``quant_head``); one name lets ``Interpreter.get_signature_runner()``
    callers use every format alike.
    """
    graph = model.subgraphs[0]
    signature = schema.SignatureDefT()
    signature.signatureKey = SIGNATURE_KEY
    signature.subgraphIndex = 0
    signature.inputs, signature.outputs = [], []
    for names, indices, target in (
        (SIGNATURE_INPUTS, graph.inputs, signature.inputs),
        (SIGNATURE_OUTPUTS, graph.outputs, signature.outputs),
    ):
        if len(names) != len(indices):
            raise RuntimeError(
                f"Expected {len(names)} tensor(s) for {names}, found {len(indices)}."
            )
        for name, index in zip(names, indices, strict=True):
            tensor_map = schema.TensorMapT()
            tensor_map.name = name
            tensor_map.tensorIndex = int(index)
            target.append(tensor_map)
    model.signatureDefs = [signature]


def make_converter(
    model, fmt: str, calibration_images: np.ndarray | None = None, io_type: str = "int8"
) -> tf.lite.TFLiteConverter:
    """The TFLite converter of a Keras model set up for ``fmt`` (no rewrites, no checks).

    :func:`convert` uses it on the prepared ConvMixer; it also converts any other Keras model
    the same way (e.g. the convolutions-only graph of ``benchmarks/tflite_breakdown.py``).
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if fmt == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif fmt in INTEGER_FORMATS:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset(calibration_images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_dtype = tf.int8 if io_type == "int8" else tf.uint8
        converter.inference_input_type = io_dtype
        converter.inference_output_type = io_dtype
    return converter


def _model_object(blob: bytes):
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))


class _SharingBuilder(flatbuffers.Builder):
    """A flatbuffers builder that writes each distinct float32 / int64 / int32 vector once.

    These are the quantization vectors (per-channel scales, float32; zero points, int64), the
    tensor shapes and shape signatures (int32) and the operators' input/output index lists
    (int32). Every per-channel int8 weight and int32 bias carries one zero point per channel,
    all 0, so the converter's output repeats the same int64 zeros for every tensor (2 KiB per
    256-channel tensor); most tensors share a shape. A
    flatbuffer may point several tables at one vector (it is read-only; the builder writes back
    to front, so an earlier vector lies ahead of every later reference), which is what
    flatbuffers' own ``CreateSharedString`` does. Weight buffers (uint8) are never shared.
    The graph, weights and quantization parameters are unchanged (identical interpreter outputs,
    tested); the size it saves is in docs/export.md.
    """

    _SHARED_KINDS = ("<f4", "<i8", "<i4")

    def __init__(self, initial_size: int = 1024):
        super().__init__(initial_size)
        self._vectors: dict[tuple[str, bytes], int] = {}

    def CreateNumpyVector(self, x):  # noqa: N802 (flatbuffers' name)
        if not isinstance(x, np.ndarray) or x.dtype.str not in self._SHARED_KINDS:
            return super().CreateNumpyVector(x)
        key = (x.dtype.str, x.tobytes())
        if key not in self._vectors:
            self._vectors[key] = super().CreateNumpyVector(x)
        return self._vectors[key]


def _model_bytes(model) -> bytes:
    """Serializes a model object (flatbuffer_utils' object API) with shared vectors."""
    builder = _SharingBuilder()
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _pin_input(model, scale: float, zero_point: int) -> bool:
    """Sets the input tensor's quantization to ``(scale, zero_point)`` (raw pixels exactly);
    False if nothing had to change.

    Calibration measures the input range from the data (e.g. scale 0.99996 when no pixel is
    255). The int32 biases of the ops that read the input are quantized with
    ``input_scale * weight_scale``, so they are requantized too. Inputs that already have these
    parameters (QAT) are left unchanged.
    """
    graph = model.subgraphs[0]
    (input_index,) = graph.inputs
    tensor = graph.tensors[input_index]
    old_scale = float(tensor.quantization.scale[0])
    old_zero_point = int(tensor.quantization.zeroPoint[0])
    if np.isclose(old_scale, scale, rtol=0, atol=1e-9) and old_zero_point == zero_point:
        return False
    tensor.quantization.scale = [float(scale)]
    tensor.quantization.zeroPoint = [int(zero_point)]
    for op in graph.operators:
        if input_index not in list(op.inputs):
            continue
        name = _OP_NAMES.get(model.operatorCodes[op.opcodeIndex].builtinCode)
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(op.inputs) > 2:
            bias = graph.tensors[op.inputs[2]]
            buffer = model.buffers[bias.buffer]
            values = np.frombuffer(bytes(buffer.data), dtype="<i4").astype("float64")
            values = np.round(values * old_scale / scale).astype("<i4")
            buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
            bias.quantization.scale = [
                float(s) * scale / old_scale for s in bias.quantization.scale
            ]
    return True


def add_labels(blob: bytes, class_names: Sequence[str]) -> bytes:
    """Stores the class names (one per line) in the model's metadata :data:`LABELS_METADATA`."""
    model = _model_object(blob)
    _set_labels(model, class_names)
    return _model_bytes(model)


def _set_labels(model, class_names: Sequence[str]) -> None:
    buffer = schema.BufferT()
    buffer.data = np.frombuffer("\n".join(class_names).encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = LABELS_METADATA
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != LABELS_METADATA] + [entry]


def read_labels(blob: bytes) -> list[str] | None:
    """The class names stored by :func:`add_labels`, or None.

    Example:
        >>> # read_labels(open("model.tflite", "rb").read())  -> ["airplane", ...]
    """
    model = _model_object(blob)
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == LABELS_METADATA:
            return bytes(model.buffers[entry.buffer].data).decode("utf-8").split("\n")
    return None


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a .tflite file contains: its op list (execution order) and tensor types."""

    ops: tuple[str, ...]
    tensor_types: dict[str, int]
    float_tensors: tuple[str, ...]
    input_dtype: str
    output_dtype: str
    input_shape: tuple[int, ...]
    input_quantization: tuple[float, int] | None
    output_quantization: tuple[float, int] | None


def _quantization(tensor) -> tuple[float, int] | None:
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    return float(q.scale[0]), int(q.zeroPoint[0])


def summarize(blob: bytes) -> Summary:
    """Reads the op list and tensor types of a .tflite flatbuffer (main subgraph).

    Example:
        >>> # summarize(open("model.tflite", "rb").read()).ops -> ("CONV_2D", "GELU", ...)
    """
    return _summary(_model_object(blob))


def _op_name(code) -> str:
    """A builtin op's name (``"CONV_2D"``), or ``"CUSTOM(<code>)"`` for a custom op (Vela's NPU
    op is ``"CUSTOM(ethos-u)"``)."""
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        return f"CUSTOM({custom})"
    return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")


def _summary(model) -> Summary:
    graph = model.subgraphs[0]
    ops = tuple(_op_name(model.operatorCodes[op.opcodeIndex]) for op in graph.operators)
    types: dict[str, int] = {}
    floats = []
    for tensor in graph.tensors:
        type_name = _TYPE_NAMES[tensor.type]
        types[type_name] = types.get(type_name, 0) + 1
        if type_name in ("float32", "float16"):
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
            floats.append(name)
    inp = graph.tensors[graph.inputs[0]]
    out = graph.tensors[graph.outputs[0]]
    return Summary(
        ops=ops,
        tensor_types=types,
        float_tensors=tuple(floats),
        input_dtype=_TYPE_NAMES[inp.type],
        output_dtype=_TYPE_NAMES[out.type],
        input_shape=tuple(int(d) for d in inp.shape),
        input_quantization=_quantization(inp),
        output_quantization=_quantization(out),
    )


def integer_problems(blob: bytes) -> list[str]:
    """Why a .tflite is not fully integer (empty list if it is): float tensors, (DE)QUANTIZE ops,
    float input or output.

    uint8 input/output need one QUANTIZE op each (uint8 <-> int8, an exact shift by 128 at
    scale 1); those two are allowed.
    """
    return _integer_problems(summarize(blob))


def _integer_problems(summary: Summary) -> list[str]:
    problems = []
    if summary.float_tensors:
        problems.append(f"float tensors {list(summary.float_tensors)[:5]}")
    allowed_quantize = 2 if summary.input_dtype == "uint8" else 0
    if "DEQUANTIZE" in summary.ops:
        problems.append(f"{summary.ops.count('DEQUANTIZE')} DEQUANTIZE ops")
    if summary.ops.count("QUANTIZE") > allowed_quantize:
        problems.append(f"{summary.ops.count('QUANTIZE')} QUANTIZE ops")
    for role, dtype in (("input", summary.input_dtype), ("output", summary.output_dtype)):
        if dtype not in IO_TYPES:
            problems.append(f"{role} is {dtype}")
    return problems


def edgetpu_report(blob: bytes) -> dict:
    """Whether every op and tensor suits the Edge TPU compiler (which cannot run here).

    Returns ``{"compatible": bool, "unsupported_ops": [...], "problems": [...]}``: ops outside
    :data:`EDGETPU_OPS` (GELU is one: use the ReLU variant), non-integer tensors, dynamic shapes.

    Example:
        >>> # edgetpu_report(blob) -> {"compatible": False, "unsupported_ops": ["GELU"], ...}
    """
    summary = summarize(blob)
    unsupported = sorted(set(summary.ops) - EDGETPU_OPS)
    problems = _integer_problems(summary)
    if unsupported:
        problems.append(f"ops not supported by the Edge TPU: {unsupported}")
    return {"compatible": not problems, "unsupported_ops": unsupported, "problems": problems}


def labels_path(tflite_path: str | os.PathLike) -> str:
    """The labels file written next to a model: ``model.tflite`` -> ``model.labels.txt``."""
    root, _ = os.path.splitext(os.fspath(tflite_path))
    return root + ".labels.txt"


def labels_text(class_names: Sequence[str]) -> str:
    """The labels file's text: one class per line (a name must be one printable line)."""
    from convmixer_tf.files import check_label

    return "".join(check_label(name) + "\n" for name in class_names)
