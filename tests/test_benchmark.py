"""The training benchmark: FLOP count from layer shapes, the matmul peak, and the command line's
one JSON line on a tiny model."""

import json

import pytest

import convmixer_tf
from training import benchmark, measure


def test_forward_macs_counts_convs_and_dense_from_shapes():
    model = convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(8, 8, 3), num_classes=10)
    positions = 4 * 4  # 8x8 input, patch 2
    expected = (
        positions * 2 * 2 * 3 * 16  # stem conv
        + positions * 3 * 3 * 16  # depthwise 3x3
        + positions * 16 * 16  # pointwise 1x1
        + 16 * 10  # head
    )
    assert measure.forward_macs(model) == expected
    assert measure.training_flops_per_image(model) == 6 * expected


def test_forward_macs_of_convmixer_256_8_matches_reference():
    # REFERENCE.md: ConvMixer-256/8 at 32x32 has about 148 M MACs
    model = convmixer_tf.create_model("convmixer_256_8")
    assert 147e6 < measure.forward_macs(model) < 149e6


def test_forward_macs_needs_a_fixed_input_size():
    model = convmixer_tf.ConvMixer(16, 1, 3, 2, num_classes=10)  # (None, None, 3) input
    with pytest.raises(ValueError, match="stem_conv.*fixed input_shape"):
        measure.forward_macs(model)


def test_matmul_peak_is_positive_and_checks_arguments():
    assert measure.matmul_peak_flops(size=128, repeats=2) > 1e6
    with pytest.raises(ValueError, match="positive"):
        measure.matmul_peak_flops(size=0)


@pytest.mark.slow  # builds the real training pipeline and traces a training step
def test_cli_prints_one_json_line_with_sane_values(capsys, cifar10_train_dir, monkeypatch):
    argv = ["--dim", "16", "--depth", "1", "--batch-size", "8", "--steps", "2"]
    argv += ["--warmup-steps", "1", "--peak-size", "256", "--data-dir", str(cifar10_train_dir)]
    monkeypatch.setattr(benchmark, "torch_available", lambda python: False)
    assert benchmark.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    expected_keys = {
        "img_per_s",
        "step_ms_median",
        "train_gflop_per_image",
        "achieved_gflops",
        "peak_gflops",
        "fraction_of_peak",
        "batch_size",
        "steps",
        "keras_module",
        "cpu",
        "cpu_flags",
        "precision",
    }
    assert expected_keys <= set(record)
    assert record["batch_size"] == 8 and record["steps"] == 2 and record["dim"] == 16
    assert record["precision"] == "float32" and record["depth"] == 1
    assert record["cpu_flags"] == measure.cpu_flags()
    # --peers auto without PyTorch installed: said, not an error
    assert record["torch"].startswith("not installed")
    assert record["img_per_s"] > 0 and record["step_ms_median"] > 0
    assert 0 < record["fraction_of_peak"] < 1
    model = convmixer_tf.ConvMixer(16, 1, 5, 2, input_shape=(32, 32, 3), num_classes=10)
    flops = measure.training_flops_per_image(model)
    assert record["train_gflop_per_image"] == pytest.approx(flops / 1e9, abs=1e-4)
    assert record["achieved_gflops"] == pytest.approx(
        record["img_per_s"] * flops / 1e9, rel=0.01, abs=1e-3
    )


def test_cli_reports_bad_arguments(capsys, cifar10_train_dir):
    argv = ["--steps", "0", "--dim", "16", "--depth", "1", "--data-dir", str(cifar10_train_dir)]
    assert benchmark.main(argv) == 2
    assert "--steps: must be a positive integer" in capsys.readouterr().err


def test_cli_peers_torch_without_torch_is_one_line(capsys, cifar10_train_dir, monkeypatch):
    monkeypatch.setattr(benchmark, "torch_available", lambda python: False)
    argv = ["--dim", "16", "--depth", "1", "--batch-size", "8", "--steps", "1", "--peers", "torch"]
    argv += ["--warmup-steps", "1", "--peak-size", "64", "--data-dir", str(cifar10_train_dir)]
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot import torch" in err and "requirements-bench.txt" in err
    assert "Traceback" not in err


def test_torch_availability_is_checked_in_the_given_python(tmp_path):
    assert benchmark.torch_available(str(tmp_path / "no-such-python")) is False


def test_mixed_precision_warns_on_cpus_without_bfloat16(monkeypatch, caplog):
    from training import distribute

    monkeypatch.setattr(distribute.tf.config, "list_physical_devices", lambda kind: [])
    monkeypatch.setattr(measure, "cpu_flags", lambda: ["avx2", "fma"])
    with caplog.at_level("WARNING"):
        assert distribute.precision_policy(True) == "mixed_bfloat16"
    assert "has none" in caplog.text and "slower than in float32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(measure, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16"])
    with caplog.at_level("WARNING"):
        assert distribute.precision_policy(True) == "mixed_bfloat16"
    assert caplog.text == ""
    monkeypatch.setattr(measure, "cpu_flags", lambda: None)
    with caplog.at_level("WARNING"):
        distribute.precision_policy(True)
    assert "could not be checked" in caplog.text


def test_benchmarks_name_this_machine(monkeypatch):
    """Benchmark tables name the machine they ran on, read at run time (export.benchmark had a
    fixed default string that mislabelled runs on other CPUs)."""
    import os

    from export import benchmark as export_benchmark

    monkeypatch.setattr(measure, "cpu_name", lambda: "Some CPU")
    monkeypatch.setattr(measure, "cpu_flags", lambda: ["avx2", "avx512_vnni"])
    assert measure.describe_machine() == f"{os.cpu_count()}-core Some CPU, flags avx2 avx512_vnni"
    assert (
        export_benchmark.build_parser()
        .parse_args(["--preset", "convmixer_256_8", "--output-dir", "x"])
        .machine
        is None
    )
    monkeypatch.setattr(measure, "cpu_flags", lambda: None)
    assert measure.describe_machine().endswith("flags unknown")
