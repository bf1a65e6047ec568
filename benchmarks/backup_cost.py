"""What one exact-resume backup costs for the paper's largest model: time and bytes.

Builds ConvMixer-1536/20 (51.6 M parameters) with its recipe's optimizer (AdamW, optionally
EMA), builds the optimizer state, then times :func:`training.resume.save_state` (write, fsync,
rename) and :func:`training.resume.restore_state` and reports the file size and, with
``--step-seconds`` (the training step time of your machine), the share of training time that
backups at the default frequency take and the steps a preemption loses.

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.backup_cost --output-dir /tmp/backup_cost
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from convmixer_tf import cli, files
from training import config as config_lib


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.backup_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--recipe", default="imagenet_convmixer_1536_20",
                        choices=config_lib.available_recipes())  # fmt: skip
    parser.add_argument("--output-dir", required=True, type=cli.output_path,
                        help="where the backup is written")  # fmt: skip
    parser.add_argument("--repeats", type=cli.positive_int, default=3)
    parser.add_argument("--steps-per-epoch", type=cli.positive_int, default=2002,
                        help="ImageNet at 640")  # fmt: skip
    parser.add_argument("--step-seconds", type=cli.positive_float, default=None)
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Measures; prints one JSON line."""
    files.check_output_dir(args.output_dir)
    from training import resume, trainer

    config = config_lib.apply_overrides(
        config_lib.from_recipe(args.recipe), {"data_dir": "unused", "dataset": None}
    )
    model = trainer.build_model(config, 1000, "keras")
    trainer.compile_model(model, config, args.steps_per_epoch)
    model.optimizer.build(model.trainable_variables)
    saves, restores = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        path = resume.save_state(model, args.output_dir, step=1, mid_epoch=False)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        resume.restore_state(model, args.output_dir)
        restores.append(time.perf_counter() - start)
    freq = resume.default_backup_freq(args.steps_per_epoch)
    record = {
        "recipe": args.recipe,
        "parameters": model.count_params(),
        "state_variables": {k: len(v) for k, v in resume.state_variables(model).items()},
        "bytes": os.path.getsize(path),
        "save_s": [round(t, 2) for t in saves],
        "restore_s": [round(t, 2) for t in restores],
        "backup_every_steps": freq,
        "steps_lost_per_preemption_at_most": freq,
        "share_of_epoch_lost_at_most": round(freq / args.steps_per_epoch, 4),
    }
    if args.step_seconds:
        record["backup_time_share"] = round(min(saves) / (freq * args.step_seconds), 4)
    cli.emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
