"""Test-time augmentation: the views, and both evaluations (Keras and .tflite) averaging them."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from export_helpers import tiny_model

from export import evaluate as tflite_evaluate
from export import tflite
from training import evaluate as keras_evaluate
from training import tta


def test_views_are_the_mirror_and_one_pixel_shifts():
    images = np.random.default_rng(0).uniform(0, 255, (2, 5, 6, 3)).astype(np.float32)
    (w0, plain), (w1, mirror) = tta.views(images, "flip")
    assert (w0, w1) == (0.5, 0.5)
    np.testing.assert_array_equal(plain, images)
    np.testing.assert_array_equal(mirror, images[:, :, ::-1])
    views = tta.views(images, "flip-translate")
    assert [w for w, _ in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    up_left, down_right = views[2][1], views[4][1]
    # Moved by one pixel; the uncovered row and column reflect the image (pixel 1, not 0).
    np.testing.assert_array_equal(up_left[:, :-1, :-1], images[:, 1:, 1:])
    np.testing.assert_array_equal(up_left[:, -1, :-1], images[:, -2, 1:])
    np.testing.assert_array_equal(down_right[:, 1:, 1:], images[:, :-1, :-1])
    np.testing.assert_array_equal(down_right[:, 0, 1:], images[:, 1, :-1])
    np.testing.assert_array_equal(views[3][1][:, :-1, :-1], mirror[:, 1:, 1:])
    with pytest.raises(ValueError, match="Unknown test-time augmentation"):
        tta.views(images, "rotate")


def _left_half_model(size: int = 8):
    """Logit 0: the mean of the left half of the image; logit 1: half its mean, plus 60."""
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    left = np.zeros((size, size, 3), np.float32)
    left[:, : size // 2] = 1.0 / (size * size * 3 / 2)  # mean over the left half
    everything = np.full((size, size, 3), 0.5 / (size * size * 3), np.float32)  # half the mean
    kernel = np.stack([left.reshape(-1), everything.reshape(-1)], axis=1)
    model.layers[-1].set_weights([kernel, np.array([0.0, 60.0], np.float32)])
    return model


def _images(size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Images bright (200) on the left and black on the right, and their mirror images.

    Plain: logit 0 is 200 (0 for the mirror), logit 1 is 50 + 60 = 110: class 0 (1 for the
    mirror). Averaged over the views, both images give logit 0 = 100 and logit 1 = 110 (with
    the 1-pixel shifts too: their left-half means 150, 50, 200 and 0 average to 100): class 1.
    """
    bright_left = np.zeros((4, size, size, 3), np.float32)
    bright_left[:, :, : size // 2] = 200.0
    images = np.concatenate([bright_left, bright_left[:, :, ::-1]])
    return images, np.ones(len(images), np.int32)  # the class TTA gives: 1


@pytest.mark.parametrize("mode", ["flip", "flip-translate"])
def test_keras_evaluation_averages_the_views(mode):
    model = _left_half_model()
    images, labels = _images()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)
    result = keras_evaluate.evaluate(model, dataset, ["left", "other"], tta=mode)
    assert (result["top1"], result["n"]) == (100.0, 8)
    assert (result["tta"], result["views"]) == (mode, 2 if mode == "flip" else 6)
    # Without TTA the bright-left images are class 0: half of the labels are missed.
    assert keras_evaluate.evaluate(model, dataset, ["left", "other"])["top1"] == 50.0


def test_tflite_evaluation_averages_the_same_views_as_keras():
    model = _left_half_model()
    blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    images, labels = _images()
    result = tflite_evaluate.evaluate(blob, [(images, labels)], keras_model=model, tta="flip")
    assert result == {
        "top1": 100.0, "n": 8, "keras_top1": 100.0, "agreement": 100.0, "tta": "flip", "views": 2,
    }  # fmt: skip
    plain = tflite_evaluate.evaluate(blob, [(images, labels)], keras_model=model)
    assert (plain["top1"], plain["keras_top1"]) == (50.0, 50.0)


def test_command_lines_take_tta(tmp_path, cifar10_train_dir, capsys):
    model = tiny_model(input_shape=(32, 32, 3))
    keras_path = tmp_path / "model.keras"
    model.save(keras_path)
    tflite_path = tmp_path / "model.tflite"
    tflite_path.write_bytes(tflite.convert(model, "fp32"))
    data = ["--data-dir", str(cifar10_train_dir), "--limit-per-class", "2"]
    assert keras_evaluate.main(["--model", str(keras_path), "--tta", "flip", *data]) == 0
    keras_result = json.loads(capsys.readouterr().out)
    assert (keras_result["tta"], keras_result["views"], keras_result["n"]) == ("flip", 2, 20)
    status = tflite_evaluate.main(
        ["--tflite", str(tflite_path), "--keras", str(keras_path), "--tta", "flip", *data]
    )
    tflite_result = json.loads(capsys.readouterr().out)
    assert status == 0 and tflite_result["views"] == 2
    assert tflite_result["top1"] == pytest.approx(keras_result["top1"])
    assert keras_evaluate.main(["--model", str(keras_path), "--tta", "rotate", *data]) == 2
    assert "--tta" in capsys.readouterr().err
