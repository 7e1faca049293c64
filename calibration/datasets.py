"""Image data for training and calibration: an ImageFolder tree or the embedded scikit-learn digits.

`load_data(spec)` returns an `ImageData` with a train and a val split. The val split is `val/` when the tree
has one, else a stratified split carved from `train/` with a fixed seed (5,000 of CIFAR-10's 50,000 by
default).
Small images (CIFAR-style) are decoded once, kept in memory as uint8 and cached on disk, so an epoch never
re-decodes JPEGs; large ones (ImageNet-style) are decoded per item.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from repq.calibration.transforms import PRESETS, Preset, augment_batch, file_transform, normalize_batch
from repq.errors import RepqError
from repq.reparam.io import atomic_write_bytes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
DIGITS = "digits"
# Decode into memory when the decoded uint8 array stays under this size (CIFAR-10 train: 150 MB).
MAX_IN_MEMORY_BYTES = 4 << 30


@dataclass
class ImageSource:
    """All images of one folder tree (or of digits): labels, and either decoded pixels or file paths."""

    name: str
    classes: list[str]
    labels: np.ndarray  # int64, one per image
    pixels: torch.Tensor | None = None  # uint8 N x 3 x H x W when decoded in memory
    files: list[Path] | None = None  # decoded per item otherwise

    def __len__(self) -> int:
        return len(self.labels)


class ImageSet(Dataset):
    """A split of an `ImageSource` with the transforms of its preset.

    Augmentation is seeded by (seed, epoch, image index), never by a global RNG: the same image gets the same
    crop on any rank, in any worker and after a resume, which makes multi-process and resumed runs reproduce a
    single uninterrupted one. Batches come out stacked (`__getitems__`), so loaders use `collate_batch`.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, preset: Preset, train: bool, seed: int = 0):
        self.source, self.indices, self.preset, self.train, self.seed = source, indices, preset, train, seed
        self.epoch = 0
        self._file_transform = None if source.pixels is not None else file_transform(preset, train)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(self.indices[np.asarray(positions, dtype=np.int64)])
        labels = torch.as_tensor(self.source.labels[index.numpy()])
        if self.source.pixels is not None:
            batch = self.source.pixels[index]
            if self.train:
                batch = augment_batch(batch, self.preset, self._seeds(index))
            return normalize_batch(batch, self.preset), labels
        return torch.stack([self._load_file(int(i)) for i in index]), labels

    def _seeds(self, index: torch.Tensor) -> torch.Tensor:
        # One seed per (seed, epoch, image) from an integer mixer: stable across processes and runs.
        return mix_seed(index.to(torch.int64) + mix_seed(torch.tensor(self.seed * 100_003 + self.epoch)))

    def _load_file(self, i: int) -> torch.Tensor:
        image = decode_image(self.source.files[i])
        if not self.train:
            return self._file_transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self._seeds(torch.tensor([i]))[0]))
            return self._file_transform(image)


_MASK = (1 << 62) - 1


def mix_seed(x: torch.Tensor) -> torch.Tensor:
    """A splitmix-style integer hash of int64 tensors onto [0, 2**62), elementwise."""
    x = x & _MASK
    x = ((x ^ (x >> 31)) * 0x5DEECE66D1F2B3 + 0x9E3779B97F4A7C) & _MASK
    x = ((x ^ (x >> 29)) * 0x94D049BB133111) & _MASK
    return x ^ (x >> 32)


def collate_batch(batch):
    """`ImageSet.__getitems__` already stacks: the loader passes its (images, labels) through unchanged."""
    return batch


