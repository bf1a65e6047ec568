"""Side-by-side benchmark of the TFLite formats of a ConvMixer: latency, size, accuracy.

Usage::

    # a trained CIFAR-10 model: all formats incl. QAT, accuracy on the held-out split
    python -m export.benchmark --model model.keras --data-dir DATA/cifar10/train \\
        --qat-steps 200 --output-dir bench/
    # latency and size only, of an untrained preset (latency does not depend on weights)
    python -m export.benchmark --preset convmixer_256_8 --output-dir bench/
    # large-kernel depthwise rewrite on the ImageNet variants (224x224, random weights)
    python -m export.benchmark --imagenet-variants --threads 2 --output-dir bench/ \\
        --peers-python .torchvenv/bin/python

Latency is batch 1, the median over ``--repeats`` invocations after warm-up, with
ai-edge-litert's default XNNPACK delegate at 1 and ``--threads`` threads. Reported ratios:
int8/fp32 latency, and fp32 latency over the bound ``2 * MACs / peak`` where ``peak`` is the
float32 ``tf.matmul`` GFLOP/s with the same thread count, measured in the same run
(:func:`training.measure.matmul_peak_flops`; MACs from :func:`training.measure.forward_macs`).
The number of XNNPACK partitions is the number of DELEGATE nodes in the interpreter's execution
plan (an op XNNPACK does not take, such as int8 GELU, splits the graph).

Writes ``results.json``, ``results.md`` (the table) and ``results.png`` (accuracy vs latency and
size) to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from convmixer_tf import cli, files
from export.constants import FLOAT_FORMATS

_TORCH_CODE = """
import sys, time, torch
from torch import nn
dim, depth, k, p, size, threads, repeats = (int(v) for v in sys.argv[1:8])
torch.set_num_threads(threads)
class Residual(nn.Module):
    def __init__(self, fn): super().__init__(); self.fn = fn
    def forward(self, x): return self.fn(x) + x
model = nn.Sequential(
    nn.Conv2d(3, dim, p, stride=p), nn.GELU(), nn.BatchNorm2d(dim),
    *[nn.Sequential(Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"),
      nn.GELU(), nn.BatchNorm2d(dim))), nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))
      for _ in range(depth)],
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, 1000)).eval()
x = torch.rand(1, 3, size, size)
times = []
with torch.inference_mode():
    for _ in range(3): model(x)
    for _ in range(repeats):
        t = time.perf_counter(); model(x); times.append(time.perf_counter() - t)
