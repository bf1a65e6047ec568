"""Edge targets checked by their own tools: Arm Ethos-U NPUs (Vela) and TFLite Micro.

- :func:`run_vela` compiles a fully-int8 .tflite with Arm's ``ethos-u-vela`` for one accelerator
  configuration (``ethos-u55-128``, ...) and returns Vela's optimized .tflite with what Vela says
  about it: which operators run on the NPU and which stay on the CPU (read from Vela's own
  output file and its summary, not assumed), its estimated inference time and cycles, and its
  SRAM and flash use. All of these are Vela's *estimates* for the named system configuration.
- :func:`run_tflm` runs a .tflite in the TFLite Micro interpreter (``tflite-micro``), compares
  its outputs with LiteRT's on the given images and measures the tensor arena it needs; when
  TFLM cannot run the file it says precisely why (the op TFLM lacks) and what to change.
- :func:`micro_chain` says whether an Ethos-U file runs end to end on a device (TFLM with the
  NPU as one custom op): every op Vela left on the CPU must exist in TFLM.

Both tools run offline on the host. Neither is needed for the rest of the export: a missing one
is reported by name with the line that installs it.

Example:
    >>> import convmixer_tf, numpy as np
    >>> from export import edge, tflite
    >>> model = convmixer_tf.ConvMixer(16, 1, 3, 4, input_shape=(16, 16, 3), num_classes=4,
    ...                                activation="relu")
    >>> pixels = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    >>> blob = tflite.convert(model, "int8", calibration_images=pixels)
    >>> _, vela = edge.run_vela(blob, "ethos-u55-128")
    >>> vela["cpu_ops"], vela["npu_op_share"]
    ([], 1.0)
    >>> edge.run_tflm(blob, pixels)["runs"]
    True
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from export import tflite
from export.constants import VELA_TARGETS

# Installed from requirements.txt (tflite-micro: Linux x86-64 wheels only).
INSTALL = {
    "vela": "pip install ethos-u-vela==5.2.0",
    "tflm": "pip install tflite-micro==0.dev20261023182759  (Linux x86-64 only)",
}
# The custom op Vela puts in place of what the NPU runs.
ETHOSU_OP = "CUSTOM(ethos-u)"
# Vela's own default system configuration per accelerator family when none is given (its
# config_files/Arm/vela.ini); named explicitly so that the report says what was estimated.
DEFAULT_SYSTEM_CONFIGS = {
    "ethos-u55": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
    "ethos-u65": ("Ethos_U65_Client_Server", "Dedicated_Sram"),
    "ethos-u85": ("Ethos_U85_SYS_DRAM_Mid", "Dedicated_Sram"),
}
# What TFLM prints when an op has no kernel: "Didn't find op for builtin opcode 'GELU'".
_MISSING_OP = re.compile(r"Didn't find op for (?:builtin|custom) opcode '([^']+)'")
_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
# What to change when TFLM lacks an op of our graphs.
_ADVICE = {
    "GELU": "TFLM has no GELU kernel: export with --gelu sigmoid (x * sigmoid(1.702 x) as "
    "LOGISTIC + MUL, which TFLM has; best with --format qat), or train a ReLU ConvMixer; on "
    "Ethos-U, Vela runs GELU on the NPU",
}


def require(tool: str) -> None:
    """Raises a ValueError naming the package to install if ``tool`` ("vela" or "tflm") is
    missing."""
    module = {"vela": "ethosu.vela", "tflm": "tflite_micro"}[tool]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        name = "Arm's Vela compiler" if tool == "vela" else "TFLite Micro"
        raise ValueError(f"{name} is not installed: {INSTALL[tool]}")


def check_targets(targets: Sequence[str], fmt: str) -> list[str]:
    """The deduplicated targets, or a ValueError naming the one that cannot work."""
    from export.constants import INTEGER_FORMATS, TARGETS

    targets = list(dict.fromkeys(targets or ()))
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}. Received: {target!r}")
    if targets and fmt not in INTEGER_FORMATS:
        raise ValueError(
            f"targets {targets} need a fully-integer file: format int8 or qat. "
            f"Received: format {fmt!r}"
        )
    for tool in {"vela" if t in VELA_TARGETS else "tflm" for t in targets}:
        require(tool)
    return targets


def target_path(output: str | os.PathLike, target: str) -> str:
    """Where the file for ``target`` goes: ``model_int8.tflite`` ->
    ``model_int8.ethos-u55-128.tflite`` (``.tflm.tflite`` for TFLite Micro)."""
    root, ext = os.path.splitext(os.fspath(output))
    return f"{root}.{target}{ext or '.tflite'}"


def _vela_command() -> list[str]:
    # Vela's own entry point, in this interpreter (its console script may not be on PATH).
    return [sys.executable, "-c", "import sys; from ethosu.vela.vela import main; sys.exit(main())"]


def run_vela(
    blob: bytes,
    target: str,
    *,
    system_config: str | None = None,
    memory_mode: str | None = None,
    config: str | None = None,
) -> tuple[bytes, dict]:
    """Compiles a fully-int8 .tflite with Vela for ``target`` (a Vela accelerator config).

    Args:
        blob: the .tflite (int8 or qat export).
        target: one of :data:`export.constants.VELA_TARGETS`.
        system_config, memory_mode: Vela's system configuration and memory mode (defaults:
            :data:`DEFAULT_SYSTEM_CONFIGS`, Vela's own defaults for the family).
        config: a Vela .ini file that defines them (default: Vela's ``Arm/vela.ini``).

    Returns:
        ``(optimized .tflite bytes, report)``; the report holds the target, its system
        configuration, the NPU/CPU operator counts and the names of the ops left on the CPU,
        and Vela's estimates (inference time, cycles, SRAM and off-chip flash use, MACs).

    Raises:
        ValueError: Vela is not installed, an unknown target, or Vela rejected an option
            (an unknown system configuration or memory mode).
        RuntimeError: Vela failed otherwise (its message included).
    """
    require("vela")
    if target not in VELA_TARGETS:
        raise ValueError(f"target must be one of {VELA_TARGETS}. Received: {target!r}")
    family = target.rsplit("-", 1)[0]
    default_system, default_memory = DEFAULT_SYSTEM_CONFIGS[family]
    system_config = system_config or default_system
    memory_mode = memory_mode or default_memory
    with tempfile.TemporaryDirectory(prefix="vela_") as folder:
        source = os.path.join(folder, "model.tflite")
        with open(source, "wb") as f:
            f.write(blob)
        out = os.path.join(folder, "out")
        command = [
            *_vela_command(), source, "--output-dir", out, "--accelerator-config", target,
            "--system-config", system_config, "--memory-mode", memory_mode,
        ]  # fmt: skip
        if config:
            command += ["--config", os.fspath(config)]
        else:
            from ethosu.vela import vela as _vela

            # Vela's bundled configurations: named explicitly, so that it does not warn.
            command += ["--config", os.path.join(os.path.dirname(_vela.__file__), os.pardir,
                                                 "config_files", "Arm", "vela.ini")]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
            if lines and "CliOptionError" in lines[-1]:
                # A Vela option we passed on from the user (system config, memory mode, .ini).
                raise ValueError(
                    f"Vela rejected an option for {target}: {lines[-1].split(': ', 1)[-1]}"
                )
            raise RuntimeError(f"Vela failed for {target}: {' | '.join(lines[-5:])}")
        optimized_path = os.path.join(out, "model_vela.tflite")
        summaries = [f for f in os.listdir(out) if f.endswith(".csv")]
        if not os.path.exists(optimized_path) or len(summaries) != 1:
            raise RuntimeError(
                f"Vela wrote no optimized file or summary for {target}: {os.listdir(out)}"
            )
        with open(optimized_path, "rb") as f:
            optimized = f.read()
        with open(os.path.join(out, summaries[0]), newline="") as f:
            summary = next(csv.DictReader(f))
    report = _vela_report(target, optimized, summary, result.stdout)
    return optimized, report


def _vela_count(stdout: str, kind: str) -> int | None:
    match = re.search(rf"^{kind} operators = (\d+)", stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


def _vela_report(target: str, optimized: bytes, summary: dict, stdout: str) -> dict:
    ops = tflite.summarize(optimized).ops
    cpu_ops = [op for op in ops if op != ETHOSU_OP]
    npu_count, cpu_count = _vela_count(stdout, "NPU"), _vela_count(stdout, "CPU")
    if npu_count is None or cpu_count is None:
        raise RuntimeError(f"Vela's summary for {target} has no operator counts: {stdout[-500:]!r}")
    if cpu_count != len(cpu_ops):
        raise RuntimeError(
            f"Vela says {cpu_count} CPU operators for {target}, its file holds {len(cpu_ops)}: "
            f"{cpu_ops}"
        )
    seconds = float(summary["inference_time"])
    return {
        "target": target,
        "estimate": "Vela 5.2.0 estimate",
        "accelerator": summary["accelerator_configuration"],
        "system_config": summary["system_config"],
        "memory_mode": summary["memory_mode"],
        "clock_mhz": float(summary["core_clock"]) / 1e6,
        "npu_ops": npu_count,
        "cpu_ops": cpu_ops,
        "npu_op_share": round(npu_count / max(1, npu_count + cpu_count), 4),
        "npu_custom_ops": ops.count(ETHOSU_OP),
        "inference_ms": round(1000 * seconds, 4),
        "inferences_per_second": round(float(summary["inferences_per_second"]), 2),
        "cycles_total": int(float(summary["cycles_total"])),
        "cycles_npu": int(float(summary["cycles_npu"])),
        "sram_kib": round(float(summary["sram_memory_used"]), 2),
        "off_chip_flash_kib": round(float(summary["off_chip_flash_memory_used"]), 2),
        "dram_kib": round(float(summary["dram_memory_used"]), 2),
        "weights_bytes": int(float(summary["total_original_weights"])),
        "npu_encoded_weights_bytes": int(float(summary["total_npu_encoded_weights"])),
        "macs": int(float(summary["nn_macs"])),
        "bytes": len(optimized),
    }


@contextlib.contextmanager
def _captured_fds() -> Iterator[list[str]]:
    """Collects what C++ writes to file descriptors 1 and 2 (TFLM logs there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    lines: list[str] = []
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def _upper_bound_arena(blob: bytes) -> int:
    # Every non-constant tensor at once, with no reuse, plus room for TFLM's own structures:
    # an arena that cannot be too small for our graphs.
    model = tflite._model_object(blob)
    graph = model.subgraphs[0]
    widths = {"int8": 1, "uint8": 1, "int16": 2, "int32": 4, "float32": 4, "int64": 8}
    total = 0
    for tensor in graph.tensors:
        if model.buffers[tensor.buffer].data is None:
            size = int(np.prod(tensor.shape)) if tensor.shape is not None else 0
            total += size * widths.get(tflite._TYPE_NAMES[tensor.type], 4)
    return total + 64 * 1024 + 512 * len(graph.operators)


def _tflm_interpreter(blob: bytes, arena_size: int):
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(blob, arena_size=arena_size)


def tflm_installed() -> bool:
    """Whether the tflite-micro package is importable here."""
    try:
        require("tflm")
    except ValueError:
        return False
    return True


def _open_tflm(blob: bytes):
    """``(interpreter, None)``, or ``(None, report)`` saying why TFLM cannot run ``blob``."""
    with _captured_fds() as log:
        try:
            interpreter = _tflm_interpreter(blob, _upper_bound_arena(blob))
            error = None
        except RuntimeError as e:
            interpreter, error = None, e
    if interpreter is not None:
        return interpreter, None
    missing = sorted(set(_MISSING_OP.findall("\n".join(log))))
    reason = (
        f"TFLite Micro has no kernel for {', '.join(missing)}" if missing
        else f"TFLite Micro failed: {error}; {' | '.join(log[-3:])}"
    )  # fmt: skip
    change = "; ".join(_ADVICE.get(op, f"replace {op}") for op in missing) or None
    return None, {"runs": False, "missing_ops": missing, "reason": reason, "change": change}


def tflm_ops_check(blob: bytes) -> dict:
    """Whether TFLite Micro has a kernel for every op of ``blob`` (it is opened, not run):
    ``{"runs": True}`` or :func:`run_tflm`'s failure report."""
    require("tflm")
    _, failure = _open_tflm(blob)
    return failure or {"runs": True, "missing_ops": []}


def recorded_arena(interpreter) -> int:
    """The tensor arena TFLM's allocation recorder reports for an opened interpreter (bytes)."""
    with _captured_fds() as log:
        interpreter.print_allocations()
    totals = [int(m) for line in log for m in _ARENA_TOTAL.findall(line)]
    if not totals:
        raise RuntimeError(f"TFLite Micro printed no arena total: {log[:3]}")
    return totals[-1]


def run_tflm(blob: bytes, images: np.ndarray) -> dict:
    """Runs an int8/uint8 .tflite in TFLite Micro on ``images`` (raw pixels) and compares.

    Args:
        blob: the .tflite.
        images: raw pixels ``(N, H, W, 3)`` (real images: what the comparison is about).

    Returns:
        ``{"runs": True, "arena_bytes": ..., "n": ..., "bit_exact_vs_litert": ...,
        "max_abs_diff_vs_litert": ... (output quantization steps), "top1_agreement_vs_litert":
        ..., and the same against LiteRT's reference kernels}``, or ``{"runs": False,
        "missing_ops": [...], "reason": "...", "change": "..."}`` when TFLM cannot run it.
    """
    from export.evaluate import TFLiteClassifier

    require("tflm")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, 3) batch. Received: {images.shape}")
    interpreter, failure = _open_tflm(blob)
    if failure is not None:
        return failure
    litert = TFLiteClassifier(blob)
    quantized = litert.quantize_input(images)
    outputs = []
    for image in quantized:
        interpreter.set_input(image[None], 0)
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_output(0)).reshape(-1))
    outputs = np.stack(outputs)
    recorded = recorded_arena(interpreter)
    # The recorded total, plus the arena's alignment slack when the start address needs it:
    # the smallest of these that allocates and gives the same outputs is reported.
    arena = None
    for slack in (0, 16, 64, 256, 1024, 4096):
        try:
            with _captured_fds():
                exact = _tflm_interpreter(blob, recorded + slack)
                exact.set_input(quantized[:1], 0)
                exact.invoke()
        except RuntimeError:
            continue
        if not np.array_equal(np.array(exact.get_output(0)).reshape(-1), outputs[0]):
            raise RuntimeError("TFLite Micro gave different outputs in the minimal arena.")
        arena = recorded + slack
        break
    if arena is None:
        raise RuntimeError(f"TFLite Micro's recorded arena ({recorded} bytes) does not allocate.")

    report = {"runs": True, "arena_bytes": arena, "n": int(len(images))}
    report.update(_compare(outputs, litert.raw_outputs(images), "litert"))
    # TFLM's kernels descend from TFLite's reference kernels: exactness against those tells a
    # kernel difference (XNNPACK's rounding) from a TFLM problem.
    reference = TFLiteClassifier(blob, reference_kernels=True).raw_outputs(images)
    report.update(_compare(outputs, reference, "litert_reference_kernels"))
    return report


