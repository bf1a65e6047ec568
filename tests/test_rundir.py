"""A run directory belongs to one run: the lock, a stale lock, a finished run, refused resumes."""

import json
import os
import subprocess
import sys

import pytest
from test_trainer import tiny_config

from training import rundir, train, trainer


def train_argv(data_dir, output_dir, *extra):
    return ["--data-dir", str(data_dir), "--output-dir", str(output_dir), "--limit-per-class",
            "4", "--image-size", "16", "--dim", "16", "--depth", "1", "--epochs", "1",
            "--batch-size", "8", "--verbose", "0", *extra]  # fmt: skip


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_directory_in_use_is_refused_at_once(cifar10_train_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with rundir.RunLock(str(out)):  # another live run (this process) holds it
        assert train.main(train_argv(cifar10_train_dir, out)) == 2
        err = capsys.readouterr().err
        assert "is in use by pid" in err and str(os.getpid()) in err
        assert sorted(os.listdir(out)) == ["run.lock"]  # nothing else was written
    assert not (out / "run.lock").exists()


def test_stale_lock_of_a_dead_run_is_taken_over(cifar10_train_dir, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    import socket

    lock = {"host": socket.gethostname(), "pid": dead_pid(), "started": "earlier"}
    (out / "run.lock").write_text(json.dumps(lock))
    metrics = trainer.train(tiny_config(cifar10_train_dir, out, epochs=1))
    assert metrics["final"]["epoch"] == 1
    assert "stale lock" in caplog.text and not (out / "run.lock").exists()


def test_a_lock_of_another_host_names_it(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"host": "gpu-node-7", "pid": 1}))
    with pytest.raises(rundir.RunDirectoryInUseError, match="gpu-node-7.*delete"):
        rundir.RunLock(str(tmp_path)).acquire()


def test_finished_run_is_left_alone_unless_overwrite(cifar10_train_dir, tmp_path, caplog):
    out = tmp_path / "run"
    config = tiny_config(cifar10_train_dir, out, epochs=1)
    trainer.train(config)
    assert rundir.run_state(str(out)) == "finished"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    metrics = trainer.train(config)
    assert "is finished" in caplog.text and metrics["final"]["epoch"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "notes.txt"} == stamps
    # --overwrite starts a new run: the run's files are new, the user's file stays.
    trainer.train(tiny_config(cifar10_train_dir, out, epochs=1, overwrite=True))
    assert (out / "model.keras").stat().st_mtime_ns > stamps["model.keras"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "change, named",
    [({"dim": 32}, "dim: 16 -> 32"), ({"epochs": 3}, "epochs: 1 -> 3"),
     ({"lr_max": 0.02}, "lr_max: 0.01 -> 0.02")],
)  # fmt: skip
def test_resume_that_trains_something_else_is_refused(cifar10_train_dir, tmp_path, change, named):
    out = tmp_path / "run"
    trainer.train(tiny_config(cifar10_train_dir, out, epochs=1))
    (out / "backup").mkdir()  # as an interrupted run leaves it
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=f"trained something else: .*{named}.*--overwrite"):
        trainer.train(tiny_config(cifar10_train_dir, out, **change))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # How it runs may change: verbosity, the backup frequency.
    rundir.check_resume(
        str(out), trainer.resolve_config(tiny_config(cifar10_train_dir, out, epochs=1,
                                                     verbose=1, backup_freq=5)).to_dict()
    )  # fmt: skip


def test_resume_of_a_run_from_an_older_version(tmp_path):
    """A key the saved config lacks (added since the run started) counts as its default: the
    run resumes with the default and is refused with another value."""
    defaults = {"epochs": 1, "initialization": "keras"}
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 1}))
    rundir.check_resume(str(tmp_path), {"epochs": 1, "initialization": "keras"}, defaults)
    with pytest.raises(ValueError, match="initialization: 'keras' -> 'pytorch'"):
        rundir.check_resume(str(tmp_path), {"epochs": 1, "initialization": "pytorch"}, defaults)
