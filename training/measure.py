"""Measurement helpers shared by every benchmark: FLOPs from layer shapes, the matmul peak.

``training.benchmark``, ``export.benchmark`` and ``benchmarks/*`` report speeds as fractions of
:func:`matmul_peak_flops` (the best float32 ``tf.matmul`` rate on this machine, measured in the
same run), with the work counted by :func:`forward_macs`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time

import tensorflow as tf

# The repository root: subprocesses that import this project (``python -m ...``) run there.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forward_macs(model) -> int:
    """Multiply-accumulates of one forward pass of one image, from the layers' shapes.

    Counts Conv2D, DepthwiseConv2D and Dense layers (ConvMixer's only matmul-like layers);
    raises a ValueError naming a conv layer with a grouped or dilated kernel (not counted here).

    Example:
        >>> import convmixer_tf
        >>> forward_macs(convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(8, 8, 3),
        ...                                     num_classes=10))
        9632
    """
    kinds = ("Conv2D", "DepthwiseConv2D", "Dense")
    total = 0
    for layer in model.layers:
        # The stock class a layer is or extends (the builder's fused DepthwiseConv2D counts).
        kind = next((c.__name__ for c in type(layer).__mro__ if c.__name__ in kinds), None)
        if kind is None:
            continue
        config = layer.get_config()
        if max(config.get("dilation_rate", (1, 1))) > 1 or config.get("groups", 1) != 1:
            raise ValueError(
                f"Layer {layer.name!r}: FLOPs of dilated or grouped convolutions are not counted."
            )
        input_shape = tuple(layer.input.shape)
        output_shape = tuple(layer.output.shape)
        if None in input_shape[1:] or None in output_shape[1:]:
            raise ValueError(
                f"Layer {layer.name!r} has an unknown spatial size {output_shape}: build the "
                "model with a fixed input_shape to count its FLOPs."
            )
        if kind == "Dense":
            total += input_shape[-1] * output_shape[-1]
            continue
        out_positions = math.prod(output_shape[1:-1])
        kernel_positions = math.prod(config["kernel_size"])
        if kind == "Conv2D":
            total += out_positions * kernel_positions * input_shape[-1] * output_shape[-1]
        else:
            total += out_positions * kernel_positions * output_shape[-1]
    return total


def training_flops_per_image(model) -> int:
    """``3 * forward MACs * 2``: forward + backward (twice the forward) FLOPs of one image."""
    return 3 * 2 * forward_macs(model)


def matmul_peak_flops(size: int = 2048, repeats: int = 5, threads: int | None = None) -> float:
    """Float32 FLOP/s of ``tf.matmul`` of two ``size x size`` matrices (best of ``repeats``).

    With ``threads`` None, measured in this process with its TensorFlow thread settings (what a
    training step in this process gets). With ``threads``, measured in a fresh process whose
    TensorFlow uses that many intra-op threads: the peak for a runtime told to use ``threads``
    (the TFLite interpreter's ``num_threads``).

    Example:
        >>> matmul_peak_flops(size=256, repeats=2) > 0
        True
    """
    if size < 1 or repeats < 1 or (threads is not None and threads < 1):
        raise ValueError(
            f"`size`, `repeats` and `threads` must be positive. Received: {size}, {repeats}, "
            f"{threads}"
        )
    if threads is not None:
        code = (
            "import sys, tensorflow as tf\n"
            "tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[3]))\n"
            "tf.config.threading.set_inter_op_parallelism_threads(1)\n"
            "from training.measure import matmul_peak_flops\n"
            "print(matmul_peak_flops(int(sys.argv[1]), int(sys.argv[2])))\n"
        )
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        out = subprocess.run(
            [sys.executable, "-c", code, str(size), str(repeats), str(threads)],
            capture_output=True, text=True, check=True, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        return float(json.loads(out.stdout.strip().splitlines()[-1]))
    a = tf.random.normal((size, size), dtype=tf.float32)
    b = tf.random.normal((size, size), dtype=tf.float32)
    matmul = tf.function(tf.linalg.matmul)
    matmul(a, b).numpy()  # trace and warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


# The CPU features our speed figures depend on (x86 /proc/cpuinfo "flags"; "bf16" is Arm's
# "Features" name for its bfloat16 instructions).
CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile",
    "bf16",
)  # fmt: skip
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags() -> list[str] | None:
    """The :data:`CPU_FLAGS` this CPU has (Linux ``/proc/cpuinfo``), or None where unknown.

    Example:
        >>> flags = cpu_flags()
        >>> flags is None or set(flags) <= set(CPU_FLAGS)
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FLAGS if flag in present]
    except OSError:
        pass
    return None


def has_bfloat16_instructions() -> bool | None:
    """Whether the CPU computes bfloat16 natively (AVX512_BF16, AMX or Arm BF16); None where
    unknown. Without them oneDNN converts to float32 around every bfloat16 op."""
    flags = cpu_flags()
    return None if flags is None else any(flag in flags for flag in BFLOAT16_FLAGS)


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """This machine for result tables, read at run time: cores, CPU name and the speed-relevant
    :data:`CPU_FLAGS` it has.

    Example:
        >>> describe_machine().startswith(f"{os.cpu_count()}-core ")
        True
    """
    flags = cpu_flags()
    return (
        f"{os.cpu_count()}-core {cpu_name()}, flags "
        f"{' '.join(flags) if flags is not None else 'unknown'}"
    )
