"""Tests of training/launch.py: TF_CONFIG per worker, prefixed output, failure propagation."""

import io
import json
import sys
import time

import pytest

from training import launch

PRINT_TF_CONFIG = "import os; print(os.environ['TF_CONFIG'])"


def test_make_tf_config():
    config = json.loads(launch.make_tf_config(["localhost:1", "localhost:2"], 1))
    assert config == {
        "cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": 1},
    }
    with pytest.raises(ValueError, match="outside the cluster of 2 workers"):
        launch.make_tf_config(["localhost:1", "localhost:2"], 2)


def test_free_ports_are_distinct():
    ports = launch.free_ports(4)
    assert len(set(ports)) == 4
    assert all(0 < p < 65536 for p in ports)


def test_every_worker_gets_its_own_task_and_prefix():
    output = io.StringIO()
    status = launch.launch([sys.executable, "-c", PRINT_TF_CONFIG], 3, output=output)
    assert status == 0
    configs = {}
    for line in output.getvalue().splitlines():
        prefix, _, text = line.partition("] ")
        configs[prefix + "]"] = json.loads(text)
    assert sorted(configs) == ["[worker 0]", "[worker 1]", "[worker 2]"]
    clusters = {json.dumps(c["cluster"]) for c in configs.values()}
    assert len(clusters) == 1  # all workers see the same cluster of 3 distinct ports
    assert len(set(next(iter(configs.values()))["cluster"]["worker"])) == 3
    for prefix, config in configs.items():
        assert f"[worker {config['task']['index']}]" == prefix


def test_a_failing_worker_fails_the_job_and_stops_the_others():
    # Worker 1 fails at once; worker 0 would run for a minute if the launcher did not stop it.
    program = (
        "import json, os, sys, time\n"
        "index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        "sys.exit(3) if index == 1 else time.sleep(60)\n"
    )
    output = io.StringIO()
    start = time.monotonic()
    status = launch.launch([sys.executable, "-c", program], 2, output=output)
    assert status == 3
    assert time.monotonic() - start < 30
    assert "a worker failed with exit code 3" in output.getvalue()


def test_parse_args_passes_everything_after_double_dash():
    args = launch.parse_args(
        ["--workers", "2", "--", "--strategy", "multi_worker", "--epochs", "1"]
    )
    assert args.workers == 2
    assert args.module == "training.train"
    assert args.train_args == ["--strategy", "multi_worker", "--epochs", "1"]


def test_zero_workers_is_rejected():
    with pytest.raises(ValueError, match="workers=0"):
        launch.launch([sys.executable, "-c", "pass"], 0)
