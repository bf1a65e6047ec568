"""The training and validation input pipelines (training.pipeline) on the CIFAR-10 fixture."""

import numpy as np
import pytest
import tensorflow as tf

from training import pipeline
from training.config import TrainConfig


def test_make_train_dataset_in_tf_data(cifar10_train_dir):
    config = TrainConfig(
        data_dir=str(cifar10_train_dir),
        limit_per_class=4,
        batch_size=8,
        image_size=16,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        random_erasing=0.25,
        color_jitter=0.4,
    )
    train = pipeline.make_train_dataset(config)
    assert train.steps_per_epoch == 40 // 8
    assert train.class_names[0] == "airplane" and train.skipped == ()
    images, labels = next(iter(train.dataset))
    assert images.shape == (8, 16, 16, 3) and labels.shape == (8, 10)
    assert images.dtype == tf.float32 and labels.dtype == tf.float32
    # The dataset repeats: more batches than one epoch.
    assert len(list(train.dataset.take(train.steps_per_epoch + 2))) == train.steps_per_epoch + 2


def test_make_validation_dataset_is_one_hot_and_complete(cifar10_train_dir):
    config = TrainConfig(
        data_dir=str(cifar10_train_dir), limit_per_class=3, batch_size=7, image_size=16
    )
    ds, names = pipeline.make_validation_dataset(config, num_classes=10)
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert labels.shape == (30, 10)
    assert labels.argmax(1).tolist() == sorted(list(range(10)) * 3)
    with pytest.raises(ValueError, match="classes"):
        pipeline.make_validation_dataset(config, num_classes=5)


def test_too_few_images_for_a_batch_is_an_error(cifar10_train_dir):
    config = TrainConfig(data_dir=str(cifar10_train_dir), limit_per_class=1, batch_size=64)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipeline.make_train_dataset(config)


@pytest.mark.parametrize("interpolation", ["area", "bicubic"])
def test_every_interpolation_the_config_accepts_works(cifar10_train_dir, interpolation):
    # "area" used to pass the config check and then fail in the evaluation transform.
    config = TrainConfig(
        data_dir=str(cifar10_train_dir), limit_per_class=3, batch_size=30, image_size=16,
        crop_pct=0.875, interpolation=interpolation,
    )  # fmt: skip
    ds, _ = pipeline.make_validation_dataset(config)
    images, _ = next(iter(ds))
    assert images.shape == (30, 16, 16, 3) and 0 <= float(tf.reduce_min(images))
    assert float(tf.reduce_max(images)) <= 255


def test_images_of_different_sizes_stream_from_files_resumably(tmp_path):
    """A folder whose images differ in size is decoded from its files (not held in memory); the
    stream from step 2 equals the fresh stream's third batch on that path too."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b"]):
        (tmp_path / name).mkdir()
        for i in range(6):
            size = (20 + 4 * i, 24 + 2 * c)
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            (tmp_path / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    config = TrainConfig(data_dir=str(tmp_path), validation_fraction=0.0, val_split=None,
                         batch_size=4, image_size=16)  # fmt: skip
    source = pipeline.indexed_source(config)
    assert source.num_examples == 12
    fresh = pipeline.make_train_dataset(config, source=source).dataset
    batches = [b for b, _ in fresh.take(4)]
    resumed = next(iter(pipeline.make_train_dataset(config, 2, source=source).dataset))[0]
    np.testing.assert_array_equal(resumed, batches[2])
    assert not np.array_equal(batches[2], batches[3])


def test_rand_augment_is_applied_per_image_in_the_pipeline(cifar10_train_dir):
    """With every other augmentation off, the pipeline's images are the source images, except
    that RandAugment (per image, a function of the seed) changes most of them."""
    plain = dict(
        data_dir=str(cifar10_train_dir), limit_per_class=4, batch_size=40, image_size=32,
        val_split=None, hflip=False, scale=(1.0, 1.0), seed=3,
    )  # fmt: skip
    off = pipeline.make_train_dataset(TrainConfig(**plain, randaugment_ops=0))
    on = pipeline.make_train_dataset(TrainConfig(**plain, randaugment_ops=2))
    again = pipeline.make_train_dataset(TrainConfig(**plain, randaugment_ops=2))
    source, _ = next(iter(off.dataset))
    augmented, _ = next(iter(on.dataset))
    np.testing.assert_array_equal(augmented.numpy(), next(iter(again.dataset))[0].numpy())
    changed = np.any(np.abs(augmented.numpy() - np.round(source.numpy())) > 0, axis=(1, 2, 3))
    # Few draws leave an image as it was (Identity twice: 1/196; AutoContrast on a full range)
    assert changed.sum() >= 28, changed


def test_translate_shifts_each_image_in_the_pipeline(cifar10_train_dir):
    """``translate``: every image is its source shifted by at most that many pixels (borders
    reflected), drawn per image from the seed."""
    plain = dict(
        data_dir=str(cifar10_train_dir), limit_per_class=4, batch_size=40, image_size=32,
        val_split=None, hflip=False, scale=(1.0, 1.0), randaugment_ops=0, seed=3,
    )  # fmt: skip
    source, _ = next(iter(pipeline.make_train_dataset(TrainConfig(**plain)).dataset))
    shifted, _ = next(iter(pipeline.make_train_dataset(TrainConfig(**plain, translate=2)).dataset))
    offsets = []
    for original, image in zip(source.numpy(), shifted.numpy(), strict=True):
        padded = np.pad(original, [(2, 2), (2, 2), (0, 0)], mode="reflect")
        found = [
            (dy - 2, dx - 2)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(padded[dy : dy + 32, dx : dx + 32], image)
        ]
        assert found, "an image is no reflected shift of its source"
        offsets.append(found[0])
    assert len(set(offsets)) > 5 and sum(o != (0, 0) for o in offsets) >= 30
