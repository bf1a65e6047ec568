"""The paper's training augmentations, as TensorFlow functions and a per-batch augmenter.

:mod:`training.pipeline` applies them in the training input pipeline. Per image (before
batching, images keep their own size until here): random resized crop
(``tf.image.sample_distorted_bounding_box``; Keras 3 has no RandomResizedCrop layer). Per batch,
with Keras 3's own layers, which run inside ``tf.data`` with the TensorFlow backend: horizontal
flip (``RandomFlip``), ``RandAugment``, ``RandomColorJitter``, ``RandomErasing``, then ``MixUp``
or ``CutMix`` (one of the two per batch, each with probability 1/2 when both are on, as timm
switches between them). Labels leave as one-hot float32 so that mixed labels and label
smoothing (in the loss) work the same way.

Keras' RandAugment takes a ``factor`` in [0, 1] and samples each op's strength up to it; a
recipe's magnitude ``m`` out of ``m_max`` (torchvision: 30 bins, timm: 10) becomes
``factor = m / m_max``.

Example:
    >>> import tensorflow as tf
    >>> from training.augment import random_resized_crop
    >>> image = tf.zeros((48, 64, 3), tf.uint8)
    >>> random_resized_crop(image, (32, 32), (0.75, 1.0), (1.0, 1.0), "bilinear").shape
    TensorShape([32, 32, 3])
"""

from __future__ import annotations

import logging

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
    (stateless); without, TensorFlow's stateful sampler draws it.

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
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(tf.shape(image), **sampler)
    else:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), seed=seed, **sampler
        )
    image = tf.ensure_shape(tf.slice(image, begin, crop_size), [None, None, 3])
    image = tf.image.resize(image, size, method=interpolation, antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def rand_augment(
    num_ops: int, magnitude: float, magnitude_max: float, seed: int | None = None
) -> keras.layers.Layer:
    """Keras' RandAugment with torchvision's geometric ranges at ``magnitude / magnitude_max``.

    Keras 3.15 hands its ``factor`` to every sub-layer in that sub-layer's own units, so its
    rotation reaches ``factor`` x 360 degrees and its translation ``factor`` x the size. The
    rotation, translation and shear sub-layers are replaced by ones with torchvision's ranges
    (30 degrees, 150/331 of the size, 0.3 at the top magnitude), scaled by the magnitude. The
    color ops keep Keras' ``factor = magnitude / magnitude_max``.

    Example:
        >>> layer = rand_augment(2, 12, 30)   # the CIFAR-10 recipe: at most 12 degrees
        >>> layer.random_rotation.factor
        (-0.03333333333333333, 0.03333333333333333)
    """
    strength = min(1.0, magnitude / magnitude_max)
    layer = keras.layers.RandAugment(
        value_range=(0, 255),
        num_ops=num_ops,
        factor=strength,
        interpolation="bilinear",
        seed=seed,
    )
    rotation = TORCHVISION_MAX_ROTATION_DEGREES * strength / 360.0
    translation = TORCHVISION_MAX_TRANSLATION * strength
    shear = TORCHVISION_MAX_SHEAR * strength
    replacements = {
        "random_rotation": keras.layers.RandomRotation(
            (-rotation, rotation), interpolation="bilinear", seed=seed
        ),
        "random_translation": keras.layers.RandomTranslation(
            (-translation, translation),
            (-translation, translation),
            interpolation="bilinear",
            seed=seed,
        ),
        "random_shear": keras.layers.RandomShear(
            x_factor=(0.0, shear), y_factor=(0.0, shear), interpolation="bilinear", seed=seed
        ),
    }
    for name, sub_layer in replacements.items():
        if name not in getattr(layer, "_AUGMENT_LAYERS", ()):
            raise RuntimeError(
                f"keras.layers.RandAugment (Keras {keras.__version__}) has no sub-layer "
                f"{name!r}; training.augment.rand_augment needs updating."
            )
        setattr(layer, name, sub_layer)
    return layer


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
        if config.randaugment_ops > 0 and config.randaugment_magnitude > 0:
            self.layers.append(
                rand_augment(
                    config.randaugment_ops,
                    config.randaugment_magnitude,
                    config.randaugment_magnitude_max,
                    seed,
                )
            )
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
