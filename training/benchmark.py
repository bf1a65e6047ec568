"""Training throughput of the real training step, as a fraction of this machine's matmul peak.

Prints ONE JSON line (to stdout; logs go to stderr)::

    python -m training.benchmark --preset convmixer_256_8 --batch-size 128 --steps 5

The step timed is the one ``python -m training.train`` runs: :func:`training.trainer.build_training`
builds the strategy, pipeline and model from the recipe (default ``cifar10_convmixer_256_8``) and
compiles them (AdamW, one-cycle lr, clipping, label smoothing, metrics), and ``model.fit`` runs
``--warmup-steps`` steps (tracing) and then ``--steps`` timed steps. With ``--data synthetic``
(default) the pipeline's first batch is repeated from memory, so the number is the training
step's alone; ``--data real`` times the augmented pipeline too (it shares the same CPU cores).

FLOPs, from the model's layer shapes (no profiler):

* forward multiply-accumulates (MACs) per image: Conv2D ``H_out*W_out*k_h*k_w*C_in*C_out``,
  DepthwiseConv2D ``H_out*W_out*k_h*k_w*C_in*multiplier``, Dense ``C_in*C_out``;
* training FLOPs per image ``= 3 * forward MACs * 2``: the backward pass does about twice the
  forward's work (gradients of the inputs and of the weights), and a MAC is 2 FLOPs.
  Elementwise work (activations, BatchNorm, the optimizer) is not counted: it is overhead.

``img_per_s`` is the batch over the median step time (steady state); ``img_per_s_wall`` is the
timed images over the wall time of the timed ``fit()`` call (adds its per-call setup).

The peak is measured in the same process, with the same thread settings: the best time of a
float32 ``tf.matmul`` of two ``--peak-size`` square matrices (``2 * n**3`` FLOPs), measured
before and after the timed steps (the higher is used). ``fraction_of_peak`` =
``img_per_s * train_flops_per_image / peak_flops``. Other processes on the same cores lower both
numbers; the ratio is the comparable figure.

The FLOP count and the peak are :mod:`training.measure`'s, which ``export.benchmark`` and
``benchmarks/`` use too. The record names the precision (``float32`` or ``mixed_bfloat16`` on a
CPU, ``mixed_float16`` on a GPU) and the CPU's flags that matter (AVX-512, VNNI, BF16, AMX).

PyTorch in the same run: with the optional benchmark requirements (``requirements-bench.txt``)
in this environment or in the one ``--peers-python`` names, the same model, batch and optimizer
step (AdamW, label smoothing, clipping) are timed in PyTorch, eager float32 and eager bfloat16
autocast, channels_last (``benchmarks/peer_training.py``), after ours; the record gains their
img/s and ours over each (``--peers none`` skips them).

Example:
    >>> from training.measure import forward_macs
    >>> import convmixer_tf
    >>> model = convmixer_tf.create_model("convmixer_256_8")
    >>> round(forward_macs(model) / 1e6)  # ConvMixer-256/8 at 32x32
    148
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

import convmixer_tf
from convmixer_tf import cli
from convmixer_tf.constants import ACTIVATIONS
from training import config as config_lib
from training.measure import (
    REPO_ROOT,
    cpu_flags,
    cpu_name,
    matmul_peak_flops,
    training_flops_per_image,
)

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "cifar10_convmixer_256_8"
# The synthetic mode needs one batch of real images: the committed CIFAR-10 slice by default.
DEFAULT_DATA_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "cifar10")
DATA_MODES = ("synthetic", "real")
PEERS = ("auto", "torch", "none")


def _step_timer(keras):
    """A callback class that records the wall time of every training batch."""

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def run_benchmark(
    config: config_lib.TrainConfig,
    steps: int,
    warmup_steps: int = 2,
    data: str = "synthetic",
    peak_size: int = 2048,
) -> dict[str, Any]:
    """Times ``steps`` training steps of ``config`` (after ``warmup_steps``); returns the record.

    Args:
        config: the training config (model, batch size, keras module, augmentation, ...).
        steps: timed training steps (``model.fit`` batches).
        warmup_steps: untimed steps first (graph tracing, memory allocation); at least 1.
        data: ``"synthetic"`` repeats one batch of the real pipeline from memory (times the
            training step alone); ``"real"`` times the augmented input pipeline too.
        peak_size: matrix size of the matmul peak measurement.

    Returns:
        A JSON-ready dict: ``img_per_s``, ``step_ms_median``, ``train_gflop_per_image``,
        ``achieved_gflops``, ``peak_gflops``, ``fraction_of_peak`` and the run's settings.

    Example:
        >>> config = config_lib.TrainConfig(data_dir="tests/fixtures/cifar10", dim=16,
        ...     depth=1, batch_size=8, limit_per_class=2, val_split=None, verbose=0)
        >>> record = run_benchmark(config, steps=2, warmup_steps=1)  # doctest: +SKIP
        >>> sorted(record)[:2]  # doctest: +SKIP
        ['achieved_gflops', 'activation']
    """
    from training import trainer  # imports Keras: after the thread settings

    if steps < 1 or warmup_steps < 1:
        raise ValueError(
            f"`steps` and `warmup_steps` must be positive. Received: steps={steps}, "
            f"warmup_steps={warmup_steps}"
        )
    if data not in DATA_MODES:
        raise ValueError(f"`data` must be one of {DATA_MODES}. Received: data={data!r}")
    training = trainer.build_training(config)
    dataset = training.train_ds
    if data == "synthetic":
        dataset = dataset.take(1).cache().repeat()
    flops_per_image = training_flops_per_image(training.model)

    peak_before = matmul_peak_flops(peak_size)
    fit_args = {"epochs": 1, "verbose": 0, "shuffle": False}
    training.model.fit(dataset, steps_per_epoch=warmup_steps, **fit_args)
    timer = _step_timer(training.keras)
    start = time.perf_counter()
    training.model.fit(dataset, steps_per_epoch=steps, callbacks=[timer], **fit_args)
    elapsed = time.perf_counter() - start
    peak = max(peak_before, matmul_peak_flops(peak_size))

    batch = training.config.batch_size
    step_times = sorted(timer.times)
    median = step_times[len(step_times) // 2]
    # Steady state: the median step. The wall-clock figure adds fit()'s per-call setup (iterator,
    # callbacks), which a real run pays once per epoch, not per step.
    img_per_s = batch / median
    img_per_s_wall = steps * batch / elapsed
    arguments = convmixer_tf.model_arguments(training.model)
    return {
        "model": config.model,
        **{key: arguments[key] for key in ("dim", "depth", "kernel_size", "patch_size")},
        "num_classes": arguments["num_classes"],
        "image_size": config.image_size,
        "batch_size": batch,
        "steps": steps,
        "data": data,
        "keras_module": training.config.keras_module,
        "activation": arguments["activation"],
        "precision": training.keras.mixed_precision.global_policy().name,
        "img_per_s": round(img_per_s, 2),
        "img_per_s_wall": round(img_per_s_wall, 2),
        "step_ms_median": round(1000 * median, 1),
        "train_gflop_per_image": round(flops_per_image / 1e9, 4),
        "achieved_gflops": round(img_per_s * flops_per_image / 1e9, 4),
        "peak_gflops": round(peak / 1e9, 1),
        "fraction_of_peak": round(img_per_s * flops_per_image / peak, 4),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def torch_peer(record: dict[str, Any], config, python: str, steps: int, warmup: int) -> dict:
    """PyTorch's eager float32 and bfloat16-autocast img/s for the model ``record`` timed, from
    ``benchmarks/peer_training.py`` run by ``python``; raises ``cli.CommandError`` if it fails."""
    arch = {key: record[key] for key in ("dim", "depth", "kernel_size", "patch_size")}
    arch.update(num_classes=record["num_classes"], activation=record["activation"])
    command = [
        python, "-m", "benchmarks.peer_training", "--arch", json.dumps(arch),
        "--image-size", str(record["image_size"]), "--batch-size", str(record["batch_size"]),
        "--steps", str(steps), "--warmup-steps", str(warmup),
        "--threads", str(tf.config.threading.get_intra_op_parallelism_threads()),
        "--lr", str(config.lr_max), "--weight-decay", str(config.weight_decay),
        "--clip-norm", str(config.clip_norm or 1e30),
        "--label-smoothing", str(config.label_smoothing),
    ]  # fmt: skip
    return cli.run_json_command(command, f"PyTorch's run ({python})", cwd=REPO_ROOT)


def torch_available(python: str) -> bool:
    """Whether ``python`` can import torch (the optional benchmark requirements)."""
    try:
        return subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    except OSError:
        return False


def check_peers(args: argparse.Namespace) -> bool:
    """Whether PyTorch will be timed; ``--peers torch`` without it is a ValueError, raised
    before any work."""
    if args.peers == "none":
        return False
    available = torch_available(args.peers_python)
    if args.peers == "torch" and not available:
        raise ValueError(
            f"--peers torch: {args.peers_python} cannot import torch. Install the benchmark "
            "requirements (pip install -r requirements-bench.txt) or pass --peers-python."
        )
    return available


def add_peers(record: dict[str, Any], config, args, available: bool) -> dict[str, Any]:
    """Adds PyTorch's img/s and our ratios to ``record`` (see the module docstring)."""
    if args.peers == "none":
        return record
    if not available:
        record["torch"] = "not installed (pip install -r requirements-bench.txt)"
        return record
    peer = torch_peer(record, config, args.peers_python, args.steps, args.warmup_steps)
    record["torch"] = peer["torch"]
    for precision in ("float32", "autocast_bf16"):
        rate = peer[f"torch_{precision}_img_per_s"]
        record[f"torch_{precision}_img_per_s"] = rate
        record[f"ours_over_torch_{precision}"] = round(record["img_per_s"] / rate, 3)
    return record


