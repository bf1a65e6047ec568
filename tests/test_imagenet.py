"""ImageNet evaluation preprocessing (against timm's PIL transform) and class names."""

import importlib.resources
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from convmixer_tf import imagenet

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"


@pytest.mark.parametrize("size, crop_pct", [(24, 0.875), (48, 0.96)])
def test_preprocess_matches_timm_eval_transform(size, crop_pct):
    # expected_eval_transform.npz: timm's transform of eval_image.png (PIL bicubic resize of the
    # shorter side, torchvision center crop), written by scripts/make_pretrained_fixtures.py.
    with np.load(FIXTURES / "expected_eval_transform.npz") as data:
        expected = data[f"size{size}_crop{crop_pct}"].astype(np.float32)
    image = imagenet.load_image(str(FIXTURES / "eval_image.png"))
    assert image.shape == (50, 37, 3) and image.dtype == tf.uint8
    pixels = imagenet.preprocess_image(image, size, crop_pct).numpy()
    assert pixels.shape == expected.shape == (size, size, 3)
    difference = np.abs(pixels - expected)
    # TensorFlow's antialiased bicubic is not bit-identical to PIL's: at most one grey level.
    assert difference.max() <= 1.0
    assert difference.mean() < 0.5


def test_preprocess_works_in_tf_data_on_landscape_images():
    wide = np.tile(np.arange(90, dtype=np.uint8)[None, :, None], (60, 1, 3))
    tall = np.transpose(wide, (1, 0, 2))
    dataset = tf.data.Dataset.from_generator(
        lambda: iter([wide, tall]), output_signature=tf.TensorSpec((None, None, 3), tf.uint8)
    ).map(lambda image: imagenet.preprocess_image(image, 32, 0.875, "bilinear"))
    first, second = list(dataset.as_numpy_iterator())
    assert first.shape == second.shape == (32, 32, 3)
    # Horizontal ramp, centered crop: the middle column is the middle of the ramp.
    assert abs(first[16, 16, 0] - 45) <= 2
    np.testing.assert_allclose(first, np.transpose(second, (1, 0, 2)), atol=1)


def test_resize_size_and_argument_errors():
    assert imagenet.resize_size(224, 0.96) == 233
    assert imagenet.resize_size(224, 0.875) == 256
    with pytest.raises(ValueError, match="crop_pct"):
        imagenet.resize_size(224, 1.5)
    with pytest.raises(ValueError, match="interpolation"):
        imagenet.preprocess_image(np.zeros((8, 8, 3)), 8, 1.0, "lanczos7")
    with pytest.raises(ValueError, match="square"):
        imagenet.preprocess_image(np.zeros((8, 8, 3)), (8, 6))


def test_class_names_follow_the_imagenet_label_order():
    classes = imagenet.imagenet_classes()
    assert len(classes) == 1000 and len({wnid for wnid, _ in classes}) == 1000
    assert classes[0] == ("n01440764", "tench, Tinca tinca")
    # Same order as tensorflow_datasets' imagenet2012 labels (the sorted WordNet ids).
    labels = importlib.resources.files("tensorflow_datasets").joinpath(
        "datasets/imagenet2012/labels.txt"
    )
    assert [wnid for wnid, _ in classes] == labels.read_text().split()


def test_decode_predictions():
    scores = np.zeros((2, 1000), np.float32)
    scores[0, [1, 7, 3]] = [0.2, 0.5, 0.1]
    scores[1, 999] = 3.0
    top = imagenet.decode_predictions(scores, top=3)
    names = [name for _, name, _ in top[0]]
    assert names[:2] == [imagenet.imagenet_classes()[7][1], "goldfish, Carassius auratus"]
    assert [score for _, _, score in top[0]] == pytest.approx([0.5, 0.2, 0.1])
    assert top[1][0][:2] == imagenet.imagenet_classes()[999]
    custom = imagenet.decode_predictions([[0.1, 0.9]], top=1, class_names=["cat", "dog"])
    assert custom == [[("1", "dog", pytest.approx(0.9))]]
    with pytest.raises(ValueError, match=r"shape \(batch, 1000\)"):
        imagenet.decode_predictions(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="top"):
        imagenet.decode_predictions(scores, top=0)
