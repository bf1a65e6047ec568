"""Input pipelines: image folders and TensorFlow Datasets, decoded once, batched with tf.data.

Two sources give the same elements, ``(uint8 image (H, W, 3), int32 label)``:

* an image folder ``DIR/<class>/<image>`` (any format ``tf.io.decode_image`` reads: JPEG, PNG,
  GIF, BMP, WebP; grayscale and RGBA are converted to RGB). Class names are the sorted sub-folder
  names. ``split`` selects a deterministic part of every class: with the file names sorted, the
  last ``ceil(validation_fraction * n)`` images of each class are ``"validation"``, the rest
  ``"train"``; ``"all"`` takes every image. Files that are empty, not an image or truncated are
  reported by path (a ``logging`` warning), skipped, and counted (:func:`scan_image_folder`);
* a TFDS dataset by name (``cifar10``, ``cifar100``, ``imagenet2012``, ``imagenette``, ...), read
  from ``tfds_data_dir`` (TFDS' default when None) and downloaded there on first use, as
  ``tfds.load`` does. Datasets without a ``validation`` split (CIFAR) use ``test`` for
  ``"validation"``.

:func:`load_dataset` resizes and batches (no augmentation): evaluation, calibration data for
quantization, benchmarks. The training pipeline (:mod:`training.pipeline`, with the augmentations of
:mod:`training.augment`) starts from :func:`decoded_dataset`, the same decoding code.

Example:
    >>> from training.data import load_dataset
    >>> ds, class_names = load_dataset(data_dir="tests/fixtures/cifar10",
    ...                                split="validation", image_size=32, batch_size=64)
    >>> images, labels = next(iter(ds))   # float32 (64, 32, 32, 3) in 0..255, int32 (64,)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import typing
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from convmixer_tf import image_files, imagenet
from convmixer_tf.constants import INTERPOLATIONS
from convmixer_tf.files import check_label

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
MAX_SHUFFLE_BUFFER = 10_000  # examples held for shuffling (memory: decoded images)
IMAGE_FOLDER_SPLITS = ("train", "validation", "all")
# A dataset root holding `train/` and one of these is read as separate training and validation
# folders (timm's and torchvision's ImageNet layout).
VALIDATION_FOLDERS = ("val", "validation")
# Seconds to wait for a TFDS download host before saying that it cannot be reached.
NETWORK_TIMEOUT_S = 10
# Cache decoded images in memory when they need less than this (estimated from the first image).
DEFAULT_CACHE_LIMIT_BYTES = 4 * 1024**3

# Leading bytes of the formats tf.io.decode_image reads, and the last bytes a complete file of
# that format ends with (None: the format has no fixed trailer). A truncated download is the
# common corruption; it lacks the trailer.
_MAGIC = (
    (b"\xff\xd8\xff", (b"\xff\xd9",)),  # JPEG, ends with the EOI marker
    (b"\x89PNG\r\n\x1a\n", (b"IEND\xaeB`\x82",)),  # PNG, ends with the IEND chunk
    (b"GIF87a", (b";",)),
    (b"GIF89a", (b";",)),
    (b"BM", None),  # BMP
    (b"RIFF", None),  # WebP (RIFF....WEBP)
)
# JPEG writers may pad after the EOI marker; look for it in the last bytes, not only at the end.
_TRAILER_WINDOW = 64


class Decoded(typing.NamedTuple):
    """What :func:`decoded_dataset` returns."""

    dataset: tf.data.Dataset
    class_names: list[str]
    num_examples: int | None  # None when unknown (a TFDS split limited per class)
    skipped: tuple[str, ...] = ()  # image files reported unreadable and skipped


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The files of an image folder split, after the corrupt ones were dropped.

    Attributes:
        paths: image paths, class by class, sorted by file name within a class.
        labels: the class index of each path.
        class_names: the sorted class folder names; ``labels`` index into it.
        skipped: paths of the files that were reported as unreadable and skipped.
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    skipped: tuple[str, ...] = ()


def _to_size(image_size: tuple[int, int] | int) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    else:
        size = tuple(image_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(
            "`image_size` must be a positive int or (height, width). "
            f"Received: image_size={image_size!r}"
        )
    return size


def check_image_file(path: str) -> str | None:
    """Returns why ``path`` is not a readable image (empty, unknown format, truncated, more
    pixels than :func:`convmixer_tf.image_files.max_image_pixels`), or None.

    Reads only the header and the last bytes: cheap enough to run over ImageNet's 1.28 M files.
    A file that passes can still fail to decode; :func:`decoded_dataset` skips those too.

    Example:
        >>> check_image_file("tests/fixtures/cifar10/cat/0000.jpg") is None
        True
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - _TRAILER_WINDOW))
            tail = f.read()
            known = [trailers for magic, trailers in _MAGIC if head.startswith(magic)]
            if not known:
                return "not an image TensorFlow can decode (unknown file signature)"
            if known[0] is not None and not any(t in tail for t in known[0]):
                return "truncated (no end-of-image marker)"
            too_big = image_files.too_many_pixels(f)
    except OSError as e:
        return f"cannot read: {e}"
    return None if too_big is None else f"declares {too_big}"


