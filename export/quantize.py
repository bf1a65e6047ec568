"""Quantization-aware training (QAT) of ConvMixer with tensorflow-model-optimization (tfmot).

tfmot 0.8 works only with tf_keras (Keras 2), so a Keras 3 ConvMixer is first rebuilt as a tf_keras
model from the same builder (:func:`to_tf_keras`), then annotated layer by layer from one policy
table (:data:`QUANTIZE_POLICY`) and wrapped with fake-quantization (:func:`quantize_model`).

Why custom configs: tfmot's default 8-bit scheme folds a BatchNorm only when it directly follows a
conv and does not support ConvMixer's conv -> activation -> BN order; a naive annotation leaves
float tensors and DEQUANTIZE ops in the .tflite. Here every tensor that TFLite's int8 kernels
produce carries an output quantizer, placed where those kernels put it:

====================== ============================================ ==========================
Keras layer            TFLite int8 ops                              fake quantization
====================== ============================================ ==========================
(input)                graph input (raw pixels 0..255)              fixed range [0, 255]
Normalization          SUB, MUL                                     output
Conv2D                 CONV_2D (+ fused ReLU)                       per-channel weights, output
                                                                    (pre-activation; none when
                                                                    a ReLU is fused into it)
DepthwiseConv2D        DEPTHWISE_CONV_2D (+ fused ReLU)             per-channel weights on the
                                                                    converter's own grid
                                                                    (PerChannelGridQuantizer),
                                                                    output
Activation             GELU / (fused) RELU                          output
BatchNormalization     (rewritten first as a 1x1 DepthwiseConv2D:   as DepthwiseConv2D
                       one DEPTHWISE_CONV_2D, per-channel weights;
                       as MUL + ADD it would get a per-tensor
                       multiplier and an unmodelled intermediate)
Add                    ADD                                          output
GlobalAveragePooling2D MEAN                                         output
Dense                  FULLY_CONNECTED                              per-channel weights (grid),
                                                                    output
====================== ============================================ ==========================

Example:
    >>> import convmixer_tf
    >>> from export import quantize
    >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
    >>> qat_model = quantize.quantize_model(model)  # a tf_keras model with fake-quant wrappers
    >>> qat_model.output_shape
    (None, 10)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_transforms,
)
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
    model_transformer,
)
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
    QuantizeLayer,
)

import convmixer_tf
from export.rewrite import batch_norm_as_depthwise, fold_last_batch_norm, tile_depthwise
from export.rewrite import fold_preprocessing as fold_input_normalization

_quantizers = tfmot.quantization.keras.quantizers
_QuantizeConfig = tfmot.quantization.keras.QuantizeConfig

# XNNPACK's fast depthwise kernels stop at 5x5; larger ones are tiled into 3x3 convs (the
# fastest tiling measured, docs/performance.md). export.tflite uses the same two numbers.
FAST_DEPTHWISE_KERNEL = 5
DEFAULT_DEPTHWISE_TILE = 3

# The raw-pixel input range: with 8 bits, [0, 255] gives scale 1 and maps pixels exactly onto
# the integer grid (uint8 q = pixel; int8 q = pixel - 128).
PIXEL_RANGE = (0.0, 255.0)
# Prefix tfmot gives the wrapped layers ("quant_head" wraps "head").
QAT_PREFIX = "quant_"


def _output_quantizer():
    """The activation quantizer TFLite's int8 kernels match: asymmetric, per-tensor, EMA range."""
    return _quantizers.MovingAverageQuantizer(
        num_bits=8, per_axis=False, symmetric=False, narrow_range=False
    )


class OutputQuantizeConfig(_QuantizeConfig):
    """Quantizes only the layer's output (activations, BN, Add, pooling, Normalization)."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [_output_quantizer()]

    def get_config(self):
        return {}

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()


class PassThroughQuantizeConfig(OutputQuantizeConfig):
    """Quantizes nothing: for layers that compute no new values (Identity, the folded last
    BatchNorm), whose output keeps its input's quantization."""

    def get_output_quantizers(self, layer):
        return []


