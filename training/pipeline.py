"""How images get to the model: the training and validation input pipelines of a config.

:func:`make_train_dataset` decodes the training split (:mod:`training.data`), caches it when it
fits, shuffles, crops per image, batches and augments per batch (:mod:`training.augment`), and
repeats; :func:`make_validation_dataset` resizes the validation split as for evaluation. Both
yield float32 pixels in 0..255 (the model normalizes them) and one-hot float32 labels.

Example:
    >>> from training.config import TrainConfig
    >>> from training.pipeline import make_train_dataset
    >>> config = TrainConfig(data_dir="../shared/data/cifar10/train", batch_size=8,
    ...                      limit_per_class=4)
    >>> train_data = make_train_dataset(config)
    >>> images, labels = next(iter(train_data.dataset))
    >>> images.shape, labels.shape  # float32 0..255, one-hot
    (TensorShape([8, 32, 32, 3]), TensorShape([8, 10]))
"""

from __future__ import annotations

import typing

import tensorflow as tf

from training import data
from training.augment import BatchAugmenter, random_resized_crop
from training.config import TrainConfig
from training.data import AUTOTUNE, MAX_SHUFFLE_BUFFER


def _should_cache(ds: tf.data.Dataset, num_examples: int | None, cache: bool | None) -> bool:
    """``cache`` if given; otherwise whether the decoded split fits the memory budget."""
    if cache is not None:
        return cache
    if num_examples is None:
        return False
    first_image, _ = next(iter(ds.take(1)))
    estimate = num_examples * int(tf.size(first_image))
    return estimate <= data.DEFAULT_CACHE_LIMIT_BYTES


class TrainData(typing.NamedTuple):
    """What :func:`make_train_dataset` returns."""

    dataset: tf.data.Dataset  # repeats forever
    class_names: list[str]
    steps_per_epoch: int
    skipped: tuple[str, ...]  # unreadable image files that were skipped


def make_train_dataset(config: TrainConfig) -> TrainData:
    """The augmented, shuffled, repeated training pipeline of ``config``.

    Yields ``(float32 images (B, S, S, 3) in 0..255, float32 one-hot labels (B, C))`` with
    ``B = config.batch_size`` (the global batch; full batches only) and ``S = image_size``.

    Returns:
        A :class:`TrainData`: the dataset repeats forever; ``steps_per_epoch`` is
        ``config.steps_per_epoch`` or one pass over the split (full batches).

    Raises:
        ValueError: the split has fewer images than one batch.
    """
    ds, class_names, num_examples, skipped = data.decoded_dataset(
        data_dir=config.data_dir,
        dataset=config.dataset,
        split=config.train_split,
        tfds_data_dir=config.tfds_data_dir,
        validation_fraction=config.validation_fraction,
        limit_per_class=config.limit_per_class,
        shuffle_files=True,
        seed=config.seed,
        val_dir=config.val_dir,
        val_labels=config.val_labels,
    )
    if _should_cache(ds, num_examples, config.cache):
        ds = ds.cache()
    steps = config.steps_per_epoch
    if steps is None:
        if num_examples is None:
            raise ValueError(
                "The size of the training split is unknown (a TFDS split limited per class): "
                "set `steps_per_epoch`."
            )
        steps = num_examples // config.batch_size
    if steps < 1:
        raise ValueError(
            f"The training split has {num_examples} images, fewer than one batch of "
            f"{config.batch_size}: lower `batch_size`."
        )
    size = (config.image_size, config.image_size)
    num_classes = len(class_names)
    buffer = min(num_examples or MAX_SHUFFLE_BUFFER, MAX_SHUFFLE_BUFFER)
    ds = ds.shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True).repeat()

    def crop(image, label):
        image = random_resized_crop(image, size, config.scale, config.ratio, config.interpolation)
        return image, tf.one_hot(label, num_classes, dtype=tf.float32)

    ds = ds.map(crop, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(config.batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE)
    ds = ds.map(BatchAugmenter(config), num_parallel_calls=AUTOTUNE)
    # Out-of-order maps are faster; the maps read this option (no per-map `deterministic`) so
    # that multi-worker DATA sharding can require order (training.distribute.with_shard_policy).
    options = tf.data.Options()
    options.deterministic = False
    return TrainData(ds.with_options(options).prefetch(AUTOTUNE), class_names, steps, skipped)


def make_validation_dataset(
    config: TrainConfig, num_classes: int | None = None
) -> tuple[tf.data.Dataset, list[str]]:
    """The validation split of ``config``, resized as for evaluation, one-hot labels.

    Batches are ``config.batch_size``; the last one may be smaller. ``num_classes`` (the
    training split's) checks that both splits have the same classes.
    """
    ds, class_names = data.load_dataset(
        data_dir=config.data_dir,
        dataset=config.dataset,
        split=config.val_split,
        image_size=config.image_size,
        batch_size=config.batch_size,
        tfds_data_dir=config.tfds_data_dir,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        limit_per_class=config.limit_per_class,
        crop_pct=config.crop_pct,
        interpolation=config.interpolation,
        cache=config.cache,
        val_dir=config.val_dir,
        val_labels=config.val_labels,
    )
    if num_classes is not None and len(class_names) != num_classes:
        raise ValueError(
            f"The validation split has {len(class_names)} classes, the training split "
            f"{num_classes}."
        )
    depth = len(class_names)
    ds = ds.map(lambda images, labels: (images, tf.one_hot(labels, depth, dtype=tf.float32)))
    return ds, class_names
