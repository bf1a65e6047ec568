"""The ConvMixer builder and presets: architecture, parameter counts, Keras 3 <-> tf_keras,
serialization, mixed precision and input validation."""

import copy
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import convmixer_tf
from convmixer_tf import model as model_lib

RNG = np.random.default_rng(0)


def randomize(model, seed=0):
    """Random weights with non-trivial BatchNorm statistics (fresh BN is the identity)."""
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.get_weights():
        if w.ndim == 1:  # biases, gamma, beta, moving mean, moving variance
            weights.append(rng.uniform(0.5, 1.5, w.shape).astype(w.dtype))
        else:
            weights.append(rng.normal(0, 0.2, w.shape).astype(w.dtype))
    model.set_weights(weights)
    return model


def pixels(n=2, size=8, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


# --- a NumPy reference of the paper's architecture, independent of Keras --------------------


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _act(x, name):
    return _gelu(x) if name == "gelu" else np.maximum(x, 0.0)


def _bn(x, gamma, beta, mean, var):
    return (x - mean) / np.sqrt(var + 1e-5) * gamma + beta


def _depthwise_same(x, kernel, bias):
    """PyTorch's padding="same": total k-1, (k-1)//2 before and the rest after."""
    k = kernel.shape[0]
    before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
    xp = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    for i in range(k):
        for j in range(k):
            out += xp[:, i : i + h, j : j + w, :] * kernel[i, j, :, 0]
    return out + bias


def reference_forward(model, x, depth, patch, activation, mean, std):
    w = {v.path: np.array(v) for v in model.weights}
    x = (x / 255.0 - np.array(mean)) / np.array(std)
    n, h, wd, _ = x.shape
    patches = x.reshape(n, h // patch, patch, wd // patch, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    x = (
        patches.reshape(n, h // patch, wd // patch, -1)
        @ w["stem_conv/kernel"].reshape(-1, w["stem_conv/kernel"].shape[-1])
        + w["stem_conv/bias"]
    )

    def bn(x, name):
        keys = ("gamma", "beta", "moving_mean", "moving_variance")
        return _bn(x, *(w[f"{name}/{k}"] for k in keys))

    x = bn(_act(x, activation), "stem_bn")
    for i in range(depth):
        p = f"blocks_{i}"
        y = _depthwise_same(x, w[f"{p}_dwconv/kernel"], w[f"{p}_dwconv/bias"])
        x = bn(_act(y, activation), f"{p}_dwconv_bn") + x
        y = x @ w[f"{p}_pwconv/kernel"][0, 0] + w[f"{p}_pwconv/bias"]
        x = bn(_act(y, activation), f"{p}_pwconv_bn")
    return x.mean(axis=(1, 2)) @ w["head/kernel"] + w["head/bias"]


@pytest.mark.parametrize(
    "activation,kernel_size,patch_size", [("gelu", 3, 2), ("relu", 4, 2), ("gelu", 5, 4)]
)
def test_matches_paper_architecture(activation, kernel_size, patch_size):
    kwargs = dict(
        dim=8,
        depth=2,
        kernel_size=kernel_size,
        patch_size=patch_size,
        activation=activation,
        num_classes=4,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.25, 0.3),
    )
    model = randomize(convmixer_tf.ConvMixer(input_shape=(8, 8, 3), **kwargs))
    x = pixels()
    expected = reference_forward(
        model, x.astype("float64"), 2, patch_size, activation, kwargs["mean"], kwargs["std"]
    )
    np.testing.assert_allclose(model(x, training=False), expected, rtol=1e-4, atol=1e-4)


def test_batchnorm_uses_pytorch_defaults(tiny_kwargs):
    model = convmixer_tf.ConvMixer(**tiny_kwargs)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 1 + 2 * tiny_kwargs["depth"]
    assert all(bn.epsilon == 1e-5 and bn.momentum == 0.9 for bn in bns)


def _fan_in(layer, dim: int, patch_size: int, kernel_size: int) -> int:
    """PyTorch's fan_in of each weighted layer of a ConvMixer (per group for the depthwise)."""
    if layer.name == "stem_conv":
        return 3 * patch_size * patch_size
    if layer.name.endswith("_dwconv"):
        return kernel_size * kernel_size
    return dim  # 1x1 convolutions and the classifier


@pytest.mark.parametrize("keras_module", ["keras", "tf_keras"])
def test_pytorch_initialization(tiny_kwargs, keras_module):
    """initialization="pytorch": kernels and biases U(+-1/sqrt(fan_in)) as nn.Conv2d/nn.Linear
    start (fan_in per group: 1/k for the depthwise kernels, not Keras' Glorot fans)."""
    kwargs = {**tiny_kwargs, "dim": 64, "kernel_size": 5}
    model = convmixer_tf.ConvMixer(**kwargs, initialization="pytorch", keras_module=keras_module)
    checked = 0
    for layer in model.layers:
        if not layer.name.endswith(("stem_conv", "_dwconv", "_pwconv", "head")):
            continue
        bound = 1 / math.sqrt(_fan_in(layer, 64, kwargs["patch_size"], 5))
        kernel, bias = (np.asarray(w) for w in layer.weights)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, layer.name
        # uniform over the whole interval: the spread of U(-b, b) is b / sqrt(3)
        np.testing.assert_allclose(
            kernel.std(), bound / math.sqrt(3), rtol=0.25, err_msg=layer.name
        )
        assert np.abs(bias).max() > 0.5 * bound, layer.name  # not Keras' zero biases
        checked += 1
    assert checked == 1 + 2 * kwargs["depth"] + 1
    # Keras' default: Glorot counts all channels in a depthwise kernel's fans (k*k*dim + k*k).
    default = convmixer_tf.ConvMixer(**kwargs, keras_module=keras_module)
    depthwise = np.asarray(default.get_layer("blocks_0_dwconv").weights[0])
    assert np.abs(depthwise).max() <= math.sqrt(6 / (25 * 64 + 25)) < 0.2 / 3


def test_layers_named_after_blocks(tiny_kwargs):
    names = [layer.name for layer in convmixer_tf.ConvMixer(**tiny_kwargs).layers]
    assert names[:5] == ["pixels", "preprocessing", "stem_conv", "stem_act", "stem_bn"]
    assert names[5:12] == [
        f"blocks_0_{s}"
        for s in ("dwconv", "dwconv_act", "dwconv_bn", "add", "pwconv", "pwconv_act", "pwconv_bn")
    ]
    assert names[-2:] == ["avg_pool", "head"]


# --- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(convmixer_tf.PRESETS))
def test_presets_shapes_and_parameter_counts(name):
    preset = convmixer_tf.PRESETS[name]
    size = 2 * preset.patch_size  # a small resolution: 2x2 patches
    model = convmixer_tf.create_model(name, input_shape=(size, size, 3))
    assert model.output_shape == (None, preset.num_classes)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    if preset.params is not None:
        assert trainable == preset.params
    # The count is what the architecture formula gives, for every variant.
    d, k, p, c = preset.dim, preset.kernel_size, preset.patch_size, preset.num_classes
    per_block = (d * k * k + d) + 2 * d + (d * d + d) + 2 * d
    assert trainable == (3 * p * p * d + d) + 2 * d + preset.depth * per_block + (d * c + c)
    layer = model.get_layer("blocks_0_dwconv")
    assert layer.kernel_size == (k, k)
    assert model.get_layer("stem_act").get_config()["activation"] == preset.activation
    assert model.get_layer("stem_conv").strides == (p, p)
    assert model.input_shape == (None, size, size, 3)


def test_preset_eval_settings():
    assert convmixer_tf.create_model("convmixer_256_8").input_shape == (None, 32, 32, 3)
    p = convmixer_tf.get_preset("convmixer_1536_20")
    assert (p.input_size, p.crop_pct, p.interpolation) == ((224, 224), 0.96, "bicubic")
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert (
        convmixer_tf.get_preset("convmixer_1024_20_ks9_p14")
        is convmixer_tf.PRESETS["convmixer_1024_20"]
    )
    assert convmixer_tf.PRESETS["convmixer_768_32"].activation == "relu"


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="convmixer_1536_20.*convmixer_768_32"):
        convmixer_tf.create_model("convmixer_999")


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match=r"Unknown option.*num_clases.*Valid.*num_classes"):
        convmixer_tf.create_model("convmixer_256_8", num_clases=5)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(activation="swish"), "activation"),
        (dict(pooling="avg"), "pooling"),
        (dict(include_top=False, pooling="mean"), "pooling"),
        (dict(input_shape=(9, 9, 3)), "multiples of the patch size"),
        (dict(input_shape=(8, 8, 1)), "input_shape"),
        (dict(dim=0), "dim"),
        (dict(depth=2.5), "depth"),
        (dict(std=(0.0, 1.0, 1.0)), "std"),
        (dict(keras_module="keras2"), "keras_module"),
        (dict(initialization="torch"), "initialization"),
        (dict(weights="no/such/file.weights.h5"), "no/such/file"),
    ],
)
def test_bad_options_raise_clear_errors(tiny_kwargs, overrides, match):
    with pytest.raises(ValueError, match=match):
        convmixer_tf.ConvMixer(**{**tiny_kwargs, **overrides})


