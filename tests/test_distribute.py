"""Tests of training/distribute.py: strategy choice, chief logic, sharding, LR rule, TPU path."""

import json
import os
import pathlib
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from training import distribute

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TWO_WORKERS = {"worker": ["localhost:12345", "localhost:12346"]}


@pytest.fixture
def no_cluster_env(monkeypatch):
    for var in ("TF_CONFIG", *distribute.TPU_ENV_VARS):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "name, tpu, num_gpus, expected",
    [
        ("auto", None, 0, "default"),
        ("auto", None, 1, "default"),
        ("auto", None, 4, "mirrored"),
        ("auto", "local", 4, "tpu"),
        ("mirrored", None, 0, "mirrored"),
        ("multi_worker", None, 0, "multi_worker"),
    ],
)
def test_resolve_strategy_name(no_cluster_env, name, tpu, num_gpus, expected):
    assert distribute.resolve_strategy_name(name, tpu, num_gpus) == expected


def test_auto_picks_tpu_from_environment(no_cluster_env, monkeypatch):
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    assert distribute.resolve_strategy_name("auto", None, num_gpus=8) == "tpu"


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="strategy='mirored'"):
        distribute.resolve_strategy_name("mirored")


def test_default_strategy_from_args_namespace(no_cluster_env):
    import argparse

    args = argparse.Namespace(strategy="default", cpu_replicas=0, tpu=None)
    strategy = distribute.make_strategy(args)
    assert strategy.num_replicas_in_sync == 1
    assert "1 replica" in distribute.describe_strategy(strategy)


def test_multi_worker_without_tf_config_fails_clearly(no_cluster_env):
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.make_strategy({"strategy": "multi_worker"})


def test_tpu_strategy_without_tpu_fails_clearly(no_cluster_env):
    # No TPU name and no TPU_NAME: the resolver cannot be built; the error says what to pass.
    with pytest.raises(RuntimeError, match=r"No TPU found at tpu=None.*--tpu"):
        distribute.make_strategy({"strategy": "tpu"})


def test_cpu_replicas_after_device_init_fails_clearly():
    tf.constant(1.0)  # TensorFlow has initialized its devices in this process.
    already = len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(RuntimeError, match="already initialized"):
        distribute.configure_cpu_replicas(already + 1)


def test_cpu_replicas_with_multi_worker_is_rejected(no_cluster_env):
    with pytest.raises(ValueError, match="strategy='multi_worker', cpu_replicas=2"):
        distribute.make_strategy({"strategy": "multi_worker", "cpu_replicas": 2})


def test_cpu_replicas_must_be_positive():
    with pytest.raises(ValueError, match="cpu_replicas=0"):
        distribute.configure_cpu_replicas(0)


