"""Tests of training/config.py: the config dataclass, recipes, overrides, JSON round trip."""

import json

import pytest

from training import config as config_lib
from training.config import TrainConfig, apply_overrides, from_json, from_recipe


def test_every_recipe_loads_and_names_a_known_model():
    import convmixer_tf

    names = config_lib.available_recipes()
    assert "cifar10_convmixer_256_8" in names
    for variant in (
        "convmixer_1536_20",
        "convmixer_768_32",
        "convmixer_1024_20",
        "convmixer_512_16",
    ):
        assert f"imagenet_{variant}" in names
    for name in names:
        config = from_recipe(name)
        assert config.recipe == name
        convmixer_tf.get_preset(config.model)


def test_cifar10_recipe_is_the_reference_script():
    """locuslab/convmixer-cifar10's README command: train.py --lr-max=0.05 --ra-n=2 --ra-m=12
    --wd=0.005 --scale=1.0 --jitter=0 --reprob=0 (no --clip-norm), batch 512, 25 epochs."""
    config = from_recipe("cifar10_convmixer_256_8")
    assert (config.batch_size, config.epochs, config.lr_max) == (512, 25, 0.05)
    assert config.lr_schedule == "onecycle" and config.weight_decay == 0.005
    assert config.scale == (1.0, 1.0) and config.ratio == (1.0, 1.0)
    assert (config.randaugment_ops, config.randaugment_magnitude) == (2, 12.0)
    assert config.randaugment_magnitude_max == 30
    assert config.clip_norm is None and config.hflip and config.label_smoothing == 0
    assert config.color_jitter == 0 and config.random_erasing == 0
    assert config.initialization == "pytorch"  # the reference trains PyTorch-initialized models
    # The 10-epoch variant: what was chosen on a split of the training images, nothing else.
    short = from_recipe("cifar10_convmixer_256_8_10ep")
    differing = {
        key: getattr(short, key)
        for key, value in vars(config).items()
        if getattr(short, key) != value and key not in ("description", "recipe", "output_dir")
    }
    assert differing == {
        "epochs": 10,
        "batch_size": 128,
        "base_batch_size": 128,
        "lr_max": 0.025,
        "randaugment_ops": 1,
        "randaugment_magnitude": 8,
    }


def test_imagenet_recipes_use_timm_settings():
    config = from_recipe("imagenet_convmixer_768_32")
    assert (config.lr_max, config.adam_epsilon, config.weight_decay) == (0.01, 1e-3, 2e-5)
    assert (config.batch_size, config.epochs, config.image_size) == (640, 300, 224)
    assert (config.mixup_alpha, config.cutmix_alpha, config.random_erasing) == (0.5, 0.5, 0.25)
    assert config.label_smoothing == 0.1 and config.interpolation == "bicubic"
    assert from_recipe("imagenet_convmixer_1536_20").epochs == 150


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ValueError, match="Unknown recipe 'nope'.*cifar10_convmixer_256_8"):
        from_recipe("nope")


def test_recipe_found_by_name_in_the_recipes_folder(tmp_path, monkeypatch):
    # Another engineer's recipe (e.g. cifar10_cpu_quick) only has to be a file in the folder.
    (tmp_path / "cifar10_cpu_quick.json").write_text(json.dumps({"epochs": 3, "dim": 64}))
    monkeypatch.setattr(config_lib, "RECIPES_DIR", tmp_path)
    config = from_recipe("cifar10_cpu_quick")
    assert (config.epochs, config.dim, config.recipe) == (3, 64, "cifar10_cpu_quick")


def test_unknown_key_in_a_recipe_file_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"epochs": 3, "learning_rate": 0.1}))
    with pytest.raises(ValueError, match=r"\['learning_rate'\].*Valid keys: .*lr_max"):
        from_recipe(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_recipe(str(path))


def test_overrides_parse_strings_to_field_types():
    config = apply_overrides(
        TrainConfig(),
        {
            "epochs": "7",
            "lr-max": "0.02",
            "ema": "true",
            "dim": "none",
            "scale": "0.08,1",
            "clip_norm": "None",
            "model": "convmixer_768_32",
            "ratio": [0.75, 1.5],
        },
    )
    assert config.epochs == 7 and config.lr_max == 0.02 and config.ema is True
    assert config.dim is None and config.clip_norm is None and config.model == "convmixer_768_32"
    assert config.scale == (0.08, 1.0) and config.ratio == (0.75, 1.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epoch": 3}, r"Unknown config key 'epoch'. Valid keys: .*epochs"),
        ({"epochs": "three"}, "Cannot parse `epochs`"),
        ({"epochs": 2.5}, "`epochs` must be of type int"),
        ({"ema": "maybe"}, "`ema` must be true or false"),
        ({"keras_module": "torch"}, "`keras_module` must be one of"),
        ({"initialization": "torch"}, "`initialization` must be one of"),
        ({"label_smoothing": 1.5}, r"`label_smoothing` must be in \[0, 1\)"),
        ({"label_smoothing": 1.0}, r"`label_smoothing` must be in \[0, 1\)"),
        ({"lr_max": 0}, "`lr_max` must be positive"),
        ({"lr_max": "-1"}, "`lr_max` must be positive"),
        ({"weight_decay": -0.1}, r"`weight_decay` must be in \[0, 1\)"),
        ({"batch_size": 0}, "`batch_size` must be positive"),
        ({"val_dir": "v", "dataset": "cifar10"}, "apply to image folders"),
        ({"scale": "0.5,2"}, "`scale` must be"),
        ({"epochs": 0}, "`epochs` must be positive"),
        ({"data_dir": "x", "dataset": "cifar10"}, "not both"),
        ({"randaugment_ops": -1}, "`randaugment_ops` and `randaugment_magnitude` must be >= 0"),
        ({"randaugment_magnitude": 31}, "at most `randaugment_magnitude_max`"),
        ({"randaugment_magnitude_max": 0}, "at most `randaugment_magnitude_max`"),
        ({"translate": -1}, "`translate` must be >= 0"),
        ({"translate": 32}, "`translate` must be below `image_size`"),
        ({"image_size": 100_000}, "`image_size` 100000 means 10000000000 pixels per image"),
    ],
)
def test_bad_overrides_raise_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), overrides)


def test_json_round_trip_is_exact(tmp_path):
    config = apply_overrides(from_recipe("imagenet_convmixer_1536_20"), {"ema": True})
    path = tmp_path / "sub" / "config.json"
    text = config.to_json(str(path))
    assert json.loads(path.read_text()) == json.loads(text)
    assert from_json(path) == config
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
