"""python -m export end to end: a .keras file in, a verified .tflite and labels file out."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from export_helpers import pixels, tiny_model

import convmixer_tf
from export import __main__ as cli
from export import tflite
from export.evaluate import TFLiteClassifier


@pytest.fixture(scope="module")
def keras_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    tiny_model().save(path)
    return path


def run_cli(capfd, *argv):
    """(exit code, stdout lines, stderr) of the CLI, at the file-descriptor level."""
    status = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return status, out.splitlines(), err


@pytest.mark.slow
def test_int8_end_to_end(keras_path, tmp_path, cifar10_train_dir, capfd):
    output = tmp_path / "out" / "tiny_int8.tflite"
    status, out, _ = run_cli(
        capfd, "--model", keras_path, "--format", "int8", "--output", output,
        "--data-dir", cifar10_train_dir, "--limit-per-class", "3",
        "--calibration-images", "24", "--edgetpu",
    )  # fmt: skip
    assert status == 0
    assert len(out) == 1  # the converter's logging went to stderr
    result = json.loads(out[0])
    blob = output.read_bytes()
    assert result["fully_integer"] and tflite.integer_problems(blob) == []
    assert result["edgetpu"]["unsupported_ops"] == ["GELU"]
    names = sorted(p.name for p in cifar10_train_dir.iterdir())
    assert tflite.read_labels(blob) == names
    assert (tmp_path / "out" / "tiny_int8.labels.txt").read_text().split() == names
    assert result["input_quantization"] == [1.0, -128]
    from training.data import load_dataset

    dataset, _ = load_dataset(
        data_dir=cifar10_train_dir, split="train", limit_per_class=3, image_size=16, batch_size=30
    )
    images = next(iter(dataset))[0].numpy()
    logits = TFLiteClassifier(str(output)).predict(images)
    reference = np.asarray(convmixer_tf.load_model(keras_path)(images))
    assert np.abs(logits - reference).max() <= 0.1 * np.abs(reference).max()


def test_fp32_of_a_model_without_fixed_input_size(tmp_path, capfd):
    model = convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(None, None, 3), num_classes=10)
    path = tmp_path / "any_size.keras"
    model.save(path)
    output = tmp_path / "m.tflite"
    status, _, err = run_cli(capfd, "--model", path, "--format", "fp32", "--output", output)
    assert status == 2 and "no fixed input size" in err and "--input-size" in err
    assert "Traceback" not in err and not output.exists()
    status, out, _ = run_cli(
        capfd, "--model", path, "--format", "fp32", "--output", output, "--input-size", "16"
    )
    assert status == 0 and len(out) == 1
    np.testing.assert_allclose(
        TFLiteClassifier(str(output)).predict(pixels(2)), model(pixels(2)), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "int8"], "needs training data"),
        (["--format", "qat", "--data-dir", "."], "--qat-steps or --qat-epochs"),
        (["--format", "qat", "--data-dir", ".", "--qat-steps", "1", "--batch-norm", "mul"],
         "applies to format int8 only"),
        (["--format", "fp32", "--depthwise-tile", "big"], "--depthwise-tile: must be auto"),
    ],
)  # fmt: skip
def test_bad_requests_are_one_line_before_any_work(keras_path, tmp_path, capfd, extra, message):
    output = tmp_path / "m.tflite"
    status, out, err = run_cli(capfd, "--model", keras_path, "--output", output, *extra)
    assert status == 2 and out == []
    assert err.startswith("python -m export: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and not output.exists()


def test_missing_model_and_output_directory_are_one_line(keras_path, tmp_path, capfd):
    status, _, err = run_cli(
        capfd, "--model", tmp_path / "missing.keras", "--format", "fp32", "--output",
        tmp_path / "m.tflite",
    )  # fmt: skip
    assert status == 2 and "--model: not found" in err and "missing.keras" in err
    assert len(err.strip().splitlines()) == 1
    status, _, err = run_cli(capfd, "--model", keras_path, "--format", "fp32", "--output", tmp_path)
    assert status == 2 and "is a directory" in err and "Traceback" not in err


def test_non_convmixer_model_is_rejected(tmp_path, capfd):
    import keras

    inputs = keras.Input((16, 16, 3))
    path = tmp_path / "other.keras"
    keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs)).save(path)
    status, _, err = run_cli(
        capfd, "--model", path, "--format", "fp32", "--output", tmp_path / "o.tflite"
    )
    assert status == 2 and "not a ConvMixer" in err


def test_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "export", "--model", str(tmp_path / "missing.keras"),
               "--format", "fp32", "--output", str(tmp_path / "m.tflite")]  # fmt: skip
    plain = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run([*command, "--debug"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_data_whose_classes_do_not_fit_the_model_is_one_line(tmp_path, capfd, cifar10_train_dir):
    path = tmp_path / "five.keras"
    convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(16, 16, 3), num_classes=5).save(path)
    output = tmp_path / "m.tflite"
    status, out, err = run_cli(
        capfd, "--model", path, "--format", "fp32", "--output", output,
        "--data-dir", cifar10_train_dir, "--limit-per-class", "1",
    )  # fmt: skip
    assert status == 2 and out == [] and "10 class names" in err and "5 outputs" in err
    assert not output.exists()