@pytest.mark.parametrize(
    "tf_config, expected",
    [
        (None, True),
        ({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": 0}}, True),
        ({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": 1}}, False),
        (
            {"cluster": {**TWO_WORKERS, "chief": ["localhost:1"]}, "task": {"type": "worker"}},
            False,
        ),
        ({"cluster": {**TWO_WORKERS, "chief": ["localhost:1"]}, "task": {"type": "chief"}}, True),
    ],
)
def test_is_chief_from_tf_config(monkeypatch, tf_config, expected):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert distribute.is_chief() is expected


def test_bad_tf_config_names_the_problem(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.is_chief()


def test_chief_writes_to_the_real_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    target = tmp_path / "run"
    with distribute.chief_write_dir(str(target)) as out:
        pathlib.Path(out, "model.txt").write_text("chief")
    assert (target / "model.txt").read_text() == "chief"


def test_non_chief_writes_to_a_temp_dir_it_deletes(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": 1}})
    )
    target = tmp_path / "run"
    with distribute.chief_write_dir(str(target)) as out:
        pathlib.Path(out, "model.txt").write_text("worker 1")
        assert pathlib.Path(out).resolve() != target.resolve()
    assert not target.exists()
    assert not pathlib.Path(out).exists()


def test_multi_worker_trains_with_tf_keras():
    assert distribute.keras_module_for("multi_worker") == "tf_keras"
    assert distribute.keras_module_for("mirrored") == "keras"
    assert distribute.keras_module_for("default", "tf_keras") == "tf_keras"
    with pytest.raises(ValueError, match="20585"):
        distribute.keras_module_for("multi_worker", "keras")


@pytest.mark.parametrize(
    "rule, global_batch, expected",
    [("linear", 1024, 0.1), ("linear", 128, 0.0125), ("sqrt", 2048, 0.1), ("none", 4096, 0.05)],
)
def test_learning_rate_scaling(rule, global_batch, expected):
    lr = distribute.scale_learning_rate(0.05, global_batch, base_batch=512, rule=rule)
    assert lr == pytest.approx(expected)


def test_learning_rate_scaling_rejects_unknown_rule():
    with pytest.raises(ValueError, match="lr_scaling"):
        distribute.scale_learning_rate(0.05, 64, 512, rule="cubic")


@pytest.mark.parametrize("policy", ["data", "file", "off", "auto"])
def test_shard_policy_is_set_on_the_dataset(policy):
    ds = distribute.with_shard_policy(tf.data.Dataset.range(8).batch(2), policy)
    actual = ds.options().experimental_distribute.auto_shard_policy
    assert actual == distribute.AUTO_SHARD_POLICY[policy]


def test_shard_policy_rejects_unknown_name():
    with pytest.raises(ValueError, match="shard_policy"):
        distribute.with_shard_policy(tf.data.Dataset.range(2), "rows")


def test_auto_uses_mirrored_for_cpu_replicas(no_cluster_env):
    assert distribute.resolve_strategy_name("auto", num_gpus=0, cpu_replicas=2) == "mirrored"


@pytest.mark.parametrize(
    "policy, image_folder, expected",
    [
        ("auto", True, "data"),
        ("auto", False, "auto"),
        ("file", True, "file"),
        ("off", False, "off"),
    ],
)
def test_resolve_shard_policy(policy, image_folder, expected):
    assert distribute.resolve_shard_policy(policy, image_folder) == expected


def test_training_pipeline_has_the_static_shapes_tpus_need(cifar10_train_dir):
    from training import pipeline
    from training.config import TrainConfig

    config = TrainConfig(
        data_dir=str(cifar10_train_dir), limit_per_class=2, image_size=16, batch_size=8
    )
    train_data = pipeline.make_train_dataset(config)
    distribute.check_static_shapes(train_data.dataset)  # full batches of fixed-size images
    images, labels = train_data.dataset.element_spec
    assert images.shape.as_list() == [8, 16, 16, 3]


def test_tpu_input_pipeline_needs_static_shapes():
    images = tf.data.Dataset.from_tensor_slices(tf.zeros([10, 16, 16, 3]))
    distribute.check_static_shapes(images.batch(4, drop_remainder=True))
    with pytest.raises(ValueError, match="drop_remainder=True"):
        distribute.check_static_shapes(images.batch(4))
    assert not distribute.needs_static_shapes(tf.distribute.get_strategy())


def test_precision_policy():
    assert distribute.precision_policy(False) == "float32"
    expected = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    assert distribute.precision_policy(True) == expected
    with pytest.raises(ValueError, match="precision"):
        distribute.set_precision_policy("float8")


# Runs in a fresh process: the CPU must be split before TensorFlow initializes its devices.
# The same tiny model, same initial weights, same 4 batches of 8 (no shuffling, no augmentation),
# trained once on one replica and once on 2 mirrored CPU replicas (4 images each).
_EQUIVALENCE_SCRIPT = textwrap.dedent(
    """
    import json
    import logging
    import numpy as np
    from training import distribute

    logging.basicConfig(level=logging.INFO)
    mirrored = distribute.make_strategy({"strategy": "mirrored", "cpu_replicas": 2})
    import keras
    import tensorflow as tf
    import convmixer_tf

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, 5, 32).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)

    def train(strategy, synchronized_bn, weights=None):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = convmixer_tf.ConvMixer(16, 1, kernel_size=3, patch_size=4,
                                           input_shape=(16, 16, 3), num_classes=5,
                                           synchronized_bn=synchronized_bn)
            if weights is not None:
                model.set_weights(weights)
            model.compile(optimizer=keras.optimizers.SGD(0.1),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        initial = model.get_weights()
        model.fit(data, epochs=1, verbose=0, shuffle=False)
        return initial, model.get_weights()

    result = {"replicas": mirrored.num_replicas_in_sync}
    for sync in (True, False):
        initial, single = train(tf.distribute.get_strategy(), sync)
        _, multi = train(mirrored, sync, initial)
        result[f"sync={sync}"] = {
            "max_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(single, multi)),
            "max_update": max(float(np.max(np.abs(a - b))) for a, b in zip(single, initial)),
        }
    print("RESULT " + json.dumps(result))
    """
)

# Documented tolerance: float32 sums taken in a different order (per replica, then all-reduced).
REPLICA_ATOL = 1e-5


@pytest.mark.slow
def test_sync_bn_mirrored_replicas_match_one_replica(tmp_path):
    script = tmp_path / "equivalence.py"
    script.write_text(_EQUIVALENCE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MirroredStrategy with 2 replicas" in done.stderr
    line = next(li for li in done.stdout.splitlines() if li.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["replicas"] == 2
    synced, unsynced = result["sync=True"], result["sync=False"]
    assert synced["max_update"] > 0.01  # the weights did move
    assert synced["max_diff"] < REPLICA_ATOL
    # Without synchronized BN each replica normalizes its own 4 images: the runs diverge.
    assert unsynced["max_diff"] > 100 * REPLICA_ATOL


TESTS_DIR = pathlib.Path(__file__).resolve().parent


def tiny_train_args(data_dir, output_dir) -> list[str]:
    """A tiny ConvMixer on 4 images per class at 16x16, no augmentation, no validation."""
    return [
        "--data-dir", str(data_dir), "--limit-per-class", "4", "--image-size", "16",
        "--dim", "16", "--depth", "1", "--kernel-size", "3", "--patch-size", "4",
        "--batch-size", "8", "--randaugment-ops", "0", "--no-hflip", "--scale", "1,1",
        "--val-split", "", "--verbose", "0", "--output-dir", str(output_dir),
    ]  # fmt: skip


def worker_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def batches_seen(output: str) -> list[tuple[int, int]]:
    return [
        (int(e), int(b))
        for _, e, b in (li.split() for li in output.splitlines() if li.startswith("BATCH "))
    ]


def final_weights(output: str) -> list:
    (line,) = [li for li in output.splitlines() if li.startswith("WEIGHTS ")]
    return [np.asarray(w) for w in json.loads(line.removeprefix("WEIGHTS "))]


@pytest.mark.slow
@pytest.mark.parametrize("keras_module", ["keras", "tf_keras"])
def test_run_killed_inside_an_epoch_resumes_exactly(cifar10_train_dir, tmp_path, keras_module):
    """SIGKILL at a random step of epoch 2, rerun: the same final weights and metrics as an
    uninterrupted run (CPU, op determinism, augmentation on)."""

    def command(output_dir, delay):
        return [
            sys.executable, "-m", "train_worker", "--batch-delay", str(delay),
            *tiny_train_args(cifar10_train_dir, output_dir),
            "--epochs", "2", "--steps-per-epoch", "6", "--backup-freq", "2",
            "--keras-module", keras_module, "--strategy", "default", "--deterministic",
            "--hflip", "--randaugment-ops", "2", "--scale", "0.5,1",
        ]  # fmt: skip

    reference = subprocess.run(
        command(tmp_path / "reference", 0), env=worker_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]

    output_dir = tmp_path / "run"
    kill_at = f"BATCH 1 {random.Random().randint(3, 5)}"  # inside epoch 2, after a backup
    first = subprocess.Popen(
        command(output_dir, 0.25), env=worker_env(), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        for line in first.stdout:
            if line.strip() == kill_at:
                first.kill()
                break
    finally:
        first.kill()
        first.wait(timeout=60)
    assert first.returncode == -9, "the first run ended before it could be killed"
    pointer = json.loads((output_dir / "backup" / "latest.json").read_text())
    assert pointer["mid_epoch"] and 6 < pointer["step"] < 12, pointer

    second = subprocess.run(
        command(output_dir, 0), env=worker_env(), capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming at step {pointer['step']}" in second.stderr
    assert len(batches_seen(second.stdout)) == 12 - pointer["step"]  # no batch trained twice
    for resumed, uninterrupted in zip(
        final_weights(second.stdout), final_weights(reference.stdout), strict=True
    ):
        np.testing.assert_array_equal(resumed, uninterrupted)
    history = json.loads((output_dir / "metrics.json").read_text())["history"]
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())["history"]
    for got, want in zip(history, expected, strict=True):
        assert got["epoch"] == want["epoch"]
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
        np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=1e-6)
    assert not (output_dir / "backup").exists()  # removed once the run finished


def test_data_sharding_requires_ordered_pipeline():
    """DATA sharding is disjoint only if every worker sees the same order (shard_overlap.py)."""
    fast = tf.data.Dataset.range(8).map(lambda x: x * 2, num_parallel_calls=2)
    options = tf.data.Options()
    options.deterministic = False
    fast = fast.with_options(options)
    assert distribute.with_shard_policy(fast, "data").options().deterministic is True
    assert distribute.with_shard_policy(fast, "data", workers=2).options().deterministic is True
    assert distribute.with_shard_policy(fast, "file").options().deterministic is False
    # one process: nothing to keep disjoint, the maps stay unordered (faster)
    assert distribute.with_shard_policy(fast, "data", workers=1).options().deterministic is False
    assert distribute.num_workers(tf.distribute.get_strategy()) == 1


def test_num_workers_counts_chief_and_workers():
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"chief": ["a:1"], "worker": ["b:1", "c:1"], "ps": ["d:1"]})
    )

    class _Strategy:
        cluster_resolver = resolver

    assert distribute.num_workers(_Strategy()) == 3