def scan_image_folder(
    data_dir: str,
    *,
    split: str = "all",
    validation_fraction: float = 0.1,
    limit_per_class: int | None = None,
    check_files: bool = True,
) -> ImageFolder:
    """Lists ``data_dir/<class>/<image>`` and picks the deterministic ``split``.

    Args:
        data_dir: the folder holding one sub-folder per class.
        split: ``"train"``, ``"validation"`` (the last ``ceil(validation_fraction * n)`` sorted
            files of each class) or ``"all"``.
        validation_fraction: the share of every class held out for validation, in [0, 1).
        limit_per_class: keep at most this many images of each class (the first ones of the
            split), for quick runs and tests.
        check_files: check each file's signature and trailer (:func:`check_image_file`) and skip
            the bad ones, logging each path and the count.

    Raises:
        ValueError: the folder is missing, has no class folders, or a split has no image.

    Example:
        >>> folder = scan_image_folder("tests/fixtures/cifar10", split="validation",
        ...                            limit_per_class=4)
        >>> len(folder.paths), folder.class_names[0]
        (40, 'airplane')
    """
    if split not in IMAGE_FOLDER_SPLITS:
        raise ValueError(
            f"`split` must be one of {IMAGE_FOLDER_SPLITS} for an image folder. "
            f"Received: split={split!r}"
        )
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(
            "`validation_fraction` must be in [0, 1). "
            f"Received: validation_fraction={validation_fraction!r}"
        )
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(
            "`limit_per_class` must be positive or None. "
            f"Received: limit_per_class={limit_per_class}"
        )
    if not os.path.isdir(data_dir):
        raise ValueError(f"Image folder not found or not a directory: {data_dir!r}")
    class_names = _class_folders(data_dir)
    if not class_names:
        raise ValueError(
            f"Image folder {data_dir!r} has no class sub-folders; expected DIR/<class>/<image>."
        )

    paths, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(data_dir, name)
        files = sorted(
            e.name for e in os.scandir(class_dir) if e.is_file() and not e.name.startswith(".")
        )
        n_val = math.ceil(validation_fraction * len(files)) if split != "all" else 0
        if split == "train":
            files = files[: len(files) - n_val]
        elif split == "validation":
            files = files[len(files) - n_val :]
        if limit_per_class is not None:
            files = files[:limit_per_class]
        if not files and (split != "validation" or validation_fraction > 0):
            empty.append(name)
        paths.extend(os.path.join(class_dir, f) for f in files)
        labels.extend([label] * len(files))
    if empty:
        raise ValueError(
            f"Class folder(s) {empty[:10]} of {data_dir!r} have no image in split {split!r}: a "
            "model would learn an output it never sees. Remove them or add images."
        )

    skipped = []
    if check_files and paths:
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            problems = list(pool.map(check_image_file, paths, chunksize=256))
        keep = [p is None for p in problems]
        for path, problem in zip(paths, problems, strict=True):
            if problem is not None:
                logger.warning("Skipping unreadable image %s: %s", path, problem)
                skipped.append(path)
        if skipped:
            logger.warning(
                "Skipped %d unreadable image(s) of %d in %s (split %r).",
                len(skipped),
                len(paths),
                data_dir,
                split,
            )
        paths = [p for p, k in zip(paths, keep, strict=True) if k]
        labels = [y for y, k in zip(labels, keep, strict=True) if k]
    if not paths:
        raise ValueError(
            f"No images in split {split!r} of image folder {data_dir!r} "
            f"(classes: {class_names}, validation_fraction={validation_fraction})."
        )
    return ImageFolder(tuple(paths), tuple(labels), tuple(class_names), tuple(skipped))