def build_parser() -> argparse.ArgumentParser:
    from convmixer_tf.presets import PRESETS

    parser = cli.ArgumentParser(
        prog="python -m training.benchmark",
        description="Times the real training step; prints one JSON line (img/s, fraction of the "
        "measured float32 matmul peak).",
    )
    parser.add_argument("--preset", default="convmixer_256_8", choices=list(PRESETS),
                        help="a convmixer_tf preset name")  # fmt: skip
    parser.add_argument("--model", dest="preset", action=cli.DeprecatedAlias,
                        new_option="--preset", help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--batch-size", type=cli.positive_int, default=128)
    parser.add_argument("--steps", type=cli.positive_int, default=5, help="timed steps")
    parser.add_argument("--warmup-steps", type=cli.nonnegative_int, default=2)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe name or JSON file")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, type=cli.input_dir)
    parser.add_argument("--data", choices=DATA_MODES, default="synthetic")
    parser.add_argument("--image-size", type=cli.image_size, default=None,
                        help="default: the recipe's")  # fmt: skip
    parser.add_argument("--dim", type=cli.positive_int, default=None)
    parser.add_argument("--depth", type=cli.positive_int, default=None)
    parser.add_argument("--kernel-size", type=cli.positive_int, default=None)
    parser.add_argument("--patch-size", type=cli.positive_int, default=None)
    parser.add_argument("--activation", choices=ACTIVATIONS, default=None)
    parser.add_argument(
        "--keras-module",
        choices=config_lib.TRAINING_KERAS_MODULES,
        default="keras",
        help="default: keras",
    )
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--jit-compile", action="store_true", help="XLA for the whole step")
    parser.add_argument("--intra-op-threads", type=cli.nonnegative_int, default=0,
                        help="0: TensorFlow's default")  # fmt: skip
    parser.add_argument("--inter-op-threads", type=cli.nonnegative_int, default=0,
                        help="0: TensorFlow's default")  # fmt: skip
    parser.add_argument("--peak-size", type=cli.positive_int, default=2048,
                        help="matmul size for the peak")  # fmt: skip
    parser.add_argument(
        "--peers",
        choices=PEERS,
        default="auto",
        help="time PyTorch in the same run: auto (when installed, default), torch (required), none",
    )
    parser.add_argument(
        "--peers-python", default=sys.executable, type=cli.input_file,
        help="the Python of the environment with requirements-bench.txt (default: this one)",
    )  # fmt: skip
    parser.add_argument("--torch-python", dest="peers_python", type=cli.input_file,
                        action=cli.DeprecatedAlias, new_option="--peers-python",
                        help=argparse.SUPPRESS)  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> config_lib.TrainConfig:
    """The training config the benchmark runs: the recipe with the command line's overrides."""
    config = config_lib.from_recipe(args.recipe)
    overrides = {
        "model": args.preset,
        "batch_size": args.batch_size,
        "data_dir": args.data_dir,
        "dataset": None,
        "keras_module": args.keras_module,
        "mixed_precision": args.mixed_precision,
        "jit_compile": args.jit_compile,
        "val_split": None,
        "verbose": 0,
    }
    for name in ("image_size", "dim", "depth", "kernel_size", "patch_size", "activation"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.data == "synthetic":
        # One batch is all the synthetic mode reads: decode only a few images per class.
        overrides["limit_per_class"] = max(1, math.ceil(args.batch_size / 10))
    return config_lib.apply_overrides(config, overrides)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark ``args`` describe; prints one JSON line."""
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    config = config_from_args(args)
    peers = check_peers(args)
    record = run_benchmark(config, args.steps, args.warmup_steps, args.data, args.peak_size)
    record = add_peers(record, config, args, peers)
    cli.emit(record)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