times.sort(); print(1000 * times[len(times) // 2])
"""


def matmul_peak_gflops(threads: int) -> float:
    """The float32 matmul peak (GFLOP/s) at ``threads`` threads (see :mod:`training.measure`)."""
    from training.measure import matmul_peak_flops

    return matmul_peak_flops(threads=threads) / 1e9


def latency_ms(blob: bytes, threads: int, repeats: int = 50, warmup: int = 5) -> float:
    """Median batch-1 latency (ms) of a .tflite in ai-edge-litert with XNNPACK."""
    from export.evaluate import TFLiteClassifier

    classifier = TFLiteClassifier(blob, num_threads=threads)
    shape = tuple(int(d) for d in classifier.input["shape"])
    batch = classifier.quantize_input(np.random.default_rng(0).uniform(0, 255, shape))
    for _ in range(warmup):
        classifier.invoke(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.invoke(batch)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def xnnpack_partitions(blob: bytes, threads: int = 1) -> int:
    """How many XNNPACK partitions (DELEGATE nodes) the interpreter's plan has."""
    from export.evaluate import TFLiteClassifier

    classifier = TFLiteClassifier(blob, num_threads=threads)
    ops = classifier.interpreter._get_ops_details()  # noqa: SLF001 (no public op listing)
    return sum(op["op_name"] == "DELEGATE" for op in ops)


def torch_eager_ms(python: str, arch: dict, size: int, threads: int, repeats: int) -> float | None:
    """PyTorch eager batch-1 latency of the same architecture (random weights), or None."""
    if not python or not os.path.exists(python):
        return None
    argv = [arch["dim"], arch["depth"], arch["kernel_size"], arch["patch_size"], size, threads,
            repeats]  # fmt: skip
    out = cli.run_command(
        [python, "-c", _TORCH_CODE, *map(str, argv)], f"PyTorch's timing ({python})"
    )
    return float(out.strip().splitlines()[-1])


def benchmark_formats(model, args) -> dict:
    """Exports ``model`` to every format (:func:`export.export_model`) and measures each."""
    import convmixer_tf
    from export import pipeline
    from export.evaluate import evaluate
    from training.data import data_source_kwargs, load_dataset
    from training.measure import forward_macs

    model = pipeline.fixed_input_model(model)
    arch = convmixer_tf.model_arguments(model)
    image_size = tuple(int(d) for d in arch["input_shape"][:2])
    data = data_source_kwargs(args) if (args.data_dir or args.dataset) else None
    val = None
    if data is None:
        calibration = np.random.default_rng(0).uniform(0, 255, (32, *image_size, 3))
    else:
        train_ds, _ = load_dataset(
            **data, split="train", image_size=image_size, batch_size=64, shuffle=True, seed=0
        )
        calibration = pipeline.draw_calibration_images(train_ds, args.calibration_images)
        val_ds, _ = load_dataset(
            **{**data, "limit_per_class": args.val_per_class}, split="validation",
            image_size=image_size, batch_size=64,
        )  # fmt: skip
        val = list(val_ds.as_numpy_iterator())

    formats = [*FLOAT_FORMATS, "int8"] + (["qat"] if data is not None and args.qat_steps else [])
    peak = {t: matmul_peak_gflops(t) for t in (1, args.threads)}
    macs = forward_macs(model)
    rows = []
    for fmt in formats:
        start = time.perf_counter()
        result = pipeline.export_model(
            model, fmt, data=data, calibration_images=calibration,
            qat_steps=args.qat_steps if fmt == "qat" else None, qat_lr=args.qat_lr,
            qat_batch_size=args.qat_batch_size, verbose=0,
        )  # fmt: skip
        blob = result.blob
        row = {"format": fmt, "bytes": len(blob), "convert_s": time.perf_counter() - start,
               "partitions": xnnpack_partitions(blob)}  # fmt: skip
        if fmt == "qat":
            print(f"QAT: {args.qat_steps} steps: {result.report['qat']}", file=sys.stderr)
        if "fully_integer" in result.report:
            row["fully_integer"] = result.report["fully_integer"]
        for threads in (1, args.threads):
            row[f"latency_ms_{threads}t"] = latency_ms(blob, threads, repeats=args.repeats)
        if val is not None:
            reference = result.qat_model if fmt == "qat" else model
            scores = evaluate(blob, val, keras_model=reference, num_threads=args.threads)
            row.update(top1=scores["top1"], n=scores["n"], agreement=scores["agreement"],
                       reference_top1=scores["keras_top1"])  # fmt: skip
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    fp32 = rows[0]
    for row in rows:
        for threads in (1, args.threads):
            key = f"latency_ms_{threads}t"
            row[f"vs_fp32_{threads}t"] = row[key] / fp32[key]
    bound = {t: 2 * macs / (peak[t] * 1e9) * 1e3 for t in peak}
    summary = {
        "model": arch,
        "macs": macs,
        "matmul_peak_gflops": peak,
        "fp32_bound_ms": bound,
        "fp32_over_bound": {t: fp32[f"latency_ms_{t}t"] / bound[t] for t in peak},
        "float_top1": rows[0].get("reference_top1"),
        "rows": rows,
    }
    return summary


def write_table(summary: dict, path: str, machine: str) -> str:
    """The Markdown table of a :func:`benchmark_formats` result."""
    threads = sorted(summary["matmul_peak_gflops"])
    many = threads[-1]
    lines = [
        f"Machine: {machine}. Batch 1, median latency, ai-edge-litert + XNNPACK.",
        "",
        "| format | size (KiB) | size / fp32 | latency 1t (ms) "
        f"| latency {many}t (ms) | / fp32 ({many}t) | XNNPACK partitions | top-1 (%) "
        "| agreement with Keras (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp32_bytes = summary["rows"][0]["bytes"]
    for row in summary["rows"]:
        top1 = f"{row['top1']:.2f}" if "top1" in row else "-"
        agree = f"{row['agreement']:.2f}" if "agreement" in row else "-"
        lines.append(
            f"| {row['format']} | {row['bytes'] / 1024:.0f} | {row['bytes'] / fp32_bytes:.2f} "
            f"| {row['latency_ms_1t']:.2f} | {row[f'latency_ms_{many}t']:.2f} "
            f"| {row[f'vs_fp32_{many}t']:.2f} | {row['partitions']} | {top1} | {agree} |"
        )
    lines += [
        "",
        f"MACs: {summary['macs'] / 1e6:.1f} M. float32 tf.matmul peak: "
        + ", ".join(f"{summary['matmul_peak_gflops'][t]:.1f} GFLOP/s at {t}t" for t in threads)
        + ". fp32 latency / (2 MACs / peak): "
        + ", ".join(f"{summary['fp32_over_bound'][t]:.2f}x at {t}t" for t in threads)
        + ".",
    ]
    if summary.get("float_top1") is not None:
        lines.append(f"Float Keras model top-1: {summary['float_top1']:.2f}%.")
    text = "\n".join(lines) + "\n"
    files.write_atomic(path, text)
    return text


def plot(summary: dict, path: str) -> None:
    """Accuracy vs latency and vs size, one point per format (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    many = sorted(summary["matmul_peak_gflops"])[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    has_accuracy = all("top1" in row for row in rows)
    for row in rows:
        y = row["top1"] if has_accuracy else 0.0
        axes[0].scatter(row[f"latency_ms_{many}t"], y)
        axes[0].annotate(row["format"], (row[f"latency_ms_{many}t"], y))
        axes[1].scatter(row["bytes"] / 1024, y)
        axes[1].annotate(row["format"], (row["bytes"] / 1024, y))
    axes[0].set_xlabel(f"latency, batch 1, {many} threads (ms)")
    axes[1].set_xlabel("file size (KiB)")
    for ax in axes:
        ax.set_ylabel("top-1 (%)" if has_accuracy else "(no accuracy: untrained)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with files.replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def benchmark_imagenet_variants(args) -> list[dict]:
    """Latency of ConvMixer-1024/20 at 224 with kernel 9 and 7: plain vs tiled depthwise, fp32
    and int8 (calibrated on random pixels: random weights, for latency only)."""
    import convmixer_tf
    from export import tflite
    from export.evaluate import TFLiteClassifier

    rows = []
    for kernel in args.kernels:
        model = convmixer_tf.create_model(args.imagenet_preset, kernel_size=kernel)
        reference = None
        arch = convmixer_tf.model_arguments(model)
        size = int(arch["input_shape"][0])
        probe = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
        calibration = np.random.default_rng(1).uniform(0, 255, (8, size, size, 3))
        for fmt, tile in (("fp32", None), ("fp32", 5), ("fp32", 3), ("int8", None), ("int8", 3)):
            blob = tflite.convert(model, fmt, depthwise_tile=tile, calibration_images=calibration)
            row = {
                "model": args.imagenet_preset, "kernel": kernel, "format": fmt,
                "depthwise": "plain" if tile is None else f"{tile}x{tile} tiles",
                "latency_ms": latency_ms(blob, args.threads, repeats=args.repeats, warmup=2),
                "partitions": xnnpack_partitions(blob),
            }  # fmt: skip
            if fmt == "fp32":
                out = TFLiteClassifier(blob, num_threads=args.threads).predict(probe)
                reference = out if reference is None else reference
                row["max_rel_diff_vs_plain"] = float(
                    np.abs(out - reference).max() / np.abs(reference).max()
                )
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
        torch_ms = torch_eager_ms(args.peers_python, arch, size, args.threads, args.repeats)
        if torch_ms is not None:
            row = {"model": args.imagenet_preset, "kernel": kernel, "format": "fp32",
                   "depthwise": "PyTorch eager", "latency_ms": torch_ms}  # fmt: skip
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    from convmixer_tf.presets import PRESETS
    from export import options as options_lib
    from training.data import add_data_source_arguments

    parser = cli.ArgumentParser(
        prog="python -m export.benchmark", description=__doc__.splitlines()[0]
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=cli.input_path, help="a trained .keras ConvMixer")
    what.add_argument("--preset", choices=list(PRESETS),
                      help="an untrained preset, e.g. convmixer_256_8")  # fmt: skip
    what.add_argument("--imagenet-variants", action="store_true")
    add_data_source_arguments(parser, required=False)
    parser.add_argument("--val-per-class", type=cli.positive_int, default=None,
                        help="held-out images per class for accuracy (default: all)")  # fmt: skip
    options_lib.add_arguments(parser, only=("calibration_images", "qat_lr", "qat_batch_size"))
    parser.add_argument("--qat-steps", type=cli.nonnegative_int, default=0,
                        help="QAT steps (0: no QAT row)")  # fmt: skip
    parser.add_argument("--threads", type=cli.positive_int, default=2)
    parser.add_argument("--repeats", type=cli.positive_int, default=50)
    parser.add_argument("--imagenet-preset", default="convmixer_1024_20", choices=list(PRESETS))
    parser.add_argument("--kernels", type=cli.positive_int, nargs="+", default=[9, 7])
    cli.add_peers_python_argument(parser)
    parser.add_argument(
        "--machine", default=None, help="machine description (default: cores, CPU name and flags)"
    )
    parser.add_argument("--output-dir", required=True, type=cli.output_path,
                        help="folder for the result files")  # fmt: skip
    parser.add_argument("--out-dir", dest="output_dir", action=cli.DeprecatedAlias,
                        new_option="--output-dir", help=argparse.SUPPRESS)  # fmt: skip
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark ``args`` ask for; the table goes to stderr and the files in
    ``--output-dir``, progress to stderr, a JSON line naming the files to stdout."""
    files.check_writable(os.path.join(args.output_dir, "results.json"))
    files.check_not_input(
        {"--output-dir": args.output_dir},
        {"--model": args.model, "--data-dir": args.data_dir, "--val-dir": args.val_dir},
    )
    if args.machine is None:
        from training.measure import describe_machine

        args.machine = describe_machine()
    if args.imagenet_variants:
        if args.peers_python:  # PyTorch is timed last: check it imports before any work
            python = args.peers_python
            cli.run_command([python, "-c", "import torch"], f"--peers-python {python}")
        rows = benchmark_imagenet_variants(args)
        lines = [f"Machine: {args.machine}. Batch 1, {args.threads} threads, median.", "",
                 "| model | kernel | format | depthwise | latency (ms) | XNNPACK partitions "
                 "| max diff vs plain fp32 / max logit |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in rows:
            diff = row.get("max_rel_diff_vs_plain")
            lines.append(
                f"| {row['model']} | {row['kernel']} | {row['format']} | {row['depthwise']} "
                f"| {row['latency_ms']:.1f} | {row.get('partitions', '-')} "
                f"| {'-' if diff is None else f'{diff:.1e}'} |"
            )
        files.write_atomic(os.path.join(args.output_dir, "imagenet_variants.md"), "\n".join(lines))
        files.write_atomic(
            os.path.join(args.output_dir, "imagenet_variants.json"), json.dumps(rows, indent=1)
        )
        print("\n".join(lines), file=sys.stderr)
        cli.emit({"output_dir": args.output_dir, "rows": len(rows),
                  "files": ["imagenet_variants.md", "imagenet_variants.json"]})  # fmt: skip
        return 0

    import convmixer_tf

    if args.model:
        model = convmixer_tf.load_model(args.model, unsafe=args.unsafe)
    else:
        model = convmixer_tf.create_model(args.preset)
    summary = benchmark_formats(model, args)
    summary["machine"] = args.machine
    files.write_atomic(
        os.path.join(args.output_dir, "results.json"),
        json.dumps(cli.finite_json(summary), indent=1, default=str, allow_nan=False),
    )
    table = write_table(summary, os.path.join(args.output_dir, "results.md"), args.machine)
    print(table, file=sys.stderr)
    plot(summary, os.path.join(args.output_dir, "results.png"))
    cli.emit({"output_dir": args.output_dir, "formats": [r["format"] for r in summary["rows"]],
              "files": ["results.json", "results.md", "results.png"]})  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