def _class_folders(data_dir: str) -> list[str]:
    """The sorted class folder names of ``data_dir``; a name that is not one printable line (a
    newline would shift every label after it in labels.txt) is a ValueError naming it."""
    names = sorted(
        e.name for e in os.scandir(data_dir) if e.is_dir() and not e.name.startswith(".")
    )
    for name in names:
        check_label(name, f"Class folder {os.path.join(data_dir, name)!r}: its name")
    return names


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """Where the images of an image-folder run are.

    Attributes:
        train_dir: the training class folders ``<class>/<image>``.
        val_dir: a separate validation folder (class folders, or flat with ``val_labels``), or
            None: the validation split is then held out of ``train_dir``.
        val_labels: the label file of a flat validation folder, or None.
    """

    train_dir: str
    val_dir: str | None = None
    val_labels: str | None = None


def resolve_layout(
    data_dir: str, val_dir: str | None = None, val_labels: str | None = None
) -> FolderLayout:
    """The layout of ``data_dir``: class folders, or a root with ``train/`` and ``val/``.

    A root holding a ``train`` folder of class folders and one of :data:`VALIDATION_FOLDERS`
    (timm's and torchvision's ImageNet layout) reads ``train/`` for training and the other for
    validation. ``val_dir`` names the validation folder explicitly; ``val_labels`` makes it a
    flat folder of images with a label file (the official ImageNet validation set).

    Example:
        >>> resolve_layout("tests/fixtures/cifar10").val_dir is None
        True
    """
    if not os.path.isdir(data_dir):
        raise ValueError(f"Image folder not found or not a directory: {data_dir!r}")
    if val_labels is not None and val_dir is None:
        raise ValueError("`val_labels` (--val-labels) needs the flat folder it labels: --val-dir.")
    if val_dir is not None:
        if not os.path.isdir(val_dir):
            raise ValueError(f"Validation folder not found or not a directory: {val_dir!r}")
        if val_labels is not None and not os.path.isfile(val_labels):
            raise ValueError(f"Validation label file not found: {val_labels!r}")
        return FolderLayout(data_dir, val_dir, val_labels)
    train = os.path.join(data_dir, "train")
    found = [n for n in VALIDATION_FOLDERS if os.path.isdir(os.path.join(data_dir, n))]
    if os.path.isdir(train) and found and _class_folders(train):
        if len(found) > 1:
            raise ValueError(
                f"{data_dir!r} holds both {found}: give the validation folder with --val-dir."
            )
        return FolderLayout(train, os.path.join(data_dir, found[0]))
    return FolderLayout(data_dir)