class PerChannelGridQuantizer(_quantizers.Quantizer):
    """Per-output-channel symmetric int8 fake quantization on the TFLite converter's own grid.

    For a weight whose output channels are the entries left after reducing ``reduce_axes``
    (a depthwise kernel ``(kh, kw, C, 1)``: ``(0, 1)``; a Dense kernel ``(in, out)``: ``(0,)``),
    each channel is rounded to steps of ``max|w_c| / 127`` in [-127, 127] (narrow range), with
    a straight-through gradient. TFLite's int8 DEPTHWISE_CONV_2D and FULLY_CONNECTED take one
    scale per output channel, but tfmot cannot express it for these layers: its per-axis
    quantizers keep one range per LAST axis, i.e. one range for a whole depthwise kernel (last
    axis of size 1; the .tflite then repeats one scale for every channel), and per-axis ranges
    on a Dense kernel stop the converter ("'tfl.transpose' op has mismatched quantized axes").
    This quantizer leaves no range variables: the converter computes each channel's scale from
    the weights it is given, which are already on that grid, so the .tflite computes with
    exactly the fake-quant weights (tested). Per-channel precision matters most for the
    BatchNorms turned into 1x1 depthwise convs, whose multipliers differ by orders of magnitude.
    """

    def __init__(self, reduce_axes: Sequence[int]):
        self.reduce_axes = tuple(int(a) for a in reduce_axes)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        channel_max = tf.reduce_max(tf.abs(inputs), axis=self.reduce_axes, keepdims=True)
        scale = tf.maximum(channel_max, 1e-12) / 127.0
        quantized = tf.clip_by_value(tf.round(inputs / scale), -127.0, 127.0) * scale
        return inputs + tf.stop_gradient(quantized - inputs)

    def get_config(self):
        return {"reduce_axes": list(self.reduce_axes)}

    def __eq__(self, other):
        return type(self) is type(other) and self.reduce_axes == other.reduce_axes


class WeightsQuantizeConfig(OutputQuantizeConfig):
    """Quantizes one weight (the kernel) and, unless a ReLU is fused into the op, the output.

    Args:
        weight_attr: the layer attribute holding the weight (``"kernel"``, ``"depthwise_kernel"``).
        per_axis: per-output-channel weight scales (TFLite's int8 convs) or one scale.
        grid_axes: use :class:`PerChannelGridQuantizer` over these axes (depthwise, Dense).
        quantize_output: False where TFLite fuses the following ReLU into the op, so that no
            quantization point sits between them.
    """

    def __init__(
        self,
        weight_attr: str,
        per_axis: bool,
        quantize_output: bool = True,
        grid_axes: Sequence[int] | None = None,
    ):
        self.weight_attr = weight_attr
        self.per_axis = per_axis
        self.quantize_output = quantize_output
        self.grid_axes = None if grid_axes is None else tuple(int(a) for a in grid_axes)

    def _weight_quantizer(self):
        if self.grid_axes is not None:
            return PerChannelGridQuantizer(self.grid_axes)
        if self.per_axis:
            # Per-channel, symmetric, narrow range [-127, 127]: TFLite's int8 conv weights.
            return tfmot.quantization.keras.quantizers.LastValueQuantizer(
                num_bits=8, per_axis=True, symmetric=True, narrow_range=True
            )
        return _quantizers.LastValueQuantizer(
            num_bits=8, per_axis=False, symmetric=True, narrow_range=True
        )

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, self.weight_attr), self._weight_quantizer())]

    def set_quantize_weights(self, layer, quantize_weights):
        if len(quantize_weights) != 1:
            raise ValueError(
                f"{type(self).__name__} expects 1 quantized weight for layer {layer.name!r}. "
                f"Received: {len(quantize_weights)}"
            )
        setattr(layer, self.weight_attr, quantize_weights[0])

    def get_output_quantizers(self, layer):
        return [_output_quantizer()] if self.quantize_output else []

    def get_config(self):
        return {
            "weight_attr": self.weight_attr,
            "per_axis": self.per_axis,
            "quantize_output": self.quantize_output,
            "grid_axes": None if self.grid_axes is None else list(self.grid_axes),
        }


@dataclasses.dataclass(frozen=True)
class _Policy:
    """How one layer type is quantized: the config class and its arguments."""

    config: type
    weight_attr: str | None = None
    per_axis: bool = False
    grid_axes: tuple[int, ...] | None = None

    def make(self, quantize_output: bool = True) -> _QuantizeConfig:
        if self.config in (OutputQuantizeConfig, PassThroughQuantizeConfig):
            return self.config()
        return self.config(self.weight_attr, self.per_axis, quantize_output, self.grid_axes)


