"""What a careless user types loses nothing and ends in one line: one test per case found when
every entry point was tried with bad input (missing, lying, overlapping and non-finite input)."""

import json
import os
import pathlib
import struct
import time
import zipfile

import numpy as np
import pytest
from conftest import make_image_folder
from export_helpers import tiny_model

from convmixer_tf import cli, convert, predict, torch_pickle
from training import data, launch, resume, rundir, train

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"


def one_line(capsys, prog: str, chatter: bool = False) -> str:
    """The error line (nothing on stdout, no traceback). ``chatter``: the command did work
    before it failed, and its libraries logged on stderr: the error is the last line."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "", captured.out
    assert "Traceback" not in err
    if not chatter:
        assert len(err.splitlines()) == 1, err
    line = err.splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), err
    return line


@pytest.fixture
def keras_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "m.keras"
    tiny_model().save(path)
    return path


# --- Nothing lost --------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["same", "hard link", "symlink"])
def test_export_refuses_to_write_over_its_model(keras_file, tmp_path, capsys, link):
    from export.__main__ import main

    before = keras_file.read_bytes()
    output = keras_file
    if link == "hard link":
        output = tmp_path / "other_name.keras"
        os.link(keras_file, output)
    elif link == "symlink":
        output = tmp_path / "alias.tflite"
        output.symlink_to(keras_file)
    status = main(["--model", str(keras_file), "--format", "fp32", "--output", str(output)])
    assert status == 2 and "is the input --model" in one_line(capsys, "python -m export")
    assert keras_file.read_bytes() == before


def test_export_refuses_an_output_inside_the_data(keras_file, tmp_path, capsys):
    from export.__main__ import main

    images = make_image_folder(tmp_path / "data", classes=10, per_class=2)
    output = images / "class_0" / "m.tflite"
    status = main(["--model", str(keras_file), "--format", "int8", "--output", str(output),
                   "--data-dir", str(images)])  # fmt: skip
    assert status == 2 and "inside the input --data-dir" in one_line(capsys, "python -m export")
    assert not output.exists()


def test_export_is_all_or_nothing_when_an_edge_tool_fails(keras_file, tmp_path, capsys):
    """A Vela system configuration Vela rejects: the .tflite and its labels were converted
    already, and neither is left behind."""
    from export.__main__ import main

    images = make_image_folder(tmp_path / "data", classes=10, per_class=2)
    output = tmp_path / "out" / "x.tflite"
    status = main([
        "--model", str(keras_file), "--format", "int8", "--output", str(output),
        "--data-dir", str(images), "--calibration-images", "8", "--target", "ethos-u55-128",
        "--vela-system-config", "No_Such_System",
    ])  # fmt: skip
    err = one_line(capsys, "python -m export", chatter=True)
    assert status == 2 and "No_Such_System" in err
    assert not output.parent.exists() or sorted(os.listdir(output.parent)) == []


def test_export_vela_config_that_is_missing_is_refused_when_parsed(keras_file, tmp_path, capsys):
    from export.__main__ import main

    output = tmp_path / "x.tflite"
    missing = str(tmp_path / "missing.ini")
    status = main(["--model", str(keras_file), "--format", "int8", "--output", str(output),
                   "--target", "ethos-u55-128", "--vela-config", missing])  # fmt: skip
    err = one_line(capsys, "python -m export")
    assert status == 2 and "--vela-config" in err and "missing.ini" in err
    assert os.listdir(tmp_path) == ["m.keras"]


def test_write_all_leaves_nothing_when_one_write_fails(tmp_path):
    from convmixer_tf import files

    (tmp_path / "a.txt").write_text("old")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        files.write_all({tmp_path / "a.txt": "new", tmp_path / "b.txt": "b",
                         tmp_path / "folder": "not a file"})  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "folder"]
    assert (tmp_path / "a.txt").read_text() == "old"
    files.write_all({tmp_path / "a.txt": "new", tmp_path / "b.txt": b"b"})
    assert (tmp_path / "a.txt").read_text() == "new" and (tmp_path / "b.txt").read_text() == "b"


def diverging_config(images, output_dir, **overrides):
    from training.config import TrainConfig

    values = dict(data_dir=str(images), output_dir=str(output_dir), image_size=16, dim=16,
                  depth=1, kernel_size=3, batch_size=6, epochs=2, verbose=0, lr_max=1e30,
                  clip_norm=None, lr_schedule="constant", backup_freq=1)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


@pytest.mark.slow
def test_a_diverged_run_writes_no_model_and_valid_json(image_folder, tmp_path):
    from training import trainer
    from training.callbacks import TrainingDivergedError

    output = tmp_path / "run"
    with pytest.raises(TrainingDivergedError):
        trainer.train(diverging_config(image_folder, output))
    assert not (output / "model.keras").exists() and not (output / "best.keras").exists()
    metrics = (output / "metrics.json").read_text()

    def refuse(constant):
        raise AssertionError(f"metrics.json holds {constant}: not JSON")

    json.loads(metrics, parse_constant=refuse)
    backup = resume.load_backup(str(output / "backup"))
    assert backup is None or all(
        np.isfinite(v).all() for k, v in backup.arrays.items() if k.startswith("model/")
    )


def test_infinite_learning_rate_is_refused_before_any_work(image_folder, tmp_path, capsys):
    output = tmp_path / "run"
    argv = ["--data-dir", str(image_folder), "--output-dir", str(output), "--lr-max", "Infinity"]
    assert train.main(argv) == 2
    assert "`lr_max` must be finite" in one_line(capsys, "python -m training.train")
    assert not output.exists()


def test_a_corrupt_latest_backup_is_named_and_the_one_before_used(tmp_path, caplog):
    import convmixer_tf

    model = convmixer_tf.ConvMixer(8, 1, 3, 2, input_shape=(8, 8, 3), num_classes=2)
    model.compile(optimizer="adamw", loss="mse")
    folder = str(tmp_path / "backup")
    resume.save_state(model, folder, step=3, mid_epoch=True)
    model.trainable_variables[0].assign_add(np.ones(model.trainable_variables[0].shape))
    latest = resume.save_state(model, folder, step=7, mid_epoch=True)
    resume.save_state(model, folder, step=7, mid_epoch=True)  # written again: still two kept
    assert sorted(os.listdir(folder)) == ["latest.json", "state_000000003.npz",
                                          "state_000000007.npz"]  # fmt: skip
    assert resume.load_backup(folder).step == 7
    with open(latest, "r+b") as f:  # a disk error cuts the file short
        f.truncate(100)
    backup = resume.load_backup(folder)
    assert backup.step == 3 and backup.path.endswith("state_000000003.npz")
    assert "state_000000007.npz is unreadable" in caplog.text
    os.remove(backup.path)
    with pytest.raises(ValueError, match="No readable backup"):
        resume.load_backup(folder)


def test_rerun_of_a_finished_run_with_another_config_is_refused(tmp_path, image_folder, capsys):
    output = tmp_path / "run"
    base = ["--data-dir", str(image_folder), "--output-dir", str(output), "--dim", "16"]
    from training import trainer

    config, _ = train.resolve_config(base)
    output.mkdir()
    trainer.resolve_config(config).to_json(str(output / "config.json"))  # as a run saves it
    (output / "model.keras").write_bytes(b"a finished run's model")
    (output / "metrics.json").write_text('{"final": {"epoch": 25}}')
    assert train.main([*base[:-1], "32"]) == 2
    err = one_line(capsys, "python -m training.train")
    assert "finished run" in err and "dim: 16 -> 32" in err
    assert (output / "model.keras").read_bytes() == b"a finished run's model"


@pytest.mark.slow
def test_resuming_on_other_data_is_refused_naming_the_change(tmp_path, capsys):
    """Images added to the folder between a crash and the rerun: the rerun would train on other
    batches with another held-out split. Refused, naming the change; with the data restored,
    the run resumes."""
    import keras

    from training import trainer

    images = make_image_folder(tmp_path / "images", classes=2, per_class=10)
    output = tmp_path / "run"
    argv = ["--data-dir", str(images), "--output-dir", str(output), "--image-size", "16",
            "--dim", "8", "--depth", "1", "--kernel-size", "3", "--batch-size", "6",
            "--epochs", "2", "--verbose", "0"]  # fmt: skip

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    config, _ = train.resolve_config(argv)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config, extra_callbacks=[Crash()])
    backup = resume.read_pointer(str(output / "backup"))
    assert backup["data"] == {"classes": 2, "train_examples": 18, "steps_per_epoch": 3}

    extra = make_image_folder(tmp_path / "more", classes=3, per_class=10)
    for i in range(4):
        os.rename(extra / "class_1" / f"{i:04d}.png", images / "class_1" / f"new{i}.png")
    assert train.main(argv) == 2
    err = one_line(capsys, "python -m training.train", chatter=True)
    assert "(train_examples 18 -> 21)" in err and "--overwrite" in err
    os.rename(extra / "class_2", images / "class_2")
    assert train.main(argv) == 2
    assert "classes added ['class_2'], removed []" in one_line(capsys, "python -m training.train",
                                                               chatter=True)  # fmt: skip
    for path in [*images.glob("class_1/new*"), images / "class_2"]:
        os.rename(path, tmp_path / path.name)
    assert train.main(argv) == 0  # the same data again: resumed and finished
    assert json.loads(capsys.readouterr().out)["epoch"] == 2


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_dir_in_the_data_dir_is_refused(image_folder, capsys, where):
    output = image_folder if where == "same" else image_folder / "runs"
    argv = ["--data-dir", str(image_folder), "--output-dir", str(output)]
    assert train.main(argv) == 2
    assert "--output-dir" in one_line(capsys, "python -m training.train")
    assert sorted(os.listdir(image_folder)) == ["class_0", "class_1", "class_2"]


def test_class_folder_names_must_be_one_printable_line(tmp_path):
    images = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    os.rename(images / "class_1", images / "two\nlines")
    with pytest.raises(ValueError, match=r"Class folder .*two\\nlines.* one line"):
        data.scan_image_folder(str(images))
    from export import tflite

    with pytest.raises(ValueError, match="one line"):
        tflite.labels_text(["cat", "dog\tfur"])


# --- Bounded resources from untrusted files ------------------------------------------------


def lying_checkpoint(path, size=(10**6, 10**6), stride=(0, 0), storage=b"\0\0\0\0", numel=1):
    """A torch.save zip whose one tensor declares ``size`` and ``stride`` over a small storage."""

    def ints(values):
        return b"".join(b"J" + struct.pack("<i", v) for v in values) + b"\x86"

    payload = (
        b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n"
        + b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + b"J" + struct.pack("<i", numel) + b"tQ"
        + b"K\x00" + ints(size) + ints(stride) + b"\x89tRu."
    )  # fmt: skip
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ckpt/data.pkl", payload)
        archive.writestr("ckpt/data/0", storage)
    return path


def test_checkpoint_that_declares_a_huge_tensor_is_refused_before_allocating(tmp_path, capsys):
    path = lying_checkpoint(tmp_path / "lies.pth.tar")
    assert os.path.getsize(path) < 1000
    start = time.monotonic()
    with pytest.raises(ValueError, match="declares 1000000000000 elements"):
        torch_pickle.load(path)
    assert time.monotonic() - start < 5
    out = tmp_path / "m.keras"
    assert convert.main(["--weights", str(path), "--output", str(out)]) == 2
    assert "lies.pth.tar" in one_line(capsys, "python -m convmixer_tf.convert")
    assert not out.exists()


def test_checkpoint_storage_that_lies_about_its_size_and_the_total_limit(tmp_path):
    short = lying_checkpoint(tmp_path / "short.pt", size=(4,), stride=(1,), numel=4)
    with pytest.raises(ValueError, match="declares 4 elements of 4 bytes.*holds 4 bytes"):
        torch_pickle.load(short)
    fine = lying_checkpoint(tmp_path / "fine.pt", size=(2, 2), stride=(2, 1),
                            storage=np.arange(4, dtype="<f4").tobytes(), numel=4)  # fmt: skip
    np.testing.assert_array_equal(torch_pickle.load(fine)["w"], [[0, 1], [2, 3]])
    with zipfile.ZipFile(fine) as archive:
        pickled = archive.getinfo("ckpt/data.pkl").file_size
    # The pickle and the 16-byte storage fit; the 16-byte tensor copied out of it does not.
    with pytest.raises(ValueError, match=f"shape \\(2, 2\\) brings it to {pickled + 32} bytes"):
        torch_pickle.load(fine, max_bytes=pickled + 24)


def huge_png(path) -> pathlib.Path:
    """A few hundred bytes of PNG that declare 20000 x 20000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    body = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"
            + b"\0" * 300 + b"\0\0\0\0IEND\xaeB`\x82")  # fmt: skip
    path.write_bytes(body)
    return path


