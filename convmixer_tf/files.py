"""Atomic file writes: every file this project writes goes through :func:`replacing`.

A file is written under a temporary name in its own folder, flushed to disk (``fsync``), then
renamed over the target (``os.replace``, atomic on POSIX): a reader, or a run resumed after a
crash, sees the old file or the new one, never a half-written one. Files get the usual
permissions (``0o666`` less the umask), as a plain ``open`` would give them.

The temporary name carries the writer's host and process id
(``.tmp~<host>~<pid>~<token>~<name>``), so that several workers may share an output folder: a
later write into the folder removes only the leftovers of writers on the same host whose process
no longer exists (a run killed during a save), never a file another writer is still writing.

Example:
    >>> import os, tempfile
    >>> from convmixer_tf import files
    >>> folder = tempfile.mkdtemp()
    >>> files.write_atomic(os.path.join(folder, "a.txt"), "first\\n")
    >>> files.write_atomic(os.path.join(folder, "a.txt"), "second\\n")
    >>> open(os.path.join(folder, "a.txt")).read(), os.listdir(folder)
    ('second\\n', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator

TEMP_PREFIX = ".tmp~"
OLD_SUFFIX = ".old"  # a folder moved aside while its replacement is renamed into place
_TEMP_NAME = re.compile(r"\.tmp~(?P<host>[^~]+)~(?P<pid>\d+)~[0-9a-f]+~(?P<name>.+)")


def _host() -> str:
    return socket.gethostname().replace("~", "_") or "localhost"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Removes the temporary files that dead writers on this host left in ``folder``.

    Returns the removed paths. Temporaries of live processes and of other hosts are kept. A
    folder a dead writer had moved aside (``....old``) is put back where it was if
    nothing replaced it, so that nothing is lost.
    """
    removed = []
    host = _host()
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        match = _TEMP_NAME.fullmatch(name)
        if not match or match["host"] != host or process_alive(int(match["pid"])):
            continue
        path = os.path.join(folder, name)
        if name.endswith(OLD_SUFFIX):
            target = os.path.join(folder, match["name"][: -len(OLD_SUFFIX)])
            if not os.path.lexists(target):
                os.replace(path, target)
                continue
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        removed.append(path)
    return removed


def _fsync(path: str) -> None:
    """Flushes one file or one directory entry list (not its contents) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Flushes a written file, or every file and folder of a written folder (a SavedModel)."""
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            for name in names:
                _fsync(os.path.join(root, name))
            _fsync(root)
    else:
        _fsync(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def check_writable(path: str | os.PathLike) -> str:
    """Checks that ``path`` can be written as a file (not a folder, its parent not a file).

    Cheap enough to run before expensive work; returns the path as a str.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"Output {path!r} is a directory; give a file name.")
    check_output_dir(os.path.dirname(os.path.abspath(path)))
    return path


def check_output_dir(path: str | os.PathLike) -> str:
    """Checks that ``path`` can be used as an output folder (it may not exist yet)."""
    path = os.fspath(path)
    if "://" in path:  # an object store (gs://, s3://): nothing to check here
        return path
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        what = "is a file" if probe == os.path.abspath(path) else f"is under the file {probe!r}"
        raise ValueError(f"Output directory {path!r} {what}, not a directory.")
    if probe and not os.access(probe, os.W_OK | os.X_OK):  # read-only mount, another's folder
        raise PermissionError(
            f"Output directory {path!r} cannot be written: no permission to write in {probe!r}."
        )
    return path


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, folder: bool = False) -> Iterator[str]:
    """Yields a temporary path beside ``path``; once the block succeeds, it replaces ``path``.

    With ``folder=True`` the block writes a folder (a SavedModel) and an existing folder at
    ``path`` is replaced (the caller checks that it may be); otherwise ``path`` must not be a
    folder.

    The temporary path ends with ``path``'s own name, so writers that check the extension (Keras'
    ``model.save``) accept it. If the block raises, ``path`` is untouched and the temporary is
    removed; if the process dies, the next write into the folder removes it.

    Example:
        >>> from convmixer_tf import files
        >>> with files.replacing("out/model.keras") as tmp:  # doctest: +SKIP
        ...     model.save(tmp)
    """
    if folder:
        path = os.path.normpath(os.fspath(path))
        check_output_dir(os.path.dirname(os.path.abspath(path)))
    else:
        path = check_writable(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent)
    name = f"{TEMP_PREFIX}{_host()}~{os.getpid()}~{secrets.token_hex(4)}~{os.path.basename(path)}"
    tmp = os.path.join(parent, name)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise RuntimeError(f"Nothing was written to the temporary file for {path!r}.")
        _fsync_tree(tmp)
        if os.path.isdir(tmp) and os.path.isdir(path):
            # A folder (SavedModel) cannot replace a folder atomically: move the old one aside
            # (a writer killed between the two renames leaves it, and the next write into the
            # folder puts it back: remove_stale_temporaries).
            old = f"{tmp}{OLD_SUFFIX}"
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync(parent)
    finally:
        _remove(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes ``data`` (bytes, or text as UTF-8) to ``path`` atomically (see :func:`replacing`)."""
    with replacing(path) as tmp:
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(tmp, "wb") as f:
            f.write(data)


