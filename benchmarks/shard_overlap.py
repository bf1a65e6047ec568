"""Check: do 2 workers read disjoint shards of an image folder in one epoch? (about 1 minute)

Launches 2 local workers (MultiWorkerMirroredStrategy); each builds the real training pipeline
(training.pipeline, augmentation off so an image's pixels identify it) with the DATA shard policy
and hashes every image it gets during one epoch. Prints per worker how many it saw and how many
both saw: 0 when the shards are disjoint (the DATA policy keeps every N-th element of each
worker's stream, so ``training.distribute.with_shard_policy`` makes the maps keep their order).

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.shard_overlap --data-dir DATA/cifar10/train
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys

from convmixer_tf import cli


def worker(data_dir: str, limit_per_class: int) -> None:
    """One worker: prints ``SEEN <json list of image hashes>`` for one epoch."""
    from training import distribute

    strategy = distribute.make_strategy({"strategy": "multi_worker"})

    from training import pipeline
    from training.config import TrainConfig

    config = TrainConfig(
        data_dir=data_dir,
        limit_per_class=limit_per_class, image_size=16, batch_size=20, randaugment_ops=0,
        hflip=False, scale=(1.0, 1.0), val_split="",
    )  # fmt: skip
    train_data = pipeline.make_train_dataset(config)
    policy = distribute.resolve_shard_policy("auto", image_folder=True)
    dataset = distribute.with_shard_policy(train_data.dataset, policy)
    batches = iter(strategy.experimental_distribute_dataset(dataset))
    seen = []
    for _ in range(train_data.steps_per_epoch):
        images, _ = next(batches)
        for local in strategy.experimental_local_results(images):
            seen += [hashlib.md5(image.tobytes()).hexdigest() for image in local.numpy()]
    print("SEEN " + json.dumps(seen), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.shard_overlap", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data-dir", required=True, type=cli.input_dir,
                        help="image folder DIR/<class>/<image> (10 classes)")  # fmt: skip
    parser.add_argument("--limit-per-class", type=cli.positive_int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Launches the workers, compares what they saw; prints one JSON line."""
    if args.worker:
        worker(args.data_dir, args.limit_per_class)
        return 0
    from training import launch

    program = [sys.executable, "-m", "benchmarks.shard_overlap", "--worker"]
    program += ["--data-dir", args.data_dir, "--limit-per-class", str(args.limit_per_class)]
    output = io.StringIO()
    status = launch.launch(program, 2, output=output)
    if status:
        print(output.getvalue()[-3000:], file=sys.stderr)
        return status
    seen = {}
    for line in output.getvalue().splitlines():
        prefix, _, text = line.partition("] ")
        if text.startswith("SEEN "):
            seen[prefix + "]"] = json.loads(text.removeprefix("SEEN "))
    first, second = (set(seen[key]) for key in sorted(seen))
    result = {
        "images_in_split": 10 * args.limit_per_class,
        "seen_per_worker": [len(seen[key]) for key in sorted(seen)],
        "seen_by_both": len(first & second),
        "seen_by_neither": 10 * args.limit_per_class - len(first | second),
    }
    cli.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