def _compare(outputs: np.ndarray, reference: np.ndarray, name: str) -> dict:
    reference = np.asarray(reference).reshape(outputs.shape)
    diff = np.abs(outputs.astype(np.int32) - reference.astype(np.int32))
    agreement = float(np.mean(outputs.argmax(1) == reference.argmax(1)))
    return {
        f"bit_exact_vs_{name}": bool(diff.max() == 0),
        f"max_abs_diff_vs_{name}": int(diff.max()),
        f"top1_agreement_vs_{name}": round(agreement, 4),
    }


def micro_chain(vela_report: dict, tflm_report: dict) -> dict:
    """Whether Vela's file runs on an Ethos-U device under TFLite Micro: the NPU part is one
    custom op (TFLM's Ethos-U kernel), every op Vela left on the CPU must have a TFLM kernel.

    ``tflm_report`` is :func:`run_tflm`'s on the file Vela compiled (its ops are a superset of
    those Vela leaves on the CPU): an op TFLM lacks breaks the chain only if Vela left it on
    the CPU.
    """
    cpu_ops = sorted(set(vela_report["cpu_ops"]))
    if not tflm_report["runs"] and not tflm_report.get("missing_ops"):
        return {"works": None, "cpu_ops": cpu_ops, "reason": tflm_report["reason"]}
    missing = set(tflm_report.get("missing_ops", []))
    unsupported = sorted(op for op in cpu_ops if op in missing)
    return {
        "works": not unsupported,
        "cpu_ops": cpu_ops,
        "cpu_ops_missing_in_tflm": unsupported,
    }
