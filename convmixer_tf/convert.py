"""Converts a PyTorch ConvMixer checkpoint into a Keras ``.keras`` model file.

From the paper's checkpoint to a ``.keras`` file that ``python -m export`` takes::

    python -m convmixer_tf.convert --preset convmixer_768_32 \\
        --weights convmixer_768_32_ks7_p7_relu.pth.tar --output convmixer_768_32.keras

``--preset`` names a preset (its architecture and activation); without it the architecture is read
from the checkpoint's tensor shapes and the activation comes from ``--activation`` (GELU unless
said). ``--weights`` takes a path, a URL or ``imagenet``. The file is written atomically (a
temporary name in the same folder, then renamed) and, unless ``--no-verify``, reloaded and
checked to give the same outputs as the converted model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from convmixer_tf import cli, files, presets, pretrained, saving
from convmixer_tf import model as model_lib
from convmixer_tf.constants import ACTIVATIONS

VERIFY_TOLERANCE = 1e-5


def build_model(
    weights: str,
    model_name: str | None = None,
    *,
    activation: str | None = None,
    input_size: int | None = None,
    keras_module: str = "keras",
):
    """Builds a ConvMixer and loads ``weights`` into it.

    Args:
        weights: checkpoint path, URL, or ``"imagenet"`` (needs ``model_name``).
        model_name: a preset name; None reads the architecture from the checkpoint's shapes.
        activation: ``"gelu"`` or ``"relu"``; default: the preset's, or GELU without a preset.
        input_size: square input size; default: the preset's evaluation size, or 224.
        keras_module: ``"keras"`` (Keras 3) or ``"tf_keras"``.

    Example:
        >>> from convmixer_tf import convert
        >>> model = convert.build_model("tests/fixtures/pretrained/official_relu_k4.pth.tar",
        ...                             activation="relu", input_size=16)
        >>> model.output_shape
        (None, 10)
    """
    overrides: dict = {"keras_module": keras_module}
    if activation is not None:
        overrides["activation"] = activation
    if input_size is not None:
        overrides["input_shape"] = (input_size, input_size, 3)
    if model_name is not None:
        return model_lib.create_model(model_name, weights=weights, **overrides)
    if weights == "imagenet":
        raise ValueError("weights='imagenet' needs a preset name (--model).")
    path = pretrained.resolve_weights(None, weights)
    info = pretrained.inspect_checkpoint(path)
    overrides.setdefault("input_shape", (224, 224, 3))
    return model_lib.ConvMixer(
        info.dim,
        info.depth,
        info.kernel_size,
        info.patch_size,
        num_classes=info.num_classes or 1000,
        include_top=info.num_classes is not None,
        weights=path,
        **overrides,
    )


def verify_saved(model, output: str, seed: int = 0) -> float:
    """Reloads ``output`` and returns the max abs difference of its outputs from ``model``'s on
    random pixels; raises a ValueError above ``VERIFY_TOLERANCE``."""
    reloaded = saving.load_model(output)
    height, width = model.input_shape[1:3]
    pixels = np.random.default_rng(seed).uniform(0, 255, (1, height, width, 3)).astype("float32")
    diff = float(
        np.max(np.abs(model.predict(pixels, verbose=0) - reloaded.predict(pixels, verbose=0)))
    )
    if diff > VERIFY_TOLERANCE:
        raise ValueError(f"{output} reloads with different outputs (max abs diff {diff:.3g})")
    return diff


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """``--preset NAME`` (``--model NAME``: its deprecated spelling)."""
    parser.add_argument(
        "--preset", choices=list(presets.PRESETS), metavar="PRESET",
        help=f"preset name ({', '.join(presets.PRESETS)})",
    )  # fmt: skip
    parser.add_argument("--model", dest="preset", choices=list(presets.PRESETS),
                        action=cli.DeprecatedAlias, new_option="--preset",
                        help=argparse.SUPPRESS)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m convmixer_tf.convert",
        description="Convert a PyTorch ConvMixer checkpoint (timm .safetensors or official "
        ".pth.tar) into a Keras .keras model.",
    )
    add_preset_argument(parser)
    parser.add_argument("--weights", required=True, help="checkpoint path, URL or 'imagenet'")
    parser.add_argument("--output", required=True, type=cli.output_path,
                        help="the .keras file to write")  # fmt: skip
    parser.add_argument("--activation", choices=ACTIVATIONS)
    parser.add_argument("--input-size", type=cli.image_size,
                        help="square input size (default: preset's)")  # fmt: skip
    parser.add_argument("--no-verify", action="store_true", help="skip the reload check")
    cli.add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Converts as ``args`` say."""
    if not args.output.endswith(".keras"):
        raise ValueError(f"--output must end with '.keras'. Received: {args.output!r}")
    files.check_writable(args.output)
    files.check_not_input({"--output": args.output}, {"--weights": args.weights})
    with cli.stdout_to_stderr():
        model = build_model(
            args.weights, args.preset, activation=args.activation, input_size=args.input_size
        )
        saving.save_model(model, args.output)
        report = {"output": args.output, "parameters": model.count_params()}
        if not args.no_verify:
            report["reload_max_abs_diff"] = verify_saved(model, args.output)
    cli.emit(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: a user error, one line)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