def read_label_file(path: str, class_names: Sequence[str]) -> dict[str, int]:
    """``{image file stem: class index}`` from a label file of a flat validation folder.

    One image per line: its file name (or name without extension) and its class, separated by
    a comma, tab or spaces; the class is a class folder name (for ImageNet a WordNet id such as
    ``n01440764``) or an index into the sorted class names. Extra fields are ignored, so
    Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the class first) works as
    it is; a header line is skipped. Errors name the file and the line.
    """
    index = {name: i for i, name in enumerate(class_names)}
    labels = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"Label file {path!r} is not UTF-8 text: byte {e.object[e.start : e.start + 1]!r} "
            f"at offset {e.start}."
        ) from None
    for number, line in enumerate(lines, start=1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise ValueError(f"{path}:{number}: expected '<image> <class>'. Received: {line!r}")
        image, label = fields[0], fields[1]
        if label in index:
            value = index[label]
        elif label.isdigit() and int(label) < len(class_names):
            value = int(label)
        elif number == 1:
            continue  # a header
        else:
            raise ValueError(
                f"{path}:{number}: class {label!r} is neither a class folder name nor an "
                f"index below {len(class_names)}."
            )
        labels[os.path.splitext(os.path.basename(image))[0]] = value
    if not labels:
        raise ValueError(f"Label file {path!r} has no labels.")
    return labels


def scan_flat_folder(
    val_dir: str,
    val_labels: str,
    class_names: Sequence[str],
    *,
    limit_per_class: int | None = None,
    check_files: bool = True,
) -> ImageFolder:
    """The images of a flat folder, labelled by :func:`read_label_file` (every image needs a
    label; labels of missing images are an error too: the set must be complete)."""
    labels = read_label_file(val_labels, class_names)
    names = sorted(
        e.name for e in os.scandir(val_dir) if e.is_file() and not e.name.startswith(".")
    )
    stems = {os.path.splitext(n)[0]: n for n in names}
    unlabelled = sorted(set(stems) - set(labels))
    missing = sorted(set(labels) - set(stems))
    if unlabelled or missing:
        raise ValueError(
            f"{val_dir!r} and {val_labels!r} disagree: {len(unlabelled)} image(s) without a label "
            f"{unlabelled[:3]}, {len(missing)} label(s) without an image {missing[:3]}."
        )
    by_class: dict[int, list[str]] = {}
    for stem in sorted(stems):
        by_class.setdefault(labels[stem], []).append(os.path.join(val_dir, stems[stem]))
    paths, label_list = [], []
    for label in sorted(by_class):
        chosen = by_class[label][:limit_per_class]
        paths += chosen
        label_list += [label] * len(chosen)
    skipped = []
    if check_files:
        problems = [check_image_file(p) for p in paths]
        skipped = [p for p, problem in zip(paths, problems, strict=True) if problem]
        for path in skipped:
            logger.warning("Skipping unreadable image %s", path)
        keep = [problem is None for problem in problems]
        paths = [p for p, k in zip(paths, keep, strict=True) if k]
        label_list = [y for y, k in zip(label_list, keep, strict=True) if k]
    return ImageFolder(tuple(paths), tuple(label_list), tuple(class_names), tuple(skipped))


def image_folder_split(
    data_dir: str,
    split: str,
    *,
    val_dir: str | None = None,
    val_labels: str | None = None,
    validation_fraction: float = 0.1,
    limit_per_class: int | None = None,
) -> ImageFolder:
    """One split of an image-folder dataset, whatever its layout (:func:`resolve_layout`).

    With a separate validation folder, ``"train"`` is every image of the training folder,
    ``"validation"`` every image of the validation folder (whose class folders must be the
    training folder's) and ``"all"`` both; otherwise the splits are held out of ``data_dir``
    (:func:`scan_image_folder`).

    Example:
        >>> image_folder_split("tests/fixtures/cifar10", "validation",
        ...                    limit_per_class=2).class_names[:2]
        ('airplane', 'automobile')
    """
    layout = resolve_layout(data_dir, val_dir, val_labels)
    if layout.val_dir is None:
        return scan_image_folder(
            data_dir, split=split, validation_fraction=validation_fraction,
            limit_per_class=limit_per_class,
        )  # fmt: skip
    if split not in IMAGE_FOLDER_SPLITS:
        raise ValueError(
            f"`split` must be one of {IMAGE_FOLDER_SPLITS} for an image folder. "
            f"Received: split={split!r}"
        )
    parts = []
    if split in ("train", "all"):
        parts.append(scan_image_folder(layout.train_dir, limit_per_class=limit_per_class))
    if split in ("validation", "all"):
        class_names = _class_folders(layout.train_dir)
        if layout.val_labels is not None:
            val = scan_flat_folder(
                layout.val_dir, layout.val_labels, class_names, limit_per_class=limit_per_class
            )
        else:
            val_classes = _class_folders(layout.val_dir)
            if val_classes != class_names:
                raise ValueError(
                    f"The class folders of {layout.val_dir!r} and {layout.train_dir!r} differ: "
                    f"only in validation {sorted(set(val_classes) - set(class_names))[:10]}, "
                    f"only in training {sorted(set(class_names) - set(val_classes))[:10]}."
                )
            val = scan_image_folder(layout.val_dir, limit_per_class=limit_per_class)
        parts.append(val)
    folder = ImageFolder(
        tuple(p for part in parts for p in part.paths),
        tuple(y for part in parts for y in part.labels),
        parts[0].class_names,
        tuple(p for part in parts for p in part.skipped),
    )
    if not folder.paths:
        raise ValueError(f"No images in split {split!r} of {layout}.")
    return folder


def default_evaluation_split(
    data_dir: str | None = None, val_dir: str | None = None, dataset: str | None = None
) -> str:
    """What an evaluation scores unless told: TFDS' ``"validation"``; for image folders the
    separate validation folder if there is one, else every image of the folder (``"all"``)."""
    if dataset is not None or data_dir is None:
        return "validation"
    if val_dir is not None or resolve_layout(data_dir).val_dir is not None:
        return "validation"
    return "all"


def decode_image_file(path: tf.Tensor) -> tf.Tensor:
    """Reads and decodes one image file to uint8 RGB ``(H, W, 3)`` (gray/RGBA converted)."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _tfds_split(builder, split: str) -> str:
    splits = set(builder.info.splits.keys())
    if split == "validation" and "validation" not in splits and "test" in splits:
        logger.info("%s has no 'validation' split; using 'test'.", builder.info.name)
        return "test"
    return split


def _limit_per_class(ds: tf.data.Dataset, num_classes: int, limit: int) -> tf.data.Dataset:
    """Keeps the first ``limit`` elements of each class (a stateful scan over the labels)."""

    def step(counts, element):
        _, label = element
        counts = tf.tensor_scatter_nd_add(counts, [[label]], [1])
        return counts, (element, counts[label] <= limit)

    def is_kept(element, keep):
        return keep

    def drop_flag(element, keep):
        return element

    ds = ds.scan(tf.zeros([num_classes], tf.int32), step)
    ds = ds.filter(is_kept).map(drop_flag)
    return ds.take(num_classes * limit)


def decoded_dataset(
    *,
    data_dir: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    tfds_data_dir: str | None = None,
    validation_fraction: float = 0.1,
    limit_per_class: int | None = None,
    shuffle_files: bool = False,
    seed: int = 0,
    val_dir: str | None = None,
    val_labels: str | None = None,
) -> Decoded:
    """Decoded, unbatched ``(uint8 image (H, W, 3), int32 label)`` elements of one split.

    Exactly one of ``data_dir`` (image folder; any layout of :func:`image_folder_split`, with
    ``val_dir`` / ``val_labels``) and ``dataset`` (TFDS name) must be given.
    Images keep their own size; decoding runs in parallel. Images that fail to decode despite
    passing :func:`check_image_file` are skipped by ``ignore_errors`` (TensorFlow logs them).

    Returns:
        A :class:`Decoded` ``(dataset, class_names, num_examples, skipped)``.

    Example:
        >>> decoded = decoded_dataset(data_dir="tests/fixtures/cifar10",
        ...                           split="validation", limit_per_class=2)
        >>> decoded.num_examples
        20
    """
    if (data_dir is None) == (dataset is None):
        raise ValueError(
            "Give exactly one of `data_dir` (an image folder) and `dataset` (a TFDS name). "
            f"Received: data_dir={data_dir!r}, dataset={dataset!r}"
        )
    if data_dir is not None:
        folder = image_folder_split(
            data_dir,
            split,
            val_dir=val_dir,
            val_labels=val_labels,
            validation_fraction=validation_fraction,
            limit_per_class=limit_per_class,
        )
        logger.info(
            "Split %r: %d images of %d classes (%s)",
            split,
            len(folder.paths),
            len(folder.class_names),
            resolve_layout(data_dir, val_dir, val_labels),
        )
        ds = tf.data.Dataset.from_tensor_slices(
            (list(folder.paths), np.asarray(folder.labels, np.int32))
        )
        if shuffle_files:
            # Shuffle the (cheap) file list once per epoch before decoding.
            ds = ds.shuffle(len(folder.paths), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(
            lambda path, label: (decode_image_file(path), label),
            num_parallel_calls=AUTOTUNE,  # order: tf.data.Options.deterministic (default True)
        )
        ds = ds.ignore_errors(log_warning=True)
        return Decoded(ds, list(folder.class_names), len(folder.paths), folder.skipped)

    import tensorflow_datasets as tfds  # only TFDS users pay its import time

    try:
        builder = tfds.builder(dataset, data_dir=tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset {dataset!r}: {e}") from e
    if not builder.is_prepared():
        _check_reachable(builder, dataset)
    try:
        builder.download_and_prepare()
    except (OSError, ConnectionError) as e:  # requests' errors are OSErrors
        reason = " ".join(str(e).split())[:300]
        raise ValueError(
            f"TFDS could not download or prepare {dataset!r} into {builder.data_dir!r} "
            f"({type(e).__name__}: {reason}). Without network access, pass --data-dir DIR "
            "(an image folder) or --tfds-data-dir with a prepared copy."
        ) from e
    tfds_split = _tfds_split(builder, split)
    # Plain names are checked here; slices and sums ("train[:90%]", "train+test") go to TFDS.
    if tfds_split.isidentifier() and tfds_split not in builder.info.splits:
        raise ValueError(
            f"TFDS dataset {dataset!r} has no split {split!r}. "
            f"Valid splits: {sorted(builder.info.splits.keys())}"
        )
    label_feature = builder.info.features["label"]
    class_names = list(label_feature.names)
    ds = builder.as_dataset(
        split=tfds_split,
        as_supervised=True,
        shuffle_files=shuffle_files,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    ds = ds.map(
        lambda image, label: (_to_rgb(image), tf.cast(label, tf.int32)),
        num_parallel_calls=AUTOTUNE,
    )
    num_examples = builder.info.splits[tfds_split].num_examples
    if limit_per_class is not None:
        ds = _limit_per_class(ds, len(class_names), limit_per_class)
        num_examples = None
    return Decoded(ds, class_names, num_examples)


def _check_reachable(builder, dataset: str) -> None:
    """A ValueError within seconds if the hosts TFDS would download ``dataset`` from cannot be
    reached (TFDS itself retries for minutes)."""
    import socket
    import urllib.parse

    urls = list(getattr(builder, "url_infos", None) or {})
    for url in urls[:3]:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            continue
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=NETWORK_TIMEOUT_S).close()
        except OSError as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(
                f"TFDS needs to download {dataset!r} from {parsed.hostname} and cannot reach it "
                f"({reason}). Pass --data-dir DIR (an image folder), or --tfds-data-dir with a "
                "copy TFDS prepared where there is a network."
            ) from None


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 ``(H, W, C)`` with C in {1, 3, 4} -> ``(H, W, 3)``."""
    channels = image.shape[-1]
    if channels == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"Images need 1, 3 or 4 channels. Received: shape={image.shape}")
    return tf.cast(image, tf.uint8)


