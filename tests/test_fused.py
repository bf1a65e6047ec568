"""The fused training passes (exact GELU, BatchNorm, depthwise filter gradient): values and
gradients equal Keras' layers', in float32 and bfloat16, the layers' configs, serialization
(safe_mode) and the Keras 3 / tf_keras builds."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import convmixer_tf
from convmixer_tf import fused

# Float32 rounding of GELU and its derivative, which stay within about 1.2 in [-8, 8].
ATOL = 2e-6


def reference_values_and_gradients(x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = keras.activations.gelu(x, approximate=False)
    return y, tape.gradient(y, x, output_gradients=tf.ones_like(x) * 0.7)


@pytest.mark.parametrize("run", ["eager", "graph"])
def test_gelu_fused_equals_keras_gelu_values_and_gradients(run):
    x = tf.constant(np.concatenate([np.linspace(-8, 8, 4001), [-30.0, 0.0, 30.0]]), tf.float32)

    def values_and_gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fused.gelu_fused(x)
        return y, tape.gradient(y, x, output_gradients=tf.ones_like(x) * 0.7)

    if run == "graph":
        values_and_gradients = tf.function(values_and_gradients)
    y, dy = values_and_gradients(x)
    y_ref, dy_ref = reference_values_and_gradients(x)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(dy.numpy(), dy_ref.numpy(), rtol=0, atol=ATOL)
    # the derivative's known values: gelu'(0) = 1/2, gelu'(large) = 1, gelu'(-large) = 0
    np.testing.assert_allclose(dy.numpy()[-3:], [0.0, 0.35, 0.7], atol=1e-7)


def test_gelu_fused_keeps_float16_dtype():
    x = tf.constant(np.linspace(-4, 4, 101), tf.float16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fused.gelu_fused(x)
    dy = tape.gradient(y, x)
    assert y.dtype == tf.float16 and dy.dtype == tf.float16
    y_ref, _ = reference_values_and_gradients(tf.cast(x, tf.float32))
    np.testing.assert_allclose(y.numpy().astype("float32"), y_ref.numpy(), atol=5e-3)


def test_gelu_layer_training_and_inference_equal_activation_gelu():
    x = tf.random.stateless_normal((2, 4, 4, 8), seed=(1, 2)) * 3
    gelu = fused.gelu_layer_class(keras)(name="act")
    reference = keras.layers.Activation("gelu")(x).numpy()
    np.testing.assert_array_equal(gelu(x, training=False).numpy(), reference)
    np.testing.assert_allclose(gelu(x, training=True).numpy(), reference, atol=ATOL)
    assert gelu.get_config()["activation"] == "gelu"
    with pytest.raises(ValueError, match="only computes 'gelu'"):
        fused.gelu_layer_class(keras)(activation="relu")


def test_batch_norm_fused_statistics_with_a_large_mean():
    """The batch statistics are exact to float32 even when the mean is large against the spread
    (a one-pass E[x^2] - E[x]^2 would lose the variance to cancellation), and the variance is
    the biased one Keras' layers average (the kernel returns the Bessel-corrected one)."""
    x = tf.random.stateless_normal((64, 4, 4, 3), seed=(3, 4)) * [1.0, 2.0, 0.5] + 1000.0
    expected = np.var(x.numpy().astype("float64"), axis=(0, 1, 2))
    y, mean, variance = fused.batch_norm_train_fused(x, tf.ones(3), tf.zeros(3), 1e-5)
    np.testing.assert_allclose(variance.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(
        mean.numpy(), np.mean(x.numpy().astype("float64"), (0, 1, 2)), rtol=1e-6
    )
    np.testing.assert_allclose(np.std(y.numpy(), axis=(0, 1, 2)), 1.0, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_batch_norm_fused_low_precision_keeps_dtype_and_float32_statistics(dtype):
    x32 = tf.random.stateless_normal((8, 4, 4, 16), seed=(7, 8)) * 3 + 2
    x = tf.cast(x32, dtype)
    gamma, beta = tf.linspace(0.5, 1.5, 16), tf.linspace(-1.0, 1.0, 16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, mean, variance = fused.batch_norm_train_fused(x, gamma, beta, 1e-5)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(x32))
    d_x = tape.gradient(loss, x)
    assert y.dtype == dtype and d_x.dtype == dtype
    assert mean.dtype == tf.float32 and variance.dtype == tf.float32
    ref = np.asarray(tf.cast(x, tf.float64))
    np.testing.assert_allclose(mean.numpy(), ref.mean((0, 1, 2)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(variance.numpy(), ref.var((0, 1, 2)), rtol=1e-3)
    expected = (ref - ref.mean((0, 1, 2))) / np.sqrt(ref.var((0, 1, 2)) + 1e-5) * gamma + beta
    np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float32)), expected, atol=0.05)


def test_fused_batch_norm_layer_with_a_large_mean_equals_keras():
    """With a mean of 1000 the training output and the moving statistics equal Keras'."""
    x = tf.random.stateless_normal((64, 4, 4, 3), seed=(5, 6)) * [1.0, 2.0, 0.5] + 1000.0
    weights = [np.ones(3), np.zeros(3), np.full(3, 999.0), np.ones(3)]
    outputs = []
    for layer_class in (fused.batch_norm_layer_class(keras), keras.layers.BatchNormalization):
        layer = layer_class(epsilon=1e-5, momentum=0.9)
        layer.build(x.shape)
        layer.set_weights([w.astype("float32") for w in weights])
        outputs.append([np.asarray(layer(x, training=True))] + layer.get_weights()[2:])
    for fast, plain in zip(*outputs, strict=True):
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=2e-3)


