"""Datasets, splits, augmentation, caching, calibration set and bad-data errors (calibration/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repq.calibration import datasets
from repq.calibration.datasets import check_finite, load_data, scan_image_folder, stratified_split
from repq.calibration.loaders import build_loaders, calibration_indices, calibration_set, set_loader_epoch
from repq.calibration.transforms import PRESETS, augment_batch
from repq.errors import RepqError

CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10"


def _write_tree(root: Path, per_class: dict[str, int], size: int = 32, seed: int = 0) -> dict[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            path = root / name / f"{i:03d}.png"
            Image.fromarray(pixels).save(path)
            written[path] = pixels
    return written


def test_digits_split_is_stratified_disjoint_and_repeatable():
    data = load_data("digits")
    again = load_data("digits")
    assert data.num_classes == 10 and len(data.train) + len(data.val) == 1797
    assert not set(data.train.indices) & set(data.val.indices)
    np.testing.assert_array_equal(data.val.indices, again.val.indices)
    counts = np.bincount(data.val.labels, minlength=10)
    assert len(data.val) == 180 and counts.min() >= 17 and counts.max() <= 19  # ~10% of ~180 per class
    x, y = data.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == data.val.labels[0]


def test_image_folder_with_val_folder_and_exact_pixels(tmp_path):
    train = _write_tree(tmp_path / "train", {"cat": 4, "dog": 3})
    _write_tree(tmp_path / "val", {"cat": 2, "dog": 2}, seed=1)
    data = load_data(tmp_path, cache_dir=tmp_path / "cache")
    assert data.classes == ["cat", "dog"] and len(data.train) == 7 and len(data.val) == 4
    assert data.preset.name == "cifar"
    # PNG is lossless: the eval transform must be (pixels / 255 - mean) / std of the file, channel by channel.
    plain = datasets.ImageSet(data.train.source, data.train.indices, data.preset, train=False)
    x, y = plain[0]
    expected = (train[tmp_path / "train" / "cat" / "000.png"] / 255.0 - np.array(data.preset.mean)) / np.array(
        data.preset.std
    )
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert int(y) == 0


def test_split_carved_from_train_is_stratified(tmp_path):
    _write_tree(tmp_path / "tree", {"a": 10, "b": 10, "c": 10})
    data = load_data(tmp_path / "tree", val_size=6, seed=3, cache_dir=tmp_path / "cache")
    assert np.bincount(data.val.labels).tolist() == [2, 2, 2]
    assert len(data.train) == 24
    other_seed = load_data(tmp_path / "tree", val_size=6, seed=4, cache_dir=tmp_path / "cache")
    assert not np.array_equal(data.val.indices, other_seed.val.indices)


@pytest.mark.skipif(not CIFAR.is_dir(), reason="../shared/datasets/cifar10 is not present")
def test_cifar10_convention_500_per_class_and_real_jpeg_decode(tmp_path):
    files, labels, classes = scan_image_folder(CIFAR / "train")
    assert len(files) == 50_000 and len(classes) == 10
    train_idx, val_idx = stratified_split(labels, 5000, seed=0)
    assert np.bincount(labels[val_idx]).tolist() == [500] * 10 and len(train_idx) == 45_000
    # Decode a few real JPEGs through the in-memory path (a tree of links to them).
    for name in classes[:2]:
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "tree" / name / f"{i}.jpg").symlink_to(CIFAR / "train" / name / f"{i:04d}.jpg")
    small = load_data(tmp_path / "tree", val_size=2, cache_dir=tmp_path / "cache")
    assert small.train.source.pixels.shape == (6, 3, 32, 32)
    reference = np.asarray(Image.open(CIFAR / "train" / classes[0] / "0000.jpg").convert("RGB"))
    np.testing.assert_array_equal(small.train.source.pixels[0].permute(1, 2, 0).numpy(), reference)


def test_decoded_images_are_cached_on_disk(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree", {"a": 3, "b": 3})
    first = load_data(tmp_path / "tree", val_size=2, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(datasets, "decode_all", no_decode)
    second = load_data(tmp_path / "tree", val_size=2, cache_dir=tmp_path / "cache")
    assert torch.equal(first.train.source.pixels, second.train.source.pixels)


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate an H x W x C image by (dy, dx), filling with zeros (independent of augment_batch)."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_augmentation_is_a_shift_or_mirror_and_depends_only_on_seed():
    preset = PRESETS["cifar"]
    batch = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    seeds = torch.arange(16, dtype=torch.int64) * 7919 + 11
    out = augment_batch(batch, preset, seeds)
    flips = 0
    for i in range(16):
        original, got = batch[i].permute(1, 2, 0).numpy(), out[i].permute(1, 2, 0).numpy()
        candidates = [(dy, dx, f) for dy in range(-4, 5) for dx in range(-4, 5) for f in (False, True)
                      if np.array_equal(got, _shift(original[:, ::-1] if f else original, dy, dx))]
        assert candidates, f"image {i} is not a padded crop of its original"
        flips += candidates[0][2]
    assert 0 < flips < 16
    # The same seed gives the same crop whatever else is in the batch.
    assert torch.equal(augment_batch(batch[3:5], preset, seeds[3:5]), out[3:5])


def test_training_batches_reproduce_per_epoch_and_change_between_epochs():
    data = load_data("digits")
    loader, _ = build_loaders(data, 32, seed=0)
    set_loader_epoch(loader, 1)
    first = next(iter(loader))
    set_loader_epoch(loader, 2)
    other = next(iter(loader))
    set_loader_epoch(loader, 1)
    again = next(iter(loader))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_calibration_set_is_fixed_from_train_and_unaugmented():
    data = load_data("digits")
    images, labels = calibration_set(data, 64, seed=0)
    again, _ = calibration_set(data, 64, seed=0)
    assert images.shape == (64, 3, 32, 32) and torch.equal(images, again)
    positions = calibration_indices(data, 64, seed=0)
    source_index = data.train.indices[positions]
    assert not set(source_index) & set(data.val.indices)
    raw = data.train.source.pixels[torch.as_tensor(source_index)].float() / 255
    mean, std = torch.tensor(data.preset.mean).view(1, 3, 1, 1), torch.tensor(data.preset.std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, (raw - mean) / std)
    assert torch.equal(labels, torch.as_tensor(data.train.source.labels[source_index]))
    with pytest.raises(RepqError, match="calibration set"):
        calibration_set(data, 10**6)


def test_bad_data_errors_name_the_problem(tmp_path):
    with pytest.raises(RepqError, match="does not exist"):
        load_data(tmp_path / "missing")
    _write_tree(tmp_path / "one", {"only": 3})
    with pytest.raises(RepqError, match="one class"):
        load_data(tmp_path / "one")
    _write_tree(tmp_path / "empty", {"a": 3})
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(RepqError, match=r"class folder .*b has no images"):
        load_data(tmp_path / "empty")
    _write_tree(tmp_path / "broken", {"a": 3, "b": 3})
    bad = tmp_path / "broken" / "b" / "001.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(RepqError, match=r"cannot read image .*001\.png"):
        load_data(tmp_path / "broken", val_size=2, cache_dir=tmp_path / "cache")
    with pytest.raises(RepqError, match="NaN/Inf"):
        check_finite(torch.tensor([0.0, float("nan"), float("inf")]), "batch 0")


def test_large_images_get_imagenet_transforms_decoded_per_item(tmp_path):
    _write_tree(tmp_path / "tree", {"a": 3, "b": 3}, size=80)
    data = load_data(tmp_path / "tree", val_size=2)
    assert data.preset.name == "imagenet" and data.train.source.pixels is None  # decoded per item
    x, _ = data.val[0]
    assert x.shape == (3, 224, 224)
    data.train.set_epoch(0)
    a, _ = data.train[1]
    b, _ = data.train[1]
    data.train.set_epoch(1)
    c, _ = data.train[1]
    assert a.shape == (3, 224, 224) and torch.equal(a, b) and not torch.equal(a, c)
