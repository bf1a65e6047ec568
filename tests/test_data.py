"""Tests of training/data.py: image folders (split, formats, corrupt files), TFDS, resizing."""

import logging
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from training import data

CLASSES = ("cat", "dog", "frog")


def _write_image(path, array, fmt):
    encoded = tf.io.encode_png(array) if fmt == "png" else tf.io.encode_jpeg(array, quality=95)
    path.write_bytes(encoded.numpy())


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 5 images, PNG and JPEG, with a grayscale and an RGBA image."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for i in range(5):
            channels = 1 if (c, i) == (0, 1) else 4 if (c, i) == (1, 2) else 3
            array = rng.integers(0, 255, (10 + i, 12, channels), dtype=np.uint8)
            fmt = "png" if channels != 3 or i % 2 else "jpeg"
            _write_image(folder / f"{i:02d}.{'png' if fmt == 'png' else 'jpg'}", array, fmt)
    return tmp_path / "images"


def test_image_folder_split_is_deterministic_and_disjoint(image_folder):
    train = data.scan_image_folder(str(image_folder), split="train", validation_fraction=0.4)
    val = data.scan_image_folder(str(image_folder), split="validation", validation_fraction=0.4)
    everything = data.scan_image_folder(str(image_folder), split="all")
    assert train.class_names == val.class_names == CLASSES
    assert set(train.paths).isdisjoint(val.paths)
    assert sorted(train.paths + val.paths) == sorted(everything.paths)
    # The last ceil(40% of 5) = 2 sorted files of each class are the validation split.
    assert [p.rsplit("/", 1)[1] for p in val.paths[:2]] == ["03.png", "04.jpg"]
    assert len(val.paths) == 3 * math.ceil(0.4 * 5)
    assert val.labels == (0, 0, 1, 1, 2, 2)
    again = data.scan_image_folder(str(image_folder), split="validation", validation_fraction=0.4)
    assert again == val


def test_load_dataset_converts_gray_and_rgba_and_resizes(image_folder):
    ds, names = data.load_dataset(
        data_dir=str(image_folder), split="all", image_size=(8, 6), batch_size=4
    )
    batches = list(ds)
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert names == list(CLASSES)
    assert images.shape == (15, 8, 6, 3) and images.dtype == np.float32
    assert batches[0][1].dtype == tf.int32
    assert 0.0 <= images.min() and images.max() <= 255.0 and images.max() > 100
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # The grayscale image (cat/01.png) has equal R, G and B.
    np.testing.assert_array_equal(images[1][..., 0], images[1][..., 2])


def test_load_dataset_reads_the_cifar10_slice(cifar10_train_dir):
    ds, names = data.load_dataset(
        data_dir=str(cifar10_train_dir),
        split="validation",
        image_size=16,
        batch_size=20,
        limit_per_class=2,
        shuffle=True,
        seed=1,
    )
    images, labels = next(iter(ds))
    assert names[:3] == ["airplane", "automobile", "bird"] and len(names) == 10
    assert images.shape == (20, 16, 16, 3)
    assert sorted(labels.numpy().tolist()) == sorted(list(range(10)) * 2)


def test_corrupt_images_are_reported_by_path_skipped_and_counted(image_folder, caplog):
    bad = {
        image_folder / "dog" / "empty.jpg": b"",
        image_folder / "dog" / "notes.jpg": b"this is not an image",
        image_folder / "frog" / "zz_truncated.jpg": (image_folder / "cat" / "00.jpg").read_bytes()[
            :200
        ],
    }
    for path, content in bad.items():
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        folder = data.scan_image_folder(str(image_folder), split="all")
        ds, _ = data.load_dataset(
            data_dir=str(image_folder), split="all", image_size=8, batch_size=64
        )
    assert sorted(folder.skipped) == sorted(str(p) for p in bad)
    assert len(folder.paths) == 15
    for path in bad:
        assert str(path) in caplog.text
    assert "Skipped 3 unreadable image(s) of 18" in caplog.text
    assert sum(int(b[1].shape[0]) for b in ds) == 15


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.load_dataset(data_dir=str(tmp_path / "nope"), image_size=8, batch_size=2)
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.load_dataset(data_dir=str(tmp_path), image_size=8, batch_size=2)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match=r"Class folder\(s\) \['cat'\].*no image in split 'train'"):
        data.load_dataset(data_dir=str(tmp_path), image_size=8, batch_size=2)


def test_bad_arguments_raise_value_errors(image_folder):
    with pytest.raises(ValueError, match="exactly one"):
        data.load_dataset(image_size=8, batch_size=2)
    with pytest.raises(ValueError, match="split"):
        data.load_dataset(data_dir=str(image_folder), split="test", image_size=8, batch_size=2)
    with pytest.raises(ValueError, match="image_size"):
        data.load_dataset(data_dir=str(image_folder), image_size=(8,), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        data.load_dataset(data_dir=str(image_folder), image_size=8, batch_size=0)


def test_resize_image_center_crops_like_timm():
    # 20x40 image, 16x16 at crop_pct 0.8: shorter side to floor(16 / 0.8) = 20, center 16x16.
    image = tf.reshape(tf.range(20 * 40 * 3) % 256, (20, 40, 3))
    image = tf.cast(image, tf.uint8)
    out = data.resize_image(image, (16, 16), crop_pct=0.8, interpolation="nearest")
    assert out.shape == (16, 16, 3) and out.dtype == tf.uint8
    np.testing.assert_array_equal(out.numpy(), image.numpy()[2:18, 12:28])


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """A tfds-style dataset built into tmp_path: 3 classes, a train and a test split."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(__file__).parent

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(12, 12, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 12), "test": self._generate_examples(1, 6)}

    def _generate_examples(self, seed, n):
        rng = np.random.default_rng(seed)
        for i in range(n):
            image = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            yield i, {"image": image, "label": i % 3}


def test_tfds_dataset_by_name_with_data_dir(tmp_path):
    # First use builds (as a download would) the dataset into tfds_data_dir, then reads it.
    ds, names = data.load_dataset(
        dataset="tiny_shapes",
        tfds_data_dir=str(tmp_path),
        split="validation",
        image_size=8,
        batch_size=4,
    )
    assert (tmp_path / "tiny_shapes" / "1.0.0").is_dir()
    assert names == ["a", "b", "c"]
    sizes = [int(b[0].shape[0]) for b in ds]
    assert sum(sizes) == 6  # no validation split: "validation" reads "test"
    assert next(iter(ds))[0].shape == (4, 8, 8, 3)
    limited, _ = data.load_dataset(
        dataset="tiny_shapes",
        tfds_data_dir=str(tmp_path),
        split="train",
        image_size=8,
        batch_size=100,
        limit_per_class=2,
    )
    labels = next(iter(limited))[1].numpy()
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    sliced, _ = data.load_dataset(
        dataset="tiny_shapes",
        tfds_data_dir=str(tmp_path),
        split="train[:50%]+test",
        image_size=8,
        batch_size=100,
    )
    assert int(next(iter(sliced))[0].shape[0]) == 6 + 6
    with pytest.raises(ValueError, match="no split"):
        data.load_dataset(
            dataset="tiny_shapes",
            tfds_data_dir=str(tmp_path),
            split="extra",
            image_size=8,
            batch_size=2,
        )
