"""How images get to the model: the training and validation input pipelines of a config.

:func:`make_train_dataset` decodes the training split (:mod:`training.data`), caches it when it
fits, shuffles, crops and RandAugments per image, batches and augments per batch
(:mod:`training.augment`), and repeats; :func:`make_validation_dataset` resizes the validation
split as for evaluation. Both yield float32 pixels in 0..255 (the model normalizes them) and
one-hot float32 labels.

Example:
    >>> from training.config import TrainConfig
    >>> from training.pipeline import make_train_dataset
    >>> config = TrainConfig(data_dir="tests/fixtures/cifar10", batch_size=8,
    ...                      limit_per_class=4)
    >>> train_data = make_train_dataset(config)
    >>> images, labels = next(iter(train_data.dataset))
    >>> images.shape, labels.shape  # float32 0..255, one-hot
    (TensorShape([8, 32, 32, 3]), TensorShape([8, 10]))
"""

from __future__ import annotations

import logging
import typing

import numpy as np
import tensorflow as tf

from training import data
from training.augment import (
    BatchAugmenter,
    rand_augment_image,
    random_resized_crop,
    random_translate,
)
from training.config import TrainConfig
from training.data import AUTOTUNE, MAX_SHUFFLE_BUFFER

logger = logging.getLogger(__name__)


# In-memory training sources are embedded in the input graph: keep them well below protobuf's
# 2 GiB graph limit. Larger image folders are decoded from their files every epoch.
MAX_IN_MEMORY_BYTES = 1 << 30


class TrainData(typing.NamedTuple):
    """What :func:`make_train_dataset` returns."""

    dataset: tf.data.Dataset  # repeats forever
    class_names: list[str]
    steps_per_epoch: int
    skipped: tuple[str, ...]  # unreadable image files that were skipped
    source: IndexedSource | None = None  # reuse it for the same split from another step


class IndexedSource(typing.NamedTuple):
    """Random access to the training examples: ``load(index) -> (uint8 image, int32 label)``."""

    load: typing.Callable
    num_examples: int
    class_names: list[str]
    skipped: tuple[str, ...]


def _materialize(ds: tf.data.Dataset, num_examples: int | None, cache: bool | None):
    """``(images (N, H, W, 3) uint8, labels (N,))`` in memory, or None when caching is off, the
    decoded split does not fit :data:`MAX_IN_MEMORY_BYTES`, or its images differ in size."""
    if cache is False or num_examples is None:
        return None
    first, _ = next(iter(ds.take(1)))
    budget = min(MAX_IN_MEMORY_BYTES, data.DEFAULT_CACHE_LIMIT_BYTES)
    if num_examples * int(tf.size(first)) > budget:
        return None
    shape = tuple(first.shape)
    images, labels = [], []
    for image, label in ds.as_numpy_iterator():
        if image.shape != shape:
            logger.info(
                "Images of different sizes (%s, %s): decoding from files", shape, image.shape
            )
            return None
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, np.int32)


def indexed_source(config: TrainConfig) -> IndexedSource | None:
    """The training split of ``config`` with random access by example index, or None for a
    TFDS split too large to hold in memory (no random access to it)."""
    common = dict(
        split=config.train_split, validation_fraction=config.validation_fraction,
        limit_per_class=config.limit_per_class,
    )  # fmt: skip
    if config.data_dir is not None:
        folder = data.image_folder_split(
            config.data_dir, val_dir=config.val_dir, val_labels=config.val_labels, **common
        )
        paths = tf.constant(folder.paths)
        labels = tf.constant(np.asarray(folder.labels, np.int32))
        decoded = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
            lambda path, label: (data.decode_image_file(path), label),
            num_parallel_calls=AUTOTUNE, deterministic=True,
        ).ignore_errors(log_warning=True)  # fmt: skip
        in_memory = _materialize(decoded, len(folder.paths), config.cache)
        if in_memory is None:

            def load(index):
                return data.decode_image_file(tf.gather(paths, index)), tf.gather(labels, index)

            return IndexedSource(load, len(folder.paths), list(folder.class_names), folder.skipped)
        return _in_memory_source(*in_memory, list(folder.class_names), folder.skipped)
    decoded = data.decoded_dataset(
        dataset=config.dataset, tfds_data_dir=config.tfds_data_dir, seed=config.seed, **common
    )
    in_memory = _materialize(decoded.dataset, decoded.num_examples, config.cache)
    if in_memory is None:
        return None
    return _in_memory_source(*in_memory, decoded.class_names, ())


def _in_memory_source(images, labels, class_names, skipped) -> IndexedSource:
    images, labels = tf.constant(images), tf.constant(labels)

    def load(index):
        return tf.gather(images, index), tf.gather(labels, index)

    return IndexedSource(load, int(images.shape[0]), class_names, tuple(skipped))


def epoch_order(seed: int, epoch: tf.Tensor, num_examples: int, length: int) -> tf.Tensor:
    """The example indices of ``epoch``: ``length`` indices from seeded permutations of the
    split (one permutation per pass when an epoch is longer than the split). A function of
    (seed, epoch) alone: a resumed run reads the same order."""
    passes = -(-length // num_examples)
    orders = [
        tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64),
            seed=tf.stack([tf.constant(seed, tf.int64), epoch * 1024 + k]),
        )
        for k in range(passes)
    ]
    return tf.concat(orders, 0)[:length]


