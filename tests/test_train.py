"""Tests of training/train.py: the command line (recipe + overrides), its errors and exit codes."""

import json

import pytest

from training import train


def test_recipe_then_named_options_then_any_key():
    config, _ = train.resolve_config(
        [
            "--recipe",
            "cifar10_convmixer_256_8",
            "--data-dir",
            "some/folder",
            "--dim",
            "64",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--image-size",
            "16",
            "--output-dir",
            "out",
            "--lr-max",
            "0.02",
            "--ema",
            "--no-hflip",
            "--mixup-alpha=0.2",
            "--set",
            "depth=2",
            "--set",
            "scale=0.5,1",
        ]
    )
    assert config.data_dir == "some/folder" and config.dataset is None  # folder replaces TFDS
    assert (config.dim, config.depth, config.epochs, config.batch_size) == (64, 2, 3, 32)
    assert (config.image_size, config.output_dir, config.lr_max) == (16, "out", 0.02)
    assert config.ema is True and config.hflip is False and config.mixup_alpha == 0.2
    assert config.scale == (0.5, 1.0) and config.recipe == "cifar10_convmixer_256_8"
    assert config.weight_decay == 0.005  # from the recipe


def test_data_alias_and_tfds_dataset():
    config, _ = train.resolve_config(["--data", "imgs", "--batch-size", "4"])
    assert config.data_dir == "imgs"
    config, _ = train.resolve_config(["--recipe", "cifar10_convmixer_256_8", "--dataset", "c100"])
    assert config.dataset == "c100" and config.data_dir is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "nope"], "Unknown recipe 'nope'. Available recipes: cifar10_convmixer"),
        (["--data", "x", "--learning-rate", "1"], "Unknown config key 'learning_rate'. Valid"),
        (["--data", "x", "--set", "epochs"], "--set takes KEY=VALUE"),
        (["--data", "x", "--epochs", "many"], "Cannot parse `epochs`"),
        (["--epochs", "2"], "No data: give --data-dir"),
    ],
)
def test_bad_command_lines_exit_2_with_the_reason(argv, message, capsys):
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err


def test_list_recipes_and_print_config(capsys):
    assert train.main(["--list-recipes"]) == 0
    assert "imagenet_convmixer_768_32" in json.loads(capsys.readouterr().out)["recipes"]
    argv = ["--recipe", "imagenet_convmixer_768_32", "--data", "d", "--print-config"]
    assert train.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "convmixer_768_32" and printed["data_dir"] == "d"


def test_benchmark_input_measures_images_per_second(cifar10_train_dir, capsys):
    argv = [
        "--data",
        str(cifar10_train_dir),
        "--limit-per-class",
        "2",
        "--batch-size",
        "10",
        "--image-size",
        "16",
        "--randaugment-ops",
        "0",
        "--benchmark-input",
        "3",
    ]
    assert train.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["batches"] == 3 and result["input_pipeline_images_per_s"] > 0


def test_help_explains_every_config_key(capsys):
    from training import config as config_lib

    assert set(config_lib.HELP) == set(config_lib.field_names())  # a new key needs its line
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in config_lib.field_names():
        # the option users type: --key, or its other name (the key "model" is --preset)
        line = f"  --{'preset' if key == 'model' else key.replace('_', '-')} ("
        assert line in text, key
        assert config_lib.HELP[key] in text.split(line, 1)[1].splitlines()[0], key
    assert "  --preset (convmixer_256_8; recipe key model): " in text
    assert "  --model (" not in text  # --model is a model file everywhere, not this key
    words = " ".join(text.split())  # argparse wraps the named options' help
    assert "--preset PRESET a convmixer_tf variant name" in words
