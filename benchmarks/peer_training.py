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
import json
import time

import numpy as np
import torch
from torch import nn

from benchmarks.peer_models import convmixer

PRECISIONS = ("float32", "autocast_bf16")


def step_function(model, optimizer, precision: str, clip_norm: float, smoothing: float):
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="JSON: dim, depth, kernel_size, ...")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = json.loads(args.arch)
    batch, size = args.batch_size, args.image_size
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, arch["num_classes"], (batch,))
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "memory_format": "channels_last",
    }
    for precision in args.precisions.split(","):
        if precision not in PRECISIONS:
            parser.error(f"unknown precision {precision!r}; choose from {PRECISIONS}")
        model = convmixer(**arch).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, weight_decay=args.weight_decay
        )
        step = step_function(model, optimizer, precision, args.clip_norm, args.label_smoothing)
        median = time_steps(step, x, y, args.steps, args.warmup_steps)
        result[f"torch_{precision}_img_per_s"] = round(batch / median, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