# The whole quantization policy of a ConvMixer: Keras layer class name -> config.
QUANTIZE_POLICY: dict[str, _Policy] = {
    "Normalization": _Policy(OutputQuantizeConfig),
    "Conv2D": _Policy(WeightsQuantizeConfig, "kernel", per_axis=True),
    "DepthwiseConv2D": _Policy(
        WeightsQuantizeConfig, "depthwise_kernel", per_axis=True, grid_axes=(0, 1)
    ),
    "Activation": _Policy(OutputQuantizeConfig),
    # No BatchNormalization: quantize_model turns every BN into a 1x1 DepthwiseConv2D first
    # (as MUL + ADD in the .tflite it would not match its fake quantization).
    "Add": _Policy(OutputQuantizeConfig),
    # The last BatchNorm, folded into the classifier (export.rewrite.fold_last_batch_norm).
    "Identity": _Policy(PassThroughQuantizeConfig),
    # The padding and windows of tiled depthwise convs (export.rewrite.tile_depthwise): TFLite's
    # int8 PAD and STRIDED_SLICE keep their input's quantization.
    "ZeroPadding2D": _Policy(PassThroughQuantizeConfig),
    "Cropping2D": _Policy(PassThroughQuantizeConfig),
    "GlobalAveragePooling2D": _Policy(OutputQuantizeConfig),
    "GlobalMaxPooling2D": _Policy(OutputQuantizeConfig),
    # Per output channel, as the converter quantizes FULLY_CONNECTED weights (TF 2.21).
    "Dense": _Policy(WeightsQuantizeConfig, "kernel", per_axis=True, grid_axes=(0,)),
}

# Activations that TFLite fuses into the preceding conv / dense op.
FUSED_ACTIVATIONS = ("relu",)


def quantize_scope():
    """The custom objects needed to load or clone a QAT model built here."""
    return tfmot.quantization.keras.quantize_scope(
        {
            "OutputQuantizeConfig": OutputQuantizeConfig,
            "PassThroughQuantizeConfig": PassThroughQuantizeConfig,
            "WeightsQuantizeConfig": WeightsQuantizeConfig,
            "PerChannelGridQuantizer": PerChannelGridQuantizer,
        }
    )


_default_8bit = tfmot.quantization.keras.default_8bit


class _InputOnlyLayoutTransform(_default_8bit.Default8BitQuantizeLayoutTransform):
    """Only quantizes the model input; none of the default scheme's layer fusions.

    The default transforms would, for a ReLU model, replace our conv configs with ones that
    drop the weight quantizers; our table already handles fused ReLUs.
    """

    def apply(self, model, layer_quantize_map):
        return model_transformer.ModelTransformer(
            model,
            [default_8bit_transforms.InputLayerQuantize()],
            set(layer_quantize_map.keys()),
            layer_quantize_map,
        ).transform()


class ConvMixerQuantizeScheme(_default_8bit.Default8BitQuantizeScheme):
    """tfmot's 8-bit scheme with only the input-quantization transform (see QUANTIZE_POLICY)."""

    def get_layout_transformer(self):
        return _InputOnlyLayoutTransform()


def to_tf_keras(model, batch_size: int | None = None) -> tf_keras.Model:
    """Rebuilds a (Keras 3) ConvMixer as a tf_keras model with the same weights.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> to_tf_keras(model).count_params() == model.count_params()
        True
    """
    return convmixer_tf.rebuild(model, keras_module="tf_keras", batch_size=batch_size)


def annotate(model: tf_keras.Model) -> tf_keras.Model:
    """Annotates every layer of a tf_keras ConvMixer with its config from QUANTIZE_POLICY.

    Raises a ValueError naming the layer if a layer type has no policy.
    """
    fused = set()
    for layer in model.layers:
        if type(layer).__name__ == "Activation" and layer.get_config()["activation"] in (
            FUSED_ACTIVATIONS
        ):
            for node in layer.inbound_nodes:
                for producer in tf.nest.flatten(node.inbound_layers):
                    if type(producer).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense"):
                        fused.add(producer.name)

    def _annotate(layer):
        kind = type(layer).__name__
        if kind == "InputLayer":
            return layer.__class__.from_config(layer.get_config())
        if kind not in QUANTIZE_POLICY:
            raise ValueError(
                f"Layer {layer.name!r} of type {kind} has no quantization policy; supported "
                f"layer types: {', '.join(QUANTIZE_POLICY)}."
            )
        config = QUANTIZE_POLICY[kind].make(quantize_output=layer.name not in fused)
        clone = layer.__class__.from_config(layer.get_config())
        return tfmot.quantization.keras.quantize_annotate_layer(clone, config)

    annotated = tf_keras.models.clone_model(model, clone_function=_annotate)
    annotated.set_weights(model.get_weights())
    return annotated


