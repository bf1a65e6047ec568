"""The convert command: PyTorch checkpoint -> .keras, written atomically, same logits."""

import json
import os
import pathlib
import re

import keras
import numpy as np
import pytest

from convmixer_tf import convert

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"


def test_convert_writes_a_keras_file_with_pytorch_logits(tmp_path, capsys):
    output = tmp_path / "models" / "convmixer.keras"
    checkpoint = str(FIXTURES / "timm_relu_k4.safetensors")
    argv = ["--weights", checkpoint, "--activation", "relu", "--input-size", "16"]
    assert convert.main([*argv, "--output", str(output)]) == 0
    assert json.loads(capsys.readouterr().out)["reload_max_abs_diff"] == 0
    assert os.listdir(output.parent) == ["convmixer.keras"]  # no temporary file left
    with np.load(FIXTURES / "expected_logits.npz") as expected:
        model = keras.saving.load_model(output)
        logits = model.predict(expected["pixels"], verbose=0)
        np.testing.assert_allclose(logits, expected["timm_relu_k4"], atol=1e-4, rtol=0)


def test_convert_with_a_preset_checks_the_architecture(tmp_path, capsys):
    checkpoint = str(FIXTURES / "timm_gelu_k3.safetensors")
    argv = ["--preset", "convmixer_256_8", "--weights", checkpoint]
    assert convert.main([*argv, "--output", str(tmp_path / "m.keras")]) == 2
    err = capsys.readouterr().err
    assert re.search("dim=16, depth=2, kernel_size=3.*dim=256, depth=8", err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "m.keras").exists()


def test_imagenet_weights_need_a_preset():
    with pytest.raises(ValueError, match="needs a preset name"):
        convert.build_model("imagenet")
