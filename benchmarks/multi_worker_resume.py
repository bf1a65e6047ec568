"""Manual check (about 2 minutes): a 2-worker job resumes exactly after ``kill -9`` of a worker.

Runs ``python -m training.launch --workers 2`` on a tiny tf_keras model (backup every 2 steps,
op determinism) once uninterrupted; then again, killing worker 1 with SIGKILL at epoch 2 batch
4, checks that the launcher fails, reruns the same command and compares the final weights of
both jobs (max abs difference), and prints where the workers resumed and what the chief wrote.
Linux only (reads /proc to find the worker's process id).

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.multi_worker_resume --data-dir DATA/cifar10/train
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile

from benchmarks import REPO_ROOT
from convmixer_tf import cli

KILL_AT = "[worker 1] BATCH 1 3"  # 0-based epoch 1, batch 3


def child_pids(parent: int) -> list[int]:
    """Process ids whose parent is ``parent`` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(entry))
    return pids


def chief_weights(output: str) -> list:
    import json

    import numpy as np

    (line,) = [li for li in output.splitlines() if li.startswith("[worker 0] WEIGHTS ")]
    return [np.asarray(w) for w in json.loads(line.split("WEIGHTS ", 1)[1])]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.multi_worker_resume", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data-dir", required=True, type=cli.input_dir,
                        help="image folder DIR/<class>/<image> (4 per class used)")  # fmt: skip
    parser.add_argument("--batch-delay", type=cli.nonnegative_float, default=0.3,
                        help="seconds each worker sleeps per batch (time to kill one)")  # fmt: skip
    cli.add_debug_argument(parser)
    return parser


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """Runs the check; progress on stderr, the result as one JSON line; exit 0 when the
    resumed job's weights equal the uninterrupted job's."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="mw_resume_") as root:
        output_dir = os.path.join(root, "run")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")]),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        train_args = [
            "--data-dir", os.path.abspath(args.data_dir),
            "--limit-per-class", "4", "--image-size", "16", "--dim", "16", "--depth", "1",
            "--kernel-size", "3", "--patch-size", "4", "--batch-size", "8",
            "--randaugment-ops", "0", "--no-hflip", "--scale", "1,1", "--val-split", "",
            "--verbose", "0",
            "--output-dir", output_dir, "--strategy", "multi_worker", "--epochs", "2",
            "--steps-per-epoch", "6", "--backup-freq", "2", "--deterministic",
        ]  # fmt: skip
        command = [
            sys.executable, "-m", "training.launch", "--workers", "2", "--module", "train_worker",
            "--", "--batch-delay", str(args.batch_delay), *train_args,
        ]  # fmt: skip
        reference_command = [*command, "--output-dir", os.path.join(root, "reference")]
        reference = subprocess.run(
            reference_command, env=env, cwd=REPO_ROOT, capture_output=True, text=True
        )
        print("uninterrupted run exit code:", reference.returncode, file=sys.stderr)
        first = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for line in first.stderr:
            if line.startswith(KILL_AT):
                for pid in child_pids(first.pid):
                    with open(f"/proc/{pid}/environ") as f:
                        if '"index": 1' in f.read():
                            print(f"kill -9 worker 1 (pid {pid})", file=sys.stderr)
                            os.kill(pid, signal.SIGKILL)
            elif line.startswith("[launch]"):
                print(line.strip(), file=sys.stderr)
        first_status = first.wait()

        second = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        batches = [line for line in second.stderr.splitlines() if "BATCH" in line]
        diff = max(
            float(np.abs(a - b).max())
            for a, b in zip(
                chief_weights(second.stderr), chief_weights(reference.stderr), strict=True
            )
        )
        result = {
            "uninterrupted_exit": reference.returncode,
            "killed_run_exit": first_status,
            "resumed_exit": second.returncode,
            "resumed_first_batches": batches[:2],
            "chief_wrote": sorted(os.listdir(output_dir)),
            "max_abs_diff_resumed_vs_uninterrupted": diff,
        }
        cli.emit(result)
        return 0 if second.returncode == 0 and diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
