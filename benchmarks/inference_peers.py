"""Batch-1 CPU inference, ours against the strongest peers, side by side in one run.

For each model (a preset, optionally with another kernel size; random weights with non-trivial
BatchNorm statistics, identical for every engine): our .tflite (ai-edge-litert + XNNPACK; fp32
with each ``--depthwise-tile`` choice, and int8), and in the peers' environment (``--peers-python``,
``pip install -r requirements-bench.txt``) the same network in PyTorch eager, exported to ONNX and
run by ONNX Runtime (fp32, and static QDQ int8 calibrated on the same images). Rounds are
interleaved (ours, then the peers); the table reports medians over rounds, ratios against ONNX
Runtime, the fp32 MAC bound ``2 * MACs / peak`` (``training.measure``) and the CPU's flags. The
engines' logits on the same probe images are compared, so that a fast wrong graph shows.

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.inference_peers --preset convmixer_1024_20 \\
        --peers-python .torchvenv/bin/python --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

import convmixer_tf
from benchmarks import REPO_ROOT
from benchmarks.models import with_batch_norm_statistics
from convmixer_tf import cli, files, presets
from export import quantize, rewrite, tflite
from export.benchmark import latency_ms, matmul_peak_gflops, xnnpack_partitions
from training.measure import cpu_flags, forward_macs


def torch_state(model, depth: int) -> dict[str, np.ndarray]:
    """The Keras model's weights as the official PyTorch ConvMixer's state dict (layouts too)."""
    state = {}

    def conv(name, key, depthwise=False):
        kernel, bias = model.get_layer(name).get_weights()
        state[f"{key}.weight"] = (
            kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(3, 2, 0, 1)
        )
        state[f"{key}.bias"] = bias

    def bn(name, key):
        gamma, beta, mean, var = model.get_layer(name).get_weights()
        state.update({f"{key}.weight": gamma, f"{key}.bias": beta,
                      f"{key}.running_mean": mean, f"{key}.running_var": var})  # fmt: skip

    conv("stem_conv", "0")
    bn("stem_bn", "2")
    for i in range(depth):
        conv(f"blocks_{i}_dwconv", f"{3 + i}.0.fn.0", depthwise=True)
        bn(f"blocks_{i}_dwconv_bn", f"{3 + i}.0.fn.2")
        conv(f"blocks_{i}_pwconv", f"{3 + i}.1")
        bn(f"blocks_{i}_pwconv_bn", f"{3 + i}.3")
    kernel, bias = model.get_layer("head").get_weights()
    state[f"{3 + depth + 2}.weight"], state[f"{3 + depth + 2}.bias"] = kernel.T, bias
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def normalized_nchw(pixels: np.ndarray, mean, std) -> np.ndarray:
    x = (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def run_peers(python: str, arch: dict, weights: str, images: str, args) -> dict:
    command = [python, "-m", "benchmarks.peer_models", "--arch", json.dumps(arch),
               "--weights", weights, "--images", images, "--threads", str(args.threads),
               "--repeats", str(args.repeats)]  # fmt: skip
    return cli.run_json_command(command, f"the peers' run ({python})", cwd=REPO_ROOT)


def benchmark_model(name: str, kernel: int | None, args) -> list[dict]:
    overrides = {} if kernel is None else {"kernel_size": kernel}
    model = with_batch_norm_statistics(convmixer_tf.create_model(name, **overrides))
    arch_args = convmixer_tf.model_arguments(model)
    preset = presets.get_preset(name)
    size = int(arch_args["input_shape"][0])
    rng = np.random.default_rng(1)
    probe = rng.uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    calibration = rng.uniform(0, 255, (args.calibration_images, size, size, 3)).astype(np.float32)
    reference = np.asarray(model(probe, training=False))

    blobs = {}
    for tile in args.depthwise_tiles:
        blobs[f"fp32 (depthwise: {tile})"] = tflite.convert(model, "fp32", depthwise_tile=tile)
    blobs["int8"] = tflite.convert(model, "int8", calibration_images=calibration)
    if arch_args["activation"] == "gelu":
        # The int8-friendly GELU (export --gelu sigmoid): LOGISTIC + MUL, one XNNPACK partition.
        silu = rewrite.gelu_as_silu(model)
        blobs["int8, GELU as x*sigmoid(1.702x)"] = tflite.convert(
            silu, "int8", calibration_images=calibration
        )
    # The QAT graph (tiled like PTQ), converted before any fine-tuning: its latency is the
    # trained file's.
    qat_model = quantize.quantize_model(model, calibration_images=calibration)
    blobs["qat (no fine-tuning)"] = tflite.convert(
        quantize.rebatch_qat_model(qat_model), "qat", calibration_images=calibration
    )

    with tempfile.TemporaryDirectory(prefix="convmixer_peers_") as folder:
        keys = ("dim", "depth", "kernel_size", "patch_size", "num_classes", "activation")
        arch = {key: arch_args[key] for key in keys}
        weights = os.path.join(folder, "weights.npz")
        np.savez(weights, **torch_state(model, arch["depth"]))
        images = os.path.join(folder, "images.npz")
        np.savez(
            images,
            probe=normalized_nchw(probe, preset.mean, preset.std),
            calibration=normalized_nchw(calibration, preset.mean, preset.std),
        )

        times: dict[str, list[float]] = {key: [] for key in blobs}
        peers: list[dict] = []
        for _ in range(args.rounds):
            for key, blob in blobs.items():
                times[key].append(latency_ms(blob, args.threads, repeats=args.repeats, warmup=3))
            if args.peers_python:
                peers.append(run_peers(args.peers_python, arch, weights, images, args))

    from export.evaluate import TFLiteClassifier

    peak = matmul_peak_gflops(args.threads)
    bound_ms = 2 * forward_macs(model) / (peak * 1e9) * 1e3
    scale = float(np.abs(reference).max())
    rows = []
    for key, blob in blobs.items():
        logits = TFLiteClassifier(blob, num_threads=args.threads).predict(probe)
        rows.append(
            {
                "engine": "ours (.tflite, XNNPACK)",
                "format": key,
                "ms": float(np.median(times[key])),
                "partitions": xnnpack_partitions(blob),
                "max_diff_vs_keras": float(np.abs(logits - reference).max()) / scale,
            }
        )
    if peers:
        for engine, key in (("ONNX Runtime", "ort_fp32"), ("ONNX Runtime", "ort_int8"),
                            ("PyTorch eager", "torch_eager")):  # fmt: skip
            if f"{key}_ms" not in peers[0]:
                continue
            logits = np.asarray(peers[0].get(f"{key}_logits", peers[0]["torch_logits"]))
            version = peers[0].get("onnxruntime" if key.startswith("ort") else "torch", "")
            rows.append(
                {
                    "engine": f"{engine} {version}",
                    "format": "int8" if "int8" in key else "fp32",
                    "ms": float(np.median([p[f"{key}_ms"] for p in peers])),
                    "max_diff_vs_keras": float(np.abs(logits - reference).max()) / scale,
                }
            )
    ort = {r["format"]: r["ms"] for r in rows if r["engine"].startswith("ONNX Runtime")}
    for row in rows:
        base = ort.get("int8" if row["format"].startswith(("int8", "qat")) else "fp32")
        row["vs_onnxruntime"] = row["ms"] / base if base else None
        row["over_fp32_bound"] = row["ms"] / bound_ms
        row.update(
            model=name,
            kernel=arch["kernel_size"],
            threads=args.threads,
            peak_gflops=round(peak, 1),
            bound_ms=round(bound_ms, 2),
        )
        print(json.dumps(row), file=sys.stderr)
    return rows


def table(rows: list[dict], flags: list[str]) -> str:
    lines = [
        f"CPU flags: {' '.join(flags) or 'unknown'}; batch 1, {rows[0]['threads']} threads, "
        "median over interleaved rounds.",
        "",
        "| model | kernel | engine | format | latency (ms) | / ONNX Runtime | / fp32 MAC bound "
        "| max logit diff vs Keras (rel.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["vs_onnxruntime"] is None else f"{r['vs_onnxruntime']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['kernel']} | {r['engine']} | {r['format']} | {r['ms']:.1f} "
            f"| {ratio} | {r['over_fp32_bound']:.2f}x | {r['max_diff_vs_keras']:.1e} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from export.options import depthwise_tile_arg

    parser = cli.ArgumentParser(
        prog="python -m benchmarks.inference_peers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", nargs="+", default=["convmixer_1024_20"],
                        choices=list(presets.PRESETS), help="presets (random weights)")  # fmt: skip
    parser.add_argument("--models", nargs="+", dest="preset", action=cli.DeprecatedAlias,
                        choices=list(presets.PRESETS), new_option="--preset",
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--kernel", type=cli.positive_int, default=None,
                        help="override the kernel size")  # fmt: skip
    parser.add_argument("--depthwise-tiles", nargs="+", default=["auto"], type=depthwise_tile_arg,
                        help="fp32 variants: auto, none, or a tile size")  # fmt: skip
    cli.add_peers_python_argument(parser)
    parser.add_argument("--threads", type=cli.positive_int, default=2)
    parser.add_argument("--repeats", type=cli.positive_int, default=10)
    parser.add_argument("--rounds", type=cli.positive_int, default=3)
    parser.add_argument("--calibration-images", type=cli.positive_int, default=8)
    parser.add_argument("--output", default=None, type=cli.output_path,
                        help="write the Markdown table here too")  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Measures every engine; the table on stderr (and --output), the rows as one JSON line."""
    if args.output:
        files.check_writable(args.output)
    with cli.stdout_to_stderr():
        rows = [row for name in args.preset for row in benchmark_model(name, args.kernel, args)]
    text = table(rows, cpu_flags() or [])
    print(text, file=sys.stderr)
    if args.output:
        files.write_atomic(args.output, text + "\n")
    cli.emit({"rows": rows, "output": args.output})
    return 0


if __name__ == "__main__":
    sys.exit(main())
