"""Super-resolution data: Y-channel (low, high) pairs made by bicubic downscaling, training patches and PSNR.

Each image is cropped to a multiple of the scale and downscaled with PIL's bicubic filter once, as the
super-resolution literature does; training patches are aligned crops of that pair (low at (y, x), high at
(y * s, x * s)), so training sees exactly the inputs evaluation sees. PSNR is measured on the Y channel (BT.601,
values in [0, 1]) with `scale` border pixels cropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from repq.calibration.datasets import IMAGE_SUFFIXES, decode_image, mix_seed
from repq.errors import RepqError

TASK = "super_resolution"


def rgb_to_y(rgb):
    """BT.601 luma of RGB in [0, 1] (H, W, 3), in [0, 1]: the Y channel SR papers report PSNR on."""
    return (16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def sr_pair(path: Path, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(low-resolution Y, high-resolution Y) of one image, both float32 in [0, 1]."""
    from PIL import Image

    image = decode_image(path)
    width, height = (image.width // scale) * scale, (image.height // scale) * scale
    if width < 2 * scale or height < 2 * scale:
        raise RepqError(f"image {path} is too small for x{scale} super-resolution: remove it from the folder")
    high = image.crop((0, 0, width, height))
    low = high.resize((width // scale, height // scale), Image.BICUBIC)
    return _y(low), _y(high)


def _y(image) -> np.ndarray:
    return rgb_to_y(np.asarray(image, dtype=np.float32) / 255.0).astype(np.float32)


def psnr(prediction: np.ndarray, target: np.ndarray, border: int) -> float:
    """PSNR (dB) of a prediction clipped to [0, 1] against the target, `border` pixels cropped on each side."""
    if border:
        prediction, target = prediction[border:-border, border:-border], target[border:-border, border:-border]
    mse = float(np.mean((np.clip(prediction, 0, 1).astype(np.float64) - target) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def image_files(folder: str | Path) -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise RepqError(f"image folder {root} does not exist: pass a folder of images (e.g. Set5)")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RepqError(f"{root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): pass a folder of images")
    return files


class SRValidation:
    """Whole-image (low, high) pairs of a folder, one image per batch (sizes differ), scored by PSNR.

    Iterating yields (low, high) as 1x1xhxw / 1x1x(hs)x(ws) tensors; `score(predict)` is the metric every
    runtime (PyTorch, ONNX Runtime, OpenVINO) reports for this task.
    """

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], scale: int, name: str = ""):
        self.pairs, self.scale, self.name = pairs, scale, name

    @classmethod
    def from_folder(cls, folder: str | Path, scale: int) -> SRValidation:
        return cls([sr_pair(path, scale) for path in image_files(folder)], scale, str(folder))

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        for low, high in self.pairs:
            yield torch.from_numpy(low)[None, None], torch.from_numpy(high)[None, None]

    def score(self, predict) -> dict:
        """Mean PSNR (dB) of `predict` (float32 N,1,h,w numpy -> N,1,hs,ws) over the images."""
        scores = []
        for low, high in self.pairs:
            output = np.asarray(predict(np.ascontiguousarray(low[None, None])), dtype=np.float32)
            if output.shape[-2:] != high.shape:
                raise RepqError(f"the model turned a {low.shape} input into {output.shape[-2:]}, not {high.shape}: "
                                f"is it a x{self.scale} super-resolution model? pass the right scale")
            if not np.isfinite(output).all():
                raise RepqError("the model produced NaN or inf on a validation image: the weights are broken")
            scores.append(psnr(output[0, 0], high, border=self.scale))
        return {"psnr": float(np.mean(scores)), "images": len(scores)}


class SRPatches(Dataset):
    """Aligned (low, high) patches of training images, `per_image` per image and epoch, with flips and
    transposes. Crops are seeded by (seed, epoch, index) like ImageSet's augmentation: reproducible on any
    rank and after a resume."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], scale: int, patch: int, per_image: int,
                 seed: int = 0, augment: bool = True):
        small = [low.shape for low, _ in pairs if min(low.shape) < patch]
        if small:
            raise RepqError(f"a training image's low-resolution size {small[0]} is under the patch size {patch}: "
                            "lower data.patch or remove small images")
        self.pairs, self.scale, self.patch, self.per_image = pairs, scale, patch, per_image
        self.seed, self.augment, self.epoch = seed, augment, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs) * self.per_image

    def __getitem__(self, i: int):
        low, high = self.__getitems__([i])
        return low[0], high[0]

    def __getitems__(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        seeds = mix_seed(index + mix_seed(torch.tensor(self.seed * 100_003 + self.epoch))).tolist()
        lows, highs = zip(*(self._crop(int(i) % len(self.pairs), s) for i, s in zip(index.tolist(), seeds,
                                                                                     strict=True)), strict=True)
        return torch.stack(lows), torch.stack(highs)

    def _crop(self, image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.pairs[image]
        rng = np.random.default_rng(seed)
        p, s = self.patch, self.scale
        y, x = int(rng.integers(0, low.shape[0] - p + 1)), int(rng.integers(0, low.shape[1] - p + 1))
        low = torch.from_numpy(low[y:y + p, x:x + p].copy())[None]
        high = torch.from_numpy(high[y * s:(y + p) * s, x * s:(x + p) * s].copy())[None]
        if self.augment:
            flips = rng.integers(0, 2, size=3)
            if flips[0]:
                low, high = low.flip(-1), high.flip(-1)
            if flips[1]:
                low, high = low.flip(-2), high.flip(-2)
            if flips[2]:
                low, high = low.transpose(-1, -2), high.transpose(-1, -2)
        return low.contiguous(), high.contiguous()

    def fixed(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` patches without flips, drawn with `seed`: the calibration set of a super-resolution model."""
        plain = SRPatches(self.pairs, self.scale, self.patch, self.per_image, seed=seed, augment=False)
        return plain.__getitems__(range(count))


@dataclass
class SRData:
    """A super-resolution dataset: training patches and whole validation images, Y channel, one scale."""

    name: str
    scale: int
    train: SRPatches
    val: SRValidation
    task: str = TASK

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """The shape exported graphs and benchmarks use: one low-resolution training patch (H and W dynamic
        in the export)."""
        return (1, 1, self.train.patch, self.train.patch)

    def describe(self) -> dict:
        return {"name": self.name, "task": self.task, "scale": self.scale, "patch": self.train.patch,
                "train_images": len(self.train.pairs), "val_images": len(self.val), "val": self.val.name}


def load_sr_data(source: str | Path, val_source: str | Path | None, scale: int, *, patch: int = 32,
                 per_image: int = 32, seed: int = 0) -> SRData:
    """Training patches from `source` (a flat folder of images), validation on `val_source` (e.g. Set5), or,
    without one, on a seeded tenth of `source`'s images held out."""
    if scale not in (2, 3, 4):
        raise RepqError(f"super-resolution scale {scale} is not supported: use 2, 3 or 4")
    files = image_files(source)
    if val_source is None:
        order = np.random.default_rng(seed).permutation(len(files))
        held = max(1, len(files) // 10)
        if len(files) - held < 1:
            raise RepqError(f"{source} has {len(files)} image(s): give data.val_source or add images")
        val_files, files = [files[i] for i in sorted(order[:held])], [files[i] for i in sorted(order[held:])]
        val = SRValidation([sr_pair(p, scale) for p in val_files], scale, f"{source} (held out)")
    else:
        val = SRValidation.from_folder(val_source, scale)
    train = SRPatches([sr_pair(p, scale) for p in files], scale, patch, per_image, seed=seed)
    return SRData(name=str(source), scale=scale, train=train, val=val)