def quantize_model(
    model,
    *,
    calibration_images: np.ndarray | None = None,
    batch_size: int | None = None,
    fold_preprocessing: bool = True,
    depthwise_tile: int | None = DEFAULT_DEPTHWISE_TILE,
) -> tf_keras.Model:
    """Returns the fake-quantized tf_keras model (QAT-ready) of a Keras 3 or tf_keras ConvMixer.

    The model is rebuilt as tf_keras (with the input normalization folded into the stem conv by
    default, see :func:`export.rewrite.fold_preprocessing`), its last BatchNorm folded into the
    classifier (:func:`export.rewrite.fold_last_batch_norm`, as for PTQ), its other BatchNorms
    turned into the equal 1x1 depthwise convs (:func:`export.rewrite.batch_norm_as_depthwise`:
    QAT then fine-tunes them as frozen-statistics affines, the usual BN folding of QAT), its
    depthwise convs larger than 5x5 tiled into ``depthwise_tile`` x ``depthwise_tile`` ones
    (:func:`export.rewrite.tile_depthwise`, the graph PTQ converts: each tile and partial sum
    gets its own fake quantization, as the int8 graph computes them; None keeps them whole),
    annotated from
    :data:`QUANTIZE_POLICY`, and its input quantizer set to the raw pixel range [0, 255]
    (:data:`PIXEL_RANGE`).

    ``calibration_images`` (raw pixels from the training data; a few hundred, as for PTQ) set
    every quantizer's range before fine-tuning (:func:`calibrate_ranges`). Without them tfmot
    starts every activation range at [-6, 6] and moves it by 0.1% per step (EMA decay 0.999):
    a model whose activations exceed that is clipped to chance accuracy and a few hundred QAT
    steps do not recover it (docs/export.md has the measurement).

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> qat_model = quantize_model(model)
        >>> qat_model.get_layer("quant_head").name
        'quant_head'
    """
    if fold_preprocessing:
        model = fold_input_normalization(model, keras_module="tf_keras", batch_size=batch_size)
    else:
        model = to_tf_keras(model, batch_size=batch_size)
    model = batch_norm_as_depthwise(fold_last_batch_norm(model))
    if depthwise_tile is not None:
        model = tile_depthwise(model, tile=depthwise_tile, max_kernel=FAST_DEPTHWISE_KERNEL)
    with quantize_scope():
        qat_model = tfmot.quantization.keras.quantize_apply(
            annotate(model), scheme=ConvMixerQuantizeScheme()
        )
    set_input_range(qat_model, *PIXEL_RANGE)
    if calibration_images is not None:
        calibrate_ranges(qat_model, model, calibration_images)
    return qat_model