def _same_or_inside(path: str, other: str) -> bool:
    """Whether ``path`` is ``other`` (same resolved path or the same inode) or lies inside
    the folder ``other``."""
    real, real_other = os.path.realpath(path), os.path.realpath(other)
    if real == real_other:
        return True
    with contextlib.suppress(OSError):
        if os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other):
            return True  # a hard link, or another name of the same file
    if os.path.isdir(other):
        return os.path.commonpath([real, real_other]) == real_other
    return False


def check_not_input(outputs, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuses a command whose output would overwrite one of its inputs, or land inside an
    input folder (a data folder would gain a class, a model folder a file).

    ``inputs`` maps an option name (used in the message) to a path; ``outputs`` too, or is a
    list of ``(option name, path)`` pairs (several files of one option). None paths are
    ignored. Paths are compared after resolving links, and by inode when both exist.

    Example:
        >>> check_not_input({"--output": "m.keras"}, {"--model": "./m.keras"})
        Traceback (most recent call last):
        ...
        ValueError: --output 'm.keras' is the input --model './m.keras': ...
    """
    for out_name, out in outputs.items() if isinstance(outputs, dict) else outputs:
        if out is None or "://" in os.fspath(out):
            continue
        for in_name, source in inputs.items():
            if source is None or "://" in os.fspath(source):
                continue
            out, source = os.fspath(out), os.fspath(source)
            if _same_or_inside(out, source):
                inside = os.path.isdir(source) and os.path.realpath(out) != os.path.realpath(source)
                where = "is inside" if inside else "is"
                raise ValueError(
                    f"{out_name} {out!r} {where} the input {in_name} {source!r}: it would be "
                    "overwritten or changed. Write the output somewhere else."
                )


def check_label(name: str, source: str = "class name") -> str:
    """Returns ``name`` if it is printable single-line text, else a ValueError naming it: one
    class must be one line in every labels file (``labels.txt``, ``class_names.json``, the
    .tflite's metadata)."""
    if not name or not name.isprintable():
        raise ValueError(
            f"{source} {name!r} is empty or holds a non-printable character (a newline, a tab, "
            "a control code): one class must be one line of text. Rename it."
        )
    return name


def write_all(contents: dict[str | os.PathLike, bytes | str]) -> None:
    """Writes several files all or nothing: each is written under a temporary name first, and
    only when every one is written are they renamed into place (if one fails, no file is
    replaced or created)."""
    with contextlib.ExitStack() as stack:
        for path, data in contents.items():
            tmp = stack.enter_context(replacing(path))
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
