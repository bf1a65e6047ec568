"""Edge targets of int8 ConvMixers: Vela's Ethos-U estimates and TFLite Micro's arena.

For each model (trained ``.keras`` files given with ``--model``, and presets with random weights
and non-trivial BatchNorm statistics, calibrated on random pixels), the int8 export is compiled
by Vela for each ``--target`` (Vela's default system configuration of the family) and opened by
TFLite Micro (the smallest tensor arena, from its allocation report). Each model is measured
with the plain depthwise convs and, for kernels > 5, with the 3x3 tiles that XNNPACK prefers:
the per-target choice in docs/export.md comes from this table.

Random weights compress worse than trained ones on the NPU (Vela's weight encoder), so flash
size and weight bandwidth of the preset rows are pessimistic; the op split and the cycles of
the compute do not depend on the values.

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.edge_targets --model runs/quick/model.keras \\
        --preset convmixer_256_8 convmixer_1024_20 --targets ethos-u55-128 ethos-u65-256
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import convmixer_tf
from convmixer_tf import cli, files
from export import options as options_lib
from export.constants import VELA_TARGETS

DEFAULT_TARGETS = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256")


def calibration_for(model, data_dir: str | None, count: int) -> np.ndarray:
    size = tuple(int(d) for d in convmixer_tf.model_arguments(model)["input_shape"][:2])
    if data_dir:
        from training.data import load_dataset

        dataset, _ = load_dataset(
            data_dir=data_dir, split="train", image_size=size, batch_size=count, shuffle=True,
            seed=0,
        )  # fmt: skip
        return next(iter(dataset))[0].numpy().astype("float32")
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (count, *size, 3)).astype("float32")


def tflm_arena(blob: bytes) -> dict:
    """TFLM's arena for ``blob`` from its allocation report (opened, not run), or why not."""
    from export import edge

    interpreter, failure = edge._open_tflm(blob)
    if failure is not None:
        return {"tflm_arena_bytes": None, "tflm": failure["reason"]}
    return {"tflm_arena_bytes": edge.recorded_arena(interpreter), "tflm": "opens"}


def measure(name: str, model, calibration: np.ndarray, targets, trained: bool,
            gelu: str = "exact") -> list[dict]:  # fmt: skip
    from export import edge, tflite

    args = convmixer_tf.model_arguments(model)
    if gelu == "sigmoid" and args["activation"] == "gelu":
        from export import rewrite

        model = rewrite.gelu_as_silu(model)  # python -m export --gelu sigmoid
        args = convmixer_tf.model_arguments(model)
    tiles = [None, 3] if args["kernel_size"] > tflite.FAST_DEPTHWISE_KERNEL else [None]
    rows = []
    for tile in tiles:
        blob = tflite.convert(model, "int8", calibration_images=calibration, depthwise_tile=tile)
        base = {
            "model": name,
            "weights": "trained" if trained else "random",
            "kernel": args["kernel_size"],
            "activation": args["activation"],
            "input": args["input_shape"][0],
            "graph": "3x3 tiles" if tile else "plain",
            "tflite_bytes": len(blob),
            **tflm_arena(blob),
        }
        for target in targets:
            _, vela = edge.run_vela(blob, target)
            rows.append({**base, **vela})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | weights | graph | target (Vela system config) | NPU ops | CPU ops | "
        "est. ms | cycles | SRAM KiB | flash / DRAM KiB | TFLM arena KiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        arena = "-" if r["tflm_arena_bytes"] is None else f"{r['tflm_arena_bytes'] / 1024:.0f}"
        off_chip = r["off_chip_flash_kib"] or r["dram_kib"]
        lines.append(
            f"| {r['model']} ({r['activation']}, k{r['kernel']}, {r['input']}px) | "
            f"{r['weights']} | {r['graph']} | {r['target']} ({r['system_config']}) | "
            f"{r['npu_ops']} | {', '.join(r['cpu_ops']) or '-'} | {r['inference_ms']:.2f} | "
            f"{r['cycles_total']:,} | {r['sram_kib']:.0f} | {off_chip:.0f} | {arena} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.edge_targets", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", action="append", default=[], type=cli.input_path,
                        help="a trained .keras file (repeatable)")  # fmt: skip
    parser.add_argument("--data-dir", default=None, type=cli.input_dir,
                        help="calibration images for --model files")  # fmt: skip
    parser.add_argument("--preset", nargs="+", default=[], choices=list(convmixer_tf.PRESETS),
                        help="presets with random weights")  # fmt: skip
    parser.add_argument("--presets", nargs="+", dest="preset", action=cli.DeprecatedAlias,
                        choices=list(convmixer_tf.PRESETS),
                        new_option="--preset", help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), choices=VELA_TARGETS)
    parser.add_argument("--calibration-images", type=cli.positive_int, default=32)
    options_lib.add_arguments(parser, only=("gelu",))
    parser.add_argument("--output", default=None, type=cli.output_path,
                        help="also write the rows here (JSON)")  # fmt: skip
    parser.add_argument("--json", dest="output", action=cli.DeprecatedAlias,
                        new_option="--output", help=argparse.SUPPRESS)  # fmt: skip
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Measures every model on every target; the table on stderr, the rows as one JSON line."""
    from benchmarks.models import with_batch_norm_statistics
    from export import edge

    if not args.model and not args.preset:
        raise ValueError("Nothing to measure: give --model FILE or --preset NAME.")
    if args.output:
        files.check_writable(args.output)
        count = len(args.model)
        models = {
            "--model" if count == 1 else f"--model (file {i + 1} of {count})": path
            for i, path in enumerate(args.model)
        }
        files.check_not_input({"--output": args.output}, models)
    edge.require("vela")
    edge.require("tflm")
    with cli.stdout_to_stderr():
        rows = _measure(args, with_batch_norm_statistics)
    if args.output:
        files.write_atomic(args.output, json.dumps(rows, indent=1))
    print(table(rows), file=sys.stderr)
    cli.emit({"rows": rows, "output": args.output})
    return 0


def _measure(args, with_batch_norm_statistics) -> list[dict]:
    rows = []
    for path in args.model:
        model = convmixer_tf.load_model(path, unsafe=args.unsafe)
        calibration = calibration_for(model, args.data_dir, args.calibration_images)
        rows += measure(path, model, calibration, args.targets, trained=True, gelu=args.gelu)
    for preset in args.preset:
        model = with_batch_norm_statistics(convmixer_tf.create_model(preset))
        calibration = calibration_for(model, None, args.calibration_images)
        rows += measure(preset, model, calibration, args.targets, trained=False, gelu=args.gelu)
    return rows


if __name__ == "__main__":
    sys.exit(main())