def calibrate_ranges(
    qat_model: tf_keras.Model, float_model: tf_keras.Model, images: np.ndarray, batch_size=32
) -> dict[str, tuple[float, float]]:
    """Sets the QAT model's quantizer ranges as post-training calibration would.

    Weight quantizers take their ranges from the weights (one training-mode call on one image:
    tfmot's own last-value rule; the call also nudges the output ranges, which are then
    overwritten). Every output quantizer gets the min and max of its layer's output in
    ``float_model`` (the model ``qat_model`` was made from: wrapper ``quant_X`` wraps layer
    ``X``) over ``images``, widened to contain 0, like TFLite's calibrator. Returns the ranges.

    Example:
        >>> # calibrate_ranges(qat_model, float_model, pixels)  -> {"quant_stem_conv": (-3.1, 5.2)}
    """
    images = np.asarray(images, dtype="float32")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"Calibration images must be a non-empty (N, H, W, 3) array. Received shape "
            f"{images.shape}"
        )
    qat_model(images[:1], training=True)
    wrappers = {}
    for wrapper in qat_model.layers:
        mins, maxs = _range_weights(wrapper)
        if hasattr(wrapper, "layer") and mins:  # not the input QuantizeLayer (pinned)
            wrappers[wrapper.layer.name] = (mins[0], maxs[0])
    probe = tf_keras.Model(
        float_model.inputs, [float_model.get_layer(name).output for name in wrappers]
    )

    @tf.function
    def extremes(batch):
        # Reduced inside the graph: each activation is freed after its min/max (a
        # ConvMixer-1024/20 at 224 would otherwise hold 140 x 4 MiB per image at once).
        outputs = tf.nest.flatten(probe(batch, training=False))
        return tf.stack([tf.reduce_min(o) for o in outputs]), tf.stack(
            [tf.reduce_max(o) for o in outputs]
        )

    low = np.zeros(len(wrappers))
    high = np.zeros(len(wrappers))
    for start in range(0, len(images), batch_size):
        batch_low, batch_high = extremes(tf.constant(images[start : start + batch_size]))
        low = np.minimum(low, batch_low.numpy())
        high = np.maximum(high, batch_high.numpy())
    low = dict(zip(wrappers, low.tolist(), strict=True))
    high = dict(zip(wrappers, high.tolist(), strict=True))
    for name, (min_var, max_var) in wrappers.items():
        min_var.assign(low[name])
        max_var.assign(high[name])
    return {QAT_PREFIX + name: (low[name], high[name]) for name in wrappers}


def _range_weights(layer) -> tuple[list, list]:
    """The (min, max) variables of a QAT layer's output quantizer: the input ``QuantizeLayer``'s
    (``*_min`` / ``*_max``) or a wrapper's (``output_min`` / ``output_max``); empty lists for a
    layer without one. A ``QuantizeLayer`` rebuilt from its config holds its range twice (tfmot
    0.8.1), hence lists."""
    if isinstance(layer, QuantizeLayer):
        suffixes = ("_min:0", "_max:0")
    else:
        suffixes = ("/output_min:0", "/output_max:0")
    return tuple([w for w in layer.weights if w.name.endswith(suffix)] for suffix in suffixes)


def input_quantize_layer(qat_model: tf_keras.Model) -> QuantizeLayer:
    """The ``QuantizeLayer`` tfmot inserts after the input; ValueError if there is none.

    Example:
        >>> # input_quantize_layer(quantize_model(model)).name  -> "quantize_layer"
    """
    for layer in getattr(qat_model, "layers", []):
        if isinstance(layer, QuantizeLayer):
            return layer
    raise ValueError(
        f"Model {getattr(qat_model, 'name', qat_model)!r} is not a QAT model of "
        "export.quantize.quantize_model: it has no input QuantizeLayer."
    )


def set_input_range(qat_model: tf_keras.Model, low: float, high: float) -> None:
    """Sets the range of the input quantizer (it only widens from there on pixel data)."""
    mins, maxs = _range_weights(input_quantize_layer(qat_model))
    for weight in mins:
        weight.assign(low)
    for weight in maxs:
        weight.assign(high)


