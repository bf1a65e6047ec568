"""The paper's training augmentations, as TensorFlow functions and a per-batch augmenter.

:mod:`training.pipeline` applies them in the training input pipeline. Per image (before
batching, images keep their own size until here): random resized crop
(``tf.image.sample_distorted_bounding_box``; Keras 3 has no RandomResizedCrop layer), then
torchvision's RandAugment (:func:`rand_augment_image`: ops drawn per image, stateless). Per
batch, with Keras 3's own layers, which run inside ``tf.data`` with the TensorFlow backend:
horizontal flip (``RandomFlip``, per image), ``RandomColorJitter``, ``RandomErasing``, then
``MixUp`` or ``CutMix`` (one of the two per batch, each with probability 1/2 when both are on,
as timm switches between them). Labels leave as one-hot float32 so that mixed labels and label
smoothing (in the loss) work the same way.

Keras' own ``RandAugment`` layer is not used: it draws the ops once per batch (every image of a
batch gets the same two), computes every op for the whole batch to select two, and hands its
``factor`` to each sub-layer in that sub-layer's units (a rotation of up to 144 degrees at
m12/30). A recipe's magnitude ``m`` out of ``m_max`` (torchvision: 30, timm: 10) is the fraction
of torchvision's top range.

Example:
    >>> import tensorflow as tf
    >>> from training.augment import random_resized_crop
    >>> image = tf.zeros((48, 64, 3), tf.uint8)
    >>> random_resized_crop(image, (32, 32), (0.75, 1.0), (1.0, 1.0), "bilinear").shape
    TensorShape([32, 32, 3])
"""

from __future__ import annotations

import logging
import math

import keras
import tensorflow as tf

from training.config import TrainConfig

logger = logging.getLogger(__name__)

# timm's RandomErasing area range (fraction of the image).
ERASING_SCALE = (0.02, 1.0 / 3.0)
# torchvision's RandAugment ranges at its top magnitude (31 bins: magnitude 30).
TORCHVISION_MAX_ROTATION_DEGREES = 30.0
TORCHVISION_MAX_TRANSLATION = 150.0 / 331.0
TORCHVISION_MAX_SHEAR = 0.3
# Shuffle at most this many decoded images (memory bound for large images).


