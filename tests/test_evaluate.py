"""Tests of training/evaluate.py: accuracy against hand-computed values, the one-line JSON CLI."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import evaluate as evaluate_lib

# Sorted as the image-folder loader sorts its class folders.
CLASSES = ["0_red", "1_green", "2_blue", "3_gray"]


def channel_model(size: int = 8):
    """Predicts the class of the brightest channel (gray: the bias wins when all are equal)."""
    inputs = keras.Input((size, size, 3), name="pixels")
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(inputs)
    outputs = keras.layers.Dense(4, name="head")(pooled)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, 4), np.float32)
    kernel[:3, :3] = np.eye(3)
    model.get_layer("head").set_weights([kernel, np.array([0, 0, 0, 10], np.float32)])
    return model


def colored(channel: int | None, size: int = 8) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    if channel is None:
        image[:] = 5
    else:
        image[..., channel] = 200
    return image


def test_evaluate_matches_hand_computed_accuracy():
    # Images (true label -> predicted): red->red, red->green, green->green, blue->blue,
    # blue->red, gray->gray. Top-1 4/6; per class: red 50, green 100, blue 50, gray 100.
    images = np.stack([colored(0), colored(1), colored(1), colored(2), colored(0), colored(None)])
    labels = np.array([0, 0, 1, 2, 2, 3], np.int32)
    ds = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels)).batch(4)
    result = evaluate_lib.evaluate(channel_model(), ds, CLASSES)
    assert result["n"] == 6
    assert result["top1"] == pytest.approx(66.67)
    assert result["per_class"] == {"0_red": 50.0, "1_green": 100.0, "2_blue": 50.0, "3_gray": 100.0}
    assert result["top5"] == 100.0  # 4 classes: top-5 holds every class

    one_hot = ds.map(lambda x, y: (x, tf.one_hot(y, 4)))
    assert evaluate_lib.evaluate(channel_model(), one_hot, CLASSES) == result


def test_evaluate_rejects_a_class_count_mismatch_and_empty_data():
    ds = tf.data.Dataset.from_tensor_slices(
        (np.zeros((2, 8, 8, 3), np.float32), np.zeros(2, np.int32))
    ).batch(2)
    with pytest.raises(ValueError, match="4 outputs but the data has 3 classes"):
        evaluate_lib.evaluate(channel_model(), ds, CLASSES[:3])
    with pytest.raises(ValueError, match="empty"):
        evaluate_lib.evaluate(channel_model(), ds.take(0), CLASSES)


def test_command_line_prints_one_json_line(tmp_path, capsys):
    for c, name in enumerate(CLASSES):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for i in range(3):
            image = colored(c if c < 3 else None)
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    model_path = tmp_path / "model.keras"
    channel_model().save(model_path)
    status = evaluate_lib.main(
        [
            "--model",
            str(model_path),
            "--data-dir",
            str(tmp_path / "data"),
            "--split",
            "all",
            "--batch-size",
            "5",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and len(lines) == 1
    result = json.loads(lines[0])
    assert result["top1"] == 100.0 and result["n"] == 12 and result["top5"] == 100.0
    assert list(result["per_class"]) == CLASSES

    status = evaluate_lib.main(["--model", str(tmp_path / "missing.keras"), "--data-dir", "x"])
    assert status == 2 and "--model: not found" in capsys.readouterr().err
