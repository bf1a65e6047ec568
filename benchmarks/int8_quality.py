"""int8 accuracy of a trained ConvMixer: float, PTQ over calibration draws, QAT over seeds.

Every number is top-1 on the held-out images of ``--data-dir`` (the validation split that
training held out), for the .tflite files that ``python -m export`` writes with the given
options (``export.export_model``): PTQ with ``--ptq-seeds`` calibration draws, QAT with
``--qat-seeds`` (each seed draws the calibration images and orders the fine-tuning batches).
QAT files also report their agreement with their fake-quant Keras model. One JSON line per
file on stderr as it is measured; the summary (mean and spread, ``n``) on stdout.

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.int8_quality --model runs/quick/model.keras \\
        --data-dir ../shared/data/cifar10/train --qat-steps 100 --gelu exact sigmoid
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from convmixer_tf import cli
from export import options as options_lib
from export.constants import GELU_MODES


def held_out(data_dir: str, image_size, batch_size: int = 250):
    from training.data import load_dataset

    dataset, _ = load_dataset(
        data_dir=data_dir, split="validation", image_size=image_size, batch_size=batch_size
    )
    return [(images.numpy(), labels.numpy()) for images, labels in dataset]


def keras_top1(model, batches) -> float:
    correct = total = 0
    for images, labels in batches:
        correct += int((np.asarray(model(images, training=False)).argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / total


def spread(values: list[float]) -> dict:
    return {
        "mean": round(float(np.mean(values)), 2),
        "min": round(float(np.min(values)), 2),
        "max": round(float(np.max(values)), 2),
        "values": [round(v, 2) for v in values],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.int8_quality", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True, type=cli.input_path, help="a .keras model")
    parser.add_argument("--data-dir", required=True, type=cli.input_dir)
    parser.add_argument("--ptq-seeds", type=cli.nonnegative_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--qat-seeds", type=cli.nonnegative_int, nargs="+", default=[0, 1])
    parser.add_argument("--qat-steps", type=cli.positive_int, default=100)
    parser.add_argument("--gelu", nargs="+", choices=GELU_MODES, default=["exact"])
    options_lib.add_arguments(parser, only=("qat_lr", "depthwise_tile", "calibration_images"))
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Exports and scores every file; rows on stderr, the summary as one JSON line."""
    with cli.stdout_to_stderr():
        summary = _measure(args)
    cli.emit(summary)
    return 0


def _measure(args) -> dict:
    import convmixer_tf
    from export.evaluate import evaluate
    from export.pipeline import export_model

    model = convmixer_tf.load_model(args.model, unsafe=args.unsafe)
    size = tuple(int(d) for d in convmixer_tf.model_arguments(model)["input_shape"][:2])
    batches = held_out(args.data_dir, size)
    n = sum(len(labels) for _, labels in batches)
    summary = {"model": args.model, "n": n, "float_top1": round(keras_top1(model, batches), 2)}
    activation = convmixer_tf.model_arguments(model)["activation"]
    modes = args.gelu if activation == "gelu" else ["exact"]
    if "sigmoid" in modes:
        from export import rewrite

        summary["float_top1_sigmoid"] = round(keras_top1(rewrite.gelu_as_silu(model), batches), 2)
    data = {"data_dir": args.data_dir}
    for gelu in modes:
        for fmt, seeds in (("int8", args.ptq_seeds), ("qat", args.qat_seeds)):
            results = []
            for seed in seeds:
                start = time.perf_counter()
                result = export_model(
                    model, fmt, data=data, seed=seed, gelu=gelu,
                    depthwise_tile=args.depthwise_tile,
                    calibration_images=args.calibration_images,
                    qat_steps=args.qat_steps if fmt == "qat" else None, qat_lr=args.qat_lr,
                    verbose=0,
                )  # fmt: skip
                scores = evaluate(result.blob, batches, keras_model=result.qat_model)
                row = {"format": fmt, "gelu": gelu, "seed": seed, **scores,
                       "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
            key = f"{fmt}{'' if gelu == 'exact' else '_' + gelu}"
            summary[key] = spread([r["top1"] for r in results])
            if fmt == "qat":
                summary[key]["fake_quant_top1"] = spread([r["keras_top1"] for r in results])
                summary[key]["agreement"] = spread([r["agreement"] for r in results])
    return summary


if __name__ == "__main__":
    sys.exit(main())
