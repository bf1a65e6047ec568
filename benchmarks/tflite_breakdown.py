"""Where the batch-1 .tflite time of a ConvMixer goes: the model against its parts.

Times, in one run with interleaved repeats, the fp32 and int8 .tflite of
- ``gelu``: the ConvMixer as exported (GELU);
- ``relu``: the same with ReLU (XNNPACK fuses it into the convs; int8 is one partition);
- ``convs``: the convolutions alone (stem, depthwise + residual add, pointwise, head), no
  activation and no BatchNorm: what the MAC bound counts,
and reports each latency over the bound ``2 * MACs / peak`` (float32 tf.matmul peak, same
thread count, measured before and after) and int8 over fp32. The differences between the rows
are the cost of GELU and of the BatchNorms, which the MAC bound does not count.

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.tflite_breakdown --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import convmixer_tf
from benchmarks.models import with_batch_norm_statistics
from convmixer_tf import cli
from export import tflite
from export.benchmark import latency_ms, matmul_peak_gflops, xnnpack_partitions
from training.measure import forward_macs


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.tflite_breakdown", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dim", type=cli.positive_int, default=256)
    parser.add_argument("--depth", type=cli.positive_int, default=8)
    parser.add_argument("--kernel-size", type=cli.positive_int, default=5)
    parser.add_argument("--patch-size", type=cli.positive_int, default=2)
    parser.add_argument("--image-size", type=cli.image_size, default=32)
    parser.add_argument("--threads", type=cli.positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=cli.positive_int, default=20,
                        help="invocations per measurement")  # fmt: skip
    parser.add_argument("--rounds", type=cli.positive_int, default=5,
                        help="interleaved measurements")  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def convs_only(args):
    """The ConvMixer's convolutions and residual adds alone (batch 1, raw converter input)."""
    import keras

    layers = keras.layers
    inputs = keras.Input((args.image_size, args.image_size, 3), batch_size=1)
    x = layers.Conv2D(args.dim, args.patch_size, strides=args.patch_size)(inputs)
    for _ in range(args.depth):
        x = layers.Add()([layers.DepthwiseConv2D(args.kernel_size, padding="same")(x), x])
        x = layers.Conv2D(args.dim, 1)(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Measures; one row per line on stderr, all rows as one JSON line."""
    if args.image_size % args.patch_size:
        raise ValueError(
            f"--image-size ({args.image_size}) must be a multiple of --patch-size "
            f"({args.patch_size})."
        )
    with cli.stdout_to_stderr():
        rows = _measure(args)
    cli.emit({"rows": rows})
    return 0


def _measure(args) -> list[dict]:
    size = args.image_size
    images = np.random.default_rng(1).uniform(0, 255, (64, size, size, 3)).astype("float32")
    arch = dict(
        dim=args.dim,
        depth=args.depth,
        kernel_size=args.kernel_size,
        patch_size=args.patch_size,
        input_shape=(size, size, 3),
        num_classes=10,
    )
    macs = forward_macs(convmixer_tf.ConvMixer(**arch))
    blobs = {}
    for activation in ("gelu", "relu"):
        model = with_batch_norm_statistics(convmixer_tf.ConvMixer(**arch, activation=activation))
        for fmt in ("fp32", "int8"):
            blobs[(activation, fmt)] = tflite.convert(model, fmt, calibration_images=images)
    plain = convs_only(args)
    for fmt in ("fp32", "int8"):
        blobs[("convs", fmt)] = bytes(tflite.make_converter(plain, fmt, images).convert())

    peaks = {t: [matmul_peak_gflops(t)] for t in args.threads}
    times = {(key, t): [] for key in blobs for t in args.threads}
    for _ in range(args.rounds):
        for t in args.threads:
            for key, blob in blobs.items():
                times[(key, t)].append(latency_ms(blob, t, repeats=args.repeats))
    for t in args.threads:
        peaks[t].append(matmul_peak_gflops(t))

    rows = []
    for t in args.threads:
        peak = max(peaks[t])
        bound_ms = 2 * macs / (peak * 1e9) * 1e3
        for (variant, fmt), blob in blobs.items():
            ms = float(np.median(times[((variant, fmt), t)]))
            fp32 = float(np.median(times[((variant, "fp32"), t)]))
            rows.append(
                dict(variant=variant, format=fmt, threads=t, ms=round(ms, 3),
                     over_bound=round(ms / bound_ms, 3), over_fp32=round(ms / fp32, 3),
                     partitions=xnnpack_partitions(blob, t), peak_gflops=round(peak, 1),
                     peaks_measured=[round(p, 1) for p in peaks[t]], bound_ms=round(bound_ms, 3))
            )  # fmt: skip
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(main())