def test_an_image_declaring_too_many_pixels_is_refused(tmp_path, capsys):
    image = huge_png(tmp_path / "bomb.png")
    weights = str(FIXTURES / "official_relu_k4.pth.tar")
    argv = ["--weights", weights, "--activation", "relu", "--input-size", "16", str(image)]
    assert predict.main(argv) == 2
    err = one_line(capsys, "python -m convmixer_tf.predict")
    assert "bomb.png" in err and "400000000 pixels" in err
    # Training and evaluation read image folders: the file is skipped, the reason logged.
    images = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    os.replace(image, images / "class_0" / "bomb.png")
    folder = data.scan_image_folder(str(images))
    assert [os.path.basename(p) for p in folder.skipped] == ["bomb.png"]
    assert data.check_image_file(folder.skipped[0]).startswith("declares 400000000 pixels")


# --- Network -------------------------------------------------------------------------------


def test_a_weights_url_that_cannot_be_fetched_fails_fast_in_one_line(tmp_path, capsys):
    out = tmp_path / "m.keras"
    start = time.monotonic()
    status = convert.main(
        ["--weights", "https://convmixer.invalid/w.pth.tar", "--output", str(out)]
    )
    err = one_line(capsys, "python -m convmixer_tf.convert", chatter=True)  # "Downloading..."
    assert status == 2 and time.monotonic() - start < 30
    assert "Could not download https://convmixer.invalid/w.pth.tar" in err and "PATH" in err
    assert not out.exists()


