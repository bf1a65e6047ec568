"""convmixer_tf.files: atomic writes that survive crashes and clean up after dead writers."""

import os
import signal
import subprocess
import sys

import pytest

from convmixer_tf import files


def test_write_replaces_without_leftovers_and_with_normal_permissions(tmp_path):
    path = tmp_path / "out" / "model.tflite"
    files.write_atomic(path, b"first")
    files.write_atomic(path, "second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["model.tflite"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_exception_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("previous version")
    with pytest.raises(OSError, match="disk full"):
        with files.replacing(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half-written")
            raise OSError("disk full")
    assert path.read_text() == "previous version"
    assert os.listdir(tmp_path) == ["model.keras"]


def test_a_killed_writer_keeps_the_old_file_and_its_leftover_is_removed_later(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    code = (
        "import sys, time\n"
        "from convmixer_tf import files\n"
        "with files.replacing(sys.argv[1]) as tmp:\n"
        "    f = open(tmp, 'w'); f.write('half'); f.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"writing"
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(files.TEMP_PREFIX)]
    assert len(leftovers) == 1
    # A live writer's temporary is not touched by another writer.
    files.write_atomic(tmp_path / "other.txt", "x")
    assert os.path.exists(tmp_path / leftovers[0])
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert path.read_text() == "old"
    files.write_atomic(path, "new")
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "other.txt"]
    assert path.read_text() == "new"


def test_leftovers_of_other_hosts_are_kept(tmp_path):
    other = tmp_path / f"{files.TEMP_PREFIX}another-host~1~abcd0123~model.keras"
    other.write_text("another machine is writing this")
    assert files.remove_stale_temporaries(tmp_path) == []
    assert other.exists()


def test_writing_onto_a_directory_or_under_a_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        files.write_atomic(tmp_path, b"x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        files.write_atomic(tmp_path / "file" / "model.tflite", b"x")


def test_a_folder_moved_aside_by_a_dead_writer_is_put_back(tmp_path):
    """Killed between the two renames of a folder replacement: the old folder comes back."""
    import socket

    host = socket.gethostname().replace("~", "_")
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # a pid that no longer exists
    moved = tmp_path / f"{files.TEMP_PREFIX}{host}~{process.pid}~abcd0123~served{files.OLD_SUFFIX}"
    moved.mkdir()
    (moved / "saved_model.pb").write_text("the previous SavedModel")
    files.write_atomic(tmp_path / "other.txt", "x")  # any later write into the folder
    assert (tmp_path / "served" / "saved_model.pb").read_text() == "the previous SavedModel"
    assert sorted(os.listdir(tmp_path)) == ["other.txt", "served"]


def test_an_output_folder_that_cannot_be_written_is_refused_before_work(tmp_path, monkeypatch):
    # (as root, permissions do not stop writes: the check's os.access is what is tested)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        files.os, "access", lambda p, mode: p != str(locked) and real_access(p, mode)
    )
    with pytest.raises(PermissionError, match=r"'.*locked/run/new' cannot be written: .*locked'"):
        files.check_output_dir(locked / "run" / "new")
    with pytest.raises(PermissionError, match="no permission to write in"):
        files.check_writable(locked / "m.tflite")
    assert files.check_output_dir(tmp_path / "free") == str(tmp_path / "free")
    assert files.check_output_dir("gs://bucket/run") == "gs://bucket/run"
    assert os.listdir(locked) == []
