"""The conventions every command line of this project follows (``convmixer_tf``, ``training``,
``export``).

- ``build_parser()`` builds the parser (an :class:`ArgumentParser`, whose usage errors are one
  line too); ``main(argv=None) -> int`` returns the exit code;
  ``if __name__ == "__main__": sys.exit(main())``.
- One option name means one kind of thing everywhere: ``--output`` a file, ``--output-dir`` a
  folder, ``--model`` a model file (``.keras``, ``.tflite``), ``--preset`` a variant name
  (``convmixer_tf.PRESETS``), ``--peers-python`` the Python of ``requirements-bench.txt``.
- Values are checked when parsed, before any work: numbers by the argparse types here
  (:func:`positive_int`, :func:`finite_float`, ...: finite and in range), input files by
  :func:`input_file` / :func:`input_dir` / :func:`input_path` (they exist), and no output may be
  one of the command's inputs (:func:`convmixer_tf.files.check_not_input`).
- A user's mistake (a missing or corrupt file, a bad value, a model that does not fit) is one
  line on stderr naming the problem, exit code 2, no traceback; ``--debug`` shows the traceback.
  :func:`run` does this around a command's work.
- Machine-readable results are exactly one JSON line on stdout (:func:`emit`: strict JSON, a
  non-finite number becomes ``null``); progress, tables and everything else, the TFLite
  converter's C++ logging included, go to stderr (:func:`stdout_to_stderr`) or to the files
  named by ``--output`` / ``--output-dir``.

Example:
    >>> import argparse
    >>> from convmixer_tf import cli
    >>> parser = argparse.ArgumentParser(prog="demo")
    >>> cli.add_debug_argument(parser)
    >>> def work(args):
    ...     raise ValueError("Image file 'x.jpg' is empty.")
    >>> cli.run(parser, work, [])  # prints "demo: error: Image file 'x.jpg' is empty." on stderr
    2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from convmixer_tf import image_files

USER_ERROR = 2


class CommandError(RuntimeError):
    """A program a command runs failed (a benchmark's peer in another Python, say): the message
    names it and ends with its last line on stderr, which says why."""


# Exceptions that mean "the input is wrong", not "the program is wrong". Library code raises
# ValueError naming the file or value; OSError covers files that cannot be read or written;
# CommandError, a child program that failed (most often a Python without the peers' packages).
USER_ERRORS = (ValueError, OSError, CommandError)


class UsageError(ValueError):
    """A command line argparse cannot parse (unknown option, bad value, missing option)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are a :class:`UsageError` (one line, exit code 2 through
    :func:`run`) instead of the usage text and ``sys.exit``; ``--help`` works as usual."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _checked(kind: type, test: Callable[[Any], bool], what: str, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}. Received: {text!r}")
        return value

    parse.__name__ = name
    parse.what = what  # for messages (and the entry-point tests)
    parse.accepts = lambda value: (  # the same rule for values given in Python
        not isinstance(value, bool)
        and isinstance(value, int if kind is int else int | float)
        and math.isfinite(value)
        and test(value)
    )
    return parse


# argparse types: numbers that are finite and in range (the message names the rule).
positive_int = _checked(int, lambda v: v > 0, "a positive integer", "positive_int")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0", "nonnegative_int")
finite_float = _checked(float, lambda v: True, "a finite number", "finite_float")
positive_float = _checked(float, lambda v: v > 0, "a positive finite number", "positive_float")
nonnegative_float = _checked(float, lambda v: v >= 0, "a finite number >= 0", "nonnegative_float")
fraction = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]", "fraction")
held_out_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)", "held_out_fraction")
# A square image side: its pixels within the decoding limit (convmixer_tf.image_files).
image_size = _checked(
    int, lambda v: 0 < v and v * v <= image_files.max_image_pixels(),
    f"a positive size whose square is at most {image_files.MAX_IMAGE_PIXELS} pixels (the image "
    f"limit, {image_files.LIMIT_VARIABLE})", "image_size",
)  # fmt: skip
NUMBER_TYPES = (positive_int, nonnegative_int, finite_float, positive_float, nonnegative_float,
                fraction, held_out_fraction, image_size)  # fmt: skip


def input_file(text: str) -> str:
    """argparse type: an existing file (not a folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"file not found: {text!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    return text


def input_dir(text: str) -> str:
    """argparse type: an existing folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    if not os.path.isdir(text):
        what = "is a file, not a directory" if os.path.exists(text) else "directory not found"
        raise argparse.ArgumentTypeError(f"{what}: {text!r}")
    return text