def resize_image(
    image: tf.Tensor,
    image_size: tuple[int, int],
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
) -> tf.Tensor:
    """Evaluation resize as timm does it: resize, then center-crop ``image_size``.

    A square target is :func:`convmixer_tf.imagenet.preprocess_image` (the shorter side to
    ``floor(size / crop_pct)``, aspect ratio kept, torchvision's rounding; tested against timm);
    a non-square one resizes to ``floor(size / crop_pct)`` per side. Returns uint8, rounded.

    Example:
        >>> resize_image(tf.zeros([48, 64, 3], tf.uint8), (32, 32)).shape
        TensorShape([32, 32, 3])
    """
    height, width = image_size
    if height == width:
        image = imagenet.preprocess_image(image, height, crop_pct, interpolation)
        return tf.cast(image, tf.uint8)
    resize_to = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    image = tf.image.resize(
        tf.cast(image, tf.float32), resize_to, method=interpolation, antialias=True
    )
    image = tf.image.resize_with_crop_or_pad(image, height, width)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def add_data_source_arguments(parser, *, required: bool = True) -> None:
    """Adds the options that name a data source: ``--data-dir`` or ``--dataset`` (exclusive),
    ``--tfds-data-dir``, ``--validation-fraction`` and ``--limit-per-class``.

    :func:`data_source_kwargs` turns them into :func:`load_dataset` keyword arguments. Used by
    every CLI that reads data (``training.evaluate``, ``export``, ``export.evaluate``,
    ``export.benchmark``).
    """
    from convmixer_tf import cli

    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--data-dir", type=cli.input_dir,
        help="image folder DIR/<class>/<image>, or a root with train/ and val/ (or validation/)",
    )  # fmt: skip
    source.add_argument("--dataset", help="a TFDS name, e.g. cifar10")
    parser.add_argument("--val-dir", default=None, type=cli.input_dir,
                        help="a separate validation folder (class folders, or flat with "
                        "--val-labels)")  # fmt: skip
    parser.add_argument(
        "--val-labels", default=None, type=cli.input_file,
        help="label file of a flat --val-dir: '<image> <class>' per line",
    )  # fmt: skip
    parser.add_argument("--tfds-data-dir", default=None, type=cli.output_path,
                        help="TFDS data_dir")  # fmt: skip
    parser.add_argument(
        "--validation-fraction", type=cli.held_out_fraction, default=0.1,
        help="image folders: the share of each class held out as 'validation' (as in training)",
    )  # fmt: skip
    parser.add_argument("--limit-per-class", type=cli.positive_int, default=None,
                        help="use at most this many images per class")  # fmt: skip