@dataclass
class ImageData:
    """A dataset ready for training: train and val splits, class names, and the preset that made them."""

    name: str
    classes: list[str]
    preset: Preset
    train: ImageSet
    val: ImageSet
    task: str = "classification"
    val_split: str = ""  # which images are scored: "val/", "test/", or the share of train/ held out
    val_size: float = 0.1  # the held-out share (or count) when val_split was carved from train/
    split_seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """The shape exported graphs and benchmarks use: one image of the preset."""
        return (1, 3, self.preset.image_size, self.preset.image_size)

    def describe(self) -> dict:
        """What a checkpoint records so that later stages rebuild the same inputs."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "preset": self.preset.name,
            "image_size": self.preset.image_size,
            "mean": list(self.preset.mean),
            "std": list(self.preset.std),
            "train_images": len(self.train),
            "val_images": len(self.val),
            "val_split": self.val_split,
            "val_size": self.val_size,
            "split_seed": self.split_seed,
        }


SPLIT_FOLDERS = ("val", "test")  # a tree's own validation split, in this order of preference


def load_data(
    spec: str | os.PathLike = DIGITS,
    *,
    preset: str = "auto",
    val_size: float | int = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> ImageData:
    """Load `digits` or an ImageFolder tree: `ROOT/train/<class>/*` with `ROOT/val/` or `ROOT/test/`, `ROOT/train/`
    alone, or `ROOT/<class>/*`.

    Without a `val/` or `test/` folder, `val_size` (a fraction or a count) sizes the stratified split carved from
    train with `seed`; `ImageData.val_split` says which images the val split is. `preset` is `cifar` (32x32),
    `imagenet` (224x224) or `auto` (cifar for images up to 64 pixels).
    """
    if str(spec) == DIGITS:
        source = load_digits_source()
        chosen = PRESETS["digits"] if preset == "auto" else _preset(preset)
        train_idx, val_idx = stratified_split(source.labels, val_size, seed)
        return _make_data(source, source, chosen, train_idx, val_idx, seed, _carved(val_size, seed), val_size)
    root = Path(spec).expanduser()
    if not root.exists():
        raise RepqError(f"data path {root} does not exist: pass an ImageFolder tree or `digits`")
    if not root.is_dir():
        raise RepqError(f"data path {root} is a file, not a folder: pass an ImageFolder tree or `digits`")
    train_root, val_root = split_folders(root)
    train_files, train_labels, classes = scan_image_folder(train_root)
    chosen = _preset(preset) if preset != "auto" else _auto_preset(train_files, root)
    train_source = _make_source(str(root), classes, train_files, train_labels, chosen, cache_dir)
    if val_root is None:
        train_idx, val_idx = stratified_split(train_source.labels, val_size, seed)
        where = _carved(val_size, seed, "train/" if train_root != root else "the folder")
        return _make_data(train_source, train_source, chosen, train_idx, val_idx, seed, where, val_size)
    val_files, val_labels, val_classes = scan_image_folder(val_root)
    if val_classes != classes:
        raise RepqError(f"{val_root} has classes {val_classes[:5]}... unlike train/ {classes[:5]}...: "
                        f"give {val_root.name}/ the same class folders as train/")
    val_source = _make_source(str(val_root), classes, val_files, val_labels, chosen, cache_dir)
    return _make_data(train_source, val_source, chosen, np.arange(len(train_source)),
                      np.arange(len(val_source)), seed, f"{val_root.name}/", val_size)


def split_folders(root: Path) -> tuple[Path, Path | None]:
    """(the training images' folder, the tree's own validation folder or None) of an ImageFolder tree."""
    if not (root / "train").is_dir():
        if any((root / name).is_dir() for name in SPLIT_FOLDERS) and _has_only_splits(root):
            raise RepqError(f"{root} has {'/'.join(n for n in SPLIT_FOLDERS if (root / n).is_dir())}/ but no "
                            "train/: put the training images in train/<class>/")
        return root, None
    for name in SPLIT_FOLDERS:
        if (root / name).is_dir():
            return root / "train", root / name
    return root / "train", None


def _has_only_splits(root: Path) -> bool:
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return folders <= set(SPLIT_FOLDERS)


def _carved(val_size: float | int, seed: int, source: str = "the images") -> str:
    share = f"{100 * val_size:g}%" if isinstance(val_size, float) and val_size < 1 else f"{int(val_size)} images"
    return f"{share} of {source} held out (split seed {seed})"


def data_from_record(data, record: dict | None):
    """``data`` as loaded data: as given when already loaded, else read with the preset and split an artifact
    recorded (``ImageData.describe()``), so a model is scored on the images it was scored on before."""
    from repq.calibration.sr import SRData

    if isinstance(data, ImageData | SRData):
        return check_record_classes(data, record)
    record = record or {}
    loaded = load_data(data, preset=record.get("preset", "auto") if str(data) != DIGITS else "auto",
                       val_size=record.get("val_size", 0.1), seed=record.get("split_seed", 0))
    return check_record_classes(loaded, record)


def check_record_classes(data, record: dict | None):
    """``data``, when its classes are the ones a model was made with (the ``classes`` of its data record); a
    one-line error otherwise: its outputs would be scored or trained against labels that mean other classes."""
    classes = (record or {}).get("classes")
    if not classes or not isinstance(data, ImageData) or list(data.classes) == list(classes):
        return data
    raise RepqError(f"data {data.name} has {len(data.classes)} classes ({_few(data.classes)}), but the model was "
                    f"made for {len(classes)} ({_few(classes)}): pass the data it was trained on, or a folder of "
                    "its classes")


def _few(names: list[str], count: int = 4) -> str:
    return ", ".join(map(str, names[:count])) + (", ..." if len(names) > count else "")


def _make_data(train_source, val_source, preset, train_idx, val_idx, seed, val_split: str,
               val_size: float | int) -> ImageData:
    return ImageData(
        name=train_source.name,
        classes=train_source.classes,
        preset=preset,
        train=ImageSet(train_source, train_idx, preset, train=True, seed=seed),
        val=ImageSet(val_source, val_idx, preset, train=False, seed=seed),
        val_split=val_split,
        val_size=val_size,
        split_seed=seed,
    )


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise RepqError(f"unknown data preset {name!r}: use one of auto, {', '.join(PRESETS)}")
    return PRESETS[name]


# `auto` reads the size of this many images at most (evenly spread over the sorted files: every class).
AUTO_PRESET_SAMPLE = 2000
SMALL_IMAGE = 64  # auto: cifar (32 px) for images up to this many pixels a side, imagenet (224 px) above


def _auto_preset(files: list[Path], root: Path) -> Preset:
    """cifar or imagenet for the set, from the sizes of its images (all of them, or an even sample of a large
    set), not from one: the preset of the majority, said in one line on stderr (with how many images the other
    way), so a mixed set is never resized without a word."""
    import sys

    step = max(1, len(files) // AUTO_PRESET_SAMPLE)
    sample = files[::step]
    small = [path for path in sample if max(image_size(path)) <= SMALL_IMAGE]
    large = len(sample) - len(small)
    chosen = PRESETS["cifar"] if len(small) * 2 >= len(sample) else PRESETS["imagenet"]
    checked = f"{len(sample)} images" if step == 1 else f"{len(sample)} of its {len(files)} images"
    others = large if chosen.name == "cifar" else len(small)
    side = "larger" if chosen.name == "cifar" else "smaller"
    note = (f"; {others} {'is' if others == 1 else 'are'} {side} and will be resized to {chosen.image_size} px"
            if others else "")
    print(f"data {root}: preset {chosen.name} ({chosen.image_size} px): {len(sample) - others} of the {checked} "
          f"checked are {'at most' if chosen.name == 'cifar' else 'over'} {SMALL_IMAGE} px{note}; set the preset "
          "(--preset, or data.preset in a recipe) to choose", file=sys.stderr)
    return chosen


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header, naming the file when it cannot be read."""
    try:
        with _opened(path) as image:
            return image.size
    except RepqError:
        raise
    except (OSError, ValueError) as err:
        raise RepqError(f"cannot read image {path} ({err}): delete or replace the file") from err


