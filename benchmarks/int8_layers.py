"""Where an int8 ConvMixer loses accuracy: the error of each op's int8 output against float.

The fp32 and the int8 .tflite of the same prepared graph (``export.tflite.convert``, same
rewrites) have the same ops in the same order, their tensors the same names. Both run on the
same held-out images with every intermediate tensor kept; for each op output the int8 tensor is
dequantized and compared with the fp32 one: the relative error ``||int8 - fp32|| / ||fp32||``,
the share of the fp32 values outside the int8 tensor's range (clipped), and the quantization
step against the fp32 spread (``scale / std``). A layer where the error jumps is where the
range (or the grid) does not fit the values.

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.int8_layers --model runs/quick/model.keras \\
        --data-dir ../shared/data/cifar10/train --images 64
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from convmixer_tf import cli
from export import options as options_lib


def all_tensors(blob: bytes, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every op output of ``blob`` for ``images`` (float, dequantized for int8), by name."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(
        model_content=blob, experimental_preserve_all_tensors=True, num_threads=2
    )
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    produced = [index for op in interpreter._get_ops_details() for index in op["outputs"]]
    outputs = {index: [] for index in produced}
    for image in images:
        x = image[None]
        if inp["dtype"] != np.float32:
            scale, zero_point = inp["quantization"]
            x = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        for index, values in outputs.items():
            value = interpreter.get_tensor(index).astype(np.float32)
            scale, zero_point = details[index]["quantization"]
            if details[index]["dtype"] != np.float32 and scale:
                value = (value - zero_point) * scale
            values.append(value)
    return {details[index]["name"]: np.concatenate(values) for index, values in outputs.items()}


def quantization_of(blob: bytes) -> dict[str, tuple[float, int]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=blob)
    return {d["name"]: d["quantization"] for d in interpreter.get_tensor_details()}


def compare(fp32_blob: bytes, int8_blob: bytes, images: np.ndarray) -> list[dict]:
    floats = all_tensors(fp32_blob, images)
    ints = all_tensors(int8_blob, images)
    quant = quantization_of(int8_blob)
    rows = []
    for name, value in ints.items():
        if name not in floats:
            continue
        ref = floats[name]
        scale, zero_point = quant[name]
        low, high = (-128 - zero_point) * scale, (127 - zero_point) * scale
        rows.append({
            "tensor": name,
            "rel_error": float(np.linalg.norm(value - ref) / max(np.linalg.norm(ref), 1e-12)),
            "clipped": float(np.mean((ref < low - scale / 2) | (ref > high + scale / 2))),
            "step_over_std": float(scale / max(ref.std(), 1e-12)),
            "range": [round(float(low), 3), round(float(high), 3)],
            "float_range": [round(float(ref.min()), 3), round(float(ref.max()), 3)],
        })  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.int8_layers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True, type=cli.input_path, help="a .keras model")
    parser.add_argument("--data-dir", required=True, type=cli.input_dir)
    parser.add_argument("--images", type=cli.positive_int, default=64,
                        help="held-out images compared")  # fmt: skip
    options_lib.add_arguments(parser, only=("calibration_images", "batch_norm", "seed"))
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Compares every op's int8 output with float; prints one JSON line (the rows)."""
    with cli.stdout_to_stderr():
        rows = _measure(args)
    cli.emit({"model": args.model, "n": args.images, "ops": rows})
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def _measure(args) -> list[dict]:
    import convmixer_tf
    from export import tflite
    from export.pipeline import draw_calibration_images
    from training.data import load_dataset

    model = convmixer_tf.load_model(args.model, unsafe=args.unsafe)
    size = tuple(int(d) for d in convmixer_tf.model_arguments(model)["input_shape"][:2])
    train, _ = load_dataset(data_dir=args.data_dir, split="train", image_size=size,
                            batch_size=64, shuffle=True, seed=args.seed)  # fmt: skip
    calibration = draw_calibration_images(train, args.calibration_images)
    held_out, _ = load_dataset(data_dir=args.data_dir, split="validation", image_size=size,
                               batch_size=args.images)  # fmt: skip
    images = next(iter(held_out))[0].numpy().astype(np.float32)
    # The fp32 twin of the int8 graph: the same rewrites (BatchNorms as depthwise convs).
    prepared = tflite.prepare_keras_model(model, "int8", batch_norm=args.batch_norm)
    fp32 = bytes(tflite.make_converter(prepared, "fp32", None, "int8").convert())
    int8 = tflite.convert(model, "int8", calibration_images=calibration,
                          batch_norm=args.batch_norm)  # fmt: skip
    return compare(fp32, int8, images)


if __name__ == "__main__":
    sys.exit(main())
