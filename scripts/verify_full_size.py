"""Checks the import of a full-size checkpoint against PyTorch's logits, and times it.

    D=$(mktemp -d)
    .torchvenv/bin/python scripts/make_pretrained_fixtures.py --full-size convmixer_768_32 \\
        --official --output-dir $D
    PYTHONPATH=. python scripts/verify_full_size.py --model convmixer_768_32 --dir $D

Builds the preset in Keras, loads ``<dir>/<model>.safetensors`` or ``.pth.tar`` (whichever
exists) with :func:`convmixer_tf.load_pretrained`, runs the saved 224x224 pixels and prints the
max abs difference from PyTorch's logits, the largest logit, and the load time.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import convmixer_tf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(convmixer_tf.PRESETS))
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    candidates = [
        os.path.join(args.dir, f"{args.model}{ext}") for ext in (".safetensors", ".pth.tar")
    ]
    path = next(p for p in candidates if os.path.exists(p))
    with np.load(os.path.join(args.dir, f"{args.model}_expected.npz")) as expected:
        pixels, reference = expected["pixels"], expected["logits"]
    model = convmixer_tf.create_model(args.model)
    start = time.perf_counter()
    info = convmixer_tf.load_pretrained(model, path)
    seconds = time.perf_counter() - start
    logits = model.predict(pixels, verbose=0)
    print(
        f"{args.model} ({info.scheme} names, {os.path.getsize(path) / 2**20:.0f} MiB): "
        f"load {seconds:.1f} s, max abs diff {np.abs(logits - reference).max():.2e}, "
        f"max |logit| {np.abs(reference).max():.2f}, "
        f"top-1 agrees: {bool(logits.argmax() == reference.argmax())}"
    )


if __name__ == "__main__":
    main()