def input_path(text: str) -> str:
    """argparse type: an existing file or folder (a ``.keras`` file or a SavedModel)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"not found: {text!r}")
    return text


def output_path(text: str) -> str:
    """argparse type: a path to write (not empty; checked for writability by the command)."""
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


INPUT_TYPES = (input_file, input_dir, input_path)


def emit(record: Any) -> None:
    """Prints ``record`` as the command's one JSON line on stdout (strict JSON: NaN and
    infinities become ``null``)."""
    print(json.dumps(finite_json(record), allow_nan=False), flush=True)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it is valid JSON.

    Example:
        >>> finite_json({"loss": float("nan"), "acc": [0.5, float("inf")]})
        {'loss': None, 'acc': [0.5, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


PEERS_HINT = (
    "run it with the Python of the peers' environment (python3.11 -m venv .torchvenv && "
    ".torchvenv/bin/pip install -r requirements-bench.txt)"
)


def require_peers(*modules: str) -> None:
    """A ValueError (one line, exit 2) if a peer library (torch, onnxruntime) is missing: the
    benchmarks' peer sides run in the peers' environment, not in this project's."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed here: {PEERS_HINT}.")


def add_peers_python_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--peers-python``: the Python of requirements-bench.txt (``--torch-python``: old name)."""
    parser.add_argument(
        "--peers-python", required=required, default=None, type=input_file,
        help="the Python of the peers' environment (requirements-bench.txt: PyTorch, ONNX "
        "Runtime)",
    )  # fmt: skip
    parser.add_argument(
        "--torch-python", dest="peers_python", type=input_file, action=DeprecatedAlias,
        new_option="--peers-python", help=argparse.SUPPRESS,
    )  # fmt: skip


def run_command(command: Sequence[str], what: str, cwd: str | None = None) -> str:
    """Runs ``command``; returns its stdout. If it cannot start or exits with an error, raises
    :class:`CommandError` naming ``what``, with the last line it wrote on stderr."""
    try:
        done = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise CommandError(f"{what} could not start: {_one_line(e)}") from e
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "(nothing on stderr)"
        raise CommandError(f"{what} failed with exit code {done.returncode}: {last}")
    return done.stdout


def run_json_command(command: Sequence[str], what: str, cwd: str | None = None) -> Any:
    """:func:`run_command` for a command of this convention: its last line on stdout, parsed."""
    lines = run_command(command, what, cwd).strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as e:
        raise CommandError(f"{what} printed no JSON result on stdout") from e


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )


def add_unsafe_argument(parser: argparse.ArgumentParser) -> None:
    """``--unsafe``: let model files run code (see :func:`convmixer_tf.load_model`)."""
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="load model files that hold code (Lambda layers, legacy HDF5): only files you trust",
    )


def run(
    parser: argparse.ArgumentParser,
    work: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parses ``argv``, runs ``work(args)``; a user error becomes one line and exit code 2.

    ``KeyboardInterrupt`` exits with 130 without a traceback, as shells expect.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return guarded(parser.prog, "--debug" in argv, lambda: work(parser.parse_args(argv)))


def guarded(prog: str, debug: bool, call: Callable[[], int | None]) -> int:
    """Runs ``call()``: a user error becomes one line on stderr and exit code 2, Ctrl-C exit
    code 130, both without a traceback unless ``debug``; returns the exit code."""
    try:
        status = call()
    except USER_ERRORS as e:
        if debug:
            raise
        return report(prog, e)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def report(prog: str, error: BaseException, status: int = USER_ERROR) -> int:
    """Prints ``error`` as one line ``<prog>: error: <message>`` on stderr; returns ``status``."""
    print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
    return status


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename!r}"
    return " ".join(text.split())


class DeprecatedAlias(argparse.Action):
    """An option's old spelling: stores into the new option's ``dest`` and warns.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--output-dir")
        >>> _ = parser.add_argument("--out-dir", dest="output_dir", action=DeprecatedAlias,
        ...                         new_option="--output-dir", help=argparse.SUPPRESS)
        >>> with warnings.catch_warnings(record=True):
        ...     parser.parse_args(["--out-dir", "bench"]).output_dir
        'bench'
    """

    def __init__(self, option_strings, dest, new_option: str, **kwargs):
        self.new_option = new_option
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        message = f"{option_string} is deprecated; use {self.new_option}"
        warnings.warn(message, FutureWarning, stacklevel=2)
        print(f"{parser.prog}: warning: {message}", file=sys.stderr)
        setattr(namespace, self.dest, values)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Sends everything written to stdout, by Python or by C++ (file descriptor 1), to stderr.

    The TFLite converter and TensorFlow log from C++ straight to the process's descriptors, so
    redirecting ``sys.stdout`` is not enough: descriptor 1 itself is pointed at descriptor 2
    for the duration, and restored after.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