def data_source_kwargs(args) -> dict:
    """:func:`load_dataset` keyword arguments from :func:`add_data_source_arguments`."""
    return dict(
        data_dir=args.data_dir,
        dataset=args.dataset,
        tfds_data_dir=args.tfds_data_dir,
        validation_fraction=args.validation_fraction,
        limit_per_class=args.limit_per_class,
        val_dir=args.val_dir,
        val_labels=args.val_labels,
    )


def add_evaluation_data_arguments(parser, *, batch_size: int = 64) -> None:
    """Adds the options of an evaluation CLI that feed :func:`load_dataset`.

    The data source (:func:`add_data_source_arguments`, required), ``--split``,
    ``--batch-size``, ``--crop-pct`` and ``--interpolation``; :func:`evaluation_data_kwargs`
    turns them into keyword arguments.
    """
    from convmixer_tf import cli

    add_data_source_arguments(parser, required=True)
    parser.add_argument(
        "--split", default=None,
        help="train | validation | all | a TFDS split. Default: the whole image folder, its "
        "validation folder (train/ + val/ root, --val-dir), or TFDS' validation (test) split",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=cli.positive_int, default=batch_size,
                        help="images per batch")  # fmt: skip
    parser.add_argument(
        "--crop-pct", type=cli.fraction, default=None,
        help="center crop (timm's crop_pct; 0.96 for the ImageNet presets). Default: the "
        "training run's (config.json beside the model), else 1",
    )  # fmt: skip
    parser.add_argument(
        "--interpolation", default=None, choices=INTERPOLATIONS,
        help="resize interpolation (bicubic for the ImageNet presets). Default: the training "
        "run's, else bilinear",
    )  # fmt: skip