def test_tfds_without_network_fails_fast_and_releases_the_lock(tmp_path, capsys, monkeypatch):
    import socket

    def unreachable(address, timeout=None):
        raise OSError(f"[Errno 101] Network is unreachable: {address[0]}")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    output = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--tfds-data-dir", str(tmp_path / "tfds"), "--output-dir",
            str(output), "--dim", "16", "--depth", "1"]  # fmt: skip
    start = time.monotonic()
    assert train.main(argv) == 2
    err = one_line(capsys, "python -m training.train")
    assert "cannot reach" in err and "--data-dir" in err and time.monotonic() - start < 60
    assert not (output / rundir.LOCK_FILE).exists()


# --- Poor messages, now one clear line -----------------------------------------------------


def test_a_label_file_that_is_not_utf8_is_named(tmp_path):
    labels = tmp_path / "val.txt"
    labels.write_bytes(b"img1 cat\nimg2 \xff\xfe\n")
    with pytest.raises(ValueError, match=r"val.txt.*not UTF-8"):
        data.read_label_file(str(labels), ["cat", "dog"])


def test_an_empty_output_dir_names_the_option(image_folder, capsys):
    assert train.main(["--data-dir", str(image_folder), "--output-dir", ""]) == 2
    assert "--output-dir" in one_line(capsys, "python -m training.train")


