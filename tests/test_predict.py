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
