"""Checkpoint import: PyTorch logits reproduced, strict name/shape checks, no code run on load.

The checkpoints in tests/fixtures/pretrained were written once by
scripts/make_pretrained_fixtures.py with PyTorch 2.13 (timm-named ``.safetensors`` and
official-named ``.pth.tar``), with the logits PyTorch computed for the same input pixels.
"""

import os
import pathlib
import pickle
import shutil
import zipfile

import numpy as np
import pytest

import convmixer_tf
from convmixer_tf import pretrained, torch_pickle

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"
TOLERANCE = 1e-4
# fixture name -> (file, activation, kernel size, naming scheme)
CHECKPOINTS = {
    "timm_gelu_k3": ("timm_gelu_k3.safetensors", "gelu", 3, "timm"),
    "timm_relu_k4": ("timm_relu_k4.safetensors", "relu", 4, "timm"),
    "official_relu_k4": ("official_relu_k4.pth.tar", "relu", 4, "official"),
    "official_gelu_k3_dataparallel": (
        "official_gelu_k3_dataparallel.pth.tar",
        "gelu",
        3,
        "official",
    ),
}


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "expected_logits.npz") as data:
        return dict(data)


def tiny_model(kernel_size=3, activation="gelu", **kwargs):
    kwargs.setdefault("input_shape", (16, 16, 3))
    kwargs.setdefault("num_classes", 10)
    return convmixer_tf.ConvMixer(16, 2, kernel_size, 2, activation=activation, **kwargs)


def fixture_model(name, **kwargs):
    file, activation, kernel_size, _ = CHECKPOINTS[name]
    return tiny_model(kernel_size, activation, **kwargs), str(FIXTURES / file)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_reproduces_pytorch_logits(name, expected):
    model, path = fixture_model(name)
    info = convmixer_tf.load_pretrained(model, path)
    logits = model.predict(expected["pixels"], verbose=0)
    np.testing.assert_allclose(logits, expected[name], atol=TOLERANCE, rtol=0)
    assert info.scheme == CHECKPOINTS[name][3]
    assert (info.dim, info.depth, info.kernel_size, info.patch_size) == (
        16, 2, CHECKPOINTS[name][2], 2,
    )  # fmt: skip
    # Only BatchNorm step counters are dropped (5 BN layers).
    assert len(info.ignored) == 5
    assert all(key.endswith("num_batches_tracked") for key in info.ignored)


@pytest.mark.parametrize("name", ["timm_gelu_k3", "official_relu_k4"])
def test_tf_keras_model_reproduces_pytorch_logits(name, expected):
    model, path = fixture_model(name, keras_module="tf_keras")
    convmixer_tf.load_pretrained(model, path)
    logits = model.predict(expected["pixels"], verbose=0)
    np.testing.assert_allclose(logits, expected[name], atol=TOLERANCE, rtol=0)


def test_weights_argument_loads_checkpoint(expected):
    model, path = fixture_model("official_relu_k4")
    model = tiny_model(4, "relu", weights=path)
    logits = model.predict(expected["pixels"], verbose=0)
    np.testing.assert_allclose(logits, expected["official_relu_k4"], atol=TOLERANCE, rtol=0)


def test_include_top_false_ignores_head(expected):
    full, path = fixture_model("timm_gelu_k3")
    convmixer_tf.load_pretrained(full, path)
    features, _ = fixture_model("timm_gelu_k3", include_top=False, pooling="avg")
    info = convmixer_tf.load_pretrained(features, path)
    assert {"head.weight", "head.bias"} <= set(info.ignored)
    pooled = full.get_layer("avg_pool").output
    import keras

    reference = keras.Model(full.inputs, pooled).predict(expected["pixels"], verbose=0)
    np.testing.assert_allclose(
        features.predict(expected["pixels"], verbose=0), reference, atol=1e-5
    )


def test_inspect_checkpoint_reads_architecture():
    info = pretrained.inspect_checkpoint(FIXTURES / "official_gelu_k3_dataparallel.pth.tar")
    assert (info.scheme, info.dim, info.depth, info.kernel_size) == ("official", 16, 2, 3)
    assert (info.patch_size, info.num_classes) == (2, 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel_size": 3}, "kernel_size=3"),  # checkpoint has kernel 4
        ({"num_classes": 1000}, "num_classes=1000"),
    ],
)
def test_architecture_mismatch_says_what_it_found(kwargs, message):
    kwargs = {"kernel_size": 4, "activation": "relu", **kwargs}
    model = tiny_model(**kwargs)
    with pytest.raises(ValueError, match="kernel_size=4") as error:
        convmixer_tf.load_pretrained(model, FIXTURES / "official_relu_k4.pth.tar")
    assert message in str(error.value)


