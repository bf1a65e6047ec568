"""Training throughput side by side: ours in float32 and mixed_bfloat16 against PyTorch eager
float32 and bfloat16 autocast, interleaved in one run, with the ratios.

    python -m benchmarks.training_peers --peers-python .torchvenv/bin/python --rounds 3

Each round runs, in this order, ``python -m training.benchmark --peers torch`` (float32, then
PyTorch in both precisions through ``benchmarks/peer_training.py``) and the same with
``--mixed-precision``, each in a process of its own (a Keras dtype policy is per process); the
table gives each one's median img/s over the rounds and every ratio is computed from those
medians. The same model, batch and step (the recipe's AdamW, label smoothing, clipping) on one
synthetic batch; no other process should run meanwhile. Prints the table (markdown) and writes
the records as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks import REPO_ROOT
from training.measure import describe_machine


def ours(args, mixed: bool) -> dict:
    """One ``training.benchmark`` record; the float32 one also times PyTorch right after ours,
    with the recipe's optimizer settings (``--peers torch``)."""
    command = [sys.executable, "-m", "training.benchmark", "--model", args.model]
    command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    if mixed:
        command += ["--mixed-precision", "--peers", "none"]
    else:
        command += ["--peers", "torch", "--peers-python", args.peers_python]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"training.benchmark failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rates: dict[str, list[float]], record: dict, torch_version: str) -> str:
    median = {name: statistics.median(values) for name, values in rates.items()}
    base = median["torch autocast bf16"]
    lines = [
        f"ConvMixer-{record['dim']}/{record['depth']} (k{record['kernel_size']}, "
        f"p{record['patch_size']}, {record['image_size']}x{record['image_size']}), batch "
        f"{record['batch_size']}, one training step (the recipe's AdamW), synthetic data; "
        f"{describe_machine()}; "
        f"PyTorch {torch_version}; median of {len(rates[next(iter(rates))])} interleaved rounds.",
        "",
        "| | img/s (rounds) | / PyTorch autocast bf16 | / our float32 |",
        "|---|---|---|---|",
    ]
    for name, values in rates.items():
        spread = ", ".join(f"{v:.1f}" for v in values)
        lines.append(
            f"| {name} | **{median[name]:.1f}** ({spread}) | {median[name] / base:.2f}x | "
            f"{median[name] / median['ours float32']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convmixer_256_8")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers-python", required=True, help="Python with requirements-bench")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)

    names = ("ours float32", "ours mixed_bfloat16", "torch eager float32", "torch autocast bf16")
    rates: dict[str, list[float]] = {name: [] for name in names}
    records = []
    for _ in range(args.rounds):
        fp32, mixed = ours(args, mixed=False), ours(args, mixed=True)
        records.append({"float32": fp32, "mixed": mixed})
        rates["ours float32"].append(fp32["img_per_s"])
        rates["ours mixed_bfloat16"].append(mixed["img_per_s"])
        rates["torch eager float32"].append(fp32["torch_float32_img_per_s"])
        rates["torch autocast bf16"].append(fp32["torch_autocast_bf16_img_per_s"])
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    text = table(rates, records[0]["float32"], records[0]["float32"]["torch"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(text)
    return text


if __name__ == "__main__":
    main()
