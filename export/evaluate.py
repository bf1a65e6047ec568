"""Top-1 accuracy of a .tflite model (ai-edge-litert), optionally against its Keras model.

Usage::

    python -m export.evaluate --tflite out/model_int8.tflite \\
        --data-dir DATA/cifar10/train --split validation --keras model.keras [--tta flip]

prints one JSON line: ``{"top1": ..., "n": ..., "keras_top1": ..., "agreement": ...}``. With
``--tta`` the logits of both models are averaged over the views of :mod:`training.tta`, and the
result names them: ``"views"`` is the number of interpreter invocations per image, what the
same averaging costs on a device.

The runtime is ``ai_edge_litert.interpreter.Interpreter`` (``tf.lite.Interpreter`` is
deprecated); raw pixels 0..255 go in, quantized by the input tensor's own (scale, zero point).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import convmixer_tf
from convmixer_tf import cli, saving
from training.tta import TTA_MODES, average_logits, view_count


class TFLiteClassifier:
    """Runs a .tflite ConvMixer on float pixel batches and returns float logits.

    Quantized inputs are fed as ``round(pixel / scale + zero_point)`` (exact for the exports of
    :mod:`export.tflite`: ``pixel - 128`` for int8, ``pixel`` for uint8); quantized outputs are
    dequantized.

    Args:
        model: path of a .tflite file or its bytes.
        num_threads: interpreter threads (ai-edge-litert's default is 1).
        reference_kernels: run TFLite's reference kernels (no XNNPACK): what TFLite Micro's
            kernels descend from.

    Example:
        >>> # clf = TFLiteClassifier("model.tflite", num_threads=2)
        >>> # logits = clf.predict(images)  # images: float32 (N, H, W, 3) in 0..255
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        num_threads: int = 1,
        reference_kernels: bool = False,
    ):
        options = {"num_threads": num_threads}
        if reference_kernels:  # TFLite's reference kernels instead of XNNPACK / optimized ones
            options["experimental_op_resolver_type"] = OpResolverType.BUILTIN_REF
        if isinstance(model, bytes):
            self.interpreter = Interpreter(model_content=model, **options)
        else:
            if not os.path.isfile(model):
                raise ValueError(f"TFLite file not found: {os.fspath(model)!r}")
            try:
                self.interpreter = Interpreter(model_path=os.fspath(model), **options)
            except ValueError as e:
                raise ValueError(f"Cannot read {os.fspath(model)!r} as a .tflite model: {e}") from e
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def quantize_input(self, images: np.ndarray) -> np.ndarray:
        """Float pixels -> the input tensor's dtype (identity for float models)."""
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return images.astype(np.float32)
        scale, zero_point = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(images / scale + zero_point), info.min, info.max).astype(dtype)

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        """Runs one batch already in the input dtype; returns the raw output tensor."""
        self.interpreter.set_tensor(self.input["index"], batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Float logits ``(N, classes)`` for float32 pixels ``(N, H, W, 3)`` in 0..255."""
        logits = self.raw_outputs(images).astype(np.float32)
        if self.output["dtype"] != np.float32:
            scale, zero_point = self.output["quantization"]
            logits = (logits - zero_point) * scale
        return logits

    def raw_outputs(self, images: np.ndarray) -> np.ndarray:
        """The output tensor as the model gives it (int8 for integer exports), ``(N, classes)``,
        for float32 pixels ``(N, H, W, 3)`` in 0..255."""
        images = np.asarray(images, dtype=np.float32)
        batch = int(self.input["shape"][0])
        if images.shape[1:] != tuple(self.input["shape"][1:]):
            raise ValueError(
                f"Images of shape {images.shape[1:]} do not fit the model input "
                f"{tuple(self.input['shape'][1:])}."
            )
        outputs = []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            pad = batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            outputs.append(self.invoke(self.quantize_input(chunk))[: batch - pad])
        return np.concatenate(outputs)


def evaluate(
    tflite_model: str | os.PathLike | bytes,
    batches: Iterable,
    *,
    keras_model=None,
    num_threads: int = 1,
    tta: str = "none",
) -> dict:
    """Top-1 of a .tflite model on ``(images, labels)`` batches, and agreement with Keras.

    Returns ``{"top1", "n"}`` plus, with ``keras_model`` (Keras 3 or tf_keras, e.g. a QAT
    model), ``{"keras_top1", "agreement"}``: the share of images on which both predict the same
    class. Accuracies are in percent. ``tta`` (:data:`training.tta.TTA_MODES`) averages the
    logits of both models over the test-time views; the result then adds ``{"tta", "views"}``.

    Example:
        >>> # evaluate("m.tflite", dataset, keras_model=keras.saving.load_model("m.keras"))
    """
    views = view_count(tta)  # checks the mode before any work
    classifier = TFLiteClassifier(tflite_model, num_threads=num_threads)

    def keras_logits(view):
        return np.asarray(keras_model(view, training=False))

    correct = agree = keras_correct = n = 0
    for images, labels in batches:
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels).reshape(-1)
        predicted = average_logits(classifier.predict, images, tta).argmax(-1)
        correct += int((predicted == labels).sum())
        if keras_model is not None:
            keras_predicted = average_logits(keras_logits, images, tta).argmax(-1)
            keras_correct += int((keras_predicted == labels).sum())
            agree += int((keras_predicted == predicted).sum())
        n += len(labels)
    if n == 0:
        raise ValueError("No evaluation images: the data source is empty.")
    result = {"top1": 100.0 * correct / n, "n": n}
    if keras_model is not None:
        result["keras_top1"] = 100.0 * keras_correct / n
        result["agreement"] = 100.0 * agree / n
    if tta != "none":
        result.update(tta=tta, views=views)
    return result


def check_same_task(tflite_path: str, size: tuple[int, int], classes: int, keras_path: str,
                    keras_model) -> None:  # fmt: skip
    """Raises a ValueError naming both files if the Keras model cannot be compared with the
    .tflite one: another number of classes, or another fixed input size."""
    keras_classes = keras_model.output_shape[-1]
    if keras_classes != classes:
        raise ValueError(
            f"{keras_path!r} has {keras_classes} outputs but {tflite_path!r} has {classes}: "
            "they are not the same classifier."
        )
    keras_size = tuple(keras_model.input_shape[1:3])
    if None not in keras_size and keras_size != size:
        raise ValueError(
            f"{keras_path!r} takes {keras_size[0]}x{keras_size[1]} images but {tflite_path!r} "
            f"takes {size[0]}x{size[1]}."
        )


def build_parser() -> argparse.ArgumentParser:
    from training.data import add_evaluation_data_arguments

    parser = cli.ArgumentParser(
        prog="python -m export.evaluate", description="Top-1 of a .tflite ConvMixer."
    )
    parser.add_argument("--tflite", required=True, type=cli.input_file, help="the .tflite file")
    parser.add_argument("--keras", default=None, type=cli.input_path,
                        help="the .keras model to compare with")  # fmt: skip
    parser.add_argument("--threads", type=cli.positive_int, default=1,
                        help="LiteRT interpreter threads")  # fmt: skip
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="test-time augmentation, as python -m training.evaluate --tta: "
                             "one interpreter invocation per view")  # fmt: skip
    add_evaluation_data_arguments(parser)
    cli.add_unsafe_argument(parser)
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluates as ``args`` say; prints one JSON line."""
    from export.tflite import read_labels
    from training.data import evaluation_data_kwargs, load_dataset
    from training.evaluate import check_class_names

    classifier = TFLiteClassifier(args.tflite)
    keras_model = convmixer_tf.load_model(args.keras, unsafe=args.unsafe) if args.keras else None
    height, width = (int(d) for d in classifier.input["shape"][1:3])
    classes = int(classifier.output["shape"][-1])
    if keras_model is not None:
        check_same_task(args.tflite, (height, width), classes, args.keras, keras_model)
    # The crop and interpolation of the --keras model's training run, if any; the class names
    # the export stored in the .tflite (or that run's).
    run_settings = saving.training_run_settings(args.keras) if args.keras else {}
    data = evaluation_data_kwargs(args, run_settings)
    dataset, class_names = load_dataset(image_size=(height, width), **data)
    if len(class_names) != classes:
        raise ValueError(
            f"{args.tflite!r} has {classes} outputs but the data has {len(class_names)} "
            f"classes ({list(class_names)[:10]}...)."
        )
    with open(args.tflite, "rb") as f:
        blob = f.read()
    try:
        stored = read_labels(blob)
    except (IndexError, UnicodeDecodeError) as e:  # a file that lies about its metadata
        raise ValueError(f"{args.tflite!r}: its class-name metadata is unreadable ({e}).") from e
    if stored is not None:
        check_class_names(class_names, stored, f"the names stored in {args.tflite}")
    elif "class_names" in run_settings:
        check_class_names(class_names, run_settings["class_names"], f"{args.keras}'s run")
    result = evaluate(
        args.tflite, dataset.as_numpy_iterator(), keras_model=keras_model,
        num_threads=args.threads, tta=args.tta,
    )  # fmt: skip
    transform = {"crop_pct": data["crop_pct"], "interpolation": data["interpolation"]}
    cli.emit({"split": data["split"], **transform, **result})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