def test_the_launcher_prints_worker_output_on_stderr_and_one_json_line(capfd):
    status = launch.main(["--workers", "1", "--module", "no_such_module_here"])
    out, err = capfd.readouterr()
    assert status == 1 and json.loads(out) == {
        "workers": 1, "module": "no_such_module_here", "exit_code": 1,
    }  # fmt: skip
    assert "[worker 0]" in err and "No module named no_such_module_here" in err


def test_predict_prints_one_json_line(capsys):
    image = str(FIXTURES / "eval_image.png")
    weights = str(FIXTURES / "official_relu_k4.pth.tar")
    argv = ["--weights", weights, "--activation", "relu", "--input-size", "16", "--top", "2",
            image]  # fmt: skip
    assert predict.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    (prediction,) = json.loads(out[0])["predictions"]
    assert prediction["image"] == image and len(prediction["top"]) == 2


@pytest.mark.slow
def test_training_prints_one_json_line_and_the_progress_on_stderr(image_folder, tmp_path, capfd):
    output = tmp_path / "run"
    argv = ["--data-dir", str(image_folder), "--output-dir", str(output), "--image-size", "16",
            "--dim", "16", "--depth", "1", "--kernel-size", "3", "--epochs", "1",
            "--batch-size", "6", "--verbose", "1"]  # fmt: skip
    assert train.main(argv) == 0
    out, err = capfd.readouterr()
    assert len(out.splitlines()) == 1, out
    assert json.loads(out)["output_dir"] == str(output) and "step" in err


