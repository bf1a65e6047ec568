"""QAT with tfmot: tf_keras rebuild, the annotation policy, and a fully-int8 QAT .tflite."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from export_helpers import keras_logits, pixels, tiny_model

from export import quantize, rewrite, tflite
from export.evaluate import TFLiteClassifier


def test_to_tf_keras_gives_identical_outputs():
    model = tiny_model()
    rebuilt = quantize.to_tf_keras(model)
    assert isinstance(rebuilt, tf_keras.Model)
    ref = keras_logits(model, pixels(4))
    np.testing.assert_allclose(keras_logits(rebuilt, pixels(4)), ref, rtol=1e-5, atol=1e-6)


def _wrapped(qat_model):
    return {
        layer.layer.name: layer.quantize_config
        for layer in qat_model.layers
        if hasattr(layer, "quantize_config")
    }


@pytest.mark.slow
def test_every_layer_follows_the_policy_table():
    model = tiny_model()
    qat_model = quantize.quantize_model(model)
    configs = _wrapped(qat_model)
    base = rewrite.batch_norm_as_depthwise(
        rewrite.fold_last_batch_norm(quantize.to_tf_keras(model))
    )
    folded = [layer for layer in base.layers if layer.name not in ("pixels", "preprocessing")]
    assert sorted(configs) == sorted(layer.name for layer in folded)
    for layer in folded:
        assert configs[layer.name] == quantize.QUANTIZE_POLICY[type(layer).__name__].make()
    # every layer's output is quantized with GELU (no fused activation), but the folded last BN
    # (an Identity: its output is its input)
    last_bn = "blocks_1_pwconv_bn"
    assert type(base.get_layer(last_bn)).__name__ == "Identity"
    assert configs[last_bn].get_output_quantizers(None) == []
    assert all(cfg.get_output_quantizers(None) for name, cfg in configs.items() if name != last_bn)


def test_fused_relu_has_no_quantizer_before_it():
    qat_model = quantize.quantize_model(tiny_model(activation="relu"))
    configs = _wrapped(qat_model)
    assert configs["stem_conv"].get_config() == {
        "weight_attr": "kernel", "per_axis": True, "quantize_output": False, "grid_axes": None,
    }  # fmt: skip
    assert configs["stem_act"].get_output_quantizers(None)
    assert configs["head"].quantize_output  # Dense without ReLU keeps its output quantizer


def test_input_quantizer_covers_raw_pixels():
    qat_model = quantize.quantize_model(tiny_model())
    layer = quantize.input_quantize_layer(qat_model)
    weights = {w.name.split("_")[-1]: float(w.numpy()) for w in layer.weights}
    assert weights["min:0"] == 0.0 and weights["max:0"] == 255.0


def test_unsupported_layer_is_a_clear_error():
    inputs = tf_keras.Input((16, 16, 3))
    x = tf_keras.layers.Conv2D(4, 2, name="stem_conv")(inputs)
    x = tf_keras.layers.LayerNormalization(name="ln")(x)
    with pytest.raises(ValueError, match="'ln' of type LayerNormalization"):
        quantize.annotate(tf_keras.Model(inputs, x))


def test_finetune_rejects_bad_length():
    qat_model = quantize.quantize_model(tiny_model())
    data = tf.data.Dataset.from_tensor_slices((pixels(4), np.zeros(4, "int32"))).batch(2)
    with pytest.raises(ValueError, match="steps=0"):
        quantize.finetune(qat_model, data, steps=0)


def _assert_computes_the_fake_quant_model(blob, qat_model, images):
    """int8 kernels vs fake quantization: a few output quantization steps apart, same classes."""
    fake_quant = keras_logits(qat_model, images)
    out = TFLiteClassifier(blob).predict(images)
    scale = tflite.summarize(blob).output_quantization[0]
    differences = np.abs(out - fake_quant) / scale
    assert differences.mean() <= 2 and differences.max() <= 8, differences.max()
    assert (out.argmax(-1) == fake_quant.argmax(-1)).mean() >= 0.95


@pytest.mark.slow
def test_qat_tflite_is_fully_int8_and_agrees():
    tf_keras.utils.set_random_seed(0)  # deterministic init and shuffling: a reproducible check
    images = pixels(48)
    labels = (images.mean(axis=(1, 2, 3)) // 26).astype("int32")  # a learnable toy target
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    qat_model = quantize.quantize_model(tiny_model())
    history = quantize.finetune(qat_model, data, steps=3, learning_rate=1e-3)
    assert np.isfinite(history["loss"])
    batch1 = quantize.rebatch_qat_model(qat_model)
    assert batch1.input_shape == (1, 16, 16, 3)
    blob = tflite.convert(batch1, "qat", calibration_images=images[:16])
    summary = tflite.summarize(blob)
    assert tflite.integer_problems(blob) == [] and summary.float_tensors == ()
    assert "QUANTIZE" not in summary.ops and "DEQUANTIZE" not in summary.ops
    assert summary.input_quantization == (1.0, -128)
    _assert_computes_the_fake_quant_model(blob, qat_model, images)
    # depthwise (k x k and the BNs) and Dense weights: per-channel scales in the .tflite, and
    # the .tflite computes with exactly the fake-quant model's weights
    tensors = TFLiteClassifier(blob).interpreter
    checked = 0
    for wrapper in batch1.layers:
        layer = getattr(wrapper, "layer", None)
        if type(layer).__name__ not in ("DepthwiseConv2D", "Dense"):
            continue
        # the kernel as the fake-quant model computes with it (tfmot keeps no public handle)
        ((kernel, quantizer, quantizer_vars),) = wrapper._weight_vars  # noqa: SLF001
        fake = quantizer(kernel, False, quantizer_vars).numpy()
        expected = fake.reshape(-1, fake.shape[-2] * fake.shape[-1]) if fake.ndim == 4 else fake
        matches = [
            t for t in tensors.get_tensor_details()
            if t["dtype"] == np.int8 and wrapper.name + "/" in t["name"]
            and len(t["quantization_parameters"]["scales"]) > 1
        ]  # fmt: skip
        assert matches, wrapper.name
        tensor = matches[0]
        values = tensors.get_tensor(tensor["index"]).astype("float32")
        scales = tensor["quantization_parameters"]["scales"]
        # truly per channel (tfmot's own quantizers give these layers one shared scale)
        assert len(np.unique(scales)) == len(scales), wrapper.name
        if fake.ndim == 4:  # TFLite depthwise filter (1, k, k, C): channels last
            dequantized = (values * scales).reshape(-1, values.shape[-1])
        else:  # FULLY_CONNECTED (out, in): channels first
            dequantized = (values * scales[:, None]).T
        np.testing.assert_allclose(dequantized, expected, rtol=1e-5, atol=1e-6)
        checked += 1
    # per block: k x k conv + 2 BNs, but the last BN is folded into the head; the stem BN; the head
    assert checked == 2 * 3 - 1 + 1 + 1
    # every bias: the fake-quant model adds exactly the .tflite's int32 bias (finetune snaps them
    # to the input_scale x weight_scale grid; unsnapped they differ by up to half a step)
    snapped = 0
    for wrapper in batch1.layers:
        bias = getattr(getattr(wrapper, "layer", None), "bias", None)
        if bias is None:
            continue
        (tensor,) = [
            t for t in tensors.get_tensor_details()
            if t["dtype"] == np.int32 and f"/{wrapper.name}/BiasAdd" in t["name"]
        ]  # fmt: skip
        dequantized = tensors.get_tensor(tensor["index"]) * tensor["quantization_parameters"][
            "scales"
        ].astype("float64")
        np.testing.assert_allclose(
            bias.numpy(), dequantized, rtol=1e-6, atol=0, err_msg=wrapper.name
        )
        snapped += 1
    # stem conv and BN, per block 2 convs + 2 BNs (the last BN folded into the head), head
    assert snapped == 1 + 1 + 2 * 4 - 1 + 1
    assert max(quantize.snap_biases(qat_model).values()) == 0  # idempotent


def test_depthwise_weights_sit_on_the_converters_per_channel_grid():
    """Each channel of a depthwise kernel is rounded to its own max|w_c| / 127 steps (TFLite's
    per-channel scales); tfmot's per-axis quantizers use one range for the whole kernel."""
    assert quantize.QUANTIZE_POLICY["DepthwiseConv2D"].make().get_config()["grid_axes"] == [0, 1]
    quantizer = quantize.PerChannelGridQuantizer((0, 1))
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, (3, 3, 4, 1)).astype("float32") * [0.01, 0.1, 1.0, 10.0]
    out = quantizer(tf.constant(kernel), training=True, weights={}).numpy()
    scale = np.abs(kernel).max(axis=(0, 1), keepdims=True) / 127
    steps = out / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    np.testing.assert_allclose(out, kernel, atol=0.51 * scale.max(axis=(0, 1, 3)).max())
    np.testing.assert_allclose(np.abs(out).max(axis=(0, 1)), np.abs(kernel).max(axis=(0, 1)))
    # smallest channel keeps its own resolution (a single scale would round it to zero)
    assert np.abs(out[..., 0, :]).max() > 0
    variable = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(quantizer(variable, training=True, weights={}) * 2.0)
    np.testing.assert_array_equal(tape.gradient(loss, variable), np.full_like(kernel, 2.0))


