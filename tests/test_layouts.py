"""ImageNet-style data layouts (train/ + val/ roots, --val-dir, a flat validation folder with a
label file), the evaluation default, recipes without machine paths, and the TFDS path offline
through tfds.testing.mock_data for training.train, training.evaluate and export."""

import json
import os
import pathlib

import pytest
from test_trainer import tiny_config

from training import config as config_lib
from training import data, pipeline

CLASSES = ("airplane", "automobile", "bird")


def link_images(source: pathlib.Path, target: pathlib.Path, start: int, count: int) -> None:
    """``count`` images of each of CLASSES (from the ``start``-th), linked from the fixture."""
    for name in CLASSES:
        (target / name).mkdir(parents=True)
        for image in sorted((source / name).iterdir())[start : start + count]:
            (target / name / image.name).symlink_to(image)


@pytest.fixture
def imagenet_root(tmp_path, cifar10_train_dir):
    """ROOT/train/<class>/ (7 images each) and ROOT/val/<class>/ (3 images each)."""
    root = tmp_path / "imagenet"
    link_images(cifar10_train_dir, root / "train", 0, 7)
    link_images(cifar10_train_dir, root / "val", 10, 3)
    return root


def test_train_and_val_root_trains_on_every_training_image(imagenet_root):
    train = data.image_folder_split(str(imagenet_root), "train")
    val = data.image_folder_split(str(imagenet_root), "validation")
    assert len(train.paths) == 3 * 7 and all("/train/" in p for p in train.paths)
    assert len(val.paths) == 3 * 3 and all("/val/" in p for p in val.paths)
    assert train.class_names == val.class_names == CLASSES
    config = tiny_config(imagenet_root, "unused", batch_size=7, limit_per_class=None)
    assert pipeline.make_train_dataset(config).steps_per_epoch == 3  # 21 images, batch 7
    ds, names = pipeline.make_validation_dataset(config, num_classes=3)
    assert sum(int(y.shape[0]) for _, y in ds) == 9 and names == list(CLASSES)


def test_explicit_val_dir_and_validation_folder_name(imagenet_root):
    (imagenet_root / "val").rename(imagenet_root / "validation")
    assert len(data.image_folder_split(str(imagenet_root), "validation").paths) == 9
    folder = data.image_folder_split(
        str(imagenet_root / "train"), "validation", val_dir=str(imagenet_root / "validation")
    )
    assert len(folder.paths) == 9
    train = data.image_folder_split(
        str(imagenet_root / "train"), "train", val_dir=str(imagenet_root / "validation")
    )
    assert len(train.paths) == 21


def test_mismatched_class_folders_are_named(imagenet_root):
    (imagenet_root / "val" / "bird").rename(imagenet_root / "val" / "birds")
    with pytest.raises(
        ValueError, match=r"only in validation \['birds'\].*only in training \['bird'\]"
    ):
        data.image_folder_split(str(imagenet_root), "validation")


@pytest.mark.parametrize("style", ["names", "indices", "kaggle_csv"])
def test_flat_validation_folder_with_a_label_file(imagenet_root, tmp_path, style):
    flat = tmp_path / "ILSVRC2012_img_val"
    flat.mkdir()
    lines = ["ImageId,PredictionString"] if style == "kaggle_csv" else []
    for label, name in enumerate(CLASSES):
        for image in sorted((imagenet_root / "val" / name).iterdir()):
            target = flat / f"{name}_{image.name}"
            target.symlink_to(image.resolve())
            stem = target.stem
            if style == "names":
                lines.append(f"{target.name} {name}")
            elif style == "indices":
                lines.append(f"{target.name}\t{label}")
            else:
                lines.append(f"{stem},{name} 1 2 3 4")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(lines) + "\n")
    folder = data.image_folder_split(
        str(imagenet_root / "train"), "validation", val_dir=str(flat), val_labels=str(labels)
    )
    assert len(folder.paths) == 9
    for path, label in zip(folder.paths, folder.labels, strict=True):
        assert os.path.basename(path).startswith(CLASSES[label])
    # Every image needs a label, and every label an image.
    (flat / "extra.jpg").symlink_to(next((imagenet_root / "val" / "bird").iterdir()).resolve())
    with pytest.raises(ValueError, match=r"1 image\(s\) without a label \['extra'\]"):
        data.image_folder_split(str(imagenet_root / "train"), "validation", val_dir=str(flat),
                                val_labels=str(labels))  # fmt: skip


def test_label_file_errors_name_the_line(imagenet_root, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a.jpg airplane\nb.jpg zebra\n")
    with pytest.raises(ValueError, match=r"labels.txt:2: class 'zebra'"):
        data.read_label_file(str(labels), CLASSES)


def test_evaluation_default_scores_the_folder_it_is_given(imagenet_root, cifar10_train_dir):
    assert data.default_evaluation_split(str(imagenet_root)) == "validation"
    assert data.default_evaluation_split(str(cifar10_train_dir)) == "all"
    assert data.default_evaluation_split(dataset="cifar10") == "validation"
    assert data.default_evaluation_split(str(cifar10_train_dir), val_dir="v") == "validation"


def test_recipes_hold_no_machine_paths():
    for name in config_lib.available_recipes():
        config = config_lib.from_recipe(name)
        for key in ("data_dir", "val_dir", "val_labels", "tfds_data_dir"):
            assert getattr(config, key) is None, (name, key)
        assert not os.path.isabs(config.output_dir), name
        assert config.dataset is not None, name  # runs without options: the TFDS path


# TFDS offline: tfds.testing.mock_data serves fake examples through the normal builder calls;
# the split sizes come from metadata written here (as a prepared dataset would have them).
@pytest.fixture
def mock_cifar10(tmp_path):
    import tensorflow_datasets as tfds

    metadata = tmp_path / "tfds_metadata"
    builder = tfds.builder("cifar10", data_dir=str(metadata))
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name=n, shard_lengths=[40], num_bytes=0)
                for n in ("train", "test")
            ]
        )
    )
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(
        num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(metadata)
    ):
        yield


@pytest.mark.slow
def test_tfds_path_through_the_three_clis(mock_cifar10, tmp_path, capsys):
    from export import __main__ as export_cli
    from training import evaluate, train

    run = tmp_path / "run"
    argv = ["--recipe", "cifar10_cpu_quick", "--dim", "16", "--depth", "1", "--epochs", "1",
            "--batch-size", "8", "--verbose", "0", "--output-dir", str(run)]  # fmt: skip
    assert train.main(argv) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["epoch"] == 1 and (run / "model.keras").exists()
    assert len(json.loads((run / "class_names.json").read_text())) == 10
    assert evaluate.main(["--model", str(run / "model.keras"), "--dataset", "cifar10"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "validation" and result["n"] == 40
    output = tmp_path / "m.tflite"
    assert export_cli.main(["--model", str(run / "model.keras"), "--format", "int8",
                            "--output", str(output), "--dataset", "cifar10",
                            "--calibration-images", "16"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["fully_integer"] and output.exists()


def test_tfds_download_failure_says_what_to_do(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(ValueError, match="(could not download|cannot reach).*--data-dir"):
        data.decoded_dataset(dataset="cifar10", tfds_data_dir=str(tmp_path))
