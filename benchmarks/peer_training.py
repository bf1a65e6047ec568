"""PyTorch's side of ``python -m training.benchmark --peers-python ...``: the same ConvMixer
training step in PyTorch, eager float32 and eager bfloat16 autocast (channels_last both; the
fastest eager layout on CPU). Runs in the peers' environment (``requirements-bench.txt``),
never imports TensorFlow; prints one JSON line.

The step is the one ``training.train`` runs: forward, label-smoothed cross-entropy, backward,
gradient-norm clipping and an AdamW update, on one synthetic batch repeated (the data pipeline
is not timed). ``img_per_s`` is the batch over the median step time.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.peer_models import convmixer, parse_arch
from convmixer_tf import cli

PRECISIONS = ("float32", "autocast_bf16")


def step_function(model, optimizer, precision: str, clip_norm: float, smoothing: float):
    import torch
    from torch import nn

    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32"):
            loss = loss_fn(model(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        return loss

    return step


def time_steps(step, x, y, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x, y).item()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def precisions(text: str) -> list[str]:
    """``--precisions``: comma-separated names of :data:`PRECISIONS`."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in PRECISIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {PRECISIONS}. Received: {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.peer_training", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", required=True, type=parse_arch,
                        help="JSON: dim, depth, kernel_size, ...")  # fmt: skip
    parser.add_argument("--image-size", type=cli.image_size, required=True)
    parser.add_argument("--batch-size", type=cli.positive_int, default=128)
    parser.add_argument("--steps", type=cli.positive_int, default=5)
    parser.add_argument("--warmup-steps", type=cli.nonnegative_int, default=2)
    parser.add_argument("--threads", type=cli.nonnegative_int, default=0,
                        help="0: PyTorch's default")  # fmt: skip
    parser.add_argument("--precisions", type=precisions, default=list(PRECISIONS))
    parser.add_argument("--lr", type=cli.positive_float, default=0.01)
    parser.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.01)
    parser.add_argument("--clip-norm", type=cli.positive_float, default=1.0)
    parser.add_argument("--label-smoothing", type=cli.nonnegative_float, default=0.1)
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Times the PyTorch step; prints one JSON line."""
    cli.require_peers("torch")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = args.arch
    batch, size = args.batch_size, args.image_size
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, arch["num_classes"], (batch,))
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "memory_format": "channels_last",
    }
    for precision in args.precisions:
        model = convmixer(**arch).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, weight_decay=args.weight_decay
        )
        step = step_function(model, optimizer, precision, args.clip_norm, args.label_smoothing)
        median = time_steps(step, x, y, args.steps, args.warmup_steps)
        result[f"torch_{precision}_img_per_s"] = round(batch / median, 2)
    cli.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
