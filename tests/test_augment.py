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


def test_unseeded_augmentations_work_once_op_determinism_is_on():
    # training.train seeds TensorFlow and turns op determinism on for the whole process; the
    # stateful box sampler then refuses its default seed 0 (a CI failure when a doctest ran
    # after a training test).
    from tensorflow.python.eager import context  # no public getters or reset
    from tensorflow.python.framework import config as tf_config

    was_on, global_seed = tf_config.is_op_determinism_enabled(), context.global_seed()
    tf.random.set_seed(7)
    tf_config.enable_op_determinism()
    try:
        image = tf.cast(tf.random.stateless_uniform((32, 32, 3), (1, 2), maxval=255), tf.uint8)
        crops = [augment.random_resized_crop(image, (8, 8), (0.1, 0.3)).numpy() for _ in range(4)]
        assert any(not np.array_equal(crops[0], c) for c in crops[1:])
        assert augment.random_translate(tf.cast(image, tf.float32), 2).shape == (32, 32, 3)
    finally:
        tf.random.set_seed(global_seed)
        if not was_on:
            tf_config.disable_op_determinism()


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


def op(name):
    return augment.RANDAUGMENT_OPS.index(name)


def cifar_like_image(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return rng.integers(10, 246, (size, size, 3)).astype(np.float32)


def test_rand_augment_color_ops_follow_torchvisions_definitions():
    """m12 of 30 (the CIFAR recipe): factors 1 +- 0.36, posterize to 6 bits, solarize from 153,
    computed here in numpy from torchvision's definitions on 8-bit images (truncated)."""
    image = cifar_like_image()
    strength = 12 / 30
    gray = np.floor(image @ np.array([0.2989, 0.587, 0.114]))[..., None]
    blend = lambda a, b, f: np.floor(np.clip(f * a + (1 - f) * b, 0, 255))  # noqa: E731
    expected = {
        ("Identity", 1): image,
        ("Brightness", 1): blend(image, 0.0, 1.36),
        ("Brightness", -1): blend(image, 0.0, 0.64),
        ("Color", -1): blend(image, gray, 0.64),
        ("Contrast", 1): blend(image, gray.mean(), 1.36),
        ("Posterize", 1): (image.astype(np.uint8) & 0b11111100).astype(np.float32),
        ("Solarize", 1): np.where(image >= 153, 255 - image, image),
    }
    for (name, sign), want in expected.items():
        got = augment.rand_augment_op(tf.constant(image), op(name), sign, strength).numpy()
        # float32 rounding may flip a truncation by one level on a few values
        assert np.mean(got == want) > 0.95 and np.max(np.abs(got - want)) <= 1, name


def test_rand_augment_autocontrast_and_equalize_stretch_each_channel():
    image = cifar_like_image() * 0.5 + 40  # values in 45..163
    image = np.floor(image)
    auto = augment.rand_augment_op(tf.constant(image), op("AutoContrast"), 1, 0.4).numpy()
    assert auto.min(axis=(0, 1)).tolist() == [0, 0, 0]
    assert auto.max(axis=(0, 1)).tolist() == [255, 255, 255]
    equalized = augment.rand_augment_op(tf.constant(image), op("Equalize"), 1, 0.4).numpy()
    for c in range(3):  # PIL's / torchvision's equalize, written out in numpy
        channel = image[..., c].astype(np.int64)
        histogram = np.bincount(channel.ravel(), minlength=256)
        step = (histogram.sum() - histogram[np.nonzero(histogram)[0][-1]]) // 255
        lut = (np.cumsum(histogram) + step // 2) // step
        lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
        np.testing.assert_array_equal(equalized[..., c], lut[channel])
    assert equalized.max() >= 250 and equalized.min() == 0
    flat = np.full((8, 8, 3), 77.0, np.float32)  # one value: unchanged by both
    for name in ("AutoContrast", "Equalize"):
        got = augment.rand_augment_op(tf.constant(flat), op(name), 1, 0.4).numpy()
        np.testing.assert_array_equal(got, flat)


def test_rand_augment_geometry_moves_pixels_as_torchvision():
    image = cifar_like_image(1)
    # translation: int(150/331 * 32 * 12/30) = 5 pixels, black fill
    shifted = augment.rand_augment_op(tf.constant(image), op("TranslateX"), 1, 0.4).numpy()
    np.testing.assert_array_equal(shifted[:, 5:], image[:, :-5])
    np.testing.assert_array_equal(shifted[:, :5], 0)
    shifted = augment.rand_augment_op(tf.constant(image), op("TranslateY"), -1, 0.4).numpy()
    np.testing.assert_array_equal(shifted[:-5], image[5:])
    # rotation by 12 degrees about the center: the center pixels stay, corners go black
    rotated = augment.rand_augment_op(tf.constant(image), op("Rotate"), 1, 0.4).numpy()
    np.testing.assert_array_equal(rotated[15:17, 15:17], image[15:17, 15:17])
    assert not np.array_equal(rotated, image) and (rotated[0, 0] == 0).all()
    # shear 0.12 along x: row y moves by about 0.12 (y + 1/2) pixels; the top row stays
    sheared = augment.rand_augment_op(tf.constant(image), op("ShearX"), 1, 0.4).numpy()
    np.testing.assert_array_equal(sheared[0], image[0])
    np.testing.assert_array_equal(sheared[31, : 32 - 4], image[31, 4:])


def test_rand_augment_draws_ops_per_image_from_the_seed():
    image = tf.constant(cifar_like_image(2))
    outs = [
        augment.rand_augment_image(image, 2, 12, 30, tf.constant([0, i])).numpy() for i in range(40)
    ]
    again = augment.rand_augment_image(image, 2, 12, 30, tf.constant([0, 7])).numpy()
    np.testing.assert_array_equal(again, outs[7])  # a function of the seed
    distinct = {out.tobytes() for out in outs}
    assert len(distinct) > 25  # 14 x 14 x signs: images of one batch get different ops
    unchanged = sum(np.array_equal(out, image.numpy()) for out in outs)
    assert unchanged < 6  # Identity twice: 1/196 per image
    assert all(out.min() >= 0 and out.max() <= 255 for out in outs)


def test_random_translate_is_a_reflected_shift_within_the_pixels():
    image = tf.reshape(tf.range(6 * 7 * 3, dtype=tf.float32), (6, 7, 3))
    padded = np.pad(image.numpy(), [(2, 2), (2, 2), (0, 0)], mode="reflect")
    windows = {
        (dy, dx): padded[dy : dy + 6, dx : dx + 7].tobytes() for dy in range(5) for dx in range(5)
    }
    seen = set()
    for i in range(200):
        out = augment.random_translate(image, 2, seed=tf.constant([1, i], tf.int64)).numpy()
        again = augment.random_translate(image, 2, seed=tf.constant([1, i], tf.int64)).numpy()
        np.testing.assert_array_equal(out, again)  # a function of the seed
        assert out.shape == (6, 7, 3)
        matches = [offset for offset, window in windows.items() if window == out.tobytes()]
        assert len(matches) == 1, i
        seen.add(matches[0])
    assert len(seen) == 25  # every shift of -2..2 in both directions, the identity among them
    np.testing.assert_array_equal(augment.random_translate(image, 0), image)
