"""The fused training passes (exact GELU, BatchNorm): values and gradients equal Keras'
layers', the layers' configs, serialization (safe_mode) and the Keras 3 / tf_keras builds."""

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
    """The one-pass variance is exact when shifted by an estimate of the mean (the layer's moving
    mean), where the unshifted E[x^2] - E[x]^2 loses it to float32 cancellation."""
    x = tf.random.stateless_normal((64, 4, 4, 3), seed=(3, 4)) * [1.0, 2.0, 0.5] + 1000.0
    expected = np.var(x.numpy().astype("float64"), axis=(0, 1, 2))
    gamma, beta = tf.ones(3), tf.zeros(3)
    shift = tf.constant([1000.3, 999.5, 1000.0])
    y, mean, variance = fused.batch_norm_train_fused(x, gamma, beta, 1e-5, shift)
    np.testing.assert_allclose(variance.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(mean.numpy(), np.mean(x.numpy().astype("float64"), (0, 1, 2)))
    np.testing.assert_allclose(np.std(y.numpy(), axis=(0, 1, 2)), 1.0, rtol=1e-3)
    _, _, unshifted = fused.batch_norm_train_fused(x, gamma, beta, 1e-5)
    assert np.max(np.abs(unshifted.numpy() / expected - 1)) > 1e-2


def test_fused_batch_norm_layer_shifts_by_its_moving_mean():
    """The layer passes its moving mean as the shift: with a mean of 1000 its training output
    equals Keras' (the unshifted one-pass variance would be off by far more)."""
    x = tf.random.stateless_normal((64, 4, 4, 3), seed=(5, 6)) * [1.0, 2.0, 0.5] + 1000.0
    weights = [np.ones(3), np.zeros(3), np.full(3, 999.0), np.ones(3)]
    outputs = []
    for layer_class in (fused.batch_norm_layer_class(keras), keras.layers.BatchNormalization):
        layer = layer_class(epsilon=1e-5, momentum=0.9)
        layer.build(x.shape)
        layer.set_weights([w.astype("float32") for w in weights])
        outputs.append(np.asarray(layer(x, training=True)))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=2e-3)


def test_models_use_fused_layers_for_keras3_only(tiny_kwargs):
    k3 = convmixer_tf.ConvMixer(**tiny_kwargs)
    k2 = convmixer_tf.ConvMixer(**tiny_kwargs, keras_module="tf_keras")
    relu_synced = convmixer_tf.ConvMixer(**tiny_kwargs, activation="relu", synchronized_bn=True)
    assert type(k3.get_layer("blocks_1_pwconv_act")).__name__ == "GELU"
    assert type(k3.get_layer("stem_bn")).__name__ == "FusedBatchNormalization"
    assert type(k2.get_layer("blocks_1_pwconv_act")) is tf_keras.layers.Activation
    assert type(k2.get_layer("stem_bn")) is tf_keras.layers.BatchNormalization
    assert type(relu_synced.get_layer("stem_act")) is keras.layers.Activation
    assert type(relu_synced.get_layer("stem_bn")) is keras.layers.BatchNormalization
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    k2.set_weights(k3.get_weights())
    np.testing.assert_allclose(k3(x, training=False), k2(x, training=False), atol=1e-5)
    # training mode: fused GELU vs tf_keras' gelu, batch statistics in BatchNorm
    np.testing.assert_allclose(k3(x, training=True), k2(x, training=True), atol=1e-4)


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
    """A training step's gradients with the fused GELU and BatchNorm equal Keras' layers'."""
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
    plain = convmixer_tf.ConvMixer(**tiny_kwargs)
    assert type(plain.get_layer("stem_act")) is keras.layers.Activation
    assert type(plain.get_layer("stem_bn")) is keras.layers.BatchNormalization
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
