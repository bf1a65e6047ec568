"""torchvision's side of ``python -m benchmarks.randaugment_check``: every RandAugment
operation of ``torchvision.transforms.RandAugment`` at one magnitude bin, both signs, on the
given 8-bit images (``--images``, an .npz with ``images`` (N, H, W, 3) uint8); writes the
results to ``--output`` (.npz, key ``OP_SIGN``). Runs in the peers' environment with
torchvision installed; never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from convmixer_tf import cli, files


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.peer_randaugment", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--images", required=True, type=cli.input_file, help="an .npz: images")
    parser.add_argument("--output", required=True, type=cli.output_path, help="the .npz to write")
    parser.add_argument("--magnitude", type=cli.nonnegative_int, default=12)
    parser.add_argument("--bins", type=cli.positive_int, default=31)
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Applies every op; writes the .npz; prints one JSON line."""
    if args.magnitude >= args.bins:
        raise ValueError(
            f"--magnitude must be below --bins ({args.bins}). Received: {args.magnitude}"
        )
    files.check_writable(args.output)
    files.check_not_input({"--output": args.output}, {"--images": args.images})
    cli.require_peers("torch", "torchvision")
    import torch
    from torchvision.transforms import InterpolationMode, RandAugment
    from torchvision.transforms.autoaugment import _apply_op

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
    with files.replacing(args.output) as tmp, open(tmp, "wb") as f:
        np.savez(f, **results)
    cli.emit({"output": args.output, "ops": sorted(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