def random_resized_crop(
    image: tf.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    interpolation: str = "bilinear",
    seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """torchvision's RandomResizedCrop: a random box of ``scale`` x area and ``ratio``, resized.

    Falls back to the whole image when no box fits in 10 attempts. Returns float32 in 0..255.
    With ``seed`` (a shape-(2,) integer tensor) the box is a function of the seed alone
    (stateless); without, TensorFlow's global generator draws one.

    Example:
        >>> random_resized_crop(tf.zeros([40, 50, 3], tf.uint8), (32, 32)).shape
        TensorShape([32, 32, 3])
    """
    sampler = dict(
        bounding_boxes=tf.zeros([1, 0, 4]),
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    if seed is None:
        # The stateful sampler refuses seed 0 once op determinism is on (as training.train
        # turns it on for seeded runs): draw a seed for the stateless one instead.
        seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), seed=seed, **sampler
    )
    image = tf.ensure_shape(tf.slice(image, begin, crop_size), [None, None, 3])
    image = tf.image.resize(image, size, method=interpolation, antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def random_translate(image: tf.Tensor, pixels: int, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Shifts ``image`` by up to ``pixels`` in each direction, filling by reflection.

    The image is reflect-padded by ``pixels`` on every side and a window of its own size is
    cut at a uniformly drawn offset (the fast CIFAR trainers' "flip + n-pixel translate").
    With ``seed`` (a shape-(2,) integer tensor) the offset is a function of the seed alone.

    Example:
        >>> random_translate(tf.zeros([32, 32, 3]), 2).shape
        TensorShape([32, 32, 3])
    """
    if pixels <= 0:
        return image
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    padded = tf.pad(image, [[pixels, pixels], [pixels, pixels], [0, 0]], mode="REFLECT")
    if seed is None:
        offset = tf.random.uniform([2], 0, 2 * pixels + 1, dtype=tf.int32)
    else:
        offset = tf.random.stateless_uniform([2], seed, 0, 2 * pixels + 1, dtype=tf.int32)
    return tf.slice(padded, [offset[0], offset[1], 0], [height, width, -1])


# torchvision.transforms.RandAugment's operations, in its order (Identity first).
RANDAUGMENT_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
# Its ranges at the top magnitude (bin 30 of 31); the bin m gives range * m / 30, with a random
# sign for the signed ones (all but Posterize and Solarize).
TORCHVISION_MAX_COLOR = 0.9  # Brightness, Color, Contrast, Sharpness: factor 1 +- 0.9


def _affine(image: tf.Tensor, transform: list) -> tf.Tensor:
    """Nearest-neighbour projective transform (output -> input coordinates), zeros outside."""
    size = tf.shape(image)[:2]
    transform = tf.cast(tf.stack([*transform, 0.0, 0.0]), tf.float32)[None]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=size, fill_value=0.0,
        interpolation="NEAREST", fill_mode="CONSTANT",
    )[0]  # fmt: skip


def _blend(image: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 255.0)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    # torchvision's rgb_to_grayscale, truncated to 8 bits as it does for uint8 images.
    return tf.floor(tf.reduce_sum(image * [0.2989, 0.587, 0.114], -1, keepdims=True))


def _sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    # torchvision: a 3x3 [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 smoothing, borders unchanged.
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones(tf.shape(image)[:2] - 2), [[1, 1], [1, 1]])[..., None]
    return _blend(image, interior * smooth + (1.0 - interior) * image, factor)


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
    low = tf.reduce_min(image, [0, 1], keepdims=True)
    high = tf.reduce_max(image, [0, 1], keepdims=True)
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1e-6), 1.0)
    return tf.clip_by_value((image - tf.where(high > low, low, 0.0)) * scale, 0.0, 255.0)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    # torchvision's _equalize_single_image (PIL's ImageOps.equalize).
    pixels = tf.cast(tf.reshape(channel, [-1]), tf.int32)
    histogram = tf.math.bincount(pixels, minlength=256, maxlength=256)
    last = tf.gather(histogram, tf.reduce_max(tf.where(histogram > 0)[:, 0]))
    step = (tf.reduce_sum(histogram) - last) // 255
    lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    equalized = tf.cast(tf.gather(lut, pixels), tf.float32)
    return tf.where(step > 0, tf.reshape(equalized, tf.shape(channel)), channel)


def _equalize(image: tf.Tensor) -> tf.Tensor:
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def rand_augment_op(image: tf.Tensor, op, sign, strength: float) -> tf.Tensor:
    """Operation number ``op`` of :data:`RANDAUGMENT_OPS` at ``strength`` (the fraction of
    torchvision's top range) and ``sign`` (+-1), as torchvision's ``_apply_op`` computes it on an
    8-bit image: nearest-neighbour geometry filled with black, color factors ``1 + sign * 0.9 *
    strength``. ``image``: float32 (H, W, 3) holding integers in 0..255; ``op`` may be a tensor."""
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    sign = tf.cast(sign, tf.float32)
    shear = sign * TORCHVISION_MAX_SHEAR * strength
    # torchvision: int() of the shift in pixels, and a shear of atan(magnitude) degrees, which
    # is a shear factor of the magnitude itself.
    shift_x = sign * tf.floor(TORCHVISION_MAX_TRANSLATION * strength * width)
    shift_y = sign * tf.floor(TORCHVISION_MAX_TRANSLATION * strength * height)
    angle = sign * math.radians(TORCHVISION_MAX_ROTATION_DEGREES * strength)
    factor = 1.0 + sign * TORCHVISION_MAX_COLOR * strength
    bits = 8 - int(round(4 * strength))
    threshold = 255.0 * (1.0 - strength)
    # torchvision rotates counter-clockwise about the image's center: the output pixel at p
    # reads the input at R(angle) (p - center) + center, in image coordinates (y down).
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    rotation = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
    operations = {
        "Identity": lambda: image,
        # torchvision shears about the top-left corner of the first pixel: x + shear (y + 1/2)
        "ShearX": lambda: _affine(image, [1.0, shear, shear / 2, 0.0, 1.0, 0.0]),
        "ShearY": lambda: _affine(image, [1.0, 0.0, 0.0, shear, 1.0, shear / 2]),
        "TranslateX": lambda: _affine(image, [1.0, 0.0, -shift_x, 0.0, 1.0, 0.0]),
        "TranslateY": lambda: _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, -shift_y]),
        "Rotate": lambda: _affine(image, rotation),
        "Brightness": lambda: _blend(image, 0.0, factor),
        "Color": lambda: _blend(image, _grayscale(image), factor),
        "Contrast": lambda: _blend(image, tf.reduce_mean(_grayscale(image)), factor),
        "Sharpness": lambda: _sharpness(image, factor),
        "Posterize": lambda: tf.cast(
            tf.bitwise.bitwise_and(tf.cast(image, tf.uint8), (0xFF << (8 - bits)) & 0xFF),
            tf.float32,
        ),
        "Solarize": lambda: tf.where(image >= threshold, 255.0 - image, image),
        "AutoContrast": lambda: _autocontrast(image),
        "Equalize": lambda: _equalize(image),
    }
    branches = [operations[name] for name in RANDAUGMENT_OPS]
    out = tf.switch_case(tf.cast(op, tf.int32), branches)
    return tf.floor(tf.ensure_shape(out, [None, None, 3]))


def rand_augment_image(
    image: tf.Tensor, num_ops: int, magnitude: float, magnitude_max: float, seed: tf.Tensor
) -> tf.Tensor:
    """torchvision's ``RandAugment(num_ops, magnitude)`` on one image, as a function of ``seed``.

    Per image, ``num_ops`` operations drawn uniformly from :data:`RANDAUGMENT_OPS` (Identity
    included), each at the fixed strength ``magnitude / magnitude_max`` of torchvision's top
    range (shear 0.3, translation 150/331 of the size, rotation 30 degrees, color factors
    1 +- 0.9, posterize to 4 bits, solarize at 0) with a random sign
    (:func:`rand_augment_op`), on the image rounded to 8 bits as torchvision sees it. The CIFAR
    recipe's m12 of 30: shear 0.12, translation 5 px at 32 px, rotation 12 degrees, factors
    1 +- 0.36, 6 bits, solarize from 153. ``image``: float32 (H, W, 3) in 0..255; ``seed``: a
    shape-(2,) integer tensor (stateless: the result is a function of it).

    Example:
        >>> image = tf.random.stateless_uniform((32, 32, 3), (0, 0), maxval=255.0)
        >>> out = rand_augment_image(image, 2, 12, 30, tf.constant([1, 2]))
        >>> out.shape, out.dtype
        (TensorShape([32, 32, 3]), tf.float32)
    """
    strength = min(1.0, magnitude / magnitude_max)
    image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
    draws = tf.random.stateless_uniform([num_ops, 2], seed=seed)
    for i in range(num_ops):
        op = tf.minimum(
            tf.cast(draws[i, 0] * len(RANDAUGMENT_OPS), tf.int32), len(RANDAUGMENT_OPS) - 1
        )
        sign = tf.where(draws[i, 1] < 0.5, -1.0, 1.0)
        image = rand_augment_op(image, op, sign, strength)
    return image


class StepSeeds(keras.random.SeedGenerator):
    """A SeedGenerator whose draws are a function of a seed tensor bound per call.

    Keras' augmentation layers draw from their ``SeedGenerator``, whose state advances with
    every draw: an iterator's history decides a batch's augmentation. Bound to a batch's seed
    (``bind``), this generator hands the i-th draw of the traced function the seed
    ``(seed[0], seed[1] * 1024 + i)``: the augmentation of a batch depends on its seed alone,
    in parallel ``tf.data`` maps too.
    """

    def __init__(self):
        super().__init__(seed=0)
        self._seed = None
        self._draws = 0

    def bind(self, seed: tf.Tensor | None) -> None:
        """Draws from ``seed`` from now on (None: the stateful generator again)."""
        self._seed = None if seed is None else tf.cast(seed, tf.int64)
        self._draws = 0

    def next(self, ordered: bool = True):
        if self._seed is None:
            return super().next(ordered=ordered)
        self._draws += 1
        return tf.stack([self._seed[0], self._seed[1] * 1024 + self._draws])


def _generator_owners(layer):
    """(object, attribute) of every SeedGenerator in ``layer`` and its sub-layers."""
    seen, stack, found = set(), [layer], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, value in vars(obj).items():
            if isinstance(value, keras.random.SeedGenerator):
                found.append((obj, name))
            elif isinstance(value, keras.layers.Layer):
                stack.append(value)
    return found


class BatchAugmenter:
    """The per-batch Keras augmentation layers of a config, built once, applied in ``tf.data``.

    Call it on ``(images float32 (B, H, W, 3) in 0..255, one-hot labels (B, C))``, with
    ``seed`` (a shape-(2,) integer tensor) for an augmentation that is a function of the seed
    (:class:`StepSeeds`: what the training pipeline does, for exact resume).

    Example:
        >>> augment = BatchAugmenter(TrainConfig(mixup_alpha=0.2))
        >>> images, labels = augment(tf.zeros([4, 32, 32, 3]), tf.one_hot([0, 1, 2, 3], 10))
    """

    def __init__(self, config: TrainConfig) -> None:
        seed = config.seed
        self.layers: list[keras.layers.Layer] = []
        if config.hflip:
            self.layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
        if config.color_jitter > 0:
            jitter = config.color_jitter
            self.layers.append(
                keras.layers.RandomColorJitter(
                    value_range=(0, 255),
                    brightness_factor=jitter,
                    contrast_factor=jitter,
                    saturation_factor=(max(0.0, 0.5 - jitter / 2), min(1.0, 0.5 + jitter / 2)),
                    seed=seed,
                )
            )
        if config.random_erasing > 0:
            self.layers.append(
                keras.layers.RandomErasing(
                    # A pair fixes the probability; one float would draw it from [0, p] per image.
                    factor=(config.random_erasing, config.random_erasing),
                    scale=ERASING_SCALE,
                    value_range=(0, 255),
                    seed=seed,
                )
            )
        self.mixup = (
            keras.layers.MixUp(config.mixup_alpha, seed=seed) if config.mixup_alpha else None
        )
        self.cutmix = (
            # A pair fixes Beta(alpha, alpha); one float would draw alpha from [0, alpha].
            keras.layers.CutMix((config.cutmix_alpha, config.cutmix_alpha), seed=seed)
            if config.cutmix_alpha
            else None
        )

        self.seeds = StepSeeds()
        for layer in [*self.layers, self.mixup, self.cutmix]:
            for owner, name in _generator_owners(layer) if layer is not None else ():
                object.__setattr__(owner, name, self.seeds)

    def __call__(
        self, images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        self.seeds.bind(seed)
        for layer in self.layers:
            images = layer(images, training=True)
        images = tf.clip_by_value(images, 0.0, 255.0)
        if self.mixup is None and self.cutmix is None:
            return images, labels
        batch = {"images": images, "labels": labels}
        if self.mixup is not None and self.cutmix is not None:
            coin = (
                tf.random.uniform([])
                if seed is None
                else tf.random.stateless_uniform([], seed=self.seeds.next())
            )
            out = tf.cond(
                coin < 0.5,
                lambda: self.mixup(batch, training=True),
                lambda: self.cutmix(batch, training=True),
            )
        else:
            out = (self.mixup or self.cutmix)(batch, training=True)
        return out["images"], tf.cast(out["labels"], tf.float32)
