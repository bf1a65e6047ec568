"""ImageNet evaluation preprocessing (as timm evaluates the ConvMixer checkpoints) and class names.

timm's evaluation transform for these checkpoints: resize the shorter side to
``floor(size / crop_pct)`` (bicubic, 224 / 0.96 -> 233), then center-crop ``size x size``. The
models normalize their input themselves, so :func:`preprocess_image` returns float pixels in
[0, 255], not normalized tensors.

The class names (``data/imagenet_classes.tsv``: WordNet id and lemmas, in the standard
sorted-WordNet-id order of the 1000 ImageNet-1k classes) are copied from timm 1.0.31
(``timm/data/_info/imagenet_synsets.txt`` and ``imagenet_synset_to_lemma.txt``, Apache-2.0);
the id order is the same as tensorflow_datasets' ``imagenet2012/labels.txt``.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from convmixer_tf import image_files
from convmixer_tf.constants import INTERPOLATIONS

NUM_CLASSES = 1000
# timm's evaluation settings of the ConvMixer ImageNet checkpoints.
CROP_PCT = 0.96
INTERPOLATION = "bicubic"


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet-1k classes as ``(wordnet_id, name)``, in the models' output order.

    Example:
        >>> from convmixer_tf import imagenet
        >>> imagenet.imagenet_classes()[1]
        ('n01443537', 'goldfish, Carassius auratus')
    """
    text = importlib.resources.files("convmixer_tf").joinpath("data/imagenet_classes.tsv")
    rows = tuple(
        tuple(line.split("\t", 1)) for line in text.read_text("utf-8").splitlines() if line
    )
    if len(rows) != NUM_CLASSES:
        raise ValueError(f"{text} lists {len(rows)} classes, expected {NUM_CLASSES}")
    return rows


def decode_predictions(
    predictions, top: int = 5, class_names: Sequence[str] | None = None
) -> list[list[tuple[str, str, float]]]:
    """The ``top`` classes of each row of ``predictions`` as ``(class_id, name, score)``.

    Like ``keras.applications.imagenet_utils.decode_predictions`` but offline, and scores are
    returned as given: the ConvMixer heads give logits; pass ``softmax(logits)`` for
    probabilities.

    Args:
        predictions: array-like of shape ``(batch, num_classes)``.
        top: how many classes per row.
        class_names: names of the classes, in output order. Default: the 1000 ImageNet classes
            (ids are WordNet ids); with other names the id is the class index.

    Example:
        >>> import numpy as np
        >>> from convmixer_tf import imagenet
        >>> scores = np.zeros((1, 1000)); scores[0, 1] = 1.0
        >>> imagenet.decode_predictions(scores, top=1)
        [[('n01443537', 'goldfish, Carassius auratus', 1.0)]]
    """
    predictions = np.asarray(predictions)
    if class_names is None:
        ids, names = zip(*imagenet_classes(), strict=True)
    else:
        names = tuple(class_names)
        ids = tuple(str(i) for i in range(len(names)))
    if predictions.ndim != 2 or predictions.shape[1] != len(names):
        raise ValueError(
            f"`predictions` must have shape (batch, {len(names)}). "
            f"Received: predictions.shape={predictions.shape}"
        )
    if not 1 <= top <= len(names):
        raise ValueError(f"`top` must be in [1, {len(names)}]. Received: top={top}")
    results = []
    for row in predictions:
        order = np.argsort(-row, kind="stable")[:top]
        results.append([(ids[i], names[i], float(row[i])) for i in order])
    return results