def test_qat_conversion_rejects_batch_norm_mul():
    qat_model = quantize.rebatch_qat_model(quantize.quantize_model(tiny_model()))
    with pytest.raises(ValueError, match="batch_norm='mul'"):
        tflite.convert(qat_model, "qat", calibration_images=pixels(4), batch_norm="mul")


def test_calibration_sets_every_range_before_fine_tuning():
    model = tiny_model()
    images = pixels(24)
    qat_model = quantize.quantize_model(model, calibration_images=images)
    # the float model QAT was built from, probed independently
    float_model = rewrite.batch_norm_as_depthwise(
        rewrite.fold_last_batch_norm(rewrite.fold_preprocessing(model, keras_module="tf_keras"))
    )
    checked = 0
    for wrapper in qat_model.layers:
        variables = {w.name.rsplit("/", 1)[-1]: w.numpy() for w in wrapper.weights}
        if "output_min:0" not in variables:
            continue
        layer = float_model.get_layer(wrapper.layer.name)
        out = tf_keras.Model(float_model.inputs, layer.output)(images).numpy()
        np.testing.assert_allclose(variables["output_min:0"], min(out.min(), 0.0), rtol=1e-5)
        np.testing.assert_allclose(variables["output_max:0"], max(out.max(), 0.0), rtol=1e-5)
        if "kernel_max:0" in variables:  # per-channel symmetric conv weights: +-max|w_c|
            kernel = wrapper.layer.kernel.numpy()
            channel_max = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
            np.testing.assert_allclose(variables["kernel_max:0"], channel_max, rtol=1e-6)
            np.testing.assert_allclose(variables["kernel_min:0"], -channel_max, rtol=1e-6)
        checked += 1
    # stem (conv, act, BN), per block 7 (the last BN folded into the head), pooling and head
    assert checked == 3 + 2 * 7 - 1 + 2
    # so the fake-quant model is already close to the float one before any fine-tuning
    fake_quant, ref = keras_logits(qat_model, images), keras_logits(model, images)
    assert np.abs(fake_quant - ref).max() <= 0.1 * np.abs(ref).max()
    assert (fake_quant.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    with pytest.raises(ValueError, match="Calibration images"):
        quantize.quantize_model(model, calibration_images=np.zeros((0, 16, 16, 3)))


@pytest.mark.slow
@pytest.mark.parametrize(("activation", "kernel_size"), [("relu", 3), ("gelu", 9)])
def test_int8_and_qat_share_the_graph_and_qat_agrees(activation, kernel_size):
    """A ReLU/k3 and a GELU/k9 model through int8 and qat: the same ops and XNNPACK partitions
    (a k9 QAT file is tiled as PTQ: nine 3x3 tiles per conv), and the QAT file computes what
    its fake-quant model computes."""
    from export.benchmark import xnnpack_partitions

    tf_keras.utils.set_random_seed(0)
    images = pixels(48)
    labels = (images.mean(axis=(1, 2, 3)) // 26).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    model = tiny_model(kernel_size=kernel_size, activation=activation)
    qat_model = quantize.quantize_model(model, calibration_images=images[:16])
    quantize.finetune(qat_model, data, steps=3, learning_rate=1e-4)
    blob = tflite.convert(quantize.rebatch_qat_model(qat_model), "qat", calibration_images=images)
    ptq = tflite.convert(model, "int8", calibration_images=images)
    qat_ops, ptq_ops = tflite.summarize(blob).ops, tflite.summarize(ptq).ops
    tiles = 9 if kernel_size > 5 else 1
    # the stem's BN, 2 per block but the last (folded into the head), the k x k conv's tiles
    assert qat_ops == ptq_ops and qat_ops.count("DEPTHWISE_CONV_2D") == 1 + 3 + 2 * tiles
    # one partition with ReLU; the exact int8 GELU is not delegated and splits both alike
    assert xnnpack_partitions(blob) == xnnpack_partitions(ptq)
    assert (xnnpack_partitions(blob) == 1) == (activation == "relu")
    assert tflite.integer_problems(blob) == tflite.integer_problems(ptq) == []
    _assert_computes_the_fake_quant_model(blob, qat_model, images)
