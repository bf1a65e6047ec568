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


def test_a_killed_worker_is_reported_as_128_plus_the_signal():
    program = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    output = io.StringIO()
    assert launch.launch([sys.executable, "-c", program], 2, output=output) == 128 + 9
    assert "exit code -9" in output.getvalue()


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


def test_more_workers_than_free_ports_is_one_error_naming_the_count(monkeypatch):
    def exhausted(count, host="localhost"):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(launch, "free_ports", exhausted)
    with pytest.raises(ValueError, match=r"Could not reserve 100000 free ports .*workers=100000"):
        launch.launch([sys.executable, "-c", "pass"], 100000)


def test_a_worker_that_cannot_start_stops_those_started_before_it(monkeypatch):
    started = []
    popen = launch.subprocess.Popen

    def second_fails(*args, **kwargs):
        if started:
            raise OSError(11, "Resource temporarily unavailable")
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(launch.subprocess, "Popen", second_fails)
    start = time.monotonic()
    with pytest.raises(OSError, match="Could not start worker 1 of 3: Resource temporarily"):
        launch.launch([sys.executable, "-c", "import time; time.sleep(60)"], 3)
    (first,) = started
    assert first.poll() is not None  # stopped, not left running without its cluster
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_two_workers_train_agree_and_only_the_chief_writes(cifar10_train_dir, tmp_path):
    import keras
    import numpy as np
    from test_distribute import tiny_train_args, worker_env

    # Workers make their temporary folders here: the non-chief's must be gone at the end.
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    env = {**worker_env(), "TMPDIR": str(temp_root)}
    output_dir = tmp_path / "run"
    program = [
        sys.executable, "-m", "train_worker", *tiny_train_args(cifar10_train_dir, output_dir),
        "--strategy", "multi_worker", "--epochs", "2", "--sync-bn",
    ]  # fmt: skip
    output = io.StringIO()
    status = launch.launch(program, 2, env=env, output=output)
    text = output.getvalue()
    assert status == 0, text[-3000:]
    assert "MultiWorkerMirroredStrategy with 2 replicas on 2 workers" in text
    weights = {}
    for line in text.splitlines():
        prefix, _, rest = line.partition("] ")
        if rest.startswith("WEIGHTS "):
            weights[prefix] = [np.asarray(w) for w in json.loads(rest.removeprefix("WEIGHTS "))]
    assert sorted(weights) == ["[worker 0", "[worker 1"]
    for w0, w1 in zip(weights["[worker 0"], weights["[worker 1"], strict=True):
        np.testing.assert_allclose(w0, w1, rtol=0, atol=1e-6)
    # The chief alone wrote the outputs; its saved model holds the weights both workers reached.
    assert sorted(p.name for p in output_dir.iterdir()) == [
        "class_names.json", "config.json", "logs", "metrics.json", "model.keras",
        "training_curves.png",
    ]  # fmt: skip
    assert len(list((output_dir / "logs").rglob("events.out.tfevents.*"))) == 1
    assert list(temp_root.iterdir()) == []
    # ... as a stock Keras 3 model, although tf_keras trained it (multi-worker fit).
    saved = keras.saving.load_model(output_dir / "model.keras")
    assert isinstance(saved, keras.Model)
    for w_saved, w0 in zip(saved.get_weights(), weights["[worker 0"], strict=True):
        np.testing.assert_allclose(w_saved, w0, rtol=0, atol=1e-6)
