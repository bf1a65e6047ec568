"""What users take away opens with stock tools: every artifact is written from a tiny trained model
and opened in a subprocess that never imports this project (Keras, tf.saved_model, LiteRT)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_trainer import tiny_config

import convmixer_tf
from convmixer_tf import convert, imagenet, predict
from export import export_model
from training import trainer

PROJECT_PACKAGES = ("convmixer_tf", "training", "export")
CHECK_IMPORTS = textwrap.dedent(
    """
    import sys
    leaked = sorted({m.split(".")[0] for m in sys.modules} & {"convmixer_tf", "training", "export"})
    assert not leaked, f"the project was imported: {leaked}"
    """
)


def run_stock(code: str, folder) -> None:
    """Runs ``code`` in a fresh Python in ``folder`` (not the repository: no project import)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + CHECK_IMPORTS],
        cwd=folder, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def rgb_pixels(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3)).astype("uint8")


class KeepModel(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        self.trained = self.model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar10_train_dir_module):
    """A 1-epoch run (model.keras = best.keras) and its in-memory model's logits."""
    folder = tmp_path_factory.mktemp("run")
    keep = KeepModel()
    trainer.train(tiny_config(cifar10_train_dir_module, folder, epochs=1), extra_callbacks=[keep])
    pixels = rgb_pixels(4, 16)
    np.save(folder / "pixels.npy", pixels)
    logits = np.asarray(keep.trained(pixels.astype("float32"), training=False))
    return folder, keep.trained, pixels, logits


@pytest.fixture(scope="module")
def cifar10_train_dir_module():
    from conftest import CIFAR10_TRAIN

    return CIFAR10_TRAIN


def test_training_outputs_load_with_stock_keras(trained):
    folder, _, _, logits = trained
    np.save(folder / "expected.npy", logits)
    run_stock(
        """
        import keras, numpy as np
        pixels, expected = np.load("pixels.npy"), np.load("expected.npy")
        for name in ("model.keras", "best.keras"):
            model = keras.saving.load_model(name, safe_mode=True)
            assert getattr(model, "optimizer", None) is None, name  # no training state
            out = np.asarray(model(pixels.astype("float32"), training=False))
            assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max(), name
        """,
        folder,
    )


def test_converted_checkpoint_loads_with_stock_keras(tmp_path):
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained")
    weights = os.path.join(fixture, "timm_gelu_k3.safetensors")
    output = tmp_path / "converted.keras"
    argv = ["--weights", weights, "--input-size", "16", "--output", str(output)]
    assert convert.main(argv) == 0
    model = convert.build_model(weights, input_size=16)
    pixels = rgb_pixels(3, 16)
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "expected.npy", np.asarray(model(pixels.astype("float32"))))
    run_stock(
        """
        import keras, numpy as np
        model = keras.saving.load_model("converted.keras", safe_mode=True)
        expected = np.load("expected.npy")
        out = np.asarray(model(np.load("pixels.npy").astype("float32")))
        assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()
        """,
        tmp_path,
    )


def write_images(folder, count: int = 3) -> list[str]:
    """PNG and JPEG files of different sizes (the signature resizes each)."""
    paths = []
    for i, (height, width) in enumerate([(20, 30), (40, 24), (16, 16)][:count]):
        image = rgb_pixels(1, max(height, width), seed=i)[0, :height, :width]
        encoded = tf.io.encode_png(image) if i % 2 == 0 else tf.io.encode_jpeg(image)
        path = os.path.join(folder, f"image_{i}.{'png' if i % 2 == 0 else 'jpg'}")
        with open(path, "wb") as f:
            f.write(encoded.numpy())
        paths.append(path)
    return paths


