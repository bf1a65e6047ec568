"""A TensorFlow SavedModel of a ConvMixer for serving (TF Serving, Vertex AI,
``tf.saved_model.load``), with two signatures:

- ``serving_default``: ``pixels``, a batch of raw uint8 RGB images ``(N, H, W, 3)`` at the model's
  input size (any height and width for a model without a fixed one);
- ``image_bytes``: ``image_bytes``, a batch of encoded JPEG / PNG / BMP / GIF files ``(N,)``,
  decoded and preprocessed as :mod:`convmixer_tf.predict` does (shorter side to
  ``size / crop_pct``, center crop, :func:`convmixer_tf.imagenet.preprocess_image`).

Both return ``logits`` ``(N, C)``, ``probabilities`` (softmax), ``top_k_indices`` ``(N, k)`` and
``top_k_names`` ``(N, k)``, ``k = min(5, C)``. The file holds TensorFlow graphs only: it loads
without this project. A file that is not a decodable image fails that request with
``INVALID_ARGUMENT`` and a message naming the problem; the server goes on.

Example:
    >>> import tensorflow as tf, convmixer_tf, tempfile, os
    >>> from export import saved_model
    >>> model = convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(8, 8, 3), num_classes=3)
    >>> path = os.path.join(tempfile.mkdtemp(), "served")
    >>> _ = saved_model.write(model, path, class_names=["a", "b", "c"])
    >>> served = tf.saved_model.load(path).signatures["serving_default"]
    >>> sorted(served(pixels=tf.zeros((2, 8, 8, 3), tf.uint8)))
    ['logits', 'probabilities', 'top_k_indices', 'top_k_names']
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import tensorflow as tf

import convmixer_tf
from convmixer_tf import files, imagenet

SIGNATURE_PIXELS = "serving_default"
SIGNATURE_BYTES = "image_bytes"
TOP_K = 5


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet's names for 1000 classes, else ``class_0``, ``class_1``, ..."""
    if num_classes == imagenet.NUM_CLASSES:
        return [name for _, name in imagenet.imagenet_classes()]
    return [f"class_{i}" for i in range(num_classes)]


class ServingModule(tf.Module):
    """The model and its two serving functions (see the module docstring)."""

    def __init__(
        self,
        model,
        class_names: Sequence[str],
        image_size: int | None,
        crop_pct: float,
        interpolation: str,
    ):
        super().__init__(name="convmixer_serving")
        self.model = model
        self.class_names = tf.constant(list(class_names))
        self.top_k = min(TOP_K, len(class_names))
        self.image_size = image_size
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        height, width = model.input_shape[1:3]
        self.serve_pixels = tf.function(
            self._serve_pixels,
            input_signature=[tf.TensorSpec((None, height, width, 3), tf.uint8, name="pixels")],
        )
        self.serve_image_bytes = tf.function(
            self._serve_image_bytes,
            input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes")],
        )

    def _outputs(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = tf.cast(self.model(tf.cast(pixels, tf.float32), training=False), tf.float32)
        top = tf.math.top_k(logits, k=self.top_k)
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "top_k_indices": top.indices,
            "top_k_names": tf.gather(self.class_names, top.indices),
        }

    def _serve_pixels(self, pixels):
        return self._outputs(pixels)

    def _decode(self, encoded):
        tf.debugging.assert_greater(
            tf.strings.length(encoded), 0, message="image_bytes: an image is empty (0 bytes)"
        )
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image.set_shape((None, None, 3))
        return imagenet.preprocess_image(image, self.image_size, self.crop_pct, self.interpolation)

    def _serve_image_bytes(self, image_bytes):
        size = self.image_size
        pixels = tf.map_fn(
            self._decode,
            image_bytes,
            fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32),
        )
        return self._outputs(pixels)


def write(
    model,
    output: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    input_size: int | None = None,
    crop_pct: float = imagenet.CROP_PCT,
    interpolation: str = imagenet.INTERPOLATION,
) -> dict:
    """Writes ``model``'s serving SavedModel to the folder ``output`` (atomically); returns a
    report ``{"output", "signatures", "bytes", "top_k", "image_size"}``.

    Args:
        model: a Keras 3 or tf_keras ConvMixer (its stock-layer copy is saved).
        output: the SavedModel folder. An existing SavedModel there is replaced; any other
            existing folder is an error.
        class_names: the classes' names (default: ImageNet's for 1000 classes, else
            ``class_i``).
        input_size: the square size the ``image_bytes`` signature resizes to; default the
            model's (needed for a model without a fixed input size).
        crop_pct, interpolation: the evaluation transform of ``image_bytes`` (the variant's:
            :data:`convmixer_tf.PRESETS`; a training run's ``config.json``).
    """
    from convmixer_tf import saving

    output = os.fspath(output)
    check_output(output)
    model = saving.stock_model(model)
    num_classes = int(model.output_shape[-1])
    class_names = list(class_names) if class_names is not None else None
    if class_names is None:
        class_names = default_class_names(num_classes)
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} outputs.")
    height, width = convmixer_tf.model_arguments(model)["input_shape"][:2]
    if input_size is None:
        if height is None or height != width:
            raise ValueError(
                f"The model's input shape {model.input_shape} has no fixed square size: give "
                "the image size of the image_bytes signature (--input-size)."
            )
        input_size = int(height)
    module = ServingModule(model, class_names, input_size, crop_pct, interpolation)
    signatures = {
        SIGNATURE_PIXELS: module.serve_pixels.get_concrete_function(),
        SIGNATURE_BYTES: module.serve_image_bytes.get_concrete_function(),
    }
    with files.replacing(output, folder=True) as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
    size = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(output)
        for name in names
    )
    return {
        "output": output,
        "format": "saved_model",
        "signatures": sorted(signatures),
        "bytes": size,
        "top_k": module.top_k,
        "image_size": input_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
    }


def check_output(output: str) -> None:
    """The SavedModel folder may be new, empty or an earlier SavedModel, nothing else."""
    if os.path.isfile(output):
        raise ValueError(f"Output {output!r} is a file; a SavedModel is a folder.")
    if os.path.isdir(output) and os.listdir(output):
        if not os.path.exists(os.path.join(output, "saved_model.pb")):
            raise ValueError(
                f"Output folder {output!r} exists and is not a SavedModel: not replacing it."
            )
    files.check_output_dir(os.path.dirname(os.path.abspath(output)))
