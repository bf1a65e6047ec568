"""Our RandAugment operations against torchvision's, op by op, on real images.

    python -m benchmarks.randaugment_check --peers-python .torchvenv/bin/python \
        --data-dir ../shared/data/cifar10/train

Needs torchvision in the peers' environment (``pip install torchvision``, the version that
matches requirements-bench.txt's torch). For every operation of
``torchvision.transforms.RandAugment`` at magnitude bin ``--magnitude`` (both signs), prints the
fraction of pixel values equal to torchvision's and the mean absolute difference (0-255 scale)
over ``--images`` images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

import numpy as np

from benchmarks import REPO_ROOT
from convmixer_tf import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.randaugment_check", description=__doc__.splitlines()[0]
    )
    cli.add_peers_python_argument(parser, required=True)
    parser.add_argument("--data-dir", required=True, type=cli.input_dir,
                        help="image folder DIR/<class>/<image>")  # fmt: skip
    parser.add_argument("--images", type=cli.positive_int, default=64)
    parser.add_argument("--magnitude", type=cli.nonnegative_int, default=12,
                        help="magnitude bin, 0-30")  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Compares every op with torchvision's; rows on stderr, all of them as one JSON line."""
    if args.magnitude > 30:
        raise ValueError(f"--magnitude must be at most 30. Received: {args.magnitude}")
    import tensorflow as tf

    from training import augment, data

    folder = data.scan_image_folder(args.data_dir, split="all")
    by_class = [
        [p for p, y in zip(folder.paths, folder.labels, strict=True) if y == label]
        for label in range(len(folder.class_names))
    ]
    # Class by class in turn: the first image of every class, then the second, ...
    paths = [p for group in itertools.zip_longest(*by_class) for p in group if p][: args.images]
    images = np.stack([data.decode_image_file(tf.constant(p)).numpy() for p in paths])
    with tempfile.TemporaryDirectory(prefix="convmixer_randaugment_") as folder:
        inputs, outputs = os.path.join(folder, "in.npz"), os.path.join(folder, "out.npz")
        np.savez(inputs, images=images)
        command = [args.peers_python, "-m", "benchmarks.peer_randaugment", "--images", inputs,
                   "--output", outputs, "--magnitude", str(args.magnitude)]  # fmt: skip
        cli.run_command(command, f"torchvision's run ({args.peers_python})", cwd=REPO_ROOT)
        rows = []
        with np.load(outputs) as theirs:
            for key in theirs.files:
                name, sign = key.rsplit("_", 1)
                op = augment.RANDAUGMENT_OPS.index(name)
                ours = np.stack([
                    augment.rand_augment_op(tf.constant(image, tf.float32), op, int(sign),
                                            args.magnitude / 30).numpy()
                    for image in images
                ])  # fmt: skip
                difference = np.abs(ours - theirs[key].astype(np.float32))
                rows.append({"op": name, "sign": int(sign),
                             "equal": round(float(np.mean(difference == 0)), 4),
                             "mean_abs_diff": round(float(difference.mean()), 3),
                             "max_abs_diff": float(difference.max())})  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        cli.emit({"magnitude": args.magnitude, "images": len(images), "ops": rows})
        return 0


if __name__ == "__main__":
    sys.exit(main())
