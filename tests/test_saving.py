"""convmixer_tf.saving: arguments read off a model, rebuilds across Keras, the one safe loader."""

import os
import zipfile

import keras
import numpy as np
import pytest
import tf_keras

import convmixer_tf
from convmixer_tf import saving


def pixels(shape=(2, 8, 8, 3)):
    return np.random.default_rng(0).uniform(0, 255, shape).astype("float32")


def test_model_arguments_round_trip(tiny_kwargs):
    model = convmixer_tf.ConvMixer(**{**tiny_kwargs, "kernel_size": 7}, activation="relu")
    args = convmixer_tf.model_arguments(model)
    assert (args["dim"], args["depth"], args["kernel_size"], args["patch_size"]) == (16, 2, 7, 2)
    assert args["activation"] == "relu" and args["num_classes"] == 5
    assert args["input_shape"] == (8, 8, 3) and args["include_preprocessing"]
    rebuilt = convmixer_tf.rebuild(model)
    np.testing.assert_array_equal(rebuilt(pixels()), model(pixels()))


def test_model_arguments_of_a_headless_model(tiny_kwargs):
    kwargs = {k: v for k, v in tiny_kwargs.items() if k != "num_classes"}
    model = convmixer_tf.ConvMixer(**kwargs, include_top=False, pooling="max")
    args = convmixer_tf.model_arguments(model)
    assert not args["include_top"] and args["pooling"] == "max" and "num_classes" not in args


def test_not_a_convmixer_is_a_clear_error():
    inputs = keras.Input((16, 16, 3))
    other = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs))
    with pytest.raises(ValueError, match="not a ConvMixer.*stem_conv"):
        convmixer_tf.model_arguments(other)


def test_rebuild_across_keras_and_back(tiny_kwargs):
    model = convmixer_tf.ConvMixer(**tiny_kwargs)
    as_tf_keras = convmixer_tf.rebuild(model, keras_module="tf_keras", batch_size=2)
    assert isinstance(as_tf_keras, tf_keras.Model) and as_tf_keras.input_shape == (2, 8, 8, 3)
    back = convmixer_tf.rebuild(as_tf_keras)
    assert isinstance(back, keras.Model)
    x = pixels()
    np.testing.assert_allclose(as_tf_keras(x, training=False), model(x), atol=1e-5)
    np.testing.assert_allclose(back(x), model(x), atol=1e-5)


@pytest.mark.parametrize("saved_with", ["keras", "tf_keras"])
@pytest.mark.parametrize("wanted", ["keras", "tf_keras"])
def test_load_model_from_either_keras(tiny_kwargs, tmp_path, saved_with, wanted):
    model = convmixer_tf.ConvMixer(**tiny_kwargs, keras_module=saved_with)
    path = tmp_path / "m.keras"
    saving.save_model(model, path)
    loaded = convmixer_tf.load_model(path, keras_module=wanted)
    expected_class = keras.Model if wanted == "keras" else tf_keras.Model
    assert isinstance(loaded, expected_class)
    np.testing.assert_allclose(loaded(pixels(), training=False), model(pixels()), atol=1e-5)


def test_load_model_errors_name_the_file(tmp_path, tiny_kwargs):
    with pytest.raises(ValueError, match="not found.*missing.keras"):
        convmixer_tf.load_model(tmp_path / "missing.keras")
    empty = tmp_path / "empty.keras"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.keras.*is empty"):
        convmixer_tf.load_model(empty)
    with pytest.raises(ValueError, match="is a directory"):
        convmixer_tf.load_model(tmp_path)
    good = tmp_path / "good.keras"
    saving.save_model(convmixer_tf.ConvMixer(**tiny_kwargs), good)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.keras.*not a .keras archive"):
        convmixer_tf.load_model(truncated)
    no_config = tmp_path / "no_config.keras"
    with zipfile.ZipFile(no_config, "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(ValueError, match="no_config.keras.*not a readable .keras archive"):
        convmixer_tf.load_model(no_config)


def test_loading_never_runs_code_from_the_file(tmp_path, monkeypatch):
    """A legacy HDF5 model with a Lambda that writes a file, renamed .keras: refused unrun."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    evil = tf_keras.Sequential(
        [tf_keras.Input((2,)), tf_keras.layers.Lambda(lambda x: x + len(open("PWNED", "w").name))]
    )
    marker.unlink()  # tracing the Lambda at build time wrote it once
    evil.save(tmp_path / "evil.h5")
    os.replace(tmp_path / "evil.h5", tmp_path / "evil.keras")
    with pytest.raises(ValueError, match="evil.keras.*not a .keras archive"):
        convmixer_tf.load_model(tmp_path / "evil.keras")
    assert not marker.exists()


def test_files_saved_with_fused_layers_still_load(tiny_kwargs, tmp_path):
    model = convmixer_tf.ConvMixer(**tiny_kwargs)
    assert type(model.get_layer("stem_act")).__name__ == "GELU"
    path = tmp_path / "fused.keras"
    model.save(path)
    loaded = convmixer_tf.load_model(path)
    np.testing.assert_array_equal(loaded(pixels()), model(pixels()))


def test_training_run_settings_reads_what_the_run_wrote_and_names_what_it_did_not(tmp_path):
    model = tmp_path / "model.keras"
    assert saving.training_run_settings(model) == {}
    (tmp_path / "config.json").write_text('{"epochs": 3}')  # another tool's config: no keys
    assert saving.training_run_settings(model) == {}
    (tmp_path / "config.json").write_text('{"crop_pct": 0.875, "interpolation": "bicubic"}')
    (tmp_path / "class_names.json").write_text('["cat", "dog"]')
    assert saving.training_run_settings(model) == {
        "crop_pct": 0.875, "interpolation": "bicubic", "class_names": ["cat", "dog"],
    }  # fmt: skip
    for config, names, message in (
        ('{"crop_pct": 0}', '["cat"]', "config.json' .* is not a training run's config"),
        ('{"interpolation": "lanczos9"}', '["cat"]', "is not a training run's config"),
        ("[1, 2]", '["cat"]', "is not a training run's config"),
        ("{", '["cat"]', "config.json' .* is not valid JSON"),
        ("{}", '{"0": "cat"}', "class_names.json' .* must be a JSON list of class names"),
        ("{}", "[]", "must be a JSON list of class names"),
    ):
        (tmp_path / "config.json").write_text(config)
        (tmp_path / "class_names.json").write_text(names)
        with pytest.raises(ValueError, match=message):
            saving.training_run_settings(model)