def evaluation_data_kwargs(args, run_settings: dict | None = None) -> dict:
    """:func:`load_dataset` keyword arguments from :func:`add_evaluation_data_arguments`; the
    crop and interpolation not given come from ``run_settings`` (those of the model's training
    run, :func:`convmixer_tf.saving.training_run_settings`), else 1 and bilinear."""
    run_settings = run_settings or {}
    source = data_source_kwargs(args)
    split = args.split or default_evaluation_split(
        source["data_dir"], source["val_dir"], source["dataset"]
    )
    return dict(
        **source,
        split=split,
        batch_size=args.batch_size,
        crop_pct=args.crop_pct or run_settings.get("crop_pct", 1.0),
        interpolation=args.interpolation or run_settings.get("interpolation", "bilinear"),
    )


def load_dataset(
    *,
    data_dir: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    image_size: tuple[int, int] | int,
    batch_size: int,
    shuffle: bool = False,
    tfds_data_dir: str | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    limit_per_class: int | None = None,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    cache: bool | None = None,
    drop_remainder: bool = False,
    val_dir: str | None = None,
    val_labels: str | None = None,
) -> tuple[tf.data.Dataset, list[str]]:
    """Batches of resized, not augmented images: ``(float32 (B, H, W, 3) in 0..255, int32 (B,))``.

    Args:
        data_dir: an image folder ``DIR/<class>/<image>``, or a root with ``train/`` and
            ``val/`` (exclusive with ``dataset``); ``val_dir`` and ``val_labels``: see
            :func:`image_folder_split`.
        dataset: a TFDS dataset name, e.g. ``"cifar10"`` (exclusive with ``data_dir``).
        split: ``"train"``, ``"validation"`` or ``"all"`` for image folders; a TFDS split name
            for TFDS (``"validation"`` maps to ``"test"`` where there is no validation split).
        image_size: output ``(height, width)`` or one int for square images.
        batch_size: images per batch (the last batch may be smaller unless ``drop_remainder``).
        shuffle: shuffle files and examples (seeded by ``seed``), reshuffled every epoch.
        tfds_data_dir: TFDS' ``data_dir`` (download and cache location).
        validation_fraction: image folders: the share of each class in ``"validation"``.
        seed: shuffle seed.
        limit_per_class: keep at most this many images per class.
        crop_pct: evaluation center crop: resize the shorter side to ``size / crop_pct`` first
            (timm's convention; 1.0 resizes the shorter side to ``size``).
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"area"``.
        cache: keep decoded, resized images in memory after the first epoch; None (default)
            caches when the split needs less than 4 GiB at ``image_size``.
        drop_remainder: drop the last incomplete batch.

    Returns:
        ``(dataset, class_names)``.

    Raises:
        ValueError: bad arguments, a missing or empty folder, an unknown TFDS name or split.

    Example:
        >>> ds, names = load_dataset(data_dir="tests/fixtures/cifar10", split="validation",
        ...                          image_size=32, batch_size=8, limit_per_class=2)
        >>> [tuple(x.shape) for x in next(iter(ds))]
        [(8, 32, 32, 3), (8,)]
    """
    size = _to_size(image_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}"
        )
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"`interpolation` must be one of {INTERPOLATIONS}. Received: {interpolation!r}"
        )
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"`crop_pct` must be in (0, 1]. Received: crop_pct={crop_pct!r}")
    ds, class_names, num_examples, _ = decoded_dataset(
        data_dir=data_dir,
        dataset=dataset,
        split=split,
        tfds_data_dir=tfds_data_dir,
        validation_fraction=validation_fraction,
        limit_per_class=limit_per_class,
        shuffle_files=shuffle,
        seed=seed,
        val_dir=val_dir,
        val_labels=val_labels,
    )
    ds = ds.map(
        lambda image, label: (resize_image(image, size, crop_pct, interpolation), label),
        num_parallel_calls=AUTOTUNE,
        deterministic=not shuffle,
    )
    if cache is None:
        cache = num_examples is not None and num_examples * size[0] * size[1] * 3 <= (
            DEFAULT_CACHE_LIMIT_BYTES
        )
    if cache:
        ds = ds.cache()  # uint8: a quarter of the float32 memory
    if shuffle:
        buffer = min(num_examples or MAX_SHUFFLE_BUFFER, MAX_SHUFFLE_BUFFER)
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    ds = ds.map(lambda images, labels: (tf.cast(images, tf.float32), labels))
    return ds.prefetch(AUTOTUNE), class_names
