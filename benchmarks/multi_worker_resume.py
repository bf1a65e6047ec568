"""Manual check (about 2 minutes): a 2-worker job resumes exactly after ``kill -9`` of a worker.

Runs ``python -m training.launch --workers 2`` on a tiny tf_keras model (backup every 2 steps,
op determinism) once uninterrupted; then again, killing worker 1 with SIGKILL at epoch 2 batch
4, checks that the launcher fails, reruns the same command and compares the final weights of
both jobs (max abs difference), and prints where the workers resumed and what the chief wrote.
Linux only (reads /proc to find the worker's process id).

Example::

    TF_CPP_MIN_LOG_LEVEL=2 python -m benchmarks.multi_worker_resume
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

from benchmarks import REPO_ROOT

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


def main() -> int:
    import numpy as np

    root = tempfile.mkdtemp(prefix="mw_resume_")
    output_dir = os.path.join(root, "run")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    train_args = [
        "--data-dir", os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10", "train"),
        "--limit-per-class", "4", "--image-size", "16", "--dim", "16", "--depth", "1",
        "--kernel-size", "3", "--patch-size", "4", "--batch-size", "8", "--randaugment-ops", "0",
        "--no-hflip", "--scale", "1,1", "--val-split", "", "--verbose", "0",
        "--output-dir", output_dir, "--strategy", "multi_worker", "--epochs", "2",
        "--steps-per-epoch", "6", "--backup-freq", "2", "--deterministic",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "training.launch", "--workers", "2", "--module", "train_worker",
        "--", "--batch-delay", "0.3", *train_args,
    ]  # fmt: skip
    reference_command = [*command, "--output-dir", os.path.join(root, "reference")]
    reference = subprocess.run(
        reference_command, env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    print("uninterrupted run exit code:", reference.returncode)
    first = subprocess.Popen(
        command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    for line in first.stdout:
        if line.startswith(KILL_AT):
            for pid in child_pids(first.pid):
                with open(f"/proc/{pid}/environ") as f:
                    if '"index": 1' in f.read():
                        print(f"kill -9 worker 1 (pid {pid})")
                        os.kill(pid, signal.SIGKILL)
        elif line.startswith("[launch]"):
            print(line.strip())
    print("first run exit code:", first.wait())

    second = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    batches = [line for line in second.stdout.splitlines() if "BATCH" in line]
    print("second run, first batches:", batches[:2])
    print("second run exit code:", second.returncode)
    print("chief wrote:", sorted(os.listdir(output_dir)))
    diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(chief_weights(second.stdout), chief_weights(reference.stdout), strict=True)
    )
    print(f"final weights, resumed vs uninterrupted: max abs diff {diff:.3g}")
    return second.returncode


if __name__ == "__main__":
    sys.exit(main())
