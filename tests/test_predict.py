"""The predict command: top classes of image files with a pretrained checkpoint."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

import convmixer_tf
from convmixer_tf import imagenet, predict

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"
IMAGE = str(FIXTURES / "eval_image.png")


def parse(output: str) -> list[tuple[int, float, str, str]]:
    """(rank, percent, id, name) of the one image in predict's JSON line."""
    (prediction,) = json.loads(output)["predictions"]
    return [
        (rank, 100 * c["probability"], c["id"], c["name"])
        for rank, c in enumerate(prediction["top"], start=1)
    ]


def test_predict_prints_top5_of_the_model(capsys):
    checkpoint = str(FIXTURES / "official_relu_k4.pth.tar")
    argv = ["--weights", checkpoint, "--activation", "relu", "--input-size", "16", IMAGE]
    assert predict.main(argv) == 0
    output = capsys.readouterr().out
    assert json.loads(output)["predictions"][0]["image"] == IMAGE
    rows = parse(output)
    assert [rank for rank, *_ in rows] == [1, 2, 3, 4, 5]
    # The same numbers computed directly: timm's eval transform, the model, softmax.
    model = convmixer_tf.ConvMixer(16, 2, 4, 2, activation="relu", input_shape=(16, 16, 3),
                                   num_classes=10, weights=checkpoint)  # fmt: skip
    pixels = imagenet.preprocess_image(imagenet.load_image(IMAGE), 16, imagenet.CROP_PCT)
    probabilities = tf.nn.softmax(model(pixels[None], training=False)).numpy()[0]
    order = np.argsort(-probabilities)[:5]
    assert [name for *_, name in rows] == [f"class_{i}" for i in order]
    np.testing.assert_allclose([p for _, p, _, _ in rows], 100 * probabilities[order], atol=0.01)


def test_predict_with_a_preset_uses_its_class_names(tmp_path, capsys):
    model = convmixer_tf.create_model("convmixer_256_8")
    weights = str(tmp_path / "cifar.weights.h5")
    model.save_weights(weights)
    assert (
        predict.main(["--preset", "convmixer_256_8", "--weights", weights, "--top", "3", IMAGE])
        == 0
    )
    rows = parse(capsys.readouterr().out)
    assert len(rows) == 3
    assert {name for *_, name in rows} <= set(predict.CIFAR10_CLASSES)
    assert sum(p for _, p, _, _ in rows) <= 100.01


def test_class_names():
    assert predict.class_names(10, "cifar10") == predict.CIFAR10_CLASSES
    assert predict.class_names(1000) is None  # ImageNet names, with WordNet ids
    assert predict.class_names(3) == ("class_0", "class_1", "class_2")


def test_classify_needs_a_fixed_square_input():
    model = convmixer_tf.ConvMixer(16, 1, 3, 2, num_classes=10)  # input (None, None, 3)
    with pytest.raises(ValueError, match="fixed square input"):
        predict.classify(model, [IMAGE])


def _run_folder(tmp_path, config=None, names=None):
    """A training run's files: model.keras (16x16, 3 classes), config.json, class_names.json."""
    run = tmp_path / "run"
    run.mkdir()
    model = convmixer_tf.ConvMixer(16, 1, 3, 2, num_classes=3, input_shape=(16, 16, 3))
    convmixer_tf.save_model(model, str(run / "model.keras"))
    if config is not None:
        (run / "config.json").write_text(json.dumps(config))
    if names is not None:
        (run / "class_names.json").write_text(json.dumps(names))
    return model, str(run / "model.keras")


def test_predict_a_model_file_with_its_runs_settings_and_names(tmp_path, capsys):
    settings = {"crop_pct": 0.5, "interpolation": "nearest"}
    model, path = _run_folder(tmp_path, settings, ["cat", "dog", "ship"])
    assert predict.main(["--model", path, "--top", "3", IMAGE]) == 0
    rows = parse(capsys.readouterr().out)
    # the run's evaluation transform (as training.evaluate applies it) and its class names
    pixels = imagenet.preprocess_image(imagenet.load_image(IMAGE), 16, 0.5, "nearest")
    probabilities = tf.nn.softmax(model(pixels[None], training=False)).numpy()[0]
    order = np.argsort(-probabilities)
    assert [name for *_, name in rows] == [["cat", "dog", "ship"][i] for i in order]
    np.testing.assert_allclose([p for _, p, _, _ in rows], 100 * probabilities[order], atol=0.01)


@pytest.mark.parametrize(
    "config, names, message",
    [
        ({"crop_pct": 2.0}, None, "config.json' (beside the model) is not a training run"),
        (None, ["cat", "dog"], "lists 2 class names for a model of 3 outputs"),
        ([1, 2], None, "is not a training run's config"),
    ],
)
def test_predict_names_a_bad_run_file_beside_the_model(tmp_path, capsys, config, names, message):
    _, path = _run_folder(tmp_path, config, names)
    assert predict.main(["--model", path, IMAGE]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1


def test_predict_takes_a_model_file_or_weights_and_the_old_preset_spelling(tmp_path, capsys):
    _, path = _run_folder(tmp_path)
    for argv, message in (
        ([IMAGE], "not neither"),
        (["--model", path, "--weights", "imagenet", IMAGE], "not both"),
        (["--model", path, "--preset", "convmixer_256_8", IMAGE], "--model is one"),
        (["--model", str(tmp_path / "missing.keras"), IMAGE], "file not found"),
    ):
        assert predict.main(argv) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""
    # --model NAME meant a variant: still accepted, with a warning
    model = convmixer_tf.create_model("convmixer_256_8")
    weights = str(tmp_path / "cifar.weights.h5")
    model.save_weights(weights)
    with pytest.warns(FutureWarning, match="use --preset"):
        status = predict.main(["--model", "convmixer_256_8", "--weights", weights, IMAGE])
    assert status == 0
    assert {name for *_, name in parse(capsys.readouterr().out)} <= set(predict.CIFAR10_CLASSES)
