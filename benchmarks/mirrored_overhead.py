"""Overhead of MirroredStrategy over N logical CPU replicas against one replica, same process.

The host CPU is split into ``--replicas`` logical devices (training.distribute); the same model
then trains on the same synthetic batches (global batch ``--batch-size``) under the default
strategy (one replica) and under MirroredStrategy (N replicas), alternating ``--repeats`` times
so that load from other processes hits both alike. Prints img/s of each and their ratio.

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.mirrored_overhead --replicas 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
import time

from convmixer_tf import cli
from convmixer_tf.presets import PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.mirrored_overhead", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", default="convmixer_256_8", choices=list(PRESETS),
                        help="convmixer_tf preset")  # fmt: skip
    parser.add_argument("--model", dest="preset", action=cli.DeprecatedAlias,
                        new_option="--preset", help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--activation", default="relu", choices=("gelu", "relu"))
    parser.add_argument("--replicas", type=cli.positive_int, default=2)
    parser.add_argument("--batch-size", type=cli.positive_int, default=64, help="global batch")
    parser.add_argument("--steps", type=cli.positive_int, default=4,
                        help="timed steps per measurement")  # fmt: skip
    parser.add_argument("--warmup", type=cli.positive_int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=cli.positive_int, default=2,
                        help="alternating measurements")  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Times both strategies; prints one JSON line."""
    from training import distribute

    mirrored = distribute.make_strategy({"strategy": "mirrored", "cpu_replicas": args.replicas})
    import keras
    import numpy as np
    import tensorflow as tf

    import convmixer_tf

    preset = convmixer_tf.get_preset(args.preset)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, *preset.input_size, 3)
    images = rng.uniform(0, 255, shape).astype("float32")
    labels = rng.integers(0, preset.num_classes, args.batch_size).astype("int32")
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def build(strategy):
        with strategy.scope():
            model = convmixer_tf.create_model(
                args.preset, activation=args.activation, synchronized_bn=True
            )
            model.compile(
                optimizer=keras.optimizers.AdamW(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        model.fit(data, steps_per_epoch=args.warmup, epochs=1, verbose=0)
        return model

    models = {"1 replica": build(tf.distribute.get_strategy()), "mirrored": build(mirrored)}
    seconds = {name: 0.0 for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
            seconds[name] += time.perf_counter() - start
    images_seen = args.repeats * args.steps * args.batch_size
    result = {
        "model": f"{args.preset} ({args.activation})",
        "global_batch": args.batch_size,
        "replicas": mirrored.num_replicas_in_sync,
        "img_per_s": {name: round(images_seen / s, 2) for name, s in seconds.items()},
    }
    result["mirrored_over_single"] = round(seconds["1 replica"] / seconds["mirrored"], 3)
    cli.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
