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
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

from benchmarks import REPO_ROOT
from training import augment


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-python", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--magnitude", type=int, default=12)
    args = parser.parse_args(argv)

    classes = sorted(os.listdir(args.data_dir))
    files = [
        os.path.join(args.data_dir, name, file)
        for i in range(args.images)
        for name in [classes[i % len(classes)]]
        for file in [sorted(os.listdir(os.path.join(args.data_dir, name)))[i // len(classes)]]
    ]
    images = np.stack([tf.io.decode_image(tf.io.read_file(f), 3).numpy() for f in files])
    folder = tempfile.mkdtemp()
    inputs, outputs = os.path.join(folder, "in.npz"), os.path.join(folder, "out.npz")
    np.savez(inputs, images=images)
    command = [args.peers_python, "-m", "benchmarks.peer_randaugment", "--images", inputs,
               "--output", outputs, "--magnitude", str(args.magnitude)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"torchvision's run failed:\n{done.stderr[-3000:]}")
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
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