def test_saved_model_signatures_with_tf_saved_model_load(trained, tmp_path):
    folder, model, pixels, logits = trained
    output = tmp_path / "served"
    names = json.loads((folder / "class_names.json").read_text())
    report = export_model(model, "saved_model", output, class_names=names, crop_pct=0.875,
                          interpolation="bilinear").report  # fmt: skip
    assert report["signatures"] == ["image_bytes", "serving_default"]
    paths = write_images(tmp_path)
    # What `convmixer_tf.predict` computes for the same files: its preprocessing, the model.
    batch = tf.stack(
        [imagenet.preprocess_image(imagenet.load_image(p), 16, 0.875, "bilinear") for p in paths]
    )
    predicted = np.asarray(model(batch, training=False))
    # ... and the command's own answer: the same top-5 ids.
    classified = predict.classify(model, paths, crop_pct=0.875, interpolation="bilinear",
                                  names=names, top=5)  # fmt: skip
    assert [[int(i) for i, _, _ in row] for row in classified] == np.argsort(
        -predicted, axis=1, kind="stable")[:, :5].tolist()  # fmt: skip
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "expected.npy", logits)
    np.save(tmp_path / "predicted.npy", predicted)
    (tmp_path / "names.json").write_text(json.dumps(names))
    (tmp_path / "paths.json").write_text(json.dumps(paths))
    run_stock(
        """
        import json, numpy as np, tensorflow as tf
        served = tf.saved_model.load("served")
        names = json.load(open("names.json"))
        pixels = tf.constant(np.load("pixels.npy"))
        out = served.signatures["serving_default"](pixels=pixels)
        expected = np.load("expected.npy")
        assert np.abs(out["logits"].numpy() - expected).max() <= 1e-5 * np.abs(expected).max()
        top = np.argsort(-expected, axis=1)[:, :5]
        assert (out["top_k_indices"].numpy() == top).all()
        assert [[n.decode() for n in row] for row in out["top_k_names"].numpy()] == [
            [names[i] for i in row] for row in top]
        np.testing.assert_allclose(out["probabilities"].numpy().sum(1), 1, atol=1e-5)

        files = [open(p, "rb").read() for p in json.load(open("paths.json"))]
        by_file = served.signatures["image_bytes"](image_bytes=tf.constant(files))
        predicted = np.load("predicted.npy")
        scale = np.abs(predicted).max()
        assert np.abs(by_file["logits"].numpy() - predicted).max() <= 1e-5 * scale
        assert (by_file["top_k_indices"].numpy() == np.argsort(-predicted, 1)[:, :5]).all()

        # A corrupt file fails its request with a message, and the server goes on.
        try:
            served.signatures["image_bytes"](image_bytes=tf.constant([b"not an image"]))
            raise SystemExit("a corrupt file was accepted")
        except tf.errors.InvalidArgumentError as e:
            assert "Unknown image file format" in e.message, e.message
        again = served.signatures["image_bytes"](image_bytes=tf.constant(files[:1]))
        assert again["logits"].shape == (1, 10)
        """,
        tmp_path,
    )


def test_saved_model_of_a_model_without_fixed_size_takes_any_size(tmp_path):
    model = convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(None, None, 3), num_classes=4)
    with pytest.raises(ValueError, match="--input-size"):
        export_model(model, "saved_model", tmp_path / "a")
    export_model(model, "saved_model", tmp_path / "served", input_size=16)
    pixels = rgb_pixels(2, 24)
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "expected.npy", np.asarray(model(pixels.astype("float32"))))
    run_stock(
        """
        import numpy as np, tensorflow as tf
        served = tf.saved_model.load("served").signatures["serving_default"]
        out = served(pixels=tf.constant(np.load("pixels.npy")))["logits"].numpy()
        expected = np.load("expected.npy")
        assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()
        assert [n.decode() for n in served(pixels=tf.zeros((1, 8, 8, 3), tf.uint8))[
            "top_k_names"].numpy()[0]][0].startswith("class_")
        """,
        tmp_path,
    )


def test_saved_model_output_never_replaces_another_folder(tmp_path):
    model = convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(8, 8, 3), num_classes=4)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a SavedModel"):
        export_model(model, "saved_model", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    export_model(model, "saved_model", tmp_path / "served")
    export_model(model, "saved_model", tmp_path / "served")  # an earlier SavedModel is replaced
    assert sorted(os.listdir(tmp_path)) == ["mine", "served"]


@pytest.mark.slow
def test_every_tflite_format_has_the_named_signature(trained, tmp_path, cifar10_train_dir):
    folder, model, pixels, logits = trained
    data = dict(data_dir=str(cifar10_train_dir), limit_per_class=3)
    tolerance = {"fp32": 1e-4, "fp16": 0.02, "dynamic": 0.1, "int8": 0.25, "qat": 0.25}
    for fmt in tolerance:
        export_model(model, fmt, tmp_path / f"m_{fmt}.tflite", data=data, calibration_images=24,
                     qat_steps=2 if fmt == "qat" else None, verbose=0)  # fmt: skip
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "expected.npy", logits)
    (tmp_path / "tolerance.json").write_text(json.dumps(tolerance))
    run_stock(
        """
        import json, numpy as np
        from ai_edge_litert.interpreter import Interpreter
        pixels, expected = np.load("pixels.npy").astype("float32"), np.load("expected.npy")
        for fmt, tolerance in json.load(open("tolerance.json")).items():
            interpreter = Interpreter(model_path=f"m_{fmt}.tflite")
            assert interpreter.get_signature_list() == {
                "serving_default": {"inputs": ["pixels"], "outputs": ["logits"]}}, fmt
            runner = interpreter.get_signature_runner()
            detail = runner.get_input_details()["pixels"]
            out_detail = runner.get_output_details()["logits"]
            for image, reference in zip(pixels, expected):
                x = image[None]
                if detail["dtype"] != np.float32:
                    scale, zero = detail["quantization"]
                    x = np.round(x / scale + zero).astype(detail["dtype"])
                y = runner(pixels=x)["logits"].astype("float32")
                if out_detail["dtype"] != np.float32:
                    scale, zero = out_detail["quantization"]
                    y = (y - zero) * scale
                error = np.abs(y[0] - reference).max() / np.abs(reference).max()
                assert error <= tolerance, (fmt, error)
        """,
        tmp_path,
    )