def _opened(path: Path):
    """PIL's Image.open, with a decompression bomb (an image too large to decode safely) as a one-line error."""
    from PIL import Image

    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:
        raise RepqError(f"image {path} is too large to decode safely ({err}): delete or shrink the file") from err


def scan_image_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """List `root/<class>/<image>` files with clear errors for a tree that cannot train a classifier."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise RepqError(f"{root} has no class folders: lay images out as {root}/<class>/<image>.jpg")
    files, labels = [], []
    for label, name in enumerate(classes):
        images = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise RepqError(f"class folder {root / name} has no images: add images or remove the folder")
        files += images
        labels += [label] * len(images)
    if len(classes) < 2:
        raise RepqError(f"{root} has one class ({classes[0]}): a classifier needs at least two class folders")
    return files, np.asarray(labels, dtype=np.int64), classes


def decode_image(path: Path):
    """Open an image as RGB, naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _opened(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as err:  # raised on decode too
        raise RepqError(f"image {path} is too large to decode safely ({err}): delete or shrink the file") from err
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise RepqError(f"cannot read image {path} ({err}): delete or replace the file") from err


def stratified_split(labels: np.ndarray, val_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/val split of indices: the same on every run and every rank."""
    from sklearn.model_selection import train_test_split

    fraction = isinstance(val_size, float) and val_size < 1
    count = int(round(val_size * len(labels))) if fraction else int(val_size)
    num_classes = len(np.unique(labels))
    if not num_classes <= count <= len(labels) - num_classes:
        raise RepqError(f"a val split of {count} images cannot be stratified over {num_classes} classes and "
                        f"{len(labels)} images: choose a val size between {num_classes} and "
                        f"{len(labels) - num_classes}")
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=count, stratify=labels, random_state=seed
    )
    return np.sort(train_idx), np.sort(val_idx)


def load_digits_source() -> ImageSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as 32x32 RGB uint8 images."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    classes = [str(int(c)) for c in bunch.target_names]
    return ImageSource(DIGITS, classes, np.asarray(bunch.target, dtype=np.int64), pixels=pixels)


def _make_source(name, classes, files, labels, preset: Preset, cache_dir) -> ImageSource:
    size = preset.image_size
    if not preset.in_memory or len(files) * 3 * size * size > MAX_IN_MEMORY_BYTES:
        return ImageSource(name, classes, labels, files=files)
    return ImageSource(name, classes, labels, pixels=_cached_pixels(files, size, cache_dir))


def default_cache_dir() -> Path:
    return Path(os.environ.get("REPQ_CACHE_DIR", Path.home() / ".cache" / "repq")) / "decoded"


def _cached_pixels(files: list[Path], size: int, cache_dir) -> torch.Tensor:
    """Decoded uint8 pixels of `files`, from a disk cache keyed by their paths, sizes and mtimes."""
    key = hashlib.sha256(f"{size}".encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    path = Path(cache_dir or default_cache_dir()) / f"{key.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            pixels = np.load(path, allow_pickle=False)
            if pixels.shape == (len(files), 3, size, size) and pixels.dtype == np.uint8:
                return torch.from_numpy(pixels)
        except (OSError, ValueError):
            pass  # a corrupt cache entry is discarded and rebuilt, never trusted
    pixels = decode_all(files, size)
    buffer = io.BytesIO()
    np.save(buffer, pixels.numpy(), allow_pickle=False)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass  # a read-only home only costs the decode next time
    return pixels


def decode_all(files: list[Path], size: int) -> torch.Tensor:
    """Decode (and resize to size x size where needed) every file into one uint8 N x 3 x H x W tensor."""
    from PIL import Image

    def one(path: Path) -> np.ndarray:
        image = decode_image(path)
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(one, files))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def check_finite(images: torch.Tensor, where: str) -> None:
    """Stop on NaN or Inf input before it poisons the weights."""
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).sum())
        raise RepqError(f"{where}: the input batch holds {bad} NaN/Inf values: check the data and its "
                        "transform")