def resize_size(image_size: int, crop_pct: float) -> int:
    """The shorter side before the center crop, as timm computes it: ``floor(size / crop_pct)``.

    Example:
        >>> from convmixer_tf import imagenet
        >>> imagenet.resize_size(224, 0.96)
        233
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"`crop_pct` must be in (0, 1]. Received: crop_pct={crop_pct}")
    return math.floor(image_size / crop_pct)


def preprocess_image(
    image,
    input_size: int | Sequence[int] = 224,
    crop_pct: float = CROP_PCT,
    interpolation: str = INTERPOLATION,
) -> tf.Tensor:
    """timm's evaluation transform in TensorFlow: resize, center crop; pixels stay in [0, 255].

    The shorter side is resized to ``floor(size / crop_pct)`` with the longer side truncated as
    torchvision does (``int(new_short * long / short)``), antialiased like PIL, rounded and
    clipped to 0..255 as PIL's uint8 result would be; then the center ``size x size`` crop
    (torchvision's rounding of the offsets). Works inside ``tf.data`` (images of any size).

    Args:
        image: ``(height, width, 3)`` uint8 or float pixels in [0, 255].
        input_size: the model's input size (int or ``(height, width)``, square).
        crop_pct: fraction of the resized image kept by the crop (the preset's ``crop_pct``).
        interpolation: ``"bicubic"`` (ConvMixer checkpoints) or another of
            :data:`convmixer_tf.constants.INTERPOLATIONS`.

    Returns:
        A float32 tensor ``(size, size, 3)`` of pixels in [0, 255], ready for the model.

    Example:
        >>> import numpy as np
        >>> from convmixer_tf import imagenet
        >>> pixels = np.zeros((300, 400, 3), np.uint8)
        >>> imagenet.preprocess_image(pixels, 224, 0.96).shape
        TensorShape([224, 224, 3])
    """
    if not isinstance(input_size, int):
        height, width = input_size
        if height != width:
            raise ValueError(f"Only square input sizes are supported. Received: {input_size}")
        input_size = height
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"`interpolation` must be one of {INTERPOLATIONS}. Received: {interpolation!r}"
        )
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3:
        raise ValueError(f"`image` must be (height, width, channels). Received: {image.shape}")
    short_target = resize_size(input_size, crop_pct)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    long = tf.maximum(height, width)
    # torchvision: new_long = int(new_short * long / short), computed in float, truncated.
    new_long = tf.cast(
        tf.cast(short_target, tf.float64) * tf.cast(long, tf.float64) / tf.cast(short, tf.float64),
        tf.int32,
    )
    new_height = tf.where(height <= width, short_target, new_long)
    new_width = tf.where(height <= width, new_long, short_target)
    resized = tf.image.resize(
        tf.cast(image, tf.float32), (new_height, new_width), method=interpolation, antialias=True
    )
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    # torchvision's CenterCrop: top = int(round((height - size) / 2)).
    top = tf.cast(tf.round(tf.cast(new_height - input_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_width - input_size, tf.float32) / 2.0), tf.int32)
    cropped = resized[top : top + input_size, left : left + input_size, :]
    return tf.ensure_shape(cropped, (input_size, input_size, image.shape[-1]))


def check_image_file(path: str) -> None:
    """Raises a ValueError naming ``path`` if it is missing, a directory, empty, or declares
    more pixels than :func:`convmixer_tf.image_files.max_image_pixels`."""
    if not tf.io.gfile.exists(path):
        raise ValueError(f"Image file not found: {path!r}")
    if tf.io.gfile.isdir(path):
        raise ValueError(f"{path!r} is a directory, not an image file.")
    if tf.io.gfile.stat(path).length == 0:
        raise ValueError(f"Image file {path!r} is empty.")
    with tf.io.gfile.GFile(path, "rb") as f:
        problem = image_files.too_many_pixels(f)
    if problem is not None:
        raise ValueError(f"Image file {path!r} declares {problem}: not decoded.")


def load_image(path: str) -> tf.Tensor:
    """Reads a JPEG / PNG / BMP / GIF file as a ``(height, width, 3)`` uint8 tensor (RGB).

    Raises a ValueError naming the file if it is missing, empty or not a decodable image.

    Example:
        >>> from convmixer_tf import imagenet
        >>> image = imagenet.load_image("photo.jpg")  # doctest: +SKIP
    """
    check_image_file(path)
    data = tf.io.read_file(path)
    try:
        return tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
        # TensorFlow wraps the reason in the op's name ({{function_node ...}} ... [Op:...]).
        message = re.sub(r"\{\{.*?\}\}|\[Op:[^\]]*\]|\bname:\s*$", "", e.message.strip())
        raise ValueError(f"Cannot decode image {path!r}: {' '.join(message.split())}") from None