def timm_state():
    return pretrained.read_state_dict(FIXTURES / "timm_gelu_k3.safetensors")


def official_state():
    return pretrained.read_state_dict(FIXTURES / "official_relu_k4.pth.tar")


@pytest.mark.parametrize(
    "edit, kernel_size, activation, message",
    [
        (lambda s: s.pop("blocks.1.1.bias"), 3, "gelu", r"missing tensors: \['blocks.1.1.bias'\]"),
        (lambda s: s.pop("4.3.running_var"), 4, "relu", r"missing tensors: \['4.3.running_var'\]"),
        (
            lambda s: s.__setitem__("blocks.0.0.fn.9.weight", np.zeros(3, np.float32)),
            3, "gelu", r"unexpected tensors: \['blocks.0.0.fn.9.weight'\]",
        ),
        (
            lambda s: s.__setitem__("12.weight", np.zeros(3, np.float32)),
            4, "relu", r"unexpected tensors: \['12.weight'\]",
        ),
        (
            lambda s: s.__setitem__("blocks.1.3.running_var", np.ones(17, np.float32)),
            3, "gelu", r"blocks.1.3.running_var: checkpoint shape \(17,\)",
        ),
        (
            lambda s: s.__setitem__("3.1.weight", np.ones((16, 16, 3, 3), np.float32)),
            4, "relu", r"3.1.weight: checkpoint shape \(16, 16, 3, 3\)",
        ),
    ],
)  # fmt: skip
def test_bad_tensors_are_named_and_nothing_is_loaded(edit, kernel_size, activation, message):
    state = timm_state() if activation == "gelu" else official_state()
    edit(state)
    model = tiny_model(kernel_size, activation)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=message):
        pretrained.load_state_dict(model, state)
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_unknown_naming_scheme_is_refused():
    with pytest.raises(ValueError, match="neither timm's names"):
        pretrained.load_state_dict(tiny_model(), {"conv1.weight": np.zeros((2, 3, 1, 1))})


def test_unknown_file_format_is_refused(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="Unknown checkpoint format"):
        pretrained.read_state_dict(path)


# --- the restricted unpickler ---------------------------------------------------------------


def torch_zip(path, payload: bytes) -> None:
    """Packs a pickle as torch.save does (``<name>/data.pkl`` in a zip)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("checkpoint/data.pkl", payload)
        archive.writestr("checkpoint/byteorder", "little")


class _Exploit:
    """A pickle whose loading calls ``function(argument)``."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "builtins.exec"])
def test_malicious_pickle_is_refused_without_running(tmp_path, attack):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').close()"
    if attack == "os.system":
        exploit, name = _Exploit(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    else:
        function = eval if attack == "builtins.eval" else exec
        exploit, name = _Exploit(function, code), attack
    # Protocol 2 names globals with GLOBAL, protocol 4 with STACK_GLOBAL: both are gated.
    protocol = 2 if attack == "os.system" else 4
    payload = pickle.dumps({"state_dict": {"stem.0.weight": exploit}}, protocol=protocol)
    checkpoint = tmp_path / "evil.pth.tar"
    torch_zip(checkpoint, payload)
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=f"'{name}'"):
        convmixer_tf.load_pretrained(tiny_model(), checkpoint)
    assert not marker.exists()
    # The same payload is harmful when unpickled normally: the test would catch a bypass.
    pickle.loads(payload)
    assert marker.exists()


def test_training_args_are_read_as_an_inert_namespace():
    # The official fixtures hold timm's train.py extras: epoch, arch and args (argparse.Namespace).
    checkpoint = torch_pickle.load(FIXTURES / "official_relu_k4.pth.tar")
    assert isinstance(checkpoint["args"], torch_pickle.PickledNamespace)
    assert (checkpoint["args"].lr, checkpoint["args"].act, checkpoint["epoch"]) == (
        0.01,
        "relu",
        299,
    )


def test_legacy_and_non_checkpoint_files_are_refused(tmp_path):
    legacy = tmp_path / "old.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C) + pickle.dumps(1001))
    with pytest.raises(ValueError, match="legacy .* not supported"):
        torch_pickle.load(legacy)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        torch_pickle.load(garbage)
    archive = tmp_path / "other.pth"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="data.pkl"):
        torch_pickle.load(archive)


def test_rebuild_tensor_handles_strides_and_rejects_out_of_bounds():
    storage = np.arange(6, dtype=np.float32)
    transposed = torch_pickle._rebuild_tensor_v2(storage, 0, (3, 2), (1, 3))
    np.testing.assert_array_equal(transposed, storage.reshape(2, 3).T)
    with pytest.raises(ValueError, match="past its storage"):
        torch_pickle._rebuild_tensor_v2(storage, 2, (3, 2), (2, 1))