# --- the model's interface -------------------------------------------------------------------


@pytest.mark.parametrize(
    "pooling,shape", [("avg", (None, 16)), ("max", (None, 16)), (None, (None, 4, 4, 16))]
)
def test_feature_extractor(tiny_kwargs, pooling, shape):
    model = convmixer_tf.ConvMixer(**tiny_kwargs, include_top=False, pooling=pooling)
    assert model.output_shape == shape
    assert "head" not in [layer.name for layer in model.layers]


def test_any_resolution_when_input_shape_is_none(tiny_kwargs):
    model = convmixer_tf.ConvMixer(**{**tiny_kwargs, "input_shape": None})
    for size in (8, 12):
        assert model(pixels(size=size)).shape == (2, 5)


def test_preprocessing_inside_the_model(tiny_kwargs):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = randomize(convmixer_tf.ConvMixer(**tiny_kwargs, mean=mean, std=std))
    plain = convmixer_tf.ConvMixer(**tiny_kwargs, include_preprocessing=False)
    plain.set_weights(raw.get_weights())
    x = pixels()
    normalized = (x / 255.0 - np.array(mean, "float32")) / np.array(std, "float32")
    np.testing.assert_allclose(raw(x), plain(normalized), rtol=1e-5, atol=1e-5)


def test_classifier_activation(tiny_kwargs):
    model = randomize(convmixer_tf.ConvMixer(**tiny_kwargs, classifier_activation="softmax"))
    np.testing.assert_allclose(np.sum(model(pixels()), axis=-1), 1.0, rtol=1e-5)


