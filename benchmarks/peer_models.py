"""The peers' side of ``python -m benchmarks.inference_peers``: runs in the peers' environment
(``pip install -r requirements-bench.txt``: PyTorch, ONNX Runtime), never imports TensorFlow.

Builds the same ConvMixer in PyTorch (the paper's code: conv -> GELU -> BN, residual around the
depthwise part), loads the weights our Keras model exported (``--weights``, an ``.npz`` in
PyTorch layouts), exports it to ONNX the way ONNX Runtime's users get a model
(``torch.onnx.export``), quantizes it statically (QDQ, per-channel, calibrated on the given
images), and prints one JSON line: median batch-1 latency (ms) of PyTorch eager, ONNX Runtime
fp32 and int8 (its x86 recipe: U8S8 QDQ), and each one's logits on the probe images (to check
the models agree).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from convmixer_tf import cli


def convmixer(dim, depth, kernel_size, patch_size, num_classes, activation):
    """The paper's ConvMixer in PyTorch."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    act = nn.GELU if activation == "gelu" else nn.ReLU
    return nn.Sequential(
        nn.Conv2d(3, dim, patch_size, stride=patch_size), act(), nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), act(),
                nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, 1), act(), nn.BatchNorm2d(dim))
          for _ in range(depth)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_classes),
    )  # fmt: skip


def parse_arch(text: str) -> dict:
    """``--arch``: a JSON object of :func:`convmixer`'s arguments."""
    names = ("dim", "depth", "kernel_size", "patch_size", "num_classes", "activation")
    try:
        arch = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text[:80]!r}") from None
    if not isinstance(arch, dict) or sorted(arch) != sorted(names):
        raise argparse.ArgumentTypeError(f"must be a JSON object with the keys {names}")
    return arch


def load_weights(model, path: str) -> None:
    import torch

    with np.load(path) as saved:
        state = {k: torch.from_numpy(saved[k]) for k in saved.files}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def median_ms(run, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.peer_models", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", required=True, type=parse_arch,
                        help="JSON: dim, depth, kernel_size, ...")  # fmt: skip
    parser.add_argument("--weights", required=True, type=cli.input_file,
                        help=".npz of the PyTorch state dict")  # fmt: skip
    parser.add_argument("--images", required=True, type=cli.input_file,
                        help=".npz: probe (N,3,H,W), calibration")  # fmt: skip
    parser.add_argument("--threads", type=cli.positive_int, default=2)
    parser.add_argument("--repeats", type=cli.positive_int, default=20)
    parser.add_argument("--skip-eager", action="store_true")
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Measures the peers; prints one JSON line."""
    cli.require_peers("torch", "onnxruntime", "onnx")
    import onnxruntime as ort
    import torch
    from onnxruntime import quantization

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self, images: np.ndarray, name: str):
            self.batches = iter([{name: image[None]} for image in images])

        def get_next(self):
            return next(self.batches, None)

    arch = args.arch
    torch.set_num_threads(args.threads)
    model = convmixer(**arch).eval()
    load_weights(model, args.weights)
    with np.load(args.images) as images:
        probe, calibration = images["probe"], images["calibration"]
    result = {"torch": torch.__version__, "onnxruntime": ort.__version__}
    x = torch.from_numpy(probe[:1])
    with torch.inference_mode():
        result["torch_logits"] = model(torch.from_numpy(probe)).numpy().tolist()
        if not args.skip_eager:
            result["torch_eager_ms"] = median_ms(lambda: model(x), args.repeats)

    with tempfile.TemporaryDirectory(prefix="convmixer_peers_") as folder:
        fp32 = os.path.join(folder, "model.onnx")
        torch.onnx.export(
            model, (x,), fp32, input_names=["pixels"], output_names=["logits"], dynamo=False,
            opset_version=17,
        )  # fmt: skip
        # ONNX Runtime's own recipe for x86: pre-processing (shape inference, graph
        # optimization), QDQ, per-channel int8 weights and uint8 activations (U8S8). Measured on
        # ConvMixer-1024/20, 2 threads, AVX-512 VNNI: 21.6 ms; int8 activations (S8S8) 96 ms,
        # QOperator 211 ms: the fastest is the peer.
        prepared = os.path.join(folder, "model_prepared.onnx")
        quantization.quant_pre_process(fp32, prepared)
        int8 = os.path.join(folder, "model_int8.onnx")
        quantization.quantize_static(
            prepared, int8, Calibration(calibration, "pixels"),
            quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
        )  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        for name, path in (("ort_fp32", fp32), ("ort_int8", int8)):
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {"pixels": probe[:1]}
            result[f"{name}_ms"] = median_ms(lambda s=session, f=feed: s.run(None, f), args.repeats)
            result[f"{name}_logits"] = np.concatenate(
                [session.run(None, {"pixels": image[None]})[0] for image in probe]
            ).tolist()
        cli.emit(result)
        return 0


if __name__ == "__main__":
    sys.exit(main())
