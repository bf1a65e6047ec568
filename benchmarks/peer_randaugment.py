"""torchvision's side of ``python -m benchmarks.randaugment_check``: every RandAugment
operation of ``torchvision.transforms.RandAugment`` at one magnitude bin, both signs, on the
given 8-bit images (``--images``, an .npz with ``images`` (N, H, W, 3) uint8); writes the
results to ``--output`` (.npz, key ``OP_SIGN``). Runs in the peers' environment with
torchvision installed; never imports TensorFlow.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms.autoaugment import _apply_op


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--magnitude", type=int, default=12)
    parser.add_argument("--bins", type=int, default=31)
    args = parser.parse_args(argv)
    with np.load(args.images) as saved:
        images = torch.from_numpy(saved["images"]).permute(0, 3, 1, 2).contiguous()
    space = RandAugment(num_ops=1, magnitude=args.magnitude)._augmentation_space(
        args.bins, tuple(images.shape[-2:])
    )
    results = {}
    for name, (magnitudes, signed) in space.items():
        magnitude = float(magnitudes[args.magnitude]) if magnitudes.ndim > 0 else 0.0
        for sign in (1, -1) if signed else (1,):
            outs = [
                _apply_op(image, name, sign * magnitude, InterpolationMode.NEAREST, None)
                for image in images
            ]
            results[f"{name}_{sign}"] = torch.stack(outs).permute(0, 2, 3, 1).numpy()
    np.savez(args.output, **results)


if __name__ == "__main__":
    main()
