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


def _run_with_a_framed_class(tmp_path, config: dict, names: list[str]) -> tuple[str, str]:
    """Data where the class "0_red" is only red in the centre (the frame is green): right with
    the run's centre crop (crop_pct 0.5), wrong with the whole image. The model in a run folder
    with ``config`` and ``names`` beside it."""
    for c, name in enumerate(CLASSES):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        image = colored(c if c < 3 else None, size=16)
        if c == 0:
            image = colored(1, size=16)
            image[4:12, 4:12] = colored(0, size=8)
        for i in range(2):
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    run = tmp_path / "run"
    run.mkdir()
    channel_model().save(run / "model.keras")
    (run / "config.json").write_text(json.dumps(config))
    (run / "class_names.json").write_text(json.dumps(names))
    return str(run / "model.keras"), str(tmp_path / "data")


def test_a_model_in_a_run_folder_is_evaluated_as_the_run_says(tmp_path, capsys):
    model, data = _run_with_a_framed_class(
        tmp_path, {"crop_pct": 0.5, "interpolation": "nearest"}, CLASSES
    )
    argv = ["--model", model, "--data-dir", data, "--split", "all"]
    assert evaluate_lib.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["crop_pct"], result["interpolation"], result["top1"]) == (0.5, "nearest", 100)
    # the options override the run's settings: the whole image, and "0_red" is seen as green
    assert evaluate_lib.main([*argv, "--crop-pct", "1", "--interpolation", "bilinear"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["crop_pct"], result["interpolation"], result["top1"]) == (1.0, "bilinear", 75)


def test_data_whose_classes_are_not_the_runs_is_refused(tmp_path, capsys):
    names = ["0_red", "1_green", "2_bleu", "3_gray"]  # one folder named otherwise
    model, data = _run_with_a_framed_class(tmp_path, {}, names)
    assert evaluate_lib.main(["--model", model, "--data-dir", data, "--split", "all"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "class 2 is '2_blue' in the data but '2_bleu' there" in captured.err
    assert "class_names.json" in captured.err
