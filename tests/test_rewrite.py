"""Exact rewrites: preprocessing folded into the stem, large depthwise convs tiled."""

import numpy as np
import pytest
from export_helpers import keras_logits, pixels, tiny_model

from export import rewrite, tflite
from export.benchmark import xnnpack_partitions
from export.evaluate import TFLiteClassifier


def test_convmixer_arguments_round_trip():
    model = tiny_model(kernel_size=7, activation="relu")
    args = rewrite.convmixer_arguments(model)
    assert (args["dim"], args["depth"], args["kernel_size"], args["patch_size"]) == (16, 2, 7, 2)
    assert args["activation"] == "relu" and args["num_classes"] == 10
    rebuilt = rewrite.rebuild(model)
    np.testing.assert_array_equal(keras_logits(rebuilt, pixels(4)), keras_logits(model, pixels(4)))


def test_not_a_convmixer_is_a_clear_error():
    import keras

    inputs = keras.Input((16, 16, 3))
    other = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs))
    with pytest.raises(ValueError, match="not a ConvMixer.*stem_conv"):
        rewrite.convmixer_arguments(other)


def test_fold_preprocessing_is_exact():
    model = tiny_model()
    folded = rewrite.fold_preprocessing(model)
    assert "preprocessing" not in [layer.name for layer in folded.layers]
    ref = keras_logits(model, pixels(8))
    np.testing.assert_allclose(keras_logits(folded, pixels(8)), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [7, 9])
@pytest.mark.parametrize("tile", [3, 5])
def test_tiled_depthwise_equals_plain(kernel_size, tile):
    model = tiny_model(kernel_size=kernel_size)
    tiled = rewrite.tile_depthwise(model, tile=tile)
    layer = tiled.get_layer("blocks_0_dwconv")
    assert isinstance(layer, rewrite.TiledDepthwiseConv2D) and layer.tile == tile
    ref = keras_logits(model, pixels(4))
    np.testing.assert_allclose(keras_logits(tiled, pixels(4)), ref, rtol=1e-4, atol=1e-5)


def test_small_kernels_are_not_tiled():
    model = tiny_model(kernel_size=5)
    assert rewrite.tile_depthwise(model, tile=3, max_kernel=5) is model


@pytest.mark.slow
def test_tiled_tflite_matches_keras():
    """The converted, tiled k9 model (PAD + STRIDED_SLICE + 3x3 convs) equals the Keras model."""
    model = tiny_model(kernel_size=9)
    blob = tflite.convert(model, "fp32")  # auto: tiles k > 5 into 3x3
    summary = tflite.summarize(blob)
    # one PAD per block, nine 3x3 convs on constant filters, the whole graph in one XNNPACK node
    assert summary.ops.count("PAD") == 2 and summary.ops.count("DEPTHWISE_CONV_2D") == 2 * 9
    assert summary.ops[0] == "CONV_2D" and xnnpack_partitions(blob) == 1
    out = TFLiteClassifier(blob).predict(pixels(8))
    np.testing.assert_allclose(out, keras_logits(model, pixels(8)), rtol=1e-4, atol=1e-5)
