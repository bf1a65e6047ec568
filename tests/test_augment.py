"""Tests of training/augment.py: random resized crop, Keras batch augmentations, the pipeline."""

import numpy as np
import pytest
import tensorflow as tf

from training import augment
from training.config import TrainConfig

OFF = dict(hflip=False, randaugment_ops=0, color_jitter=0.0, random_erasing=0.0)


def test_random_resized_crop_shape_range_and_full_box():
    image = tf.cast(tf.reshape(tf.range(24 * 30 * 3) % 256, (24, 30, 3)), tf.uint8)
    out = augment.random_resized_crop(image, (16, 16), scale=(0.08, 1.0))
    assert out.shape == (16, 16, 3) and out.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.0
    # scale (1, 1) and the image's own aspect ratio: the crop is the whole image.
    square = image[:, :24]
    whole = augment.random_resized_crop(square, (24, 24), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(whole.numpy(), square.numpy().astype(np.float32), atol=1e-3)


def test_random_resized_crop_varies():
    image = tf.cast(tf.random.stateless_uniform((32, 32, 3), (1, 2), maxval=255), tf.uint8)
    crops = [augment.random_resized_crop(image, (8, 8), scale=(0.1, 0.3)).numpy() for _ in range(4)]
    assert any(not np.array_equal(crops[0], c) for c in crops[1:])


def test_batch_augmenter_off_is_identity():
    images = tf.random.uniform((4, 16, 16, 3), maxval=255)
    labels = tf.one_hot([0, 1, 2, 3], 5)
    out_images, out_labels = augment.BatchAugmenter(TrainConfig(**OFF))(images, labels)
    np.testing.assert_array_equal(out_images.numpy(), images.numpy())
    np.testing.assert_array_equal(out_labels.numpy(), labels.numpy())


def test_batch_augmenter_paper_recipe_changes_images_keeps_range():
    config = TrainConfig(random_erasing=1.0, color_jitter=0.4, randaugment_magnitude=30)
    images = tf.random.uniform((8, 16, 16, 3), maxval=255, seed=3)
    labels = tf.one_hot(tf.range(8) % 4, 4)
    out_images, out_labels = augment.BatchAugmenter(config)(images, labels)
    assert out_images.shape == images.shape
    assert float(tf.reduce_min(out_images)) >= 0 and float(tf.reduce_max(out_images)) <= 255
    assert not np.allclose(out_images.numpy(), images.numpy())
    np.testing.assert_array_equal(out_labels.numpy(), labels.numpy())


@pytest.mark.parametrize(
    "mix", [dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0), dict(mixup_alpha=0.5, cutmix_alpha=0.5)]
)
def test_mixup_cutmix_mix_labels(mix):
    augmenter = augment.BatchAugmenter(TrainConfig(**OFF, **mix))
    images = tf.concat([tf.zeros((4, 8, 8, 3)), tf.fill((4, 8, 8, 3), 255.0)], axis=0)
    labels = tf.one_hot([0, 0, 0, 0, 1, 1, 1, 1], 2)
    mixed = 0
    for _ in range(3):
        out_images, out_labels = augmenter(images, labels)
        np.testing.assert_allclose(out_labels.numpy().sum(axis=1), 1.0, atol=1e-5)
        mixed += int(np.sum((out_labels.numpy() > 0.01) & (out_labels.numpy() < 0.99)))
    assert out_labels.dtype == tf.float32
    assert mixed > 0  # some labels are soft


def test_augmentations_differ_between_batches_inside_tf_data():
    """Keras' seeded layers must draw new randomness for every batch of a tf.data pipeline."""
    config = TrainConfig(mixup_alpha=0.5, random_erasing=1.0)
    images = tf.random.uniform((4, 16, 16, 3), maxval=255, seed=1)
    labels = tf.one_hot([0, 1, 0, 1], 2)
    ds = (
        tf.data.Dataset.from_tensors((images, labels)).repeat(3).map(augment.BatchAugmenter(config))
    )
    outputs = [x.numpy() for x, _ in ds]
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])


def test_random_erasing_probability_is_fixed_not_drawn():
    # random_erasing=1.0 must erase every image (Keras draws the probability from [0, p] when
    # given one float; the augmenter passes (p, p)).
    augmenter = augment.BatchAugmenter(TrainConfig(**dict(OFF, random_erasing=1.0)))
    images = tf.fill((16, 16, 16, 3), 100.0)
    out, _ = augmenter(images, tf.one_hot(tf.zeros(16, tf.int32), 2))
    changed = np.any(out.numpy() != 100.0, axis=(1, 2, 3))
    assert changed.all()


def test_rand_augment_uses_torchvision_geometric_ranges():
    layer = augment.rand_augment(2, 12, 30, seed=0)  # the CIFAR-10 recipe's m12 of 30
    np.testing.assert_allclose(layer.random_rotation.factor, (-12 / 360, 12 / 360))
    np.testing.assert_allclose(
        layer.random_translation.width_factor, (-0.4 * 150 / 331, 0.4 * 150 / 331)
    )
    np.testing.assert_allclose(layer.random_shear.y_factor, (0.0, 0.12))
    images = tf.random.uniform((4, 16, 16, 3), maxval=255, seed=2)
    out = layer(images, training=True)
    assert out.shape == images.shape and not np.allclose(out.numpy(), images.numpy())
