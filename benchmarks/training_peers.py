"""Training throughput side by side: ours in float32 and mixed_bfloat16 against PyTorch eager
float32 and bfloat16 autocast, interleaved in one run, with the ratios.

    python -m benchmarks.training_peers --peers-python .torchvenv/bin/python --rounds 3

Each round runs, in this order, ``python -m training.benchmark --peers torch`` (float32, then
PyTorch in both precisions through ``benchmarks/peer_training.py``) and the same with
``--mixed-precision``, each in a process of its own (a Keras dtype policy is per process); the
table gives each one's median img/s over the rounds and every ratio is computed from those
medians. The same model, batch and step (the recipe's AdamW, label smoothing, clipping) on one
synthetic batch; no other process should run meanwhile. Prints the table (markdown) on stderr,
the medians as one JSON line on stdout, and writes the records as JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchmarks import REPO_ROOT
from convmixer_tf import cli, files
from convmixer_tf.presets import PRESETS


def ours(args, mixed: bool) -> dict:
    """One ``training.benchmark`` record; the float32 one also times PyTorch right after ours,
    with the recipe's optimizer settings (``--peers torch``)."""
    command = [sys.executable, "-m", "training.benchmark", "--preset", args.preset]
    command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    if mixed:
        command += ["--mixed-precision", "--peers", "none"]
    else:
        command += ["--peers", "torch", "--peers-python", args.peers_python]
    return cli.run_json_command(command, "python -m training.benchmark", cwd=REPO_ROOT)


def table(rates: dict[str, list[float]], record: dict, torch_version: str) -> str:
    from training.measure import describe_machine

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


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.training_peers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", default="convmixer_256_8", choices=list(PRESETS))
    parser.add_argument("--model", dest="preset", action=cli.DeprecatedAlias,
                        new_option="--preset", help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--batch-size", type=cli.positive_int, default=128)
    parser.add_argument("--steps", type=cli.positive_int, default=8)
    parser.add_argument("--rounds", type=cli.positive_int, default=3)
    cli.add_peers_python_argument(parser, required=True)
    parser.add_argument("--output", type=cli.output_path, help="write the records here (JSON)")
    parser.add_argument("--json", dest="output", action=cli.DeprecatedAlias,
                        new_option="--output", help=argparse.SUPPRESS)  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Interleaves the rounds; the table on stderr, the medians as one JSON line."""
    if args.output:
        files.check_writable(args.output)

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
    if args.output:
        files.write_atomic(args.output, json.dumps(records, indent=1))
    print(text, file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    cli.emit({"img_per_s": medians, "rounds": args.rounds, "output": args.output})
    return 0


if __name__ == "__main__":
    sys.exit(main())
