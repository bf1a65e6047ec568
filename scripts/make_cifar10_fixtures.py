"""Regenerates the test fixture ``tests/fixtures/cifar10/<class>/NNNN.jpg``: the first
``--per-class`` JPEG files (sorted by name) of each class of a CIFAR-10 image folder, copied
byte for byte, so that the tests run in a clone with nothing beside it.

    python scripts/make_cifar10_fixtures.py --data-dir DATA/cifar10/train

Refuses to write more than 1 MB in all (the repository carries the files).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from convmixer_tf import cli, files  # noqa: E402

TARGET = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cifar10"
MAX_BYTES = 1_000_000


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="scripts/make_cifar10_fixtures.py", description=__doc__)
    parser.add_argument("--data-dir", required=True, type=cli.input_dir,
                        help="CIFAR-10 class folders DIR/<class>/<image>.jpg")  # fmt: skip
    parser.add_argument("--per-class", type=cli.positive_int, default=40)
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    source = pathlib.Path(args.data_dir)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    chosen = {name: sorted((source / name).glob("*.jpg"))[: args.per_class] for name in classes}
    total = sum(p.stat().st_size for paths in chosen.values() for p in paths)
    if total > MAX_BYTES:
        raise ValueError(f"{total} bytes is above the fixture's limit of {MAX_BYTES}.")
    files.check_not_input({"fixture": TARGET}, {"--data-dir": source})
    with files.replacing(TARGET, folder=True) as tmp:
        for name, paths in chosen.items():
            os.makedirs(os.path.join(tmp, name))
            for path in paths:
                shutil.copyfile(path, os.path.join(tmp, name, path.name))
    cli.emit({"output": str(TARGET), "classes": len(classes), "bytes": total})
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
