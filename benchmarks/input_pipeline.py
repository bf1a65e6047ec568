"""Input pipeline throughput against the training step it feeds, in one process.

Times, in order: a 1024x1024 float32 matmul (the machine's state: other processes share the
CPU), the training pipeline of a recipe (first epoch: decode + cache + augment; then cached
batches), the evaluation pipeline (first and cached pass), the real training step of the
recipe's model (``training.trainer.build_training``) at ``--train-batch-size``, and the matmul
again. Prints one JSON line; compare numbers within one run only.

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.input_pipeline \\
        --recipe cifar10_convmixer_256_8 --data-dir ../shared/data/cifar10/train
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from convmixer_tf import cli
from training.config import apply_overrides, available_recipes, from_recipe

MATMUL_SIZE = 1024


def matmul_gflops(repeats: int = 20) -> float:
    """GFLOP/s of a float32 matmul of MATMUL_SIZE squared matrices (:mod:`training.measure`)."""
    from training import measure

    return measure.matmul_peak_flops(MATMUL_SIZE, repeats) / 1e9


def images_per_second(iterator, batches: int, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.input_pipeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--recipe", default="cifar10_convmixer_256_8", choices=available_recipes())
    parser.add_argument("--data-dir", required=True, type=cli.input_dir,
                        help="image folder DIR/<class>/<image>")  # fmt: skip
    parser.add_argument("--cached-batches", type=cli.positive_int, default=30)
    parser.add_argument("--train-batch-size", type=cli.positive_int, default=128)
    parser.add_argument("--train-steps", type=cli.positive_int, default=4)
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Measures; prints one JSON line."""
    from training import data, pipeline, trainer

    result = {"matmul_gflops_start": round(matmul_gflops(), 1)}
    config = apply_overrides(from_recipe(args.recipe), {"data_dir": args.data_dir, "dataset": None})
    train_data = pipeline.make_train_dataset(config)
    iterator = iter(train_data.dataset)
    first = images_per_second(iterator, train_data.steps_per_epoch + 1, config.batch_size)
    result["train_pipeline_first_epoch_img_s"] = round(first, 1)
    cached = images_per_second(iterator, args.cached_batches, config.batch_size)
    result["train_pipeline_cached_img_s"] = round(cached, 1)

    val_ds, _ = data.load_dataset(
        data_dir=args.data_dir,
        split="validation",
        image_size=config.image_size,
        batch_size=config.batch_size,
        crop_pct=config.crop_pct,
        interpolation=config.interpolation,
    )
    for name in ("eval_pipeline_first_pass_img_s", "eval_pipeline_cached_img_s"):
        start = time.perf_counter()
        count = sum(int(images.shape[0]) for images, _ in val_ds)
        result[name] = round(count / (time.perf_counter() - start), 1)

    step_config = apply_overrides(
        config,
        {
            "batch_size": args.train_batch_size,
            "steps_per_epoch": args.train_steps,
            "val_split": None,
            "verbose": 0,
        },
    )
    training = trainer.build_training(step_config)
    training.model.fit(training.train_ds, steps_per_epoch=2, epochs=1, verbose=0)  # trace
    start = time.perf_counter()
    training.model.fit(training.train_ds, steps_per_epoch=args.train_steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    result["train_step_img_s"] = round(args.train_steps * args.train_batch_size / seconds, 1)
    result["train_batch_size"] = args.train_batch_size
    result["pipeline_over_train_step"] = round(cached / result["train_step_img_s"], 1)
    result["matmul_gflops_end"] = round(matmul_gflops(), 1)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    cli.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