def test_models_use_fused_layers_for_keras3_only(tiny_kwargs):
    k3 = convmixer_tf.ConvMixer(**tiny_kwargs)
    k2 = convmixer_tf.ConvMixer(**tiny_kwargs, keras_module="tf_keras")
    relu_synced = convmixer_tf.ConvMixer(**tiny_kwargs, activation="relu", synchronized_bn=True)
    assert type(k3.get_layer("blocks_1_pwconv_act")).__name__ == "GELU"
    assert type(k3.get_layer("stem_bn")).__name__ == "FusedBatchNormalization"
    assert type(k3.get_layer("blocks_0_dwconv")).__name__ == "FusedDepthwiseConv2D"
    assert type(k2.get_layer("blocks_0_dwconv")) is tf_keras.layers.DepthwiseConv2D
    assert type(k2.get_layer("blocks_1_pwconv_act")) is tf_keras.layers.Activation
    assert type(k2.get_layer("stem_bn")) is tf_keras.layers.BatchNormalization
    assert type(relu_synced.get_layer("stem_act")) is keras.layers.Activation
    assert type(relu_synced.get_layer("stem_bn")) is keras.layers.BatchNormalization
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    k2.set_weights(k3.get_weights())
    np.testing.assert_allclose(k3(x, training=False), k2(x, training=False), atol=1e-5)
    # training mode: fused GELU vs tf_keras' gelu, batch statistics in BatchNorm
    np.testing.assert_allclose(k3(x, training=True), k2(x, training=True), atol=1e-4)


@pytest.mark.parametrize(
    ("devices", "kind"),
    [
        (["/job:localhost/replica:0/task:0/device:CPU:0"], "CPU"),
        (["/device:CPU:0", "/job:localhost/replica:0/task:0/device:GPU:0"], "GPU"),
        (["/device:CPU:0", "/job:worker/replica:0/task:0/device:TPU:0"], "TPU"),
    ],
)
def test_fused_layers_only_where_the_model_trains_on_cpus(tiny_kwargs, monkeypatch, devices, kind):
    class Device:
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr(tf.config, "list_logical_devices", lambda: [Device(d) for d in devices])
    assert fused.training_device_type() == kind
    model = convmixer_tf.ConvMixer(**tiny_kwargs)
    expected = {
        "blocks_1_pwconv_act": ("GELU", "Activation"),
        "stem_bn": ("FusedBatchNormalization", "BatchNormalization"),
        "blocks_0_dwconv": ("FusedDepthwiseConv2D", "DepthwiseConv2D"),
    }
    for name, (fused_class, stock_class) in expected.items():
        assert type(model.get_layer(name)).__name__ == (
            fused_class if kind == "CPU" else stock_class
        )


def test_strategy_devices_decide_the_layers(tiny_kwargs):
    # Inside a strategy its devices count, not what is visible: two logical CPUs stay CPUs.
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert fused.training_device_type() == "CPU"
        model = convmixer_tf.ConvMixer(**tiny_kwargs)
    assert type(model.get_layer("stem_bn")).__name__ == "FusedBatchNormalization"


