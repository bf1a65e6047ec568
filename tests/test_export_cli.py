"""python -m export end to end: a .keras file in, a verified .tflite and labels file out."""

import json

import numpy as np
import pytest
from export_helpers import tiny_model

from export import __main__ as cli
from export import tflite
from export.evaluate import TFLiteClassifier


@pytest.fixture(scope="module")
def keras_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    tiny_model().save(path)
    return path


@pytest.mark.slow
def test_int8_end_to_end(keras_path, tmp_path, cifar10_train_dir, capsys):
    output = tmp_path / "out" / "tiny_int8.tflite"
    result = cli.main(
        ["--model", str(keras_path), "--format", "int8", "--output", str(output),
         "--data-dir", str(cifar10_train_dir), "--limit-per-class", "3",
         "--calibration-images", "24", "--edgetpu"]
    )  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    blob = output.read_bytes()
    assert result["fully_integer"] and tflite.integer_problems(blob) == []
    assert result["edgetpu"]["unsupported_ops"] == ["GELU"]
    names = sorted(p.name for p in cifar10_train_dir.iterdir())
    assert tflite.read_labels(blob) == names
    assert (tmp_path / "out" / "tiny_int8.labels.txt").read_text().split() == names
    assert result["input_quantization"] == [1.0, -128]
    assert TFLiteClassifier(str(output)).predict(np.zeros((1, 16, 16, 3), "float32")).shape == (
        1,
        10,
    )


def test_int8_without_data_is_a_clear_error(keras_path, tmp_path):
    with pytest.raises(SystemExit, match="needs training data"):
        cli.main(["--model", str(keras_path), "--format", "int8",
                  "--output", str(tmp_path / "m.tflite")])  # fmt: skip
    assert not (tmp_path / "m.tflite").exists()


def test_qat_without_length_is_a_clear_error(keras_path, tmp_path, cifar10_train_dir):
    with pytest.raises(SystemExit, match="--qat-steps"):
        cli.main(["--model", str(keras_path), "--format", "qat", "--output",
                  str(tmp_path / "m.tflite"), "--data-dir", str(cifar10_train_dir)])  # fmt: skip


def test_qat_with_batch_norm_mul_is_a_clear_error(keras_path, tmp_path, cifar10_train_dir):
    with pytest.raises(SystemExit, match="--batch-norm mul applies to --format int8 only"):
        cli.main(["--model", str(keras_path), "--format", "qat", "--output",
                  str(tmp_path / "m.tflite"), "--data-dir", str(cifar10_train_dir),
                  "--qat-steps", "1", "--batch-norm", "mul"])  # fmt: skip
    assert not (tmp_path / "m.tflite").exists()


def test_non_convmixer_model_is_rejected(tmp_path):
    import keras

    inputs = keras.Input((16, 16, 3))
    path = tmp_path / "other.keras"
    keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs)).save(path)
    with pytest.raises(ValueError, match="not a ConvMixer"):
        cli.main(["--model", str(path), "--format", "fp32",
                  "--output", str(tmp_path / "o.tflite")])  # fmt: skip