def finetune(
    qat_model: tf_keras.Model,
    dataset: tf.data.Dataset,
    *,
    steps: int,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    verbose: int = 0,
) -> dict:
    """Quantization-aware fine-tuning: ``steps`` optimizer steps of AdamW on ``dataset``.

    ``dataset`` yields ``(images 0..255 float32, int labels)`` batches (as
    ``training.data.load_dataset`` returns); it is repeated as needed. Returns the last loss and
    accuracy.

    Example:
        >>> # finetune(quantize_model(model), train_ds, steps=200, learning_rate=1e-4)
    """
    if steps < 1:
        raise ValueError(f"QAT needs at least one step. Received: steps={steps}")
    if learning_rate <= 0:
        raise ValueError(f"`learning_rate` must be > 0. Received: learning_rate={learning_rate}")
    head = qat_model.get_layer(QAT_PREFIX + "head").layer
    from_logits = head.get_config()["activation"] == "linear"
    qat_model.compile(
        optimizer=tf_keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    history = qat_model.fit(dataset.repeat(), steps_per_epoch=steps, epochs=1, verbose=verbose)
    snap_biases(qat_model)
    return {key: float(values[-1]) for key, values in history.history.items()}


def _output_scale(layer) -> float:
    """The int8 scale TFLite gives the output of a QAT layer: (max - min) / 255 of its output
    quantizer's range, widened to contain 0 as the converter does."""
    mins, maxs = _range_weights(layer)
    if (not mins or not maxs) and isinstance(
        getattr(layer, "quantize_config", None), PassThroughQuantizeConfig
    ):
        # Padding, windows, Identity: the output keeps the input's quantization.
        (inbound,) = tf.nest.flatten(layer.inbound_nodes[0].inbound_layers)
        return _output_scale(inbound)
    if not mins or not maxs:
        raise ValueError(
            f"Layer {layer.name!r} has no output quantizer: its int8 scale is unknown."
        )
    low, high = float(mins[0].numpy()), float(maxs[0].numpy())
    return (max(high, 0.0) - min(low, 0.0)) / 255.0


def _kernel_scales(wrapper) -> np.ndarray:
    """Per-output-channel int8 scales of a wrapped layer's kernel, as the converter derives them."""
    for weight, quantizer, variables in wrapper._weight_vars:  # noqa: SLF001 (tfmot's own list)
        if isinstance(quantizer, PerChannelGridQuantizer):
            # The converter re-derives max|w_c| / 127 from the (on-grid) fake-quant weights.
            return np.max(np.abs(weight.numpy()), axis=quantizer.reduce_axes).ravel() / 127.0
        if "min_var" in variables:
            low = np.asarray(variables["min_var"].numpy(), "float64")
            high = np.asarray(variables["max_var"].numpy(), "float64")
            levels = 2**quantizer.num_bits - (2 if quantizer.narrow_range else 1)
            return np.ravel((high - low) / levels)
    raise ValueError(f"Layer {wrapper.name!r} has no quantized kernel.")


def snap_biases(qat_model: tf_keras.Model) -> dict[str, float]:
    """Puts every bias of a QAT model on the int32 grid the converter quantizes it to.

    TFLite stores a conv/dense bias as int32 in steps of ``input_scale * weight_scale[c]``;
    fake quantization leaves it float. The difference (up to half a step: 0.005 on a
    ConvMixer-256/8 BatchNorm-as-depthwise bias) moves rounding decisions of the next int8
    output, so the .tflite and the fake-quant model drift apart through the blocks. After
    snapping, the fake-quant model adds exactly the bias the .tflite adds. :func:`finetune`
    calls it at the end; call it again after any other training of the QAT model. Idempotent.

    Returns the largest bias change per layer.

    Example:
        >>> # snap_biases(qat_model)  -> {"quant_stem_conv": 7.5e-06, ...}
    """
    changes = {}
    for wrapper in qat_model.layers:
        bias = getattr(getattr(wrapper, "layer", None), "bias", None)
        if bias is None:
            continue
        (inbound,) = tf.nest.flatten(wrapper.inbound_nodes[0].inbound_layers)
        step = _output_scale(inbound) * _kernel_scales(wrapper)
        values = bias.numpy().astype("float64")
        snapped = (np.round(values / step) * step).astype("float32")
        changes[wrapper.name] = float(np.max(np.abs(snapped - values)))
        bias.assign(snapped)
    return changes


def rebatch_qat_model(qat_model: tf_keras.Model, batch_size: int | None = 1) -> tf_keras.Model:
    """The same QAT model (weights and quantizer ranges) with a static input batch size.

    Fine-tune with a free batch dimension, then convert the batch-1 copy.

    Example:
        >>> import convmixer_tf
        >>> model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(16, 16, 3), num_classes=10)
        >>> rebatch_qat_model(quantize_model(model)).input_shape
        (1, 16, 16, 3)
    """
    config = qat_model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            shape = layer["config"]["batch_input_shape"]
            layer["config"]["batch_input_shape"] = (batch_size, *shape[1:])
    with quantize_scope():
        rebatched = tf_keras.Model.from_config(config)
    # Copy per layer: a QuantizeLayer rebuilt from its config holds its min/max twice (tfmot
    # 0.8.1), so its range is copied by name.
    for source, target in zip(qat_model.layers, rebatched.layers, strict=True):
        if isinstance(target, QuantizeLayer):
            (low, *_), (high, *_) = _range_weights(source)
            set_input_range(rebatched, float(low.numpy()), float(high.numpy()))
        else:
            target.set_weights(source.get_weights())
    return rebatched