def test_fused_model_saves_and_loads_with_safe_mode(tiny_kwargs, tmp_path):
    model = convmixer_tf.ConvMixer(**tiny_kwargs)
    path = tmp_path / "gelu.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.get_layer("stem_act")).__name__ == "GELU"
    assert type(loaded.get_layer("stem_bn")).__name__ == "FusedBatchNormalization"
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_model_gradients_match_keras_gelu_model(tiny_kwargs, monkeypatch):
    """A training step's gradients with the fused GELU, BatchNorm and depthwise conv equal
    Keras' layers'."""
    fast = convmixer_tf.ConvMixer(**tiny_kwargs)
    monkeypatch.setattr(
        fused,
        "activation_layer",
        lambda keras, activation, name: keras.layers.Activation(activation, name=name),
    )
    monkeypatch.setattr(
        fused,
        "batch_norm_layer_class",
        lambda keras: keras.layers.BatchNormalization,
    )
    monkeypatch.setattr(
        fused,
        "depthwise_conv",
        lambda keras, k, name: keras.layers.DepthwiseConv2D(k, padding="same", name=name),
    )
    plain = convmixer_tf.ConvMixer(**tiny_kwargs)
    assert type(plain.get_layer("stem_act")) is keras.layers.Activation
    assert type(plain.get_layer("stem_bn")) is keras.layers.BatchNormalization
    assert type(plain.get_layer("blocks_0_dwconv")) is keras.layers.DepthwiseConv2D
    plain.set_weights(fast.get_weights())
    x = tf.constant(np.random.default_rng(1).uniform(0, 255, (4, 8, 8, 3)), tf.float32)

    def grads(model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    fused_grads, plain_grads = grads(fast), grads(plain)
    scale = max(float(tf.reduce_max(tf.abs(g))) for g in plain_grads)
    for g_fused, g_plain in zip(fused_grads, plain_grads, strict=True):
        np.testing.assert_allclose(g_fused / scale, g_plain / scale, rtol=0, atol=1e-5)


def test_fused_batch_norm_equals_keras_batch_norm_in_training():
    x = tf.random.stateless_normal((4, 5, 5, 8), seed=(3, 4)) * 3 + 1
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 1.5, 8).astype("float32") for _ in range(4)]
    fast = fused.batch_norm_layer_class(keras)(epsilon=1e-5, momentum=0.9)
    plain = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)
    upstream = tf.sin(x)
    results = []
    for layer in (fast, plain):
        layer.build(x.shape)
        layer.set_weights(weights)  # gamma, beta, moving mean, moving variance
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        grads = tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=upstream)
        results.append([y, *grads, layer.moving_mean, layer.moving_variance])
    names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    for name, a, b in zip(names, *results, strict=True):
        scale = float(tf.reduce_max(tf.abs(b)))
        np.testing.assert_allclose(
            np.asarray(a) / scale, np.asarray(b) / scale, atol=2e-6, err_msg=name
        )
    # inference uses the moving statistics (equal up to rounding, above), as the parent class
    np.testing.assert_allclose(fast(x, training=False), plain(x, training=False), atol=1e-6)


def depthwise_values_and_gradients(layer, x, training=True):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cos(tf.cast(y, tf.float32)))
    return [y, *tape.gradient(loss, [x, *layer.trainable_variables])]


@pytest.mark.parametrize(
    "kernel_size, channels, padding",
    [(5, 24, "same"), (4, 10, "same"), (9, 6, "same"), (3, 7, "valid")],
)
def test_fused_depthwise_equals_keras_depthwise_values_and_gradients(
    kernel_size, channels, padding
):
    """Groups of 8, 5, 6 and 7 channels; an even kernel ("same" pads it unevenly)."""
    x = tf.random.stateless_normal((4, 11, 11, channels), seed=(9, kernel_size))
    plain = keras.layers.DepthwiseConv2D(kernel_size, padding=padding)
    fast = fused.depthwise_conv_layer_class(keras)(kernel_size, padding=padding)
    plain.build(x.shape)
    fast.build(x.shape)
    fast.set_weights([w + 0.1 for w in plain.get_weights()])
    plain.set_weights(fast.get_weights())
    for got, expected in zip(
        depthwise_values_and_gradients(fast, x),
        depthwise_values_and_gradients(plain, x),
        strict=True,
    ):
        scale = float(tf.reduce_max(tf.abs(expected)))
        np.testing.assert_allclose(got / scale, expected / scale, rtol=0, atol=1e-6)
    assert fast.get_config() == {**plain.get_config(), "name": fast.name}


def test_fused_depthwise_bfloat16_filter_gradient_is_float32_accurate():
    """In bfloat16 the filter gradient is the float32 sum of the bfloat16 products, rounded once
    (what TensorFlow's own bfloat16 kernel gives): checked against float64."""
    x = tf.cast(tf.random.stateless_normal((16, 12, 12, 32), seed=(1, 1)), tf.bfloat16)
    upstream = tf.cast(tf.random.stateless_normal((16, 12, 12, 32), seed=(2, 2)), tf.bfloat16)
    got = fused.depthwise_filter_gradient(x, upstream, (5, 5))
    assert got.dtype == tf.bfloat16 and got.shape == (5, 5, 32, 1)
    x64, up64 = (np.asarray(tf.cast(t, tf.float64)) for t in (x, upstream))
    padded = np.pad(x64, [(0, 0), (2, 2), (2, 2), (0, 0)])
    expected = np.stack(
        [
            np.stack(
                [np.sum(padded[:, i : i + 12, j : j + 12] * up64, (0, 1, 2)) for j in range(5)]
            )
            for i in range(5)
        ]
    )[..., None]
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(np.asarray(tf.cast(got, tf.float64)) / scale, expected / scale,
                               atol=1e-2)  # fmt: skip