def test_ctrl_c_in_training_is_one_line_that_says_how_to_resume(
    image_folder, tmp_path, capsys, monkeypatch
):
    # (the lock's release on Ctrl-C: test_trainer's interrupted run is resumed by a second one)
    from training import trainer

    output = tmp_path / "run"

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    argv = ["--data-dir", str(image_folder), "--output-dir", str(output), "--image-size", "16"]
    assert train.main(argv) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    line = captured.err.strip()
    assert line == (
        f"python -m training.train: interrupted; the same command resumes from the last backup"
        f" in {output / 'backup'} (if one was written)"
    )


# --- One convention ------------------------------------------------------------------------


def test_old_option_spellings_still_work_with_a_warning(capsys):
    from export.benchmark import build_parser

    with pytest.warns(FutureWarning, match="--peers-python"):
        args = build_parser().parse_args(
            ["--preset", "convmixer_256_8", "--output-dir", "x", "--torch-python", __file__]
        )
    assert args.peers_python == __file__
    with pytest.warns(FutureWarning, match="--preset"):
        args = convert.build_parser().parse_args(
            ["--model", "convmixer_256_8", "--weights", "w", "--output", "o.keras"]
        )
    assert args.preset == "convmixer_256_8"


def test_export_defaults_are_the_options_dataclass():
    from export import options
    from export.__main__ import build_parser

    args = build_parser().parse_args(["--model", __file__, "--format", "fp32", "--output", "o"])
    parsed = options.from_args(args)
    for field in options.dataclasses.fields(options.ExportOptions):
        assert getattr(parsed, field.name) == getattr(options.ExportOptions(), field.name)
    with pytest.raises(ValueError, match=r"qat_lr \(--qat-lr\) must be a positive finite"):
        options.ExportOptions(qat_lr=float("inf"))
    with pytest.raises(ValueError, match="Unknown export option"):
        options.resolve(None, {"qat_learning_rate": 1e-4})


def test_emit_writes_strict_json(capsys):
    cli.emit({"loss": float("nan"), "rows": [1.0, float("-inf")]})
    assert json.loads(capsys.readouterr().out) == {"loss": None, "rows": [1.0, None]}
