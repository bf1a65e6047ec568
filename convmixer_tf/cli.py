"""The conventions every command line of this project follows (``convmixer_tf``, ``training``,
``export``).

- ``build_parser()`` builds the argparse parser; ``main(argv=None) -> int`` returns the exit code;
  ``if __name__ == "__main__": sys.exit(main())``.
- ``--output`` names a file, ``--output-dir`` a folder.
- A user's mistake (a missing or corrupt file, a bad value, a model that does not fit) is one
  line on stderr naming the problem, exit code 2, no traceback; ``--debug`` shows the traceback.
  :func:`run` does this around a command's work.
- Machine-readable results are one JSON line on stdout; everything else, the TFLite converter's
  C++ logging included, goes to stderr (:func:`stdout_to_stderr`).

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
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence

USER_ERROR = 2
# Exceptions that mean "the input is wrong", not "the program is wrong". Library code raises
# ValueError naming the file or value; OSError covers files that cannot be read or written.
USER_ERRORS = (ValueError, OSError)


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
    args = parser.parse_args(argv)
    try:
        status = work(args)
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        return report(parser.prog, e)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{parser.prog}: interrupted", file=sys.stderr)
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