def test_storage_types_are_decoded(tmp_path):
    # A bfloat16 tensor and a float16 tensor written as torch.save lays them out.
    values = np.array([1.5, -2.0, 0.25], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    # Write the pickle by hand: {"a": _rebuild_tensor_v2(storage, 0, (3,), (1,))}.
    payload = (
        b"\x80\x02}(X\x01\x00\x00\x00ac"
        + b"torch._utils\n_rebuild_tensor_v2\n"
        + b"((X\x07\x00\x00\x00storagectorch\nBFloat16Storage\n"
        + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x03tQ"
        + b"K\x00K\x03\x85K\x01\x85\x89tRX\x01\x00\x00\x00bctorch._utils\n_rebuild_tensor_v2\n"
        + b"((X\x07\x00\x00\x00storagectorch\nHalfStorage\n"
        + b"X\x01\x00\x00\x001X\x03\x00\x00\x00cpuK\x03tQ"
        + b"K\x00K\x03\x85K\x01\x85\x89tRu."
    )
    path = tmp_path / "dtypes.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("dtypes/data.pkl", payload)
        archive.writestr("dtypes/data/0", bf16)
        archive.writestr("dtypes/data/1", values.astype("<f2").tobytes())
    loaded = torch_pickle.load(path)
    np.testing.assert_array_equal(loaded["a"], values)
    np.testing.assert_array_equal(loaded["b"], values.astype(np.float16))


# --- URLs, the Keras cache and weights="imagenet" ------------------------------------------


def test_file_url_is_cached_and_its_hash_recorded(tmp_path, expected):
    source = FIXTURES / "timm_relu_k4.safetensors"
    url = source.as_uri()
    cached = pretrained.fetch_checkpoint(url, cache_dir=str(tmp_path))
    assert pathlib.Path(cached).parent == tmp_path / pretrained.CACHE_SUBDIR
    digest = pretrained.sha256_of(source)
    assert pathlib.Path(cached + ".sha256").read_text().split()[0] == digest
    # Loaded through the model's `weights` argument, from the cache.
    model = tiny_model(4, "relu")
    convmixer_tf.load_pretrained(model, cached)
    np.testing.assert_allclose(
        model.predict(expected["pixels"], verbose=0), expected["timm_relu_k4"], atol=TOLERANCE
    )
    # A file that changed after it was recorded is refused.
    with open(cached, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ValueError, match="changed since it was downloaded"):
        pretrained.fetch_checkpoint(url, cache_dir=str(tmp_path))
    # A known hash is checked by keras.utils.get_file.
    with pytest.raises(ValueError, match="[Hh]ash"):
        pretrained.fetch_checkpoint(url, sha256="0" * 64, fname="other.safetensors",
                                    cache_dir=str(tmp_path))  # fmt: skip


def test_weights_url_in_model_builder(tmp_path, monkeypatch, expected):
    calls = []

    def fake_get_file(fname, origin, cache_subdir, file_hash, hash_algorithm, cache_dir):
        calls.append((fname, origin, cache_subdir, file_hash))
        cached = tmp_path / fname  # a copy: the hash record is written beside the cached file
        shutil.copyfile(FIXTURES / "official_relu_k4.pth.tar", cached)
        return str(cached)

    import keras

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    url = "https://example.com/convmixer/official_relu_k4.pth.tar"
    model = tiny_model(4, "relu", weights=url)
    np.testing.assert_allclose(
        model.predict(expected["pixels"], verbose=0), expected["official_relu_k4"], atol=TOLERANCE
    )
    assert calls[0][1:3] == (url, pretrained.CACHE_SUBDIR)
    assert calls[0][0].endswith("_official_relu_k4.pth.tar")
    assert (tmp_path / (calls[0][0] + ".sha256")).exists()


def test_imagenet_maps_to_the_presets_url(monkeypatch):
    calls = []

    def fake_get_file(fname, origin, cache_subdir, file_hash, hash_algorithm, cache_dir):
        calls.append((fname, origin))
        return "cached-checkpoint.safetensors"

    import keras

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    monkeypatch.setattr(pretrained, "sha256_of", lambda path: "f" * 64)
    monkeypatch.setattr(pretrained.files, "write_atomic", lambda path, text: None)
    # The architecture (not the name) decides: here a 224-pixel-free, small-input build.
    model = convmixer_tf.ConvMixer(768, 32, 7, 7, activation="relu", input_shape=(7, 7, 3))
    path = pretrained.resolve_weights(model, "imagenet")
    preset = convmixer_tf.get_preset("convmixer_768_32")
    assert path == "cached-checkpoint.safetensors"
    assert calls == [("convmixer_768_32.safetensors", preset.url)]
    with pytest.raises(ValueError, match="no published checkpoint"):
        pretrained.resolve_weights(tiny_model(), "imagenet")
