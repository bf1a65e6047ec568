"""Train a ConvMixer from the command line: a named recipe plus overrides.

CIFAR-10 with the paper's recipe (TFDS downloads it on first use)::

    python -m training.train --recipe cifar10_convmixer_256_8

The same recipe on the image folder (last 10% of each class held out for validation)::

    python -m training.train --recipe cifar10_convmixer_256_8 \\
        --data-dir DATA/cifar10/train --output-dir runs/c10_folder

A tiny model for a minute, any recipe key as ``--key value`` or ``--set key=value``::

    python -m training.train --recipe cifar10_convmixer_256_8 \\
        --data-dir DATA/cifar10/train \\
        --dim 64 --depth 2 --epochs 2 --batch-size 64 --limit-per-class 100 --set lr_max=0.01

Rerunning a command whose run was interrupted (Ctrl-C, kill -9, preemption) resumes at the step
after the last backup in ``<output-dir>/backup`` (50 per epoch by default), inside the epoch.
``--list-recipes`` lists the recipes, ``--print-config`` prints the resolved config and exits,
``--benchmark-input N`` times N batches of the training input pipeline alone (images/s) and
exits. Each prints one JSON line on stdout; Keras' progress and the logs go to stderr.

Several devices or hosts: ``--strategy mirrored`` (and the other keys that
:mod:`training.distribute` reads), or ``python -m training.launch`` for multi-worker runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Sequence

from convmixer_tf import cli, files
from training import config as config_lib

PROG = "python -m training.train"
# The documented options, mapped to config keys. Any other config key works as --key value.
NAMED_OPTIONS = {
    "--preset": "model",
    "--dim": "dim",
    "--depth": "depth",
    "--kernel-size": "kernel_size",
    "--patch-size": "patch_size",
    "--data-dir": "data_dir",
    "--data": "data_dir",
    "--dataset": "dataset",
    "--epochs": "epochs",
    "--batch-size": "batch_size",
    "--image-size": "image_size",
    "--output-dir": "output_dir",
}


def _dest(option: str) -> str:
    return "option_" + option[2:].replace("-", "_")


def _option_of(key: str) -> str:
    """The option a config key is typed as: ``--key``, unless it has another name (``model``:
    ``--preset``, a variant name, since ``--model`` means a model file everywhere)."""
    plain = "--" + key.replace("_", "-")
    named = [option for option, k in NAMED_OPTIONS.items() if k == key]
    return plain if not named or plain in named else named[0]


def _keys_epilog() -> str:
    """Every config key as an option, with its default (without a recipe) and meaning."""
    defaults = config_lib.TrainConfig()
    lines = [
        "Every config key is also an option (--key value, or --set key=value; booleans: --ema,",
        "--no-hflip). Defaults without a recipe; --recipe NAME --print-config shows a recipe's:",
        "",
    ]
    for key in config_lib.field_names():
        value = getattr(defaults, key)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        option = _option_of(key)
        known_as = "" if option == "--" + key.replace("_", "-") else f"; recipe key {key}"
        lines.append(f"  {option} ({shown}{known_as}): {config_lib.HELP[key]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=_keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", help="a recipe name (training/recipes/) or a .json path")
    for option, key in NAMED_OPTIONS.items():
        parser.add_argument(
            option,
            dest=_dest(option),
            metavar=option[2:].replace("-", "_").upper(),
            help=config_lib.HELP[key],
        )
    parser.add_argument("--model", dest=_dest("--preset"), action=cli.DeprecatedAlias,
                        new_option="--preset", help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument(
        "--benchmark-input", type=cli.positive_int, metavar="N",
        help="time N batches of the input pipeline",
    )  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def _parse_extra(extra: Sequence[str]) -> dict[str, str]:
    """``--key value``, ``--key=value``, ``--flag`` (true) and ``--no-flag`` (false)."""
    overrides, i = {}, 0
    bools = {
        name
        for name, hint in typing.get_type_hints(config_lib.TrainConfig).items()
        if hint in (bool, bool | None)
    }
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ValueError(f"Unexpected argument {token!r}: options are --key value.")
        key, has_value, value = token[2:].partition("=")
        name = key.replace("-", "_")
        if not has_value:
            if name in bools and (i + 1 == len(extra) or extra[i + 1].startswith("--")):
                value = "true"
            elif name.startswith("no_") and name[3:] in bools:
                name, value = name[3:], "false"
            elif i + 1 < len(extra):
                i += 1
                value = extra[i]
            else:
                raise ValueError(f"Option {token!r} needs a value.")
        overrides[name] = value
        i += 1
    return overrides


def resolve_config(argv: Sequence[str]) -> tuple[config_lib.TrainConfig, argparse.Namespace]:
    """Parses the command line into a checked config (recipe, then the overrides in order).

    Raises:
        ValueError: an unknown recipe, config key or bad value (naming it).

    Example:
        >>> config, _ = resolve_config(["--recipe", "cifar10_convmixer_256_8", "--epochs", "3"])
        >>> config.epochs
        3
    """
    args, extra = build_parser().parse_known_args(argv)
    config = config_lib.from_recipe(args.recipe) if args.recipe else config_lib.TrainConfig()
    overrides: dict[str, str | None] = {}
    for option, key in NAMED_OPTIONS.items():
        value = getattr(args, _dest(option))
        if value is not None:
            overrides[key] = value
    if overrides.get("data_dir") is not None:
        overrides["dataset"] = None  # an image folder replaces the recipe's TFDS dataset
    elif "dataset" in overrides:
        overrides["data_dir"] = None
    overrides.update(_parse_extra(extra))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE. Received: {item!r}")
        overrides[key.strip()] = value
    config = config_lib.apply_overrides(config, overrides)
    if config.data_dir is None and config.dataset is None:
        raise ValueError("No data: give --data-dir DIR (an image folder) or --dataset NAME (TFDS).")
    return config, args


def benchmark_input(config: config_lib.TrainConfig, batches: int) -> dict:
    """Images/s of the training input pipeline alone (decode, cache, augment, batch).

    The first epoch decodes and fills the cache; for splits of at most 100,000 images the timed
    batches come after that warm-up epoch (the steady state of a long run), else after 5.
    """
    from training import pipeline

    train_data = pipeline.make_train_dataset(config)
    iterator = iter(train_data.dataset)
    one_epoch = train_data.steps_per_epoch + 1
    warmup = one_epoch if one_epoch * config.batch_size <= 100_000 else 5
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return {
        "input_pipeline_images_per_s": round(batches * config.batch_size / seconds, 1),
        "batches": batches,
        "batch_size": config.batch_size,
        "seconds": round(seconds, 3),
    }


def run(argv: Sequence[str]) -> int:
    """Resolves the config and trains (or lists, prints, times) as ``argv`` asks."""
    if "--list-recipes" in argv:
        cli.emit({"recipes": config_lib.available_recipes()})
        return 0
    config, args = resolve_config(argv)
    if args.print_config:
        cli.emit(config.to_dict())
        return 0
    files.check_output_dir(config.output_dir)
    if args.benchmark_input:
        with cli.stdout_to_stderr():
            record = benchmark_input(config, args.benchmark_input)
        cli.emit(record)
        return 0

    from training import rundir, trainer  # imports TensorFlow and Keras

    try:
        with cli.stdout_to_stderr():  # Keras' progress bar
            metrics = trainer.train(config)
    except trainer.TrainingDivergedError as e:
        return cli.report(PROG, e, status=1)
    except KeyboardInterrupt:
        if args.debug:
            raise
        # On a line of its own: Keras' progress bar ends its lines with a carriage return.
        print(
            f"\n{PROG}: interrupted; the same command resumes from the last backup in "
            f"{os.path.join(config.output_dir, rundir.BACKUP_DIR)} (if one was written)",
            file=sys.stderr,
        )
        return 130
    if metrics:
        cli.emit({"output_dir": config.output_dir, **metrics["final"]})
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    # `kill` (and schedulers' preemption) sends SIGTERM: exit through Python, so that the run
    # lock is released and the temporaries removed (the backups make the rerun resume).
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 done, 1 diverged, 2 a user error)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    if threading.current_thread() is not threading.main_thread():
        return cli.guarded(PROG, "--debug" in argv, lambda: run(argv))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return cli.guarded(PROG, "--debug" in argv, lambda: run(argv))
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