def test_predict_on_tf_data(tiny_kwargs):
    model = convmixer_tf.ConvMixer(**tiny_kwargs)
    ds = tf.data.Dataset.from_tensor_slices(pixels(6)).batch(4)
    assert model.predict(ds, verbose=0).shape == (6, 5)


def test_fit_on_tf_data(tiny_kwargs):
    model = convmixer_tf.ConvMixer(**tiny_kwargs)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    labels = np.arange(8) % 5
    ds = tf.data.Dataset.from_tensor_slices((pixels(8), labels)).batch(4)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(ds, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


# --- Keras 3 <-> tf_keras --------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_keras3_and_tf_keras_give_the_same_outputs(tiny_kwargs, activation):
    k3 = randomize(convmixer_tf.ConvMixer(**tiny_kwargs, activation=activation))
    k2 = convmixer_tf.ConvMixer(**tiny_kwargs, activation=activation, keras_module="tf_keras")
    assert isinstance(k3, keras.Model) and isinstance(k2, tf_keras.Model)
    assert [layer.name for layer in k3.layers] == [layer.name for layer in k2.layers]
    assert k3.count_params() == k2.count_params()
    k2.set_weights(k3.get_weights())
    x = pixels(4)
    np.testing.assert_allclose(k2(x, training=False), k3(x, training=False), rtol=1e-5, atol=1e-5)
    # ... and weights move back the other way.
    randomize(k2, seed=3)
    k3.set_weights(k2.get_weights())
    np.testing.assert_allclose(k3(x, training=False), k2(x, training=False), rtol=1e-5, atol=1e-5)


# --- serialization ---------------------------------------------------------------------------


def test_keras_save_and_load_with_safe_mode(tiny_kwargs, tmp_path):
    model = randomize(convmixer_tf.ConvMixer(**tiny_kwargs))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = pixels()
    np.testing.assert_array_equal(loaded(x), model(x))
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]


def test_tf_keras_save_and_load(tiny_kwargs, tmp_path):
    model = randomize(convmixer_tf.ConvMixer(**tiny_kwargs, keras_module="tf_keras"))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = tf_keras.models.load_model(path, safe_mode=True)
    x = pixels()
    np.testing.assert_array_equal(loaded(x), model(x))


def test_config_round_trip(tiny_kwargs):
    model = randomize(convmixer_tf.ConvMixer(**tiny_kwargs, activation="relu"))
    config = model.get_config()
    clone = keras.Model.from_config(copy.deepcopy(config))  # from_config consumes its dict
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(pixels()), model(pixels()))


def test_weights_argument_loads_a_weights_file(tiny_kwargs, tmp_path):
    model = randomize(convmixer_tf.ConvMixer(**tiny_kwargs))
    path = str(tmp_path / "tiny.weights.h5")
    model.save_weights(path)
    loaded = convmixer_tf.ConvMixer(**tiny_kwargs, weights=path)
    np.testing.assert_array_equal(loaded(pixels()), model(pixels()))


# --- mixed precision -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("keras_module", [keras, tf_keras], ids=["keras3", "tf_keras"])
def test_mixed_precision_keeps_logits_float32(tiny_kwargs, policy, keras_module):
    previous = keras_module.mixed_precision.global_policy()
    keras_module.mixed_precision.set_global_policy(policy)
    try:
        model = convmixer_tf.ConvMixer(**tiny_kwargs, keras_module=keras_module)
    finally:
        keras_module.mixed_precision.set_global_policy(previous)
    compute = policy.split("_")[1]
    assert model.get_layer("stem_conv").compute_dtype == compute
    assert model.get_layer("blocks_1_pwconv").compute_dtype == compute
    logits = model(pixels(), training=False)
    assert logits.dtype == tf.float32
    assert np.isfinite(np.array(logits)).all()


def test_bn_constants_are_pytorch():
    assert (model_lib.BN_EPSILON, model_lib.BN_MOMENTUM) == (1e-5, 0.9)
