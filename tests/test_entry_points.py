"""Every ``python -m`` entry point, discovered (a new benchmark is covered without being listed):
a missing input file and a bad number are one line on stderr naming them, exit code 2, no
traceback, nothing on stdout and nothing written."""

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest
from conftest import CIFAR10_TRAIN, REPO_ROOT

from convmixer_tf import cli

PACKAGES = ("convmixer_tf", "training", "export", "benchmarks")
# A value each checked number type refuses.
BAD_VALUES = {
    "positive_int": "0",
    "nonnegative_int": "-1",
    "finite_float": "inf",
    "positive_float": "-0.5",
    "nonnegative_float": "nan",
    "fraction": "1.5",
    "held_out_fraction": "1",
    "image_size": "100000",  # 10^10 pixels: above the decoding limit
}


def discover() -> list[str]:
    """Modules runnable with ``python -m``: a package's ``__main__`` or a module that calls its
    ``main`` under ``if __name__ == "__main__"``."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).glob("*.py")):
            text = path.read_text()
            if path.name == "__main__.py":
                found.append(f"{package}.__main__")
            elif re.search(r'^if __name__ == "__main__":', text, re.MULTILINE):
                found.append(f"{package}.{path.stem}")
    return found


ENTRY_POINTS = discover()


def parser_of(name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(name)
    assert hasattr(module, "build_parser"), f"{name} has no build_parser()"
    parser = module.build_parser()
    assert isinstance(parser, cli.ArgumentParser), f"{name}: not a convmixer_tf.cli parser"
    return parser


def cases(kind: str) -> list:
    """``(module, option, argparse type)`` of every input-file option or checked number."""
    wanted = cli.INPUT_TYPES if kind == "input" else cli.NUMBER_TYPES
    found = []
    for name in ENTRY_POINTS:
        for action in parser_of(name)._actions:
            if action.type in wanted and not isinstance(action, cli.DeprecatedAlias):
                option = action.option_strings[0] if action.option_strings else None
                found.append(pytest.param(name, option, action.type, id=f"{name} {option}"))
    return found


def run_main(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    status = importlib.import_module(name).main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def prog_of(name: str) -> str:
    return parser_of(name).prog


def test_every_entry_point_follows_the_convention():
    assert len(ENTRY_POINTS) >= 25, ENTRY_POINTS  # 15 benchmarks, 8 tools, 2 of the library
    for name in ENTRY_POINTS:
        module = importlib.import_module(name)
        assert list(inspect.signature(module.main).parameters) == ["argv"], name
        parser = parser_of(name)
        assert parser.prog.startswith("python -m " + name.split(".")[0]), name
        checked = [a for a in parser._actions if a.type in (*cli.INPUT_TYPES, *cli.NUMBER_TYPES)]
        assert checked, f"{name}: no option is checked when parsed"
        assert any("--debug" in a.option_strings for a in parser._actions), name


@pytest.mark.parametrize("name, option, kind", cases("input"))
def test_missing_input_file_is_one_line(name, option, kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = "missing_input.file"
    status, out, err = run_main(name, [option, missing] if option else [missing], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"{prog_of(name)}: error: ") and len(err.splitlines()) == 1, err
    assert missing in err and "Traceback" not in err
    assert (option or "") in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, option, kind", cases("number"))
def test_bad_number_is_one_line(name, option, kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = BAD_VALUES[kind.__name__]
    status, out, err = run_main(name, [option, bad] if option else [bad], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"{prog_of(name)}: error: ") and len(err.splitlines()) == 1, err
    assert option in err and kind.what in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_wrong_command_lines_are_one_line(capsys):
    """An unknown option (or the required options it lacks): one line, exit code 2."""
    for name in ENTRY_POINTS:
        status, out, err = run_main(name, ["--no-such-option"], capsys)
        assert status == 2 and out == "", name
        assert len(err.splitlines()) == 1 and err.startswith(f"{prog_of(name)}: error: "), err


def test_python_m_exit_code_and_debug_traceback(tmp_path):
    """The real command line: one line and 2; with --debug the traceback."""
    missing = str(tmp_path / "missing.keras")
    command = [sys.executable, "-m", "benchmarks.int8_layers", "--model", missing]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    plain = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.strip().splitlines()[-1].startswith("python -m benchmarks.int8_layers")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*command, "--debug"], cwd=REPO_ROOT, capture_output=True, text=True,
                           env=env)  # fmt: skip
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_peer_sides_say_where_to_run_them(tmp_path, capsys):
    """The PyTorch sides of the benchmarks, in an environment without PyTorch: one line."""
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here: the check is for environments without it")
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"")
    arch = '{"dim": 8, "depth": 1, "kernel_size": 3, "patch_size": 2, "num_classes": 2, ' \
           '"activation": "gelu"}'  # fmt: skip
    argv = ["--arch", arch, "--weights", str(weights), "--images", str(weights)]
    status, out, err = run_main("benchmarks.peer_models", argv, capsys)
    assert status == 2 and out == "" and "requirements-bench.txt" in err


@pytest.mark.parametrize(
    "name, argv",
    [
        ("benchmarks.randaugment_check", ["--data-dir", str(CIFAR10_TRAIN), "--images", "4"]),
        ("export.benchmark", ["--imagenet-variants", "--output-dir", "{tmp}/bench"]),
    ],
)
def test_a_peers_python_that_fails_is_one_line(name, argv, tmp_path, capsys):
    """A --peers-python without the peers' packages: the benchmark says so in one line (it was
    a RuntimeError or CalledProcessError traceback), and writes nothing."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'peer: error: torch is not installed here' >&2\nexit 1\n")
    python.chmod(0o755)
    argv = [arg.format(tmp=tmp_path) for arg in argv] + ["--peers-python", str(python)]
    status, out, err = run_main(name, argv, capsys)
    assert status == 2 and out == "" and "Traceback" not in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("failed with exit code 1: peer: error: torch is not installed here")
    ), err
    assert sorted(os.listdir(tmp_path)) == ["python"]