def make_train_dataset(
    config: TrainConfig, start_step: int = 0, source: IndexedSource | None = None
) -> TrainData:
    """The augmented, shuffled, repeated training pipeline of ``config``, from ``start_step``.

    Yields ``(float32 images (B, S, S, 3) in 0..255, float32 one-hot labels (B, C))`` with
    ``B = config.batch_size`` (the global batch; full batches only) and ``S = image_size``.

    The stream is a function of the seed and the global step, not of an iterator's state: epoch
    ``e`` reads the examples in the order :func:`epoch_order` gives for ``(seed, e)``; example
    ``p`` of the whole stream is cropped with the seed ``(seed, p)`` and batch ``g`` augmented
    with ``(seed, g)`` (stateless random ops). ``start_step`` skips the first ``start_step``
    batches as example indices, before anything is decoded: a run resumed at step ``g`` reads
    exactly what an uninterrupted run reads from step ``g`` on.

    Returns:
        A :class:`TrainData`: the dataset repeats forever; ``steps_per_epoch`` is
        ``config.steps_per_epoch`` or one pass over the split (full batches).

    ``source`` (an earlier result's) saves reading the split again.

    Raises:
        ValueError: the split has fewer images than one batch.
    """
    source = source or indexed_source(config)
    if source is None:
        return _streaming_train_dataset(config)
    batch = config.batch_size
    steps = _steps_per_epoch(config, source.num_examples)
    epoch_length = steps * batch
    first_epoch, skip = divmod(start_step, steps)

    def epoch_indices(epoch):
        return tf.data.Dataset.from_tensor_slices(
            epoch_order(config.seed, epoch, source.num_examples, epoch_length)
        )

    ds = tf.data.Dataset.range(first_epoch, 1 << 31).flat_map(epoch_indices)
    ds = ds.enumerate(start=first_epoch * epoch_length).skip(skip * batch)
    # A file that fails to decode despite its signature check is skipped (TensorFlow logs it):
    # the same position fails in every run, so the stream stays a function of (seed, step).
    ds = ds.map(
        lambda position, index: (position, *source.load(index)), num_parallel_calls=AUTOTUNE
    ).ignore_errors(log_warning=True)
    dataset = _crop_batch_augment(ds, config, len(source.class_names))
    return TrainData(dataset, source.class_names, steps, source.skipped, source=source)


def _crop_batch_augment(ds: tf.data.Dataset, config: TrainConfig, num_classes: int):
    """``(position, uint8 image, label)`` elements -> augmented training batches: example ``p``
    cropped with the stateless seed ``(seed, p)``, translated with ``(seed + 3, p)`` and
    RandAugmented with ``(seed + 2, p)``,
    batch ``g`` augmented with ``(seed + 1, g)``."""
    seed, batch = config.seed, config.batch_size
    size = (config.image_size, config.image_size)

    def crop(position, image, label):
        crop_seed = tf.stack([tf.constant(seed, tf.int64), position])
        image = random_resized_crop(
            image, size, config.scale, config.ratio, config.interpolation, seed=crop_seed
        )
        if config.translate > 0:
            translate_seed = tf.stack([tf.constant(seed + 3, tf.int64), position])
            image = random_translate(image, config.translate, seed=translate_seed)
        if config.randaugment_ops > 0 and config.randaugment_magnitude > 0:
            image = rand_augment_image(
                image,
                config.randaugment_ops,
                config.randaugment_magnitude,
                config.randaugment_magnitude_max,
                seed=tf.stack([tf.constant(seed + 2, tf.int64), position]),
            )
        return image, tf.one_hot(label, num_classes, dtype=tf.float32), position

    ds = ds.map(crop, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True, num_parallel_calls=AUTOTUNE)
    augment = BatchAugmenter(config)

    def augment_batch(images, labels, positions):
        step_seed = tf.stack([tf.constant(seed + 1, tf.int64), positions[0] // batch])
        return augment(images, labels, seed=step_seed)

    return ds.map(augment_batch, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def _steps_per_epoch(config: TrainConfig, num_examples: int | None) -> int:
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
    return steps


def _streaming_train_dataset(config: TrainConfig) -> TrainData:
    """A TFDS split too large for memory: streamed through a shuffle buffer. Its order depends
    on the iterator's state, so a resumed run reads other batches than an uninterrupted one."""
    logger.warning(
        "%s is streamed through a shuffle buffer: a resumed run continues at the right step but "
        "not with the same images. Exact resume needs an image folder (--data-dir).",
        config.dataset,
    )
    ds, class_names, num_examples, skipped = data.decoded_dataset(
        dataset=config.dataset, split=config.train_split, tfds_data_dir=config.tfds_data_dir,
        limit_per_class=config.limit_per_class, shuffle_files=True, seed=config.seed,
    )  # fmt: skip
    steps = _steps_per_epoch(config, num_examples)
    buffer = min(num_examples or MAX_SHUFFLE_BUFFER, MAX_SHUFFLE_BUFFER)
    ds = ds.shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().map(lambda position, element: (position, *element))
    dataset = _crop_batch_augment(ds, config, len(class_names))
    return TrainData(dataset, class_names, steps, skipped)


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
