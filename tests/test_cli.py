"""Every command line: a user's mistake is one line naming the problem, exit code 2."""

import argparse
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
from conftest import REPO_ROOT

from convmixer_tf import cli, convert, predict
from training import train

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"
IMAGE = FIXTURES / "eval_image.png"


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") and "Traceback" not in err
    return err


def test_convert_truncated_safetensors(tmp_path, capsys):
    truncated = tmp_path / "cut.safetensors"
    data = (FIXTURES / "timm_gelu_k3.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    argv = ["--weights", str(truncated), "--output", str(tmp_path / "m.keras")]
    assert convert.main(argv) == 2
    err = one_error_line(capsys, "python -m convmixer_tf.convert")
    assert "cut.safetensors" in err and not (tmp_path / "m.keras").exists()


def test_convert_output_checked_before_converting(tmp_path, capsys):
    weights = str(FIXTURES / "timm_gelu_k3.safetensors")
    assert convert.main(["--weights", weights, "--output", str(tmp_path / "m.h5")]) == 2
    assert "must end with '.keras'" in one_error_line(capsys, "python -m convmixer_tf.convert")
    (tmp_path / "d.keras").mkdir()
    assert convert.main(["--weights", weights, "--output", str(tmp_path / "d.keras")]) == 2
    assert "is a directory" in one_error_line(capsys, "python -m convmixer_tf.convert")


@pytest.mark.parametrize("kind", ["corrupt", "directory", "empty", "missing"])
def test_predict_bad_images_name_the_file(tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "corrupt":
        path.write_bytes(b"\xff\xd8 this is not a JPEG")
    elif kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    weights = str(FIXTURES / "official_relu_k4.pth.tar")
    argv = ["--weights", weights, "--activation", "relu", "--input-size", "16", str(IMAGE)]
    assert predict.main([*argv, str(path)]) == 2
    err = one_error_line(capsys, "python -m convmixer_tf.predict")
    assert f"{kind}.jpg" in err and "function_node" not in err and "[Op:" not in err


def test_train_output_dir_that_is_a_file(tmp_path, capsys, cifar10_train_dir):
    output = tmp_path / "taken"
    output.write_text("not a folder")
    argv = ["--data-dir", str(cifar10_train_dir), "--output-dir", str(output)]
    assert train.main(argv) == 2
    err = one_error_line(capsys, "python -m training.train")
    assert "taken" in err and "is a file" in err


def test_deprecated_alias_stores_and_warns(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--output-dir")
    parser.add_argument("--out-dir", dest="output_dir", action=cli.DeprecatedAlias,
                        new_option="--output-dir")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert parser.parse_args(["--out-dir", "bench"]).output_dir == "bench"
    assert "use --output-dir" in str(caught[0].message)
    assert "--out-dir is deprecated" in capsys.readouterr().err


def test_stdout_to_stderr_moves_what_cpp_writes_to_descriptor_1(tmp_path):
    code = (
        "import os, sys\n"
        "from convmixer_tf import cli\n"
        "with cli.stdout_to_stderr():\n"
        "    os.write(1, b'native chatter\\n')\n"
        "    print('python chatter')\n"
        "print('{\"result\": 1}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout == '{"result": 1}\n'
    assert "native chatter" in done.stderr and "python chatter" in done.stderr


def test_every_cli_follows_the_convention():
    """build_parser() and main(argv) -> int in every command-line module, with --debug."""
    import importlib

    modules = ["convmixer_tf.convert", "convmixer_tf.predict", "training.train",
               "training.evaluate", "training.benchmark", "training.launch", "export.__main__",
               "export.evaluate", "export.benchmark"]  # fmt: skip
    for name in modules:
        module = importlib.import_module(name)
        parser = module.build_parser()
        assert "--debug" in parser._option_string_actions, name  # noqa: SLF001
        assert callable(module.main), name
    assert os.path.exists(REPO_ROOT / "CHANGELOG.md")


@pytest.fixture
def malicious_models(tmp_path, monkeypatch):
    """A Keras 3 .keras and a tf_keras .h5 whose Lambda creates the file PWNED when run."""
    import keras
    import tf_keras

    monkeypatch.chdir(tmp_path)

    # A lambda, not a def: Keras stores a lambda's bytecode (a def only by name).
    touch = lambda x: (__import__("pathlib").Path("PWNED").touch(), x)[1]  # noqa: E731

    k3 = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Lambda(touch)])
    k3.save(tmp_path / "evil.keras")
    k2 = tf_keras.Sequential([tf_keras.Input((16, 16, 3)), tf_keras.layers.Lambda(touch)])
    k2.save(tmp_path / "evil.h5")
    (tmp_path / "PWNED").unlink()  # building the models ran the Lambdas once
    return tmp_path / "evil.keras", tmp_path / "evil.h5"


def test_no_cli_runs_code_from_a_model_file(malicious_models, tmp_path, cifar10_train_dir, capsys):
    import convmixer_tf
    from convmixer_tf import predict
    from export import __main__ as export_cli
    from export import benchmark as export_benchmark
    from export import evaluate as export_evaluate
    from export import tflite
    from training import evaluate as training_evaluate

    tflite_path = tmp_path / "m.tflite"
    model = convmixer_tf.ConvMixer(16, 1, 3, 2, input_shape=(16, 16, 3), num_classes=10)
    tflite_path.write_bytes(tflite.convert(model, "fp32"))
    capsys.readouterr()  # the converter's logging
    data = ["--data-dir", str(cifar10_train_dir), "--limit-per-class", "1"]
    image = str(next((cifar10_train_dir / "cat").iterdir()))
    for path in malicious_models:
        commands = {
            "python -m training.evaluate": (training_evaluate, ["--model", str(path), *data]),
            "python -m export": (export_cli, ["--model", str(path), "--format", "fp32",
                                              "--output", str(tmp_path / "o.tflite")]),
            "python -m export.evaluate": (export_evaluate, ["--tflite", str(tflite_path),
                                                            "--keras", str(path), *data]),
            "python -m export.benchmark": (export_benchmark, ["--model", str(path),
                                                              "--output-dir", str(tmp_path)]),
            "python -m convmixer_tf.predict": (predict, ["--model", str(path), image]),
        }  # fmt: skip
        for prog, (module, argv) in commands.items():
            assert module.main(argv) == 2, (prog, path.name)
            err = one_error_line(capsys, prog)
            assert path.name in err and "--unsafe" in err, err
            assert not (tmp_path / "PWNED").exists(), (prog, path.name)
    # The explicit opt-in loads (and so runs) the trusted file.
    assert convmixer_tf.load_model(malicious_models[0], unsafe=True) is not None
    assert (tmp_path / "PWNED").exists()


def test_launch_with_no_workers_is_one_line(capsys):
    from training import launch

    assert launch.main(["--workers", "0", "--", "--data-dir", "x"]) == 2
    assert "--workers: must be a positive integer" in one_error_line(
        capsys, "python -m training.launch"
    )


def test_train_with_a_missing_data_folder_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data-dir", str(tmp_path / "nope"), "--output-dir", str(out)]
    assert train.main(argv) == 2
    assert "Image folder not found" in one_error_line(capsys, "python -m training.train")
    assert not out.exists()  # checked before the run directory is locked or created


def test_a_child_command_that_fails_is_named_with_its_last_error_line(tmp_path, capsys):
    fails = [sys.executable, "-c", "import sys; print('detail', file=sys.stderr); "
             "sys.exit('peer: error: torch not installed here')"]  # fmt: skip
    with pytest.raises(cli.CommandError, match=r"^the peer failed with exit code 1: peer: error: "
                       "torch not installed here$"):  # fmt: skip
        cli.run_command(fails, "the peer")
    with pytest.raises(cli.CommandError, match=r"^the peer could not start: .*no-such-python"):
        cli.run_command([str(tmp_path / "no-such-python")], "the peer")
    with pytest.raises(cli.CommandError, match="printed no JSON result"):
        cli.run_json_command([sys.executable, "-c", "print('not json')"], "the peer")
    assert cli.run_json_command([sys.executable, "-c", "print('x'); print('[1]')"], "p") == [1]

    def work(args):
        cli.run_command(fails, "the peer")

    assert cli.run(argparse.ArgumentParser(prog="demo"), work, []) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "demo: error: the peer failed with exit code 1: peer: error: torch not installed here\n"
    )
