"""export.evaluate: the ai-edge-litert classifier, top-1 and agreement, the CLI's JSON line."""

import json
import os

import numpy as np
import pytest
from export_helpers import keras_logits, pixels, tiny_model

from convmixer_tf.predict import CIFAR10_CLASSES
from export import evaluate, tflite


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def fp32_blob(model):
    return tflite.convert(model, "fp32")


def test_classifier_matches_keras_and_pads_batches(model, fp32_blob):
    classifier = evaluate.TFLiteClassifier(fp32_blob, num_threads=2)
    images = pixels(3)
    np.testing.assert_allclose(
        classifier.predict(images), keras_logits(model, images), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="do not fit the model input"):
        classifier.predict(pixels(2, size=32))


def test_evaluate_counts_top1_and_agreement(model, fp32_blob):
    images = pixels(12)
    predicted = keras_logits(model, images).argmax(-1)
    labels = predicted.copy()
    labels[:3] = (labels[:3] + 1) % 10  # 3 of 12 wrong
    batches = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    result = evaluate.evaluate(fp32_blob, batches, keras_model=model)
    assert result == {"top1": 75.0, "n": 12, "keras_top1": 75.0, "agreement": 100.0}
    with pytest.raises(ValueError, match="empty"):
        evaluate.evaluate(fp32_blob, [])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        evaluate.TFLiteClassifier(tmp_path / "missing.tflite")


def test_cli_prints_json(model, fp32_blob, tmp_path, cifar10_train_dir, capsys):
    tflite_path = tmp_path / "model.tflite"
    tflite_path.write_bytes(fp32_blob)
    keras_path = tmp_path / "model.keras"
    model.save(keras_path)
    status = evaluate.main(
        ["--tflite", str(tflite_path), "--data-dir", str(cifar10_train_dir),
         "--limit-per-class", "2", "--keras", str(keras_path)]
    )  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and len(out) == 1
    result = json.loads(out[0])
    assert result["n"] == 20
    assert result["agreement"] == 100.0 and result["top1"] == result["keras_top1"]


def test_cli_errors_are_one_line(tmp_path, cifar10_train_dir, capsys):
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"not a flatbuffer at all")
    for path, message in ((tmp_path / "missing.tflite", "not found"), (corrupt, "Cannot read")):
        status = evaluate.main(["--tflite", str(path), "--data-dir", str(cifar10_train_dir)])
        err = capsys.readouterr().err
        assert status == 2 and message in err and path.name in err
        assert len(err.strip().splitlines()) == 1


def test_cli_holds_out_the_fraction_training_held_out(
    fp32_blob, tmp_path, cifar10_train_dir, capsys
):
    # a small image folder: 10 classes x 10 images, linked from the CIFAR-10 slice
    for name in CIFAR10_CLASSES:
        (tmp_path / "data" / name).mkdir(parents=True)
        for image in sorted((cifar10_train_dir / name).iterdir())[:10]:
            (tmp_path / "data" / name / image.name).symlink_to(image)
    tflite_path = tmp_path / "model.tflite"
    tflite_path.write_bytes(fp32_blob)
    base = ["--tflite", str(tflite_path), "--data-dir", str(tmp_path / "data")]

    def evaluated(argv):
        assert evaluate.main(argv) == 0
        return json.loads(capsys.readouterr().out)["n"]

    assert evaluated(base) == 10 * 10  # by default: the whole folder it is given
    held_out = [*base, "--split", "validation"]
    assert evaluated(held_out) == 10 * 1  # training's hold-out: the last 10% of each class
    assert evaluated([*held_out, "--validation-fraction", "0.5"]) == 10 * 5


def test_cli_refuses_models_and_data_that_do_not_match(model, fp32_blob, tmp_path,
                                                       cifar10_train_dir, capsys):  # fmt: skip
    tflite_path = tmp_path / "model.tflite"
    tflite_path.write_bytes(fp32_blob)
    other = tmp_path / "five_classes.keras"
    tiny_model(num_classes=5).save(other)
    bigger = tmp_path / "bigger.keras"
    tiny_model(input_shape=(48, 48, 3)).save(bigger)
    subset = tmp_path / "subset"
    for name in CIFAR10_CLASSES[:5]:
        (subset / name).mkdir(parents=True)
        for image in sorted((cifar10_train_dir / name).iterdir())[:2]:
            (subset / name / image.name).symlink_to(image)
    base = ["--tflite", str(tflite_path), "--limit-per-class", "1"]
    for argv, message in (
        ([*base, "--data-dir", str(cifar10_train_dir), "--keras", str(other)], "5 outputs but"),
        ([*base, "--data-dir", str(cifar10_train_dir), "--keras", str(bigger)], "48x48 images"),
        ([*base, "--data-dir", str(subset)], "10 outputs but the data has 5 classes"),
    ):
        assert evaluate.main(argv) == 2
        captured = capsys.readouterr()
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1
        assert captured.out == ""


def test_cli_refuses_data_whose_classes_are_not_the_stored_names(
    fp32_blob, tmp_path, cifar10_train_dir, capsys
):
    renamed = tmp_path / "renamed"  # CIFAR-10 with "automobile" named "car": another order
    for name in CIFAR10_CLASSES:
        (renamed / ("car" if name == "automobile" else name)).mkdir(parents=True)
        image = sorted((cifar10_train_dir / name).iterdir())[0]
        (renamed / ("car" if name == "automobile" else name) / image.name).symlink_to(image)
    tflite_path = tmp_path / "model.tflite"
    tflite_path.write_bytes(tflite.add_labels(fp32_blob, CIFAR10_CLASSES))
    assert evaluate.main(["--tflite", str(tflite_path), "--data-dir", str(renamed)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "class 1 is 'bird' in the data but 'automobile' there" in captured.err
    # the same data against the names stored: accepted
    tflite_path.write_bytes(tflite.add_labels(fp32_blob, sorted(os.listdir(renamed))))
    assert evaluate.main(["--tflite", str(tflite_path), "--data-dir", str(renamed)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10
