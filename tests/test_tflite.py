"""TFLite conversion: every format against Keras, fully-integer checks, Edge TPU check, errors."""

import numpy as np
import pytest
from export_helpers import keras_logits, pixels, tiny_model

from export import tflite
from export.benchmark import xnnpack_partitions
from export.evaluate import TFLiteClassifier


@pytest.fixture(scope="module")
def gelu_model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    return pixels(32)


@pytest.fixture(scope="module")
def int8_blob(gelu_model, images):
    return tflite.convert(gelu_model, "int8", calibration_images=images)


def test_fp32_matches_keras(gelu_model, images):
    blob = tflite.convert(gelu_model, "fp32")
    summary = tflite.summarize(blob)
    assert summary.input_dtype == "float32" and summary.input_shape == (1, 16, 16, 3)
    ref = keras_logits(gelu_model, images)
    np.testing.assert_allclose(TFLiteClassifier(blob).predict(images), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt, tolerance", [("fp16", 2e-2), ("dynamic", 5e-2)])
def test_float_formats_close_to_keras(gelu_model, images, fmt, tolerance):
    blob = tflite.convert(gelu_model, fmt)
    assert tflite.summarize(blob).input_dtype == "float32"
    ref = keras_logits(gelu_model, images)
    out = TFLiteClassifier(blob).predict(images)
    assert np.abs(out - ref).max() <= tolerance * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_int8_is_fully_integer(int8_blob):
    summary = tflite.summarize(int8_blob)
    assert tflite.integer_problems(int8_blob) == []
    assert summary.float_tensors == ()
    assert set(summary.tensor_types) <= {"int8", "int32"}
    assert "QUANTIZE" not in summary.ops and "DEQUANTIZE" not in summary.ops
    assert summary.ops[0] == "CONV_2D"  # normalization folded into the stem conv
    # raw pixels map exactly: q = pixel - 128
    assert summary.input_dtype == "int8" and summary.input_quantization == (1.0, -128)
    assert summary.output_dtype == "int8"


def test_int8_agrees_with_keras(gelu_model, images, int8_blob):
    ref = keras_logits(gelu_model, images)
    out = TFLiteClassifier(int8_blob).predict(images)
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_uint8_io_feeds_raw_pixels(gelu_model, images, int8_blob):
    blob = tflite.convert(gelu_model, "int8", calibration_images=images, io_type="uint8")
    summary = tflite.summarize(blob)
    assert summary.input_dtype == "uint8" and summary.input_quantization == (1.0, 0)
    assert tflite.integer_problems(blob) == []
    uint8 = TFLiteClassifier(blob)
    np.testing.assert_array_equal(uint8.quantize_input(images[:1]), images[:1].astype(np.uint8))
    np.testing.assert_allclose(
        uint8.predict(images), TFLiteClassifier(int8_blob).predict(images), atol=1e-6
    )


def test_edgetpu_check_flags_gelu_and_passes_relu(images, int8_blob):
    gelu = tflite.edgetpu_report(int8_blob)
    assert not gelu["compatible"] and gelu["unsupported_ops"] == ["GELU"]
    relu_blob = tflite.convert(tiny_model(activation="relu"), "int8", calibration_images=images)
    relu = tflite.edgetpu_report(relu_blob)
    assert relu["compatible"], relu["problems"]
    # XNNPACK takes every int8 op but GELU: ReLU is one partition, each GELU splits the graph
    assert xnnpack_partitions(relu_blob) == 1
    assert xnnpack_partitions(int8_blob) == tflite.summarize(int8_blob).ops.count("GELU") + 1


def test_float_model_is_not_edgetpu_compatible(gelu_model):
    report = tflite.edgetpu_report(tflite.convert(gelu_model, "fp32"))
    assert not report["compatible"] and any("float" in p for p in report["problems"])


@pytest.mark.parametrize("fmt", ["int8", "qat"])
def test_integer_formats_need_calibration_data(gelu_model, fmt):
    with pytest.raises(ValueError, match="calibration images"):
        tflite.convert(gelu_model, fmt)


def test_qat_format_needs_a_qat_model(gelu_model, images):
    with pytest.raises(ValueError, match="quantize_model"):
        tflite.convert(gelu_model, "qat", calibration_images=images)


def test_bad_format_and_io_type(gelu_model):
    with pytest.raises(ValueError, match="Unknown format 'int4'"):
        tflite.convert(gelu_model, "int4")
    with pytest.raises(ValueError, match="io_type"):
        tflite.convert(gelu_model, "fp32", io_type="int16")


def test_non_convmixer_is_rejected():
    import keras

    inputs = keras.Input((16, 16, 3))
    other = keras.Model(inputs, keras.layers.Dense(3, name="dense")(inputs))
    with pytest.raises(ValueError, match="not a ConvMixer"):
        tflite.convert(other, "fp32")


def test_labels_travel_in_metadata(int8_blob):
    names = ["airplane", "automobile", "bird"]
    blob = tflite.add_labels(int8_blob, names)
    assert tflite.read_labels(blob) == names
    assert tflite.read_labels(int8_blob) is None
    assert tflite.integer_problems(blob) == []  # the model itself is untouched


def test_labels_path():
    assert tflite.labels_path("out/model.tflite").endswith("model.labels.txt")


def _vectors(blob: bytes, field: str) -> list[tuple[int, bytes]]:
    """(position in the file, contents) of every tensor's zero-point or shape vector."""
    from tensorflow.lite.python import schema_py_generated as schema

    graph = schema.Model.GetRootAs(blob, 0).Subgraphs(0)
    found = []
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        table = tensor.Quantization() if field == "zero_point" else tensor
        if table is None:
            continue
        # vtable slots of the schema: QuantizationParameters.zero_point, Tensor.shape
        slot = table._tab.Offset(10 if field == "zero_point" else 4)
        if slot == 0:
            continue
        values = table.ZeroPointAsNumpy() if field == "zero_point" else tensor.ShapeAsNumpy()
        found.append((table._tab.Vector(slot), values.tobytes()))
    return found


def test_repeated_vectors_are_stored_once(images, int8_blob):
    from tensorflow.lite.tools import flatbuffer_utils

    # The converter's layout: one copy of the zero points and the shape per tensor.
    plain = bytes(
        flatbuffer_utils.convert_object_to_bytearray(
            flatbuffer_utils.convert_bytearray_to_object(bytearray(int8_blob))
        )
    )
    zero_points = _vectors(int8_blob, "zero_point")
    per_channel = [v for _, v in zero_points if len(v) == 8 * 16]  # 16 channels, all 0
    assert len(per_channel) >= 10
    # each distinct vector is stored once, and the file shrinks by the copies left out
    for field in ("zero_point", "shape"):
        shared = _vectors(int8_blob, field)
        assert len({pos for pos, _ in shared}) == len({v for _, v in shared}), field
        assert len({pos for pos, _ in _vectors(plain, field)}) == len(shared), field
    assert len(plain) - len(int8_blob) >= (len(per_channel) - 1) * 8 * 16
    # and the interpreter computes exactly the same
    np.testing.assert_array_equal(
        TFLiteClassifier(int8_blob).predict(images), TFLiteClassifier(plain).predict(images)
    )
